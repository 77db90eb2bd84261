import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { blockPayload, DeviceModel, describeBlock, type TrimSemantics, type WriteTicket } from "./model.js";

const BLOCK = 64;
const TEAR = 16;
const BLOCKS = 6;

function newModel(trim: TrimSemantics = "zero") {
  return new DeviceModel({ sizeBytes: BLOCK * BLOCKS, seed: 42, blockBytes: BLOCK, tearBytes: TEAR, trim });
}

function gen(model: DeviceModel, g: number, block: number) {
  return blockPayload(model.seed, g, block, model.blockBytes);
}

describe("DeviceModel: what must survive", () => {
  it("a FUA write that was acknowledged must be present after a crash", () => {
    const m = newModel();
    const w = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(w);
    m.crash();
    expect(m.clone().verifyAfterCrash(0, Buffer.alloc(BLOCK))).toHaveLength(1);
    expect(m.verifyAfterCrash(0, m.payload(w))).toEqual([]);
  });

  it("an acknowledged write without FLUSH may or may not survive", () => {
    const m = newModel();
    const w = m.beginWrite(BLOCK, 2 * BLOCK);
    m.complete(w);
    m.crash();
    expect(m.clone().verifyAfterCrash(BLOCK, Buffer.alloc(2 * BLOCK))).toEqual([]);
    const half = Buffer.concat([m.payload(w).subarray(0, BLOCK), Buffer.alloc(BLOCK)]);
    expect(m.verifyAfterCrash(BLOCK, half)).toEqual([]);
    // what was found is adopted: the next crash must show the same content
    m.crash();
    expect(m.clone().verifyAfterCrash(BLOCK, Buffer.alloc(2 * BLOCK))).toHaveLength(1);
  });

  it("a FLUSH covers writes acknowledged before it was sent, not writes acknowledged after", () => {
    const m = newModel();
    const early = m.beginWrite(0, BLOCK);
    const late = m.beginWrite(BLOCK, BLOCK);
    m.complete(early);
    const f = m.beginFlush();
    m.complete(late);
    m.completeFlush(f);
    m.crash();
    const lostEarly = m.clone().verifyAfterCrash(0, Buffer.alloc(2 * BLOCK));
    expect(lostEarly.map((x) => x.offsetBytes)).toEqual([0]);
    expect(lostEarly[0]?.expected).toEqual([`write#${early.gen} (durable)`]);
    expect(m.verifyAfterCrash(0, Buffer.concat([m.payload(early), Buffer.alloc(BLOCK)]))).toEqual([]);
  });

  it("a durable write hides what it overwrote, but not a write that overlapped it in time", () => {
    const m = newModel();
    const a = m.beginWrite(0, BLOCK);
    m.complete(a);
    const b = m.beginWrite(0, BLOCK, { fua: true });
    const c = m.beginWrite(0, BLOCK); // sent while b was in flight: may land after b
    m.complete(b);
    m.complete(c);
    m.crash();
    expect(m.clone().verifyAfterCrash(0, m.payload(a))).toHaveLength(1);
    expect(m.clone().verifyAfterCrash(0, Buffer.alloc(BLOCK))).toHaveLength(1);
    expect(m.clone().verifyAfterCrash(0, m.payload(c))).toEqual([]);
    expect(m.verifyAfterCrash(0, m.payload(b))).toEqual([]);
  });

  it("a write in flight at the crash may be present, absent or torn at sector granularity", () => {
    const m = newModel();
    const old = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(old);
    const w = m.beginWrite(0, BLOCK);
    m.crash();
    expect(() => m.complete(w)).toThrow(/after a crash/);
    const torn = Buffer.concat([m.payload(w).subarray(0, TEAR), m.payload(old).subarray(TEAR)]);
    expect(m.clone().verifyAfterCrash(0, torn)).toEqual([]);
    const garbage = Buffer.from(torn);
    garbage.writeUInt8(garbage.readUInt8(TEAR + 1) ^ 0xff, TEAR + 1);
    expect(m.verifyAfterCrash(0, garbage)).toHaveLength(1);
  });

  it("a durable block must not be torn", () => {
    const m = newModel();
    const w = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(w);
    m.crash();
    const torn = Buffer.concat([m.payload(w).subarray(0, TEAR), Buffer.alloc(BLOCK - TEAR)]);
    expect(m.verifyAfterCrash(0, torn)).toHaveLength(1);
  });

  it("a failed write may have landed, until a later durable write supersedes it", () => {
    const m = newModel();
    const w = m.beginWrite(0, BLOCK);
    m.fail(w);
    const probe = m.clone();
    probe.crash();
    expect(probe.verifyAfterCrash(0, m.payload(w))).toEqual([]);
    const z = m.beginWriteZeroes(0, BLOCK, { fua: true });
    m.complete(z);
    m.crash();
    expect(m.verifyAfterCrash(0, m.payload(w))).toHaveLength(1);
  });

  it("trim: zeros when the device punches holes, anything when unspecified", () => {
    const zero = newModel("zero");
    const w = zero.beginWrite(0, BLOCK, { fua: true });
    zero.complete(w);
    const t = zero.beginTrim(0, BLOCK, { fua: true });
    zero.complete(t);
    zero.crash();
    expect(zero.clone().verifyAfterCrash(0, zero.payload(w))).toHaveLength(1);
    expect(zero.verifyAfterCrash(0, Buffer.alloc(BLOCK))).toEqual([]);

    const any = newModel("unspecified");
    const t2 = any.beginTrim(0, BLOCK, { fua: true });
    any.complete(t2);
    any.crash();
    expect(any.verifyAfterCrash(0, Buffer.alloc(BLOCK, 0x5a))).toEqual([]);
  });

  it("trim that may be ignored: zeros or what was there, never anything else", () => {
    const m = newModel("zero-or-unchanged");
    const w = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(w);
    const t = m.beginTrim(0, BLOCK, { fua: true });
    m.complete(t);
    const r = m.beginRead(0, BLOCK);
    expect(m.checkRead(r, m.payload(w))).toEqual([]);
    expect(m.checkRead(r, Buffer.alloc(BLOCK))).toEqual([]);
    expect(m.checkRead(r, Buffer.alloc(BLOCK, 0x5a))).toHaveLength(1);
    m.crash();
    expect(m.clone().verifyAfterCrash(0, Buffer.alloc(BLOCK, 0x5a))).toHaveLength(1);
    expect(m.verifyAfterCrash(0, m.payload(w))).toEqual([]);
    // a later durable write still hides both
    const w2 = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(w2);
    m.crash();
    expect(m.clone().verifyAfterCrash(0, Buffer.alloc(BLOCK))).toHaveLength(1);
  });

  it("a read racing a write may be torn at any byte; after a crash only at sectors", () => {
    const m = newModel();
    const old = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(old);
    const w = m.beginWrite(0, BLOCK);
    const r = m.beginRead(0, BLOCK);
    const mixed = Buffer.concat([m.payload(w).subarray(0, 20), m.payload(old).subarray(20)]);
    expect(m.checkRead(r, mixed)).toEqual([]);
    const bad = Buffer.from(mixed);
    bad.writeUInt8(bad.readUInt8(7) ^ 0xff, 7);
    const found = m.checkRead(r, bad);
    expect(found).toHaveLength(1);
    expect(found[0]?.sectors).toBe("??AA"); // A = the durable write, B = the one in flight
    m.crash();
    expect(m.verifyAfterCrash(0, mixed)).toHaveLength(1);
  });

  it("a live read sent after an acknowledgement sees that write or a newer one", () => {
    const m = newModel();
    const w = m.beginWrite(0, BLOCK);
    m.complete(w);
    const r = m.beginRead(0, BLOCK);
    expect(m.checkRead(r, Buffer.alloc(BLOCK))).toHaveLength(1);
    expect(m.checkRead(r, m.payload(w))).toEqual([]);
    const w2 = m.beginWrite(0, BLOCK); // in flight while a second read runs
    const r2 = m.beginRead(0, BLOCK);
    expect(m.checkRead(r2, m.payload(w2))).toEqual([]);
    expect(m.checkRead(r2, m.payload(w))).toEqual([]);
    expect(m.checkRead(r2, Buffer.alloc(BLOCK + 1))).toHaveLength(1);
  });

  it("a read sent before a FUA write may return what the write replaced, even after its ack (load-nbd connection 39)", () => {
    // The server may serve a READ before a WRITE sent after it and answer it after the WRITE's
    // reply: the read then shows the old content although the write is acknowledged and durable.
    const m = newModel();
    const r = m.beginRead(0, 2 * BLOCK);
    const w = m.beginWrite(BLOCK, BLOCK, { fua: true });
    m.complete(w);
    expect(m.checkRead(r, Buffer.alloc(2 * BLOCK))).toEqual([]);
    // A read sent after the acknowledgement must see the write.
    const r2 = m.beginRead(0, 2 * BLOCK);
    const stale = m.checkRead(r2, Buffer.alloc(2 * BLOCK));
    expect(stale).toHaveLength(1);
    expect(stale[0]).toMatchObject({
      offsetBytes: BLOCK,
      expected: [`write#${w.gen} (durable)`],
      found: "zero",
    });
    // Once the early read ended, the durable write hides the old content for good.
    m.crash();
    expect(m.verifyAfterCrash(BLOCK, Buffer.alloc(BLOCK))).toHaveLength(1);
  });

  it("a read sent before a FUA write may come back torn between the old content and the write (torture seed 4242)", () => {
    const m = newModel();
    const old = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(old);
    const r = m.beginRead(0, BLOCK);
    const w = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(w);
    const torn = Buffer.concat([m.payload(w).subarray(0, TEAR), m.payload(old).subarray(TEAR)]);
    expect(m.checkRead(r, torn)).toEqual([]);
    expect(m.subSectorTears).toBe(0); // torn at a sector boundary
  });

  it("a read sent before a flush completes may return what flushed writes replaced", () => {
    const m = newModel();
    const r = m.beginRead(0, BLOCK);
    const w = m.beginWrite(0, BLOCK);
    m.complete(w);
    const f = m.beginFlush();
    m.completeFlush(f);
    expect(m.checkRead(r, Buffer.alloc(BLOCK))).toEqual([]);
    // A failed read (endRead) releases what it held back too.
    const r2 = m.beginRead(0, BLOCK);
    const w2 = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(w2);
    expect(m.candidateCount(0)).toBe(2); // w and w2: r2 may still see either
    m.endRead(r2);
    expect(m.candidates(0)).toEqual([`write#${w2.gen} (durable)`]);
  });

  it("a clone is the origin as of now and does not follow later writes", () => {
    const m = newModel();
    const w = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(w);
    const snap = m.clone();
    const w2 = m.beginWrite(0, BLOCK, { fua: true });
    m.complete(w2);
    snap.crash();
    expect(snap.clone().verifyAfterCrash(0, m.payload(w2))).toHaveLength(1);
    expect(snap.verifyAfterCrash(0, m.payload(w))).toEqual([]);
  });

  it("names what it found and rejects unaligned I/O", () => {
    const m = newModel();
    expect(describeBlock(gen(m, 9, 3))).toBe("gen 9 block 3 (seed 42)");
    expect(describeBlock(Buffer.alloc(BLOCK))).toBe("zero");
    expect(() => m.beginWrite(1, BLOCK)).toThrow(/aligned/);
    expect(() => m.beginWrite(0, BLOCK * (BLOCKS + 1))).toThrow(/aligned inside/);
    expect(() => new DeviceModel({ sizeBytes: 100, seed: 1, blockBytes: 64 })).toThrow(/multiple/);
  });

  it("payloads are deterministic and differ by generation and block", () => {
    const a = blockPayload(1, 2, 3, 4096);
    expect(blockPayload(1, 2, 3, 4096).equals(a)).toBe(true);
    expect(blockPayload(1, 3, 3, 4096).equals(a)).toBe(false);
    expect(blockPayload(1, 2, 4, 4096).equals(a)).toBe(false);
    expect(blockPayload(2, 2, 3, 4096).equals(a)).toBe(false);
  });
});

/**
 * A reference disk with a volatile cache: requests land block by block (or sector by sector)
 * in the cache at any time before their reply, the cache is written back block by block at
 * any time, FUA and FLUSH write back before replying, and a crash keeps only what was written
 * back. Every outcome it can produce is legal, so the model must accept all of them.
 */
interface SimRequest {
  ticket: WriteTicket;
  blocks: Buffer[];
  landed: boolean[];
}

type Step =
  | { t: "start"; kind: "write" | "zero" | "trim"; block: number; count: number; fua: boolean }
  | { t: "land"; pick: number; block: number }
  | { t: "landSector"; pick: number; block: number; sector: number }
  | { t: "reply"; pick: number; ok: boolean }
  | { t: "writeback"; block: number }
  | { t: "flushStart" }
  | { t: "flushEnd"; pick: number }
  | { t: "readStart"; block: number; count: number }
  | { t: "readSample"; pick: number; block: number }
  | { t: "readEnd"; pick: number }
  | { t: "crash" };

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({
      t: fc.constant("start" as const),
      kind: fc.constantFrom("write" as const, "write" as const, "zero" as const, "trim" as const),
      block: fc.nat(BLOCKS - 1),
      count: fc.integer({ min: 1, max: 3 }),
      fua: fc.boolean(),
    }),
  },
  { weight: 5, arbitrary: fc.record({ t: fc.constant("land" as const), pick: fc.nat(), block: fc.nat() }) },
  {
    weight: 1,
    arbitrary: fc.record({
      t: fc.constant("landSector" as const),
      pick: fc.nat(),
      block: fc.nat(),
      sector: fc.nat(BLOCK / TEAR - 1),
    }),
  },
  {
    weight: 4,
    arbitrary: fc.record({ t: fc.constant("reply" as const), pick: fc.nat(), ok: fc.boolean() }).map((s) =>
      // mostly successes; failures are rare as on a real device
      s.pick % 5 === 0 ? s : { ...s, ok: true },
    ),
  },
  { weight: 3, arbitrary: fc.record({ t: fc.constant("writeback" as const), block: fc.nat(BLOCKS - 1) }) },
  { weight: 1, arbitrary: fc.constant({ t: "flushStart" as const }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("flushEnd" as const), pick: fc.nat() }) },
  {
    weight: 2,
    arbitrary: fc.record({
      t: fc.constant("readStart" as const),
      block: fc.nat(BLOCKS - 1),
      count: fc.integer({ min: 1, max: 3 }),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({ t: fc.constant("readSample" as const), pick: fc.nat(), block: fc.nat() }),
  },
  { weight: 2, arbitrary: fc.record({ t: fc.constant("readEnd" as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.constant({ t: "crash" as const }) },
);

function runSim(trim: TrimSemantics, steps: Step[], trimFill: number): string[] {
  const m = newModel(trim);
  const volatile = Array.from({ length: BLOCKS }, () => Buffer.alloc(BLOCK));
  const durable = Array.from({ length: BLOCKS }, () => Buffer.alloc(BLOCK));
  let requests: SimRequest[] = [];
  let flushes: Array<ReturnType<DeviceModel["beginFlush"]>> = [];
  // A read copies each block at some moment between its start and its end (a device serves the
  // blocks of a request whenever it likes, before or after requests sent later).
  let reads: Array<{ ticket: ReturnType<DeviceModel["beginRead"]>; blocks: Array<Buffer | null> }> = [];
  const errors: string[] = [];
  const pick = <T>(list: T[], n: number) => (list.length ? list[n % list.length] : undefined);
  const landBlock = (r: SimRequest, i: number) => {
    const b = r.ticket.offsetBytes / BLOCK + i;
    (r.blocks[i] as Buffer).copy(volatile[b] as Buffer);
    r.landed[i] = true;
  };
  const writeback = (b: number) => (volatile[b] as Buffer).copy(durable[b] as Buffer);
  for (const s of steps) {
    switch (s.t) {
      case "start": {
        const count = Math.min(s.count, BLOCKS - s.block);
        const off = s.block * BLOCK;
        const len = count * BLOCK;
        const ticket =
          s.kind === "write"
            ? m.beginWrite(off, len, { fua: s.fua })
            : s.kind === "zero"
              ? m.beginWriteZeroes(off, len, { fua: s.fua })
              : m.beginTrim(off, len, { fua: s.fua });
        const data =
          s.kind === "write"
            ? m.payload(ticket)
            : s.kind === "trim" && trim === "unspecified"
              ? Buffer.alloc(len, trimFill)
              : Buffer.alloc(len);
        if (s.kind === "trim" && trim === "zero-or-unchanged" && trimFill < 0) {
          // an ignored trim lands what the cache holds when it is sent
          Buffer.concat(volatile.slice(s.block, s.block + count)).copy(data);
        }
        const blocks = Array.from({ length: count }, (_, i) => data.subarray(i * BLOCK, (i + 1) * BLOCK));
        requests.push({ ticket, blocks, landed: blocks.map(() => false) });
        break;
      }
      case "land": {
        const r = pick(requests, s.pick);
        if (r) landBlock(r, s.block % r.blocks.length);
        break;
      }
      case "landSector": {
        const r = pick(requests, s.pick);
        if (!r) break;
        const i = s.block % r.blocks.length;
        const b = r.ticket.offsetBytes / BLOCK + i;
        (r.blocks[i] as Buffer).copy(
          volatile[b] as Buffer,
          s.sector * TEAR,
          s.sector * TEAR,
          (s.sector + 1) * TEAR,
        );
        break;
      }
      case "reply": {
        const r = pick(requests, s.pick);
        if (!r) break;
        requests = requests.filter((x) => x !== r);
        if (!s.ok) {
          m.fail(r.ticket);
          break;
        }
        r.blocks.forEach((_, i) => {
          if (!r.landed[i]) landBlock(r, i);
          if (r.ticket.fua) writeback(r.ticket.offsetBytes / BLOCK + i);
        });
        m.complete(r.ticket);
        break;
      }
      case "writeback":
        writeback(s.block);
        break;
      case "flushStart":
        flushes.push(m.beginFlush());
        break;
      case "flushEnd": {
        const f = pick(flushes, s.pick);
        if (!f) break;
        flushes = flushes.filter((x) => x !== f);
        for (let b = 0; b < BLOCKS; b++) writeback(b);
        m.completeFlush(f);
        break;
      }
      case "readStart": {
        const count = Math.min(s.count, BLOCKS - s.block);
        reads.push({
          ticket: m.beginRead(s.block * BLOCK, count * BLOCK),
          blocks: new Array(count).fill(null),
        });
        break;
      }
      case "readSample": {
        const r = pick(reads, s.pick);
        if (!r) break;
        const i = s.block % r.blocks.length;
        r.blocks[i] ??= Buffer.from(volatile[r.ticket.offsetBytes / BLOCK + i] as Buffer);
        break;
      }
      case "readEnd": {
        const r = pick(reads, s.pick);
        if (!r) break;
        reads = reads.filter((x) => x !== r);
        const first = r.ticket.offsetBytes / BLOCK;
        const data = Buffer.concat(r.blocks.map((b, i) => b ?? (volatile[first + i] as Buffer)));
        for (const bad of m.checkRead(r.ticket, data)) errors.push(`read ${JSON.stringify(bad)}`);
        break;
      }
      case "crash": {
        m.crash();
        requests = [];
        flushes = [];
        reads = [];
        const all = Buffer.concat(durable);
        for (const bad of m.verifyAfterCrash(0, all)) errors.push(`crash ${JSON.stringify(bad)}`);
        for (let b = 0; b < BLOCKS; b++) (durable[b] as Buffer).copy(volatile[b] as Buffer);
        break;
      }
    }
  }
  return errors;
}

/**
 * load-nbd's connection 39: a READ samples a block, a FUA WRITE sent after it lands and is
 * acknowledged, then the READ's reply arrives with the old content.
 */
const READ_BEFORE_FUA_WRITE: Step[] = [
  { t: "readStart", block: 0, count: 2 },
  { t: "readSample", pick: 0, block: 1 },
  { t: "start", kind: "write", block: 1, count: 1, fua: true },
  { t: "reply", pick: 0, ok: true },
  { t: "readEnd", pick: 0 },
];

describe("DeviceModel against a reference disk with a volatile cache", () => {
  it("accepts every outcome the disk can legally produce (zeroing trims)", () => {
    fc.assert(
      fc.property(fc.array(stepArb, { maxLength: 120 }), (steps) => {
        expect(runSim("zero", steps, 0)).toEqual([]);
      }),
      { numRuns: 400, examples: [[READ_BEFORE_FUA_WRITE]] },
    );
  });

  it("accepts every outcome the disk can legally produce (trims that may be ignored)", () => {
    fc.assert(
      fc.property(fc.array(stepArb, { maxLength: 120 }), fc.boolean(), (steps, ignore) => {
        expect(runSim("zero-or-unchanged", steps, ignore ? -1 : 0)).toEqual([]);
      }),
      { numRuns: 200 },
    );
  });

  it("accepts every outcome the disk can legally produce (unspecified trims)", () => {
    fc.assert(
      fc.property(fc.array(stepArb, { maxLength: 120 }), fc.integer({ min: 1, max: 255 }), (steps, fill) => {
        expect(runSim("unspecified", steps, fill)).toEqual([]);
      }),
      { numRuns: 200 },
    );
  });

  it("detects any change to a block whose content is known exactly", () => {
    fc.assert(
      fc.property(
        fc.array(stepArb, { maxLength: 60 }),
        fc.nat(BLOCKS - 1),
        fc.nat(BLOCK - 1),
        (steps, block, byte) => {
          // a serial history (each request answered before the next), some of it concurrent
          const m = newModel();
          let overlapped: WriteTicket | null = null;
          for (const s of steps) {
            if (s.t !== "start" || s.kind === "trim") continue;
            const count = Math.min(s.count, BLOCKS - s.block);
            const t =
              s.kind === "write"
                ? m.beginWrite(s.block * BLOCK, count * BLOCK, { fua: s.fua })
                : m.beginWriteZeroes(s.block * BLOCK, count * BLOCK, { fua: s.fua });
            if (overlapped) m.complete(overlapped);
            overlapped = null;
            if (s.fua) m.complete(t);
            else overlapped = t;
          }
          if (overlapped) m.complete(overlapped);
          const contents: Buffer[] = Array.from({ length: BLOCKS }, () => Buffer.alloc(BLOCK));
          const f = m.beginFlush();
          m.completeFlush(f);
          m.crash();
          // the only legal content of each block: what some candidate holds; pick the first
          for (let b = 0; b < BLOCKS; b++) {
            const probe = m.clone();
            const cands = probe.candidates(b);
            for (const label of cands) {
              const g = /#(\d+)/.exec(label);
              const data = g && label.startsWith("write#") ? gen(m, Number(g[1]), b) : Buffer.alloc(BLOCK);
              if (probe.clone().verifyAfterCrash(b * BLOCK, data).length === 0) {
                contents[b] = data;
                break;
              }
            }
          }
          const good = Buffer.concat(contents);
          expect(m.clone().verifyAfterCrash(0, good)).toEqual([]);
          if (m.candidateCount(block) !== 1) return;
          const bad = Buffer.from(good);
          bad.writeUInt8(bad.readUInt8(block * BLOCK + byte) ^ 0x01, block * BLOCK + byte);
          const found = m.verifyAfterCrash(0, bad);
          expect(found.map((x) => x.offsetBytes)).toEqual([block * BLOCK]);
        },
      ),
      { numRuns: 300 },
    );
  });
});
