import { type BlockDevice, SECTOR_SIZE, type TargetLogger } from "@udm/kcopyd";
import {
  areaLocation,
  CowFormatError,
  chunkSizeProblem,
  DEFAULT_CHUNK_SECTORS,
  DISK_EXCEPTION_BYTES,
  encodeHeader,
  exceptionsPerArea,
  readCowHeader,
  readExceptionTable,
  SNAPSHOT_DISK_VERSION,
  SNAPSHOT_HEADER_CHUNKS,
  skipMetadata,
} from "./cow-format.js";
import type { ExceptionStore, MergeRun, StoreUsage } from "./exception-store.js";

export interface PersistentStoreOptions {
  /** Table chunk size in sectors; 0 takes it from the header (or the default for a new COW). */
  chunkSectors: number;
  /** `PO`: userspace understands `Overflow`. */
  overflow?: boolean;
  log?: TargetLogger;
}

/** What opening a COW found: the store, its committed exceptions, and the header's valid flag. */
export interface LoadedStore {
  store: PersistentStore;
  exceptions: Array<{ oldChunk: number; newChunk: number }>;
  valid: boolean;
  /** True when the COW had no header and one was written. */
  created: boolean;
}

interface CommitBatch {
  area: number;
  data: Buffer;
  full: boolean;
  callbacks: Array<(ok: boolean) => void>;
}

/**
 * The `P`/`PO` store, byte-compatible with `dm-snap-persistent.c`. Commits are batched: an
 * exception's entry is written (after a flush of the COW, with FUA) once no other exception is
 * in flight or its area is full; a full area first zeroes the next one, so the table always ends
 * at the first non-full area. Every commit resolves only after its entry is durable.
 *
 * @example
 * ```ts
 * const { store, exceptions } = await PersistentStore.open(cow, { chunkSectors: 0 });
 * const newChunk = store.prepareException()!;
 * // ... copy origin chunk 7 to newChunk ...
 * await store.commitException(7, newChunk, true); // durable now
 * ```
 */
export class PersistentStore implements ExceptionStore {
  readonly chunkSectors: number;
  /** `PO`; a handover to a table with the other letter changes it, as in the kernel. */
  userspaceSupportsOverflow: boolean;
  private readonly chunkBytes: number;
  private readonly epa: number;
  private valid: boolean;
  private currentArea: number;
  private currentCommitted: number;
  private nextFree: number;
  /** The in-memory copy of the current metadata area. */
  private readonly area: Buffer;
  /** Prepared exceptions not yet committed (`pending_count`). */
  private pendingCount = 0;
  private callbacks: Array<(ok: boolean) => void> = [];
  /** Full areas waiting to be written, oldest first. */
  private queue: CommitBatch[] = [];
  /** The current area has commits not yet written. */
  private dirty = false;
  /** The metadata writer, while it runs (one at a time, in order). */
  private writing: Promise<void> | null = null;

  private constructor(
    readonly cow: BlockDevice,
    chunkSectors: number,
    state: { valid: boolean; currentArea: number; currentCommitted: number; nextFree: number; area: Buffer },
    overflow: boolean,
    private readonly log: TargetLogger | undefined,
  ) {
    this.chunkSectors = chunkSectors;
    this.chunkBytes = chunkSectors * SECTOR_SIZE;
    this.epa = exceptionsPerArea(chunkSectors);
    this.valid = state.valid;
    this.currentArea = state.currentArea;
    this.currentCommitted = state.currentCommitted;
    this.nextFree = state.nextFree;
    this.area = state.area;
    this.userspaceSupportsOverflow = overflow;
  }

  get tableType(): "P" | "PO" {
    return this.userspaceSupportsOverflow ? "PO" : "P";
  }

  /**
   * Opens a COW device (`persistent_read_metadata`): a zero magic means a new snapshot (header and
   * area 0 are written), otherwise the header is checked and, if valid, every committed exception
   * is read back. Throws CowFormatError for a foreign or corrupt COW.
   */
  static async open(cow: BlockDevice, options: PersistentStoreOptions): Promise<LoadedStore> {
    const overflow = options.overflow ?? false;
    const header = await readCowHeader(cow);
    if (!header) {
      const chunkSectors =
        options.chunkSectors || Math.max(DEFAULT_CHUNK_SECTORS, cow.logicalBlockSize / SECTOR_SIZE);
      const problem = chunkSizeProblem(chunkSectors, [cow]);
      if (problem) throw new RangeError(`chunk size ${chunkSectors} ${problem}`);
      const chunkBytes = chunkSectors * SECTOR_SIZE;
      if (cow.sizeBytes < 2 * chunkBytes) {
        throw new CowFormatError(
          cow.name,
          "size",
          `COW device of ${cow.sizeBytes} bytes cannot hold a header and a metadata area of ${chunkBytes} bytes each`,
        );
      }
      await cow.write(
        0,
        encodeHeader({ valid: true, version: SNAPSHOT_DISK_VERSION, chunkSectors }, chunkBytes),
      );
      await cow.write(areaLocation(0, chunkSectors) * chunkBytes, Buffer.alloc(chunkBytes));
      await cow.flush();
      const store = new PersistentStore(
        cow,
        chunkSectors,
        { valid: true, currentArea: 0, currentCommitted: 0, nextFree: 2, area: Buffer.alloc(chunkBytes) },
        overflow,
        options.log,
      );
      return { store, exceptions: [], valid: true, created: true };
    }
    if (options.chunkSectors && options.chunkSectors !== header.chunkSectors) {
      options.log?.warn(
        { cow: cow.name, headerChunkSectors: header.chunkSectors, tableChunkSectors: options.chunkSectors },
        `chunk size ${header.chunkSectors} in device metadata overrides table chunk size of ${options.chunkSectors}`,
      );
    }
    const chunkSectors = header.chunkSectors;
    const chunkBytes = chunkSectors * SECTOR_SIZE;
    if (!header.valid) {
      const state = {
        valid: false,
        currentArea: 0,
        currentCommitted: 0,
        nextFree: 2,
        area: Buffer.alloc(chunkBytes),
      };
      return {
        store: new PersistentStore(cow, chunkSectors, state, overflow, options.log),
        exceptions: [],
        valid: false,
        created: false,
      };
    }
    const table = await readExceptionTable(cow, chunkSectors);
    const state = {
      valid: true,
      currentArea: table.currentArea,
      currentCommitted: table.currentCommitted,
      nextFree: table.nextFree,
      area: table.currentAreaData,
    };
    const store = new PersistentStore(cow, chunkSectors, state, overflow, options.log);
    return { store, exceptions: table.exceptions, valid: true, created: false };
  }

  prepareException(): number | null {
    const cowSectors = Math.floor(this.cow.sizeBytes / SECTOR_SIZE);
    if (cowSectors < (this.nextFree + 1) * this.chunkSectors) return null;
    const chunk = this.nextFree;
    this.nextFree = skipMetadata(this.nextFree + 1, this.chunkSectors);
    this.pendingCount++;
    return chunk;
  }

  commitException(oldChunk: number, newChunk: number, valid: boolean): Promise<boolean> {
    if (!valid) this.valid = false;
    const at = this.currentCommitted++ * DISK_EXCEPTION_BYTES;
    this.area.writeBigUInt64LE(BigInt(oldChunk), at);
    this.area.writeBigUInt64LE(BigInt(newChunk), at + 8);
    const done = new Promise<boolean>((resolve) => this.callbacks.push(resolve));
    this.pendingCount--;
    // Batch: more exceptions are on their way and this area has room, so their commit carries ours.
    if (this.pendingCount > 0 && this.currentCommitted !== this.epa) return done;
    if (this.currentCommitted === this.epa) {
      // A full area is written as it is now; the in-memory area moves on to the next one.
      this.queue.push({
        area: this.currentArea,
        data: Buffer.from(this.area),
        full: true,
        callbacks: this.callbacks,
      });
      this.callbacks = [];
      this.dirty = false;
      this.currentCommitted = 0;
      this.currentArea++;
      this.area.fill(0);
    } else {
      this.dirty = true;
    }
    if (!this.writing) this.writing = this.writeQueued();
    return done;
  }

  /**
   * Writes queued full areas, then the current area, until nothing is left. Commits that arrive
   * while a write is in flight are carried by the next one (group commit): same bytes on disk,
   * far fewer flushes under load.
   */
  private async writeQueued(): Promise<void> {
    for (;;) {
      let batch = this.queue.shift();
      if (!batch && this.dirty) {
        this.dirty = false;
        batch = {
          area: this.currentArea,
          data: Buffer.from(this.area),
          full: false,
          callbacks: this.callbacks,
        };
        this.callbacks = [];
      }
      if (!batch) break;
      await this.writeBatch(batch);
    }
    this.writing = null;
  }

  /** Waits until every requested metadata write is done. */
  private async idle(): Promise<void> {
    while (this.writing) await this.writing;
  }

  private async writeBatch(batch: CommitBatch): Promise<void> {
    if (batch.full) {
      // The table ends at the first non-full area: the next one must read as empty first.
      try {
        await this.cow.write(
          areaLocation(batch.area + 1, this.chunkSectors) * this.chunkBytes,
          Buffer.alloc(this.chunkBytes),
        );
      } catch (err) {
        this.log?.error(
          { cow: this.cow.name, area: batch.area + 1, err },
          "zeroing the next metadata area failed",
        );
        this.valid = false;
      }
    }
    if (this.valid) {
      try {
        // PREFLUSH: the copied chunks (and the zeroed area) are durable before the entries that name them.
        await this.cow.flush();
        await this.cow.write(areaLocation(batch.area, this.chunkSectors) * this.chunkBytes, batch.data, {
          fua: true,
        });
      } catch (err) {
        this.log?.error({ cow: this.cow.name, area: batch.area, err }, "writing a metadata area failed");
        this.valid = false;
      }
    }
    for (const callback of batch.callbacks) callback(this.valid);
  }

  async dropSnapshot(): Promise<void> {
    this.valid = false;
    try {
      await this.cow.write(
        0,
        encodeHeader(
          { valid: false, version: SNAPSHOT_DISK_VERSION, chunkSectors: this.chunkSectors },
          this.chunkBytes,
        ),
      );
      await this.cow.flush();
    } catch (err) {
      this.log?.warn({ cow: this.cow.name, err }, "writing the invalidated header failed");
    }
  }

  usage(): StoreUsage {
    return {
      totalSectors: Math.floor(this.cow.sizeBytes / SECTOR_SIZE),
      sectorsAllocated: this.nextFree * this.chunkSectors,
      // Header plus every metadata area so far.
      metadataSectors: (this.currentArea + 1 + SNAPSHOT_HEADER_CHUNKS) * this.chunkSectors,
    };
  }

  /** Committed exceptions still in the table (what a merge has left to do). */
  get committedCount(): number {
    return this.currentArea * this.epa + this.currentCommitted;
  }

  async prepareMerge(): Promise<MergeRun | null> {
    await this.idle();
    if (this.currentCommitted === 0) {
      if (this.currentArea === 0) return null;
      // Read first: a failed read leaves the store as it was.
      const previous = Buffer.alloc(this.chunkBytes);
      await this.cow.readInto(
        areaLocation(this.currentArea - 1, this.chunkSectors) * this.chunkBytes,
        previous,
      );
      previous.copy(this.area);
      this.currentArea--;
      this.currentCommitted = this.epa;
    }
    const entry = (index: number) => ({
      oldChunk: Number(this.area.readBigUInt64LE(index * DISK_EXCEPTION_BYTES)),
      newChunk: Number(this.area.readBigUInt64LE(index * DISK_EXCEPTION_BYTES + 8)),
    });
    const last = entry(this.currentCommitted - 1);
    let count = 1;
    while (count < this.currentCommitted) {
      const e = entry(this.currentCommitted - 1 - count);
      if (e.oldChunk !== last.oldChunk - count || e.newChunk !== last.newChunk - count) break;
      count++;
    }
    return { lastOldChunk: last.oldChunk, lastNewChunk: last.newChunk, count };
  }

  /**
   * Up to `maxChunks` chunks of runs to merge, newest first, all from the current area (what
   * repeated `prepareMerge` + `commitMerge` would take), so one origin flush and one metadata
   * write can cover them. Empty when nothing is left.
   */
  async prepareMergeBatch(maxChunks: number): Promise<MergeRun[]> {
    const first = await this.prepareMerge();
    if (!first) return [];
    const runs = [first];
    let taken = first.count;
    while (taken < this.currentCommitted && taken < maxChunks) {
      const end = this.currentCommitted - taken;
      const entry = (index: number) => ({
        oldChunk: Number(this.area.readBigUInt64LE(index * DISK_EXCEPTION_BYTES)),
        newChunk: Number(this.area.readBigUInt64LE(index * DISK_EXCEPTION_BYTES + 8)),
      });
      const last = entry(end - 1);
      let count = 1;
      while (count < end && taken + count < maxChunks) {
        const e = entry(end - 1 - count);
        if (e.oldChunk !== last.oldChunk - count || e.newChunk !== last.newChunk - count) break;
        count++;
      }
      runs.push({ lastOldChunk: last.oldChunk, lastNewChunk: last.newChunk, count });
      taken += count;
    }
    return runs;
  }

  /**
   * Clears the `count` newest entries on disk (`persistent_commit_merge`). Memory changes only
   * once the area write succeeded: after a failure the entries are still there, so a retry merges
   * the same runs again (the copies are idempotent) instead of reading cleared slots as
   * "chunk 0 -> chunk 0" and copying the header over the origin.
   */
  async commitMerge(count: number): Promise<void> {
    if (count > this.currentCommitted)
      throw new RangeError(`cannot clear ${count} of ${this.currentCommitted} entries`);
    const remaining = this.currentCommitted - count;
    const area = Buffer.from(this.area);
    area.fill(0, remaining * DISK_EXCEPTION_BYTES, this.currentCommitted * DISK_EXCEPTION_BYTES);
    await this.idle();
    await this.cow.flush();
    await this.cow.write(areaLocation(this.currentArea, this.chunkSectors) * this.chunkBytes, area, {
      fua: true,
    });
    area.copy(this.area);
    this.currentCommitted = remaining;
    this.nextFree = areaLocation(this.currentArea, this.chunkSectors) + this.currentCommitted + 1;
  }
}
