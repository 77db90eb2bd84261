import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, test } from "vitest";
import { MetadataRecord, MetadataRecordError, parseRecord } from "./metadata-record.js";

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
