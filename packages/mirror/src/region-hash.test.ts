import { MemoryDevice } from "@udm/kcopyd";
import { describe, expect, test } from "vitest";
import { DirtyRegionLog, inspectDiskLog, RegionBitset, RegionHash, RegionState } from "./index.js";

async function setup(sync: "nosync" | "default" = "nosync") {
  const dev = new MemoryDevice(1 << 20, { name: "log" });
  const log = new DirtyRegionLog({ regionSectors: 8, targetSectors: 8 * 100, device: dev, sync });
  await log.resume();
  return { dev, log, rh: new RegionHash(log) };
}

describe("RegionBitset", () => {
  test("little-endian bit order, counting and searching", () => {
    const bits = new RegionBitset(70);
    expect(bits.bytes.length).toBe(16); // rounded up to 64-bit words
    bits.set(0);
    bits.set(9);
    bits.set(69);
    expect([...bits.bytes.subarray(0, 2)]).toEqual([0b1, 0b10]);
    expect(bits.count()).toBe(3);
    expect(bits.findNext(true, 1)).toBe(9);
    expect(bits.findNext(true, 10)).toBe(69);
    bits.fill(true);
    expect(bits.count()).toBe(70);
    expect(bits.bytes[8]).toBe(0b0011_1111); // padding after region 69 stays clear
    expect(bits.findNext(false, 0)).toBe(-1);
    expect(bits.clear(33)).toBe(true);
    expect(bits.clear(33)).toBe(false);
    expect(bits.findNext(false, 0)).toBe(33);
  });
});

describe("RegionHash transitions (dm-region-hash)", () => {
  test("CLEAN -> DIRTY -> CLEAN on the clean list -> clean bit set after commit", async () => {
    const { dev, log, rh } = await setup();
    expect(rh.state(5)).toBe(RegionState.CLEAN);
    rh.incPending(5);
    rh.incPending(5);
    expect(rh.state(5)).toBe(RegionState.DIRTY);
    expect(log.isClean(5)).toBe(false);
    rh.decPending(5);
    expect(rh.state(5)).toBe(RegionState.DIRTY);
    rh.decPending(5);
    expect(rh.state(5)).toBe(RegionState.CLEAN);
    expect(log.isClean(5)).toBe(false); // lazily: not yet
    const candidates = rh.cleanCandidates();
    expect(candidates).toEqual([[5, 2]]);
    expect(rh.commitClean(candidates)).toBe(1);
    expect(log.isClean(5)).toBe(true);
    await log.flush();
    expect((await inspectDiskLog(dev)).clean(5)).toBe(true);
    expect(() => rh.decPending(5)).toThrow(/without a pending write/);
  });

  test("a region written again between candidate and commit stays dirty", async () => {
    const { log, rh } = await setup();
    rh.incPending(1);
    rh.decPending(1);
    const candidates = rh.cleanCandidates();
    rh.incPending(1); // written while the legs were being flushed
    rh.decPending(1);
    expect(rh.commitClean(candidates)).toBe(0);
    expect(log.isClean(1)).toBe(false);
    expect(rh.commitClean(rh.cleanCandidates())).toBe(1);
  });

  test("NOSYNC: from the log, and when a leg misses a write; never put on the clean list", async () => {
    const { log, rh } = await setup("default");
    expect(rh.state(2)).toBe(RegionState.NOSYNC);
    log.setRegionSync(3, true);
    rh.incPending(3);
    rh.markNosync(3);
    expect(rh.state(3)).toBe(RegionState.NOSYNC);
    expect(log.inSync(3)).toBe(false);
    rh.decPending(3);
    expect(rh.state(3)).toBe(RegionState.NOSYNC);
    expect(rh.cleanCandidates()).toEqual([]);
  });

  test("RECOVERING waits for pending writes (quiesce); writes wait for the recovery", async () => {
    const { log, rh } = await setup("default");
    rh.incPending(4);
    let quiesced = false;
    const recovery = rh.beginRecovery(4).then(() => {
      quiesced = true;
    });
    expect(rh.state(4)).toBe(RegionState.RECOVERING);
    await Promise.resolve();
    expect(quiesced).toBe(false);
    rh.decPending(4);
    await recovery;
    expect(quiesced).toBe(true);
    let released = false;
    const parked = rh.waitRecovered(4).then(() => {
      released = true;
    });
    await Promise.resolve();
    expect(released).toBe(false);
    log.setRegionSync(4, true);
    rh.endRecovery(4);
    await parked;
    expect(released).toBe(true);
    expect(rh.state(4)).toBe(RegionState.CLEAN);
    expect(rh.commitClean(rh.cleanCandidates())).toBe(1);
    expect(log.isClean(4)).toBe(true);
  });

  test("dirty ahead: idle in-sync regions only, cleaned later if unused", async () => {
    const { log, rh } = await setup();
    expect(rh.dirtyAhead(10)).toBe(true);
    expect(log.isClean(10)).toBe(false);
    expect(rh.dirtyAhead(10)).toBe(false);
    rh.incPending(11);
    expect(rh.dirtyAhead(11)).toBe(false);
    expect(rh.commitClean(rh.cleanCandidates())).toBe(1);
    expect(log.isClean(10)).toBe(true);
  });
});
