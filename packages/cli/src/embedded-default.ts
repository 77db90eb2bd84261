import { existsSync, readFileSync, unlinkSync, writeFileSync } from "node:fs";
import { mkdir, open, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { FileDevice, isProcessAlive, SECTOR_SIZE } from "@udm/kcopyd";
import { DirtyRegionLog } from "@udm/mirror";

/** Name of the table file `udm serve` reads from (and writes into) the data directory. */
export const DEFAULT_TABLE_FILE = "udm.table";

/** Sizes of the embedded default's sparse files. */
export const DEFAULT_ORIGIN_BYTES = 1024 * 2 ** 20;
/** Big enough to hold a copy of the whole origin plus metadata: the snapshot cannot overflow. */
export const DEFAULT_COW_BYTES = DEFAULT_ORIGIN_BYTES + 64 * 2 ** 20;
export const DEFAULT_MIRROR_BYTES = 1024 * 2 ** 20;
/** dm-log header (1 KiB) plus the clean bitmap of 2048 regions; 1 MiB leaves room to grow. */
export const DEFAULT_MIRROR_LOG_BYTES = 2 ** 20;
/** 512 KiB regions, as LVM's default. */
export const DEFAULT_REGION_SECTORS = 1024;
/** 4 KiB chunks, as lvcreate's default. */
export const DEFAULT_CHUNK_SECTORS = 8;

/** The table the embedded default writes: relative paths resolve against the data directory. */
export function defaultTableText(): string {
  const originSectors = DEFAULT_ORIGIN_BYTES / 512;
  const mirrorSectors = DEFAULT_MIRROR_BYTES / 512;
  return `# udm table, written by "udm serve" on first start; edit it and restart to change the devices.
# Format: NAME: <start> <length> <target> <args...> (sectors of 512 bytes, as dmsetup);
# relative paths are relative to this file's directory; @NAME refers to another device.

# A snapshot origin: write here; snap0 keeps the content as it was when snap0 was made.
origin: 0 ${originSectors} snapshot-origin origin.img

# A persistent snapshot of origin (kernel-compatible COW, ${DEFAULT_CHUNK_SECTORS}-sector chunks).
snap0: 0 ${originSectors} snapshot origin.img snap0.cow P ${DEFAULT_CHUNK_SECTORS}

# A two-leg mirror with a disk log (${DEFAULT_REGION_SECTORS}-sector regions). Both legs started empty, so the
# log was created in sync; it keeps which regions are dirty across restarts (no "nosync" here:
# that would trust the legs again after a crash).
mirror0: 0 ${mirrorSectors} mirror disk 2 mirror0.log ${DEFAULT_REGION_SECTORS} 2 mirror0-a.img 0 mirror0-b.img 0
`;
}

/**
 * Writes a new dm-log into the embedded mirror's log, every region clean: the legs were just
 * created empty, so they are identical (what `nosync` does at a first activation, done once
 * here so the table never has to say `nosync`).
 */
async function initMirrorLogInSync(path: string): Promise<void> {
  const device = await FileDevice.open(path);
  try {
    const log = new DirtyRegionLog({
      regionSectors: DEFAULT_REGION_SECTORS,
      targetSectors: DEFAULT_MIRROR_BYTES / SECTOR_SIZE,
      sync: "nosync",
      device,
      legCount: 2,
    });
    await log.resume();
    await device.flush();
  } finally {
    await device.close();
  }
}

async function sparseFile(path: string, sizeBytes: number): Promise<void> {
  if (existsSync(path)) return;
  const handle = await open(path, "wx", 0o600);
  try {
    await handle.truncate(sizeBytes);
  } finally {
    await handle.close();
  }
}

/**
 * Makes sure the embedded default exists in `dataDir` and returns its table file: on the first
 * start creates the directory, the sparse files and the table; later starts reuse them (the
 * table the user may have edited, the COW with its exceptions, the mirror log).
 *
 * @example
 * ```ts
 * const table = await ensureEmbeddedDefault("udm-data"); // "udm-data/udm.table"
 * ```
 */
export async function ensureEmbeddedDefault(
  dataDir: string,
): Promise<{ tableFile: string; created: boolean }> {
  const tableFile = join(dataDir, DEFAULT_TABLE_FILE);
  if (existsSync(tableFile)) return { tableFile, created: false };
  await mkdir(dataDir, { recursive: true, mode: 0o700 });
  await sparseFile(join(dataDir, "origin.img"), DEFAULT_ORIGIN_BYTES);
  await sparseFile(join(dataDir, "snap0.cow"), DEFAULT_COW_BYTES);
  await sparseFile(join(dataDir, "mirror0-a.img"), DEFAULT_MIRROR_BYTES);
  await sparseFile(join(dataDir, "mirror0-b.img"), DEFAULT_MIRROR_BYTES);
  await sparseFile(join(dataDir, "mirror0.log"), DEFAULT_MIRROR_LOG_BYTES);
  await initMirrorLogInSync(join(dataDir, "mirror0.log"));
  // Written last: its presence means the data files are complete.
  await writeFile(`${tableFile}.tmp`, defaultTableText(), { mode: 0o644 });
  await rename(`${tableFile}.tmp`, tableFile);
  return { tableFile, created: true };
}

/** Name of the file that marks a data directory as in use by a running `udm serve`. */
export const DATA_DIR_LOCK_FILE = "serve.pid";

/**
 * Marks `dataDir` as used by this process (`serve.pid`), so two servers never open the same COW
 * and mirror log. A lock whose process is gone is taken over. Returns the unlock function.
 *
 * @example
 * ```ts
 * const unlock = lockDataDir("udm-data");
 * try { ... } finally { unlock(); }
 * ```
 */
export function lockDataDir(dataDir: string): () => void {
  const path = join(dataDir, DATA_DIR_LOCK_FILE);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(path, `${process.pid}\n`, { flag: "wx", mode: 0o644 });
      return () => {
        try {
          if (readFileSync(path, "utf8").trim() === String(process.pid)) unlinkSync(path);
        } catch {}
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      const pid = Number(readFileSync(path, "utf8").trim());
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && isProcessAlive(pid)) {
        throw new Error(`${dataDir} is in use by another udm serve (pid ${pid}); stop it first`);
      }
      unlinkSync(path); // stale: its process is gone
    }
  }
  throw new Error(`cannot lock ${dataDir}`);
}
