import {
  type BlockDevice,
  KcopydClient,
  MemoryDevice,
  TargetArgError,
  type TargetContext,
} from "@udm/kcopyd";
import { afterEach, describe, expect, test } from "vitest";
import {
  DirtyRegionLog,
  inspectDiskLog,
  MIRROR_LOG_BITMAP_OFFSET,
  type MirrorDevice,
  MirrorLogFormatError,
  mirrorTarget,
} from "./index.js";

const MIB = 2 ** 20;
const SIZE = 64 * MIB; // 128 regions of 1024 sectors, as the kernel VM run
const REGION = 1024 * 512;

let open: MirrorDevice[] = [];
afterEach(async () => {
  for (const m of open) await m.close();
  open = [];
});

function context(devices: Map<string, BlockDevice>): TargetContext {
  return { kcopyd: new KcopydClient(), openDevice: async (spec) => devices.get(spec)! };
}

function setup() {
  const devices = new Map<string, BlockDevice>([
    ["a", new MemoryDevice(SIZE, { name: "a" })],
    ["b", new MemoryDevice(SIZE, { name: "b" })],
    ["log", new MemoryDevice(MIB, { name: "log" })],
  ]);
  return { devices, log: devices.get("log")!, a: devices.get("a")!, b: devices.get("b")! };
}

async function create(line: string, devices: Map<string, BlockDevice>, size = SIZE): Promise<MirrorDevice> {
  const m = (await mirrorTarget.create(line.split(" "), size, context(devices))) as MirrorDevice;
  open.push(m);
  return m;
}

/** A log as the kernel leaves it: header, garbage in the unused bytes, bitmap at 1024. */
function kernelLog(regions: number, dirty: number[], version = 2): Buffer {
  const buf = Buffer.alloc(MIRROR_LOG_BITMAP_OFFSET + Math.ceil(regions / 64) * 8);
  for (let i = 16; i < MIRROR_LOG_BITMAP_OFFSET; i++) buf[i] = (i * 37) & 0xff;
  buf.writeUInt32LE(0x4d695272, 0);
  buf.writeUInt32LE(version, 4);
  buf.writeBigUInt64LE(BigInt(regions), 8);
  for (let r = 0; r < regions; r++) {
    if (!dirty.includes(r)) buf[MIRROR_LOG_BITMAP_OFFSET + (r >> 3)]! |= 1 << (r & 7);
  }
  return buf;
}

describe("disk log, byte-compatible with the kernel's dm-log", () => {
  test("a udm log carries the kernel's header bytes and a full clean bitmap when in sync", async () => {
    const { devices, log } = setup();
    const m = await create("disk 3 log 1024 nosync 2 a 0 b 0", devices);
    await m.write(5 * REGION, Buffer.alloc(4096, 1));
    await m.suspend();
    const head = await log.read(0, 16);
    expect([...head].map((b) => b.toString(16).padStart(2, "0")).join(" ")).toBe(
      "72 52 69 4d 02 00 00 00 80 00 00 00 00 00 00 00",
    );
    expect((await log.read(MIRROR_LOG_BITMAP_OFFSET, 16)).equals(Buffer.alloc(16, 0xff))).toBe(true);
    const info = await inspectDiskLog(log);
    expect(info).toMatchObject({ regionCount: 128, cleanRegions: 128, regionSectors: 1024 });
  });

  test("a region being written is dirty on disk, and clean again once settled", async () => {
    const { devices, log } = setup();
    const m = await create("disk 3 log 1024 nosync 2 a 0 b 0", devices);
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    let reached!: () => void;
    const atLeg = new Promise<void>((r) => {
      reached = r;
    });
    const b = devices.get("b")!;
    const slowWrite = b.write.bind(b);
    b.write = async (...args) => {
      reached();
      await gate;
      return slowWrite(...args);
    };
    const w = m.write(9 * REGION + 512, Buffer.alloc(512, 9));
    await atLeg; // the write reached a leg, so its dirty bit must be on disk
    const during = await inspectDiskLog(log);
    expect(during.clean(9)).toBe(false);
    expect(during.cleanRegions).toBe(127);
    release();
    await w;
    await m.settle();
    expect((await inspectDiskLog(log)).cleanRegions).toBe(128);
  });

  test("a kernel-written log loads: only its dirty regions are resynced", async () => {
    const { devices, log, a, b } = setup();
    await log.write(0, kernelLog(128, [3, 77]));
    for (const r of [3, 5, 77]) await a.write(r * REGION, Buffer.alloc(REGION, r));
    const m = await create("disk 2 log 1024 2 a 0 b 0", devices);
    expect(m.status()).toBe("2 a b 126/128 1 AA 3 disk log A");
    await m.waitForSync();
    expect(m.status()).toBe("2 a b 128/128 1 AA 3 disk log A");
    expect((await b.read(3 * REGION, REGION)).equals(Buffer.alloc(REGION, 3))).toBe(true);
    expect((await b.read(77 * REGION, REGION)).equals(Buffer.alloc(REGION, 77))).toBe(true);
    // Region 5 is clean in the log, so it was not copied: the log, not the data, decides.
    expect((await b.read(5 * REGION, REGION)).equals(Buffer.alloc(REGION))).toBe(true);
    expect(m.resyncedRegions).toBe(2);
    await m.suspend();
    const after = await log.read(0, 16);
    expect(after.equals(kernelLog(128, []).subarray(0, 16))).toBe(true);
    // The unused header bytes the kernel left are kept (udm only adds its 16-byte extension at 16).
    expect((await log.read(32, 992)).equals(kernelLog(128, []).subarray(32, 1024))).toBe(true);
  });

  test("a udm log written with another region size is not trusted: full resync", async () => {
    const { devices } = setup();
    const m = await create("disk 3 log 1024 nosync 2 a 0 b 0", devices);
    await m.close();
    const n = await create("disk 2 log 2048 2 a 0 b 0", devices);
    expect(n.status()).toBe("2 a b 0/64 1 AA 3 disk log A");
  });

  test("a version 1 log is accepted and rewritten as version 2", async () => {
    const { devices, log } = setup();
    await log.write(0, kernelLog(128, [], 1));
    const m = await create("disk 2 log 1024 2 a 0 b 0", devices);
    expect(m.status()).toBe("2 a b 128/128 1 AA 3 disk log A");
    expect((await log.read(4, 4)).readUInt32LE(0)).toBe(2);
  });

  test("an unknown version is refused, naming the log device", async () => {
    const { devices, log } = setup();
    await log.write(0, kernelLog(128, [], 3));
    const err = await mirrorTarget
      .create("disk 2 log 1024 2 a 0 b 0".split(" "), SIZE, context(devices))
      .catch((e) => e);
    expect(err).toBeInstanceOf(TargetArgError);
    expect(err.argIndex).toBe(2);
    expect(err.message).toMatch(/log: dm-log version 3, expected 2 \(use the "sync" log argument/);
    expect(err.cause).toBeInstanceOf(MirrorLogFormatError);
    await expect(inspectDiskLog(log)).rejects.toThrow(MirrorLogFormatError);
    // `sync` starts a new log whatever was there.
    const m = await create("disk 3 log 1024 sync 2 a 0 b 0", devices);
    expect(m.status()).toBe("2 a b 0/128 1 AA 3 disk log A");
  });

  test("no magic means a new log: every region out of sync", async () => {
    const { devices } = setup();
    const m = await create("disk 2 log 1024 2 a 0 b 0", devices);
    expect(m.status()).toMatch(/ 0\/128 1 AA /);
    await m.waitForSync();
    expect(m.status()).toMatch(/ 128\/128 1 AA /);
  });

  test("a grown mirror: regions past the stored count are out of sync (or in sync with nosync, which keeps the stored bits)", async () => {
    const { devices, log } = setup();
    await log.write(0, kernelLog(64, []));
    const m = await create("disk 2 log 1024 2 a 0 b 0", devices);
    expect(m.status()).toMatch(/ 64\/128 /);
    await m.close();
    await log.write(0, kernelLog(64, [1]));
    const n = await create("disk 3 log 1024 nosync 2 a 0 b 0", devices);
    // nosync applies to a new log only: region 1 stays dirty and is resynced.
    expect(n.status()).toMatch(/ 127\/128 /);
  });

  test("a shrunk mirror clears the bits past its last region", async () => {
    const { devices, log } = setup();
    await log.write(0, kernelLog(128, []));
    const m = await create("disk 2 log 1024 2 a 0 b 0", devices, SIZE / 2);
    expect(m.status()).toMatch(/ 64\/64 /);
    await m.suspend();
    const info = await inspectDiskLog(log);
    expect(info.regionCount).toBe(64);
    expect(info.cleanRegions).toBe(64);
  });

  test("an unreadable log means everything is out of sync and the log shows D", async () => {
    const { devices, log } = setup();
    await log.write(0, kernelLog(128, []));
    log.readInto = async () => {
      throw new Error("EIO");
    };
    const m = await create("disk 2 log 1024 2 a 0 b 0", devices);
    expect(m.status()).toBe("2 a b 0/128 1 AA 3 disk log D");
  });

  test("inspectDiskLog rejects what is not a mirror log", async () => {
    const dev = new MemoryDevice(MIB, { name: "zeros" });
    await expect(inspectDiskLog(dev)).rejects.toThrow(/zeros: no mirror log: magic 0x00000000/);
    await expect(inspectDiskLog(new MemoryDevice(512, { name: "tiny" }))).rejects.toThrow(
      MirrorLogFormatError,
    );
    const short = new MemoryDevice(2048, { name: "short" });
    await short.write(0, kernelLog(128, []).subarray(0, 1024));
    await short.write(8, Buffer.from([0, 0, 1, 0, 0, 0, 0, 0])); // 65536 regions
    await expect(inspectDiskLog(short)).rejects.toThrow(/65536 regions need 9216 bytes, the device has 2048/);
  });
});

describe("DirtyRegionLog flush", () => {
  test("concurrent flushes share writes (group commit) and every caller's mark is durable", async () => {
    const dev = new MemoryDevice(MIB, { name: "log" });
    let writes = 0;
    const write = dev.write.bind(dev);
    dev.write = async (...args) => {
      writes++;
      await new Promise((r) => setTimeout(r, 5));
      return write(...args);
    };
    const log = new DirtyRegionLog({ regionSectors: 8, targetSectors: 8 * 1000, device: dev });
    await log.resume();
    writes = 0;
    const waits: Promise<void>[] = [];
    for (let r = 0; r < 100; r++) {
      log.markRegion(r);
      waits.push(log.waitDirtyDurable(log.dirtyMark));
      if (r % 10 === 0) await new Promise((res) => setTimeout(res, 1));
    }
    await Promise.all(waits);
    expect(writes).toBeLessThan(30);
    const info = await inspectDiskLog(dev);
    for (let r = 0; r < 100; r++) expect(info.clean(r)).toBe(false);
  });

  test("clean bits reach the disk only after the legs were flushed; a failed leg flush marks all dirty", async () => {
    const dev = new MemoryDevice(MIB, { name: "log" });
    const log = new DirtyRegionLog({ regionSectors: 8, targetSectors: 8 * 64, device: dev, sync: "nosync" });
    await log.resume();
    const events: string[] = [];
    log.flushLegs = async () => {
      events.push(`legs flushed, disk clean=${(await inspectDiskLog(dev)).cleanRegions}`);
      return true;
    };
    log.markRegion(4);
    await log.flush();
    log.clearRegion(4);
    await log.flush();
    expect(events).toEqual(["legs flushed, disk clean=63"]);
    expect((await inspectDiskLog(dev)).cleanRegions).toBe(64);
    log.flushLegs = async () => false;
    log.markRegion(1);
    log.clearRegion(1);
    await log.flush();
    expect((await inspectDiskLog(dev)).cleanRegions).toBe(0);
    log.clearRegion(2);
    expect(log.isClean(2)).toBe(false);
  });
});
