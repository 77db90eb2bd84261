import { linkSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SECTOR_SIZE } from "@udm/kcopyd";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, test } from "vitest";
import { DeviceManager } from "./device-manager.js";
import { DevicePool } from "./device-pool.js";
import { parseTableFile } from "./table-parser.js";
import { allTargets } from "./targets.js";

let dir: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "udm-pool-"));
});

afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe("DevicePool: one device per underlying file", () => {
  test("a path, a symlink to it and a hard link yield one BlockDevice; it closes after the last hold", async () => {
    const path = join(dir, "a.img");
    writeFileSync(path, Buffer.alloc(64 * SECTOR_SIZE));
    symlinkSync(path, join(dir, "sym.img"));
    linkSync(path, join(dir, "hard.img"));
    const pool = new DevicePool();
    const a = await pool.acquire(path);
    const sym = await pool.acquire(join(dir, "sym.img"));
    const hard = await pool.acquire(join(dir, "hard.img"));
    expect(sym).toBe(a);
    expect(hard).toBe(a);
    expect(pool.refs(path)).toBe(3);
    expect(pool.refs(join(dir, "sym.img"))).toBe(3);
    expect(pool.held()).toEqual([{ spec: path, refs: 3 }]);
    await pool.release(join(dir, "sym.img"));
    await pool.release(path);
    expect(pool.refs(join(dir, "hard.img"))).toBe(1);
    await a.write(0, Buffer.from("still open"));
    await pool.release(join(dir, "hard.img"));
    expect(pool.refs(path)).toBe(0);
    await expect(a.read(0, 512)).rejects.toThrow();
    await expect(pool.release(path)).rejects.toThrow(/is not held/);
  });

  test("a file created by the open is pooled under what it is: a later symlink to it shares it", async () => {
    const pool = new DevicePool();
    const path = join(dir, "new.img");
    const created = await pool.acquire(path, { createSizeBytes: 1 << 20 });
    symlinkSync(path, join(dir, "later.img"));
    expect(await pool.acquire(join(dir, "later.img"))).toBe(created);
    await pool.release(path);
    await pool.release(join(dir, "later.img"));
    expect(pool.held()).toEqual([]);
  });
});

describe("snapshot of an origin named through another path", () => {
  test.each([
    ["a symlink", (target: string, alias: string) => symlinkSync(target, alias)],
    ["a hard link", (target: string, alias: string) => linkSync(target, alias)],
  ])("via %s, an origin write still copies the old chunk out first", async (_how, makeAlias) => {
    const size = 1 << 20;
    const initial = Buffer.alloc(size, 0x11);
    writeFileSync(join(dir, "origin.img"), initial);
    writeFileSync(join(dir, "snap.cow"), Buffer.alloc(size * 2));
    makeAlias(join(dir, "origin.img"), join(dir, "originlink.img"));
    const manager = new DeviceManager({ targets: allTargets(), log: pino({ level: "silent" }) });
    try {
      const text = `origin: 0 ${size / SECTOR_SIZE} snapshot-origin origin.img\nsnap: 0 ${size / SECTOR_SIZE} snapshot originlink.img snap.cow P 8\n`;
      await manager.create(
        parseTableFile(text, "test.table", manager.registry).map((table) => ({ table, baseDir: dir })),
      );
      await manager.device("origin").write(0, Buffer.alloc(4096, 0xaa));
      expect((await manager.device("snap").read(0, size)).equals(initial)).toBe(true);
      expect((await manager.device("origin").read(0, 4096)).equals(Buffer.alloc(4096, 0xaa))).toBe(true);
    } finally {
      await manager.closeAll();
    }
  });
});
