import {
  type BlockDevice,
  type Extent,
  FlakeyDevice,
  IoError,
  KcopydClient,
  MemoryDevice,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";
import fc from "fast-check";
import { describe, expect, test } from "vitest";
import { type MirrorDevice, mirrorTarget } from "./index.js";

const REGION = 8192; // 16 sectors
const REGIONS = 24;
const SIZE = REGION * REGIONS;

type Cmd =
  | { kind: "write"; offset: number; length: number; byte: number }
  | { kind: "read"; offset: number; length: number }
  | { kind: "fail"; leg: number }
  | { kind: "repair"; leg: number }
  | { kind: "burst"; writes: Array<{ offset: number; length: number; byte: number }> }
  | { kind: "recover" }
  | { kind: "restart" };

const range = fc
  .tuple(fc.integer({ min: 0, max: SIZE / 512 - 1 }), fc.integer({ min: 1, max: 40 }))
  .map(([s, n]) => ({ offset: s * 512, length: Math.min(n * 512, SIZE - s * 512) }));

const cmd: fc.Arbitrary<Cmd> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .tuple(range, fc.integer({ min: 1, max: 255 }))
      .map(([r, byte]) => ({ kind: "write" as const, ...r, byte })),
  },
  { weight: 3, arbitrary: range.map((r) => ({ kind: "read" as const, ...r })) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 2 }).map((leg) => ({ kind: "fail" as const, leg })) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 2 }).map((leg) => ({ kind: "repair" as const, leg })) },
  {
    // Concurrent writes, one per third of the device so they never overlap.
    weight: 2,
    arbitrary: fc
      .array(
        fc.tuple(
          fc.integer({ min: 0, max: SIZE / 3 / 512 - 8 }),
          fc.integer({ min: 1, max: 8 }),
          fc.integer({ min: 1, max: 255 }),
        ),
        {
          minLength: 3,
          maxLength: 3,
        },
      )
      .map((ws) => ({
        kind: "burst" as const,
        writes: ws.map(([s, n, byte], i) => ({ offset: (i * SIZE) / 3 + s * 512, length: n * 512, byte })),
      })),
  },
  { weight: 1, arbitrary: fc.constant({ kind: "recover" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "restart" as const }) },
);

/**
 * A leg behind a connection: offline, every I/O fails and watchers hear about it (like NbdDevice).
 * Losing the connection also loses what the server had not flushed (its content goes back to the
 * last flush), the worst a remote leg can do.
 */
class RemoteLeg implements BlockDevice {
  readonly readOnly = false;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  private online = true;
  private durable: Buffer;
  private readonly listeners = new Set<(healthy: boolean) => void>();
  constructor(
    readonly name: string,
    private readonly inner: BlockDevice,
  ) {
    this.sizeBytes = inner.sizeBytes;
    this.logicalBlockSize = inner.logicalBlockSize;
    this.durable = Buffer.alloc(inner.sizeBytes); // a blank disk: zeros are durable
  }
  async setOnline(online: boolean) {
    if (!online) await this.inner.write(0, this.durable);
    this.online = online;
    for (const l of this.listeners) l(online);
  }
  watchHealth(listener: (healthy: boolean) => void) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
  private check() {
    if (!this.online) throw new IoError("ESHUTDOWN", this.name, "connection lost");
  }
  async read(o: number, n: number) {
    this.check();
    return this.inner.read(o, n);
  }
  async readInto(o: number, b: Buffer) {
    this.check();
    return this.inner.readInto(o, b);
  }
  async write(o: number, d: Buffer, opts?: WriteOptions) {
    this.check();
    return this.inner.write(o, d, opts);
  }
  async writeZeroes(o: number, n: number, opts?: WriteZeroesOptions) {
    this.check();
    return this.inner.writeZeroes(o, n, opts);
  }
  async discard(o: number, n: number) {
    this.check();
    return this.inner.discard(o, n);
  }
  async flush() {
    this.check();
    await this.inner.flush();
    this.durable = await this.inner.read(0, this.sizeBytes);
  }
  async extents(o: number, n: number): Promise<Extent[]> {
    this.check();
    return this.inner.extents(o, n);
  }
  async close() {}
}

/**
 * Random writes, leg failures (writes fail on the leg), repairs, resyncs and restarts with the
 * disk log, against a model that is just the bytes last acknowledged. At most one leg is down at
 * a time, so a write always has a working leg.
 */
async function run(cmds: Cmd[], features: string): Promise<void> {
  const disks = [0, 1, 2].map((i) => new MemoryDevice(SIZE, { name: `disk${i}` }));
  const legs = disks.map(
    (d, i) =>
      new FlakeyDevice(d, {
        upIntervalSeconds: 1,
        downIntervalSeconds: 0,
        errorWrites: true,
        name: `leg${i}`,
      }),
  );
  const log = new MemoryDevice(1 << 20, { name: "log" });
  // Leg 2 is remote: it fails by losing its connection instead of by I/O errors.
  const remote = new RemoteLeg("leg2", legs[2]!);
  const devices = new Map<string, BlockDevice>([
    ["leg0", legs[0]!],
    ["leg1", legs[1]!],
    ["leg2", remote],
    ["log", log],
  ]);
  const kcopyd = new KcopydClient();
  // The first activation trusts the blank legs (nosync); restarts load the disk log.
  const open = async (first = false) =>
    (await mirrorTarget.create(
      `${first ? "disk 3 log 16 nosync" : "disk 2 log 16"} 3 leg0 0 leg1 0 leg2 0 ${features}`
        .trim()
        .split(" "),
      SIZE,
      { kcopyd, openDevice: async (spec) => devices.get(spec)! },
    )) as MirrorDevice;
  const model = Buffer.alloc(SIZE);
  // A failed write leaves its range unspecified (but the legs must still end identical).
  const known = Buffer.alloc(SIZE, 1);
  const checkKnown = (got: Buffer, offset: number) => {
    for (let i = 0; i < got.length; i++) {
      if (known[offset + i] && got[i] !== model[offset + i]) {
        throw new Error(`byte ${offset + i}: read ${got[i]}, last acknowledged ${model[offset + i]}`);
      }
    }
  };
  let down = -1;
  let m = await open(true);
  try {
    for (const c of cmds) {
      switch (c.kind) {
        case "write": {
          const data = Buffer.alloc(c.length, c.byte);
          try {
            await m.write(c.offset, data);
            data.copy(model, c.offset);
            known.fill(1, c.offset, c.offset + c.length);
          } catch (err) {
            // Only when the one leg holding current data there is the failed one, or with
            // handle_errors when a leg missed it (never acknowledged without every current leg).
            expect(down).toBeGreaterThanOrEqual(0);
            expect(String(err)).toMatch(/no current leg took it|not acknowledged|no reachable leg/);
            known.fill(0, c.offset, c.offset + c.length);
          }
          break;
        }
        case "burst": {
          const results = await Promise.allSettled(
            c.writes.map((w) => m.write(w.offset, Buffer.alloc(w.length, w.byte))),
          );
          results.forEach((r, i) => {
            const w = c.writes[i]!;
            if (r.status === "fulfilled") {
              model.fill(w.byte, w.offset, w.offset + w.length);
              known.fill(1, w.offset, w.offset + w.length);
            } else {
              expect(down).toBeGreaterThanOrEqual(0);
              known.fill(0, w.offset, w.offset + w.length);
            }
          });
          break;
        }
        case "read":
          checkKnown(await m.read(c.offset, c.length), c.offset);
          break;
        case "fail":
          if (down < 0) {
            down = c.leg;
            if (c.leg === 2) await remote.setOnline(false);
            else legs[c.leg]!.setMode("down");
          }
          break;
        case "repair":
          if (down === c.leg) {
            if (c.leg === 2) await remote.setOnline(true);
            else legs[c.leg]!.setMode("up");
            down = -1;
          }
          break;
        case "recover":
          await m.suspend();
          await m.resume();
          break;
        case "restart":
          await m.close();
          m = await open();
          break;
      }
    }
    if (down === 2) await remote.setOnline(true);
    else if (down >= 0) legs[down]!.setMode("up");
    await m.message(["resync"]);
    await m.waitForSync();
    const all = await m.read(0, SIZE);
    checkKnown(all, 0);
    for (const d of disks) expect((await d.read(0, SIZE)).equals(all)).toBe(true);
  } finally {
    await m.close();
  }
}

describe("mirror vs a model of acknowledged bytes", () => {
  test("random writes, leg failures and recoveries (no handle_errors)", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(cmd, { maxLength: 40 }), (cmds) => run(cmds, "")),
      { numRuns: 40 },
    );
  });

  test("random writes, leg failures and recoveries (handle_errors)", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(cmd, { maxLength: 40 }), (cmds) => run(cmds, "1 handle_errors")),
      { numRuns: 40 },
    );
  });
});

test("a restart after the default leg missed writes keeps the acknowledged data", async () => {
  await run(
    [
      { kind: "fail", leg: 0 },
      { kind: "write", offset: 0, length: 4096, byte: 7 },
      { kind: "repair", leg: 0 },
      { kind: "restart" },
      { kind: "read", offset: 0, length: 4096 },
    ],
    "",
  );
});
