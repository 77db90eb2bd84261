/**
 * What one leg may lose if its next flush fails (or its connection drops): flush accounting by
 * generation. A write is covered only by a flush issued after the write completed; until such a
 * flush succeeds its region stays in the window, whatever flushes were issued meanwhile. Writes
 * still in flight are always in the window.
 *
 * Resync copies are tracked the same way: a copy makes its destination current only once a flush
 * issued after the copy succeeded (`flushSucceeded` returns those regions).
 *
 * @example
 * ```ts
 * const w = new FlushWindow();
 * w.writeStarted(3); w.writeEnded(3);
 * const k = w.beginFlush();
 * w.flushSucceeded(k); // region 3 is durable on this leg
 * ```
 */
export class FlushWindow {
  /** Flushes issued on this leg so far; flush k covers what completed before it was issued. */
  private issued = 0;
  /** Region -> leg writes in flight there. */
  private readonly inFlight = new Map<number, number>();
  /** Region -> flushes issued when the last write there completed (covered by a later one). */
  private readonly completed = new Map<number, number>();
  /** Region -> flushes issued when a resync copy there completed. */
  private readonly copies = new Map<number, number>();

  writeStarted(region: number): void {
    this.inFlight.set(region, (this.inFlight.get(region) ?? 0) + 1);
  }

  writeEnded(region: number): void {
    const n = this.inFlight.get(region) ?? 0;
    if (n <= 1) this.inFlight.delete(region);
    else this.inFlight.set(region, n - 1);
    this.completed.set(region, this.issued);
  }

  copyDone(region: number): void {
    this.copies.set(region, this.issued);
  }

  /** The copy now counts as written data (the leg became current before its flush). */
  copyToWritten(region: number): void {
    const gen = this.copies.get(region);
    if (gen === undefined) return;
    this.copies.delete(region);
    this.completed.set(region, Math.min(gen, this.completed.get(region) ?? gen));
  }

  /** A resync copy to this leg is abandoned (the region is stale there again). */
  forgetCopy(region: number): void {
    this.copies.delete(region);
  }

  /** Number of the flush about to be issued. */
  beginFlush(): number {
    return ++this.issued;
  }

  /** Flush `k` succeeded: what completed before it was issued is durable. Returns copies made durable. */
  flushSucceeded(k: number): number[] {
    for (const [region, gen] of this.completed) if (gen < k) this.completed.delete(region);
    const durable: number[] = [];
    for (const [region, gen] of this.copies) {
      if (gen < k) {
        this.copies.delete(region);
        durable.push(region);
      }
    }
    return durable;
  }

  /**
   * A flush failed or the leg went away: every region written since the last good flush (done or
   * in flight) and every copy not yet flushed. Copies are dropped; written regions stay until the
   * caller `forget`s them (it keeps those where this leg holds the only current copy).
   */
  lost(): { written: number[]; copies: number[] } {
    const written = new Set<number>(this.completed.keys());
    for (const region of this.inFlight.keys()) written.add(region);
    const copies = [...this.copies.keys()];
    this.copies.clear();
    return { written: [...written], copies };
  }

  /** The region is stale on this leg now: nothing of it to account for. */
  forget(region: number): void {
    this.completed.delete(region);
  }

  /** Whether something written or copied to `region` on this leg awaits a good flush. */
  holds(region: number): boolean {
    return this.completed.has(region) || this.inFlight.has(region) || this.copies.has(region);
  }

  /** Regions written on this leg that no good flush covers yet (a reload hands them over). */
  unflushed(): number[] {
    return [...new Set([...this.completed.keys(), ...this.inFlight.keys()])];
  }

  /**
   * Regions an earlier table wrote on this leg with no good flush since: they are in this window
   * as if written now, so a failing flush makes the leg stale there (not only for this table's
   * own writes).
   */
  inherit(regions: Iterable<number>): void {
    for (const region of regions) {
      this.completed.set(region, Math.min(this.issued, this.completed.get(region) ?? this.issued));
    }
  }

  /** Regions awaiting a flush (written or copied), for tests. */
  get size(): number {
    return new Set([...this.completed.keys(), ...this.inFlight.keys(), ...this.copies.keys()]).size;
  }
}
