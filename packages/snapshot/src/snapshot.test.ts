import { randomBytes } from "node:crypto";
import { mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  type BlockDevice,
  FileDevice,
  FlakeyDevice,
  KcopydClient,
  MemoryDevice,
  TargetArgError,
  type TargetContext,
  type TargetDevice,
} from "@udm/kcopyd";
import { describe, expect, it } from "vitest";
import { inspectCow } from "./cow-format.js";
import { ORIGIN_PIECE_BYTES, type OriginDevice } from "./origin-device.js";
import { SNAPSHOT_EXCEPTIONS_CONTEXT, type SnapshotDevice } from "./snapshot-device.js";
import { setSnapshotCowThreshold } from "./snapshot-state.js";
import { snapshotOriginTarget, snapshotTarget } from "./targets.js";
import { WriteCacheDevice } from "./write-cache-device.js";

const KiB = 1024;

function contextFor(devices: Record<string, BlockDevice>, kcopyd = new KcopydClient()): TargetContext {
  return {
    openDevice: async (spec) => {
      const dev = devices[spec];
      if (!dev) throw new RangeError(`no device ${spec}`);
      return dev;
    },
    kcopyd,
  };
}

/** Counts reads per origin chunk and can hold the next read of a chunk until released. */
class ObservedDevice extends MemoryDevice {
  readsAt: number[] = [];
  private gate: { offset: number; released: Promise<void>; entered: () => void } | null = null;

  /** The next read starting at `offset` waits for the returned release(); `entered` resolves when it started. */
  holdNextReadAt(offset: number): { entered: Promise<void>; release: () => void } {
    let release!: () => void;
    let entered!: () => void;
    const released = new Promise<void>((r) => {
      release = r;
    });
    const enteredP = new Promise<void>((r) => {
      entered = r;
    });
    this.gate = { offset, released, entered };
    return { entered: enteredP, release };
  }

  override async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    this.readsAt.push(offsetBytes);
    const gate = this.gate;
    if (gate && gate.offset === offsetBytes) {
      this.gate = null;
      gate.entered();
      await gate.released;
    }
    await super.readInto(offsetBytes, target);
  }
}

async function setup(
  originSize: number,
  snaps: Array<{ cow: string; type?: string; chunk: number; cowSize?: number }>,
) {
  const origin = new ObservedDevice(originSize, { name: "origin" });
  const initial = randomBytes(originSize);
  await origin.write(0, initial);
  const devices: Record<string, BlockDevice> = { origin };
  for (const s of snaps) devices[s.cow] = new MemoryDevice(s.cowSize ?? originSize * 2, { name: s.cow });
  const ctx = contextFor(devices);
  const o = (await snapshotOriginTarget.create(["origin"], originSize, ctx)) as OriginDevice;
  const snapshots: SnapshotDevice[] = [];
  for (const s of snaps) {
    snapshots.push(
      (await snapshotTarget.create(
        ["origin", s.cow, s.type ?? "P", String(s.chunk)],
        originSize,
        ctx,
      )) as SnapshotDevice,
    );
  }
  return { origin, initial, devices, ctx, o, snapshots };
}

describe("copy-on-write", () => {
  it("keeps every snapshot's view through unaligned writes, with three chunk sizes", async () => {
    const size = 512 * KiB;
    const { o, snapshots, initial } = await setup(size, [
      { cow: "c8", chunk: 8 },
      { cow: "c16", chunk: 16, type: "N" },
      { cow: "c64", chunk: 64 },
    ]);
    const model = Buffer.from(initial);
    const writes: Array<[number, number]> = [
      [1, 1],
      [4095, 2],
      [5000, 20000],
      [65536 - 7, 100],
      [size - 3, 3],
      [100_000, 4096],
      [200_000, 70_000],
    ];
    for (const [at, len] of writes) {
      const data = randomBytes(len);
      await o.write(at, data);
      data.copy(model, at);
    }
    expect((await o.read(0, size)).equals(model)).toBe(true);
    for (const s of snapshots) expect((await s.read(0, size)).equals(initial)).toBe(true);
    // Unaligned reads across chunk boundaries too.
    expect((await snapshots[0]!.read(4000, 9000)).equals(initial.subarray(4000, 13000))).toBe(true);
    await Promise.all(snapshots.map((s) => s.close()));
  });

  it("writes to the snapshot land in the COW only; a whole-chunk write skips the copy", async () => {
    const size = 256 * KiB;
    const { o, snapshots, initial, origin } = await setup(size, [{ cow: "cow", chunk: 16 }]);
    const s = snapshots[0]!;
    const view = Buffer.from(initial);
    const partial = randomBytes(3000);
    await s.write(8192 + 100, partial);
    partial.copy(view, 8192 + 100);
    origin.readsAt = [];
    const whole = randomBytes(8192);
    await s.write(5 * 8192, whole);
    whole.copy(view, 5 * 8192);
    expect(origin.readsAt).toEqual([]);
    expect((await s.read(0, size)).equals(view)).toBe(true);
    expect((await o.read(0, size)).equals(initial)).toBe(true);
    // Origin writes to chunks the snapshot already owns copy nothing more.
    const before = s.status();
    await o.write(5 * 8192, randomBytes(8192));
    expect(s.status()).toBe(before);
    expect((await s.read(0, size)).equals(view)).toBe(true);
    await s.close();
  });

  it("concurrent writes to one chunk share one pending exception", async () => {
    const { o, snapshots, initial } = await setup(128 * KiB, [{ cow: "cow", chunk: 8 }]);
    const s = snapshots[0]!;
    await Promise.all(
      Array.from({ length: 10 }, (_, i) => o.write(4096 + i * 100, Buffer.alloc(100, i + 1))),
    );
    // Header, area 0 and one data chunk: next_free = 3.
    expect(s.status()).toBe(`24/512 16`);
    expect((await s.read(4096, 4096)).equals(initial.subarray(4096, 8192))).toBe(true);
    const now = await o.read(4096, 1000);
    for (let i = 0; i < 10; i++) expect(now[i * 100]).toBe(i + 1);
    await s.close();
  });

  it("a snapshot read racing with a copy-out still sees the old data", async () => {
    const { o, snapshots, initial, origin } = await setup(64 * KiB, [{ cow: "cow", chunk: 8 }]);
    const s = snapshots[0]!;
    const hold = origin.holdNextReadAt(3 * 4096);
    const read = s.read(3 * 4096, 4096);
    await hold.entered;
    const write = o.write(3 * 4096, Buffer.alloc(4096, 0x55));
    // Give the copy-out and commit every chance to run: the origin must stay untouched.
    for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
    expect((await origin.read(3 * 4096, 4096)).equals(initial.subarray(3 * 4096, 4 * 4096))).toBe(true);
    hold.release();
    expect((await read).equals(initial.subarray(3 * 4096, 4 * 4096))).toBe(true);
    await write;
    expect((await origin.read(3 * 4096, 4096)).every((b) => b === 0x55)).toBe(true);
    expect((await s.read(3 * 4096, 4096)).equals(initial.subarray(3 * 4096, 4 * 4096))).toBe(true);
    await s.close();
  });

  it("write-zeroes and discards on the origin copy out first; the snapshot publishes what was copied", async () => {
    const { o, snapshots, initial } = await setup(128 * KiB, [{ cow: "cow", chunk: 16 }]);
    const s = snapshots[0]!;
    await o.writeZeroes(8192, 8192);
    await o.discard(5 * 8192, 100);
    expect((await s.read(0, 128 * KiB)).equals(initial)).toBe(true);
    const ctx = s.statusContexts()[0]!;
    expect(ctx.name).toBe(SNAPSHOT_EXCEPTIONS_CONTEXT);
    expect(await ctx.query(0, 128 * KiB)).toEqual([
      { lengthBytes: 8192, flags: 0 },
      { lengthBytes: 8192, flags: 1 },
      { lengthBytes: 3 * 8192, flags: 0 },
      { lengthBytes: 8192, flags: 1 },
      { lengthBytes: 10 * 8192, flags: 0 },
    ]);
    expect(await ctx.query(8192 + 10, 100)).toEqual([{ lengthBytes: 100, flags: 1 }]);
    await s.close();
  });

  it("answers block status and extents over a 1 TiB snapshot at the cost of its exceptions", async () => {
    const TiB = 2 ** 40;
    const origin = new MemoryDevice(TiB, { name: "origin" });
    const cow = new MemoryDevice(2 ** 30, { name: "cow" });
    const ctx = contextFor({ origin, cow });
    const o = (await snapshotOriginTarget.create(["origin"], TiB, ctx)) as OriginDevice;
    const s = (await snapshotTarget.create(["origin", "cow", "P", "128"], TiB, ctx)) as SnapshotDevice;
    const far = 700 * 2 ** 30;
    await o.write(far + 10, Buffer.alloc(10, 1));
    await o.write(far + 65536, Buffer.alloc(10, 1));
    const runs = await s.statusContexts()[0]!.query(0, TiB);
    expect(runs).toEqual([
      { lengthBytes: far, flags: 0 },
      { lengthBytes: 2 * 65536, flags: 1 },
      { lengthBytes: TiB - far - 2 * 65536, flags: 0 },
    ]);
    expect(await s.extents(0, TiB)).toEqual([
      { offsetBytes: 0, lengthBytes: far, kind: "hole" },
      { offsetBytes: far, lengthBytes: 2 * 65536, kind: "data" },
      { offsetBytes: far + 2 * 65536, lengthBytes: TiB - far - 2 * 65536, kind: "hole" },
    ]);
    expect((await s.read(far, 20)).every((b) => b === 0)).toBe(true);
    await s.close();
  });

  it("transient snapshots allocate from COW chunk 0 and report N usage", async () => {
    const { o, snapshots, initial, devices } = await setup(64 * KiB, [{ cow: "cow", chunk: 8, type: "N" }]);
    const s = snapshots[0]!;
    await o.write(2 * 4096, Buffer.alloc(4096, 9));
    expect(s.status()).toBe("8/256 0");
    expect(s.table()).toBe("origin cow N 8");
    expect((await devices.cow!.read(0, 4096)).equals(initial.subarray(2 * 4096, 3 * 4096))).toBe(true);
    await s.close();
  });
});

describe("overflow", () => {
  it("P: a full COW invalidates the snapshot on disk; the origin write still happens", async () => {
    // Header + area + 2 data chunks.
    const { o, snapshots, devices } = await setup(64 * KiB, [{ cow: "cow", chunk: 8, cowSize: 4 * 4096 }]);
    const s = snapshots[0]!;
    await o.write(0, Buffer.alloc(4096, 1));
    await o.write(4096, Buffer.alloc(4096, 2));
    expect(s.status()).toBe("32/32 16");
    await o.write(2 * 4096, Buffer.alloc(4096, 3));
    expect((await o.read(2 * 4096, 4096)).every((b) => b === 3)).toBe(true);
    expect(s.status()).toBe("Invalid");
    expect((await devices.cow!.read(4, 4)).readUInt32LE(0)).toBe(0);
    await expect(s.read(0, 512)).rejects.toMatchObject({ code: "EIO" });
    await expect(s.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: "EIO" });
    await s.close();
    // It stays invalid when loaded again.
    const again = (await snapshotTarget.create(
      ["origin", "cow", "P", "8"],
      64 * KiB,
      contextFor(devices),
    )) as SnapshotDevice;
    expect(again.status()).toBe("Invalid");
    expect((await inspectCow(devices.cow!)).valid).toBe(false);
    await again.close();
  });

  it("PO: snapshot writes that find the COW full report Overflow, reads keep working", async () => {
    const { o, snapshots, initial } = await setup(64 * KiB, [
      { cow: "cow", chunk: 8, type: "PO", cowSize: 4 * 4096 },
    ]);
    const s = snapshots[0]!;
    const mine = randomBytes(4096);
    await s.write(0, mine);
    await s.write(4096, mine);
    await expect(s.write(2 * 4096, Buffer.alloc(10))).rejects.toMatchObject({ code: "EIO" });
    expect(s.status()).toBe("Overflow");
    expect(s.table()).toBe("origin cow PO 8");
    expect((await s.read(0, 4096)).equals(mine)).toBe(true);
    expect((await s.read(2 * 4096, 4096)).equals(initial.subarray(2 * 4096, 3 * 4096))).toBe(true);
    await expect(s.write(0, Buffer.alloc(10))).rejects.toMatchObject({ code: "EIO" });
    // An origin write needing a copy cannot be held forever: the snapshot is dropped, the origin written.
    await o.write(3 * 4096, Buffer.alloc(4096, 7));
    expect((await o.read(3 * 4096, 1))[0]).toBe(7);
    expect(s.status()).toBe("Invalid");
    await s.close();
  });
});

describe("I/O errors", () => {
  it("a copy-out that fails invalidates the snapshot, never the origin write", async () => {
    const size = 64 * KiB;
    const origin = new MemoryDevice(size, { name: "origin" });
    const medium = new MemoryDevice(size, { name: "cow" });
    const cow = new FlakeyDevice(medium, {
      upIntervalSeconds: 1,
      downIntervalSeconds: 0,
      errorWrites: true,
      name: "cow",
    });
    const ctx = contextFor({ origin, cow });
    const o = (await snapshotOriginTarget.create(["origin"], size, ctx)) as OriginDevice;
    const s = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx)) as SnapshotDevice;
    cow.setMode("down");
    await o.write(4096, Buffer.alloc(4096, 3));
    expect((await o.read(4096, 4096)).every((b) => b === 3)).toBe(true);
    expect(s.status()).toBe("Invalid");
    await expect(s.read(0, 512)).rejects.toMatchObject({ code: "EIO" });
    // Later writes do not wait for the dead snapshot.
    await o.write(8192, Buffer.alloc(10, 4));
    await s.close();
  });
});

describe("tables and status", () => {
  it("round-trips table lines and takes chunk 0 from the header", async () => {
    const { snapshots, ctx, o } = await setup(64 * KiB, [{ cow: "cow", chunk: 16 }]);
    expect(o.table()).toBe("origin");
    expect(o.status()).toBe("");
    await snapshots[0]!.close();
    const again = (await snapshotTarget.create(["origin", "cow", "P", "0"], 64 * KiB, ctx)) as SnapshotDevice;
    expect(again.table()).toBe("origin cow P 16");
    expect(again.status()).toBe("32/256 32");
    await again.close();
    const withFeatures = (await snapshotTarget.create(
      ["origin", "cow", "po", "16", "2", "discard_zeroes_cow", "discard_passdown_origin"],
      64 * KiB,
      ctx,
    )) as TargetDevice;
    expect(withFeatures.table()).toBe("origin cow PO 16 2 discard_zeroes_cow discard_passdown_origin");
    const args = withFeatures.table().split(" ");
    await withFeatures.close();
    const roundTrip = (await snapshotTarget.create(args, 64 * KiB, ctx)) as TargetDevice;
    expect(roundTrip.table()).toBe(args.join(" "));
    await roundTrip.close();
  });

  it("rejects bad arguments, naming which one", async () => {
    const { ctx } = await setup(64 * KiB, [{ cow: "cow", chunk: 8 }]);
    const bad = async (args: string[], index: number | null, message: RegExp) => {
      const err = await snapshotTarget.create(args, 64 * KiB, ctx).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(TargetArgError);
      expect((err as TargetArgError).argIndex).toBe(index);
      expect((err as Error).message).toMatch(message);
    };
    await bad(["origin", "cow", "P"], null, /requires 4 or more arguments/);
    await bad(["origin", "cow", "X", "8"], 2, /P, PO or N/);
    await bad(["origin", "cow", "P", "12"], 3, /power of two/);
    await bad(["origin", "cow", "N", "0"], 3, /chunk size not set/);
    await bad(["origin", "cow", "P", "8", "1", "bogus"], 5, /unrecognised feature/);
    await bad(["origin", "cow", "P", "8", "2", "discard_zeroes_cow"], 4, /does not match/);
    await bad(
      ["origin", "cow", "P", "8", "1", "discard_passdown_origin"],
      null,
      /depends on discard_zeroes_cow/,
    );
    await bad(["origin", "origin", "P", "8"], 1, /cannot be the same as origin/);
    await expect(snapshotOriginTarget.create([], 512, ctx)).rejects.toBeInstanceOf(TargetArgError);
  });

  it("discard_zeroes_cow zeroes whole copied chunks of the snapshot", async () => {
    const { o, ctx, snapshots } = await setup(64 * KiB, [{ cow: "cow", chunk: 8 }]);
    await snapshots[0]!.close();
    const s = (await snapshotTarget.create(
      ["origin", "cow", "P", "8", "1", "discard_zeroes_cow"],
      64 * KiB,
      ctx,
    )) as SnapshotDevice;
    await o.write(0, Buffer.alloc(8192, 1));
    await s.discard(0, 4096);
    expect((await s.read(0, 4096)).every((b) => b === 0)).toBe(true);
    expect((await s.read(4096, 4096)).every((b) => b === 0)).toBe(false);
    await s.close();
  });
});

describe("persistence", () => {
  it("restores every committed exception after a clean close", async () => {
    const { o, ctx, snapshots, initial } = await setup(256 * KiB, [{ cow: "cow", chunk: 8 }]);
    const view = Buffer.from(initial);
    await snapshots[0]!.write(70_000, Buffer.alloc(5000, 0xab));
    view.fill(0xab, 70_000, 75_000);
    for (let i = 0; i < 20; i++) await o.write(i * 9000, randomBytes(3000));
    await snapshots[0]!.close();
    const again = (await snapshotTarget.create(
      ["origin", "cow", "P", "8"],
      256 * KiB,
      ctx,
    )) as SnapshotDevice;
    expect((await again.read(0, 256 * KiB)).equals(view)).toBe(true);
    await again.close();
  });

  it("works on files: a COW written in one session is read back by the next", async () => {
    const dir = await mkdtemp(join(tmpdir(), "udm-snapshot-"));
    try {
      const size = 256 * KiB;
      const originPath = join(dir, "origin.img");
      const cowPath = join(dir, "cow.img");
      const initial = randomBytes(size);
      const session = async () => {
        const origin = await FileDevice.open(originPath, { createSizeBytes: size });
        const cow = await FileDevice.open(cowPath, { createSizeBytes: size });
        const ctx = contextFor({ [originPath]: origin, [cowPath]: cow });
        const o = (await snapshotOriginTarget.create([originPath], size, ctx)) as OriginDevice;
        const s = (await snapshotTarget.create([originPath, cowPath, "P", "0"], size, ctx)) as SnapshotDevice;
        return { origin, cow, o, s };
      };
      const first = await session();
      await first.origin.write(0, initial);
      await first.o.write(1000, randomBytes(100_000));
      expect(first.s.table()).toBe(`${originPath} ${cowPath} P 32`);
      await first.s.close();
      await first.origin.close();
      await first.cow.close();
      const second = await session();
      expect((await second.s.read(0, size)).equals(initial)).toBe(true);
      expect(second.s.status()).toBe(`${(2 + 7) * 32}/512 64`);
      await second.s.close();
      await second.origin.close();
      await second.cow.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("after a power cut in the middle of copy-outs, the snapshot still shows the origin as it was", async () => {
    for (let round = 0; round < 12; round++) {
      const size = 256 * KiB;
      const originMedium = new MemoryDevice(size, { name: "origin" });
      const cowMedium = new MemoryDevice(size, { name: "cow" });
      const initial = randomBytes(size);
      await originMedium.write(0, initial);
      const origin = new WriteCacheDevice(originMedium, { name: "origin" });
      const cow = new WriteCacheDevice(cowMedium, { name: "cow" });
      const ctx = contextFor({ origin, cow });
      const o = (await snapshotOriginTarget.create(["origin"], size, ctx)) as OriginDevice;
      const s = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx)) as SnapshotDevice;
      const inflight = Array.from({ length: 40 }, (_, i) =>
        o.write(((i * 7919) % 60) * 4096 + (i % 3) * 100, randomBytes(2000)).catch(() => undefined),
      );
      const ticks = 1 + ((round * 37) % 60);
      for (let t = 0; t < ticks; t++) await new Promise((r) => setImmediate(r));
      const survive = (i: number) => (i * 31 + round) % 3 === 0;
      await cow.crash(survive);
      await origin.crash(survive);
      await Promise.all(inflight);
      await s.close();
      // Reboot: the same media, new devices, the snapshot loaded from disk.
      const ctx2 = contextFor({ origin: originMedium, cow: cowMedium });
      const again = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx2)) as SnapshotDevice;
      expect(again.status()).not.toBe("Invalid");
      expect((await again.read(0, size)).equals(initial)).toBe(true);
      await again.close();
    }
  });
});

describe("throttle", () => {
  /** A real kcopyd client that records how many jobs it had in flight at most. */
  class CountingKcopyd extends KcopydClient {
    inFlight = 0;
    maxInFlight = 0;
    override copy<C>(
      from: Parameters<KcopydClient["copy"]>[0],
      dests: Parameters<KcopydClient["copy"]>[1],
      flags: number,
      notify: (readErr: boolean, writeErr: number, context: C) => void,
      context: C,
    ): void {
      this.inFlight++;
      this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
      super.copy(
        from,
        dests,
        flags,
        (readErr, writeErr, ctx: C) => {
          this.inFlight--;
          notify(readErr, writeErr, ctx);
        },
        context,
      );
    }
  }

  it("holds origin writes while more than cow_threshold copy-outs are in flight", async () => {
    const run = async (threshold: number | null) => {
      const old = threshold === null ? null : setSnapshotCowThreshold(threshold);
      try {
        const size = 64 * 4096;
        const origin = new MemoryDevice(size, { name: "origin" });
        const initial = randomBytes(size);
        await origin.write(0, initial);
        const kcopyd = new CountingKcopyd();
        const ctx = contextFor({ origin, cow: new MemoryDevice(2 * size, { name: "cow" }) }, kcopyd);
        const o = (await snapshotOriginTarget.create(["origin"], size, ctx)) as OriginDevice;
        const s = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx)) as SnapshotDevice;
        await Promise.all(Array.from({ length: 64 }, (_, i) => o.write(i * 4096, Buffer.alloc(4096, 1))));
        expect((await s.read(0, size)).equals(initial)).toBe(true);
        await s.close();
        return kcopyd.maxInFlight;
      } finally {
        if (old !== null) setSnapshotCowThreshold(old);
      }
    };
    expect(await run(null)).toBe(64);
    // Writes wait while in_progress > threshold, so at most threshold + 1 copies run.
    expect(await run(2)).toBeLessThanOrEqual(3);
  });
});

describe("large requests", () => {
  const MiB = 1024 * KiB;

  /** A memory device that counts its writes and the distinct buffers they came from. */
  class CountingDevice extends MemoryDevice {
    writes = 0;
    readonly sources = new Set<ArrayBufferLike>();
    /** Each write takes a turn of the event loop, as a disk's would. */
    slow = false;
    override async write(offsetBytes: number, data: Buffer): Promise<void> {
      if (this.slow) await new Promise((r) => setImmediate(r));
      this.writes++;
      this.sources.add(data.buffer);
      await super.write(offsetBytes, data);
    }
  }

  /** kcopyd that counts copy jobs, and the most in flight at once. */
  class JobCountingKcopyd extends KcopydClient {
    jobs = 0;
    inFlight = 0;
    maxInFlight = 0;
    override copy<C>(
      from: Parameters<KcopydClient["copy"]>[0],
      dests: Parameters<KcopydClient["copy"]>[1],
      flags: number,
      notify: (readErr: boolean, writeErr: number, context: C) => void,
      context: C,
    ): void {
      this.jobs++;
      this.inFlight++;
      this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
      super.copy(
        from,
        dests,
        flags,
        (readErr, writeErr, ctx: C) => {
          this.inFlight--;
          notify(readErr, writeErr, ctx);
        },
        context,
      );
    }
  }

  it("a 32 MiB origin write costs wake-ups and device requests linear in its chunks, throttle or not", async () => {
    const old = setSnapshotCowThreshold(64); // a single request runs into the throttle
    try {
      const size = 32 * MiB;
      const chunks = size / (4 * KiB);
      const origin = new CountingDevice(size, { name: "origin" });
      const initial = randomBytes(size);
      await origin.write(0, initial);
      origin.writes = 0;
      const kcopyd = new JobCountingKcopyd();
      const ctx = contextFor({ origin, cow: new MemoryDevice(size + MiB, { name: "cow" }) }, kcopyd);
      const o = (await snapshotOriginTarget.create(["origin"], size, ctx)) as OriginDevice;
      const s = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx)) as SnapshotDevice;
      const data = Buffer.alloc(size, 0x5a);
      await o.write(0, data);
      expect(kcopyd.jobs).toBe(chunks); // one copy-out per chunk
      // The throttle holds: at most the threshold plus the chunks of one piece (checked and
      // started in one tick) are copying at once.
      expect(kcopyd.maxInFlight).toBeLessThanOrEqual(64 + ORIGIN_PIECE_BYTES / (4 * KiB));
      expect(s.state.counters.throttleWakeups).toBeLessThanOrEqual(chunks);
      expect(origin.writes).toBeLessThanOrEqual(size / ORIGIN_PIECE_BYTES);
      expect((await o.read(0, size)).equals(data)).toBe(true);
      expect((await s.read(0, size)).equals(initial)).toBe(true);
      await s.close();
    } finally {
      setSnapshotCowThreshold(old);
    }
  });

  it("a 48 MiB WRITE_ZEROES to a snapshot: linear wake-ups, one COW write per chunk, all from one zero buffer", async () => {
    const old = setSnapshotCowThreshold(64);
    try {
      const size = 48 * MiB;
      const chunks = size / (4 * KiB);
      const origin = new MemoryDevice(size, { name: "origin" });
      const initial = randomBytes(size);
      await origin.write(0, initial);
      const cow = new CountingDevice(size + 2 * MiB, { name: "cow" });
      const ctx = contextFor({ origin, cow });
      const o = (await snapshotOriginTarget.create(["origin"], size, ctx)) as OriginDevice;
      const s = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx)) as SnapshotDevice;
      const before = cow.writes;
      cow.sources.clear();
      await s.writeZeroes(0, size);
      // Each chunk's zeros once, plus the metadata areas (group commits, at most one per chunk).
      expect(cow.writes - before).toBeLessThanOrEqual(2 * chunks);
      expect(s.state.counters.throttleWakeups).toBeLessThanOrEqual(chunks);
      // The zeros of every chunk came from one shared buffer (plus one buffer per metadata write).
      const zeroSources = [...cow.sources].filter((b) => b.byteLength === s.state.chunkBytes);
      expect(zeroSources.length).toBeLessThanOrEqual(1 + (cow.writes - before - chunks));
      expect((await s.read(0, size)).equals(Buffer.alloc(size))).toBe(true);
      expect((await o.read(0, size)).equals(initial)).toBe(true);
      await s.close();
    } finally {
      setSnapshotCowThreshold(old);
    }
  });

  it("a closing snapshot stops a request in flight: the rest fails with EIO, nothing more is written", async () => {
    const size = 16 * MiB;
    const origin = new MemoryDevice(size, { name: "origin" });
    const cow = new CountingDevice(size + 2 * MiB, { name: "cow" });
    const ctx = contextFor({ origin, cow });
    const s = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx)) as SnapshotDevice;
    cow.slow = true;
    const zeroing = s.writeZeroes(0, size);
    await new Promise((r) => setImmediate(r));
    await s.close();
    await expect(zeroing).rejects.toMatchObject({ code: "EIO", message: expect.stringMatching(/closing/) });
    const writes = cow.writes;
    await new Promise((r) => setTimeout(r, 20));
    expect(cow.writes).toBe(writes);
    expect(writes).toBeLessThan(size / (4 * KiB));
  });
});

describe("path aliases", () => {
  it("two device objects for one file (a path and a symlink) share one origin: the snapshot stays protected", async () => {
    const dir = await mkdtemp(join(tmpdir(), "udm-snap-alias-"));
    try {
      const size = 256 * KiB;
      const initial = randomBytes(size);
      await writeFile(join(dir, "origin.img"), initial);
      await writeFile(join(dir, "snap.cow"), Buffer.alloc(2 * size));
      await symlink(join(dir, "origin.img"), join(dir, "originlink.img"));
      const opened: BlockDevice[] = [];
      const ctx: TargetContext = {
        openDevice: async (spec) => {
          // Without image locks, which would refuse the second open: the origin protection underneath.
          const dev = await FileDevice.open(join(dir, spec), { lock: false });
          opened.push(dev);
          return dev;
        },
        kcopyd: new KcopydClient(),
      };
      const o = (await snapshotOriginTarget.create(["origin.img"], size, ctx)) as OriginDevice;
      const s = (await snapshotTarget.create(
        ["originlink.img", "snap.cow", "P", "8"],
        size,
        ctx,
      )) as SnapshotDevice;
      expect(opened[0]).not.toBe(opened[1]);
      await o.write(0, Buffer.alloc(4096, 0xaa));
      expect((await s.read(0, size)).equals(initial)).toBe(true);
      // A COW that is the origin under another name is refused like the same name.
      await expect(
        snapshotTarget.create(["origin.img", "originlink.img", "P", "8"], size, ctx),
      ).rejects.toThrow(/COW device cannot be the same as origin device/);
      await s.close();
      for (const dev of opened) await dev.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
