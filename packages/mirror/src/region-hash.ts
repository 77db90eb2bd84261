import type { DirtyRegionLog } from "./dirty-log.js";

/** dm-region-hash's states (`DM_RH_*`), as bit values like the kernel's enum. */
export const RegionState = {
  /** In sync, no writes in flight. */
  CLEAN: 0x01,
  /** In sync, writes in flight (the log has the region marked dirty). */
  DIRTY: 0x02,
  /** Out of sync: written to the current legs only until recovered. */
  NOSYNC: 0x04,
  /** Being resynced: new writes wait until the copy ends. */
  RECOVERING: 0x08,
} as const;
export type RegionState = (typeof RegionState)[keyof typeof RegionState];

interface RegionEntry {
  state: RegionState;
  pending: number;
  /** Bumped by every write: a clean candidate is only cleaned if no write came since. */
  gen: number;
  /** Writes parked while the region recovers (`dm_rh_delay`). */
  delayed: Array<() => void>;
  /** Recovery waiting for in-flight writes to drain (the quiesce step). */
  quiesced: (() => void) | null;
}

/**
 * The region hash of dm-region-hash.c: only regions with something going on have an entry; any
 * other region's state comes from the log (in sync: CLEAN, else NOSYNC).
 *
 * Transitions: CLEAN -inc-> DIRTY (log `markRegion`); DIRTY -dec to 0-> CLEAN on the clean list;
 * after a leg flush, `commitClean()` sets the clean bit of listed regions nobody wrote since; `markNosync` (a leg missed a write) -> NOSYNC; recovery:
 * any -> RECOVERING once no writes are pending -> removed (state from the log again).
 *
 * @example
 * ```ts
 * const rh = new RegionHash(log);
 * rh.incPending(7);            // CLEAN -> DIRTY, clean bit cleared
 * rh.decPending(7);            // DIRTY -> CLEAN, queued for lazy cleaning
 * const candidates = rh.cleanCandidates();
 * await flushAllLegs();
 * rh.commitClean(candidates);   // clean bit set; now `await log.flush()`
 * ```
 */
export class RegionHash {
  private readonly entries = new Map<number, RegionEntry>();
  private cleanList = new Set<number>();
  /** Called when a region joins the clean list (schedule a worker pass). */
  onCleanable: (() => void) | undefined;

  constructor(readonly log: DirtyRegionLog) {}

  state(region: number): RegionState {
    return this.entries.get(region)?.state ?? this.logState(region);
  }

  /** Regions with writes in flight, summed. */
  get pendingWrites(): number {
    let n = 0;
    for (const e of this.entries.values()) n += e.pending;
    return n;
  }

  /** Regions waiting for the next clean pass. */
  get cleanListSize(): number {
    return this.cleanList.size;
  }

  private logState(region: number): RegionState {
    return this.log.inSync(region) ? RegionState.CLEAN : RegionState.NOSYNC;
  }

  private entry(region: number): RegionEntry {
    let e = this.entries.get(region);
    if (!e) {
      e = { state: this.logState(region), pending: 0, gen: 0, delayed: [], quiesced: null };
      this.entries.set(region, e);
    }
    return e;
  }

  /** A write is about to go to `region` (`dm_rh_inc`). The caller flushes the log before issuing it. */
  incPending(region: number): void {
    const e = this.entry(region);
    e.pending++;
    e.gen++;
    if (e.state === RegionState.CLEAN) {
      e.state = RegionState.DIRTY;
      this.cleanList.delete(region);
    }
    // Any region written must be dirty in the log, whatever its state (a core log starts all clean).
    this.log.markRegion(region);
  }

  /** A write to `region` completed (`dm_rh_dec`). */
  decPending(region: number): void {
    const e = this.entries.get(region);
    if (!e || e.pending === 0) throw new Error(`region ${region}: write completion without a pending write`);
    if (--e.pending > 0) return;
    if (e.state === RegionState.RECOVERING) {
      const quiesced = e.quiesced;
      e.quiesced = null;
      quiesced?.();
      return;
    }
    if (e.state === RegionState.DIRTY) {
      e.state = RegionState.CLEAN;
      this.cleanList.add(region);
      this.onCleanable?.();
      return;
    }
    // NOSYNC with nothing in flight: the log remembers it; drop the entry.
    this.entries.delete(region);
  }

  /** Some leg missed a write to `region` (`dm_rh_mark_nosync`). */
  markNosync(region: number): void {
    this.log.setRegionSync(region, false);
    this.cleanList.delete(region);
    const e = this.entries.get(region);
    if (!e) return;
    if (e.state === RegionState.RECOVERING) {
      // Recovery in progress keeps its entry; it will see the region out of sync when it ends.
      return;
    }
    if (e.pending === 0) this.entries.delete(region);
    else e.state = RegionState.NOSYNC;
  }

  /**
   * Every leg holds current data in `region` again (a resync copy became durable): in sync, and
   * cleaned like a drained region once its writes (if any) drain.
   */
  markInSync(region: number): void {
    this.log.setRegionSync(region, true);
    const e = this.entries.get(region);
    if (!e) {
      this.queueClean(region);
      return;
    }
    if (e.state !== RegionState.NOSYNC) return; // RECOVERING: endRecovery sees the log in sync
    e.gen++;
    if (e.pending > 0) {
      e.state = RegionState.DIRTY;
      return;
    }
    e.state = RegionState.CLEAN;
    this.cleanList.add(region);
    this.onCleanable?.();
  }

  /**
   * Regions drained since the last pass, with their write generation. The caller flushes the
   * legs, then passes them to `commitClean` (the two halves of `dm_rh_update_states`, split so a
   * slow leg flush never holds the log).
   */
  cleanCandidates(): Array<[region: number, gen: number]> {
    const out: Array<[number, number]> = [];
    for (const region of this.cleanList) {
      const e = this.entries.get(region);
      if (e && e.state === RegionState.CLEAN && e.pending === 0) out.push([region, e.gen]);
    }
    return out;
  }

  /** Sets the clean bit of candidates nobody wrote since `cleanCandidates()`; returns how many. */
  commitClean(candidates: Array<[region: number, gen: number]>): number {
    let n = 0;
    for (const [region, gen] of candidates) {
      const e = this.entries.get(region);
      if (!e || e.state !== RegionState.CLEAN || e.pending > 0 || e.gen !== gen) continue;
      this.log.clearRegion(region);
      this.entries.delete(region);
      this.cleanList.delete(region);
      n++;
    }
    return n;
  }

  /** Sets the clean bit of every drained region at once (for callers whose legs are already flushed). */
  updateStates(): number {
    return this.commitClean(this.cleanCandidates());
  }

  /** Queues an in-sync region whose clean bit is clear for the next clean pass. */
  queueClean(region: number): void {
    if (this.entries.has(region) || !this.log.inSync(region)) return;
    this.entry(region).state = RegionState.CLEAN;
    this.cleanList.add(region);
    this.onCleanable?.();
  }

  /**
   * Marks an idle in-sync region dirty ahead of an expected write (sequential streams), so one
   * log write covers several regions. It sits on the clean list and is cleaned if unused.
   */
  dirtyAhead(region: number): boolean {
    if (this.entries.has(region) || !this.log.inSync(region) || !this.log.isClean(region)) return false;
    const e = this.entry(region);
    this.log.markRegion(region);
    e.state = RegionState.CLEAN;
    this.cleanList.add(region);
    this.onCleanable?.();
    return true;
  }

  /** Marks `region` RECOVERING and resolves once no write is in flight there (quiesced). */
  beginRecovery(region: number): Promise<void> {
    const e = this.entry(region);
    this.cleanList.delete(region);
    e.state = RegionState.RECOVERING;
    if (e.pending === 0) return Promise.resolve();
    return new Promise((resolve) => {
      e.quiesced = resolve;
    });
  }

  /**
   * Recovery of `region` ended; the log already says whether it is in sync. A recovered region
   * is cleaned lazily like a drained one (its copy must be flushed first). Parked writes go on.
   */
  endRecovery(region: number): void {
    const e = this.entries.get(region);
    if (!e) return;
    if (this.log.inSync(region)) {
      e.state = RegionState.CLEAN;
      e.gen++;
      this.cleanList.add(region);
      this.onCleanable?.();
    } else {
      this.entries.delete(region);
    }
    for (const wake of e.delayed) wake();
  }

  /** Resolves when `region` is not RECOVERING (immediately if it is not). */
  waitRecovered(region: number): Promise<void> {
    const e = this.entries.get(region);
    if (!e || e.state !== RegionState.RECOVERING) return Promise.resolve();
    return new Promise((resolve) => e.delayed.push(resolve));
  }

  isRecovering(region: number): boolean {
    return this.entries.get(region)?.state === RegionState.RECOVERING;
  }
}
