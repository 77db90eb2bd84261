import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type BlockDevice, FileDevice, KcopydClient, type TargetContext } from "@udm/kcopyd";
import { describe, expect, it } from "vitest";
import { inspectCow } from "./cow-format.js";
import type { MergeDevice } from "./merge-device.js";
import type { OriginDevice } from "./origin-device.js";
import type { SnapshotDevice } from "./snapshot-device.js";
import { snapshotMergeTarget, snapshotOriginTarget, snapshotTarget } from "./targets.js";

/** dm's create: the table is loaded, then resumed (its preresume takes a live snapshot over). */
async function loadMerge(args: string[], size: number, ctx: TargetContext): Promise<MergeDevice> {
  const m = (await snapshotMergeTarget.create(args, size, ctx)) as MergeDevice;
  await m.preresume?.();
  return m;
}

const SUPPORT = fileURLToPath(new URL("../test-support/", import.meta.url));
const SIZE = 4 * 1024 * 1024;

/** Runs crash-child.mjs until it printed `progress N` with N >= `atLeast`, then kill -9. */
async function runAndKill(mode: "copy" | "merge", dir: string, atLeast: number): Promise<number> {
  const child = spawn(
    process.execPath,
    ["--import", join(SUPPORT, "ts-register.mjs"), join(SUPPORT, "crash-child.mjs"), mode, dir, String(SIZE)],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr += d;
  });
  const exited = new Promise<void>((resolve) => child.on("exit", () => resolve()));
  const reached = await new Promise<number>((resolve, reject) => {
    let buffered = "";
    child.stdout.on("data", (d: Buffer) => {
      buffered += d.toString();
      const lines = buffered.split("\n");
      buffered = lines.pop()!;
      for (const line of lines) {
        const n = Number(/^progress (\d+)$/.exec(line)?.[1]);
        if (n >= atLeast) resolve(n);
      }
    });
    child.on("exit", (code) =>
      reject(new Error(`child exited (${code}) before progress ${atLeast}: ${stderr}`)),
    );
  });
  child.kill("SIGKILL");
  await exited;
  return reached;
}

async function openFiles(dir: string) {
  const originPath = join(dir, "origin.img");
  const cowPath = join(dir, "cow.img");
  const devices: Record<string, BlockDevice> = {
    [originPath]: await FileDevice.open(originPath),
    [cowPath]: await FileDevice.open(cowPath),
  };
  const ctx: TargetContext = { openDevice: async (spec) => devices[spec]!, kcopyd: new KcopydClient() };
  const close = async () => {
    for (const dev of Object.values(devices)) await dev.close();
  };
  return { originPath, cowPath, ctx, close };
}

describe("kill -9", () => {
  it("in the middle of copy-outs: the reopened snapshot still shows the origin as it was", async () => {
    const dir = await mkdtemp(join(tmpdir(), "udm-snap-kill-"));
    try {
      const initial = randomBytes(SIZE);
      await writeFile(join(dir, "origin.img"), initial);
      await writeFile(join(dir, "cow.img"), "");
      await truncate(join(dir, "cow.img"), 2 * SIZE);
      await runAndKill("copy", dir, 60);
      const files = await openFiles(dir);
      const s = (await snapshotTarget.create(
        [files.originPath, files.cowPath, "P", "8"],
        SIZE,
        files.ctx,
      )) as SnapshotDevice;
      expect(s.status()).toMatch(/^\d+\/\d+ \d+$/);
      expect(
        (await inspectCow((await files.ctx.openDevice(files.cowPath)) as BlockDevice)).exceptions.length,
      ).toBeGreaterThan(0);
      expect((await s.read(0, SIZE)).equals(initial)).toBe(true);
      await s.close();
      await files.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("in the middle of a merge: the merge resumes and the origin ends equal to the snapshot", async () => {
    const dir = await mkdtemp(join(tmpdir(), "udm-snap-kill-"));
    try {
      await writeFile(join(dir, "origin.img"), randomBytes(SIZE));
      await writeFile(join(dir, "cow.img"), "");
      await truncate(join(dir, "cow.img"), 2 * SIZE);
      const files = await openFiles(dir);
      const o = (await snapshotOriginTarget.create([files.originPath], SIZE, files.ctx)) as OriginDevice;
      const s = (await snapshotTarget.create(
        [files.originPath, files.cowPath, "P", "8"],
        SIZE,
        files.ctx,
      )) as SnapshotDevice;
      // Scattered changes, written 16 at a time so their commits are batched.
      for (let i = 0; i < 160; i += 16) {
        await Promise.all(
          Array.from({ length: 16 }, (_, k) =>
            o.write(((i + k) * 104_729) % (SIZE - 5000), randomBytes(5000)),
          ),
        );
        await s.write((i * 7919) % (SIZE - 3000), randomBytes(3000));
      }
      const snapView = await s.read(0, SIZE);
      await s.close();
      await files.close();
      const probe = await FileDevice.open(join(dir, "cow.img"), { readOnly: true });
      const before = (await inspectCow(probe)).exceptions.length;
      await probe.close();
      await runAndKill("merge", dir, 1);
      const again = await openFiles(dir);
      // Killed between the first merged batch and the last one.
      const left = (await inspectCow(await again.ctx.openDevice(again.cowPath))).exceptions.length;
      expect(left, `killed after the merge finished (${before} exceptions before)`).toBeGreaterThan(0);
      expect(left, "killed before any merged batch was committed").toBeLessThan(before);
      const m = (await loadMerge(
        [again.originPath, again.cowPath, "P", "0"],
        SIZE,
        again.ctx,
      )) as MergeDevice;
      expect((await m.read(0, SIZE)).equals(snapView)).toBe(true);
      await m.whenMerged();
      const origin = await again.ctx.openDevice(again.originPath);
      expect((await origin.read(0, SIZE)).equals(snapView)).toBe(true);
      await m.close();
      await again.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
