import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, startServe, UDM, udm } from "./cli-helpers.js";

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

describe("udm copy: holes, bad destinations, progress, interrupts", () => {
  /** A 64 MiB file with 1 MiB of data at 32 MiB, the rest a hole. */
  function sparseSource(name: string): Buffer {
    const data = randomBytes(1 << 20);
    const path = join(dir, name);
    writeFileSync(path, Buffer.alloc(0));
    truncateSync(path, 64 << 20);
    const fd = openSync(path, "r+");
    writeSync(fd, data, 0, data.length, 32 << 20);
    closeSync(fd);
    return data;
  }
  const allocated = (name: string) => statSync(join(dir, name)).blocks * 512;

  test("holes stay holes by default (the rate is that of the data); --dense writes every sector", () => {
    const data = sparseSource("sparse.img");
    const r = udm(["copy", "sparse.img", "sparse-copy.img"], { cwd: dir });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(
      /^copied 67108864 bytes \(64\.0 MiB: 1\.00 MiB data, 63\.0 MiB holes kept\) to 1 destination\(s\) in [\d.]+ s, [\d.]+ MiB\/s of data;/,
    );
    expect(allocated("sparse-copy.img")).toBeLessThanOrEqual(2 << 20);
    const copy = readFileSync(join(dir, "sparse-copy.img"));
    expect(copy.length).toBe(64 << 20);
    expect(copy.subarray(32 << 20, 33 << 20).equals(data)).toBe(true);
    expect(copy.subarray(0, 32 << 20).every((b) => b === 0)).toBe(true);

    const dense = udm(["copy", "--dense", "sparse.img", "dense-copy.img"], { cwd: dir });
    expect(dense.status).toBe(0);
    expect(dense.stdout).toMatch(
      /^copied 67108864 bytes \(64\.0 MiB\) to 1 destination\(s\) in [\d.]+ s, [\d.]+ MiB\/s;/,
    );
    expect(allocated("dense-copy.img")).toBeGreaterThanOrEqual(64 << 20);
    expect(readFileSync(join(dir, "dense-copy.img")).equals(copy)).toBe(true);
  });

  test("the source as destination, a missing folder and --size 0 get udm's own answers", () => {
    for (const dest of ["a.img", "./a.img", `file:${join(dir, "a.img")}`]) {
      const same = udm(["copy", "a.img", dest], { cwd: dir });
      expect(same.stderr).toMatch(
        /^udm: destination 0 \(.*a\.img\) is the source a\.img: a copy needs another device$/m,
      );
      expect(same.status).toBe(2);
    }
    symlinkSync(join(dir, "a.img"), join(dir, "alias.img"));
    expect(udm(["copy", "a.img", "alias.img"], { cwd: dir }).stderr).toMatch(/is the source a\.img/);
    const noFolder = udm(["copy", "a.img", "no/such/dir/x.img"], { cwd: dir });
    expect(noFolder.stderr).toBe(
      `udm: destination 0 (no/such/dir/x.img): folder ${join(dir, "no/such/dir")} does not exist (udm copy creates files, not folders)\n`,
    );
    expect(noFolder.status).toBe(1);
    const zero = udm(["copy", "--size", "0", "a.img", "zero.img"], { cwd: dir });
    expect(zero.status).toBe(0);
    expect(zero.stdout).toMatch(/^copied 0 bytes /);
    expect(statSync(join(dir, "zero.img")).size).toBe(0);
    const window = udm(["copy", "--size", "4k", "a.img", "window.img"], { cwd: dir });
    expect(window.status).toBe(0);
    expect(readFileSync(join(dir, "window.img")).equals(source.subarray(0, 4096))).toBe(true);
  });

  test("without a terminal: progress lines every --progress-interval, ending at 100 %; --no-progress and -q silence them", () => {
    const lines = (args: string[]) => {
      const r = udm(args, { cwd: dir });
      expect(r.status).toBe(0);
      return r.stderr.split("\n").filter((l) => l !== "");
    };
    const shown = lines(["--progress-interval", "0", "copy", "--dense", "sparse.img", "p1.img"]);
    expect(shown.length).toBeGreaterThan(1);
    for (const l of shown) expect(l).toMatch(/^copy: [\d.]+ \w+ \/ 64\.0 MiB \([\d.]+%\), [\d.]+ MiB\/s/);
    expect(shown.at(-1)).toMatch(/^copy: 64\.0 MiB \/ 64\.0 MiB \(100\.0%\)/);
    expect(shown.join("\n")).not.toContain("\u001b[");
    expect(lines(["--progress-interval", "0", "--no-progress", "copy", "sparse.img", "p2.img"])).toEqual([]);
    expect(lines(["--progress-interval", "0", "-q", "copy", "sparse.img", "p3.img"])).toEqual([]);
    expect(
      lines(["--progress-interval", "0", "-q", "--progress", "copy", "sparse.img", "p4.img"]).at(-1),
    ).toMatch(/\(100\.0%\)/);
    // An offline mirror resync ends its progress at 100 % too.
    writeFileSync(join(dir, "leg.img"), Buffer.alloc(4 << 20));
    writeFileSync(join(dir, "primary.img"), Buffer.alloc(4 << 20, 0x5a));
    const resync = lines([
      "--progress-interval",
      "0",
      "mirror",
      "resync",
      "--region-size",
      "64",
      "primary.img",
      "leg.img",
    ]);
    expect(resync.at(-1)).toMatch(/^resync: 4\.00 MiB \/ 4\.00 MiB \(100\.0%\)/);
  });

  test.each([
    ["SIGINT", 130, []],
    ["SIGTERM", 143, ["--keep-partial"]],
  ] as const)(
    "%s during a copy: a line on what was copied, exit %i, the created file removed unless --keep-partial",
    async (signal, status, extra) => {
      // A source whose reads wait: an NBD export of a suspended device.
      const ctl = join(dir, `int-${signal}.sock`);
      const sock = join(dir, `int-${signal}.nbd`);
      const serve = await startServe(
        ["--export", "src=mem:8M", "--unix", sock, "--control", ctl, "--listen", "127.0.0.1:0"],
        {
          cwd: dir,
        },
      );
      try {
        expect(udm(["--control", ctl, "suspend", "src"]).status).toBe(0);
        const dest = join(dir, `int-${signal}.img`);
        const child = spawn(
          process.execPath,
          [UDM, "copy", ...extra, `nbd+unix:///src?socket=${sock}`, dest],
          {
            cwd: dir,
            stdio: ["ignore", "pipe", "pipe"],
          },
        );
        let stderr = "";
        child.stderr.on("data", (d) => {
          stderr += d;
        });
        const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
        for (let i = 0; i < 400 && !existsSync(dest); i++) await new Promise((r) => setTimeout(r, 50));
        expect(existsSync(dest)).toBe(true);
        child.kill(signal);
        expect(await exited).toBe(status);
        expect(stderr).toMatch(
          new RegExp(
            `^udm: copy interrupted by ${signal}: 0 B of 8\\.00 MiB copied from sector 0, 8\\.00 MiB not copied; `,
          ),
        );
        if (extra.length) {
          expect(stderr).toContain(`kept the partial ${dest}`);
          expect(existsSync(dest)).toBe(true);
        } else {
          expect(stderr).toContain(`removed ${dest} (created by this copy; --keep-partial keeps it)`);
          expect(existsSync(dest)).toBe(false);
        }
        expect(udm(["--control", ctl, "resume", "src"]).status).toBe(0);
      } finally {
        expect(await serve.stop()).toBe(0);
      }
    },
  );
});
