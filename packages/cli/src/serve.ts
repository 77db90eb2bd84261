import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import {
  type BlockDevice,
  formatSize,
  nativeAddonInfo,
  SECTOR_SIZE,
  type TargetProgress,
  tuneMallocForDataPath,
} from "@udm/kcopyd";
import { compileAllowList } from "@udm/nbd-server";
import { captiveVariables, exportUri, runCaptive, type ServeAddress, watchParent } from "./captive.js";
import { controlHandlers, startControlServer } from "./control-server.js";
import {
  DeviceManager,
  type ExportAllowList,
  type ExportTable,
  type TableRequest,
} from "./device-manager.js";
import { canonicalSpec } from "./device-pool.js";
import { ensureEmbeddedDefault, lockDataDir } from "./embedded-default.js";
import type { Logger } from "./logger.js";
import { MetadataRecord } from "./metadata-record.js";
import { METADATA_RECORD_NAME, startFromRecord } from "./metadata-start.js";
import { sdNotify, takeListenFds, unixSocketPath } from "./systemd.js";
import { checkDeviceName, parseTableFile } from "./table-parser.js";
import { allTargets, createNbdServer, registerDeviceSchemes } from "./targets.js";
import { UsageError } from "./usage-error.js";

/** The NBD port the protocol registers (IANA), used when `--listen` is not given. */
export const DEFAULT_NBD_PORT = 10809;
export const DEFAULT_LISTEN_HOST = "127.0.0.1";
/**
 * How long a stopping server lets requests in flight finish before their targets cut them short
 * (`abortRequests`): a huge WRITE_ZEROES to a snapshot must not hold up the exit for minutes.
 */
export const SHUTDOWN_GRACE_MS = 2000;
export { CONTROL_SOCKET_NAME, DEFAULT_DATA_DIR } from "./defaults.js";

import { CONTROL_SOCKET_NAME } from "./defaults.js";

/**
 * On SIGTERM/SIGINT, resuming held I/O and closing the devices each wait at most this long (the
 * NBD server bounds its own drain and flush the same way): a device that never answers a request
 * must not keep `udm serve` from stopping. A step that times out is logged and the exit code is 1.
 */
export const STOP_STEP_TIMEOUT_MS = 3000;

/** What serve needs from the NBD server (`NbdServer` of @udm/nbd-server). */
export interface NbdServerLike extends ExportTable {
  exports(): Array<{ name: string; connections: number | { size: number } | unknown[] }>;
  listen(address: { host?: string; port?: number } | { path: string } | { fd: number }): Promise<string>;
  /** Accepted connections wait until the returned function is called (see NbdServer). */
  holdConnections(): () => void;
  close(options?: { force?: boolean }): Promise<void>;
}

export interface ServeOptions {
  tableFile?: string;
  exports: string[];
  listen?: string;
  unix?: string;
  control?: string;
  dataDir: string;
  /** `--allow-address EXPORT=CIDR[,CIDR...]` values (repeatable; entries of one export add up). */
  allowAddress?: string[];
  /** `--allow-cert EXPORT=SUBJECT` values (repeatable; needs `tls.caFile`). */
  allowCert?: string[];
  tls?: { certFile: string; keyFile: string; caFile?: string; verifyClient: boolean; required: boolean };
  /** `-r`: every export refuses writes (NBD_FLAG_READ_ONLY). */
  readOnly?: boolean;
  /** `--read-only-export NAME`: these exports refuse writes (repeatable). */
  readOnlyExports?: string[];
  /** `--run CMD`: captive mode, the server lives as long as CMD and exits with its status. */
  run?: string;
  /** `--exit-with-parent`: stop when the process that started udm ends. */
  exitWithParent?: boolean;
  /** `--print-uri`: stdout gets one URI per export (and address) instead of the banner. */
  printUri?: boolean;
  /** `--pidfile FILE`: written once the server listens, removed when it stops. */
  pidfile?: string;
}

/** Parses `HOST:PORT`, `[v6]:PORT` or `PORT`. */
export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text) ?? /^()()(\d+)$/.exec(text);
  const port = m ? Number(m[3]) : Number.NaN;
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new UsageError(
      `--listen "${text}": expected HOST:PORT (e.g. 127.0.0.1:10809, [::1]:10809, 0.0.0.0:0)`,
    );
  }
  return { host: m[1] || m[2] || DEFAULT_LISTEN_HOST, port };
}

/** Parses `NAME=DEVICE` of `--export`. */
export function parseExport(text: string): { name: string; spec: string } {
  const eq = text.indexOf("=");
  if (eq <= 0 || eq === text.length - 1) {
    throw new UsageError(`--export "${text}": expected NAME=DEVICE (e.g. disk=disk.img, scratch=mem:1G)`);
  }
  const name = text.slice(0, eq);
  try {
    checkDeviceName(name, { file: "--export", line: 1 });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  return { name, spec: text.slice(eq + 1) };
}

/**
 * Parses the `--allow-address EXPORT=CIDR[,CIDR...]` and `--allow-cert EXPORT=SUBJECT` values
 * into allow lists by export name, checking each entry as the NBD server will (a bad one is a
 * UsageError naming the flag and the value). Repeated flags for one export add entries; an
 * export with both kinds needs a matching address AND a matching certificate.
 *
 * @example
 * ```ts
 * parseAllowOptions(["backup=10.0.0.0/8,unix"], ["backup=CN=backup host"]);
 * // Map { "backup" => { addresses: ["10.0.0.0/8", "unix"], certSubjects: ["CN=backup host"] } }
 * ```
 */
export function parseAllowOptions(
  addressOptions: readonly string[],
  certOptions: readonly string[],
): Map<string, ExportAllowList> {
  const allow = new Map<string, ExportAllowList>();
  const entryOf = (name: string) => {
    let entry = allow.get(name);
    if (!entry) {
      entry = {};
      allow.set(name, entry);
    }
    return entry;
  };
  for (const text of addressOptions) {
    const { name, value } = splitAllowOption(
      "--allow-address",
      text,
      "EXPORT=CIDR[,CIDR...] (e.g. disk=10.0.0.0/8,unix)",
    );
    const addresses = value.split(",").map((a) => a.trim());
    checkAllowEntries("--allow-address", text, { addresses });
    const entry = entryOf(name);
    entry.addresses = [...(entry.addresses ?? []), ...addresses];
  }
  for (const text of certOptions) {
    const { name, value } = splitAllowOption(
      "--allow-cert",
      text,
      'EXPORT=SUBJECT (e.g. disk=backup-host or "disk=O=Example, CN=backup-host")',
    );
    checkAllowEntries("--allow-cert", text, { certSubjects: [value] });
    const entry = entryOf(name);
    entry.certSubjects = [...(entry.certSubjects ?? []), value];
  }
  return allow;
}

function splitAllowOption(option: string, text: string, expected: string): { name: string; value: string } {
  const eq = text.indexOf("=");
  const name = eq < 0 ? "" : text.slice(0, eq);
  const value = eq < 0 ? "" : text.slice(eq + 1);
  if (eq <= 0 || value.trim() === "") throw new UsageError(`${option} "${text}": expected ${expected}`);
  try {
    checkDeviceName(name, { file: option, line: 1 });
  } catch (err) {
    throw new UsageError(`${option} "${text}": ${(err as Error).message}`);
  }
  return { name, value };
}

function checkAllowEntries(option: string, text: string, allow: ExportAllowList): void {
  try {
    compileAllowList(allow);
  } catch (err) {
    throw new UsageError(`${option} "${text}": ${(err as Error).message}`);
  }
}

function connectionCount(c: unknown): number {
  if (typeof c === "number") return c;
  if (Array.isArray(c)) return c.length;
  if (c && typeof (c as { size?: unknown }).size === "number") return (c as { size: number }).size;
  return 0;
}

/**
 * Attach hints for one export (printed on start): an nbd-client line on its own `/dev/nbdN`
 * (`index`: the export's place in the banner) and an nbdinfo URI (`nbds` under TLS).
 */
export function attachHints(
  name: string,
  address: ServeAddress,
  options: { index?: number; tls?: boolean } = {},
): string[] {
  const dev = `/dev/nbd${options.index ?? 0}`;
  const tlsFlag = options.tls ? " -enable-tls" : "";
  const uri = exportUri(name, address, options.tls ?? false);
  if ("fd" in address) return uri ? [`nbdinfo '${uri}'`] : [];
  if ("path" in address) {
    return [`nbd-client -unix ${address.path} -N ${name}${tlsFlag} ${dev}`, `nbdinfo '${uri}'`];
  }
  return [`nbd-client ${address.host} ${address.port} -N ${name}${tlsFlag} ${dev}`, `nbdinfo ${uri}`];
}

/** The export table the device manager sees: `server`, with read-only applied per export. */
function readOnlyExports(server: NbdServerLike, all: boolean, names: ReadonlySet<string>): ExportTable {
  return {
    addExport: (name, device, options) =>
      server.addExport(name, device, {
        ...options,
        ...((all || names.has(name)) && { readOnly: true }),
      }),
    replaceExportDevice: (name, device) => server.replaceExportDevice(name, device),
    ...(server.renameExport && {
      renameExport: (name, newName, options) => server.renameExport!(name, newName, options),
    }),
    removeExport: (name) => server.removeExport(name),
  };
}

/** Reads the file an option names; a failure names the option and the file. */
function readOptionFile(file: string, option: string): string;
function readOptionFile(file: string, option: string, encoding: null): Buffer;
function readOptionFile(file: string, option: string, encoding: "utf8" | null = "utf8"): string | Buffer {
  try {
    return encoding ? readFileSync(file, encoding) : readFileSync(file);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new Error(
      `${option} ${file}: cannot read the file (${e.code ?? "error"}: ${e.message.replace(/^\w+: /, "")})`,
    );
  }
}

/** An allow list for a name no device of the initial table has is a typo, not a rule for later. */
function checkAllowedExportsExist(
  exportAllow: ReadonlyMap<string, ExportAllowList>,
  names: string[],
  options: ServeOptions,
): void {
  for (const name of exportAllow.keys()) {
    if (names.includes(name)) continue;
    const flag = [
      ...(options.allowAddress ?? []).map((v) => `--allow-address "${v}"`),
      ...(options.allowCert ?? []).map((v) => `--allow-cert "${v}"`),
    ].find((f) => f.split(" ")[1]?.startsWith(`"${name}=`));
    throw new UsageError(
      `${flag ?? "--allow-*"}: no export named "${name}" (exports: ${names.map((n) => `"${n}"`).join(", ") || "none"})`,
    );
  }
}

/**
 * Binds every NBD address of `udm serve`; a failure names the option and the address, with the
 * system's reason (EADDRINUSE: another process listens there).
 */
async function listenAll(
  server: NbdServerLike,
  listenFds: number[],
  listen: { host: string; port: number } | undefined,
  unix: string | undefined,
): Promise<ServeAddress[]> {
  const addresses: ServeAddress[] = [];
  for (const fd of listenFds) {
    const where = await server.listen({ fd });
    addresses.push({ fd, where: where.startsWith("fd ") ? (unixSocketPath(fd) ?? where) : where });
  }
  if (listen) {
    const where = `${listen.host.includes(":") ? `[${listen.host}]` : listen.host}:${listen.port}`;
    try {
      const bound = await server.listen(listen);
      const port = Number(/:(\d+)\/?$/.exec(bound)?.[1] ?? listen.port);
      addresses.push({ host: listen.host, port });
    } catch (err) {
      throw new Error(
        `--listen ${where}: ${listenFailure(err, "another process listens on that port (another udm serve?); choose another with --listen HOST:PORT")}`,
      );
    }
  }
  if (unix) {
    const path = resolve(unix);
    try {
      await server.listen({ path });
      addresses.push({ path });
    } catch (err) {
      // Node reports a missing folder as EACCES: say what is wrong.
      if (!existsSync(dirname(path))) throw new Error(`--unix ${path}: its folder does not exist (ENOENT)`);
      throw new Error(
        `--unix ${path}: ${listenFailure(err, "a server accepts on that socket, or a file that is not a socket is in the way")}`,
      );
    }
  }
  return addresses;
}

function listenFailure(err: unknown, inUse: string): string {
  const e = err as NodeJS.ErrnoException;
  const reasons: Record<string, string> = {
    EADDRINUSE: `the address is in use (EADDRINUSE): ${inUse}`,
    EACCES: "permission denied (EACCES)",
    EADDRNOTAVAIL: "no such local address (EADDRNOTAVAIL)",
    ENOENT: "its folder does not exist (ENOENT)",
    ENOTDIR: "a part of the path is not a folder (ENOTDIR)",
  };
  return (e.code && reasons[e.code]) ?? `cannot listen (${e.code ?? "error"}: ${e.message})`;
}

/**
 * Logs what a start recovers and when it is done: the targets log what they found as they are
 * activated (a mirror's regions out of sync, a merge started with its chunks, a persistent COW
 * loaded with its exceptions); this adds each snapshot's exceptions, waits for every resync and
 * merge still running, and logs "recovery finished" with the time since the devices were
 * built. After a `kill -9` these lines say what the restart repairs and when it is done.
 */
function watchRecovery(manager: DeviceManager, log: Logger): { stop(): void } {
  const startedMs = Date.now();
  const pending = new Map<string, TargetProgress["operation"]>();
  for (const name of manager.names()) {
    for (const line of manager.status(name)) {
      if (line.targetType !== "snapshot") continue;
      const chunkSectors = Number(manager.table(name)[0]?.args.trim().split(/\s+/)[3]);
      const m = /^(\d+)\/(\d+) (\d+)/.exec(line.args.trim());
      const exceptions = m && chunkSectors > 0 ? (Number(m[1]) - Number(m[3])) / chunkSectors : undefined;
      log.info({ device: name, exceptions, status: line.args }, "recovery: snapshot reloaded from its COW");
    }
    const progress = manager.info(name).progress;
    if (progress && progress.doneBytes < progress.totalBytes) {
      pending.set(name, progress.operation);
      log.info({ device: name, ...progress }, `recovery: ${progress.operation} running`);
    }
  }
  if (pending.size === 0) {
    log.info({ ms: Date.now() - startedMs }, "recovery finished: nothing left to resync or merge");
    return { stop: () => {} };
  }
  const timer = setInterval(() => {
    for (const [name, operation] of [...pending]) {
      const progress = manager.has(name) ? manager.info(name).progress : null;
      if (progress && progress.doneBytes < progress.totalBytes) continue;
      pending.delete(name);
      log.info(
        { device: name, ms: Date.now() - startedMs },
        manager.has(name) ? `recovery: ${operation} finished` : "recovery: device removed",
      );
    }
    if (pending.size > 0) return;
    clearInterval(timer);
    log.info({ ms: Date.now() - startedMs }, "recovery finished: every mirror in sync, every merge done");
  }, RECOVERY_POLL_MS);
  timer.unref();
  return { stop: () => clearInterval(timer) };
}

/** How often the start-up recovery's progress is looked at. */
const RECOVERY_POLL_MS = 250;

/**
 * `udm serve`: builds every device of the table (or `--export`s, or the embedded default in the
 * data directory), serves each as an NBD export of the same name, answers the control socket,
 * and on SIGTERM/SIGINT drains, flushes and closes everything (a second signal forces exit).
 * Resolves when the server has stopped.
 */
export async function runServe(options: ServeOptions, log: Logger): Promise<void> {
  // Socket activation: systemd bound the sockets; udm binds nothing else.
  const listenFds = takeListenFds();
  if (listenFds.length > 0 && (options.listen || options.unix)) {
    throw new UsageError(
      `socket activation (LISTEN_FDS=${listenFds.length}) passes the sockets: drop --listen and --unix`,
    );
  }
  const listen = options.listen
    ? parseListen(options.listen)
    : options.unix || listenFds.length > 0
      ? undefined
      : { host: DEFAULT_LISTEN_HOST, port: DEFAULT_NBD_PORT };
  const exportsWanted = options.exports.map(parseExport);
  const dataDir = resolve(options.dataDir);
  const controlPath = resolve(options.control ?? resolve(dataDir, CONTROL_SOCKET_NAME));
  const exportAllow = parseAllowOptions(options.allowAddress ?? [], options.allowCert ?? []);
  if (options.allowCert?.length && !options.tls?.caFile) {
    throw new UsageError("--allow-cert needs --tls-ca (client certificates are verified against it)");
  }

  registerDeviceSchemes();
  const addon = nativeAddonInfo();
  log.info(
    { kind: addon.kind, path: addon.path, ...(addon.reason && { reason: addon.reason }) },
    "native addon",
  );
  // Freed socket chunks and payloads stay in the heap for the next requests (issue 16).
  tuneMallocForDataPath();
  const tls = options.tls && {
    cert: readOptionFile(options.tls.certFile, "--tls-cert", null),
    key: readOptionFile(options.tls.keyFile, "--tls-key", null),
    ...(options.tls.caFile && { ca: readOptionFile(options.tls.caFile, "--tls-ca", null) }),
    requireClientCert: options.tls.verifyClient,
    required: options.tls.required,
  };
  const server: NbdServerLike = await createNbdServer({ log, ...(tls && { tls }) });
  const exportTable =
    options.readOnly || options.readOnlyExports?.length
      ? readOnlyExports(server, Boolean(options.readOnly), new Set(options.readOnlyExports))
      : server;
  // The metadata record of this server (issue 15): every state-changing command is written to
  // it before it is acknowledged, and the next start activates what it says.
  const record = new MetadataRecord(join(dataDir, METADATA_RECORD_NAME));
  const manager = new DeviceManager({
    targets: allTargets(),
    log,
    exports: exportTable,
    exportAllow,
    record: (state) => record.write(state),
  });

  // First the NBD addresses: a port in use or an unusable socket path fails here, before the
  // data directory, an image or the control socket exists. Clients that connect meanwhile wait.
  const releaseConnections = server.holdConnections();
  const addresses = await listenAll(server, listenFds, listen, options.unix).catch(async (err) => {
    await server.close({ force: true });
    throw err;
  });

  let control: Awaited<ReturnType<typeof startControlServer>>;
  try {
    mkdirSync(dirname(controlPath), { recursive: true, mode: 0o700 });
    // Then the control socket: a second server on the same one (and data) stops here, before opening devices.
    control = await startControlServer(
      controlPath,
      controlHandlers(manager, () =>
        server.exports().map((x) => ({ name: x.name, connections: connectionCount(x.connections) })),
      ),
      log,
    );
  } catch (err) {
    await server.close({ force: true });
    throw err;
  }

  let tableFile = options.tableFile;
  let createdDefault = false;
  let unlockDataDir = () => {};
  const exportSpecs: string[] = [];
  let locked = false;
  const lock = () => {
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    unlockDataDir = lockDataDir(dataDir);
    locked = true;
  };
  try {
    // The data directory holds the record: one server at a time. A data directory that does not
    // exist yet is created by the record's first write (a start that fails creates nothing), and
    // locked then.
    if (existsSync(dataDir)) lock();
    if (!tableFile && exportsWanted.length === 0) {
      if (!locked) lock();
      const made = await ensureEmbeddedDefault(dataDir);
      tableFile = made.tableFile;
      createdDefault = made.created;
      log.info(
        { tableFile, created: made.created },
        made.created ? "embedded default created" : "embedded default reused",
      );
    }
    const requests: TableRequest[] = [];
    // What the record was started from: the table file's text, then one line per --export.
    let sourceText = "";
    if (tableFile) {
      sourceText = readOptionFile(tableFile, "--table");
      for (const table of parseTableFile(sourceText, tableFile, manager.registry)) {
        requests.push({ table, baseDir: dirname(resolve(tableFile)) });
      }
    }
    for (const e of exportsWanted) {
      // A whole-device linear table: the spec is served as it is, and stays reloadable.
      const spec = canonicalSpec(e.spec, process.cwd());
      const dev: BlockDevice = await manager.pool.acquire(spec);
      exportSpecs.push(spec);
      requests.push({
        table: {
          name: e.name,
          lines: [
            {
              startSectors: 0,
              lengthSectors: Math.floor(dev.sizeBytes / SECTOR_SIZE),
              targetType: "linear",
              args: [spec, "0"],
              source: { file: "--export", line: 1 },
            },
          ],
        },
        baseDir: process.cwd(),
      });
      sourceText += `--export ${e.name}=${spec}\n`;
    }
    await startFromRecord(
      manager,
      record,
      {
        tableFile: tableFile ? resolve(tableFile) : "--export",
        tableText: sourceText,
        requests,
        check: (names) => {
          checkAllowedExportsExist(exportAllow, names, options);
          for (const name of options.readOnlyExports ?? []) {
            if (!names.includes(name)) {
              throw new UsageError(
                `--read-only-export "${name}": no export of that name (exports: ${names.map((n) => `"${n}"`).join(", ") || "none"})`,
              );
            }
          }
        },
      },
      log,
    );
    if (!locked) lock();
  } catch (err) {
    await control.close();
    await server.close({ force: true });
    await manager.closeAll().catch(() => undefined);
    for (const spec of exportSpecs) await manager.pool.release(spec).catch(() => undefined);
    unlockDataDir();
    throw err;
  }
  // The devices hold their own references now.
  for (const spec of exportSpecs) await manager.pool.release(spec);
  releaseConnections();
  const recovery = watchRecovery(manager, log);

  // The signal handlers first: whoever reads the "listening" line may send SIGTERM at once.
  let requestStop: (reason: NodeJS.Signals | "run" | "parent") => void = () => {};
  const stopped = new Promise<void>((resolveStopped) => {
    let stopping = false;
    const stop = (signal: NodeJS.Signals | "run" | "parent") => {
      if (stopping) {
        log.warn({ signal }, "second signal: forcing exit");
        server.close({ force: true }).finally(() => process.exit(1));
        setTimeout(() => process.exit(1), 2000).unref();
        return;
      }
      stopping = true;
      // systemd shows the unit as deactivating while udm drains and flushes.
      void sdNotify(log, "STOPPING=1");
      log.info(
        { signal },
        signal === "run"
          ? "stopping (--run command ended): draining connections, flushing and closing devices"
          : signal === "parent"
            ? "stopping (parent process ended): draining connections, flushing and closing devices"
            : "stopping: draining connections, flushing and closing devices",
      );
      const step = async (what: string, work: Promise<unknown>) => {
        let timer: NodeJS.Timeout | undefined;
        const late = new Promise<false>((done) => {
          timer = setTimeout(() => done(false), STOP_STEP_TIMEOUT_MS);
        });
        try {
          if (!(await Promise.race([work.then(() => true), late]))) {
            log.error(
              { timeoutMs: STOP_STEP_TIMEOUT_MS },
              `stopping: ${what} did not finish in time; going on`,
            );
            process.exitCode = 1;
          }
        } finally {
          clearTimeout(timer);
        }
      };
      (async () => {
        recovery.stop();
        await control.close();
        // Held requests would never drain: let them through first.
        await step("resuming held I/O", manager.resumeAll());
        // A request still running after the grace (a huge snapshot WRITE_ZEROES) stops issuing pieces.
        const cutShort = setTimeout(() => {
          log.warn(
            { graceMs: SHUTDOWN_GRACE_MS },
            "requests still running: failing what they have not started",
          );
          for (const name of manager.names()) manager.device(name).current.abortRequests?.();
        }, SHUTDOWN_GRACE_MS);
        await server.close();
        clearTimeout(cutShort);
        await step("closing the devices", manager.closeAll());
      })()
        .finally(() => {
          unlockDataDir();
          if (options.pidfile) rmSync(resolve(options.pidfile), { force: true });
        })
        .then(
          () => {
            log.info("stopped");
            process.off("SIGINT", stop);
            process.off("SIGTERM", stop);
            resolveStopped();
          },
          (err: Error) => {
            log.error({ err }, "stopping failed");
            process.exitCode = 1;
            resolveStopped();
          },
        );
    };
    process.on("SIGINT", stop);
    process.on("SIGTERM", stop);
    requestStop = stop;
  });
  const useTls = options.tls !== undefined;
  const out: string[] = [];
  for (const a of addresses) {
    out.push(
      `udm: listening on ${exportUri("", a, useTls).replace(/\/$/, "") || "a passed socket"}${"fd" in a ? ` (socket activation, fd ${a.fd})` : ""} (control: ${controlPath})`,
    );
  }
  if (createdDefault) out.push(`udm: created the embedded default in ${dataDir} (table: ${tableFile})`);
  for (const [index, name] of manager.names().entries()) {
    const info = manager.info(name);
    const ro = options.readOnly || options.readOnlyExports?.includes(name) ? ", read-only" : "";
    out.push(`  ${name}: ${info.targets.join("+")}, ${formatSize(info.sizeBytes)}${ro}`);
    for (const a of addresses)
      for (const hint of attachHints(name, a, { index, tls: useTls })) out.push(`      ${hint}`);
  }
  if (options.printUri) {
    const uris = manager
      .names()
      .flatMap((name) => addresses.map((a) => exportUri(name, a, useTls)))
      .filter((uri) => uri !== "");
    process.stdout.write(`${uris.join("\n")}\n`);
  } else if (!options.run) {
    process.stdout.write(`${out.join("\n")}\n`);
  }
  log.debug({ addresses, exports: manager.names(), tls: useTls }, "serving");
  if (options.pidfile) writeFileSync(resolve(options.pidfile), `${process.pid}\n`);
  await sdNotify(log);

  const unwatch = options.exitWithParent ? watchParent(() => requestStop("parent")) : () => {};
  if (options.run) {
    const first = manager.names()[0] ?? "";
    const tlsMode = !options.tls ? "off" : options.tls.required ? "require" : "on";
    const status = await runCaptive(options.run, captiveVariables(first, addresses[0]!, tlsMode), log);
    requestStop("run");
    await stopped;
    unwatch();
    if (process.exitCode === undefined || process.exitCode === 0) process.exitCode = status;
    return;
  }
  await stopped;
  unwatch();
}
