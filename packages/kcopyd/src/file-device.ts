import { constants as fsConstants, promises as fsp } from "node:fs";
import {
  type BlockDevice,
  checkRange,
  type Extent,
  mergeExtents,
  type WriteOptions,
  type WriteZeroesOptions,
} from "./block-device.js";
import { errnoOf, IoError } from "./errors.js";
import { nativeFileOps } from "./native.js";

/** Zeros are written in pieces of this size when the range cannot be punched or zero-ranged. */
const ZERO_WRITE_BYTES = 1024 * 1024;

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Create (or extend) a regular file to this size, sparse. */
  createSizeBytes?: number;
  /** Name to print in tables; defaults to the path. */
  name?: string;
}

/**
 * A regular file or a real block device (`/dev/sdX`, `/dev/loopN`) as a BlockDevice.
 * Sparse-aware when the native addon is built: extents from SEEK_DATA/SEEK_HOLE, discard
 * and write-zeroes by punching holes (BLKDISCARD / BLKZEROOUT on block devices).
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
  readonly path: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly isBlockDevice: boolean;
  private readonly handle: fsp.FileHandle;
  private closed = false;

  private constructor(
    path: string,
    handle: fsp.FileHandle,
    info: {
      sizeBytes: number;
      logicalBlockSize: number;
      readOnly: boolean;
      isBlockDevice: boolean;
      name: string;
    },
  ) {
    this.path = path;
    this.handle = handle;
    this.name = info.name;
    this.sizeBytes = info.sizeBytes;
    this.logicalBlockSize = info.logicalBlockSize;
    this.readOnly = info.readOnly;
    this.isBlockDevice = info.isBlockDevice;
  }

  static async open(path: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = options.readOnly ?? false;
    let flags = readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR;
    if (options.createSizeBytes !== undefined && !readOnly) flags |= fsConstants.O_CREAT;
    const handle = await fsp.open(path, flags, 0o644);
    try {
      const st = await handle.stat();
      let sizeBytes: number;
      let logicalBlockSize = 512;
      if (st.isBlockDevice()) {
        const sys = `/sys/dev/block/${major(st.rdev)}:${minor(st.rdev)}`;
        sizeBytes = Number((await fsp.readFile(`${sys}/size`, "utf8")).trim()) * 512;
        // A partition has no queue/ of its own: its disk's (the parent directory) applies.
        logicalBlockSize =
          (await readSysNumber(`${sys}/queue/logical_block_size`, 0)) ||
          (await readSysNumber(`${sys}/../queue/logical_block_size`, 512));
      } else if (st.isFile()) {
        sizeBytes = st.size;
        if (options.createSizeBytes !== undefined && options.createSizeBytes > sizeBytes) {
          await handle.truncate(options.createSizeBytes);
          sizeBytes = options.createSizeBytes;
        }
      } else {
        throw new IoError("EINVAL", path, "not a regular file or block device");
      }
      return new FileDevice(path, handle, {
        sizeBytes,
        logicalBlockSize,
        readOnly,
        isBlockDevice: st.isBlockDevice(),
        name: options.name ?? path,
      });
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** The file descriptor, for native helpers. */
  get fd(): number {
    return this.handle.fd;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    this.checkOpen();
    checkRange(this, offsetBytes, target.length);
    let done = 0;
    while (done < target.length) {
      const { bytesRead } = await this.handle.read(target, done, target.length - done, offsetBytes + done);
      if (bytesRead === 0) {
        // A file shrunk under us: what is past its end reads as zeros, like a hole.
        target.fill(0, done);
        return;
      }
      done += bytesRead;
    }
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
    await this.handle.close();
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
