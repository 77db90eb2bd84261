import {
  type BlockDevice,
  checkRange,
  type Extent,
  mergeExtents,
  type WriteOptions,
  type WriteZeroesOptions,
  type ZeroRun,
} from "./block-device.js";
import { IoError } from "./errors.js";
import { allocData } from "./poison.js";

/** Allocation unit of a MemoryDevice: small enough for sparse use, large enough for few map entries. */
export const MEMORY_CHUNK_BYTES = 64 * 1024;

/**
 * A sparse RAM disk: only written 64 KiB chunks hold memory, so sizes far beyond 2 GiB cost
 * nothing until written. Zero-written or discarded chunks are freed again.
 *
 * @example
 * ```ts
 * const dev = new MemoryDevice(4 * 2 ** 40); // 4 TiB, empty
 * await dev.write(2 ** 40, Buffer.alloc(4096, 1));
 * ```
 */
export class MemoryDevice implements BlockDevice {
  readonly name: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  private readonly chunks = new Map<number, Buffer>();
  private closed = false;

  constructor(
    sizeBytes: number,
    options: { name?: string; logicalBlockSize?: number; readOnly?: boolean } = {},
  ) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0)
      throw new RangeError(`bad memory device size ${sizeBytes}`);
    this.sizeBytes = sizeBytes;
    this.name = options.name ?? `mem:${sizeBytes}`;
    this.logicalBlockSize = options.logicalBlockSize ?? 512;
    this.readOnly = options.readOnly ?? false;
  }

  /** Bytes of RAM held by written chunks. */
  get allocatedBytes(): number {
    return this.chunks.size * MEMORY_CHUNK_BYTES;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = allocData(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    this.checkOpen();
    checkRange(this, offsetBytes, target.length);
    this.forEachPiece(offsetBytes, target.length, (index, within, length, done) => {
      const chunk = this.chunks.get(index);
      if (chunk) chunk.copy(target, done, within, within + length);
      else target.fill(0, done, done + length);
    });
  }

  /** Unallocated chunks are the zero runs: they are filled with zeros in the same pass. */
  async readIntoSparse(offsetBytes: number, target: Buffer): Promise<ZeroRun[]> {
    this.checkOpen();
    checkRange(this, offsetBytes, target.length);
    const zeros: ZeroRun[] = [];
    this.forEachPiece(offsetBytes, target.length, (index, within, length, done) => {
      const chunk = this.chunks.get(index);
      if (chunk) {
        chunk.copy(target, done, within, within + length);
        return;
      }
      target.fill(0, done, done + length);
      const last = zeros[zeros.length - 1];
      if (last && last.offsetBytes + last.lengthBytes === offsetBytes + done) last.lengthBytes += length;
      else zeros.push({ offsetBytes: offsetBytes + done, lengthBytes: length });
    });
    return zeros;
  }

  async write(offsetBytes: number, data: Buffer, _options?: WriteOptions): Promise<void> {
    this.checkWritable();
    checkRange(this, offsetBytes, data.length);
    this.forEachPiece(offsetBytes, data.length, (index, within, length, done) => {
      let chunk = this.chunks.get(index);
      if (!chunk) {
        chunk = Buffer.alloc(MEMORY_CHUNK_BYTES);
        this.chunks.set(index, chunk);
      }
      data.copy(chunk, within, done, done + length);
    });
  }

  async flush(): Promise<void> {
    this.checkOpen();
  }

  async discard(offsetBytes: number, lengthBytes: number, _options?: WriteOptions): Promise<void> {
    await this.writeZeroes(offsetBytes, lengthBytes, { mayTrim: true });
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, _options?: WriteZeroesOptions): Promise<void> {
    this.checkWritable();
    checkRange(this, offsetBytes, lengthBytes);
    // Zeroed memory reads as zeros whether kept or freed, so free whole chunks either way.
    this.forEachPiece(offsetBytes, lengthBytes, (index, within, length) => {
      const chunk = this.chunks.get(index);
      if (!chunk) return;
      if (length === MEMORY_CHUNK_BYTES) this.chunks.delete(index);
      else chunk.fill(0, within, within + length);
    });
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.checkOpen();
    checkRange(this, offsetBytes, lengthBytes);
    const out: Extent[] = [];
    const end = offsetBytes + lengthBytes;
    let pos = offsetBytes;
    // Walk allocated chunks in order when the range is huge and sparse, not every chunk index.
    const first = Math.floor(offsetBytes / MEMORY_CHUNK_BYTES);
    const last = Math.floor((end - 1) / MEMORY_CHUNK_BYTES);
    const indexes =
      last - first > this.chunks.size * 4
        ? [...this.chunks.keys()].filter((i) => i >= first && i <= last).sort((a, b) => a - b)
        : null;
    const allocatedAt = (i: number) => this.chunks.has(i);
    const visit = (i: number) => {
      const chunkStart = i * MEMORY_CHUNK_BYTES;
      const s = Math.max(chunkStart, offsetBytes);
      const e = Math.min(chunkStart + MEMORY_CHUNK_BYTES, end);
      if (s > pos) out.push({ offsetBytes: pos, lengthBytes: s - pos, kind: "hole" });
      out.push({ offsetBytes: s, lengthBytes: e - s, kind: "data" });
      pos = e;
    };
    if (indexes) for (const i of indexes) visit(i);
    else for (let i = first; i <= last && lengthBytes > 0; i++) if (allocatedAt(i)) visit(i);
    if (pos < end) out.push({ offsetBytes: pos, lengthBytes: end - pos, kind: "hole" });
    return mergeExtents(out);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.chunks.clear();
  }

  private forEachPiece(
    offsetBytes: number,
    lengthBytes: number,
    fn: (index: number, within: number, length: number, done: number) => void,
  ): void {
    let done = 0;
    while (done < lengthBytes) {
      const pos = offsetBytes + done;
      const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
      const within = pos - index * MEMORY_CHUNK_BYTES;
      const length = Math.min(MEMORY_CHUNK_BYTES - within, lengthBytes - done);
      fn(index, within, length, done);
      done += length;
    }
  }

  private checkOpen(): void {
    if (this.closed) throw new IoError("EIO", this.name, "device is closed");
  }

  private checkWritable(): void {
    this.checkOpen();
    if (this.readOnly) throw new IoError("EPERM", this.name, "device is read-only");
  }
}
