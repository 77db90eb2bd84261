import type { DirtyRegionLog } from "./dirty-log.js";

/**
 * The one owner of "which legs hold current data in region r". Reads, extents(), block status,
 * read balancing, writes and recovery all ask it; nothing else keeps a copy.
 *
 * Per region it keeps two masks over the legs (bit i = leg i, by table position):
 * - `stale`: the leg lacks current data there. Never every leg: a region always has a current
 *   leg (callers fail the I/O instead of marking the last current leg stale).
 * - `receiving`: a stale leg that a resync copied the region to; it takes new writes so it stays
 *   whole, but it is not read from and stays stale until a flush of that leg covers the copy.
 *
 * With a disk log, each leg's stale bits are kept in the log's per-leg area (see dirty-log.ts):
 * a new stale bit is a dirty mark (durable before the write that caused it is acknowledged); a
 * cleared one is written with the next log write, so a restart knows per region which legs to
 * copy from.
 *
 * @example
 * ```ts
 * const currency = new LegCurrency(log, 2);
 * currency.addStale(3, 0b10); // leg 1 missed a write to region 3
 * currency.currentMask(3);    // 0b01: read from leg 0 only
 * ```
 */
export class LegCurrency {
  readonly regionCount: number;
  readonly allLegsMask: number;
  private readonly stale: Uint16Array;
  private readonly receiving: Uint16Array;
  /** Per leg: regions where it is stale (feeds the log's stale-legs mask). */
  private readonly staleCounts: number[];

  constructor(
    private readonly log: DirtyRegionLog,
    readonly legCount: number,
  ) {
    this.regionCount = log.regionCount;
    this.allLegsMask = (1 << legCount) - 1;
    this.stale = new Uint16Array(this.regionCount);
    this.receiving = new Uint16Array(this.regionCount);
    this.staleCounts = new Array<number>(legCount).fill(0);
  }

  /** Legs that lack current data in `region` (0: in sync). */
  staleMask(region: number): number {
    return this.stale[region]!;
  }

  /** Legs holding current data in `region`: the only ones reads, extents and recovery use. */
  currentMask(region: number): number {
    return this.allLegsMask & ~this.stale[region]!;
  }

  /** Legs a write to `region` goes to: the current ones and those catching up after a copy. */
  writeMask(region: number): number {
    return this.currentMask(region) | this.receiving[region]!;
  }

  /** Stale legs that already hold a copy of `region`, waiting for a flush to become current. */
  receivingMask(region: number): number {
    return this.receiving[region]!;
  }

  inSync(region: number): boolean {
    return this.stale[region] === 0;
  }

  /** Whether `leg` is current in every region. */
  currentEverywhere(leg: number): boolean {
    return this.staleCounts[leg] === 0;
  }

  /** Legs stale in at least one region. */
  staleLegs(): number {
    return this.staleCounts.reduce((m, n, i) => (n > 0 ? m | (1 << i) : m), 0);
  }

  /** The legs in `mask` lack current data in `region` (durable with the next dirty mark). */
  addStale(region: number, mask: number): number {
    const added = mask & this.allLegsMask & ~this.stale[region]!;
    if (!added) return 0;
    if ((this.stale[region]! | added) === this.allLegsMask) {
      throw new Error(`region ${region}: marking legs ${added.toString(2)} stale would leave no current leg`);
    }
    this.receiving[region]! &= ~added;
    this.setStale(region, this.stale[region]! | added);
    this.log.noteStaleAdded();
    return added;
  }

  /** The legs in `mask` hold current data in `region` again (their copy is durable). */
  clearStale(region: number, mask: number): void {
    const cleared = mask & this.stale[region]!;
    if (!cleared) return;
    this.receiving[region]! &= ~cleared;
    this.setStale(region, this.stale[region]! & ~cleared);
    this.log.noteStaleCleared();
  }

  /** A resync copied `region` to the stale legs in `mask`: they take writes until flushed. */
  startReceiving(region: number, mask: number): void {
    this.receiving[region]! |= mask & this.stale[region]!;
  }

  /** A receiving leg failed a write or a flush: its copy is not to be trusted. */
  stopReceiving(region: number, mask: number): void {
    this.receiving[region]! &= ~mask;
  }

  /** What the disk log's per-leg area says is stale in `region`, or undefined if it does not know. */
  storedStaleMask(region: number): number | undefined {
    const bits = this.log.legStaleBits;
    if (!bits || !this.log.storedLegBits) return undefined;
    let mask = 0;
    for (let i = 0; i < bits.length; i++) if (bits[i]!.test(region)) mask |= 1 << i;
    return mask;
  }

  private setStale(region: number, mask: number): void {
    const old = this.stale[region]!;
    const changed = old ^ mask;
    const bits = this.log.legStaleBits;
    for (let i = 0; i < this.legCount; i++) {
      if (!(changed & (1 << i))) continue;
      const nowStale = (mask & (1 << i)) !== 0;
      this.staleCounts[i]! += nowStale ? 1 : -1;
      if (bits) {
        if (nowStale) bits[i]!.set(region);
        else bits[i]!.clear(region);
      }
    }
    this.stale[region] = mask;
    this.log.staleLegs = this.staleLegs();
  }
}
