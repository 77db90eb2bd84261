import { randomBytes } from "node:crypto";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { zeroRunsOf } from "./block-device.js";
import { ErrorDevice } from "./error-device.js";
import { IoError } from "./errors.js";
import { FlakeyDevice } from "./flakey-device.js";
import { KcopydClient } from "./kcopyd.js";
import { LinearDevice } from "./linear-device.js";
import { MEMORY_CHUNK_BYTES, MemoryDevice } from "./memory-device.js";
import { parseSize } from "./size.js";
import { basicTargets, TargetArgError, type TargetContext } from "./target-registry.js";
import { ZeroDevice } from "./zero-device.js";

describe("MemoryDevice", () => {
  it("holds sizes far beyond 2 GiB and allocates only what was written", async () => {
    const dev = new MemoryDevice(16 * 2 ** 40);
    const data = randomBytes(200_000);
    const at = 9 * 2 ** 40 + 12345;
    await dev.write(at, data);
    expect((await dev.read(at, data.length)).equals(data)).toBe(true);
    expect(dev.allocatedBytes).toBeLessThanOrEqual(5 * MEMORY_CHUNK_BYTES);
    const ext = await dev.extents(0, dev.sizeBytes);
    expect(ext.map((e) => e.kind)).toEqual(["hole", "data", "hole"]);
    expect(ext.reduce((s, e) => s + e.lengthBytes, 0)).toBe(dev.sizeBytes);
  });

  it("frees whole chunks on write-zeroes and discard, zeroing partial ones", async () => {
    const dev = new MemoryDevice(1 << 20);
    await dev.write(0, Buffer.alloc(1 << 20, 0xaa));
    await dev.writeZeroes(100, 3 * MEMORY_CHUNK_BYTES);
    expect(dev.allocatedBytes).toBe((16 - 2) * MEMORY_CHUNK_BYTES);
    const buf = await dev.read(0, 1 << 20);
    expect(buf.subarray(0, 100).every((b) => b === 0xaa)).toBe(true);
    expect(buf.subarray(100, 100 + 3 * MEMORY_CHUNK_BYTES).every((b) => b === 0)).toBe(true);
    expect(buf[100 + 3 * MEMORY_CHUNK_BYTES]).toBe(0xaa);
    await dev.discard(0, 1 << 20);
    expect(dev.allocatedBytes).toBe(0);
  });

  it("rejects out-of-range I/O and writes to a read-only device", async () => {
    const dev = new MemoryDevice(4096);
    await expect(dev.read(4000, 200)).rejects.toThrow(RangeError);
    await expect(dev.write(-1, Buffer.alloc(1))).rejects.toThrow(/outside the device/);
    const ro = new MemoryDevice(4096, { readOnly: true });
    await expect(ro.write(0, Buffer.alloc(1))).rejects.toMatchObject({ code: "EPERM" });
  });

  it("behaves like a flat byte array under random writes, zeroes and reads", async () => {
    const SIZE = 5 * MEMORY_CHUNK_BYTES + 333;
    const op = fc.record({
      kind: fc.constantFrom("write", "zero", "discard"),
      offset: fc.nat(SIZE - 1),
      length: fc.nat(2 * MEMORY_CHUNK_BYTES),
      byte: fc.integer({ min: 1, max: 255 }),
    });
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 20 }), async (ops) => {
        const dev = new MemoryDevice(SIZE);
        const model = Buffer.alloc(SIZE);
        for (const o of ops) {
          const length = Math.min(o.length, SIZE - o.offset);
          if (o.kind === "write") {
            await dev.write(o.offset, Buffer.alloc(length, o.byte));
            model.fill(o.byte, o.offset, o.offset + length);
          } else {
            await (o.kind === "zero" ? dev.writeZeroes(o.offset, length) : dev.discard(o.offset, length));
            model.fill(0, o.offset, o.offset + length);
          }
        }
        expect((await dev.read(0, SIZE)).equals(model)).toBe(true);
        // Holes read as zeros.
        for (const e of await dev.extents(0, SIZE)) {
          if (e.kind === "hole") {
            expect(model.subarray(e.offsetBytes, e.offsetBytes + e.lengthBytes).every((b) => b === 0)).toBe(
              true,
            );
          }
        }
      }),
      { numRuns: 100 },
    );
  });
});

describe("readIntoSparse: the bytes of a read and the zero runs that same read vouches for", () => {
  it("MemoryDevice: unallocated chunks are zero runs, filled with zeros; LinearDevice shifts them", async () => {
    const C = MEMORY_CHUNK_BYTES;
    const dev = new MemoryDevice(8 * C);
    await dev.write(C, Buffer.alloc(C, 1));
    await dev.write(3 * C + 100, Buffer.alloc(10, 2));
    const target = Buffer.alloc(5 * C - 512, 0xee);
    const zeros = await dev.readIntoSparse(512, target);
    expect(target.equals(await dev.read(512, 5 * C - 512))).toBe(true);
    expect(zeros).toEqual([
      { offsetBytes: 512, lengthBytes: C - 512 },
      { offsetBytes: 2 * C, lengthBytes: C },
      { offsetBytes: 4 * C, lengthBytes: C },
    ]);
    const win = new LinearDevice(dev, C, 4 * C);
    const t2 = Buffer.alloc(3 * C, 0xee);
    expect(await win.readIntoSparse(0, t2)).toEqual([{ offsetBytes: C, lengthBytes: C }]);
    expect(t2.equals(await dev.read(C, 3 * C))).toBe(true);
    // Over a device that cannot vouch, linear reads plainly and vouches for nothing.
    const plain = new LinearDevice(new ZeroDevice(4 * C), 0, 4 * C);
    const t3 = Buffer.alloc(C, 0xee);
    expect(await plain.readIntoSparse(0, t3)).toEqual([]);
    expect(t3.every((b) => b === 0)).toBe(true);
  });

  it("zeroRunsOf finds the all-zero pages of a buffer, aligned to the device", () => {
    const data = Buffer.alloc(5 * 4096);
    data[4096 + 7] = 1; // page 1 (device page 1) has data
    // Read at 2048: device pages 1..5 are at buffer offsets 2048, 6144, ...
    expect(zeroRunsOf(data, 2048)).toEqual([{ offsetBytes: 8192, lengthBytes: 3 * 4096 }]);
    expect(zeroRunsOf(data, 0)).toEqual([
      { offsetBytes: 0, lengthBytes: 4096 },
      { offsetBytes: 8192, lengthBytes: 3 * 4096 },
    ]);
  });
});

describe("LinearDevice, ZeroDevice, ErrorDevice", () => {
  it("maps a window onto the device under it", async () => {
    const inner = new MemoryDevice(2 << 20);
    const win = new LinearDevice(inner, 2048 * 512, 100 * 512, { name: "part" });
    await win.write(0, Buffer.alloc(512, 1));
    expect((await inner.read(2048 * 512, 512)).every((b) => b === 1)).toBe(true);
    await expect(win.write(100 * 512, Buffer.alloc(1))).rejects.toThrow(/outside/);
    expect(win.table()).toBe("mem:2097152 2048");
    const ext = await win.extents(0, 100 * 512);
    expect(ext).toEqual([{ offsetBytes: 0, lengthBytes: 51200, kind: "data" }]);
    expect(() => new LinearDevice(inner, 1, 512)).toThrow(/whole sectors/);
  });

  it("zero reads zeros and swallows writes; error fails everything with EIO", async () => {
    const z = new ZeroDevice(1 << 30);
    await z.write(0, Buffer.alloc(10, 9));
    expect((await z.read(0, 10)).every((b) => b === 0)).toBe(true);
    const e = new ErrorDevice(1 << 20);
    await expect(e.read(0, 512)).rejects.toBeInstanceOf(IoError);
    await expect(e.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: "EIO" });
    await expect(e.flush()).rejects.toMatchObject({ code: "EIO" });
  });
});

describe("FlakeyDevice", () => {
  const mk = (features: object, now: () => number) =>
    new FlakeyDevice(new MemoryDevice(1 << 16), {
      upIntervalSeconds: 2,
      downIntervalSeconds: 1,
      now,
      ...features,
    });

  it("follows its up and down intervals from creation", async () => {
    let t = 0;
    const dev = mk({}, () => t);
    expect(dev.isDown()).toBe(false);
    t = 1999;
    expect(dev.isDown()).toBe(false);
    t = 2000;
    expect(dev.isDown()).toBe(true);
    await expect(dev.read(0, 512)).rejects.toMatchObject({ code: "EIO" });
    await expect(dev.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: "EIO" });
    t = 3000;
    expect(dev.isDown()).toBe(false);
    await dev.write(0, Buffer.alloc(512, 5));
  });

  it("drop_writes acknowledges and discards writes while down; reads work", async () => {
    const dev = mk({ dropWrites: true }, () => 0);
    await dev.write(0, Buffer.alloc(512, 1));
    dev.setMode("down");
    await dev.write(0, Buffer.alloc(512, 2));
    expect((await dev.read(0, 512))[0]).toBe(1);
    dev.setMode("auto");
    await dev.write(0, Buffer.alloc(512, 3));
    expect((await dev.read(0, 512))[0]).toBe(3);
  });

  it("error_writes fails writes, error_reads fails reads, each leaving the other path working", async () => {
    const ew = mk({ errorWrites: true }, () => 0);
    ew.setMode("down");
    await expect(ew.write(0, Buffer.alloc(1))).rejects.toMatchObject({ code: "EIO" });
    await ew.read(0, 512);
    const er = mk({ errorReads: true }, () => 0);
    er.setMode("down");
    await er.write(0, Buffer.alloc(512, 4));
    await expect(er.read(0, 512)).rejects.toMatchObject({ code: "EIO" });
    er.setMode("up");
    expect((await er.read(0, 512))[0]).toBe(4);
  });

  it("prints its table like dmsetup", () => {
    const dev = new FlakeyDevice(new MemoryDevice(1 << 20, { name: "disk.img" }), {
      startBytes: 4096,
      upIntervalSeconds: 5,
      downIntervalSeconds: 1,
      dropWrites: true,
    });
    expect(dev.table()).toBe("disk.img 8 5 1 1 drop_writes");
    expect(() => mk({ dropWrites: true, errorWrites: true }, () => 0)).toThrow(/mutually exclusive/);
  });
});

describe("basic target table parsers", () => {
  const context = (): TargetContext => {
    const devs = new Map<string, MemoryDevice>();
    return {
      kcopyd: new KcopydClient(),
      openDevice: async (spec) => {
        const d = devs.get(spec) ?? new MemoryDevice(2 << 20, { name: spec });
        devs.set(spec, d);
        return d;
      },
    };
  };
  const target = (name: string) => basicTargets.find((t) => t.name === name)!;

  it("builds linear, zero, error and flakey from dmsetup arguments and prints them back", async () => {
    const ctx = context();
    const lin = await target("linear").create(["a.img", "2048"], 512 * 100, ctx);
    expect(lin.table()).toBe("a.img 2048");
    expect(lin.sizeBytes).toBe(51200);
    expect((await target("zero").create([], 4096, ctx)).targetType).toBe("zero");
    expect((await target("error").create([], 4096, ctx)).targetType).toBe("error");
    const fl = await target("flakey").create(["a.img", "0", "3", "1", "1", "error_reads"], 4096, ctx);
    expect(fl.table()).toBe("a.img 0 3 1 1 error_reads");
  });

  it("names the bad argument and what was expected", async () => {
    const ctx = context();
    await expect(target("linear").create(["a.img", "x"], 512, ctx)).rejects.toMatchObject({
      argIndex: 1,
      message: expect.stringMatching(/offset \(sectors\) must be a non-negative whole number, got "x"/),
    });
    await expect(target("linear").create(["a.img", "4096"], 512, ctx)).rejects.toThrow(/does not fit/);
    await expect(target("zero").create(["1"], 512, ctx)).rejects.toBeInstanceOf(TargetArgError);
    await expect(
      target("flakey").create(["a.img", "0", "1", "1", "2", "drop_writes"], 512, ctx),
    ).rejects.toThrow(/feature count 2/);
    await expect(
      target("flakey").create(["a.img", "0", "1", "1", "1", "bogus"], 512, ctx),
    ).rejects.toMatchObject({
      argIndex: 5,
    });
  });
});

describe("parseSize", () => {
  it("reads the sizes admins write", () => {
    expect(parseSize("512")).toBe(512);
    expect(parseSize("4k")).toBe(4096);
    expect(parseSize("1G")).toBe(2 ** 30);
    expect(parseSize("1GiB")).toBe(2 ** 30);
    expect(parseSize("10GB")).toBe(10e9);
    expect(parseSize("2048s")).toBe(2 ** 20);
    expect(() => parseSize("12 potatoes")).toThrow(/invalid size "12 potatoes"/);
    expect(() => parseSize("1.3")).toThrow(/whole number/);
  });
});
