/**
 * NBD wire constants and codecs (fixed newstyle handshake, compact requests, simple and
 * structured replies). Every number is the protocol's, big-endian on the wire.
 *
 * @example
 * ```ts
 * import { encodeSimpleReply, NBD_EINVAL } from "./wire.js";
 * socket.write(encodeSimpleReply(NBD_EINVAL, cookie));
 * ```
 */

// Magic numbers.
export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server, u16) and client flags (u32).
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// Option replies.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;

// NBD_INFO types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags (u16).
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// Commands.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// Command flags (u16).
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// Structured reply chunks.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;

// base:allocation state flags.
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// NBD error numbers (protocol values, not the host's errno).
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Sizes of fixed wire structures. */
export const GREETING_BYTES = 18;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;
export const REQUEST_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const STRUCTURED_REPLY_BYTES = 20;
/** The 124 zero bytes after an EXPORT_NAME reply unless both sides agreed on NO_ZEROES. */
export const EXPORT_NAME_PAD_BYTES = 124;

/** Largest READ/WRITE payload we serve, advertised in NBD_INFO_BLOCK_SIZE (the spec's interoperable 32 MiB). */
export const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
/** Preferred I/O size advertised in NBD_INFO_BLOCK_SIZE. */
export const PREFERRED_BLOCK_BYTES = 4096;
/** Strings (export names, context names) longer than this are refused, as the spec allows. */
export const MAX_STRING_BYTES = 4096;
/** DF reads up to this size must be served as one chunk; larger DF reads may get EOVERFLOW. */
export const DF_MAX_BYTES = 64 * 1024;

/** A decoded compact transmission request; `cookie` holds the 8 raw bytes to echo back. */
export interface NbdRequest {
  flags: number;
  type: number;
  cookie: Buffer;
  /** Full unsigned 64-bit offset. */
  offset: bigint;
  length: number;
}

/** Names of commands for logs and error messages. */
export const COMMAND_NAMES: Record<number, string> = {
  [NBD_CMD_READ]: "READ",
  [NBD_CMD_WRITE]: "WRITE",
  [NBD_CMD_DISC]: "DISC",
  [NBD_CMD_FLUSH]: "FLUSH",
  [NBD_CMD_TRIM]: "TRIM",
  [NBD_CMD_CACHE]: "CACHE",
  [NBD_CMD_WRITE_ZEROES]: "WRITE_ZEROES",
  [NBD_CMD_BLOCK_STATUS]: "BLOCK_STATUS",
};

/** Names of options for logs. */
export const OPTION_NAMES: Record<number, string> = {
  [NBD_OPT_EXPORT_NAME]: "EXPORT_NAME",
  [NBD_OPT_ABORT]: "ABORT",
  [NBD_OPT_LIST]: "LIST",
  [NBD_OPT_STARTTLS]: "STARTTLS",
  [NBD_OPT_INFO]: "INFO",
  [NBD_OPT_GO]: "GO",
  [NBD_OPT_STRUCTURED_REPLY]: "STRUCTURED_REPLY",
  [NBD_OPT_LIST_META_CONTEXT]: "LIST_META_CONTEXT",
  [NBD_OPT_SET_META_CONTEXT]: "SET_META_CONTEXT",
  [NBD_OPT_EXTENDED_HEADERS]: "EXTENDED_HEADERS",
};

/** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags. */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(GREETING_BYTES);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** A client option: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_BYTES);
  return b;
}

/** A fixed-newstyle option reply. */
export function encodeOptionReply(option: number, replyType: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(replyType >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, OPTION_REPLY_HEADER_BYTES);
  return b;
}

/** Decoded option reply header (the data follows on the wire). */
export interface OptionReplyHeader {
  option: number;
  replyType: number;
  length: number;
}

/** Decodes a 20-byte option reply header; throws on a bad magic. */
export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader {
  if (b.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) {
    throw new NbdProtocolError(`bad option reply magic 0x${b.readBigUInt64BE(0).toString(16)}`);
  }
  return { option: b.readUInt32BE(8), replyType: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

/** NBD_REP_SERVER data: name length, name, description. */
export function encodeServerReplyData(name: string, description = ""): Buffer {
  const n = Buffer.from(name, "utf8");
  const d = Buffer.from(description, "utf8");
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** NBD_INFO_EXPORT payload (with its type): size and transmission flags. */
export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(sizeBytes), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

/** NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload (with its type). */
export function encodeInfoString(infoType: number, text: string): Buffer {
  const t = Buffer.from(text, "utf8");
  const b = Buffer.allocUnsafe(2 + t.length);
  b.writeUInt16BE(infoType, 0);
  t.copy(b, 2);
  return b;
}

/** NBD_INFO_BLOCK_SIZE payload (with its type). */
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_META_CONTEXT data: context id and name. */
export function encodeMetaContextReplyData(id: number, name: string): Buffer {
  const n = Buffer.from(name, "utf8");
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** The reply to EXPORT_NAME: size, transmission flags, and 124 zeros unless NO_ZEROES. */
export function encodeExportNameReply(
  sizeBytes: number,
  transmissionFlags: number,
  noZeroes: boolean,
): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : EXPORT_NAME_PAD_BYTES));
  b.writeBigUInt64BE(BigInt(sizeBytes), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

/** A compact request header (the WRITE payload is sent separately). */
export function encodeRequest(
  flags: number,
  type: number,
  cookie: Buffer,
  offset: bigint,
  length: number,
): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_BYTES);
  writeRequestHeader(b, 0, flags, type, cookie, offset, length);
  return b;
}

/** Writes a compact request header into `b` at `at` (so a WRITE can share one buffer with its payload). */
export function writeRequestHeader(
  b: Buffer,
  at: number,
  flags: number,
  type: number,
  cookie: Buffer,
  offset: bigint,
  length: number,
): void {
  b.writeUInt32BE(REQUEST_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  cookie.copy(b, at + 8, 0, 8);
  b.writeBigUInt64BE(offset, at + 16);
  b.writeUInt32BE(length, at + 24);
}

/** Decodes a compact request at `at`; returns null when the magic is wrong (the stream is broken). */
export function decodeRequest(b: Buffer, at = 0): NbdRequest | null {
  if (b.readUInt32BE(at) !== REQUEST_MAGIC) return null;
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    cookie: Buffer.from(b.subarray(at + 8, at + 16)),
    offset: b.readBigUInt64BE(at + 16),
    length: b.readUInt32BE(at + 24),
  };
}

/** A 16-byte simple reply header (READ data, if any, follows). */
export function encodeSimpleReply(error: number, cookie: Buffer): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
  writeSimpleReplyHeader(b, 0, error, cookie);
  return b;
}

/** Writes a simple reply header into `b` at `at`. */
export function writeSimpleReplyHeader(b: Buffer, at: number, error: number, cookie: Buffer): void {
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  cookie.copy(b, at + 8, 0, 8);
}

/** Writes a structured reply chunk header into `b` at `at`. */
export function writeChunkHeader(
  b: Buffer,
  at: number,
  flags: number,
  type: number,
  cookie: Buffer,
  payloadLength: number,
): void {
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  cookie.copy(b, at + 8, 0, 8);
  b.writeUInt32BE(payloadLength, at + 16);
}

/** A structured chunk with a small payload (copied in). */
export function encodeChunk(flags: number, type: number, cookie: Buffer, payload?: Buffer): Buffer {
  const n = payload?.length ?? 0;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_BYTES + n);
  writeChunkHeader(b, 0, flags, type, cookie, n);
  payload?.copy(b, STRUCTURED_REPLY_BYTES);
  return b;
}

/** An OFFSET_HOLE chunk. */
export function encodeHoleChunk(flags: number, cookie: Buffer, offset: bigint, holeBytes: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_BYTES + 12);
  writeChunkHeader(b, 0, flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
  b.writeBigUInt64BE(offset, STRUCTURED_REPLY_BYTES);
  b.writeUInt32BE(holeBytes, STRUCTURED_REPLY_BYTES + 8);
  return b;
}

/** An ERROR chunk (or ERROR_OFFSET when `offset` is given), always marked DONE. */
export function encodeErrorChunk(cookie: Buffer, error: number, message: string, offset?: bigint): Buffer {
  // The message is capped so the chunk stays small whatever a device put in its error text.
  const msg = Buffer.from(message, "utf8").subarray(0, 1024);
  const n = 6 + msg.length + (offset === undefined ? 0 : 8);
  const type = offset === undefined ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_ERROR_OFFSET;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_BYTES + n);
  writeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, type, cookie, n);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  if (offset !== undefined) b.writeBigUInt64BE(offset, 26 + msg.length);
  return b;
}

/** A BLOCK_STATUS chunk: context id and (length, flags) descriptors. */
export function encodeBlockStatusChunk(
  flags: number,
  cookie: Buffer,
  contextId: number,
  extents: ReadonlyArray<{ lengthBytes: number; flags: number }>,
): Buffer {
  const n = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_BYTES + n);
  writeChunkHeader(b, 0, flags, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, n);
  b.writeUInt32BE(contextId, 20);
  let at = 24;
  for (const e of extents) {
    b.writeUInt32BE(e.lengthBytes, at);
    b.writeUInt32BE(e.flags >>> 0, at + 4);
    at += 8;
  }
  return b;
}

/**
 * A peer broke the NBD protocol (bad magic, impossible lengths): the connection cannot continue.
 *
 * @example
 * ```ts
 * throw new NbdProtocolError("bad request magic 0x12345678");
 * ```
 */
export class NbdProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NbdProtocolError";
  }
}

/**
 * An NBD peer answered with an option error (`NBD_REP_ERR_*`) or a transmission error.
 *
 * @example
 * ```ts
 * if (err instanceof NbdReplyError && err.code === NBD_REP_ERR_UNKNOWN) console.log("no such export");
 * ```
 */
export class NbdReplyError extends Error {
  readonly code: number;
  constructor(code: number, message: string) {
    super(message);
    this.name = "NbdReplyError";
    this.code = code;
  }
}
