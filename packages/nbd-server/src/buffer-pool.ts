/**
 * Reply buffers kept for reuse, by exact size: NBD clients read in a few fixed sizes (4 KiB,
 * 64 KiB, 256 KiB...), so a freed buffer of the same size is usually asked for again at once.
 * Reuse spares the allocator and the GC the churn of one fresh buffer per READ.
 *
 * @example
 * ```ts
 * const pool = new BufferPool(64 << 20);
 * const buf = pool.take(4096 + 28);
 * socket.write(buf, () => pool.give(buf));
 * ```
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private keptBytes = 0;

  /** @param maxKeptBytes bytes of idle buffers kept at most; beyond that freed buffers go to the GC. */
  constructor(readonly maxKeptBytes: number) {}

  /** Bytes of idle buffers held now. */
  get idleBytes(): number {
    return this.keptBytes;
  }

  /** A buffer of exactly `size` bytes with unspecified contents. */
  take(size: number): Buffer {
    const list = this.free.get(size);
    const buf = list?.pop();
    if (buf) {
      this.keptBytes -= size;
      return buf;
    }
    // Small sizes come from Node's shared slab; pooled buffers must own their memory.
    return size < 4096 ? Buffer.allocUnsafe(size) : Buffer.allocUnsafeSlow(size);
  }

  /** Hands a buffer back once nothing refers to it any more (e.g. its socket write completed). */
  give(buf: Buffer): void {
    if (buf.length < 4096 || buf.byteOffset !== 0 || buf.buffer.byteLength !== buf.length) return;
    if (this.keptBytes + buf.length > this.maxKeptBytes) return;
    let list = this.free.get(buf.length);
    if (!list) {
      list = [];
      this.free.set(buf.length, list);
    }
    list.push(buf);
    this.keptBytes += buf.length;
  }
}
