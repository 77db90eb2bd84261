import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type LinearDevice, SECTOR_SIZE, type TargetDevice, type TargetType } from "@udm/kcopyd";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, test } from "vitest";
import { DeviceManager, type TableRequest } from "./device-manager.js";
import type { MetadataState } from "./metadata-record.js";
import { parseDeviceTable, parseTableFile, TableParseError } from "./table-parser.js";
import { allTargets } from "./targets.js";

const log = pino({ level: "silent" });
let dir: string;
let manager: DeviceManager;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "udm-dm-"));
  manager = new DeviceManager({ targets: allTargets(), log });
});

afterEach(async () => {
  await manager.closeAll();
  rmSync(dir, { recursive: true, force: true });
});

function file(name: string, sizeBytes: number): string {
  const path = join(dir, name);
  writeFileSync(path, Buffer.alloc(sizeBytes));
  return path;
}

function tables(text: string): TableRequest[] {
  return parseTableFile(text, "test.table", manager.registry).map((table) => ({ table, baseDir: dir }));
}

function line(name: string, text: string): TableRequest {
  return { table: parseDeviceTable(name, text, "--table", manager.registry), baseDir: dir };
}

describe("DeviceManager", () => {
  test("the same spec yields the same BlockDevice while held, closed after the last holder", async () => {
    const path = file("a.img", 64 * SECTOR_SIZE);
    await manager.create(
      tables(`a: 0 8 linear a.img 0\nb: 0 8 linear file:${path} 8\nc: 0 8 linear ./a.img 16\n`),
    );
    const inner = (name: string) => (manager.device(name).current as LinearDevice).inner;
    expect(inner("a")).toBe(inner("b"));
    expect(inner("a")).toBe(inner("c"));
    expect(manager.pool.refs(path)).toBe(3);
    const shared = inner("a");
    await manager.remove("a");
    await manager.remove("b");
    expect(manager.pool.refs(path)).toBe(1);
    await manager.device("c").write(0, Buffer.from("still open"));
    await manager.remove("c");
    expect(manager.pool.refs(path)).toBe(0);
    await expect(shared.read(0, 512)).rejects.toThrow();
  });

  test("@NAME stacks devices; a used device cannot be removed", async () => {
    await manager.create(tables("top: 0 8 linear @base 8\nbase: 0 16 linear mem:1M 0\n"));
    expect(manager.names()).toEqual(["base", "top"]); // dependency order
    await manager.device("top").write(0, Buffer.from("through top"));
    expect((await manager.device("base").read(8 * SECTOR_SIZE, 11)).toString()).toBe("through top");
    expect(manager.info("base").usedBy).toEqual(["top"]);
    await expect(manager.remove("base")).rejects.toMatchObject({
      code: "EBUSY",
      message: expect.stringMatching(/in use by top/),
    });
    await manager.remove("top");
    await manager.remove("base");
  });

  test("unknown @NAME, self-use and cycles are refused before anything is opened", async () => {
    const path = file("x.img", 64 * SECTOR_SIZE);
    await expect(manager.create(tables("a: 0 8 linear x.img 0\nb: 0 8 linear @nope 0\n"))).rejects.toThrow(
      'test.table:2: linear argument 1 ("@nope"): no udm device "nope"',
    );
    await expect(manager.create(tables("a: 0 8 linear @a 0\n"))).rejects.toThrow(/cannot use itself/);
    await expect(manager.create(tables("a: 0 8 linear @b 0\nb: 0 8 linear @a 0\n"))).rejects.toThrow(/cycle/);
    expect(manager.pool.refs(path)).toBe(0);
    expect(manager.names()).toEqual([]);
  });

  test("create is all or nothing: a device that fails to build rolls back the batch", async () => {
    const path = file("a.img", 64 * SECTOR_SIZE);
    const err = await manager
      .create(tables("a: 0 8 linear a.img 0\nb: 0 8 linear missing.img 0\n"))
      .catch((e) => e);
    expect(err).toBeInstanceOf(TableParseError);
    expect(err.message).toMatch(
      /^test\.table:2: linear argument 1 \("missing\.img"\): device ".*missing\.img" does not exist/,
    );
    expect(manager.names()).toEqual([]);
    expect(manager.pool.refs(path)).toBe(0);
    const tooBig = await manager.create(tables("a: 0 128 linear a.img 0\n")).catch((e) => e);
    expect(tooBig.message).toMatch(/^test\.table:1: linear argument 2 \("0"\): .*does not fit/);
  });

  test("segments map offsets onto their targets; table and status print per segment", async () => {
    file("a.img", 16 * SECTOR_SIZE);
    file("b.img", 16 * SECTOR_SIZE);
    await manager.create([line("big", "0 16 linear a.img 0\n16 8 linear b.img 8\n24 8 zero")]);
    const big = manager.device("big");
    expect(big.sizeBytes).toBe(32 * SECTOR_SIZE);
    const data = Buffer.alloc(20 * SECTOR_SIZE, 7);
    await big.write(4 * SECTOR_SIZE, data);
    expect((await big.read(4 * SECTOR_SIZE, data.length)).equals(data)).toBe(true);
    expect((await big.read(24 * SECTOR_SIZE, 512)).equals(Buffer.alloc(512))).toBe(true);
    expect(
      manager.table("big").map((l) => `${l.startSectors} ${l.lengthSectors} ${l.targetType} ${l.args}`),
    ).toEqual([`0 16 linear ${join(dir, "a.img")} 0`, `16 8 linear ${join(dir, "b.img")} 8`, "24 8 zero "]);
  });

  test("reload swaps the table under live I/O: the gate stays, no request fails, old specs are released", async () => {
    const a = file("a.img", 64 * SECTOR_SIZE);
    const b = file("b.img", 64 * SECTOR_SIZE);
    await manager.create([line("vol", "0 64 linear a.img 0")]);
    const gate = manager.device("vol");
    const writes: Array<Promise<void>> = [];
    for (let i = 0; i < 32; i++) writes.push(gate.write(i * SECTOR_SIZE, Buffer.alloc(SECTOR_SIZE, i + 1)));
    const reload = manager.reload("vol", line("vol", "0 64 linear b.img 0"));
    for (let i = 32; i < 64; i++) writes.push(gate.write(i * SECTOR_SIZE, Buffer.alloc(SECTOR_SIZE, i + 1)));
    await reload;
    await Promise.all(writes);
    expect(manager.device("vol")).toBe(gate);
    expect(manager.pool.refs(a)).toBe(0);
    expect(manager.pool.refs(b)).toBe(1);
    expect(manager.table("vol")[0]!.args).toBe(`${b} 0`);
    // Writes issued before the swap are on a.img; from now on the gate writes to b.img.
    expect(readFileSync(a).subarray(0, SECTOR_SIZE).equals(Buffer.alloc(SECTOR_SIZE, 1))).toBe(true);
    await gate.write(0, Buffer.from("on b"));
    await gate.flush();
    expect(readFileSync(b).subarray(0, 4).toString()).toBe("on b");
    expect(readFileSync(a).subarray(0, 4).equals(Buffer.alloc(4, 1))).toBe(true);
  });

  test("reload refuses a table that would make a cycle and leaves the device as it was", async () => {
    await manager.create(tables("base: 0 16 linear mem:1M 0\ntop: 0 8 linear @base 0\n"));
    await expect(manager.reload("base", line("base", "0 8 linear @top 0"))).rejects.toThrow(
      /no udm device "top"/,
    );
    expect(manager.table("base")[0]!.args).toBe("mem:1M 0");
    expect(manager.device("base").state).toBe("active");
  });

  test("snapshot create on a busy origin loses no write; merge brings the origin back and removes the snapshot", async () => {
    file("origin.img", 256 * SECTOR_SIZE);
    await manager.create(tables("origin: 0 256 snapshot-origin origin.img\n"));
    const origin = manager.device("origin");
    await origin.write(0, Buffer.alloc(4096, 0xaa));
    // Writes in flight while the snapshot is taken: each is either before it or after it, whole.
    const during = [
      origin.write(4096, Buffer.alloc(4096, 0xbb)),
      origin.write(8192, Buffer.alloc(4096, 0xcc)),
    ];
    await manager.snapshotCreate("origin", "snap", {
      cow: join(dir, "snap.cow"),
      createSizeBytes: 1 << 20,
      chunkSectors: 8,
      persistent: true,
      overflowOk: false,
    });
    await Promise.all(during);
    const snap = manager.device("snap");
    const frozen = await snap.read(0, 3 * 4096);
    await origin.write(0, Buffer.alloc(3 * 4096, 0x11));
    expect((await snap.read(0, 3 * 4096)).equals(frozen)).toBe(true);
    expect(frozen.subarray(0, 4096).equals(Buffer.alloc(4096, 0xaa))).toBe(true);
    for (const [i, fill] of [
      [1, 0xbb],
      [2, 0xcc],
    ] as const) {
      const chunk = frozen.subarray(i * 4096, (i + 1) * 4096);
      expect(chunk.equals(Buffer.alloc(4096, fill)) || chunk.equals(Buffer.alloc(4096))).toBe(true);
    }
    expect(manager.status("snap")[0]!.args).toMatch(/^\d+\/2048 \d+$/);

    await manager.snapshotMerge("snap");
    for (let i = 0; i < 1000 && manager.has("snap"); i++) await new Promise((r) => setTimeout(r, 10));
    expect(manager.has("snap")).toBe(false);
    expect(manager.mergeState("snap").state).toBe("done");
    expect((await origin.read(0, 3 * 4096)).equals(frozen)).toBe(true);
  });

  test("targets stack: a snapshot of a mirror, through @NAME", async () => {
    file("a.img", 128 * SECTOR_SIZE);
    file("b.img", 128 * SECTOR_SIZE);
    await manager.create(
      tables(
        "m: 0 128 mirror core 2 16 nosync 2 a.img 0 b.img 0\n" +
          "mo: 0 128 snapshot-origin @m\n" +
          "ms: 0 128 snapshot @m mem:1M N 8\n",
      ),
    );
    await manager.device("mo").write(0, Buffer.alloc(4096, 9));
    expect((await manager.device("ms").read(0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    expect((await manager.device("m").read(0, 4096)).equals(Buffer.alloc(4096, 9))).toBe(true);
    expect(readFileSync(join(dir, "b.img")).subarray(0, 4096).equals(Buffer.alloc(4096, 9))).toBe(true);
    expect(manager.info("m").usedBy).toEqual(["mo", "ms"]);
    await manager.remove("ms"); // suspends mo around the unload
    expect(manager.device("mo").state).toBe("active");
  });

  test("table round-trips every target's line", async () => {
    const a = file("a.img", 256 * SECTOR_SIZE);
    const b = file("b.img", 256 * SECTOR_SIZE);
    const log = file("m.log", 64 * SECTOR_SIZE);
    const cow = file("s.cow", 256 * SECTOR_SIZE);
    const cow2 = file("s2.cow", 256 * SECTOR_SIZE);
    const lines: Array<[string, string]> = [
      ["lin", `0 64 linear ${a} 8`],
      ["zer", "0 64 zero"],
      ["err", "0 64 error"],
      ["fla", `0 64 flakey ${a} 0 5 1 1 error_writes`],
      ["mcore", `0 128 mirror core 2 16 nosync 2 ${a} 0 ${b} 0`],
      ["mdisk", `0 128 mirror disk 2 ${log} 16 2 ${a} 128 ${b} 128 1 handle_errors`],
      ["org", `0 128 snapshot-origin ${b}`],
      ["sp", `0 128 snapshot ${b} ${cow} P 8`],
      ["spo", `0 128 snapshot ${b} ${cow2} PO 16`],
      ["sn", `0 128 snapshot ${b} mem:1M N 8`],
    ];
    for (const [name, text] of lines) {
      await manager.create([line(name, text)]);
      const got = manager
        .table(name)
        .map((l) => `${l.startSectors} ${l.lengthSectors} ${l.targetType} ${l.args}`.trim());
      // nosync applies to a mirror log's first activation only: the table no longer re-asserts it.
      expect(got).toEqual([text.replace("core 2 16 nosync", "core 1 16")]);
    }
  });

  test("snapshot create refuses an origin that is not a snapshot-origin device", async () => {
    await manager.create([line("plain", "0 8 zero")]);
    await expect(
      manager.snapshotCreate("plain", "s", {
        cow: "mem:1M",
        chunkSectors: 8,
        persistent: false,
        overflowOk: false,
      }),
    ).rejects.toThrow(/plain is a zero device: a snapshot needs a snapshot-origin device/);
  });
  test("snapshot create zeroes an old COW's header (a new snapshot starts empty) unless reuseCow keeps it", async () => {
    file("origin.img", 256 * SECTOR_SIZE);
    await manager.create(tables("origin: 0 256 snapshot-origin origin.img\n"));
    const origin = manager.device("origin");
    await origin.write(0, Buffer.alloc(4096, 0xaa));
    const cow = join(dir, "old.cow");
    const opts = { cow, createSizeBytes: 1 << 20, chunkSectors: 8, persistent: true, overflowOk: false };
    await manager.snapshotCreate("origin", "s1", opts);
    await origin.write(0, Buffer.alloc(4096, 0xbb)); // s1 copies 0xaa out to the COW
    expect((await manager.device("s1").read(0, 4096)).equals(Buffer.alloc(4096, 0xaa))).toBe(true);
    // A COW in use by a live snapshot is never zeroed.
    await expect(manager.snapshotCreate("origin", "s2", opts)).rejects.toThrow(
      /COW .*old\.cow is in use by s1: a new snapshot needs a COW of its own/,
    );
    await manager.remove("s1");

    // A new snapshot on the old COW sees the origin as it is now, not s1's old chunk.
    await manager.snapshotCreate("origin", "s2", opts);
    expect((await manager.device("s2").read(0, 4096)).equals(Buffer.alloc(4096, 0xbb))).toBe(true);
    expect(manager.status("s2")[0]!.args).toMatch(/^\d+\/2048 \d+$/);
    const fresh = manager.status("s2")[0]!.args;
    await origin.write(0, Buffer.alloc(4096, 0xcc));
    expect((await manager.device("s2").read(0, 4096)).equals(Buffer.alloc(4096, 0xbb))).toBe(true);
    await manager.remove("s2");

    // reuseCow keeps the exceptions: s3 is s2 again (0xbb), whatever the origin holds now.
    await manager.snapshotCreate("origin", "s3", { ...opts, reuseCow: true });
    expect((await manager.device("s3").read(0, 4096)).equals(Buffer.alloc(4096, 0xbb))).toBe(true);
    expect(manager.status("s3")[0]!.args).not.toBe(fresh);
  });
});

/** What the fake target saw, in order: `build:T`, `suspend:T`, `preresume:T`, `resume:T`, `write:T`, `close:T`. */
const events: string[] = [];
/** Gates the fake's build and preresume wait on, by tag (set by a test, absent: no wait). */
const waits = new Map<string, Promise<void>>();

/**
 * `fake <dev> <tag> [fail_preresume]`: a linear-like target over `<dev>` that records its
 * lifecycle and I/O in `events` (dm's constructor, presuspend, preresume, resume, dtr).
 */
const fakeTarget: TargetType = {
  name: "fake",
  usage: "<dev> <tag> [fail_preresume]",
  async create(args, lengthBytes, context) {
    const [spec, tag, fail] = args;
    const inner = await context.openDevice(spec!);
    events.push(`build:${tag}`);
    await waits.get(`build:${tag}`);
    const dev: TargetDevice = {
      name: `fake(${tag})`,
      targetType: "fake",
      sizeBytes: lengthBytes,
      logicalBlockSize: 512,
      readOnly: false,
      table: () => args.join(" "),
      status: () => "",
      read: (o, l) => inner.read(o, l),
      readInto: (o, b) => inner.readInto(o, b),
      write: async (o, d) => {
        events.push(`write:${tag}`);
        await inner.write(o, d);
      },
      flush: () => inner.flush(),
      discard: () => Promise.resolve(),
      writeZeroes: (o, l) => inner.writeZeroes(o, l),
      extents: (o, l) => Promise.resolve([{ offsetBytes: o, lengthBytes: l, kind: "data" }]),
      suspend: async () => {
        events.push(`suspend:${tag}`);
      },
      resume: async () => {
        events.push(`resume:${tag}`);
      },
      preresume: async () => {
        events.push(`preresume:${tag}`);
        await waits.get(`preresume:${tag}`);
        if (fail === "fail_preresume") throw new Error(`${tag} refuses to take over`);
      },
      close: async () => {
        events.push(`close:${tag}`);
      },
    };
    return dev;
  },
};

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

async function until(what: () => boolean): Promise<void> {
  for (let i = 0; i < 2000 && !what(); i++) await new Promise((r) => setTimeout(r, 1));
  expect(what()).toBe(true);
}

describe("DeviceManager reload, dm's way (a fake target with preresume)", () => {
  beforeEach(async () => {
    await manager.closeAll();
    manager = new DeviceManager({ targets: [...allTargets(), fakeTarget], log });
    events.length = 0;
    waits.clear();
  });

  test("the new table is built while the old one serves; then suspend, preresume, swap, resume; held I/O goes to the new table", async () => {
    const a = file("a.img", 64 * SECTOR_SIZE);
    await manager.create([line("vol", "0 64 fake a.img A")]);
    expect(events).toEqual(["build:A", "preresume:A"]); // create = load + resume: preresume too
    events.length = 0;
    const gate = manager.device("vol");
    const build = deferred();
    waits.set("build:B", build.promise);
    const preresume = deferred();
    waits.set("preresume:B", preresume.promise);
    const reload = manager.reload("vol", line("vol", "0 64 fake a.img B"));
    await until(() => events.includes("build:B"));
    // Building: the old table serves writes, nothing of it was touched.
    await gate.write(0, Buffer.alloc(512, 1));
    expect(events).toEqual(["build:B", "write:A"]);
    build.resolve();
    await until(() => events.includes("preresume:B"));
    expect(gate.state).toBe("suspended");
    // Suspended for the switch: a write is held, not failed, and goes to the new table.
    const held = gate.write(512, Buffer.alloc(512, 2));
    await until(() => gate.heldRequests === 1);
    preresume.resolve();
    await reload;
    await held;
    // The held write and the old table's close race after the resume.
    expect(events.filter((e) => e !== "close:A")).toEqual([
      "build:B",
      "write:A",
      "suspend:A",
      "preresume:B",
      "resume:B",
      "write:B",
    ]);
    expect(events.indexOf("close:A")).toBeGreaterThan(events.indexOf("resume:B"));
    expect(gate.state).toBe("active");
    expect(manager.pool.refs(a)).toBe(1);
  });

  test("a preresume that fails leaves the old table serving exactly as it was; the new one is closed and its devices released", async () => {
    const a = file("a.img", 64 * SECTOR_SIZE);
    const b = file("b.img", 64 * SECTOR_SIZE);
    await manager.create([line("vol", "0 32 fake a.img A\n32 32 fake a.img A2")]);
    events.length = 0;
    const err = await manager
      .reload("vol", line("vol", "0 32 fake b.img B\n32 32 fake b.img C fail_preresume"))
      .catch((e: Error) => e);
    expect(err).toBeInstanceOf(TableParseError);
    expect((err as Error).message).toMatch(/^--table:2: fake: C refuses to take over/);
    expect(events).toEqual([
      "build:B",
      "build:C",
      "suspend:A",
      "suspend:A2",
      "preresume:B",
      "preresume:C",
      "resume:A",
      "resume:A2",
      "close:B",
      "close:C",
    ]);
    expect(manager.pool.refs(b)).toBe(0);
    expect(manager.pool.refs(a)).toBe(2);
    const gate = manager.device("vol");
    expect(gate.state).toBe("active");
    expect(manager.table("vol").map((l) => l.args)).toEqual(["a.img A", "a.img A2"]);
    events.length = 0;
    await gate.write(0, Buffer.alloc(512, 3));
    expect(events).toEqual(["write:A"]);
    // A create whose preresume fails leaves nothing behind either.
    await expect(manager.create([line("x", "0 8 fake b.img X fail_preresume")])).rejects.toThrow(
      /X refuses to take over/,
    );
    expect(manager.has("x")).toBe(false);
    expect(manager.pool.refs(b)).toBe(0);
  });

  test("reload of a snapshot takes its exceptions over in preresume: I/O meanwhile never fails; a reload that fails to build leaves it valid", async () => {
    writeFileSync(join(dir, "o.img"), Buffer.alloc(256 * SECTOR_SIZE, 0x11));
    file("s.cow", 1 << 20);
    file("small.img", SECTOR_SIZE);
    await manager.create(tables("o: 0 256 snapshot-origin o.img\ns: 0 256 snapshot o.img s.cow P 8\n"));
    await manager.device("o").write(0, Buffer.alloc(4096, 0x22)); // copied out: s keeps 0x11
    const s = manager.device("s");
    // The second segment cannot be built (small.img is one sector): the live snapshot stays valid.
    await expect(
      manager.reload("s", line("s", "0 256 snapshot o.img s.cow P 8\n256 8 linear small.img 0")),
    ).rejects.toThrow(/small\.img/);
    expect((await s.read(0, 4096)).equals(Buffer.alloc(4096, 0x11))).toBe(true);
    await s.write(8192, Buffer.alloc(4096, 0x33));
    // Reloads under a stream of snapshot reads and writes and origin writes: none fails.
    let stop = false;
    const failures: string[] = [];
    const stream = (async () => {
      for (let i = 0; !stop; i++) {
        const chunk = 4 + (i % 24);
        await Promise.all([
          s.write(chunk * 4096, Buffer.alloc(4096, i & 0xff)),
          s.read(0, 4096).then((b) => {
            if (b[0] !== 0x11) failures.push(`snapshot chunk 0 reads ${b[0]}`);
          }),
          manager.device("o").write((28 + (i % 4)) * 4096, Buffer.alloc(4096, 0x44)),
        ]).catch((err: Error) => failures.push(err.message));
      }
    })();
    for (let r = 0; r < 5; r++) await manager.reload("s", line("s", "0 256 snapshot o.img s.cow P 8"));
    stop = true;
    await stream;
    expect(failures).toEqual([]);
    expect((await s.read(0, 4096)).equals(Buffer.alloc(4096, 0x11))).toBe(true);
    expect((await s.read(8192, 4096)).equals(Buffer.alloc(4096, 0x33))).toBe(true);
    expect((await s.read(28 * 4096, 4096)).equals(Buffer.alloc(4096, 0x11))).toBe(true);
  });

  test("reload of a suspended device loads the table and leaves it suspended; resume switches", async () => {
    file("a.img", 64 * SECTOR_SIZE);
    await manager.create([line("vol", "0 64 fake a.img A")]);
    await manager.suspend("vol");
    events.length = 0;
    const gate = manager.device("vol");
    const held = gate.write(0, Buffer.alloc(512, 4));
    await until(() => gate.heldRequests === 1);
    await manager.reload("vol", line("vol", "0 64 fake a.img B"));
    expect(gate.state).toBe("suspended");
    expect(gate.heldRequests).toBe(1);
    expect(events).toEqual(["build:B", "preresume:B", "close:A"]);
    await manager.resume("vol");
    await held;
    expect(events).toEqual(["build:B", "preresume:B", "close:A", "resume:B", "write:B"]);
  });

  test("suspend and resume do not wait for the table lock: resuming the device that holds a reload's drain lets it finish", async () => {
    file("a.img", 64 * SECTOR_SIZE);
    await manager.create(tables("lin: 0 64 linear a.img 0\ntop: 0 64 fake @lin A\nother: 0 8 zero\n"));
    await manager.suspend("lin");
    const write = manager.device("top").write(0, Buffer.alloc(512, 5)); // held below top, in lin
    await until(() => manager.device("lin").heldRequests === 1);
    let reloaded = false;
    const reload = manager.reload("top", line("top", "0 64 fake @lin B")).then(() => {
      reloaded = true;
    });
    await until(() => events.includes("suspend:A"));
    await manager.suspend("other"); // an unrelated device
    await manager.resume("other");
    expect(reloaded).toBe(false);
    await manager.resume("lin");
    await reload;
    await write;
    expect(manager.device("top").state).toBe("active");
  });
});

describe("DeviceManager and the metadata record", () => {
  test("every state-changing command records the new state before it returns; a failed record fails the command and undoes it", async () => {
    await manager.closeAll();
    const records: MetadataState[] = [];
    let failNext = false;
    manager = new DeviceManager({
      targets: allTargets(),
      log,
      record: async (state) => {
        if (failNext) {
          failNext = false;
          throw new Error("disk full");
        }
        records.push(state);
      },
    });
    const names = () => records[records.length - 1]!.devices.map((d) => `${d.name}: ${d.lines.join(" / ")}`);
    file("o.img", 256 * SECTOR_SIZE);
    await manager.create(tables("o: 0 256 snapshot-origin o.img\n"));
    expect(names()).toEqual([`o: 0 256 snapshot-origin o.img`]);
    await manager.reload("o", line("o", "0 256 snapshot-origin o.img"));
    expect(records).toHaveLength(2);
    await manager.snapshotCreate("o", "s", {
      cow: join(dir, "s.cow"),
      createSizeBytes: 1 << 20,
      chunkSectors: 8,
      persistent: true,
      overflowOk: false,
    });
    expect(names()).toEqual([
      `o: 0 256 snapshot-origin o.img`,
      `s: 0 256 snapshot o.img ${join(dir, "s.cow")} P 8`,
    ]);
    await manager.suspend("o"); // not a change of what exists
    await manager.resume("o");
    expect(records).toHaveLength(3);

    failNext = true;
    await expect(manager.reload("o", line("o", "0 256 linear o.img 0"))).rejects.toThrow(/disk full/);
    expect(manager.table("o")[0]!.targetType).toBe("snapshot-origin");
    expect(manager.device("o").state).toBe("active");
    failNext = true;
    await expect(manager.create([line("z", "0 8 zero")])).rejects.toThrow(/disk full/);
    expect(manager.has("z")).toBe(false);
    failNext = true;
    await expect(manager.remove("s")).rejects.toThrow(/disk full/);
    expect(manager.has("s")).toBe(true);
    expect(records).toHaveLength(3);

    await manager.device("s").write(0, Buffer.alloc(4096, 0x5e)); // an exception to merge
    await manager.suspend("o"); // the merge waits: it is recorded as in progress
    await manager.snapshotMerge("s");
    expect(records[records.length - 1]!.devices[1]).toMatchObject({
      name: "s",
      lines: [`0 256 snapshot-merge o.img ${join(dir, "s.cow")} P 8`],
      merging: true,
    });
    await manager.resume("o");
    await until(() => !manager.has("s"));
    expect(names()).toEqual([`o: 0 256 snapshot-origin o.img`]);
  });

  test("activate starts what a record says; a merge that was in progress resumes and ends with the device removed", async () => {
    file("o.img", 256 * SECTOR_SIZE);
    const cow = join(dir, "s.cow");
    await manager.create(tables("o: 0 256 snapshot-origin o.img\n"));
    await manager.snapshotCreate("o", "s", {
      cow,
      createSizeBytes: 1 << 20,
      chunkSectors: 8,
      persistent: true,
      overflowOk: false,
    });
    await manager.device("s").write(8192, Buffer.alloc(4096, 0x77));
    await manager.device("s").flush();
    await manager.suspend("o");
    await manager.snapshotMerge("s");
    const recorded = manager.recordedState();
    expect(recorded.devices.map((d) => d.merging ?? false)).toEqual([false, true]);
    await manager.resume("o");
    await manager.closeAll();

    // A new server: the record, not a table file, says what runs.
    manager = new DeviceManager({ targets: allTargets(), log });
    await manager.activate(recorded, "udm.meta.json");
    expect(manager.names()).toEqual(["o", "s"]);
    expect(manager.table("s")[0]!.targetType).toBe("snapshot-merge");
    await until(() => !manager.has("s"));
    expect(manager.mergeState("s").state).toBe("done");
    expect((await manager.device("o").read(8192, 4096)).equals(Buffer.alloc(4096, 0x77))).toBe(true);
  });
});
