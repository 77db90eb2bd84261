/**
 * A mirror with a remote leg (dm-mirror issue, item 7): `udm serve --table` runs a 2-leg mirror
 * whose legs are a local file and `nbd://127.0.0.1:PORT/...` served by a second server (nbdkit
 * file, qemu-nbd), in the same test. Writes go in over NBD; the remote server is SIGKILLed, writes
 * go on and `udm status` shows the remote leg `D`; the server restarts on the same port, the leg
 * reconnects and only it is resynced; both files end byte-identical with every acknowledged write.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NbdDevice } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, requireTool, type ServeProcess, startServe, UDM, udmAsync } from "./cli-helpers.js";

const SIZE = 4 * 2 ** 20;
const BLOCK = 4096;
/** Region size in sectors (64 KiB): 64 regions. */
const REGION_SECTORS = 128;
/** Writes while the remote leg is down stay below this offset (16 regions). */
const DOWN_LIMIT = 2 ** 20;

let dir: string;
const started = new Set<ChildProcess>();
const serves = new Set<ServeProcess>();

beforeAll(() => buildCli(), 300_000);

afterAll(async () => {
  for (const s of serves) await s.stop();
  for (const c of started) if (c.exitCode === null && c.signalCode === null) process.kill(c.pid!, "SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** How a remote NBD server is started on a fixed port, and the URI of its export. */
interface RemoteKind {
  /** The external tool it needs (fails under CI=true when missing). */
  tool: string;
  command: string;
  args: (port: number, file: string) => string[];
  uri: (port: number) => string;
}

const KINDS: Record<string, RemoteKind> = {
  "nbdkit file": {
    tool: "nbdkit",
    command: "nbdkit",
    // -f: foreground (so the PID is the server's), -i/-p: address, --exit-with-parent as a backstop.
    args: (port, file) => ["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", String(port), "file", file],
    uri: (port) => `nbd://127.0.0.1:${port}/`,
  },
  "qemu-nbd": {
    tool: "qemu-nbd",
    command: "qemu-nbd",
    // -t: keep serving after a client disconnects; -e 4: several clients (udm reconnecting).
    args: (port, file) => [
      "-f",
      "raw",
      "-b",
      "127.0.0.1",
      "-p",
      String(port),
      "-x",
      "leg",
      "-t",
      "-e",
      "4",
      file,
    ],
    uri: (port) => `nbd://127.0.0.1:${port}/leg`,
  },
  "another udm serve --export": {
    tool: "node",
    command: process.execPath,
    args: (port, file) => [
      UDM,
      "serve",
      "--export",
      `leg=${file}`,
      "--listen",
      `127.0.0.1:${port}`,
      "--control",
      `${file}.control.sock`,
      "--data-dir",
      `${file}.data`,
      "--log-level",
      "warn",
    ],
    uri: (port) => `nbd://127.0.0.1:${port}/leg`,
  },
};

/** Starts the remote server and waits until it accepts an NBD client. */
async function startRemote(kind: RemoteKind, port: number, file: string): Promise<ChildProcess> {
  const child = spawn(kind.command, kind.args(port, file), { stdio: ["ignore", "ignore", "pipe"] });
  started.add(child);
  let stderr = "";
  child.stderr!.on("data", (d) => {
    stderr += d;
  });
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) throw new Error(`${kind.tool} exited with ${child.exitCode}: ${stderr}`);
    try {
      const probe = await NbdDevice.connect(kind.uri(port), { readOnly: true });
      await probe.close();
      return child;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`${kind.tool} did not start on port ${port}: ${stderr}`);
}

function killRemote(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once("exit", () => resolve());
    process.kill(child.pid!, "SIGKILL");
  });
}

async function status(control: string): Promise<string> {
  const r = await udmAsync(["status", "m0", "--control", control]);
  if (r.status !== 0) throw new Error(`udm status failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

async function waitForStatus(control: string, match: RegExp, what: string): Promise<string> {
  let last = "";
  for (let i = 0; i < 300; i++) {
    last = await status(control);
    if (match.test(last)) return last;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}; last status: ${last}`);
}

/**
 * Writes `count` random 4 KiB blocks at distinct random offsets below `limit` through `dev`
 * (concurrently), and into `model` once acknowledged.
 */
async function writeBlocks(dev: NbdDevice, model: Buffer, count: number, limit = SIZE): Promise<void> {
  const offsets = new Set<number>();
  while (offsets.size < count) offsets.add(Math.floor(Math.random() * (limit / BLOCK)) * BLOCK);
  await Promise.all(
    [...offsets].map(async (offset) => {
      const data = randomBytes(BLOCK);
      await dev.write(offset, data);
      data.copy(model, offset); // acknowledged
    }),
  );
}

/** Every server kind with handle_errors, and nbdkit without it (dmsetup's default). */
const CASES: Array<[string, string]> = [
  ...Object.keys(KINDS).map((k): [string, string] => [k, " 1 handle_errors"]),
  ["nbdkit file", ""],
];

describe.each(CASES)("a mirror with a remote leg served by %s, features %j", (kindName, features) => {
  const kind = KINDS[kindName]!;
  const available = requireTool(kind.tool);

  test.runIf(available)(
    "the remote leg fails when its server dies, reconnects when it returns, and only it is resynced",
    async () => {
      dir ??= mkdtempSync(join(tmpdir(), "udm-mirror-remote-"));
      const sub = mkdtempSync(join(dir, `${kind.tool}-`));
      const local = join(sub, "local.img");
      const remoteFile = join(sub, "remote.img");
      writeFileSync(local, Buffer.alloc(SIZE));
      writeFileSync(remoteFile, Buffer.alloc(SIZE));
      writeFileSync(join(sub, "mirror.log"), Buffer.alloc(2 ** 20));
      const port = await freePort();
      let remote = await startRemote(kind, port, remoteFile);
      const sectors = SIZE / 512;
      writeFileSync(
        join(sub, "udm.table"),
        `m0: 0 ${sectors} mirror disk 2 mirror.log ${REGION_SECTORS} 2 local.img 0 ${kind.uri(port)} 0${features}\n`,
      );
      const control = join(sub, "control.sock");
      const serve = await startServe(
        ["--table", "udm.table", "--listen", "127.0.0.1:0", "--control", control, "--data-dir", sub],
        { cwd: sub },
      );
      serves.add(serve);
      // A new disk log: the mirror starts with a full resync (of zeros); wait for it.
      await waitForStatus(control, / 64\/64 1 AA /, "the initial resync");

      const model = Buffer.alloc(SIZE);
      const dev = await NbdDevice.connect(`nbd://127.0.0.1:${serve.port}/m0`);
      try {
        await writeBlocks(dev, model, 64);
        await dev.flush();

        // The remote server dies: writes go on (to the local leg), the remote leg shows D. The
        // kill lands during a batch of writes; the writes from then on stay in the first 1 MiB
        // (regions 0-15).
        await Promise.all([writeBlocks(dev, model, 64, DOWN_LIMIT), killRemote(remote)]);
        await dev.flush();
        const degraded = await waitForStatus(control, / 1 AD /, "the remote leg to show D");
        expect(degraded).toMatch(/mirror 2 \S*local\.img nbd:\/\/127\.0\.0\.1:\d+\/\S* \d+\/64 1 AD 3 disk /);
        await writeBlocks(dev, model, 32, DOWN_LIMIT);
        await dev.flush();
        // Only regions written while the leg was away are out of sync: at most the first 16.
        const inSync = Number(/ (\d+)\/64 1 AD /.exec(await status(control))![1]);
        expect(inSync).toBeGreaterThanOrEqual(48);
        expect(inSync).toBeLessThan(64);

        // The remote server comes back on the same port: the leg reconnects and is resynced.
        remote = await startRemote(kind, port, remoteFile);
        await writeBlocks(dev, model, 32);
        await dev.flush();
        await waitForStatus(control, / 64\/64 1 AA /, "the remote leg to be resynced");
        expect((await dev.read(0, SIZE)).equals(model)).toBe(true);
      } finally {
        await dev.close();
      }
      expect(await serve.stop()).toBe(0);
      serves.delete(serve);
      await killRemote(remote);
      expect(readFileSync(local).equals(model)).toBe(true);
      expect(readFileSync(remoteFile).equals(model)).toBe(true);
    },
    60_000,
  );
});

describe("a remote leg that is still down when udm stops", () => {
  const available = requireTool("nbdkit");

  test.runIf(available)(
    "udm stops cleanly; after a restart with the remote back, the regions it missed are resynced",
    async () => {
      const kind = KINDS["nbdkit file"]!;
      dir ??= mkdtempSync(join(tmpdir(), "udm-mirror-remote-"));
      const sub = mkdtempSync(join(dir, "restart-"));
      const local = join(sub, "local.img");
      const remoteFile = join(sub, "remote.img");
      writeFileSync(local, Buffer.alloc(SIZE));
      writeFileSync(remoteFile, Buffer.alloc(SIZE));
      writeFileSync(join(sub, "mirror.log"), Buffer.alloc(2 ** 20));
      const port = await freePort();
      let remote = await startRemote(kind, port, remoteFile);
      writeFileSync(
        join(sub, "udm.table"),
        `m0: 0 ${SIZE / 512} mirror disk 2 mirror.log ${REGION_SECTORS} 2 local.img 0 ${kind.uri(port)} 0 1 handle_errors\n`,
      );
      const control = join(sub, "control.sock");
      const args = [
        "--table",
        "udm.table",
        "--listen",
        "127.0.0.1:0",
        "--control",
        control,
        "--data-dir",
        sub,
      ];
      let serve = await startServe(args, { cwd: sub });
      serves.add(serve);
      await waitForStatus(control, / 64\/64 1 AA /, "the initial resync");
      const model = Buffer.alloc(SIZE);
      let dev = await NbdDevice.connect(`nbd://127.0.0.1:${serve.port}/m0`);
      await writeBlocks(dev, model, 32);
      await dev.flush();
      await killRemote(remote);
      await writeBlocks(dev, model, 32, DOWN_LIMIT);
      await dev.flush();
      await waitForStatus(control, / 1 AD /, "the remote leg to show D");
      await dev.close();
      // SIGTERM while the remote leg is down: drains, flushes what it can, exits 0.
      expect(await serve.stop()).toBe(0);
      serves.delete(serve);
      expect(readFileSync(local).equals(model)).toBe(true);
      expect(readFileSync(remoteFile).equals(model)).toBe(false);
      // The log marks out of sync only regions written while the leg was away (0-15).
      const inspect = await udmAsync(["mirror", "inspect-log", join(sub, "mirror.log"), "--json"]);
      const { outOfSync, regionCount } = JSON.parse(inspect.stdout) as {
        outOfSync: Array<{ first: number; last: number }>;
        regionCount: number;
      };
      expect(regionCount).toBe(64);
      expect(outOfSync.length).toBeGreaterThan(0);
      for (const r of outOfSync) expect(r.last).toBeLessThan(DOWN_LIMIT / (REGION_SECTORS * 512));

      // Both back: the disk log remembers which regions the remote leg lacks; only they are copied.
      remote = await startRemote(kind, port, remoteFile);
      serve = await startServe(args, { cwd: sub });
      serves.add(serve);
      await waitForStatus(control, / 64\/64 1 AA /, "the remote leg to be resynced after the restart");
      dev = await NbdDevice.connect(`nbd://127.0.0.1:${serve.port}/m0`);
      expect((await dev.read(0, SIZE)).equals(model)).toBe(true);
      await dev.close();
      expect(await serve.stop()).toBe(0);
      serves.delete(serve);
      await killRemote(remote);
      expect(readFileSync(local).equals(model)).toBe(true);
      expect(readFileSync(remoteFile).equals(model)).toBe(true);
    },
    60_000,
  );
});

describe("a remote leg that dies again while it is being resynced", () => {
  const available = requireTool("nbdkit");

  test.runIf(available)(
    "the interrupted resync resumes when it is back; the legs end identical",
    async () => {
      const kind = KINDS["nbdkit file"]!;
      // The same server, with each write delayed by nbdkit's delay filter: a slow resync.
      const slow: RemoteKind = {
        ...kind,
        args: (p, file) => [
          ...kind.args(p, file).slice(0, -2),
          "--filter=delay",
          "file",
          file,
          "wdelay=100ms",
        ],
      };
      dir ??= mkdtempSync(join(tmpdir(), "udm-mirror-remote-"));
      const sub = mkdtempSync(join(dir, "twice-"));
      const local = join(sub, "local.img");
      const remoteFile = join(sub, "remote.img");
      writeFileSync(local, Buffer.alloc(SIZE));
      writeFileSync(remoteFile, Buffer.alloc(SIZE));
      writeFileSync(join(sub, "mirror.log"), Buffer.alloc(2 ** 20));
      const port = await freePort();
      let remote = await startRemote(kind, port, remoteFile);
      writeFileSync(
        join(sub, "udm.table"),
        `m0: 0 ${SIZE / 512} mirror disk 2 mirror.log ${REGION_SECTORS} 2 local.img 0 ${kind.uri(port)} 0 1 handle_errors\n`,
      );
      const control = join(sub, "control.sock");
      const serve = await startServe(
        ["--table", "udm.table", "--listen", "127.0.0.1:0", "--control", control, "--data-dir", sub],
        { cwd: sub },
      );
      serves.add(serve);
      await waitForStatus(control, / 64\/64 1 AA /, "the initial resync");
      const message = async (...argv: string[]) => {
        const r = await udmAsync(["message", "m0", "0", ...argv, "--control", control]);
        expect(r.stderr).toBe("");
        expect(r.status).toBe(0);
      };
      await message("regions_in_flight", "1");
      const inSync = (line: string) => Number(/ (\d+)\/64 1 A[AD] /.exec(line)![1]);
      const model = Buffer.alloc(SIZE);
      const dev = await NbdDevice.connect(`nbd://127.0.0.1:${serve.port}/m0`);
      try {
        await killRemote(remote);
        await writeBlocks(dev, model, 256); // most regions
        await dev.flush();
        const down = inSync(await waitForStatus(control, / 1 AD /, "the remote leg to show D"));
        expect(down).toBeLessThan(32);
        // Back, slowly: wait until the resync has copied some regions, then kill it again.
        remote = await startRemote(slow, port, remoteFile);
        let partway = down;
        for (let i = 0; i < 200 && partway <= down; i++) partway = inSync(await status(control));
        expect(partway).toBeGreaterThan(down);
        await killRemote(remote);
        await writeBlocks(dev, model, 32);
        await dev.flush();
        const again = await waitForStatus(control, / 1 AD /, "the remote leg to fail again");
        expect(inSync(again)).toBeLessThan(64);
        // Back at full speed: the rest is resynced.
        remote = await startRemote(kind, port, remoteFile);
        await message("regions_in_flight", "8");
        await waitForStatus(control, / 64\/64 1 AA /, "the remote leg to be resynced");
        expect((await dev.read(0, SIZE)).equals(model)).toBe(true);
      } finally {
        await dev.close();
      }
      expect(await serve.stop()).toBe(0);
      serves.delete(serve);
      await killRemote(remote);
      expect(readFileSync(local).equals(model)).toBe(true);
      expect(readFileSync(remoteFile).equals(model)).toBe(true);
    },
    60_000,
  );
});
