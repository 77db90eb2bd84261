import {
  type BlockDevice,
  checkRange,
  type Extent,
  IoError,
  KcopydClient,
  KcopydFlags,
  KcopydThrottle,
  mergeExtents,
  SECTOR_SHIFT,
  SECTOR_SIZE,
  type StatusContext,
  type TargetDevice,
  type TargetLogger,
  type TargetProgress,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";
import type { DirtyRegionLog } from "./dirty-log.js";
import { LegCurrency } from "./leg-currency.js";
import { type LegErrorKind, type MirrorLeg, type MirrorLegSpec, MirrorLegs } from "./mirror-legs.js";
import { RegionHash } from "./region-hash.js";

/** Regions resynced at once by default; the kernel's `MAX_RECOVERY` is 1. */
export const DEFAULT_REGIONS_IN_FLIGHT = 8;
/** Upper bound for `regions_in_flight` (each holds a kcopyd job of up to one region). */
export const MAX_REGIONS_IN_FLIGHT = 64;
/**
 * Drained regions are marked clean lazily: after this much time without writes (a clean pass
 * flushes every leg, which would stall a busy stream)...
 */
export const CLEAN_PASS_DELAY_MS = 1000;
/**
 * ...or at the latest this long after a region drained, so a device that never idles still
 * cleans. A user flush cleans for free: regions drained before it are clean once it succeeds.
 */
export const CLEAN_PASS_MAX_DELAY_MS = 30_000;
/**
 * Regions marked dirty ahead of a sequential write stream: the window starts here and doubles
 * while the stream keeps coming (like readahead), up to DIRTY_AHEAD_MAX_BYTES. After a crash
 * that much more may be resynced; in exchange a stream costs a handful of log flushes.
 */
export const DIRTY_AHEAD_REGIONS = 8;
export const DIRTY_AHEAD_MAX_BYTES = 128 * 2 ** 20;
/** Large writes are handled in batches of this many regions, bounding per-request state. */
const WRITE_BATCH_REGIONS = 256;
/**
 * A resync copy makes its destination current only once a flush of it covers the copy; the
 * destinations are flushed after this many copied regions (and when the pass runs out of work).
 */
const RECOVERY_FLUSH_REGIONS = 64;

export interface MirrorDeviceOptions {
  legs: MirrorLegSpec[];
  lengthBytes: number;
  /** The region log, not yet resumed (core or disk). */
  log: DirtyRegionLog;
  kcopyd: KcopydClient;
  handleErrors?: boolean;
  keepLog?: boolean;
  name?: string;
  logger?: TargetLogger;
  regionsInFlight?: number;
  readBalance?: boolean;
  /**
   * On reload: the mirror this one replaces. Building leaves it untouched and serving; at
   * `preresume()` its log and per-leg sync state (by leg spec) are handed over.
   */
  previous?: MirrorDevice;
}

/** What a mirror hands to its successor on reload. */
export interface MirrorHandover {
  legKeys: string[];
  regionSectors: number;
  regionCount: number;
  /** Per region: bit i set if leg i lacks current data (0 = in sync). */
  stale: Uint16Array;
  /** Per leg: its backend was gone (watchHealth) when the handover happened. */
  offline: boolean[];
  /** Per leg: regions written there that no good flush of that leg covers yet (`FlushWindow`). */
  unflushed: number[][];
  defaultLegKey: string;
  /** Whether the resync was running before the handover (restored if the reload fails). */
  recoveryWasRunning: boolean;
}

/** A write-like request in flight: its byte range, and a promise that settles when it ends. */
interface InFlightWrite {
  start: number;
  end: number;
  done: Promise<void>;
}

type LegOp = (
  leg: MirrorLeg,
  legOffsetBytes: number,
  startInRequest: number,
  lengthBytes: number,
) => Promise<void>;

/**
 * Waits for every promise, then throws the first failure. Reads fill parts of the caller's buffer:
 * failing before the other parts finished would let them write into a buffer the caller has
 * already reused (an NBD server hands its reply buffers to the next request).
 */
async function settleAll(parts: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(parts);
  for (const r of results) if (r.status === "rejected") throw r.reason;
}

/**
 * dm-mirror (dm-raid1) in userspace: every write goes to all legs, a dirty region log records
 * which regions may differ, and kcopyd resyncs out-of-sync regions from a current leg to the
 * others in the background.
 *
 * Beyond the kernel, each region knows WHICH legs are stale (`currency`), so a replaced or
 * reconnected leg is resynced alone, writes to an out-of-sync region still reach every leg that
 * is current there, reads never come from a stale leg, and several regions recover at once.
 *
 * @example
 * ```ts
 * const mirror = await mirrorTarget.create(
 *   ["disk", "2", "mirror.log", "1024", "2", "a.img", "0", "b.img", "0"], 1 << 30, context);
 * await mirror.write(0, data);
 * mirror.status(); // "2 a.img b.img 2048/2048 1 AA 3 disk mirror.log A"
 * ```
 */
export class MirrorDevice implements TargetDevice {
  readonly targetType = "mirror";
  readonly name: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly = false;
  readonly log: DirtyRegionLog;
  readonly regionHash: RegionHash;
  readonly regionSectors: number;
  readonly regionBytes: number;
  readonly regionCount: number;
  readonly handleErrors: boolean;
  readonly keepLog: boolean;
  /** Which legs hold current data in each region: the one owner every path asks. */
  readonly currency: LegCurrency;
  /** The legs, their health and the default leg. */
  private readonly legSet: MirrorLegs;
  private readonly legs: MirrorLeg[];
  private readonly allLegsMask: number;
  /**
   * Regions whose only current leg lost data in a flush the user did not ask for (the mirror's
   * own, or a lost connection): the next user flush fails with EIO, as the next fsync reports a
   * writeback error.
   */
  private lostSinceUserFlush = new Set<number>();
  /** Per region, the loss count (`lossEpoch`) when its only current leg last lost data. */
  private readonly lostAt = new Map<number, number>();
  private lossEpoch = 0;
  /** The table this one replaces, until `preresume()` takes over from it. */
  private previous: MirrorDevice | undefined;
  /** The log was resumed and the mirror is serving (`preresume`). */
  private activated = false;
  /**
   * Taken over from `previous` at preresume but not yet in service (no resume, no I/O): closing
   * now (a reload rolled back) gives the log back to it.
   */
  private handedOverFrom: { previous: MirrorDevice; handover: MirrorHandover } | undefined;
  private readonly logger: TargetLogger | undefined;
  private readonly sharedKcopyd: KcopydClient;
  private ownKcopyd: KcopydClient | undefined;
  private readonly throttle = new KcopydThrottle(100);
  private inSyncFlag = false;
  private readonly eventListeners = new Set<() => void>();
  private regionsInFlightLimit: number;
  private recoveryRunning = false;
  private recoveriesActive = 0;
  private recoveryIdleWaiters: Array<() => void> = [];
  private opsInFlight = 0;
  /** Writes, write-zeroes and discards not yet completed, in arrival order (overlaps wait). */
  private readonly writesInFlight = new Set<InFlightWrite>();
  /**
   * Region -> a leg that lost its place as the only current leg to legs holding an unflushed
   * resync copy (see `legLostUnflushed`), and those legs. It keeps taking writes until their data
   * there is durable; if they lose it first, it is current again (its durable data and every
   * FUA write are the best copy left).
   */
  private readonly demoted = new Map<number, { leg: number; promoted: number }>();
  /** Regions copied by the resync whose destinations were not flushed since (see `finishResyncPass`). */
  private recoveredUnflushed = 0;
  /** The clean pass that makes a finished resync durable, while it runs. */
  private resyncFlush: Promise<void> | null = null;
  /** End offsets of recent writes, to recognise sequential streams. */
  private readonly recentWriteEnds: number[] = new Array(16).fill(-1);
  private recentWriteCursor = 0;
  private dirtyAheadWindow = DIRTY_AHEAD_REGIONS;
  private lastDirtyAheadMs = -Infinity;
  private opsIdleWaiters: Array<() => void> = [];
  private cleanTimer: NodeJS.Timeout | undefined;
  private cleanDueSinceMs = 0;
  private lastWriteMs = -Infinity;
  private closed = false;
  private detached = false;
  private pass: { startedMs: number; totalBytes: number; doneBytes: number } | null = null;
  /** Bytes the resync has written to legs (copied data + zeroed holes), for tests and benchmarks. */
  resyncedBytes = 0;
  /** Regions resynced since creation. */
  resyncedRegions = 0;

  private constructor(options: MirrorDeviceOptions) {
    const { legs, lengthBytes, log } = options;
    if (legs.length < 2 || legs.length > 9)
      throw new RangeError(`a mirror has 2 to 9 legs, got ${legs.length}`);
    if (lengthBytes % SECTOR_SIZE !== 0 || lengthBytes <= 0) {
      throw new RangeError(`mirror length ${lengthBytes} must be a positive whole number of sectors`);
    }
    this.sizeBytes = lengthBytes;
    this.log = log;
    this.regionSectors = log.regionSectors;
    this.regionBytes = log.regionSectors * SECTOR_SIZE;
    this.regionCount = log.regionCount;
    this.handleErrors = !!options.handleErrors;
    this.keepLog = !!options.keepLog;
    this.allLegsMask = (1 << legs.length) - 1;
    this.previous = options.previous;
    this.logicalBlockSize = Math.max(...legs.map((l) => l.dev.logicalBlockSize));
    this.name = options.name ?? `mirror(${legs.map((l) => l.dev.name).join(",")})`;
    this.logger = options.logger;
    this.sharedKcopyd = options.kcopyd;
    this.regionsInFlightLimit = options.regionsInFlight ?? DEFAULT_REGIONS_IN_FLIGHT;
    this.currency = new LegCurrency(log, legs.length);
    this.legSet = new MirrorLegs(legs, lengthBytes, {
      currency: this.currency,
      handleErrors: this.handleErrors,
      keepLog: this.keepLog,
      name: this.name,
      logger: this.logger,
      readBalance: !!options.readBalance,
      onFirstError: () => this.raiseEvent(),
    });
    this.legs = this.legSet.all;
    this.regionHash = new RegionHash(log);
    this.regionHash.onCleanable = () => this.scheduleCleanPass();
    // The mirror flushes the legs itself before it sets clean bits (cleanPass), outside the log.
    log.flushLegs = undefined;
  }

  /**
   * Activates a mirror: resumes the log, carries state over from `previous` (reload), marks
   * legs that are new out of sync, makes that durable, and starts the background resync.
   */
  static async open(options: MirrorDeviceOptions): Promise<MirrorDevice> {
    const mirror = MirrorDevice.build(options);
    if (!options.previous) await mirror.preresume();
    return mirror;
  }

  /**
   * Builds a mirror without touching its log or `previous` (which keeps serving): a reload's new
   * table is built while the old one runs. `preresume()` activates it.
   */
  static build(options: MirrorDeviceOptions): MirrorDevice {
    return new MirrorDevice(options);
  }

  /**
   * dm's preresume: the handover point of a reload, called after the table this one replaces was
   * suspended. The previous mirror lets go of the log (it flushes it, then never writes it again),
   * this one resumes the log, carries the per-leg state over, makes it durable and starts the
   * resync. On failure the previous mirror is re-attached exactly as it was. Idempotent.
   */
  async preresume(): Promise<void> {
    if (this.activated) return;
    if (this.closed) throw new IoError("EIO", this.name, "preresume: mirror is closed");
    const previous = this.previous;
    const handover = previous ? await previous.detachForReload() : null;
    try {
      await this.log.resume();
      this.initState(handover);
      await this.log.flush();
    } catch (err) {
      // The reload failed: the old table stays in charge.
      if (handover) previous!.reattachAfterFailedReload(handover);
      throw err;
    }
    this.previous = undefined;
    this.activated = true;
    if (handover) this.handedOverFrom = { previous: previous!, handover };
    this.watchLegs();
    this.updateInSync();
    const outOfSync = this.regionCount - this.log.syncCount;
    if (!handover && outOfSync > 0) {
      // After a crash: the regions the log still had dirty (a new mirror without nosync: all).
      this.logger?.info(
        { device: this.name, regionsToResync: outOfSync, regions: this.regionCount },
        "mirror regions out of sync at activation: resyncing them",
      );
    }
    this.startRecovery();
  }

  // ---- state helpers ------------------------------------------------------------------------

  private legKey(leg: { dev: BlockDevice; offsetSectors: number }): string {
    return MirrorLegs.key(leg);
  }

  /**
   * Per-leg currency at activation: from the previous table on reload (by leg spec), else from
   * the log (its per-leg area, or for older logs the stale-legs mask). Out-of-sync regions with
   * nothing better known are copied from the default leg, as the kernel does.
   */
  private initState(handover: MirrorHandover | null): void {
    const carry =
      handover && handover.regionSectors === this.regionSectors && handover.regionCount === this.regionCount;
    const oldIndex = handover ? this.legs.map((leg) => handover.legKeys.indexOf(this.legKey(leg))) : [];
    const newLegs = oldIndex.reduce((mask, old, i) => (old < 0 ? mask | (1 << i) : mask), 0);
    if (handover) {
      for (const [i, old] of oldIndex.entries()) {
        if (old < 0) continue;
        if (handover.offline[old]) this.legs[i]!.offline = true;
        // What the old table wrote on this leg and never flushed is at risk here too.
        this.legs[i]!.window.inherit(this.regionsCovering(handover.unflushed[old]!, handover.regionSectors));
      }
    }
    // The leg copied from where nothing better is known: the old default, else a leg the log
    // never called stale (the kernel: leg 0).
    const legacy = this.log.storedLegBits ? 0 : (this.log.storedStaleLegs ?? 0);
    let truth = handover ? this.legs.findIndex((l) => this.legKey(l) === handover.defaultLegKey) : -1;
    if (truth < 0)
      truth = this.legs.findIndex((l) => !(legacy & (1 << l.index)) && !(newLegs & (1 << l.index)));
    if (truth < 0) {
      if (legacy === this.allLegsMask && this.log.sync !== "sync" && !carry) {
        throw new Error(
          `${this.name}: the mirror log says every leg missed writes somewhere, but not where (written by an older udm); reload with the "sync" log argument to resync from leg 0 deliberately`,
        );
      }
      truth = 0;
    }
    this.legSet.defaultLeg = truth;
    const notTruth = this.allLegsMask & ~(1 << truth);
    if (carry) {
      // Map old leg bits to new leg bits by spec; legs without an old counterpart are stale everywhere.
      for (let r = 0; r < this.regionCount; r++) {
        const old = handover.stale[r]!;
        let mask = newLegs;
        if (old)
          for (let i = 0; i < oldIndex.length; i++)
            if (oldIndex[i]! >= 0 && old & (1 << oldIndex[i]!)) mask |= 1 << i;
        if (this.log.sync === "sync" && mask === 0) mask = notTruth; // a full resync was asked for
        this.initRegion(r, mask, notTruth);
      }
    } else {
      const bits = this.log.inSyncBits;
      for (let r = bits.findNext(false, 0); r >= 0; r = bits.findNext(false, r + 1)) {
        const stored = this.currency.storedStaleMask(r);
        if (stored === this.allLegsMask) {
          throw new Error(`${this.name}: the mirror log marks every leg stale in region ${r}; it is corrupt`);
        }
        this.initRegion(r, stored || notTruth, notTruth);
      }
      // Geometry changed on reload: legs that are new get a full resync.
      if (handover && newLegs)
        for (let r = 0; r < this.regionCount; r++) this.initRegion(r, newLegs, notTruth);
    }
    if (newLegs && handover) {
      this.logger?.info(
        { device: this.name, legs: this.legs.filter((l) => newLegs & (1 << l.index)).map((l) => l.dev.name) },
        "new mirror legs: resyncing them",
      );
    }
  }

  /** This table's regions that overlap `regions` of another region size. */
  private regionsCovering(regions: readonly number[], regionSectors: number): number[] {
    if (regionSectors === this.regionSectors) return regions.filter((r) => r < this.regionCount);
    const out = new Set<number>();
    for (const r of regions) {
      const first = Math.floor((r * regionSectors) / this.regionSectors);
      const last = Math.floor(((r + 1) * regionSectors - 1) / this.regionSectors);
      for (let n = first; n <= Math.min(last, this.regionCount - 1); n++) out.add(n);
    }
    return [...out];
  }

  /** Sets a region's stale legs at activation (`mask` 0: in sync); never every leg. */
  private initRegion(region: number, mask: number, notTruth: number): void {
    let stale = mask | this.currency.staleMask(region);
    if (stale === this.allLegsMask) stale = notTruth;
    if (stale === 0) {
      if (!this.log.inSync(region)) {
        // The old mirror knew better (it resynced the region); the clean bit follows a leg flush.
        this.log.setRegionSync(region, true);
        this.regionHash.queueClean(region);
      }
      return;
    }
    this.currency.clearStale(region, this.currency.staleMask(region) & ~stale);
    this.markStale(region, stale);
  }

  /**
   * Records that the legs in `mask` lack current data in `region` (durable at the next log
   * flush). Never marks the region's last current leg: returns the bits it could not mark.
   */
  private markStale(region: number, mask: number): number {
    const current = this.currency.currentMask(region);
    let add = mask & current;
    let refused = 0;
    if (add && add === current) {
      // Keep one current copy: the lowest leg among them (the caller fails the I/O instead).
      refused = add & -add;
      add &= ~refused;
    }
    if (!add) return refused;
    const wasInSync = this.currency.inSync(region);
    for (const leg of this.legs) if (add & (1 << leg.index)) leg.window.forget(region);
    this.currency.addStale(region, add);
    this.log.markRegion(region);
    if (this.log.inSync(region)) this.regionHash.markNosync(region);
    if (wasInSync) {
      this.inSyncFlag = false;
      if (this.pass) this.pass.totalBytes += this.regionLength(region);
    }
    return refused;
  }

  /** A flush of `leg` covered its resync copy of `region`: it is current there now. */
  private copyDurable(leg: MirrorLeg, region: number): void {
    if (!(this.currency.receivingMask(region) & (1 << leg.index))) return;
    this.currency.clearStale(region, 1 << leg.index);
    if (this.currency.inSync(region)) {
      if (this.pass) this.pass.doneBytes += this.regionLength(region);
      this.regionHash.markInSync(region);
    }
  }

  private regionLength(region: number): number {
    return Math.min(this.regionBytes, this.sizeBytes - region * this.regionBytes);
  }

  private regionOf(offsetBytes: number): number {
    return Math.floor(offsetBytes / this.regionBytes);
  }

  private onlineMask(): number {
    return this.legSet.onlineMask();
  }

  /** Legs holding current data in `region`. */
  private currentMask(region: number): number {
    return this.currency.currentMask(region);
  }

  private updateInSync(): void {
    if (this.log.syncCount !== this.regionCount) return;
    if (!this.inSyncFlag) {
      this.inSyncFlag = true;
      this.raiseEvent();
      this.pass = null;
      this.legSet.resetErrors();
    }
  }

  /** dm_table_event listeners (`udm wait`): a leg's first error of a kind, the end of a resync. */
  onEvent(listener: () => void): () => void {
    this.eventListeners.add(listener);
    return () => this.eventListeners.delete(listener);
  }

  private raiseEvent(): void {
    for (const listener of this.eventListeners) listener();
  }

  private failLeg(leg: MirrorLeg, kind: LegErrorKind, err?: unknown): void {
    this.legSet.fail(leg, kind, err);
  }

  // ---- status and table ----------------------------------------------------------------------

  /** Health character of a leg, most severe first: F, D, S, R, U, A. */
  legHealth(index: number): string {
    return this.legSet.health(index);
  }

  table(): string {
    const legs = this.legs.map((l) => `${l.dev.name} ${l.offsetSectors}`).join(" ");
    const features = [this.handleErrors && "handle_errors", this.keepLog && "keep_log"].filter(Boolean);
    const tail = features.length ? ` ${features.length} ${features.join(" ")}` : "";
    return `${this.log.tableArgs()} ${this.legs.length} ${legs}${tail}`;
  }

  status(): string {
    const names = this.legs.map((l) => l.dev.name).join(" ");
    const health = this.legs.map((l) => this.legHealth(l.index)).join("");
    return `${this.legs.length} ${names} ${this.log.syncCount}/${this.regionCount} 1 ${health} ${this.log.statusArgs()}`;
  }

  /** Index of the leg reads prefer and resync copies from. */
  get defaultLegIndex(): number {
    return this.legSet.defaultLeg;
  }

  get regionsInFlight(): number {
    return this.regionsInFlightLimit;
  }

  progress(): TargetProgress | null {
    if (this.log.syncCount === this.regionCount && this.recoveriesActive === 0) return null;
    const pass = this.pass ?? this.startPass();
    const remaining = Math.max(0, pass.totalBytes - pass.doneBytes);
    const elapsed = (performance.now() - pass.startedMs) / 1000;
    const out: TargetProgress = {
      operation: "resync",
      doneBytes: pass.doneBytes,
      totalBytes: pass.totalBytes,
    };
    if (pass.doneBytes > 0 && elapsed > 0) out.etaSeconds = remaining / (pass.doneBytes / elapsed);
    return out;
  }

  private startPass(): { startedMs: number; totalBytes: number; doneBytes: number } {
    let total = 0;
    const bits = this.log.inSyncBits;
    for (let r = bits.findNext(false, 0); r >= 0; r = bits.findNext(false, r + 1))
      total += this.regionLength(r);
    this.pass = { startedMs: performance.now(), totalBytes: total, doneBytes: 0 };
    return this.pass;
  }

  statusContexts(): StatusContext[] {
    return [
      {
        name: "mirror:out-of-sync",
        description: "flag 1: the region is out of sync (legs may differ until resynced)",
        query: async (offsetBytes, lengthBytes) => {
          checkRange(this, offsetBytes, lengthBytes);
          const out: Array<{ lengthBytes: number; flags: number }> = [];
          const bits = this.log.inSyncBits;
          const end = offsetBytes + lengthBytes;
          for (let pos = offsetBytes; pos < end; ) {
            const r = this.regionOf(pos);
            const flags = bits.test(r) ? 0 : 1;
            // Jump to the next region whose state differs (whole bytes of the bitmap at a time).
            const next = bits.findNext(flags === 1, r + 1);
            const stop = Math.min(end, next < 0 ? end : next * this.regionBytes);
            out.push({ lengthBytes: stop - pos, flags });
            pos = stop;
          }
          return out;
        },
      },
    ];
  }

  /**
   * `dmsetup message`: `resync` (full resync of every leg), `regions_in_flight N`,
   * `read_balance on|off`, `resync_throttle PERCENT` (share of time resync I/O may be busy).
   */
  async message(argv: string[]): Promise<string | undefined> {
    const [cmd, ...rest] = argv;
    switch (cmd) {
      case "resync": {
        if (rest.length) throw new RangeError(`mirror message "resync" takes no arguments`);
        this.checkActive("resync");
        const notDefault = this.allLegsMask & ~(1 << this.legSet.defaultLeg);
        for (let r = 0; r < this.regionCount; r++) {
          if (this.currency.inSync(r)) this.markStale(r, notDefault);
        }
        await this.log.flush();
        this.log.restartResyncSearch();
        this.kickRecovery();
        return undefined;
      }
      case "regions_in_flight": {
        const n = Number(rest[0]);
        if (rest.length !== 1 || !Number.isInteger(n) || n < 1 || n > MAX_REGIONS_IN_FLIGHT) {
          throw new RangeError(
            `usage: regions_in_flight <1..${MAX_REGIONS_IN_FLIGHT}>, got "${rest.join(" ")}"`,
          );
        }
        this.regionsInFlightLimit = n;
        this.kickRecovery();
        return undefined;
      }
      case "read_balance": {
        if (rest.length !== 1 || (rest[0] !== "on" && rest[0] !== "off")) {
          throw new RangeError(`usage: read_balance on|off, got "${rest.join(" ")}"`);
        }
        this.legSet.readBalance = rest[0] === "on";
        return undefined;
      }
      case "resync_throttle": {
        const p = Number(rest[0]);
        if (rest.length !== 1 || !Number.isInteger(p) || p < 1 || p > 100) {
          throw new RangeError(`usage: resync_throttle <1..100> (percent), got "${rest.join(" ")}"`);
        }
        this.throttle.percent = p;
        return undefined;
      }
      default:
        throw new RangeError(
          `unknown mirror message "${argv.join(" ")}" (expected resync, regions_in_flight N, read_balance on|off, resync_throttle PERCENT)`,
        );
    }
  }

  // ---- reads -------------------------------------------------------------------------------

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    if (target.length === 0) return;
    const end = offsetBytes + target.length;
    const runs: Array<{ start: number; end: number; leg: number }> = [];
    const balanceLeg = this.legSet.nextBalance();
    for (let pos = offsetBytes; pos < end; ) {
      const r = this.regionOf(pos);
      const stop = Math.min(end, (r + 1) * this.regionBytes);
      const leg = this.chooseReadLeg(r, 0, balanceLeg);
      const last = runs[runs.length - 1];
      if (last && last.leg === leg) last.end = stop;
      else runs.push({ start: pos, end: stop, leg });
      pos = stop;
    }
    await settleAll(runs.map((run) => this.readRun(run.start, run.end, run.leg, offsetBytes, target)));
  }

  private chooseReadLeg(region: number, excluded: number, balance: number): number {
    return this.legSet.chooseReadLeg(region, excluded, balance);
  }

  private async readRun(
    start: number,
    end: number,
    legIndex: number,
    base: number,
    target: Buffer,
    excluded = 0,
  ): Promise<void> {
    const leg = this.legs[legIndex];
    if (!leg)
      throw new IoError("EIO", this.name, `read at ${start}+${end - start}: no current leg to read from`);
    try {
      await leg.dev.readInto(leg.offsetBytes + start, target.subarray(start - base, end - base));
      return;
    } catch (err) {
      this.failLeg(leg, "read", err);
    }
    // Retry each region on another current leg; `excluded` grows, so this ends.
    const tried = excluded | (1 << legIndex);
    const parts: Promise<void>[] = [];
    for (let r = this.regionOf(start); r <= this.regionOf(end - 1); r++) {
      const s = Math.max(start, r * this.regionBytes);
      const e = Math.min(end, (r + 1) * this.regionBytes);
      const next = this.chooseReadLeg(r, tried, 0);
      if (next < 0) throw new IoError("EIO", this.name, `read at ${s}+${e - s} failed on every current leg`);
      parts.push(this.readRun(s, e, next, base, target, tried));
    }
    await settleAll(parts);
  }

  // ---- writes ------------------------------------------------------------------------------

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length);
    const fua = options?.fua ? { fua: true } : undefined;
    await this.mirroredWrite(offsetBytes, data.length, (leg, legOffset, start, length) =>
      leg.dev.write(legOffset, data.subarray(start, start + length), fua),
    );
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    const opts: WriteZeroesOptions = {};
    if (options?.fua) opts.fua = true;
    if (options?.mayTrim) opts.mayTrim = true;
    await this.mirroredWrite(offsetBytes, lengthBytes, (leg, legOffset, _start, length) =>
      leg.dev.writeZeroes(legOffset, length, opts),
    );
  }

  /** Discards become zeroing that may trim, so legs stay identical whatever each device does with a discard. */
  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    const opts: WriteZeroesOptions = { mayTrim: true };
    if (options?.fua) opts.fua = true;
    await this.mirroredWrite(offsetBytes, lengthBytes, (leg, legOffset, _start, length) =>
      leg.dev.writeZeroes(legOffset, length, opts),
    );
  }

  private checkActive(what: string): void {
    if (this.closed) throw new IoError("EIO", this.name, `${what}: mirror is closed`);
    if (this.detached) throw new IoError("EIO", this.name, `${what}: mirror was replaced by a reload`);
    if (!this.activated) throw new IoError("EIO", this.name, `${what}: mirror is not active yet (preresume)`);
    this.handedOverFrom = undefined; // in service: a reload can no longer be rolled back to the old table
  }

  private async mirroredWrite(offsetBytes: number, lengthBytes: number, op: LegOp): Promise<void> {
    this.checkActive("write");
    if (lengthBytes === 0) return;
    this.opsInFlight++;
    this.lastWriteMs = performance.now();
    const end = offsetBytes + lengthBytes;
    // Overlapping writes in flight together could reach the legs in different orders (each leg
    // is its own queue), leaving them different in a region the log calls in sync. A write waits
    // for the earlier writes it overlaps, so every leg sees overlapping writes in the same order.
    let finished: () => void = () => undefined;
    const mine: InFlightWrite = {
      start: offsetBytes,
      end,
      done: new Promise<void>((resolve) => {
        finished = resolve;
      }),
    };
    const earlier: Promise<void>[] = [];
    for (const w of this.writesInFlight) if (w.start < end && offsetBytes < w.end) earlier.push(w.done);
    this.writesInFlight.add(mine);
    try {
      if (earlier.length) await Promise.all(earlier);
      const batchBytes = WRITE_BATCH_REGIONS * this.regionBytes;
      for (let pos = offsetBytes; pos < end; ) {
        const stop = Math.min(
          end,
          (this.regionOf(pos) + WRITE_BATCH_REGIONS) * this.regionBytes,
          pos + batchBytes,
        );
        await this.writeBatch(pos, stop, offsetBytes, op);
        pos = stop;
      }
    } finally {
      this.writesInFlight.delete(mine);
      finished();
      this.opsDone();
    }
  }

  private async writeBatch(start: number, end: number, base: number, op: LegOp): Promise<void> {
    const first = this.regionOf(start);
    const last = this.regionOf(end - 1);
    // Writes to a RECOVERING region wait for its recovery (dm_rh_delay); re-check after each wait.
    for (;;) {
      let waitFor = -1;
      for (let r = first; r <= last; r++) {
        if (this.regionHash.isRecovering(r)) {
          waitFor = r;
          break;
        }
      }
      if (waitFor < 0) break;
      await this.regionHash.waitRecovered(waitFor);
    }
    // Classify and count pending synchronously: recovery cannot slip in between.
    const epoch = this.lossEpoch;
    const online = this.onlineMask();
    const targets: number[] = [];
    for (let r = first; r <= last; r++) {
      this.regionHash.incPending(r);
      // Legs that are current but unreachable miss this write: they become stale first.
      this.markStale(r, this.currentMask(r) & ~online);
      // Current legs and those catching up after a resync copy; none if no current leg is reachable.
      targets.push(this.currentMask(r) & online ? this.currency.writeMask(r) & online : 0);
    }
    // A sequential stream (this write continues a recent one): mark the next regions dirty in
    // the same log write (a window that grows while the stream lasts).
    const sequential = this.recentWriteEnds.includes(start);
    this.recentWriteEnds[this.recentWriteCursor++ % this.recentWriteEnds.length] = end;
    if (sequential && last + 1 < this.regionCount && this.log.isClean(last + 1)) {
      const now = performance.now();
      const maxWindow = Math.max(DIRTY_AHEAD_REGIONS, Math.floor(DIRTY_AHEAD_MAX_BYTES / this.regionBytes));
      this.dirtyAheadWindow =
        now - this.lastDirtyAheadMs < 1000
          ? Math.min(2 * this.dirtyAheadWindow, maxWindow)
          : DIRTY_AHEAD_REGIONS;
      this.lastDirtyAheadMs = now;
      for (let r = last + 1; r <= Math.min(this.regionCount - 1, last + this.dirtyAheadWindow); r++) {
        if (!this.regionHash.dirtyAhead(r)) break;
      }
    }
    const mark = this.log.dirtyMark;
    try {
      try {
        if (!this.log.isDirtyDurable(mark)) await this.log.waitDirtyDurable(mark);
      } catch (err) {
        this.logger?.error({ device: this.name, err: (err as Error).message }, "mirror log write failed");
        if (this.handleErrors) {
          throw new IoError(
            "EIO",
            this.name,
            `write at ${start}+${end - start}: the mirror log cannot be written`,
          );
        }
        // Without handle_errors the kernel writes on without a durable dirty bit.
      }
      // Consecutive regions with the same target legs become one write per leg.
      const runs: Array<{ first: number; last: number; mask: number }> = [];
      for (let r = first; r <= last; r++) {
        const mask = targets[r - first]!;
        const prev = runs[runs.length - 1];
        if (prev && prev.mask === mask) prev.last = r;
        else runs.push({ first: r, last: r, mask });
      }
      const failures: string[] = [];
      const missed = await Promise.all(runs.map((run) => this.writeRun(run, start, end, base, op, failures)));
      if (missed.some(Boolean)) {
        // A leg missed this write: which legs are stale must survive a crash before we acknowledge.
        try {
          await this.log.waitDirtyDurable(this.log.dirtyMark);
        } catch (err) {
          this.logger?.error({ device: this.name, err: (err as Error).message }, "mirror log write failed");
          // keep_log: the kernel fails a write it cannot record (do_failures with log_failure); with
          // handle_errors it would hold it: an unrecorded stale leg is never acknowledged here.
          if (this.keepLog || this.handleErrors)
            failures.push(`the mirror log cannot record the failed leg: ${(err as Error).message}`);
        }
      }
      for (let r = first; r <= last && this.lossEpoch > epoch; r++) {
        // Its only current leg lost unflushed data while this was in flight: it may be gone.
        if ((this.lostAt.get(r) ?? 0) > epoch)
          failures.push(`a flush failure lost region ${r} on its only current leg`);
      }
      if (failures.length) {
        throw new IoError("EIO", this.name, `write at ${start}+${end - start} failed: ${failures[0]}`);
      }
    } finally {
      for (let r = first; r <= last; r++) this.regionHash.decPending(r);
    }
  }

  private async writeRun(
    run: { first: number; last: number; mask: number },
    start: number,
    end: number,
    base: number,
    op: LegOp,
    failures: string[],
  ): Promise<boolean> {
    const s = Math.max(start, run.first * this.regionBytes);
    const e = Math.min(end, (run.last + 1) * this.regionBytes);
    if (!run.mask) {
      failures.push(`no reachable leg holds current data for regions ${run.first}..${run.last}`);
      return false;
    }
    const legs = this.legs.filter((l) => run.mask & (1 << l.index));
    // In every flush window from now on: a flush issued before this completes does not cover it.
    for (const leg of legs) for (let r = run.first; r <= run.last; r++) leg.window.writeStarted(r);
    const results = await Promise.all(
      legs.map((leg) =>
        op(leg, leg.offsetBytes + s, s - base, e - s).then(
          () => null,
          (err: unknown) => err ?? new Error("write failed"),
        ),
      ),
    );
    for (const leg of legs) for (let r = run.first; r <= run.last; r++) leg.window.writeEnded(r);
    let failedMask = 0;
    let firstError = "";
    results.forEach((err, i) => {
      if (err) {
        failedMask |= 1 << legs[i]!.index;
        firstError ||= `${legs[i]!.dev.name}: ${(err as Error)?.message ?? err}`;
        this.failLeg(legs[i]!, "write", err);
      }
    });
    if (!failedMask) return false;
    let noCurrentCopy = false;
    for (let r = run.first; r <= run.last; r++) {
      // A leg catching up after a copy that failed this write keeps no trustworthy copy.
      this.currency.stopReceiving(r, failedMask);
      for (const leg of legs) if (failedMask & (1 << leg.index)) leg.window.forgetCopy(r);
      // Every current leg failed: the write fails, the legs keep one current copy (they may differ).
      if (this.markStale(r, failedMask)) {
        noCurrentCopy = true;
        // Legs catching up took the write the current leg missed: their copy differs now.
        const diverged = this.currency.receivingMask(r);
        this.currency.stopReceiving(r, diverged);
        for (const leg of legs) if (diverged & (1 << leg.index)) leg.window.forgetCopy(r);
      }
    }
    if (noCurrentCopy) failures.push(`no current leg took it (${firstError})`);
    // Otherwise, with or without handle_errors, the write is acknowledged once the legs that missed
    // it are recorded stale in its regions (writeBatch waits for that log write; with handle_errors
    // a log that cannot record it fails the write). The kernel holds such a write with handle_errors
    // (hold_bio) until dmeventd takes the failed leg out of the mirror and requeues it; udm does
    // what that repair does, per region: the leg that failed is out of date there and is resynced.
    this.scheduleCleanPass();
    return true;
  }

  async flush(): Promise<void> {
    if (this.closed) throw new IoError("EIO", this.name, "flush: mirror is closed");
    if (!this.activated || this.detached) {
      // Replaced by a reload (or not yet in charge): the legs can still be flushed, the log is not ours.
      const results = await Promise.allSettled(this.legs.filter((l) => !l.offline).map((l) => l.dev.flush()));
      if (!results.some((r) => r.status === "fulfilled"))
        throw new IoError("EIO", this.name, "flush failed on every leg");
      return;
    }
    const mark = this.log.dirtyMark;
    // A leg losing a region's only current copy while this flush is in flight (another user
    // flush's leg flush, the clean pass's, a dropped connection) may take writes this flush covers.
    const epoch = this.lossEpoch;
    const candidates = this.regionHash.cleanCandidates();
    const earlierLost = this.lostSinceUserFlush;
    this.lostSinceUserFlush = new Set();
    const { flushed, lost } = await this.flushLegs("write");
    if (this.lossEpoch > epoch) {
      for (const [r, at] of this.lostAt) if (at > epoch && !lost.includes(r)) lost.push(r);
    }
    for (const r of lost) this.lostSinceUserFlush.delete(r); // reported by this flush
    lost.push(...earlierLost);
    if (!flushed) throw new IoError("EIO", this.name, "flush failed on every leg");
    // Regions drained before this flush are durable on every leg: clean (written with the next log write).
    if (candidates.length) this.regionHash.commitClean(candidates);
    // A leg that failed its flush is now stale: that must be durable before the flush completes.
    if (this.log.dirtyMark !== mark) {
      try {
        await this.log.waitDirtyDurable(this.log.dirtyMark);
      } catch (err) {
        this.logger?.error({ device: this.name, err: (err as Error).message }, "mirror log write failed");
        // As for writes: without handle_errors the kernel completes the flush once the legs are
        // flushed (the log shows D and the mirror no longer claims sync).
        if (this.handleErrors) throw err;
      }
    }
    if (lost.length) {
      // do_failures: no valid mirror holds these regions durably.
      throw new IoError(
        "EIO",
        this.name,
        `flush failed: no leg holds a durable current copy of region(s) ${lost.slice(0, 8).join(", ")}${lost.length > 8 ? ", ..." : ""}`,
      );
    }
  }

  /**
   * PREFLUSH to every reachable leg, accounted by generation (`FlushWindow`). A leg whose flush
   * fails may have lost what it took since its last good flush: it becomes stale in those
   * regions, and resync copies to it are not trusted. `kind` is the error it is failed with
   * (`write` for a user flush, `D` as write_callback; `flush` for the mirror's own, `F`).
   * Returns whether any leg flushed, and the regions left without a durable current copy.
   */
  private async flushLegs(kind: LegErrorKind): Promise<{ flushed: boolean; lost: number[] }> {
    const legs = this.legs.filter((l) => !l.offline);
    const lost: number[] = [];
    const results = await Promise.all(
      legs.map((leg) => {
        const run = leg.flushChain.then(() => {
          const k = leg.window.beginFlush();
          return leg.dev.flush().then(
            () => {
              for (const region of leg.window.flushSucceeded(k)) this.copyDurable(leg, region);
              this.promotionsDurable(leg);
              return true;
            },
            (err: unknown) => {
              this.failLeg(leg, kind, err ?? new Error("flush failed"));
              const gone = this.legLostUnflushed(leg);
              this.noteLost(gone); // now: flushes and writes in flight must see it
              lost.push(...gone);
              return false;
            },
          );
        });
        leg.flushChain = run;
        return run;
      }),
    );
    return { flushed: results.some(Boolean), lost };
  }

  /**
   * `leg` may have lost everything since its last good flush (failed flush, lost connection):
   * stale there wherever another leg is current. Returns the regions where it held the only
   * current copy (the caller fails the flush: no durable current copy).
   */
  private legLostUnflushed(leg: MirrorLeg): number[] {
    const { written, copies } = leg.window.lost();
    const bit = 1 << leg.index;
    for (const r of copies) this.currency.stopReceiving(r, bit);
    const lost = new Set<number>();
    for (const r of written) {
      if (!(this.currentMask(r) & bit)) {
        leg.window.forget(r);
        continue;
      }
      const receiving = this.currency.receivingMask(r) & ~bit;
      const promote = receiving !== 0 && this.currentMask(r) === bit;
      // This leg was itself promoted here and its copy never became durable: its durable data is
      // older than the leg it replaced, which took every write since and is current again below.
      const undoing = (this.demoted.get(r)?.promoted ?? 0) & bit;
      this.demoted.delete(r);
      if (promote) {
        // It held the only current copy, but legs that took the resync copy and every write since
        // hold the data (not yet durable): they become current, and this leg stale.
        for (const other of this.legs) if (receiving & (1 << other.index)) other.window.copyToWritten(r);
        this.currency.clearStale(r, receiving);
        lost.add(r); // durable nowhere yet
      }
      if (this.markStale(r, bit)) lost.add(r);
      else if (promote && !undoing) {
        // Until the promoted legs' data is durable this leg is the fallback: it keeps what it had
        // durably (FUA writes included) and takes every write from now on.
        this.currency.startReceiving(r, bit);
        this.demoted.set(r, { leg: leg.index, promoted: receiving });
      }
    }
    if (written.length) this.scheduleCleanPass();
    return [...lost];
  }

  /**
   * `leg` flushed: where it was promoted over a leg that lost its cache and now holds the data
   * durably, that leg is no longer needed as a fallback: it stops taking writes and is resynced.
   */
  private promotionsDurable(leg: MirrorLeg): void {
    let released = false;
    for (const [r, d] of this.demoted) {
      if (!(d.promoted & (1 << leg.index)) || leg.window.holds(r)) continue;
      if (!(this.currentMask(r) & (1 << leg.index))) continue; // it lost the region meanwhile
      this.demoted.delete(r);
      this.currency.stopReceiving(r, 1 << d.leg);
      released = true;
    }
    if (released) {
      this.log.restartResyncSearch();
      this.kickRecovery();
    }
  }

  /** Regions whose only current leg lost data: a user flush and writes in flight there fail. */
  private noteLost(regions: number[]): void {
    for (const r of regions) {
      this.lostSinceUserFlush.add(r);
      this.lostAt.set(r, ++this.lossEpoch);
    }
  }

  /**
   * Allocation of the range, asked of a leg that holds current data in each region (a region
   * where no reachable leg does is reported as data: never a hole that is not one).
   */
  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    if (lengthBytes === 0) return [];
    const end = offsetBytes + lengthBytes;
    const runs: Array<{ start: number; end: number; leg: number }> = [];
    for (let pos = offsetBytes; pos < end; ) {
      const r = this.regionOf(pos);
      const stop = Math.min(end, (r + 1) * this.regionBytes);
      const leg = this.chooseReadLeg(r, 0, 0);
      const last = runs[runs.length - 1];
      if (last && last.leg === leg) last.end = stop;
      else runs.push({ start: pos, end: stop, leg });
      pos = stop;
    }
    const parts = await Promise.all(
      runs.map(async (run): Promise<Extent[]> => {
        const leg = this.legs[run.leg];
        if (!leg) return [{ offsetBytes: run.start, lengthBytes: run.end - run.start, kind: "data" }];
        try {
          const inner = await leg.dev.extents(leg.offsetBytes + run.start, run.end - run.start);
          return inner.map((e) => ({ ...e, offsetBytes: e.offsetBytes - leg.offsetBytes }));
        } catch {
          // Advisory: a leg that cannot tell means data.
          return [{ offsetBytes: run.start, lengthBytes: run.end - run.start, kind: "data" }];
        }
      }),
    );
    return mergeExtents(parts.flat());
  }

  // ---- lazy cleaning -----------------------------------------------------------------------

  private scheduleCleanPass(): void {
    if (this.cleanTimer || this.closed || this.detached) return;
    this.cleanDueSinceMs = performance.now();
    const arm = (ms: number) => {
      this.cleanTimer = setTimeout(() => {
        const now = performance.now();
        const idleFor = now - this.lastWriteMs;
        if (idleFor < CLEAN_PASS_DELAY_MS && now - this.cleanDueSinceMs < CLEAN_PASS_MAX_DELAY_MS) {
          arm(CLEAN_PASS_DELAY_MS - idleFor); // still busy: wait for a pause
          return;
        }
        this.cleanTimer = undefined;
        void this.cleanPass().catch((err: unknown) =>
          this.logger?.error({ device: this.name, err: (err as Error).message }, "mirror log flush failed"),
        );
      }, ms);
      this.cleanTimer.unref?.();
    };
    arm(CLEAN_PASS_DELAY_MS);
  }

  /** Marks drained regions clean and writes the log (flushing the legs first). */
  /** `flushLegs`: flush the legs even with nothing to clean (suspend: settle every flush window). */
  private async cleanPass(flushLegs = false): Promise<void> {
    const candidates = this.regionHash.cleanCandidates();
    if (candidates.length || this.recoveredUnflushed > 0 || flushLegs) {
      // Data first: only regions whose writes are flushed on every leg may be declared clean.
      this.recoveredUnflushed = 0;
      const { lost } = await this.flushLegs("flush");
      if (lost.length) {
        this.logger?.error(
          { device: this.name, regions: lost.slice(0, 16) },
          "leg flush failed where it held the only current copy",
        );
      }
      // A leg whose flush failed is stale where it wrote; those regions left the clean list.
      this.regionHash.commitClean(candidates);
    }
    await this.log.flush();
  }

  // ---- recovery ----------------------------------------------------------------------------

  private startRecovery(): void {
    this.recoveryRunning = true;
    this.log.restartResyncSearch();
    this.kickRecovery();
  }

  private async stopRecovery(): Promise<void> {
    this.recoveryRunning = false;
    if (this.recoveriesActive === 0) return;
    await new Promise<void>((resolve) => this.recoveryIdleWaiters.push(resolve));
  }

  private kickRecovery(): void {
    while (
      this.recoveryRunning &&
      !this.closed &&
      !this.detached &&
      this.recoveriesActive < this.regionsInFlightLimit
    ) {
      const region = this.log.nextResyncWork();
      if (region < 0) break;
      if (!this.pass) this.startPass();
      this.recoveriesActive++;
      void this.recoverRegion(region)
        .catch((err: unknown) =>
          this.logger?.error(
            { device: this.name, region, err: (err as Error).message },
            "region recovery failed",
          ),
        )
        .finally(() => {
          this.recoveriesActive--;
          if (this.recoveriesActive === 0) {
            const waiters = this.recoveryIdleWaiters;
            this.recoveryIdleWaiters = [];
            for (const wake of waiters) wake();
          }
          if (this.recoveredUnflushed >= RECOVERY_FLUSH_REGIONS) this.finishResyncPass();
          this.kickRecovery();
        });
    }
    if (this.recoveriesActive === 0) {
      this.updateInSync();
      if (this.log.resyncSearchExhausted) this.finishResyncPass();
    }
  }

  /**
   * Makes the resync's copies durable: flushes the legs, which turns the copied regions current
   * on their destinations (in sync), then cleans them with a second pass. Runs when the resync
   * runs out of work and every RECOVERY_FLUSH_REGIONS copies. Until then a destination is not
   * read from and stays stale in the log, so a crash or a failed flush never trusts a copy that
   * may still sit in a volatile cache. `waitForSync` waits for it.
   */
  private finishResyncPass(): void {
    if (this.recoveredUnflushed === 0 || this.resyncFlush || this.closed || this.detached) return;
    const run = (async () => {
      await this.cleanPass();
      await this.cleanPass();
    })()
      .catch((err: unknown) =>
        this.logger?.error({ device: this.name, err: (err as Error).message }, "mirror log flush failed"),
      )
      .finally(() => {
        if (this.resyncFlush === run) this.resyncFlush = null;
        this.updateInSync();
        // Copies made while this ran wait for the next flush. (Copies whose flush failed stay
        // out of sync until the leg comes back or a `resync` message, like a failed copy.)
        if (this.recoveredUnflushed > 0 && this.recoveriesActive === 0) this.finishResyncPass();
      });
    this.resyncFlush = run;
  }

  private recoverySource(region: number): MirrorLeg | undefined {
    return this.legSet.recoverySource(region);
  }

  /** Stale legs of `region` that are reachable and do not hold a copy yet. */
  private recoveryDestinations(region: number): number {
    return this.currency.staleMask(region) & ~this.currency.receivingMask(region) & this.onlineMask();
  }

  private async recoverRegion(region: number): Promise<void> {
    if (this.currency.inSync(region)) {
      // No leg lacks anything: nothing to copy.
      this.log.setRegionSync(region, true);
      this.regionHash.queueClean(region);
      return;
    }
    if (!this.recoverySource(region) || !this.recoveryDestinations(region)) {
      // Nothing reachable to copy from or to (the stale leg is offline, or its copy awaits a flush).
      this.log.abandonResyncWork(region);
      return;
    }
    await this.regionHash.beginRecovery(region);
    try {
      const source = this.recoverySource(region);
      const destMask = this.recoveryDestinations(region) & ~(source ? 1 << source.index : 0);
      if (!source || !destMask) return;
      const dests = this.legs.filter((l) => destMask & (1 << l.index));
      const sector = region * this.regionSectors;
      const count = this.regionLength(region) >> SECTOR_SHIFT;
      const kc = this.kcopydClient();
      const { readErr, writeErr } = await kc.copyAsync(
        { dev: source.dev, sector: source.offsetSectors + sector, count },
        dests.map((d) => ({ dev: d.dev, sector: d.offsetSectors + sector, count })),
        KcopydFlags.SKIP_HOLES,
      );
      if (readErr) this.failLeg(source, "sync");
      dests.forEach((d, i) => {
        if (writeErr & (1 << i)) this.failLeg(d, "sync");
      });
      if (readErr) return;
      let copied = 0;
      dests.forEach((d, i) => {
        if (writeErr & (1 << i)) return;
        // Current once a flush of it covers the copy; until then it takes writes, not reads.
        this.currency.startReceiving(region, 1 << d.index);
        d.window.copyDone(region);
        copied++;
      });
      if (copied) {
        this.resyncedBytes += count * SECTOR_SIZE * copied;
        this.resyncedRegions++;
        this.recoveredUnflushed++;
      }
    } finally {
      // Out of sync until the copies are flushed (or for good, if the copy failed: the kernel
      // without handle_errors would call it in sync; we never report a divergent region as in sync).
      this.log.setRegionSync(region, this.currency.inSync(region));
      this.regionHash.endRecovery(region);
      this.scheduleCleanPass();
    }
  }

  private kcopydClient(): KcopydClient {
    if (this.throttle.percent >= 100) return this.sharedKcopyd;
    this.ownKcopyd ??= new KcopydClient({
      throttle: this.throttle,
      subJobSectors: this.sharedKcopyd.subJobSectors,
    });
    return this.ownKcopyd;
  }

  // ---- remote legs -------------------------------------------------------------------------

  private watchLegs(): void {
    for (const leg of this.legs) {
      if (!leg.dev.watchHealth) continue;
      leg.unwatch = leg.dev.watchHealth((healthy) => {
        if (this.closed || this.detached) return;
        if (!healthy && !leg.offline) {
          leg.offline = true;
          this.failLeg(leg, "write", new Error("connection lost"));
          // Writes it took since its last good flush may be gone with the connection.
          const lost = this.legLostUnflushed(leg);
          this.noteLost(lost);
          if (lost.length) {
            this.logger?.error(
              { device: this.name, leg: leg.dev.name, regions: lost.slice(0, 16) },
              "leg lost with the only current copy of some regions",
            );
          }
          void this.log
            .flush()
            .catch((err: unknown) =>
              this.logger?.error(
                { device: this.name, err: (err as Error).message },
                "mirror log write failed",
              ),
            );
        } else if (healthy) {
          // Back (or reporting healthy after errors while we thought it up): resync what it lacks.
          leg.offline = false;
          this.logger?.info({ device: this.name, leg: leg.dev.name }, "mirror leg back: resyncing it");
          this.log.restartResyncSearch();
          this.kickRecovery();
        }
      });
    }
  }

  // ---- life cycle --------------------------------------------------------------------------

  private opsDone(): void {
    if (--this.opsInFlight === 0) {
      const waiters = this.opsIdleWaiters;
      this.opsIdleWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  private async waitOpsIdle(): Promise<void> {
    if (this.opsInFlight === 0) return;
    await new Promise<void>((resolve) => this.opsIdleWaiters.push(resolve));
  }

  /** Stops the resync (in-flight regions finish) and writes the log with every drained region clean. */
  async suspend(): Promise<void> {
    if (!this.activated || this.detached) return;
    await this.stopRecovery();
    await this.settle();
  }

  /** Restarts the resync from the first out-of-sync region. */
  async resume(): Promise<void> {
    if (this.closed || this.detached || !this.activated) return;
    this.handedOverFrom = undefined;
    this.startRecovery();
  }

  /**
   * Waits for in-flight writes, flushes every leg (what a leg took since its last flush is then
   * durable, or the leg is stale there; a leg whose flush failed where it holds the only current
   * copy keeps those regions in its flush window, which a reload hands to the next table), marks
   * drained regions clean and flushes the log.
   */
  async settle(): Promise<void> {
    await this.waitOpsIdle();
    if (!this.activated || this.detached) return;
    if (this.cleanTimer) {
      clearTimeout(this.cleanTimer);
      this.cleanTimer = undefined;
    }
    await this.resyncFlush;
    await this.cleanPass(true);
  }

  /** Resolves once nothing is out of sync that the resync can reach (test and CLI helper). */
  async waitForSync(): Promise<void> {
    for (;;) {
      if (this.log.syncCount === this.regionCount && this.recoveriesActive === 0) {
        // In sync, and the copies are durable on their legs (the pass's flush and clean bits).
        if (!this.resyncFlush) return;
        await this.resyncFlush; // a leg whose flush failed is stale again: look again
        continue;
      }
      if (this.resyncFlush) {
        await this.resyncFlush; // copies become current when their flush is done
        continue;
      }
      if (!this.recoveryRunning) throw new Error(`${this.name}: resync is suspended`);
      if (this.recoveriesActive === 0 && this.log.resyncSearchExhausted && this.recoveredUnflushed === 0) {
        throw new Error(
          `${this.name}: ${this.regionCount - this.log.syncCount} region(s) cannot be resynced now (failed or unreachable legs)`,
        );
      }
      await new Promise<void>((resolve) => {
        if (this.recoveriesActive === 0) setImmediate(resolve);
        else this.recoveryIdleWaiters.push(resolve);
      });
    }
  }

  /**
   * Hands this mirror's per-leg state to a reloaded table and retires this one: recovery stops,
   * in-flight writes drain, the log is flushed, and further writes are refused (the new table owns
   * the log device now). Called by the new table's `preresume()`, after the suspend.
   */
  async detachForReload(): Promise<MirrorHandover> {
    if (this.detached || !this.activated) throw new Error(`${this.name}: not the active table`);
    const recoveryWasRunning = this.recoveryRunning;
    await this.suspend();
    this.detached = true;
    for (const leg of this.legs) {
      leg.unwatch?.();
      leg.unwatch = undefined;
    }
    return {
      legKeys: this.legs.map((l) => this.legKey(l)),
      regionSectors: this.regionSectors,
      regionCount: this.regionCount,
      stale: Uint16Array.from({ length: this.regionCount }, (_, r) => this.currency.staleMask(r)),
      offline: this.legs.map((l) => l.offline),
      unflushed: this.legs.map((l) => l.window.unflushed()),
      defaultLegKey: this.legKey(this.legs[this.legSet.defaultLeg]!),
      recoveryWasRunning,
    };
  }

  /** Undoes `detachForReload` when the new table could not be activated: exactly as it was. */
  reattachAfterFailedReload(handover: MirrorHandover): void {
    if (!this.detached || this.closed) return;
    this.detached = false;
    this.watchLegs();
    // The new table may have written the log: ours is the truth again, on the next flush.
    this.log.noteStaleAdded();
    void this.log
      .flush()
      .catch((err: unknown) =>
        this.logger?.error({ device: this.name, err: (err as Error).message }, "mirror log write failed"),
      );
    if (handover.recoveryWasRunning) this.startRecovery();
  }

  /**
   * Stops the resync and writes the log; the legs and log device belong to the table and stay
   * open. A mirror that was built but never activated (a failed reload) never touches the log.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    const giveBack = this.handedOverFrom;
    if (giveBack) {
      // A reload rolled back after this took over: stop, and let the old table own the log again.
      await this.stopRecovery();
      await this.resyncFlush;
      this.closed = true;
      if (this.cleanTimer) clearTimeout(this.cleanTimer);
      for (const leg of this.legs) leg.unwatch?.();
      await this.ownKcopyd?.destroy();
      giveBack.previous.reattachAfterFailedReload(giveBack.handover);
      return;
    }
    if (this.activated && !this.detached) await this.suspend();
    this.closed = true;
    if (this.cleanTimer) clearTimeout(this.cleanTimer);
    for (const leg of this.legs) leg.unwatch?.();
    await this.ownKcopyd?.destroy();
  }
}
