import {
  checkRange,
  type Extent,
  IoError,
  type KcopydClient,
  mergeExtents,
  SECTOR_SIZE,
  type TargetDevice,
  type TargetLogger,
  type TargetProgress,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";
import type { MergeRun } from "./exception-store.js";
import type { MergingTarget, OriginState } from "./origin-state.js";
import { type SnapshotFeatures, snapshotStatus, snapshotTable } from "./snapshot-device.js";
import { copiedRuns, forEachPiece, type SnapshotState, splitAtBoundaries } from "./snapshot-state.js";

/**
 * Most bytes of exceptions merged per cycle: the runs of one cycle share one origin flush and one
 * metadata write (the kernel does one run per cycle); it bounds how long a write to a chunk being
 * merged waits.
 */
export const MERGE_BATCH_BYTES = 4 * 1024 * 1024;

/** kcopyd jobs (runs) of one merge cycle in flight at once: hides per-job latency for scattered chunks. */
export const MERGE_COPIES_IN_FLIGHT = 8;

const settings = { mergeBatchBytes: MERGE_BATCH_BYTES };

/**
 * Sets how many bytes of exceptions one merge cycle takes (at least one run); one chunk gives
 * the kernel's one-run-per-cycle behaviour. Returns the previous value.
 *
 * @example
 * ```ts
 * const old = setMergeBatchBytes(64 * 1024);
 * ```
 */
export function setMergeBatchBytes(bytes: number): number {
  if (!Number.isSafeInteger(bytes) || bytes < 1)
    throw new RangeError(`merge batch must be >= 1 byte, got ${bytes}`);
  const old = settings.mergeBatchBytes;
  settings.mergeBatchBytes = bytes;
  return old;
}

/** A merge that stopped on an error (copy, origin flush or metadata write), or never could start. */
export class SnapshotMergeError extends Error {
  override name = "SnapshotMergeError";
}

/** The chunks being copied back right now; writes to them wait for `done` (true = failed). */
interface MergeBatch {
  chunks: Set<number>;
  done: Promise<boolean>;
  finish: (failed: boolean) => void;
}

/**
 * dm `snapshot-merge <origin> <cow> P <chunk>`: the origin as the snapshot sees it, while the
 * snapshot's exceptions are copied back, newest first, in runs of consecutive chunks. Each run:
 * copy-outs in other snapshots of the origin, COW -> origin copy, origin flush, then the entries
 * are cleared on disk (FUA), so a crash at any point resumes without loss. Chunks not yet merged
 * are read and written on the COW; a write to a run being merged waits for it.
 *
 * @example
 * ```ts
 * const merge = (await snapshotMergeTarget.create([origin, cow, "P", "0"], size, ctx)) as MergeDevice;
 * merge.progress(); // { operation: "merge", doneBytes, totalBytes }
 * await merge.whenMerged(); // origin now holds the snapshot's content
 * ```
 */
export class MergeDevice implements TargetDevice, MergingTarget {
  readonly targetType = "snapshot-merge";
  readonly name: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  private totalChunks: number;
  /** Set when this target takes over a live snapshot: the handover runs in dm's preresume. */
  preresume?: () => Promise<void>;
  private mergedChunks = 0;
  private batch: MergeBatch | null = null;
  private running: Promise<void> | null = null;
  private shutdown = false;
  private finished = false;
  private closed = false;
  private readonly merged: Promise<void>;
  private resolveMerged!: () => void;
  private rejectMerged!: (err: Error) => void;

  constructor(
    readonly state: SnapshotState,
    private readonly originState: OriginState,
    private readonly kcopyd: KcopydClient,
    private readonly log?: TargetLogger,
    name?: string,
    /** Feature arguments of the table line, echoed by `table()` (they have no effect while merging). */
    readonly features?: SnapshotFeatures,
  ) {
    this.name = name ?? `snapshot-merge(${state.cow.name})`;
    this.sizeBytes = state.lengthBytes;
    this.logicalBlockSize = Math.max(state.origin.logicalBlockSize, state.cow.logicalBlockSize);
    this.readOnly = state.origin.readOnly;
    this.totalChunks = state.complete.size;
    this.merged = new Promise<void>((resolve, reject) => {
      this.resolveMerged = resolve;
      this.rejectMerged = reject;
    });
    // Callers that never ask must not see an unhandled rejection.
    this.merged.catch(() => undefined);
  }

  table(): string {
    return snapshotTable(this.state, this.features);
  }

  status(): string {
    return snapshotStatus(this.state);
  }

  progress(): TargetProgress {
    const chunkBytes = this.state.chunkBytes;
    return {
      operation: "merge",
      doneBytes: this.mergedChunks * chunkBytes,
      totalBytes: this.totalChunks * chunkBytes,
    };
  }

  /** Resolves when no exception is left (the CLI then removes the device); rejects if the merge failed. */
  whenMerged(): Promise<void> {
    return this.merged;
  }

  /**
   * Counts the exceptions to merge again: the tables of a live snapshot are handed over in
   * preresume, after this device was built.
   */
  countExceptions(): void {
    this.totalChunks = this.state.complete.size;
  }

  /** Starts (or restarts after resume) the merge loop (`start_merge`). */
  start(): void {
    if (this.running || this.finished || this.closed) return;
    this.log?.info(
      {
        snapshot: this.name,
        chunksToMerge: this.totalChunks - this.mergedChunks,
        chunksMerged: this.mergedChunks,
      },
      this.mergedChunks === 0 ? "merge started" : "merge restarted",
    );
    this.shutdown = false;
    this.running = this.mergeLoop().finally(() => {
      this.running = null;
    });
  }

  /** Stops after the current run and waits for it (`stop_merge`). */
  async stop(): Promise<void> {
    this.shutdown = true;
    await this.running;
  }

  async suspend(): Promise<void> {
    await this.stop();
  }

  async resume(): Promise<void> {
    this.start();
  }

  private fail(message: string, err?: unknown): void {
    this.log?.error({ snapshot: this.name, err }, message);
    this.state.mergeFailed = true;
    this.rejectMerged(new SnapshotMergeError(`${this.name}: ${message}`));
  }

  private async mergeLoop(): Promise<void> {
    const s = this.state;
    const store = s.store;
    if (!store.prepareMerge || !store.commitMerge) {
      this.fail("the exception store cannot merge (transient snapshot)");
      return;
    }
    while (!this.shutdown) {
      const maxChunks = Math.max(1, Math.floor(settings.mergeBatchBytes / s.chunkBytes));
      if (!s.valid) {
        this.log?.error({ snapshot: this.name }, "snapshot is invalid: can't merge");
        this.rejectMerged(new SnapshotMergeError(`${this.name}: snapshot is invalid: can't merge`));
        return;
      }
      let runs: MergeRun[];
      try {
        if (store.prepareMergeBatch) runs = await store.prepareMergeBatch(maxChunks);
        else {
          const run = await store.prepareMerge();
          runs = run ? [run] : [];
        }
      } catch (err) {
        this.fail("read error in exception store: shutting down merge", err);
        return;
      }
      if (!runs.length) {
        this.finished = true;
        this.log?.info({ snapshot: this.name }, "merge complete");
        this.resolveMerged();
        return;
      }
      const cs = s.chunkSectors;
      const originSectors = Math.floor(s.origin.sizeBytes / SECTOR_SIZE);
      const copies = runs.map((run) => {
        const firstOld = run.lastOldChunk + 1 - run.count;
        const firstNew = run.lastNewChunk + 1 - run.count;
        return { run, firstOld, firstNew, count: Math.min(run.count * cs, originSectors - firstOld * cs) };
      });
      // The table on disk and the one in memory must agree before anything is copied: a
      // mismatch would copy some other COW chunk over the origin (`remove_single_exception_chunk`).
      const stray = copies
        .flatMap((c) => Array.from({ length: c.run.count }, (_, i) => [c.firstOld + i, c.firstNew + i]))
        .find(([oldChunk, newChunk]) => s.complete.get(oldChunk!) !== newChunk);
      if (stray) {
        this.fail(
          `Corruption detected: exception for block ${stray[0]} (COW chunk ${stray[1]}) is on disk but not in memory: shutting down merge`,
        );
        return;
      }
      // Other snapshots copy out what the merge is about to overwrite (`origin_write_extent`).
      for (;;) {
        const waits = copies.flatMap((c) =>
          this.originState.triggerExceptions(c.firstOld * s.chunkBytes, c.count * SECTOR_SIZE),
        );
        if (!waits.length) break;
        await Promise.all(waits);
      }
      let finish!: (failed: boolean) => void;
      const done = new Promise<boolean>((resolve) => {
        finish = resolve;
      });
      const chunks = new Set<number>();
      for (const c of copies) for (let i = 0; i < c.run.count; i++) chunks.add(c.firstOld + i);
      this.batch = { chunks, done, finish };
      for (const chunk of chunks) await s.waitUntracked(chunk);
      let failure: string | null = null;
      // One kcopyd job per run of consecutive chunks, started newest first, a few at a time: the
      // whole batch is flushed and committed together, so their completion order does not matter.
      let next = 0;
      const worker = async () => {
        while (!failure && next < copies.length) {
          const c = copies[next++]!;
          const result = await this.kcopyd.copyAsync(
            { dev: s.cow, sector: c.firstNew * cs, count: c.count },
            [{ dev: s.origin, sector: c.firstOld * cs, count: c.count }],
          );
          if (result.readErr) failure ??= "read error: shutting down merge";
          else if (result.writeErr) failure ??= "write error: shutting down merge";
        }
      };
      await Promise.all(Array.from({ length: Math.min(MERGE_COPIES_IN_FLIGHT, copies.length) }, worker));
      if (!failure) {
        try {
          await s.origin.flush();
        } catch {
          failure = "flush after merge failed: shutting down merge";
        }
      }
      if (!failure) {
        try {
          await store.commitMerge(chunks.size);
        } catch {
          failure = "write error in exception store: shutting down merge";
        }
      }
      if (failure) {
        this.fail(failure);
        this.releaseBatch(true);
        return;
      }
      for (const c of copies) {
        for (let chunk = c.firstOld + c.run.count - 1; chunk >= c.firstOld; chunk--) s.complete.delete(chunk);
      }
      this.mergedChunks += chunks.size;
      this.releaseBatch(false);
    }
  }

  private releaseBatch(failed: boolean): void {
    const batch = this.batch;
    this.batch = null;
    batch?.finish(failed);
  }

  private inBatch(chunk: number): MergeBatch | null {
    const b = this.batch;
    return b?.chunks.has(chunk) ? b : null;
  }

  async mapRead(offsetBytes: number, target: Buffer): Promise<void> {
    const s = this.state;
    await Promise.all(
      splitAtBoundaries(offsetBytes, target.length, s.chunkBytes, async (at, length, bufAt) => {
        const piece = target.subarray(bufAt, bufAt + length);
        const mapped = s.valid ? s.complete.get(Math.floor(at / s.chunkBytes)) : undefined;
        if (mapped !== undefined) await s.cow.readInto(s.cowOffset(mapped, at), piece);
        else await s.origin.readInto(at, piece);
      }),
    );
  }

  private async writePiece(
    at: number,
    length: number,
    io: (dev: "cow" | "origin", offset: number) => Promise<void>,
  ): Promise<void> {
    const s = this.state;
    for (;;) {
      const chunk = Math.floor(at / s.chunkBytes);
      const mapped = s.valid ? s.complete.get(chunk) : undefined;
      if (mapped === undefined) break;
      const batch = this.inBatch(chunk);
      if (batch) {
        if (await batch.done)
          throw new IoError("EIO", this.name, "merge failed while this write waited for it");
        continue;
      }
      s.track(chunk);
      try {
        await io("cow", s.cowOffset(mapped, at));
      } finally {
        s.untrack(chunk);
      }
      return;
    }
    await this.originState.originWrite(at, length, () => io("origin", at), false);
  }

  private boundary(): number {
    return Math.min(this.originState.minimumChunkBytes() ?? this.state.chunkBytes, this.state.chunkBytes);
  }

  async mapWrite(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    const s = this.state;
    await forEachPiece(offsetBytes, data.length, this.boundary(), (at, length, bufAt) =>
      this.writePiece(at, length, (dev, offset) =>
        (dev === "cow" ? s.cow : s.origin).write(offset, data.subarray(bufAt, bufAt + length), options),
      ),
    );
  }

  async mapWriteZeroes(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    const s = this.state;
    await forEachPiece(offsetBytes, lengthBytes, this.boundary(), (at, length) =>
      this.writePiece(at, length, (dev, offset) =>
        (dev === "cow" ? s.cow : s.origin).writeZeroes(offset, length, options),
      ),
    );
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    await this.mapRead(offsetBytes, target);
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length);
    await this.mapWrite(offsetBytes, data, options);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    await this.mapWriteZeroes(offsetBytes, lengthBytes, options);
  }

  /** Once merging, discards no longer change anything (`snapshot_merge_map`). */
  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
  }

  async flush(): Promise<void> {
    await Promise.all([this.state.origin.flush(), this.state.cow.flush()]);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    const s = this.state;
    if (!s.valid) return s.origin.extents(offsetBytes, lengthBytes);
    const parts = await Promise.all(
      copiedRuns(s, offsetBytes, lengthBytes).map(
        async (run): Promise<Extent[]> =>
          run.copied
            ? [{ offsetBytes: run.offsetBytes, lengthBytes: run.lengthBytes, kind: "data" }]
            : s.origin.extents(run.offsetBytes, run.lengthBytes),
      ),
    );
    return mergeExtents(parts.flat());
  }

  /** Stops the merge and detaches from the origin; an unfinished merge resumes when the table is loaded again. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.stop();
    this.originState.unregister(this.state);
    if (!this.finished)
      this.rejectMerged(new SnapshotMergeError(`${this.name}: device removed before the merge finished`));
    await this.state.drainPending();
  }
}
