/**
 * Fuzzing scripts for an NBD server: a fast-check arbitrary of whole sessions (option haggling,
 * transmission, ending) mixing valid and malformed steps, and a runner that plays one against
 * a server over a raw socket and checks every answer against the protocol
 * (/work/shared/reference/nbd-protocol.md §10: what is an error reply, what must close).
 * Every export a script writes to has a shadow copy here, so read data is checked too.
 *
 * @example
 * ```ts
 * const target = newFuzzTarget("fuzz0", 1 << 20);
 * fc.assert(fc.asyncProperty(sessionArb, async (s) => {
 *   const r = await runSession(address, s, target);
 *   expect(r.violations).toEqual([]);
 * }));
 * ```
 */
import fc from "fast-check";
import { WirePeer } from "./wire-client.js";

// Protocol numbers are spelled out here rather than imported from the server under test, so a
// wrong constant there cannot hide itself.
const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8 } as const;
const OPT_LIST_META = 9;
const OPT_SET_META = 10;
const OPT_EXTENDED_HEADERS = 11;
const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const ERR_UNSUP = 0x80000001;
const ERR_POLICY = 0x80000002;
const ERR_INVALID = 0x80000003;
const ERR_UNKNOWN = 0x80000006;
const ERR_TOO_BIG = 0x80000009;
const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;
const FLAG_HAS_FLAGS = 1;
const FLAG_READ_ONLY = 2;
const FLAG_SEND_DF = 1 << 7;
const FLAG_SEND_FAST_ZERO = 1 << 11;
const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;
const CMD_FLAG_FUA = 1;
const CMD_FLAG_NO_HOLE = 2;
const CMD_FLAG_DF = 4;
const CMD_FLAG_REQ_ONE = 8;
const CMD_FLAG_FAST_ZERO = 16;
const REPLY_FLAG_DONE = 1;
const CHUNK_NONE = 0;
const CHUNK_OFFSET_DATA = 1;
const CHUNK_OFFSET_HOLE = 2;
const CHUNK_BLOCK_STATUS = 5;
const STATE_ZERO = 2;
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const EOVERFLOW = 75;
const ENOTSUP = 95;
const MAX_PAYLOAD = 32 * 1024 * 1024;

/** How long one answer may take on a loaded 2-core machine before it counts as "no answer". */
export const REPLY_TIMEOUT_MS = 10_000;
/** How long to wait for the server to close when it must. */
const CLOSE_TIMEOUT_MS = 10_000;

/** An export a fuzz worker owns: nobody else writes to it, so a shadow copy predicts reads. */
export interface FuzzTarget {
  name: string;
  sizeBytes: number;
  shadow: Buffer;
  /** 1 where the shadow is known (a trim or an interrupted write makes bytes unknown). */
  known: Uint8Array;
}

export function newFuzzTarget(name: string, sizeBytes: number): FuzzTarget {
  return { name, sizeBytes, shadow: Buffer.alloc(sizeBytes), known: new Uint8Array(sizeBytes).fill(1) };
}

type Which = "mine" | "ro" | "unknown";

export type OptionStep =
  | { k: "unknown"; option: number; data: Uint8Array }
  | { k: "list"; data: Uint8Array }
  | { k: "structured"; data: Uint8Array }
  | { k: "starttls" }
  | { k: "extended" }
  | { k: "info"; which: Which; infos: number[] }
  | { k: "info-lie"; nameLength: number }
  | { k: "go-unknown" }
  | { k: "set-meta"; which: Which; queries: string[] }
  | { k: "list-meta"; which: Which; queries: string[] }
  | { k: "meta-lie"; set: boolean; cut: number }
  | { k: "too-big"; length: number };

export type Enter =
  | { k: "go"; which: "mine" | "ro"; blockSize: boolean }
  | { k: "export-name"; which: Which }
  | { k: "abort" }
  | { k: "hangup" }
  | { k: "truncated-option"; keep: number }
  | { k: "bad-option-magic" }
  | { k: "request-in-handshake" }
  | { k: "huge-option" };

export type RequestKind =
  | "read"
  | "write"
  | "trim"
  | "zero"
  | "flush"
  | "cache"
  | "status"
  | "unknown-cmd"
  | "bad-flags"
  | "df"
  | "fast-zero"
  | "past-end"
  | "overflow"
  | "zero-length"
  | "huge-read"
  | "flush-with-range";

export interface RequestStep {
  k: RequestKind;
  /** Position in the export, scaled to its size. */
  at: number;
  lengthBytes: number;
  fua: boolean;
  /** Sent together with the previous request, answers collected together. */
  pipelined: boolean;
  /** Second command for unknown-cmd / bad-flags / past-end variants. */
  variant: number;
}

export type Ending =
  | { k: "disc" }
  | { k: "hangup" }
  | { k: "bad-request-magic" }
  | { k: "truncated-header"; keep: number }
  | { k: "write-lie"; claimed: number; sent: number };

export interface SessionScript {
  /** Invalid client flags: the server MUST close. */
  badClientFlags: boolean;
  noZeroes: boolean;
  options: OptionStep[];
  enter: Enter;
  requests: RequestStep[];
  ending: Ending;
  /** Seed for cutting the byte stream into TCP writes. */
  cutSeed: number;
}

const bytesArb = (max: number) => fc.uint8Array({ maxLength: max });
const whichArb = fc.constantFrom<Which>("mine", "mine", "ro", "unknown");
const queryArb = fc.oneof(
  fc.constantFrom("base:allocation", "base:", "base:nope", "qemu:dirty-bitmap:x", "nocolon", "", "x-udm:"),
  fc.string({ maxLength: 40 }),
);

export const optionStepArb: fc.Arbitrary<OptionStep> = fc.oneof(
  fc.record({
    k: fc.constant("unknown" as const),
    option: fc.oneof(fc.constant(4), fc.integer({ min: 12, max: 0xffffffff })),
    data: bytesArb(64),
  }),
  fc.record({ k: fc.constant("list" as const), data: fc.oneof(fc.constant(new Uint8Array()), bytesArb(16)) }),
  fc.record({
    k: fc.constant("structured" as const),
    data: fc.oneof(fc.constant(new Uint8Array()), fc.constant(new Uint8Array()), bytesArb(8)),
  }),
  fc.constant({ k: "starttls" as const }),
  fc.constant({ k: "extended" as const }),
  fc.record({
    k: fc.constant("info" as const),
    which: whichArb,
    infos: fc.uniqueArray(fc.integer({ min: 0, max: 6 }), { maxLength: 4 }),
  }),
  fc.record({ k: fc.constant("info-lie" as const), nameLength: fc.integer({ min: 1, max: 0xffffffff }) }),
  fc.constant({ k: "go-unknown" as const }),
  fc.record({
    k: fc.constant("set-meta" as const),
    which: whichArb,
    queries: fc.array(queryArb, { maxLength: 3 }),
  }),
  fc.record({
    k: fc.constant("list-meta" as const),
    which: whichArb,
    queries: fc.array(queryArb, { maxLength: 3 }),
  }),
  fc.record({ k: fc.constant("meta-lie" as const), set: fc.boolean(), cut: fc.integer({ min: 1, max: 12 }) }),
  fc.record({
    k: fc.constant("too-big" as const),
    length: fc.integer({ min: 64 * 1024 + 1, max: 160 * 1024 }),
  }),
);

export const enterArb: fc.Arbitrary<Enter> = fc.oneof(
  {
    weight: 12,
    arbitrary: fc.record({
      k: fc.constant("go" as const),
      which: fc.constantFrom<"mine" | "ro">("mine", "mine", "mine", "ro"),
      blockSize: fc.boolean(),
    }),
  },
  { weight: 3, arbitrary: fc.record({ k: fc.constant("export-name" as const), which: whichArb }) },
  { weight: 1, arbitrary: fc.constant({ k: "abort" as const }) },
  { weight: 1, arbitrary: fc.constant({ k: "hangup" as const }) },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("truncated-option" as const),
      keep: fc.integer({ min: 1, max: 15 }),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ k: "bad-option-magic" as const }) },
  { weight: 1, arbitrary: fc.constant({ k: "request-in-handshake" as const }) },
  { weight: 1, arbitrary: fc.constant({ k: "huge-option" as const }) },
);

export const requestStepArb: fc.Arbitrary<RequestStep> = fc.record({
  k: fc.constantFrom<RequestKind>(
    "read",
    "read",
    "read",
    "write",
    "write",
    "write",
    "trim",
    "zero",
    "flush",
    "cache",
    "status",
    "unknown-cmd",
    "bad-flags",
    "df",
    "fast-zero",
    "past-end",
    "overflow",
    "zero-length",
    "huge-read",
    "flush-with-range",
  ),
  at: fc.integer({ min: 0, max: 1_000_000 }).map((n) => n / 1_000_000),
  lengthBytes: fc.oneof(fc.integer({ min: 1, max: 65536 }), fc.constantFrom(512, 4096, 65536)),
  fua: fc.boolean(),
  pipelined: fc.boolean(),
  variant: fc.nat(),
});

export const endingArb: fc.Arbitrary<Ending> = fc.oneof(
  { weight: 4, arbitrary: fc.constant({ k: "disc" as const }) },
  { weight: 3, arbitrary: fc.constant({ k: "hangup" as const }) },
  { weight: 1, arbitrary: fc.constant({ k: "bad-request-magic" as const }) },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("truncated-header" as const),
      keep: fc.integer({ min: 1, max: 27 }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("write-lie" as const),
      claimed: fc.integer({ min: 2, max: 1 << 20 }),
      sent: fc.integer({ min: 0, max: 4096 }),
    }),
  },
);

export const sessionArb: fc.Arbitrary<SessionScript> = fc.record({
  badClientFlags: fc.integer({ min: 0, max: 19 }).map((n) => n === 0),
  noZeroes: fc.boolean(),
  options: fc.array(optionStepArb, { maxLength: 6 }),
  enter: enterArb,
  requests: fc.array(requestStepArb, { maxLength: 12 }),
  ending: endingArb,
  cutSeed: fc.nat(),
});

/** What one session did and every way the server broke the protocol in it. */
export interface SessionResult {
  violations: string[];
  /** Requests whose answers were checked. */
  requests: number;
  /** The session reached transmission. */
  transmitted: boolean;
  /** Bytes of read data compared with the shadow. */
  bytesChecked: number;
}

class Violation extends Error {}

interface Session {
  peer: WirePeer;
  target: FuzzTarget;
  ro: FuzzTarget;
  rng: () => number;
  structured: boolean;
  metaExport: string | null;
  metaId: number | null;
  violations: string[];
  result: SessionResult;
}

/** Plays `script` against the server at `address`; the returned violations must be empty. */
export async function runSession(
  address: string,
  script: SessionScript,
  target: FuzzTarget,
  ro: FuzzTarget,
): Promise<SessionResult> {
  const result: SessionResult = { violations: [], requests: 0, transmitted: false, bytesChecked: 0 };
  const peer = await WirePeer.connect(address);
  const s: Session = {
    peer,
    target,
    ro,
    rng: mulberry32(script.cutSeed),
    structured: false,
    metaExport: null,
    metaId: null,
    violations: result.violations,
    result,
  };
  try {
    await play(s, script);
  } catch (err) {
    if (err instanceof Violation) result.violations.push(err.message);
    else throw err;
  } finally {
    peer.close();
  }
  return result;
}

async function play(s: Session, script: SessionScript): Promise<void> {
  const greeting = await need(s, 18, "greeting");
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC || greeting.readBigUInt64BE(8) !== IHAVEOPT) {
    throw new Violation(`greeting magic wrong: ${greeting.toString("hex")}`);
  }
  const hsFlags = greeting.readUInt16BE(16);
  if (!(hsFlags & 1) || hsFlags & ~3) throw new Violation(`handshake flags 0x${hsFlags.toString(16)}`);
  const clientFlags = script.badClientFlags
    ? 0x1 | (1 << (2 + (script.cutSeed % 30)))
    : script.noZeroes
      ? 3
      : 1;
  send(s, u32(clientFlags));
  if (script.badClientFlags) return mustClose(s, `client flags 0x${clientFlags.toString(16)}`);
  for (const step of script.options) await optionStep(s, step);
  const entered = await enter(s, script);
  if (!entered) return;
  s.result.transmitted = true;
  let batch: RequestStep[] = [];
  for (const r of script.requests) {
    if (!r.pipelined && batch.length) {
      await requestBatch(s, batch, entered);
      batch = [];
    }
    batch.push(r);
  }
  if (batch.length) await requestBatch(s, batch, entered);
  await ending(s, script.ending, entered);
}

// ---- option haggling -----------------------------------------------------------------------

function optionBytes(option: number, data: Uint8Array | Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(option >>> 0, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, Buffer.from(data)]);
}

function infoData(name: string, infos: number[]): Buffer {
  const n = Buffer.from(name, "utf8");
  const out = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  out.writeUInt32BE(n.length, 0);
  n.copy(out, 4);
  out.writeUInt16BE(infos.length, 4 + n.length);
  for (const [i, t] of infos.entries()) out.writeUInt16BE(t, 6 + n.length + 2 * i);
  return out;
}

function metaData(name: string, queries: string[]): Buffer {
  const parts = [u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length)];
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
  return Buffer.concat(parts);
}

function nameOf(s: Session, which: Which): string {
  return which === "mine" ? s.target.name : which === "ro" ? s.ro.name : "no-such-export";
}

async function optionReply(s: Session, option: number, what: string) {
  const h = await need(s, 20, `reply to ${what}`);
  if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC)
    throw new Violation(`${what}: option reply magic ${h.toString("hex")}`);
  if (h.readUInt32BE(8) !== option) throw new Violation(`${what}: reply echoes option ${h.readUInt32BE(8)}`);
  const type = h.readUInt32BE(12);
  const length = h.readUInt32BE(16);
  if (length > 64 * 1024) throw new Violation(`${what}: option reply of ${length} bytes`);
  const data = length ? await need(s, length, `reply data to ${what}`) : Buffer.alloc(0);
  return { type, data };
}

/** Expects one reply whose type is in `types` (an error reply ends the option). */
async function expectReply(s: Session, option: number, what: string, types: number[]) {
  const r = await optionReply(s, option, what);
  if (!types.includes(r.type)) {
    throw new Violation(
      `${what}: reply type 0x${r.type.toString(16)}, expected ${types.map((t) => `0x${t.toString(16)}`).join("|")}`,
    );
  }
  return r;
}

async function optionStep(s: Session, step: OptionStep): Promise<void> {
  switch (step.k) {
    case "unknown":
      send(s, optionBytes(step.option, step.data));
      await expectReply(s, step.option, `unknown option ${step.option}`, [ERR_UNSUP]);
      return;
    case "list": {
      send(s, optionBytes(OPT.LIST, step.data));
      if (step.data.length) {
        await expectReply(s, OPT.LIST, "LIST with data", [ERR_INVALID]);
        return;
      }
      const names: string[] = [];
      for (;;) {
        const r = await expectReply(s, OPT.LIST, "LIST", [REP_SERVER, REP_ACK]);
        if (r.type === REP_ACK) break;
        const n = r.data.readUInt32BE(0);
        if (n + 4 > r.data.length)
          throw new Violation(`LIST: name length ${n} past reply of ${r.data.length}`);
        names.push(r.data.toString("utf8", 4, 4 + n));
      }
      for (const want of [s.target.name, s.ro.name]) {
        if (!names.includes(want)) throw new Violation(`LIST lacks export ${want}: ${names.join(",")}`);
      }
      return;
    }
    case "structured": {
      send(s, optionBytes(OPT.STRUCTURED_REPLY, step.data));
      if (step.data.length) {
        await expectReply(s, OPT.STRUCTURED_REPLY, "STRUCTURED_REPLY with data", [ERR_INVALID]);
        return;
      }
      const r = await expectReply(
        s,
        OPT.STRUCTURED_REPLY,
        "STRUCTURED_REPLY",
        s.structured ? [REP_ACK, ERR_INVALID] : [REP_ACK],
      );
      if (r.type === REP_ACK) s.structured = true;
      return;
    }
    case "starttls":
      send(s, optionBytes(OPT.STARTTLS, Buffer.alloc(0)));
      await expectReply(s, OPT.STARTTLS, "STARTTLS without TLS configured", [ERR_POLICY, ERR_UNSUP]);
      return;
    case "extended":
      send(s, optionBytes(OPT_EXTENDED_HEADERS, Buffer.alloc(0)));
      await expectReply(s, OPT_EXTENDED_HEADERS, "EXTENDED_HEADERS", [ERR_UNSUP]);
      return;
    case "info": {
      const name = nameOf(s, step.which);
      send(s, optionBytes(OPT.INFO, infoData(name, step.infos)));
      if (step.which === "unknown") {
        await expectReply(s, OPT.INFO, "INFO of an unknown export", [ERR_UNKNOWN]);
        return;
      }
      await infoReplies(s, OPT.INFO, step.which, "INFO");
      return;
    }
    case "info-lie": {
      // name length beyond the data: ERR_INVALID, and the next option must still parse
      const data = infoData("x", []);
      data.writeUInt32BE(Math.max(step.nameLength, data.length - 5) >>> 0, 0);
      send(s, optionBytes(OPT.INFO, data));
      await expectReply(
        s,
        OPT.INFO,
        `INFO with name length ${data.readUInt32BE(0)} in ${data.length} bytes`,
        [ERR_INVALID],
      );
      return;
    }
    case "go-unknown":
      send(s, optionBytes(OPT.GO, infoData("no-such-export", [])));
      await expectReply(s, OPT.GO, "GO of an unknown export", [ERR_UNKNOWN]);
      return;
    case "set-meta":
    case "list-meta": {
      const set = step.k === "set-meta";
      const option = set ? OPT_SET_META : OPT_LIST_META;
      const name = nameOf(s, step.which);
      send(s, optionBytes(option, metaData(name, step.queries)));
      const what = `${set ? "SET" : "LIST"}_META_CONTEXT ${JSON.stringify(step.queries)} on ${step.which}`;
      if (set) s.metaExport = null;
      if (set) s.metaId = null;
      if (set && !s.structured) {
        await expectReply(s, option, `${what} before STRUCTURED_REPLY`, [ERR_INVALID]);
        return;
      }
      // Odd queries (no colon, a bad leaf in base:) may be refused with ERR_INVALID (§2.3).
      const odd = step.queries.some(
        (q) => !q.includes(":") || (q.startsWith("base:") && q !== "base:allocation" && q !== "base:"),
      );
      const refusals = step.which === "unknown" ? [ERR_UNKNOWN, ERR_INVALID] : [ERR_INVALID];
      for (;;) {
        const r = await optionReply(s, option, what);
        if (r.type === REP_META_CONTEXT) {
          if (step.which === "unknown") throw new Violation(`${what}: a context for an unknown export`);
          const ctx = r.data.toString("utf8", 4);
          if (set && !step.queries.includes(ctx))
            throw new Violation(`${what}: selected ${ctx}, never asked for`);
          if (set && ctx === "base:allocation") {
            s.metaExport = name;
            s.metaId = r.data.readUInt32BE(0);
          }
          continue;
        }
        if (r.type === REP_ACK && step.which !== "unknown") return;
        if (refusals.includes(r.type) && (step.which === "unknown" || odd || (!set && !s.structured))) {
          if (set) s.metaExport = null;
          return;
        }
        throw new Violation(`${what}: reply type 0x${r.type.toString(16)}`);
      }
    }
    case "meta-lie": {
      // a query length running past the data: MUST be ERR_INVALID
      const option = step.set ? OPT_SET_META : OPT_LIST_META;
      const data = metaData(s.target.name, ["base:allocation"]);
      const lie = data.subarray(0, Math.max(4, data.length - step.cut));
      send(s, optionBytes(option, lie));
      if (step.set) s.metaExport = null;
      await expectReply(s, option, `${step.set ? "SET" : "LIST"}_META_CONTEXT cut by ${step.cut} bytes`, [
        ERR_INVALID,
      ]);
      return;
    }
    case "too-big":
      send(s, optionBytes(0x1234, Buffer.alloc(step.length)), cuts(s, 16 + step.length, 3));
      await expectReply(s, 0x1234, `option with ${step.length} bytes of data`, [ERR_TOO_BIG, ERR_UNSUP]);
      return;
  }
}

interface Entered {
  target: FuzzTarget;
  readOnly: boolean;
  flags: number;
  structured: boolean;
  metaId: number | null;
}

async function infoReplies(s: Session, option: number, which: "mine" | "ro", what: string): Promise<number> {
  const t = which === "mine" ? s.target : s.ro;
  let flags = -1;
  for (;;) {
    const r = await expectReply(s, option, `${what} ${t.name}`, [REP_INFO, REP_ACK]);
    if (r.type === REP_ACK) break;
    const type = r.data.readUInt16BE(0);
    if (type === INFO_EXPORT) {
      if (r.data.length !== 12) throw new Violation(`${what}: NBD_INFO_EXPORT of ${r.data.length} bytes`);
      const size = Number(r.data.readBigUInt64BE(2));
      flags = r.data.readUInt16BE(10);
      if (size !== t.sizeBytes) throw new Violation(`${what}: size ${size}, export has ${t.sizeBytes}`);
      if (!(flags & FLAG_HAS_FLAGS)) throw new Violation(`${what}: HAS_FLAGS clear`);
      if (Boolean(flags & FLAG_READ_ONLY) !== (which === "ro"))
        throw new Violation(`${what}: READ_ONLY flag wrong`);
      if (flags & FLAG_SEND_DF && !s.structured)
        throw new Violation(`${what}: SEND_DF without structured replies`);
    } else if (type === INFO_BLOCK_SIZE) {
      const min = r.data.readUInt32BE(2);
      const pref = r.data.readUInt32BE(6);
      const max = r.data.readUInt32BE(10);
      const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
      if (!pow2(min) || min > 65536 || !pow2(pref) || pref < Math.max(min, 512) || max < pref) {
        throw new Violation(`${what}: block sizes ${min}/${pref}/${max} break §9`);
      }
    }
  }
  if (flags < 0) throw new Violation(`${what}: ACK without NBD_INFO_EXPORT`);
  return flags;
}

async function enter(s: Session, script: SessionScript): Promise<Entered | null> {
  const e = script.enter;
  switch (e.k) {
    case "go": {
      const t = e.which === "mine" ? s.target : s.ro;
      send(s, optionBytes(OPT.GO, infoData(t.name, e.blockSize ? [INFO_BLOCK_SIZE] : [])));
      const flags = await infoReplies(s, OPT.GO, e.which, "GO");
      return {
        target: t,
        readOnly: e.which === "ro",
        flags,
        structured: s.structured,
        metaId: s.metaExport === t.name ? s.metaId : null,
      };
    }
    case "export-name": {
      const name = nameOf(s, e.which);
      send(s, optionBytes(OPT.EXPORT_NAME, Buffer.from(name)));
      if (e.which === "unknown") {
        await mustClose(s, "EXPORT_NAME of an unknown export");
        return null;
      }
      const t = e.which === "mine" ? s.target : s.ro;
      const r = await need(s, script.noZeroes ? 10 : 134, "EXPORT_NAME reply");
      const size = Number(r.readBigUInt64BE(0));
      const flags = r.readUInt16BE(8);
      if (size !== t.sizeBytes) throw new Violation(`EXPORT_NAME: size ${size}, export has ${t.sizeBytes}`);
      if (!script.noZeroes && r.subarray(10).some((b) => b !== 0))
        throw new Violation("EXPORT_NAME: padding not zero");
      if (Boolean(flags & FLAG_READ_ONLY) !== (e.which === "ro"))
        throw new Violation("EXPORT_NAME: READ_ONLY flag wrong");
      // meta contexts only count if negotiated for this export; with EXPORT_NAME there is no GO
      return {
        target: t,
        readOnly: e.which === "ro",
        flags,
        structured: s.structured,
        metaId: s.metaExport === t.name ? s.metaId : null,
      };
    }
    case "abort": {
      send(s, optionBytes(OPT.ABORT, Buffer.alloc(0)));
      const r = await s.peer.read(20, REPLY_TIMEOUT_MS);
      if (r === "timeout") throw new Violation("ABORT: neither ACK nor close");
      if (r !== "closed" && r.readUInt32BE(12) !== REP_ACK)
        throw new Violation(`ABORT: reply type ${r.readUInt32BE(12)}`);
      await mustClose(s, "after ABORT");
      return null;
    }
    case "hangup":
      return null;
    case "truncated-option":
      send(s, optionBytes(OPT.GO, infoData(s.target.name, [])).subarray(0, e.keep));
      return null;
    case "bad-option-magic": {
      const b = optionBytes(OPT.LIST, Buffer.alloc(0));
      b.writeUInt32BE(0xdeadbeef, 0);
      send(s, b);
      await mustClose(s, "option with a wrong magic");
      return null;
    }
    case "request-in-handshake":
      send(s, requestBytes(0, CMD.READ, 1n, 0n, 512));
      await mustClose(s, "a transmission request during option haggling");
      return null;
    case "huge-option":
      // a length that is abuse: the server may close at once (or wait for data that never comes)
      send(s, optionBytes(OPT.GO, Buffer.alloc(0)).fill(0xff, 12, 16).subarray(0, 16));
      await s.peer.drain(50, 200);
      return null;
  }
}

// ---- transmission --------------------------------------------------------------------------

function requestBytes(flags: number, type: number, cookie: bigint, offset: bigint, length: number): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags & 0xffff, 4);
  b.writeUInt16BE(type & 0xffff, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeBigUInt64BE(offset & 0xffffffffffffffffn, 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

interface Planned {
  what: string;
  type: number;
  flags: number;
  cookie: bigint;
  offset: number;
  length: number;
  bytes: Buffer;
  /** "ok", any error in the list, or "any" (zero-length: unspecified but connection kept). */
  expect: "ok" | number[] | "any";
  /** Alternative accepted outcome besides `expect` (e.g. FAST_ZERO may fail ENOTSUP). */
  orErrors?: number[];
  /** Applies a successful write-like request to the shadow. */
  apply?: () => void;
  /** Marks the range unknown if the request's outcome is unknown. */
  unknownRange?: [number, number];
  writes: boolean;
  /** Reply state. */
  error: number | null;
  done: boolean;
  data: Buffer | null;
  covered: number;
  status: Array<[number, number]> | null;
}

let cookieCounter = 1n;

function plan(e: Entered, r: RequestStep): Planned {
  const t = e.target;
  const size = t.sizeBytes;
  const len = Math.min(r.lengthBytes, size);
  const off = Math.min(Math.floor(r.at * size), size - len);
  const fua = r.fua ? CMD_FLAG_FUA : 0;
  const cookie = cookieCounter++ | (BigInt(r.variant & 0xffff) << 48n);
  const p = (
    what: string,
    type: number,
    flags: number,
    offset: bigint,
    length: number,
    expect: Planned["expect"],
    payload?: Buffer,
  ): Planned => ({
    what: `${what} ${offset}+${length} flags 0x${flags.toString(16)}`,
    type,
    flags,
    cookie,
    offset: Number(offset),
    length,
    bytes: payload
      ? Buffer.concat([requestBytes(flags, type, cookie, offset, length), payload])
      : requestBytes(flags, type, cookie, offset, length),
    expect,
    writes: false,
    error: null,
    done: false,
    data: null,
    covered: 0,
    status: null,
  });
  const writeErr = (x: Planned): Planned => {
    if (e.readOnly && x.expect === "ok") x.expect = [EPERM];
    return x;
  };
  switch (r.k) {
    case "read":
      return p("READ", CMD.READ, fua, BigInt(off), len, "ok");
    case "write": {
      const data = Buffer.alloc(len, r.variant & 0xff);
      for (let i = 0; i + 4 <= len; i += 4)
        data.writeUInt32LE((r.variant + Math.imul(i, 0x9e3779b1)) >>> 0, i);
      const x = writeErr(p("WRITE", CMD.WRITE, fua, BigInt(off), len, "ok", data));
      x.writes = true;
      x.apply = () => {
        data.copy(t.shadow, off);
        t.known.fill(1, off, off + len);
      };
      x.unknownRange = [off, len];
      return x;
    }
    case "trim": {
      const x = writeErr(p("TRIM", CMD.TRIM, fua, BigInt(off), len, "ok"));
      x.writes = true;
      x.unknownRange = [off, len];
      x.apply = () => t.known.fill(0, off, off + len);
      return x;
    }
    case "zero": {
      const flags = fua | (r.variant & 1 ? CMD_FLAG_NO_HOLE : 0);
      const x = writeErr(p("WRITE_ZEROES", CMD.WRITE_ZEROES, flags, BigInt(off), len, "ok"));
      x.writes = true;
      x.unknownRange = [off, len];
      x.apply = () => {
        t.shadow.fill(0, off, off + len);
        t.known.fill(1, off, off + len);
      };
      return x;
    }
    case "fast-zero": {
      const advertised = (e.flags & FLAG_SEND_FAST_ZERO) !== 0;
      const expect = e.readOnly ? [EINVAL, EPERM] : advertised ? "ok" : [EINVAL];
      const x = p(
        "WRITE_ZEROES|FAST_ZERO",
        CMD.WRITE_ZEROES,
        fua | CMD_FLAG_FAST_ZERO,
        BigInt(off),
        len,
        expect,
      );
      if (advertised && !e.readOnly) x.orErrors = [ENOTSUP];
      x.writes = true;
      x.unknownRange = [off, len];
      x.apply = () => {
        t.shadow.fill(0, off, off + len);
        t.known.fill(1, off, off + len);
      };
      return x;
    }
    case "flush":
      return p("FLUSH", CMD.FLUSH, fua, 0n, 0, "ok");
    case "flush-with-range":
      return p("FLUSH with a range", CMD.FLUSH, 0, BigInt(off), len, [EINVAL]);
    case "cache":
      return p("CACHE", CMD.CACHE, 0, BigInt(off), len, "ok");
    case "status":
      if (!e.structured || e.metaId === null)
        return p("BLOCK_STATUS without a context", CMD.BLOCK_STATUS, 0, BigInt(off), len, [EINVAL]);
      return p(
        "BLOCK_STATUS",
        CMD.BLOCK_STATUS,
        r.variant & 1 ? CMD_FLAG_REQ_ONE : 0,
        BigInt(off),
        len,
        "ok",
      );
    case "unknown-cmd":
      return p("unknown command", 8 + (r.variant % 0xfff0), 0, BigInt(off), len, [EINVAL]);
    case "bad-flags": {
      // a flag the command does not take; WRITE must still have its payload consumed
      const bit = 1 << (5 + (r.variant % 11));
      if (r.variant & 1) {
        return p(
          "WRITE with an unknown flag",
          CMD.WRITE,
          bit,
          BigInt(off),
          len,
          [EINVAL, EPERM],
          Buffer.alloc(len, 0xee),
        );
      }
      return p("READ with an unknown flag", CMD.READ, bit, BigInt(off), len, [EINVAL]);
    }
    case "df":
      if (e.structured && e.flags & FLAG_SEND_DF)
        return p("READ|DF", CMD.READ, CMD_FLAG_DF, BigInt(off), len, "ok");
      return p("READ|DF without structured replies", CMD.READ, CMD_FLAG_DF, BigInt(off), len, [EINVAL]);
    case "past-end": {
      const start = size - (r.variant % 4096);
      const kinds = [CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.CACHE];
      const type = kinds[r.variant % kinds.length] as number;
      const l = Math.max(len, 4097);
      const err =
        e.readOnly && type !== CMD.READ && type !== CMD.CACHE
          ? [EPERM, EINVAL, ENOSPC]
          : type === CMD.WRITE || type === CMD.WRITE_ZEROES
            ? [ENOSPC]
            : [EINVAL];
      return p(
        "past the end",
        type,
        0,
        BigInt(start),
        l,
        err,
        type === CMD.WRITE ? Buffer.alloc(l, 0xdd) : undefined,
      );
    }
    case "overflow": {
      const offset = 0xffffffffffffffffn - BigInt(r.variant % 1000);
      const type = r.variant & 1 ? CMD.WRITE : CMD.READ;
      const err = type === CMD.WRITE ? (e.readOnly ? [EPERM, ENOSPC] : [ENOSPC]) : [EINVAL];
      return p(
        "offset near 2^64",
        type,
        0,
        offset,
        len,
        err,
        type === CMD.WRITE ? Buffer.alloc(len, 0xcc) : undefined,
      );
    }
    case "zero-length": {
      const kinds = [CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS];
      return p("zero-length", kinds[r.variant % kinds.length] as number, 0, BigInt(off), 0, "any");
    }
    case "huge-read":
      return p("READ above the max payload", CMD.READ, 0, 0n, MAX_PAYLOAD + 1 + (r.variant % 65536), [
        EINVAL,
        EOVERFLOW,
      ]);
  }
}

async function requestBatch(s: Session, steps: RequestStep[], e: Entered): Promise<void> {
  const planned = steps.map((r) => plan(e, r));
  const bytes = Buffer.concat(planned.map((x) => x.bytes));
  send(s, bytes, cuts(s, bytes.length, 2));
  const byCookie = new Map(planned.map((x) => [x.cookie, x]));
  let open = planned.length;
  while (open > 0) {
    const x = await readReply(s, e, byCookie);
    if (x.done) open--;
  }
  // Concurrent writes in one batch may land in any order: only unrelated reads are checked exactly.
  const writes = planned.filter((x) => x.writes && (x.error ?? 0) === 0);
  for (const x of planned) {
    s.result.requests++;
    const ok = x.error === null || x.error === 0;
    const what = `${x.what} (cookie ${x.cookie})`;
    if (x.expect === "ok" && !ok && !(x.orErrors ?? []).includes(x.error as number)) {
      throw new Violation(`${what}: error ${x.error}, expected success`);
    }
    if (Array.isArray(x.expect) && (ok || !x.expect.includes(x.error as number))) {
      throw new Violation(
        `${what}: ${ok ? "success" : `error ${x.error}`}, expected error ${x.expect.join("|")}`,
      );
    }
  }
  const overlapsWrite = (x: Planned) =>
    writes.some((w) => w !== x && w.offset < x.offset + x.length && x.offset < w.offset + w.length);
  for (const x of planned) {
    if (!x.writes) continue;
    if (x.error === null || x.error === 0) x.apply?.();
    if (x.unknownRange && planned.length > 1 && overlapsWrite(x))
      e.target.known.fill(0, x.unknownRange[0], x.unknownRange[0] + x.unknownRange[1]);
  }
  for (const x of planned) {
    if (x.type !== CMD.READ || x.data === null || (x.error ?? 0) !== 0) continue;
    if (planned.length > 1 && overlapsWrite(x)) continue;
    checkShadow(s, e.target, x.offset, x.data, x.what);
  }
  for (const x of planned) {
    if (x.type === CMD.BLOCK_STATUS && x.status && (x.error ?? 0) === 0) checkStatus(e, x);
  }
}

function checkShadow(s: Session, t: FuzzTarget, offset: number, data: Buffer, what: string): void {
  for (let i = 0; i < data.length; i++) {
    if (t.known[offset + i] && t.shadow[offset + i] !== data[i]) {
      throw new Violation(
        `${what}: byte ${offset + i} reads 0x${data[i]?.toString(16)}, wrote 0x${t.shadow[offset + i]?.toString(16)}`,
      );
    }
  }
  s.result.bytesChecked += data.length;
}

function checkStatus(e: Entered, x: Planned): void {
  const ext = x.status ?? [];
  if (!ext.length) throw new Violation(`${x.what}: no extents`);
  let at = x.offset;
  for (const [i, [len, flags]] of ext.entries()) {
    if (len === 0) throw new Violation(`${x.what}: zero-length extent`);
    if (i < ext.length - 1 && at + len >= x.offset + x.length)
      throw new Violation(`${x.what}: extents run past the request before the last`);
    if (flags & STATE_ZERO) {
      for (let b = at; b < Math.min(at + len, e.target.sizeBytes); b++) {
        if (e.target.known[b] && e.target.shadow[b] !== 0)
          throw new Violation(`${x.what}: extent at ${at} says ZERO, byte ${b} is not`);
      }
    }
    at += len;
  }
  if (at > e.target.sizeBytes) throw new Violation(`${x.what}: extents end at ${at}, past the export`);
  if (x.flags & CMD_FLAG_REQ_ONE && (ext.length !== 1 || (ext[0]?.[0] ?? 0) > x.length)) {
    throw new Violation(`${x.what}: REQ_ONE answered with ${ext.length} extents`);
  }
}

async function readReply(s: Session, e: Entered, byCookie: Map<bigint, Planned>): Promise<Planned> {
  const head = await need(s, 4, "reply magic");
  const magic = head.readUInt32BE(0);
  if (magic === SIMPLE_REPLY_MAGIC) {
    const rest = await need(s, 12, "simple reply");
    const error = rest.readUInt32BE(0);
    const cookie = rest.readBigUInt64BE(4);
    const x = byCookie.get(cookie);
    if (!x || x.done) throw new Violation(`simple reply for unknown or finished cookie ${cookie}`);
    x.done = true;
    x.error = error;
    if (x.type === CMD.BLOCK_STATUS && error === 0 && x.length > 0)
      throw new Violation(`${x.what}: success without a status chunk`);
    if (x.type === CMD.READ && e.structured) {
      throw new Violation(
        `${x.what}: READ answered with a simple reply (error ${error}) after STRUCTURED_REPLY`,
      );
    }
    if (x.type === CMD.READ && error === 0) {
      x.data = await need(s, x.length, `${x.what}: read data`);
    }
    return x;
  }
  if (magic !== STRUCTURED_REPLY_MAGIC) throw new Violation(`reply magic 0x${magic.toString(16)}`);
  if (!e.structured) throw new Violation("structured reply chunk without STRUCTURED_REPLY");
  const h = await need(s, 16, "chunk header");
  const flags = h.readUInt16BE(0);
  const type = h.readUInt16BE(2);
  const cookie = h.readBigUInt64BE(4);
  const length = h.readUInt32BE(12);
  const x = byCookie.get(cookie);
  if (!x || x.done) throw new Violation(`chunk for unknown or finished cookie ${cookie}`);
  if (length > MAX_PAYLOAD + 64) throw new Violation(`${x.what}: chunk of ${length} bytes`);
  const payload = length ? await need(s, length, `${x.what}: chunk payload`) : Buffer.alloc(0);
  if (flags & ~REPLY_FLAG_DONE) throw new Violation(`${x.what}: chunk flags 0x${flags.toString(16)}`);
  if (type & 0x8000) {
    if (length < 6) throw new Violation(`${x.what}: error chunk of ${length} bytes`);
    const err = payload.readUInt32BE(0);
    if (err === 0) throw new Violation(`${x.what}: error chunk with error 0`);
    const msgLen = payload.readUInt16BE(4);
    if (6 + msgLen > length) throw new Violation(`${x.what}: error message length ${msgLen} past the chunk`);
    x.error = err;
  } else if (type === CHUNK_OFFSET_DATA || type === CHUNK_OFFSET_HOLE) {
    if (x.type !== CMD.READ) throw new Violation(`${x.what}: content chunk for a non-read`);
    const off = Number(payload.readBigUInt64BE(0));
    const n = type === CHUNK_OFFSET_DATA ? length - 8 : payload.readUInt32BE(8);
    if (n <= 0 || off < x.offset || off + n > x.offset + x.length)
      throw new Violation(`${x.what}: chunk ${off}+${n} outside the request`);
    x.data ??= Buffer.alloc(x.length, 0xa5);
    if (type === CHUNK_OFFSET_DATA) payload.copy(x.data, off - x.offset, 8);
    else x.data.fill(0, off - x.offset, off - x.offset + n);
    x.covered += n;
  } else if (type === CHUNK_BLOCK_STATUS) {
    if (x.type !== CMD.BLOCK_STATUS) throw new Violation(`${x.what}: block status chunk for another command`);
    if (payload.readUInt32BE(0) !== e.metaId)
      throw new Violation(`${x.what}: context id ${payload.readUInt32BE(0)}, negotiated ${e.metaId}`);
    if ((length - 4) % 8 !== 0 || length < 12)
      throw new Violation(`${x.what}: block status chunk of ${length} bytes`);
    x.status = [];
    for (let i = 4; i < length; i += 8) x.status.push([payload.readUInt32BE(i), payload.readUInt32BE(i + 4)]);
  } else if (type !== CHUNK_NONE) {
    throw new Violation(`${x.what}: unknown chunk type ${type}`);
  }
  if (flags & REPLY_FLAG_DONE) {
    x.done = true;
    x.error ??= 0;
    if (x.type === CMD.READ && x.error === 0 && x.covered !== x.length && x.length > 0) {
      throw new Violation(`${x.what}: read chunks cover ${x.covered} of ${x.length} bytes`);
    }
    if (x.type === CMD.BLOCK_STATUS && x.error === 0 && x.length > 0 && !x.status)
      throw new Violation(`${x.what}: no status chunk`);
  }
  return x;
}

async function ending(s: Session, end: Ending, e: Entered): Promise<void> {
  switch (end.k) {
    case "disc": {
      send(s, requestBytes(0, CMD.DISC, 0n, 0n, 0));
      const r = await s.peer.read(1, CLOSE_TIMEOUT_MS);
      if (r === "timeout") throw new Violation("DISC: the server did not close");
      if (r !== "closed") throw new Violation("DISC: the server replied");
      return;
    }
    case "hangup":
      return;
    case "bad-request-magic": {
      const b = requestBytes(0, CMD.READ, 9n, 0n, 512);
      b.writeUInt32BE(0x25609514, 0);
      send(s, b);
      return mustClose(s, "a request with a wrong magic");
    }
    case "truncated-header":
      send(s, requestBytes(0, CMD.READ, 9n, 0n, 512).subarray(0, end.keep));
      return;
    case "write-lie": {
      // the header claims more payload than follows: the rest of the stream is payload now
      const claimed = Math.min(end.claimed, e.target.sizeBytes);
      send(
        s,
        Buffer.concat([
          requestBytes(0, CMD.WRITE, 77n, 0n, claimed),
          Buffer.alloc(Math.min(end.sent, claimed - 1), 0x11),
        ]),
      );
      if (!e.readOnly) e.target.known.fill(0, 0, claimed);
      await s.peer.drain(20, 100);
      return;
    }
  }
}

// ---- plumbing ------------------------------------------------------------------------------

function send(s: Session, bytes: Buffer, at: number[] = []): void {
  s.peer.send(bytes, at);
}

/** Up to `n` random cut points in a stream of `length` bytes. */
function cuts(s: Session, length: number, n: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < n; i++) if (s.rng() < 0.5) out.push(1 + Math.floor(s.rng() * Math.max(1, length - 1)));
  return out;
}

async function need(s: Session, n: number, what: string): Promise<Buffer> {
  const r = await s.peer.read(n, REPLY_TIMEOUT_MS);
  if (r === "closed") throw new Violation(`${what}: the server closed the connection`);
  if (r === "timeout") throw new Violation(`${what}: no answer within ${REPLY_TIMEOUT_MS} ms`);
  return r;
}

async function mustClose(s: Session, what: string): Promise<void> {
  if (!(await s.peer.waitClosed(CLOSE_TIMEOUT_MS)))
    throw new Violation(`${what}: the server kept the connection open`);
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

/** A small seeded PRNG in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
