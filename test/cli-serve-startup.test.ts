/**
 * `udm serve` start-up: a start that fails (port in use, unusable socket path) changes nothing on
 * disk, and a restart after `kill -9` logs what it recovers and when it has finished.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NbdDevice } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, type ServeProcess, startServe, UDM, udm } from "./cli-helpers.js";

const MiB = 1 << 20;
let dir: string;

beforeAll(() => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-startup-"));
}, 300_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** An empty working directory of its own. */
function emptyDir(name: string): string {
  return mkdtempSync(join(dir, `${name}-`));
}

function listenOn(server: Server, options: { host: string; port: number } | { path: string }): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(options, () => resolve());
  });
}

describe("udm serve: a start that fails changes nothing", () => {
  test("--listen on a port in use: exit 1 with EADDRINUSE naming the address; no ./udm-data, no image", async () => {
    const blocker = createServer();
    await listenOn(blocker, { host: "127.0.0.1", port: 0 });
    const port = (blocker.address() as { port: number }).port;
    const cwd = emptyDir("busy-port");
    try {
      // The defaults otherwise: ./udm-data with 1 GiB images and its control socket.
      const r = udm(["serve", "--listen", `127.0.0.1:${port}`], { cwd });
      expect(r.stderr).toMatch(
        new RegExp(
          `^udm: --listen 127\\.0\\.0\\.1:${port}: the address is in use \\(EADDRINUSE\\): another process listens on that port`,
          "m",
        ),
      );
      expect(r.status).toBe(1);
      expect(readdirSync(cwd)).toEqual([]);
    } finally {
      blocker.close();
    }
  });

  test("--unix in a folder that does not exist: exit 1 naming the path; nothing created", () => {
    const cwd = emptyDir("unix-enoent");
    const sock = join(cwd, "no/such/folder/nbd.sock");
    const r = udm(["serve", "--unix", sock], { cwd });
    expect(r.stderr).toMatch(new RegExp(`^udm: --unix ${sock}: its folder does not exist \\(ENOENT\\)`, "m"));
    expect(r.status).toBe(1);
    expect(readdirSync(cwd)).toEqual([]);
  });

  test("--unix on a regular file or a live socket: exit 1 with EADDRINUSE; the file is left alone", async () => {
    const cwd = emptyDir("unix-busy");
    const file = join(cwd, "not-a-socket");
    writeFileSync(file, "keep me\n");
    const r = udm(["serve", "--unix", file], { cwd });
    expect(r.stderr).toMatch(new RegExp(`^udm: --unix ${file}: the address is in use \\(EADDRINUSE\\)`, "m"));
    expect(r.status).toBe(1);
    expect(readFileSync(file, "utf8")).toBe("keep me\n");
    expect(readdirSync(cwd)).toEqual(["not-a-socket"]);

    const live = createServer();
    const sock = join(cwd, "live.sock");
    await listenOn(live, { path: sock });
    try {
      const again = udm(["serve", "--unix", sock, "--data-dir", "data"], { cwd });
      expect(again.stderr).toMatch(
        new RegExp(`^udm: --unix ${sock}: the address is in use \\(EADDRINUSE\\)`, "m"),
      );
      expect(again.status).toBe(1);
      expect(existsSync(join(cwd, "data"))).toBe(false);
    } finally {
      live.close();
    }
  });
});

/** The JSON log lines of a server's stderr with this message prefix. */
function logLines(serve: ServeProcess, prefix: string): Array<Record<string, unknown>> {
  return serve
    .stderr()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => typeof l.msg === "string" && l.msg.startsWith(prefix));
}

async function waitForLog(serve: ServeProcess, prefix: string): Promise<Record<string, unknown>> {
  for (let i = 0; i < 600; i++) {
    const line = logLines(serve, prefix)[0];
    if (line) return line;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`no "${prefix}" log line:\n${serve.stderr()}`);
}

describe("udm serve: a restart right after kill -9", () => {
  test("starts while the killed server is still a zombie (its parent has not reaped it)", async () => {
    const cwd = emptyDir("zombie");
    const args = ["--data-dir", "data", "--listen", "127.0.0.1:0", "--control", join(cwd, "ctl.sock")];
    // The parent execs sleep, which never reaps: the killed server stays a zombie.
    const parent = spawn(
      "bash",
      [
        "-c",
        `"$0" "$1" serve "\${@:2}" >out 2>err & echo $!; exec sleep 120`,
        process.execPath,
        UDM,
        ...args,
      ],
      { cwd, stdio: ["ignore", "pipe", "inherit"] },
    );
    try {
      const pid = Number(
        await new Promise<string>((resolve) => parent.stdout!.once("data", (d) => resolve(String(d)))),
      );
      for (
        let i = 0;
        i < 300 &&
        !(existsSync(join(cwd, "out")) && readFileSync(join(cwd, "out"), "utf8").includes("listening on"));
        i++
      ) {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      process.kill(pid, "SIGKILL");
      const state = () => {
        const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
        return stat[stat.lastIndexOf(")") + 2];
      };
      for (let i = 0; i < 100 && state() !== "Z"; i++)
        await new Promise((resolve) => setTimeout(resolve, 50));
      expect(state()).toBe("Z");
      const again = await startServe(args, { cwd });
      expect(await again.stop()).toBe(0);
    } finally {
      parent.kill("SIGKILL");
    }
  });
});

describe("udm serve: a restart after kill -9 logs its recovery", () => {
  test("mirror regions to resync, snapshot exceptions reloaded, a merge resumed, then finished", async () => {
    const cwd = emptyDir("recovery");
    const args = ["--data-dir", "data", "--listen", "127.0.0.1:0", "--control", join(cwd, "ctl.sock")];
    const first = await startServe(args, { cwd });
    try {
      // A clean first start has nothing to recover.
      expect((await waitForLog(first, "recovery finished")).msg).toBe(
        "recovery finished: nothing left to resync or merge",
      );
      const origin = await NbdDevice.connect(`nbd://127.0.0.1:${first.port}/origin`);
      const mirror = await NbdDevice.connect(`nbd://127.0.0.1:${first.port}/mirror0`);
      // 16 chunks copied to snap0's COW; 3 mirror regions (512 KiB each) written.
      for (let i = 0; i < 16; i++) await origin.write(i * MiB, Buffer.alloc(4096, 0x11));
      for (const region of [0, 5, 9]) await mirror.write(region * 512 * 1024, Buffer.alloc(4096, 0x22));
      await origin.flush();
      first.child.kill("SIGKILL");
      await first.stop();
      origin.close().catch(() => undefined);
      mirror.close().catch(() => undefined);
    } finally {
      first.child.kill("SIGKILL");
    }

    // The merge as `udm snapshot merge` runs it: snap0 reloaded as snapshot-merge.
    const tableFile = join(cwd, "data/udm.table");
    writeFileSync(
      tableFile,
      readFileSync(tableFile, "utf8").replace(/^snap0: 0 (\d+) snapshot /m, "snap0: 0 $1 snapshot-merge "),
    );
    const second = await startServe(args, { cwd });
    try {
      const resync = await waitForLog(second, "mirror regions out of sync at activation");
      expect(resync).toMatchObject({ device: "mirror0", regions: 2048 });
      expect(resync.regionsToResync).toBeGreaterThanOrEqual(3);
      expect(await waitForLog(second, "merge started")).toMatchObject({ device: "snap0", chunksToMerge: 16 });
      const finished = await waitForLog(second, "recovery finished");
      expect(finished.msg).toMatch(
        /^recovery finished: (every mirror in sync, every merge done|nothing left to resync or merge)$/,
      );
      expect(finished.ms).toEqual(expect.any(Number));
      // What was still running when the devices were up is reported as it finishes.
      for (const running of logLines(second, "recovery: ").filter((l) => / running$/.test(String(l.msg)))) {
        expect(logLines(second, `recovery: ${running.operation} finished`).map((l) => l.device)).toContain(
          running.device,
        );
      }
      const origin = await NbdDevice.connect(`nbd://127.0.0.1:${second.port}/origin`);
      // Merged back: the origin reads as the snapshot did (zeros where it was written).
      expect((await origin.read(0, 4096)).every((b) => b === 0)).toBe(true);
      await origin.close();
      expect(await second.stop()).toBe(0);
    } finally {
      second.child.kill("SIGKILL");
    }

    // A plain snapshot reloads its exceptions: restore the table, write, restart.
    writeFileSync(
      tableFile,
      readFileSync(tableFile, "utf8").replace(/^snap0: 0 (\d+) snapshot-merge /m, "snap0: 0 $1 snapshot "),
    );
    const third = await startServe(args, { cwd });
    try {
      const origin = await NbdDevice.connect(`nbd://127.0.0.1:${third.port}/origin`);
      for (let i = 0; i < 4; i++) await origin.write(i * MiB, Buffer.alloc(4096, 0x33));
      await origin.flush();
      third.child.kill("SIGKILL");
      await third.stop();
      origin.close().catch(() => undefined);
    } finally {
      third.child.kill("SIGKILL");
    }
    const fourth = await startServe(args, { cwd });
    try {
      expect(await waitForLog(fourth, "recovery: snapshot reloaded from its COW")).toMatchObject({
        device: "snap0",
        exceptions: 4,
      });
      await waitForLog(fourth, "recovery finished");
      expect(await fourth.stop()).toBe(0);
    } finally {
      fourth.child.kill("SIGKILL");
    }
  }, 180_000);
});
