import { Socket, type SocketConstructorOpts } from "node:net";
import type { Duplex } from "node:stream";
import { TLSSocket } from "node:tls";

/** Set to `1` to receive through the socket's stream ('data' events) instead (both paths are tested). */
export const STREAM_RECEIVE_ENV = "UDM_NBD_STREAM_RECEIVE";

/** Node's own keys of the `onread` option on a net.Socket (found once, on a probe socket). */
interface OnreadKeys {
  buffer: symbol;
  callback: symbol;
  next: symbol;
}

let keys: OnreadKeys | null | undefined;

function onreadKeys(): OnreadKeys | null {
  if (keys !== undefined) return keys;
  keys = null;
  try {
    const options = { onread: { buffer: Buffer.alloc(1), callback: () => true } };
    const probe = new Socket(options as SocketConstructorOpts);
    const find = (name: string) => Object.getOwnPropertySymbols(probe).find((s) => s.description === name);
    const buffer = find("kBuffer");
    const callback = find("kBufferCb");
    const next = find("kBufferGen");
    probe.destroy();
    if (buffer && callback && next) keys = { buffer, callback, next };
  } catch {
    keys = null;
  }
  return keys;
}

/** What {@link receiveInto} calls: bytes landed in `buf` (the buffer `next` returned last). */
export type ReceiveCallback = (nread: number, buf: Buffer) => void;

/**
 * Switches an accepted plain TCP or Unix socket to reads into caller-owned buffers, the way
 * `net.Socket`'s `onread` option does for sockets Node creates from options (accepted sockets
 * cannot be given that option): every later read lands in the buffer `next()` returned last, and
 * `onRead(nread, buf)` is called with it; no chunk is allocated per read and no stream event
 * runs. `next()` is asked right after each `onRead` for the buffer of the read after it.
 *
 * Returns the bytes the socket's stream had already buffered (to be handled before any read
 * lands), or null when the socket cannot do this (TLS, another stream, a Node without the
 * option's internals, or `UDM_NBD_STREAM_RECEIVE=1`): then keep reading 'data' events. The
 * caller must call {@link startReceiving} after handling the returned bytes.
 */
export function takeOverReads(stream: Duplex): Buffer[] | null {
  if (process.env[STREAM_RECEIVE_ENV] === "1") return null;
  if (!(stream instanceof Socket) || stream instanceof TLSSocket) return null;
  const handle = (stream as unknown as { _handle?: { useUserBuffer?: unknown } | null })._handle;
  if (!onreadKeys() || typeof handle?.useUserBuffer !== "function") return null;
  const pending: Buffer[] = [];
  for (let chunk: Buffer | null = stream.read(); chunk !== null; chunk = stream.read()) pending.push(chunk);
  return pending;
}

/** The second half of {@link takeOverReads}: from now on reads land in `next()`'s buffers. */
export function startReceiving(stream: Duplex, onRead: ReceiveCallback, next: () => Buffer): void {
  const k = onreadKeys() as OnreadKeys;
  const socket = stream as unknown as Record<symbol, unknown> & {
    _handle: { useUserBuffer(buf: Buffer): void };
  };
  const first = next();
  socket[k.buffer] = first;
  socket[k.callback] = onRead;
  socket[k.next] = next;
  socket._handle.useUserBuffer(first);
}
