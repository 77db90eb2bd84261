// systemd integration of `udm serve`: socket activation (LISTEN_FDS/LISTEN_PID) run from the
// shipped udm.service under systemd-socket-activate, and sd_notify READY=1 on NOTIFY_SOCKET.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import {
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, ROOT, UDM, udm } from "./cli-helpers.js";
import { requireTool } from "./tools.js";

let dir: string;
const hasActivate = requireTool("systemd-socket-activate");
const hasNotify = requireTool("systemd-notify");
const hasNbdinfo = requireTool("nbdinfo");
const hasPython = requireTool("python3");
const UNITS = join(ROOT, "packages/cli/systemd");

beforeAll(() => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-systemd-"));
  writeFileSync(join(dir, "disk.img"), Buffer.alloc(2 << 20, 5));
  writeFileSync(join(dir, "udm.table"), "disk: 0 4096 linear disk.img 0\n");
}, 300_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The shipped unit's ExecStart, its paths pointed at the test directory. */
function unitCommand(): string[] {
  const unit = readFileSync(join(UNITS, "udm.service"), "utf8");
  const exec = /^ExecStart=(.*)$/m.exec(unit)?.[1];
  if (!exec) throw new Error("udm.service has no ExecStart");
  const [bin, ...args] = exec.split(/\s+/);
  expect(bin).toBe("/usr/local/bin/udm");
  return [
    process.execPath,
    UDM,
    ...args.map((a) =>
      a
        .replace("/etc/udm/udm.table", join(dir, "udm.table"))
        .replace("/var/lib/udm", join(dir, "state"))
        .replace("/run/udm/control.sock", join(dir, "control.sock")),
    ),
  ];
}

/** A Unix datagram socket that prints what it receives (what systemd's NOTIFY_SOCKET is). */
function notifyReceiver(path: string): { child: ChildProcess; messages: () => string } {
  const child = spawn(
    "python3",
    [
      "-c",
      "import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint('bound',flush=True)\nwhile True:\n  print(s.recv(4096).decode().replace('\\n',' '),flush=True)",
      path,
    ],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  let out = "";
  child.stdout!.on("data", (d) => {
    out += d;
  });
  return { child, messages: () => out };
}

async function waitFor(what: string, check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The TCP ports and Unix socket paths process `pid` listens on (from /proc). */
function listeningSockets(pid: number): { tcpPorts: number[]; unixPaths: string[] } {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {}
  }
  const tcpPorts: number[] = [];
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    if (!existsSync(file)) continue;
    for (const line of readFileSync(file, "utf8").split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      // st 0A = LISTEN; local address "HEXIP:HEXPORT"; field 9 is the inode.
      if (f[3] === "0A" && inodes.has(f[9]!)) tcpPorts.push(Number.parseInt(f[1]!.split(":")[1]!, 16));
    }
  }
  const unixPaths: string[] = [];
  for (const line of readFileSync("/proc/net/unix", "utf8").split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    // Flags 00010000 = __SO_ACCEPTCON (listening).
    if (f[3] === "00010000" && inodes.has(f[6]!) && f[7]) unixPaths.push(f[7]);
  }
  return { tcpPorts, unixPaths };
}

function nbdinfoSize(uri: string): string {
  return spawnSync("nbdinfo", ["--size", uri], { encoding: "utf8", timeout: 30_000 }).stdout.trim();
}

/** Runs `systemd-socket-activate -l LISTEN ... COMMAND`, collecting its output. */
function activate(listen: string, command: string[], env: Record<string, string> = {}) {
  const setenv = Object.entries(env).flatMap(([k, v]) => ["-E", `${k}=${v}`]);
  const child = spawn("systemd-socket-activate", ["-l", listen, ...setenv, ...command], {
    cwd: dir,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d) => {
    stdout += d;
  });
  child.stderr!.on("data", (d) => {
    stderr += d;
  });
  const exited = new Promise<number | null>((r) => child.on("exit", r));
  return { child, stdout: () => stdout, stderr: () => stderr, exited };
}

describe("systemd", () => {
  test.runIf(hasActivate && hasNbdinfo && hasPython)(
    "the shipped udm.service under systemd-socket-activate: serves the passed Unix socket, binds nothing else, READY=1",
    async () => {
      const sock = join(dir, "nbd.sock");
      const notify = join(dir, "notify.sock");
      const receiver = notifyReceiver(notify);
      await waitFor("the notify socket", () => receiver.messages().includes("bound"));
      // systemd-socket-activate execs udm on the first connection: nbdinfo's waits in the backlog.
      const run = activate(sock, unitCommand(), { NOTIFY_SOCKET: notify, UDM_LOG_LEVEL: "info" });
      try {
        await waitFor("the activator's socket", () => run.stderr().includes(`Listening on ${sock}`));
        expect(nbdinfoSize(`nbd+unix:///disk?socket=${sock}`)).toBe(String(2 << 20));
        await waitFor("READY=1", () => receiver.messages().includes("READY=1"));
        // systemd-socket-activate exec()s udm: its PID is udm's main PID.
        expect(receiver.messages()).toContain(`READY=1 MAINPID=${run.child.pid}`);
        const listening = run
          .stdout()
          .split("\n")
          .filter((l) => l.includes("listening on"));
        expect(listening).toEqual([
          `udm: listening on nbd+unix:///?socket=${sock} (socket activation, fd 3) (control: ${join(dir, "control.sock")})`,
        ]);
        expect(run.stdout()).toContain(`nbdinfo 'nbd+unix:///disk?socket=${sock}'`);
        // The activated socket and the control socket: no TCP port of its own.
        expect(listeningSockets(run.child.pid!)).toEqual({
          tcpPorts: [],
          unixPaths: expect.arrayContaining([sock, join(dir, "control.sock")]),
        });
        expect(listeningSockets(run.child.pid!).unixPaths).toHaveLength(2);
        // --log-format json from the unit: every stderr line after the activator's own is JSON.
        const logLines = run
          .stderr()
          .split("\n")
          .filter((l) => l.startsWith("{"));
        expect(logLines.length).toBeGreaterThan(0);
        expect(logLines.some((l) => JSON.parse(l).msg === "nbd server listening on a passed socket")).toBe(
          true,
        );
        expect(run.stderr()).not.toMatch(/"msg":"nbd server listening"/);
        run.child.kill("SIGTERM");
        expect(await run.exited).toBe(0);
        await waitFor("STOPPING=1", () => receiver.messages().includes("STOPPING=1"));
      } finally {
        run.child.kill("SIGTERM");
        receiver.child.kill("SIGTERM");
      }
      expect(await run.exited).toBe(0);
    },
  );

  test.runIf(hasActivate && hasNbdinfo)(
    "TCP socket activation: the activated port answers, udm's default port is not bound",
    async () => {
      const probe = createServer();
      await new Promise<void>((r) => probe.listen(0, "127.0.0.1", r));
      const port = (probe.address() as { port: number }).port;
      await new Promise<void>((r) => probe.close(() => r()));
      const run = activate(`127.0.0.1:${port}`, [
        process.execPath,
        UDM,
        "serve",
        "--export",
        "d=mem:1M",
        "--control",
        join(dir, "tcp-ctl.sock"),
      ]);
      try {
        // The activator binds first (and says so); udm starts on the first connection.
        await waitFor("the activator's socket", () =>
          run.stderr().includes(`Listening on 127.0.0.1:${port}`),
        );
        expect(nbdinfoSize(`nbd://127.0.0.1:${port}/d`)).toBe(String(1 << 20));
        await waitFor("the banner", () => run.stdout().includes("nbdinfo"));
        const listening = run
          .stdout()
          .split("\n")
          .filter((l) => l.includes("listening on"));
        expect(listening).toHaveLength(1);
        expect(listeningSockets(run.child.pid!).tcpPorts).toEqual([port]);
        expect(listening[0]).toMatch(
          new RegExp(`^udm: listening on nbd://127\\.0\\.0\\.1:${port} \\(socket activation, fd 3\\)`),
        );
      } finally {
        run.child.kill("SIGTERM");
      }
      expect(await run.exited).toBe(0);
    },
  );

  test("--listen under socket activation is a usage error", () => {
    const r = spawnSync(
      "sh",
      [
        "-c",
        `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`,
        process.execPath,
        UDM,
        "serve",
        "--listen",
        "127.0.0.1:0",
      ],
      { cwd: dir, encoding: "utf8", timeout: 30_000 },
    );
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(
      /socket activation \(LISTEN_FDS=1\) passes the sockets: drop --listen and --unix/,
    );
  });

  test.runIf(hasNotify && hasPython)(
    "without the native addon, READY=1 goes through systemd-notify",
    async () => {
      const notify = join(dir, "notify2.sock");
      const receiver = notifyReceiver(notify);
      try {
        await waitFor("the notify socket", () => receiver.messages().includes("bound"));
        const r = udm(
          [
            "serve",
            "--export",
            "d=mem:1M",
            "--unix",
            join(dir, "n2.sock"),
            "--control",
            join(dir, "n2-ctl.sock"),
          ].concat(["--run", "true"]),
          { cwd: dir, env: { NOTIFY_SOCKET: notify, UDM_NO_NATIVE: "1" } },
        );
        expect(r.status).toBe(0);
        await waitFor("READY=1", () => receiver.messages().includes("READY=1"));
      } finally {
        receiver.child.kill("SIGTERM");
      }
    },
  );
});
