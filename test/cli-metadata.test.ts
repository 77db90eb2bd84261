/**
 * The metadata record survives a kill -9 at every step of a write (issue 15): a process killed
 * by `UDM_CRASH_AT=record:<step>` leaves either the old version or the new one, whole, and the
 * next write goes on from there.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { MetadataRecord, RECORD_STEPS } from "@udm/cli";
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
