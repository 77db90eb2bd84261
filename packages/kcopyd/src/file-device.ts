import { constants as fsConstants, promises as fsp } from "node:fs";
import {
  type BlockDevice,
  checkRange,
  type Extent,
  mergeExtents,
  type WriteOptions,
  type WriteZeroesOptions,
  type ZeroRun,
  zeroRunsOf,
} from "./block-device.js";
import { errnoOf, IoError } from "./errors.js";
import { type ImageLock, type ImageLockMethod, lockImage } from "./image-lock.js";
import { type NativeFileOps, nativeFileOps } from "./native.js";
import { allocData } from "./poison.js";

/** Zeros are written in pieces of this size when the range cannot be punched or zero-ranged. */
const ZERO_WRITE_BYTES = 1024 * 1024;

/**
 * Reads up to this size first try the page cache synchronously on the JS thread (preadv2 with
 * RWF_NOWAIT through the native addon), skipping the libuv thread-pool round trip (~40-80 µs on
 * a loaded 2-core host against ~5-10 µs for a cached 4 KiB read). Larger reads go straight to the
 * thread pool, whose threads copy in parallel while the JS thread works on. Measured with
 * bench/file-read.mjs (random reads of a cached 1 GiB file, every size synchronous, µs per read,
 * pool -> sync): 16 KiB QD1 37.9 -> 6.3, QD16 17.7 -> 5.8; 128 KiB QD1 48.5 -> 22.9, QD16
 * 30.2 -> 21.8; 256 KiB QD1 73.8 -> 39.8 but QD16 38.8 -> 42.1 (a loss), 512 KiB QD16 78 -> 83.
 */
export const SYNC_READ_MAX_BYTES = 128 * 1024;

/**
 * Synchronous reads complete without giving the event loop a turn (their promises resolve in
 * microtasks), so a loop of cached reads would starve timers, signals and sockets. After this many
 * synchronous reads, or {@link SYNC_READ_STREAK_BYTES}, process-wide, reads go through the thread
 * pool (which yields) until the event loop reaches its check phase (a setImmediate), where a new
 * streak starts. At ~3-10 µs per cached 4 KiB read that bounds the event loop's stall to ~3-10 ms
 * per turn, whatever the number of reads in flight, for one thread-pool trip per 1024 reads.
 */
export const SYNC_READ_STREAK_READS = 1024;
/** See {@link SYNC_READ_STREAK_READS}: 8 MiB of copies is ~2 ms of memcpy. */
export const SYNC_READ_STREAK_BYTES = 8 * 1024 * 1024;

/** Synchronous reads since the streak last started, in this process. */
const syncStreak = { reads: 0, bytes: 0, resetScheduled: false };

function resetSyncStreak(): void {
  syncStreak.reads = 0;
  syncStreak.bytes = 0;
  syncStreak.resetScheduled = false;
}

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Create (or extend) a regular file to this size, sparse. */
  createSizeBytes?: number;
  /** Name to print in tables; defaults to the path. */
  name?: string;
  /**
   * Largest read tried synchronously from the page cache ({@link SYNC_READ_MAX_BYTES} by
   * default); 0 sends every read through the thread pool, as without the native addon.
   */
  syncReadMaxBytes?: number;
  /**
   * Lock the image as qemu does (see {@link lockImage}): a writable open is refused while another
   * process (qemu-nbd, qemu-io, another udm) writes the file or refuses to share it, and refuses
   * them while it is open; a read-only open shares. Default true; false opens without a lock
   * (qemu's `force-share`), for tools that inspect an image someone else serves.
   */
  lock?: boolean;
}

/**
 * How a FileDevice's reads were served, for benchmarks and diagnostics: synchronously from the
 * page cache (`sync*`) or on the libuv thread pool (`pool*`). A read that was partly cached counts
 * in both (its cached head synchronously, the rest in the pool).
 */
export interface FileReadStats {
  /** preadv2(RWF_NOWAIT) calls made (hits, misses and the refusal that turns the path off). */
  syncAttempts: number;
  /** Attempts that returned at least one byte, and the bytes they returned. */
  syncReads: number;
  syncBytes: number;
  /** Thread-pool reads (each `FileHandle.read` call) and their bytes. */
  poolReads: number;
  poolBytes: number;
  /**
   * Whether reads still try the page cache synchronously: false without the addon (or with
   * `UDM_NO_NATIVE=1` at open), with `syncReadMaxBytes: 0`, and once the kernel or file system
   * refused RWF_NOWAIT on this file (EOPNOTSUPP, e.g. tmpfs on Linux 6.18; ENOSYS; EINVAL).
   */
  syncPath: boolean;
}

/**
 * The identity of what a path names, from its stat (symlinks followed): a block device by its
 * device number (so `/dev/disk/by-id/...` and `/dev/sdX` are one), anything else by
 * (st_dev, st_ino) (so symlinks, hard links and bind mounts of one file are one).
 *
 * @example
 * ```ts
 * storageIdentity(await fsp.stat("/dev/disk/by-id/ata-X")); // "block:8:0", as for /dev/sda
 * ```
 */
export function storageIdentity(st: {
  dev: number | bigint;
  ino: number | bigint;
  rdev: number | bigint;
  isBlockDevice(): boolean;
}): string {
  const rdev = Number(st.rdev);
  return st.isBlockDevice() ? `block:${major(rdev)}:${minor(rdev)}` : `file:${st.dev}:${st.ino}`;
}

/**
 * A regular file or a real block device (`/dev/sdX`, `/dev/loopN`) as a BlockDevice.
 * Sparse-aware when the native addon is built: extents from SEEK_DATA/SEEK_HOLE, discard
 * and write-zeroes by punching holes (BLKDISCARD / BLKZEROOUT on block devices). With the addon,
 * reads of cached data up to `syncReadMaxBytes` are served synchronously (see
 * {@link SYNC_READ_MAX_BYTES}); what is not cached goes through the thread pool as before.
 * Writes always use the thread pool: buffered pwritev2(RWF_NOWAIT) is refused (EOPNOTSUPP) by
 * ext4 and tmpfs on Linux 6.18, so there is nothing to gain there. The image is locked while open
 * (qemu's OFD byte locks, see {@link FileDeviceOptions.lock}); closing releases the lock.
 *
 * @example
 * ```ts
 * const dev = await FileDevice.open("disk.img", { createSizeBytes: 1 << 30 });
 * await dev.write(0, Buffer.alloc(4096, 7), { fua: true });
 * await dev.close();
 * ```
 */
export class FileDevice implements BlockDevice {
  readonly name: string;
  readonly identity: string;
  readonly path: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly isBlockDevice: boolean;
  private readonly handle: fsp.FileHandle;
  private readonly imageLock: ImageLock | undefined;
  private closed = false;
  /** The addon while synchronous cached reads are worth trying on this fd; null once refused. */
  private nowait: NativeFileOps | null;
  private readonly syncReadMaxBytes: number;
  private readonly stats = { syncAttempts: 0, syncReads: 0, syncBytes: 0, poolReads: 0, poolBytes: 0 };

  private constructor(
    path: string,
    handle: fsp.FileHandle,
    info: {
      sizeBytes: number;
      logicalBlockSize: number;
      readOnly: boolean;
      isBlockDevice: boolean;
      name: string;
      identity: string;
      syncReadMaxBytes: number;
      imageLock: ImageLock | undefined;
    },
  ) {
    this.identity = info.identity;
    this.path = path;
    this.handle = handle;
    this.imageLock = info.imageLock;
    this.name = info.name;
    this.sizeBytes = info.sizeBytes;
    this.logicalBlockSize = info.logicalBlockSize;
    this.readOnly = info.readOnly;
    this.isBlockDevice = info.isBlockDevice;
    this.syncReadMaxBytes = info.syncReadMaxBytes;
    const native = nativeFileOps();
    this.nowait = native?.preadNowait && info.syncReadMaxBytes > 0 ? native : null;
  }

  static async open(path: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = options.readOnly ?? false;
    const syncReadMaxBytes = options.syncReadMaxBytes ?? SYNC_READ_MAX_BYTES;
    if (!Number.isSafeInteger(syncReadMaxBytes) || syncReadMaxBytes < 0) {
      throw new RangeError(
        `FileDevice.open(${path}): syncReadMaxBytes must be a non-negative integer, got ${syncReadMaxBytes}`,
      );
    }
    let flags = readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR;
    if (options.createSizeBytes !== undefined && !readOnly) flags |= fsConstants.O_CREAT;
    const handle = await fsp.open(path, flags, 0o644);
    let imageLock: ImageLock | undefined;
    try {
      const st = await handle.stat({ bigint: true });
      if (!st.isBlockDevice() && !st.isFile()) {
        throw new IoError("EINVAL", path, "not a regular file or block device");
      }
      // Before anything changes the file (the truncate below), so a refused open changes nothing.
      if (options.lock ?? true) imageLock = lockImage(handle.fd, path, readOnly ? "read" : "write", st);
      let sizeBytes: number;
      let logicalBlockSize = 512;
      if (st.isBlockDevice()) {
        const sys = `/sys/dev/block/${major(Number(st.rdev))}:${minor(Number(st.rdev))}`;
        sizeBytes = Number((await fsp.readFile(`${sys}/size`, "utf8")).trim()) * 512;
        // A partition has no queue/ of its own: its disk's (the parent directory) applies.
        logicalBlockSize =
          (await readSysNumber(`${sys}/queue/logical_block_size`, 0)) ||
          (await readSysNumber(`${sys}/../queue/logical_block_size`, 512));
      } else {
        sizeBytes = Number(st.size);
        if (options.createSizeBytes !== undefined && options.createSizeBytes > sizeBytes) {
          await handle.truncate(options.createSizeBytes);
          sizeBytes = options.createSizeBytes;
        }
      }
      return new FileDevice(path, handle, {
        sizeBytes,
        logicalBlockSize,
        readOnly,
        isBlockDevice: st.isBlockDevice(),
        name: options.name ?? path,
        identity: storageIdentity(st),
        syncReadMaxBytes,
        imageLock,
      });
    } catch (err) {
      imageLock?.release();
      await handle.close();
      throw err;
    }
  }

  /** How the image is locked (`ofd`: qemu's locks, `lock-file`: without the addon), or null when it is not. */
  get lockMethod(): ImageLockMethod | null {
    return this.imageLock?.method ?? null;
  }

  /** The file descriptor, for native helpers. */
  get fd(): number {
    return this.handle.fd;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = allocData(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  /** A snapshot of how reads were served so far (see {@link FileReadStats}). */
  get readStats(): FileReadStats {
    return { ...this.stats, syncPath: this.nowait !== null };
  }

  /**
   * Cached data (up to `syncReadMaxBytes`) is copied synchronously, before this returns its
   * promise; what is not cached, and the rest of a partly cached read, go through the thread pool.
   */
  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    this.checkOpen();
    checkRange(this, offsetBytes, target.length);
    let done = 0;
    if (this.nowait !== null && target.length > 0 && target.length <= this.syncReadMaxBytes) {
      if (syncStreak.reads < SYNC_READ_STREAK_READS && syncStreak.bytes < SYNC_READ_STREAK_BYTES) {
        done = this.readCached(this.nowait, offsetBytes, target);
        syncStreak.reads++;
        syncStreak.bytes += done;
        if (done === target.length) return;
      } else if (!syncStreak.resetScheduled) {
        syncStreak.resetScheduled = true;
        setImmediate(resetSyncStreak);
      }
    }
    while (done < target.length) {
      const { bytesRead } = await this.handle.read(target, done, target.length - done, offsetBytes + done);
      this.stats.poolReads++;
      this.stats.poolBytes += bytesRead;
      if (bytesRead === 0) {
        // A file shrunk under us: what is past its end reads as zeros, like a hole.
        target.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  /**
   * With the addon, on a file: the holes SEEK_DATA/SEEK_HOLE find in the range are the zero runs
   * (zero-filled, not read) and the data between them is read; a write racing the read may land
   * in a hole after the seek, which the read then shows as before the write (as any read that
   * raced it may). Otherwise (block devices, `UDM_NO_NATIVE=1`) the whole range is read and its
   * all-zero pages are the zero runs.
   */
  async readIntoSparse(offsetBytes: number, target: Buffer): Promise<ZeroRun[]> {
    this.checkOpen();
    checkRange(this, offsetBytes, target.length);
    const native = nativeFileOps();
    if (!native || this.isBlockDevice) {
      await this.readInto(offsetBytes, target);
      return zeroRunsOf(target, offsetBytes);
    }
    const end = offsetBytes + target.length;
    const holes: ZeroRun[] = [];
    const reads: Array<Promise<void>> = [];
    let pos = offsetBytes;
    while (pos < end) {
      const found = native.seekData(this.fd, pos);
      const data = found < 0 || found >= end ? end : found;
      if (data > pos) {
        target.fill(0, pos - offsetBytes, data - offsetBytes);
        holes.push({ offsetBytes: pos, lengthBytes: data - pos });
      }
      if (data >= end) break;
      const hole = Math.min(native.seekHole(this.fd, data), end);
      reads.push(this.readInto(data, target.subarray(data - offsetBytes, hole - offsetBytes)));
      pos = hole;
    }
    await Promise.all(reads);
    return holes;
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    this.checkWritable();
    checkRange(this, offsetBytes, data.length);
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offsetBytes + done);
      done += bytesWritten;
    }
    if (options?.fua) await this.handle.datasync();
  }

  async flush(): Promise<void> {
    this.checkOpen();
    if (!this.readOnly) await this.handle.datasync();
  }

  /**
   * Punches a hole in a file (fallocate PUNCH_HOLE), BLKDISCARD on a block device (whole logical
   * blocks only: the partial blocks at the edges are left as they are, a discard being advisory).
   * A no-op without the native addon or where the file system or device cannot discard.
   */
  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    this.checkWritable();
    checkRange(this, offsetBytes, lengthBytes);
    const native = nativeFileOps();
    let start = offsetBytes;
    let end = offsetBytes + lengthBytes;
    if (this.isBlockDevice) {
      start = Math.ceil(start / this.logicalBlockSize) * this.logicalBlockSize;
      end = Math.floor(end / this.logicalBlockSize) * this.logicalBlockSize;
    }
    if (!native || end <= start) return;
    try {
      await native.punchHole(this.fd, start, end - start);
    } catch (err) {
      if (isUnsupported(err)) return;
      throw this.nativeError("discard", start, end - start, err);
    }
    if (options?.fua) await this.handle.datasync();
  }

  /**
   * Makes the range read as zeros. Files: fallocate ZERO_RANGE (PUNCH_HOLE with `mayTrim`),
   * block devices: BLKZEROOUT on the whole logical blocks, written zeros at unaligned edges.
   * Without the native addon, or where the file system refuses, zeros are written.
   */
  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    this.checkWritable();
    checkRange(this, offsetBytes, lengthBytes);
    if (lengthBytes === 0) return;
    const native = nativeFileOps();
    const end = offsetBytes + lengthBytes;
    if (!native) {
      await this.writeZeroBytes(offsetBytes, lengthBytes);
    } else if (this.isBlockDevice) {
      const blockStart = Math.ceil(offsetBytes / this.logicalBlockSize) * this.logicalBlockSize;
      const blockEnd = Math.floor(end / this.logicalBlockSize) * this.logicalBlockSize;
      if (blockEnd <= blockStart) {
        await this.writeZeroBytes(offsetBytes, lengthBytes);
      } else {
        await this.writeZeroBytes(offsetBytes, blockStart - offsetBytes);
        try {
          await native.zeroRange(this.fd, blockStart, blockEnd - blockStart);
        } catch (err) {
          throw this.nativeError("write-zeroes", blockStart, blockEnd - blockStart, err);
        }
        await this.writeZeroBytes(blockEnd, end - blockEnd);
      }
    } else {
      try {
        if (options?.mayTrim) await native.punchHole(this.fd, offsetBytes, lengthBytes);
        else await native.zeroRange(this.fd, offsetBytes, lengthBytes);
      } catch (err) {
        if (!isUnsupported(err)) throw this.nativeError("write-zeroes", offsetBytes, lengthBytes, err);
        await this.writeZeroBytes(offsetBytes, lengthBytes);
      }
    }
    if (options?.fua) await this.handle.datasync();
  }

  /**
   * Copy offload between two regular files with the native addon: copy_file_range(2), so the data
   * never passes through this process (reflinked where the file system can). False for block
   * devices, other device types, a missing addon, or where the kernel refuses the pair.
   */
  async copyRangeTo(
    offsetBytes: number,
    dest: BlockDevice,
    destOffsetBytes: number,
    lengthBytes: number,
  ): Promise<boolean> {
    this.checkOpen();
    checkRange(this, offsetBytes, lengthBytes);
    const native = nativeFileOps();
    if (!native?.copyRange || !(dest instanceof FileDevice) || this.isBlockDevice || dest.isBlockDevice) {
      return false;
    }
    dest.checkWritable();
    checkRange(dest, destOffsetBytes, lengthBytes);
    if (lengthBytes === 0) return true;
    let copied: number;
    try {
      copied = await native.copyRange(this.fd, offsetBytes, dest.fd, destOffsetBytes, lengthBytes);
    } catch (err) {
      // EXDEV: different file systems (kernels before 5.3 or special files); EINVAL: overlap etc.
      const code = (err as { code?: unknown } | null)?.code;
      if (isUnsupported(err) || code === "EXDEV" || code === "EINVAL" || code === "ENOSYS") return false;
      throw this.nativeError(`copy to ${dest.name}`, offsetBytes, lengthBytes, err);
    }
    // The file is shorter than when it was opened: what is past its end reads as zeros.
    if (copied < lengthBytes) await dest.writeZeroes(destOffsetBytes + copied, lengthBytes - copied);
    return true;
  }

  /**
   * Runs of data and holes: SEEK_DATA/SEEK_HOLE on a file with the native addon; otherwise (block
   * devices, no addon) the whole range is data.
   */
  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.checkOpen();
    checkRange(this, offsetBytes, lengthBytes);
    const end = offsetBytes + lengthBytes;
    const native = nativeFileOps();
    if (!native || this.isBlockDevice) return lengthBytes ? [{ offsetBytes, lengthBytes, kind: "data" }] : [];
    const out: Extent[] = [];
    let pos = offsetBytes;
    while (pos < end) {
      const data = native.seekData(this.fd, pos);
      if (data < 0 || data >= end) {
        out.push({ offsetBytes: pos, lengthBytes: end - pos, kind: "hole" });
        break;
      }
      if (data > pos) out.push({ offsetBytes: pos, lengthBytes: data - pos, kind: "hole" });
      const hole = Math.min(native.seekHole(this.fd, data), end);
      out.push({ offsetBytes: data, lengthBytes: hole - data, kind: "data" });
      pos = hole;
    }
    return mergeExtents(out);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.imageLock?.release();
    await this.handle.close();
  }

  /**
   * One preadv2(RWF_NOWAIT) of `target` at `offsetBytes`: the bytes it copied from the page cache
   * (0 when none were cached). Any failure leaves the whole read to the thread-pool path, which
   * reports real I/O errors exactly as without the addon; a refusal of RWF_NOWAIT itself turns
   * this path off for the file.
   */
  private readCached(native: NativeFileOps, offsetBytes: number, target: Buffer): number {
    this.stats.syncAttempts++;
    let n: number;
    try {
      n = native.preadNowait!(this.handle.fd, target, offsetBytes);
    } catch (err) {
      const code = (err as { code?: unknown } | null)?.code;
      if (isUnsupported(err) || code === "ENOSYS" || code === "EINVAL") this.nowait = null;
      return 0;
    }
    if (n <= 0) return 0;
    this.stats.syncReads++;
    this.stats.syncBytes += n;
    return n;
  }

  /** The pure-JS zeroing path: writes of a shared zero buffer, in pieces. */
  private async writeZeroBytes(offsetBytes: number, lengthBytes: number): Promise<void> {
    if (lengthBytes <= 0) return;
    const zeros = zeroBuffer(Math.min(ZERO_WRITE_BYTES, lengthBytes));
    for (let done = 0; done < lengthBytes; done += zeros.length) {
      const n = Math.min(zeros.length, lengthBytes - done);
      await this.write(offsetBytes + done, n === zeros.length ? zeros : zeros.subarray(0, n));
    }
  }

  private nativeError(what: string, offsetBytes: number, lengthBytes: number, err: unknown): IoError {
    const detail = err instanceof Error ? err.message : String(err);
    return new IoError(errnoOf(err), this.name, `${what} at ${offsetBytes}+${lengthBytes} failed: ${detail}`);
  }

  private checkOpen(): void {
    if (this.closed) throw new IoError("EIO", this.name, "device is closed");
  }

  private checkWritable(): void {
    this.checkOpen();
    if (this.readOnly) throw new IoError("EPERM", this.name, "device is read-only");
  }
}

// glibc's gnu_dev_major/minor, in float arithmetic because rdev may exceed 32 bits.
function major(rdev: number): number {
  return (Math.floor(rdev / 2 ** 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
}

function minor(rdev: number): number {
  return (rdev & 0xff) | (Math.floor(rdev / 2 ** 12) & ~0xff);
}

/** Errors that mean "this file system or device cannot do that", not "the I/O failed". */
function isUnsupported(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === "EOPNOTSUPP" || code === "ENOTSUP" || code === "ENOTTY";
}

let sharedZeros: Buffer | undefined;

/** A zero-filled buffer of at least `bytes`, shared (never written to). */
function zeroBuffer(bytes: number): Buffer {
  if (!sharedZeros || sharedZeros.length < bytes)
    sharedZeros = Buffer.alloc(Math.max(bytes, ZERO_WRITE_BYTES));
  return sharedZeros.subarray(0, bytes);
}

async function readSysNumber(path: string, fallback: number): Promise<number> {
  try {
    return Number((await fsp.readFile(path, "utf8")).trim()) || fallback;
  } catch {
    return fallback;
  }
}
