import {
  type BlockDevice,
  type KcopydClient,
  SECTOR_SIZE,
  type TargetLogger,
  type WriteOptions,
} from "@udm/kcopyd";
import type { ExceptionStore } from "./exception-store.js";

/**
 * Copy-outs a snapshot may have in flight before writes wait (`DEFAULT_COW_THRESHOLD`, the
 * kernel's `snapshot_cow_threshold`): bounds memory and queueing under a write storm.
 */
export const COW_THRESHOLD = 2048;

const settings = { cowThreshold: COW_THRESHOLD };

/**
 * Sets the COW threshold of every snapshot without its own (the `snapshot_cow_threshold` module
 * parameter); returns the previous value.
 *
 * @example
 * ```ts
 * const old = setSnapshotCowThreshold(64); // at most ~64 copy-outs in flight per snapshot
 * ```
 */
export function setSnapshotCowThreshold(copies: number): number {
  if (!Number.isInteger(copies) || copies < 1)
    throw new RangeError(`COW threshold must be >= 1, got ${copies}`);
  const old = settings.cowThreshold;
  settings.cowThreshold = copies;
  return old;
}

/** An exception being created (`struct dm_snap_pending_exception`). */
export interface PendingException {
  oldChunk: number;
  newChunk: number;
  /** Allocation order; commits happen strictly in this order. */
  sequence: number;
  /** A copy (or a whole-chunk snapshot write) was started for it. */
  started: boolean;
  copyError: boolean;
  /** Resolves once committed (true) or failed (false); origin writes wait on it. */
  done: Promise<boolean>;
  settle: (ok: boolean) => void;
}

export interface SnapshotStateOptions {
  origin: BlockDevice;
  cow: BlockDevice;
  store: ExceptionStore;
  /** Sectors of the snapshot table line: origin writes beyond it make no exceptions. */
  lengthBytes: number;
  kcopyd: KcopydClient;
  isMerge: boolean;
  name: string;
  log?: TargetLogger;
  cowThreshold?: number;
}

/**
 * One snapshot's exception tables and copy-out machinery (`struct dm_snapshot`): completed
 * exceptions (origin chunk -> COW chunk), pending ones with their waiters, the chunks snapshot
 * reads are using right now, and the in-order commit of finished copies. Shared by the
 * snapshot and snapshot-merge targets and driven by origin writes.
 *
 * @example
 * ```ts
 * const pe = state.createPending(chunk)!; // allocates a COW chunk
 * state.startCopy(pe);                    // kcopyd origin -> COW
 * await pe.done;                          // committed: the origin chunk may now change
 * ```
 */
export class SnapshotState {
  readonly origin: BlockDevice;
  readonly cow: BlockDevice;
  store: ExceptionStore;
  readonly lengthBytes: number;
  readonly isMerge: boolean;
  readonly name: string;
  readonly complete = new Map<number, number>();
  readonly pending = new Map<number, PendingException>();
  valid = true;
  overflowed = false;
  /** Exceptions are made only once the target is live (`active`). */
  active = false;
  mergeFailed = false;
  /** The exception tables moved to another target on the same COW (`__handover_exceptions`). */
  handedOver = false;
  /** Copies in flight (`in_progress`), bounded by the COW threshold. */
  inProgress = 0;
  private readonly kcopyd: KcopydClient;
  private readonly log: TargetLogger | undefined;
  private readonly ownCowThreshold: number | undefined;
  private nextSequence = 0;
  private completeSequence = 0;
  private readonly outOfOrder = new Map<number, PendingException>();
  private readonly tracked = new Map<number, number>();
  private readonly trackedWaiters = new Map<number, Array<() => void>>();
  private readonly inProgressWaiters: Array<() => void> = [];
  private zeros: Buffer | null = null;
  /** Throttle statistics, for tests: waits entered and wake-ups taken (linear in writes, never quadratic). */
  readonly counters = { throttleWaits: 0, throttleWakeups: 0 };
  private dropping: Promise<void> | null = null;

  constructor(options: SnapshotStateOptions) {
    this.origin = options.origin;
    this.cow = options.cow;
    this.store = options.store;
    this.lengthBytes = options.lengthBytes;
    this.kcopyd = options.kcopyd;
    this.isMerge = options.isMerge;
    this.name = options.name;
    this.log = options.log;
    this.ownCowThreshold = options.cowThreshold;
  }

  /** Copy-outs in flight above which writes wait. */
  get cowThreshold(): number {
    return this.ownCowThreshold ?? settings.cowThreshold;
  }

  /** True when writes must wait for copies to drain (`wait_for_in_progress` would sleep). */
  get overThreshold(): boolean {
    return this.inProgress > this.cowThreshold;
  }

  get chunkSectors(): number {
    return this.store.chunkSectors;
  }

  get chunkBytes(): number {
    return this.store.chunkSectors * SECTOR_SIZE;
  }

  /** Byte offset on the COW of `offsetBytes` of the origin, inside a chunk mapped to `newChunk`. */
  cowOffset(newChunk: number, offsetBytes: number): number {
    return newChunk * this.chunkBytes + (offsetBytes % this.chunkBytes);
  }

  /**
   * Waits while too many copies are in flight (`wait_for_in_progress`). Waiters queue in order and
   * a finished copy wakes only the first; a woken waiter that finds room passes the turn on, so
   * each waiter is woken about once however many wait (no thundering herd).
   */
  async waitForInProgress(): Promise<void> {
    if (this.inProgress <= this.cowThreshold) return;
    this.counters.throttleWaits++;
    do {
      await new Promise<void>((resolve) => this.inProgressWaiters.push(resolve));
      this.counters.throttleWakeups++;
    } while (this.inProgress > this.cowThreshold);
    // After this tick, once our caller has started its copies, the next waiter gets its turn.
    if (this.inProgressWaiters.length) setImmediate(() => this.wakeNextWaiter());
  }

  private wakeNextWaiter(): void {
    if (this.inProgress <= this.cowThreshold) this.inProgressWaiters.shift()?.();
  }

  private endCopy(): void {
    this.inProgress--;
    this.wakeNextWaiter();
  }

  /**
   * A chunk of zeros, shared by every zeroing write of this snapshot (never written to): zeroing
   * costs no memory per piece.
   */
  get zeroChunk(): Buffer {
    if (!this.zeros) this.zeros = Buffer.alloc(this.chunkBytes);
    return this.zeros;
  }

  /** Marks a chunk as being read from the origin, so a copy-out cannot complete under the read. */
  track(chunk: number): void {
    this.tracked.set(chunk, (this.tracked.get(chunk) ?? 0) + 1);
  }

  untrack(chunk: number): void {
    const n = (this.tracked.get(chunk) ?? 1) - 1;
    if (n > 0) {
      this.tracked.set(chunk, n);
      return;
    }
    this.tracked.delete(chunk);
    const waiters = this.trackedWaiters.get(chunk);
    if (waiters) {
      this.trackedWaiters.delete(chunk);
      for (const wake of waiters) wake();
    }
  }

  /** Waits until no tracked I/O uses the chunk (`__check_for_conflicting_io`). */
  async waitUntracked(chunk: number): Promise<void> {
    while (this.tracked.has(chunk)) {
      await new Promise<void>((resolve) => {
        const list = this.trackedWaiters.get(chunk) ?? [];
        list.push(resolve);
        this.trackedWaiters.set(chunk, list);
      });
    }
  }

  /** Allocates a COW chunk for `chunk` and registers the pending exception; null if the COW is full. */
  createPending(chunk: number): PendingException | null {
    const newChunk = this.store.prepareException();
    if (newChunk === null) return null;
    let settle!: (ok: boolean) => void;
    const done = new Promise<boolean>((resolve) => {
      settle = resolve;
    });
    const pe: PendingException = {
      oldChunk: chunk,
      newChunk,
      sequence: this.nextSequence++,
      started: false,
      copyError: false,
      done,
      settle,
    };
    this.pending.set(chunk, pe);
    return pe;
  }

  /** Copies the origin chunk to the pending exception's COW chunk (`start_copy`). */
  startCopy(pe: PendingException): void {
    pe.started = true;
    const sector = pe.oldChunk * this.chunkSectors;
    const originSectors = Math.floor(this.origin.sizeBytes / SECTOR_SIZE);
    // The last chunk of an origin that is not a whole number of chunks is copied short.
    const count = Math.min(this.chunkSectors, originSectors - sector);
    this.inProgress++;
    try {
      this.kcopyd.copy(
        { dev: this.origin, sector, count },
        [{ dev: this.cow, sector: pe.newChunk * this.chunkSectors, count }],
        0,
        (readErr, writeErr) => this.copyDone(pe, readErr || writeErr !== 0),
        pe,
      );
    } catch (err) {
      this.log?.error({ snapshot: this.name, chunk: pe.oldChunk, err }, "copy-out could not start");
      setImmediate(() => this.copyDone(pe, true));
    }
  }

  /** A whole-chunk snapshot write stands in for the copy (`start_full_bio`). */
  startFullWrite(pe: PendingException, data: Buffer, options?: WriteOptions): void {
    pe.started = true;
    this.inProgress++;
    this.cow.write(pe.newChunk * this.chunkBytes, data, options).then(
      () => this.copyDone(pe, false),
      (err) => {
        this.log?.error(
          { snapshot: this.name, chunk: pe.oldChunk, err },
          "whole-chunk snapshot write failed",
        );
        this.copyDone(pe, true);
      },
    );
  }

  /** Copy finished: commit in allocation order, parking early finishers (`copy_callback`). */
  private copyDone(pe: PendingException, error: boolean): void {
    pe.copyError = error;
    if (pe.sequence === this.completeSequence) {
      this.completeSequence++;
      this.commit(pe);
      for (;;) {
        const next = this.outOfOrder.get(this.completeSequence);
        if (!next) break;
        this.outOfOrder.delete(this.completeSequence);
        this.completeSequence++;
        this.commit(next);
      }
    } else {
      this.outOfOrder.set(pe.sequence, pe);
    }
    this.endCopy();
  }

  private commit(pe: PendingException): void {
    this.store.commitException(pe.oldChunk, pe.newChunk, !pe.copyError).then(
      (ok) => this.pendingComplete(pe, ok),
      () => this.pendingComplete(pe, false),
    );
  }

  /** The exception is durable (or failed): publish it and release the waiters (`pending_complete`). */
  private async pendingComplete(pe: PendingException, success: boolean): Promise<void> {
    let ok = false;
    if (!success) {
      await this.invalidate("EIO");
    } else if (this.valid) {
      this.complete.set(pe.oldChunk, pe.newChunk);
      // Snapshot reads of the old origin data must finish before the origin chunk changes.
      await this.waitUntracked(pe.oldChunk);
      ok = true;
    }
    this.pending.delete(pe.oldChunk);
    pe.settle(ok);
  }

  /**
   * Invalidates the snapshot for good (`__invalidate_snapshot`); a persistent store rewrites its
   * header with valid = 0 before this resolves, so origin writes go on only after that.
   */
  invalidate(reason: "EIO" | "ENOMEM"): Promise<void> {
    if (this.dropping) return this.dropping;
    if (!this.valid) return Promise.resolve();
    this.valid = false;
    this.log?.error(
      { snapshot: this.name, reason },
      reason === "EIO"
        ? "invalidating snapshot: error reading/writing"
        : "invalidating snapshot: unable to allocate exception",
    );
    this.dropping = this.store.dropSnapshot();
    return this.dropping;
  }

  /** Waits until no exception is pending (snapshot destructor, handover). */
  async drainPending(): Promise<void> {
    while (this.pending.size) await Promise.all([...this.pending.values()].map((pe) => pe.done));
  }
}

/**
 * Splits `[offset, offset+length)` at multiples of `boundary` (chunk-sized I/O, the kernel's
 * `max_io_len`), calling `fn` with each piece and its offset into the caller's buffer.
 */
export function splitAtBoundaries<T>(
  offsetBytes: number,
  lengthBytes: number,
  boundary: number,
  fn: (pieceOffset: number, pieceLength: number, bufferOffset: number) => T,
): T[] {
  const out: T[] = [];
  let done = 0;
  while (done < lengthBytes) {
    const at = offsetBytes + done;
    const length = Math.min(boundary - (at % boundary), lengthBytes - done);
    out.push(fn(at, length, done));
    done += length;
  }
  return out;
}

/**
 * Pieces of one request in flight at once: a request of any size claims a bounded share of
 * copy-outs, memory and I/O, and its cost stays linear in its chunks.
 */
export const REQUEST_PIECES_IN_FLIGHT = 32;

/**
 * Runs `fn` on each piece of `[offset, offset+length)` cut at multiples of `boundary` (as
 * `splitAtBoundaries`), in order, at most `REQUEST_PIECES_IN_FLIGHT` at once. After a failure, or
 * once `stopped()` returns an error (the target is closing), no further piece starts: the
 * started ones finish, then the first error is thrown.
 *
 * @example
 * ```ts
 * await forEachPiece(0, 1 << 30, chunkBytes, (at, length) => writeChunk(at, length));
 * ```
 */
export async function forEachPiece(
  offsetBytes: number,
  lengthBytes: number,
  boundary: number,
  fn: (pieceOffset: number, pieceLength: number, bufferOffset: number) => Promise<void>,
  stopped?: () => Error | null,
): Promise<void> {
  let done = 0;
  let failure: { err: unknown } | null = null;
  const worker = async () => {
    while (!failure && done < lengthBytes) {
      const why = stopped?.();
      if (why) {
        failure = { err: why };
        break;
      }
      const at = offsetBytes + done;
      const length = Math.min(boundary - (at % boundary), lengthBytes - done);
      const bufferOffset = done;
      done += length;
      try {
        await fn(at, length, bufferOffset);
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  const pieces = Math.ceil(lengthBytes / boundary) + 1;
  await Promise.all(Array.from({ length: Math.min(REQUEST_PIECES_IN_FLIGHT, pieces) }, worker));
  if (failure) throw (failure as { err: unknown }).err;
}

/** A stretch of a snapshot that is all copied to the COW, or all still shared with the origin. */
export interface CopiedRun {
  offsetBytes: number;
  lengthBytes: number;
  copied: boolean;
}

/**
 * Splits `[offset, offset+length)` into alternating runs of copied and shared chunks, in order.
 * The cost follows the number of exceptions, not the size of the range, so block-status queries
 * over a whole large device stay cheap.
 */
export function copiedRuns(state: SnapshotState, offsetBytes: number, lengthBytes: number): CopiedRun[] {
  const runs: CopiedRun[] = [];
  if (lengthBytes <= 0) return runs;
  const cb = state.chunkBytes;
  const end = offsetBytes + lengthBytes;
  const first = Math.floor(offsetBytes / cb);
  const last = Math.floor((end - 1) / cb);
  let chunks: number[];
  if (last - first < 4 * state.complete.size + 64) {
    chunks = [];
    for (let c = first; c <= last; c++) if (state.complete.has(c)) chunks.push(c);
  } else {
    chunks = [...state.complete.keys()].filter((c) => c >= first && c <= last).sort((a, b) => a - b);
  }
  let pos = offsetBytes;
  const push = (s: number, e: number, copied: boolean) => {
    const prev = runs[runs.length - 1];
    if (prev && prev.copied === copied) prev.lengthBytes += e - s;
    else runs.push({ offsetBytes: s, lengthBytes: e - s, copied });
  };
  for (const c of chunks) {
    const s = Math.max(c * cb, offsetBytes);
    const e = Math.min((c + 1) * cb, end);
    if (s > pos) push(pos, s, false);
    push(s, e, true);
    pos = e;
  }
  if (pos < end) push(pos, end, false);
  return runs;
}
