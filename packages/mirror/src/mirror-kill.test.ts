import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FileDevice, KcopydClient } from "@udm/kcopyd";
import { expect, test } from "vitest";
import { inspectDiskLog, type MirrorDevice, mirrorTarget } from "./index.js";

const SIZE = 16 * 2 ** 20;
const BLOCK = 4096;
const support = (name: string) => fileURLToPath(new URL(`../test-support/${name}`, import.meta.url));

async function openMirror(dir: string, line: string) {
  const files = {
    a: await FileDevice.open(join(dir, "a.img"), { createSizeBytes: SIZE }),
    b: await FileDevice.open(join(dir, "b.img"), { createSizeBytes: SIZE }),
    log: await FileDevice.open(join(dir, "log.img"), { createSizeBytes: 2 ** 20 }),
  };
  const mirror = (await mirrorTarget.create(line.split(" "), SIZE, {
    kcopyd: new KcopydClient(),
    openDevice: async (spec) => files[spec as keyof typeof files],
  })) as MirrorDevice;
  return { files, mirror };
}

/**
 * Runs kill-writer.mjs on DIR until it printed `flushes` completed flushes, then SIGKILLs it (by
 * PID). Returns, per block, the highest value a completed flush made durable.
 */
async function storm(dir: string, firstSeq: number, flushesBeforeKill: number): Promise<Map<number, number>> {
  const child = spawn(
    process.execPath,
    ["--import", support("ts-register.mjs"), support("kill-writer.mjs"), dir, String(firstSeq)],
    {
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr += d;
  });
  const durable = new Map<number, number>();
  let flushes = 0;
  const exited = new Promise<void>((resolve) => child.on("exit", () => resolve()));
  await new Promise<void>((resolve, reject) => {
    let buffered = "";
    const timer = setTimeout(() => reject(new Error(`writer made no progress: ${stderr}`)), 30_000);
    child.stdout.on("data", (d: Buffer) => {
      buffered += d.toString();
      const lines = buffered.split("\n");
      buffered = lines.pop()!;
      for (const line of lines) {
        if (!line.startsWith("F ")) continue;
        for (const pair of line.slice(2).split(",").filter(Boolean)) {
          const [b, n] = pair.split(":").map(Number) as [number, number];
          durable.set(b, Math.max(durable.get(b) ?? 0, n));
        }
        if (++flushes === flushesBeforeKill) {
          clearTimeout(timer);
          child.kill("SIGKILL"); // by PID: this child only
          resolve();
        }
      }
    });
    child.on("exit", (code) => {
      if (flushes < flushesBeforeKill) reject(new Error(`writer exited (${code}) early: ${stderr}`));
    });
  });
  await exited;
  return durable;
}

test("kill -9 during a write storm: after restart only dirty regions resync, legs are identical, flushed writes are there", async () => {
  const dir = mkdtempSync(join(tmpdir(), "udm-mirror-kill-"));
  try {
    const first = await openMirror(dir, "disk 3 log 128 nosync 2 a 0 b 0");
    await first.mirror.close();
    for (const f of Object.values(first.files)) await f.close();

    const durable = await storm(dir, 0, 5);
    expect(durable.size).toBeGreaterThan(0);

    const log = await FileDevice.open(join(dir, "log.img"));
    const before = await inspectDiskLog(log);
    await log.close();
    expect(before.cleanRegions).toBeLessThan(before.regionCount); // killed mid-storm: dirty regions
    const { files, mirror } = await openMirror(dir, "disk 2 log 128 2 a 0 b 0");
    await mirror.waitForSync();
    expect(mirror.resyncedRegions).toBe(before.regionCount - before.cleanRegions);
    const a = await files.a.read(0, SIZE);
    expect(a.equals(await files.b.read(0, SIZE))).toBe(true);
    for (const [block, n] of durable) {
      const data = a.subarray(block * BLOCK, (block + 1) * BLOCK);
      const value = data.readUInt32LE(0);
      expect(value).toBeGreaterThanOrEqual(n);
      expect(data.equals(Buffer.alloc(BLOCK).fill(data.subarray(0, 4)))).toBe(true);
    }
    await mirror.close();
    for (const f of Object.values(files)) await f.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("kill -9 again right after a restart on a dirty log (resync and writes racing): legs end identical, flushed writes of both runs are there", async () => {
  const dir = mkdtempSync(join(tmpdir(), "udm-mirror-kill2-"));
  try {
    const first = await openMirror(dir, "disk 3 log 128 nosync 2 a 0 b 0");
    await first.mirror.close();
    for (const f of Object.values(first.files)) await f.close();
    const durable = await storm(dir, 0, 2);
    // The second writer opens the dirty log: the resync runs while it writes, and it is killed
    // right after its first completed flush.
    const second = await storm(dir, 1_000_000_000, 1);
    for (const [b, n] of second) durable.set(b, Math.max(durable.get(b) ?? 0, n));
    const log = await FileDevice.open(join(dir, "log.img"));
    const before = await inspectDiskLog(log);
    await log.close();
    const { files, mirror } = await openMirror(dir, "disk 2 log 128 2 a 0 b 0");
    await mirror.waitForSync();
    expect(mirror.resyncedRegions).toBe(before.regionCount - before.cleanRegions);
    const a = await files.a.read(0, SIZE);
    expect(a.equals(await files.b.read(0, SIZE))).toBe(true);
    for (const [block, n] of durable) {
      const data = a.subarray(block * BLOCK, (block + 1) * BLOCK);
      expect(data.readUInt32LE(0), `block ${block}`).toBeGreaterThanOrEqual(n);
      expect(data.equals(Buffer.alloc(BLOCK).fill(data.subarray(0, 4)))).toBe(true);
    }
    await mirror.close();
    for (const f of Object.values(files)) await f.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
