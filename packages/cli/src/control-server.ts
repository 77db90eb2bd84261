import { existsSync, lstatSync, readFileSync, unlinkSync } from "node:fs";
import { chmod } from "node:fs/promises";
import { connect, createServer, type Server, type Socket } from "node:net";
import { isAbsolute } from "node:path";
import { IoError } from "@udm/kcopyd";
import { type ControlRequest, type ControlResponse, MAX_CONTROL_LINE_BYTES } from "./control-protocol.js";
import { type DeviceManager, DeviceManagerError, type TableRequest } from "./device-manager.js";
import type { Logger } from "./logger.js";
import { parseDeviceTable, parseTableFile, TableParseError } from "./table-parser.js";

/** Export connection counts, when an NBD server is attached. */
export type ExportLister = () => Array<{ name: string; connections: number }>;

type Handler = (args: Record<string, unknown>) => Promise<unknown>;

function str(args: Record<string, unknown>, key: string): string {
  const v = args[key];
  if (typeof v !== "string" || v === "")
    throw new DeviceManagerError("EINVAL", `request needs "${key}" (a string)`);
  return v;
}

function optStr(args: Record<string, unknown>, key: string): string | undefined {
  const v = args[key];
  return typeof v === "string" && v !== "" ? v : undefined;
}

/**
 * Turns the `table` arguments of create/reload into tables. `lines` are dmsetup lines of one
 * device; a file in the `NAME: ...` format may define several devices (create only).
 */
export function tableRequests(
  manager: DeviceManager,
  args: Record<string, unknown>,
  options: { single: boolean },
): TableRequest[] {
  const name = optStr(args, "name");
  const file = optStr(args, "file") ?? "--table";
  const cwd = optStr(args, "cwd") ?? process.cwd();
  if (!isAbsolute(cwd)) throw new DeviceManagerError("EINVAL", `"cwd" must be absolute, got "${cwd}"`);
  const baseDir = optStr(args, "baseDir") ?? cwd;
  const lines = args.lines;
  if (!Array.isArray(lines) || lines.some((l) => typeof l !== "string")) {
    throw new DeviceManagerError("EINVAL", 'request needs "lines" (an array of table lines)');
  }
  const text = (lines as string[]).join("\n");
  const firstLine = (lines as string[])
    .flatMap((l) => l.split("\n"))
    .find((l) => l.replace(/#.*/, "").trim() !== "");
  const namedFormat =
    firstLine !== undefined && /^\s*[^\s:#]+:\s/.test(firstLine) && !/^\s*\d+\s/.test(firstLine);
  if (!namedFormat) {
    if (!name)
      throw new DeviceManagerError("EINVAL", "a device name is needed for dmsetup-format table lines");
    return [{ table: parseDeviceTable(name, text, file, manager.registry), baseDir }];
  }
  const all = parseTableFile(text, file, manager.registry);
  const tables = name ? all.filter((t) => t.name === name) : all;
  if (tables.length === 0) {
    throw new DeviceManagerError(
      "EINVAL",
      `${file} defines no device "${name}" (it defines: ${all.map((t) => t.name).join(", ") || "none"})`,
    );
  }
  if (options.single && tables.length !== 1) {
    throw new DeviceManagerError(
      "EINVAL",
      `${file} defines ${tables.length} devices: name the one to reload`,
    );
  }
  return tables.map((table) => ({ table, baseDir }));
}

/** The running server's udm version (its package.json). */
function serverVersion(): string {
  try {
    return (
      JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version: string }
    ).version;
  } catch {
    return "unknown";
  }
}

/** The verbs of the control protocol. */
export function controlHandlers(manager: DeviceManager, listExports?: ExportLister): Record<string, Handler> {
  const names = (args: Record<string, unknown>) => {
    if (args.name !== undefined && typeof args.name !== "string") {
      throw new DeviceManagerError("EINVAL", `"name" must be a string, got ${JSON.stringify(args.name)}`);
    }
    const name = optStr(args, "name");
    if (name) manager.device(name); // throws ENOENT
    return name ? [name] : manager.names();
  };
  const connections = (name: string) => listExports?.().find((e) => e.name === name)?.connections ?? 0;
  const busyOptions = (name: string, args: Record<string, unknown>) => ({
    force: args.force === true,
    connections: () => connections(name),
  });
  return {
    ping: async () => ({ pid: process.pid }),
    ls: async () => manager.names().map((n) => ({ ...manager.info(n), connections: connections(n) })),
    info: async (args) => names(args).map((n) => ({ ...manager.info(n), connections: connections(n) })),
    table: async (args) => names(args).map((n) => ({ name: n, lines: manager.table(n) })),
    status: async (args) =>
      names(args).map((n) => ({ name: n, lines: manager.status(n), progress: manager.info(n).progress })),
    create: async (args) => {
      const requests = tableRequests(manager, args, { single: false });
      await manager.create(requests);
      return { created: requests.map((r) => r.table.name) };
    },
    reload: async (args) => {
      const name = str(args, "name");
      const [request] = tableRequests(manager, args, { single: true });
      await manager.reload(name, request!, busyOptions(name, args));
      return { reloaded: name };
    },
    remove: async (args) => {
      const name = str(args, "name");
      await manager.remove(name, busyOptions(name, args));
      return { removed: args.name };
    },
    suspend: async (args) => {
      await manager.suspend(str(args, "name"), { noflush: args.noflush === true });
      return { suspended: args.name };
    },
    resume: async (args) => {
      await manager.resume(str(args, "name"));
      return { resumed: args.name };
    },
    message: async (args) => {
      const sector = args.sector;
      if (typeof sector !== "number" || !Number.isSafeInteger(sector) || sector < 0) {
        throw new DeviceManagerError("EINVAL", '"sector" must be a non-negative whole number');
      }
      const argv = args.argv;
      if (!Array.isArray(argv) || argv.length === 0 || argv.some((a) => typeof a !== "string")) {
        throw new DeviceManagerError("EINVAL", '"argv" must be a non-empty array of strings');
      }
      return { reply: (await manager.message(str(args, "name"), sector, argv as string[])) ?? null };
    },
    "snapshot-create": async (args) => {
      const chunkSectors = args.chunkSectors ?? 8;
      if (typeof chunkSectors !== "number" || !Number.isSafeInteger(chunkSectors) || chunkSectors < 0) {
        throw new DeviceManagerError("EINVAL", '"chunkSectors" must be a whole number of sectors');
      }
      const size = args.createSizeBytes;
      await manager.snapshotCreate(str(args, "origin"), str(args, "name"), {
        cow: str(args, "cow"),
        ...(typeof size === "number" && { createSizeBytes: size }),
        chunkSectors,
        persistent: args.persistent !== false,
        overflowOk: args.overflowOk === true,
        reuseCow: args.reuseCow === true,
      });
      return { created: args.name };
    },
    "snapshot-merge": async (args) => {
      await manager.snapshotMerge(str(args, "name"));
      return { merging: args.name };
    },
    "merge-status": async (args) => manager.mergeState(str(args, "name")),
    rename: async (args) => {
      await manager.rename(str(args, "name"), str(args, "newName"));
      return { renamed: args.name, to: args.newName };
    },
    version: async () => ({ version: serverVersion(), pid: process.pid, node: process.version }),
  };
}

/** Maps an error to the protocol's `{code, message}`. */
export function errorReply(err: unknown): { code: string; message: string } {
  if (err instanceof TableParseError) return { code: "EINVAL", message: err.message };
  if (err instanceof DeviceManagerError) return { code: err.code, message: err.message };
  if (err instanceof IoError) return { code: err.code, message: err.message };
  const e = err as NodeJS.ErrnoException;
  return { code: typeof e?.code === "string" ? e.code : "EIO", message: e?.message ?? String(err) };
}

/**
 * Listens on a Unix socket (mode 0600) and answers control requests. Refuses to start when
 * another server answers on the path; removes a stale socket file.
 *
 * @example
 * ```ts
 * const control = await startControlServer("udm-data/control.sock", controlHandlers(manager), log);
 * await control.close();
 * ```
 */
export async function startControlServer(
  path: string,
  handlers: Record<string, Handler>,
  log: Logger,
): Promise<{ close(): Promise<void> }> {
  if (existsSync(path)) {
    if (!lstatSync(path).isSocket()) throw new Error(`control path ${path} exists and is not a socket`);
    if (await answers(path)) throw new Error(`another udm server is listening on ${path}`);
    unlinkSync(path);
  }
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    serveConnection(socket, handlers, log);
  });
  const oldMask = process.umask(0o177);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(path, () => resolve());
    });
  } finally {
    process.umask(oldMask);
  }
  await chmod(path, 0o600);
  log.info({ control: path }, "control socket listening");
  return {
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
  };
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/** A request that is valid JSON but not a request object. */
class ProtocolError extends Error {}

/**
 * Requests of one connection read but not answered yet, and reply bytes not yet taken by the
 * client, beyond which the server stops reading from it (a client that sends without reading
 * its replies is slowed down to its own pace instead of filling the server's memory).
 */
export const CONTROL_BACKLOG_REQUESTS = 64;
export const CONTROL_BACKLOG_REPLY_BYTES = 1 << 20;

function serveConnection(socket: Socket, handlers: Record<string, Handler>, log: Logger): void {
  let buffered = "";
  let chain = Promise.resolve();
  let pending = 0;
  socket.setEncoding("utf8");
  socket.on("error", () => undefined);
  const overBacklog = () =>
    pending >= CONTROL_BACKLOG_REQUESTS || socket.writableLength >= CONTROL_BACKLOG_REPLY_BYTES;
  const pauseOrResume = () => {
    if (socket.destroyed) return;
    if (overBacklog()) socket.pause();
    else if (socket.isPaused()) {
      socket.resume();
      takeLines();
    }
  };
  socket.on("drain", pauseOrResume);
  // Lines are taken from `buffered` only while under the backlog; the rest waits there (at most
  // one chunk read before the pause) until replies are taken.
  const takeLines = () => {
    let nl = buffered.indexOf("\n");
    while (nl >= 0 && !overBacklog()) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      if (line.trim() !== "") {
        pending++;
        chain = chain.then(async () => {
          await answer(line);
          pending--;
          pauseOrResume();
        });
      }
      nl = buffered.indexOf("\n");
    }
    if (overBacklog()) socket.pause();
  };
  socket.on("data", (chunk: string) => {
    buffered += chunk;
    if (buffered.length > MAX_CONTROL_LINE_BYTES && !buffered.includes("\n")) {
      socket.end(
        `${JSON.stringify({ id: 0, ok: false, error: { code: "E2BIG", message: "request line too long" } })}\n`,
      );
      return;
    }
    takeLines();
  });

  async function answer(line: string): Promise<void> {
    let id = 0;
    let response: ControlResponse;
    try {
      const parsed: unknown = JSON.parse(line);
      if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
        throw new ProtocolError(
          `a request is a JSON object {"id":N,"verb":"...","args":{...}}, got ${line.slice(0, 80)}`,
        );
      }
      const request = parsed as ControlRequest;
      id = typeof request.id === "number" ? request.id : 0;
      const handler = typeof request.verb === "string" ? handlers[request.verb] : undefined;
      if (!handler || !Object.hasOwn(handlers, request.verb)) {
        throw new DeviceManagerError(
          "EINVAL",
          `unknown verb "${String(request.verb)}" (known: ${Object.keys(handlers).join(", ")})`,
        );
      }
      const args = request.args && typeof request.args === "object" ? request.args : {};
      log.debug({ verb: request.verb, args }, "control request");
      response = { id, ok: true, result: await handler(args) };
    } catch (err) {
      const error =
        err instanceof SyntaxError
          ? { code: "EPROTO", message: `bad JSON request: ${err.message}` }
          : err instanceof ProtocolError
            ? { code: "EPROTO", message: err.message }
            : errorReply(err);
      // A typo (unknown device, bad table) is the client's mistake: one line, no stack.
      log.info({ code: error.code, reason: error.message }, "control request failed");
      response = { id, ok: false, error };
    }
    if (!socket.destroyed) socket.write(`${JSON.stringify(response)}\n`);
  }
}
