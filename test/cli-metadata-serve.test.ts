/**
 * `udm serve` with its metadata record (issue 15, "Done when"): a merge in progress and a
 * runtime snapshot survive `kill -9` of the server and a restart with the same table and data
 * directory; crash points (`UDM_CRASH_AT`) kill the server inside snapshot create and snapshot
 * merge; rename is recorded; a damaged record is refused naming the backup; an edited table
 * file wins over the record.
 */
import { randomBytes } from "node:crypto";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { connect as connectSocket, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NbdDevice } from "@udm/nbd-server";
import { afterAll, afterEach, beforeAll, describe, expect, test } from "vitest";
import { buildCli, type ServeProcess, startServe, udmAsync } from "./cli-helpers.js";

const MIB = 1 << 20;
const CHUNK = 4096;
let root: string;
const servers: ServeProcess[] = [];
const clients: NbdDevice[] = [];

beforeAll(() => {
  buildCli();
  root = mkdtempSync(join(tmpdir(), "udm-meta-serve-"));
}, 300_000);
afterEach(async () => {
  for (const c of clients.splice(0)) await c.close().catch(() => undefined);
  for (const s of servers.splice(0)) {
    if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill("SIGKILL");
  }
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** A test's folder with its table file `t.table`. */
function folder(name: string, table: string): string {
  const dir = mkdtempSync(join(root, `${name}-`));
  writeFileSync(join(dir, "t.table"), table);
  return dir;
}

const serveArgs = ["--table", "t.table", "--listen", "127.0.0.1:0", "--control", "ctl.sock"];

async function serve(dir: string, env?: NodeJS.ProcessEnv): Promise<ServeProcess> {
  const s = await startServe(serveArgs, { cwd: dir, ...(env && { env }) });
  servers.push(s);
  return s;
}

/** kill -9 of a server; resolves once it is gone. */
async function kill9(s: ServeProcess): Promise<void> {
  const gone = new Promise((r) => s.child.once("exit", r));
  s.child.kill("SIGKILL");
  await gone;
}

async function ok(dir: string, ...args: string[]): Promise<string> {
  const r = await udmAsync(["--control", "ctl.sock", "--timeout", "30", ...args], { cwd: dir });
  expect(r.stderr, `udm ${args.join(" ")}`).toBe("");
  expect(r.status, `udm ${args.join(" ")}`).toBe(0);
  return r.stdout;
}

async function connect(s: ServeProcess, name: string): Promise<NbdDevice> {
  const dev = await NbdDevice.connect(`nbd://127.0.0.1:${s.port}/${name}`);
  clients.push(dev);
  return dev;
}

async function readAll(s: ServeProcess, name: string, bytes: number): Promise<Buffer> {
  const dev = await connect(s, name);
  const parts: Buffer[] = [];
  for (let off = 0; off < bytes; off += 4 * MIB)
    parts.push(await dev.read(off, Math.min(4 * MIB, bytes - off)));
  clients.splice(clients.indexOf(dev), 1);
  await dev.close();
  return Buffer.concat(parts);
}

/** One control connection for quick polls (JSON lines). */
/** A control reply, as far as these tests read it. */
interface Reply {
  ok: boolean;
  result?: { progress?: { doneBytes: number; totalBytes: number } | null };
}

async function control(
  dir: string,
): Promise<{ ask(verb: string, args?: object): Promise<Reply>; close(): void }> {
  const socket: Socket = await new Promise((resolve, reject) => {
    const s = connectSocket(join(dir, "ctl.sock"), () => resolve(s));
    s.once("error", reject);
  });
  let buffered = "";
  const waiting: Array<(line: string) => void> = [];
  socket.on("data", (d) => {
    buffered += d;
    for (let nl = buffered.indexOf("\n"); nl >= 0; nl = buffered.indexOf("\n")) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      waiting.shift()?.(line);
    }
  });
  let id = 0;
  return {
    ask: (verb, args = {}) =>
      new Promise((resolve) => {
        waiting.push((line) => resolve(JSON.parse(line)));
        socket.write(`${JSON.stringify({ id: ++id, verb, args })}\n`);
      }),
    close: () => socket.destroy(),
  };
}

async function until(what: () => Promise<boolean>, label: string, tries = 2400): Promise<void> {
  for (let i = 0; i < tries; i++) {
    if (await what()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`never reached: ${label}`);
}

/** Device names `udm ls` prints. */
async function names(dir: string): Promise<string[]> {
  return (await ok(dir, "ls"))
    .split("\n")
    .filter(Boolean)
    .map((l) => l.split("\t")[0]!);
}

const record = (dir: string) => JSON.parse(readFileSync(join(dir, "udm-data", "udm.meta.json"), "utf8"));

describe("udm serve restarts from its metadata record after kill -9", () => {
  test("the merge repro: kill -9 mid-merge, restart: the merge resumes and the origin ends equal to the snapshot", async () => {
    const size = 64 * MIB;
    const sectors = size / 512;
    const dir = folder(
      "merge",
      `o: 0 ${sectors} snapshot-origin o.img\ns: 0 ${sectors} snapshot o.img s.cow P 8\n`,
    );
    const origin = randomBytes(size);
    writeFileSync(join(dir, "o.img"), origin);
    // A sparse 80 MiB COW: room for 8,192 exceptions and their metadata.
    writeFileSync(join(dir, "s.cow"), "");
    truncateSync(join(dir, "s.cow"), 80 * MIB);
    let s = await serve(dir);
    // 8,192 snapshot-only chunks: every other chunk of the snapshot is rewritten.
    const expected = Buffer.from(origin);
    const snap = await connect(s, "s");
    const writes: Promise<void>[] = [];
    for (let c = 0; c < size / CHUNK; c += 2) {
      const data = randomBytes(CHUNK);
      data.copy(expected, c * CHUNK);
      writes.push(snap.write(c * CHUNK, data));
      if (writes.length === 32) await Promise.all(writes.splice(0));
    }
    await Promise.all(writes);
    await snap.flush();
    await ok(dir, "snapshot", "merge", "s", "--no-wait");
    // Kill it once the merge has copied some chunks and not all.
    const ctl = await control(dir);
    let progress: { doneBytes: number; totalBytes: number } | null = null;
    await until(async () => {
      const r = await ctl.ask("merge-status", { name: "s" });
      progress = r.result?.progress ?? null;
      return progress !== null && progress.doneBytes > 0;
    }, "the merge copied something");
    await kill9(s);
    ctl.close();
    expect(progress!.totalBytes).toBe(8192 * CHUNK); // the 8,192 snapshot-only chunks
    expect(progress!.doneBytes).toBeLessThan(progress!.totalBytes);
    expect(record(dir).devices.find((d: { name: string }) => d.name === "s")).toMatchObject({
      lines: [`0 ${sectors} snapshot-merge o.img s.cow P 8`],
      baseDir: dir,
      merging: true,
    });

    s = await serve(dir);
    expect(s.stderr()).toMatch(/merge resumed from the metadata record/);
    await until(async () => !(await names(dir)).includes("s"), "the resumed merge is done");
    expect((await readAll(s, "o", size)).equals(expected)).toBe(true);
    expect(await s.stop()).toBe(0);
    // And once more: the merged snapshot stays gone, the origin stays merged.
    s = await serve(dir);
    expect(await names(dir)).toEqual(["o"]);
    expect((await readAll(s, "o", size)).equals(expected)).toBe(true);
    expect(await s.stop()).toBe(0);
  }, 300_000);
});

/** A 1 MiB origin of 0xaa under a snapshot-origin device `o`. */
function originFolder(name: string): string {
  const dir = folder(name, "o: 0 2048 snapshot-origin o.img\n");
  writeFileSync(join(dir, "o.img"), Buffer.alloc(MIB, 0xaa));
  return dir;
}

const fill = (v: number) => Buffer.alloc(CHUNK, v);

async function firstByte(s: ServeProcess, name: string, offset = 0): Promise<number> {
  const dev = await connect(s, name);
  const b = (await dev.read(offset, CHUNK))[0]!;
  clients.splice(clients.indexOf(dev), 1);
  await dev.close();
  return b;
}

async function writeChunk(s: ServeProcess, name: string, offset: number, value: number): Promise<void> {
  const dev = await connect(s, name);
  await dev.write(offset, fill(value));
  await dev.flush();
  clients.splice(clients.indexOf(dev), 1);
  await dev.close();
}

const snapshotCreate = ["snapshot", "create", "o", "s", "--cow", "s.cow", "--size", "1M"];

describe("runtime changes survive kill -9 of udm serve", () => {
  test("a runtime snapshot create survives kill -9 and restart with its content; origin writes after the restart stay protected", async () => {
    const dir = originFolder("snap");
    let s = await serve(dir);
    await ok(dir, ...snapshotCreate);
    await writeChunk(s, "o", 0, 0xbb); // copied out: s keeps 0xaa
    await writeChunk(s, "s", 2 * CHUNK, 0x55); // the snapshot's own write
    await kill9(s);

    s = await serve(dir);
    expect(s.stderr()).toMatch(/devices started from the metadata record/);
    expect(await names(dir)).toEqual(["o", "s"]);
    expect(await firstByte(s, "s", 0)).toBe(0xaa);
    expect(await firstByte(s, "s", 2 * CHUNK)).toBe(0x55);
    expect(await firstByte(s, "o", 0)).toBe(0xbb);
    // A chunk first written after the restart is still copied out for the snapshot.
    await writeChunk(s, "o", CHUNK, 0xcc);
    expect(await firstByte(s, "o", CHUNK)).toBe(0xcc);
    expect(await firstByte(s, "s", CHUNK)).toBe(0xaa);
    await kill9(s);
    s = await serve(dir);
    expect(await firstByte(s, "s", CHUNK)).toBe(0xaa);
    expect(await firstByte(s, "s", 0)).toBe(0xaa);
    expect(await s.stop()).toBe(0);
  }, 120_000);

  test("rename is recorded: the new name survives kill -9 and a restart", async () => {
    const dir = folder("rename", "a: 0 2048 linear a.img 0\n");
    writeFileSync(join(dir, "a.img"), Buffer.alloc(MIB, 0x11));
    let s = await serve(dir);
    await ok(dir, "rename", "a", "b");
    await kill9(s);
    s = await serve(dir);
    expect(await names(dir)).toEqual(["b"]);
    expect(await firstByte(s, "b")).toBe(0x11);
    expect(record(dir).devices.map((d: { name: string }) => d.name)).toEqual(["b"]);
    expect(await s.stop()).toBe(0);
  }, 60_000);
});

/** A mirror `m` whose legs differ on purpose (nosync), so which leg a read came from shows. */
function mirrorFolder(name: string): string {
  const dir = folder(name, "m: 0 2048 mirror core 2 128 nosync 2 a.img 0 b.img 0\n");
  writeFileSync(join(dir, "a.img"), Buffer.alloc(MIB, 1));
  writeFileSync(join(dir, "b.img"), Buffer.alloc(MIB, 2));
  return dir;
}

/** The legs eight reads of `m` came from (1: a.img, 2: b.img). */
async function legsRead(s: ServeProcess): Promise<number[]> {
  const seen = new Set<number>();
  for (let i = 0; i < 8; i++) seen.add(await firstByte(s, "m"));
  return [...seen].sort();
}

describe("mirror message settings meant to persist", () => {
  test("read_balance on survives kill -9 and a restart; a reload drops it (a new target)", async () => {
    // nosync: the legs differ on purpose, so which leg a read came from shows.
    const dir = mirrorFolder("balance");
    let s = await serve(dir);
    expect(await legsRead(s)).toEqual([1]);
    await ok(dir, "message", "m", "0", "read_balance", "on");
    expect(await legsRead(s)).toEqual([1, 2]);
    await kill9(s);
    s = await serve(dir);
    expect(s.stderr()).toMatch(/message setting restored from the metadata record/);
    expect(await legsRead(s)).toEqual([1, 2]);
    // A reload is a new target: the setting is gone, from the record too.
    await ok(dir, "reload", "m", "--table", "0 2048 mirror core 2 128 nosync 2 a.img 0 b.img 0");
    expect(await legsRead(s)).toEqual([1]);
    await kill9(s);
    s = await serve(dir);
    expect(await legsRead(s)).toEqual([1]);
    expect(await s.stop()).toBe(0);
  }, 60_000);
});

/** Crash points in the server process: `UDM_CRASH_AT` kills `udm serve` inside a command. */
describe("crash points over udm serve: kill at a step, restart, the command happened or not", () => {
  const steps: Array<[string, string, boolean]> = [
    ["snapshot-create", "cow-zeroed", false],
    ["snapshot-create", "built", false],
    ["snapshot-create", "recorded", true],
    ["snapshot-merge", "built", false],
    ["snapshot-merge", "recorded", true],
    ["rename", "built", false],
    ["rename", "recorded", true],
    ["message", "built", false],
    ["message", "recorded", true],
  ];
  test.each(steps)(
    "%s killed after %s: happened: %s",
    async (command, step, happened) => {
      const dir =
        command === "message" ? mirrorFolder(`${command}-${step}`) : originFolder(`${command}-${step}`);
      let s: ServeProcess;
      if (command === "snapshot-merge") {
        s = await serve(dir);
        await ok(dir, ...snapshotCreate);
        await writeChunk(s, "o", 0, 0xbb); // s keeps 0xaa
        await s.stop();
      }
      s = await serve(dir, { UDM_CRASH_AT: `${command}:${step}` });
      const gone = new Promise((r) => s.child.once("exit", (_code, signal) => r(signal)));
      const args =
        command === "snapshot-create"
          ? snapshotCreate
          : command === "snapshot-merge"
            ? ["snapshot", "merge", "s"]
            : command === "message"
              ? ["message", "m", "0", "read_balance", "on"]
              : ["rename", "o", "p"];
      const r = await udmAsync(["--control", "ctl.sock", "--timeout", "30", ...args], { cwd: dir });
      expect(r.status).not.toBe(0); // the server died before answering
      expect(await gone).toBe("SIGKILL");

      s = await serve(dir);
      if (command === "message") expect(await legsRead(s)).toEqual(happened ? [1, 2] : [1]);
      if (command === "rename") {
        expect(await names(dir)).toEqual([happened ? "p" : "o"]);
        expect(await firstByte(s, happened ? "p" : "o")).toBe(0xaa);
      }
      if (command === "snapshot-create") {
        expect(await names(dir)).toEqual(happened ? ["o", "s"] : ["o"]);
        await writeChunk(s, "o", 0, 0xcc);
        if (happened) expect(await firstByte(s, "s")).toBe(0xaa);
        expect(await firstByte(s, "o")).toBe(0xcc);
      }
      if (command === "snapshot-merge") {
        if (happened) {
          await until(async () => !(await names(dir)).includes("s"), "the resumed merge is done");
          expect(await firstByte(s, "o")).toBe(0xaa);
        } else {
          expect(await ok(dir, "table", "s")).toMatch(/ snapshot /);
          expect(await firstByte(s, "s")).toBe(0xaa);
          expect(await firstByte(s, "o")).toBe(0xbb);
        }
      }
      expect(await s.stop()).toBe(0);
    },
    120_000,
  );
});

describe("udm serve and its record's source", () => {
  test("a damaged record is refused naming the file and the backup; nothing starts", async () => {
    const dir = originFolder("damaged");
    let s = await serve(dir);
    await ok(dir, ...snapshotCreate); // version 2; version 1 is archived
    expect(await s.stop()).toBe(0);
    const file = join(dir, "udm-data", "udm.meta.json");
    writeFileSync(file, readFileSync(file, "utf8").slice(0, 100)); // half-written
    const r = await udmAsync(["serve", ...serveArgs], { cwd: dir });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`metadata record ${file} is unusable (not JSON, a half-written file?`);
    expect(r.stderr).toContain(
      `the newest valid backup is ${file}.archive/udm.meta.json.00000001 (seqno 1); copy it over ${file} to start from it`,
    );
    // Following the advice starts the server from version 1 (before the snapshot).
    copyFileSync(`${file}.archive/udm.meta.json.00000001`, file);
    s = await serve(dir);
    expect(await names(dir)).toEqual(["o"]);
    expect(await s.stop()).toBe(0);
  }, 60_000);

  test("a table file edited since the record wins, and says so", async () => {
    const dir = originFolder("edited");
    let s = await serve(dir);
    await ok(dir, ...snapshotCreate);
    expect(await s.stop()).toBe(0);
    writeFileSync(join(dir, "z.img"), Buffer.alloc(MIB));
    writeFileSync(join(dir, "t.table"), "o: 0 2048 snapshot-origin o.img\nz: 0 2048 linear z.img 0\n");
    s = await serve(dir);
    expect(s.stderr()).toMatch(/the table file changed since the metadata record was written/);
    expect(await names(dir)).toEqual(["o", "z"]);
    expect(await s.stop()).toBe(0);
    // The table's start is the record now: a restart keeps it.
    s = await serve(dir);
    expect(s.stderr()).toMatch(/devices started from the metadata record/);
    expect(await names(dir)).toEqual(["o", "z"]);
    expect(await s.stop()).toBe(0);
  }, 60_000);

  test("--export: a restart with other --export flags serves those, not the record's", async () => {
    const dir = mkdtempSync(join(root, "export-"));
    writeFileSync(join(dir, "a.img"), Buffer.alloc(MIB, 1));
    writeFileSync(join(dir, "b.img"), Buffer.alloc(MIB, 2));
    const run = async (e: string) => {
      const x = await startServe(["--export", e, "--listen", "127.0.0.1:0", "--control", "ctl.sock"], {
        cwd: dir,
      });
      servers.push(x);
      return x;
    };
    let s = await run("a=a.img");
    await ok(dir, "rename", "a", "a2");
    await kill9(s);
    s = await run("a=a.img");
    expect(await names(dir)).toEqual(["a2"]); // the same flags: the record's state
    expect(await s.stop()).toBe(0);
    s = await run("b=b.img");
    expect(await names(dir)).toEqual(["b"]);
    expect(await firstByte(s, "b")).toBe(2);
    expect(await s.stop()).toBe(0);
  }, 60_000);
});
