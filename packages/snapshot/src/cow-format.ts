/**
 * The persistent COW device layout of Linux dm-snapshot (`dm-snap-persistent.c`), byte for byte:
 * chunk 0 is the header, metadata areas of `{le64 old_chunk, le64 new_chunk}` pairs live at chunk
 * `1 + a * (epa + 1)`, each followed by `epa` data chunks. A COW written by udm loads in the
 * kernel and the other way round.
 *
 * @example
 * ```ts
 * import { MemoryDevice } from "@udm/kcopyd";
 * const cow = new MemoryDevice(1 << 20);
 * await initializeCow(cow, 8);
 * const info = await inspectCow(cow); // { valid: true, version: 1, chunkSectors: 8, exceptions: [] ... }
 * console.log(formatCowInspection(info));
 * ```
 */
import { type BlockDevice, SECTOR_SHIFT, SECTOR_SIZE } from "@udm/kcopyd";

/** `SNAP_MAGIC`: the le32 at byte 0, on disk `53 6e 41 70` ("SnAp"). */
export const SNAP_MAGIC = 0x70416e53;
/** `SNAPSHOT_DISK_VERSION`: the only on-disk version there is. */
export const SNAPSHOT_DISK_VERSION = 1;
/** `NUM_SNAPSHOT_HDR_CHUNKS`: the header takes chunk 0. */
export const SNAPSHOT_HEADER_CHUNKS = 1;
/** Bytes of the header fields (magic, valid, version, chunk_size); the rest of chunk 0 is zeros. */
export const SNAPSHOT_HEADER_BYTES = 16;
/** `sizeof(struct disk_exception)`: le64 old_chunk + le64 new_chunk. */
export const DISK_EXCEPTION_BYTES = 16;
/** `DM_CHUNK_SIZE_DEFAULT_SECTORS`: 16 KiB chunks when neither table nor header says. */
export const DEFAULT_CHUNK_SECTORS = 32;
/** Largest chunk the kernel accepts (`INT_MAX >> SECTOR_SHIFT`, rounded to a power of two). */
export const MAX_CHUNK_SECTORS = 2 ** 21;

/**
 * A COW device whose content is not a (usable) snapshot store: bad magic, unknown version,
 * impossible chunk size, or an exception table pointing outside the device. `field` names
 * the part that is wrong.
 */
export class CowFormatError extends Error {
  override name = "CowFormatError";
  constructor(
    readonly device: string,
    readonly field: "magic" | "version" | "chunk_size" | "size" | "exception" | "area",
    message: string,
  ) {
    super(`${device}: ${message}`);
  }
}

/** The 16 header bytes (`struct disk_header`). */
export interface CowHeader {
  magic: number;
  valid: boolean;
  version: number;
  chunkSectors: number;
}

/** `exceptions_per_area`: how many 16-byte pairs one chunk holds. */
export function exceptionsPerArea(chunkSectors: number): number {
  return (chunkSectors * SECTOR_SIZE) / DISK_EXCEPTION_BYTES;
}

/** `area_location`: the chunk index of metadata area `area`. */
export function areaLocation(area: number, chunkSectors: number): number {
  return SNAPSHOT_HEADER_CHUNKS + area * (exceptionsPerArea(chunkSectors) + 1);
}

/** True for chunk indexes that hold a metadata area (never handed out as data). */
export function isMetadataChunk(chunk: number, chunkSectors: number): boolean {
  return chunk % (exceptionsPerArea(chunkSectors) + 1) === SNAPSHOT_HEADER_CHUNKS;
}

/** `skip_metadata`: the next free chunk, stepping over a metadata area. */
export function skipMetadata(nextFree: number, chunkSectors: number): number {
  return isMetadataChunk(nextFree, chunkSectors) ? nextFree + 1 : nextFree;
}

/** Encodes chunk 0 as `write_header` does: the four fields, then zeros. */
export function encodeHeader(header: Omit<CowHeader, "magic">, chunkBytes: number): Buffer {
  const buf = Buffer.alloc(chunkBytes);
  buf.writeUInt32LE(SNAP_MAGIC, 0);
  buf.writeUInt32LE(header.valid ? 1 : 0, 4);
  buf.writeUInt32LE(header.version, 8);
  buf.writeUInt32LE(header.chunkSectors, 12);
  return buf;
}

/** Decodes the header fields; `magic` 0 means a fresh COW (no header yet). */
export function decodeHeader(buf: Buffer): CowHeader {
  return {
    magic: buf.readUInt32LE(0),
    valid: buf.readUInt32LE(4) !== 0,
    version: buf.readUInt32LE(8),
    chunkSectors: buf.readUInt32LE(12),
  };
}

/** Why a chunk size is not usable on these devices, or null if it is. */
export function chunkSizeProblem(chunkSectors: number, devices: BlockDevice[]): string | null {
  if (!Number.isInteger(chunkSectors) || chunkSectors <= 0) return "must be a positive number of sectors";
  if (chunkSectors & (chunkSectors - 1)) return "must be a power of two";
  if (chunkSectors > MAX_CHUNK_SECTORS) return `must be at most ${MAX_CHUNK_SECTORS} sectors`;
  for (const dev of devices) {
    const blockSectors = Math.max(1, dev.logicalBlockSize >> SECTOR_SHIFT);
    if (chunkSectors % blockSectors) {
      return `must be a multiple of ${dev.name}'s logical block size (${dev.logicalBlockSize} bytes)`;
    }
  }
  return null;
}

/** Reads and checks the header; returns null for a fresh (magic 0) COW. Throws CowFormatError. */
export async function readCowHeader(dev: BlockDevice): Promise<CowHeader | null> {
  const probe = Math.max(SECTOR_SIZE, dev.logicalBlockSize);
  if (dev.sizeBytes < probe) {
    throw new CowFormatError(dev.name, "size", `COW device of ${dev.sizeBytes} bytes cannot hold a header`);
  }
  const header = decodeHeader(await dev.read(0, probe));
  if (header.magic === 0) return null;
  if (header.magic !== SNAP_MAGIC) {
    const bytes = (await dev.read(0, 4)).toString("hex").replace(/(..)(?!$)/g, "$1 ");
    throw new CowFormatError(
      dev.name,
      "magic",
      `not a snapshot COW device: magic bytes are ${bytes}, expected 53 6e 41 70 ("SnAp") or zeros for a new COW`,
    );
  }
  if (header.version !== SNAPSHOT_DISK_VERSION) {
    throw new CowFormatError(
      dev.name,
      "version",
      `unsupported snapshot disk version ${header.version} (only version ${SNAPSHOT_DISK_VERSION} exists)`,
    );
  }
  const problem = chunkSizeProblem(header.chunkSectors, [dev]);
  if (problem) {
    throw new CowFormatError(dev.name, "chunk_size", `header chunk size ${header.chunkSectors} ${problem}`);
  }
  const chunkBytes = header.chunkSectors * SECTOR_SIZE;
  if (dev.sizeBytes < (SNAPSHOT_HEADER_CHUNKS + 1) * chunkBytes) {
    throw new CowFormatError(
      dev.name,
      "size",
      `COW device of ${dev.sizeBytes} bytes is smaller than header + first metadata area (${2 * chunkBytes} bytes)`,
    );
  }
  return header;
}

/** The committed exception table as loaded by `read_exceptions`. */
export interface ExceptionTable {
  /** Pairs in on-disk order (area 0 first). */
  exceptions: Array<{ oldChunk: number; newChunk: number }>;
  /** The first area that is not full (where the next commit goes). */
  currentArea: number;
  /** Entries in the current area. */
  currentCommitted: number;
  /** First free chunk: one past the highest data chunk referenced, metadata skipped. */
  nextFree: number;
  /** Content of the current area (the in-memory area the store keeps appending to). */
  currentAreaData: Buffer;
}

/**
 * Reads metadata areas 0, 1, ... until one is not full, as the kernel does, checking that every
 * pair points at a data chunk inside the device. Throws CowFormatError naming the bad entry.
 */
export async function readExceptionTable(dev: BlockDevice, chunkSectors: number): Promise<ExceptionTable> {
  const chunkBytes = chunkSectors * SECTOR_SIZE;
  const epa = exceptionsPerArea(chunkSectors);
  const totalChunks = Math.floor(dev.sizeBytes / chunkBytes);
  const exceptions: ExceptionTable["exceptions"] = [];
  const seenOld = new Map<number, number>();
  const seenNew = new Set<number>();
  let nextFree = SNAPSHOT_HEADER_CHUNKS + 1;
  for (let area = 0; ; area++) {
    const location = areaLocation(area, chunkSectors);
    if (location >= totalChunks) {
      throw new CowFormatError(
        dev.name,
        "area",
        `metadata area ${area - 1} is full, so area ${area} must follow at chunk ${location}, ` +
          `but the COW device ends at chunk ${totalChunks} (truncated COW device?)`,
      );
    }
    const data = await dev.read(location * chunkBytes, chunkBytes);
    for (let i = 0; i < epa; i++) {
      const oldBig = data.readBigUInt64LE(i * DISK_EXCEPTION_BYTES);
      const newBig = data.readBigUInt64LE(i * DISK_EXCEPTION_BYTES + 8);
      if (newBig === 0n) {
        return {
          exceptions,
          currentArea: area,
          currentCommitted: i,
          nextFree: skipMetadata(nextFree, chunkSectors),
          currentAreaData: data,
        };
      }
      const where = `exception ${i} of metadata area ${area} (chunk ${location})`;
      if (newBig >= BigInt(totalChunks) || isMetadataChunk(Number(newBig), chunkSectors) || newBig < 2n) {
        throw new CowFormatError(
          dev.name,
          "exception",
          `${where} maps origin chunk ${oldBig} to COW chunk ${newBig}, which is ${
            newBig >= BigInt(totalChunks)
              ? `past the end of the device (${totalChunks} chunks)`
              : "the header or a metadata area"
          }`,
        );
      }
      if (oldBig > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new CowFormatError(dev.name, "exception", `${where} has an impossible origin chunk ${oldBig}`);
      }
      const oldChunk = Number(oldBig);
      const newChunk = Number(newBig);
      if (seenNew.has(newChunk)) {
        throw new CowFormatError(
          dev.name,
          "exception",
          `${where} reuses COW chunk ${newChunk}, already mapped by an earlier entry`,
        );
      }
      const earlier = seenOld.get(oldChunk);
      if (earlier !== undefined) {
        throw new CowFormatError(
          dev.name,
          "exception",
          `${where} maps origin chunk ${oldChunk} a second time (first to COW chunk ${earlier})`,
        );
      }
      seenOld.set(oldChunk, newChunk);
      seenNew.add(newChunk);
      if (nextFree <= newChunk) nextFree = newChunk + 1;
      exceptions.push({ oldChunk, newChunk });
    }
  }
}

/** What `udm snapshot inspect` shows about a COW device. */
export interface CowInspection {
  valid: boolean;
  version: number;
  chunkSectors: number;
  exceptions: Array<{ oldChunk: number; newChunk: number }>;
  /** Metadata areas in use (the current, not yet full, one included). */
  metadataAreas: number;
  cowSizeBytes: number;
  /** Chunks allocated: header, areas and data up to the highest one referenced (the kernel's next_free). */
  usedChunks: number;
  totalChunks: number;
}

/**
 * Reads a COW device without changing it. Throws CowFormatError for a fresh (all-zero header),
 * foreign or corrupt device, naming what is wrong. An invalidated snapshot (valid = 0) reports
 * no exceptions, as the kernel does not read them either.
 *
 * @example
 * ```ts
 * const info = await inspectCow(await openDevice("cow.img", { readOnly: true }));
 * console.log(info.exceptions.length, "chunks copied");
 * ```
 */
export async function inspectCow(dev: BlockDevice): Promise<CowInspection> {
  const header = await readCowHeader(dev);
  if (!header) {
    throw new CowFormatError(
      dev.name,
      "magic",
      "no snapshot header: the first 4 bytes are zero (a fresh COW device that no snapshot has used yet)",
    );
  }
  const chunkBytes = header.chunkSectors * SECTOR_SIZE;
  const totalChunks = Math.floor(dev.sizeBytes / chunkBytes);
  const base = {
    valid: header.valid,
    version: header.version,
    chunkSectors: header.chunkSectors,
    cowSizeBytes: dev.sizeBytes,
    totalChunks,
  };
  if (!header.valid) {
    return { ...base, exceptions: [], metadataAreas: 1, usedChunks: SNAPSHOT_HEADER_CHUNKS + 1 };
  }
  const table = await readExceptionTable(dev, header.chunkSectors);
  return {
    ...base,
    exceptions: table.exceptions,
    metadataAreas: table.currentArea + 1,
    usedChunks: table.nextFree,
  };
}

/**
 * Human-readable text for `udm snapshot inspect`: header, layout, usage and the exception list
 * (runs of consecutive chunks folded into one line).
 */
export function formatCowInspection(i: CowInspection): string {
  const chunkBytes = i.chunkSectors * SECTOR_SIZE;
  const epa = exceptionsPerArea(i.chunkSectors);
  const pct = i.totalChunks ? ((100 * i.usedChunks) / i.totalChunks).toFixed(1) : "0.0";
  const lines = [
    `header:      SnAp version ${i.version}, ${i.valid ? "valid" : "INVALID (snapshot was dropped: COW full or I/O error)"}`,
    `chunk size:  ${i.chunkSectors} sectors (${chunkBytes} bytes), ${epa} exceptions per metadata area`,
    `COW size:    ${i.cowSizeBytes} bytes = ${i.totalChunks} chunks`,
    `usage:       ${i.usedChunks}/${i.totalChunks} chunks (${pct}%), ${i.metadataAreas} metadata area(s)`,
    `             dmsetup status: ${i.usedChunks * i.chunkSectors}/${Math.floor(i.cowSizeBytes / SECTOR_SIZE)} ${(i.metadataAreas + 1) * i.chunkSectors}`,
    `exceptions:  ${i.exceptions.length} chunk(s) copied (${i.exceptions.length * chunkBytes} bytes)`,
  ];
  let k = 0;
  while (k < i.exceptions.length) {
    const first = i.exceptions[k]!;
    let n = 1;
    while (
      k + n < i.exceptions.length &&
      i.exceptions[k + n]!.oldChunk === first.oldChunk + n &&
      i.exceptions[k + n]!.newChunk === first.newChunk + n
    ) {
      n++;
    }
    lines.push(
      n === 1
        ? `  origin chunk ${first.oldChunk} -> COW chunk ${first.newChunk}`
        : `  origin chunks ${first.oldChunk}-${first.oldChunk + n - 1} -> COW chunks ${first.newChunk}-${first.newChunk + n - 1}`,
    );
    k += n;
  }
  return lines.join("\n");
}

/**
 * Writes a fresh header and an empty metadata area 0, as the kernel does on first use of a
 * zeroed COW. Use it (or zero the first chunk) before reusing a COW device for a new snapshot.
 */
export async function initializeCow(dev: BlockDevice, chunkSectors = DEFAULT_CHUNK_SECTORS): Promise<void> {
  const problem = chunkSizeProblem(chunkSectors, [dev]);
  if (problem) throw new RangeError(`chunk size ${chunkSectors} ${problem}`);
  const chunkBytes = chunkSectors * SECTOR_SIZE;
  if (dev.sizeBytes < 2 * chunkBytes) {
    throw new RangeError(`${dev.name}: ${dev.sizeBytes} bytes cannot hold a header and a metadata area`);
  }
  await dev.write(0, encodeHeader({ valid: true, version: SNAPSHOT_DISK_VERSION, chunkSectors }, chunkBytes));
  await dev.write(areaLocation(0, chunkSectors) * chunkBytes, Buffer.alloc(chunkBytes));
  await dev.flush();
}
