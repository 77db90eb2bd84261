/**
 * Issue 12's repros: ways the mirror returned stale data or lost an acknowledged, flushed write.
 * Each fails on the commit before the fix (9e16c77).
 */
import {
  type BlockDevice,
  type Extent,
  FlakeyDevice,
  IoError,
  KcopydClient,
  MemoryDevice,
  type TargetContext,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";
import { afterEach, describe, expect, test } from "vitest";
import { type MirrorDevice, mirrorTarget } from "./index.js";

const REGION = 64 * 1024; // 128-sector regions
const SIZE = 64 * REGION;
const fill = (byte: number, length = 4096) => Buffer.alloc(length, byte);

/**
 * A disk with a volatile write cache: writes are visible at once but durable only after a flush;
 * `crash()` loses what was not flushed, a failing flush loses the cache too. `holdWrites` parks
 * writes until released, `failFlush` makes flushes fail, `dead` fails everything (a crashed host).
 */
class VolatileDisk implements BlockDevice {
  readonly readOnly = false;
  readonly logicalBlockSize = 512;
  readonly live: MemoryDevice;
  private durable: Buffer;
  failFlush = false;
  dead = false;
  holdWrites: Promise<void> | null = null;
  /** Per flush reading its snapshot: the FUA writes made durable meanwhile. */
  private readonly flushesInFlight = new Set<Array<(b: Buffer) => void>>();
  constructor(
    readonly name: string,
    readonly sizeBytes: number,
  ) {
    this.live = new MemoryDevice(sizeBytes, { name });
    this.durable = Buffer.alloc(sizeBytes);
  }
  private check() {
    if (this.dead) throw new IoError("EIO", this.name, "host is gone");
  }
  async crash() {
    await this.live.write(0, Buffer.from(this.durable));
  }
  async read(o: number, n: number) {
    this.check();
    return this.live.read(o, n);
  }
  async readInto(o: number, b: Buffer) {
    this.check();
    return this.live.readInto(o, b);
  }
  async write(o: number, d: Buffer, opts?: WriteOptions) {
    this.check();
    if (this.holdWrites) await this.holdWrites;
    // FUA: durable first, so a cache loss racing this write never leaves it only in `durable`.
    if (opts?.fua) this.makeDurable((b) => d.copy(b, o));
    await this.live.write(o, d);
  }
  async writeZeroes(o: number, n: number, opts?: WriteZeroesOptions) {
    this.check();
    if (this.holdWrites) await this.holdWrites;
    if (opts?.fua) this.makeDurable((b) => b.fill(0, o, o + n));
    await this.live.writeZeroes(o, n);
  }
  /** A FUA write: durable now, and in the snapshot of every flush in flight (taken before it). */
  private makeDurable(apply: (b: Buffer) => void) {
    apply(this.durable);
    for (const pending of this.flushesInFlight) pending.push(apply);
  }
  async discard(o: number, n: number) {
    return this.writeZeroes(o, n);
  }
  async flush() {
    this.check();
    if (this.failFlush) {
      await this.crash();
      throw new IoError("EIO", this.name, "flush failed");
    }
    // The snapshot is taken when the flush is issued; a FUA write completing while it is read
    // must not be undone when the snapshot replaces `durable`.
    const fuaSince: Array<(b: Buffer) => void> = [];
    this.flushesInFlight.add(fuaSince);
    let snapshot: Buffer;
    try {
      snapshot = await this.live.read(0, this.sizeBytes);
    } finally {
      this.flushesInFlight.delete(fuaSince);
    }
    for (const apply of fuaSince) apply(snapshot);
    this.durable = snapshot;
  }
  extents(o: number, n: number): Promise<Extent[]> {
    this.check();
    return this.live.extents(o, n);
  }
  async close() {}
}

/** Passes through to `inner` until `dead` (the process holding it was killed). */
class Crashable implements BlockDevice {
  dead = false;
  readonly readOnly = false;
  constructor(readonly inner: BlockDevice) {}
  get name() {
    return this.inner.name;
  }
  get sizeBytes() {
    return this.inner.sizeBytes;
  }
  get logicalBlockSize() {
    return this.inner.logicalBlockSize;
  }
  private check() {
    if (this.dead) throw new IoError("EIO", this.name, "process killed");
  }
  async read(o: number, n: number) {
    this.check();
    return this.inner.read(o, n);
  }
  async readInto(o: number, b: Buffer) {
    this.check();
    return this.inner.readInto(o, b);
  }
  async write(o: number, d: Buffer, opts?: WriteOptions) {
    this.check();
    return this.inner.write(o, d, opts);
  }
  async writeZeroes(o: number, n: number, opts?: WriteZeroesOptions) {
    this.check();
    return this.inner.writeZeroes(o, n, opts);
  }
  async discard(o: number, n: number, opts?: WriteOptions) {
    this.check();
    return this.inner.discard(o, n, opts);
  }
  async flush() {
    this.check();
    return this.inner.flush();
  }
  extents(o: number, n: number) {
    this.check();
    return this.inner.extents(o, n);
  }
  async close() {}
}

let opened: MirrorDevice[] = [];
afterEach(async () => {
  for (const m of opened) await m.close().catch(() => undefined);
  opened = [];
});

function context(devices: Record<string, BlockDevice>, extra: Partial<TargetContext> = {}): TargetContext {
  return {
    kcopyd: new KcopydClient(),
    openDevice: async (spec) => {
      const d = devices[spec];
      if (!d) throw new RangeError(`no device ${spec}`);
      return d;
    },
    ...extra,
  };
}

async function mirror(
  line: string,
  devices: Record<string, BlockDevice>,
  extra: Partial<TargetContext> = {},
) {
  const m = (await mirrorTarget.create(line.split(" "), SIZE, context(devices, extra))) as MirrorDevice;
  opened.push(m);
  return m;
}

const flakey = (disk: BlockDevice, name: string) => {
  const leg = new FlakeyDevice(disk, {
    upIntervalSeconds: 1,
    downIntervalSeconds: 0,
    errorWrites: true,
    name,
  });
  leg.setMode("up");
  return leg;
};

describe("the volatile disk these repros run on", () => {
  // The model test's seed 1182: a flush issued before a FUA write and completing after it put
  // its older snapshot in place, so a crash lost the acknowledged FUA write.
  test("a FUA write completing while a flush reads its snapshot stays durable", async () => {
    const disk = new VolatileDisk("disk", SIZE);
    await disk.write(0, fill(1, 512));
    const flushing = disk.flush();
    await disk.write(0, fill(2, 512), { fua: true });
    await flushing;
    await disk.crash();
    expect((await disk.read(0, 512)).equals(fill(2, 512))).toBe(true);
  });
});

describe("issue 12 defect 2: nosync is for the first activation only", () => {
  test("reloading a mirror with its own table line keeps the leg that missed a write stale", async () => {
    const a = new MemoryDevice(SIZE, { name: "a" });
    const bDisk = new MemoryDevice(SIZE, { name: "bdisk" });
    const b = flakey(bDisk, "b");
    const m1 = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await m1.suspend(); // no resync: b stays stale where it missed the write
    b.setMode("down");
    await m1.write(2 * REGION, fill(7, REGION));
    b.setMode("up");
    expect(m1.status()).toBe("2 a b 63/64 1 AD 1 core");
    const line = m1.table();
    const m2 = await mirror(line, { a, b }, { previous: m1 });
    await m2.preresume();
    // The new table still knows b lacks region 2: not in sync, and resynced from a.
    expect(m2.status()).toBe("2 a b 63/64 1 AA 1 core");
    expect(line).toBe("core 1 128 2 a 0 b 0");
    await m2.waitForSync();
    expect((await bDisk.read(2 * REGION, REGION)).equals(fill(7, REGION))).toBe(true);
  });
});

describe("issue 12 defect 3: flush accounting by generation", () => {
  test("a write still in flight on a leg during flush #1 is lost if flush #2 fails there: the leg is stale, the write survives", async () => {
    const a = new VolatileDisk("a", SIZE);
    const b = new VolatileDisk("b", SIZE);
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await m.suspend(); // no background resync or cleaning in the way
    let release: () => void = () => undefined;
    b.holdWrites = new Promise<void>((resolve) => {
      release = resolve;
    });
    const w = m.write(4 * REGION, fill(0x77));
    await new Promise((r) => setImmediate(r));
    b.holdWrites = null;
    await m.flush(); // flush #1: issued while W's leg-b write is in flight, so it does not cover it
    release();
    await w; // W acknowledged
    b.failFlush = true;
    await m.flush(); // flush #2 fails on b (b loses its cache, W with it); a holds W durably
    b.failFlush = false;
    expect(m.status()).toBe("2 a b 63/64 1 AD 1 core");
    expect((await b.live.read(4 * REGION, 4096)).equals(fill(0))).toBe(true);
    // Reads never come from b there; once resynced, b has W again.
    await a.crash();
    expect((await m.read(4 * REGION, 4096)).equals(fill(0x77))).toBe(true);
    await m.resume();
    await m.waitForSync();
    expect((await b.live.read(4 * REGION, 4096)).equals(fill(0x77))).toBe(true);
  });
});

describe("a reload hands over what each leg has not flushed yet", () => {
  // The model test's seed 5203: a reload started the new table with empty flush windows. A leg
  // whose flush failed in the old table while it held a region's only current copy (so it could
  // not be made stale there) carried that unflushed write into the new table; when it lost its
  // cache there, the new table noticed nothing, and a retried user flush succeeded over a write
  // that no leg held any more.
  test("the only current leg loses its cache after the reload: the retried flush fails instead of vouching for the lost write", async () => {
    const aDisk = new VolatileDisk("adisk", SIZE);
    const bDisk = new VolatileDisk("bdisk", SIZE);
    const a = flakey(aDisk, "a");
    const b = flakey(bDisk, "b");
    const m1 = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    b.setMode("down");
    await m1.write(4 * REGION, fill(0x5a)); // reaches a only: b is stale in region 4
    b.setMode("up");
    a.setMode("down");
    await expect(m1.flush()).rejects.toThrow(/no leg holds a durable current copy/);
    await m1.suspend(); // the old table is suspended with a's write in region 4 unflushed
    a.setMode("up");
    aDisk.failFlush = true; // a's next flush fails and loses its cache, the write with it
    const m2 = await mirror(m1.table(), { a, b }, { previous: m1 });
    await m2.preresume();
    await m2.waitForSync().catch(() => undefined);
    aDisk.failFlush = false;
    expect((await aDisk.live.read(4 * REGION, 4096)).equals(fill(0))).toBe(true);
    // The client retries its flush: it may succeed only if the write can still be read back.
    const retried = await m2.flush().then(
      () => "ok",
      (err: Error) => err.message,
    );
    const back = await m2.read(4 * REGION, 4096);
    if (retried === "ok")
      expect(back.equals(fill(0x5a)), "a successful flush vouches for the write").toBe(true);
    else expect(retried).toMatch(/no leg holds a durable current copy of region\(s\) 4/);
  });
});

describe("a leg promoted over one that lost its cache, losing its own copy", () => {
  // The model test's seed 5651: the only current leg a and a leg b holding an unflushed resync
  // copy both failed one flush. a's failure promoted b (it had the copy and every write since);
  // b's failure then lost the copy, and b, now the only current leg, could not be made stale: its
  // old bytes were served, and a FUA write that a held durably was gone.
  test("the leg that was replaced is current again: an acknowledged FUA write survives both flush failures", async () => {
    const aDisk = new VolatileDisk("adisk", SIZE);
    const bDisk = new VolatileDisk("bdisk", SIZE);
    const b = flakey(bDisk, "b");
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a: aDisk, b });
    await m.suspend(); // the resync waits until both flushes are armed
    b.setMode("down");
    await m.write(4 * REGION, fill(0x11)); // reaches a only: b is stale in region 4
    b.setMode("up");
    await m.write(4 * REGION, fill(0x5a), { fua: true }); // a only, durable there when acknowledged
    const failOnce = (disk: VolatileDisk) => {
      const flush = disk.flush.bind(disk);
      disk.failFlush = true;
      disk.flush = async () => {
        try {
          await flush();
        } finally {
          disk.failFlush = false;
          disk.flush = flush;
        }
      };
    };
    failOnce(aDisk);
    failOnce(bDisk);
    // The resync copies region 4 to b; the flush after it fails on both legs, both lose their caches.
    await m.resume();
    while (aDisk.failFlush || bDisk.failFlush) await new Promise((r) => setTimeout(r, 5));
    await m.suspend(); // the resync pass is over
    expect((await bDisk.live.read(4 * REGION, 4096)).equals(fill(0)), "b lost the copy").toBe(true);
    expect((await m.read(4 * REGION, 4096)).equals(fill(0x5a))).toBe(true);
    expect(m.status()).toMatch(/^2 adisk b 63\/64 1 F. 1 core$/);
  });
});

describe("issue 12 defect 4: a flush that leaves no durable current copy fails", () => {
  test("the only current leg's flush fails: flush() is EIO and that leg is D, not F", async () => {
    const a = new VolatileDisk("a", SIZE);
    const b = flakey(new MemoryDevice(SIZE, { name: "bdisk" }), "b");
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await m.suspend();
    b.setMode("down");
    await m.write(3 * REGION, fill(3)); // only a is current in region 3 now
    b.setMode("up");
    a.failFlush = true;
    await expect(m.flush()).rejects.toThrow(/no leg holds a durable current copy of region\(s\) 3/);
    expect(m.status()).toBe("2 a b 63/64 1 DD 1 core");
  });
});

describe("two user flushes in flight together", () => {
  test("the one issued first fails on the only current leg: the other, covering the same write, fails too (model seed 1359)", async () => {
    const a = new VolatileDisk("a", SIZE);
    const b = flakey(new MemoryDevice(SIZE, { name: "bdisk" }), "b");
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await m.suspend();
    b.setMode("down");
    await m.write(3 * REGION, fill(3)); // only a is current in region 3, in its cache
    b.setMode("up");
    const flushA = a.flush.bind(a);
    let failOnce = true;
    a.flush = async () => {
      if (!failOnce) return flushA();
      failOnce = false;
      a.failFlush = true;
      try {
        return await flushA();
      } finally {
        a.failFlush = false;
      }
    };
    // Both are issued before either reaches the leg; the second one's leg flush runs after the
    // first one's failed and took the cache (the write) with it.
    const first = m.flush();
    const second = m.flush();
    await expect(first).rejects.toThrow(/no leg holds a durable current copy of region\(s\) 3/);
    await expect(second).rejects.toThrow(/no leg holds a durable current copy of region\(s\) 3/);
  });
});

describe("issue 12 defect 5: two legs missing different acknowledged writes", () => {
  async function setup(features: string) {
    const disks = { a: new MemoryDevice(SIZE, { name: "a" }), b: new MemoryDevice(SIZE, { name: "b" }) };
    const logDisk = new MemoryDevice(1 << 20, { name: "log" });
    const run1 = { a: new Crashable(disks.a), b: new Crashable(disks.b), log: new Crashable(logDisk) };
    const legs = { a: flakey(run1.a, "a"), b: flakey(run1.b, "b") };
    const m1 = await mirror(`disk 2 log 128 2 a 0 b 0${features}`, { ...legs, log: run1.log });
    await m1.waitForSync();
    await m1.suspend(); // no resync between the failures and the crash
    return { disks, logDisk, run1, legs, m1 };
  }

  test.each([
    ["without handle_errors", ""],
    ["with handle_errors", " 1 handle_errors"],
  ])(
    "%s: both writes survive a crash and restart, each copied from the leg that has it",
    async (_, features) => {
      const { disks, logDisk, run1, legs, m1 } = await setup(features);
      legs.a.setMode("down");
      await m1.write(3 * REGION, fill(3)); // a misses r3
      legs.a.setMode("up");
      legs.b.setMode("down");
      await m1.write(9 * REGION, fill(9)); // b misses r9
      legs.b.setMode("up");
      await m1.flush();
      for (const d of Object.values(run1)) d.dead = true; // kill -9
      const m2 = await mirror("disk 2 log 128 2 a 0 b 0", { ...disks, log: logDisk });
      expect(m2.status()).toBe("2 a b 62/64 1 AA 3 disk log A");
      expect((await m2.read(3 * REGION, 4096)).equals(fill(3))).toBe(true);
      expect((await m2.read(9 * REGION, 4096)).equals(fill(9))).toBe(true);
      await m2.waitForSync();
      for (const d of [disks.a, disks.b]) {
        expect((await d.read(3 * REGION, 4096)).equals(fill(3))).toBe(true);
        expect((await d.read(9 * REGION, 4096)).equals(fill(9))).toBe(true);
      }
    },
  );

  test("with handle_errors: a write that reaches only some legs is failed when the log cannot record the leg that missed it", async () => {
    const { legs, m1, run1 } = await setup(" 1 handle_errors");
    legs.a.setMode("down");
    run1.log.dead = true; // the log's writes fail from now on
    await expect(m1.write(3 * REGION, fill(3))).rejects.toThrow(
      /cannot record the failed leg|log cannot be written/,
    );
  });
});

describe("issue 19 items 1-2, the mirror's side: the reload handover happens at preresume", () => {
  test("building a reload leaves the old mirror serving; closing the unused new one never touches the log", async () => {
    const a = new MemoryDevice(SIZE, { name: "a" });
    const b = new MemoryDevice(SIZE, { name: "b" });
    const log = new MemoryDevice(1 << 20, { name: "log" });
    const m1 = await mirror("disk 3 log 128 nosync 2 a 0 b 0", { a, b, log });
    await m1.settle();
    const before = await log.read(0, 4096);
    const m2 = await mirror("disk 2 log 128 2 a 0 b 0", { a, b, log }, { previous: m1 });
    await m1.write(REGION, fill(5)); // the old table still serves while the new one is built
    await m1.settle();
    const written = await log.read(0, 4096);
    await m2.close(); // a reload abandoned before preresume
    expect((await log.read(0, 4096)).equals(written)).toBe(true);
    expect(written.equals(before)).toBe(true); // settled: the same clean log
    await m1.write(2 * REGION, fill(6));
    expect((await b.read(2 * REGION, 4096)).equals(fill(6))).toBe(true);
  });

  test("a preresume that fails re-attaches the old mirror, which goes on resyncing and writing its log", async () => {
    const a = new MemoryDevice(SIZE, { name: "a" });
    const bDisk = new MemoryDevice(SIZE, { name: "bdisk" });
    const b = flakey(bDisk, "b");
    const log = new MemoryDevice(1 << 20, { name: "log" });
    const bad = new MemoryDevice(1 << 20, { name: "bad" });
    const header = Buffer.alloc(16);
    header.writeUInt32LE(0x4d695272, 0);
    header.writeUInt32LE(9, 4);
    await bad.write(0, header);
    const m1 = await mirror("disk 3 log 128 nosync 2 a 0 b 0", { a, b, log });
    b.setMode("down");
    await m1.write(3 * REGION, fill(3)); // b misses it
    b.setMode("up");
    await m1.suspend(); // what the device manager does before preresume
    const m2 = await mirror("disk 2 bad 128 2 a 0 b 0", { a, b, bad }, { previous: m1 });
    await expect(m2.preresume()).rejects.toThrow(/dm-log version 9/);
    await m2.close();
    await m1.resume(); // the device manager resumes the old table
    await m1.waitForSync();
    expect((await bDisk.read(3 * REGION, 4096)).equals(fill(3))).toBe(true);
    expect(m1.status()).toBe("2 a b 64/64 1 AA 3 disk log A");
  });
});
