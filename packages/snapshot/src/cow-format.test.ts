import { randomBytes } from "node:crypto";
import {
  type BlockDevice,
  KcopydClient,
  MemoryDevice,
  type TargetContext,
  type WriteOptions,
} from "@udm/kcopyd";
import { describe, expect, it } from "vitest";
import { CowFormatError, formatCowInspection, initializeCow, inspectCow } from "./cow-format.js";
import type { OriginDevice } from "./origin-device.js";
import type { SnapshotDevice } from "./snapshot-device.js";
import { snapshotOriginTarget, snapshotTarget } from "./targets.js";

const MiB = 1 << 20;

function contextFor(devices: Record<string, BlockDevice>): TargetContext {
  return {
    openDevice: async (spec) => {
      const dev = devices[spec];
      if (!dev) throw new RangeError(`no device ${spec}`);
      return dev;
    },
    kcopyd: new KcopydClient(),
  };
}

/** Counts writes that land on one byte offset (a metadata area). */
class CountingDevice extends MemoryDevice {
  writesAt = new Map<number, number>();
  override async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    this.writesAt.set(offsetBytes, (this.writesAt.get(offsetBytes) ?? 0) + 1);
    await super.write(offsetBytes, data, options);
  }
}

/** Builds a COW the way the kernel lays it out, by hand: header, area 0 pairs, data chunks. */
function kernelStyleCow(
  sizeBytes: number,
  chunkSectors: number,
  pairs: Array<[number, number]>,
  data: Map<number, Buffer>,
): MemoryDevice {
  const cow = new MemoryDevice(sizeBytes, { name: "cow" });
  const chunkBytes = chunkSectors * 512;
  const header = Buffer.alloc(chunkBytes);
  header.write("SnAp", 0, "latin1");
  header.writeUInt32LE(1, 4);
  header.writeUInt32LE(1, 8);
  header.writeUInt32LE(chunkSectors, 12);
  void cow.write(0, header);
  const area = Buffer.alloc(chunkBytes);
  pairs.forEach(([o, n], i) => {
    area.writeBigUInt64LE(BigInt(o), i * 16);
    area.writeBigUInt64LE(BigInt(n), i * 16 + 8);
  });
  void cow.write(chunkBytes, area);
  for (const [chunk, buf] of data) void cow.write(chunk * chunkBytes, buf);
  return cow;
}

describe("persistent COW layout", () => {
  it("writes exactly the bytes the kernel wrote (64 MiB, chunk 8, origin chunks 1-4)", async () => {
    const origin = new MemoryDevice(64 * MiB, { name: "origin" });
    const cow = new MemoryDevice(64 * MiB, { name: "cow" });
    const before = randomBytes(5 * 4096);
    await origin.write(0, before);
    const ctx = contextFor({ origin, cow });
    const o = (await snapshotOriginTarget.create(["origin"], origin.sizeBytes, ctx)) as OriginDevice;
    const s = (await snapshotTarget.create(
      ["origin", "cow", "P", "8"],
      origin.sizeBytes,
      ctx,
    )) as SnapshotDevice;
    for (let chunk = 1; chunk <= 4; chunk++) await o.write(chunk * 4096, Buffer.alloc(4096, 0xee));

    const head = await cow.read(0, 4096);
    expect(head.subarray(0, 16).toString("hex")).toBe("536e41700100000001000000" + "08000000");
    expect(head.subarray(16).every((b) => b === 0)).toBe(true);
    const area = await cow.read(4096, 4096);
    const pairs = [];
    for (let i = 0; i < 5; i++) pairs.push([area.readBigUInt64LE(i * 16), area.readBigUInt64LE(i * 16 + 8)]);
    expect(pairs).toEqual([
      [1n, 2n],
      [2n, 3n],
      [3n, 4n],
      [4n, 5n],
      [0n, 0n],
    ]);
    expect(area.subarray(64).every((b) => b === 0)).toBe(true);
    expect((await cow.read(2 * 4096, 4096)).equals(before.subarray(4096, 8192))).toBe(true);
    expect(s.status()).toBe("48/131072 16");
    expect(s.table()).toBe("origin cow P 8");
    await s.close();
  });

  it("loads a COW laid out by hand in the kernel's format and serves its chunks", async () => {
    const origin = new MemoryDevice(1 * MiB, { name: "origin" });
    const originBytes = randomBytes(MiB);
    await origin.write(0, originBytes);
    const old3 = randomBytes(4096);
    const old7 = randomBytes(4096);
    const cow = kernelStyleCow(
      MiB,
      8,
      [
        [3, 2],
        [7, 3],
      ],
      new Map([
        [2, old3],
        [3, old7],
      ]),
    );
    const ctx = contextFor({ origin, cow });
    const s = (await snapshotTarget.create(["origin", "cow", "P", "0"], MiB, ctx)) as SnapshotDevice;
    expect(s.table()).toBe("origin cow P 8");
    expect(s.status()).toBe(`32/2048 16`);
    const all = await s.read(0, MiB);
    const expected = Buffer.from(originBytes);
    old3.copy(expected, 3 * 4096);
    old7.copy(expected, 7 * 4096);
    expect(all.equals(expected)).toBe(true);
    const info = await inspectCow(cow);
    expect(info).toMatchObject({
      valid: true,
      version: 1,
      chunkSectors: 8,
      metadataAreas: 1,
      usedChunks: 4,
      totalChunks: 256,
    });
    expect(info.exceptions).toEqual([
      { oldChunk: 3, newChunk: 2 },
      { oldChunk: 7, newChunk: 3 },
    ]);
    expect(formatCowInspection(info)).toContain("origin chunk 7 -> COW chunk 3");
    await s.close();
  });

  it("rolls over to the next metadata area, zeroing it first, and reloads every exception", async () => {
    // 1-sector chunks: 32 exceptions per area, area 1 at chunk 1 + 33 = 34.
    const origin = new MemoryDevice(128 * 512, { name: "origin" });
    const originBytes = randomBytes(128 * 512);
    await origin.write(0, originBytes);
    const cowInner = new MemoryDevice(256 * 512, { name: "cow" });
    // Garbage where area 1 goes: it must be zeroed before area 0 is committed full.
    await cowInner.write(34 * 512, Buffer.alloc(512, 0xff));
    const ctx = contextFor({ origin, cow: cowInner });
    const o = (await snapshotOriginTarget.create(["origin"], origin.sizeBytes, ctx)) as OriginDevice;
    const s = (await snapshotTarget.create(
      ["origin", "cow", "P", "1"],
      origin.sizeBytes,
      ctx,
    )) as SnapshotDevice;
    for (let chunk = 0; chunk < 40; chunk++) await o.write(chunk * 512 + 100, Buffer.from([chunk]));
    const info = await inspectCow(cowInner);
    expect(info.exceptions.length).toBe(40);
    expect(info.metadataAreas).toBe(2);
    // Data chunks skip chunk 34 (area 1): exception 32 goes to chunk 35.
    expect(info.exceptions[31]).toEqual({ oldChunk: 31, newChunk: 33 });
    expect(info.exceptions[32]).toEqual({ oldChunk: 32, newChunk: 35 });
    expect(s.status()).toBe(`${43 * 1}/256 3`);
    await s.close();
    const again = (await snapshotTarget.create(
      ["origin", "cow", "P", "0"],
      origin.sizeBytes,
      ctx,
    )) as SnapshotDevice;
    expect((await again.read(0, 128 * 512)).equals(originBytes)).toBe(true);
    expect(again.status()).toBe("43/256 3");
    await again.close();
  });

  it("batches commits: concurrent copy-outs share metadata writes", async () => {
    const origin = new MemoryDevice(MiB, { name: "origin" });
    const cow = new CountingDevice(MiB, { name: "cow" });
    const ctx = contextFor({ origin, cow });
    const o = (await snapshotOriginTarget.create(["origin"], MiB, ctx)) as OriginDevice;
    const s = (await snapshotTarget.create(["origin", "cow", "P", "8"], MiB, ctx)) as SnapshotDevice;
    const before = cow.writesAt.get(4096) ?? 0;
    await Promise.all(Array.from({ length: 32 }, (_, i) => o.write(i * 4096, Buffer.alloc(4096, 1))));
    const areaWrites = (cow.writesAt.get(4096) ?? 0) - before;
    expect((await inspectCow(cow)).exceptions.length).toBe(32);
    expect(areaWrites).toBeGreaterThanOrEqual(1);
    expect(areaWrites).toBeLessThan(32);
    await s.close();
  });
});

describe("corrupt or foreign COW devices", () => {
  async function cowWithHeader(bytes: number[], size = MiB): Promise<MemoryDevice> {
    const cow = new MemoryDevice(size, { name: "cow" });
    await cow.write(0, Buffer.from(bytes));
    return cow;
  }

  it("names a foreign magic, an unknown version and a bad chunk size", async () => {
    const foreign = await cowWithHeader([0x7f, 0x45, 0x4c, 0x46]);
    await expect(inspectCow(foreign)).rejects.toThrow(/magic bytes are 7f 45 4c 46/);
    await expect(inspectCow(foreign)).rejects.toBeInstanceOf(CowFormatError);
    const v2 = await cowWithHeader([0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 2, 0, 0, 0, 8, 0, 0, 0]);
    await expect(inspectCow(v2)).rejects.toMatchObject({ field: "version" });
    const odd = await cowWithHeader([0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 6, 0, 0, 0]);
    await expect(inspectCow(odd)).rejects.toThrow(/chunk size 6 must be a power of two/);
    const fresh = new MemoryDevice(MiB, { name: "cow" });
    await expect(inspectCow(fresh)).rejects.toMatchObject({ field: "magic" });
    // The target refuses it too, with the same typed error.
    const origin = new MemoryDevice(MiB, { name: "origin" });
    await expect(
      snapshotTarget.create(["origin", "cow", "P", "8"], MiB, contextFor({ origin, cow: foreign })),
    ).rejects.toBeInstanceOf(CowFormatError);
  });

  it("names an exception that points outside the COW or at metadata, and a truncated table", async () => {
    const pastEnd = kernelStyleCow(64 * 4096, 8, [[1, 9999]], new Map());
    await expect(inspectCow(pastEnd)).rejects.toThrow(/COW chunk 9999, which is past the end of the device/);
    const onArea = kernelStyleCow(64 * 4096, 8, [[1, 1]], new Map());
    await expect(inspectCow(onArea)).rejects.toMatchObject({ field: "exception" });
    const dup = kernelStyleCow(
      64 * 4096,
      8,
      [
        [1, 2],
        [1, 3],
      ],
      new Map(),
    );
    await expect(inspectCow(dup)).rejects.toThrow(/maps origin chunk 1 a second time/);
    // Chunk 1 sector: 32 entries fill area 0; a 34-chunk COW has no room for area 1.
    const full = kernelStyleCow(
      34 * 512,
      1,
      Array.from({ length: 32 }, (_, i) => [i, i + 2] as [number, number]),
      new Map(),
    );
    await expect(inspectCow(full)).rejects.toMatchObject({ field: "area" });
  });

  it("reports an invalidated snapshot without reading its table", async () => {
    const cow = new MemoryDevice(MiB, { name: "cow" });
    await initializeCow(cow, 16);
    await cow.write(4, Buffer.from([0, 0, 0, 0]));
    const info = await inspectCow(cow);
    expect(info.valid).toBe(false);
    expect(formatCowInspection(info)).toContain("INVALID");
  });
});
