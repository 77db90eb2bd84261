import { basicTargets, type TargetType } from "@udm/kcopyd";
import type { Logger } from "./logger.js";
import type { NbdServerLike } from "./serve.js";

/**
 * Every dm target udm knows, by table name. The only module that imports the target and server
 * packages, so the rest of the CLI does not depend on which ones exist.
 *
 * @example
 * ```ts
 * const manager = new DeviceManager({ targets: allTargets(), log });
 * ```
 */
export function allTargets(): TargetType[] {
  return [...basicTargets];
}

/** Registers device URI schemes of other packages (`nbd://`, `nbd+unix://`) with `openDevice`. */
export function registerDeviceSchemes(): void {}

/** Options `udm serve` passes to the NBD server. */
export interface NbdServerOptions {
  log: Logger;
  tls?: { cert: Buffer; key: Buffer; ca?: Buffer; requireClientCert: boolean; required: boolean };
}

/** The NBD server of @udm/nbd-server. */
export async function createNbdServer(_options: NbdServerOptions): Promise<NbdServerLike> {
  throw new Error("@udm/nbd-server is not available in this build");
}

/** A report of an offline inspection: human text, JSON, and whether the format was valid. */
export interface InspectionReport {
  ok: boolean;
  text: string;
  json: unknown;
}

/** Offline inspectors of on-disk formats (COW store, mirror disk log), when their package is built in. */
export function offlineInspectors(): {
  cow?: (spec: string) => Promise<InspectionReport>;
  mirrorLog?: (spec: string) => Promise<InspectionReport>;
} {
  return {};
}
