// nbdkit / qemu-nbd serving conventions of `udm serve`: --version, -r, --run, --print-uri,
// --pidfile, --exit-with-parent, log options, per-export banner hints.
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, ROOT, startServe, UDM, udm, udmAsync } from "./cli-helpers.js";
import { requireTool } from "./tools.js";

let dir: string;
const hasNbdinfo = requireTool("nbdinfo");
const hasOpenssl = requireTool("openssl");

beforeAll(() => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-conv-"));
  writeFileSync(join(dir, "disk.img"), Buffer.alloc(1 << 20, 7));
}, 300_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitFor(what: string, check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("udm conventions", () => {
  test("--version and -V print the package version; no arguments is help on stderr, exit 2", () => {
    const version = JSON.parse(readFileSync(join(ROOT, "packages/cli/package.json"), "utf8")).version;
    for (const flag of ["--version", "-V"]) {
      const r = udm([flag]);
      expect(r.status).toBe(0);
      expect(r.stdout).toBe(`udm ${version}\n`);
    }
    const none = udm([]);
    expect(none.status).toBe(2);
    expect(none.stdout).toBe("");
    expect(none.stderr).toMatch(/^Usage: udm \[options\] \[command\]/);
  });

  test.runIf(hasNbdinfo)(
    "--run: nbdinfo --size $uri prints the size, the command's status is udm's; variables set",
    () => {
      const r = udm(
        [
          "serve",
          "--export",
          "disk=disk.img",
          "--listen",
          "127.0.0.1:0",
          "--control",
          join(dir, "run.sock"),
          "--run",
          'nbdinfo --size $uri && echo "nbd=$nbd port=$port unixsocket=[$unixsocket] tls=$tls" && exit 7',
        ],
        { cwd: dir },
      );
      expect(r.status).toBe(7);
      const [size, vars] = r.stdout.trim().split("\n");
      expect(size).toBe(String(1 << 20));
      expect(vars).toMatch(/^nbd=nbd:\/\/127\.0\.0\.1:(\d+)\/disk port=(\d+) unixsocket=\[\] tls=0$/);
      // The banner is not printed in captive mode: stdout is the command's.
      expect(r.stdout).not.toContain("listening on");
    },
  );

  test.runIf(hasNbdinfo)(
    "-r makes every export read-only, --read-only-export one of them (nbdinfo --is read-only)",
    () => {
      const sock = join(dir, "ro.sock");
      const check =
        'nbdinfo --is read-only "nbd+unix:///disk?socket=$unixsocket"; echo disk=$?; nbdinfo --is read-only "nbd+unix:///scratch?socket=$unixsocket"; echo scratch=$?';
      const all = udm(
        ["serve", "-r", "--export", "disk=disk.img", "--export", "scratch=mem:1M"].concat([
          "--unix",
          sock,
          "--control",
          join(dir, "ro1.sock"),
          "--run",
          check,
        ]),
        { cwd: dir },
      );
      expect(all.stdout).toBe("disk=0\nscratch=0\n");
      expect(all.status).toBe(0);
      const one = udm(
        [
          "serve",
          "--read-only-export",
          "disk",
          "--export",
          "disk=disk.img",
          "--export",
          "scratch=mem:1M",
        ].concat(["--unix", sock, "--control", join(dir, "ro2.sock"), "--run", check]),
        { cwd: dir },
      );
      expect(one.stdout).toMatch(/^disk=0\nscratch=[12]\n$/);
      const none = udm(
        ["serve", "--export", "disk=disk.img", "--export", "scratch=mem:1M"].concat([
          "--unix",
          sock,
          "--control",
          join(dir, "ro3.sock"),
          "--run",
          check,
        ]),
        { cwd: dir },
      );
      expect(none.stdout).toMatch(/^disk=[12]\nscratch=[12]\n$/);
      const typo = udm(["serve", "--read-only-export", "dsk", "--export", "disk=disk.img", "--unix", sock], {
        cwd: dir,
      });
      expect(typo.status).toBe(2);
      expect(typo.stderr).toMatch(/--read-only-export "dsk": no export of that name \(exports: "disk"\)/);
    },
  );

  test("--print-uri prints one nbd+unix:// URI per export; --pidfile holds the PID while serving", async () => {
    const sock = join(dir, "uri.sock");
    const pidfile = join(dir, "udm.pid");
    const child = spawn(
      process.execPath,
      [UDM, "serve", "--export", "a=mem:1M", "--export", "b=mem:1M", "--unix", sock].concat([
        "--control",
        join(dir, "uri-ctl.sock"),
        "--print-uri",
        "--pidfile",
        pidfile,
      ]),
      { cwd: dir, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, UDM_LOG_LEVEL: "warn" } },
    );
    let stdout = "";
    child.stdout.on("data", (d) => {
      stdout += d;
    });
    const exited = new Promise<number | null>((r) => child.on("exit", r));
    try {
      await waitFor("two URIs", () => stdout.split("\n").length >= 3);
      expect(stdout).toBe(`nbd+unix:///a?socket=${sock}\nnbd+unix:///b?socket=${sock}\n`);
      expect(readFileSync(pidfile, "utf8")).toBe(`${child.pid}\n`);
    } finally {
      child.kill("SIGTERM");
    }
    expect(await exited).toBe(0);
    expect(existsSync(pidfile)).toBe(false);
  });

  test.runIf(hasOpenssl)("--print-uri under TLS prints nbds://; the banner's hints use TLS too", async () => {
    execFileSync(
      "openssl",
      ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"].concat([
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
      ]),
      { cwd: dir, stdio: "ignore" },
    );
    const tls = ["--tls-cert", "cert.pem", "--tls-key", "key.pem", "--tls-required"];
    const r = udm(
      [
        "serve",
        "--export",
        "disk=mem:1M",
        "--listen",
        "127.0.0.1:0",
        "--control",
        join(dir, "t1.sock"),
      ].concat(tls, ["--print-uri", "--run", "true"]),
      { cwd: dir },
    );
    expect(r.status).toBe(0);
    // --run suppresses the banner, not the URIs asked for.
    expect(r.stdout).toMatch(/^nbds:\/\/127\.0\.0\.1:\d+\/disk\n$/);
    const serve = await startServe(
      ["--export", "disk=mem:1M", "--listen", "127.0.0.1:0", "--control", join(dir, "t2.sock"), ...tls],
      { cwd: dir },
    );
    try {
      expect(serve.stdout()).toMatch(/listening on nbds:\/\/127\.0\.0\.1:\d+ /);
      expect(serve.stdout()).toContain(`nbdinfo nbds://127.0.0.1:${serve.port}/disk`);
      expect(serve.stdout()).toContain(`-N disk -enable-tls /dev/nbd0`);
      expect(serve.stdout()).not.toMatch(/nbdinfo nbd:\/\//);
    } finally {
      expect(await serve.stop()).toBe(0);
    }
  });

  test("the banner gives each export its own /dev/nbdN", async () => {
    const serve = await startServe(
      ["--export", "a=mem:1M", "--export", "b=mem:1M", "--listen", "127.0.0.1:0"].concat([
        "--control",
        join(dir, "banner.sock"),
      ]),
      { cwd: dir },
    );
    try {
      expect(serve.stdout()).toContain(`nbd-client 127.0.0.1 ${serve.port} -N a /dev/nbd0`);
      expect(serve.stdout()).toContain(`nbd-client 127.0.0.1 ${serve.port} -N b /dev/nbd1`);
    } finally {
      expect(await serve.stop()).toBe(0);
    }
  });

  test("--exit-with-parent: udm stops cleanly when the process that started it ends", async () => {
    const pidfile = join(dir, "orphan.pid");
    // A parent that starts udm, waits until it serves, then exits without signalling it.
    const parent = spawnSync(
      process.execPath,
      [
        "-e",
        `const { spawn } = require("node:child_process"); const fs = require("node:fs");
         const c = spawn(process.execPath, ${JSON.stringify([UDM, "serve", "--export", "d=mem:1M", "--unix", join(dir, "orphan.sock"), "--control", join(dir, "orphan-ctl.sock"), "--exit-with-parent", "--pidfile", pidfile])}, { stdio: "ignore", detached: true });
         const t = setInterval(() => { if (fs.existsSync(${JSON.stringify(pidfile)})) { clearInterval(t); process.exit(0); } }, 20);`,
      ],
      { cwd: dir, timeout: 30_000 },
    );
    expect(parent.status).toBe(0);
    const pid = Number(readFileSync(pidfile, "utf8"));
    expect(pid).toBeGreaterThan(0);
    // The pidfile is removed by udm's clean stop, not left behind by a kill.
    await waitFor("udm to stop", () => !alive(pid) && !existsSync(pidfile));
  });

  test("-q, -v and --log-format json|pretty choose the level and the format of stderr", async () => {
    const base = ["serve", "--export", "d=mem:1M", "--listen", "127.0.0.1:0", "--run", "true"];
    const json = await udmAsync([...base, "--control", join(dir, "l1.sock"), "--log-format", "json", "-v"], {
      cwd: dir,
      env: { UDM_LOG_LEVEL: "" },
    });
    const lines = json.stderr.trim().split("\n");
    for (const line of lines) expect(() => JSON.parse(line)).not.toThrow();
    expect(lines.some((l) => JSON.parse(l).level === 20)).toBe(true); // debug
    const pretty = await udmAsync([...base, "--control", join(dir, "l2.sock"), "--log-format", "pretty"], {
      cwd: dir,
      env: { UDM_LOG_LEVEL: "" },
    });
    expect(pretty.stderr).toMatch(/INFO.*control socket listening/);
    expect(pretty.stderr).not.toMatch(/^\{/m);
    const quiet = await udmAsync([...base, "--control", join(dir, "l3.sock"), "-q"], {
      cwd: dir,
      env: { UDM_LOG_LEVEL: "" },
    });
    expect(quiet.status).toBe(0);
    expect(quiet.stderr).toBe("");
  });

  test("a control request that fails on a typo is one info line on the server, no error block", async () => {
    const ctl = join(dir, "typo.sock");
    const serve = await startServe(
      ["--export", "d=mem:1M", "--listen", "127.0.0.1:0", "--control", ctl, "--log-format", "pretty"],
      { cwd: dir },
    );
    try {
      const r = await udmAsync(["--control", ctl, "remove", "nosuch"], { cwd: dir });
      expect(r.status).toBe(1);
      await waitFor("the log line", () => serve.stderr().includes("control request failed"));
    } finally {
      expect(await serve.stop()).toBe(0);
    }
    const failed = serve
      .stderr()
      .split("\n")
      .filter((l) => l.includes("control request failed"));
    expect(failed).toHaveLength(1);
    expect(failed[0]).toMatch(/INFO.*control request failed.*nosuch/);
    expect(serve.stderr()).not.toMatch(/ERROR|stack/);
  });
});
