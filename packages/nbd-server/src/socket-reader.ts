import type { Duplex } from "node:stream";
import { NbdProtocolError } from "./wire.js";

/** Bytes buffered ahead of the reader before the socket is paused (handshake messages are small). */
const READ_AHEAD_BYTES = 256 * 1024;

/**
 * Awaitable exact-length reads from a socket, for the handshake phases where the conversation
 * is strictly request/response. `detach()` hands any bytes read ahead to the next phase, and
 * `attach()` moves the reader onto a new stream (after STARTTLS).
 *
 * @example
 * ```ts
 * const reader = new SocketReader(socket);
 * const header = await reader.read(16);
 * ```
 */
export class SocketReader {
  private stream: Duplex | null = null;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { bytes: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;

  private readonly onData = (chunk: Buffer) => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.buffered > READ_AHEAD_BYTES) this.stream?.pause();
    this.serve();
  };
  private readonly onEnd = () => this.fail(new NbdProtocolError("peer closed the connection"));
  private readonly onError = (err: Error) => this.fail(err);

  constructor(stream: Duplex) {
    this.attach(stream);
  }

  /** Starts reading from `stream` (the bytes already buffered stay in front). */
  attach(stream: Duplex): void {
    this.stream = stream;
    this.failure = null;
    stream.on("data", this.onData);
    stream.on("end", this.onEnd);
    stream.on("close", this.onEnd);
    stream.on("error", this.onError);
    stream.resume();
  }

  /** Stops reading and returns the bytes received but not consumed yet. */
  detach(): Buffer {
    const stream = this.stream;
    if (stream) {
      stream.off("data", this.onData);
      stream.off("end", this.onEnd);
      stream.off("close", this.onEnd);
      stream.off("error", this.onError);
      stream.pause();
    }
    this.stream = null;
    const rest = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return rest;
  }

  /** Bytes received and not consumed yet. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  /** Resolves with exactly `bytes` bytes; rejects if the stream ends first. */
  read(bytes: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error("SocketReader: concurrent read"));
    if (bytes === 0) return Promise.resolve(Buffer.alloc(0));
    return new Promise((resolve, reject) => {
      this.waiter = { bytes, resolve, reject };
      this.serve();
    });
  }

  /** Reads and drops `bytes` bytes without holding them all in memory. */
  async skip(bytes: number): Promise<void> {
    let left = bytes;
    while (left > 0) {
      const n = Math.min(left, READ_AHEAD_BYTES);
      await this.read(n);
      left -= n;
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.serve();
  }

  private serve(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= w.bytes) {
      this.waiter = null;
      w.resolve(this.take(w.bytes));
      if (this.buffered <= READ_AHEAD_BYTES) this.stream?.resume();
    } else if (this.failure) {
      this.waiter = null;
      w.reject(this.failure);
    } else {
      this.stream?.resume();
    }
  }

  private take(bytes: number): Buffer {
    const head = this.chunks[0] as Buffer;
    let out: Buffer;
    if (head.length >= bytes) {
      out = head.subarray(0, bytes);
      if (head.length === bytes) this.chunks.shift();
      else this.chunks[0] = head.subarray(bytes);
    } else {
      out = Buffer.allocUnsafe(bytes);
      let done = 0;
      while (done < bytes) {
        const c = this.chunks[0] as Buffer;
        const n = Math.min(c.length, bytes - done);
        c.copy(out, done, 0, n);
        done += n;
        if (n === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(n);
      }
    }
    this.buffered -= bytes;
    return out;
  }
}
