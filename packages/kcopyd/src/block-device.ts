/**
 * The one interface every udm device implements: plain devices (file, memory, NBD client) and
 * dm targets (linear, flakey, mirror, snapshot...) alike, so targets stack the way dm targets do
 * and the NBD server and kcopyd work with any of them.
 *
 * Offsets and lengths are in bytes (JS numbers are exact up to 2^53, 8 PiB); dm-style table
 * arguments in sectors are converted at the edges.
 *
 * @example
 * ```ts
 * import { MemoryDevice } from "@udm/kcopyd";
 * const dev = new MemoryDevice(1 << 30);
 * await dev.write(4096, Buffer.from("hello"), { fua: true });
 * const data = await dev.read(4096, 5); // "hello"
 * ```
 */
export const SECTOR_SIZE = 512;
export const SECTOR_SHIFT = 9;

/** How a run of the device reads: `data`, an unallocated `hole` (reads as zeros), or allocated `zero`. */
export type ExtentKind = "data" | "hole" | "zero";

export interface Extent {
  offsetBytes: number;
  lengthBytes: number;
  kind: ExtentKind;
}

/** A run `[offsetBytes, offsetBytes + lengthBytes)` of a read the device vouches reads as zeros. */
export interface ZeroRun {
  offsetBytes: number;
  lengthBytes: number;
}

export interface WriteOptions {
  /** Force unit access: the write is durable when the promise resolves. */
  fua?: boolean;
}

export interface WriteZeroesOptions extends WriteOptions {
  /** The device may deallocate (punch) the range instead of writing zeros. */
  mayTrim?: boolean;
}

/**
 * A named status context a device publishes for NBD block status (`NBD_OPT_SET_META_CONTEXT`).
 * `base:allocation` is derived from `extents()` by the server; targets add their own, e.g. a
 * mirror's out-of-sync regions or a snapshot's copied chunks.
 */
export interface StatusContext {
  /** `namespace:leaf`, e.g. `udm:out-of-sync`. */
  name: string;
  description: string;
  /** Runs covering `[offset, offset+length)` (may stop early), each with context-defined flags. */
  query(offsetBytes: number, lengthBytes: number): Promise<Array<{ lengthBytes: number; flags: number }>>;
}

export interface BlockDevice {
  /** What tables and status lines print for this device: a path, URI or `@name`. */
  readonly name: string;
  /**
   * What the device is underneath, when several names can reach it (see `storageIdentity`): a
   * block device's `block:MAJOR:MINOR`, a file's `file:DEV:INO`. Whoever must treat every alias
   * as one device (a snapshot origin, a device pool) compares this, not names or objects.
   */
  readonly identity?: string;
  readonly sizeBytes: number;
  /** Smallest addressable unit, 512 or 4096; I/O need not be aligned to it (devices cope). */
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;

  read(offsetBytes: number, lengthBytes: number): Promise<Buffer>;
  /** Reads `target.length` bytes at `offsetBytes` into the caller's buffer (no allocation). */
  readInto(offsetBytes: number, target: Buffer): Promise<void>;
  write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void>;
  /** Makes every completed write durable. */
  flush(): Promise<void>;
  /** Advisory: the range's content becomes unspecified (zeros for devices that can punch holes). */
  discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void>;
  writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void>;
  /** Contiguous runs covering `[offset, offset+length)` in order; devices without allocation info say `data`. */
  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  close(): Promise<void>;

  /**
   * Copy offload (optional): copies `[offset, offset+length)` of this device to `dest` at
   * `destOffsetBytes` without passing the data through the caller's memory, e.g.
   * copy_file_range(2) between two files. Resolves false when this pair cannot be offloaded (the
   * caller then copies through a buffer); rejects on an I/O error, after which the caller may
   * copy through a buffer to learn which side failed.
   */
  copyRangeTo?(
    offsetBytes: number,
    dest: BlockDevice,
    destOffsetBytes: number,
    lengthBytes: number,
  ): Promise<boolean>;

  /**
   * Sparse read (optional): fills `target` exactly as `readInto` does and resolves with the runs
   * of this same read that the device vouches are zeros (holes it found while reading,
   * unallocated chunks): sorted, non-overlapping, inside the range, every byte 0 in `target`.
   * The NBD server sends those runs as holes and everything else as the bytes read. A device
   * must say only what this read saw, never ask a separate source (`extents()` is a hint and may
   * disagree with reads); one that cannot vouch omits the method or resolves `[]`.
   */
  readIntoSparse?(offsetBytes: number, target: Buffer): Promise<ZeroRun[]>;

  /** Extra NBD meta contexts this device publishes (optional). */
  statusContexts?(): StatusContext[];

  /**
   * Devices backed by a connection (NbdDevice) report losing (`false`) and regaining (`true`)
   * their backend, so a mirror can fail a remote leg and resync it on reconnect. Returns an
   * unsubscribe function.
   */
  watchHealth?(listener: (healthy: boolean) => void): () => void;
}

/** Long-running background work of a target (resync, merge), polled by `udm status` and progress bars. */
export interface TargetProgress {
  operation: "resync" | "merge" | "copy";
  doneBytes: number;
  totalBytes: number;
  /** Estimated seconds left, when the target can tell. */
  etaSeconds?: number;
}

/** A dm target: a block device built from a table line, printing `dmsetup table`/`status` args. */
export interface TargetDevice extends BlockDevice {
  /** dm target type, e.g. `linear`, `mirror`, `snapshot`. */
  readonly targetType: string;
  /** Table arguments after `<start> <length> <type>`, as `dmsetup table` prints them. */
  table(): string;
  /** Status arguments after `<start> <length> <type>`, as `dmsetup status` prints them. */
  status(): string;
  /** `dmsetup message <dev> 0 ...`; returns an optional reply text. */
  message?(argv: string[]): Promise<string | undefined>;
  /** Called before I/O is held for `dmsetup suspend` (stop background work such as resync or merge). */
  suspend?(): Promise<void>;
  /** Called on `dmsetup resume` (restart background work). */
  resume?(): Promise<void>;
  /**
   * dm's preresume: called once on a newly built table, after the table it replaces (if any) is
   * suspended and drained, just before the new table is swapped in. Building a target (its
   * `create`) must leave `context.previous` untouched and keep serving; state handed over from
   * the previous table (a mirror's log and per-leg sync state) moves here. A rejection leaves the
   * previous table in charge exactly as it was; the new table is then closed.
   */
  preresume?(): Promise<void>;
  /** Background work in progress, or null when idle. */
  progress?(): TargetProgress | null;
  /**
   * The process is stopping: requests in flight start no more pieces and fail the rest with EIO,
   * and so do later ones, so that draining takes seconds even behind a request that would run
   * for minutes (a 4 GiB WRITE_ZEROES to a snapshot). Called only after a grace period.
   */
  abortRequests?(): void;
  /**
   * dm_table_event: calls `listener` whenever the target's state changes in a way its users must
   * notice (a mirror leg fails, a resync finishes); `dmsetup wait` counts these. Returns a
   * function that removes the listener.
   */
  onEvent?(listener: () => void): () => void;
}

/** Throws a RangeError naming the device when `[offset, offset+length)` is not inside it. */
export function checkRange(dev: BlockDevice, offsetBytes: number, lengthBytes: number): void {
  if (
    !Number.isSafeInteger(offsetBytes) ||
    !Number.isSafeInteger(lengthBytes) ||
    offsetBytes < 0 ||
    lengthBytes < 0 ||
    offsetBytes + lengthBytes > dev.sizeBytes
  ) {
    throw new RangeError(
      `${dev.name}: I/O at ${offsetBytes}+${lengthBytes} is outside the device (${dev.sizeBytes} bytes)`,
    );
  }
}

/** Merges adjacent extents of one kind, keeping order. */
export function mergeExtents(extents: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    if (e.lengthBytes === 0) continue;
    const last = out[out.length - 1];
    if (last && last.kind === e.kind && last.offsetBytes + last.lengthBytes === e.offsetBytes) {
      last.lengthBytes += e.lengthBytes;
    } else {
      out.push({ ...e });
    }
  }
  return out;
}

/** Granularity at which {@link zeroRunsOf} looks for zeros: the page size. */
export const ZERO_SCAN_BYTES = 4096;
const ZERO_SCAN_PAGE = Buffer.alloc(ZERO_SCAN_BYTES);

/**
 * The zero runs of `data` (read at device offset `offsetBytes`), found by looking at the bytes:
 * whole `ZERO_SCAN_BYTES` pages aligned to the device, merged. What a device that cannot ask its
 * storage for holes can vouch for after a read (the bytes are right there).
 */
export function zeroRunsOf(data: Buffer, offsetBytes: number): ZeroRun[] {
  const out: ZeroRun[] = [];
  const end = offsetBytes + data.length;
  let pos = Math.ceil(offsetBytes / ZERO_SCAN_BYTES) * ZERO_SCAN_BYTES;
  for (; pos + ZERO_SCAN_BYTES <= end; pos += ZERO_SCAN_BYTES) {
    const at = pos - offsetBytes;
    if (data.compare(ZERO_SCAN_PAGE, 0, ZERO_SCAN_BYTES, at, at + ZERO_SCAN_BYTES) !== 0) continue;
    const last = out[out.length - 1];
    if (last && last.offsetBytes + last.lengthBytes === pos) last.lengthBytes += ZERO_SCAN_BYTES;
    else out.push({ offsetBytes: pos, lengthBytes: ZERO_SCAN_BYTES });
  }
  return out;
}

/** Zero runs moved by `deltaBytes` (an inner device's offsets seen from a target mapping it). */
export function shiftZeroRuns(runs: ZeroRun[], deltaBytes: number): ZeroRun[] {
  return runs.map((r) => ({ offsetBytes: r.offsetBytes + deltaBytes, lengthBytes: r.lengthBytes }));
}
