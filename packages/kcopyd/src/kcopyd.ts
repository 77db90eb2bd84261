import { EventEmitter } from "node:events";
import { type BlockDevice, type Extent, SECTOR_SHIFT, SECTOR_SIZE } from "./block-device.js";
import { PAGE_SIZE, type PageLease, PagePool } from "./page-pool.js";
import { type KcopydThrottle, RateLimiter } from "./throttle.js";

/** Most destinations one job may have (`DM_KCOPYD_MAX_REGIONS`). */
export const KCOPYD_MAX_REGIONS = 8;
/** Sub-jobs in flight per job (`SPLIT_COUNT`). */
export const SPLIT_COUNT = 8;
/** Default sub-job size: 512 KiB, as the kernel's `DEFAULT_SUB_JOB_SIZE_KB`. */
export const DEFAULT_SUB_JOB_SECTORS = 1024;
/** Largest sub-job we allow: a userspace read/write of 32 MiB is still one syscall. */
export const MAX_SUB_JOB_SECTORS = 65536;
/** Default page budget: 8 sub-jobs of the default size, one job's worth in flight. */
export const DEFAULT_KCOPYD_PAGES = (SPLIT_COUNT * DEFAULT_SUB_JOB_SECTORS * SECTOR_SIZE) / PAGE_SIZE;
/** With SKIP_HOLES, one write-zeroes slice covers at most this much of a hole (keeps progress moving). */
const MAX_ZERO_SLICE_SECTORS = (1024 * 1024 * 1024) >> SECTOR_SHIFT;

/** Job flags, as bit values (the kernel callers pass `BIT(DM_KCOPYD_...)`). */
export const KcopydFlags = {
  /** Keep copying after an I/O error; a failed read writes zeros (dm-io zero-fills). */
  IGNORE_ERROR: 1 << 1,
  /** Write sub-jobs strictly in ascending order; turns IGNORE_ERROR off. */
  WRITE_SEQ: 1 << 2,
  /** udm extension: source holes become write-zeroes (may trim) on the destinations, not reads. */
  SKIP_HOLES: 1 << 8,
} as const;

/** A range of a device in 512-byte sectors (`struct dm_io_region`). */
export interface Region {
  dev: BlockDevice;
  sector: number;
  count: number;
}

/** `readErr` is true if any source read failed; bit i of `writeErr` is set if `dests[i]` failed. */
export type KcopydNotify<C> = (readErr: boolean, writeErr: number, context: C) => void;

export interface KcopydResult {
  readErr: boolean;
  writeErr: number;
}

export interface KcopydProgress {
  jobId: number;
  context: unknown;
  doneSectors: number;
  totalSectors: number;
}

export interface KcopydClientOptions {
  /** Memory budget in 4 KiB pages; buffers in flight never exceed it. */
  pages?: number;
  /** Sub-job size in sectors (default 1024 = 512 KiB). */
  subJobSectors?: number;
  /** Share-of-busy-time throttle, possibly shared with other clients. */
  throttle?: KcopydThrottle;
  /** Optional cap on bytes read plus zeroed per second, across the client's jobs. */
  bytesPerSecond?: number;
}

/** Why a client refuses a job: a programming error in the caller, thrown from `copy()`. */
export class KcopydUsageError extends Error {
  override name = "KcopydUsageError";
}

interface Slice {
  startSector: number;
  count: number;
  /** For copies with SKIP_HOLES: the source reads as zeros here, so zero the destinations. */
  zero: boolean;
}

/** One `copy()` or `zero()` call: the kernel's master job with its sub-jobs folded in. */
interface Job {
  id: number;
  from: Region | null;
  dests: Region[];
  flags: number;
  context: unknown;
  notify: KcopydNotify<unknown>;
  nextSector: number;
  doneSectors: number;
  readErr: boolean;
  writeErr: number;
  /** Set by the first error without IGNORE_ERROR: no new slices are handed out. */
  stopped: boolean;
  /** Serializes slice hand-out and page requests so slices get pages in ascending order. */
  handout: Promise<unknown>;
  /** WRITE_SEQ: the sector whose write goes next, and the slices waiting for their turn. */
  seqNextSector: number;
  seqWaiters: Map<number, () => void>;
  extentCache: Extent[];
  /**
   * Copy slices by the source's `copyRangeTo` (no buffer, no pages) while every destination
   * accepts it; a refusal turns it off for the rest of the job. Never with WRITE_SEQ.
   */
  offload: boolean;
}

/**
 * An asynchronous copy engine with the kernel's `dm-kcopyd` semantics: copy one source region
 * to 1..8 destinations (or zero them), split into sub-jobs of 512 KiB with 8 in flight per job,
 * within a fixed memory budget that jobs wait for. Completion is reported with a read-error
 * flag and a per-destination write-error bit mask, never from inside the call that started it.
 *
 * @example
 * ```ts
 * import { FileDevice, KcopydClient } from "@udm/kcopyd";
 * const src = await FileDevice.open("a.img");
 * const dst = await FileDevice.open("b.img", { createSizeBytes: src.sizeBytes });
 * const kc = new KcopydClient({ pages: 256 });
 * const count = src.sizeBytes / 512;
 * const { readErr, writeErr } = await kc.copyAsync({ dev: src, sector: 0, count }, [{ dev: dst, sector: 0, count }]);
 * await kc.destroy();
 * ```
 */
export class KcopydClient extends EventEmitter<{ progress: [KcopydProgress] }> {
  readonly pool: PagePool;
  readonly subJobSectors: number;
  private readonly throttle: KcopydThrottle | undefined;
  private readonly rate: RateLimiter | undefined;
  private nextJobId = 1;
  private outstanding = 0;
  private destroyed = false;
  private idleWaiters: Array<() => void> = [];

  constructor(options: KcopydClientOptions = {}) {
    super();
    this.pool = new PagePool(options.pages ?? DEFAULT_KCOPYD_PAGES);
    const wanted = options.subJobSectors || DEFAULT_SUB_JOB_SECTORS;
    if (!Number.isInteger(wanted) || wanted < 1) {
      throw new RangeError(`sub-job size must be a positive number of sectors, got ${wanted}`);
    }
    // A sub-job never needs more pages than the budget holds, or it could never start.
    const budgetSectors = (this.pool.totalPages * PAGE_SIZE) >> SECTOR_SHIFT;
    this.subJobSectors = Math.min(wanted, MAX_SUB_JOB_SECTORS, budgetSectors);
    this.throttle = options.throttle;
    this.rate = options.bytesPerSecond ? new RateLimiter(options.bytesPerSecond) : undefined;
  }

  /** Jobs submitted and not yet notified. */
  get jobsInFlight(): number {
    return this.outstanding;
  }

  /**
   * Copies `from` to every region of `dests` (same length, 1..8 of them). `notify` runs once, later.
   */
  copy<C>(from: Region, dests: Region[], flags: number, notify: KcopydNotify<C>, context: C): void {
    this.submit(from, dests, flags, notify as KcopydNotify<unknown>, context);
  }

  /** Writes zeros to every region of `dests` (`dm_kcopyd_zero`). */
  zero<C>(dests: Region[], flags: number, notify: KcopydNotify<C>, context: C): void {
    this.submit(null, dests, flags, notify as KcopydNotify<unknown>, context);
  }

  /** Promise form of `copy()`; resolves (never rejects for I/O errors) with the error flags. */
  copyAsync(from: Region, dests: Region[], flags = 0, context?: unknown): Promise<KcopydResult> {
    return new Promise((resolve) =>
      this.copy(from, dests, flags, (readErr, writeErr) => resolve({ readErr, writeErr }), context),
    );
  }

  /** Promise form of `zero()`. */
  zeroAsync(dests: Region[], flags = 0, context?: unknown): Promise<KcopydResult> {
    return new Promise((resolve) =>
      this.zero(dests, flags, (readErr, writeErr) => resolve({ readErr, writeErr }), context),
    );
  }

  /** Waits until every submitted job has been notified, then refuses new jobs. */
  async destroy(): Promise<void> {
    this.destroyed = true;
    if (this.outstanding === 0) return;
    await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }

  private submit(
    from: Region | null,
    dests: Region[],
    flags: number,
    notify: KcopydNotify<unknown>,
    context: unknown,
  ): void {
    if (this.destroyed) throw new KcopydUsageError("kcopyd client is destroyed");
    if (dests.length < 1 || dests.length > KCOPYD_MAX_REGIONS) {
      throw new KcopydUsageError(`kcopyd takes 1 to ${KCOPYD_MAX_REGIONS} destinations, got ${dests.length}`);
    }
    const count = from ? from.count : (dests[0]?.count ?? 0);
    for (const region of from ? [from, ...dests] : dests) checkRegion(region, count);
    if (flags & KcopydFlags.WRITE_SEQ) flags &= ~KcopydFlags.IGNORE_ERROR;
    const job: Job = {
      id: this.nextJobId++,
      from,
      dests,
      flags,
      context,
      notify,
      nextSector: 0,
      doneSectors: 0,
      readErr: false,
      writeErr: 0,
      stopped: false,
      handout: Promise.resolve(),
      seqNextSector: 0,
      seqWaiters: new Map(),
      extentCache: [],
      offload: !!from?.dev.copyRangeTo && !(flags & KcopydFlags.WRITE_SEQ),
    };
    this.outstanding++;
    // Start on a later tick: a callback never runs inside the call that started the job.
    setImmediate(() => void this.run(job, count));
  }

  private async run(job: Job, totalSectors: number): Promise<void> {
    const workers: Promise<void>[] = [];
    for (let i = 0; i < SPLIT_COUNT; i++) workers.push(this.subJob(job, totalSectors));
    await Promise.all(workers);
    try {
      job.notify(job.readErr, job.writeErr, job.context);
    } finally {
      this.outstanding--;
      if (this.outstanding === 0) {
        const waiters = this.idleWaiters;
        this.idleWaiters = [];
        for (const wake of waiters) wake();
      }
    }
  }

  /** One of SPLIT_COUNT sub-jobs: takes the next slice until none is left or the job stopped. */
  private async subJob(job: Job, totalSectors: number): Promise<void> {
    for (;;) {
      const next = job.handout.then(() => this.takeSlice(job, totalSectors));
      job.handout = next.catch(() => undefined);
      const taken = await next.catch(() => {
        // The source could not describe its holes: count it as a read error.
        job.readErr = true;
        job.stopped = true;
        return null;
      });
      if (!taken) return;
      await this.runSlice(job, taken.slice, taken.lease, totalSectors);
    }
  }

  private async takeSlice(
    job: Job,
    totalSectors: number,
  ): Promise<{ slice: Slice; lease: PageLease | null } | null> {
    if (job.stopped || job.nextSector >= totalSectors) return null;
    const start = job.nextSector;
    let count = Math.min(this.subJobSectors, totalSectors - start);
    let zero = false;
    if (job.from && job.flags & KcopydFlags.SKIP_HOLES) {
      const run = await this.sourceRunAt(job, start, totalSectors);
      zero = run.zero;
      count = Math.min(
        zero ? MAX_ZERO_SLICE_SECTORS : this.subJobSectors,
        run.endSector - start,
        totalSectors - start,
      );
    }
    job.nextSector = start + count;
    const slice = { startSector: start, count, zero };
    // Zeroing needs no buffer, like the kernel's zero-page jobs; nor does an offloaded copy.
    const lease = job.from && !zero && !job.offload ? await this.pool.acquire(slicePages(count)) : null;
    return { slice, lease };
  }

  /**
   * Where the source run containing job-relative `sector` ends, and whether it reads as zeros.
   * Extents come from a cache refilled lazily from the source's `extents()`. A sector that is
   * only partly a hole counts as data, so slices stay whole sectors.
   */
  private async sourceRunAt(
    job: Job,
    sector: number,
    totalSectors: number,
  ): Promise<{ zero: boolean; endSector: number }> {
    const from = job.from!;
    const offset = (from.sector + sector) * SECTOR_SIZE;
    const cache = job.extentCache;
    while (cache.length && cache[0]!.offsetBytes + cache[0]!.lengthBytes <= offset) cache.shift();
    if (!cache.length) {
      job.extentCache = await from.dev.extents(offset, (totalSectors - sector) * SECTOR_SIZE);
    }
    const extent = job.extentCache[0];
    if (!extent || extent.offsetBytes > offset) {
      throw new Error(`${from.dev.name}: extents() did not cover offset ${offset}`);
    }
    const endBytes = extent.offsetBytes + extent.lengthBytes;
    const toSector = (bytes: number) => bytes / SECTOR_SIZE - from.sector;
    if (extent.kind === "data") return { zero: false, endSector: Math.ceil(toSector(endBytes)) };
    const endSector = Math.floor(toSector(endBytes));
    if (endSector <= sector) return { zero: false, endSector: sector + 1 };
    return { zero: true, endSector };
  }

  private async runSlice(
    job: Job,
    slice: Slice,
    lease: PageLease | null,
    totalSectors: number,
  ): Promise<void> {
    const bytes = slice.count * SECTOR_SIZE;
    const ignoreErrors = (job.flags & KcopydFlags.IGNORE_ERROR) !== 0;
    const seq = (job.flags & KcopydFlags.WRITE_SEQ) !== 0;
    let failed = false;
    try {
      if (this.rate) await this.rate.take(bytes);
      // Destinations still to write; an offloaded copy removes those it completed.
      let targets = job.dests.map((_, i) => i);
      if (job.from && !slice.zero && !lease) {
        targets = await this.offloadSlice(job, slice, targets);
        if (targets.length) lease = await this.pool.acquire(slicePages(slice.count));
      }
      const buffer = lease && targets.length ? lease.buffer.subarray(0, bytes) : null;
      if (buffer && job.from) {
        const readOk = await this.io(() =>
          job.from!.dev.readInto((job.from!.sector + slice.startSector) * SECTOR_SIZE, buffer),
        );
        if (!readOk) {
          job.readErr = true;
          failed = true;
          if (!ignoreErrors) job.stopped = true;
          buffer.fill(0);
        }
      }
      if (seq) await this.waitForTurn(job, slice.startSector);
      if (failed && !ignoreErrors) {
        // The kernel completes a job whose read failed without writing anything.
      } else if (seq && (job.readErr || job.writeErr)) {
        // WRITE_SEQ: once a slice failed, later slices are not written (nothing past a gap).
        failed = true;
      } else if (targets.length) {
        const mask = await this.writeDests(job, slice, buffer, targets);
        if (mask) {
          job.writeErr |= mask;
          failed = true;
        }
      }
    } finally {
      if (seq) this.passTurn(job, slice.startSector + slice.count);
      lease?.release();
    }
    if (failed && !ignoreErrors) job.stopped = true;
    job.doneSectors += slice.count;
    this.emit("progress", {
      jobId: job.id,
      context: job.context,
      doneSectors: job.doneSectors,
      totalSectors,
    });
  }

  /**
   * Copies a slice to `targets` by the source's copy offload, all at once; returns the
   * destinations left to copy through a buffer: those that refused (offload is then off for the
   * job) and those whose offload failed (the buffered copy tells a read error from a write error).
   */
  private async offloadSlice(job: Job, slice: Slice, targets: number[]): Promise<number[]> {
    const from = job.from!;
    const bytes = slice.count * SECTOR_SIZE;
    const results = await Promise.all(
      targets.map(async (i) => {
        const dest = job.dests[i]!;
        if (this.throttle) await this.throttle.start();
        try {
          return await from.dev.copyRangeTo!(
            (from.sector + slice.startSector) * SECTOR_SIZE,
            dest.dev,
            (dest.sector + slice.startSector) * SECTOR_SIZE,
            bytes,
          );
        } catch {
          return "failed" as const;
        } finally {
          this.throttle?.finish();
        }
      }),
    );
    if (results.includes(false)) job.offload = false;
    return targets.filter((_, k) => results[k] !== true);
  }

  /** Writes (or zeroes) one slice on the `targets` destinations at once; returns their failed-bit mask. */
  private async writeDests(
    job: Job,
    slice: Slice,
    buffer: Buffer | null,
    targets: number[],
  ): Promise<number> {
    const bytes = slice.count * SECTOR_SIZE;
    const results = await Promise.all(
      targets.map((i) => {
        const dest = job.dests[i]!;
        const offset = (dest.sector + slice.startSector) * SECTOR_SIZE;
        return this.io(() =>
          buffer ? dest.dev.write(offset, buffer) : dest.dev.writeZeroes(offset, bytes, { mayTrim: true }),
        );
      }),
    );
    let mask = 0;
    results.forEach((ok, k) => {
      if (!ok) mask |= 1 << targets[k]!;
    });
    return mask;
  }

  /** Runs one device I/O under the throttle; false if it failed. */
  private async io(op: () => Promise<void>): Promise<boolean> {
    if (this.throttle) await this.throttle.start();
    try {
      await op();
      return true;
    } catch {
      return false;
    } finally {
      this.throttle?.finish();
    }
  }

  private waitForTurn(job: Job, startSector: number): Promise<void> {
    if (job.seqNextSector === startSector) return Promise.resolve();
    return new Promise((resolve) => job.seqWaiters.set(startSector, resolve));
  }

  private passTurn(job: Job, nextSector: number): void {
    job.seqNextSector = nextSector;
    const wake = job.seqWaiters.get(nextSector);
    if (wake) {
      job.seqWaiters.delete(nextSector);
      wake();
    }
  }
}

/** Pages a buffer for `count` sectors takes. */
function slicePages(count: number): number {
  return Math.ceil((count * SECTOR_SIZE) / PAGE_SIZE);
}

function checkRegion(region: Region, count: number): void {
  const { dev, sector } = region;
  if (
    !Number.isSafeInteger(sector) ||
    sector < 0 ||
    !Number.isSafeInteger(region.count) ||
    region.count < 0
  ) {
    throw new KcopydUsageError(`${dev.name}: bad region ${sector}+${region.count}`);
  }
  if (region.count !== count) {
    throw new KcopydUsageError(`${dev.name}: region of ${region.count} sectors, the job copies ${count}`);
  }
  if ((sector + count) * SECTOR_SIZE > dev.sizeBytes) {
    throw new KcopydUsageError(
      `${dev.name}: region ${sector}+${count} sectors ends past the device (${dev.sizeBytes} bytes)`,
    );
  }
}
