import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, test } from "vitest";
import { DeviceManager } from "./device-manager.js";
import { MetadataRecord, MetadataRecordError, parseRecord } from "./metadata-record.js";
import { startFromRecord } from "./metadata-start.js";
import { parseTableFile } from "./table-parser.js";
import { allTargets } from "./targets.js";

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "udm-meta-"));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const state = (n: number) => ({ devices: [{ name: `d${n}`, lines: [`0 ${n * 8} zero`], baseDir: "/srv" }] });

describe("MetadataRecord", () => {
  test("versions get increasing sequence numbers; the replaced ones are archived (the last `keep`)", async () => {
    const path = join(dir, "udm.meta.json");
    const record = new MetadataRecord(path, { keep: 3 });
    expect(record.read()).toBe(null);
    for (let n = 1; n <= 6; n++) expect(await record.write(state(n))).toBe(n);
    expect(record.read()).toMatchObject({ seqno: 6, state: state(6) });
    expect(record.archived().map((p) => p.slice(-8))).toEqual(["00000005", "00000004", "00000003"]);
    expect(parseRecord(readFileSync(record.archived()[0]!, "utf8"))).toMatchObject({
      seqno: 5,
      state: state(5),
    });
    // A new process (a new MetadataRecord) goes on from the file's sequence number.
    expect(await new MetadataRecord(path, { keep: 3 }).write(state(7))).toBe(7);
  });

  test("a damaged or half-written record is refused, naming the file and the newest valid backup", async () => {
    const path = join(dir, "udm.meta.json");
    const record = new MetadataRecord(path);
    await record.write(state(1));
    await record.write(state(2));
    const text = readFileSync(path, "utf8");
    writeFileSync(path, text.slice(0, text.length / 2)); // half-written
    expect(() => new MetadataRecord(path).read()).toThrow(MetadataRecordError);
    expect(() => new MetadataRecord(path).read()).toThrow(
      new RegExp(
        `^metadata record ${path} is unusable \\(not JSON, a half-written file\\?.*\\): the newest valid backup is ${path}\\.archive/udm\\.meta\\.json\\.00000001 \\(seqno 1\\); copy it over ${path} to start from it$`,
      ),
    );
    writeFileSync(path, text.replace('"d2"', '"dX"')); // changed behind udm's back
    expect(() => new MetadataRecord(path).read()).toThrow(
      /checksum mismatch: the file was changed or damaged/,
    );
    rmSync(`${path}.archive`, { recursive: true });
    expect(() => new MetadataRecord(path).read()).toThrow(
      /no valid backup in .*udm\.meta\.json\.archive; move/,
    );
  });
});

describe("startFromRecord", () => {
  const log = pino({ level: "silent" });
  const managers: DeviceManager[] = [];
  afterEach(async () => {
    for (const m of managers.splice(0)) await m.closeAll().catch(() => undefined);
  });
  function server(recordPath: string) {
    const record = new MetadataRecord(recordPath);
    const manager = new DeviceManager({ targets: allTargets(), log, record: (s) => record.write(s) });
    managers.push(manager);
    return { record, manager };
  }
  const start = (s: ReturnType<typeof server>, tableText: string) =>
    startFromRecord(
      s.manager,
      s.record,
      {
        tableFile: join(dir, "t.table"),
        tableText,
        requests: parseTableFile(tableText, "t.table", s.manager.registry).map((table) => ({
          table,
          baseDir: dir,
        })),
      },
      log,
    );

  test("a restart runs what the record says (a runtime snapshot included); an edited table file wins; a damaged record starts nothing", async () => {
    writeFileSync(join(dir, "o.img"), Buffer.alloc(256 * 512));
    const path = join(dir, "udm.meta.json");
    const table = "o: 0 256 snapshot-origin o.img\n";
    const first = server(path);
    expect(await start(first, table)).toEqual({ from: "table", seqno: 0 });
    await first.manager.device("o").write(0, Buffer.alloc(4096, 0xa1));
    await first.manager.snapshotCreate("o", "s", {
      cow: join(dir, "s.cow"),
      createSizeBytes: 1 << 20,
      chunkSectors: 8,
      persistent: true,
      overflowOk: false,
    });
    await first.manager.device("o").write(0, Buffer.alloc(4096, 0xb2)); // s keeps 0xa1
    await first.manager.device("o").flush();
    expect(first.record.read()?.seqno).toBe(2);
    await first.manager.closeAll();

    const second = server(path);
    expect(await start(second, table)).toEqual({ from: "record", seqno: 2 });
    expect(second.manager.names()).toEqual(["o", "s"]);
    expect((await second.manager.device("s").read(0, 4096)).equals(Buffer.alloc(4096, 0xa1))).toBe(true);
    expect((await second.manager.device("o").read(0, 4096)).equals(Buffer.alloc(4096, 0xb2))).toBe(true);
    await second.manager.closeAll();

    const edited = server(path);
    expect(await start(edited, `${table}z: 0 8 zero\n`)).toEqual({ from: "table", seqno: 3 });
    expect(edited.manager.names()).toEqual(["o", "z"]);
    await edited.manager.closeAll();

    writeFileSync(path, "{");
    const damaged = server(path);
    await expect(start(damaged, table)).rejects.toThrow(
      /^metadata record .*udm\.meta\.json is unusable \(not JSON.*\): the newest valid backup is .*udm\.meta\.json\.00000003 \(seqno 3\)/,
    );
    expect(damaged.manager.names()).toEqual([]);
  });
});
