import type { BlockDevice, StatusContext } from "@udm/kcopyd";
import type { AccessRule, NbdAllowList } from "./access.js";
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from "./wire.js";

/** The one context the protocol defines; derived from `BlockDevice.extents()`. */
export const BASE_ALLOCATION = "base:allocation";

/** One served export as the server's table holds it; `device` changes on `replaceExportDevice`. */
export interface ExportEntry {
  readonly name: string;
  device: BlockDevice;
  readonly description?: string;
  /** Who may see and open the export (`NbdExportOptions.allow`). */
  readonly access: AccessRule;
  /** The allow list as given, for `exports()`. */
  readonly allow?: NbdAllowList;
  /** Read-only by export option (the device may be read-only too: see `isReadOnly`). */
  readonly readOnlyOption: boolean;
  /** Set by `removeExport`: no new client may open it. */
  removed: boolean;
  /** Connections in transmission on this export. */
  readonly sessions: Set<{ drain(reason: string): Promise<void> }>;
}

/** Whether writes to the export must be refused with EPERM. */
export function isReadOnly(entry: ExportEntry): boolean {
  return entry.readOnlyOption || entry.device.readOnly;
}

/**
 * Transmission flags for an export. Every connection shares the one device object (one process,
 * one cache), so CAN_MULTI_CONN is honest; DF only means something with structured replies.
 *
 * @example
 * ```ts
 * const flags = transmissionFlags(entry, true); // HAS_FLAGS|SEND_FLUSH|...|SEND_DF
 * ```
 */
export function transmissionFlags(entry: ExportEntry, structured: boolean): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN;
  flags |= NBD_FLAG_SEND_CACHE;
  if (isReadOnly(entry)) flags |= NBD_FLAG_READ_ONLY;
  else flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  if (structured) flags |= NBD_FLAG_SEND_DF;
  return flags;
}

/** The contexts a device publishes besides `base:allocation`, by name (first one wins on duplicates). */
export function deviceContexts(device: BlockDevice): Map<string, StatusContext> {
  const out = new Map<string, StatusContext>();
  for (const c of device.statusContexts?.() ?? []) if (!out.has(c.name)) out.set(c.name, c);
  return out;
}

/** Every context name an export offers, `base:allocation` first. */
export function contextNames(device: BlockDevice): string[] {
  return [BASE_ALLOCATION, ...[...deviceContexts(device).keys()].filter((n) => n !== BASE_ALLOCATION)];
}
