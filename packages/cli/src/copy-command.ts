import { existsSync, readFileSync } from "node:fs";
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
  skipHoles: boolean;
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
    const source = await open(src, true);
    const targets: BlockDevice[] = [];
    // Like cp and dd: a destination file that does not exist yet is created (sparse, the source's size).
    for (const d of dests) targets.push(await open(d, false, missingFile(d) ? source.sizeBytes : undefined));

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
    const totalBytes = count * SECTOR_SIZE;
    const progress = createProgress(
      "copy",
      totalBytes,
      options.tty === undefined ? {} : { tty: options.tty },
    );
    const onProgress = (p: { doneSectors: number }) => progress.update(p.doneSectors * SECTOR_SIZE);
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
    progress.update(totalBytes);
    progress.stop();
    return { bytes: totalBytes + Math.max(tailBytes, 0), seconds, readErr: result.readErr, writeErr };
  } finally {
    for (const spec of held) await manager.pool.release(spec).catch(() => undefined);
    await manager.closeAll();
  }
}

/** The final line of `udm copy`: bytes, MiB/s and the error bit mask. */
export function formatCopySummary(summary: CopySummary, dests: string[]): string {
  const mibps = summary.bytes / 2 ** 20 / Math.max(summary.seconds, 1e-6);
  const failed = dests.filter((_, i) => summary.writeErr & (1 << i)).map((d, _i) => d);
  return (
    `copied ${summary.bytes} bytes (${formatSize(summary.bytes)}) to ${dests.length} destination(s) in ` +
    `${summary.seconds.toFixed(2)} s, ${mibps.toFixed(1)} MiB/s; read error: ${summary.readErr ? "yes" : "no"}; ` +
    `write error mask: 0x${summary.writeErr.toString(16)}${failed.length ? ` (failed: ${failed.join(", ")})` : ""}`
  );
}

/** A destination naming a regular file path (plain or `file:`) that does not exist yet. */
function missingFile(spec: string): boolean {
  if (spec.startsWith("@")) return false;
  const path = spec.startsWith("file:") ? spec.slice(5) : spec;
  if (/^[a-z][a-z0-9+.-]*:/i.test(path)) return false;
  return !existsSync(path);
}
