import type * as net from "node:net";
import type { Duplex } from "node:stream";
import * as tls from "node:tls";
import { SocketReader } from "./socket-reader.js";
import {
  decodeOptionReplyHeader,
  EXPORT_NAME_PAD_BYTES,
  encodeOption,
  IHAVEOPT,
  MAX_PAYLOAD_BYTES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBDMAGIC,
  NbdProtocolError,
  NbdReplyError,
  OPTION_REPLY_HEADER_BYTES,
} from "./wire.js";

/** Option replies larger than this from a server are treated as a broken server. */
const MAX_OPTION_REPLY_BYTES = 1024 * 1024;

/** What the client asks for. */
export interface ClientHandshakeOptions {
  exportName: string;
  /** Do STARTTLS with these options (the socket is filled in). */
  tls?: tls.ConnectionOptions;
  /** Meta contexts to select (structured replies are always requested). */
  metaContexts?: string[];
  /** Also select every context the server lists for the export (LIST_META_CONTEXT with no query). */
  discoverContexts?: boolean;
}

/** What the server agreed to. */
export interface ClientHandshakeResult {
  stream: Duplex;
  leftover: Buffer;
  sizeBytes: number;
  transmissionFlags: number;
  structured: boolean;
  /** Selected contexts by name -> id. */
  metaContexts: Map<string, number>;
  /** NBD_INFO_BLOCK_SIZE, or the protocol defaults when the server sent none. */
  blockSize: { minimum: number; preferred: number; maximum: number };
}

interface Reply {
  option: number;
  replyType: number;
  data: Buffer;
}

async function readReply(reader: SocketReader, option: number): Promise<Reply> {
  const h = decodeOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_BYTES));
  if (h.option !== option)
    throw new NbdProtocolError(`server answered option ${h.option} while we asked ${option}`);
  if (h.length > MAX_OPTION_REPLY_BYTES) throw new NbdProtocolError(`option reply of ${h.length} bytes`);
  return { option: h.option, replyType: h.replyType, data: await reader.read(h.length) };
}

function replyError(r: Reply, what: string): NbdReplyError {
  const text = r.data.toString("utf8");
  return new NbdReplyError(
    r.replyType,
    `${what}: server answered 0x${r.replyType.toString(16)}${text ? ` (${text})` : ""}`,
  );
}

function nameAndQueries(exportName: string, tail: Buffer): Buffer {
  const name = Buffer.from(exportName, "utf8");
  const head = Buffer.allocUnsafe(4);
  head.writeUInt32BE(name.length, 0);
  return Buffer.concat([head, name, tail]);
}

/**
 * The client side of the fixed-newstyle handshake: optional STARTTLS, STRUCTURED_REPLY,
 * SET_META_CONTEXT, then GO (falling back to EXPORT_NAME on servers without GO).
 *
 * @example
 * ```ts
 * const agreed = await clientHandshake(socket, { exportName: "disk", metaContexts: ["base:allocation"] });
 * console.log(agreed.sizeBytes);
 * ```
 */
export async function clientHandshake(
  socket: net.Socket,
  options: ClientHandshakeOptions,
): Promise<ClientHandshakeResult> {
  let stream: Duplex = socket;
  let reader = new SocketReader(socket);
  const greeting = await reader.read(18);
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC)
    throw new NbdProtocolError("not an NBD server (bad NBDMAGIC)");
  if (greeting.readBigUInt64BE(8) !== IHAVEOPT)
    throw new NbdProtocolError("server is not newstyle (oldstyle is not supported)");
  const serverFlags = greeting.readUInt16BE(16);
  if (!(serverFlags & NBD_FLAG_FIXED_NEWSTYLE))
    throw new NbdProtocolError("server does not speak fixed newstyle");
  const noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
  const clientFlags = Buffer.allocUnsafe(4);
  clientFlags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0), 0);
  socket.write(clientFlags);

  if (options.tls) {
    socket.write(encodeOption(NBD_OPT_STARTTLS));
    const r = await readReply(reader, NBD_OPT_STARTTLS);
    if (r.replyType !== NBD_REP_ACK) throw replyError(r, "STARTTLS");
    reader.detach();
    const secure = tls.connect({ ...options.tls, socket });
    await new Promise<void>((resolve, reject) => {
      secure.once("secureConnect", () => resolve());
      secure.once("error", (err) => reject(new NbdProtocolError(`TLS handshake failed: ${err.message}`)));
    });
    secure.on("error", () => {}); // reported through 'close' by the owner
    stream = secure;
    reader = new SocketReader(secure);
  }

  stream.write(encodeOption(NBD_OPT_STRUCTURED_REPLY));
  const sr = await readReply(reader, NBD_OPT_STRUCTURED_REPLY);
  const structured = sr.replyType === NBD_REP_ACK;

  const metaContexts = new Map<string, number>();
  const wanted = [...(options.metaContexts ?? [])];
  if (structured && options.discoverContexts) {
    const zeroQueries = Buffer.alloc(4);
    stream.write(encodeOption(NBD_OPT_LIST_META_CONTEXT, nameAndQueries(options.exportName, zeroQueries)));
    for (;;) {
      const r = await readReply(reader, NBD_OPT_LIST_META_CONTEXT);
      if (r.replyType !== NBD_REP_META_CONTEXT || r.data.length < 4) break;
      const name = r.data.toString("utf8", 4);
      // Wildcards ("base:") may appear in a LIST answer; only full names can be selected.
      if (!name.endsWith(":") && !wanted.includes(name)) wanted.push(name);
    }
  }
  if (structured && wanted.length) {
    const parts: Buffer[] = [Buffer.alloc(4)];
    (parts[0] as Buffer).writeUInt32BE(wanted.length, 0);
    for (const q of wanted) {
      const b = Buffer.from(q, "utf8");
      const len = Buffer.allocUnsafe(4);
      len.writeUInt32BE(b.length, 0);
      parts.push(len, b);
    }
    stream.write(
      encodeOption(NBD_OPT_SET_META_CONTEXT, nameAndQueries(options.exportName, Buffer.concat(parts))),
    );
    for (;;) {
      const r = await readReply(reader, NBD_OPT_SET_META_CONTEXT);
      if (r.replyType === NBD_REP_META_CONTEXT && r.data.length >= 4) {
        metaContexts.set(r.data.toString("utf8", 4), r.data.readUInt32BE(0));
      } else break; // ACK, or an error: block status is then simply unavailable
    }
  }

  const infoRequests = Buffer.allocUnsafe(4);
  infoRequests.writeUInt16BE(1, 0);
  infoRequests.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 2);
  stream.write(encodeOption(NBD_OPT_GO, nameAndQueries(options.exportName, infoRequests)));
  let sizeBytes = -1;
  let transmissionFlags = 0;
  let blockSize = { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD_BYTES };
  for (;;) {
    const r = await readReply(reader, NBD_OPT_GO);
    if (r.replyType === NBD_REP_INFO && r.data.length >= 2) {
      const type = r.data.readUInt16BE(0);
      if (type === NBD_INFO_EXPORT && r.data.length >= 12) {
        sizeBytes = Number(r.data.readBigUInt64BE(2));
        transmissionFlags = r.data.readUInt16BE(10);
      } else if (type === NBD_INFO_BLOCK_SIZE && r.data.length >= 14) {
        blockSize = {
          minimum: r.data.readUInt32BE(2),
          preferred: r.data.readUInt32BE(6),
          maximum: r.data.readUInt32BE(10),
        };
      }
      continue;
    }
    if (r.replyType === NBD_REP_ACK) {
      if (sizeBytes < 0) throw new NbdProtocolError("server acknowledged GO without NBD_INFO_EXPORT");
      break;
    }
    if (r.replyType === NBD_REP_ERR_UNSUP) {
      // An old server without GO: EXPORT_NAME has no error path, the server just closes.
      stream.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from(options.exportName, "utf8")));
      const b = await reader.read(10);
      sizeBytes = Number(b.readBigUInt64BE(0));
      transmissionFlags = b.readUInt16BE(8);
      if (!noZeroes) await reader.read(EXPORT_NAME_PAD_BYTES);
      break;
    }
    throw replyError(r, `opening export "${options.exportName}"`);
  }
  if (!Number.isSafeInteger(sizeBytes)) throw new NbdProtocolError(`export size ${sizeBytes} is too large`);
  return {
    stream,
    leftover: reader.detach(),
    sizeBytes,
    transmissionFlags,
    structured,
    metaContexts,
    blockSize,
  };
}
