import type { BlockDevice } from "@udm/kcopyd";
import { bitsetBytes, RegionBitset } from "./region-bitset.js";

/** dm-log's `MIRROR_MAGIC`; on disk (le32) the bytes read `72 52 69 4d`. */
export const MIRROR_LOG_MAGIC = 0x4d695272;
/** dm-log's `MIRROR_DISK_VERSION`. Version 1 logs are upgraded on little-endian hosts, as the kernel does. */
export const MIRROR_LOG_VERSION = 2;
/** Byte offset of the clean bitmap (`LOG_OFFSET` = sector 2). */
export const MIRROR_LOG_BITMAP_OFFSET = 1024;
/**
 * udm extension in the header's unused bytes 16..31: le32 `udmR`, le32 region size in sectors,
 * le32 mask of legs (by table position) that lack current data somewhere, le32 number of legs
 * in the per-leg area (0: none). The kernel reads and rewrites the whole buffer, so it keeps
 * these bytes; it never looks at them.
 *
 * The per-leg area follows the kernel's I/O area (at `diskLogBytes`, which the kernel never
 * reads or writes): one bitset per leg, `bitsetBytes(regionCount)` each, bit r set if that leg
 * lacks current data in region r. It is written with the header in the same I/O, so a restart
 * knows per region which leg to copy from.
 */
export const UDM_LOG_EXTENSION_MAGIC = 0x526d6475;
const UDM_LOG_EXTENSION_OFFSET = 16;
/** Largest region count dm-log accepts (`region_count > UINT_MAX` is refused). */
export const MAX_LOG_REGIONS = 0xffffffff;

/** `sync` ignores the stored state (full resync); `nosync` trusts the legs (no initial resync). */
export type LogSyncMode = "default" | "sync" | "nosync";

/** A disk log whose header cannot be used: wrong magic where one is required, or an unknown version. */
export class MirrorLogFormatError extends Error {
  override name = "MirrorLogFormatError";
  constructor(
    readonly device: string,
    message: string,
  ) {
    super(`${device}: ${message}`);
  }
}

export interface DirtyRegionLogOptions {
  regionSectors: number;
  /** Length of the mirror in sectors; the region count is `ceil(target / region)`. */
  targetSectors: number;
  sync?: LogSyncMode;
  /** The log device of a `disk` log; absent for `core`. */
  device?: BlockDevice;
  /** Legs of the mirror: a disk log keeps one stale bitset per leg after the kernel's area. */
  legCount?: number;
}

/**
 * The dirty region log of dm-log.c, `core` (memory only) or `disk` (persisted in the kernel's
 * format). It keeps three bitsets: `clean` (no writes in flight when last flushed; the only one
 * persisted), `inSync` (all legs hold the same data) and `recovering`.
 *
 * `flush()` is a group commit: callers that arrive while a flush runs share the next one, the way
 * the kernel flushes once per worker pass. Before clean bits reach the disk the `flushLegs`
 * callback makes the data durable on the legs; if it fails, every region is marked dirty.
 *
 * @example
 * ```ts
 * const log = new DirtyRegionLog({ regionSectors: 1024, targetSectors: 131072, device: logDev });
 * await log.resume();           // read header + bitmap; sync bits := clean bits
 * log.markRegion(3);            // about to write region 3
 * await log.flush();            // the dirty bit is durable: now write the legs
 * ```
 */
export class DirtyRegionLog {
  readonly type: "core" | "disk";
  readonly regionSectors: number;
  readonly regionCount: number;
  readonly sync: LogSyncMode;
  readonly device: BlockDevice | undefined;
  readonly clean: RegionBitset;
  readonly inSyncBits: RegionBitset;
  readonly recovering: RegionBitset;
  /** Regions whose in-sync bit is set. */
  syncCount: number;
  /** Log device I/O failed (`D` in status). */
  deviceFailed = false;
  /** Log device flush failed (`F` in status). */
  deviceFlushFailed = false;
  /** Legs lacking current data in some region (udm header extension); set by the mirror. */
  private staleLegsMask = 0;
  /** The stale-legs mask a udm-written log held at resume, if any (not with `sync`). */
  storedStaleLegs: number | undefined;
  /** Per leg: regions where it lacks current data (the per-leg area of a disk log). */
  readonly legStaleBits: RegionBitset[] | undefined;
  /** Whether resume found per-leg bits written for this many legs (else only `storedStaleLegs`). */
  storedLegBits = false;
  /** Resumed once: `nosync` has done its job and is no longer printed in the table. */
  private initialised = false;
  /** Called before clean bits are written: flush every leg; false if that failed. */
  flushLegs: (() => Promise<boolean>) | undefined;
  /** Bumped whenever a clean bit is cleared; flushes record up to which value is durable. */
  private dirtySeq = 0;
  private durableDirtySeq = 0;
  private touchedDirtied = false;
  private touchedCleaned = false;
  private flushFailed = false;
  private syncSearch = 0;
  private readonly buffer: Buffer | undefined;
  private running: Promise<void> | null = null;
  private queued: Promise<void> | null = null;

  constructor(options: DirtyRegionLogOptions) {
    this.type = options.device ? "disk" : "core";
    this.regionSectors = options.regionSectors;
    this.regionCount = Math.ceil(options.targetSectors / options.regionSectors);
    this.sync = options.sync ?? "default";
    this.device = options.device;
    if (this.device) {
      const legCount = options.legCount ?? 0;
      const size = udmLogBytes(this.regionCount, legCount, this.device.logicalBlockSize);
      if (size > this.device.sizeBytes) {
        throw new RangeError(
          `log device ${this.device.name} too small: ${this.regionCount} regions and ${legCount} legs need ${size} bytes, it has ${this.device.sizeBytes}`,
        );
      }
      this.buffer = Buffer.alloc(size);
      const bytes = bitsetBytes(this.regionCount);
      this.clean = new RegionBitset(
        this.regionCount,
        this.buffer.subarray(MIRROR_LOG_BITMAP_OFFSET, MIRROR_LOG_BITMAP_OFFSET + bytes),
      );
      const area = diskLogBytes(this.regionCount, this.device.logicalBlockSize);
      this.legStaleBits = Array.from(
        { length: legCount },
        (_, i) =>
          new RegionBitset(this.regionCount, this.buffer!.subarray(area + i * bytes, area + (i + 1) * bytes)),
      );
    } else {
      this.clean = new RegionBitset(this.regionCount);
      this.legStaleBits = undefined;
    }
    // As create_log_context: all clean; in sync only with nosync.
    this.clean.fill(true);
    this.inSyncBits = new RegionBitset(this.regionCount);
    this.inSyncBits.fill(this.sync === "nosync");
    this.syncCount = this.sync === "nosync" ? this.regionCount : 0;
    this.recovering = new RegionBitset(this.regionCount);
  }

  /**
   * Activates the log (`core_resume` / `disk_resume`): a disk log reads its header and bitmap,
   * starts a new log when the magic is missing or `sync` was given, sets the in-sync bits from
   * the clean bits and writes the header back. An unreadable log means nothing is in sync.
   * `nosync` only applies to a new log (first activation): a log that holds a header already
   * keeps its bits, so a restart after a crash still resyncs what was dirty.
   */
  async resume(): Promise<void> {
    this.syncSearch = 0;
    const firstActivation = !this.initialised;
    this.initialised = true;
    if (!this.device || !this.buffer) return;
    if (!firstActivation) throw new Error(`${this.device.name}: mirror log resumed twice`);
    let storedRegions = 0;
    try {
      await this.device.readInto(0, this.buffer);
      const magic = this.buffer.readUInt32LE(0);
      const version = this.buffer.readUInt32LE(4);
      const knownVersion = version === 1 || version === MIRROR_LOG_VERSION;
      if (magic === MIRROR_LOG_MAGIC && (knownVersion || this.sync !== "sync")) {
        if (!knownVersion) {
          throw new MirrorLogFormatError(
            this.device.name,
            `dm-log version ${version}, expected ${MIRROR_LOG_VERSION} (use the "sync" log argument to start a new log)`,
          );
        }
        storedRegions = Math.min(Number(this.buffer.readBigUInt64LE(8)), this.regionCount);
        if (this.buffer.readUInt32LE(UDM_LOG_EXTENSION_OFFSET) === UDM_LOG_EXTENSION_MAGIC) {
          if (this.buffer.readUInt32LE(UDM_LOG_EXTENSION_OFFSET + 4) !== this.regionSectors) {
            // Written with another region size: its bits describe other regions. Trust none.
            storedRegions = 0;
          } else {
            this.storedStaleLegs = this.buffer.readUInt32LE(UDM_LOG_EXTENSION_OFFSET + 8);
            const legs = this.buffer.readUInt32LE(UDM_LOG_EXTENSION_OFFSET + 12);
            this.storedLegBits =
              legs > 0 &&
              legs === this.legStaleBits?.length &&
              Number(this.buffer.readBigUInt64LE(8)) === this.regionCount;
          }
        }
        // `sync` resyncs every region, but still from a leg the per-leg bits call current.
        if (this.sync === "sync") storedRegions = 0;
      }
    } catch (err) {
      if (err instanceof MirrorLogFormatError) throw err;
      // As disk_resume: an unreadable log means every region is out of sync.
      this.deviceFailed = true;
      storedRegions = 0;
    }
    if (!this.storedLegBits) for (const bits of this.legStaleBits ?? []) bits.fill(false);
    for (let r = storedRegions; r < this.regionCount; r++) {
      if (this.sync === "nosync") this.clean.set(r);
      else this.clean.clear(r);
    }
    this.clean.clearTail();
    this.inSyncBits.bytes.set(this.clean.bytes);
    this.syncCount = this.clean.count();
    this.writeHeaderFields();
    this.touchedDirtied = true;
    await this.flush();
  }

  isClean(region: number): boolean {
    return this.clean.test(region);
  }

  inSync(region: number): boolean {
    return this.inSyncBits.test(region);
  }

  /** A write is about to reach `region` (`mark_region`): clear its clean bit. */
  markRegion(region: number): void {
    if (this.clean.clear(region)) {
      this.touchedDirtied = true;
      this.dirtySeq++;
    }
  }

  /** No writes are in flight in `region` any more (`clear_region`); ignored after a failed leg flush. */
  clearRegion(region: number): void {
    if (this.flushFailed) return;
    if (this.clean.set(region)) this.touchedCleaned = true;
  }

  /** A leg became stale somewhere (per-leg bits set): durable with the next dirty mark. */
  noteStaleAdded(): void {
    this.touchedDirtied = true;
    this.dirtySeq++;
  }

  /** Stale bits were cleared (after a leg flush): written with the next log write. */
  noteStaleCleared(): void {
    this.touchedCleaned = true;
  }

  /** Legs lacking current data somewhere; a change is written (and waited for) like a dirty bit. */
  get staleLegs(): number {
    return this.staleLegsMask;
  }

  set staleLegs(mask: number) {
    if (mask === this.staleLegsMask) return;
    this.staleLegsMask = mask;
    this.touchedDirtied = true;
    this.dirtySeq++;
  }

  /** Records whether all legs hold the same data in `region`; ends its recovery. */
  setRegionSync(region: number, inSync: boolean): void {
    this.recovering.clear(region);
    if (inSync) {
      if (this.inSyncBits.set(region)) this.syncCount++;
    } else if (this.inSyncBits.clear(region)) {
      this.syncCount--;
    }
  }

  /** Marks a region dirty and out of sync, so it is resynced now and after a crash. */
  markOutOfSync(region: number): void {
    this.markRegion(region);
    if (this.inSyncBits.clear(region)) this.syncCount--;
  }

  /** Next out-of-sync region not yet recovering, from a moving cursor (`get_resync_work`), or -1. */
  nextResyncWork(): number {
    while (this.syncSearch < this.regionCount) {
      const region = this.inSyncBits.findNext(false, this.syncSearch);
      if (region < 0) {
        this.syncSearch = this.regionCount;
        return -1;
      }
      this.syncSearch = region + 1;
      if (!this.recovering.test(region)) {
        this.recovering.set(region);
        return region;
      }
    }
    return -1;
  }

  /** Gives back a region taken by `nextResyncWork` without recovering it. */
  abandonResyncWork(region: number): void {
    this.recovering.clear(region);
  }

  /** Starts the resync cursor from region 0 again (resume, `resync` message, a leg came back). */
  restartResyncSearch(): void {
    this.syncSearch = 0;
  }

  /** Whether some out-of-sync region lies ahead of the cursor. */
  get resyncSearchExhausted(): boolean {
    return this.syncSearch >= this.regionCount;
  }

  /** The value to pass to `waitDirtyDurable` for the marks made so far. */
  get dirtyMark(): number {
    return this.dirtySeq;
  }

  /** Whether every clean bit cleared up to `mark` is durable already (no need to wait). */
  isDirtyDurable(mark: number): boolean {
    return this.durableDirtySeq >= mark;
  }

  /** Resolves once every clean bit cleared up to `mark` is durable on the log device. */
  async waitDirtyDurable(mark: number): Promise<void> {
    while (this.durableDirtySeq < mark) await this.flush();
  }

  /**
   * Writes the log if it changed (`disk_flush`). Concurrent callers share one write; a caller
   * arriving during a write waits for the next one, which starts after it.
   */
  flush(): Promise<void> {
    if (!this.running) return this.startFlush();
    if (!this.queued) {
      const queued = this.running
        .catch(() => undefined)
        .then(() => {
          if (this.queued === queued) this.queued = null;
          return this.running ?? this.startFlush();
        });
      this.queued = queued;
    }
    return this.queued;
  }

  private startFlush(): Promise<void> {
    const run = this.flushNow().finally(() => {
      if (this.running === run) this.running = null;
    });
    this.running = run;
    return run;
  }

  private async flushNow(): Promise<void> {
    if (!this.touchedCleaned && !this.touchedDirtied) return;
    const cleaned = this.touchedCleaned;
    const dirtied = this.touchedDirtied;
    const mark = this.dirtySeq;
    this.touchedCleaned = false;
    this.touchedDirtied = false;
    if (!this.device || !this.buffer) {
      this.durableDirtySeq = Math.max(this.durableDirtySeq, mark);
      return;
    }
    this.buffer.writeUInt32LE(this.staleLegsMask, UDM_LOG_EXTENSION_OFFSET + 8);
    // Snapshot first: a clean bit set after this point waits for the next flush and its leg flush.
    const image = Buffer.from(this.buffer);
    if (cleaned && this.flushLegs && !(await this.flushLegs())) {
      // As disk_flush: we can no longer tell clean from dirty, so everything is dirty from now on.
      this.flushFailed = true;
      this.clean.fill(false);
      image.fill(0, MIRROR_LOG_BITMAP_OFFSET);
    }
    try {
      await this.device.write(0, image);
    } catch (err) {
      this.deviceFailed = true;
      this.touchedCleaned ||= cleaned;
      this.touchedDirtied ||= dirtied;
      throw err;
    }
    if (dirtied || this.flushFailed) {
      try {
        await this.device.flush();
      } catch (err) {
        this.deviceFlushFailed = true;
        this.deviceFailed = true;
        this.touchedDirtied = true;
        throw err;
      }
    }
    this.durableDirtySeq = Math.max(this.durableDirtySeq, mark);
  }

  /**
   * Log part of `dmsetup table`: `core 1 1024`, `disk 3 log.img 1024 sync`. `nosync` is printed
   * only until the log is initialised, so a table written back (`udm table`) never asks a later
   * activation to trust the legs.
   */
  tableArgs(): string {
    const syncArg =
      this.sync === "default" || (this.sync === "nosync" && this.initialised) ? [] : [this.sync];
    const args = this.device
      ? [this.device.name, String(this.regionSectors), ...syncArg]
      : [String(this.regionSectors), ...syncArg];
    return `${this.type} ${args.length} ${args.join(" ")}`;
  }

  /** Log part of `dmsetup status`: `1 core` or `3 disk <dev> <A|D|F>`. */
  statusArgs(): string {
    if (!this.device) return "1 core";
    const health = this.deviceFlushFailed ? "F" : this.deviceFailed ? "D" : "A";
    return `3 disk ${this.device.name} ${health}`;
  }

  private writeHeaderFields(): void {
    if (!this.buffer) return;
    this.buffer.writeUInt32LE(MIRROR_LOG_MAGIC, 0);
    this.buffer.writeUInt32LE(MIRROR_LOG_VERSION, 4);
    this.buffer.writeBigUInt64LE(BigInt(this.regionCount), 8);
    this.buffer.writeUInt32LE(UDM_LOG_EXTENSION_MAGIC, UDM_LOG_EXTENSION_OFFSET);
    this.buffer.writeUInt32LE(this.regionSectors, UDM_LOG_EXTENSION_OFFSET + 4);
    this.buffer.writeUInt32LE(this.legStaleBits?.length ?? 0, UDM_LOG_EXTENSION_OFFSET + 12);
  }
}

/** Bytes a udm disk log occupies: the kernel's area, then one stale bitset per leg. */
export function udmLogBytes(regionCount: number, legCount: number, logicalBlockSize = 512): number {
  const legArea = legCount * bitsetBytes(regionCount);
  return (
    diskLogBytes(regionCount, logicalBlockSize) + Math.ceil(legArea / logicalBlockSize) * logicalBlockSize
  );
}

/** Bytes a disk log occupies: header sector(s) + bitmap, rounded up to the logical block size. */
export function diskLogBytes(regionCount: number, logicalBlockSize = 512): number {
  const raw = MIRROR_LOG_BITMAP_OFFSET + bitsetBytes(regionCount);
  return Math.ceil(raw / logicalBlockSize) * logicalBlockSize;
}

/** What `inspectDiskLog` found on a disk log device. */
export interface DiskLogInfo {
  regionCount: number;
  cleanRegions: number;
  clean: (region: number) => boolean;
  /** Region size, when a udm mirror wrote the log (the kernel format does not record it). */
  regionSectors?: number;
}

/**
 * Reads a dm-log disk log (written by udm or the kernel) without activating a mirror.
 *
 * @example
 * ```ts
 * const info = await inspectDiskLog(await openDevice("mirror.log"));
 * console.log(`${info.cleanRegions}/${info.regionCount} regions clean`);
 * ```
 */
export async function inspectDiskLog(dev: BlockDevice): Promise<DiskLogInfo> {
  if (dev.sizeBytes < MIRROR_LOG_BITMAP_OFFSET) {
    throw new MirrorLogFormatError(dev.name, `${dev.sizeBytes} bytes is too small for a mirror log`);
  }
  const header = await dev.read(0, 24);
  const magic = header.readUInt32LE(0);
  if (magic !== MIRROR_LOG_MAGIC) {
    throw new MirrorLogFormatError(
      dev.name,
      `no mirror log: magic 0x${magic.toString(16).padStart(8, "0")}, expected 0x${MIRROR_LOG_MAGIC.toString(16)} ("MiRr")`,
    );
  }
  const version = header.readUInt32LE(4);
  if (version !== 1 && version !== MIRROR_LOG_VERSION) {
    throw new MirrorLogFormatError(dev.name, `dm-log version ${version}, expected ${MIRROR_LOG_VERSION}`);
  }
  const regionCount = Number(header.readBigUInt64LE(8));
  if (regionCount > MAX_LOG_REGIONS) {
    throw new MirrorLogFormatError(dev.name, `region count ${regionCount} exceeds ${MAX_LOG_REGIONS}`);
  }
  const bytes = bitsetBytes(regionCount);
  if (MIRROR_LOG_BITMAP_OFFSET + bytes > dev.sizeBytes) {
    throw new MirrorLogFormatError(
      dev.name,
      `${regionCount} regions need ${MIRROR_LOG_BITMAP_OFFSET + bytes} bytes, the device has ${dev.sizeBytes}`,
    );
  }
  const bits = new RegionBitset(regionCount, await dev.read(MIRROR_LOG_BITMAP_OFFSET, bytes));
  const info: DiskLogInfo = {
    regionCount,
    cleanRegions: bits.count(),
    clean: (region) => region >= 0 && region < regionCount && bits.test(region),
  };
  if (header.readUInt32LE(UDM_LOG_EXTENSION_OFFSET) === UDM_LOG_EXTENSION_MAGIC) {
    info.regionSectors = header.readUInt32LE(UDM_LOG_EXTENSION_OFFSET + 4);
  }
  return info;
}
