import {
  type BlockDevice,
  checkRange,
  type Extent,
  IoError,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";

interface CachedWrite {
  offsetBytes: number;
  /** null: zeros (write-zeroes or discard). */
  data: Buffer | null;
  lengthBytes: number;
  fua: boolean;
}

/**
 * A disk with a volatile write cache, for crash tests: writes are visible at once but reach the
 * device under it only on `flush()` (or, for that write, with FUA). `crash()` loses what was not
 * flushed, optionally letting an arbitrary subset of it land first, as a real cache may.
 *
 * @example
 * ```ts
 * const disk = new WriteCacheDevice(new MemoryDevice(1 << 20));
 * await disk.write(0, Buffer.from("lost"));
 * disk.crash();            // power cut: the write never reached the medium
 * await disk.read(0, 4);   // zeros
 * ```
 */
export class WriteCacheDevice implements BlockDevice {
  readonly name: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  private cache: CachedWrite[] = [];
  private crashed = false;

  constructor(
    readonly inner: BlockDevice,
    options: { name?: string } = {},
  ) {
    this.name = options.name ?? `cache(${inner.name})`;
    this.sizeBytes = inner.sizeBytes;
    this.logicalBlockSize = inner.logicalBlockSize;
    this.readOnly = inner.readOnly;
  }

  /** Writes not yet on the device below. */
  get unflushedWrites(): number {
    return this.cache.length;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  private checkAlive(): void {
    if (this.crashed) throw new IoError("EIO", this.name, "device lost power (crashed)");
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    this.checkAlive();
    await this.inner.readInto(offsetBytes, target);
    const end = offsetBytes + target.length;
    for (const w of this.cache) {
      const s = Math.max(w.offsetBytes, offsetBytes);
      const e = Math.min(w.offsetBytes + w.lengthBytes, end);
      if (s >= e) continue;
      if (w.data) w.data.copy(target, s - offsetBytes, s - w.offsetBytes, e - w.offsetBytes);
      else target.fill(0, s - offsetBytes, e - offsetBytes);
    }
  }

  private async apply(w: CachedWrite): Promise<void> {
    if (w.data) await this.inner.write(w.offsetBytes, w.data);
    else await this.inner.writeZeroes(w.offsetBytes, w.lengthBytes);
  }

  private async add(w: CachedWrite): Promise<void> {
    checkRange(this, w.offsetBytes, w.lengthBytes);
    this.checkAlive();
    this.cache.push(w);
    // FUA: this write is on the medium when it completes (earlier cached ones need not be).
    if (w.fua) await this.apply(w);
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    await this.add({ offsetBytes, data: Buffer.from(data), lengthBytes: data.length, fua: !!options?.fua });
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    await this.add({ offsetBytes, data: null, lengthBytes, fua: !!options?.fua });
  }

  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    await this.add({ offsetBytes, data: null, lengthBytes, fua: !!options?.fua });
  }

  async flush(): Promise<void> {
    this.checkAlive();
    const pending = this.cache;
    this.cache = [];
    for (const w of pending) {
      // Power cut in the middle of a flush: the rest never lands.
      this.checkAlive();
      await this.apply(w);
    }
    await this.inner.flush();
  }

  /**
   * Power cut: unflushed writes are dropped, except FUA ones and those `survives(i)` keeps
   * (applied in their original order). Afterwards every I/O fails with EIO: wrap `inner` in a
   * new device to "reboot". Returns how many writes were lost.
   */
  async crash(survives: (index: number) => boolean = () => false): Promise<number> {
    this.crashed = true;
    const pending = this.cache;
    this.cache = [];
    let lost = 0;
    for (let i = 0; i < pending.length; i++) {
      const w = pending[i]!;
      if (w.fua || survives(i)) await this.apply(w);
      else lost++;
    }
    return lost;
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    return lengthBytes ? [{ offsetBytes, lengthBytes, kind: "data" }] : [];
  }

  async close(): Promise<void> {}
}
