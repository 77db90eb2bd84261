/**
 * Boots Debian's kernel in qemu (TCG) as an NBD client of a server the test runs on 127.0.0.1, runs
 * a shell job in the guest and returns its output and exit status.
 *
 * Wiring: `-netdev user,restrict=on` cuts the guest off from everything; its only way out is the
 * guestfwd 10.0.2.100:PORT, which spawns relay.py per connection, and the relay connects to
 * 127.0.0.1:PORT only. Kernel console on ttyS0 (a file), the job's stdin/stdout on ttyS1 (qemu's
 * stdio), ended by `__UDM_JOB_RC__=N`.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { writeCpio } from "./cpio.js";
import { cacheRoot, prepareGuestImage } from "./guest-image.js";

export const QEMU = "qemu-system-x86_64";
/** The address the guest dials; slirp hands it to the relay. */
export const GUEST_SERVER_ADDRESS = "10.0.2.100";
/** Guest RAM: the initramfs (~40 MiB unpacked), tmpfs files and page cache for a few 100 MiB. */
const GUEST_MEMORY_MIB = 768;
const DEFAULT_TIMEOUT_MS = 60_000;
const RC_MARKER = /__UDM_JOB_RC__=(\d+)/;
/** A line the job prints (via `host_call` in lib.sh) to ask the test for something mid-run. */
const HOST_REQUEST = /^@@host (.*)$/;
const PYTHON = "/usr/bin/python3";
const SETPRIV = "/usr/bin/setpriv";
const RELAY_SOURCE = fileURLToPath(new URL("./relay.py", import.meta.url));
const SCENARIO_DIR = fileURLToPath(new URL("./scenarios/", import.meta.url));

export interface GuestExport {
  /** Export name sent with NBD_OPT_GO (nbd-client -N). */
  name: string;
  /** /dev/nbdN to attach it to. */
  device: string;
  /** nbd-client -C: TCP connections. Default 1. */
  connections?: number;
  /** nbd-client -b: logical block size. Default 4096. */
  blockSize?: number;
}

export interface RunGuestOptions {
  /** Port of the NBD server on 127.0.0.1. */
  port: number;
  exports: readonly GuestExport[];
  /**
   * The job: a path to a shell script, or its text (anything with a newline). lib.sh is at
   * /run/udm/lib.sh and every scenarios/*.sh at /run/udm/scenarios/.
   */
  script: string;
  /** Extra per-run files, by absolute guest path (e.g. "/run/udm/pattern.bin"). */
  files?: Record<string, Buffer | string>;
  /** Variables for the job, exported by lib.sh (names: shell identifiers; values: no newlines). */
  env?: Record<string, string | number>;
  /** Answers `host_call ARGS` from the job; the returned line is sent back to it. */
  onHostRequest?: (request: string) => Promise<string> | string;
  timeoutMs?: number;
  /** Aborting ends the guest at once, like a timeout. */
  signal?: AbortSignal;
}

export interface GuestResult {
  /** The job's exit status; null if no marker was seen (timeout, panic, init failure). */
  status: number | null;
  timedOut: boolean;
  /** The job's stdout+stderr (ttyS1), without the marker. */
  output: string;
  /** The kernel console (ttyS0). */
  consoleLog: string;
  elapsedMs: number;
  /** qemu's PID (already gone when runGuest resolves). */
  pid: number | undefined;
}

export class GuestToolMissingError extends Error {
  override name = "GuestToolMissingError";
}

/** Throws with what to install if qemu, the kernel or a guest tool is missing. */
export function checkGuestPrerequisites(): void {
  const qemu = spawnSync(QEMU, ["--version"], { encoding: "utf8" });
  if (qemu.error || qemu.status !== 0) {
    throw new GuestToolMissingError(
      `${QEMU} not runnable (${qemu.error?.message ?? qemu.stderr}); run \`bash scripts/setup-kernel.sh\` as root`,
    );
  }
  if (!fs.existsSync(PYTHON)) throw new GuestToolMissingError(`${PYTHON} is missing (install python3)`);
  if (!fs.existsSync(SETPRIV)) throw new GuestToolMissingError(`${SETPRIV} is missing (install util-linux)`);
  prepareGuestImage();
}

/** The relay lives in the cache dir: the guestfwd command line is split on spaces. */
function relayPath(): string {
  const dir = cacheRoot();
  fs.mkdirSync(dir, { recursive: true });
  const source = fs.readFileSync(RELAY_SOURCE);
  const target = path.join(dir, "relay.py");
  if (!fs.existsSync(target) || !fs.readFileSync(target).equals(source)) {
    const tmp = `${target}.${process.pid}`;
    fs.writeFileSync(tmp, source, { mode: 0o755 });
    fs.renameSync(tmp, target);
  }
  if (/\s/.test(target)) throw new GuestToolMissingError(`relay path "${target}" must not contain spaces`);
  return target;
}

function perRunArchive(options: RunGuestOptions): Buffer {
  const script = options.script.includes("\n") ? options.script : fs.readFileSync(options.script, "utf8");
  const exportsList = options.exports.map((e) => {
    if (!/^\S+$/.test(e.name))
      throw new RangeError(`export name "${e.name}" must be non-empty without spaces`);
    if (!/^\/dev\/nbd\d+$/.test(e.device)) throw new RangeError(`device "${e.device}" must be /dev/nbdN`);
    return `${e.name} ${e.device} ${e.connections ?? 1} ${e.blockSize ?? 4096}`;
  });
  const files = new Map<string, Buffer | string>([
    ["run/udm/port", `${options.port}\n`],
    ["run/udm/exports", `${exportsList.join("\n")}\n`],
    ["run/udm/job.sh", script],
    ["run/udm/lib.sh", fs.readFileSync(path.join(SCENARIO_DIR, "lib.sh"))],
  ]);
  // Every scenario rides along, so a job can chain them: `DEV=/dev/nbd1 sh /run/udm/scenarios/x.sh`.
  for (const name of fs.readdirSync(SCENARIO_DIR)) {
    if (name.endsWith(".sh"))
      files.set(`run/udm/scenarios/${name}`, fs.readFileSync(path.join(SCENARIO_DIR, name)));
  }
  const envLines = Object.entries(options.env ?? {}).map(([k, v]) => {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k))
      throw new RangeError(`env name "${k}" is not a shell identifier`);
    const text = String(v);
    if (/[\n\0]/.test(text)) throw new RangeError(`env ${k} must not contain newlines`);
    return `export ${k}='${text.replace(/'/g, "'\\''")}'`;
  });
  files.set("run/udm/env", `${envLines.join("\n")}\n`);
  for (const [p, data] of Object.entries(options.files ?? {})) {
    if (!p.startsWith("/run/udm/")) throw new RangeError(`extra file "${p}" must be under /run/udm/`);
    files.set(p.slice(1), data);
  }
  const dirs = new Set<string>();
  for (const p of files.keys()) {
    for (let d = path.dirname(p); d !== "."; d = path.dirname(d)) dirs.add(d);
  }
  return writeCpio([
    ...[...dirs].sort().map((d) => ({ kind: "dir" as const, path: d })),
    ...[...files].map(([p, data]) => ({ kind: "file" as const, path: p, data, mode: 0o755 })),
  ]);
}

function killGroup(child: ChildProcess): void {
  if (child.pid === undefined) return;
  try {
    // qemu was started as its own process group leader: this ends it and the relays it spawned
    // (which may outlive qemu by a moment).
    process.kill(-child.pid, "SIGKILL");
  } catch {
    // already gone
  }
}

/**
 * Boots the guest, attaches `exports` from 127.0.0.1:`port`, runs `script`, powers off.
 *
 * @example
 * ```ts
 * const addr = await server.listen({ host: "127.0.0.1", port: 0 });
 * const r = await runGuest({
 *   port: Number(addr.split(":")[1]),
 *   exports: [{ name: "disk", device: "/dev/nbd0" }],
 *   script: "dd if=/dev/nbd0 bs=4096 count=1 | sha256sum",
 * });
 * // r.status === 0, r.output holds the job's output
 * ```
 */
export async function runGuest(options: RunGuestOptions): Promise<GuestResult> {
  const image = prepareGuestImage();
  const relay = relayPath();
  const port = options.port;
  if (!Number.isInteger(port) || port <= 0 || port > 65535)
    throw new RangeError(`port ${port} is not a TCP port`);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "udm-guest-"));
  const started = Date.now();
  const initrd = path.join(work, "initrd.cpio");
  const consoleFile = path.join(work, "console.log");
  fs.writeFileSync(initrd, Buffer.concat([fs.readFileSync(image.initramfs), perRunArchive(options)]));

  const args = [
    "-accel",
    "tcg",
    "-m",
    String(GUEST_MEMORY_MIB),
    "-smp",
    "1",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-kernel",
    image.vmlinux,
    "-initrd",
    initrd,
    "-append",
    "console=ttyS0 panic=-1 loglevel=4 rdinit=/init i8042.noaux i8042.nokbd tsc=reliable",
    "-serial",
    `file:${consoleFile}`,
    "-serial",
    "stdio",
    "-netdev",
    `user,id=n0,restrict=on,guestfwd=tcp:${GUEST_SERVER_ADDRESS}:${port}-cmd:${PYTHON} ${relay} ${port}`,
    "-device",
    "virtio-net-pci,netdev=n0,romfile=",
  ];
  // setpriv execs qemu (same PID) with PR_SET_PDEATHSIG: if this process is killed outright, qemu
  // dies too, and its relays follow when their guest socket closes.
  const child = spawn(SETPRIV, ["--pdeathsig", "KILL", QEMU, ...args], {
    detached: true,
    stdio: ["pipe", "pipe", "pipe"],
  });
  const chunks: Buffer[] = [];
  let stderr = "";
  let pending = "";
  let timedOut = false;
  let requestError: unknown = null;
  let requests = Promise.resolve();

  child.stderr.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  child.stdin.on("error", () => {}); // qemu gone while answering
  child.stdout.on("data", (d: Buffer) => {
    chunks.push(d);
    pending += d.toString("latin1");
    let nl = pending.indexOf("\n");
    while (nl >= 0) {
      const line = pending.slice(0, nl).replace(/\r$/, "");
      pending = pending.slice(nl + 1);
      const m = HOST_REQUEST.exec(line);
      if (m) {
        const request = m[1]!;
        requests = requests.then(async () => {
          try {
            if (!options.onHostRequest)
              throw new Error(`job asked the host "${request}" but no onHostRequest`);
            const reply = await options.onHostRequest(request);
            child.stdin.write(`${reply.replace(/\n/g, " ")}\n`);
          } catch (e) {
            requestError ??= e;
            child.stdin.write("__UDM_HOST_ERROR__\n");
          }
        });
      }
      nl = pending.indexOf("\n");
    }
  });

  const exited = new Promise<void>((resolve) => {
    child.on("exit", () => resolve());
    child.on("error", (e) => {
      stderr += String(e);
      resolve();
    });
  });
  const timer = setTimeout(() => {
    timedOut = true;
    killGroup(child);
  }, options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
  const onParentExit = () => killGroup(child);
  process.once("exit", onParentExit);
  const onAbort = () => killGroup(child);
  options.signal?.addEventListener("abort", onAbort, { once: true });
  if (options.signal?.aborted) onAbort();
  try {
    await exited;
    await requests;
  } finally {
    clearTimeout(timer);
    killGroup(child); // relays still draining
    process.removeListener("exit", onParentExit);
    options.signal?.removeEventListener("abort", onAbort);
  }

  const raw = Buffer.concat(chunks).toString("utf8");
  const marker = RC_MARKER.exec(raw);
  const consoleLog = fs.existsSync(consoleFile) ? fs.readFileSync(consoleFile, "utf8") : "";
  fs.rmSync(work, { recursive: true, force: true });
  if (requestError) throw requestError;
  if (!marker && !timedOut && stderr.trim() && chunks.length === 0) {
    throw new Error(`${QEMU} failed: ${stderr.trim()}`);
  }
  return {
    status: marker ? Number(marker[1]) : null,
    timedOut,
    output: marker ? raw.slice(0, marker.index) : raw,
    consoleLog: stderr ? `${consoleLog}\n[qemu stderr]\n${stderr}` : consoleLog,
    elapsedMs: Date.now() - started,
    pid: child.pid,
  };
}

/** A readable failure message: the job output and the console's tail. */
export function describeGuestRun(r: GuestResult): string {
  const tail = r.consoleLog.split("\n").slice(-40).join("\n");
  return `guest status ${r.status}${r.timedOut ? " (timed out)" : ""} after ${r.elapsedMs} ms\n--- job output ---\n${r.output}\n--- console (tail) ---\n${tail}`;
}
