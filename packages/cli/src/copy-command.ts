import { existsSync, readFileSync, rmSync, statSync } from "node:fs";
import { constants } from "node:os";
import { dirname, resolve } from "node:path";
import {
  type BlockDevice,
  DEFAULT_KCOPYD_PAGES,
  formatSize,
  KCOPYD_MAX_REGIONS,
  KcopydClient,
  KcopydFlags,
  SECTOR_SIZE,
} from "@udm/kcopyd";
import { DeviceManager, type TableRequest } from "./device-manager.js";
import { canonicalSpec } from "./device-pool.js";
import type { Logger } from "./logger.js";
import { createProgress } from "./progress.js";
import { parseTableFile } from "./table-parser.js";
import { allTargets, registerDeviceSchemes } from "./targets.js";
import { UsageError } from "./usage-error.js";

export interface CopyOptions {
  /** First sector, on the source and every destination. */
  sector: number;
  /** Sectors to copy (default: the rest of the source). */
  count?: number;
  pages?: number;
  ignoreError: boolean;
  seq: boolean;
  /**
   * Source holes become write-zeroes on the destinations (a file keeps them as holes), as cp,
   * nbdcopy and qemu-img convert do; false (`--dense`) reads and writes every sector like the
   * kernel's kcopyd.
   */
  skipHoles: boolean;
  /** On SIGINT/SIGTERM, keep destination files the copy created instead of removing them. */
  keepPartial?: boolean;
  /** Table files whose devices may be named `@NAME` (built offline, in this process). */
  tableFiles: string[];
  /** Inline `NAME: <start> <length> <target> <args>` lines, same purpose. */
  tableLines: string[];
  /** Force the progress bar on or off (default: when stderr is a TTY). */
  tty?: boolean;
}

/** What `udm copy` did. */
export interface CopySummary {
  bytes: number;
  /** Bytes the source holds as data in the copied range (the rest are holes, kept as holes). */
  dataBytes?: number;
  seconds: number;
  readErr: boolean;
  /** Bit i set when destination i failed (a write or the final flush). */
  writeErr: number;
}

/**
 * `udm copy SRC DEST...`: one kcopyd job from SRC to 1..8 destinations, with a progress bar,
 * then a flush of every destination. Devices are specs (`a.img`, `file:`, `mem:`, `nbd://`) or
 * `@NAME` of a device in `--table-file`/`--table` (e.g. an `error` target to test failure paths).
 *
 * @example
 * ```ts
 * const summary = await runCopy("a.img", ["b.img", "c.img"], { sector: 0, ignoreError: false, seq: false, skipHoles: true, tableFiles: [], tableLines: [] }, log);
 * ```
 */
export async function runCopy(
  src: string,
  dests: string[],
  options: CopyOptions,
  log: Logger,
): Promise<CopySummary> {
  if (dests.length < 1 || dests.length > KCOPYD_MAX_REGIONS) {
    throw new UsageError(`udm copy takes 1 to ${KCOPYD_MAX_REGIONS} destinations, got ${dests.length}`);
  }
  registerDeviceSchemes();
  const manager = new DeviceManager({
    targets: allTargets(),
    log,
    kcopyd: new KcopydClient({ pages: options.pages ?? DEFAULT_KCOPYD_PAGES }),
  });
  const cwd = process.cwd();
  const requests: TableRequest[] = [];
  for (const file of options.tableFiles) {
    const text = readFileSync(file, "utf8");
    for (const table of parseTableFile(text, file, manager.registry)) {
      requests.push({ table, baseDir: dirname(resolve(file)) });
    }
  }
  if (options.tableLines.length) {
    for (const table of parseTableFile(options.tableLines.join("\n"), "--table", manager.registry)) {
      requests.push({ table, baseDir: cwd });
    }
  }
  const held: string[] = [];
  let interrupt: ((signal: NodeJS.Signals) => void) | undefined;
  try {
    await manager.create(requests);
    const open = async (spec: string, readOnly: boolean, createSizeBytes?: number): Promise<BlockDevice> => {
      if (spec.startsWith("@")) return manager.device(spec.slice(1));
      const canonical = canonicalSpec(spec, cwd);
      const dev = await manager.pool.acquire(canonical, {
        readOnly,
        ...(createSizeBytes !== undefined && { createSizeBytes }),
      });
      held.push(canonical);
      return dev;
    };
    checkDestinations(src, dests, cwd);
    const source = await open(src, true);
    const sourceSectors = Math.floor(source.sizeBytes / SECTOR_SIZE);
    if (options.sector > sourceSectors) {
      throw new UsageError(`--sector ${options.sector} is past the end of ${src} (${sourceSectors} sectors)`);
    }
    const count = options.count ?? sourceSectors - options.sector;
    if (options.sector + count > sourceSectors) {
      throw new UsageError(
        `${src} has ${sourceSectors} sectors: cannot copy ${count} from sector ${options.sector}`,
      );
    }
    // Like cp and dd: a destination file that does not exist yet is created (sparse), as large as
    // the end of what is copied (the whole source without --count/--size).
    const endBytes = options.count === undefined ? source.sizeBytes : (options.sector + count) * SECTOR_SIZE;
    const targets: BlockDevice[] = [];
    const created: string[] = [];
    let doneBytes = 0;
    let progress: ReturnType<typeof createProgress> | undefined;
    const totalBytes = count * SECTOR_SIZE;
    // Ctrl-C / SIGTERM: the cursor back, a line on what was and was not copied, the files this
    // copy created removed (unless --keep-partial), and 128 + the signal number as exit status.
    interrupt = (signal: NodeJS.Signals) => {
      progress?.stop();
      const removed = options.keepPartial ? [] : created;
      for (const path of removed) rmSync(path, { force: true });
      const kept = created.filter((p) => !removed.includes(p));
      process.stderr.write(
        `udm: copy interrupted by ${signal}: ${formatSize(doneBytes)} of ${formatSize(totalBytes)} copied from sector ${options.sector}, ${formatSize(totalBytes - doneBytes)} not copied` +
          `${removed.length ? `; removed ${removed.join(", ")} (created by this copy; --keep-partial keeps it)` : ""}` +
          `${kept.length ? `; kept the partial ${kept.join(", ")}` : ""}\n`,
      );
      process.exit(128 + (constants.signals[signal] ?? 0));
    };
    process.once("SIGINT", interrupt);
    process.once("SIGTERM", interrupt);
    for (const d of dests) {
      const missing = missingFile(d);
      // Recorded first: an interrupt while the file is being created removes it too.
      if (missing) created.push(canonicalSpec(d, cwd));
      targets.push(await open(d, false, missing ? endBytes : undefined));
    }
    targets.forEach((t, i) => {
      if (options.sector + count > t.sizeBytes / SECTOR_SIZE) {
        throw new UsageError(
          `destination ${i} (${dests[i]}) has ${Math.floor(t.sizeBytes / SECTOR_SIZE)} sectors, the copy needs ${options.sector + count}`,
        );
      }
      if (t.readOnly) throw new UsageError(`destination ${i} (${dests[i]}) is read-only`);
    });

    let flags = 0;
    if (options.ignoreError) flags |= KcopydFlags.IGNORE_ERROR;
    if (options.seq) flags |= KcopydFlags.WRITE_SEQ;
    if (options.skipHoles) flags |= KcopydFlags.SKIP_HOLES;
    const dataBytes = options.skipHoles
      ? await dataBytesOf(source, options.sector * SECTOR_SIZE, totalBytes).catch(() => undefined)
      : undefined;
    progress = createProgress("copy", totalBytes, options.tty === undefined ? {} : { tty: options.tty });
    const onProgress = (p: { doneSectors: number }) => {
      doneBytes = p.doneSectors * SECTOR_SIZE;
      progress?.update(doneBytes);
    };
    manager.kcopyd.on("progress", onProgress);
    const started = process.hrtime.bigint();
    log.debug({ src, dests, sector: options.sector, count, flags }, "copy started");
    const result = await manager.kcopyd.copyAsync(
      { dev: source, sector: options.sector, count },
      targets.map((dev) => ({ dev, sector: options.sector, count })),
      flags,
    );
    let writeErr = result.writeErr;
    // kcopyd copies whole sectors; a source whose size is not a multiple of 512 ends in a partial
    // sector, copied here so that a whole-file copy is byte-identical.
    const tailStart = (options.sector + count) * SECTOR_SIZE;
    const tailBytes = options.count === undefined ? source.sizeBytes - tailStart : 0;
    if (tailBytes > 0 && !(result.readErr && !options.ignoreError)) {
      let tail: Buffer | undefined;
      try {
        tail = await source.read(tailStart, tailBytes);
      } catch (err) {
        log.error({ src, err }, "reading the partial last sector failed");
      }
      await Promise.all(
        targets.map(async (t, i) => {
          if (!tail || (writeErr & (1 << i) && !options.ignoreError)) return;
          try {
            if (t.sizeBytes < tailStart + tailBytes)
              throw new RangeError(`${dests[i]} ends before the source's last ${tailBytes} bytes`);
            await t.write(tailStart, tail);
          } catch (err) {
            log.error({ dest: dests[i], err }, "writing the partial last sector failed");
            writeErr |= 1 << i;
          }
        }),
      );
      if (!tail) result.readErr = true;
    }
    // Completed writes are only durable after a flush; a destination that cannot flush failed.
    await Promise.all(
      targets.map(async (t, i) => {
        if (writeErr & (1 << i)) return;
        try {
          await t.flush();
        } catch (err) {
          log.error({ dest: dests[i], err }, "flush failed");
          writeErr |= 1 << i;
        }
      }),
    );
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    manager.kcopyd.off("progress", onProgress);
    if (result.readErr || writeErr) progress.stop();
    else progress.done();
    return {
      bytes: totalBytes + Math.max(tailBytes, 0),
      ...(dataBytes !== undefined && { dataBytes: dataBytes + Math.max(tailBytes, 0) }),
      seconds,
      readErr: result.readErr,
      writeErr,
    };
  } finally {
    if (interrupt) {
      process.off("SIGINT", interrupt);
      process.off("SIGTERM", interrupt);
    }
    for (const spec of held) await manager.pool.release(spec).catch(() => undefined);
    await manager.closeAll();
  }
}

/**
 * The final line of `udm copy`: bytes, MiB/s and the error bit mask. When holes were kept, the
 * rate is that of the data (holes cost no I/O: counting them gives absurd rates).
 */
export function formatCopySummary(summary: CopySummary, dests: string[]): string {
  const failed = dests.filter((_, i) => summary.writeErr & (1 << i)).map((d, _i) => d);
  const sparse = summary.dataBytes !== undefined && summary.dataBytes < summary.bytes;
  const rateBytes = sparse ? summary.dataBytes! : summary.bytes;
  const mibps = rateBytes / 2 ** 20 / Math.max(summary.seconds, 1e-6);
  const sizeText = sparse
    ? `${formatSize(summary.bytes)}: ${formatSize(summary.dataBytes!)} data, ${formatSize(summary.bytes - summary.dataBytes!)} holes kept`
    : formatSize(summary.bytes);
  return (
    `copied ${summary.bytes} bytes (${sizeText}) to ${dests.length} destination(s) in ` +
    `${summary.seconds.toFixed(2)} s, ${mibps.toFixed(1)} MiB/s${sparse ? " of data" : ""}; read error: ${summary.readErr ? "yes" : "no"}; ` +
    `write error mask: 0x${summary.writeErr.toString(16)}${failed.length ? ` (failed: ${failed.join(", ")})` : ""}`
  );
}

/** Bytes of `dev` in `[offsetBytes, +lengthBytes)` that its extents call data. */
async function dataBytesOf(dev: BlockDevice, offsetBytes: number, lengthBytes: number): Promise<number> {
  if (lengthBytes === 0) return 0;
  let data = 0;
  for (const e of await dev.extents(offsetBytes, lengthBytes)) {
    if (e.kind !== "data") continue;
    const start = Math.max(e.offsetBytes, offsetBytes);
    const end = Math.min(e.offsetBytes + e.lengthBytes, offsetBytes + lengthBytes);
    if (end > start) data += end - start;
  }
  return data;
}

/**
 * Refuses a destination that is the source (same spec, or the same file by another path: the
 * copy would read what it writes) and a destination file whose folder does not exist.
 */
function checkDestinations(src: string, dests: string[], cwd: string): void {
  const source = canonicalSpec(src, cwd);
  const sourceId = fileIdentity(src, cwd);
  dests.forEach((d, i) => {
    const dest = canonicalSpec(d, cwd);
    const destId = fileIdentity(d, cwd);
    if (dest === source || (sourceId !== undefined && destId === sourceId)) {
      throw new UsageError(`destination ${i} (${d}) is the source ${src}: a copy needs another device`);
    }
    if (missingFile(d)) {
      const folder = dirname(dest);
      if (!existsSync(folder)) {
        throw new Error(
          `destination ${i} (${d}): folder ${folder} does not exist (udm copy creates files, not folders)`,
        );
      }
    }
  });
}

/** "dev:ino" of a spec naming an existing file, else undefined. */
function fileIdentity(spec: string, cwd: string): string | undefined {
  if (spec.startsWith("@") || spec.startsWith("mem:") || /^[a-z][a-z0-9+.-]*:\/\//i.test(spec))
    return undefined;
  try {
    const st = statSync(canonicalSpec(spec, cwd));
    return `${st.dev}:${st.ino}`;
  } catch {
    return undefined;
  }
}

/** A destination naming a regular file path (plain or `file:`) that does not exist yet. */
function missingFile(spec: string): boolean {
  if (spec.startsWith("@")) return false;
  const path = spec.startsWith("file:") ? spec.slice(5) : spec;
  if (/^[a-z][a-z0-9+.-]*:/i.test(path)) return false;
  return !existsSync(path);
}
