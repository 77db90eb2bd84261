/**
 * The metadata record survives a kill -9 at every step of a write (issue 15): a process killed
 * by `UDM_CRASH_AT=record:<step>` leaves either the old version or the new one, whole, and the
 * next write goes on from there.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import {
  allTargets,
  createLogger,
  DeviceManager,
  MetadataRecord,
  parseTableFile,
  RECORD_STEPS,
  startFromRecord,
} from "@udm/cli";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, ROOT } from "./cli-helpers.js";

let dir: string;
const state = (n: number) => ({
  devices: [{ name: "lin", lines: [`0 ${n * 8} linear a.img 0`], baseDir: "/srv" }],
});

beforeAll(() => {
  buildCli(); // the child imports the built module
  dir = mkdtempSync(join(tmpdir(), "udm-meta-crash-"));
}, 300_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Writes `state(n)` to the record at `path` in a child process that dies after `step`. */
function writeAndDie(path: string, n: number, step: string) {
  const module = pathToFileURL(join(ROOT, "packages/cli/dist/metadata-record.js")).href;
  const script = `import { MetadataRecord } from ${JSON.stringify(module)};
await new MetadataRecord(${JSON.stringify(path)}).write(${JSON.stringify(state(n))});`;
  return spawnSync(process.execPath, ["--input-type=module", "-e", script], {
    env: { ...process.env, UDM_CRASH_AT: `record:${step}` },
    encoding: "utf8",
    timeout: 30_000,
  });
}

describe("metadata record crash points", () => {
  test.each(RECORD_STEPS.map((step, i) => [step, i] as const))(
    "kill -9 after %s: the record is the old or the new version, whole; the next write continues",
    async (step, i) => {
      const path = join(dir, `${step}.meta.json`);
      await new MetadataRecord(path).write(state(1));
      const child = writeAndDie(path, 2, step);
      expect(child.stderr).toBe("");
      expect(child.signal).toBe("SIGKILL");
      const renamed = i >= RECORD_STEPS.indexOf("renamed");
      const after = new MetadataRecord(path).read();
      expect(after).toMatchObject(renamed ? { seqno: 2, state: state(2) } : { seqno: 1, state: state(1) });
      const record = new MetadataRecord(path);
      expect(await record.write(state(3))).toBe(renamed ? 3 : 2);
      expect(record.read()).toMatchObject({ state: state(3) });
      // Version 1 is archived whatever happened; the dead writer's temp file is gone.
      expect(readdirSync(`${path}.archive`)).toContain(`${step}.meta.json.00000001`);
      expect(readdirSync(dir).filter((f) => f.startsWith(`.${step}.`))).toEqual([]);
    },
  );
});

const CHUNK = 4096;
const TABLE = "o: 0 2048 snapshot-origin o.img\n";

/**
 * A udm server's device manager in a child process: starts from the record (or TABLE), sets up
 * what `command` needs, then runs it with `UDM_CRASH_AT=crash` (dies there with SIGKILL).
 */
function runServerAndDie(dir: string, command: string, crash: string) {
  const cli = pathToFileURL(join(ROOT, "packages/cli/dist/index.js")).href;
  const script = `
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { DeviceManager, MetadataRecord, allTargets, parseTableFile, startFromRecord } from ${JSON.stringify(cli)};
const dir = ${JSON.stringify(dir)};
const quiet = { debug() {}, info() {}, warn() {}, error() {}, child() { return quiet; } };
const record = new MetadataRecord(join(dir, "udm.meta.json"));
const m = new DeviceManager({ targets: allTargets(), log: quiet, record: (s) => record.write(s) });
const table = ${JSON.stringify(TABLE)};
const req = (text) => parseTableFile(text, "t.table", m.registry).map((table) => ({ table, baseDir: dir }));
await startFromRecord(m, record, { tableFile: join(dir, "t.table"), tableText: table, requests: req(table) }, quiet);
const fill = (v) => Buffer.alloc(${CHUNK}, v);
const snap = () => m.snapshotCreate("o", "s", { cow: join(dir, "s.cow"), createSizeBytes: 1 << 20, chunkSectors: 8, persistent: true, overflowOk: false });
const command = ${JSON.stringify(command)};
if (command === "remove" || command === "reload") await m.create(req("z: 0 2048 linear z.img 0\\n"));
if (command === "snapshot-merge" || command === "merged") {
  await snap();
  await m.device("o").write(0, fill(0xbb)); // s keeps 0xaa
  await m.device("o").flush();
}
process.env.UDM_CRASH_AT = ${JSON.stringify(crash)};
if (command === "create") await m.create(req("z: 0 2048 linear z.img 0\\n"));
if (command === "remove") await m.remove("z");
if (command === "reload") await m.reload("z", req("z: 0 2048 linear z2.img 0\\n")[0]);
if (command === "snapshot-create") await snap();
if (command === "rename") await m.rename("o", "p");
if (command === "snapshot-merge" || command === "merged") {
  await m.snapshotMerge("s");
  while (m.has("s")) await new Promise((r) => setTimeout(r, 10));
}
process.stdout.write("no crash\\n");
process.exit(0);
`;
  return spawnSync(process.execPath, ["--input-type=module", "-e", script], {
    cwd: dir,
    encoding: "utf8",
    timeout: 60_000,
  });
}

const commandSteps: Array<[string, string, boolean]> = [
  ["create", "built", false],
  ["create", "recorded", true],
  ["remove", "built", false],
  ["remove", "recorded", true],
  ["reload", "built", false],
  ["reload", "recorded", true],
  ["snapshot-create", "cow-zeroed", false],
  ["snapshot-create", "built", false],
  ["snapshot-create", "recorded", true],
  ["snapshot-merge", "built", false],
  ["snapshot-merge", "recorded", true],
  ["merged", "built", true],
  ["merged", "recorded", true],
  ["rename", "built", false],
  ["rename", "recorded", true],
];

describe("command crash points: kill -9 at each step, then a restart from the record", () => {
  test.each(commandSteps)(
    "%s killed after %s: after the restart the command is done: %s, and the data agrees",
    async (command, step, happened) => {
      const sub = mkdtempSync(join(dir, `${command}-${step}-`));
      writeFileSync(join(sub, "o.img"), Buffer.alloc(1 << 20, 0xaa));
      writeFileSync(join(sub, "z.img"), Buffer.alloc(1 << 20, 1));
      writeFileSync(join(sub, "z2.img"), Buffer.alloc(1 << 20, 2));
      const child = runServerAndDie(sub, command, `${command === "merged" ? "merged" : command}:${step}`);
      expect(child.stderr).toBe("");
      expect(child.signal).toBe("SIGKILL");

      const log = createLogger("silent");
      const record = new MetadataRecord(join(sub, "udm.meta.json"));
      const m = new DeviceManager({ targets: allTargets(), log, record: (s) => record.write(s) });
      try {
        const requests = parseTableFile(TABLE, "t.table", m.registry).map((table) => ({
          table,
          baseDir: sub,
        }));
        expect(
          await startFromRecord(
            m,
            record,
            { tableFile: join(sub, "t.table"), tableText: TABLE, requests },
            log,
          ),
        ).toMatchObject({ from: "record" });
        const read = async (name: string) => (await m.device(name).read(0, CHUNK))[0];
        if (command === "create") expect(m.has("z")).toBe(happened);
        if (command === "rename") {
          expect(m.names()).toEqual([happened ? "p" : "o"]);
          expect(await read(happened ? "p" : "o")).toBe(0xaa);
        }
        if (command === "remove") expect(m.has("z")).toBe(!happened);
        if (command === "reload") {
          expect(m.table("z")[0]!.args).toBe(`${join(sub, happened ? "z2.img" : "z.img")} 0`);
          expect(await read("z")).toBe(happened ? 2 : 1);
        }
        if (command === "snapshot-create") {
          expect(m.has("s")).toBe(happened);
          if (happened) {
            await m.device("o").write(0, Buffer.alloc(CHUNK, 0xcc));
            expect(await read("s")).toBe(0xaa);
          }
          expect(await read("o")).toBe(happened ? 0xcc : 0xaa);
        }
        if (command === "snapshot-merge" || command === "merged") {
          if (happened) {
            // The merge resumes (or had finished): the origin ends equal to the snapshot.
            for (let i = 0; i < 2000 && m.has("s"); i++) await new Promise((r) => setTimeout(r, 5));
            expect(m.has("s")).toBe(false);
            expect(await read("o")).toBe(0xaa);
          } else {
            expect(m.table("s")[0]!.targetType).toBe("snapshot");
            expect(await read("s")).toBe(0xaa);
            expect(await read("o")).toBe(0xbb);
          }
        }
      } finally {
        await m.closeAll();
      }
    },
  );
});
