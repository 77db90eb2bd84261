import { isPoisoned, poisonEnabled, poisonFill, poisonViolation } from "@udm/kcopyd";

/**
 * Data buffers (READ replies, WRITE payloads) kept for reuse, by exact size: NBD clients use a few
 * fixed sizes (4 KiB, 64 KiB, 256 KiB...), so a freed buffer of the same size is usually asked for
 * again at once. Reuse spares the allocator and the GC the churn of one fresh buffer per request.
 *
 * In poison mode (`UDM_POISON=1`, see `@udm/kcopyd` poison.ts) every buffer is poison-filled
 * when taken and when given back, and must still hold only poison when it is taken again: a
 * buffer given back while a socket or a device still held it is caught (the process ends with
 * the error) or shows up as poison in what a client reads.
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
  private readonly poison: boolean;
  /** What the buffers are, in poison-mode errors. */
  private readonly what: string;
  /** Poison mode: the idle buffers, to catch one given back twice. */
  private readonly idle = new WeakSet<Buffer>();

  /** @param maxKeptBytes bytes of idle buffers kept at most; beyond that freed buffers go to the GC. */
  constructor(
    readonly maxKeptBytes: number,
    options: { poison?: boolean; what?: string } = {},
  ) {
    this.poison = options.poison ?? poisonEnabled();
    this.what = options.what ?? "reply";
  }

  /** Bytes of idle buffers held now. */
  get idleBytes(): number {
    return this.keptBytes;
  }

  /** A buffer of exactly `size` bytes with unspecified contents (poison in poison mode). */
  take(size: number): Buffer {
    const list = this.free.get(size);
    const buf = list?.pop();
    if (buf) {
      this.keptBytes -= size;
      if (!this.poison) return buf;
      this.idle.delete(buf);
      if (isPoisoned(buf)) return buf;
      poisonViolation(`a pooled ${size}-byte ${this.what} buffer was written after it was given back`);
    }
    // Small sizes come from Node's shared slab; pooled buffers must own their memory.
    const fresh = size < 4096 ? Buffer.allocUnsafe(size) : Buffer.allocUnsafeSlow(size);
    if (this.poison) poisonFill(fresh);
    return fresh;
  }

  /** Hands a buffer back once nothing refers to it any more (e.g. its socket write completed). */
  give(buf: Buffer): void {
    if (this.poison) {
      if (this.idle.has(buf)) {
        poisonViolation(`a ${buf.length}-byte ${this.what} buffer was given back twice`);
        return;
      }
      poisonFill(buf);
    }
    if (buf.length < 4096 || buf.byteOffset !== 0 || buf.buffer.byteLength !== buf.length) return;
    if (this.keptBytes + buf.length > this.maxKeptBytes) return;
    let list = this.free.get(buf.length);
    if (!list) {
      list = [];
      this.free.set(buf.length, list);
    }
    list.push(buf);
    this.keptBytes += buf.length;
    if (this.poison) this.idle.add(buf);
  }
}
