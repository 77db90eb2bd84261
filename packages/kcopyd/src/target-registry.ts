import { type BlockDevice, SECTOR_SIZE, type TargetDevice } from "./block-device.js";
import type { OpenDeviceOptions } from "./device-spec.js";
import { ErrorDevice } from "./error-device.js";
import { FlakeyDevice } from "./flakey-device.js";
import type { KcopydClient } from "./kcopyd.js";
import { LinearDevice } from "./linear-device.js";
import { ZeroDevice } from "./zero-device.js";

/** The subset of a pino logger that targets use. */
export interface TargetLogger {
  debug(obj: object, msg?: string): void;
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

/** What a target constructor gets besides its arguments (the kernel's `dm_target` and `dm_get_device`). */
export interface TargetContext {
  /**
   * Opens a device argument (path, `file:`, `mem:`, `nbd://`, `@NAME`). The same spec yields the
   * same BlockDevice object while the table holds it, so e.g. a snapshot finds its origin.
   */
  openDevice(spec: string, options?: OpenDeviceOptions): Promise<BlockDevice>;
  /** A kcopyd client the target may use for copies (mirror resync, snapshot copy-out). */
  kcopyd: KcopydClient;
  log?: TargetLogger;
  /** The udm device name this table line belongs to (for logs and status). */
  deviceName?: string;
  /**
   * On `udm reload`, the device this table replaces, still open: a target may carry state over
   * (a mirror resyncs only a replaced leg). Undefined on `udm create`.
   */
  previous?: TargetDevice;
}

/** A dm target type: builds a TargetDevice from the arguments of one table line. */
export interface TargetType {
  name: string;
  /** One-line argument synopsis for error messages, e.g. `<dev> <offset>`. */
  usage: string;
  create(args: string[], lengthBytes: number, context: TargetContext): Promise<TargetDevice>;
}

/**
 * A table argument that does not parse: which one (0-based index into the target's arguments)
 * and what was expected. The table parser adds the file and line.
 */
export class TargetArgError extends Error {
  override name = "TargetArgError";
  constructor(
    readonly argIndex: number | null,
    message: string,
  ) {
    super(message);
  }
}

/** Parses a non-negative whole number argument, or throws a TargetArgError naming it. */
export function parseUintArg(args: string[], index: number, what: string): number {
  const text = args[index];
  if (text === undefined) throw new TargetArgError(index, `missing ${what}`);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(Number(text))) {
    throw new TargetArgError(index, `${what} must be a non-negative whole number, got "${text}"`);
  }
  return Number(text);
}

function expectArgCount(args: string[], min: number, max: number, usage: string): void {
  if (args.length < min || args.length > max) {
    throw new TargetArgError(null, `expected ${usage}, got ${args.length} argument(s)`);
  }
}

/** dm `linear <dev> <offset>`. */
export const linearTarget: TargetType = {
  name: "linear",
  usage: "<dev> <offset_sectors>",
  async create(args, lengthBytes, context) {
    expectArgCount(args, 2, 2, this.usage);
    const offsetSectors = parseUintArg(args, 1, "offset (sectors)");
    const dev = await context.openDevice(args[0]!);
    if (offsetSectors * SECTOR_SIZE + lengthBytes > dev.sizeBytes) {
      throw new TargetArgError(
        1,
        `${dev.name} is ${dev.sizeBytes} bytes: offset ${offsetSectors} + length does not fit`,
      );
    }
    return new LinearDevice(dev, offsetSectors * SECTOR_SIZE, lengthBytes, { name: dev.name });
  },
};

/** dm `zero` (no arguments). */
export const zeroTarget: TargetType = {
  name: "zero",
  usage: "(no arguments)",
  async create(args, lengthBytes) {
    expectArgCount(args, 0, 0, this.usage);
    return new ZeroDevice(lengthBytes);
  },
};

/** dm `error` (no arguments). */
export const errorTarget: TargetType = {
  name: "error",
  usage: "(no arguments)",
  async create(args, lengthBytes) {
    expectArgCount(args, 0, 0, this.usage);
    return new ErrorDevice(lengthBytes);
  },
};

const FLAKEY_FEATURES = ["drop_writes", "error_writes", "error_reads"] as const;

/** dm `flakey <dev> <offset> <up_seconds> <down_seconds> [<#features> <feature>...]`. */
export const flakeyTarget: TargetType = {
  name: "flakey",
  usage:
    "<dev> <offset_sectors> <up_seconds> <down_seconds> [<#features> drop_writes|error_writes|error_reads]",
  async create(args, lengthBytes, context) {
    if (args.length < 4) throw new TargetArgError(null, `expected ${this.usage}`);
    const offsetSectors = parseUintArg(args, 1, "offset (sectors)");
    const up = parseUintArg(args, 2, "up interval (seconds)");
    const down = parseUintArg(args, 3, "down interval (seconds)");
    const features = new Set<string>();
    if (args.length > 4) {
      const count = parseUintArg(args, 4, "feature count");
      if (args.length !== 5 + count) {
        throw new TargetArgError(
          4,
          `feature count ${count} does not match the ${args.length - 5} feature argument(s)`,
        );
      }
      for (let i = 5; i < args.length; i++) {
        const f = args[i]!;
        if (!(FLAKEY_FEATURES as readonly string[]).includes(f)) {
          throw new TargetArgError(
            i,
            `unknown flakey feature "${f}" (expected ${FLAKEY_FEATURES.join(", ")})`,
          );
        }
        features.add(f);
      }
    }
    if (features.has("drop_writes") && features.has("error_writes")) {
      throw new TargetArgError(null, "drop_writes and error_writes are mutually exclusive");
    }
    const dev = await context.openDevice(args[0]!);
    if (offsetSectors * SECTOR_SIZE + lengthBytes > dev.sizeBytes) {
      throw new TargetArgError(
        1,
        `${dev.name} is ${dev.sizeBytes} bytes: offset ${offsetSectors} + length does not fit`,
      );
    }
    return new FlakeyDevice(dev, {
      startBytes: offsetSectors * SECTOR_SIZE,
      lengthBytes,
      upIntervalSeconds: up,
      downIntervalSeconds: down,
      dropWrites: features.has("drop_writes"),
      errorWrites: features.has("error_writes"),
      errorReads: features.has("error_reads"),
      name: dev.name,
    });
  },
};

/** The targets @udm/kcopyd provides; the CLI adds mirror and snapshot ones. */
export const basicTargets: TargetType[] = [linearTarget, zeroTarget, errorTarget, flakeyTarget];
