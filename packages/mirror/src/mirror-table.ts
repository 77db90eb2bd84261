import { SECTOR_SIZE, TargetArgError } from "@udm/kcopyd";
import { type LogSyncMode, MAX_LOG_REGIONS } from "./dirty-log.js";

/** Fewest and most legs (`MAX_NR_MIRRORS` = kcopyd's 8 destinations + the source). */
export const MIN_MIRROR_LEGS = 2;
export const MAX_MIRROR_LEGS = 9;

/**
 * Most regions udm tracks (the kernel allows 2^32 - 1): per-region state costs about 2.4 bytes,
 * so this caps it near 160 MiB. A 1 TiB mirror needs regions of at least 32 sectors.
 */
export const MAX_MIRROR_REGIONS = 2 ** 26;

export const MIRROR_USAGE =
  "<core|disk> <#log_args> [<log_dev>] <region_size> [sync|nosync] <#legs> <dev> <offset>... [<#features> handle_errors [keep_log]]";

/** A parsed `mirror` table line, devices still as specs. */
export interface MirrorTable {
  logType: "core" | "disk";
  /** Spec of the disk log device (disk logs only). */
  logDevice?: string;
  /** Index of the log device argument, for errors about it. */
  logDeviceArg?: number;
  regionSectors: number;
  sync: LogSyncMode;
  legs: Array<{ spec: string; offsetSectors: number; argIndex: number }>;
  handleErrors: boolean;
  keepLog: boolean;
}

function uint(args: string[], index: number, what: string): number {
  const text = args[index];
  if (text === undefined) throw new TargetArgError(index, `missing ${what}`);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(Number(text))) {
    throw new TargetArgError(index, `${what} must be a non-negative whole number, got "${text}"`);
  }
  return Number(text);
}

/**
 * Parses the arguments of a `mirror` table line (after `<start> <length> mirror`), checking
 * everything that does not need the devices, with the kernel's rules (`mirror_ctr`,
 * `create_log_context`, `parse_features`). Errors name the argument and what was expected.
 *
 * @example
 * ```ts
 * parseMirrorTable("disk 2 mirror.log 1024 2 a.img 0 b.img 0 1 handle_errors".split(" "), 2097152);
 * ```
 */
export function parseMirrorTable(args: string[], targetSectors: number): MirrorTable {
  const logType = args[0];
  if (logType !== "core" && logType !== "disk") {
    throw new TargetArgError(
      0,
      logType === undefined
        ? `missing log type: expected ${MIRROR_USAGE}`
        : `unknown mirror log type "${logType}" (expected core or disk)`,
    );
  }
  const logArgCount = uint(args, 1, "log argument count");
  const [min, max] = logType === "core" ? [1, 2] : [2, 3];
  if (logArgCount < min || logArgCount > max) {
    throw new TargetArgError(
      1,
      `a ${logType} log takes ${min} or ${max} arguments (${logType === "disk" ? "<log_dev> " : ""}<region_size> [sync|nosync]), got ${logArgCount}`,
    );
  }
  if (args.length < 2 + logArgCount) {
    throw new TargetArgError(null, `${logArgCount} log arguments announced, only ${args.length - 2} given`);
  }
  let i = 2;
  const table: Partial<MirrorTable> = { logType };
  if (logType === "disk") {
    table.logDevice = args[i]!;
    table.logDeviceArg = i;
    i++;
  }
  const regionSectors = uint(args, i, "region size (sectors)");
  if (regionSectors < 2 || (regionSectors & (regionSectors - 1)) !== 0 || regionSectors > 2 ** 31) {
    throw new TargetArgError(
      i,
      `region size must be a power of two of at least 2 sectors, got ${regionSectors}`,
    );
  }
  if (regionSectors > targetSectors) {
    throw new TargetArgError(
      i,
      `region size ${regionSectors} sectors is larger than the mirror (${targetSectors} sectors)`,
    );
  }
  const regionCount = Math.ceil(targetSectors / regionSectors);
  if (regionCount > Math.min(MAX_LOG_REGIONS, MAX_MIRROR_REGIONS)) {
    const minimum = 2 ** Math.ceil(Math.log2(targetSectors / MAX_MIRROR_REGIONS));
    throw new TargetArgError(
      i,
      `region size ${regionSectors} gives ${regionCount} regions, more than ${MAX_MIRROR_REGIONS}: use at least ${minimum} sectors`,
    );
  }
  table.regionSectors = regionSectors;
  i++;
  table.sync = "default";
  if (i < 2 + logArgCount) {
    const s = args[i]!;
    if (s !== "sync" && s !== "nosync") {
      throw new TargetArgError(i, `unknown log sync argument "${s}" (expected sync or nosync)`);
    }
    table.sync = s;
    i++;
  }
  const legCountArg = i;
  if (args[i] === undefined) throw new TargetArgError(null, `missing leg count: expected ${MIRROR_USAGE}`);
  const legCount = uint(args, i, "leg count");
  if (legCount < MIN_MIRROR_LEGS || legCount > MAX_MIRROR_LEGS) {
    throw new TargetArgError(
      i,
      `a mirror has ${MIN_MIRROR_LEGS} to ${MAX_MIRROR_LEGS} legs, got ${legCount}`,
    );
  }
  i++;
  if (args.length < i + 2 * legCount) {
    throw new TargetArgError(
      legCountArg,
      `${legCount} legs need ${2 * legCount} <dev> <offset> arguments, only ${args.length - i} given`,
    );
  }
  table.legs = [];
  for (let l = 0; l < legCount; l++) {
    table.legs.push({
      spec: args[i]!,
      offsetSectors: uint(args, i + 1, `offset of leg ${l} (sectors)`),
      argIndex: i,
    });
    i += 2;
  }
  table.handleErrors = false;
  table.keepLog = false;
  if (i < args.length) {
    const featureCountArg = i;
    const featureCount = uint(args, i, "feature count");
    i++;
    if (args.length - i !== featureCount) {
      throw new TargetArgError(
        featureCountArg,
        `feature count ${featureCount} does not match the ${args.length - i} feature argument(s) that follow`,
      );
    }
    for (; i < args.length; i++) {
      const f = args[i]!;
      if (f === "handle_errors") table.handleErrors = true;
      else if (f === "keep_log") table.keepLog = true;
      else throw new TargetArgError(i, `unknown mirror feature "${f}" (expected handle_errors or keep_log)`);
    }
    if (table.keepLog && !table.handleErrors) {
      throw new TargetArgError(featureCountArg, "keep_log requires the handle_errors feature");
    }
  }
  return table as MirrorTable;
}

/** Checks a leg (or log) device is large enough; throws a TargetArgError naming it. */
export function checkLegFits(
  argIndex: number,
  name: string,
  deviceBytes: number,
  offsetSectors: number,
  lengthBytes: number,
): void {
  if (offsetSectors * SECTOR_SIZE + lengthBytes > deviceBytes) {
    throw new TargetArgError(
      argIndex,
      `leg ${name} is ${deviceBytes} bytes: offset ${offsetSectors} sectors + mirror length ${lengthBytes} bytes does not fit`,
    );
  }
}
