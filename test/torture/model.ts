/**
 * A model of a block device under NBD semantics, for checking what a device returns after a
 * crash (kill -9 of the server) or while requests are in flight.
 *
 * The model keeps, per block (default 4 KiB), the candidate values that may legally be there:
 * - a write acknowledged before a FLUSH was sent, once that FLUSH completes, and any FUA write
 *   once acknowledged, is durable: nothing acknowledged before it started may reappear;
 * - an unflushed write MAY or MAY NOT be present after a crash (and a failed or never-answered
 *   write likewise), so it stays a candidate next to what it overwrote;
 * - a live read started after a write was acknowledged sees that write or something newer;
 * - a trim makes the range zero or unspecified (per the device), write-zeroes makes it zero.
 *
 * Writes store a generation number, not bytes: payloads are regenerated from
 * (seed, generation, block) by {@link blockPayload}, so the model costs a few words per write and
 * block whatever the device size. A block that holds several candidates may be torn at sector
 * (`tearBytes`) granularity: each sector must then match one of the candidates.
 *
 * @example
 * ```ts
 * const model = new DeviceModel({ sizeBytes: 1 << 20, seed: 7 });
 * const w = model.beginWrite(0, 8192, { fua: true });
 * await device.write(0, model.payload(w), { fua: true });
 * model.complete(w);
 * model.crash();
 * // ... restart the device ...
 * const bad = model.verifyAfterCrash(0, await device.read(0, 1 << 20)); // [] when nothing was lost
 * ```
 */

import { containsPoison } from "@udm/kcopyd";

/** Default model block: the unit writes, trims and checks are aligned to. */
export const MODEL_BLOCK_BYTES = 4096;
/** Default torn-write granularity: a sector is written whole or not at all. */
export const MODEL_TEAR_BYTES = 512;
/** First bytes of every generated block payload, so a mismatch report can say what was found. */
export const PAYLOAD_MAGIC = 0x55444d54; // "UDMT"
const PAYLOAD_HEADER_BYTES = 16;

/**
 * What a trim leaves behind: zeros (devices that punch holes), zeros or the old content (a
 * device that may ignore the trim), or anything at all (NBD's own promise).
 */
export type TrimSemantics = "zero" | "zero-or-unchanged" | "unspecified";

export type OperationKind = "write" | "write-zeroes" | "trim" | "initial" | "observed";

/** One write-like request (write, write-zeroes, trim) as the model tracks it. */
export interface WriteTicket {
  readonly kind: OperationKind;
  /** Generation: payload seed for writes, unique per ticket. */
  readonly gen: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly fua: boolean;
  /** Model clock when the request was sent. */
  readonly startSeq: number;
  /** Model clock when the success reply arrived; null while in flight, failed or lost. */
  ackSeq: number | null;
  /** Model clock when the request ended (reply of either kind, or the crash); null while in flight. */
  endSeq: number | null;
  durable: boolean;
  /** The request failed or the device crashed first: it may have landed, it is never guaranteed. */
  dead: boolean;
  /** `observed` tickets: the bytes read back, keyed by block. */
  readonly literal?: Map<number, Buffer>;
  /** Zero (write-zeroes, zero trims) or anything (unspecified trims, unknown initial content). */
  readonly content: "payload" | "zero" | "any" | "literal";
  /** A trim that may have been ignored: it never hides what it was meant to replace. */
  readonly keepsPrevious?: boolean;
}

export interface FlushTicket {
  readonly startSeq: number;
  done: boolean;
}

export interface ReadTicket {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly startSeq: number;
}

/** One block whose content no candidate explains. */
export interface Mismatch {
  offsetBytes: number;
  lengthBytes: number;
  /** What the block may legally hold, e.g. `write#12 (durable)`, `zero`. */
  expected: string[];
  /** What it holds: a recognised payload `gen G block B`, `zero`, or `unknown`. */
  found: string;
  /** Per sector: which expected candidate it matches (A = first) or `?`. */
  sectors?: string;
}

export interface DeviceModelOptions {
  sizeBytes: number;
  seed: number;
  blockBytes?: number;
  tearBytes?: number;
  trim?: TrimSemantics;
  /** What the device holds before the first write: zeros (default) or unknown content. */
  initial?: "zero" | "any";
}

/**
 * Fills `target` with the payload of generation `gen` for block `block` (deterministic in
 * seed, gen and block). The first 16 bytes carry magic, seed, gen and block so a stray block
 * found after a crash can be named.
 *
 * @example
 * ```ts
 * const a = blockPayload(1, 5, 9, 4096);
 * blockPayload(1, 5, 9, 4096).equals(a); // true
 * ```
 */
export function blockPayload(seed: number, gen: number, block: number, blockBytes: number, target?: Buffer) {
  const out = target ?? Buffer.allocUnsafe(blockBytes);
  if (out.length !== blockBytes)
    throw new RangeError(`payload target is ${out.length} bytes, not ${blockBytes}`);
  // xorshift32 seeded by a splitmix-style hash of (seed, gen, block); never 0.
  let x = Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(gen + 0x632be5ab, 0xc2b2ae35);
  x = Math.imul(x ^ (x >>> 15), 0x2c1b3c6d) ^ Math.imul(block + 0x27d4eb2f, 0x165667b1);
  x = (x ^ (x >>> 13)) | 1;
  const words = blockBytes >>> 2;
  for (let i = 0; i < words; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeInt32LE(x | 0, i << 2);
  }
  if (blockBytes >= PAYLOAD_HEADER_BYTES) {
    out.writeUInt32BE(PAYLOAD_MAGIC, 0);
    out.writeUInt32BE(seed >>> 0, 4);
    out.writeUInt32BE(gen >>> 0, 8);
    out.writeUInt32BE(block >>> 0, 12);
  }
  return out;
}

/** Names a block's content: `gen G block B (seed S)`, `zero` or `unknown`. */
export function describeBlock(data: Buffer): string {
  if (isZero(data)) return "zero";
  if (containsPoison(data)) return "UDM_POISON pattern (bytes nobody wrote)";
  if (data.length >= PAYLOAD_HEADER_BYTES && data.readUInt32BE(0) === PAYLOAD_MAGIC) {
    return `gen ${data.readUInt32BE(8)} block ${data.readUInt32BE(12)} (seed ${data.readUInt32BE(4)})`;
  }
  return "unknown";
}

const ZERO_PAGE = Buffer.alloc(64 * 1024);

/** True when every byte of `data` is 0. */
export function isZero(data: Buffer): boolean {
  for (let at = 0; at < data.length; at += ZERO_PAGE.length) {
    const n = Math.min(ZERO_PAGE.length, data.length - at);
    if (data.compare(ZERO_PAGE, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}

/**
 * The candidate-set model (see the module comment). All offsets and lengths must be multiples
 * of `blockBytes`; the runner issues aligned I/O so every block is checked exactly.
 */
export class DeviceModel {
  readonly sizeBytes: number;
  readonly seed: number;
  readonly blockBytes: number;
  readonly tearBytes: number;
  readonly trim: TrimSemantics;
  private readonly blocks = new Map<number, WriteTicket[]>();
  private readonly base: WriteTicket;
  private clock = 0;
  private nextGen = 1;
  /** Acknowledged writes a completed flush has not made durable yet. */
  private ackedVolatile = new Set<WriteTicket>();
  private readonly inFlight = new Set<WriteTicket>();
  /** Reads sent and not checked yet: what they may return must stay a candidate until they end. */
  private readonly readsInFlight = new Set<ReadTicket>();
  /** Durable tickets whose pruning waits for reads that were sent before they were acknowledged. */
  private readonly deferredPrunes = new Set<WriteTicket>();
  private readonly scratch: Buffer;
  /**
   * Live reads that raced a write and came back torn inside a sector (legal: page-cache copies
   * are not atomic; a crash still only tears at sectors). Counted for reports.
   */
  subSectorTears = 0;

  constructor(options: DeviceModelOptions) {
    this.blockBytes = options.blockBytes ?? MODEL_BLOCK_BYTES;
    this.tearBytes = options.tearBytes ?? MODEL_TEAR_BYTES;
    if (
      !Number.isInteger(this.blockBytes) ||
      this.blockBytes < 16 ||
      this.blockBytes % this.tearBytes !== 0
    ) {
      throw new RangeError(
        `blockBytes ${this.blockBytes} must be an integer >= 16 and a multiple of tearBytes ${this.tearBytes}`,
      );
    }
    if (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes % this.blockBytes !== 0) {
      throw new RangeError(
        `sizeBytes ${options.sizeBytes} must be a multiple of blockBytes ${this.blockBytes}`,
      );
    }
    this.sizeBytes = options.sizeBytes;
    this.seed = options.seed >>> 0;
    this.trim = options.trim ?? "zero";
    this.scratch = Buffer.allocUnsafe(this.blockBytes);
    this.base = {
      kind: "initial",
      gen: 0,
      offsetBytes: 0,
      lengthBytes: this.sizeBytes,
      fua: false,
      startSeq: -2,
      ackSeq: -1,
      endSeq: -1,
      durable: true,
      dead: false,
      content: options.initial === "any" ? "any" : "zero",
    };
  }

  get blockCount(): number {
    return this.sizeBytes / this.blockBytes;
  }

  /** Records a WRITE being sent; the payload to send is {@link payload}. */
  beginWrite(offsetBytes: number, lengthBytes: number, options: { fua?: boolean } = {}): WriteTicket {
    return this.begin("write", "payload", offsetBytes, lengthBytes, options.fua ?? false);
  }

  /** Records a WRITE_ZEROES being sent. */
  beginWriteZeroes(offsetBytes: number, lengthBytes: number, options: { fua?: boolean } = {}): WriteTicket {
    return this.begin("write-zeroes", "zero", offsetBytes, lengthBytes, options.fua ?? false);
  }

  /** Records a TRIM being sent (zero or unspecified content per the model's trim semantics). */
  beginTrim(offsetBytes: number, lengthBytes: number, options: { fua?: boolean } = {}): WriteTicket {
    const content = this.trim === "unspecified" ? "any" : "zero";
    return this.begin(
      "trim",
      content,
      offsetBytes,
      lengthBytes,
      options.fua ?? false,
      this.trim === "zero-or-unchanged",
    );
  }

  /** The bytes a write ticket sends. */
  payload(ticket: WriteTicket): Buffer {
    if (ticket.content !== "payload") throw new RangeError(`a ${ticket.kind} ticket has no payload`);
    const out = Buffer.allocUnsafe(ticket.lengthBytes);
    const first = ticket.offsetBytes / this.blockBytes;
    for (let i = 0; i < ticket.lengthBytes / this.blockBytes; i++) {
      blockPayload(
        this.seed,
        ticket.gen,
        first + i,
        this.blockBytes,
        out.subarray(i * this.blockBytes, (i + 1) * this.blockBytes),
      );
    }
    return out;
  }

  /** The success reply of a write-like request arrived (FUA: it is durable now). */
  complete(ticket: WriteTicket): void {
    if (ticket.dead) throw new Error(`${label(ticket)} completed after a crash or failure`);
    if (ticket.ackSeq !== null) throw new Error(`${label(ticket)} completed twice`);
    ticket.ackSeq = this.tick();
    ticket.endSeq = ticket.ackSeq;
    this.inFlight.delete(ticket);
    if (ticket.fua) this.makeDurable(ticket);
    else this.ackedVolatile.add(ticket);
  }

  /** The request failed: it may or may not have landed (partially), and is never guaranteed. */
  fail(ticket: WriteTicket): void {
    if (ticket.endSeq !== null) throw new Error(`${label(ticket)} failed after it ended`);
    ticket.dead = true;
    ticket.endSeq = this.tick();
    this.inFlight.delete(ticket);
  }

  /** Records a FLUSH being sent: it covers writes acknowledged before this moment. */
  beginFlush(): FlushTicket {
    return { startSeq: this.tick(), done: false };
  }

  /** The FLUSH succeeded: every write acknowledged before it was sent is durable. */
  completeFlush(flush: FlushTicket): void {
    if (flush.done) throw new Error("flush completed twice");
    flush.done = true;
    this.tick();
    for (const t of this.ackedVolatile) {
      if (t.ackSeq !== null && t.ackSeq < flush.startSeq) {
        this.ackedVolatile.delete(t);
        this.makeDurable(t);
      }
    }
  }

  beginRead(offsetBytes: number, lengthBytes: number): ReadTicket {
    this.checkAligned(offsetBytes, lengthBytes);
    const read = { offsetBytes, lengthBytes, startSeq: this.tick() };
    this.readsInFlight.add(read);
    return read;
  }

  /** A read ended without data to check (it failed): it no longer holds back pruning. */
  endRead(read: ReadTicket): void {
    if (this.readsInFlight.delete(read)) this.pruneDeferred();
  }

  /**
   * Checks a live read: each block holds a write acknowledged before the read was sent (the
   * newest such one) or a write that was in flight meanwhile.
   */
  checkRead(read: ReadTicket, data: Buffer): Mismatch[] {
    if (data.length !== read.lengthBytes) {
      this.endRead(read);
      return [
        {
          offsetBytes: read.offsetBytes,
          lengthBytes: read.lengthBytes,
          expected: [`${read.lengthBytes} bytes`],
          found: `${data.length} bytes`,
        },
      ];
    }
    const bad = this.check(
      read.offsetBytes,
      data,
      (t) => t.ackSeq !== null && t.ackSeq < read.startSeq,
      false,
    );
    this.endRead(read);
    return bad;
  }

  /** The device died (kill -9): requests in flight are never answered, unflushed writes may be lost. */
  crash(): void {
    const now = this.tick();
    for (const t of this.inFlight) {
      t.dead = true;
      t.endSeq = now;
    }
    this.inFlight.clear();
    // An acknowledged but unflushed write may be gone; a flush after the restart cannot promise it.
    this.ackedVolatile.clear();
    // Reads in flight are never answered.
    this.readsInFlight.clear();
    this.pruneDeferred();
  }

  /**
   * Checks what the restarted device holds at `offsetBytes` against what may survive a crash,
   * then adopts what was found as the durable content (a lost block is adopted too, so one loss
   * is reported once). Returns the blocks no candidate explains.
   */
  verifyAfterCrash(offsetBytes: number, data: Buffer): Mismatch[] {
    if (this.inFlight.size)
      throw new Error("verifyAfterCrash() needs crash() (or every request answered) first");
    const bad = this.check(offsetBytes, data, (t) => t.durable, true);
    return bad;
  }

  /** The candidates of one block, newest first, as labels (for reports and tests). */
  candidates(block: number): string[] {
    return this.entries(block).map(label);
  }

  /** A block's candidate count (1 = exactly known). */
  candidateCount(block: number): number {
    return this.entries(block).length;
  }

  /** An independent copy (a snapshot's view: the origin as of now). */
  clone(): DeviceModel {
    const copy = new DeviceModel({
      sizeBytes: this.sizeBytes,
      seed: this.seed,
      blockBytes: this.blockBytes,
      tearBytes: this.tearBytes,
      trim: this.trim,
      initial: this.base.content === "any" ? "any" : "zero",
    });
    copy.clock = this.clock;
    copy.nextGen = this.nextGen;
    const mapped = new Map<WriteTicket, WriteTicket>([[this.base, copy.base]]);
    const map = (t: WriteTicket): WriteTicket => {
      let c = mapped.get(t);
      if (!c) {
        c = { ...t };
        mapped.set(t, c);
      }
      return c;
    };
    for (const [b, list] of this.blocks) copy.blocks.set(b, list.map(map));
    for (const t of this.ackedVolatile) copy.ackedVolatile.add(map(t));
    for (const t of this.inFlight) copy.inFlight.add(map(t));
    // The reads holding these back are the original's: the copy prunes now.
    for (const t of this.deferredPrunes) copy.prune(map(t));
    return copy;
  }

  /** The generation the next write gets. */
  get nextGeneration(): number {
    return this.nextGen;
  }

  /**
   * Makes later writes use generations from `gen` on: a clone that takes over from the model it
   * was cloned from (a merged snapshot becoming the origin) must not reuse its payloads.
   */
  skipGenerationsTo(gen: number): void {
    this.nextGen = Math.max(this.nextGen, gen);
  }

  /** Requests sent and not answered. */
  get inFlightCount(): number {
    return this.inFlight.size;
  }

  /** Blocks with more than one candidate (what a crash could still change). */
  uncertainBlocks(): number {
    let n = 0;
    for (const list of this.blocks.values()) if (list.length > 1) n++;
    return n;
  }

  private begin(
    kind: OperationKind,
    content: WriteTicket["content"],
    offsetBytes: number,
    lengthBytes: number,
    fua: boolean,
    keepsPrevious = false,
  ): WriteTicket {
    this.checkAligned(offsetBytes, lengthBytes);
    const ticket: WriteTicket = {
      kind,
      gen: this.nextGen++,
      offsetBytes,
      lengthBytes,
      fua,
      startSeq: this.tick(),
      ackSeq: null,
      endSeq: null,
      durable: false,
      dead: false,
      content,
      ...(keepsPrevious && { keepsPrevious }),
    };
    const first = offsetBytes / this.blockBytes;
    const last = first + lengthBytes / this.blockBytes;
    for (let b = first; b < last; b++) {
      let list = this.blocks.get(b);
      if (!list) {
        list = [this.base];
        this.blocks.set(b, list);
      }
      list.push(ticket);
    }
    this.inFlight.add(ticket);
    return ticket;
  }

  /**
   * `ticket` is durable: nothing that ended before it was sent can be seen on its blocks again,
   * neither after a crash nor by a read sent after its acknowledgement. A read sent before the
   * acknowledgement may still return what it replaced (the server may serve that read first and
   * answer it last), so while such a read overlaps the ticket, its pruning waits for the read.
   */
  private makeDurable(ticket: WriteTicket): void {
    ticket.durable = true;
    if (ticket.keepsPrevious) return;
    if (this.heldByRead(ticket)) this.deferredPrunes.add(ticket);
    else this.prune(ticket);
  }

  /** Whether a read in flight was sent before `ticket` was acknowledged and overlaps it. */
  private heldByRead(ticket: WriteTicket): boolean {
    const ack = ticket.ackSeq ?? Number.POSITIVE_INFINITY;
    const end = ticket.offsetBytes + ticket.lengthBytes;
    for (const r of this.readsInFlight) {
      if (r.startSeq < ack && r.offsetBytes < end && ticket.offsetBytes < r.offsetBytes + r.lengthBytes)
        return true;
    }
    return false;
  }

  private pruneDeferred(): void {
    for (const t of this.deferredPrunes) {
      if (this.heldByRead(t)) continue;
      this.deferredPrunes.delete(t);
      this.prune(t);
    }
  }

  /** Drops from `ticket`'s blocks every entry that ended before it was sent. */
  private prune(ticket: WriteTicket): void {
    const first = ticket.offsetBytes / this.blockBytes;
    const last = first + ticket.lengthBytes / this.blockBytes;
    for (let b = first; b < last; b++) {
      const list = this.blocks.get(b);
      if (!list?.includes(ticket)) continue; // already superseded on this block
      const kept = list.filter((e) => e === ticket || !(e.endSeq !== null && e.endSeq < ticket.startSeq));
      this.setEntries(b, kept);
    }
  }

  private entries(block: number): WriteTicket[] {
    return this.blocks.get(block) ?? [this.base];
  }

  private setEntries(block: number, list: WriteTicket[]): void {
    if (list.length === 1 && list[0] === this.base) this.blocks.delete(block);
    else this.blocks.set(block, list);
  }

  /**
   * Candidates of a block: entries not superseded, where `e` is superseded when some `f` that
   * `settled(f)` (acknowledged before the read / durable) was sent after `e` ended.
   */
  private live(block: number, settled: (t: WriteTicket) => boolean): WriteTicket[] {
    const list = this.entries(block);
    let newestSettledStart = Number.NEGATIVE_INFINITY;
    for (const f of list) {
      if (settled(f) && !f.keepsPrevious && f.startSeq > newestSettledStart) newestSettledStart = f.startSeq;
    }
    return list.filter((e) => !(e.endSeq !== null && e.endSeq < newestSettledStart));
  }

  private check(
    offsetBytes: number,
    data: Buffer,
    settled: (t: WriteTicket) => boolean,
    adopt: boolean,
  ): Mismatch[] {
    this.checkAligned(offsetBytes, data.length);
    const out: Mismatch[] = [];
    const first = offsetBytes / this.blockBytes;
    for (let i = 0; i < data.length / this.blockBytes; i++) {
      const b = first + i;
      const got = data.subarray(i * this.blockBytes, (i + 1) * this.blockBytes);
      const cands = this.live(b, settled);
      const whole = cands.find((c) => this.matches(c, b, got, 0, this.blockBytes));
      let ok = whole !== undefined;
      if (!ok && cands.length > 1) ok = this.tornMatch(cands, b, got, this.tearBytes);
      if (!ok && cands.length > 1 && !adopt && this.tornMatch(cands, b, got, 1)) {
        ok = true;
        this.subSectorTears++;
      }
      if (!ok) {
        out.push({
          offsetBytes: b * this.blockBytes,
          lengthBytes: this.blockBytes,
          expected: cands.map(label),
          found: describeBlock(got),
          sectors: this.sectorMap(cands, b, got),
        });
      }
      if (adopt) {
        if (whole && whole.content !== "any") this.setEntries(b, [settle(whole)]);
        else this.setEntries(b, [this.observed(b, got)]);
      }
    }
    return out;
  }

  private tornMatch(cands: WriteTicket[], block: number, got: Buffer, tearBytes: number): boolean {
    if (tearBytes >= this.tearBytes) {
      for (let at = 0; at < this.blockBytes; at += tearBytes) {
        if (!cands.some((c) => this.matches(c, block, got, at, at + tearBytes))) return false;
      }
      return true;
    }
    // Byte granularity: every byte equals the same byte of some candidate.
    const images = cands.map((c) => this.image(c, block));
    for (let i = 0; i < this.blockBytes; i++) {
      if (!images.some((img) => img === null || img[i] === got[i])) return false;
    }
    return true;
  }

  /** A candidate's bytes for one block (null: anything goes). */
  private image(c: WriteTicket, block: number): Buffer | null {
    switch (c.content) {
      case "any":
        return null;
      case "zero":
        return Buffer.alloc(this.blockBytes);
      case "literal":
        return c.literal?.get(block) ?? Buffer.alloc(0);
      case "payload":
        return blockPayload(this.seed, c.gen, block, this.blockBytes);
    }
  }

  /** Per sector, the index of the first candidate it matches, or "?" (for failure reports). */
  private sectorMap(cands: WriteTicket[], block: number, got: Buffer): string {
    let out = "";
    for (let at = 0; at < this.blockBytes; at += this.tearBytes) {
      const i = cands.findIndex((c) => this.matches(c, block, got, at, at + this.tearBytes));
      out += i < 0 ? "?" : String.fromCharCode(65 + i);
    }
    return out;
  }

  private matches(c: WriteTicket, block: number, got: Buffer, from: number, to: number): boolean {
    switch (c.content) {
      case "any":
        return true;
      case "zero":
        return isZero(got.subarray(from, to));
      case "literal": {
        const lit = c.literal?.get(block);
        return lit !== undefined && lit.compare(got, from, to, from, to) === 0;
      }
      case "payload":
        blockPayload(this.seed, c.gen, block, this.blockBytes, this.scratch);
        return this.scratch.compare(got, from, to, from, to) === 0;
    }
  }

  private observed(block: number, got: Buffer): WriteTicket {
    const seq = this.tick();
    return {
      kind: "observed",
      gen: 0,
      offsetBytes: block * this.blockBytes,
      lengthBytes: this.blockBytes,
      fua: false,
      startSeq: seq,
      ackSeq: seq,
      endSeq: seq,
      durable: true,
      dead: false,
      content: isZero(got) ? "zero" : "literal",
      literal: new Map([[block, Buffer.from(got)]]),
    };
  }

  private checkAligned(offsetBytes: number, lengthBytes: number): void {
    if (
      !Number.isSafeInteger(offsetBytes) ||
      !Number.isSafeInteger(lengthBytes) ||
      offsetBytes < 0 ||
      lengthBytes < 0 ||
      offsetBytes % this.blockBytes !== 0 ||
      lengthBytes % this.blockBytes !== 0 ||
      offsetBytes + lengthBytes > this.sizeBytes
    ) {
      throw new RangeError(
        `model I/O at ${offsetBytes}+${lengthBytes} must be ${this.blockBytes}-byte aligned inside ${this.sizeBytes} bytes`,
      );
    }
  }

  private tick(): number {
    return this.clock++;
  }
}

/** A candidate that was found after a crash becomes the durable content of its block. */
function settle(t: WriteTicket): WriteTicket {
  // Tickets are shared by the blocks of one request; found-on-this-block does not make the
  // others durable, so a settled copy stands for this block only.
  if (t.durable) return t;
  return { ...t, durable: true, dead: true, ackSeq: t.ackSeq ?? t.startSeq, endSeq: t.endSeq ?? t.startSeq };
}

function label(t: WriteTicket): string {
  const state = t.durable ? "durable" : t.ackSeq !== null ? "acked" : t.dead ? "lost?" : "in flight";
  if (t.kind === "initial") return t.content === "any" ? "initial (any)" : "initial zero";
  if (t.kind === "observed") return `observed ${t.content}`;
  return `${t.kind}#${t.gen} (${state})`;
}
