/**
 * Issue 12, end to end: a mirror must never hand a client stale data, through the NBD server
 * (READ of 64 KiB+ and BLOCK_STATUS) or after `udm serve` is killed and restarted.
 */
import type { ChildProcess } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type BlockDevice, FlakeyDevice, KcopydClient, MemoryDevice } from "@udm/kcopyd";
import { type MirrorDevice, mirrorTarget } from "@udm/mirror";
import { NbdDevice, NbdServer } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, startServe, udmAsync } from "./cli-helpers.js";

const KIB = 1024;

let dir: string;
beforeAll(() => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-mirror-stale-"));
}, 300_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Serves `device` as export "m" on 127.0.0.1 and connects a client to it. */
async function serveOverNbd(device: BlockDevice) {
  const server = new NbdServer();
  server.addExport("m", device);
  const address = await server.listen({ host: "127.0.0.1", port: 0 });
  const client = await NbdDevice.connect(`nbd://${address}/m`);
  return {
    client,
    async close() {
      await client.close();
      await server.close({ force: true });
    },
  };
}

describe("reads and block status come from a leg that is current", () => {
  const REGION = 64 * KIB; // 128 sectors
  const SIZE = 32768 * 512;

  test("a leg that missed a write and came back: a 64 KiB read and BLOCK_STATUS through NBD show the data", async () => {
    // fa: 0 32768 flakey a.img 0 6 6 1 error_writes; m: 0 32768 mirror core 2 128 nosync 2 @fa 0 b.img 0
    const a = new MemoryDevice(SIZE, { name: "a.img" });
    const fa = new FlakeyDevice(a, {
      upIntervalSeconds: 6,
      downIntervalSeconds: 6,
      errorWrites: true,
      name: "@fa",
    });
    fa.setMode("up");
    const b = new MemoryDevice(SIZE, { name: "b.img" });
    const devices: Record<string, BlockDevice> = { "@fa": fa, "b.img": b };
    const m = (await mirrorTarget.create("core 2 128 nosync 2 @fa 0 b.img 0".split(" "), SIZE, {
      kcopyd: new KcopydClient(),
      openDevice: async (spec) => devices[spec]!,
    })) as MirrorDevice;
    await m.suspend(); // no resync: the stale leg stays stale while we look
    const nbd = await serveOverNbd(m);
    try {
      fa.setMode("down");
      await nbd.client.write(5 * REGION, Buffer.alloc(REGION, 0x5a));
      expect(m.status()).toBe("2 @fa b.img 255/256 1 DA 1 core");
      fa.setMode("up");
      expect((await nbd.client.read(5 * REGION, 4 * KIB)).equals(Buffer.alloc(4 * KIB, 0x5a))).toBe(true);
      expect((await nbd.client.read(5 * REGION, REGION)).equals(Buffer.alloc(REGION, 0x5a))).toBe(true);
      expect((await nbd.client.read(4 * REGION, 3 * REGION)).subarray(REGION, 2 * REGION)).toEqual(
        Buffer.alloc(REGION, 0x5a),
      );
      // BLOCK_STATUS base:allocation: the region holds data, never HOLE|ZERO.
      const extents = await nbd.client.extents(4 * REGION, 3 * REGION);
      const over5 = extents.filter(
        (e) => e.offsetBytes < 6 * REGION && e.offsetBytes + e.lengthBytes > 5 * REGION,
      );
      expect(over5.map((e) => e.kind)).toEqual(["data"]);
    } finally {
      await nbd.close();
      await m.close();
    }
  });

  test("a reload that replaces a leg by an empty one: extents() during the resync report the data", async () => {
    const a = new MemoryDevice(SIZE, { name: "a" });
    const b = new MemoryDevice(SIZE, { name: "b" });
    const c = new MemoryDevice(SIZE, { name: "c" });
    const devices: Record<string, BlockDevice> = { a, b, c };
    const kcopyd = new KcopydClient();
    const openDevice = async (spec: string) => devices[spec]!;
    const m1 = (await mirrorTarget.create("core 1 128 2 a 0 b 0".split(" "), SIZE, {
      kcopyd,
      openDevice,
    })) as MirrorDevice;
    await m1.write(0, Buffer.alloc(SIZE, 0x33));
    await m1.waitForSync();
    await m1.suspend();
    const m2 = (await mirrorTarget.create("core 1 128 2 c 0 b 0".split(" "), SIZE, {
      kcopyd,
      openDevice,
      previous: m1,
    })) as MirrorDevice;
    await m2.preresume();
    await m2.suspend(); // the resync stops; c still lacks most regions
    const nbd = await serveOverNbd(m2);
    try {
      const extents = await nbd.client.extents(0, SIZE);
      expect(extents).toEqual([{ offsetBytes: 0, lengthBytes: SIZE, kind: "data" }]);
      expect((await nbd.client.read(SIZE - 256 * KIB, 256 * KIB)).equals(Buffer.alloc(256 * KIB, 0x33))).toBe(
        true,
      );
    } finally {
      await nbd.close();
      await m2.close();
      await m1.close();
    }
  });
});

/** Reads `length` bytes of a file at `offset`. */
function readFileRange(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const buf = Buffer.alloc(length);
    readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    closeSync(fd);
  }
}

describe("the embedded default after kill -9", () => {
  const REGION = 512 * KIB; // the embedded mirror's 1024-sector regions

  test("regions dirty at the crash are resynced on restart: the legs end identical", async () => {
    const ctl = ["--control", join(dir, "embedded.sock")];
    let serve = await startServe(["--data-dir", "data", "--listen", "127.0.0.1:0", ...ctl], { cwd: dir });
    const children = new Set<ChildProcess>([serve.child]);
    try {
      const dev = await NbdDevice.connect(`nbd://127.0.0.1:${serve.port}/mirror0`);
      // Keep writing regions 0 and 5 until the kill, so both are dirty whatever the timing.
      let writes = 0;
      let stop = false;
      const writer = (async () => {
        for (let i = 0; !stop; i++) {
          await dev.write((i % 2) * 5 * REGION, Buffer.alloc(4 * KIB, 1 + (i % 200))).catch(() => {
            stop = true;
          });
          writes++;
        }
      })();
      while (writes < 20) await new Promise((r) => setTimeout(r, 5));
      process.kill(serve.child.pid!, "SIGKILL");
      stop = true;
      await writer;
      await dev.close().catch(() => undefined);
      const killed = serve.child;
      if (killed.exitCode === null && killed.signalCode === null)
        await new Promise((r) => killed.once("exit", r));
      const inspect = await udmAsync(["mirror", "inspect-log", "data/mirror0.log", "--json"], { cwd: dir });
      const dirty = (JSON.parse(inspect.stdout).outOfSync as Array<{ first: number; last: number }>).flatMap(
        ({ first, last }) => Array.from({ length: last - first + 1 }, (_, i) => first + i),
      );
      expect(dirty).toContain(0);
      expect(dirty).toContain(5);
      // A torn in-flight write: leg b differs from a in region 5.
      const bPath = join(dir, "data/mirror0-b.img");
      const fd = openSync(bPath, "r+");
      writeSync(fd, Buffer.alloc(4 * KIB, 0xee), 0, 4 * KIB, 5 * REGION + 64 * KIB);
      closeSync(fd);
      serve = await startServe(["--data-dir", "data", "--listen", "127.0.0.1:0", ...ctl], { cwd: dir });
      children.add(serve.child);
      let status = "";
      for (let i = 0; i < 600; i++) {
        status = (await udmAsync([...ctl, "status", "mirror0"], { cwd: dir })).stdout;
        if (/ 2048\/2048 /.test(status)) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(status).toMatch(/ 2048\/2048 1 AA /);
      expect(await serve.stop()).toBe(0);
      const aPath = join(dir, "data/mirror0-a.img");
      expect(readFileRange(bPath, 0, 6 * REGION).equals(readFileRange(aPath, 0, 6 * REGION))).toBe(true);
      // The table the embedded default wrote never asks a restart to trust the legs.
      const table = readFileSync(join(dir, "data/udm.table"), "utf8");
      expect(table).not.toMatch(/\bnosync\b.*mirror0-a/);
    } finally {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
    }
  }, 120_000);
});
