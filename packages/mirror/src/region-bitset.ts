/**
 * A bit per region in the kernel's little-endian bit order (`test_bit_le`): region `r` lives in
 * byte `r >> 3`, bit `r & 7`. The storage is a view, so a disk log can keep its clean bitmap
 * inside the very buffer it writes to the log device.
 *
 * @example
 * ```ts
 * const bits = new RegionBitset(128);
 * bits.set(5);
 * bits.test(5); // true
 * bits.bytes[0]; // 0b0010_0000
 * ```
 */
export class RegionBitset {
  readonly bytes: Uint8Array;

  constructor(
    readonly regionCount: number,
    storage?: Uint8Array,
  ) {
    const needed = bitsetBytes(regionCount);
    if (storage && storage.length < needed) {
      throw new RangeError(`bitset of ${regionCount} regions needs ${needed} bytes, got ${storage.length}`);
    }
    this.bytes = storage ?? new Uint8Array(needed);
  }

  test(region: number): boolean {
    return ((this.bytes[region >> 3]! >> (region & 7)) & 1) === 1;
  }

  /** Sets the bit; returns true if it was clear. */
  set(region: number): boolean {
    const mask = 1 << (region & 7);
    const byte = this.bytes[region >> 3]!;
    this.bytes[region >> 3] = byte | mask;
    return (byte & mask) === 0;
  }

  /** Clears the bit; returns true if it was set. */
  clear(region: number): boolean {
    const mask = 1 << (region & 7);
    const byte = this.bytes[region >> 3]!;
    this.bytes[region >> 3] = byte & ~mask;
    return (byte & mask) !== 0;
  }

  /** Sets (`true`) or clears every region bit; bits past `regionCount` are cleared. */
  fill(value: boolean): void {
    this.bytes.fill(value ? 0xff : 0);
    if (value) this.clearTail();
  }

  /** Clears the padding bits after the last region (the kernel keeps them zero). */
  clearTail(): void {
    for (let r = this.regionCount; r < this.bytes.length * 8; r++) this.clear(r);
  }

  /** Number of set bits among the regions. */
  count(): number {
    let n = 0;
    const full = this.regionCount >> 3;
    for (let i = 0; i < full; i++) n += POPCOUNT[this.bytes[i]!]!;
    for (let r = full * 8; r < this.regionCount; r++) if (this.test(r)) n++;
    return n;
  }

  /** First region `>= from` whose bit equals `value`, or -1. Skips whole bytes that cannot match. */
  findNext(value: boolean, from: number): number {
    const skip = value ? 0 : 0xff;
    let r = Math.max(0, from);
    while (r < this.regionCount) {
      if ((r & 7) === 0 && this.bytes[r >> 3] === skip) {
        r += 8;
        continue;
      }
      if (this.test(r) === value) return r;
      r++;
    }
    return -1;
  }
}

/** Bytes of a bitset for `regionCount` regions, rounded up to 64 bits as the kernel's `unsigned long` bitsets. */
export function bitsetBytes(regionCount: number): number {
  return Math.ceil(regionCount / 64) * 8;
}

const POPCOUNT = Uint8Array.from({ length: 256 }, (_, i) => {
  let n = 0;
  for (let v = i; v; v >>= 1) n += v & 1;
  return n;
});
