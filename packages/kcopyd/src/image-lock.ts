import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  unlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type NativeFileOps, nativeFileOps } from "./native.js";

/**
 * qemu's image locks (block/file-posix.c), so udm, qemu-nbd, qemu-io and qemu-img see each other:
 * one-byte shared OFD locks, byte `100 + i` while the opener holds permission i, byte `200 + i`
 * while it refuses to share permission i with other openers.
 */
export const IMAGE_LOCK_PERM_BASE = 100;
/** See {@link IMAGE_LOCK_PERM_BASE}. */
export const IMAGE_LOCK_SHARED_BASE = 200;

/** qemu's BLK_PERM_* bit numbers, and the names its messages use. */
const PERM_NAMES = ["consistent read", "write", "write unchanged", "resize"] as const;
const CONSISTENT_READ = 0;
const WRITE = 1;
const RESIZE = 3;

/** Environment variable naming the folder of the lock files of the pure-JS path. */
export const IMAGE_LOCK_DIR_ENV = "UDM_LOCK_DIR";

/** `read`: shares everything (other writers too); `write`: the only writer and resizer. */
export type ImageLockMode = "read" | "write";

/**
 * `ofd`: qemu's OFD byte locks through the native addon (qemu sees them and udm sees qemu's);
 * `lock-file`: the pure-JS path, a lock file per image that other udm processes honour, plus a
 * look at /proc/locks for a qemu that already holds the image (see {@link lockImage}).
 */
export type ImageLockMethod = "ofd" | "lock-file";

/** The process found holding a conflicting lock. */
export interface ImageLockHolder {
  pid: number;
  /** Its command line (`qemu-nbd -t -f raw disk.img`), or "" when /proc does not say. */
  command: string;
}

/** A lock held on an open image; released when the image is closed. */
export interface ImageLock {
  readonly mode: ImageLockMode;
  readonly method: ImageLockMethod;
  /** Drops the lock (idempotent). Closing the file drops an OFD lock too. */
  release(): void;
}

/**
 * Another process (or another open of the same file in this one) uses the image in a way this
 * open cannot share. The message names the file, the permission and, where /proc shows it, the
 * holder.
 */
export class ImageLockedError extends Error {
  readonly code = "EBUSY";
  readonly path: string;
  readonly holder: ImageLockHolder | undefined;

  constructor(path: string, message: string, holder?: ImageLockHolder) {
    super(`${path}: ${message}`);
    this.name = "ImageLockedError";
    this.path = path;
    this.holder = holder;
  }
}

/** The identity of the locked inode (a `fstat` with `bigint: true`). */
export interface ImageInode {
  dev: bigint;
  ino: bigint;
}

/** The permissions an opener holds and those it refuses to share (qemu's `perm` / `~shared`). */
function permissionsOf(mode: ImageLockMode): { held: number[]; unshared: number[] } {
  // A writer tolerates readers but no other writer, and nobody resizing under it (qemu-nbd's and
  // qemu's own choice for a writable raw image); a reader shares everything.
  return mode === "write"
    ? { held: [CONSISTENT_READ, WRITE], unshared: [WRITE, RESIZE] }
    : { held: [CONSISTENT_READ], unshared: [] };
}

/**
 * Locks the open image `fd` (a regular file or a block device node) for `mode` the way qemu does:
 * with the native addon, OFD read locks on the bytes of the permissions held and not shared,
 * after testing that no other open file holds a conflicting byte; so a udm writer refuses a
 * second udm, `qemu-nbd`, `qemu-io` and writing `qemu-img`, and they refuse udm. Without the
 * addon (or `UDM_NO_NATIVE=1`) Node cannot take fcntl locks: a writer takes a lock file
 * (`$UDM_LOCK_DIR` or `$TMPDIR/udm-image-locks/DEV-INO.lock`) that other udm processes honour,
 * and /proc/locks is read to refuse an image a qemu tool already holds; a qemu tool started
 * later does not see such a lock.
 *
 * @example
 * ```ts
 * const handle = await fsp.open("disk.img", "r+");
 * const lock = lockImage(handle.fd, "disk.img", "write", await handle.stat({ bigint: true }));
 * // ... lock.release(); await handle.close();
 * ```
 */
export function lockImage(fd: number, path: string, mode: ImageLockMode, inode: ImageInode): ImageLock {
  const native = nativeFileOps();
  if (native?.ofdLock && native.ofdTest) {
    // A writer without the addon announces itself only through its lock file.
    if (mode === "write") checkLockFile(path, inode);
    return lockOfd(native, fd, path, mode, inode);
  }
  checkProcLocks(path, mode, inode);
  return mode === "write" ? takeLockFile(path, inode) : { mode, method: "lock-file", release: () => {} };
}

function lockOfd(
  native: NativeFileOps,
  fd: number,
  path: string,
  mode: ImageLockMode,
  inode: ImageInode,
): ImageLock {
  const { held, unshared } = permissionsOf(mode);
  const bytes = [
    ...held.map((i) => IMAGE_LOCK_PERM_BASE + i),
    ...unshared.map((i) => IMAGE_LOCK_SHARED_BASE + i),
  ];
  const unlock = () => {
    for (const byte of bytes) unlockByte(native, fd, byte);
  };
  try {
    for (const byte of bytes) {
      try {
        native.ofdLock!(fd, byte, 1, "read");
      } catch (err) {
        // Only a write lock (not qemu's scheme: someone else's) refuses a read lock.
        if ((err as { code?: unknown }).code !== "EAGAIN") throw err;
        const holder = findHolder(inode, byte, fd);
        throw new ImageLockedError(
          path,
          `cannot lock byte ${byte}: ${describe(holder)} holds a write lock on it`,
          holder,
        );
      }
    }
    // Then, as qemu's raw_check_lock_bytes: nobody refuses what we hold, nobody holds what we refuse.
    for (const i of held) {
      const byte = IMAGE_LOCK_SHARED_BASE + i;
      if (native.ofdTest!(fd, byte, 1, "write")) {
        const holder = findHolder(inode, byte, fd);
        throw new ImageLockedError(
          path,
          `cannot get the "${PERM_NAMES[i]}" lock: ${describe(holder)} does not share it (is another process using the image?)`,
          holder,
        );
      }
    }
    for (const i of unshared) {
      const byte = IMAGE_LOCK_PERM_BASE + i;
      if (native.ofdTest!(fd, byte, 1, "write")) {
        const holder = findHolder(inode, byte, fd);
        throw new ImageLockedError(
          path,
          `cannot get the shared "${PERM_NAMES[i]}" lock: ${describe(holder)} has the image open for ${PERM_NAMES[i]} (is another process using the image?)`,
          holder,
        );
      }
    }
  } catch (err) {
    unlock();
    throw err;
  }
  let released = false;
  return {
    mode,
    method: "ofd",
    release: () => {
      if (released) return;
      released = true;
      unlock();
    },
  };
}

/** Drops one byte's lock, ignoring a closed fd (closing drops OFD locks anyway). */
function unlockByte(native: NativeFileOps, fd: number, byte: number): void {
  try {
    native.ofdLock?.(fd, byte, 1, "unlock");
  } catch {}
}

/** The pure-JS path's test: a lock in /proc/locks on a byte that conflicts with `mode`. */
function checkProcLocks(path: string, mode: ImageLockMode, inode: ImageInode): void {
  const { held, unshared } = permissionsOf(mode);
  const conflicts = new Map<number, string>();
  for (const i of held) {
    conflicts.set(IMAGE_LOCK_SHARED_BASE + i, `cannot get the "${PERM_NAMES[i]}" lock: %s does not share it`);
  }
  for (const i of unshared) {
    conflicts.set(
      IMAGE_LOCK_PERM_BASE + i,
      `cannot get the shared "${PERM_NAMES[i]}" lock: %s has the image open for ${PERM_NAMES[i]}`,
    );
  }
  let text: string;
  try {
    text = readFileSync("/proc/locks", "utf8");
  } catch {
    return; // no /proc: nothing to see
  }
  const devText = `${hex2(devMajor(inode.dev))}:${hex2(devMinor(inode.dev))}:${inode.ino}`;
  for (const line of text.split("\n")) {
    const lock = parseLockLine(line);
    if (!lock || lock.kind === "FLOCK" || lock.inode !== devText) continue;
    for (const [byte, message] of conflicts) {
      if (byte < lock.start || byte > lock.end) continue;
      const holder = lock.pid > 0 ? holderOf(lock.pid) : findHolder(inode, byte, -1);
      throw new ImageLockedError(
        path,
        `${message.replace("%s", describe(holder))} (is another process using the image? this udm runs without its native addon and cannot lock the image for qemu)`,
        holder,
      );
    }
  }
}

/** One line of /proc/locks or of a fdinfo `lock:` line: `1: OFDLCK ADVISORY READ -1 fe:00:123 100 101`. */
function parseLockLine(
  line: string,
): { kind: string; pid: number; inode: string; start: number; end: number } | null {
  const m =
    /^(?:lock:\s+)?\d+:\s+(POSIX|OFDLCK|FLOCK)\s+\S+\s+\S+\s+(-?\d+)\s+([0-9a-f]+:[0-9a-f]+:\d+)\s+(\d+)\s+(\d+|EOF)\s*$/.exec(
      line.trim(),
    );
  if (!m) return null;
  return {
    kind: m[1]!,
    pid: Number(m[2]),
    inode: m[3]!,
    start: Number(m[4]),
    end: m[5] === "EOF" ? Number.POSITIVE_INFINITY : Number(m[5]),
  };
}

function lockDir(): string {
  return process.env[IMAGE_LOCK_DIR_ENV] || join(tmpdir(), "udm-image-locks");
}

function lockFileOf(inode: ImageInode): string {
  return join(lockDir(), `${inode.dev}-${inode.ino}.lock`);
}

/** The live writer a lock file names (this process included), or undefined when none or stale. */
function lockFileOwner(file: string): (ImageLockHolder & { path: string }) | undefined {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch {
    return undefined;
  }
  const [identity = "", path = ""] = text.split("\n");
  const [pidText, startTime] = identity.split(" ");
  const pid = Number(pidText);
  if (!Number.isInteger(pid) || pid <= 0 || !isProcessAlive(pid)) return undefined;
  // A pid reused since the writer died (kill -9) is another process: compare the start times.
  if (startTime && processStartTime(pid) !== startTime) return undefined;
  return { ...holderOf(pid), path };
}

function checkLockFile(path: string, inode: ImageInode): void {
  const owner = lockFileOwner(lockFileOf(inode));
  if (owner) {
    throw new ImageLockedError(
      path,
      `cannot get the "write" lock: ${describe(owner)} is writing it (udm without its native addon; lock file ${lockFileOf(inode)})`,
      owner,
    );
  }
}

function takeLockFile(path: string, inode: ImageInode): ImageLock {
  const file = lockFileOf(inode);
  mkdirSync(lockDir(), { recursive: true, mode: 0o1777 });
  const identity = `${process.pid} ${processStartTime(process.pid) ?? ""}`;
  for (let attempt = 0; ; attempt++) {
    try {
      writeFileSync(file, `${identity}\n${path}\n`, { flag: "wx", mode: 0o644 });
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST" || attempt > 0) throw err;
      const owner = lockFileOwner(file);
      if (owner) {
        const who =
          owner.pid === process.pid ? "this process (another open of the same file)" : describe(owner);
        throw new ImageLockedError(
          path,
          `cannot get the "write" lock: ${who} is writing it (lock file ${file})`,
          owner,
        );
      }
      unlinkSync(file); // stale: its process is gone
    }
  }
  let released = false;
  return {
    mode: "write",
    method: "lock-file",
    release: () => {
      if (released) return;
      released = true;
      try {
        if (readFileSync(file, "utf8").startsWith(`${identity}\n`)) unlinkSync(file);
      } catch {}
    },
  };
}

/**
 * The process holding a lock on `byte` of the inode: searched in /proc (every process whose open
 * file is the inode, preferring one whose fdinfo lists a lock covering the byte), skipping this
 * process's `ownFd`. Undefined when /proc shows none (another user's process, another mount
 * namespace).
 */
function findHolder(inode: ImageInode, byte: number, ownFd: number): ImageLockHolder | undefined {
  let candidate: number | undefined;
  let pids: string[];
  try {
    pids = readdirSync("/proc").filter((name) => /^\d+$/.test(name));
  } catch {
    return undefined;
  }
  for (const pidText of pids) {
    const pid = Number(pidText);
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      if (pid === process.pid && Number(fd) === ownFd) continue;
      try {
        const st = statSync(`/proc/${pid}/fd/${fd}`, { bigint: true });
        if (st.dev !== inode.dev || st.ino !== inode.ino) continue;
      } catch {
        continue;
      }
      candidate ??= pid;
      let info = "";
      try {
        info = readFileSync(`/proc/${pid}/fdinfo/${fd}`, "utf8");
      } catch {}
      for (const line of info.split("\n")) {
        const lock = parseLockLine(line);
        if (lock && byte >= lock.start && byte <= lock.end) return holderOf(pid);
      }
    }
  }
  return candidate === undefined ? undefined : holderOf(candidate);
}

function holderOf(pid: number): ImageLockHolder {
  let command = "";
  try {
    command = readFileSync(`/proc/${pid}/cmdline`, "utf8")
      .replace(/[\0\s]+/g, " ")
      .trim();
  } catch {}
  if (!command) {
    try {
      command = readlinkSync(`/proc/${pid}/exe`);
    } catch {}
  }
  return { pid, command: command.length > 160 ? `${command.slice(0, 157)}...` : command };
}

function describe(holder: ImageLockHolder | undefined): string {
  if (!holder) return "another process (not visible in /proc from here)";
  if (holder.pid === process.pid) return `this process (pid ${holder.pid}, another open of the same file)`;
  return `pid ${holder.pid}${holder.command ? ` (${holder.command})` : ""}`;
}

/** Field 22 of /proc/PID/stat: the process's start time in clock ticks since boot. */
function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

/**
 * Whether `pid` runs: a zombie (killed with -9, not yet reaped by its parent) holds no lock any more.
 *
 * @example
 * ```ts
 * isProcessAlive(process.pid); // true
 * ```
 */
export function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat[stat.lastIndexOf(")") + 2] !== "Z";
  } catch (err) {
    // Gone meanwhile; without /proc at all, trust kill(0).
    return (err as NodeJS.ErrnoException).code !== "ENOENT" || !existsSync("/proc/self");
  }
}

// glibc's gnu_dev_major/minor for a 64-bit dev_t.
function devMajor(dev: bigint): number {
  return Number(((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn));
}

function devMinor(dev: bigint): number {
  return Number((dev & 0xffn) | ((dev >> 12n) & ~0xffn));
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, "0");
}
