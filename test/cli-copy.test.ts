import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, udm } from "./cli-helpers.js";

let dir: string;
// Not a multiple of 512: the last partial sector must be copied too.
const SIZE = 3 * 2 ** 20 + 1000;
let source: Buffer;

beforeAll(() => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-copy-"));
  source = randomBytes(SIZE);
  writeFileSync(join(dir, "a.img"), source);
}, 300_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

function blank(name: string, size = SIZE): string {
  const path = join(dir, name);
  writeFileSync(path, Buffer.alloc(0));
  rmSync(path);
  writeFileSync(path, Buffer.alloc(size));
  return path;
}

describe("udm copy", () => {
  test("udm copy a b c d makes byte-identical copies and reports bytes, MiB/s and mask 0x0", () => {
    for (const n of ["b.img", "c.img", "d.img"]) blank(n);
    const r = udm(["copy", "a.img", "b.img", "c.img", "d.img"], { cwd: dir });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(
      new RegExp(
        `^copied ${SIZE} bytes \\(3\\.00 MiB\\) to 3 destination\\(s\\) in [\\d.]+ s, [\\d.]+ MiB/s; read error: no; write error mask: 0x0\\n$`,
      ),
    );
    for (const n of ["b.img", "c.img", "d.img"]) expect(readFileSync(join(dir, n)).equals(source)).toBe(true);
  });

  test("destination files that do not exist are created with the source's size, like cp", () => {
    const r = udm(["copy", "a.img", "new1.img", `file:${join(dir, "new2.img")}`], { cwd: dir });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    for (const n of ["new1.img", "new2.img"]) expect(readFileSync(join(dir, n)).equals(source)).toBe(true);
  });

  test("an error destination gives exit 1 and its mask bit; healthy destinations complete with --ignore-error", () => {
    blank("e.img");
    blank("f.img");
    const sectors = Math.ceil(SIZE / 512);
    const r = udm(
      ["copy", "--ignore-error", "--table", `bad: 0 ${sectors} error`, "a.img", "e.img", "@bad", "f.img"],
      { cwd: dir },
    );
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/write error mask: 0x2 \(failed: @bad\)$/m);
    expect(readFileSync(join(dir, "e.img")).equals(source)).toBe(true);
    expect(readFileSync(join(dir, "f.img")).equals(source)).toBe(true);
  });

  test("without --ignore-error the failing destination is still named in the mask", () => {
    blank("g.img");
    const r = udm(["copy", "--table", "bad: 0 8192 error", "--size", "1M", "a.img", "@bad", "g.img"], {
      cwd: dir,
    });
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/^copied 1048576 bytes .* write error mask: 0x1 \(failed: @bad\)$/m);
  });

  test("--table-file devices can be copy sources; --sector and --size copy a window", () => {
    writeFileSync(join(dir, "t.table"), "# window of a.img\nwin: 0 64 linear a.img 128\n");
    const out = blank("h.img", 64 * 512);
    const r = udm(["copy", "--table-file", "t.table", "@win", "h.img"], { cwd: dir });
    expect(r.status).toBe(0);
    expect(readFileSync(out).equals(source.subarray(128 * 512, 192 * 512))).toBe(true);

    const part = blank("i.img");
    const r2 = udm(["copy", "--sector", "16", "--size", "4k", "a.img", "i.img"], { cwd: dir });
    expect(r2.status).toBe(0);
    const got = readFileSync(part);
    expect(got.subarray(16 * 512, 16 * 512 + 4096).equals(source.subarray(16 * 512, 16 * 512 + 4096))).toBe(
      true,
    );
    expect(got.subarray(0, 16 * 512).equals(Buffer.alloc(16 * 512))).toBe(true);
    expect(got.subarray(16 * 512 + 4096, 16 * 512 + 8192).equals(Buffer.alloc(4096))).toBe(true);
  });

  test.each([
    [["copy", "--size", "1x", "a.img", "b.img"], /--size: invalid size "1x"/],
    [["copy", "--size", "1000", "a.img", "b.img"], /--size 1000: must be a multiple of 512 bytes/],
    [["copy", "--count", "8", "--size", "4k", "a.img", "b.img"], /--count and --size are mutually exclusive/],
    [["copy", "--bogus", "a.img", "b.img"], /unknown option '--bogus'/],
    [["copy", "a.img"], /missing required argument 'dest'/],
    [
      ["copy", "--count", "99999999", "a.img", "b.img"],
      /a\.img has \d+ sectors: cannot copy 99999999 from sector 0/,
    ],
    [["copy", "a.img", "b", "c", "d", "e", "f", "g", "h", "i", "j"], /1 to 8 destinations, got 9/],
  ])("usage error %j exits 2", (args, message) => {
    const r = udm(args, { cwd: dir });
    expect(r.stderr).toMatch(message);
    expect(r.status).toBe(2);
  });

  test("a missing device exits 1 naming it", () => {
    const r = udm(["copy", "nope.img", "b.img"], { cwd: dir });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/nope\.img" does not exist/);
  });

  test("--help shows an example and exits 0", () => {
    const r = udm(["copy", "--help"], { cwd: dir });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/Example:\n {2}udm copy a\.img b\.img c\.img d\.img/);
  });
});
