import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, udm } from "./cli-helpers.js";

let dir: string;
const SIZE = 8 * 2 ** 20;
let primary: Buffer;

beforeAll(() => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-mirror-"));
  primary = randomBytes(SIZE);
  writeFileSync(join(dir, "a.img"), primary);
}, 300_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("udm mirror resync (offline)", () => {
  test("a core log resyncs every region: two diverged files end identical", () => {
    writeFileSync(join(dir, "b.img"), Buffer.alloc(SIZE));
    writeFileSync(join(dir, "c.img"), randomBytes(SIZE));
    const r = udm(["mirror", "resync", "--region-size", "1024", "a.img", "b.img", "c.img"], { cwd: dir });
    expect(r.stderr).toBe("");
    expect(r.stdout).toMatch(
      /^resynced 16 of 16 region\(s\), 16777216 bytes \(16\.0 MiB\) written to legs in [\d.]+ s, [\d.]+ MiB\/s; all legs in sync\n$/,
    );
    expect(r.status).toBe(0);
    expect(readFileSync(join(dir, "b.img")).equals(primary)).toBe(true);
    expect(readFileSync(join(dir, "c.img")).equals(primary)).toBe(true);
  });

  test("with a disk log only what the log marks is copied; --full copies everything", () => {
    writeFileSync(join(dir, "d.img"), Buffer.alloc(SIZE));
    writeFileSync(join(dir, "m.log"), Buffer.alloc(2 ** 20));
    const args = ["mirror", "resync", "--log", "m.log", "--region-size", "1024", "a.img", "d.img"];
    expect(udm(args, { cwd: dir }).stdout).toMatch(/^resynced 16 of 16 region/); // a new log: all out of sync
    const inspect = udm(["mirror", "inspect-log", "m.log", "--json"], { cwd: dir });
    expect(JSON.parse(inspect.stdout)).toMatchObject({ regionCount: 16, cleanRegions: 16, outOfSync: [] });
    // Diverge d.img behind the log's back: the log says clean, so nothing is copied...
    const d = readFileSync(join(dir, "d.img"));
    d.fill(7, 0, 4096);
    writeFileSync(join(dir, "d.img"), d);
    const again = udm(args, { cwd: dir });
    expect(again.stdout).toMatch(/^resynced 0 of 16 region\(s\), 0 bytes/);
    expect(readFileSync(join(dir, "d.img")).subarray(0, 4096).equals(Buffer.alloc(4096, 7))).toBe(true);
    // ...until --full.
    const full = udm([...args, "--full"], { cwd: dir });
    expect(full.stdout).toMatch(/^resynced 16 of 16 region/);
    expect(readFileSync(join(dir, "d.img")).equals(primary)).toBe(true);
  });

  test.each([
    [["mirror", "resync", "a.img", "b.img"], /needs --region-size/],
    [["mirror", "resync", "--region-size", "1024", "a.img"], /needs PRIMARY and at least one more LEG/],
    [
      ["mirror", "resync", "--log", "m.log", "--core", "--region-size", "8", "a.img", "b.img"],
      /mutually exclusive/,
    ],
  ])("usage error %j exits 2", (args, message) => {
    const r = udm(args, { cwd: dir });
    expect(r.stderr).toMatch(message);
    expect(r.status).toBe(2);
  });

  test("a bad region size is refused by the mirror target, naming the argument", () => {
    const r = udm(["mirror", "resync", "--region-size", "1000", "a.img", "b.img"], { cwd: dir });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/mirror resync:1: mirror argument 3 \("1000"\)/);
  });
});
