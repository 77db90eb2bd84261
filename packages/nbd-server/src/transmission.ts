import type { Duplex } from "node:stream";
import {
  allocData,
  type BlockDevice,
  poisonEnabled,
  poisonViolation,
  type TargetLogger,
  type ZeroRun,
} from "@udm/kcopyd";
import { BufferPool } from "./buffer-pool.js";
import { startReceiving, takeOverReads } from "./direct-receive.js";
import { BASE_ALLOCATION, deviceContexts, type ExportEntry, isReadOnly } from "./export-entry.js";
import type { Negotiated } from "./handshake.js";
import { nbdErrorOf, validateRequest } from "./validate.js";
import {
  COMMAND_NAMES,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeChunk,
  encodeErrorChunk,
  encodeHoleChunk,
  encodeSimpleReply,
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
  NBD_ENOTSUP,
  NBD_ESHUTDOWN,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  type NbdRequest,
  REQUEST_BYTES,
  SIMPLE_REPLY_BYTES,
  STRUCTURED_REPLY_BYTES,
  writeChunkHeader,
  writeSimpleReplyHeader,
} from "./wire.js";

/** Requests outstanding on one connection before we stop reading from it (tiny requests cost memory too). */
export const MAX_IN_FLIGHT_REQUESTS = 1024;
/** Extents per BLOCK_STATUS chunk; the spec asks for at most 2^20, we keep chunks small. */
export const MAX_EXTENTS_PER_CHUNK = 8192;
/** Refused requests logged at warn level per connection; later ones are logged at debug level. */
export const MAX_LOGGED_REFUSALS = 20;
/** After DISC or a drain we half-close; a client that never closes its side is cut after this. */
export const CLOSE_GRACE_MS = 5000;
/** Reads shorter than this are sent as one data chunk without the device's sparse read. */
export const HOLE_DETECT_MIN_BYTES = 64 * 1024;
/** FAST_ZERO succeeds (as a no-op) only on ranges up to this that a sparse read vouches are zeros. */
export const FAST_ZERO_CHECK_MAX_BYTES = 4 * 1024 * 1024;
/** Vouched zero runs shorter than this are sent as data (fewer, larger chunks). */
export const MIN_HOLE_BYTES = 4096;
/** Idle READ reply buffers kept for reuse, shared by every connection of the process. */
const replyBuffers = new BufferPool(64 * 1024 * 1024);
/**
 * Idle WRITE payload buffers kept for reuse, shared by every connection: a payload that arrives in
 * several socket chunks is gathered into one of these, which goes back once the device's write
 * has resolved (a fresh 256 KiB buffer per WRITE cost a malloc, first-touch page faults and GC).
 */
const payloadBuffers = new BufferPool(64 * 1024 * 1024, { what: "WRITE payload" });
/** OFFSET_DATA chunk overhead: chunk header plus the u64 offset. */
const DATA_CHUNK_HEADER_BYTES = STRUCTURED_REPLY_BYTES + 8;
const ZERO_PAGE = Buffer.alloc(64 * 1024);
/** Direct receive: the per-connection buffer headers and small payloads are read into. */
const RECEIVE_SCRATCH_BYTES = 64 * 1024;
/** Direct receive: a WRITE payload with at least this much still to come is read straight into its buffer. */
const DIRECT_PAYLOAD_MIN_BYTES = 16 * 1024;

/** What a transmission session needs besides the negotiated state. */
export interface SessionOptions {
  negotiated: Negotiated;
  connectionId: number;
  peer: string;
  log: TargetLogger;
  debug: boolean;
  /** Request payloads and read data held at once (plus unsent replies) before reading pauses. */
  maxInFlightBytes: number;
}

type Mode = "header" | "payload" | "skip" | "stopped";

/**
 * The transmission phase of one connection: an incremental parser over the socket's chunks,
 * every request served concurrently through the export's current device, replies written as
 * they complete (out of order); when several are outstanding, replies are corked per event-loop
 * turn so they share writev calls and packets, and at queue depth 1 a reply leaves at once.
 *
 * @example
 * ```ts
 * const session = new TransmissionSession({ negotiated, connectionId: 1, peer, log, debug: false, maxInFlightBytes: 64 << 20 });
 * await session.closed;
 * ```
 */
export class TransmissionSession {
  readonly entry: ExportEntry;
  readonly closed: Promise<void>;
  private readonly stream: Duplex;
  private readonly structured: boolean;
  private readonly contextIds: Map<number, string>;
  private readonly log: TargetLogger;
  private readonly debug: boolean;
  private readonly maxInFlightBytes: number;
  private readonly connectionId: number;

  private chunks: Buffer[] = [];
  private bufferedBytes = 0;
  private mode: Mode = "header";
  private readonly headerScratch = Buffer.allocUnsafe(REQUEST_BYTES);
  private payloadRequest: NbdRequest | null = null;
  private payload: Buffer | null = null;
  /** Whether `payload` came from `payloadBuffers` (and goes back there after the write). */
  private payloadPooled = false;
  private payloadFilled = 0;
  private skipLeft = 0;
  private skipRefusal: { error: number; message: string } | null = null;
  /**
   * Direct receive (plain sockets): reads land in `scratch`, or straight in the rest of a pooled
   * WRITE payload (`readTarget`), instead of a fresh chunk per read; null: 'data' events.
   */
  private scratch: Buffer | null = null;
  private readTarget: Buffer | null = null;

  private inFlightRequests = 0;
  private refusals = 0;
  private inFlightBytes = 0;
  private paused = false;
  private corked = false;
  private ending = false;
  private draining: string | null = null;
  private isClosed = false;
  private resolveClosed!: () => void;
  private readonly poison = poisonEnabled();

  constructor(options: SessionOptions) {
    const n = options.negotiated;
    this.stream = n.stream;
    this.entry = n.entry;
    this.structured = n.structured;
    this.contextIds = new Map(n.metaContexts.map((c) => [c.id, c.name]));
    this.log = options.log;
    this.debug = options.debug;
    this.maxInFlightBytes = options.maxInFlightBytes;
    this.connectionId = options.connectionId;
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.stream.on("data", (chunk: Buffer) => this.onData(chunk));
    this.stream.on("drain", () => this.pump());
    this.stream.on("error", (err: Error) => {
      this.log.debug({ connection: this.connectionId, err: err.message }, "nbd connection error");
      this.stream.destroy();
    });
    this.stream.on("close", () => this.onClose());
    this.stream.on("end", () => {
      // The client half-closed: serve what is in flight, then finish our side.
      this.stopReading();
      this.endWhenIdle();
    });
    if (n.leftover.length) this.onData(n.leftover);
    const buffered = takeOverReads(this.stream);
    if (buffered) {
      // The scratch first: a WRITE parsed from here on gets its payload buffer before its bytes
      // (so no payload ever aliases a received chunk, which may be the scratch).
      this.scratch = Buffer.allocUnsafeSlow(RECEIVE_SCRATCH_BYTES);
      for (const chunk of buffered) this.onData(chunk);
      startReceiving(
        this.stream,
        (nread, buf) => this.onReceive(nread, buf),
        () => this.nextReadTarget(),
      );
    }
    this.stream.resume();
  }

  /** Direct receive: `nread` bytes landed in `buf` (the scratch, or the rest of the payload being received). */
  private onReceive(nread: number, buf: Buffer): void {
    if (buf === this.readTarget && this.mode === "payload") {
      this.readTarget = null;
      this.payloadFilled += nread;
      try {
        if (this.payloadFilled === (this.payloadRequest as NbdRequest).length) this.finishPayload();
      } catch (err) {
        this.parserFailed(err);
        return;
      }
      this.onData(null);
      return;
    }
    this.readTarget = null;
    this.onData(buf.subarray(0, nread));
    // The next read overwrites the scratch: what is still queued of it is kept as a copy.
    const scratch = this.scratch?.buffer;
    for (let i = 0; i < this.chunks.length; i++) {
      const c = this.chunks[i] as Buffer;
      if (c.buffer === scratch) this.chunks[i] = Buffer.from(c);
    }
  }

  /** Direct receive: where the next read lands (asked after each read). */
  private nextReadTarget(): Buffer {
    const req = this.payloadRequest;
    if (this.mode === "payload" && this.bufferedBytes === 0 && this.payload && req) {
      if (req.length - this.payloadFilled >= DIRECT_PAYLOAD_MIN_BYTES) {
        this.readTarget = this.payload.subarray(this.payloadFilled);
        return this.readTarget;
      }
    }
    this.readTarget = null;
    return this.scratch as Buffer;
  }

  /** Requests being served now. */
  get inFlight(): number {
    return this.inFlightRequests;
  }

  /**
   * Stops taking new work: requests already queued are answered ESHUTDOWN, those in flight finish,
   * then the connection is closed. Resolves when it is closed.
   */
  drain(reason: string): Promise<void> {
    if (!this.draining && !this.isClosed) {
      this.draining = reason;
      this.log.info(
        { connection: this.connectionId, export: this.entry.name, reason },
        "nbd connection draining",
      );
      this.pump();
      this.endWhenIdle();
    }
    return this.closed;
  }

  /** Closes the connection now; replies still in flight are dropped. */
  destroy(): void {
    this.stream.destroy();
  }

  /** Received bytes (null: none, but the state moved on, e.g. a payload received directly). */
  private onData(chunk: Buffer | null): void {
    if (this.mode === "stopped") return;
    if (chunk) {
      this.chunks.push(chunk);
      this.bufferedBytes += chunk.length;
    }
    try {
      this.pump();
    } catch (err) {
      this.parserFailed(err);
    }
  }

  /** A bug must cost this connection, never the process and its other clients. */
  private parserFailed(err: unknown): void {
    this.log.error(
      { connection: this.connectionId, export: this.entry.name, err: errorMessage(err) },
      "nbd parser failed",
    );
    this.stopReading();
    this.stream.destroy();
  }

  private onClose(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.mode = "stopped";
    this.chunks = [];
    this.bufferedBytes = 0;
    this.resolveClosed();
  }

  private overBudget(): boolean {
    return (
      this.inFlightRequests >= MAX_IN_FLIGHT_REQUESTS ||
      this.inFlightBytes + this.stream.writableLength >= this.maxInFlightBytes
    );
  }

  /** Parses as many requests as the buffered bytes and the in-flight budget allow. */
  private pump(): void {
    for (;;) {
      if (this.mode === "stopped" || this.isClosed) return;
      if (this.mode === "header") {
        if (this.overBudget()) {
          if (!this.paused) {
            this.paused = true;
            this.stream.pause();
          }
          return;
        }
        if (this.bufferedBytes < REQUEST_BYTES) break;
        const header = this.takeHeader();
        const req = decodeRequest(header);
        if (!req) {
          this.log.warn(
            {
              connection: this.connectionId,
              export: this.entry.name,
              magic: header.readUInt32BE(0).toString(16),
            },
            "nbd bad request magic: closing the connection",
          );
          this.stopReading();
          this.stream.destroy();
          return;
        }
        this.onRequest(req);
      } else if (this.mode === "payload") {
        if (this.bufferedBytes === 0) break;
        this.fillPayload();
      } else {
        if (this.bufferedBytes === 0) break;
        const n = Math.min(this.skipLeft, this.bufferedBytes);
        this.drop(n);
        this.skipLeft -= n;
        if (this.skipLeft === 0) {
          const req = this.payloadRequest as NbdRequest;
          const refusal = this.skipRefusal as { error: number; message: string };
          this.payloadRequest = null;
          this.skipRefusal = null;
          this.mode = "header";
          this.refuse(req, refusal.error, refusal.message);
        }
      }
    }
    if (this.paused) {
      this.paused = false;
      this.stream.resume();
    }
    if (this.draining) this.endWhenIdle();
  }

  private onRequest(req: NbdRequest): void {
    if (req.type === NBD_CMD_DISC) {
      if (this.debug) this.log.debug({ connection: this.connectionId, export: this.entry.name }, "nbd DISC");
      this.stopReading();
      this.endWhenIdle();
      return;
    }
    const refusal = this.draining
      ? { error: NBD_ESHUTDOWN, message: `server is shutting down (${this.draining})` }
      : validateRequest(req, {
          sizeBytes: this.entry.device.sizeBytes,
          readOnly: isReadOnly(this.entry),
          structured: this.structured,
          hasMetaContexts: this.contextIds.size > 0,
        });
    if (req.type === NBD_CMD_WRITE) {
      if (refusal) {
        // The payload must be consumed or the stream loses its framing; it is never buffered.
        this.payloadRequest = req;
        this.skipRefusal = refusal;
        this.skipLeft = req.length;
        this.mode = req.length ? "skip" : "header";
        if (!req.length) this.refuse(req, refusal.error, refusal.message);
        return;
      }
      this.inFlightBytes += req.length;
      this.payloadRequest = req;
      this.payloadFilled = 0;
      this.payload = null;
      this.payloadPooled = false;
      if (this.scratch && req.length) {
        // Direct receive: the payload's buffer exists before its bytes, so reads can land in it
        // (and the received chunks are the scratch's, which a payload must never alias).
        this.payload = payloadBuffers.take(req.length);
        this.payloadPooled = true;
      }
      this.mode = "payload";
      if (req.length === 0) this.finishPayload();
      return;
    }
    if (refusal) {
      this.refuse(req, refusal.error, refusal.message);
      return;
    }
    this.dispatch(req, null, req.type === NBD_CMD_READ ? req.length : 0);
  }

  private fillPayload(): void {
    const req = this.payloadRequest as NbdRequest;
    const head = this.chunks[0] as Buffer;
    if (this.payload === null && this.scratch === null && head.length >= req.length) {
      // The whole payload is in one received chunk: serve it without copying (never with direct
      // receive: the chunk may be a view of the scratch, which the next read overwrites).
      this.payload = head.subarray(0, req.length);
      this.payloadPooled = false;
      this.drop(req.length);
      this.payloadFilled = req.length;
    } else {
      if (this.payload === null) {
        this.payload = payloadBuffers.take(req.length);
        this.payloadPooled = true;
      }
      const n = Math.min(req.length - this.payloadFilled, this.bufferedBytes);
      this.take(n, this.payload.subarray(this.payloadFilled, this.payloadFilled + n));
      this.payloadFilled += n;
    }
    if (this.payloadFilled === req.length) this.finishPayload();
  }

  private finishPayload(): void {
    const req = this.payloadRequest as NbdRequest;
    const payload = this.payload ?? Buffer.alloc(0);
    const pooled = this.payloadPooled;
    this.payloadRequest = null;
    this.payload = null;
    this.payloadPooled = false;
    this.mode = "header";
    // The write's bytes were counted when its header arrived; dispatch counts none again.
    this.inFlightBytes -= req.length;
    this.dispatch(req, payload, req.length, pooled);
  }

  /** The next request header: a view of the head chunk when it is contiguous, else copied together. */
  private takeHeader(): Buffer {
    const head = this.chunks[0] as Buffer;
    if (head.length >= REQUEST_BYTES) {
      const view = head.subarray(0, REQUEST_BYTES);
      this.drop(REQUEST_BYTES);
      return view;
    }
    return this.take(REQUEST_BYTES, this.headerScratch);
  }

  /** Copies `n` buffered bytes into `into`. */
  private take(n: number, into: Buffer): Buffer {
    let done = 0;
    while (done < n) {
      const c = this.chunks[0] as Buffer;
      const k = Math.min(c.length, n - done);
      c.copy(into, done, 0, k);
      done += k;
      this.drop(k);
    }
    return into;
  }

  private drop(n: number): void {
    let left = n;
    this.bufferedBytes -= n;
    while (left > 0) {
      const c = this.chunks[0] as Buffer;
      if (c.length <= left) {
        this.chunks.shift();
        left -= c.length;
      } else {
        this.chunks[0] = c.subarray(left);
        left = 0;
      }
    }
  }

  private stopReading(): void {
    this.mode = "stopped";
    this.chunks = [];
    this.bufferedBytes = 0;
  }

  /** Half-closes once nothing is in flight (after DISC, a drain, or the client's end). */
  private endWhenIdle(): void {
    if (this.inFlightRequests > 0 || this.isClosed) return;
    // A drain waits for a WRITE whose header arrived to get its payload (it is then served).
    if (!this.ending && (this.mode === "stopped" || (this.draining && this.mode === "header"))) {
      this.ending = true;
      this.stopReading();
      this.stream.end();
      setTimeout(() => this.stream.destroy(), CLOSE_GRACE_MS).unref();
    }
  }

  private dispatch(req: NbdRequest, payload: Buffer | null, costBytes: number, pooled = false): void {
    this.inFlightRequests++;
    this.inFlightBytes += costBytes;
    const device = this.entry.device;
    if (this.debug) {
      this.log.debug(
        {
          connection: this.connectionId,
          export: this.entry.name,
          handle: req.cookie.toString("hex"),
          command: COMMAND_NAMES[req.type],
          offset: Number(req.offset),
          length: req.length,
          flags: req.flags,
        },
        "nbd request",
      );
    }
    // One promise reaction per request (no .catch().finally() chain): completions are the hot path.
    let pending: Promise<void> | undefined;
    try {
      pending = this.execute(device, req, payload, pooled);
    } catch (err) {
      this.fail(req, err);
    }
    if (!pending) {
      // Answered at once, inside pump(): only the counters change (pump goes on by itself; no
      // re-entry, which a long run of such requests would turn into deep recursion).
      this.inFlightRequests--;
      this.inFlightBytes -= costBytes;
      return;
    }
    pending.then(
      () => this.settle(costBytes),
      (err: unknown) => {
        this.fail(req, err);
        this.settle(costBytes);
      },
    );
  }

  /** Bookkeeping once a request's reply is queued. */
  private settle(costBytes: number): void {
    this.inFlightRequests--;
    this.inFlightBytes -= costBytes;
    if (this.paused) this.pump();
    this.endWhenIdle();
  }

  /** Starts a request; returns its promise, or undefined when it was answered at once. */
  private execute(
    device: BlockDevice,
    req: NbdRequest,
    payload: Buffer | null,
    pooled: boolean,
  ): Promise<void> | undefined {
    const offset = Number(req.offset);
    const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (req.type) {
      case NBD_CMD_READ:
        return this.read(device, req, offset);
      case NBD_CMD_WRITE:
        // A pooled payload goes back only once the write resolved; a failed write's is left to
        // the GC (a device that rejected early may still be reading it, e.g. another mirror leg).
        return device.write(offset, payload as Buffer, { fua }).then(() => {
          if (pooled) payloadBuffers.give(payload as Buffer);
          this.ok(req);
        });
      case NBD_CMD_FLUSH:
        return device.flush().then(() => this.ok(req));
      case NBD_CMD_TRIM:
        if (!req.length) return this.ok(req);
        return device.discard(offset, req.length, { fua }).then(() => this.ok(req));
      case NBD_CMD_CACHE:
        // A prefetch hint: success promises nothing, so there is nothing to do.
        return this.ok(req);
      case NBD_CMD_WRITE_ZEROES:
        return this.writeZeroes(device, req, offset, fua);
      case NBD_CMD_BLOCK_STATUS:
        return this.blockStatus(device, req, offset);
      default:
        return this.refuse(req, NBD_EINVAL, `unknown command type ${req.type}`);
    }
  }

  private async writeZeroes(
    device: BlockDevice,
    req: NbdRequest,
    offset: number,
    fua: boolean,
  ): Promise<void> {
    if (req.flags & NBD_CMD_FLAG_FAST_ZERO) {
      // We cannot tell whether a device zeroes faster than it writes, except when the range
      // already reads as zeros: then it is a no-op. Otherwise fail fast as the spec asks.
      if (!(await readsAsZeros(device, offset, req.length))) {
        return this.refuse(
          req,
          NBD_ENOTSUP,
          "FAST_ZERO: zeroing this range would not be faster than writing",
        );
      }
      return this.ok(req);
    }
    if (req.length) {
      await device.writeZeroes(offset, req.length, {
        fua,
        mayTrim: (req.flags & NBD_CMD_FLAG_NO_HOLE) === 0,
      });
    }
    return this.ok(req);
  }

  private read(device: BlockDevice, req: NbdRequest, offset: number): Promise<void> | undefined {
    const length = req.length;
    if (!this.structured) return this.readData(device, req, offset, SIMPLE_REPLY_BYTES);
    if (length === 0) return this.send(encodeChunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, req.cookie));
    if ((req.flags & NBD_CMD_FLAG_DF) !== 0 || length < HOLE_DETECT_MIN_BYTES || !device.readIntoSparse) {
      return this.readData(device, req, offset, DATA_CHUNK_HEADER_BYTES);
    }
    return this.readSparse(device, req, offset);
  }

  /**
   * The whole range as one reply into one pooled buffer: a simple reply (`headerBytes` 16) or one
   * OFFSET_DATA chunk with DONE (`headerBytes` 28), header written after the data is in.
   */
  private readData(device: BlockDevice, req: NbdRequest, offset: number, headerBytes: number): Promise<void> {
    const length = req.length;
    const buf = replyBuffers.take(headerBytes + length);
    const done = () => {
      if (headerBytes === SIMPLE_REPLY_BYTES) writeSimpleReplyHeader(buf, 0, 0, req.cookie);
      else this.writeDataHeader(buf, req, NBD_REPLY_FLAG_DONE, req.offset, length);
      this.send(buf, buf);
    };
    if (length === 0) {
      done();
      return Promise.resolve();
    }
    // A failed read's buffer is left to the GC, not the pool: a device that rejected early may
    // still be filling it (errors are rare; reusing it could leak bytes into another reply).
    try {
      return device.readInto(offset, buf.subarray(headerBytes)).then(done);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /**
   * A large read through the device's sparse read: the bytes come from that read, and only the
   * runs that same read vouched are zeros go out as OFFSET_HOLE chunks (never what `extents()`
   * says: it is a hint, and a target's hint may disagree with its reads).
   */
  private readSparse(device: BlockDevice, req: NbdRequest, offset: number): Promise<void> {
    const buf = replyBuffers.take(DATA_CHUNK_HEADER_BYTES + req.length);
    const data = buf.subarray(DATA_CHUNK_HEADER_BYTES);
    const sparseRead = device.readIntoSparse as NonNullable<BlockDevice["readIntoSparse"]>;
    try {
      // As in readData, a failed read's buffer goes to the GC.
      return sparseRead.call(device, offset, data).then((zeros) => this.sendSparse(req, buf, zeros));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** Sends a sparse read's reply: data chunks (views of `buf`) between the holes `zeros` vouches for. */
  private sendSparse(req: NbdRequest, buf: Buffer, zeros: ZeroRun[]): void {
    const offset = Number(req.offset);
    const length = req.length;
    const holes = holeRuns(zeros, offset, length);
    if (this.poison) this.checkVouched(req, buf, holes);
    if (holes.length === 0) {
      this.writeDataHeader(buf, req, NBD_REPLY_FLAG_DONE, req.offset, length);
      this.send(buf, buf);
      return;
    }
    if (holes.length === 1 && holes[0]?.lengthBytes === length) {
      replyBuffers.give(buf);
      this.send(encodeHoleChunk(NBD_REPLY_FLAG_DONE, req.cookie, req.offset, length));
      return;
    }
    this.holdReplies(); // the chunks below go out together
    // Data runs between the holes, in order; the pooled buffer goes back once the last one is written.
    const end = offset + length;
    const runs: Array<{ from: number; to: number; hole: boolean }> = [];
    let pos = offset;
    for (const h of holes) {
      if (h.offsetBytes > pos) runs.push({ from: pos, to: h.offsetBytes, hole: false });
      runs.push({ from: h.offsetBytes, to: h.offsetBytes + h.lengthBytes, hole: true });
      pos = h.offsetBytes + h.lengthBytes;
    }
    if (pos < end) runs.push({ from: pos, to: end, hole: false });
    let lastData = -1;
    runs.forEach((r, i) => {
      if (!r.hole) lastData = i;
    });
    runs.forEach((r, i) => {
      if (r.hole) {
        this.send(encodeHoleChunk(0, req.cookie, BigInt(r.from), r.to - r.from));
        return;
      }
      const at = DATA_CHUNK_HEADER_BYTES + r.from - offset;
      let view: Buffer;
      if (r.from === offset) {
        // The first run uses the header room in front of the data.
        this.writeDataHeader(buf, req, 0, req.offset, r.to - r.from);
        view = buf.subarray(0, at + r.to - r.from);
      } else {
        const header = Buffer.allocUnsafe(DATA_CHUNK_HEADER_BYTES);
        this.writeDataHeader(header, req, 0, BigInt(r.from), r.to - r.from);
        this.send(header);
        view = buf.subarray(at, at + r.to - r.from);
      }
      this.send(view, i === lastData ? buf : null);
    });
    this.send(encodeChunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, req.cookie));
  }

  /** OFFSET_DATA chunk header (and its u64 offset) in the first 28 bytes of `into`. */
  private writeDataHeader(into: Buffer, req: NbdRequest, flags: number, at: bigint, length: number): void {
    writeChunkHeader(into, 0, flags, NBD_REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + length);
    into.writeBigUInt64BE(at, STRUCTURED_REPLY_BYTES);
  }

  /** Poison mode: every run a device vouched for must read as zeros in what it returned. */
  private checkVouched(req: NbdRequest, buf: Buffer, holes: ZeroRun[]): void {
    const offset = Number(req.offset);
    for (const h of holes) {
      const at = DATA_CHUNK_HEADER_BYTES + h.offsetBytes - offset;
      if (!isAllZero(buf.subarray(at, at + h.lengthBytes))) {
        poisonViolation(
          `${this.entry.device.name} vouched for zeros at ${h.offsetBytes}+${h.lengthBytes} that its read did not return`,
        );
      }
    }
  }

  private async blockStatus(device: BlockDevice, req: NbdRequest, offset: number): Promise<void> {
    const reqOne = (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const custom = deviceContexts(device);
    const chunks: Buffer[] = [];
    const ids = [...this.contextIds.keys()];
    for (const id of ids) {
      const name = this.contextIds.get(id) as string;
      let runs: Array<{ lengthBytes: number; flags: number }>;
      if (name === BASE_ALLOCATION && !custom.has(name)) {
        runs = (await device.extents(offset, req.length)).map((e) => ({
          lengthBytes: e.lengthBytes,
          flags: e.kind === "hole" ? NBD_STATE_HOLE | NBD_STATE_ZERO : e.kind === "zero" ? NBD_STATE_ZERO : 0,
        }));
      } else {
        const ctx = custom.get(name);
        // The device was replaced by one without this context: report "nothing known" (flags 0).
        runs = ctx ? await ctx.query(offset, req.length) : [];
      }
      const extents = normaliseRuns(runs, req.length, reqOne);
      chunks.push(encodeBlockStatusChunk(0, req.cookie, id, extents));
    }
    const last = chunks[chunks.length - 1];
    if (last) last.writeUInt16BE(NBD_REPLY_FLAG_DONE, 4);
    if (chunks.length > 1) this.holdReplies();
    for (const c of chunks) this.send(c);
  }

  private ok(req: NbdRequest): undefined {
    return this.send(encodeSimpleReply(0, req.cookie));
  }

  /** Answers a request with an error (simple reply, or an ERROR chunk with the message). */
  private refuse(req: NbdRequest, error: number, message: string): undefined {
    // A client looping on bad requests must not flood the log: after a few, refusals go to debug.
    this.refusals++;
    const level = error === NBD_ESHUTDOWN || this.refusals > MAX_LOGGED_REFUSALS ? "debug" : "warn";
    if (level === "warn" || this.debug) {
      this.log[level](
        {
          connection: this.connectionId,
          export: this.entry.name,
          handle: req.cookie.toString("hex"),
          command: COMMAND_NAMES[req.type] ?? req.type,
          error,
        },
        `nbd request refused: ${message}`,
      );
    }
    if (this.structured) return this.send(encodeErrorChunk(req.cookie, error, message));
    return this.send(encodeSimpleReply(error, req.cookie));
  }

  private fail(req: NbdRequest, err: unknown): void {
    this.logError(req, err);
    if (this.structured) this.send(encodeErrorChunk(req.cookie, nbdErrorOf(err), errorMessage(err)));
    else this.send(encodeSimpleReply(nbdErrorOf(err), req.cookie));
  }

  private logError(req: NbdRequest, err: unknown): void {
    this.log.error(
      {
        connection: this.connectionId,
        export: this.entry.name,
        handle: req.cookie.toString("hex"),
        command: COMMAND_NAMES[req.type],
        offset: Number(req.offset),
        length: req.length,
        err: errorMessage(err),
      },
      "nbd request failed",
    );
  }

  private readonly uncork = () => {
    this.corked = false;
    if (!this.stream.destroyed) this.stream.uncork();
  };

  /**
   * Corks the socket until the end of this event-loop turn, so replies completing in the same
   * turn leave in one writev (and one TCP segment when small).
   */
  private holdReplies(): void {
    if (this.corked || this.stream.destroyed) return;
    this.corked = true;
    this.stream.cork();
    setImmediate(this.uncork);
  }

  /**
   * Queues a reply; `release` (a pooled buffer `buf` is, or is a view of) goes back to the pool
   * once the socket has written `buf` (writes complete in order: a reply made of several views
   * releases with its last one). Replies are held for the turn only when another could join them
   * (other requests in flight, or more requests already received): at queue depth 1 a reply
   * leaves at once.
   */
  private send(buf: Buffer, release: Buffer | null = null): undefined {
    if (this.isClosed || this.stream.destroyed || this.stream.writableEnded) {
      // Nothing of this reply was queued (a reply is queued in one go).
      if (release) replyBuffers.give(release);
      return undefined;
    }
    if (!this.corked && (this.inFlightRequests > 1 || this.bufferedBytes >= REQUEST_BYTES)) {
      this.holdReplies();
    }
    if (release) this.stream.write(buf, () => replyBuffers.give(release));
    else this.stream.write(buf);
    return undefined;
  }
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * The holes of a sparse read's reply: the vouched zero runs clipped to the request, sorted,
 * merged, and only those of at least MIN_HOLE_BYTES (a hole chunk and the data chunk it splits
 * cost more than sending a few zeros).
 */
export function holeRuns(zeros: ReadonlyArray<ZeroRun>, offset: number, length: number): ZeroRun[] {
  const end = offset + length;
  const clipped: ZeroRun[] = [];
  for (const z of zeros) {
    const s = Math.max(offset, z.offsetBytes);
    const t = Math.min(end, z.offsetBytes + z.lengthBytes);
    if (Number.isSafeInteger(s) && Number.isSafeInteger(t) && t > s)
      clipped.push({ offsetBytes: s, lengthBytes: t - s });
  }
  clipped.sort((a, b) => a.offsetBytes - b.offsetBytes);
  const merged: ZeroRun[] = [];
  for (const z of clipped) {
    const last = merged[merged.length - 1];
    const lastEnd = last ? last.offsetBytes + last.lengthBytes : -1;
    if (last && z.offsetBytes <= lastEnd)
      last.lengthBytes = Math.max(lastEnd, z.offsetBytes + z.lengthBytes) - last.offsetBytes;
    else merged.push({ ...z });
  }
  return merged.filter((z) => z.lengthBytes >= MIN_HOLE_BYTES || z.lengthBytes === length);
}

/**
 * Whether `[offset, offset+length)` reads as zeros, as the device's own sparse read vouches (up
 * to FAST_ZERO_CHECK_MAX_BYTES; `extents()` is a hint and is not asked). False when it cannot tell.
 */
async function readsAsZeros(device: BlockDevice, offset: number, length: number): Promise<boolean> {
  if (length === 0) return true;
  if (!device.readIntoSparse || length > FAST_ZERO_CHECK_MAX_BYTES) return false;
  const zeros = await device.readIntoSparse(offset, allocData(length));
  const runs = holeRuns(zeros, offset, length);
  return runs.length === 1 && runs[0]?.lengthBytes === length;
}

function isAllZero(b: Buffer): boolean {
  for (let at = 0; at < b.length; at += ZERO_PAGE.length) {
    const n = Math.min(ZERO_PAGE.length, b.length - at);
    if (b.compare(ZERO_PAGE, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}

/**
 * Turns a context's runs into valid descriptors: non-zero lengths, merged when flags repeat,
 * clipped to the request, at least one (flags 0 = nothing known) and one only with REQ_ONE.
 */
export function normaliseRuns(
  runs: ReadonlyArray<{ lengthBytes: number; flags: number }>,
  requestLength: number,
  reqOne: boolean,
): Array<{ lengthBytes: number; flags: number }> {
  const out: Array<{ lengthBytes: number; flags: number }> = [];
  let covered = 0;
  for (const r of runs) {
    if (covered >= requestLength) break;
    const len = Math.min(Math.floor(r.lengthBytes), requestLength - covered);
    if (!(len > 0)) continue;
    const last = out[out.length - 1];
    if (last && last.flags === r.flags >>> 0) last.lengthBytes += len;
    else {
      if (out.length >= MAX_EXTENTS_PER_CHUNK) break;
      out.push({ lengthBytes: len, flags: r.flags >>> 0 });
    }
    covered += len;
  }
  if (out.length === 0) out.push({ lengthBytes: requestLength, flags: 0 });
  if (reqOne) out.length = 1;
  return out;
}
