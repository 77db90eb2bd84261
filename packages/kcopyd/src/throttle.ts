/** dm_kcopyd_throttle: sleep this long when over the busy share... */
export const THROTTLE_SLEEP_MS = 100;
/** ...at most this many times before starting the I/O anyway. */
export const THROTTLE_MAX_SLEEPS = 10;
/** Busy and total periods are halved once total reaches about one second, so the share decays. */
const ACCOUNT_INTERVAL_MS = 1024;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * Limits the share of wall time during which kcopyd I/O is outstanding, like the kernel's
 * `dm_kcopyd_throttle` (e.g. dm-mirror's `raid1_resync_throttle`). 100 or more is unlimited.
 * One throttle may be shared by several clients.
 *
 * @example
 * ```ts
 * const throttle = new KcopydThrottle(30); // resync may keep disks busy 30% of the time
 * const kc = new KcopydClient({ throttle });
 * ```
 */
export class KcopydThrottle {
  percent: number;
  private ioJobs = 0;
  private ioPeriodMs = 0;
  private totalPeriodMs = 0;
  private lastMs = performance.now();

  constructor(percent = 100) {
    this.percent = percent;
  }

  private account(): void {
    const now = performance.now();
    const difference = now - this.lastMs;
    this.lastMs = now;
    if (this.ioJobs > 0) this.ioPeriodMs += difference;
    this.totalPeriodMs += difference;
    if (this.totalPeriodMs >= ACCOUNT_INTERVAL_MS) {
      this.ioPeriodMs /= 2;
      this.totalPeriodMs /= 2;
    }
  }

  /** Waits while I/O has been busy more than `percent`% of the time, then counts one I/O in. */
  async start(): Promise<void> {
    if (this.percent < 100) {
      for (let slept = 0; slept < THROTTLE_MAX_SLEEPS; slept++) {
        this.account();
        const skew = this.ioPeriodMs - (this.percent * this.totalPeriodMs) / 100;
        if (skew <= 0) break;
        await sleep(THROTTLE_SLEEP_MS);
      }
    }
    this.account();
    this.ioJobs++;
  }

  finish(): void {
    this.account();
    this.ioJobs--;
  }
}

/**
 * A bytes-per-second cap: each I/O reserves its bytes on a timeline and waits for its turn.
 */
export class RateLimiter {
  private nextFreeMs = performance.now();

  constructor(readonly bytesPerSecond: number) {
    if (!(bytesPerSecond > 0)) throw new RangeError(`rate limit must be positive, got ${bytesPerSecond}`);
  }

  async take(bytes: number): Promise<void> {
    const now = performance.now();
    const start = Math.max(now, this.nextFreeMs);
    this.nextFreeMs = start + (bytes / this.bytesPerSecond) * 1000;
    if (start > now) await sleep(start - now);
  }
}
