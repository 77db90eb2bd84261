import { resolve } from "node:path";
import { type BlockDevice, type OpenDeviceOptions, openDevice } from "@udm/kcopyd";

/**
 * Turns a device argument into the spec that is opened and the key that identifies it: plain
 * paths and `file:PATH` are made absolute against `baseDir` (so `a.img`, `./a.img` and
 * `file:a.img` are one device); URIs (`mem:`, `nbd://`...) are kept as written.
 *
 * @example
 * ```ts
 * canonicalSpec("a.img", "/srv"); // "/srv/a.img"
 * canonicalSpec("mem:1G", "/srv"); // "mem:1G"
 * ```
 */
export function canonicalSpec(spec: string, baseDir: string): string {
  if (spec.startsWith("@")) return spec;
  if (spec.startsWith("file://")) return new URL(spec).pathname;
  if (spec.startsWith("file:")) return resolve(baseDir, spec.slice(5));
  if (spec.startsWith("mem:") || /^[a-z][a-z0-9+.-]*:\/\//i.test(spec)) return spec;
  return resolve(baseDir, spec);
}

interface PoolEntry {
  device: Promise<BlockDevice>;
  refs: number;
}

/**
 * Opens device specs once and shares them: the same spec yields the same BlockDevice object while
 * anyone holds it (dm's `dm_get_device`), so a snapshot finds its origin by object identity. The
 * device closes when the last holder releases it.
 *
 * @example
 * ```ts
 * const pool = new DevicePool();
 * const a = await pool.acquire("/srv/a.img");
 * const b = await pool.acquire("/srv/a.img"); // a === b
 * await pool.release("/srv/a.img"); await pool.release("/srv/a.img"); // closed now
 * ```
 */
export class DevicePool {
  private readonly entries = new Map<string, PoolEntry>();

  /** Opens (or shares) the device for a canonical spec; the caller must `release` it once. */
  async acquire(spec: string, options: OpenDeviceOptions = {}): Promise<BlockDevice> {
    let entry = this.entries.get(spec);
    if (!entry) {
      entry = { device: openDevice(spec, options), refs: 0 };
      this.entries.set(spec, entry);
      const opened = entry;
      opened.device.catch(() => {
        if (this.entries.get(spec) === opened) this.entries.delete(spec);
      });
    }
    entry.refs++;
    try {
      return await entry.device;
    } catch (err) {
      entry.refs--;
      throw err;
    }
  }

  /** Drops one hold; closes the device when none is left. */
  async release(spec: string): Promise<void> {
    const entry = this.entries.get(spec);
    if (!entry) throw new Error(`device pool: "${spec}" is not held`);
    if (--entry.refs > 0) return;
    this.entries.delete(spec);
    await (await entry.device).close();
  }

  /** How many holds a spec has (0 when closed). */
  refs(spec: string): number {
    return this.entries.get(spec)?.refs ?? 0;
  }

  /** Every open spec with its hold count. */
  held(): Array<{ spec: string; refs: number }> {
    return [...this.entries].map(([spec, e]) => ({ spec, refs: e.refs }));
  }
}
