import { existsSync } from "node:fs";
import type { BlockDevice } from "./block-device.js";
import { FileDevice } from "./file-device.js";
import { MemoryDevice } from "./memory-device.js";
import { parseSize } from "./size.js";

export interface OpenDeviceOptions {
  readOnly?: boolean;
  /** Create a missing regular file of this size (sparse). */
  createSizeBytes?: number;
}

/** Opens a device for a URI of one scheme (`nbd`, `nbd+unix`...), registered by the package that owns it. */
export type DeviceOpener = (spec: string, options: OpenDeviceOptions) => Promise<BlockDevice>;

const openers = new Map<string, DeviceOpener>();

/**
 * Registers an opener for `scheme:` device arguments; `@udm/nbd-server` registers `nbd` and `nbd+unix`.
 *
 * @example
 * ```ts
 * registerDeviceScheme("nbd", (spec) => NbdDevice.connect(spec));
 * ```
 */
export function registerDeviceScheme(scheme: string, opener: DeviceOpener): void {
  openers.set(scheme, opener);
}

/**
 * Opens a device argument: a path (regular file or block device), `file:PATH`, `mem:SIZE`,
 * or a URI of a registered scheme such as `nbd://HOST:PORT/EXPORT`.
 *
 * @example
 * ```ts
 * const ram = await openDevice("mem:4G");
 * const disk = await openDevice("file:/var/lib/disk.img");
 * ```
 */
export async function openDevice(spec: string, options: OpenDeviceOptions = {}): Promise<BlockDevice> {
  if (spec.startsWith("mem:")) {
    return new MemoryDevice(parseSize(spec.slice(4)), { name: spec, readOnly: options.readOnly ?? false });
  }
  if (spec.startsWith("file:")) {
    const path = spec.startsWith("file://") ? new URL(spec).pathname : spec.slice(5);
    return FileDevice.open(path, fileOptions(options, spec));
  }
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(spec)?.[1]?.toLowerCase();
  if (scheme) {
    const opener = openers.get(scheme);
    if (!opener) {
      const known = ["file", "mem", ...openers.keys()].join(", ");
      throw new RangeError(`unknown device scheme "${scheme}:" in "${spec}" (known: ${known})`);
    }
    return opener(spec, options);
  }
  if (!existsSync(spec) && options.createSizeBytes === undefined) {
    throw new RangeError(`device "${spec}" does not exist`);
  }
  return FileDevice.open(spec, fileOptions(options, spec));
}

function fileOptions(options: OpenDeviceOptions, name: string) {
  return {
    name,
    ...(options.readOnly !== undefined && { readOnly: options.readOnly }),
    ...(options.createSizeBytes !== undefined && { createSizeBytes: options.createSizeBytes }),
  };
}
