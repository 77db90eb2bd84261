import {
  checkRange,
  type Extent,
  IoError,
  mergeExtents,
  type StatusContext,
  type TargetDevice,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";
import type { OriginState } from "./origin-state.js";
import { copiedRuns, forEachPiece, type SnapshotState, splitAtBoundaries } from "./snapshot-state.js";

/** Name of the NBD meta context listing a snapshot's copied chunks. */
export const SNAPSHOT_EXCEPTIONS_CONTEXT = "snapshot:exceptions";
/** Flag of `snapshot:exceptions`: the chunk was copied, i.e. origin and snapshot may differ there. */
export const SNAPSHOT_CHUNK_COPIED = 1;

export interface SnapshotFeatures {
  /** A discard of a whole chunk zeroes its COW chunk (`discard_zeroes_cow`). */
  discardZeroesCow: boolean;
  /** Discards also go to the origin (`discard_passdown_origin`). */
  discardPassdownOrigin: boolean;
}

/** The `Invalid` / `Merge failed` / `Overflow` / usage status line of a snapshot or merge target. */
export function snapshotStatus(state: SnapshotState): string {
  if (!state.valid) return "Invalid";
  if (state.mergeFailed) return "Merge failed";
  if (state.overflowed) return "Overflow";
  const u = state.store.usage();
  return `${u.sectorsAllocated}/${u.totalSectors} ${u.metadataSectors}`;
}

/** `<origin> <cow> <P|PO|N> <chunk_sectors> [<n> <features>]`, as `snapshot_status` prints the table. */
export function snapshotTable(state: SnapshotState, features?: SnapshotFeatures): string {
  const base = `${state.origin.name} ${state.cow.name} ${state.store.tableType} ${state.chunkSectors}`;
  const f: string[] = [];
  if (features?.discardZeroesCow) f.push("discard_zeroes_cow");
  if (features?.discardPassdownOrigin) f.push("discard_passdown_origin");
  return f.length ? `${base} ${f.length} ${f.join(" ")}` : base;
}

/**
 * dm `snapshot`: the origin frozen at the moment the snapshot went live, and writable. Reads of
 * chunks that were copied (or written) come from the COW, the rest from the origin while holding
 * off a racing copy-out; writes allocate an exception first (a whole-chunk write skips the copy).
 *
 * @example
 * ```ts
 * const snap = await snapshotTarget.create([originPath, cowPath, "P", "16"], size, context);
 * await originDevice.write(0, newData); // snap still reads the old bytes
 * console.log(snap.status());           // "48/131072 16"
 * ```
 */
export class SnapshotDevice implements TargetDevice {
  readonly targetType = "snapshot";
  readonly name: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  /**
   * Set when this target takes over a live snapshot on the same COW: the handover happens in
   * dm's preresume (the table it replaces is suspended then), never while it is only built.
   */
  preresume?: () => Promise<void>;
  private closed = false;

  constructor(
    readonly state: SnapshotState,
    private readonly originState: OriginState,
    readonly features: SnapshotFeatures,
    name?: string,
  ) {
    this.name = name ?? `snapshot(${state.cow.name})`;
    this.sizeBytes = state.lengthBytes;
    this.logicalBlockSize = Math.max(state.origin.logicalBlockSize, state.cow.logicalBlockSize);
    this.readOnly = state.cow.readOnly;
  }

  table(): string {
    return snapshotTable(this.state, this.features);
  }

  status(): string {
    return snapshotStatus(this.state);
  }

  private eio(what: string): IoError {
    const s = this.state;
    const why = !s.valid
      ? s.handedOver
        ? "snapshot was handed over to another target"
        : "snapshot is invalid"
      : what;
    return new IoError("EIO", this.name, why);
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  /**
   * Runs of chunks still shared with the origin are read from it in one request each (tracked, so
   * a copy-out cannot finish under the read); copied chunks come from their COW chunks. The
   * lookups and the tracking happen in one tick.
   */
  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    const s = this.state;
    if (!s.valid) throw this.eio("read");
    const reads: Array<Promise<void>> = [];
    for (const run of copiedRuns(s, offsetBytes, target.length)) {
      const bufAt = run.offsetBytes - offsetBytes;
      const piece = target.subarray(bufAt, bufAt + run.lengthBytes);
      if (run.copied) {
        splitAtBoundaries(run.offsetBytes, run.lengthBytes, s.chunkBytes, (at, length, at0) => {
          const newChunk = s.complete.get(Math.floor(at / s.chunkBytes))!;
          reads.push(s.cow.readInto(s.cowOffset(newChunk, at), piece.subarray(at0, at0 + length)));
        });
        continue;
      }
      const first = Math.floor(run.offsetBytes / s.chunkBytes);
      const last = Math.floor((run.offsetBytes + run.lengthBytes - 1) / s.chunkBytes);
      for (let c = first; c <= last; c++) s.track(c);
      reads.push(
        s.origin.readInto(run.offsetBytes, piece).finally(() => {
          for (let c = first; c <= last; c++) s.untrack(c);
        }),
      );
    }
    await Promise.all(reads);
  }

  private aborted = false;

  /** Once closing (or aborted at shutdown), a request in flight starts no more pieces (they fail with EIO). */
  private readonly stopped = (): Error | null =>
    this.closed || this.aborted
      ? new IoError(
          "EIO",
          this.name,
          `device is ${this.closed ? "closing" : "stopping"}: the rest of the request was not written`,
        )
      : null;

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length);
    if (this.readOnly) throw new IoError("EPERM", this.name, "COW device is read-only");
    await forEachPiece(
      offsetBytes,
      data.length,
      this.state.chunkBytes,
      (at, length, bufAt) => this.writePiece(at, data.subarray(bufAt, bufAt + length), options),
      this.stopped,
    );
  }

  private async writePiece(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    const s = this.state;
    if (!s.valid || s.overflowed) throw this.eio("snapshot overflowed: writes fail, reads still work");
    // Only yield when over the threshold: the check and the copy it starts happen in one tick.
    while (s.overThreshold) await s.waitForInProgress();
    if (!s.valid || s.overflowed) throw this.eio("snapshot overflowed: writes fail, reads still work");
    const chunk = Math.floor(offsetBytes / s.chunkBytes);
    const mapped = s.complete.get(chunk);
    if (mapped !== undefined) {
      await s.cow.write(s.cowOffset(mapped, offsetBytes), data, options);
      return;
    }
    let pe = s.pending.get(chunk);
    if (!pe) {
      pe = s.createPending(chunk) ?? undefined;
      if (!pe) {
        if (s.store.userspaceSupportsOverflow) {
          s.overflowed = true;
          throw new IoError("EIO", this.name, "snapshot overflowed: the COW device is full");
        }
        await s.invalidate("ENOMEM");
        throw new IoError("EIO", this.name, "snapshot invalidated: the COW device is full");
      }
    }
    if (!pe.started && data.length === s.chunkBytes) {
      // The write covers the chunk: it becomes the chunk's content, no copy needed.
      s.startFullWrite(pe, data, options);
      if (!(await pe.done)) throw this.eio("snapshot write failed");
      return;
    }
    if (!pe.started) s.startCopy(pe);
    if (!(await pe.done)) throw this.eio("copy-out failed");
    await s.cow.write(s.cowOffset(pe.newChunk, offsetBytes), data, options);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    if (this.readOnly) throw new IoError("EPERM", this.name, "COW device is read-only");
    // Every piece writes from the one shared chunk of zeros.
    const zeros = this.state.zeroChunk;
    await forEachPiece(
      offsetBytes,
      lengthBytes,
      this.state.chunkBytes,
      (at, length) => this.writePiece(at, zeros.subarray(0, length), options),
      this.stopped,
    );
  }

  /** Flushes go to the COW, also on an invalid snapshot (`snapshot_map` handles PREFLUSH first). */
  async flush(): Promise<void> {
    await this.state.cow.flush();
  }

  /**
   * Without `discard_zeroes_cow` a discard is advisory and does nothing. With it, a discard of a
   * whole copied chunk zeroes that COW chunk, a partial one is passed to the COW, and chunks
   * never copied are left alone (`snapshot_map`).
   */
  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    const s = this.state;
    if (!this.features.discardZeroesCow) return;
    if (!s.valid || s.overflowed) throw this.eio("discard");
    // Only copied chunks have anything to discard: the cost follows the exceptions, not the range.
    for (const run of copiedRuns(s, offsetBytes, lengthBytes)) {
      if (!run.copied) continue;
      await forEachPiece(
        run.offsetBytes,
        run.lengthBytes,
        s.chunkBytes,
        async (at, length) => {
          const mapped = s.complete.get(Math.floor(at / s.chunkBytes));
          if (mapped === undefined) return;
          if (length === s.chunkBytes) await s.cow.writeZeroes(s.cowOffset(mapped, at), length, options);
          else await s.cow.discard(s.cowOffset(mapped, at), length, options);
        },
        this.stopped,
      );
    }
    if (this.features.discardPassdownOrigin) await s.origin.discard(offsetBytes, lengthBytes, options);
  }

  /** An invalid snapshot has no extents either: a hint must never stand in for the EIO of a read. */
  /** Process shutdown: requests in flight fail their unstarted pieces (see `TargetDevice.abortRequests`). */
  abortRequests(): void {
    this.aborted = true;
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    if (!this.state.valid) throw this.eio("extents");
    const parts = await Promise.all(
      copiedRuns(this.state, offsetBytes, lengthBytes).map(
        async (run): Promise<Extent[]> =>
          run.copied
            ? [{ offsetBytes: run.offsetBytes, lengthBytes: run.lengthBytes, kind: "data" }]
            : this.state.origin.extents(run.offsetBytes, run.lengthBytes),
      ),
    );
    return mergeExtents(parts.flat());
  }

  /** `snapshot:exceptions`: flag 1 on chunks copied since the snapshot was taken. */
  statusContexts(): StatusContext[] {
    const s = this.state;
    return [
      {
        name: SNAPSHOT_EXCEPTIONS_CONTEXT,
        description:
          "chunks copied to the COW since the snapshot (flag 1): what changed on the origin or the snapshot",
        query: async (offsetBytes, lengthBytes) => {
          checkRange(this, offsetBytes, lengthBytes);
          const runs = copiedRuns(s, offsetBytes, lengthBytes).map((run) => ({
            lengthBytes: run.lengthBytes,
            flags: run.copied ? SNAPSHOT_CHUNK_COPIED : 0,
          }));
          return runs;
        },
      },
    ];
  }

  /** Waits for pending exceptions, then detaches from the origin (`snapshot_dtr`); the COW stays open. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.originState.unregister(this.state);
    await this.state.drainPending();
  }
}
