import { basicTargets, KcopydClient } from "@udm/kcopyd";
import { describe, expect, test } from "vitest";
import { parseDeviceTable, parseTableFile, probeTableLine, TableParseError } from "./table-parser.js";

const registry = new Map(basicTargets.map((t) => [t.name, t]));

function parseError(fn: () => unknown): TableParseError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(TableParseError);
    return err as TableParseError;
  }
  throw new Error("expected a TableParseError");
}

describe("parseTableFile", () => {
  test("groups NAME: lines into devices of contiguous segments, skipping comments", () => {
    const tables = parseTableFile(
      "# two devices\nbig: 0 2048 linear a.img 0   # first half\n\nbig: 2048 1024 zero\nz: 0 8 error\n",
      "t.table",
      registry,
    );
    expect(tables.map((t) => t.name)).toEqual(["big", "z"]);
    expect(tables[0]!.lines.map((l) => [l.startSectors, l.lengthSectors, l.targetType, l.args])).toEqual([
      [0, 2048, "linear", ["a.img", "0"]],
      [2048, 1024, "zero", []],
    ]);
    expect(tables[0]!.lines[1]!.source).toEqual({ file: "t.table", line: 4 });
  });

  test.each([
    ["0 2048 zero", 1, /expected "NAME: <start> <length> <target> <args...>"/],
    ["ok: 0 2048 zero\nbad name: 0 8 zero", 2, /expected "NAME:/],
    ["a: x 2048 zero", 1, /start sector "x" must be a whole number of 512-byte sectors/],
    ["a: 0 -5 zero", 1, /length "-5" must be a whole number/],
    ["a: 0 0 zero", 1, /length must be at least 1 sector/],
    ["a: 0 8", 1, /missing target type: expected one of linear, zero, error, flakey/],
    ["a: 0 8 stripe 2", 1, /unknown target type "stripe": expected one of linear, zero, error, flakey/],
    [
      "a: 0 8 zero\na: 16 8 zero",
      2,
      /segment starts at sector 16, expected 8 \(a gap: sectors 8-15 are not mapped;/,
    ],
    [
      "a: 0 8 zero\na: 4 8 zero",
      2,
      /segment starts at sector 4, expected 8 \(it overlaps the previous segment, which ends at sector 7;/,
    ],
    [
      "a: 0 8 zero\nb: 0 8 zero\na: 0 8 zero",
      3,
      /^bad\.table:3: a: segment starts at sector 0, expected 8 \(it overlaps/,
    ],
    ["a: 8 8 zero", 1, /segment starts at sector 8, expected 0 \(the first segment must start at 0;/],
    ["a: 99999999999999999 8 zero", 1, /start sector "99999999999999999" is too large: at most \d+ sectors/],
    ["a: 0 1e3 zero", 1, /length "1e3" must be a whole number of 512-byte sectors/],
    ["a 0 8 zero", 1, /^bad\.table:1: expected "NAME: <start> <length> <target> <args...>"$/],
    [": 0 8 zero", 1, /expected "NAME: <start>/],
    ["ok: 0 8 zero\n\n# c\n0 8 zero", 4, /expected "NAME: <start>/],
    ["a:", 1, /missing start sector: expected "<start> <length> <target> <args...>"/],
    ["a: 0", 1, /missing length: expected "<start> <length> <target> <args...>"/],
    ["-x: 0 8 zero", 1, /invalid device name "-x"/],
  ])("%j fails at line %i", (text, line, message) => {
    const err = parseError(() => parseTableFile(text, "bad.table", registry));
    expect(err.message.startsWith(`bad.table:${line}: `)).toBe(true);
    expect(err.message).toMatch(message);
  });
});

describe("parseDeviceTable", () => {
  test("several dmsetup lines make one device", () => {
    const t = parseDeviceTable("d", ["0 8 zero", "8 8 error"], "--table", registry);
    expect(t.lines.map((l) => l.targetType)).toEqual(["zero", "error"]);
  });

  test("an empty table is refused", () => {
    expect(parseError(() => parseDeviceTable("d", "# nothing\n", "--table", registry)).message).toMatch(
      /--table:1: d: the table is empty/,
    );
  });
});

describe("probeTableLine (target arguments, nothing opened)", () => {
  const kcopyd = new KcopydClient();
  const probe = (text: string, checkSpec: (spec: string) => void = () => {}) =>
    probeTableLine(
      parseDeviceTable("d", text, "f.table", registry).lines[0]!,
      registry,
      { kcopyd },
      checkSpec,
    );

  test("a bad argument is named by position, text, expectation and usage", async () => {
    const err = (await probe("0 8 linear a.img x").catch((e) => e)) as TableParseError;
    expect(err).toBeInstanceOf(TableParseError);
    expect(err.argIndex).toBe(1);
    expect(err.message).toBe(
      'f.table:1: linear argument 2 ("x"): offset (sectors) must be a non-negative whole number, got "x" (usage: linear <dev> <offset_sectors>)',
    );
  });

  test("a wrong argument count names the target and its usage", async () => {
    const err = (await probe("0 8 zero extra").catch((e) => e)) as TableParseError;
    expect(err.message).toMatch(/^f\.table:1: zero: expected \(no arguments\), got 1 argument\(s\)/);
  });

  test("flakey features are checked before any device is opened", async () => {
    const opened: string[] = [];
    const err = (await probe("0 8 flakey a.img 0 1 1 1 bogus", (s) => opened.push(s)).catch(
      (e) => e,
    )) as TableParseError;
    expect(err.message).toMatch(/flakey argument 6 \("bogus"\): unknown flakey feature "bogus"/);
    expect(opened).toEqual([]);
  });

  test("a device argument refused by checkSpec is named; a good line passes without opening", async () => {
    const err = (await probe("0 8 linear @nope 0", () => {
      throw new Error('no udm device "nope"');
    }).catch((e) => e)) as TableParseError;
    expect(err.message).toBe(
      'f.table:1: linear argument 1 ("@nope"): no udm device "nope" (usage: linear <dev> <offset_sectors>)',
    );
    await expect(probe("0 8 linear /does/not/exist 0")).resolves.toBeUndefined();
  });
});
