import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

/**
 * Optional native helpers for what Node's fs lacks: SEEK_DATA/SEEK_HOLE, hole punching and
 * block-device ioctls. Loaded lazily; when the addon is not built every caller has a pure-JS path.
 * Failures reject or throw an `Error` whose `code` is the errno name (`EOPNOTSUPP`, `EIO`...).
 */
export interface NativeFileOps {
  /** lseek(fd, offset, SEEK_DATA): next data offset at or after `offset`, or -1 (ENXIO: none). */
  seekData(fd: number, offset: number): number;
  /** lseek(fd, offset, SEEK_HOLE): next hole offset at or after `offset` (EOF counts as a hole). */
  seekHole(fd: number, offset: number): number;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE) on a file, BLKDISCARD on a block device. */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /** fallocate(ZERO_RANGE | KEEP_SIZE) on a file (PUNCH_HOLE where unsupported), BLKZEROOUT on a block device. */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  /**
   * copy_file_range(2) from one file to another, in the kernel (or as a reflink); resolves with
   * the bytes copied, fewer than `length` only at the source's end of file. Optional: absent
   * from an addon built before it existed.
   */
  copyRange?(
    fdIn: number,
    offsetIn: number,
    fdOut: number,
    offsetOut: number,
    length: number,
  ): Promise<number>;
  /**
   * preadv2(RWF_NOWAIT) into the whole of `target`, synchronously on the calling thread: copies
   * only what the page cache already holds and never waits for the disk. Returns the bytes read
   * (fewer than asked when the rest is not cached or the file ends; 0 at end of file), or -1 when
   * nothing at `position` is cached (EAGAIN). Throws `EOPNOTSUPP` where the file system (tmpfs)
   * or kernel (< 4.14) cannot do it. Optional: absent from an addon built before it existed.
   */
  preadNowait?(fd: number, target: Uint8Array, position: number): number;
  /**
   * posix_fadvise(POSIX_FADV_DONTNEED): drops the clean cached pages of the range (length 0: to
   * the end of the file), e.g. to measure or test cold reads. Synchronous. Optional like above.
   */
  dropCache?(fd: number, offset: number, length: number): void;
  /**
   * fcntl(F_OFD_SETLK): takes (`read`, `write`), or drops (`unlock`) an open-file-description
   * lock on bytes `start..start+length-1` (length 0: to the end) without waiting; throws `EAGAIN`
   * when another open file holds a conflicting lock. Optional like above.
   */
  ofdLock?(fd: number, start: number, length: number, type: "read" | "write" | "unlock"): void;
  /**
   * fcntl(F_OFD_GETLK): null when a lock of `type` on the range could be taken now, else the
   * first conflicting lock (`pid` is -1 for an OFD lock, the owner for a POSIX lock).
   */
  ofdTest?(fd: number, start: number, length: number, type: "read" | "write"): OfdLockInfo | null;
  /**
   * Sends `message` as one datagram to the Unix datagram socket `path` ("@name": abstract), as
   * sd_notify(3) does with NOTIFY_SOCKET (Node's dgram module has no Unix sockets). Synchronous.
   * Optional like above.
   */
  notifySocket?(path: string, message: string): void;
  /**
   * glibc's mallopt(M_TRIM_THRESHOLD) and mallopt(M_MMAP_THRESHOLD); true when both were taken.
   * Optional like above.
   */
  tuneMalloc?(trimThresholdBytes: number, mmapThresholdBytes: number): boolean;
}

/** A lock another open file holds, as `ofdTest` reports it. */
export interface OfdLockInfo {
  type: "read" | "write";
  start: number;
  length: number;
  pid: number;
}

/** Where `pnpm install` (the package's `install` script, node-gyp) puts a source build of the addon. */
export const NATIVE_ADDON_PATH = "../native/build/Release/udm_fileops.node";

/** The addon's folder: `build/Release` (a source build) and `prebuilds/<platform>-<arch>` (shipped). */
const NATIVE_DIR = fileURLToPath(new URL("../native/", import.meta.url));

/** Set to `1` to force the pure-JS path (writes of zeros, extents all data), e.g. in tests. */
export const NO_NATIVE_ENV = "UDM_NO_NATIVE";

/** Which implementation of the native helpers is in use. */
export interface NativeAddonInfo {
  /**
   * `source build`: compiled on this machine by the install script (node-gyp); `prebuilt`: the
   * linux-x64 binary shipped in the package (package managers that skip build scripts, such as
   * pnpm 10, get this one); `pure-JS`: no addon (none fits, `UDM_NO_NATIVE=1`, or it failed to load).
   */
  kind: "source build" | "prebuilt" | "pure-JS";
  /** The loaded addon file, when there is one. */
  path: string | null;
  /** Why there is no addon, for `pure-JS`. */
  reason?: string;
}

let loaded: NativeFileOps | null | undefined;
let loadedPath: string | null = null;
let loadError: unknown;

/**
 * The native helpers, or null when no addon fits (or `UDM_NO_NATIVE=1`). Looked up as
 * node-gyp-build does: a source build in native/build/Release first, then the prebuilt binary for
 * this platform in native/prebuilds. Loaded on the first call; the environment variable is read
 * on every call. `nativeAddonInfo()` tells which one is in use.
 *
 * @example
 * ```ts
 * const native = nativeFileOps();
 * if (native) await native.punchHole(fd, 0, 1 << 20);
 * ```
 */
export function nativeFileOps(): NativeFileOps | null {
  if (process.env[NO_NATIVE_ENV] === "1") return null;
  if (loaded === undefined) {
    try {
      const require = createRequire(import.meta.url);
      const { path: findAddon } = require("node-gyp-build") as { path(dir: string): string };
      const path = findAddon(NATIVE_DIR);
      const mod = require(path) as Partial<NativeFileOps>;
      const complete =
        typeof mod.seekData === "function" &&
        typeof mod.seekHole === "function" &&
        typeof mod.punchHole === "function" &&
        typeof mod.zeroRange === "function";
      loaded = complete ? (mod as NativeFileOps) : null;
      loadedPath = complete ? path : null;
      if (!complete) loadError = new Error(`${path} lacks some of NativeFileOps`);
    } catch (err) {
      loaded = null;
      loadError = err;
    }
  }
  return loaded;
}

/**
 * Which path the native helpers take: the source build, the prebuilt binary or pure JS.
 *
 * @example
 * ```ts
 * console.log(nativeAddonInfo()); // { kind: "prebuilt", path: ".../native/prebuilds/linux-x64/node.napi.glibc.node" }
 * ```
 */
export function nativeAddonInfo(): NativeAddonInfo {
  if (process.env[NO_NATIVE_ENV] === "1") {
    return { kind: "pure-JS", path: null, reason: `${NO_NATIVE_ENV}=1` };
  }
  if (!nativeFileOps() || !loadedPath) {
    const why = loadError instanceof Error ? loadError.message.split("\n")[0] : String(loadError);
    return { kind: "pure-JS", path: null, reason: why ?? "no addon" };
  }
  return { kind: loadedPath.includes("/prebuilds/") ? "prebuilt" : "source build", path: loadedPath };
}

/** Why `nativeFileOps()` returned null (the load error), or undefined when it loaded or was not tried. */
export function nativeFileOpsLoadError(): unknown {
  return loadError;
}

/** Freed heap memory glibc keeps before giving it back to the kernel, with {@link tuneMallocForDataPath}. */
export const MALLOC_TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024;
/** Allocations below this come from the heap (reused) instead of a fresh mmap each. */
export const MALLOC_MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024;

/**
 * Keeps the memory of freed data-path buffers in the process (glibc's trim and mmap thresholds,
 * through the addon): without it glibc returns the heap top to the kernel as soon as 128 KiB are
 * free, so the next socket chunks and payloads fault their pages in again (on a 256 KiB nbdcopy
 * write the server spent ~1.6 CPU-s/GiB, ~1.0 with this). Costs up to
 * MALLOC_TRIM_THRESHOLD_BYTES of idle heap. For servers (`udm serve`); false without the addon
 * (the same can be had at launch: `GLIBC_TUNABLES=glibc.malloc.trim_threshold=...:glibc.malloc.mmap_threshold=...`).
 */
export function tuneMallocForDataPath(): boolean {
  const native = nativeFileOps();
  if (!native?.tuneMalloc) return false;
  return native.tuneMalloc(MALLOC_TRIM_THRESHOLD_BYTES, MALLOC_MMAP_THRESHOLD_BYTES);
}
