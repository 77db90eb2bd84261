/**
 * The exception store contract (`struct dm_exception_store_type`): where COW chunks are
 * allocated and how completed exceptions are made durable. Implemented by PersistentStore
 * (`P`/`PO`, the kernel's on-disk format) and TransientStore (`N`, memory only).
 *
 * @example
 * ```ts
 * const newChunk = store.prepareException(); // null when the COW is full
 * if (newChunk !== null) {
 *   // ... copy the origin chunk to newChunk ...
 *   const durable = await store.commitException(oldChunk, newChunk, true);
 * }
 * ```
 */

/** `usage()`: what `dmsetup status` prints as `<allocated>/<total> <metadata>`, in sectors. */
export interface StoreUsage {
  totalSectors: number;
  sectorsAllocated: number;
  metadataSectors: number;
}

/** A run of consecutive exceptions to merge back: the last (newest) entry and the run length. */
export interface MergeRun {
  lastOldChunk: number;
  lastNewChunk: number;
  count: number;
}

export interface ExceptionStore {
  /** `P`, `PO` or `N`, as in the table line. */
  readonly tableType: "P" | "PO" | "N";
  /** Chunk size in sectors (may come from the on-disk header). */
  readonly chunkSectors: number;
  /** `PO`: a full COW reports `Overflow` and keeps the snapshot readable. */
  readonly userspaceSupportsOverflow: boolean;
  /** Allocates the next free COW chunk (`prepare_exception`); null when the COW is full. */
  prepareException(): number | null;
  /**
   * Records a finished exception (`commit_exception`). Resolves once it is durable (commits are
   * batched), with false if the store became invalid. `valid` false means the copy failed.
   */
  commitException(oldChunk: number, newChunk: number, valid: boolean): Promise<boolean>;
  /** Marks the snapshot invalid for good (`drop_snapshot`); persistent stores rewrite the header. */
  dropSnapshot(): Promise<void>;
  usage(): StoreUsage;
  /** Next run to merge, newest first; null when nothing is left. Persistent stores only. */
  prepareMerge?(): Promise<MergeRun | null>;
  /** Several runs at once (newest first, at most `maxChunks` chunks after the first run). */
  prepareMergeBatch?(maxChunks: number): Promise<MergeRun[]>;
  /** Clears the `count` newest entries durably after they were merged. */
  commitMerge?(count: number): Promise<void>;
}
