import * as net from "node:net";
import { SocketReader } from "./socket-reader.js";
import {
  decodeOptionReplyHeader,
  encodeOption,
  encodeRequest,
  NBD_INFO_BLOCK_SIZE,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  OPTION_REPLY_HEADER_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from "./wire.js";

/** A decoded reply of either kind, as a raw test peer sees it. */
export interface RawReply {
  magic: number;
  cookie: bigint;
  /** Simple replies: the error field. */
  error: number;
  /** Structured chunks: flags, type and payload. */
  flags: number;
  type: number;
  payload: Buffer;
}

/**
 * A byte-level NBD client for protocol tests: sends exactly the bytes it is told to (broken
 * ones included) and decodes what comes back. Not for production use.
 *
 * @example
 * ```ts
 * const peer = await RawPeer.connect("127.0.0.1:10809");
 * await peer.greet();
 * await peer.go("disk", { structured: true, contexts: ["base:allocation"] });
 * peer.request(0, 0, 1n, 0n, 4096);
 * const chunk = await peer.reply();
 * ```
 */
export class RawPeer {
  readonly socket: net.Socket;
  readonly reader: SocketReader;
  /** Resolves when the server closes the connection. */
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.reader = new SocketReader(socket);
    this.closed = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("error", () => {});
    socket.setNoDelay(true);
  }

  /** Connects to "HOST:PORT" or a Unix socket path. */
  static connect(address: string): Promise<RawPeer> {
    const m = /^(.*):(\d+)$/.exec(address);
    const socket = m
      ? net.connect({ host: m[1] as string, port: Number(m[2]) })
      : net.connect({ path: address });
    return new Promise((resolve, reject) => {
      socket.once("error", reject);
      socket.once("connect", () => {
        socket.off("error", reject);
        resolve(new RawPeer(socket));
      });
    });
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  read(bytes: number): Promise<Buffer> {
    return this.reader.read(bytes);
  }

  /** Reads the 18-byte greeting and sends client flags; returns the server's handshake flags. */
  async greet(clientFlags = 3): Promise<number> {
    const g = await this.read(18);
    const flags = Buffer.allocUnsafe(4);
    flags.writeUInt32BE(clientFlags >>> 0, 0);
    this.write(flags);
    return g.readUInt16BE(16);
  }

  option(option: number, data?: Buffer): void {
    this.write(encodeOption(option, data));
  }

  async optionReply(): Promise<{ option: number; replyType: number; data: Buffer }> {
    const h = decodeOptionReplyHeader(await this.read(OPTION_REPLY_HEADER_BYTES));
    return { option: h.option, replyType: h.replyType, data: await this.read(h.length) };
  }

  /** Negotiates structured replies and meta contexts as asked, then GO; returns size, flags and context ids. */
  async go(
    exportName: string,
    options: { structured?: boolean; contexts?: string[] } = {},
  ): Promise<{ sizeBytes: number; flags: number; contextIds: Map<string, number> }> {
    const contextIds = new Map<string, number>();
    if (options.structured) {
      this.option(NBD_OPT_STRUCTURED_REPLY);
      const r = await this.optionReply();
      if (r.replyType !== NBD_REP_ACK) throw new Error(`STRUCTURED_REPLY refused: ${r.replyType}`);
      if (options.contexts?.length) {
        this.option(NBD_OPT_SET_META_CONTEXT, metaContextData(exportName, options.contexts));
        for (;;) {
          const m = await this.optionReply();
          if (m.replyType !== NBD_REP_META_CONTEXT) break;
          contextIds.set(m.data.toString("utf8", 4), m.data.readUInt32BE(0));
        }
      }
    }
    this.option(NBD_OPT_GO, infoData(exportName, [NBD_INFO_BLOCK_SIZE]));
    let sizeBytes = -1;
    let flags = 0;
    for (;;) {
      const r = await this.optionReply();
      if (r.replyType === NBD_REP_INFO && r.data.readUInt16BE(0) === 0) {
        sizeBytes = Number(r.data.readBigUInt64BE(2));
        flags = r.data.readUInt16BE(10);
      } else if (r.replyType === NBD_REP_ACK) break;
      else if (r.replyType !== NBD_REP_INFO) throw new Error(`GO refused: 0x${r.replyType.toString(16)}`);
    }
    return { sizeBytes, flags, contextIds };
  }

  /** Sends one compact request (with its WRITE payload if given). */
  request(
    type: number,
    flags: number,
    cookie: bigint,
    offset: bigint,
    length: number,
    payload?: Buffer,
  ): void {
    const c = Buffer.allocUnsafe(8);
    c.writeBigUInt64BE(cookie, 0);
    this.write(encodeRequest(flags, type, c, offset, length));
    if (payload) this.write(payload);
  }

  /** Reads one reply: a simple reply (plus `readLength` data bytes if it succeeded) or one structured chunk. */
  async reply(readLength = 0): Promise<RawReply> {
    const head = await this.read(4);
    const magic = head.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      const payload = error === 0 && readLength ? await this.read(readLength) : Buffer.alloc(0);
      return { magic, cookie: rest.readBigUInt64BE(4), error, flags: 0, type: 0, payload };
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const rest = await this.read(16);
      const length = rest.readUInt32BE(12);
      return {
        magic,
        cookie: rest.readBigUInt64BE(4),
        error: 0,
        flags: rest.readUInt16BE(0),
        type: rest.readUInt16BE(2),
        payload: await this.read(length),
      };
    }
    throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  }

  close(): void {
    this.socket.destroy();
  }
}

/** NBD_OPT_INFO/GO data. */
export function infoData(exportName: string, infos: number[], nameLengthOverride?: number): Buffer {
  const name = Buffer.from(exportName, "utf8");
  const b = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infos.length);
  b.writeUInt32BE(nameLengthOverride ?? name.length, 0);
  name.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + name.length);
  for (const [i, t] of infos.entries()) b.writeUInt16BE(t, 6 + name.length + 2 * i);
  return b;
}

/** NBD_OPT_LIST/SET_META_CONTEXT data. */
export function metaContextData(exportName: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const name = Buffer.from(exportName, "utf8");
  const u32 = (n: number) => {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(n, 0);
    return b;
  };
  parts.push(u32(name.length), name, u32(queries.length));
  for (const q of queries) {
    const b = Buffer.from(q, "utf8");
    parts.push(u32(b.length), b);
  }
  return Buffer.concat(parts);
}
