/**
 * A writer for the "newc" cpio format the Linux kernel unpacks as an initramfs
 * (Documentation/driver-api/early-userspace/buffer-format.rst). Several archives may be
 * concatenated; the kernel unpacks them in order, later entries overwriting earlier ones.
 */

/** One archive member. Paths are relative ("usr/bin/x"), without a leading slash. */
export type CpioEntry =
  | { kind: "dir"; path: string; mode?: number }
  | { kind: "file"; path: string; data: Buffer | string; mode?: number }
  | { kind: "symlink"; path: string; target: string }
  | { kind: "chardev"; path: string; major: number; minor: number; mode?: number };

const NEWC_MAGIC = "070701";
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
/** newc pads the header+name and the data to 4 bytes. */
const NEWC_ALIGN = 4;
/** The archive itself is padded like cpio(1) does, so a second archive can follow. */
const ARCHIVE_ALIGN = 512;

function hex8(n: number): string {
  return n.toString(16).padStart(8, "0");
}

function pad(length: number, align: number): Buffer {
  const rest = length % align;
  return Buffer.alloc(rest === 0 ? 0 : align - rest);
}

/**
 * Serialises `entries` (in order, parents before children) into one newc archive ending with the
 * TRAILER!!! member, padded to 512 bytes. Owner is root, mtime 0, so equal input gives equal bytes.
 *
 * @example
 * ```ts
 * const archive = writeCpio([
 *   { kind: "dir", path: "run" },
 *   { kind: "file", path: "run/job.sh", data: "echo hi\n", mode: 0o755 },
 * ]);
 * ```
 */
export function writeCpio(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let offset = 0;
  let ino = 1;
  const push = (b: Buffer) => {
    parts.push(b);
    offset += b.length;
  };
  const member = (path: string, mode: number, data: Buffer, rdevMajor = 0, rdevMinor = 0) => {
    if (path.startsWith("/")) throw new RangeError(`cpio path "${path}" must be relative`);
    const name = Buffer.from(`${path}\0`, "utf8");
    const nlink = (mode & S_IFDIR) === S_IFDIR ? 2 : 1;
    const fields = [ino++, mode, 0, 0, nlink, 0, data.length, 0, 0, rdevMajor, rdevMinor, name.length, 0];
    push(Buffer.from(NEWC_MAGIC + fields.map(hex8).join(""), "ascii"));
    push(name);
    push(pad(offset, NEWC_ALIGN));
    push(data);
    push(pad(offset, NEWC_ALIGN));
  };
  for (const e of entries) {
    switch (e.kind) {
      case "dir":
        member(e.path, S_IFDIR | (e.mode ?? 0o755), Buffer.alloc(0));
        break;
      case "file":
        member(
          e.path,
          S_IFREG | (e.mode ?? 0o644),
          typeof e.data === "string" ? Buffer.from(e.data) : e.data,
        );
        break;
      case "symlink":
        member(e.path, S_IFLNK | 0o777, Buffer.from(e.target, "utf8"));
        break;
      case "chardev":
        member(e.path, S_IFCHR | (e.mode ?? 0o600), Buffer.alloc(0), e.major, e.minor);
        break;
    }
  }
  member("TRAILER!!!", 0, Buffer.alloc(0));
  push(pad(offset, ARCHIVE_ALIGN));
  return Buffer.concat(parts);
}
