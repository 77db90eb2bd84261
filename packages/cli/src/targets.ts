import { basicTargets, openDevice, type TargetType } from "@udm/kcopyd";
import { inspectDiskLog, MirrorLogFormatError, mirrorTarget } from "@udm/mirror";
import { NbdServer, registerNbdSchemes } from "@udm/nbd-server";
import { CowFormatError, formatCowInspection, inspectCow, snapshotTargets } from "@udm/snapshot";
import type { Logger } from "./logger.js";
import type { NbdServerLike } from "./serve.js";

/**
 * Every dm target udm knows, by table name. The only module that imports the target and server
 * packages, so the rest of the CLI does not depend on how they are built.
 *
 * @example
 * ```ts
 * const manager = new DeviceManager({ targets: allTargets(), log });
 * ```
 */
export function allTargets(): TargetType[] {
  return [...basicTargets, mirrorTarget, ...snapshotTargets];
}

/** Registers device URI schemes of other packages (`nbd://`, `nbd+unix://`) with `openDevice`. */
export function registerDeviceSchemes(): void {
  registerNbdSchemes();
}

/** Options `udm serve` passes to the NBD server. */
export interface NbdServerOptions {
  log: Logger;
  tls?: { cert: Buffer; key: Buffer; ca?: Buffer; requireClientCert: boolean; required: boolean };
}

/** The NBD server of @udm/nbd-server. */
export async function createNbdServer(options: NbdServerOptions): Promise<NbdServerLike> {
  return new NbdServer(options);
}

/** A report of an offline inspection: human text, JSON, and whether the format was valid. */
export interface InspectionReport {
  ok: boolean;
  text: string;
  json: unknown;
}

/** Offline inspectors of on-disk formats (COW store, mirror disk log). */
export function offlineInspectors(): {
  cow?: (spec: string) => Promise<InspectionReport>;
  mirrorLog?: (spec: string) => Promise<InspectionReport>;
} {
  return {
    async cow(spec) {
      registerNbdSchemes();
      const dev = await openDevice(spec, { readOnly: true });
      try {
        const info = await inspectCow(dev);
        return { ok: true, text: formatCowInspection(info), json: info };
      } catch (err) {
        if (!(err instanceof CowFormatError)) throw err;
        return {
          ok: false,
          text: `not a usable snapshot COW store (${err.field}): ${err.message}`,
          json: { error: { field: err.field, message: err.message } },
        };
      } finally {
        await dev.close();
      }
    },
    async mirrorLog(spec) {
      registerNbdSchemes();
      const dev = await openDevice(spec, { readOnly: true });
      try {
        const info = await inspectDiskLog(dev);
        const dirty: Array<[number, number]> = [];
        for (let r = 0; r < info.regionCount; r++) {
          if (info.clean(r)) continue;
          const last = dirty[dirty.length - 1];
          if (last && last[1] === r - 1) last[1] = r;
          else dirty.push([r, r]);
        }
        const runs = dirty.map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`));
        const text = [
          `header:        MiRr dm-log, ${info.regionCount} regions${info.regionSectors ? ` of ${info.regionSectors} sectors` : " (region size not recorded: kernel-written log)"}`,
          `in sync:       ${info.cleanRegions}/${info.regionCount} regions`,
          `out of sync:   ${info.regionCount - info.cleanRegions} region(s)${runs.length ? `: ${runs.slice(0, 64).join(", ")}${runs.length > 64 ? ", ..." : ""}` : ""}`,
        ].join("\n");
        return {
          ok: true,
          text,
          json: {
            regionCount: info.regionCount,
            cleanRegions: info.cleanRegions,
            ...(info.regionSectors !== undefined && { regionSectors: info.regionSectors }),
            outOfSync: dirty.map(([first, last]) => ({ first, last })),
          },
        };
      } catch (err) {
        if (!(err instanceof MirrorLogFormatError)) throw err;
        return {
          ok: false,
          text: `not a mirror disk log: ${err.message}`,
          json: { error: { message: err.message } },
        };
      } finally {
        await dev.close();
      }
    },
  };
}
