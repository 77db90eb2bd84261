import { SECTOR_SIZE, type TargetDevice } from "@udm/kcopyd";
import { DeviceManager } from "./device-manager.js";
import { canonicalSpec } from "./device-pool.js";
import type { Logger } from "./logger.js";
import { createProgress } from "./progress.js";
import { parseDeviceTable } from "./table-parser.js";
import { allTargets, registerDeviceSchemes } from "./targets.js";
import { UsageError } from "./usage-error.js";

/** How often the offline resync polls the mirror's progress. */
const RESYNC_POLL_MS = 50;

export interface OfflineResyncOptions {
  primary: string;
  legs: string[];
  regionSectors: number;
  /** Disk log device; without it a core (memory) log, which resyncs everything. */
  log?: string;
  /** Resync every region, whatever the log says (`sync`). */
  full: boolean;
  tty?: boolean;
}

export interface OfflineResyncSummary {
  regions: number;
  regionsCopied: number;
  bytes: number;
  seconds: number;
  inSync: boolean;
  status: string;
}

/** Parses `<#legs> <legs...> <in_sync>/<total> 1 <health> ...` of a mirror status line. */
export function parseMirrorStatus(
  status: string,
): { inSync: number; regions: number; health: string } | null {
  const words = status.trim().split(/\s+/);
  const legs = Number(words[0]);
  const counts = /^(\d+)\/(\d+)$/.exec(words[legs + 1] ?? "");
  const health = words[legs + 3];
  if (!Number.isInteger(legs) || !counts || health === undefined) return null;
  return { inSync: Number(counts[1]), regions: Number(counts[2]), health };
}

/**
 * `udm mirror resync PRIMARY LEG...` offline: builds a mirror of the devices (with the disk log,
 * so only regions it marks out of sync are copied, or everything with `full` / a core log), waits
 * for the resync with a progress bar, flushes and closes. `inSync` is true when every leg is in sync.
 *
 * @example
 * ```ts
 * const s = await runOfflineResync({ primary: "a.img", legs: ["b.img"], regionSectors: 1024, log: "m.log", full: false }, log);
 * ```
 */
export async function runOfflineResync(
  options: OfflineResyncOptions,
  log: Logger,
): Promise<OfflineResyncSummary> {
  if (options.legs.length < 1 || options.legs.length > 8) {
    throw new UsageError(
      `a mirror has 2 to 9 legs: give PRIMARY and 1 to 8 more, got ${options.legs.length + 1}`,
    );
  }
  registerDeviceSchemes();
  const manager = new DeviceManager({ targets: allTargets(), log });
  const cwd = process.cwd();
  try {
    const primary = await manager.pool.acquire(canonicalSpec(options.primary, cwd), { readOnly: false });
    const sectors = Math.floor(primary.sizeBytes / SECTOR_SIZE);
    await manager.pool.release(canonicalSpec(options.primary, cwd));
    const sync = options.full ? ["sync"] : [];
    const logArgs = options.log
      ? ["disk", String(2 + sync.length), options.log, String(options.regionSectors), ...sync]
      : ["core", String(1 + sync.length), String(options.regionSectors), ...sync];
    const legs = [options.primary, ...options.legs].flatMap((l) => [l, "0"]);
    const line = `0 ${sectors} mirror ${[...logArgs, String(legs.length / 2), ...legs].join(" ")}`;
    const table = parseDeviceTable("resync", line, "mirror resync", manager.registry);
    await manager.create([{ table, baseDir: cwd }]);
    const mirror = manager.device("resync").current as TargetDevice & {
      resyncedRegions?: number;
      resyncedBytes?: number;
    };
    const started = process.hrtime.bigint();
    const first = mirror.progress?.() ?? null;
    const progress = first
      ? createProgress("resync", first.totalBytes, options.tty === undefined ? {} : { tty: options.tty })
      : undefined;
    for (let p = first; p; p = mirror.progress?.() ?? null) {
      progress?.update(p.doneBytes, p.totalBytes);
      const s = parseMirrorStatus(mirror.status());
      if (s && /[^A]/.test(s.health)) break; // a failed leg: the resync cannot finish
      await new Promise((r) => setTimeout(r, RESYNC_POLL_MS));
    }
    await mirror.flush();
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    const status = mirror.status();
    const s = parseMirrorStatus(status);
    if (s !== null && s.inSync === s.regions) progress?.done();
    else progress?.stop();
    return {
      regions: s?.regions ?? 0,
      regionsCopied: mirror.resyncedRegions ?? 0,
      bytes: mirror.resyncedBytes ?? 0,
      seconds,
      inSync: s !== null && s.inSync === s.regions && !/[^A]/.test(s.health),
      status,
    };
  } finally {
    await manager.closeAll();
  }
}
