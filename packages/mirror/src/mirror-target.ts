import { type BlockDevice, SECTOR_SIZE, TargetArgError, type TargetType } from "@udm/kcopyd";
import { DirtyRegionLog, diskLogBytes, MirrorLogFormatError } from "./dirty-log.js";
import { MirrorDevice } from "./mirror-device.js";
import { checkLegFits, MIRROR_USAGE, parseMirrorTable } from "./mirror-table.js";

/**
 * dm `mirror`: `<core|disk> <#log_args> <log_args> <#legs> <dev> <offset>... [<#features> handle_errors [keep_log]]`.
 * On `udm reload` (`context.previous` is a mirror) the per-leg sync state carries over, so only
 * legs whose spec is new are resynced.
 *
 * @example
 * ```ts
 * registry.register(mirrorTarget);
 * // 0 2097152 mirror disk 2 mirror.log 1024 2 a.img 0 b.img 0 1 handle_errors
 * const dev = await mirrorTarget.create(args, 2097152 * 512, context);
 * ```
 */
export const mirrorTarget: TargetType = {
  name: "mirror",
  usage: MIRROR_USAGE,
  async create(args, lengthBytes, context) {
    if (lengthBytes <= 0 || lengthBytes % SECTOR_SIZE !== 0) {
      throw new TargetArgError(
        null,
        `mirror length must be a positive whole number of sectors, got ${lengthBytes} bytes`,
      );
    }
    const table = parseMirrorTable(args, lengthBytes / SECTOR_SIZE);
    const legs: Array<{ dev: BlockDevice; offsetSectors: number }> = [];
    for (const leg of table.legs) {
      const dev = await openArg(context.openDevice, leg.spec, leg.argIndex, "leg");
      checkLegFits(leg.argIndex + 1, leg.spec, dev.sizeBytes, leg.offsetSectors, lengthBytes);
      legs.push({ dev, offsetSectors: leg.offsetSectors });
    }
    let logDevice: BlockDevice | undefined;
    if (table.logDevice !== undefined) {
      const argIndex = table.logDeviceArg!;
      logDevice = await openArg(context.openDevice, table.logDevice, argIndex, "log device");
      const regionCount = Math.ceil(lengthBytes / SECTOR_SIZE / table.regionSectors);
      const needed = diskLogBytes(regionCount, logDevice.logicalBlockSize);
      if (needed > logDevice.sizeBytes) {
        throw new TargetArgError(
          argIndex,
          `log device ${table.logDevice} is ${logDevice.sizeBytes} bytes; ${regionCount} regions need ${needed}`,
        );
      }
    }
    const log = new DirtyRegionLog({
      regionSectors: table.regionSectors,
      targetSectors: lengthBytes / SECTOR_SIZE,
      sync: table.sync,
      ...(logDevice && { device: logDevice }),
    });
    const previous = context.previous instanceof MirrorDevice ? context.previous : undefined;
    const options = {
      legs,
      lengthBytes,
      log,
      kcopyd: context.kcopyd,
      handleErrors: table.handleErrors,
      keepLog: table.keepLog,
      ...(context.deviceName !== undefined && { name: context.deviceName }),
      ...(context.log && { logger: context.log }),
    };
    // A reload takes the old table's state over in preresume, not while it is built.
    if (previous) return MirrorDevice.prepareReload({ ...options, previous });
    try {
      return await MirrorDevice.open(options);
    } catch (err) {
      if (err instanceof MirrorLogFormatError && table.logDeviceArg !== undefined) {
        throw Object.assign(new TargetArgError(table.logDeviceArg, err.message), { cause: err });
      }
      throw err;
    }
  },
};

async function openArg(
  open: (spec: string) => Promise<BlockDevice>,
  spec: string,
  argIndex: number,
  what: string,
): Promise<BlockDevice> {
  try {
    return await open(spec);
  } catch (err) {
    throw new TargetArgError(argIndex, `cannot open ${what} "${spec}": ${(err as Error).message}`);
  }
}
