/**
 * Host-side checks of what the guest scenarios leave behind: ext4 images read with the host's
 * debugfs/e2fsck, block layouts compared byte for byte.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { expect } from "vitest";

export const MiB = 1024 * 1024;

/** The bytes of `file` inside the ext4 image (debugfs -R "dump"), read on the host. */
export function ext4ReadFile(image: string, file: string): Buffer {
  const r = spawnSync("debugfs", ["-R", `cat ${file}`, image], { maxBuffer: 256 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`debugfs cat ${file} on ${image} failed: ${r.stderr}`);
  // debugfs prints its banner on stderr and an error ("File not found") there too, with status 0.
  if (/not found|Ext2 inode is not a directory/i.test(r.stderr.toString())) {
    throw new Error(`debugfs: ${file} not in ${image}: ${r.stderr}`);
  }
  return r.stdout;
}

/** Host-side `e2fsck -fn`: returns its output; throws if it found anything to fix. */
export function hostFsckClean(image: string): string {
  try {
    return execFileSync("e2fsck", ["-fn", image], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    const err = e as { status?: number; stdout?: string; stderr?: string };
    throw new Error(`e2fsck -fn ${image} exited ${err.status}:\n${err.stdout}${err.stderr}`);
  }
}

/** Files the guest copies to /dir/ (odd sizes: partial blocks, an empty file, a multi-extent one). */
export function sampleFiles(): Record<string, Buffer> {
  return {
    "empty.txt": Buffer.alloc(0),
    "hello.txt": Buffer.from("hello from the host\n"),
    "odd.bin": randomBytes(4097),
    "large.bin": randomBytes(3 * MiB + 123),
  };
}

export function guestFiles(files: Record<string, Buffer>, pattern: Buffer): Record<string, Buffer> {
  const out: Record<string, Buffer> = { "/run/udm/pattern.bin": pattern };
  for (const [name, data] of Object.entries(files)) out[`/run/udm/files/${name}`] = data;
  return out;
}

/** The host's view of what ext4-files.sh must have left in the image. */
export function expectExt4Files(image: string, files: Record<string, Buffer>, pattern: Buffer): void {
  hostFsckClean(image);
  for (const [name, data] of Object.entries(files)) {
    expect(ext4ReadFile(image, `/dir/${name}`).equals(data), `/dir/${name} in ${image}`).toBe(true);
  }
  const big = ext4ReadFile(image, "/big.bin");
  expect(big.equals(Buffer.concat([pattern, pattern, pattern, pattern])), "/big.bin").toBe(true);
}

/** The host's view of what pattern-io.sh must have left on a device that was all zeros. */
export function expectPatternLayout(disk: Buffer, pattern: Buffer): void {
  for (let k = 0; k < 8; k++) {
    const at = (2 * k + 1) * MiB;
    expect(disk.subarray(at, at + MiB).equals(pattern), `pattern at MiB ${2 * k + 1}`).toBe(true);
    expect(
      disk.subarray(at - MiB, at).every((b) => b === 0),
      `zeros at MiB ${2 * k}`,
    ).toBe(true);
  }
}
