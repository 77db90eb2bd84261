import { execFileSync, spawn } from "node:child_process";
import { promises as fsp, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { FileDevice } from "./file-device.js";
import { IMAGE_LOCK_DIR_ENV, ImageLockedError } from "./image-lock.js";
import { NO_NATIVE_ENV, nativeFileOps } from "./native.js";

const CI = process.env.CI === "true";
const MiB = 1024 * 1024;

function withNative<T>(enabled: boolean, fn: () => T): T {
  const saved = process.env[NO_NATIVE_ENV];
  if (enabled) delete process.env[NO_NATIVE_ENV];
  else process.env[NO_NATIVE_ENV] = "1";
  try {
    return fn();
  } finally {
    if (saved === undefined) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = saved;
  }
}

/** Whether the addon with ofdLock loads, whatever UDM_NO_NATIVE says in this process. */
const ofdBuilt = withNative(true, () => typeof nativeFileOps()?.ofdLock === "function");

const MODES = [
  { mode: "native (OFD locks)", native: true, runs: ofdBuilt || CI },
  { mode: "pure-JS (lock file)", native: false, runs: true },
];

/** Runs a describe block's tests with the addon on (`native`) or off, whatever UDM_NO_NATIVE says. */
function useNative(native: boolean): void {
  let saved: string | undefined;
  beforeEach(() => {
    saved = process.env[NO_NATIVE_ENV];
    if (native) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = "1";
  });
  afterEach(() => {
    if (saved === undefined) delete process.env[NO_NATIVE_ENV];
    else process.env[NO_NATIVE_ENV] = saved;
  });
}

/** The /proc/locks lines of a file's inode: "OFDLCK ADVISORY READ -1 fe:00:123 100 101". */
function procLocks(path: string): string[] {
  const { dev, ino } = statSync(path, { bigint: true });
  const hex = (n: bigint) => n.toString(16).padStart(2, "0");
  const inode = `${hex((dev >> 8n) & 0xfffn)}:${hex((dev & 0xffn) | ((dev >> 12n) & ~0xffn))}:${ino}`;
  return readFileSync("/proc/locks", "utf8")
    .split("\n")
    .filter((line) => line.split(/\s+/).includes(inode));
}

/** The byte ranges locked on a file, as "100-101" strings, sorted. */
function lockedRanges(path: string): string[] {
  return procLocks(path)
    .map((line) => {
      const f = line.trim().split(/\s+/);
      return `${f.at(-2)}-${f.at(-1)}`;
    })
    .sort();
}

let dir: string;
let savedLockDir: string | undefined;

beforeAll(async () => {
  dir = await fsp.mkdtemp(join(tmpdir(), "udm-image-lock-"));
  savedLockDir = process.env[IMAGE_LOCK_DIR_ENV];
  process.env[IMAGE_LOCK_DIR_ENV] = join(dir, "locks");
});
afterAll(async () => {
  if (savedLockDir === undefined) delete process.env[IMAGE_LOCK_DIR_ENV];
  else process.env[IMAGE_LOCK_DIR_ENV] = savedLockDir;
  await fsp.rm(dir, { recursive: true, force: true });
});

describe.each(MODES)("image locks, $mode path", ({ native, runs }) => {
  useNative(native);
  const open: FileDevice[] = [];
  const file = (name: string) => join(dir, `${native ? "n" : "js"}-${name}`);
  const openFile = async (path: string, options: Parameters<typeof FileDevice.open>[1] = {}) => {
    const dev = await FileDevice.open(path, options);
    open.push(dev);
    return dev;
  };

  afterEach(async () => {
    for (const dev of open.splice(0)) await dev.close();
  });

  it.skipIf(!runs)(
    "refuses a second writable open of the same file, naming the file and holder",
    async () => {
      const path = file("twice.img");
      const first = await openFile(path, { createSizeBytes: MiB });
      expect(first.lockMethod).toBe(native ? "ofd" : "lock-file");
      const err = await FileDevice.open(path).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ImageLockedError);
      expect((err as ImageLockedError).message).toContain(path);
      expect((err as ImageLockedError).message).toMatch(/"write" lock/);
      expect((err as ImageLockedError).holder?.pid).toBe(process.pid);
      expect((err as ImageLockedError).code).toBe("EBUSY");
    },
  );

  it.skipIf(!runs)("a refused open changes nothing: the file keeps its size", async () => {
    const path = file("nogrow.img");
    await openFile(path, { createSizeBytes: MiB });
    await expect(FileDevice.open(path, { createSizeBytes: 4 * MiB })).rejects.toBeInstanceOf(
      ImageLockedError,
    );
    expect(statSync(path).size).toBe(MiB);
  });

  it.skipIf(!runs)("read-only opens share with each other and with the writer", async () => {
    const path = file("shared.img");
    const writer = await openFile(path, { createSizeBytes: MiB });
    await writer.write(0, Buffer.alloc(4096, 0x5a));
    const r1 = await openFile(path, { readOnly: true });
    const r2 = await openFile(path, { readOnly: true });
    expect((await r1.read(0, 4096)).every((b) => b === 0x5a)).toBe(true);
    expect((await r2.read(0, 4096)).every((b) => b === 0x5a)).toBe(true);
  });

  it.skipIf(!runs)("a writer may open beside readers", async () => {
    const path = file("readers-first.img");
    await fsp.writeFile(path, Buffer.alloc(MiB));
    await openFile(path, { readOnly: true });
    const writer = await openFile(path);
    await writer.write(0, Buffer.alloc(512, 1));
  });

  it.skipIf(!runs)("releases the lock on close: the next writer gets it", async () => {
    const path = file("release.img");
    const first = await FileDevice.open(path, { createSizeBytes: MiB });
    await first.close();
    const second = await openFile(path);
    expect(second.lockMethod).toBe(native ? "ofd" : "lock-file");
    if (native) expect(lockedRanges(path)).toEqual(["100-101", "201-201", "203-203"]);
    else expect(procLocks(path)).toEqual([]);
  });

  it.skipIf(!runs)("lock: false opens without a lock (qemu's force-share)", async () => {
    const path = file("force-share.img");
    await openFile(path, { createSizeBytes: MiB });
    const forced = await openFile(path, { lock: false });
    expect(forced.lockMethod).toBeNull();
  });
});

describe("image locks, native path", () => {
  useNative(true);
  const active = ofdBuilt || CI;

  it.skipIf(!active)("takes qemu's bytes: 100-101 and 201, 203 for a writer, 100 for a reader", async () => {
    const path = join(dir, "bytes.img");
    const writer = await FileDevice.open(path, { createSizeBytes: MiB });
    expect(lockedRanges(path)).toEqual(["100-101", "201-201", "203-203"]);
    for (const line of procLocks(path)) expect(line).toMatch(/OFDLCK\s+ADVISORY\s+READ/);
    await writer.close();
    expect(procLocks(path)).toEqual([]);
    const reader = await FileDevice.open(path, { readOnly: true });
    expect(lockedRanges(path)).toEqual(["100-100"]);
    await reader.close();
  });

  it.skipIf(!active)("refuses a writer while another process holds the write permission", async () => {
    const path = join(dir, "other-process.img");
    writeFileSync(path, Buffer.alloc(MiB));
    // Another process that opened the image writable as qemu does, by its bytes (python3's fcntl).
    const holder = spawn(
      "python3",
      [
        "-c",
        `import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
for b in (100, 101, 203):
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_RDLCK, 0, b, 1, 0))
print("held", flush=True)
time.sleep(60)`,
        path,
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    try {
      await new Promise<void>((resolve, reject) => {
        holder.stdout!.on("data", (d) => String(d).includes("held") && resolve());
        holder.on("exit", (code) => reject(new Error(`python3 exited with ${code}`)));
      });
      const err = await FileDevice.open(path).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ImageLockedError);
      expect((err as Error).message).toMatch(
        new RegExp(
          `^${path}: cannot get the shared "write" lock: pid ${holder.pid} \\(\\S*python3 -c import fcntl`,
        ),
      );
      // Nothing of the refused open stays behind.
      expect(lockedRanges(path)).toEqual(["100-101", "203-203"]);
      const reader = await FileDevice.open(path, { readOnly: true });
      await reader.close();
    } finally {
      holder.kill("SIGKILL");
    }
  });
});

describe("image locks, pure-JS path", () => {
  useNative(false);

  it("takes over a lock file whose process is gone", async () => {
    const path = join(dir, "stale.img");
    writeFileSync(path, Buffer.alloc(MiB));
    const st = statSync(path, { bigint: true });
    const dead = spawn(process.execPath, ["-e", ""]);
    await new Promise((resolve) => dead.on("exit", resolve));
    const lockFile = join(dir, "locks", `${st.dev}-${st.ino}.lock`);
    await fsp.mkdir(join(dir, "locks"), { recursive: true });
    writeFileSync(lockFile, `${dead.pid} 1\n${path}\n`);
    const dev = await FileDevice.open(path);
    expect(readFileSync(lockFile, "utf8")).toContain(`${process.pid} `);
    await dev.close();
    expect(() => statSync(lockFile)).toThrow();
  });

  it.skipIf(!(ofdBuilt || CI))("a udm with the addon sees the lock file of one without it", async () => {
    const path = join(dir, "mixed.img");
    const fallback = await FileDevice.open(path, { createSizeBytes: MiB });
    try {
      delete process.env[NO_NATIVE_ENV];
      const err = await FileDevice.open(path).catch((e: unknown) => e);
      process.env[NO_NATIVE_ENV] = "1";
      expect(err).toBeInstanceOf(ImageLockedError);
      expect((err as Error).message).toContain(
        `cannot get the "write" lock: this process (pid ${process.pid}, another open of the same file) is writing it (udm without its native addon; lock file`,
      );
    } finally {
      await fallback.close();
    }
  });

  it("refuses an image another process holds for writing, seen in /proc/locks", async () => {
    const path = join(dir, "proc-locks.img");
    writeFileSync(path, Buffer.alloc(MiB));
    const holder = spawn(
      "python3",
      [
        "-c",
        `import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
for b in (100, 101, 201, 203):
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_RDLCK, 0, b, 1, 0))
print("held", flush=True)
time.sleep(60)`,
        path,
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    try {
      await new Promise<void>((resolve, reject) => {
        holder.stdout!.on("data", (d) => String(d).includes("held") && resolve());
        holder.on("exit", (code) => reject(new Error(`python3 exited with ${code}`)));
      });
      const err = await FileDevice.open(path).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ImageLockedError);
      expect((err as Error).message).toContain(`pid ${holder.pid}`);
      expect((err as Error).message).toContain("without its native addon");
      // A reader shares with a writer that shares reads.
      const reader = await FileDevice.open(path, { readOnly: true });
      await reader.close();
    } finally {
      holder.kill("SIGKILL");
    }
  });
});

/** `losetup` needs root and the loop driver; CI must have both. */
function loopMissing(): string | null {
  try {
    execFileSync("losetup", ["--version"], { stdio: "ignore" });
  } catch {
    return "losetup is not installed";
  }
  return process.getuid?.() === 0 ? null : "losetup needs root";
}

describe("image locks on a loop device", () => {
  useNative(true);
  const missing = loopMissing();
  const active = (ofdBuilt && missing === null) || CI;

  it.skipIf(!active)("locks the block device node as a file: a second writer is refused", async () => {
    if (missing) throw new Error(`cannot test loop devices: ${missing}`);
    const backing = join(dir, "loop-backing.img");
    writeFileSync(backing, Buffer.alloc(0));
    await fsp.truncate(backing, 8 * MiB);
    const loop = execFileSync("losetup", ["-f", "--show", backing], { encoding: "utf8" }).trim();
    try {
      const dev = await FileDevice.open(loop);
      expect(dev.isBlockDevice).toBe(true);
      expect(lockedRanges(loop)).toEqual(["100-101", "201-201", "203-203"]);
      const err = await FileDevice.open(loop).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ImageLockedError);
      expect((err as Error).message).toContain(loop);
      await dev.close();
      expect(procLocks(loop)).toEqual([]);
      await (await FileDevice.open(loop)).close();
    } finally {
      execFileSync("losetup", ["-d", loop]);
    }
  });
});
