import { type BlockDevice, checkRange, SECTOR_SIZE, type TargetLogger } from "@udm/kcopyd";
import { FlushWindow } from "./flush-window.js";
import type { LegCurrency } from "./leg-currency.js";

/** Sticky per-leg error kinds of dm-raid1 (`enum dm_raid1_error`). */
export type LegErrorKind = "write" | "flush" | "sync" | "read";

/** One leg of a mirror: a device and the sector where the mirror starts on it. */
export interface MirrorLegSpec {
  dev: BlockDevice;
  offsetSectors: number;
}

export interface MirrorLeg {
  index: number;
  dev: BlockDevice;
  offsetSectors: number;
  offsetBytes: number;
  errors: Set<LegErrorKind>;
  errorCount: number;
  /** The device reported its backend gone (watchHealth): no I/O is sent to it. */
  offline: boolean;
  unwatch: (() => void) | undefined;
  /** What a failed flush or a lost connection may lose on this leg (flush accounting by generation). */
  window: FlushWindow;
  /**
   * The leg's flushes run one at a time: a failed flush may have lost what a concurrent one
   * would claim durable, so its failure is accounted before the next flush is issued.
   */
  flushChain: Promise<unknown>;
}

/**
 * The legs of a mirror and their health (dm-raid1's `fail_mirror`, `choose_mirror`,
 * `device_status_char`): sticky error kinds, the default leg, which leg a read or a resync uses.
 * Which legs hold current data is not theirs to know: they ask the `LegCurrency`.
 *
 * @example
 * ```ts
 * const legs = new MirrorLegs(specs, sizeBytes, { currency, handleErrors: true, keepLog: false, name });
 * legs.fail(legs.all[0]!, "write", err); // D; with handle_errors the default leg moves on
 * legs.chooseReadLeg(3, 0, 0);          // a current, healthy, reachable leg for region 3, or -1
 * ```
 */
export class MirrorLegs {
  readonly all: MirrorLeg[];
  /** Index of the leg reads prefer and resync copies from. */
  defaultLeg = 0;
  readBalance: boolean;
  private readCursor = 0;

  constructor(
    specs: MirrorLegSpec[],
    lengthBytes: number,
    private readonly options: {
      currency: LegCurrency;
      handleErrors: boolean;
      keepLog: boolean;
      name: string;
      logger?: TargetLogger | undefined;
      readBalance?: boolean;
      /** A leg's first error of a kind: a dm table event (`udm wait`). */
      onFirstError?: () => void;
    },
  ) {
    this.readBalance = !!options.readBalance;
    this.all = specs.map((l, index) => {
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
        window: new FlushWindow(),
        flushChain: Promise.resolve(),
      };
    });
  }

  /** How a table names a leg: `dev offset` (legs are carried over a reload by this key). */
  static key(leg: { dev: BlockDevice; offsetSectors: number }): string {
    return `${leg.dev.name} ${leg.offsetSectors}`;
  }

  /** Legs whose backend is reachable. */
  onlineMask(): number {
    let m = 0;
    for (const leg of this.all) if (!leg.offline) m |= 1 << leg.index;
    return m;
  }

  /** `fail_mirror`: records the error; with handle_errors a failed default leg is replaced. */
  fail(leg: MirrorLeg, kind: LegErrorKind, err?: unknown): void {
    const { logger, name } = this.options;
    leg.errorCount++;
    if (leg.errors.has(kind)) return;
    leg.errors.add(kind);
    this.options.onFirstError?.();
    logger?.warn(
      { device: name, leg: leg.dev.name, kind, err: err instanceof Error ? err.message : err },
      "mirror leg failed",
    );
    if (!this.options.handleErrors || leg.index !== this.defaultLeg) return;
    const healthy = this.all.filter((l) => l.errorCount === 0 && !l.offline);
    // Prefer a leg that is current in every region; the kernel only switches when in sync.
    const everywhere = healthy.find((l) => this.options.currency.currentEverywhere(l.index));
    const next = everywhere ?? (this.options.keepLog ? healthy[0] : undefined);
    if (next) {
      this.defaultLeg = next.index;
      logger?.warn({ device: name, from: leg.dev.name, to: next.dev.name }, "default mirror leg changed");
    } else {
      logger?.error({ device: name, leg: leg.dev.name }, "default leg failed, no current healthy leg");
    }
  }

  /** `reset_ms_flags`: a fully synced set forgets old errors (except legs still unreachable). */
  resetErrors(): void {
    for (const leg of this.all) {
      if (leg.offline) continue;
      leg.errors.clear();
      leg.errorCount = 0;
    }
  }

  /** Health character of a leg, most severe first: F, D, S, R, U, A. */
  health(index: number): string {
    const leg = this.all[index];
    if (!leg) throw new RangeError(`no leg ${index}`);
    if (leg.errorCount === 0) return "A";
    if (leg.errors.has("flush")) return "F";
    if (leg.errors.has("write")) return "D";
    if (leg.errors.has("sync")) return "S";
    if (leg.errors.has("read")) return "R";
    return "U";
  }

  /** The balance token of the next read (read_balance spreads reads over healthy current legs). */
  nextBalance(): number {
    return this.readBalance ? this.readCursor++ : 0;
  }

  /** A current, online leg for `region`, avoiding `excluded`: default first, then backwards, as choose_mirror. */
  chooseReadLeg(region: number, excluded: number, balance: number): number {
    const candidates = this.options.currency.currentMask(region) & this.onlineMask() & ~excluded;
    if (!candidates) return -1;
    const healthy = this.all.filter((l) => candidates & (1 << l.index) && l.errorCount === 0);
    if (this.readBalance && healthy.length > 1) return healthy[balance % healthy.length]!.index;
    const n = this.all.length;
    for (let i = 0; i < n; i++) {
      const leg = this.all[(this.defaultLeg - i + n) % n]!;
      if (candidates & (1 << leg.index) && leg.errorCount === 0) return leg.index;
    }
    // Every candidate has had errors: still better to try one than to fail outright.
    for (const leg of this.all) if (candidates & (1 << leg.index)) return leg.index;
    return -1;
  }

  /** The leg a region is copied from: the default leg if current there, else another current one. */
  recoverySource(region: number): MirrorLeg | undefined {
    const current = this.options.currency.currentMask(region) & this.onlineMask();
    const def = this.all[this.defaultLeg]!;
    if (current & (1 << def.index) && def.errorCount === 0) return def;
    return (
      this.all.find((l) => current & (1 << l.index) && l.errorCount === 0) ??
      this.all.find((l) => current & (1 << l.index))
    );
  }
}
