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

test("kill -9 during a write storm: after restart only dirty regions resync, legs are identical, flushed writes are there", async () => {
  const dir = mkdtempSync(join(tmpdir(), "udm-mirror-kill-"));
  try {
    const first = await openMirror(dir, "disk 3 log 128 nosync 2 a 0 b 0");
    await first.mirror.close();
    for (const f of Object.values(first.files)) await f.close();

    const child = spawn(
      process.execPath,
      ["--import", support("ts-register.mjs"), support("kill-writer.mjs"), dir],
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
          if (++flushes === 5) {
            clearTimeout(timer);
            child.kill("SIGKILL"); // by PID: this child only
            resolve();
          }
        }
      });
      child.on("exit", (code) => {
        if (flushes < 5) reject(new Error(`writer exited (${code}) early: ${stderr}`));
      });
    });
    await exited;
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
