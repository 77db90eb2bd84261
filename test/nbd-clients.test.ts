/**
 * End-to-end: NbdServer in this process on 127.0.0.1, driven by the real NBD clients from
 * Debian (libnbd-bin, qemu-utils, fio, python3-libnbd), and NbdDevice against nbdkit and qemu-nbd.
 * A missing tool skips its test locally and fails it under CI=true.
 */
import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type BlockDevice, FileDevice, MemoryDevice, type StatusContext } from "@udm/kcopyd";
import { NbdDevice, NbdServer } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect } from "vitest";
import { withTools } from "./tools.js";

// nbdsh runs `python3 -m nbd`: the Debian python3 that has python3-libnbd must come first.
const env = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ""}` };

function run(cmd: string, args: string[], timeoutMs = 60_000): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 64 << 20, env }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(" ")} failed: ${err.message}\n${stderr}`));
      else resolve({ stdout, stderr });
    });
  });
}

const MiB = 1 << 20;
let dir: string;
let server: NbdServer;
let address: string;
let fileDisk: FileDevice;
let memDisk: MemoryDevice;
let source: string;
const children: ChildProcess[] = [];

/** Marks odd MiB with flag 1: a stand-in for a mirror's out-of-sync map. */
const oddMegabytes: StatusContext = {
  name: "udm:odd-megabytes",
  description: "flag 1 on odd MiB",
  query: async (o, l) => {
    const out: Array<{ lengthBytes: number; flags: number }> = [];
    for (let pos = o; pos < o + l; ) {
      const next = Math.min(o + l, (Math.floor(pos / MiB) + 1) * MiB);
      out.push({ lengthBytes: next - pos, flags: Math.floor(pos / MiB) % 2 });
      pos = next;
    }
    return out;
  },
};

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "udm-nbd-e2e-"));
  source = join(dir, "source.img");
  writeFileSync(source, randomBytes(32 * MiB));
  fileDisk = await FileDevice.open(join(dir, "disk.img"), { createSizeBytes: 32 * MiB });
  memDisk = new MemoryDevice(8 * MiB);
  await memDisk.write(MiB, Buffer.alloc(64 * 1024, 0xab));
  (memDisk as BlockDevice).statusContexts = () => [oddMegabytes];
  server = new NbdServer();
  server.addExport("disk", fileDisk, { description: "file-backed disk" });
  server.addExport("mem", memDisk, { description: "sparse memory" });
  server.addExport("ro", new MemoryDevice(MiB), { readOnly: true });
  address = await server.listen({ host: "127.0.0.1", port: 0 });
});

afterAll(async () => {
  for (const c of children) if (c.pid && c.exitCode === null) process.kill(c.pid);
  await server.close({ force: true });
  await fileDisk.close();
  rmSync(dir, { recursive: true, force: true });
});

describe("nbdinfo", () => {
  withTools("nbdinfo")("lists every export with size, description and flags", async () => {
    const { stdout } = await run("nbdinfo", ["--list", "--json", `nbd://${address}`]);
    const info = JSON.parse(stdout);
    expect(info.protocol).toBe("newstyle-fixed");
    expect(info.structured).toBe(true);
    const byName = new Map<string, Record<string, unknown>>(
      info.exports.map((e: { "export-name": string }) => [e["export-name"], e]),
    );
    expect([...byName.keys()].sort()).toEqual(["disk", "mem", "ro"]);
    const disk = byName.get("disk") as Record<string, unknown>;
    expect(disk["export-size"]).toBe(32 * MiB);
    expect(disk.description).toBe("file-backed disk");
    expect(disk.can_multi_conn).toBe(true);
    expect(
      disk.can_flush && disk.can_fua && disk.can_trim && disk.can_zero && disk.can_df && disk.can_cache,
    ).toBe(true);
    expect(disk.block_size_maximum).toBe(32 * MiB);
    expect((byName.get("ro") as Record<string, unknown>).is_read_only).toBe(true);
    expect((byName.get("mem") as Record<string, unknown>).contexts).toEqual([
      "base:allocation",
      "udm:odd-megabytes",
    ]);
  });

  withTools("nbdinfo")("maps base:allocation and a device's own context", async () => {
    const base = await run("nbdinfo", ["--map", "--json", `nbd://${address}/mem`]);
    expect(JSON.parse(base.stdout)).toEqual([
      { offset: 0, length: MiB, type: 3, description: "hole,zero" },
      { offset: MiB, length: 65536, type: 0, description: "data" },
      { offset: MiB + 65536, length: 7 * MiB - 65536, type: 3, description: "hole,zero" },
    ]);
    const custom = await run("nbdinfo", ["--map=udm:odd-megabytes", "--totals", `nbd://${address}/mem`]);
    // --totals prints "<bytes> <percent> <type>" per type: 4 MiB of each.
    expect(custom.stdout).toMatch(/4194304\s+50\.0%\s+0/);
    expect(custom.stdout).toMatch(/4194304\s+50\.0%\s+1/);
  });
});

describe("nbdcopy", () => {
  withTools("nbdcopy")("copies a file in and back out byte for byte, over 4 connections", async () => {
    await run("nbdcopy", ["--connections=4", "--flush", source, `nbd://${address}/disk`]);
    const back = join(dir, "back.img");
    await run("nbdcopy", ["--connections=4", `nbd://${address}/disk`, back]);
    expect(readFileSync(back).equals(readFileSync(source))).toBe(true);
    expect((await fileDisk.read(0, 32 * MiB)).equals(readFileSync(source))).toBe(true);
  });
});

describe("qemu", () => {
  withTools("qemu-io")("passes qemu-io aio write/read pattern, zero and discard checks", async () => {
    const uri = `nbd://${address}/mem`;
    const { stdout } = await run("qemu-io", [
      "-f",
      "raw",
      uri,
      ...["-c", "aio_write -P 0x5a 0 1M", "-c", "aio_write -P 0xa5 2M 512k", "-c", "aio_flush"],
      ...["-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 2M 512k"],
      ...["-c", "write -z 256k 64k", "-c", "read -P 0 256k 64k", "-c", "read -P 0x5a 320k 64k"],
      ...["-c", "discard 2M 512k", "-c", "write -P 0x11 4M 4k", "-c", "read -P 0x11 4M 4k"],
      ...["-c", "aio_read -P 0x5a 0 256k", "-c", "aio_flush"],
    ]);
    expect(stdout).not.toMatch(/verification failed|error|fail/i);
    expect((await memDisk.read(0, 4096)).every((b) => b === 0x5a)).toBe(true);
    expect((await memDisk.read(256 * 1024, 65536)).every((b) => b === 0)).toBe(true);
  });

  withTools("qemu-img")("converts onto the export and compares equal", async () => {
    await run("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, `nbd://${address}/disk`]);
    await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, `nbd://${address}/disk`]);
    const other = join(dir, "other.img");
    writeFileSync(other, randomBytes(32 * MiB));
    await expect(
      run("qemu-img", ["compare", "-f", "raw", "-F", "raw", other, `nbd://${address}/disk`]),
    ).rejects.toThrow();
  });
});

describe("nbdsh", () => {
  withTools("nbdsh", "/usr/bin/python3")(
    "gets the spec's errors for odd requests and keeps the connection",
    async () => {
      const script = `
import errno
h.set_strict_mode(0)
def fails(f, code):
    try:
        f()
    except nbd.Error as e:
        got = e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)
        assert got == code, (e.errno, code, e.string)
        return
    raise AssertionError("no error")
size = h.get_size()
fails(lambda: h.pread(512, size - 256), errno.EINVAL)
fails(lambda: h.pwrite(b"x" * 512, size), errno.ENOSPC)
fails(lambda: h.zero(512, size), errno.ENOSPC)
fails(lambda: h.trim(512, size), errno.EINVAL)
fails(lambda: h.pread(512, 0, 0x8000), errno.EINVAL)
h.pwrite(b"\\x01" * 4096, 0)
fails(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP)
assert h.pread(4096, 0) == b"\\x01" * 4096
h.zero(8192, 0, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 0) == bytes(8192)
h.flush()
h.cache(4096, 0)
buf = h.pread_structured(8192, 0, lambda *a: 0, nbd.CMD_FLAG_DF)
assert buf == bytes(8192)
seen = []
h.block_status(3 * 1024 * 1024, 0, lambda ctx, off, ents, err: seen.append((ctx, list(ents))) or 0)
assert ("udm:odd-megabytes", [1048576, 0, 1048576, 1, 1048576, 0]) in seen, seen
print("OK")
`;
      const uri = `nbd://${address}/mem`;
      const { stdout } = await run("nbdsh", [
        "--opt-mode",
        "-u",
        uri,
        "-c",
        "h.add_meta_context('base:allocation'); h.add_meta_context('udm:odd-megabytes'); h.opt_go()",
        "-c",
        script,
      ]);
      expect(stdout.trim()).toBe("OK");
      const ro = `
import errno
h.set_strict_mode(0)
for f in (lambda: h.pwrite(b"x", 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        f(); raise AssertionError("write allowed")
    except nbd.Error as e:
        assert e.errno in (errno.EPERM, "EPERM"), e.errno
print("OK")
`;
      expect((await run("nbdsh", ["-u", `nbd://${address}/ro`, "-c", ro])).stdout.trim()).toBe("OK");
    },
  );
});

describe("fio", () => {
  withTools("fio")("random read/write at queue depth 16 verifies", async () => {
    const { stdout } = await run("fio", [
      "--name=verify",
      "--ioengine=nbd",
      `--uri=nbd://${address}/disk`,
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=16",
      "--size=8M",
      "--verify=crc32c",
      "--do_verify=1",
      "--verify_state_save=0", // no state file left in the working directory
      "--output-format=json",
    ]);
    const json = JSON.parse(stdout.slice(stdout.indexOf("{")));
    const job = json.jobs[0];
    expect(job.error).toBe(0);
    expect(job.write.total_ios).toBe(2048);
    expect(job.read.total_ios).toBe(2048); // the verify pass read every block back
  });
});

describe("NbdDevice against other servers", () => {
  async function startServer(cmd: string, args: string[], socket: string): Promise<void> {
    const child = spawn(cmd, args, { stdio: "ignore" });
    children.push(child);
    for (let i = 0; i < 200 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 25));
    if (!existsSync(socket)) throw new Error(`${cmd} did not create ${socket}`);
  }

  async function exercise(uri: string): Promise<void> {
    const dev = await NbdDevice.connect(uri);
    try {
      const data = randomBytes(3 * MiB + 512);
      await dev.write(4096, data, { fua: true });
      expect((await dev.read(4096, data.length)).equals(data)).toBe(true);
      await dev.writeZeroes(4096, MiB);
      expect((await dev.read(4096, MiB)).every((b) => b === 0)).toBe(true);
      await dev.discard(8 * MiB, MiB);
      await dev.flush();
      const extents = await dev.extents(0, 16 * MiB);
      expect(extents.reduce((n, e) => n + e.lengthBytes, 0)).toBe(16 * MiB);
      expect(
        await Promise.all(Array.from({ length: 32 }, (_, i) => dev.read(i * 65536, 65536))),
      ).toHaveLength(32);
    } finally {
      await dev.close();
    }
  }

  withTools("nbdkit")("works against nbdkit memory, with and without structured replies", async () => {
    const sock = join(dir, "nbdkit.sock");
    await startServer("nbdkit", ["-f", "-U", sock, "memory", "16M"], sock);
    await exercise(`nbd+unix:///?socket=${sock}`);
    const simple = join(dir, "nbdkit-nosr.sock");
    await startServer("nbdkit", ["-f", "--no-sr", "-U", simple, "memory", "16M"], simple);
    const dev = await NbdDevice.connect(`nbd+unix:///?socket=${simple}`);
    expect(dev.structuredReplies).toBe(false);
    await dev.close();
    await exercise(`nbd+unix:///?socket=${simple}`);
  });

  withTools("qemu-nbd")("works against qemu-nbd", async () => {
    const img = join(dir, "qemu.img");
    writeFileSync(img, Buffer.alloc(0));
    rmSync(img);
    spawnSync("truncate", ["-s", "16M", img]);
    const sock = join(dir, "qemu.sock");
    await startServer("qemu-nbd", ["-f", "raw", "-k", sock, "-x", "q", "-t", "--discard=unmap", img], sock);
    await exercise(`nbd+unix:///q?socket=${sock}`);
  });
});
