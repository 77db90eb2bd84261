/**
 * A byte-level TCP peer for protocol fuzzing: sends exactly the bytes it is given, optionally
 * cut into random fragments, and reads replies with a deadline, telling "the server closed"
 * from "the server said nothing".
 *
 * @example
 * ```ts
 * const peer = await WirePeer.connect("127.0.0.1:10809");
 * const greeting = await peer.read(18, 2000); // Buffer, or "closed" / "timeout"
 * peer.send(Buffer.from([0, 0, 0, 3]));
 * peer.close();
 * ```
 */
import * as net from "node:net";

export type ReadResult = Buffer | "closed" | "timeout";

export class WirePeer {
  readonly socket: net.Socket;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private waiter: (() => void) | null = null;
  /** Bytes the server sent in all. */
  receivedBytes = 0;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setNoDelay(true);
    socket.on("data", (c: Buffer) => {
      this.chunks.push(c);
      this.buffered += c.length;
      this.receivedBytes += c.length;
      this.wake();
    });
    socket.on("error", () => {});
    socket.on("close", () => {
      this.ended = true;
      this.wake();
    });
  }

  static connect(address: string): Promise<WirePeer> {
    const m = /^(.*):(\d+)$/.exec(address);
    if (!m) throw new RangeError(`address "${address}" must be HOST:PORT`);
    const socket = net.connect({ host: m[1] as string, port: Number(m[2]) });
    return new Promise((resolve, reject) => {
      socket.once("error", reject);
      socket.once("connect", () => {
        socket.off("error", reject);
        resolve(new WirePeer(socket));
      });
    });
  }

  get closed(): boolean {
    return this.ended && this.buffered === 0;
  }

  /** True once the server closed its side (buffered bytes may still be unread). */
  get serverClosed(): boolean {
    return this.ended;
  }

  /** Sends `bytes`, cut at `cuts` (offsets) into separate writes. */
  send(bytes: Buffer, cuts: number[] = []): void {
    if (this.socket.destroyed) return;
    let at = 0;
    for (const c of [...cuts].sort((a, b) => a - b)) {
      if (c <= at || c >= bytes.length) continue;
      this.socket.write(bytes.subarray(at, c));
      at = c;
    }
    if (at < bytes.length) this.socket.write(bytes.subarray(at));
  }

  /** Exactly `n` bytes, or "closed" if the server closed first, or "timeout". */
  async read(n: number, timeoutMs: number): Promise<ReadResult> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffered < n) {
      if (this.ended) return "closed";
      const left = deadline - Date.now();
      if (left <= 0) return "timeout";
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          this.waiter = null;
          resolve();
        }, left);
        this.waiter = () => {
          clearTimeout(t);
          this.waiter = null;
          resolve();
        };
      });
    }
    const all = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }

  /** Reads and drops whatever arrives until the server closes or is quiet for `quietMs`. */
  async drain(quietMs: number, maxMs: number): Promise<"closed" | "quiet"> {
    const end = Date.now() + maxMs;
    for (;;) {
      const before = this.receivedBytes;
      const r = await this.read(Number.MAX_SAFE_INTEGER, Math.min(quietMs, Math.max(1, end - Date.now())));
      this.chunks = [];
      this.buffered = 0;
      if (r === "closed") return "closed";
      if (this.receivedBytes === before || Date.now() >= end) return "quiet";
    }
  }

  /** Resolves true when the server closes within `timeoutMs`. */
  async waitClosed(timeoutMs: number): Promise<boolean> {
    return (await this.drain(timeoutMs, timeoutMs)) === "closed";
  }

  close(): void {
    this.socket.destroy();
  }

  private wake(): void {
    this.waiter?.();
  }
}
