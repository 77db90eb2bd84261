/**
 * Issue 19 items 1 and 2, the mirror's side: a reload builds the new mirror while the old one
 * keeps serving, hands over at preresume (after the suspend), and a failed reload leaves the old
 * mirror exactly as it was.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SECTOR_SIZE } from "@udm/kcopyd";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, test } from "vitest";
import { DeviceManager, type TableRequest } from "./device-manager.js";
import { parseDeviceTable } from "./table-parser.js";
import { allTargets } from "./targets.js";

const log = pino({ level: "silent" });
const SIZE = 32 * 2 ** 20;
const SECTORS = SIZE / SECTOR_SIZE;
let dir: string;
let manager: DeviceManager;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "udm-mirror-reload-"));
  manager = new DeviceManager({ targets: allTargets(), log });
  for (const f of ["a.img", "b.img", "lin.img"]) writeFileSync(join(dir, f), Buffer.alloc(SIZE));
  writeFileSync(join(dir, "m.log"), Buffer.alloc(2 ** 20));
});

afterEach(async () => {
  await manager.closeAll();
  rmSync(dir, { recursive: true, force: true });
});

function request(name: string, ...lines: string[]): TableRequest {
  return { table: parseDeviceTable(name, lines.join("\n"), "--table", manager.registry), baseDir: dir };
}

const MIRROR = `0 ${SECTORS} mirror disk 2 m.log 1024 2 a.img 0 b.img 0`;

describe("reloading a mirror", () => {
  test("a client writing through four reloads of the same table sees no error and no wrong byte", async () => {
    await manager.create([request("m", MIRROR)]);
    const dev = manager.device("m");
    const model = Buffer.alloc(SIZE);
    const CHUNK = 64 * 1024;
    let stop = false;
    let writes = 0;
    const failures: string[] = [];
    const writer = (async () => {
      for (let i = 0; !stop; i++) {
        const offset = ((i * 7919) % (SIZE / CHUNK)) * CHUNK;
        const data = Buffer.alloc(CHUNK, 1 + (i % 250));
        try {
          await dev.write(offset, data);
          data.copy(model, offset);
        } catch (err) {
          failures.push((err as Error).message);
          await new Promise((resolve) => setImmediate(resolve)); // a failing write must not starve the reload
        } finally {
          writes++;
        }
      }
    })();
    for (let r = 0; r < 4; r++) {
      while (writes < (r + 1) * 20) await new Promise((resolve) => setImmediate(resolve));
      await manager.reload("m", request("m", MIRROR));
    }
    stop = true;
    await writer;
    expect(failures).toEqual([]);
    expect((await manager.device("m").read(0, SIZE)).equals(model)).toBe(true);
  });

  test("a reload that fails on a later segment leaves the old mirror serving, exactly as it was", async () => {
    const half = SECTORS / 2;
    // Blank legs: nosync at the first activation (a reload with it keeps the log's state).
    const mirror = `0 ${half} mirror disk 3 m.log 1024 nosync 2 a.img 0 b.img 0`;
    await manager.create([request("m2", mirror, `${half} ${half} linear lin.img 0`)]);
    await manager.device("m2").write(0, Buffer.alloc(4096, 1));
    await expect(
      manager.reload("m2", request("m2", mirror, `${half} ${half} linear /nonexist/x.img 0`)),
    ).rejects.toThrow(/nonexist/);
    expect(manager.device("m2").state).toBe("active");
    await manager.device("m2").write(0, Buffer.alloc(4096, 2));
    expect((await manager.device("m2").read(0, 4096)).equals(Buffer.alloc(4096, 2))).toBe(true);
    // Still in sync, both legs healthy, its log device fine: nothing was detached or failed.
    expect(manager.status("m2")[0]!.args).toMatch(/ 32\/32 1 AA 3 disk \S+ A$/);
  });
});
