import {
  type BlockDevice,
  type Extent,
  KcopydClient,
  MemoryDevice,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";
import fc from "fast-check";
import { describe, expect, test } from "vitest";
import { type MirrorDevice, mirrorTarget } from "./index.js";

const REGION = 16 * 512;
const SIZE = 48 * REGION;

/**
 * A disk with a volatile write cache: a write is durable only after a flush (or with FUA);
 * `crash()` keeps a random subset of the cached writes, in any order, and hangs all later I/O.
 */
class VolatileDevice implements BlockDevice {
  readonly logicalBlockSize = 512;
  readonly readOnly = false;
  readonly disk: MemoryDevice;
  private readonly view: MemoryDevice;
  private pending: Array<{ offset: number; data: Buffer }> = [];
  private crashed = false;
  constructor(
    readonly name: string,
    readonly sizeBytes: number,
  ) {
    this.disk = new MemoryDevice(sizeBytes, { name });
    this.view = new MemoryDevice(sizeBytes, { name });
  }
  private async gate() {
    if (this.crashed) await new Promise(() => undefined);
  }
  async read(offset: number, length: number) {
    await this.gate();
    return this.view.read(offset, length);
  }
  async readInto(offset: number, target: Buffer) {
    await this.gate();
    return this.view.readInto(offset, target);
  }
  async write(offset: number, data: Buffer, options?: WriteOptions) {
    await this.gate();
    const copy = Buffer.from(data);
    await this.view.write(offset, copy);
    if (options?.fua) {
      // Older cached writes under this one reach the disk first, so they cannot land on top later.
      const keep: Array<{ offset: number; data: Buffer }> = [];
      for (const p of this.pending) {
        if (p.offset < offset + copy.length && offset < p.offset + p.data.length)
          await this.disk.write(p.offset, p.data);
        else keep.push(p);
      }
      this.pending = keep;
      await this.disk.write(offset, copy);
    } else {
      this.pending.push({ offset, data: copy });
    }
  }
  async writeZeroes(offset: number, length: number, options?: WriteZeroesOptions) {
    await this.write(offset, Buffer.alloc(length), options);
  }
  async discard(offset: number, length: number) {
    await this.write(offset, Buffer.alloc(length));
  }
  async flush() {
    await this.gate();
    // What this flush covers stays in `pending` until written, so a FUA write meanwhile writes the
    // older data under it first and this loop never lands it on top of the FUA data later.
    for (const p of [...this.pending]) {
      if (!this.pending.includes(p)) continue; // a FUA write over it wrote it already
      await this.disk.write(p.offset, p.data);
      const i = this.pending.indexOf(p);
      if (i >= 0) this.pending.splice(i, 1);
    }
  }
  async extents(offset: number, length: number): Promise<Extent[]> {
    await this.gate();
    return this.view.extents(offset, length);
  }
  async close() {}
  async crash(random: () => number) {
    this.crashed = true;
    const survivors = this.pending.filter(() => random() < 0.5);
    survivors.sort(() => random() - 0.5);
    for (const p of survivors) await this.disk.write(p.offset, p.data);
    this.pending = [];
  }
}

describe("the volatile device this test runs on", () => {
  test("a FUA write made while a flush writes out the cache stays on the disk", async () => {
    const dev = new VolatileDevice("disk", SIZE);
    for (let i = 1; i <= 64; i++) await dev.write(i * 512, Buffer.alloc(512, i)); // keeps the flush busy
    await dev.write(0, Buffer.alloc(512, 1)); // cached, under the FUA write below
    const flushing = dev.flush();
    await dev.write(0, Buffer.alloc(512, 2), { fua: true });
    await flushing;
    await dev.crash(() => 0);
    expect((await dev.disk.read(0, 512)).equals(Buffer.alloc(512, 2))).toBe(true);
  });
});

function rng(seed: number) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

async function open(devices: Record<string, BlockDevice>, line: string) {
  return (await mirrorTarget.create(line.split(" "), SIZE, {
    kcopyd: new KcopydClient(),
    openDevice: async (spec) => devices[spec]!,
  })) as MirrorDevice;
}

test("power loss with volatile caches: flushed and FUA writes survive, legs end identical", async () => {
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 1, max: 2 ** 31 - 1 }), async (seed) => {
      const random = rng(seed);
      const a = new VolatileDevice("a", SIZE);
      const b = new VolatileDevice("b", SIZE);
      const log = new VolatileDevice("log", 1 << 16);
      const m = await open({ a, b, log }, "disk 3 log 16 nosync 2 a 0 b 0");
      const sector = () => Math.floor(random() * (SIZE / 512 - 8));
      // Phase 1: writes, then a completed flush: all of it must survive.
      const model = Buffer.alloc(SIZE);
      for (let i = 0; i < 12; i++) {
        const off = sector() * 512;
        const data = Buffer.alloc(512 * (1 + Math.floor(random() * 8)), 1 + Math.floor(random() * 250));
        await m.write(off, data);
        data.copy(model, off);
      }
      // Either a flush (phase 1 must survive) or only the lazy clean pass (legs must still agree).
      const flushed = random() < 0.5;
      if (flushed) await m.flush();
      else await m.settle();
      // Phase 2: writes racing the crash, into the first half; FUA writes into the second half.
      const mustSurvive: Array<{ offset: number; data: Buffer }> = [];
      const racing: Promise<unknown>[] = [];
      const touched = new Uint8Array(SIZE / 512);
      for (let i = 0; i < 10; i++) {
        const half = random() < 0.5 ? 0 : 1;
        const off = (Math.floor(random() * (SIZE / 1024 - 4)) + (half * SIZE) / 1024) * 512;
        const data = Buffer.alloc(1024, 1 + Math.floor(random() * 250));
        if (half === 1) {
          // FUA writes never overlap anything else written in this phase.
          if (touched.subarray(off / 512, off / 512 + 2).some(Boolean)) continue;
          await m.write(off, data, { fua: true });
          mustSurvive.push({ offset: off, data });
        } else {
          racing.push(m.write(off, data).catch(() => undefined));
        }
        touched.fill(1, off / 512, off / 512 + 2);
        if (random() < 0.3) await new Promise((r) => setImmediate(r));
      }
      await new Promise((r) => setTimeout(r, Math.floor(random() * 3)));
      for (const d of [a, b, log]) await d.crash(random);
      // Restart on what reached the disks.
      const m2 = await open({ a: a.disk, b: b.disk, log: log.disk }, "disk 2 log 16 2 a 0 b 0");
      try {
        await m2.waitForSync();
        const left = await a.disk.read(0, SIZE);
        expect(left.equals(await b.disk.read(0, SIZE))).toBe(true);
        for (let s = 0; s < SIZE / 512; s++) {
          if (touched[s] || !flushed) continue;
          expect(left.subarray(s * 512, s * 512 + 512).equals(model.subarray(s * 512, s * 512 + 512))).toBe(
            true,
          );
        }
        for (const w of mustSurvive) {
          expect(left.subarray(w.offset, w.offset + w.data.length).equals(w.data)).toBe(true);
        }
      } finally {
        await m2.close();
      }
    }),
    { numRuns: 40 },
  );
});
