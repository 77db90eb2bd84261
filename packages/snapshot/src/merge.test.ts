import { randomBytes } from "node:crypto";
import {
  type BlockDevice,
  FlakeyDevice,
  KcopydClient,
  MemoryDevice,
  TargetArgError,
  type TargetContext,
  type WriteOptions,
} from "@udm/kcopyd";
import { afterEach, describe, expect, it } from "vitest";
import { inspectCow } from "./cow-format.js";
import { type MergeDevice, SnapshotMergeError, setMergeBatchBytes } from "./merge-device.js";
import type { OriginDevice } from "./origin-device.js";
import type { SnapshotDevice } from "./snapshot-device.js";
import { snapshotMergeTarget, snapshotOriginTarget, snapshotTarget } from "./targets.js";
import { WriteCacheDevice } from "./write-cache-device.js";

/** dm's create: the table is loaded, then resumed (its preresume takes a live snapshot over). */
async function loadMerge(args: string[], size: number, ctx: TargetContext): Promise<MergeDevice> {
  const m = (await snapshotMergeTarget.create(args, size, ctx)) as MergeDevice;
  await m.preresume?.();
  return m;
}

const KiB = 1024;
const CHUNK = 4096;

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

/** Records the offset and length of every write while `recording` is on. */
class RecordingDevice extends MemoryDevice {
  recording = false;
  writes: Array<[number, number]> = [];
  override async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    if (this.recording) this.writes.push([offsetBytes, data.length]);
    await super.write(offsetBytes, data, options);
  }
}

const tick = () => new Promise((r) => setImmediate(r));

/** An origin with a snapshot whose view differs from the origin in `chunks` (origin and snapshot writes). */
async function snapshotWithChanges(origin: BlockDevice, cow: BlockDevice, size: number, chunks: number[]) {
  const initial = randomBytes(size);
  await origin.write(0, initial);
  const ctx = contextFor({ origin, cow });
  const o = (await snapshotOriginTarget.create(["origin"], size, ctx)) as OriginDevice;
  const s = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx)) as SnapshotDevice;
  const snapView = Buffer.from(initial);
  for (const [i, chunk] of chunks.entries()) {
    if (i % 3 === 2) {
      const mine = randomBytes(1000);
      await s.write(chunk * CHUNK + 50, mine);
      mine.copy(snapView, chunk * CHUNK + 50);
    } else {
      await o.write(chunk * CHUNK + 10, randomBytes(2000));
    }
  }
  return { ctx, o, s, snapView };
}

describe("snapshot-merge", () => {
  const defaultBatch = setMergeBatchBytes(1);
  setMergeBatchBytes(defaultBatch);
  afterEach(() => {
    setMergeBatchBytes(defaultBatch);
  });

  it("takes over a live snapshot and copies every exception back, newest run first", async () => {
    const size = 64 * CHUNK;
    const origin = new RecordingDevice(size, { name: "origin" });
    const cow = new MemoryDevice(size, { name: "cow" });
    const { ctx, o, s, snapView } = await snapshotWithChanges(origin, cow, size, [0, 1, 2, 10, 5, 6]);
    expect((await inspectCow(cow)).exceptions.map((e) => e.oldChunk)).toEqual([0, 1, 2, 10, 5, 6]);
    origin.recording = true;
    // One run per cycle, as the kernel does, so the order of the copies is observable.
    setMergeBatchBytes(1);
    const m = (await loadMerge(["origin", "cow", "P", "8"], size, ctx)) as MergeDevice;
    // The old snapshot target handed its tables over: it gets no more I/O.
    await expect(s.read(0, 512)).rejects.toThrow(/handed over/);
    expect(m.table()).toBe("origin cow P 8");
    await m.whenMerged();
    origin.recording = false;
    expect(origin.writes).toEqual([
      [5 * CHUNK, 2 * CHUNK],
      [10 * CHUNK, CHUNK],
      [0, 3 * CHUNK],
    ]);
    expect((await origin.read(0, size)).equals(snapView)).toBe(true);
    expect((await o.read(0, size)).equals(snapView)).toBe(true);
    expect((await inspectCow(cow)).exceptions).toEqual([]);
    expect(m.status()).toBe("16/512 16");
    expect(m.progress()).toEqual({ operation: "merge", doneBytes: 6 * CHUNK, totalBytes: 6 * CHUNK });
    await m.close();
    await s.close();
  });

  it("serves reads and writes correctly while merging, through the merge and the origin target", async () => {
    const size = 128 * CHUNK;
    const origin = new MemoryDevice(size, { name: "origin" });
    const cow = new MemoryDevice(size, { name: "cow" });
    const changed = Array.from({ length: 90 }, (_, i) => (i * 37) % 128);
    const { ctx, o, s, snapView } = await snapshotWithChanges(origin, cow, size, [...new Set(changed)]);
    await s.close();
    setMergeBatchBytes(3 * CHUNK);
    const m = (await loadMerge(["origin", "cow", "P", "0"], size, ctx)) as MergeDevice;
    const model = Buffer.from(snapView);
    let merging = true;
    const done = m.whenMerged().then(() => {
      merging = false;
    });
    let ops = 0;
    while (merging || ops < 20) {
      const at = (ops * 7717) % (size - 6000);
      const len = 1 + ((ops * 131) % 6000);
      if (ops % 3 === 2) {
        const got = await (ops % 2 ? o : m).read(at, len);
        expect(got.equals(model.subarray(at, at + len))).toBe(true);
      } else {
        const data = randomBytes(len);
        await (ops % 2 ? o : m).write(at, data);
        data.copy(model, at);
      }
      ops++;
      if (ops > 2000) break;
    }
    await done;
    expect((await origin.read(0, size)).equals(model)).toBe(true);
    expect((await inspectCow(cow)).exceptions).toEqual([]);
    await m.close();
  });

  it("leaves other snapshots of the origin frozen", async () => {
    const size = 32 * CHUNK;
    const origin = new MemoryDevice(size, { name: "origin" });
    const cow = new MemoryDevice(size, { name: "cow" });
    const cowB = new MemoryDevice(size, { name: "cowB" });
    const devices = { origin, cow, cowB };
    const initial = randomBytes(size);
    await origin.write(0, initial);
    const ctx = contextFor(devices);
    const o = (await snapshotOriginTarget.create(["origin"], size, ctx)) as OriginDevice;
    const a = (await snapshotTarget.create(["origin", "cow", "P", "8"], size, ctx)) as SnapshotDevice;
    await o.write(3 * CHUNK, Buffer.alloc(CHUNK, 1));
    const bView = await o.read(0, size);
    const b = (await snapshotTarget.create(["origin", "cowB", "P", "16"], size, ctx)) as SnapshotDevice;
    await o.write(9 * CHUNK, Buffer.alloc(CHUNK, 2));
    await a.close();
    const m = (await loadMerge(["origin", "cow", "P", "8"], size, ctx)) as MergeDevice;
    await m.whenMerged();
    expect((await origin.read(0, size)).equals(initial)).toBe(true);
    expect((await b.read(0, size)).equals(bView)).toBe(true);
    await m.close();
    await b.close();
  });

  it("resumes after a power cut at any point and ends with the snapshot's content", async () => {
    let cutMidway = 0;
    for (let round = 0; round < 10; round++) {
      // Even rounds: the kernel's one run per cycle; odd rounds: a few runs per cycle.
      setMergeBatchBytes(round % 2 ? 3 * CHUNK : 1);
      const size = 96 * CHUNK;
      const originMedium = new MemoryDevice(size, { name: "origin" });
      const cowMedium = new MemoryDevice(size, { name: "cow" });
      const changed = Array.from({ length: 60 }, (_, i) => (i * 53 + round) % 96);
      const { s, snapView } = await snapshotWithChanges(originMedium, cowMedium, size, [...new Set(changed)]);
      await s.close();
      const origin = new WriteCacheDevice(originMedium, { name: "origin" });
      const cow = new WriteCacheDevice(cowMedium, { name: "cow" });
      const m = (await loadMerge(
        ["origin", "cow", "P", "8"],
        size,
        contextFor({ origin, cow }),
      )) as MergeDevice;
      const merged = m.whenMerged().catch(() => undefined);
      for (let t = 0; t < 3 + round * 17; t++) await tick();
      const { doneBytes, totalBytes } = m.progress();
      if (doneBytes > 0 && doneBytes < totalBytes) cutMidway++;
      const survive = (i: number) => (i + round) % 2 === 0;
      await cow.crash(survive);
      await origin.crash(survive);
      await merged;
      await m.close();
      // Reboot: load snapshot-merge from the media and let it finish.
      const ctx2 = contextFor({ origin: originMedium, cow: cowMedium });
      const again = (await loadMerge(["origin", "cow", "P", "8"], size, ctx2)) as MergeDevice;
      expect((await again.read(0, size)).equals(snapView)).toBe(true);
      await again.whenMerged();
      expect((await originMedium.read(0, size)).equals(snapView)).toBe(true);
      await again.close();
    }
    // The cuts really fell between batches of the merge, not only before or after it.
    expect(cutMidway).toBeGreaterThanOrEqual(3);
  });

  it("pauses on suspend and carries on after resume", async () => {
    const size = 64 * CHUNK;
    const origin = new MemoryDevice(size, { name: "origin" });
    const cow = new MemoryDevice(size, { name: "cow" });
    const changed = Array.from({ length: 40 }, (_, i) => (i * 13) % 64);
    const { ctx, s, snapView } = await snapshotWithChanges(origin, cow, size, [...new Set(changed)]);
    await s.close();
    setMergeBatchBytes(2 * CHUNK);
    const m = (await loadMerge(["origin", "cow", "P", "8"], size, ctx)) as MergeDevice;
    await m.suspend();
    const paused = m.progress();
    expect(paused.doneBytes).toBeLessThan(paused.totalBytes);
    for (let t = 0; t < 50; t++) await tick();
    expect(m.progress()).toEqual(paused);
    // While paused, the merged view is still right.
    expect((await m.read(0, size)).equals(snapView)).toBe(true);
    await m.resume();
    await m.whenMerged();
    expect((await origin.read(0, size)).equals(snapView)).toBe(true);
    await m.close();
  });

  it("stops on an origin write error: Merge failed, and whenMerged rejects", async () => {
    const size = 32 * CHUNK;
    const medium = new MemoryDevice(size, { name: "origin" });
    const cow = new MemoryDevice(size, { name: "cow" });
    const { s } = await snapshotWithChanges(medium, cow, size, [1, 2, 4]);
    await s.close();
    const origin = new FlakeyDevice(medium, {
      upIntervalSeconds: 1,
      downIntervalSeconds: 0,
      errorWrites: true,
      name: "origin",
    });
    origin.setMode("down");
    const m = (await loadMerge(
      ["origin", "cow", "P", "8"],
      size,
      contextFor({ origin, cow }),
    )) as MergeDevice;
    await expect(m.whenMerged()).rejects.toBeInstanceOf(SnapshotMergeError);
    expect(m.status()).toBe("Merge failed");
    // Nothing was lost: the table is intact for a later attempt.
    expect((await inspectCow(cow)).exceptions.length).toBe(3);
    await m.close();
  });

  it("a failed metadata write stops the merge; suspend + resume retries it safely: the origin ends equal to the snapshot, its chunk 0 never gets the header", async () => {
    const size = 32 * CHUNK;
    const origin = new MemoryDevice(size, { name: "origin" });
    /** Fails one write at `failAt`, after letting `skip` through. */
    class FailOnceDevice extends MemoryDevice {
      failAt: number | null = null;
      skip = 0;
      override async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
        if (offsetBytes === this.failAt && this.skip-- === 0) {
          this.failAt = null;
          throw new Error("injected COW write error");
        }
        await super.write(offsetBytes, data, options);
      }
    }
    const cow = new FailOnceDevice(size, { name: "cow" });
    const { ctx, s, snapView } = await snapshotWithChanges(origin, cow, size, [1, 3, 5, 7]);
    const originChunk0 = await origin.read(0, CHUNK);
    await s.close();
    setMergeBatchBytes(CHUNK); // one run per cycle: the failure comes after some runs merged
    cow.failAt = CHUNK; // metadata area 0, rewritten by every merge cycle: the second cycle fails
    cow.skip = 1;
    const m = (await loadMerge(["origin", "cow", "P", "8"], size, ctx)) as MergeDevice;
    await expect(m.whenMerged()).rejects.toThrow(/write error in exception store/);
    expect(m.status()).toBe("Merge failed");
    expect((await inspectCow(cow)).exceptions.length).toBe(3);
    await m.suspend();
    await m.resume();
    for (let t = 0; t < 1000 && m.state.complete.size > 0; t++) await tick();
    expect(m.state.complete.size).toBe(0);
    expect((await inspectCow(cow)).exceptions.length).toBe(0);
    expect((await origin.read(0, CHUNK)).equals(originChunk0)).toBe(true);
    expect((await origin.read(0, size)).equals(snapView)).toBe(true);
    await m.close();
  });

  it("refuses a transient store and a second merge on one origin", async () => {
    const size = 16 * KiB;
    const devices = {
      origin: new MemoryDevice(size, { name: "origin" }),
      cow: new MemoryDevice(size, { name: "cow" }),
      cow2: new MemoryDevice(size, { name: "cow2" }),
    };
    const ctx = contextFor(devices);
    await expect(loadMerge(["origin", "cow", "N", "8"], size, ctx)).rejects.toBeInstanceOf(TargetArgError);
    const m = (await loadMerge(
      ["origin", "cow", "PO", "8", "1", "discard_zeroes_cow"],
      size,
      ctx,
    )) as MergeDevice;
    expect(m.table()).toBe("origin cow PO 8 1 discard_zeroes_cow");
    await expect(loadMerge(["origin", "cow2", "P", "8"], size, ctx)).rejects.toThrow(
      /already has a merging snapshot/,
    );
    await expect(snapshotTarget.create(["origin", "cow2", "P", "8"], size, ctx)).rejects.toThrow(
      /is merging a snapshot/,
    );
    await m.whenMerged();
    await m.close();
  });
});
