import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LinearDevice, MEMORY_CHUNK_BYTES, MemoryDevice, ZeroDevice } from "@udm/kcopyd";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, test } from "vitest";
import { DeviceManager } from "./device-manager.js";
import { GateDevice } from "./gate-device.js";
import { SegmentedDevice } from "./segmented-device.js";
import { parseTableFile } from "./table-parser.js";
import { allTargets } from "./targets.js";

const log = pino({ level: "silent" });
const CHUNK = 4096;
let dir: string;
let manager: DeviceManager;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "udm-seg-"));
  manager = new DeviceManager({ targets: allTargets(), log });
});

afterEach(async () => {
  await manager.closeAll();
  rmSync(dir, { recursive: true, force: true });
});

function file(name: string, sizeBytes: number): void {
  writeFileSync(join(dir, name), Buffer.alloc(sizeBytes));
}

/** Expands runs into one flag per 4 KiB chunk (the model to compare with). */
function perChunk(runs: Array<{ lengthBytes: number; flags: number }>): number[] {
  const out: number[] = [];
  for (const r of runs) {
    expect(r.lengthBytes % CHUNK).toBe(0);
    for (let i = 0; i < r.lengthBytes / CHUNK; i++) out.push(r.flags);
  }
  return out;
}

describe("SegmentedDevice meta contexts", () => {
  test("a device of segments publishes the union of their contexts, offsets mapped, flags 0 where a segment has none", async () => {
    file("a.img", 64 * CHUNK);
    file("b.img", 64 * CHUNK);
    await manager.create(
      parseTableFile(
        [
          "oa: 0 512 snapshot-origin a.img",
          "ob: 0 512 snapshot-origin b.img",
          // three segments: a snapshot, a zero target (no context), another snapshot
          "two: 0 512 snapshot a.img mem:3M P 8",
          "two: 512 256 zero",
          "two: 768 512 snapshot b.img mem:4M P 8",
        ].join("\n"),
        "t.table",
        manager.registry,
      ).map((table) => ({ table, baseDir: dir })),
    );
    // Copy-outs: chunk 3 of a, chunks 0-1 and 63 of b.
    await manager.device("oa").write(3 * CHUNK, Buffer.alloc(CHUNK, 1));
    await manager.device("ob").write(0, Buffer.alloc(2 * CHUNK, 2));
    await manager.device("ob").write(63 * CHUNK, Buffer.alloc(CHUNK, 3));

    const two = manager.device("two");
    expect(two.current).toBeInstanceOf(SegmentedDevice);
    const contexts = two.statusContexts();
    expect(contexts.map((c) => c.name)).toEqual(["snapshot:exceptions"]);
    const expected = new Array(64 + 32 + 64).fill(0);
    expected[3] = 1;
    expected[96] = 1;
    expected[97] = 1;
    expected[96 + 63] = 1;
    expect(perChunk(await contexts[0]!.query(0, two.sizeBytes))).toEqual(expected);
    // A window crossing both boundaries maps onto each segment's own offsets.
    const from = 2 * CHUNK;
    const to = 98 * CHUNK;
    expect(perChunk(await contexts[0]!.query(from, to - from))).toEqual(expected.slice(2, 98));
    // Runs of equal flags are merged across segments (the zero segment joins its neighbours' 0s).
    const runs = await contexts[0]!.query(4 * CHUNK, 92 * CHUNK);
    expect(runs).toEqual([{ lengthBytes: 92 * CHUNK, flags: 0 }]);

    // The gate follows a reload: a table of one zero segment has no context any more.
    await manager.reload("two", {
      table: parseTableFile("two: 0 1280 zero", "t.table", manager.registry)[0]!,
      baseDir: dir,
    });
    expect(manager.device("two").statusContexts()).toEqual([]);
    expect(await contexts[0]!.query(0, 8192)).toEqual([{ lengthBytes: 8192, flags: 0 }]);
  });
});

describe("SegmentedDevice and GateDevice sparse reads", () => {
  test("each segment's own sparse read, offsets mapped; a segment that cannot vouch reads plainly", async () => {
    const C = MEMORY_CHUNK_BYTES;
    const a = new MemoryDevice(4 * C);
    const b = new MemoryDevice(4 * C);
    await a.write(C, Buffer.alloc(C, 1));
    await b.write(2 * C, Buffer.alloc(C, 2));
    // The middle segment (zero, no readIntoSparse) vouches for nothing although it reads as zeros.
    const seg = new SegmentedDevice("s", [
      { startBytes: 0, target: new LinearDevice(a, 0, 4 * C) },
      { startBytes: 4 * C, target: new ZeroDevice(C) },
      { startBytes: 5 * C, target: new LinearDevice(b, 0, 4 * C) },
    ]);
    const gate = new GateDevice("s", seg);
    const target = Buffer.alloc(9 * C, 0xee);
    const zeros = await gate.readIntoSparse(0, target);
    expect(target.equals(await seg.read(0, 9 * C))).toBe(true);
    expect(zeros).toEqual([
      { offsetBytes: 0, lengthBytes: C },
      { offsetBytes: 2 * C, lengthBytes: 2 * C },
      { offsetBytes: 5 * C, lengthBytes: 2 * C },
      { offsetBytes: 8 * C, lengthBytes: C },
    ]);
  });
});
