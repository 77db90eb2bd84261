import { type Errno, errnoOf } from "@udm/kcopyd";
import {
  COMMAND_NAMES,
  MAX_PAYLOAD_BYTES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  type NbdRequest,
} from "./wire.js";

/** The one errno -> NBD error table (protocol numbers, not the host's). */
export const NBD_ERROR_OF_ERRNO: Readonly<Record<Errno, number>> = {
  EPERM: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

/**
 * The NBD error number to report for anything a device threw.
 *
 * @example
 * ```ts
 * nbdErrorOf(new IoError("ENOSPC", "disk", "full")); // 28
 * ```
 */
export function nbdErrorOf(err: unknown): number {
  return NBD_ERROR_OF_ERRNO[errnoOf(err)];
}

/** What a request is checked against: the export as this connection negotiated it. */
export interface RequestContext {
  sizeBytes: number;
  readOnly: boolean;
  structured: boolean;
  /** At least one meta context selected for this export. */
  hasMetaContexts: boolean;
}

/** Why a request is refused: the NBD error to answer with and a message for the client and the log. */
export interface RequestRefusal {
  error: number;
  message: string;
}

/** Flags each command accepts; FUA is accepted everywhere because SEND_FUA is advertised. */
const ALLOWED_FLAGS: Record<number, number> = {
  [NBD_CMD_READ]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
  [NBD_CMD_WRITE]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_FLUSH]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_TRIM]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_CACHE]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_WRITE_ZEROES]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
  [NBD_CMD_BLOCK_STATUS]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
};

const MAX_SAFE_OFFSET = BigInt(Number.MAX_SAFE_INTEGER);

const WRITING = new Set([NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES]);

/**
 * Checks one request against the negotiated export, the single place requests are validated
 * (nbdkit's `validate_request`). Returns null when the request may run. DISC is never refused.
 *
 * @example
 * ```ts
 * const refusal = validateRequest(req, { sizeBytes, readOnly: false, structured: true, hasMetaContexts: false });
 * if (refusal) sendError(req, refusal.error, refusal.message);
 * ```
 */
export function validateRequest(req: NbdRequest, ctx: RequestContext): RequestRefusal | null {
  const name = COMMAND_NAMES[req.type];
  if (req.type === NBD_CMD_DISC) return null;
  if (name === undefined) return { error: NBD_EINVAL, message: `unknown command type ${req.type}` };
  const allowed = ALLOWED_FLAGS[req.type] ?? 0;
  const bad = req.flags & ~allowed;
  if (bad) return { error: NBD_EINVAL, message: `${name} does not accept flags 0x${bad.toString(16)}` };
  if (req.flags & NBD_CMD_FLAG_DF && !ctx.structured) {
    return { error: NBD_EINVAL, message: "DF requires structured replies" };
  }
  if (req.type === NBD_CMD_FLUSH) {
    if (req.offset !== 0n || req.length !== 0) {
      return { error: NBD_EINVAL, message: "FLUSH must have offset and length 0" };
    }
    return null;
  }
  if (WRITING.has(req.type) && ctx.readOnly)
    return { error: NBD_EPERM, message: `${name} on a read-only export` };
  if ((req.type === NBD_CMD_READ || req.type === NBD_CMD_WRITE) && req.length > MAX_PAYLOAD_BYTES) {
    return {
      error: NBD_EINVAL,
      message: `${name} of ${req.length} bytes exceeds the maximum payload ${MAX_PAYLOAD_BYTES}`,
    };
  }
  // Numbers are exact below 2^53 and no export is larger, so only huge offsets need BigInt.
  if (req.offset > MAX_SAFE_OFFSET || Number(req.offset) + req.length > ctx.sizeBytes) {
    const error = req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    return {
      error,
      message: `${name} at ${req.offset}+${req.length} is past the end of the export (${ctx.sizeBytes} bytes)`,
    };
  }
  if (req.type === NBD_CMD_BLOCK_STATUS) {
    if (!ctx.hasMetaContexts)
      return { error: NBD_EINVAL, message: "BLOCK_STATUS without a negotiated meta context" };
    if (req.length === 0) return { error: NBD_EINVAL, message: "BLOCK_STATUS of length 0" };
  }
  return null;
}
