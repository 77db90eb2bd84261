import type { BlockDevice, WriteOptions } from "@udm/kcopyd";
import type { SnapshotState } from "./snapshot-state.js";

/** What a snapshot-merge target offers the origin while it runs: the merged view of the origin. */
export interface MergingTarget {
  readonly state: SnapshotState;
  mapRead(offsetBytes: number, target: Buffer): Promise<void>;
  mapWrite(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void>;
  mapWriteZeroes(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void>;
}

/**
 * Everything attached to one origin device (the kernel's `struct origin`, found in its origin
 * hash by block device): the snapshots of it, largest chunk first, and the merging one if any.
 * Targets find it by device identity, since the CLI hands every table the same BlockDevice
 * object for the same spec.
 *
 * @example
 * ```ts
 * const origin = originStateOf(dev);
 * await origin.originWrite(0, 4096, () => dev.write(0, data)); // copies out first
 * ```
 */
export class OriginState {
  readonly snapshots: SnapshotState[] = [];
  merging: MergingTarget | null = null;

  constructor(readonly device: BlockDevice) {}

  /** Adds a snapshot, keeping the list sorted by chunk size, largest first (`__insert_snapshot`). */
  register(snap: SnapshotState): void {
    if (this.snapshots.includes(snap)) return;
    const at = this.snapshots.findIndex((s) => s.chunkSectors < snap.chunkSectors);
    if (at < 0) this.snapshots.push(snap);
    else this.snapshots.splice(at, 0, snap);
  }

  unregister(snap: SnapshotState): void {
    const at = this.snapshots.indexOf(snap);
    if (at >= 0) this.snapshots.splice(at, 1);
    if (this.merging?.state === snap) this.merging = null;
  }

  /** Smallest chunk of all snapshots in bytes (`__minimum_chunk_size`), or null with none. */
  minimumChunkBytes(): number | null {
    let min: number | null = null;
    for (const s of this.snapshots) if (min === null || s.chunkBytes < min) min = s.chunkBytes;
    return min;
  }

  /** The live (not handed over) snapshot that uses `cow`, if any (`__find_snapshots_sharing_cow`). */
  findSharingCow(cow: BlockDevice): SnapshotState | undefined {
    return this.snapshots.find((s) => sameStorage(s.cow, cow) && !s.handedOver);
  }

  /**
   * Starts every copy-out an origin write of `[offset, offset+length)` needs (`__origin_write`
   * without a bio): for each active, valid, non-merging snapshot lacking a chunk in the range,
   * finds or creates the pending exception and starts its copy. Returns what to wait for; empty
   * means the origin may be written now.
   */
  triggerExceptions(offsetBytes: number, lengthBytes: number): Array<Promise<unknown>> {
    const waits: Array<Promise<unknown>> = [];
    for (const snap of this.snapshots) {
      if (snap.isMerge || offsetBytes >= snap.lengthBytes || !snap.valid || !snap.active) continue;
      const first = Math.floor(offsetBytes / snap.chunkBytes);
      const end = Math.min(offsetBytes + lengthBytes, snap.lengthBytes);
      const last = Math.floor((end - 1) / snap.chunkBytes);
      for (let chunk = first; chunk <= last && snap.valid; chunk++) {
        let pe = snap.pending.get(chunk);
        if (!pe) {
          if (snap.complete.has(chunk)) continue;
          pe = snap.createPending(chunk) ?? undefined;
          if (!pe) {
            // COW full: this snapshot is lost, the origin write goes on once that is on disk.
            waits.push(snap.invalidate("ENOMEM"));
            break;
          }
        }
        if (!pe.started) snap.startCopy(pe);
        waits.push(pe.done);
      }
    }
    return waits;
  }

  /**
   * Performs an origin write once every snapshot has durably copied out the old chunks
   * (`do_origin`): triggers the copies, waits, and rechecks until nothing is left to copy, then
   * runs `io` in the same tick as the last check. `limit` applies the COW-threshold throttle.
   */
  async originWrite(
    offsetBytes: number,
    lengthBytes: number,
    io: () => Promise<void>,
    limit = true,
  ): Promise<void> {
    // Only the first pass is throttled; retries after a copy-out are not (`retry_origin_bios`).
    let throttle = limit;
    for (;;) {
      if (throttle) {
        const busy = this.snapshots.find((s) => s.overThreshold);
        if (busy) {
          await busy.waitForInProgress();
          continue;
        }
        throttle = false;
      }
      // Checked and triggered in one tick, so the copies we start count for the next writer.
      const waits = this.triggerExceptions(offsetBytes, lengthBytes);
      if (!waits.length) break;
      await Promise.all(waits);
    }
    await io();
  }
}

/** True when two device objects are the same storage: one object, or one `identity` (two paths to one file). */
export function sameStorage(a: BlockDevice, b: BlockDevice): boolean {
  return a === b || (a.identity !== undefined && a.identity === b.identity);
}

const origins = new WeakMap<BlockDevice, OriginState>();
/** Origins by `identity`, so two objects (two paths) for one file or disk share one state. */
const originsByIdentity = new Map<string, WeakRef<OriginState>>();
const forgetIdentity = new FinalizationRegistry<string>((identity) => {
  if (!originsByIdentity.get(identity)?.deref()) originsByIdentity.delete(identity);
});

/**
 * The OriginState of a device, created on first use (the kernel's `__lookup_origin` by
 * block device). Devices with an `identity` (files, block devices) share one state per
 * underlying storage, whichever object or path reaches it, so no alias of an origin can be
 * written without its snapshots' copy-outs. Kept as long as a device object or target holds it.
 */
export function originStateOf(dev: BlockDevice): OriginState {
  let state = origins.get(dev);
  if (state) return state;
  if (dev.identity !== undefined) state = originsByIdentity.get(dev.identity)?.deref();
  if (!state) {
    state = new OriginState(dev);
    if (dev.identity !== undefined) {
      originsByIdentity.set(dev.identity, new WeakRef(state));
      forgetIdentity.register(state, dev.identity);
    }
  }
  origins.set(dev, state);
  return state;
}
