import { readFileSync } from "node:fs";
import * as net from "node:net";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import * as tls from "node:tls";
import {
  allocData,
  type BlockDevice,
  checkRange,
  type Errno,
  type Extent,
  IoError,
  mergeExtents,
  type StatusContext,
  type WriteOptions,
  type WriteZeroesOptions,
  type ZeroRun,
} from "@udm/kcopyd";
import { type ClientHandshakeResult, clientHandshake } from "./client-handshake.js";
import { BASE_ALLOCATION } from "./export-entry.js";
import { type NbdUri, parseNbdUri } from "./uri.js";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
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
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NbdProtocolError,
  REQUEST_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  writeRequestHeader,
} from "./wire.js";

/** Payload-less requests (TRIM, WRITE_ZEROES, BLOCK_STATUS) are split at this length. */
const MAX_EFFECT_BYTES = 1024 * 1024 * 1024;
/** A structured chunk payload (other than read data) larger than this means a broken server. */
const MAX_CHUNK_PAYLOAD_BYTES = 64 * 1024 * 1024;
/** Zeros written per request when the server cannot WRITE_ZEROES. */
const ZERO_FILL_BYTES = 1024 * 1024;

const ERRNO_OF_NBD_ERROR: Record<number, Errno> = {
  [NBD_EPERM]: "EPERM",
  [NBD_EIO]: "EIO",
  [NBD_ENOMEM]: "ENOMEM",
  [NBD_EINVAL]: "EINVAL",
  [NBD_ENOSPC]: "ENOSPC",
  [NBD_EOVERFLOW]: "EOVERFLOW",
  [NBD_ENOTSUP]: "ENOTSUP",
  [NBD_ESHUTDOWN]: "ESHUTDOWN",
};

export interface NbdDeviceOptions {
  readOnly?: boolean;
  /**
   * After a lost connection, reconnect up to `retries` times (`Infinity`: until closed) `delayMs`
   * apart. By default requests in flight and new ones wait and are replayed on the new connection;
   * with `holdRequests: false` they fail at once with EIO while the device reconnects in the
   * background (what a mirror leg wants: the mirror goes on without it and resyncs it when
   * `watchHealth` reports it back).
   */
  reconnect?: { retries: number; delayMs: number; holdRequests?: boolean };
  /** TLS credentials (PEM); `nbds://` URIs require TLS. */
  tls?: { ca?: string | Buffer; cert?: string | Buffer; key?: string | Buffer; servername?: string };
  /** The name tables print; default the URI. */
  name?: string;
}

interface Pending {
  type: number;
  flags: number;
  offset: number;
  length: number;
  payload: Buffer | null;
  /** READ: where the data goes. */
  target: Buffer | null;
  /** BLOCK_STATUS: descriptors by context id. */
  status: Map<number, Array<{ lengthBytes: number; flags: number }>> | null;
  error: { code: number; message: string } | null;
  /** READ with structured replies: bytes the data and hole chunks covered. */
  covered: number;
  /** readIntoSparse: where the OFFSET_HOLE chunks of the reply are collected (device offsets). */
  holes: ZeroRun[] | null;
  resolve: () => void;
  reject: (err: Error) => void;
}

type ParseMode = "header" | "simple-data" | "chunk-offset" | "chunk-data" | "chunk-payload";

/**
 * One connection in transmission: pipelined requests keyed by cookie, a reply parser that
 * copies read data straight into the caller's buffer.
 */
class ClientConnection {
  private readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private mode: ParseMode = "header";
  private current: Pending | null = null;
  private currentCookie = 0;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  private dataAt = 0;
  private dataLeft = 0;
  private closedFlag = false;

  constructor(
    readonly stream: Duplex,
    readonly agreed: ClientHandshakeResult,
    private readonly onClosed: (inFlight: Pending[], reason: string) => void,
  ) {
    stream.on("data", (c: Buffer) => this.onData(c));
    stream.on("error", () => {});
    stream.on("close", () => this.close("connection closed"));
    if (agreed.leftover.length) this.onData(agreed.leftover);
    stream.resume();
  }

  get inFlight(): number {
    return this.pending.size;
  }

  get isClosed(): boolean {
    return this.closedFlag;
  }

  submit(p: Pending): void {
    if (this.closedFlag) {
      this.onClosed([p], "connection closed");
      return;
    }
    const cookie = this.nextCookie;
    this.nextCookie = this.nextCookie >= 0xffffffff ? 1 : this.nextCookie + 1;
    this.pending.set(cookie, p);
    const header = Buffer.allocUnsafe(REQUEST_BYTES);
    const cookieBytes = Buffer.allocUnsafe(8);
    cookieBytes.writeUInt32BE(0, 0);
    cookieBytes.writeUInt32BE(cookie, 4);
    writeRequestHeader(header, 0, p.flags, p.type, cookieBytes, BigInt(p.offset), p.length);
    if (p.payload) {
      this.stream.cork();
      this.stream.write(header);
      this.stream.write(p.payload);
      process.nextTick(() => this.stream.uncork());
    } else {
      this.stream.write(header);
    }
  }

  disconnect(): void {
    const cookie = Buffer.alloc(8);
    const h = Buffer.allocUnsafe(REQUEST_BYTES);
    writeRequestHeader(h, 0, 0, NBD_CMD_DISC, cookie, 0n, 0);
    this.stream.end(h);
  }

  close(reason: string): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    this.stream.destroy();
    const inFlight = [...this.pending.values()];
    this.pending.clear();
    this.onClosed(inFlight, reason);
  }

  private onData(chunk: Buffer): void {
    if (this.closedFlag) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    try {
      this.parse();
    } catch (err) {
      this.close((err as Error).message);
    }
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const head = this.chunks[0] as Buffer;
    if (head.length >= n) {
      const out = head.subarray(0, n);
      if (head.length === n) this.chunks.shift();
      else this.chunks[0] = head.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, 0, n);
    return out;
  }

  private copyOut(into: Buffer, at: number, n: number): void {
    let done = 0;
    while (done < n) {
      const c = this.chunks[0] as Buffer;
      const k = Math.min(c.length, n - done);
      c.copy(into, at + done, 0, k);
      done += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
  }

  private lookup(b: Buffer, at: number): Pending {
    const high = b.readUInt32BE(at);
    const cookie = b.readUInt32BE(at + 4);
    const p = high === 0 ? this.pending.get(cookie) : undefined;
    if (!p) throw new NbdProtocolError(`server replied to unknown cookie ${high}:${cookie}`);
    this.currentCookie = cookie;
    return p;
  }

  private finish(p: Pending): void {
    this.pending.delete(this.currentCookie);
    this.current = null;
    if (!p.error && p.type === NBD_CMD_READ && this.agreed.structured && p.covered < p.length) {
      p.error = { code: NBD_EIO, message: `server answered ${p.covered} of ${p.length} bytes of a read` };
    }
    if (p.error) p.reject(toIoError(p.error, this.agreed));
    else p.resolve();
  }

  private parse(): void {
    for (;;) {
      switch (this.mode) {
        case "header": {
          if (this.buffered < 4) return;
          const head = this.chunks[0] as Buffer;
          const magic = head.length >= 4 ? head.readUInt32BE(0) : this.peekMagic();
          if (magic === SIMPLE_REPLY_MAGIC) {
            if (this.buffered < 16) return;
            const h = this.take(16);
            const p = this.lookup(h, 8);
            const error = h.readUInt32BE(4);
            if (error) {
              p.error = { code: error, message: "" };
              this.finish(p);
            } else if (p.type === NBD_CMD_READ) {
              if (this.agreed.structured)
                throw new NbdProtocolError("simple reply to a READ after structured replies");
              this.current = p;
              this.dataAt = 0;
              this.dataLeft = p.length;
              this.mode = "simple-data";
            } else this.finish(p);
          } else if (magic === STRUCTURED_REPLY_MAGIC) {
            if (this.buffered < 20) return;
            const h = this.take(20);
            const p = this.lookup(h, 8);
            this.current = p;
            this.chunkFlags = h.readUInt16BE(4);
            this.chunkType = h.readUInt16BE(6);
            this.chunkLength = h.readUInt32BE(16);
            if (this.chunkType === NBD_REPLY_TYPE_OFFSET_DATA) {
              if (p.type !== NBD_CMD_READ || this.chunkLength < 8)
                throw new NbdProtocolError("bad OFFSET_DATA chunk");
              this.mode = "chunk-offset";
            } else if (this.chunkLength > MAX_CHUNK_PAYLOAD_BYTES) {
              throw new NbdProtocolError(`structured chunk of ${this.chunkLength} bytes`);
            } else this.mode = "chunk-payload";
          } else {
            throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
          }
          break;
        }
        case "simple-data":
        case "chunk-data": {
          const p = this.current as Pending;
          const n = Math.min(this.dataLeft, this.buffered);
          if (n === 0 && this.dataLeft > 0) return;
          this.copyOut(p.target as Buffer, this.dataAt, n);
          this.dataAt += n;
          this.dataLeft -= n;
          if (this.dataLeft === 0) {
            if (this.mode === "simple-data") this.finish(p);
            else this.endChunk(p);
            this.mode = "header";
          }
          break;
        }
        case "chunk-offset": {
          if (this.buffered < 8) return;
          const p = this.current as Pending;
          const at = Number(this.take(8).readBigUInt64BE(0)) - p.offset;
          const len = this.chunkLength - 8;
          if (at < 0 || at + len > p.length)
            throw new NbdProtocolError("OFFSET_DATA chunk outside the request");
          this.dataAt = at;
          this.dataLeft = len;
          p.covered += len;
          this.mode = "chunk-data";
          if (len === 0) {
            this.endChunk(p);
            this.mode = "header";
          }
          break;
        }
        case "chunk-payload": {
          if (this.buffered < this.chunkLength) return;
          const p = this.current as Pending;
          const payload = this.take(this.chunkLength);
          this.onChunk(p, payload);
          this.mode = "header";
          this.endChunk(p);
          break;
        }
      }
    }
  }

  private peekMagic(): number {
    const b = Buffer.allocUnsafe(4);
    let got = 0;
    for (const c of this.chunks) {
      const k = Math.min(c.length, 4 - got);
      c.copy(b, got, 0, k);
      got += k;
      if (got === 4) break;
    }
    return b.readUInt32BE(0);
  }

  private endChunk(p: Pending): void {
    if (this.chunkFlags & NBD_REPLY_FLAG_DONE) this.finish(p);
  }

  private onChunk(p: Pending, payload: Buffer): void {
    const type = this.chunkType;
    if (type === NBD_REPLY_TYPE_NONE) return;
    if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (p.type !== NBD_CMD_READ || payload.length !== 12)
        throw new NbdProtocolError("bad OFFSET_HOLE chunk");
      const at = Number(payload.readBigUInt64BE(0)) - p.offset;
      const len = payload.readUInt32BE(8);
      if (at < 0 || at + len > p.length) throw new NbdProtocolError("OFFSET_HOLE chunk outside the request");
      (p.target as Buffer).fill(0, at, at + len);
      p.covered += len;
      if (len) p.holes?.push({ offsetBytes: p.offset + at, lengthBytes: len });
      return;
    }
    if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      if (p.type !== NBD_CMD_BLOCK_STATUS || payload.length < 12 || (payload.length - 4) % 8) {
        throw new NbdProtocolError("bad BLOCK_STATUS chunk");
      }
      const out: Array<{ lengthBytes: number; flags: number }> = [];
      for (let at = 4; at < payload.length; at += 8) {
        out.push({ lengthBytes: payload.readUInt32BE(at), flags: payload.readUInt32BE(at + 4) });
      }
      p.status ??= new Map();
      p.status.set(payload.readUInt32BE(0), out);
      return;
    }
    if (type & 0x8000) {
      const code = payload.length >= 4 ? payload.readUInt32BE(0) : NBD_EIO;
      const msgLen = payload.length >= 6 ? payload.readUInt16BE(4) : 0;
      const message = payload.toString("utf8", 6, Math.min(payload.length, 6 + msgLen));
      p.error ??= { code: code || NBD_EIO, message };
      return;
    }
    throw new NbdProtocolError(`unknown structured chunk type ${type}`);
  }
}

function toIoError(e: { code: number; message: string }, _agreed: ClientHandshakeResult): IoError {
  const errno = ERRNO_OF_NBD_ERROR[e.code] ?? "EIO";
  return new IoError(errno, "nbd", e.message || `server error ${e.code}`);
}

type State = "connected" | "reconnecting" | "failed" | "closed";

/**
 * A BlockDevice served by a remote NBD server (`nbd://`, `nbd+unix://`, `nbds://`): requests
 * are pipelined on one connection, reads land directly in the caller's buffer, block status
 * comes from `base:allocation`. With `reconnect`, a lost connection is re-established and the
 * requests in flight are replayed; `watchHealth` listeners hear about both.
 *
 * @example
 * ```ts
 * const remote = await NbdDevice.connect("nbd://127.0.0.1:10809/disk", { reconnect: { retries: 5, delayMs: 200 } });
 * const data = await remote.read(0, 4096);
 * await remote.close();
 * ```
 */
export class NbdDevice implements BlockDevice {
  readonly name: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  private readonly uri: NbdUri;
  private readonly options: NbdDeviceOptions;
  private conn: ClientConnection;
  private state: State = "connected";
  private readonly waiting: Pending[] = [];
  private readonly healthListeners = new Set<(healthy: boolean) => void>();
  private idleWaiters: Array<() => void> = [];
  /** Ends the pause between reconnect attempts early (close()). */
  private cancelReconnectWait: (() => void) | null = null;

  private constructor(uri: NbdUri, options: NbdDeviceOptions, name: string, conn: ClientConnection) {
    this.uri = uri;
    this.options = options;
    this.name = name;
    this.conn = conn;
    const a = conn.agreed;
    this.sizeBytes = a.sizeBytes;
    this.logicalBlockSize = a.blockSize.minimum >= 4096 ? 4096 : 512;
    this.readOnly = (options.readOnly ?? false) || (a.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0;
  }

  /** Connects and negotiates (GO, structured replies, base:allocation). */
  static async connect(uri: string, options: NbdDeviceOptions = {}): Promise<NbdDevice> {
    const parsed = parseNbdUri(uri);
    let device: NbdDevice | null = null;
    const conn = await openConnection(parsed, options, (inFlight, reason) =>
      device?.onConnectionLost(inFlight, reason),
    );
    device = new NbdDevice(parsed, options, options.name ?? uri, conn);
    return device;
  }

  /** Export flags as the server sent them (NBD_FLAG_*). */
  get transmissionFlags(): number {
    return this.conn.agreed.transmissionFlags;
  }

  /** Whether the server negotiated structured replies. */
  get structuredReplies(): boolean {
    return this.conn.agreed.structured;
  }

  watchHealth(listener: (healthy: boolean) => void): () => void {
    this.healthListeners.add(listener);
    return () => this.healthListeners.delete(listener);
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = allocData(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    const max = this.conn.agreed.blockSize.maximum;
    const parts: Array<Promise<void>> = [];
    for (let done = 0; done < target.length; done += max) {
      const n = Math.min(max, target.length - done);
      parts.push(this.request(NBD_CMD_READ, 0, offsetBytes + done, n, null, target.subarray(done, done + n)));
    }
    await Promise.all(parts);
  }

  /**
   * Like readInto; the zero runs are the OFFSET_HOLE chunks of the server's replies to this very
   * read (what the server vouched for), none with simple replies.
   */
  async readIntoSparse(offsetBytes: number, target: Buffer): Promise<ZeroRun[]> {
    checkRange(this, offsetBytes, target.length);
    const max = this.conn.agreed.blockSize.maximum;
    const parts: Array<Promise<void>> = [];
    const holes: ZeroRun[][] = [];
    for (let done = 0; done < target.length; done += max) {
      const n = Math.min(max, target.length - done);
      const found: ZeroRun[] = [];
      holes.push(found);
      parts.push(
        this.request(NBD_CMD_READ, 0, offsetBytes + done, n, null, target.subarray(done, done + n), found),
      );
    }
    await Promise.all(parts);
    return holes.flatMap((h) => h.sort((a, b) => a.offsetBytes - b.offsetBytes));
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    this.checkWritable();
    checkRange(this, offsetBytes, data.length);
    const max = this.conn.agreed.blockSize.maximum;
    const fua = this.fuaFlag(options);
    const parts: Array<Promise<void>> = [];
    for (let done = 0; done < data.length; done += max) {
      const n = Math.min(max, data.length - done);
      parts.push(
        this.request(NBD_CMD_WRITE, fua, offsetBytes + done, n, data.subarray(done, done + n), null),
      );
    }
    await Promise.all(parts);
    await this.emulatedFua(options);
  }

  async flush(): Promise<void> {
    if (this.flags & NBD_FLAG_SEND_FLUSH) await this.request(NBD_CMD_FLUSH, 0, 0, 0, null, null);
  }

  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    this.checkWritable();
    checkRange(this, offsetBytes, lengthBytes);
    // Discard is advisory: without SEND_TRIM it is a no-op.
    if (!(this.flags & NBD_FLAG_SEND_TRIM)) return;
    await this.split(offsetBytes, lengthBytes, (o, n) =>
      this.request(NBD_CMD_TRIM, this.fuaFlag(options), o, n, null, null),
    );
    await this.emulatedFua(options);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    this.checkWritable();
    checkRange(this, offsetBytes, lengthBytes);
    if (this.flags & NBD_FLAG_SEND_WRITE_ZEROES) {
      const flags = this.fuaFlag(options) | (options?.mayTrim ? 0 : NBD_CMD_FLAG_NO_HOLE);
      await this.split(offsetBytes, lengthBytes, (o, n) =>
        this.request(NBD_CMD_WRITE_ZEROES, flags, o, n, null, null),
      );
    } else {
      const zeros = Buffer.alloc(Math.min(ZERO_FILL_BYTES, lengthBytes));
      await this.split(
        offsetBytes,
        lengthBytes,
        (o, n) => this.write(o, zeros.subarray(0, n)),
        ZERO_FILL_BYTES,
      );
    }
    await this.emulatedFua(options);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    if (lengthBytes === 0) return [];
    if (!this.conn.agreed.metaContexts.has(BASE_ALLOCATION))
      return [{ offsetBytes, lengthBytes, kind: "data" }];
    const out: Extent[] = [];
    const end = offsetBytes + lengthBytes;
    let pos = offsetBytes;
    while (pos < end) {
      const p = this.makePending(
        NBD_CMD_BLOCK_STATUS,
        0,
        pos,
        Math.min(MAX_EFFECT_BYTES, end - pos),
        null,
        null,
      );
      await this.enqueue(p);
      const status = p.pending.status?.get(this.conn.agreed.metaContexts.get(BASE_ALLOCATION) as number);
      if (!status?.length)
        throw new IoError("EIO", this.name, "BLOCK_STATUS reply without base:allocation extents");
      for (const s of status) {
        if (pos >= end) break;
        const len = Math.min(s.lengthBytes, end - pos);
        if (len <= 0) throw new IoError("EIO", this.name, "BLOCK_STATUS reply with an empty extent");
        // HOLE without ZERO reads as garbage: only HOLE|ZERO is a hole a reader may skip.
        const kind =
          s.flags & NBD_STATE_HOLE && s.flags & NBD_STATE_ZERO
            ? "hole"
            : s.flags & NBD_STATE_ZERO
              ? "zero"
              : "data";
        out.push({ offsetBytes: pos, lengthBytes: len, kind });
        pos += len;
      }
    }
    return mergeExtents(out);
  }

  /**
   * The server's own meta contexts for this export (all but `base:allocation`), so a remote
   * target's status map (a mirror's out-of-sync regions...) stacks through NBD like a local one.
   */
  statusContexts(): StatusContext[] {
    return [...this.conn.agreed.metaContexts.keys()]
      .filter((n) => n !== BASE_ALLOCATION)
      .map((name) => ({
        name,
        description: `${name} of ${this.name}`,
        query: (offsetBytes: number, lengthBytes: number) =>
          this.queryContext(name, offsetBytes, lengthBytes),
      }));
  }

  /** One BLOCK_STATUS round for a context: runs from `offsetBytes`, possibly stopping early. */
  private async queryContext(
    name: string,
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Array<{ lengthBytes: number; flags: number }>> {
    checkRange(this, offsetBytes, lengthBytes);
    if (lengthBytes === 0) return [];
    const length = Math.min(MAX_EFFECT_BYTES, lengthBytes);
    const p = this.makePending(NBD_CMD_BLOCK_STATUS, 0, offsetBytes, length, null, null);
    await this.enqueue(p);
    // Ids are per connection: look the name up again in case a reconnect renumbered it.
    const id = this.conn.agreed.metaContexts.get(name);
    const runs = id === undefined ? undefined : p.pending.status?.get(id);
    if (!runs?.length) throw new IoError("EIO", this.name, `BLOCK_STATUS reply without ${name} extents`);
    const out: Array<{ lengthBytes: number; flags: number }> = [];
    let covered = 0;
    for (const r of runs) {
      if (covered >= length) break;
      const len = Math.min(r.lengthBytes, length - covered);
      out.push({ lengthBytes: len, flags: r.flags });
      covered += len;
    }
    return out;
  }

  /** Waits for requests in flight, sends NBD_CMD_DISC and closes the connection. */
  async close(): Promise<void> {
    if (this.state === "closed") return;
    if (this.conn.inFlight > 0 || this.waiting.length > 0) {
      await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    }
    const wasConnected = this.state === "connected";
    this.state = "closed";
    this.cancelReconnectWait?.();
    if (wasConnected && !this.conn.isClosed) {
      const closed = new Promise<void>((resolve) => this.conn.stream.once("close", () => resolve()));
      this.conn.disconnect();
      const timer = setTimeout(() => this.conn.stream.destroy(), 2000);
      await closed;
      clearTimeout(timer);
    }
  }

  private get flags(): number {
    return this.conn.agreed.transmissionFlags;
  }

  private fuaFlag(options?: WriteOptions): number {
    return options?.fua && this.flags & NBD_FLAG_SEND_FUA ? NBD_CMD_FLAG_FUA : 0;
  }

  private async emulatedFua(options?: WriteOptions): Promise<void> {
    if (options?.fua && !(this.flags & NBD_FLAG_SEND_FUA)) await this.flush();
  }

  private checkWritable(): void {
    if (this.readOnly) throw new IoError("EPERM", this.name, "device is read-only");
  }

  private async split(
    offset: number,
    length: number,
    op: (offset: number, length: number) => Promise<void>,
    pieceBytes = MAX_EFFECT_BYTES,
  ): Promise<void> {
    const parts: Array<Promise<void>> = [];
    for (let done = 0; done < length; done += pieceBytes)
      parts.push(op(offset + done, Math.min(pieceBytes, length - done)));
    await Promise.all(parts);
  }

  private makePending(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Buffer | null,
    target: Buffer | null,
  ): { pending: Pending; promise: Promise<void> } {
    let resolve!: () => void;
    let reject!: (e: Error) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const pending: Pending = {
      type,
      flags,
      offset,
      length,
      payload,
      target,
      status: null,
      error: null,
      covered: 0,
      holes: null,
      resolve,
      reject,
    };
    return { pending, promise };
  }

  private enqueue(p: { pending: Pending; promise: Promise<void> }): Promise<void> {
    const done = p.promise.finally(() => this.checkIdle());
    switch (this.state) {
      case "connected":
        this.conn.submit(p.pending);
        break;
      case "reconnecting":
        if (this.holdsRequests) this.waiting.push(p.pending);
        else p.pending.reject(new IoError("EIO", this.name, "NBD connection lost (reconnecting)"));
        break;
      case "failed":
        if (this.options.reconnect) {
          if (this.holdsRequests) this.waiting.push(p.pending);
          else p.pending.reject(new IoError("EIO", this.name, "NBD connection lost (reconnecting)"));
          this.reconnect();
        } else p.pending.reject(new IoError("EIO", this.name, "NBD connection lost"));
        break;
      case "closed":
        p.pending.reject(new IoError("ESHUTDOWN", this.name, "device is closed"));
        break;
    }
    return done;
  }

  private request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Buffer | null,
    target: Buffer | null,
    holes: ZeroRun[] | null = null,
  ): Promise<void> {
    const p = this.makePending(type, flags, offset, length, payload, target);
    p.pending.holes = holes;
    return this.enqueue(p).catch((err: Error) => {
      if (err instanceof IoError && err.device === "nbd")
        throw new IoError(err.code, this.name, `${err.message}`);
      throw err;
    });
  }

  private checkIdle(): void {
    if (this.conn.inFlight === 0 && this.waiting.length === 0 && this.idleWaiters.length) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }

  private setHealth(healthy: boolean): void {
    for (const l of this.healthListeners) {
      try {
        l(healthy);
      } catch {
        // a listener's failure must not break the device
      }
    }
  }

  private onConnectionLost(inFlight: Pending[], reason: string): void {
    if (this.state === "closed") {
      for (const p of inFlight) p.reject(new IoError("ESHUTDOWN", this.name, "device is closed"));
      return;
    }
    if (this.state !== "connected") return;
    this.setHealth(false);
    if (!this.options.reconnect) {
      this.state = "failed";
      for (const p of inFlight) p.reject(new IoError("EIO", this.name, `NBD connection lost: ${reason}`));
      return;
    }
    if (!this.holdsRequests) {
      for (const p of inFlight) p.reject(new IoError("EIO", this.name, `NBD connection lost: ${reason}`));
      this.reconnect();
      return;
    }
    // Replaying is safe: every NBD request is idempotent on a block device.
    for (const p of inFlight) {
      p.error = null;
      p.status = null;
      p.covered = 0;
      if (p.holes) p.holes.length = 0;
    }
    this.waiting.unshift(...inFlight);
    this.reconnect();
  }

  /** Whether requests wait for a reconnect (rather than failing while the device is down). */
  private get holdsRequests(): boolean {
    return this.options.reconnect?.holdRequests ?? true;
  }

  private reconnect(): void {
    if (this.state === "reconnecting") return;
    this.state = "reconnecting";
    const policy = this.options.reconnect ?? { retries: 0, delayMs: 0 };
    void (async () => {
      let lastError = "";
      for (let attempt = 0; attempt <= policy.retries; attempt++) {
        if (attempt > 0 || policy.delayMs > 0) {
          await new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, policy.delayMs);
            this.cancelReconnectWait = () => {
              clearTimeout(timer);
              resolve();
            };
          });
          this.cancelReconnectWait = null;
        }
        if (this.state === "closed") return;
        try {
          const conn = await openConnection(this.uri, this.options, (f, r) => this.onConnectionLost(f, r));
          if ((this.state as State) === "closed") {
            // close() ran while this attempt connected: don't revive the device (or leak the socket).
            conn.close("device closed");
            return;
          }
          if (conn.agreed.sizeBytes !== this.sizeBytes) {
            conn.close("size changed");
            lastError = `export size changed from ${this.sizeBytes} to ${conn.agreed.sizeBytes}`;
            break;
          }
          this.conn = conn;
          this.state = "connected";
          this.setHealth(true);
          const queued = this.waiting.splice(0);
          for (const p of queued) conn.submit(p);
          return;
        } catch (err) {
          lastError = (err as Error).message;
        }
      }
      this.state = "failed";
      const queued = this.waiting.splice(0);
      for (const p of queued) p.reject(new IoError("EIO", this.name, `NBD reconnect failed: ${lastError}`));
    })();
  }
}

function tlsOptions(uri: NbdUri, options: NbdDeviceOptions): tls.ConnectionOptions | undefined {
  if (!uri.tls && !options.tls) return undefined;
  const out: tls.ConnectionOptions = {};
  const dir = uri.tlsCertificates;
  const fromDir = (file: string) => {
    try {
      return dir ? readFileSync(join(dir, file)) : undefined;
    } catch {
      return undefined;
    }
  };
  const ca = options.tls?.ca ?? fromDir("ca-cert.pem");
  const cert = options.tls?.cert ?? fromDir("client-cert.pem");
  const key = options.tls?.key ?? fromDir("client-key.pem");
  if (ca) out.ca = ca;
  if (cert) out.cert = cert;
  if (key) out.key = key;
  const hostname = options.tls?.servername ?? uri.tlsHostname ?? uri.host ?? "localhost";
  if (!net.isIP(hostname)) out.servername = hostname;
  out.checkServerIdentity = (_host, peer) => tls.checkServerIdentity(hostname, peer);
  return out;
}

async function openConnection(
  uri: NbdUri,
  options: NbdDeviceOptions,
  onClosed: (inFlight: Pending[], reason: string) => void,
): Promise<ClientConnection> {
  const tlsOpts = tlsOptions(uri, options);
  const socket =
    uri.transport === "unix"
      ? net.connect({ path: uri.socketPath as string })
      : net.connect({ host: uri.host ?? "127.0.0.1", port: uri.port ?? 10809 });
  socket.setNoDelay(true);
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", () => {
      socket.off("error", reject);
      resolve();
    });
    socket.once("error", reject);
  });
  try {
    const agreed = await clientHandshake(socket, {
      exportName: uri.exportName,
      ...(tlsOpts && { tls: tlsOpts }),
      metaContexts: [BASE_ALLOCATION],
      discoverContexts: true,
    });
    return new ClientConnection(agreed.stream, agreed, onClosed);
  } catch (err) {
    socket.destroy();
    throw err;
  }
}
