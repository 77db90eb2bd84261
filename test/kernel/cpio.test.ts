import { spawnSync } from "node:child_process";
import { describe, expect, test } from "vitest";
import { writeCpio } from "./cpio.js";
import { moduleLoadOrder } from "./guest-image.js";

/** Runs GNU cpio on `archive` (stdin) with `args`; returns stdout. */
function cpio(archive: Buffer, args: string[]): string {
  const r = spawnSync("cpio", ["--quiet", ...args], { input: archive, encoding: "latin1" });
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
}

describe("writeCpio", () => {
  const archive = writeCpio([
    { kind: "dir", path: "run" },
    { kind: "file", path: "run/job.sh", data: "echo hi\n", mode: 0o755 },
    { kind: "file", path: "run/odd.bin", data: Buffer.from([1, 2, 3, 4, 5]) },
    { kind: "file", path: "run/empty", data: "" },
    { kind: "symlink", path: "bin", target: "usr/bin" },
    { kind: "chardev", path: "console", major: 5, minor: 1 },
  ]);

  test("GNU cpio lists every member with its type, mode and link target", () => {
    const listing = cpio(archive, ["-itv"]).trim().split("\n");
    expect(listing.map((l) => l.split(/\s+/)[0])).toEqual([
      "drwxr-xr-x",
      "-rwxr-xr-x",
      "-rw-r--r--",
      "-rw-r--r--",
      "lrwxrwxrwx",
      "crw-------",
    ]);
    expect(listing[4]).toMatch(/ bin -> usr\/bin$/);
    expect(listing[5]).toMatch(/ 5,\s+1 .* console$/);
  });

  test("file contents survive, including sizes that need padding", () => {
    expect(cpio(archive, ["-i", "--to-stdout", "run/job.sh"])).toBe("echo hi\n");
    expect(Buffer.from(cpio(archive, ["-i", "--to-stdout", "run/odd.bin"]), "latin1")).toEqual(
      Buffer.from([1, 2, 3, 4, 5]),
    );
  });

  test("archives are padded to 512 bytes so a second one can be appended", () => {
    expect(archive.length % 512).toBe(0);
    const second = writeCpio([{ kind: "file", path: "run/extra", data: "more" }]);
    // GNU cpio reads the first archive only; the kernel reads on after each trailer.
    const both = Buffer.concat([archive, second]);
    expect(both.subarray(archive.length, archive.length + 6).toString()).toBe("070701");
    expect(cpio(second, ["-i", "--to-stdout", "run/extra"])).toBe("more");
  });

  test("absolute paths are refused", () => {
    expect(() => writeCpio([{ kind: "dir", path: "/etc" }])).toThrow(/relative/);
  });
});

describe("moduleLoadOrder", () => {
  const dep = [
    "kernel/drivers/md/dm-mod.ko:",
    "kernel/drivers/md/dm-log.ko: kernel/drivers/md/dm-mod.ko",
    "kernel/drivers/md/dm-region-hash.ko: kernel/drivers/md/dm-log.ko kernel/drivers/md/dm-mod.ko",
    "kernel/drivers/md/dm-mirror.ko: kernel/drivers/md/dm-region-hash.ko kernel/drivers/md/dm-log.ko kernel/drivers/md/dm-mod.ko",
    "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko",
    "kernel/lib/crc16.ko:",
    "kernel/fs/mbcache.ko:",
    "kernel/fs/jbd2/jbd2.ko:",
    "",
  ].join("\n");

  test("dependencies come first and each module once; - and _ are the same name", () => {
    expect(moduleLoadOrder(dep, ["dm_mirror", "dm-log", "ext4"])).toEqual([
      "kernel/drivers/md/dm-mod.ko",
      "kernel/drivers/md/dm-log.ko",
      "kernel/drivers/md/dm-region-hash.ko",
      "kernel/drivers/md/dm-mirror.ko",
      "kernel/fs/jbd2/jbd2.ko",
      "kernel/fs/mbcache.ko",
      "kernel/lib/crc16.ko",
      "kernel/fs/ext4/ext4.ko",
    ]);
  });

  test("an unknown module is an error naming it", () => {
    expect(() => moduleLoadOrder(dep, ["nbd"])).toThrow(/module nbd is not in modules.dep/);
  });
});
