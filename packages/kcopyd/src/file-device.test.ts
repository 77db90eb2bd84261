import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { promises as fsp } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import type { Extent } from "./block-device.js";
import { FileDevice, SYNC_READ_STREAK_READS } from "./file-device.js";
import { KcopydClient, KcopydFlags } from "./kcopyd.js";
import { MemoryDevice } from "./memory-device.js";
import {
  NO_NATIVE_ENV,
  nativeAddonInfo,
  nativeFileOps,
  nativeFileOpsLoadError,
  tuneMallocForDataPath,
} from "./native.js";

const CI = process.env.CI === "true";
const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Whether the addon loads, whatever UDM_NO_NATIVE says in this process. */
const nativeBuilt = withNative(true, () => nativeFileOps() !== null);

function withNative<T>(enabled: boolean, fn: () => T): T {
  const saved = process.env[NO_NATIVE_ENV];
  if (enabled) delete process.env[NO_NATIVE_ENV];
  else process.env[NO_NATIVE_ENV] = "1";
  try {
    return fn();
  } finally {
    if (saved === undefined) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = saved;
  }
}

/** Both FileDevice paths; the native one must run under CI (the addon is built by `pnpm install`). */
const MODES = [
  { mode: "native", native: true, runs: nativeBuilt || CI },
  { mode: "pure-JS (UDM_NO_NATIVE=1)", native: false, runs: true },
];

let dir: string;
beforeAll(async () => {
  dir = await fsp.mkdtemp(join(tmpdir(), "udm-filedev-"));
});
afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

describe("native addon", () => {
  it.skipIf(!CI && !nativeBuilt)("is built by pnpm install (required under CI)", () => {
    expect(nativeBuilt, `addon did not load: ${String(nativeFileOpsLoadError())}`).toBe(true);
  });

  it.skipIf(!nativeBuilt)(
    "nativeAddonInfo() names the path in use: the workspace's source build, or pure JS",
    () => {
      expect(withNative(true, () => nativeAddonInfo())).toMatchObject({
        kind: "source build",
        path: expect.stringMatching(/native\/build\/Release\/udm_fileops\.node$/),
      });
      expect(withNative(false, () => nativeAddonInfo())).toEqual({
        kind: "pure-JS",
        path: null,
        reason: "UDM_NO_NATIVE=1",
      });
    },
  );

  it.skipIf(!nativeBuilt)(
    "tunes glibc's malloc for the data path (both thresholds taken); not without the addon",
    () => {
      expect(withNative(true, () => tuneMallocForDataPath())).toBe(true);
      const native = withNative(true, () => nativeFileOps())!;
      expect(() => native.tuneMalloc!(4 * GiB, MiB)).toThrow(/below 2 GiB/);
      expect(withNative(false, () => tuneMallocForDataPath())).toBe(false);
    },
  );

  it.skipIf(!nativeBuilt)("reports ENXIO as -1 and other errors with their errno name", async () => {
    const native = withNative(true, () => nativeFileOps())!;
    const fh = await fsp.open(join(dir, "seek.img"), "w+");
    try {
      await fh.truncate(MiB);
      await fh.write(Buffer.alloc(4 * KiB, 1), 0, 4 * KiB, 64 * KiB);
      expect(native.seekData(fh.fd, 0)).toBe(64 * KiB);
      expect(native.seekHole(fh.fd, 64 * KiB)).toBe(68 * KiB);
      expect(native.seekData(fh.fd, 68 * KiB)).toBe(-1);
      expect(native.seekHole(fh.fd, MiB)).toBe(-1);
      await native.punchHole(fh.fd, 64 * KiB, 4 * KiB);
      expect(native.seekData(fh.fd, 0)).toBe(-1);
      expect(() => native.seekData(fh.fd, -1)).toThrow(/non-negative/);
    } finally {
      await fh.close();
    }
    const closedFd = 1 << 20;
    expect(() => native.seekData(closedFd, 0)).toThrow(expect.objectContaining({ code: "EBADF" }));
    await expect(native.zeroRange(closedFd, 0, 1)).rejects.toMatchObject({ code: "EBADF" });
  });
});

describe.each(MODES)("FileDevice on a sparse file, $mode path", ({ native, runs }) => {
  let saved: string | undefined;
  beforeEach(() => {
    saved = process.env[NO_NATIVE_ENV];
    if (native) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = "1";
  });
  afterEach(() => {
    if (saved === undefined) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = saved;
  });
  const file = (name: string) => join(dir, `${native ? "n" : "js"}-${name}`);

  it.skipIf(!runs)("reports the data runs of a 1 TiB sparse file (all data without the addon)", async () => {
    const dev = await FileDevice.open(file("tib.img"), { createSizeBytes: 2 ** 40 });
    try {
      await dev.write(0, randomBytes(64 * KiB));
      await dev.write(2 ** 39, randomBytes(MiB));
      await dev.write(2 ** 40 - 4 * KiB, randomBytes(4 * KiB));
      const all = await dev.extents(0, dev.sizeBytes);
      const window = await dev.extents(2 ** 39 - MiB, 3 * MiB);
      if (native) {
        expect(all).toEqual<Extent[]>([
          { offsetBytes: 0, lengthBytes: 64 * KiB, kind: "data" },
          { offsetBytes: 64 * KiB, lengthBytes: 2 ** 39 - 64 * KiB, kind: "hole" },
          { offsetBytes: 2 ** 39, lengthBytes: MiB, kind: "data" },
          { offsetBytes: 2 ** 39 + MiB, lengthBytes: 2 ** 39 - MiB - 4 * KiB, kind: "hole" },
          { offsetBytes: 2 ** 40 - 4 * KiB, lengthBytes: 4 * KiB, kind: "data" },
        ]);
        expect(window).toEqual<Extent[]>([
          { offsetBytes: 2 ** 39 - MiB, lengthBytes: MiB, kind: "hole" },
          { offsetBytes: 2 ** 39, lengthBytes: MiB, kind: "data" },
          { offsetBytes: 2 ** 39 + MiB, lengthBytes: MiB, kind: "hole" },
        ]);
      } else {
        expect(all).toEqual([{ offsetBytes: 0, lengthBytes: 2 ** 40, kind: "data" }]);
        expect(window).toEqual([{ offsetBytes: 2 ** 39 - MiB, lengthBytes: 3 * MiB, kind: "data" }]);
      }
      expect(await dev.extents(5, 0)).toEqual([]);
    } finally {
      await dev.close();
    }
  });

  it.skipIf(!runs)(
    "readIntoSparse returns the bytes of a read and vouches only for zeros it returned",
    async () => {
      const dev = await FileDevice.open(file("sparse-read.img"), { createSizeBytes: 4 * MiB });
      try {
        const a = randomBytes(64 * KiB);
        const b = randomBytes(4 * KiB);
        await dev.write(256 * KiB, a);
        await dev.write(3 * MiB, Buffer.alloc(64 * KiB)); // written zeros: data to SEEK_DATA
        await dev.write(3 * MiB + 64 * KiB, b);
        const target = Buffer.alloc(4 * MiB - 512, 0xee); // stale bytes must not survive
        const zeros = await dev.readIntoSparse(512, target);
        expect(target.equals(await dev.read(512, 4 * MiB - 512))).toBe(true);
        for (const z of zeros) {
          const run = target.subarray(z.offsetBytes - 512, z.offsetBytes - 512 + z.lengthBytes);
          expect(run.every((x) => x === 0)).toBe(true);
        }
        const vouched = zeros.reduce((n, z) => n + z.lengthBytes, 0);
        if (native) {
          // The holes around the two data runs (file-system blocks of 4 KiB or less).
          expect(zeros[0]).toEqual({ offsetBytes: 512, lengthBytes: 256 * KiB - 512 });
          expect(vouched).toBe(4 * MiB - 512 - 64 * KiB - 68 * KiB);
        } else {
          // Every all-zero page read, the written zeros included.
          expect(zeros[0]).toEqual({ offsetBytes: 4 * KiB, lengthBytes: 252 * KiB });
          expect(vouched).toBe(4 * MiB - 4 * KiB - 64 * KiB - 4 * KiB);
        }
      } finally {
        await dev.close();
      }
    },
  );

  it.skipIf(!runs)("discard punches a hole with the addon and is a harmless no-op without", async () => {
    const path = file("discard.img");
    const dev = await FileDevice.open(path, { createSizeBytes: 4 * MiB });
    const data = randomBytes(4 * MiB);
    try {
      await dev.write(0, data);
      await dev.flush();
      const before = (await fsp.stat(path)).blocks;
      await dev.discard(MiB + 100, 2 * MiB, { fua: true });
      const after = await dev.read(0, 4 * MiB);
      expect(after.subarray(0, MiB + 100).equals(data.subarray(0, MiB + 100))).toBe(true);
      expect(after.subarray(3 * MiB + 100).equals(data.subarray(3 * MiB + 100))).toBe(true);
      const middle = after.subarray(MiB + 100, 3 * MiB + 100);
      if (native) {
        expect(middle.every((b) => b === 0)).toBe(true);
        // The whole file-system blocks inside the range are deallocated.
        expect((await fsp.stat(path)).blocks).toBeLessThanOrEqual(before - (2 * MiB - 8 * KiB) / 512);
        const holes = (await dev.extents(0, dev.sizeBytes)).filter((e) => e.kind === "hole");
        expect(holes).toHaveLength(1);
        expect(holes[0]!.offsetBytes).toBeGreaterThanOrEqual(MiB + 100);
        expect(holes[0]!.offsetBytes + holes[0]!.lengthBytes).toBeLessThanOrEqual(3 * MiB + 100);
      } else {
        expect(middle.equals(data.subarray(MiB + 100, 3 * MiB + 100))).toBe(true);
      }
    } finally {
      await dev.close();
    }
  });

  it.skipIf(!runs)("writeZeroes reads back as zeros at odd offsets, with and without mayTrim", async () => {
    const path = file("zeroes.img");
    const dev = await FileDevice.open(path, { createSizeBytes: 3 * MiB + 17 });
    try {
      const model = randomBytes(dev.sizeBytes);
      await dev.write(0, model);
      await dev.writeZeroes(1000, MiB + 5);
      model.fill(0, 1000, 1000 + MiB + 5);
      await dev.writeZeroes(2 * MiB + 7, 300_000, { mayTrim: true, fua: true });
      model.fill(0, 2 * MiB + 7, 2 * MiB + 7 + 300_000);
      await dev.writeZeroes(dev.sizeBytes - 10, 10);
      model.fill(0, dev.sizeBytes - 10);
      expect((await dev.read(0, dev.sizeBytes)).equals(model)).toBe(true);
      const onDisk = await fsp.readFile(path);
      expect(onDisk.equals(model)).toBe(true);
      const holes = (await dev.extents(0, dev.sizeBytes)).filter((e) => e.kind === "hole");
      if (native) expect(holes.length).toBeGreaterThanOrEqual(1);
      else expect(holes).toEqual([]);
    } finally {
      await dev.close();
    }
  });

  it.skipIf(!runs)("behaves like a flat byte array under random writes, zeroes and discards", async () => {
    const SIZE = 256 * KiB + 333;
    const op = fc.record({
      kind: fc.constantFrom("write", "zero", "trim", "discard"),
      offset: fc.nat(SIZE - 1),
      length: fc.nat(64 * KiB),
      byte: fc.integer({ min: 1, max: 255 }),
    });
    let run = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 12 }), async (ops) => {
        const path = file(`model-${run++}.img`);
        const dev = await FileDevice.open(path, { createSizeBytes: SIZE });
        const model = Buffer.alloc(SIZE);
        try {
          for (const o of ops) {
            const length = Math.min(o.length, SIZE - o.offset);
            const end = o.offset + length;
            if (o.kind === "write") {
              await dev.write(o.offset, Buffer.alloc(length, o.byte));
              model.fill(o.byte, o.offset, end);
            } else if (o.kind === "discard") {
              await dev.discard(o.offset, length);
              // A punched file range reads as zeros; without the addon discard leaves the data.
              if (native) model.fill(0, o.offset, end);
            } else {
              await dev.writeZeroes(o.offset, length, { mayTrim: o.kind === "trim" });
              model.fill(0, o.offset, end);
            }
          }
          expect((await dev.read(0, SIZE)).equals(model)).toBe(true);
          const extents = await dev.extents(0, SIZE);
          expect(extents.reduce((sum, e) => sum + e.lengthBytes, 0)).toBe(SIZE);
          for (const e of extents) {
            if (e.kind !== "hole") continue;
            expect(model.subarray(e.offsetBytes, e.offsetBytes + e.lengthBytes).every((b) => b === 0)).toBe(
              true,
            );
          }
        } finally {
          await dev.close();
          await fsp.rm(path);
        }
      }),
      { numRuns: 25 },
    );
  });

  it.skipIf(!runs)("kcopyd copies file to files without buffers when the addon offloads", async () => {
    const SIZE = 5 * MiB + 3 * 512;
    const src = await FileDevice.open(file("off-src.img"), { createSizeBytes: SIZE });
    const dsts = [
      await FileDevice.open(file("off-a.img"), { createSizeBytes: SIZE }),
      await FileDevice.open(file("off-b.img"), { createSizeBytes: SIZE + MiB }),
    ];
    const kc = new KcopydClient({ pages: 64 });
    try {
      const data = randomBytes(SIZE);
      await src.write(0, data);
      const count = SIZE / 512 - 1;
      const result = await kc.copyAsync({ dev: src, sector: 1, count }, [
        { dev: dsts[0]!, sector: 0, count },
        { dev: dsts[1]!, sector: 2048, count },
      ]);
      expect(result).toEqual({ readErr: false, writeErr: 0 });
      expect((await dsts[0]!.read(0, count * 512)).equals(data.subarray(512))).toBe(true);
      expect((await dsts[1]!.read(MiB, count * 512)).equals(data.subarray(512))).toBe(true);
      // copy_file_range moves the data in the kernel: no page of the budget was ever leased.
      if (native) expect(kc.pool.peakPages).toBe(0);
      else expect(kc.pool.peakPages).toBeGreaterThan(0);
    } finally {
      await kc.destroy();
      for (const d of [src, ...dsts]) await d.close();
    }
  });

  it.skipIf(!runs)("a destination that refuses the offload gets the bytes through a buffer", async () => {
    const SIZE = 3 * MiB;
    const src = await FileDevice.open(file("mix-src.img"), { createSizeBytes: SIZE });
    const fileDst = await FileDevice.open(file("mix-dst.img"), { createSizeBytes: SIZE });
    const roPath = file("mix-ro.img");
    await fsp.writeFile(roPath, Buffer.alloc(SIZE, 7));
    const roDst = await FileDevice.open(roPath, { readOnly: true });
    const memDst = new MemoryDevice(SIZE);
    const kc = new KcopydClient({ pages: 64 });
    try {
      const data = randomBytes(SIZE);
      await src.write(0, data);
      const count = SIZE / 512;
      const region = (dev: FileDevice | MemoryDevice) => ({ dev, sector: 0, count });
      const result = await kc.copyAsync(
        region(src),
        [region(fileDst), region(roDst), region(memDst)],
        KcopydFlags.IGNORE_ERROR,
      );
      // The read-only file fails its writes (bit 1); the file and memory destinations are whole.
      expect(result).toEqual({ readErr: false, writeErr: 0b010 });
      expect((await fileDst.read(0, SIZE)).equals(data)).toBe(true);
      expect((await memDst.read(0, SIZE)).equals(data)).toBe(true);
      expect((await fsp.readFile(roPath)).every((b) => b === 7)).toBe(true);
    } finally {
      await kc.destroy();
      for (const d of [src, fileDst, roDst, memDst]) await d.close();
    }
  });

  it.skipIf(!runs)("a source file that shrank after open copies as zeros past its end", async () => {
    const SIZE = 2 * MiB;
    const srcPath = file("shrunk-src.img");
    const src = await FileDevice.open(srcPath, { createSizeBytes: SIZE });
    const dst = await FileDevice.open(file("shrunk-dst.img"), { createSizeBytes: SIZE });
    const kc = new KcopydClient();
    try {
      const data = randomBytes(SIZE);
      await src.write(0, data);
      await dst.write(0, Buffer.alloc(SIZE, 0xee));
      await fsp.truncate(srcPath, MiB + 1000);
      const count = SIZE / 512;
      const result = await kc.copyAsync({ dev: src, sector: 0, count }, [{ dev: dst, sector: 0, count }]);
      expect(result).toEqual({ readErr: false, writeErr: 0 });
      const expected = Buffer.alloc(SIZE);
      data.copy(expected, 0, 0, MiB + 1000);
      expect((await dst.read(0, SIZE)).equals(expected)).toBe(true);
    } finally {
      await kc.destroy();
      await src.close();
      await dst.close();
    }
  });

  it.skipIf(!runs)("kcopyd SKIP_HOLES copies the data and leaves the destination sparse", async () => {
    const SIZE = 64 * MiB;
    const src = await FileDevice.open(file("skip-src.img"), { createSizeBytes: SIZE });
    const dstPath = file("skip-dst.img");
    await fsp.writeFile(dstPath, Buffer.alloc(0));
    const dst = await FileDevice.open(dstPath, { createSizeBytes: SIZE });
    const kc = new KcopydClient({ pages: 256 });
    try {
      const a = randomBytes(MiB + 4 * KiB);
      const b = randomBytes(300 * KiB);
      await src.write(4 * MiB, a);
      await src.write(SIZE - 300 * KiB, b);
      // Stale bytes in the destination's holes must become zeros.
      await dst.write(20 * MiB, Buffer.alloc(MiB, 0xee));
      const count = SIZE / 512;
      const result = await kc.copyAsync(
        { dev: src, sector: 0, count },
        [{ dev: dst, sector: 0, count }],
        KcopydFlags.SKIP_HOLES,
      );
      expect(result).toEqual({ readErr: false, writeErr: 0 });
      expect((await dst.read(0, SIZE)).equals(await src.read(0, SIZE))).toBe(true);
      if (native) {
        expect(await dst.extents(0, SIZE)).toEqual(await src.extents(0, SIZE));
        expect((await fsp.stat(dstPath)).blocks * 512).toBeLessThanOrEqual(2 * MiB);
      }
    } finally {
      await kc.destroy();
      await src.close();
      await dst.close();
    }
  });
});

/** `losetup` needs root and the loop driver; CI must have both (scripts/setup.sh installs `mount`). */
function loopAvailable(): string | null {
  try {
    execFileSync("losetup", ["--version"], { stdio: "ignore" });
  } catch {
    return "losetup is not installed";
  }
  if (process.getuid?.() !== 0) return "losetup needs root";
  return null;
}
const loopMissing = loopAvailable();

describe("FileDevice on a loop device", () => {
  it.skipIf(!CI && loopMissing !== null)("has losetup and root (required under CI)", () => {
    expect(loopMissing).toBeNull();
  });
});

describe.each(MODES)("FileDevice on a loop device, $mode path", ({ native, runs }) => {
  const SIZE = 8 * MiB;
  const BLOCK = 4096;
  let backing: string;
  let loop: string | undefined;
  let dev: FileDevice;
  let saved: string | undefined;
  const active = runs && (loopMissing === null || CI);

  beforeAll(async () => {
    if (!active) return;
    if (loopMissing) throw new Error(`cannot test loop devices: ${loopMissing}`);
    saved = process.env[NO_NATIVE_ENV];
    if (native) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = "1";
    backing = join(dir, `${native ? "n" : "js"}-loop-backing.img`);
    await fsp.writeFile(backing, Buffer.alloc(0));
    await fsp.truncate(backing, SIZE);
    loop = execFileSync("losetup", ["-f", "--show", "-b", String(BLOCK), backing], {
      encoding: "utf8",
    }).trim();
    dev = await FileDevice.open(loop);
  });
  afterAll(async () => {
    if (!active) return;
    await dev?.close();
    if (loop) execFileSync("losetup", ["-d", loop]);
    if (saved === undefined) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = saved;
  });

  it.skipIf(!active)("takes its size and logical block size from sysfs", () => {
    expect(dev.isBlockDevice).toBe(true);
    expect(dev.sizeBytes).toBe(SIZE);
    expect(dev.logicalBlockSize).toBe(BLOCK);
    expect(dev.name).toBe(loop);
  });

  it.skipIf(!active)("writes at odd offsets reach the backing file after flush", async () => {
    const data = randomBytes(3 * BLOCK + 123);
    await dev.write(BLOCK + 7, data);
    await dev.flush();
    expect((await dev.read(BLOCK + 7, data.length)).equals(data)).toBe(true);
    const fh = await fsp.open(backing, "r");
    try {
      const onDisk = Buffer.alloc(data.length);
      await fh.read(onDisk, 0, data.length, BLOCK + 7);
      expect(onDisk.equals(data)).toBe(true);
    } finally {
      await fh.close();
    }
  });

  it.skipIf(!active)("writeZeroes (BLKZEROOUT inside, written zeros at the unaligned edges)", async () => {
    const model = randomBytes(2 * MiB);
    await dev.write(MiB, model);
    await dev.writeZeroes(MiB + 1000, MiB + 3 * BLOCK + 5, { fua: true });
    model.fill(0, 1000, 1000 + MiB + 3 * BLOCK + 5);
    await dev.writeZeroes(MiB + 2 * MiB - 100, 50);
    model.fill(0, 2 * MiB - 100, 2 * MiB - 50);
    expect((await dev.read(MiB, 2 * MiB)).equals(model)).toBe(true);
  });

  it.skipIf(!active)("discard (BLKDISCARD) drops whole blocks; without the addon it is a no-op", async () => {
    const data = randomBytes(MiB);
    const at = 4 * MiB;
    await dev.write(at, data);
    await dev.flush();
    await dev.discard(at + 100, 4 * BLOCK, { fua: true });
    const after = await dev.read(at, MiB);
    // Partial blocks at the edges are left alone: [at+100, at+BLOCK) and [at+4*BLOCK, at+4*BLOCK+100).
    expect(after.subarray(0, BLOCK).equals(data.subarray(0, BLOCK))).toBe(true);
    expect(after.subarray(4 * BLOCK).equals(data.subarray(4 * BLOCK))).toBe(true);
    const inner = after.subarray(BLOCK, 4 * BLOCK);
    // The loop driver discards by punching its backing file, so discarded blocks read as zeros.
    if (native) expect(inner.every((b) => b === 0)).toBe(true);
    else expect(inner.equals(data.subarray(BLOCK, 4 * BLOCK))).toBe(true);
  });

  it.skipIf(!active)(
    "kcopyd copies a file onto the block device and back (no offload: buffers)",
    async () => {
      const LEN = 3 * MiB;
      const src = await FileDevice.open(join(dir, `${native ? "n" : "js"}-to-loop.img`), {
        createSizeBytes: LEN,
      });
      const back = await FileDevice.open(join(dir, `${native ? "n" : "js"}-from-loop.img`), {
        createSizeBytes: LEN,
      });
      const kc = new KcopydClient({ pages: 64 });
      try {
        const data = randomBytes(LEN);
        await src.write(0, data);
        const count = LEN / 512;
        const at = (2 * MiB) / 512;
        expect(await kc.copyAsync({ dev: src, sector: 0, count }, [{ dev, sector: at, count }])).toEqual({
          readErr: false,
          writeErr: 0,
        });
        expect(await kc.copyAsync({ dev, sector: at, count }, [{ dev: back, sector: 0, count }])).toEqual({
          readErr: false,
          writeErr: 0,
        });
        expect((await back.read(0, LEN)).equals(data)).toBe(true);
        expect(kc.pool.peakPages).toBeGreaterThan(0);
      } finally {
        await kc.destroy();
        await src.close();
        await back.close();
      }
    },
  );

  it.skipIf(!active)("reports all of a block device as data", async () => {
    expect(await dev.extents(0, SIZE)).toEqual([{ offsetBytes: 0, lengthBytes: SIZE, kind: "data" }]);
    expect(await dev.extents(BLOCK, 10)).toEqual([{ offsetBytes: BLOCK, lengthBytes: 10, kind: "data" }]);
  });
});

describe("FileDevice.open", () => {
  it("refuses what is neither a file nor a block device, naming it", async () => {
    await expect(FileDevice.open(dir, { readOnly: true })).rejects.toThrow(
      /udm-filedev-.*: not a regular file or block device/,
    );
    await expect(FileDevice.open(dir)).rejects.toMatchObject({ code: "EISDIR" });
    await expect(FileDevice.open("/dev/null")).rejects.toThrow(/not a regular file or block device/);
  });

  it("creates a sparse file of the asked size and never shrinks an existing one", async () => {
    const path = join(dir, "create.img");
    const dev = await FileDevice.open(path, { createSizeBytes: 10 * GiB });
    expect(dev.sizeBytes).toBe(10 * GiB);
    await dev.close();
    expect((await fsp.stat(path)).blocks).toBe(0);
    const again = await FileDevice.open(path, { createSizeBytes: MiB });
    expect(again.sizeBytes).toBe(10 * GiB);
    await again.close();
  });

  it("refuses a bad syncReadMaxBytes, naming it", async () => {
    await expect(FileDevice.open(join(dir, "bad-opt.img"), { syncReadMaxBytes: -1 })).rejects.toThrow(
      /bad-opt\.img\): syncReadMaxBytes must be a non-negative integer, got -1/,
    );
    await expect(FileDevice.open(join(dir, "bad-opt.img"), { syncReadMaxBytes: 1.5 })).rejects.toThrow(
      RangeError,
    );
  });
});

/**
 * Whether the file system of `dir` serves preadv2(RWF_NOWAIT): ext4, xfs, btrfs do; tmpfs refuses
 * it with EOPNOTSUPP on Linux 6.18. Probed once with the addon (null without it).
 */
async function nowaitSupportedIn(where: string): Promise<boolean | null> {
  const native = withNative(true, () => nativeFileOps());
  if (!native?.preadNowait) return null;
  const path = join(where, `nowait-probe-${process.pid}.img`);
  const fh = await fsp.open(path, "w+");
  try {
    await fh.write(Buffer.alloc(4 * KiB, 1), 0, 4 * KiB, 0);
    native.preadNowait(fh.fd, Buffer.alloc(4 * KiB), 0);
    return true;
  } catch (err) {
    if ((err as { code?: unknown }).code === "EOPNOTSUPP") return false;
    throw err;
  } finally {
    await fh.close();
    await fsp.rm(path, { force: true });
  }
}

describe.each(MODES)("FileDevice reads from the page cache, $mode path", ({ native, runs }) => {
  let saved: string | undefined;
  let nowait: boolean | null = null;
  beforeAll(async () => {
    nowait = await nowaitSupportedIn(dir);
  });
  beforeEach(() => {
    saved = process.env[NO_NATIVE_ENV];
    if (native) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = "1";
  });
  afterEach(() => {
    if (saved === undefined) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = saved;
  });
  const file = (name: string) => join(dir, `${native ? "n" : "js"}-cache-${name}`);
  /** posix_fadvise(DONTNEED) through the addon whatever the mode (the pure-JS device ignores it). */
  const dropCache = (dev: FileDevice, offset: number, length: number) =>
    withNative(true, () => nativeFileOps())!.dropCache!(dev.fd, offset, length);
  /** Where the synchronous path must work: the addon on a file system that serves RWF_NOWAIT. */
  const syncExpected = () => native && nowait === true;

  it.skipIf(!runs)("under CI, os.tmpdir() serves RWF_NOWAIT so the synchronous path is tested", () => {
    if (native && CI) expect(nowait, `${tmpdir()} refused preadv2(RWF_NOWAIT)`).toBe(true);
  });

  it.skipIf(!runs)("copies cached data before readInto's promise is even awaited", async () => {
    const dev = await FileDevice.open(file("hot.img"), { createSizeBytes: MiB });
    try {
      const data = randomBytes(MiB);
      await dev.write(0, data);
      const target = Buffer.alloc(64 * KiB, 0xaa);
      const pending = dev.readInto(100 * KiB + 3, target);
      const expected = data.subarray(100 * KiB + 3, 164 * KiB + 3);
      // The synchronous path has filled the buffer already. (Without it nothing can be said here:
      // a thread-pool read may complete before this line runs.)
      if (syncExpected()) expect(target.equals(expected)).toBe(true);
      await pending;
      expect(target.equals(expected)).toBe(true);
      const stats = dev.readStats;
      if (syncExpected()) {
        expect(stats).toEqual({
          syncAttempts: 1,
          syncReads: 1,
          syncBytes: 64 * KiB,
          poolReads: 0,
          poolBytes: 0,
          syncPath: true,
        });
      } else {
        expect(stats.syncBytes).toBe(0);
        expect(stats.poolBytes).toBe(64 * KiB);
        if (!native) expect(stats).toMatchObject({ syncAttempts: 0, syncPath: false });
      }
      // Above the cap, and with the path turned off, reads go to the thread pool only.
      await dev.read(0, MiB);
      expect(dev.readStats.syncAttempts).toBe(stats.syncAttempts);
      expect(dev.readStats.poolBytes).toBe(stats.poolBytes + MiB);
    } finally {
      await dev.close();
    }
    const off = await FileDevice.open(file("hot.img"), { syncReadMaxBytes: 0 });
    try {
      expect((await off.read(0, 4 * KiB)).length).toBe(4 * KiB);
      expect(off.readStats).toMatchObject({ syncAttempts: 0, poolReads: 1, syncPath: false });
    } finally {
      await off.close();
    }
  });

  it.skipIf(!runs || !nativeBuilt)(
    "reads what is not cached, or only partly, through the thread pool",
    async () => {
      const dev = await FileDevice.open(file("cold.img"), { createSizeBytes: 2 * MiB });
      try {
        const data = randomBytes(2 * MiB);
        await dev.write(0, data);
        await dev.flush();
        // Drop it all (clean after the flush), then cache [MiB - 64 KiB, MiB) again by rewriting
        // it. (Dropping only part of the file is unreliable: a large folio that straddles the
        // range's edge stays, ext4 on Linux 6.18 makes 2 MiB ones.)
        dropCache(dev, 0, 0);
        await dev.write(MiB - 64 * KiB, data.subarray(MiB - 64 * KiB, MiB));
        const target = Buffer.alloc(128 * KiB, 0xaa);
        const pending = dev.readInto(MiB - 64 * KiB, target);
        const expected = data.subarray(MiB - 64 * KiB, MiB + 64 * KiB);
        // Synchronously: the cached half (the pool may be quick enough to race with this check for
        // the other half, so only the counters tell which path read it).
        if (syncExpected())
          expect(target.subarray(0, 64 * KiB).equals(expected.subarray(0, 64 * KiB))).toBe(true);
        await pending;
        expect(target.equals(expected)).toBe(true);
        if (syncExpected()) {
          expect(dev.readStats).toMatchObject({ syncReads: 1, syncBytes: 64 * KiB, poolBytes: 64 * KiB });
        }
        // Wholly uncached: the attempt misses (EAGAIN) and the pool reads it all.
        dropCache(dev, 0, 0);
        const before = dev.readStats;
        const cold = Buffer.alloc(4 * KiB, 0xaa);
        await dev.readInto(512 * KiB, cold);
        expect(cold.equals(data.subarray(512 * KiB, 516 * KiB))).toBe(true);
        expect(dev.readStats.syncBytes).toBe(before.syncBytes);
        expect(dev.readStats.poolBytes).toBe(before.poolBytes + 4 * KiB);
        expect(dev.readStats.syncPath).toBe(syncExpected());
      } finally {
        await dev.close();
      }
    },
  );

  it.skipIf(!runs)("a short read at the end of a file that shrank completes with zeros", async () => {
    const path = file("shrink.img");
    const dev = await FileDevice.open(path, { createSizeBytes: MiB });
    try {
      const data = randomBytes(MiB);
      await dev.write(0, data);
      await fsp.truncate(path, MiB - 1000);
      const tail = await dev.read(MiB - 4 * KiB, 4 * KiB);
      const expected = Buffer.alloc(4 * KiB);
      data.copy(expected, 0, MiB - 4 * KiB, MiB - 1000);
      expect(tail.equals(expected)).toBe(true);
      if (syncExpected()) {
        expect(dev.readStats).toMatchObject({ syncReads: 1, syncBytes: 4 * KiB - 1000, poolBytes: 0 });
      }
      // Wholly past the new end: 0 bytes from the cache, 0 from the pool, zeros.
      expect((await dev.read(MiB - 512, 512)).every((b) => b === 0)).toBe(true);
      expect(dev.readStats.syncPath).toBe(syncExpected());
    } finally {
      await dev.close();
    }
  });

  it.skipIf(!runs)("matches a byte-array model under random writes, cache drops and reads", async () => {
    const SIZE = 3 * MiB + 777;
    const dev = await FileDevice.open(file("model.img"), {
      createSizeBytes: SIZE,
      syncReadMaxBytes: 128 * KiB,
    });
    const model = Buffer.alloc(SIZE);
    const op = fc.record({
      kind: fc.constantFrom("write", "drop", "read", "read", "read"),
      offset: fc.nat(SIZE - 1),
      length: fc.integer({ min: 1, max: 300 * KiB }),
      seed: fc.nat(255),
    });
    try {
      await fc.assert(
        fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 20 }), async (ops) => {
          for (const o of ops) {
            const length = Math.min(o.length, SIZE - o.offset);
            if (o.kind === "write") {
              const bytes = Buffer.alloc(length, o.seed);
              await dev.write(o.offset, bytes);
              bytes.copy(model, o.offset);
            } else if (o.kind === "drop") {
              if (!nativeBuilt) continue;
              // Half the drops flush and drop the whole file (misses for sure); the others drop
              // a range, dirty or not (the kernel drops what it can).
              if (o.seed % 2) {
                await dev.flush();
                dropCache(dev, 0, 0);
              } else {
                dropCache(dev, o.offset, length);
              }
            } else {
              expect(
                (await dev.read(o.offset, length)).equals(model.subarray(o.offset, o.offset + length)),
              ).toBe(true);
            }
          }
        }),
        { numRuns: 30 },
      );
      const stats = dev.readStats;
      if (syncExpected()) {
        // Both paths served this workload: cached reads, and misses after the drops.
        expect(stats.syncBytes).toBeGreaterThan(0);
        expect(stats.poolBytes).toBeGreaterThan(0);
      } else {
        expect(stats.syncBytes).toBe(0);
      }
      expect((await dev.read(0, SIZE)).equals(model)).toBe(true);
    } finally {
      await dev.close();
    }
  });

  it.skipIf(!runs || !native || !nativeBuilt)(
    "stops trying where the file system refuses RWF_NOWAIT",
    async () => {
      // tmpfs refuses preadv2(RWF_NOWAIT) on Linux 6.18: one attempt, then thread pool only.
      const shm = "/dev/shm";
      const where = (await fsp.stat(shm).catch(() => null))?.isDirectory() ? shm : dir;
      const supported = await nowaitSupportedIn(where);
      const path = join(where, `udm-filedev-nowait-${process.pid}.img`);
      const dev = await FileDevice.open(path, { createSizeBytes: MiB });
      try {
        const data = randomBytes(MiB);
        await dev.write(0, data);
        for (let i = 0; i < 8; i++) {
          const at = i * 100 * KiB;
          expect((await dev.read(at, 4 * KiB)).equals(data.subarray(at, at + 4 * KiB))).toBe(true);
        }
        const stats = dev.readStats;
        if (supported) {
          expect(stats).toMatchObject({ syncAttempts: 8, syncReads: 8, poolReads: 0, syncPath: true });
        } else {
          expect(stats).toMatchObject({ syncAttempts: 1, syncReads: 0, poolReads: 8, syncPath: false });
        }
      } finally {
        await dev.close();
        await fsp.rm(path, { force: true });
      }
    },
  );
});

describe("native preadNowait and dropCache", () => {
  it.skipIf(!nativeBuilt)(
    "returns cached bytes, -1 for a miss, 0 at EOF, and names bad arguments",
    async () => {
      const native = withNative(true, () => nativeFileOps())!;
      const fh = await fsp.open(join(dir, "pread-nowait.img"), "w+");
      try {
        const data = randomBytes(256 * KiB);
        await fh.write(data, 0, data.length, 0);
        const target = Buffer.alloc(8 * KiB);
        if (!(await nowaitSupportedIn(dir))) {
          expect(() => native.preadNowait!(fh.fd, target, 0)).toThrow(
            expect.objectContaining({ code: "EOPNOTSUPP" }),
          );
          return;
        }
        expect(native.preadNowait!(fh.fd, target, 4096)).toBe(8 * KiB);
        expect(target.equals(data.subarray(4096, 4096 + 8 * KiB))).toBe(true);
        expect(
          native.preadNowait!(fh.fd, new Uint8Array(target.buffer, target.byteOffset + 100, 10), 7),
        ).toBe(10);
        expect(target.subarray(100, 110).equals(data.subarray(7, 17))).toBe(true);
        expect(native.preadNowait!(fh.fd, target, 256 * KiB - 100)).toBe(100);
        expect(native.preadNowait!(fh.fd, target, 256 * KiB)).toBe(0);
        expect(native.preadNowait!(fh.fd, Buffer.alloc(0), 0)).toBe(0);
        await fh.datasync();
        native.dropCache!(fh.fd, 0, 0);
        expect(native.preadNowait!(fh.fd, target, 128 * KiB)).toBe(-1);
        expect(() => native.preadNowait!(fh.fd, new Uint16Array(4) as unknown as Uint8Array, 0)).toThrow(
          /target must be a Buffer or Uint8Array/,
        );
        expect(() => native.preadNowait!(fh.fd, target, -1)).toThrow(/position must be a non-negative/);
        expect(() => native.dropCache!(fh.fd, 0, -5)).toThrow(/length must be a non-negative/);
      } finally {
        await fh.close();
      }
      expect(() => native.preadNowait!(1 << 20, Buffer.alloc(1), 0)).toThrow(
        expect.objectContaining({ code: "EBADF" }),
      );
    },
  );
});

describe("FileDevice synchronous reads and the event loop", () => {
  it("a loop of cached reads lets the event loop turn at least every streak, at any depth", async () => {
    const dev = await FileDevice.open(join(dir, "streak.img"), { createSizeBytes: 64 * KiB });
    try {
      await dev.write(0, randomBytes(64 * KiB));
      for (const qd of [1, 8]) {
        // An immediate that re-arms itself ticks once per turn of the event loop; a synchronous
        // read never lets it run, so the reads between two ticks are what one turn did.
        let reads = 0;
        let readsAtTick = 0;
        let mostPerTurn = 0;
        let ticks = 0;
        let running = true;
        const tick = () => {
          ticks++;
          mostPerTurn = Math.max(mostPerTurn, reads - readsAtTick);
          readsAtTick = reads;
          if (running) setImmediate(tick);
        };
        setImmediate(tick);
        const READS = 4 * SYNC_READ_STREAK_READS;
        await Promise.all(
          Array.from({ length: qd }, async () => {
            const buf = Buffer.alloc(4 * KiB);
            while (reads < READS) {
              reads++;
              await dev.readInto((reads % 16) * 4 * KiB, buf);
            }
          }),
        );
        running = false;
        mostPerTurn = Math.max(mostPerTurn, reads - readsAtTick);
        expect(ticks).toBeGreaterThanOrEqual(3);
        // One streak plus the thread-pool reads completing in the same turn, with room to spare.
        expect(mostPerTurn).toBeLessThanOrEqual(SYNC_READ_STREAK_READS + 2 * qd);
      }
    } finally {
      await dev.close();
    }
  });
});
