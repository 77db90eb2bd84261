/**
 * Builds the guest the kernel tests boot: Debian's installed kernel (uncompressed for qemu's fast
 * PVH entry) and an initramfs with busybox-static, the nbd/dm/ext4 modules, nbd-client, dmsetup and
 * e2fsprogs with their shared libraries. Cached outside the repository under
 * `$UDM_KERNEL_CACHE` or `~/.cache/udm-kernel/<kernel>-<hash of the inputs>/`; rebuilt when any input
 * (kernel, tool binaries, /init, this module's list) changes.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { gunzipSync } from "node:zlib";
import { type CpioEntry, writeCpio } from "./cpio.js";

/** Modules the guest loads at boot, by name; their modules.dep dependencies come along. */
export const GUEST_MODULES = [
  "virtio_pci",
  "virtio_net",
  "nbd",
  "dm-mod",
  "dm-snapshot",
  "dm-mirror",
  "dm-log",
  "dm-region-hash",
  "dm-flakey",
  "dm-zero",
  // ext4 checksums its metadata with crc32c; there is no modprobe run by udev to fetch it later.
  "crc32c_generic",
  "ext4",
] as const;

/** Module parameters passed to insmod. */
const MODULE_ARGS: Record<string, string> = { nbd: "nbds_max=16" };

/** Host binaries copied into the guest at the same paths, with their libraries (ldd). */
export const GUEST_BINARIES = [
  "/usr/sbin/nbd-client",
  "/usr/sbin/dmsetup",
  "/usr/sbin/mke2fs",
  "/usr/sbin/mkfs.ext4",
  "/usr/sbin/e2fsck",
  "/usr/sbin/dumpe2fs",
  "/usr/sbin/blkdiscard",
  "/usr/sbin/blockdev",
] as const;

/** Plain files the guest tools read. */
const GUEST_FILES = ["/etc/mke2fs.conf"] as const;

const BUSYBOX = "/bin/busybox";
const INIT_SCRIPT = new URL("./guest/init.sh", import.meta.url);
/** Bump when the layout built here changes in a way the input hash cannot see. */
const IMAGE_LAYOUT_VERSION = 1;

export interface GuestImage {
  kernelRelease: string;
  /** Uncompressed ELF kernel (PVH entry). */
  vmlinux: string;
  /** The cached initramfs (newc cpio, uncompressed); per-run files are appended as a second archive. */
  initramfs: string;
  dir: string;
}

export class GuestImageError extends Error {
  override name = "GuestImageError";
}

/** The cache root: $UDM_KERNEL_CACHE, else $XDG_CACHE_HOME/udm-kernel, else ~/.cache/udm-kernel. */
export function cacheRoot(): string {
  if (process.env.UDM_KERNEL_CACHE) return process.env.UDM_KERNEL_CACHE;
  const xdg = process.env.XDG_CACHE_HOME || path.join(os.homedir(), ".cache");
  return path.join(xdg, "udm-kernel");
}

/** The newest kernel release that has both /boot/vmlinuz-R and /lib/modules/R/modules.dep. */
export function findKernelRelease(): string {
  const releases = fs.existsSync("/lib/modules") ? fs.readdirSync("/lib/modules") : [];
  const usable = releases.filter(
    (r) => fs.existsSync(`/boot/vmlinuz-${r}`) && fs.existsSync(`/lib/modules/${r}/modules.dep`),
  );
  if (usable.length === 0) {
    throw new GuestImageError(
      "no kernel to boot: need /boot/vmlinuz-R and /lib/modules/R/modules.dep (run `bash scripts/setup-kernel.sh` as root; it installs linux-image-amd64)",
    );
  }
  usable.sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  return usable[usable.length - 1]!;
}

/**
 * Extracts the uncompressed vmlinux from a bzImage: the x86 boot header locates the compressed
 * payload (payload_offset/payload_length), whose last 4 bytes are the uncompressed size.
 */
export function extractVmlinux(bzImage: Buffer): Buffer {
  if (bzImage.toString("latin1", 0x202, 0x206) !== "HdrS") {
    throw new GuestImageError("not a bzImage: no HdrS boot header at 0x202");
  }
  const setupSects = bzImage[0x1f1] || 4;
  const payloadOffset = bzImage.readUInt32LE(0x248);
  const payloadLength = bzImage.readUInt32LE(0x24c);
  const start = (setupSects + 1) * 512 + payloadOffset;
  const payload = bzImage.subarray(start, start + payloadLength - 4);
  let elf: Buffer;
  if (payload[0] === 0x1f && payload[1] === 0x8b) {
    elf = gunzipSync(payload);
  } else {
    const magic = payload.subarray(0, 6).toString("hex");
    const tool = magic === "fd377a585a00" ? "xz" : magic.startsWith("28b52ffd") ? "zstd" : null;
    if (!tool) throw new GuestImageError(`bzImage payload compression not supported (magic ${magic})`);
    const r = spawnSync(tool, ["-dc"], { input: payload, maxBuffer: 512 * 1024 * 1024 });
    if (r.error || r.status !== 0) {
      throw new GuestImageError(`${tool} -dc of the kernel payload failed: ${r.error ?? r.stderr}`);
    }
    elf = r.stdout;
  }
  if (elf.readUInt32BE(0) !== 0x7f454c46) throw new GuestImageError("decompressed kernel is not an ELF file");
  return elf;
}

/** Module paths (relative to /lib/modules/R) in load order: dependencies first, each once. */
export function moduleLoadOrder(modulesDep: string, names: readonly string[]): string[] {
  const deps = new Map<string, string[]>();
  const byName = new Map<string, string>();
  for (const line of modulesDep.split("\n")) {
    const colon = line.indexOf(":");
    if (colon < 0) continue;
    const mod = line.slice(0, colon);
    deps.set(
      mod,
      line
        .slice(colon + 1)
        .trim()
        .split(/\s+/)
        .filter(Boolean),
    );
    const base = path.basename(mod).replace(/\.ko(\.\w+)?$/, "");
    byName.set(base.replace(/-/g, "_"), mod);
  }
  const order: string[] = [];
  const visit = (mod: string) => {
    if (order.includes(mod)) return;
    // modules.dep lists the full transitive closure, deepest last; load them in reverse.
    for (const d of [...(deps.get(mod) ?? [])].reverse()) visit(d);
    order.push(mod);
  };
  for (const name of names) {
    const mod = byName.get(name.replace(/-/g, "_"));
    if (!mod) throw new GuestImageError(`module ${name} is not in modules.dep`);
    visit(mod);
  }
  return order;
}

/** Collects host paths into cpio entries, recreating every symlink on the way (merged /usr). */
class RootBuilder {
  readonly entries: CpioEntry[] = [];
  private readonly seen = new Set<string>();
  private readonly hash = createHash("sha256");

  dir(p: string): void {
    const rel = p.replace(/^\/+/, "");
    if (rel === "" || this.seen.has(rel)) return;
    this.dir(path.dirname(p));
    this.seen.add(rel);
    this.entries.push({ kind: "dir", path: rel });
  }

  /** Adds a generated file. */
  file(p: string, data: Buffer | string, mode = 0o644): void {
    this.dir(path.dirname(p));
    const rel = p.replace(/^\/+/, "");
    this.seen.add(rel);
    this.entries.push({ kind: "file", path: rel, data, mode });
    this.hash.update(`gen ${rel}\0`).update(data);
  }

  symlink(p: string, target: string): void {
    const rel = p.replace(/^\/+/, "");
    if (this.seen.has(rel)) return;
    this.dir(path.dirname(p));
    this.seen.add(rel);
    this.entries.push({ kind: "symlink", path: rel, target });
  }

  /** Copies a host path, following symlinks component by component and copying them as symlinks. */
  copy(hostPath: string, depth = 0): void {
    if (depth > 40) throw new GuestImageError(`too many symlinks resolving ${hostPath}`);
    const parts = path.resolve(hostPath).split("/").filter(Boolean);
    let cur = "";
    for (let i = 0; i < parts.length; i++) {
      cur = `${cur}/${parts[i]}`;
      const st = fs.lstatSync(cur);
      if (st.isSymbolicLink()) {
        const target = fs.readlinkSync(cur);
        this.symlink(cur, target);
        const rest = parts.slice(i + 1).join("/");
        const resolved = path.resolve(path.dirname(cur), target);
        this.copy(rest ? `${resolved}/${rest}` : resolved, depth + 1);
        return;
      }
      if (i < parts.length - 1) {
        if (!this.seen.has(cur.slice(1))) this.dir(cur);
        continue;
      }
      const rel = cur.slice(1);
      if (this.seen.has(rel)) return;
      if (st.isDirectory()) {
        this.dir(cur);
        return;
      }
      this.seen.add(rel);
      const data = fs.readFileSync(cur);
      this.entries.push({ kind: "file", path: rel, data, mode: st.mode & 0o7777 });
      this.hash.update(`host ${rel} ${st.mode}\0`).update(data);
    }
  }

  has(p: string): boolean {
    return this.seen.has(p.replace(/^\/+/, ""));
  }

  digest(): string {
    return this.hash.digest("hex");
  }
}

/** Shared libraries a dynamically linked binary needs, from ldd (absolute paths). */
function sharedLibraries(binary: string): string[] {
  const r = spawnSync("ldd", [binary], { encoding: "utf8" });
  if (r.status !== 0) return []; // "not a dynamic executable"
  const libs: string[] = [];
  for (const line of r.stdout.split("\n")) {
    const m = /(?:=>\s*)?(\/\S+)\s+\(0x/.exec(line);
    if (m) libs.push(m[1]!);
  }
  return libs;
}

function buildRoot(release: string, modulesDep: string): RootBuilder {
  const root = new RootBuilder();
  for (const d of [
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib",
    "/usr/lib64",
    "/proc",
    "/sys",
    "/dev",
    "/tmp",
    "/run",
  ]) {
    root.dir(d);
  }
  root.dir("/root");
  // Debian 12 is merged-/usr: /bin, /sbin, /lib, /lib64 are symlinks into /usr.
  for (const d of ["bin", "sbin", "lib", "lib64"]) root.symlink(`/${d}`, `usr/${d}`);
  root.entries.push({ kind: "chardev", path: "dev/console", major: 5, minor: 1 });

  for (const bin of GUEST_BINARIES) {
    if (!fs.existsSync(bin)) {
      throw new GuestImageError(
        `${bin} is missing on the host (run \`bash scripts/setup-kernel.sh\` as root)`,
      );
    }
    root.copy(bin);
    for (const lib of sharedLibraries(bin)) root.copy(lib);
  }
  for (const f of GUEST_FILES) root.copy(f);

  // busybox-static and its applets; the real tools above keep their own paths.
  if (!fs.existsSync(BUSYBOX)) throw new GuestImageError(`${BUSYBOX} is missing (install busybox-static)`);
  root.copy(BUSYBOX);
  const applets = execFileSync(BUSYBOX, ["--list-full"], { encoding: "utf8" }).split("\n").filter(Boolean);
  for (const applet of applets) {
    const p = `/${applet.replace(/^(s?bin)\//, "usr/$1/")}`;
    if (applet === "linuxrc" || root.has(p)) continue;
    root.symlink(p, "/usr/bin/busybox");
  }

  const order = moduleLoadOrder(modulesDep, GUEST_MODULES);
  const modDir = `/lib/modules/${release}`;
  for (const mod of order) root.copy(`${modDir}/${mod}`);
  // A modules.dep with just these modules, for busybox modprobe if the kernel requests one.
  const depLines = modulesDep.split("\n").filter((l) => order.includes(l.slice(0, l.indexOf(":"))));
  root.file(`/usr/lib/modules/${release}/modules.dep`, `${depLines.join("\n")}\n`);
  const list = order.map((m) => {
    const name = path.basename(m).replace(/\.ko(\.\w+)?$/, "");
    const args = MODULE_ARGS[name];
    return args ? `${m} ${args}` : m;
  });
  root.file("/etc/udm/modules", `${list.join("\n")}\n`);
  root.file("/init", fs.readFileSync(INIT_SCRIPT), 0o755);
  root.file("/etc/udm/layout", `${IMAGE_LAYOUT_VERSION}\n`);
  return root;
}

let memo: GuestImage | null = null;

/**
 * Returns the cached guest image, building it first if an input changed. Safe to call from several
 * processes at once: each builds into a private directory and renames it into place.
 *
 * @example
 * ```ts
 * const image = prepareGuestImage();
 * // qemu-system-x86_64 -kernel image.vmlinux -initrd image.initramfs ...
 * ```
 */
export function prepareGuestImage(): GuestImage {
  if (memo) return memo;
  const release = findKernelRelease();
  const vmlinuz = `/boot/vmlinuz-${release}`;
  const modulesDep = fs.readFileSync(`/lib/modules/${release}/modules.dep`, "utf8");
  const root = buildRoot(release, modulesDep);
  const kst = fs.statSync(vmlinuz);
  const key = createHash("sha256")
    .update(root.digest())
    .update(`${vmlinuz} ${kst.size} ${kst.mtimeMs}`)
    .digest("hex")
    .slice(0, 16);
  const base = cacheRoot();
  const dir = path.join(base, `${release}-${key}`);
  const image: GuestImage = {
    kernelRelease: release,
    vmlinux: path.join(dir, "vmlinux"),
    initramfs: path.join(dir, "initramfs.cpio"),
    dir,
  };
  if (!fs.existsSync(path.join(dir, "complete"))) {
    fs.mkdirSync(base, { recursive: true });
    const tmp = fs.mkdtempSync(path.join(base, ".build-"));
    try {
      fs.writeFileSync(path.join(tmp, "vmlinux"), extractVmlinux(fs.readFileSync(vmlinuz)));
      fs.writeFileSync(path.join(tmp, "initramfs.cpio"), writeCpio(root.entries));
      fs.writeFileSync(path.join(tmp, "complete"), `${new Date().toISOString()}\n`);
      try {
        fs.renameSync(tmp, dir);
      } catch (e) {
        // Another process finished the same build first: use theirs.
        if (!fs.existsSync(path.join(dir, "complete"))) throw e;
      }
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
    // Older builds of this release are stale now.
    for (const name of fs.readdirSync(base)) {
      if (name.startsWith(`${release}-`) && name !== path.basename(dir)) {
        fs.rmSync(path.join(base, name), { recursive: true, force: true });
      }
    }
  }
  memo = image;
  return image;
}
