import {
  type BlockDevice,
  checkRange,
  type Extent,
  IoError,
  KcopydClient,
  KcopydFlags,
  KcopydThrottle,
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

/** Sticky per-leg error kinds of dm-raid1 (`enum dm_raid1_error`). */
export type LegErrorKind = "write" | "flush" | "sync" | "read";

/** One leg of a mirror: a device and the sector where the mirror starts on it. */
export interface MirrorLegSpec {
  dev: BlockDevice;
  offsetSectors: number;
}

interface MirrorLeg {
  index: number;
  dev: BlockDevice;
  offsetSectors: number;
  offsetBytes: number;
  errors: Set<LegErrorKind>;
  errorCount: number;
  /** The device reported its backend gone (watchHealth): no I/O is sent to it. */
  offline: boolean;
  unwatch: (() => void) | undefined;
  /** Regions written on this leg since its last flush began: what a failed flush or a lost connection may lose. */
  unflushed: Set<number>;
}

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
  /** On reload: the mirror this one replaces; its per-leg sync state is carried over by leg spec. */
  previous?: MirrorDevice;
}

/** What a mirror hands to its successor on reload. */
export interface MirrorHandover {
  legKeys: string[];
  regionSectors: number;
  regionCount: number;
  /** Per region: bit i set if leg i lacks current data (0 = in sync). */
  stale: Uint16Array;
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
 * Beyond the kernel, each region knows WHICH legs are stale (`stale`), so a replaced or
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
  /** Per region: bit i set if leg i lacks the current data. Zero exactly for in-sync regions. */
  readonly stale: Uint16Array;
  private readonly legs: MirrorLeg[];
  /** Per leg: regions where it lacks current data (feeds the log's stale-legs mask). */
  private readonly staleCounts: number[];
  private readonly allLegsMask: number;
  private readonly logger: TargetLogger | undefined;
  private readonly sharedKcopyd: KcopydClient;
  private ownKcopyd: KcopydClient | undefined;
  private readonly throttle = new KcopydThrottle(100);
  private defaultLeg = 0;
  private inSyncFlag = false;
  private readonly eventListeners = new Set<() => void>();
  private regionsInFlightLimit: number;
  private readBalance: boolean;
  private readCursor = 0;
  private recoveryRunning = false;
  private recoveriesActive = 0;
  private recoveryIdleWaiters: Array<() => void> = [];
  private opsInFlight = 0;
  /** Writes, write-zeroes and discards not yet completed, in arrival order (overlaps wait). */
  private readonly writesInFlight = new Set<InFlightWrite>();
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
  /** The log is resumed and the mirror serves (a reload's mirror: after its preresume). */
  private activated = false;
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
    this.legs = legs.map((l, index) => {
      checkRange(l.dev, l.offsetSectors * SECTOR_SIZE, lengthBytes);
      return {
        index,
        dev: l.dev,
        offsetSectors: l.offsetSectors,
        offsetBytes: l.offsetSectors * SECTOR_SIZE,
        errors: new Set<LegErrorKind>(),
        errorCount: 0,
        offline: false,
        unwatch: undefined,
        unflushed: new Set<number>(),
      };
    });
    this.allLegsMask = (1 << legs.length) - 1;
    this.staleCounts = legs.map(() => 0);
    this.logicalBlockSize = Math.max(...legs.map((l) => l.dev.logicalBlockSize));
    this.name = options.name ?? `mirror(${legs.map((l) => l.dev.name).join(",")})`;
    this.logger = options.logger;
    this.sharedKcopyd = options.kcopyd;
    this.regionsInFlightLimit = options.regionsInFlight ?? DEFAULT_REGIONS_IN_FLIGHT;
    this.readBalance = !!options.readBalance;
    this.stale = new Uint16Array(this.regionCount);
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
    const mirror = new MirrorDevice(options);
    await mirror.activate(options.previous);
    return mirror;
  }

  /**
   * A mirror that replaces `previous` (a reload): built, but the old table keeps its log and
   * legs until dm's preresume (`preresume`, the old table is suspended then) hands them over; a
   * reload that fails before leaves the old one as it was.
   */
  static prepareReload(options: MirrorDeviceOptions & { previous: MirrorDevice }): MirrorDevice {
    const mirror = new MirrorDevice(options);
    mirror.preresume = () => mirror.activate(options.previous);
    return mirror;
  }

  /** Set by `prepareReload`: the handover from the old table (dm's preresume). */
  preresume?: () => Promise<void>;

  private async activate(previous: MirrorDevice | undefined): Promise<void> {
    if (this.activated) return;
    // The old table lets go of the log first: it flushes it, then never writes it again.
    const handover = previous ? await previous.detachForReload() : null;
    try {
      await this.log.resume();
      this.initStale(handover);
      await this.log.flush();
    } catch (err) {
      // The reload failed: the old table stays in charge.
      if (handover) previous!.reattachAfterFailedReload();
      throw err;
    }
    this.activated = true;
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
    return `${leg.dev.name} ${leg.offsetSectors}`;
  }

  private initStale(handover: MirrorHandover | null): void {
    // A udm log remembers which legs missed writes: copy from one that did not (the kernel: leg 0).
    const untrusted = this.log.storedStaleLegs ?? 0;
    const truth = this.legs.find((l) => !(untrusted & (1 << l.index)))?.index ?? 0;
    const notDefault = this.allLegsMask & ~(1 << truth);
    const carry =
      handover &&
      this.log.sync === "default" &&
      handover.regionSectors === this.regionSectors &&
      handover.regionCount === this.regionCount;
    if (!handover || !carry) {
      // The log says which regions are out of sync; the truth leg is current there.
      this.defaultLeg = truth;
      const bits = this.log.inSyncBits;
      for (let r = bits.findNext(false, 0); r >= 0; r = bits.findNext(false, r + 1))
        this.setStale(r, notDefault);
      if (handover && this.log.sync === "default") {
        // Geometry changed: legs that are new get a full resync, the rest follow the log.
        const oldKeys = new Set(handover.legKeys);
        let newLegs = 0;
        for (const leg of this.legs) if (!oldKeys.has(this.legKey(leg))) newLegs |= 1 << leg.index;
        const mask = newLegs & notDefault || newLegs;
        if (newLegs) for (let r = 0; r < this.regionCount; r++) this.markStale(r, mask);
      }
      return;
    }
    // Map old leg bits to new leg bits by spec; legs without an old counterpart are stale everywhere.
    const oldIndex = this.legs.map((leg) => handover.legKeys.indexOf(this.legKey(leg)));
    const newLegs = oldIndex.reduce((mask, old, i) => (old < 0 ? mask | (1 << i) : mask), 0);
    for (let r = 0; r < this.regionCount; r++) {
      const old = handover.stale[r]!;
      let mask = newLegs;
      if (old)
        for (let i = 0; i < oldIndex.length; i++)
          if (oldIndex[i]! >= 0 && old & (1 << oldIndex[i]!)) mask |= 1 << i;
      if (mask === this.allLegsMask) mask = notDefault; // nobody current: leg 0 is the truth, as the kernel
      if (mask === 0) {
        if (!this.log.inSync(r)) {
          // The old mirror knew better (it resynced the region); the clean bit follows a leg flush.
          this.log.setRegionSync(r, true);
          this.regionHash.queueClean(r);
        }
        this.setStale(r, 0);
      } else {
        this.setStale(r, 0);
        this.markStale(r, mask);
      }
    }
    if (newLegs) {
      this.logger?.info(
        { device: this.name, legs: this.legs.filter((l) => newLegs & (1 << l.index)).map((l) => l.dev.name) },
        "new mirror legs: resyncing them",
      );
    }
  }

  /** Sets a region's stale mask, keeping the per-leg counts and the log's stale-legs mask. */
  private setStale(region: number, mask: number): void {
    const old = this.stale[region]!;
    if (old === mask) return;
    const changed = old ^ mask;
    for (let i = 0; i < this.legs.length; i++) {
      if (changed & (1 << i)) this.staleCounts[i]! += mask & (1 << i) ? 1 : -1;
    }
    this.stale[region] = mask;
    this.log.staleLegs = this.staleCounts.reduce((m, n, i) => (n > 0 ? m | (1 << i) : m), 0);
  }

  /** Records that the legs in `mask` lack current data in `region`; durable at the next log flush. */
  private markStale(region: number, mask: number): void {
    if (!mask) return;
    const wasInSync = this.stale[region] === 0;
    this.setStale(region, this.stale[region]! | mask);
    this.log.markRegion(region);
    if (this.log.inSync(region)) this.regionHash.markNosync(region);
    if (wasInSync) {
      this.inSyncFlag = false;
      if (this.pass) this.pass.totalBytes += this.regionLength(region);
    }
  }

  private regionLength(region: number): number {
    return Math.min(this.regionBytes, this.sizeBytes - region * this.regionBytes);
  }

  private regionOf(offsetBytes: number): number {
    return Math.floor(offsetBytes / this.regionBytes);
  }

  private onlineMask(): number {
    let m = 0;
    for (const leg of this.legs) if (!leg.offline) m |= 1 << leg.index;
    return m;
  }

  /** Legs holding current data in `region`. */
  private currentMask(region: number): number {
    return this.allLegsMask & ~this.stale[region]!;
  }

  private updateInSync(): void {
    if (this.log.syncCount !== this.regionCount) return;
    if (!this.inSyncFlag) {
      this.inSyncFlag = true;
      this.raiseEvent();
      this.pass = null;
      // reset_ms_flags: a fully synced set forgets old errors (except legs still unreachable).
      for (const leg of this.legs) {
        if (leg.offline) continue;
        leg.errors.clear();
        leg.errorCount = 0;
      }
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

  /** `fail_mirror`: records the error; with handle_errors a failed default leg is replaced. */
  private failLeg(leg: MirrorLeg, kind: LegErrorKind, err?: unknown): void {
    leg.errorCount++;
    if (leg.errors.has(kind)) return;
    leg.errors.add(kind);
    this.raiseEvent();
    this.logger?.warn(
      { device: this.name, leg: leg.dev.name, kind, err: err instanceof Error ? err.message : err },
      "mirror leg failed",
    );
    if (!this.handleErrors || leg.index !== this.defaultLeg) return;
    const healthy = this.legs.filter((l) => l.errorCount === 0 && !l.offline);
    // Prefer a leg that is current in every region; the kernel only switches when in sync.
    const everywhere = healthy.find((l) => this.isCurrentEverywhere(l.index));
    const next = everywhere ?? (this.keepLog ? healthy[0] : undefined);
    if (next) {
      this.defaultLeg = next.index;
      this.logger?.warn(
        { device: this.name, from: leg.dev.name, to: next.dev.name },
        "default mirror leg changed",
      );
    } else {
      this.logger?.error(
        { device: this.name, leg: leg.dev.name },
        "default leg failed, no current healthy leg",
      );
    }
  }

  private isCurrentEverywhere(index: number): boolean {
    if (this.log.syncCount === this.regionCount) return true;
    const bit = 1 << index;
    for (let r = 0; r < this.regionCount; r++) if (this.stale[r]! & bit) return false;
    return true;
  }

  // ---- status and table ----------------------------------------------------------------------

  /** Health character of a leg, most severe first: F, D, S, R, U, A. */
  legHealth(index: number): string {
    const leg = this.legs[index];
    if (!leg) throw new RangeError(`no leg ${index}`);
    if (leg.errorCount === 0) return "A";
    if (leg.errors.has("flush")) return "F";
    if (leg.errors.has("write")) return "D";
    if (leg.errors.has("sync")) return "S";
    if (leg.errors.has("read")) return "R";
    return "U";
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
    return this.defaultLeg;
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
        const notDefault = this.allLegsMask & ~(1 << this.defaultLeg);
        for (let r = 0; r < this.regionCount; r++) {
          if (this.stale[r] === 0) this.markStale(r, notDefault);
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
        this.readBalance = rest[0] === "on";
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
    const balanceLeg = this.readBalance ? this.readCursor++ : 0;
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

  /** A current, online leg for `region`, avoiding `excluded`: default first, then backwards, as choose_mirror. */
  private chooseReadLeg(region: number, excluded: number, balance: number): number {
    const candidates = this.currentMask(region) & this.onlineMask() & ~excluded;
    if (!candidates) return -1;
    const healthy = this.legs.filter((l) => candidates & (1 << l.index) && l.errorCount === 0);
    if (this.readBalance && healthy.length > 1) return healthy[balance % healthy.length]!.index;
    const n = this.legs.length;
    for (let i = 0; i < n; i++) {
      const leg = this.legs[(this.defaultLeg - i + n) % n]!;
      if (candidates & (1 << leg.index) && leg.errorCount === 0) return leg.index;
    }
    // Every candidate has had errors: still better to try one than to fail outright.
    for (const leg of this.legs) if (candidates & (1 << leg.index)) return leg.index;
    return -1;
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
    const online = this.onlineMask();
    const targets: number[] = [];
    for (let r = first; r <= last; r++) {
      this.regionHash.incPending(r);
      const current = this.currentMask(r);
      // Legs that are current but unreachable miss this write: they become stale first.
      this.markStale(r, current & ~online);
      targets.push(current & online);
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
        await this.log
          .waitDirtyDurable(this.log.dirtyMark)
          .catch((err: unknown) =>
            this.logger?.error({ device: this.name, err: (err as Error).message }, "mirror log write failed"),
          );
      }
      if (failures.length) {
        throw new IoError(
          "EIO",
          this.name,
          `write at ${start}+${end - start} failed on every leg: ${failures[0]}`,
        );
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
    for (const leg of legs) for (let r = run.first; r <= run.last; r++) leg.unflushed.add(r);
    const results = await Promise.all(
      legs.map((leg) =>
        op(leg, leg.offsetBytes + s, s - base, e - s).then(
          () => null,
          (err: unknown) => err ?? new Error("write failed"),
        ),
      ),
    );
    let failedMask = 0;
    results.forEach((err, i) => {
      if (err) {
        failedMask |= 1 << legs[i]!.index;
        this.failLeg(legs[i]!, "write", err);
      }
    });
    if (!failedMask) return false;
    if (failedMask === run.mask) {
      // Nobody took the write: it fails, and the legs keep one current copy (they may now differ).
      failedMask &= ~(1 << legs[0]!.index);
      failures.push(String((results[0] as Error)?.message ?? results[0]));
    }
    for (let r = run.first; r <= run.last; r++) this.markStale(r, failedMask);
    this.scheduleCleanPass();
    return true;
  }

  async flush(): Promise<void> {
    if (this.closed) throw new IoError("EIO", this.name, "flush: mirror is closed");
    if (this.detached) {
      // Replaced by a reload: the legs can still be flushed, the log belongs to the new table.
      const results = await Promise.allSettled(this.legs.filter((l) => !l.offline).map((l) => l.dev.flush()));
      if (!results.some((r) => r.status === "fulfilled"))
        throw new IoError("EIO", this.name, "flush failed on every leg");
      return;
    }
    const mark = this.log.dirtyMark;
    const candidates = this.regionHash.cleanCandidates();
    const ok = await this.flushLegs();
    if (!ok) throw new IoError("EIO", this.name, "flush failed on every leg");
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
  }

  /**
   * PREFLUSH to every reachable leg. A leg whose flush fails may have lost what it acknowledged
   * since its last flush: it becomes stale in those regions (where another leg is current).
   * True if at least one leg flushed.
   */
  private async flushLegs(): Promise<boolean> {
    const legs = this.legs.filter((l) => !l.offline);
    const written = legs.map((leg) => {
      const regions = leg.unflushed;
      leg.unflushed = new Set();
      return regions;
    });
    const results = await Promise.all(
      legs.map((leg) =>
        leg.dev.flush().then(
          () => null,
          (err: unknown) => err ?? new Error("flush failed"),
        ),
      ),
    );
    let okCount = 0;
    results.forEach((err, i) => {
      const leg = legs[i]!;
      if (!err) {
        okCount++;
        return;
      }
      this.failLeg(leg, "flush", err);
      // (The kernel sets the region hash's flush_failure; marking the leg stale where it may have
      // lost writes is exact and lets it be resynced.)
      this.markLegUnflushedStale(leg, written[i]!);
    });
    return okCount > 0;
  }

  /** Marks `leg` stale in `regions` wherever another leg holds current data. */
  private markLegUnflushedStale(leg: MirrorLeg, regions: Iterable<number>): void {
    const bit = 1 << leg.index;
    for (const r of regions) {
      if (this.currentMask(r) & ~bit) this.markStale(r, this.currentMask(r) & bit);
    }
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    const leg =
      this.legs.find((l) => l.index === this.defaultLeg && !l.offline && l.errorCount === 0) ??
      this.legs.find((l) => !l.offline) ??
      this.legs[0]!;
    const inner = await leg.dev.extents(leg.offsetBytes + offsetBytes, lengthBytes);
    return inner.map((e) => ({ ...e, offsetBytes: e.offsetBytes - leg.offsetBytes }));
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
  private async cleanPass(): Promise<void> {
    const candidates = this.regionHash.cleanCandidates();
    if (candidates.length) {
      // Data first: only regions whose writes are flushed on every leg may be declared clean.
      const ok = await this.flushLegs();
      if (ok && !this.regionHash.flushFailure) this.regionHash.commitClean(candidates);
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
    while (this.recoveryRunning && !this.closed && this.recoveriesActive < this.regionsInFlightLimit) {
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
          this.kickRecovery();
        });
    }
    if (this.recoveriesActive === 0) {
      this.updateInSync();
      if (this.log.resyncSearchExhausted) this.finishResyncPass();
    }
  }

  /**
   * The resync ran out of work: flush the legs it copied to and set the clean bits now, rather
   * than after the lazy clean delay. Until a destination is flushed, a copy it acknowledged may
   * still sit in a volatile cache, so a flush failure in that window must (and does) make the leg
   * stale there again; this closes the window as soon as the pass ends, so a leg that fails later
   * is not blamed for copies it already made durable. `waitForSync` waits for it.
   */
  private finishResyncPass(): void {
    if (this.recoveredUnflushed === 0 || this.resyncFlush || this.closed || this.detached) return;
    this.recoveredUnflushed = 0;
    const run = this.cleanPass()
      .catch((err: unknown) =>
        this.logger?.error({ device: this.name, err: (err as Error).message }, "mirror log flush failed"),
      )
      .finally(() => {
        if (this.resyncFlush === run) this.resyncFlush = null;
      });
    this.resyncFlush = run;
  }

  /** The leg a region is copied from: the default leg if current there, else another current one. */
  private recoverySource(region: number): MirrorLeg | undefined {
    const current = this.currentMask(region) & this.onlineMask();
    const def = this.legs[this.defaultLeg]!;
    if (current & (1 << def.index) && def.errorCount === 0) return def;
    return (
      this.legs.find((l) => current & (1 << l.index) && l.errorCount === 0) ??
      this.legs.find((l) => current & (1 << l.index))
    );
  }

  private async recoverRegion(region: number): Promise<void> {
    const online = this.onlineMask();
    if (this.stale[region] === 0) {
      // No leg lacks anything: nothing to copy.
      this.log.setRegionSync(region, true);
      this.regionHash.queueClean(region);
      return;
    }
    if (!this.recoverySource(region) || !(this.stale[region]! & online)) {
      // Nothing reachable to copy from or to (e.g. the stale leg is offline): try again later.
      this.log.abandonResyncWork(region);
      return;
    }
    await this.regionHash.beginRecovery(region);
    let success = false;
    let destMask = 0;
    try {
      const source = this.recoverySource(region);
      destMask = this.stale[region]! & this.onlineMask() & ~(source ? 1 << source.index : 0);
      if (!source || !destMask) return;
      const dests = this.legs.filter((l) => destMask & (1 << l.index));
      for (const d of dests) d.unflushed.add(region);
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
      success = !readErr && writeErr === 0;
      if (success) {
        this.resyncedBytes += count * SECTOR_SIZE * dests.length;
        this.resyncedRegions++;
        this.recoveredUnflushed++;
      }
    } finally {
      if (success) {
        this.setStale(region, this.stale[region]! & ~destMask);
        if (this.pass && this.stale[region] === 0) this.pass.doneBytes += this.regionLength(region);
      }
      if (this.stale[region] === 0) {
        // In sync now; the clean bit follows in the next clean pass, after a leg flush.
        this.log.setRegionSync(region, true);
      } else {
        // Failed, or a stale leg was unreachable: stays out of sync (the kernel without
        // handle_errors would call it in sync; we never report a divergent region as in sync).
        this.log.setRegionSync(region, false);
      }
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
          // Writes it acknowledged but never flushed may be gone with the connection.
          this.markLegUnflushedStale(leg, leg.unflushed);
          leg.unflushed = new Set();
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
    await this.stopRecovery();
    await this.settle();
  }

  /** Restarts the resync from the first out-of-sync region. */
  async resume(): Promise<void> {
    if (this.closed || this.detached) return;
    this.startRecovery();
  }

  /** Waits for in-flight writes, marks drained regions clean and flushes the log. */
  async settle(): Promise<void> {
    await this.waitOpsIdle();
    if (this.cleanTimer) {
      clearTimeout(this.cleanTimer);
      this.cleanTimer = undefined;
    }
    await this.cleanPass();
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
      if (!this.recoveryRunning) throw new Error(`${this.name}: resync is suspended`);
      if (this.recoveriesActive === 0 && this.log.resyncSearchExhausted) {
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
   * the log device now).
   */
  async detachForReload(): Promise<MirrorHandover> {
    await this.suspend();
    this.detached = true;
    for (const leg of this.legs) leg.unwatch?.();
    return {
      legKeys: this.legs.map((l) => this.legKey(l)),
      regionSectors: this.regionSectors,
      regionCount: this.regionCount,
      stale: Uint16Array.from(this.stale),
    };
  }

  /** Undoes `detachForReload` when the new table could not be activated. */
  reattachAfterFailedReload(): void {
    if (!this.detached || this.closed) return;
    this.detached = false;
    this.watchLegs();
    this.startRecovery();
  }

  /** Stops the resync and writes the log; the legs and log device belong to the table and stay open. */
  async close(): Promise<void> {
    if (this.closed) return;
    // A mirror never activated (a reload that failed) never touched the log: leave it alone.
    if (!this.detached && this.activated) await this.suspend();
    this.closed = true;
    if (this.cleanTimer) clearTimeout(this.cleanTimer);
    for (const leg of this.legs) leg.unwatch?.();
    await this.ownKcopyd?.destroy();
  }
}
