import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type BlockDevice, SECTOR_SIZE } from "./block-device.js";
import { ErrorDevice } from "./error-device.js";
import { FileDevice } from "./file-device.js";
import { FlakeyDevice } from "./flakey-device.js";
import {
  DEFAULT_SUB_JOB_SECTORS,
  KcopydClient,
  KcopydFlags,
  KcopydUsageError,
  type Region,
  SPLIT_COUNT,
} from "./kcopyd.js";
import { LinearDevice } from "./linear-device.js";
import { MemoryDevice } from "./memory-device.js";
import { KcopydThrottle } from "./throttle.js";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "udm-kcopyd-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

async function memWithRandom(bytes: number): Promise<{ dev: MemoryDevice; data: Buffer }> {
  const dev = new MemoryDevice(bytes);
  const data = randomBytes(bytes);
  await dev.write(0, data);
  return { dev, data };
}

const whole = (dev: BlockDevice, sector = 0, count = dev.sizeBytes / SECTOR_SIZE - sector): Region => ({
  dev,
  sector,
  count,
});

/** Wraps a device, logging every read/write/zero (op, offset, length) in call order. */
class RecordingDevice extends LinearDevice {
  readonly ops: Array<{ op: string; offset: number; length: number }> = [];
  constructor(inner: BlockDevice) {
    super(inner, 0, inner.sizeBytes, { name: `rec(${inner.name})` });
  }
  override readInto(offset: number, target: Buffer) {
    this.ops.push({ op: "read", offset, length: target.length });
    return super.readInto(offset, target);
  }
  override write(offset: number, data: Buffer) {
    this.ops.push({ op: "write", offset, length: data.length });
    return super.write(offset, data);
  }
  override writeZeroes(offset: number, length: number) {
    this.ops.push({ op: "zero", offset, length });
    return super.writeZeroes(offset, length);
  }
}

describe("KcopydClient copies", () => {
  it.each([1, 2, 3, 8])("copies one source to %i file destinations byte for byte", async (n) => {
    const size = 3 * 1024 * 1024 + 7 * SECTOR_SIZE; // not a multiple of the sub-job size
    const data = randomBytes(size);
    const srcPath = join(dir, `src-${n}.img`);
    await writeFile(srcPath, data);
    const src = await FileDevice.open(srcPath);
    const dests = await Promise.all(
      Array.from({ length: n }, (_, i) =>
        FileDevice.open(join(dir, `dst-${n}-${i}.img`), { createSizeBytes: size }),
      ),
    );
    const kc = new KcopydClient({ pages: 64 });
    const result = await kc.copyAsync(
      whole(src),
      dests.map((d) => whole(d)),
    );
    expect(result).toEqual({ readErr: false, writeErr: 0 });
    for (const d of dests) expect(sha(await d.read(0, size))).toBe(sha(data));
    await kc.destroy();
    await Promise.all([src, ...dests].map((d) => d.close()));
  });

  it("copies odd sector offsets between different positions", async () => {
    const { dev: src, data } = await memWithRandom(1 << 20);
    const dst = new MemoryDevice(2 << 20);
    const kc = new KcopydClient();
    const r = await kc.copyAsync({ dev: src, sector: 3, count: 1001 }, [
      { dev: dst, sector: 2047, count: 1001 },
    ]);
    expect(r).toEqual({ readErr: false, writeErr: 0 });
    const got = await dst.read(2047 * SECTOR_SIZE, 1001 * SECTOR_SIZE);
    expect(got.equals(data.subarray(3 * SECTOR_SIZE, 1004 * SECTOR_SIZE))).toBe(true);
    // Nothing written outside the destination region.
    expect((await dst.read(0, 2047 * SECTOR_SIZE)).every((b) => b === 0)).toBe(true);
    await kc.destroy();
  });

  it("never holds more pages than its budget, even for jobs far larger than it", async () => {
    const { dev: src, data } = await memWithRandom(16 << 20);
    const dsts = [new MemoryDevice(16 << 20), new MemoryDevice(16 << 20)];
    const kc = new KcopydClient({ pages: 16 }); // 64 KiB budget for a 16 MiB job
    expect(kc.subJobSectors).toBe(128);
    const jobs = [0, 1].map((i) => kc.copyAsync(whole(src), [whole(dsts[i]!)]));
    expect(await Promise.all(jobs)).toEqual([
      { readErr: false, writeErr: 0 },
      { readErr: false, writeErr: 0 },
    ]);
    expect(kc.pool.peakPages).toBeLessThanOrEqual(16);
    expect(kc.pool.availablePages).toBe(16);
    for (const d of dsts) expect((await d.read(0, 16 << 20)).equals(data)).toBe(true);
    await kc.destroy();
  });

  it("runs many concurrent jobs on one client to completion", async () => {
    const { dev: src, data } = await memWithRandom(4 << 20);
    const dst = new MemoryDevice(4 << 20);
    const kc = new KcopydClient({ pages: 32 });
    const pieces = 64;
    const sectorsEach = (4 << 20) / SECTOR_SIZE / pieces;
    const results = await Promise.all(
      Array.from({ length: pieces }, (_, i) =>
        kc.copyAsync({ dev: src, sector: i * sectorsEach, count: sectorsEach }, [
          { dev: dst, sector: i * sectorsEach, count: sectorsEach },
        ]),
      ),
    );
    expect(results.every((r) => !r.readErr && r.writeErr === 0)).toBe(true);
    expect((await dst.read(0, 4 << 20)).equals(data)).toBe(true);
    await kc.destroy();
  });

  it("keeps at most SPLIT_COUNT sub-jobs of one job in flight", async () => {
    const { dev } = await memWithRandom(32 << 20);
    let inFlight = 0;
    let peak = 0;
    const slow = new (class extends LinearDevice {
      override async readInto(offset: number, target: Buffer) {
        inFlight++;
        peak = Math.max(peak, inFlight);
        await new Promise((r) => setTimeout(r, 2));
        await super.readInto(offset, target);
        inFlight--;
      }
    })(dev, 0, dev.sizeBytes);
    const kc = new KcopydClient({ pages: 4096 });
    await kc.copyAsync(whole(slow), [whole(new MemoryDevice(32 << 20))]);
    expect(peak).toBe(SPLIT_COUNT);
    await kc.destroy();
  });

  it("splits into sub-jobs of the configured size", async () => {
    const { dev } = await memWithRandom(1 << 20);
    const rec = new RecordingDevice(dev);
    const kc = new KcopydClient({ subJobSectors: 256 });
    await kc.copyAsync(whole(rec), [whole(new MemoryDevice(1 << 20))]);
    expect(rec.ops.map((o) => o.length)).toEqual(Array(8).fill(256 * SECTOR_SIZE));
    const kcDefault = new KcopydClient({ pages: 1024 });
    expect(kcDefault.subJobSectors).toBe(DEFAULT_SUB_JOB_SECTORS);
    await Promise.all([kc.destroy(), kcDefault.destroy()]);
  });

  it("zeroes destinations without reading or allocating pages", async () => {
    const { dev: a } = await memWithRandom(2 << 20);
    const { dev: b } = await memWithRandom(2 << 20);
    const rec = new RecordingDevice(b);
    const kc = new KcopydClient({ pages: 1 });
    const r = await kc.zeroAsync([
      { dev: a, sector: 8, count: 3000 },
      { dev: rec, sector: 8, count: 3000 },
    ]);
    expect(r).toEqual({ readErr: false, writeErr: 0 });
    for (const d of [a, b]) {
      expect((await d.read(8 * SECTOR_SIZE, 3000 * SECTOR_SIZE)).every((x) => x === 0)).toBe(true);
      expect((await d.read(0, 8 * SECTOR_SIZE)).some((x) => x !== 0)).toBe(true);
    }
    expect(rec.ops.every((o) => o.op === "zero")).toBe(true);
    expect(kc.pool.peakPages).toBe(0);
    await kc.destroy();
  });

  it("completes a zero-length job without I/O", async () => {
    const kc = new KcopydClient();
    const dev = new RecordingDevice(new MemoryDevice(4096));
    expect(await kc.copyAsync({ dev, sector: 0, count: 0 }, [{ dev, sector: 1, count: 0 }])).toEqual({
      readErr: false,
      writeErr: 0,
    });
    expect(dev.ops).toEqual([]);
    await kc.destroy();
  });
});

describe("KcopydClient errors", () => {
  it("reports a failing destination in its bit and still completes healthy ones with IGNORE_ERROR", async () => {
    const size = 2 << 20;
    const { dev: src, data } = await memWithRandom(size);
    const a = new MemoryDevice(size);
    const bad = new ErrorDevice(size);
    const c = new MemoryDevice(size);
    const kc = new KcopydClient();
    const r = await kc.copyAsync(whole(src), [whole(a), whole(bad), whole(c)], KcopydFlags.IGNORE_ERROR);
    expect(r).toEqual({ readErr: false, writeErr: 0b010 });
    expect((await a.read(0, size)).equals(data)).toBe(true);
    expect((await c.read(0, size)).equals(data)).toBe(true);
    await kc.destroy();
  });

  it("stops handing out sub-jobs after the first error without IGNORE_ERROR", async () => {
    const size = 64 << 20; // 128 sub-jobs
    const { dev: src } = await memWithRandom(size);
    const good = new RecordingDevice(new MemoryDevice(size));
    const kc = new KcopydClient({ pages: 4096 });
    const r = await kc.copyAsync(whole(src), [whole(good), whole(new ErrorDevice(size))]);
    expect(r).toEqual({ readErr: false, writeErr: 0b10 });
    // Only the sub-jobs already in flight when the error came were written.
    expect(good.ops.length).toBeGreaterThan(0);
    expect(good.ops.length).toBeLessThanOrEqual(2 * SPLIT_COUNT);
    await kc.destroy();
  });

  it("reports a read error and writes nothing for that slice without IGNORE_ERROR", async () => {
    const size = 1 << 20;
    const src = new FlakeyDevice(new MemoryDevice(size), {
      upIntervalSeconds: 1,
      downIntervalSeconds: 1,
      errorReads: true,
    });
    src.setMode("down");
    const dst = new RecordingDevice(new MemoryDevice(size));
    const kc = new KcopydClient();
    expect(await kc.copyAsync(whole(src), [whole(dst)])).toEqual({ readErr: true, writeErr: 0 });
    expect(dst.ops).toEqual([]);
    await kc.destroy();
  });

  it("writes zeros where reads failed with IGNORE_ERROR, like dm-io", async () => {
    const size = 1 << 20;
    const { dev: inner } = await memWithRandom(size);
    const src = new FlakeyDevice(inner, { upIntervalSeconds: 1, downIntervalSeconds: 1, errorReads: true });
    const { dev: dst } = await memWithRandom(size);
    const kc = new KcopydClient();
    // A first copy leaves random bytes in the client's reused buffers.
    await kc.copyAsync(whole(inner), [whole(new MemoryDevice(size))]);
    src.setMode("down");
    expect(await kc.copyAsync(whole(src), [whole(dst)], KcopydFlags.IGNORE_ERROR)).toEqual({
      readErr: true,
      writeErr: 0,
    });
    expect((await dst.read(0, size)).every((b) => b === 0)).toBe(true);
    await kc.destroy();
  });

  it("a destination that drops writes reports success (dm-flakey drop_writes)", async () => {
    const size = 1 << 20;
    const { dev: src } = await memWithRandom(size);
    const dst = new FlakeyDevice(new MemoryDevice(size), {
      upIntervalSeconds: 0,
      downIntervalSeconds: 1,
      dropWrites: true,
    });
    const kc = new KcopydClient();
    expect(await kc.copyAsync(whole(src), [whole(dst)])).toEqual({ readErr: false, writeErr: 0 });
    expect((await dst.read(0, size)).every((b) => b === 0)).toBe(true);
    await kc.destroy();
  });

  it("rejects bad jobs synchronously with a usage error", () => {
    const kc = new KcopydClient();
    const d = new MemoryDevice(1 << 20);
    expect(() => kc.copy(whole(d), [], 0, () => {}, null)).toThrow(KcopydUsageError);
    const nine = Array.from({ length: 9 }, () => whole(d));
    expect(() => kc.copy(whole(d), nine, 0, () => {}, null)).toThrow(/1 to 8 destinations/);
    expect(() => kc.copy(whole(d), [{ dev: d, sector: 1, count: 2048 }], 0, () => {}, null)).toThrow(
      /ends past the device/,
    );
    expect(() => kc.copy(whole(d), [{ dev: d, sector: 0, count: 8 }], 0, () => {}, null)).toThrow(
      /the job copies 2048/,
    );
  });
});

describe("KcopydClient ordering and lifecycle", () => {
  it("WRITE_SEQ issues sub-job writes in ascending order even when reads finish out of order", async () => {
    const size = 8 << 20;
    const { dev } = await memWithRandom(size);
    let n = 0;
    const jittery = new (class extends LinearDevice {
      override async readInto(offset: number, target: Buffer) {
        // Later slices finish their reads first.
        await new Promise((r) => setTimeout(r, 8 - (n++ % 8)));
        await super.readInto(offset, target);
      }
    })(dev, 0, size);
    const dst = new RecordingDevice(new MemoryDevice(size));
    const kc = new KcopydClient({ pages: 4096, subJobSectors: 256 });
    const r = await kc.copyAsync(whole(jittery), [whole(dst)], KcopydFlags.WRITE_SEQ);
    expect(r).toEqual({ readErr: false, writeErr: 0 });
    const offsets = dst.ops.map((o) => o.offset);
    expect(offsets).toEqual([...offsets].sort((a, b) => a - b));
    expect(offsets.length).toBe(size / (256 * SECTOR_SIZE));
    await kc.destroy();
  });

  it("WRITE_SEQ turns IGNORE_ERROR off and writes nothing past a failed slice", async () => {
    const size = 4 << 20;
    const { dev: src } = await memWithRandom(size);
    const inner = new MemoryDevice(size);
    let writes = 0;
    const failThird = new (class extends LinearDevice {
      override async write(offset: number, data: Buffer) {
        if (writes++ === 2) throw new Error("injected");
        await super.write(offset, data);
      }
    })(inner, 0, size);
    const rec = new RecordingDevice(failThird);
    const srcRec = new RecordingDevice(src);
    const kc = new KcopydClient({ pages: 4096, subJobSectors: 128 });
    const r = await kc.copyAsync(
      whole(srcRec),
      [whole(rec)],
      KcopydFlags.WRITE_SEQ | KcopydFlags.IGNORE_ERROR,
    );
    expect(r).toEqual({ readErr: false, writeErr: 1 });
    expect(rec.ops.map((o) => o.offset)).toEqual([0, 1, 2].map((i) => i * 128 * SECTOR_SIZE));
    // IGNORE_ERROR was turned off: the job stopped instead of reading all 64 slices.
    expect(srcRec.ops.length).toBeLessThanOrEqual(3 + 2 * SPLIT_COUNT);
    await kc.destroy();
  });

  it("never calls back from inside copy()", async () => {
    const kc = new KcopydClient();
    const d = new MemoryDevice(4096);
    let inside = true;
    let calledInside = false;
    const done = new Promise<void>((resolve) =>
      kc.copy(
        { dev: d, sector: 0, count: 0 },
        [{ dev: d, sector: 0, count: 0 }],
        0,
        () => {
          calledInside = inside;
          resolve();
        },
        null,
      ),
    );
    inside = false;
    await done;
    expect(calledInside).toBe(false);
    await kc.destroy();
  });

  it("passes the context through to notify", async () => {
    const kc = new KcopydClient();
    const d = new MemoryDevice(8192);
    const ctx = { region: 7 };
    const got = await new Promise<unknown>((resolve) =>
      kc.copy(whole(d, 0, 8), [whole(d, 8, 8)], 0, (_r, _w, c) => resolve(c), ctx),
    );
    expect(got).toBe(ctx);
    await kc.destroy();
  });

  it("destroy() waits for every job and then refuses new ones", async () => {
    const { dev: src } = await memWithRandom(8 << 20);
    const dst = new MemoryDevice(8 << 20);
    const kc = new KcopydClient({ pages: 32 });
    const finished: number[] = [];
    for (let i = 0; i < 4; i++) kc.copy(whole(src), [whole(dst)], 0, () => finished.push(i), null);
    expect(kc.jobsInFlight).toBe(4);
    await kc.destroy();
    expect(finished.sort()).toEqual([0, 1, 2, 3]);
    expect(kc.jobsInFlight).toBe(0);
    expect(() => kc.copy(whole(src), [whole(dst)], 0, () => {}, null)).toThrow(/destroyed/);
  });

  it("emits progress up to the job size", async () => {
    const { dev: src } = await memWithRandom(4 << 20);
    const kc = new KcopydClient();
    const seen: number[] = [];
    kc.on("progress", (p) => {
      expect(p.totalSectors).toBe(8192);
      seen.push(p.doneSectors);
    });
    await kc.copyAsync(whole(src), [whole(new MemoryDevice(4 << 20))]);
    expect(seen.at(-1)).toBe(8192);
    expect(seen).toEqual([...seen].sort((a, b) => a - b));
    await kc.destroy();
  });

  it("completes under a busy-share throttle and a byte-rate cap", async () => {
    const { dev: src, data } = await memWithRandom(1 << 20);
    const dst = new MemoryDevice(1 << 20);
    const kc = new KcopydClient({ throttle: new KcopydThrottle(50), bytesPerSecond: 64 << 20 });
    expect(await kc.copyAsync(whole(src), [whole(dst)])).toEqual({ readErr: false, writeErr: 0 });
    expect((await dst.read(0, 1 << 20)).equals(data)).toBe(true);
    await kc.destroy();
  });
});

describe("KcopydClient SKIP_HOLES", () => {
  it("turns source holes into write-zeroes and copies only data", async () => {
    const size = 64 << 20;
    const src = new MemoryDevice(size);
    const blob = randomBytes(100_000);
    await src.write(10 << 20, blob);
    await src.write(size - 4096, blob.subarray(0, 4096));
    const { dev: dstInner } = await memWithRandom(size); // stale content must be zeroed
    const dst = new RecordingDevice(dstInner);
    const rec = new RecordingDevice(src);
    const kc = new KcopydClient();
    expect(await kc.copyAsync(whole(rec), [whole(dst)], KcopydFlags.SKIP_HOLES)).toEqual({
      readErr: false,
      writeErr: 0,
    });
    expect((await dst.read(0, size)).equals(await src.read(0, size))).toBe(true);
    const readBytes = rec.ops.filter((o) => o.op === "read").reduce((s, o) => s + o.length, 0);
    expect(readBytes).toBeLessThanOrEqual(256 * 1024);
    expect(dst.ops.filter((o) => o.op === "zero").length).toBeGreaterThan(0);
    // Holes stay holes on a sparse destination.
    const ext = await dstInner.extents(0, size);
    expect(ext.filter((e) => e.kind === "data").reduce((s, e) => s + e.lengthBytes, 0)).toBeLessThan(
      512 * 1024,
    );
    await kc.destroy();
  });

  it("copies a 1 TiB sparse device with little data by its data alone", async () => {
    const size = 2 ** 40;
    const src = new MemoryDevice(size);
    const dst = new MemoryDevice(size);
    for (let i = 0; i < 10; i++) await src.write(i * 100 * 2 ** 30 + 12345 * 512, randomBytes(70_000));
    const kc = new KcopydClient();
    expect(await kc.copyAsync(whole(src), [whole(dst)], KcopydFlags.SKIP_HOLES)).toEqual({
      readErr: false,
      writeErr: 0,
    });
    expect(await dst.extents(0, size)).toEqual(await src.extents(0, size));
    for (let i = 0; i < 10; i++) {
      const at = i * 100 * 2 ** 30 + 12345 * 512;
      expect((await dst.read(at, 70_000)).equals(await src.read(at, 70_000))).toBe(true);
    }
    await kc.destroy();
  });
});

describe("KcopydClient against a model", () => {
  it("any mix of concurrent copies and zeroes between disjoint ranges matches a byte-array model", async () => {
    const SECTORS = 256;
    const op = fc.record({
      zero: fc.boolean(),
      srcSector: fc.nat(SECTORS - 1),
      count: fc.integer({ min: 0, max: 64 }),
      dests: fc.uniqueArray(fc.nat(3), { minLength: 1, maxLength: 4 }),
      destSector: fc.nat(SECTORS - 1),
      skipHoles: fc.boolean(),
    });
    await fc.assert(
      fc.asyncProperty(
        fc.array(op, { minLength: 1, maxLength: 6 }),
        fc.integer({ min: 1, max: 8 }),
        async (ops, pages) => {
          const src = new MemoryDevice(SECTORS * SECTOR_SIZE);
          const srcData = randomBytes(SECTORS * SECTOR_SIZE);
          // A source with holes: zero every other 64 KiB chunk.
          await src.write(0, srcData);
          await src.writeZeroes(0, 64 * 1024);
          srcData.fill(0, 0, 64 * 1024);
          const devs = Array.from({ length: 4 }, () => new MemoryDevice(SECTORS * SECTOR_SIZE));
          const model = devs.map(() => Buffer.alloc(SECTORS * SECTOR_SIZE));
          const kc = new KcopydClient({ pages, subJobSectors: 16 });
          // Jobs run one after another here: concurrent jobs to overlapping ranges have no defined order.
          for (const o of ops) {
            const count = Math.min(o.count, SECTORS - o.srcSector, SECTORS - o.destSector);
            const dests = o.dests.map((i) => ({ dev: devs[i]!, sector: o.destSector, count }));
            const r = o.zero
              ? await kc.zeroAsync(dests)
              : await kc.copyAsync(
                  { dev: src, sector: o.srcSector, count },
                  dests,
                  o.skipHoles ? KcopydFlags.SKIP_HOLES : 0,
                );
            expect(r).toEqual({ readErr: false, writeErr: 0 });
            for (const i of o.dests) {
              const target = model[i]!;
              if (o.zero) target.fill(0, o.destSector * SECTOR_SIZE, (o.destSector + count) * SECTOR_SIZE);
              else
                srcData.copy(
                  target,
                  o.destSector * SECTOR_SIZE,
                  o.srcSector * SECTOR_SIZE,
                  (o.srcSector + count) * SECTOR_SIZE,
                );
            }
          }
          await kc.destroy();
          for (let i = 0; i < 4; i++)
            expect((await devs[i]!.read(0, SECTORS * SECTOR_SIZE)).equals(model[i]!)).toBe(true);
        },
      ),
      { numRuns: 60 },
    );
  });
});
