/**
 * A debug mode for buffer lifetimes: with `UDM_POISON=1` in the environment, every buffer a pool
 * hands out or takes back, and every fresh buffer allocated on the data path, is filled with a
 * recognisable pattern (`UDM-POISON!` repeated). A byte nobody wrote then reads as poison instead
 * of stale memory, so a client or a crash check that finds the pattern names the bug: an
 * unfilled part of a read, a buffer reused while a socket or a device still held it. Pools also
 * check, when they hand a buffer out again, that nobody wrote into it while it was idle, and
 * end the process ({@link poisonViolation}) when somebody did.
 *
 * Costs a fill per buffer: for debugging and torture runs, not production.
 *
 * @example
 * ```ts
 * // UDM_POISON=1 pnpm torture --iterations 200
 * const buf = allocData(65536); // poison-filled in poison mode, allocUnsafe otherwise
 * ```
 */
export const POISON_PATTERN = Buffer.from("UDM-POISON!", "latin1");

/** Read once: the data path asks on every buffer. */
const POISON_MODE = process.env.UDM_POISON === "1";

/** Whether poison mode is on for this process (`UDM_POISON=1` when it started). */
export function poisonEnabled(): boolean {
  return POISON_MODE;
}

/** Fills `buf` with the poison pattern. */
export function poisonFill(buf: Buffer): void {
  if (buf.length) buf.fill(POISON_PATTERN);
}

/** The pattern repeated (a whole number of times): `isPoisoned` compares 64 KiB at a time, not 11 bytes. */
const POISON_BLOCK = Buffer.alloc(POISON_PATTERN.length * 6000, POISON_PATTERN);

/** True when `buf` holds nothing but the poison pattern (as {@link poisonFill} left it). */
export function isPoisoned(buf: Buffer): boolean {
  const n = POISON_BLOCK.length;
  for (let at = 0; at < buf.length; at += n) {
    const k = Math.min(n, buf.length - at);
    if (buf.compare(POISON_BLOCK, 0, k, at, at + k) !== 0) return false;
  }
  return true;
}

/** True when `data` contains a full copy of the poison pattern anywhere. */
export function containsPoison(data: Buffer): boolean {
  return data.includes(POISON_PATTERN);
}

/** `Buffer.allocUnsafe(size)`, poison-filled in poison mode (a data-path buffer whose bytes a read or a socket fills). */
export function allocData(size: number): Buffer {
  const buf = Buffer.allocUnsafe(size);
  if (POISON_MODE) poisonFill(buf);
  return buf;
}

/** A buffer lifetime bug caught in poison mode. */
export class PoisonError extends Error {
  constructor(what: string) {
    super(`UDM_POISON: ${what}`);
    this.name = "PoisonError";
  }
}

const watchers = new Set<(err: PoisonError) => void>();

/**
 * Hears lifetime bugs caught in poison mode instead of the process ending (tests); returns the
 * function that stops listening.
 */
export function watchPoison(listener: (err: PoisonError) => void): () => void {
  watchers.add(listener);
  return () => watchers.delete(listener);
}

/**
 * Reports a lifetime bug caught in poison mode: the process dies with the error (thrown on the
 * next tick, so the caller's own state stays consistent), which no torture run can miss, unless
 * {@link watchPoison} listeners take it.
 */
export function poisonViolation(what: string): void {
  const err = new PoisonError(what);
  if (watchers.size) {
    for (const w of watchers) w(err);
    return;
  }
  process.nextTick(() => {
    throw err;
  });
}
