/**
 * Image locks end to end: the files a running `udm serve` writes (origin, COW, mirror legs and
 * log, plain exports, block devices) are locked the way qemu locks images, so a second udm
 * server, qemu-nbd, qemu-io and qemu-img are refused with a message naming the file (and udm
 * refuses what they hold); read-only opens share; removing a device or stopping the server lets go.
 */
import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { buildCli, type ServeProcess, startServe, udm } from "./cli-helpers.js";
import { CI, withTools } from "./tools.js";

const MiB = 1 << 20;
let dir: string;
let serve: ServeProcess;
let savedLockDir: string | undefined;

const ctl = (name = "ctl.sock") => ["--control", join(dir, name)];
const data = (file: string) => join(dir, "data", file);

function tool(cmd: string, args: string[], timeoutMs = 30_000) {
  const r = spawnSync(cmd, args, { cwd: dir, encoding: "utf8", timeout: timeoutMs });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** qemu-io writing 4 KiB at 0 of a raw image (or block device). */
const qemuWrite = (path: string) => tool("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 4k", path]);

beforeAll(async () => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-lock-"));
  // The pure-JS path's lock files, for this test's servers only.
  savedLockDir = process.env.UDM_LOCK_DIR;
  process.env.UDM_LOCK_DIR = join(dir, "locks");
  serve = await startServe(["--data-dir", "data", "--listen", "127.0.0.1:0", ...ctl()], { cwd: dir });
}, 300_000);

afterAll(async () => {
  if (serve.child.exitCode === null) serve.child.kill("SIGKILL");
  if (savedLockDir === undefined) delete process.env.UDM_LOCK_DIR;
  else process.env.UDM_LOCK_DIR = savedLockDir;
  rmSync(dir, { recursive: true, force: true });
});

describe("udm serve locks the images it writes", () => {
  it("a second udm serve on the same table (another data dir) is refused, naming the file and the holder", () => {
    const r = udm(
      [
        "serve",
        "--table",
        data("udm.table"),
        "--data-dir",
        "other",
        "--listen",
        "127.0.0.1:0",
        ...ctl("b.sock"),
      ],
      { cwd: dir },
    );
    expect(r.stderr).toContain(
      `${data("origin.img")}: cannot get the "write" lock: pid ${serve.child.pid} (${process.execPath} `,
    );
    expect(r.stderr).toMatch(
      /udm\.js serve --data-dir data .*\) does not share it \(is another process using the image\?\)/,
    );
    expect(r.status).toBe(1);
    expect(existsSync(join(dir, "other"))).toBe(false);
    expect(udm(["ls", ...ctl()], { cwd: dir }).status).toBe(0);
  });

  it("a second udm without the native addon is refused too (it reads the locks in /proc/locks)", () => {
    const r = udm(["serve", "--table", data("udm.table"), "--listen", "127.0.0.1:0", ...ctl("c.sock")], {
      cwd: dir,
      env: { UDM_NO_NATIVE: "1" },
    });
    expect(r.stderr).toContain(
      `${data("origin.img")}: cannot get the "write" lock: pid ${serve.child.pid} (`,
    );
    expect(r.stderr).toContain("without its native addon");
    expect(r.status).toBe(1);
  });

  withTools("qemu-io")("qemu-io cannot write the origin, COW, mirror legs or log; it may read", () => {
    for (const file of ["origin.img", "snap0.cow", "mirror0-a.img", "mirror0-b.img", "mirror0.log"]) {
      const r = qemuWrite(data(file));
      expect(r.stderr).toContain('Failed to get "write" lock');
      expect(r.status).not.toBe(0);
    }
    const read = tool("qemu-io", ["-r", "-f", "raw", "-c", "read 0 4k", data("origin.img")]);
    expect(read.stdout).toContain("read 4096/4096 bytes at offset 0");
    expect(read.status).toBe(0);
  });

  withTools("qemu-img")("qemu-img needs -U (force share) to read an image udm writes", () => {
    const out = join(dir, "copy.img");
    const refused = tool("qemu-img", ["convert", "-f", "raw", "-O", "raw", data("origin.img"), out]);
    expect(refused.stderr).toContain('Failed to get shared "write" lock');
    expect(refused.status).toBe(1);
    const shared = tool("qemu-img", ["convert", "-U", "-f", "raw", "-O", "raw", data("origin.img"), out]);
    expect(shared.stderr).toBe("");
    expect(shared.status).toBe(0);
  });

  withTools("qemu-nbd")("qemu-nbd cannot serve a mirror leg udm writes", () => {
    const r = tool("qemu-nbd", ["-f", "raw", "-k", join(dir, "q.sock"), data("mirror0-b.img")], 20_000);
    expect(r.stderr).toContain('Failed to get "write" lock');
    expect(r.status).toBe(1);
  });

  withTools("qemu-io")("a created device locks its file; removing the device releases it", () => {
    writeFileSync(join(dir, "extra.img"), Buffer.alloc(MiB));
    expect(
      udm(["create", "lin0", "--table", "0 2048 linear extra.img 0", ...ctl()], { cwd: dir }).status,
    ).toBe(0);
    expect(qemuWrite(join(dir, "extra.img")).stderr).toContain('Failed to get "write" lock');
    expect(udm(["remove", "lin0", ...ctl()], { cwd: dir }).status).toBe(0);
    const r = qemuWrite(join(dir, "extra.img"));
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
  });
});

describe("udm refuses an image qemu-nbd serves", () => {
  withTools("qemu-nbd")("names qemu-nbd and its pid; serves the file once qemu-nbd is gone", async () => {
    const held = join(dir, "held.img");
    writeFileSync(held, Buffer.alloc(MiB));
    const sock = join(dir, "held.sock");
    const qemuNbd: ChildProcess = spawn("qemu-nbd", ["-t", "-f", "raw", "-k", sock, held], {
      stdio: "ignore",
    });
    try {
      for (let i = 0; i < 200 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
      expect(existsSync(sock)).toBe(true);
      const r = udm(["serve", "--export", `d=${held}`, "--listen", "127.0.0.1:0", ...ctl("d.sock")], {
        cwd: dir,
      });
      expect(r.stderr).toContain(
        `${held}: cannot get the shared "write" lock: pid ${qemuNbd.pid} (qemu-nbd -t -f raw -k ${sock} ${held}) has the image open for write`,
      );
      expect(r.status).toBe(1);
    } finally {
      qemuNbd.kill("SIGTERM");
      await new Promise((r) => qemuNbd.once("exit", r));
    }
    const after = await startServe(["--export", `d=${held}`, "--listen", "127.0.0.1:0", ...ctl("d.sock")], {
      cwd: dir,
    });
    expect(await after.stop()).toBe(0);
  });
});

/** `losetup` needs root and the loop driver; CI must have both. */
function loopMissing(): string | null {
  if (spawnSync("losetup", ["--version"]).status !== 0) return "losetup is not installed";
  return process.getuid?.() === 0 ? null : "losetup needs root";
}

describe("block devices", () => {
  const missing = loopMissing();
  const run = CI || missing === null ? withTools("qemu-io") : it.skip;

  run(
    "a loop device in a table is locked like a file: qemu-io is refused until the device is removed",
    () => {
      if (missing) throw new Error(`cannot test loop devices: ${missing}`);
      const backing = join(dir, "loop-backing.img");
      writeFileSync(backing, Buffer.alloc(8 * MiB));
      const loop = execFileSync("losetup", ["-f", "--show", backing], { encoding: "utf8" }).trim();
      try {
        const created = udm(["create", "blk0", "--table", `0 16384 linear ${loop} 0`, ...ctl()], {
          cwd: dir,
        });
        expect(created.stderr).toBe("");
        expect(qemuWrite(loop).stderr).toContain('Failed to get "write" lock');
        const second = udm(["serve", "--export", `d=${loop}`, "--listen", "127.0.0.1:0", ...ctl("e.sock")], {
          cwd: dir,
        });
        expect(second.stderr).toContain(`${loop}: cannot get the "write" lock: pid ${serve.child.pid}`);
        expect(second.status).toBe(1);
        expect(udm(["remove", "blk0", ...ctl()], { cwd: dir }).status).toBe(0);
        expect(qemuWrite(loop).status).toBe(0);
      } finally {
        execFileSync("losetup", ["-d", loop]);
      }
    },
  );
});

describe("stopping the server", () => {
  withTools("qemu-io")("releases every lock: qemu-io may write the origin afterwards", async () => {
    expect(await serve.stop()).toBe(0);
    const r = qemuWrite(data("origin.img"));
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
  });
});
