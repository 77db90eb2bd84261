/**
 * The control plane under live NBD clients (issue 19): reload, suspend, create and remove never
 * fail a client's I/O, corrupt a device or wedge the server; busy devices are not pulled away
 * (issue 15). Every test runs the built `udm` against a real `udm serve`.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect as connectSocket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NbdDevice } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, type ServeProcess, startServe, udmAsync } from "./cli-helpers.js";

const MIB = 1 << 20;
let dir: string;
let serve: ServeProcess | undefined;
const clients: NbdDevice[] = [];

const sock = () => join(dir, "ctl.sock");
const run = (...args: string[]) => udmAsync(["--control", sock(), "--timeout", "20", ...args], { cwd: dir });

async function ok(...args: string[]): Promise<string> {
  const r = await run(...args);
  expect(r.stderr, `udm ${args.join(" ")}`).toBe("");
  expect(r.status, `udm ${args.join(" ")}`).toBe(0);
  return r.stdout;
}

async function info(name: string): Promise<{ state: string; heldRequests: number; connections: number }> {
  return JSON.parse(await ok("info", name, "--json"))[0];
}

/** Polls until `what` holds (a control-plane state reached), failing after a bounded number of tries. */
async function until(what: () => Promise<boolean>, label: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (await what()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`never reached: ${label}`);
}

async function connect(name: string, port = serve!.port): Promise<NbdDevice> {
  const dev = await NbdDevice.connect(`nbd://127.0.0.1:${port}/${name}`);
  clients.push(dev);
  return dev;
}

async function disconnect(dev: NbdDevice): Promise<void> {
  clients.splice(clients.indexOf(dev), 1);
  await dev.close().catch(() => undefined);
}

function image(name: string, bytes: number, fill?: (buf: Buffer) => void): string {
  const buf = Buffer.alloc(bytes);
  fill?.(buf);
  writeFileSync(join(dir, name), buf);
  return join(dir, name);
}

/** One raw control connection: send lines, read reply lines (the protocol of control-protocol.ts). */
function rawControl() {
  const socket = connectSocket(sock());
  let buffered = "";
  const lines: string[] = [];
  const waiters: Array<() => void> = [];
  socket.setEncoding("utf8");
  socket.on("data", (chunk: string) => {
    buffered += chunk;
    let nl = buffered.indexOf("\n");
    while (nl >= 0) {
      lines.push(buffered.slice(0, nl));
      buffered = buffered.slice(nl + 1);
      nl = buffered.indexOf("\n");
    }
    for (const w of waiters.splice(0)) w();
  });
  return {
    socket,
    async reply(): Promise<{ id: number; ok: boolean; error?: { code: string; message: string } }> {
      while (lines.length === 0) await new Promise<void>((r) => waiters.push(r));
      return JSON.parse(lines.shift()!);
    },
  };
}

beforeAll(async () => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-control-"));
  writeFileSync(join(dir, "empty.table"), "");
  serve = await startServe(["--table", "empty.table", "--listen", "127.0.0.1:0", "--control", sock()], {
    cwd: dir,
  });
}, 300_000);

afterAll(async () => {
  for (const c of clients.splice(0)) await c.close().catch(() => undefined);
  if (serve && serve.child.exitCode === null) serve.child.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

describe("issue 19: reload, suspend, create and remove under writing clients", () => {
  test("item 1: reloading a mirror under a stream of 64 KiB writes fails none of them and loses none", async () => {
    image("m1-a.img", 8 * MIB);
    image("m1-b.img", 8 * MIB);
    const table = "0 16384 mirror core 1 1024 2 m1-a.img 0 m1-b.img 0";
    await ok("create", "m1", "--table", table);
    const m1 = await connect("m1");
    const model = Buffer.alloc(8 * MIB);
    let stop = false;
    let writes = 0;
    const failures: string[] = [];
    const writer = (async () => {
      for (let i = 0; !stop; i++) {
        const at = ((i * 7919) % 128) * 65536;
        const data = randomBytes(65536);
        try {
          await m1.write(at, data);
          data.copy(model, at);
          writes++;
        } catch (err) {
          failures.push((err as Error).message);
        }
      }
    })();
    for (let i = 0; i < 4; i++) await ok("reload", "m1", "--table", table);
    stop = true;
    await writer;
    expect(failures).toEqual([]);
    expect(writes).toBeGreaterThan(0);
    expect((await m1.read(0, 8 * MIB)).equals(model)).toBe(true);
    await disconnect(m1);
    await ok("remove", "m1");
  });

  test("item 2: a reload that fails at a later segment leaves the mirror as it was: writes still succeed", async () => {
    image("m2-a.img", MIB);
    image("m2-b.img", MIB);
    image("m2-lin.img", 32 * MIB);
    const mirror = "0 2048 mirror core 1 64 2 m2-a.img 0 m2-b.img 0";
    await ok("create", "m2", "--table", mirror, "--table", "2048 2048 linear m2-lin.img 0");
    const before = await ok("table", "m2");
    const failed = await run(
      "reload",
      "m2",
      "--table",
      mirror,
      "--table",
      "2048 2048 linear /nonexist/x.img 0",
    );
    expect(failed.stderr).toMatch(/^udm: --table:2: linear argument 1 \("\/nonexist\/x\.img"\): /);
    expect(failed.status).toBe(1);
    expect((await info("m2")).state).toBe("active");
    expect(await ok("table", "m2")).toBe(before);
    const m2 = await connect("m2");
    await m2.write(0, Buffer.alloc(4096, 0x42));
    await m2.flush();
    expect((await m2.read(0, 4096)).equals(Buffer.alloc(4096, 0x42))).toBe(true);
    expect(readFileSync(join(dir, "m2-b.img")).subarray(0, 4096).equals(Buffer.alloc(4096, 0x42))).toBe(true);
    await disconnect(m2);
    await ok("remove", "m2");
  });

  test("item 3: a COW that is the origin, or stacks on it, is refused before anything is written; the control plane stays responsive", async () => {
    image("o3.img", 4 * MIB, (b) => b.fill(0x33));
    await ok("create", "o3", "--table", "0 8192 snapshot-origin o3.img");
    const itself = await run("snapshot", "create", "o3", "s3", "--cow", "@o3");
    expect(itself.stderr).toBe(
      'udm: snapshot create:1: snapshot argument 2 ("@o3"): the COW is @o3, a snapshot-origin device of the origin: a COW must be a device of its own\n',
    );
    expect(itself.status).toBe(1);
    await ok("create", "o3up", "--table", "0 8192 linear @o3 0");
    const stacked = await run("snapshot", "create", "o3", "s3", "--cow", "@o3up");
    expect(stacked.stderr).toMatch(/the COW stacks on @o3, a snapshot-origin device of the origin/);
    expect(stacked.status).toBe(1);
    const file = await run("snapshot", "create", "o3", "s3", "--cow", "o3.img");
    expect(file.stderr).toMatch(/the COW is the origin .*\/o3\.img: a COW must be a device of its own/);
    expect(file.status).toBe(1);
    // Through `create` too.
    const r = await run("create", "s3", "--table", "0 8192 snapshot o3.img @o3up P 8");
    expect(r.stderr).toMatch(
      /^udm: --table:1: snapshot argument 2 \("@o3up"\): the COW stacks on @o3, a snapshot-origin device of the origin/,
    );
    expect(r.status).toBe(1);
    expect((await info("o3")).state).toBe("active");
    expect(readFileSync(join(dir, "o3.img")).equals(Buffer.alloc(4 * MIB, 0x33))).toBe(true);
    await ok("suspend", "o3");
    await ok("resume", "o3");
    await ok("remove", "o3up");
    await ok("remove", "o3");
  });

  test("item 7: a snapshot create that fails for a known reason writes nothing to the COW it was given", async () => {
    image("o7.img", 4 * MIB);
    const cowBytes = randomBytes(MIB);
    writeFileSync(join(dir, "c7.cow"), cowBytes);
    await ok("create", "o7", "--table", "0 8192 snapshot-origin o7.img");
    await ok("create", "taken", "--table", "0 8 zero");
    const exists = await run("snapshot", "create", "o7", "taken", "--cow", "c7.cow");
    expect(exists.stderr).toBe('udm: snapshot create:1: device "taken" already exists\n');
    expect(exists.status).toBe(1);
    expect(readFileSync(join(dir, "c7.cow")).equals(cowBytes)).toBe(true);
    const bigChunk = await run("snapshot", "create", "o7", "s7", "--cow", "c7.cow", "--chunk-size", "1M");
    expect(bigChunk.stderr).toMatch(
      /COW .*c7\.cow is 1048576 bytes: a persistent COW needs at least a header and a metadata chunk \(2097152 bytes\)/,
    );
    expect(bigChunk.status).toBe(1);
    expect(readFileSync(join(dir, "c7.cow")).equals(cowBytes)).toBe(true);
    await ok("remove", "taken");
    await ok("remove", "o7");
  });

  test("issue 13 item 5: snapshot create drains every snapshot-origin device of the origin, not only the named one", async () => {
    image("b5.img", 4 * MIB);
    await ok("create", "b5", "--table", "0 8192 linear b5.img 0");
    // o5b first: it is suspended first, so its drain is what waits for b5 below.
    await ok("create", "o5b", "--table", "0 8192 snapshot-origin @b5");
    await ok("create", "o5a", "--table", "0 8192 snapshot-origin @b5");
    const o5b = await connect("o5b");
    await ok("suspend", "b5");
    let written = false;
    const write = o5b.write(0, Buffer.alloc(4096, 0x55)).then(() => {
      written = true;
    });
    await until(async () => (await info("b5")).heldRequests === 1, "the write on o5b is held in b5");
    const created = run("snapshot", "create", "o5a", "s5", "--cow", "s5.cow", "--size", "4M");
    // o5b is suspended too: its in-flight write must drain before the snapshot exists.
    await until(async () => (await info("o5b")).state === "suspended", "o5b suspended by snapshot create");
    await ok("resume", "b5");
    const r = await created;
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(written).toBe(true);
    await write;
    // The write finished before the snapshot was taken: the snapshot holds it.
    const s5 = await connect("s5");
    expect((await s5.read(0, 4096)).equals(Buffer.alloc(4096, 0x55))).toBe(true);
    await disconnect(s5);
    await disconnect(o5b);
    await ok("remove", "s5");
    await ok("remove", "o5b");
    await ok("remove", "o5a");
    await ok("remove", "b5");
  });

  test("item 4: a reload waiting for a drain held by a suspended lower device does not wedge the server; resuming that device finishes it", async () => {
    image("lin4.img", 4 * MIB);
    await ok("create", "lin4", "--table", "0 8192 linear lin4.img 0");
    await ok("create", "top4", "--table", "0 8192 linear @lin4 0");
    await ok("create", "other4", "--table", "0 8 zero");
    const top = await connect("top4");
    await ok("suspend", "lin4");
    const write = top.write(0, Buffer.alloc(4096, 0x44));
    await until(async () => (await info("lin4")).heldRequests === 1, "the write is held in lin4");
    const reload = run("reload", "top4", "--table", "0 8192 linear @lin4 0");
    await until(async () => (await info("top4")).state === "suspended", "the reload is suspending top4");
    // Neither an unrelated device's suspend nor the resume below queues behind the pending reload.
    await ok("suspend", "other4");
    await ok("resume", "other4");
    await ok("resume", "lin4");
    const r = await reload;
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    await write;
    expect((await info("top4")).state).toBe("active");
    expect((await top.read(0, 4096)).equals(Buffer.alloc(4096, 0x44))).toBe(true);
    await disconnect(top);
    await ok("remove", "other4");
    await ok("remove", "top4");
    await ok("remove", "lin4");
  });

  test("item 5: a merging snapshot is not removed without --force; --force reports the merge aborted; an unknown name is an error", async () => {
    image("mo5.img", 4 * MIB);
    image("ms5.cow", 4 * MIB);
    await ok("create", "mo5", "--table", "0 8192 linear mo5.img 0");
    await ok("create", "ms5", "--table", "0 8192 snapshot @mo5 ms5.cow P 8");
    const ms = await connect("ms5");
    await ms.write(0, randomBytes(MIB)); // 1 MiB of exceptions to merge
    await ms.flush();
    await disconnect(ms);
    await ok("suspend", "mo5"); // the merge's writes are held: it stays in progress
    const merge = run("snapshot", "merge", "ms5");
    await until(async () => (await ok("table", "ms5")).includes("snapshot-merge"), "ms5 is merging");
    const refused = await run("remove", "ms5");
    expect(refused.stderr).toBe(
      "udm: ms5 is merging into its origin: wait for the merge (udm snapshot merge ms5), or --force to abort it\n",
    );
    expect(refused.status).toBe(1);
    // The merge's in-flight copy is held by the suspended mo5: the forced remove finishes
    // once mo5 is resumed (it waits without holding up the control plane).
    const forced = run("remove", "--force", "ms5");
    await until(async () => !(await ok("ls")).includes("ms5"), "ms5 is being removed");
    await ok("resume", "mo5");
    expect((await forced).status).toBe(0);
    const waited = await merge;
    expect(waited.stdout).not.toMatch(/merged/);
    expect(waited.stderr).toMatch(
      /udm: merge of ms5 failed: merge aborted: ms5 was removed with --force \(\d+ of 1048576 bytes not merged\)\n$/,
    );
    expect(waited.status).toBe(1);
    const raw = rawControl();
    raw.socket.write(`${JSON.stringify({ id: 7, verb: "merge-status", args: { name: "nosuch" } })}\n`);
    expect(await raw.reply()).toMatchObject({ id: 7, ok: false, error: { code: "ENOENT" } });
    raw.socket.destroy();
    await ok("remove", "mo5");
  });

  test("item 6: reload keeps a user-suspended device suspended (held I/O waits for resume, then goes to the new table); suspend --noflush", async () => {
    image("v6a.img", MIB);
    image("v6b.img", MIB);
    await ok("create", "v6", "--table", "0 2048 linear v6a.img 0");
    const v6 = await connect("v6");
    await ok("suspend", "v6");
    const write = v6.write(0, Buffer.alloc(4096, 0x66));
    await until(async () => (await info("v6")).heldRequests === 1, "the write is held");
    await ok("reload", "v6", "--table", "0 2048 linear v6b.img 0");
    const after = await info("v6");
    expect(after.state).toBe("suspended");
    expect(after.heldRequests).toBe(1);
    await ok("resume", "v6");
    await write;
    await v6.flush();
    expect(readFileSync(join(dir, "v6b.img")).subarray(0, 4096).equals(Buffer.alloc(4096, 0x66))).toBe(true);
    expect(readFileSync(join(dir, "v6a.img")).subarray(0, 4096).equals(Buffer.alloc(4096))).toBe(true);
    await disconnect(v6);
    // --noflush: a device stacked on a suspended one suspends without waiting for a flush through it.
    await ok("create", "up6", "--table", "0 2048 linear @v6 0");
    await ok("suspend", "v6");
    await ok("suspend", "--noflush", "up6");
    expect((await info("up6")).state).toBe("suspended");
    await ok("resume", "up6");
    await ok("resume", "v6");
    await ok("remove", "up6");
    await ok("remove", "v6");
  });

  test("item 8: a null request is EPROTO, info with a non-string name is EINVAL", async () => {
    const raw = rawControl();
    raw.socket.write("null\n");
    expect(await raw.reply()).toMatchObject({ id: 0, ok: false, error: { code: "EPROTO" } });
    raw.socket.write(`${JSON.stringify({ id: 2, verb: "info", args: { name: 5 } })}\n`);
    expect(await raw.reply()).toMatchObject({
      id: 2,
      ok: false,
      error: { code: "EINVAL", message: '"name" must be a string, got 5' },
    });
    raw.socket.write(`${JSON.stringify({ id: 3, verb: "ping" })}\n`);
    expect(await raw.reply()).toMatchObject({ id: 3, ok: true });
    raw.socket.destroy();
  });

  test("item 8: a client that sends without reading its replies is not read beyond a bound; the server keeps answering others", async () => {
    await ok("create", "bp1", "--table", "0 8 zero");
    const raw = rawControl();
    raw.socket.pause(); // read nothing
    const line = `${JSON.stringify({ id: 1, verb: "ls" })}\n`;
    const count = 300_000;
    const total = line.length * count;
    const batch = line.repeat(1000);
    for (let i = 0; i < count / 1000; i++) raw.socket.write(batch);
    // Without a bound the server takes everything within moments; with it, it stops near the
    // bound (about 1 MiB of replies plus socket buffers) however long it is given.
    let taken = 0;
    for (let i = 0; i < 100 && taken < total / 4; i++) {
      await new Promise((r) => setTimeout(r, 100));
      taken = total - raw.socket.writableLength;
    }
    console.log(`control backpressure: the server took ${taken} of ${total} request bytes`);
    expect(taken).toBeLessThan(total / 4);
    // Other clients are answered meanwhile.
    expect((await info("bp1")).state).toBe("active");
    raw.socket.destroy();
    await ok("remove", "bp1");
  });
});

describe("issue 15: busy devices are not pulled away", () => {
  test("remove of a device with a connected NBD client or a device stacked on it is EBUSY naming the holder; --force disconnects clients", async () => {
    image("b15.img", MIB);
    await ok("create", "b15", "--table", "0 2048 linear b15.img 0");
    const c = await connect("b15");
    await c.write(0, Buffer.alloc(4096, 0x15));
    const refused = await run("remove", "b15");
    expect(refused.stderr).toBe(
      "udm: b15 is open by 1 NBD client(s): disconnect them first, or --force to disconnect them\n",
    );
    expect(refused.status).toBe(1);
    expect((await c.read(0, 4096)).equals(Buffer.alloc(4096, 0x15))).toBe(true);
    // A reload to a smaller size is refused too; the same size is not.
    const smaller = await run("reload", "b15", "--table", "0 1024 linear b15.img 0");
    expect(smaller.stderr).toMatch(
      /^udm: b15: the new table is 1024 sectors, smaller than the 2048 sectors 1 NBD client\(s\) may address: --force to reload anyway\n$/,
    );
    expect(smaller.status).toBe(1);
    await ok("reload", "b15", "--table", "0 2048 linear b15.img 0");
    await ok("create", "up15", "--table", "0 1024 linear @b15 0");
    const stacked = await run("remove", "--force", "b15");
    expect(stacked.stderr).toMatch(/^udm: b15 is in use by up15: remove those first/);
    expect(stacked.status).toBe(1);
    await ok("remove", "up15");
    await ok("remove", "--force", "b15");
    await expect(c.read(0, 4096)).rejects.toThrow();
    await disconnect(c);
  });
});

describe("issue 19: a writing client through a loop of control commands", () => {
  test("reloads (same and changed tables: linear, mirror, snapshot-origin), suspend/resume, snapshot create/remove and failed reloads: no error, no wrong byte", async () => {
    const size = 16 * MIB;
    image("loop-o.img", size);
    image("loop-m.img", size);
    const linear = "0 32768 linear loop-o.img 0";
    const origin = "0 32768 snapshot-origin loop-o.img";
    const mirror = "0 32768 mirror core 1 1024 2 loop-o.img 0 loop-m.img 0";
    await ok("create", "loop", "--table", linear);
    const model = Buffer.alloc(size);
    const workers = 4;
    const devs = await Promise.all(Array.from({ length: workers }, () => connect("loop")));
    let stop = false;
    let ops = 0;
    const errors: string[] = [];
    let wrong = 0;
    const work = devs.map(async (dev, w) => {
      // Each worker owns a quarter of the device, so the model is exact.
      const base = (w * size) / workers;
      const span = size / workers;
      for (let i = 0; !stop; i++) {
        const length = 4096 * (1 + ((i * 13 + w) % 16));
        const at =
          base +
          ((i * 40_961 + w * 8192) % (span - length)) -
          (((i * 40_961 + w * 8192) % (span - length)) % 512);
        try {
          if (i % 3 === 2) {
            const got = await dev.read(at, length);
            if (!got.equals(model.subarray(at, at + length))) wrong++;
          } else {
            const data = randomBytes(length);
            await dev.write(at, data);
            data.copy(model, at);
          }
          ops++;
        } catch (err) {
          errors.push((err as Error).message);
        }
      }
    });
    let commands = 0;
    const cmd = async (...args: string[]) => {
      commands++;
      return ok(...args);
    };
    const failing = async (...args: string[]) => {
      commands++;
      const r = await run(...args);
      expect(r.status, `udm ${args.join(" ")} must fail`).toBe(1);
    };
    for (let round = 0; round < 3; round++) {
      await cmd("reload", "loop", "--table", linear); // same table
      await cmd("reload", "loop", "--table", mirror); // changed: linear -> mirror
      await cmd("reload", "loop", "--table", mirror); // same mirror
      await failing(
        "reload",
        "loop",
        "--table",
        "0 16384 linear loop-o.img 0",
        "--table",
        "16384 16384 linear /nonexist/x.img 0",
      );
      await failing("reload", "loop", "--table", mirror.replace("loop-m.img", "/nonexist/m.img"));
      await cmd("suspend", "loop");
      await cmd("resume", "loop");
      await cmd("reload", "loop", "--table", origin); // mirror -> snapshot-origin
      await cmd("reload", "loop", "--table", origin); // same snapshot-origin
      await cmd("snapshot", "create", "loop", "loopsnap", "--cow", `loop-${round}.cow`, "--size", "32M");
      await cmd("suspend", "loop");
      await cmd("reload", "loop", "--table", origin); // loaded while suspended
      await cmd("resume", "loop");
      await cmd("remove", "loopsnap");
      await failing("reload", "loop", "--table", "0 32768 snapshot-origin /nonexist/o.img");
      await cmd("reload", "loop", "--table", linear); // snapshot-origin -> linear
    }
    stop = true;
    await Promise.all(work);
    console.log(`control loop: ${commands} control commands, ${ops} client operations`);
    expect(errors).toEqual([]);
    expect(wrong).toBe(0);
    expect(ops).toBeGreaterThan(commands);
    expect((await devs[0]!.read(0, size)).equals(model)).toBe(true);
    for (const d of devs) await disconnect(d);
    await ok("remove", "loop");
  }, 600_000);
});

describe("issue 19 item 4: SIGTERM stops a server with a reload waiting for a drain", () => {
  test("the first SIGTERM resumes the lower device, lets the reload finish and exits 0", async () => {
    const sub = mkdtempSync(join(dir, "term-"));
    writeFileSync(join(sub, "lin.img"), Buffer.alloc(MIB));
    writeFileSync(join(sub, "t.table"), "lin: 0 2048 linear lin.img 0\ntop: 0 2048 linear @lin 0\n");
    const ctl = join(sub, "ctl.sock");
    const server = await startServe(["--table", "t.table", "--listen", "127.0.0.1:0", "--control", ctl], {
      cwd: sub,
    });
    try {
      const sub1 = (...args: string[]) =>
        udmAsync(["--control", ctl, "--timeout", "20", ...args], { cwd: sub });
      const top = await NbdDevice.connect(`nbd://127.0.0.1:${server.port}/top`);
      expect((await sub1("suspend", "lin")).status).toBe(0);
      const write = top.write(0, Buffer.alloc(4096, 0x77)).then(
        () => "written",
        (err: Error) => err.message,
      );
      await until(
        async () => JSON.parse((await sub1("info", "lin", "--json")).stdout)[0].heldRequests === 1,
        "the write is held",
      );
      const reload = sub1("reload", "top", "--table", "0 2048 linear @lin 0");
      await until(
        async () => JSON.parse((await sub1("info", "top", "--json")).stdout)[0].state === "suspended",
        "the reload is suspending top",
      );
      expect(await server.stop()).toBe(0);
      expect(await write).toBe("written");
      await reload;
      await top.close().catch(() => undefined);
      expect(readFileSync(join(sub, "lin.img")).subarray(0, 4096).equals(Buffer.alloc(4096, 0x77))).toBe(
        true,
      );
    } finally {
      if (server.child.exitCode === null) server.child.kill("SIGKILL");
    }
  });
});
