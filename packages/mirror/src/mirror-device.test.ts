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
import { inspectDiskLog, type MirrorDevice, mirrorTarget, RegionState } from "./index.js";

const MIB = 2 ** 20;
const REGION = 64 * 1024; // 128-sector regions keep tests small
const SIZE = 4 * MIB; // 64 regions

/** Delegates to a device and lets a test watch or hold each operation. */
class TracedDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly = false;
  hook: ((op: string, offsetBytes: number, lengthBytes: number) => Promise<void> | void) | undefined;
  bytesWritten = 0;
  reads = 0;
  healthListeners = new Set<(healthy: boolean) => void>();
  constructor(
    readonly name: string,
    readonly inner: BlockDevice,
    readonly trace: string[] = [],
  ) {
    this.sizeBytes = inner.sizeBytes;
    this.logicalBlockSize = inner.logicalBlockSize;
  }
  private async before(op: string, offset: number, length: number) {
    this.trace.push(`${this.name}:${op}:${offset}`);
    await this.hook?.(op, offset, length);
  }
  async read(offsetBytes: number, lengthBytes: number) {
    const b = Buffer.alloc(lengthBytes);
    await this.readInto(offsetBytes, b);
    return b;
  }
  async readInto(offsetBytes: number, target: Buffer) {
    this.reads++;
    await this.before("read", offsetBytes, target.length);
    return this.inner.readInto(offsetBytes, target);
  }
  async write(offsetBytes: number, data: Buffer, options?: WriteOptions) {
    await this.before(options?.fua ? "write-fua" : "write", offsetBytes, data.length);
    this.bytesWritten += data.length;
    return this.inner.write(offsetBytes, data, options);
  }
  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions) {
    await this.before("zero", offsetBytes, lengthBytes);
    this.bytesWritten += lengthBytes;
    return this.inner.writeZeroes(offsetBytes, lengthBytes, options);
  }
  async discard(offsetBytes: number, lengthBytes: number) {
    await this.before("discard", offsetBytes, lengthBytes);
    return this.inner.discard(offsetBytes, lengthBytes);
  }
  async flush() {
    await this.before("flush", 0, 0);
    return this.inner.flush();
  }
  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return this.inner.extents(offsetBytes, lengthBytes);
  }
  async close() {}
}

/** A remote-like leg: `setOnline(false)` fails its I/O and tells watchers, like a dropped NBD connection. */
class RemoteLeg extends TracedDevice {
  online = true;
  constructor(name: string, inner: BlockDevice) {
    super(name, inner);
    this.hook = () => {
      if (!this.online) throw new IoError("ESHUTDOWN", name, "connection lost");
    };
  }
  watchHealth(listener: (healthy: boolean) => void) {
    this.healthListeners.add(listener);
    return () => this.healthListeners.delete(listener);
  }
  setOnline(online: boolean) {
    this.online = online;
    for (const l of this.healthListeners) l(online);
  }
}

let open: MirrorDevice[] = [];
afterEach(async () => {
  for (const m of open) await m.close().catch(() => undefined);
  open = [];
});

function ctx(devices: Record<string, BlockDevice>, extra: Partial<TargetContext> = {}): TargetContext {
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
  const m = (await mirrorTarget.create(line.split(" "), SIZE, ctx(devices, extra))) as MirrorDevice;
  open.push(m);
  return m;
}

const mem = (name: string, size = SIZE) => new MemoryDevice(size, { name });
const fill = (byte: number, length = 4096) => Buffer.alloc(length, byte);
const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));

async function same(a: BlockDevice, b: BlockDevice, offset = 0, length = SIZE) {
  return (await a.read(offset, length)).equals(await b.read(offset, length));
}

describe("writes and the dirty region log", () => {
  test("a region's dirty bit is durable in the log before any write reaches a leg", async () => {
    const trace: string[] = [];
    const log = new TracedDevice("log", mem("log", MIB), trace);
    const a = new TracedDevice("a", mem("a"), trace);
    const b = new TracedDevice("b", mem("b"), trace);
    const m = await mirror("disk 3 log 128 nosync 2 a 0 b 0", { log, a, b });
    // Check at each leg write what the log device holds on disk.
    const checks: boolean[] = [];
    const onLeg = async (op: string, offset: number) => {
      if (!op.startsWith("write")) return;
      const info = await inspectDiskLog(log.inner);
      checks.push(!info.clean(Math.floor(offset / REGION)));
    };
    a.hook = onLeg;
    b.hook = onLeg;
    trace.length = 0;
    await Promise.all([
      m.write(3 * REGION, fill(1)),
      m.write(7 * REGION + 512, fill(2)),
      m.write(3 * REGION + 8192, fill(3)),
    ]);
    expect(checks).toHaveLength(6);
    expect(checks.every(Boolean)).toBe(true);
    // One log write + flush covered all three concurrent writes (batched), and came first.
    const firstLeg = trace.findIndex((t) => t.startsWith("a:") || t.startsWith("b:"));
    expect(trace.slice(0, firstLeg)).toEqual(["log:write:0", "log:flush:0"]);
    // Writing a region that is already dirty costs no log I/O.
    trace.length = 0;
    await m.write(3 * REGION + 2048, fill(4, 1024));
    expect(trace.filter((t) => t.startsWith("log:"))).toEqual([]);
    // Cleaning is lazy: legs are flushed before the clean bits are written.
    trace.length = 0;
    await m.settle();
    const legFlush = trace.indexOf("a:flush:0");
    const logWrite = trace.indexOf("log:write:0");
    expect(legFlush).toBeGreaterThanOrEqual(0);
    expect(trace.indexOf("b:flush:0")).toBeLessThan(logWrite);
    expect(legFlush).toBeLessThan(logWrite);
    expect((await inspectDiskLog(log.inner)).cleanRegions).toBe(64);
  });

  test("a sequential stream marks regions dirty ahead: few log writes, all cleaned once idle", async () => {
    const trace: string[] = [];
    const log = new TracedDevice("log", mem("log", MIB), trace);
    const m = await mirror("disk 3 log 128 nosync 2 a 0 b 0", { log, a: mem("a"), b: mem("b") });
    trace.length = 0;
    for (let off = 0; off < 40 * REGION; off += REGION / 2) await m.write(off, fill(1, REGION / 2));
    const logWrites = trace.filter((t) => t === "log:write:0").length;
    expect(logWrites).toBeLessThanOrEqual(4);
    const info = await inspectDiskLog(log.inner);
    for (let r = 0; r < 40; r++) expect(info.clean(r)).toBe(false);
    await m.settle();
    expect((await inspectDiskLog(log.inner)).cleanRegions).toBe(64);
  });

  test("in-sync regions are written to every leg; FUA and flush reach every leg", async () => {
    const trace: string[] = [];
    const a = new TracedDevice("a", mem("a"), trace);
    const b = new TracedDevice("b", mem("b"), trace);
    const c = new TracedDevice("c", mem("c"), trace);
    const m = await mirror("core 2 128 nosync 3 a 0 b 0 c 0", { a, b, c });
    trace.length = 0;
    await m.write(REGION - 1024, fill(5, 2048), { fua: true });
    // Two regions with the same target legs: one write per leg.
    expect(trace.sort()).toEqual(["a", "b", "c"].map((n) => `${n}:write-fua:${REGION - 1024}`));
    trace.length = 0;
    await m.flush();
    expect(trace.sort()).toEqual(["a:flush:0", "b:flush:0", "c:flush:0"]);
    for (const d of [a, b, c]) expect((await d.read(REGION - 1024, 2048)).equals(fill(5, 2048))).toBe(true);
    await m.writeZeroes(REGION - 1024, 1024);
    await m.discard(REGION, 1024);
    for (const d of [a, b, c]) expect((await d.read(REGION - 1024, 2048)).equals(fill(0, 2048))).toBe(true);
  });

  test("NOSYNC regions are written to the default leg only, then resynced", async () => {
    const a = new TracedDevice("a", mem("a"));
    const b = new TracedDevice("b", mem("b"));
    let hold!: () => void;
    const held = new Promise<void>((r) => {
      hold = r;
    });
    b.hook = (op) => (op === "zero" || op === "write" ? held : undefined);
    const m = await mirror("core 1 128 2 a 0 b 0", { a, b });
    const suspended = m.suspend(); // no new recovery starts; the first regions' copies are held on b
    const last = 63 * REGION;
    expect(m.regionHash.state(63)).toBe(RegionState.NOSYNC);
    const bWritesBefore = b.bytesWritten;
    await m.write(last, fill(6));
    expect(b.bytesWritten).toBe(bWritesBefore);
    expect((await a.read(last, 4096)).equals(fill(6))).toBe(true);
    expect((await m.read(last, 4096)).equals(fill(6))).toBe(true);
    hold();
    await suspended;
    await m.resume();
    await m.waitForSync();
    expect(await same(a, b)).toBe(true);
    expect(m.status()).toBe("2 a b 64/64 1 AA 1 core");
  });

  test("a write to a RECOVERING region waits until the region is recovered", async () => {
    const a = new TracedDevice("a", mem("a"));
    const b = new TracedDevice("b", mem("b"));
    await a.write(10 * REGION, fill(1, REGION));
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    a.hook = (op, offset) => (op === "read" && offset === 10 * REGION ? gate : undefined);
    const m = await mirror("core 1 128 2 a 0 b 0", { a, b });
    await m.message(["regions_in_flight", "1"]);
    while (m.regionHash.state(10) !== RegionState.RECOVERING) await tick(1);
    let done = false;
    const w = m.write(10 * REGION + 4096, fill(9)).then(() => {
      done = true;
    });
    await tick(20);
    expect(done).toBe(false);
    release();
    await w;
    await m.waitForSync();
    const expected = fill(1, REGION);
    fill(9).copy(expected, 4096);
    expect((await b.read(10 * REGION, REGION)).equals(expected)).toBe(true);
    expect((await a.read(10 * REGION, REGION)).equals(expected)).toBe(true);
  });
});

describe("resync", () => {
  test("holes stay holes: zeros are written as trims, data is copied", async () => {
    const a = mem("a");
    const b = mem("b");
    await a.write(2 * REGION, fill(7, REGION));
    await b.write(0, fill(0xee, SIZE)); // garbage everywhere on the stale leg
    const m = await mirror("core 1 128 2 a 0 b 0", { a, b });
    await m.waitForSync();
    expect(await same(a, b)).toBe(true);
    const extents = await b.extents(0, SIZE);
    expect(extents.filter((e) => e.kind === "data")).toEqual([
      { offsetBytes: 2 * REGION, lengthBytes: REGION, kind: "data" },
    ]);
  });

  test("a 1 TiB mirror with ten dirty regions copies only those ten", async () => {
    const TIB = 2 ** 40;
    const region = 1024 * 512;
    const regions = TIB / region;
    const a = new TracedDevice("a", new MemoryDevice(TIB, { name: "a" }));
    const b = new TracedDevice("b", new MemoryDevice(TIB, { name: "b" }));
    const log = new MemoryDevice(2 * MIB, { name: "log" });
    const header = Buffer.alloc(1024);
    header.writeUInt32LE(0x4d695272, 0);
    header.writeUInt32LE(2, 4);
    header.writeBigUInt64LE(BigInt(regions), 8);
    await log.write(0, header);
    await log.write(1024, Buffer.alloc(regions / 8, 0xff));
    const dirty = Array.from({ length: 10 }, (_, i) => i * 209_715 + 3);
    for (const r of dirty) {
      const bit = Buffer.alloc(1);
      await log.readInto(1024 + (r >> 3), bit);
      bit[0]! &= ~(1 << (r & 7));
      await log.write(1024 + (r >> 3), bit);
      await a.write(r * region, fill(r & 0xff, region));
    }
    const m = (await mirrorTarget.create(
      "disk 2 log 1024 2 a 0 b 0".split(" "),
      TIB,
      ctx({ a, b, log }),
    )) as MirrorDevice;
    open.push(m);
    expect(m.status()).toBe(`2 a b ${regions - 10}/${regions} 1 AA 3 disk log A`);
    expect(m.progress()).toMatchObject({ operation: "resync", doneBytes: 0, totalBytes: 10 * region });
    await m.waitForSync();
    expect(b.bytesWritten).toBe(10 * region);
    expect(m.resyncedRegions).toBe(10);
    expect(m.progress()).toBeNull();
    for (const r of dirty)
      expect((await b.read(r * region, region)).equals(fill(r & 0xff, region))).toBe(true);
  });

  test("progress, regions in flight and the resync message", async () => {
    const a = new TracedDevice("a", mem("a"));
    const b = new TracedDevice("b", mem("b"));
    await a.write(0, fill(3, SIZE));
    let inFlight = 0;
    let maxInFlight = 0;
    a.hook = async (op) => {
      if (op !== "read") return;
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      await tick(2);
      inFlight--;
    };
    const m = await mirror("core 1 128 2 a 0 b 0", { a, b });
    expect(m.regionsInFlight).toBe(8);
    expect(m.progress()).toMatchObject({ operation: "resync", totalBytes: SIZE });
    await m.waitForSync();
    expect(maxInFlight).toBeGreaterThan(1);
    expect(maxInFlight).toBeLessThanOrEqual(8);
    expect(await same(a, b)).toBe(true);
    await m.message(["regions_in_flight", "1"]);
    maxInFlight = 0;
    const before = b.bytesWritten;
    await m.message(["resync"]);
    expect(m.status()).toBe("2 a b 0/64 1 AA 1 core");
    const p = m.progress();
    expect(p?.totalBytes).toBe(SIZE);
    await m.waitForSync();
    expect(maxInFlight).toBe(1);
    expect(b.bytesWritten - before).toBe(SIZE);
    await expect(m.message(["regions_in_flight", "0"])).rejects.toThrow(/usage: regions_in_flight <1..64>/);
    await expect(m.message(["frobnicate"])).rejects.toThrow(/unknown mirror message "frobnicate"/);
    await expect(m.message(["read_balance", "maybe"])).rejects.toThrow(/usage: read_balance on\|off/);
  });

  test("crash: reopening with the disk log resyncs only the dirty regions, legs end identical", async () => {
    const a = mem("a");
    const b = mem("b");
    const log = mem("log", MIB);
    const frozen = { on: false };
    const freeze = (name: string, inner: BlockDevice) => {
      const t = new TracedDevice(name, inner);
      // After the "kill -9" nothing reaches the disks any more.
      t.hook = () => (frozen.on ? new Promise<void>(() => undefined) : undefined);
      return t;
    };
    const m1 = await mirror("disk 3 log 128 nosync 2 a 0 b 0", {
      a: freeze("a", a),
      b: freeze("b", b),
      log: freeze("log", log),
    });
    await m1.write(0, fill(1, 3 * REGION));
    await m1.settle(); // regions 0..2 clean again
    // Writes in flight at the crash: leg a got them, leg b did not.
    const bHook = (m1 as unknown as { legs: Array<{ dev: TracedDevice }> }).legs[1]!.dev;
    bHook.hook = (op) => (op.startsWith("write") ? new Promise<void>(() => undefined) : undefined);
    void m1.write(20 * REGION, fill(2, 2 * REGION));
    void m1.write(40 * REGION + 4096, fill(3));
    // Wait until leg a has both writes (b never gets them).
    while (
      !(await a.read(21 * REGION, 4)).equals(fill(2, 4)) ||
      !(await a.read(40 * REGION + 4096, 4)).equals(fill(3, 4))
    ) {
      await tick(1);
    }
    frozen.on = true;
    open = open.filter((x) => x !== m1); // killed: it never closes
    expect(await same(a, b)).toBe(false);
    const info = await inspectDiskLog(log);
    expect(info.cleanRegions).toBe(61);
    const m2 = await mirror("disk 2 log 128 2 a 0 b 0", { a, b, log });
    expect(m2.status()).toBe("2 a b 61/64 1 AA 3 disk log A");
    await m2.waitForSync();
    expect(m2.resyncedRegions).toBe(3);
    expect(await same(a, b)).toBe(true);
    expect((await m2.read(0, 3 * REGION)).equals(fill(1, 3 * REGION))).toBe(true);
  });
});

describe("overlapping writes", () => {
  test("overlapping writes in flight together reach every leg in the same order", async () => {
    const a = new TracedDevice("a", mem("a"));
    const b = new TracedDevice("b", mem("b"));
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    // Leg b holds the first write; without ordering the second lands on b first, then the
    // first overwrites it there, while leg a ends with the second: legs differ, region in sync.
    let release: () => void = () => undefined;
    const held = new Promise<void>((r) => {
      release = r;
    });
    let holding = false;
    b.hook = (op) => {
      if (op !== "write" || holding) return;
      holding = true;
      return held;
    };
    const first = m.write(3 * REGION, fill(1, 8192));
    while (!holding) await tick(1);
    const second = m.write(3 * REGION + 4096, fill(2, 8192));
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    release();
    await Promise.all([first, second]);
    expect((await a.read(3 * REGION, 12288)).equals(Buffer.concat([fill(1), fill(2, 8192)]))).toBe(true);
    expect(await same(a, b)).toBe(true);
    expect(m.status()).toBe("2 a b 64/64 1 AA 1 core");
  });

  test("writes that do not overlap are not held back by a slow one", async () => {
    const a = mem("a");
    const b = new TracedDevice("b", mem("b"));
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    let release: () => void = () => undefined;
    const held = new Promise<void>((r) => {
      release = r;
    });
    b.hook = (op, offset) => (op === "write" && offset === 0 ? held : undefined);
    const slow = m.write(0, fill(1));
    await m.write(4096, fill(2)); // completes while the first is held
    release();
    await slow;
    expect(await same(a, b)).toBe(true);
  });
});

describe("leg failure", () => {
  test("without handle_errors: a failing leg is D, writes go on, nothing acknowledged is lost", async () => {
    const a = mem("a");
    const bDisk = mem("b");
    const b = new FlakeyDevice(bDisk, {
      upIntervalSeconds: 1,
      downIntervalSeconds: 0,
      errorWrites: true,
      name: "b",
    });
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await m.write(0, fill(1, REGION));
    b.setMode("down");
    await m.write(5 * REGION, fill(2, REGION));
    await m.write(6 * REGION, fill(3));
    expect(m.status()).toBe("2 a b 62/64 1 AD 1 core");
    expect((await m.read(5 * REGION, REGION)).equals(fill(2, REGION))).toBe(true);
    // While out of sync, region 5 is written to the current leg only.
    await m.write(5 * REGION, fill(4));
    b.setMode("up");
    expect((await m.read(5 * REGION, 4096)).equals(fill(4))).toBe(true);
    await m.message(["resync"]);
    await m.waitForSync();
    expect(await same(a, bDisk)).toBe(true);
    expect(m.status()).toBe("2 a b 64/64 1 AA 1 core");
  });

  test("with handle_errors: a failed default leg is replaced, writes and reads continue", async () => {
    const aDisk = mem("a");
    const a = new FlakeyDevice(aDisk, { upIntervalSeconds: 1, downIntervalSeconds: 0, name: "a" });
    const b = mem("b");
    const m = await mirror("core 2 128 nosync 2 a 0 b 0 1 handle_errors", { a, b });
    await m.write(0, fill(1, 2 * REGION));
    a.setMode("down"); // reads and writes fail
    await m.write(REGION, fill(2, REGION));
    expect(m.defaultLegIndex).toBe(1);
    expect(m.status()).toBe("2 a b 63/64 1 DA 1 core");
    await m.write(30 * REGION, fill(3));
    expect((await m.read(0, 2 * REGION)).equals(Buffer.concat([fill(1, REGION), fill(2, REGION)]))).toBe(
      true,
    );
    expect((await m.read(30 * REGION, 4096)).equals(fill(3))).toBe(true);
    a.setMode("up");
    await m.message(["resync"]);
    await m.waitForSync();
    expect(await same(aDisk, b)).toBe(true);
  });

  test("reads fall back to another in-sync leg and mark the failed one R", async () => {
    const aDisk = mem("a");
    const a = new FlakeyDevice(aDisk, {
      upIntervalSeconds: 1,
      downIntervalSeconds: 0,
      errorReads: true,
      name: "a",
    });
    const b = mem("b");
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await m.write(0, fill(8, 3 * REGION));
    a.setMode("down");
    expect((await m.read(REGION - 10, REGION)).equals(fill(8, REGION))).toBe(true);
    expect(m.status()).toBe("2 a b 64/64 1 RA 1 core");
    a.setMode("up");
  });

  test("a failed read settles only after every part stopped writing into the caller's buffer", async () => {
    const a = new TracedDevice("a", mem("a"));
    const b = new TracedDevice("b", mem("b"));
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await m.write(0, fill(3, 2 * REGION));
    let release: () => void = () => undefined;
    const held = new Promise<void>((r) => {
      release = r;
    });
    let heldStarted = false;
    a.hook = (op) => {
      if (op === "read") throw new IoError("EIO", "a", "read failed");
    };
    b.hook = (op, offset) => {
      if (op !== "read") return;
      if (offset === 0) throw new IoError("EIO", "b", "read failed");
      heldStarted = true;
      return held; // region 1's retry on b is still filling the buffer
    };
    const target = Buffer.alloc(2 * REGION);
    let settled = false;
    const reading = m.readInto(0, target).finally(() => {
      settled = true;
    });
    reading.catch(() => undefined);
    while (!heldStarted) await tick(1);
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    expect(settled).toBe(false);
    release();
    await expect(reading).rejects.toThrow(/failed on every current leg/);
    expect(target.subarray(REGION).equals(fill(3, REGION))).toBe(true);
  });

  test("a read fails only when every current leg fails", async () => {
    const a = new FlakeyDevice(mem("a"), {
      upIntervalSeconds: 0,
      downIntervalSeconds: 1,
      errorReads: true,
      name: "a",
    });
    const b = new FlakeyDevice(mem("b"), {
      upIntervalSeconds: 0,
      downIntervalSeconds: 1,
      errorReads: true,
      name: "b",
    });
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await expect(m.read(0, 4096)).rejects.toThrow(/failed on every current leg/);
  });

  test("read balancing spreads reads over in-sync legs", async () => {
    const a = new TracedDevice("a", mem("a"));
    const b = new TracedDevice("b", mem("b"));
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    for (let i = 0; i < 10; i++) await m.read(0, 4096);
    expect([a.reads, b.reads]).toEqual([10, 0]);
    await m.message(["read_balance", "on"]);
    for (let i = 0; i < 10; i++) await m.read(0, 4096);
    expect([a.reads, b.reads]).toEqual([15, 5]);
  });
});

/**
 * dm's reload: the new table is built, then preresumed (it takes the old one's log and sync state
 * over there); a failed preresume closes it, as the device manager does.
 */
async function reload(args: string[], size: number, context: TargetContext): Promise<MirrorDevice> {
  const m = (await mirrorTarget.create(args, size, context)) as MirrorDevice;
  try {
    await m.preresume?.();
  } catch (err) {
    await m.close();
    throw err;
  }
  return m;
}

describe("leg replacement and remote legs", () => {
  test("reloading with a new leg resyncs that leg only", async () => {
    const a = new TracedDevice("a", mem("a"));
    const b = new TracedDevice("b", mem("b"));
    const c = new TracedDevice("c", mem("c"));
    await a.write(0, fill(5, SIZE / 2));
    const m1 = await mirror("core 1 128 2 a 0 b 0", { a, b, c });
    await m1.waitForSync();
    const before = { a: a.bytesWritten, b: b.bytesWritten };
    const m2 = (await reload(
      "core 1 128 3 a 0 b 0 c 0".split(" "),
      SIZE,
      ctx({ a, b, c }, { previous: m1 }),
    )) as MirrorDevice;
    open.push(m2);
    expect(m2.status()).toBe("3 a b c 0/64 1 AAA 1 core");
    await expect(m1.write(0, fill(1))).rejects.toThrow(/replaced by a reload/);
    await m1.flush(); // still fine: only the legs are flushed
    expect((await m1.read(0, 4096)).equals(fill(5))).toBe(true);
    await m2.waitForSync();
    expect(m2.status()).toBe("3 a b c 64/64 1 AAA 1 core");
    expect({ a: a.bytesWritten, b: b.bytesWritten }).toEqual(before);
    expect(c.bytesWritten).toBe(SIZE);
    expect(await same(a, c)).toBe(true);
    // Replacing b by c: nothing to copy at all for a, and c is current.
    const d = new TracedDevice("d", mem("d"));
    const m3 = (await reload(
      "core 1 128 2 d 0 c 0".split(" "),
      SIZE,
      ctx({ a, b, c, d }, { previous: m2 }),
    )) as MirrorDevice;
    open.push(m3);
    const cBefore = c.bytesWritten;
    await m3.waitForSync();
    expect(c.bytesWritten).toBe(cBefore);
    expect(await same(a, d)).toBe(true);
  });

  test("a reload's mirror takes the old one over in preresume: built and closed without it, the old one never notices", async () => {
    const a = mem("a");
    const b = mem("b");
    const log = mem("log", MIB);
    const m1 = await mirror("disk 3 log 128 nosync 2 a 0 b 0", { a, b, log });
    const m2 = (await mirrorTarget.create(
      "disk 2 log 128 2 a 0 b 0".split(" "),
      SIZE,
      ctx({ a, b, log }, { previous: m1 }),
    )) as MirrorDevice;
    // Built: the old table still serves (dm: until the suspend and preresume).
    await m1.write(0, fill(4));
    expect((await b.read(0, 4096)).equals(fill(4))).toBe(true);
    await m2.close(); // the reload failed later on
    await m1.write(REGION, fill(6));
    await m1.flush();
    expect((await b.read(REGION, 4096)).equals(fill(6))).toBe(true);
    expect(m1.status()).toBe(`2 a b 64/64 1 AA 3 disk log A`);
  });

  test("a remote leg that loses its connection is D; on reconnect only what it may lack is resynced", async () => {
    const a = mem("a");
    const rDisk = mem("remote");
    const remote = new RemoteLeg("nbd://host:10809/leg", rDisk);
    const m = await mirror("core 2 128 nosync 2 a 0 nbd://host:10809/leg 0", {
      a,
      "nbd://host:10809/leg": remote,
    });
    await m.write(0, fill(1, REGION));
    await m.flush();
    await m.write(REGION, fill(5, 512)); // acknowledged, never flushed: lost with the connection?
    remote.setOnline(false);
    expect(m.status()).toBe("2 a nbd://host:10809/leg 63/64 1 AD 1 core");
    await m.write(7 * REGION, fill(2, 8192));
    await m.write(9 * REGION, fill(3));
    expect(m.status()).toBe("2 a nbd://host:10809/leg 61/64 1 AD 1 core");
    expect((await m.read(7 * REGION, 8192)).equals(fill(2, 8192))).toBe(true);
    const written = remote.bytesWritten;
    remote.setOnline(true);
    await m.waitForSync();
    expect(remote.bytesWritten - written).toBe(3 * REGION);
    expect(m.status()).toBe("2 a nbd://host:10809/leg 64/64 1 AA 1 core");
    expect(await same(a, rDisk)).toBe(true);
  });
});

describe("NBD meta context and life cycle", () => {
  test("mirror:out-of-sync lists regions that are out of sync", async () => {
    const a = mem("a");
    const b = new FlakeyDevice(mem("b"), {
      upIntervalSeconds: 1,
      downIntervalSeconds: 0,
      errorWrites: true,
      name: "b",
    });
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    b.setMode("down");
    await m.write(2 * REGION + 100, fill(1, 100));
    const [context] = m.statusContexts();
    expect(context?.name).toBe("mirror:out-of-sync");
    expect(await context!.query(0, 4 * REGION)).toEqual([
      { lengthBytes: 2 * REGION, flags: 0 },
      { lengthBytes: REGION, flags: 1 },
      { lengthBytes: REGION, flags: 0 },
    ]);
  });

  test("suspend stops the resync and flushes the log; resume restarts it", async () => {
    const a = mem("a");
    const b = new TracedDevice("b", mem("b"));
    const log = mem("log", MIB);
    await a.write(0, fill(4, SIZE));
    const m = await mirror("disk 2 log 128 2 a 0 b 0", { a, b, log });
    await m.suspend();
    const after = b.bytesWritten;
    const synced = (await inspectDiskLog(log)).cleanRegions;
    expect(synced).toBeLessThan(64);
    await tick(20);
    expect(b.bytesWritten).toBe(after);
    await m.resume();
    await m.waitForSync();
    await m.suspend();
    expect((await inspectDiskLog(log)).cleanRegions).toBe(64);
    expect(await same(a, b)).toBe(true);
  });
  test("close after a leg failed keeps only the regions that leg missed dirty in the disk log", async () => {
    // Reported: waitForSync, leg b down, one write, close -> 0/64 clean (the resync's copies to b
    // were still unflushed, so b's failed flush made it stale everywhere).
    const a = mem("a");
    const bDisk = mem("b");
    const b = new FlakeyDevice(bDisk, { upIntervalSeconds: 1, downIntervalSeconds: 0, name: "b" });
    const log = mem("log", MIB);
    await a.write(0, fill(5, SIZE));
    const m1 = await mirror("disk 2 log 128 2 a 0 b 0", { a, b, log });
    await m1.waitForSync();
    expect(await same(a, bDisk)).toBe(true);
    b.setMode("down");
    await m1.write(3 * REGION + 4096, fill(6));
    expect(m1.status()).toBe("2 a b 63/64 1 AD 3 disk log A");
    await m1.close();
    const info = await inspectDiskLog(log);
    expect(info.cleanRegions).toBe(63);
    expect(info.clean(3)).toBe(false); // the region b missed is never clean
    // A restart with b back copies that one region, from a (the header says b is stale).
    b.setMode("up");
    const m2 = await mirror("disk 2 log 128 2 a 0 b 0", { a, b, log });
    expect(m2.status()).toBe("2 a b 63/64 1 AA 3 disk log A");
    await m2.waitForSync();
    expect(m2.resyncedRegions).toBe(1);
    expect(await same(a, bDisk)).toBe(true);
    expect((await m2.read(3 * REGION + 4096, 4096)).equals(fill(6))).toBe(true);
    await m2.close();
    expect((await inspectDiskLog(log)).cleanRegions).toBe(64);
  });

  test("a leg whose flush fails before the resync's copies are flushed is stale there again", async () => {
    const a = mem("a");
    const b = new TracedDevice("b", mem("b"));
    const log = mem("log", MIB);
    await a.write(0, fill(5, 4 * REGION));
    let failFlush = true;
    b.hook = (op) => {
      if (op === "flush" && failFlush) throw new IoError("EIO", "b", "flush failed");
    };
    const m = await mirror("disk 2 log 128 2 a 0 b 0", { a, b, log });
    // The pass's flush of b fails: b may have lost every copy, so nothing is in sync or clean.
    await expect(m.waitForSync()).rejects.toThrow(/cannot be resynced now/);
    expect(m.status()).toBe("2 a b 0/64 1 AF 3 disk log A");
    expect((await inspectDiskLog(log)).cleanRegions).toBe(0);
    failFlush = false;
    await m.message(["resync"]);
    await m.waitForSync();
    expect((await inspectDiskLog(log)).cleanRegions).toBe(64);
  });
});

describe("errors around the log and flushes", () => {
  test("with handle_errors a write whose dirty bit cannot be logged fails, and the log shows D", async () => {
    const log = new TracedDevice("log", mem("log", MIB));
    const a = mem("a");
    const b = mem("b");
    const m = await mirror("disk 3 log 128 nosync 2 a 0 b 0 1 handle_errors", { log, a, b });
    log.hook = (op) => {
      if (op === "write") throw new IoError("EIO", "log", "log write failed");
    };
    await expect(m.write(5 * REGION, fill(1))).rejects.toThrow(/the mirror log cannot be written/);
    expect(m.status()).toBe("2 a b 64/64 1 AA 3 disk log D");
    // Nothing reached the legs: no acknowledged write, no divergence.
    expect((await a.read(5 * REGION, 4096)).equals(fill(0))).toBe(true);
  });

  test("without handle_errors the kernel writes on when the log fails", async () => {
    const log = new TracedDevice("log", mem("log", MIB));
    const m = await mirror("disk 3 log 128 nosync 2 a 0 b 0", { log, a: mem("a"), b: mem("b") });
    log.hook = (op) => {
      if (op === "flush") throw new IoError("EIO", "log", "log flush failed");
    };
    await m.write(5 * REGION, fill(1));
    expect(m.status()).toBe("2 a b 64/64 1 AA 3 disk log F");
    expect((await m.read(5 * REGION, 4096)).equals(fill(1))).toBe(true);
  });

  test("a leg whose flush fails is F and is resynced from the others", async () => {
    const a = mem("a");
    const b = new TracedDevice("b", mem("b"));
    const m = await mirror("core 2 128 nosync 2 a 0 b 0", { a, b });
    await m.write(0, fill(2, REGION));
    b.hook = (op) => {
      if (op === "flush") throw new IoError("EIO", "b", "flush failed");
    };
    await m.flush();
    // Only what b acknowledged since its last flush may be lost: region 0.
    expect(m.status()).toBe("2 a b 63/64 1 AF 1 core");
    b.hook = undefined;
    await m.message(["resync"]);
    await m.waitForSync();
    expect(m.status()).toBe("2 a b 64/64 1 AA 1 core");
    expect(await same(a, b)).toBe(true);
    // Later writes keep regions in sync: a past flush failure does not poison them.
    await m.write(3 * REGION, fill(4));
    await m.settle();
    expect(m.status()).toBe("2 a b 64/64 1 AA 1 core");
  });

  test("the resync throttle still completes the resync", async () => {
    const a = mem("a");
    const b = mem("b");
    await a.write(0, fill(6, REGION * 4));
    const m = await mirror("core 1 128 2 a 0 b 0", { a, b });
    await m.message(["resync_throttle", "50"]);
    await m.message(["resync"]);
    await m.waitForSync();
    expect(await same(a, b)).toBe(true);
    await expect(m.message(["resync_throttle", "0"])).rejects.toThrow(/usage: resync_throttle <1..100>/);
  });

  test("a reload that fails leaves the old table working", async () => {
    const a = mem("a");
    const b = mem("b");
    const log = mem("log", MIB);
    const m1 = await mirror("disk 3 log 128 nosync 2 a 0 b 0", { a, b, log });
    const bad = mem("bad-log", MIB);
    const header = Buffer.alloc(16);
    header.writeUInt32LE(0x4d695272, 0);
    header.writeUInt32LE(9, 4);
    await bad.write(0, header);
    await expect(
      reload(
        "disk 2 bad-log 128 2 a 0 b 0".split(" "),
        SIZE,
        ctx({ a, b, "bad-log": bad }, { previous: m1 }),
      ),
    ).rejects.toThrow(/dm-log version 9/);
    await m1.write(0, fill(3));
    expect((await b.read(0, 4096)).equals(fill(3))).toBe(true);
  });
});

describe("shapes", () => {
  test("nine legs: one kcopyd job fills the eight others", async () => {
    const names = ["l0", "l1", "l2", "l3", "l4", "l5", "l6", "l7", "l8"];
    const devs = Object.fromEntries(names.map((n) => [n, mem(n)]));
    await devs.l0!.write(REGION, fill(9, REGION));
    const m = await mirror(`core 1 128 9 ${names.map((n) => `${n} 0`).join(" ")}`, devs);
    await m.waitForSync();
    expect(m.status()).toBe(`9 ${names.join(" ")} 64/64 1 AAAAAAAAA 1 core`);
    for (const n of names) expect((await devs[n]!.read(REGION, REGION)).equals(fill(9, REGION))).toBe(true);
  });

  test("legs at offsets; extents come from the default leg, relative to the mirror", async () => {
    const a = mem("a", SIZE + 8 * 512);
    const b = mem("b", SIZE + 64 * 1024);
    const m = await mirror("core 2 128 nosync 2 a 8 b 128", { a, b });
    await m.write(REGION, fill(1, REGION));
    expect((await a.read(8 * 512 + REGION, REGION)).equals(fill(1, REGION))).toBe(true);
    expect((await b.read(64 * 1024 + REGION, REGION)).equals(fill(1, REGION))).toBe(true);
    const data = (await m.extents(0, SIZE)).filter((e) => e.kind === "data");
    expect(data[0]!.offsetBytes).toBeLessThanOrEqual(REGION);
    expect(data.at(-1)!.offsetBytes + data.at(-1)!.lengthBytes).toBeGreaterThanOrEqual(2 * REGION);
    expect(m.table()).toBe("core 2 128 nosync 2 a 8 b 128");
  });
});

describe("files on disk", () => {
  test("temp files: write, close, reopen with the disk log; a reload with another region size resyncs the new leg", async () => {
    const { mkdtempSync, rmSync } = await import("node:fs");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const { FileDevice } = await import("@udm/kcopyd");
    const dir = mkdtempSync(join(tmpdir(), "udm-mirror-"));
    try {
      const open = async (n: string, size = SIZE) => FileDevice.open(join(dir, n), { createSizeBytes: size });
      const files = { a: await open("a.img"), b: await open("b.img"), log: await open("log.img", MIB) };
      const m1 = await mirror("disk 2 log 128 2 a 0 b 0", files);
      await m1.waitForSync();
      await m1.write(7 * REGION + 100, fill(7, 3 * REGION));
      await m1.close();
      expect(await inspectDiskLog(files.log)).toMatchObject({
        regionCount: 64,
        cleanRegions: 64,
        regionSectors: 128,
      });
      const m2 = await mirror("disk 2 log 128 2 a 0 b 0", files);
      expect(m2.status()).toBe(`2 ${files.a.name} ${files.b.name} 64/64 1 AA 3 disk ${files.log.name} A`);
      expect((await m2.read(7 * REGION + 100, 3 * REGION)).equals(fill(7, 3 * REGION))).toBe(true);
      const c = await open("c.img");
      const m3 = (await reload(
        "disk 2 log 256 2 a 0 c 0".split(" "),
        SIZE,
        ctx({ ...files, c }, { previous: m2 }),
      )) as MirrorDevice;
      await m3.waitForSync();
      expect(await same(files.a, c)).toBe(true);
      await m3.close();
      for (const f of [...Object.values(files), c]) await f.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
