import { statSync } from "node:fs";
import { stat } from "node:fs/promises";
import { isAbsolute, resolve } from "node:path";
import { type BlockDevice, type OpenDeviceOptions, openDevice, storageIdentity } from "@udm/kcopyd";

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
  /** The spec it was first opened by (what `held()` lists). */
  spec: string;
}

/**
 * The identity a spec is pooled under: for an existing path, what it names (`storageIdentity`:
 * device number or inode, so symlinks, hard links, `/dev/disk/by-id` names and bind mounts all
 * meet); otherwise the spec itself. Null when the path does not exist (yet).
 */
async function identityOf(spec: string): Promise<string | null> {
  if (!isAbsolute(spec)) return spec;
  try {
    return storageIdentity(await stat(spec));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    return spec;
  }
}

/**
 * Opens devices once and shares them: every spec that names the same storage (the same spec,
 * a symlink, a hard link, another `/dev` name of one block device) yields the same BlockDevice
 * object while anyone holds it (dm's `dm_get_device`, which matches by dev_t), so a snapshot
 * finds its origin whatever path names it. The device closes when the last holder releases it.
 *
 * @example
 * ```ts
 * const pool = new DevicePool();
 * const a = await pool.acquire("/srv/a.img");
 * const b = await pool.acquire("/srv/link-to-a.img"); // a === b
 * await pool.release("/srv/a.img"); await pool.release("/srv/link-to-a.img"); // closed now
 * ```
 */
export class DevicePool {
  /** Open devices by identity. */
  private readonly entries = new Map<string, PoolEntry>();
  /** The identities each spec's holds were taken on, oldest first (a path may be re-pointed). */
  private readonly holds = new Map<string, string[]>();

  /** Opens (or shares) the device for a canonical spec; the caller must `release` it once. */
  async acquire(spec: string, options: OpenDeviceOptions = {}): Promise<BlockDevice> {
    const known = await identityOf(spec);
    let identity = known ?? spec;
    let entry = known === null ? undefined : this.entries.get(known);
    if (!entry) {
      const device = openDevice(spec, options);
      if (known === null) {
        // Created by this open: its identity is known only now.
        const opened = await device;
        identity = opened.identity ?? spec;
        entry = this.entries.get(identity);
        if (entry) await opened.close();
      }
      if (!entry) {
        const created: PoolEntry = { device, refs: 0, spec };
        const key = identity;
        this.entries.set(key, created);
        entry = created;
        device.catch(() => {
          if (this.entries.get(key) === created) this.entries.delete(key);
        });
      }
    }
    entry.refs++;
    try {
      const dev = await entry.device;
      const list = this.holds.get(spec) ?? [];
      list.push(identity);
      this.holds.set(spec, list);
      return dev;
    } catch (err) {
      entry.refs--;
      throw err;
    }
  }

  /** Drops one hold; closes the device when none is left. */
  async release(spec: string): Promise<void> {
    const list = this.holds.get(spec);
    const identity = list?.shift();
    const entry = identity === undefined ? undefined : this.entries.get(identity);
    if (!list || identity === undefined || !entry) throw new Error(`device pool: "${spec}" is not held`);
    if (!list.length) this.holds.delete(spec);
    if (--entry.refs > 0) return;
    this.entries.delete(identity);
    await (await entry.device).close();
  }

  /** How many holds the device a spec names has, through any of its names (0 when closed). */
  refs(spec: string): number {
    let identity = this.holds.get(spec)?.[0];
    if (identity === undefined) {
      try {
        identity = isAbsolute(spec) ? storageIdentity(statSync(spec)) : spec;
      } catch {
        identity = spec;
      }
    }
    return this.entries.get(identity)?.refs ?? 0;
  }

  /** Every open device (by the spec that opened it) with its hold count. */
  held(): Array<{ spec: string; refs: number }> {
    return [...this.entries.values()].map((e) => ({ spec: e.spec, refs: e.refs }));
  }
}
