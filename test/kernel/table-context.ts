/**
 * A TargetContext over devices the test opened itself: `openDevice(spec)` hands out the object
 * registered under that spec (the same object each time, as a udm table does).
 */
import type { BlockDevice, KcopydClient, TargetContext } from "@udm/kcopyd";

/**
 * @example
 * ```ts
 * const ctx = tableContext({ "a.img": a, "b.img": b }, new KcopydClient());
 * const mirror = await mirrorTarget.create(["core", "1", "1024", "2", "a.img", "0", "b.img", "0"], size, ctx);
 * ```
 */
export function tableContext(
  devices: Record<string, BlockDevice>,
  kcopyd: KcopydClient,
  deviceName?: string,
): TargetContext {
  return {
    kcopyd,
    ...(deviceName !== undefined && { deviceName }),
    async openDevice(spec: string) {
      const dev = devices[spec];
      if (!dev)
        throw new RangeError(`test table has no device "${spec}" (has ${Object.keys(devices).join(", ")})`);
      return dev;
    },
  };
}
