import { type BlockDevice, KcopydClient, MemoryDevice, type TargetContext } from "@udm/kcopyd";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { OriginDevice } from "./origin-device.js";
import type { SnapshotDevice } from "./snapshot-device.js";
import { snapshotOriginTarget, snapshotTarget } from "./targets.js";

/** Not a whole number of 32 KiB chunks, so the last chunk of big-chunk snapshots is short. */
const SIZE = 100 * 1024;

type Op =
  | { kind: "write"; target: number; offset: number; length: number; byte: number }
  | { kind: "burst"; writes: Array<{ target: number; offset: number; length: number; byte: number }> }
  | { kind: "read"; target: number; offset: number; length: number }
  | { kind: "snapshot"; chunkSectors: number; persistent: boolean }
  | { kind: "restart" };

const write = fc.record({
  target: fc.nat(4), // 0 = origin, i = snapshot i-1 (skipped if absent)
  offset: fc.nat(SIZE - 1),
  length: fc.integer({ min: 1, max: 40_000 }),
  byte: fc.integer({ min: 1, max: 255 }),
});

const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: write.map((w) => ({ kind: "write" as const, ...w })) },
  {
    weight: 2,
    arbitrary: fc
      .array(write, { minLength: 2, maxLength: 6 })
      .map((writes) => ({ kind: "burst" as const, writes })),
  },
  {
    weight: 3,
    arbitrary: fc
      .record({ target: fc.nat(4), offset: fc.nat(SIZE - 1), length: fc.integer({ min: 1, max: SIZE }) })
      .map((r) => ({ kind: "read" as const, ...r })),
  },
  {
    weight: 2,
    arbitrary: fc
      .record({ chunkSectors: fc.constantFrom(1, 8, 16, 64), persistent: fc.boolean() })
      .map((r) => ({ kind: "snapshot" as const, ...r })),
  },
  { weight: 1, arbitrary: fc.constant({ kind: "restart" as const }) },
);

interface ModelSnapshot {
  cow: string;
  chunkSectors: number;
  persistent: boolean;
  view: Buffer;
  device: SnapshotDevice;
}

describe("snapshot model", () => {
  it("origin and every snapshot behave like the origin plus frozen copies, across restarts", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 25 }), async (ops) => {
        const devices: Record<string, BlockDevice> = { origin: new MemoryDevice(SIZE, { name: "origin" }) };
        let ctx: TargetContext = {
          openDevice: async (spec) => devices[spec]!,
          kcopyd: new KcopydClient(),
        };
        const origin = Buffer.alloc(SIZE);
        let originDev = (await snapshotOriginTarget.create(["origin"], SIZE, ctx)) as OriginDevice;
        let snaps: ModelSnapshot[] = [];
        let cows = 0;

        const clip = (offset: number, length: number) => Math.min(length, SIZE - offset);
        const applyWrite = async (w: { target: number; offset: number; length: number; byte: number }) => {
          const length = clip(w.offset, w.length);
          const data = Buffer.alloc(length, w.byte);
          if (w.target === 0) {
            await originDev.write(w.offset, data);
            data.copy(origin, w.offset);
            return;
          }
          const snap = snaps[w.target - 1];
          if (!snap) return;
          await snap.device.write(w.offset, data);
          data.copy(snap.view, w.offset);
        };
        const check = async (target: number, offset: number, length: number) => {
          length = clip(offset, length);
          if (target === 0 || !snaps[target - 1]) {
            expect(
              (await originDev.read(offset, length)).equals(origin.subarray(offset, offset + length)),
            ).toBe(true);
          } else {
            const s = snaps[target - 1]!;
            const got = await s.device.read(offset, length);
            expect(got.equals(s.view.subarray(offset, offset + length))).toBe(true);
          }
        };

        for (const o of ops) {
          if (o.kind === "write") await applyWrite(o);
          else if (o.kind === "read") await check(o.target, o.offset, o.length);
          else if (o.kind === "burst") {
            // Concurrent writes, at most one per target and range, so the outcome is defined.
            const taken: Array<[number, number, number]> = [];
            const chosen = o.writes.filter((w) => {
              const end = w.offset + clip(w.offset, w.length);
              if (taken.some(([t, s, e]) => t === w.target && w.offset < e && s < end)) return false;
              taken.push([w.target, w.offset, end]);
              return true;
            });
            const expected = chosen.map((w) => ({ w, before: null as Buffer | null }));
            await Promise.all(
              expected.map(async ({ w }) => {
                const length = clip(w.offset, w.length);
                const data = Buffer.alloc(length, w.byte);
                if (w.target === 0) await originDev.write(w.offset, data);
                else await snaps[w.target - 1]?.device.write(w.offset, data);
              }),
            );
            for (const { w } of expected) {
              const length = clip(w.offset, w.length);
              if (w.target === 0) origin.fill(w.byte, w.offset, w.offset + length);
              else snaps[w.target - 1]?.view.fill(w.byte, w.offset, w.offset + length);
            }
          } else if (o.kind === "snapshot") {
            if (snaps.length >= 4) continue;
            const cow = `cow${cows++}`;
            devices[cow] = new MemoryDevice(3 * SIZE, { name: cow });
            const device = (await snapshotTarget.create(
              ["origin", cow, o.persistent ? "P" : "N", String(o.chunkSectors)],
              SIZE,
              ctx,
            )) as SnapshotDevice;
            snaps.push({
              cow,
              chunkSectors: o.chunkSectors,
              persistent: o.persistent,
              view: Buffer.from(origin),
              device,
            });
          } else {
            for (const s of snaps) await s.device.close();
            await originDev.close();
            ctx = { openDevice: async (spec) => devices[spec]!, kcopyd: new KcopydClient() };
            originDev = (await snapshotOriginTarget.create(["origin"], SIZE, ctx)) as OriginDevice;
            // Transient snapshots do not survive; persistent ones come back from their COW.
            const kept: ModelSnapshot[] = [];
            for (const s of snaps.filter((x) => x.persistent)) {
              const device = (await snapshotTarget.create(
                ["origin", s.cow, "P", "0"],
                SIZE,
                ctx,
              )) as SnapshotDevice;
              expect(device.table()).toBe(`origin ${s.cow} P ${s.chunkSectors}`);
              kept.push({ ...s, device });
            }
            snaps = kept;
          }
        }
        for (let t = 0; t <= snaps.length; t++) await check(t, 0, SIZE);
        for (const s of snaps) {
          expect(s.device.status()).toMatch(/^\d+\/\d+ \d+$/);
          await s.device.close();
        }
      }),
      { numRuns: 40 },
    );
  });
});
