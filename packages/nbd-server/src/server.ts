import { EventEmitter } from "node:events";
import { promises as fsp } from "node:fs";
import * as net from "node:net";
import * as tls from "node:tls";
import { type BlockDevice, poisonEnabled, type TargetLogger } from "@udm/kcopyd";
import {
  compileAllowList,
  type NbdAllowList,
  NbdConfigError,
  validateExportDescription,
  validateExportName,
} from "./access.js";
import { type ExportEntry, isReadOnly } from "./export-entry.js";
import { type HandshakeConfig, negotiate } from "./handshake.js";
import { TransmissionSession } from "./transmission.js";

/** Default TCP port of NBD (IANA). */
export const NBD_DEFAULT_PORT = 10809;
/** Connections served at once, handshaking or not, unless configured. */
export const DEFAULT_MAX_CONNECTIONS = 256;
/** A client must finish option haggling within this (qemu-nbd uses 10 s too). */
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
/** Request payloads and read data held per connection before reading from it pauses (2 x max payload). */
export const DEFAULT_MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
/**
 * close(): how long requests in flight may take to finish, and then how long each export's flush
 * may take, before the server stops waiting (a device that never answers must not hold a
 * SIGTERM up). Connections still busy after it are closed with their requests unanswered.
 */
export const DEFAULT_SHUTDOWN_GRACE_MS = 3000;

export interface NbdExportOptions {
  /** Sent in NBD_OPT_LIST and NBD_INFO_DESCRIPTION. */
  description?: string;
  /** Refuse writes with EPERM even if the device is writable. */
  readOnly?: boolean;
  /**
   * Who may see and open the export; everyone when absent. A refused client never learns the
   * export exists: LIST omits it, INFO/GO/meta-context options answer NBD_REP_ERR_UNKNOWN and
   * EXPORT_NAME closes, exactly as for a name that does not exist.
   *
   * @example
   * ```ts
   * server.addExport("backup", dev, { allow: { addresses: ["10.0.0.0/8", "unix"], certSubjects: ["backup host"] } });
   * ```
   */
  allow?: NbdAllowList;
}

export interface NbdServerOptions {
  log?: TargetLogger;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  maxInFlightBytesPerConnection?: number;
  /** See {@link DEFAULT_SHUTDOWN_GRACE_MS}. */
  shutdownGraceMs?: number;
  tls?: {
    cert: string | Buffer;
    key: string | Buffer;
    /** CA bundle client certificates are checked against. */
    ca?: string | Buffer;
    requireClientCert?: boolean;
    /** Refuse every option but STARTTLS/ABORT before TLS (FORCEDTLS). */
    required?: boolean;
  };
}

interface Connection {
  id: number;
  socket: net.Socket;
  session: TransmissionSession | null;
}

const silentLogger: TargetLogger = { debug() {}, info() {}, warn() {}, error() {} };

/**
 * An NBD server (fixed newstyle, structured replies, meta contexts, STARTTLS) serving any
 * BlockDevice as a named export over TCP and Unix sockets. Emits `open` and `close` with
 * `{ connection, peer, export }` for every connection that reaches transmission.
 *
 * @example
 * ```ts
 * const server = new NbdServer({ log: pino() });
 * server.addExport("disk", await FileDevice.open("disk.img"), { description: "scratch disk" });
 * console.log(await server.listen({ host: "127.0.0.1", port: 10809 })); // 127.0.0.1:10809
 * // nbdinfo nbd://127.0.0.1:10809/disk
 * await server.close();
 * ```
 */
export class NbdServer extends EventEmitter {
  private readonly log: TargetLogger;
  private readonly debug: boolean;
  private readonly maxConnections: number;
  private readonly handshakeTimeoutMs: number;
  private readonly maxInFlightBytes: number;
  private readonly shutdownGraceMs: number;
  private readonly tlsConfig: HandshakeConfig["tls"];
  private readonly table = new Map<string, ExportEntry>();
  private readonly netServers: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  /** Accepted sockets waiting for {@link holdConnections}'s release; null while not holding. */
  private heldSockets: net.Socket[] | null = null;
  private nextConnectionId = 1;
  private shuttingDown = false;
  private closing: Promise<void> | null = null;

  constructor(options: NbdServerOptions = {}) {
    super();
    this.log = options.log ?? silentLogger;
    const levelCheck = (this.log as { isLevelEnabled?: (level: string) => boolean }).isLevelEnabled;
    this.debug = options.log ? (levelCheck?.call(this.log, "debug") ?? true) : false;
    this.maxConnections = positive(options.maxConnections, DEFAULT_MAX_CONNECTIONS, "maxConnections");
    this.handshakeTimeoutMs = positive(
      options.handshakeTimeoutMs,
      DEFAULT_HANDSHAKE_TIMEOUT_MS,
      "handshakeTimeoutMs",
    );
    this.maxInFlightBytes = positive(
      options.maxInFlightBytesPerConnection,
      DEFAULT_MAX_IN_FLIGHT_BYTES,
      "maxInFlightBytesPerConnection",
    );
    if (poisonEnabled()) {
      this.log.warn(
        {},
        "UDM_POISON=1: data buffers are poison-filled and pooled ones checked (debug mode, slower)",
      );
    }
    this.shutdownGraceMs = positive(options.shutdownGraceMs, DEFAULT_SHUTDOWN_GRACE_MS, "shutdownGraceMs");
    if (options.tls) {
      const t = options.tls;
      const serverOptions: tls.TlsOptions = {
        cert: t.cert,
        key: t.key,
        ...(t.ca !== undefined && { ca: t.ca }),
      };
      tls.createSecureContext(serverOptions); // fails now, naming the bad PEM, rather than at the first STARTTLS
      this.tlsConfig = {
        serverOptions,
        requireClientCert: t.requireClientCert ?? false,
        required: t.required ?? false,
      };
      if (this.tlsConfig.requireClientCert && t.ca === undefined) {
        throw new RangeError("tls.requireClientCert needs tls.ca to check client certificates against");
      }
    }
  }

  /**
   * Serves `device` as export `name`. Throws NbdConfigError (a RangeError) if the name is taken
   * or invalid (over 4096 bytes of UTF-8, control characters, lone surrogates), the description
   * is invalid, or an allow-list entry is malformed (`certSubjects` also needs `tls.ca`).
   */
  addExport(name: string, device: BlockDevice, options: NbdExportOptions = {}): void {
    validateExportName(name);
    if (options.description !== undefined) validateExportDescription(options.description);
    if (this.table.has(name)) throw new NbdConfigError(`export "${name}" already exists`);
    const access = compileAllowList(options.allow);
    if (options.allow?.certSubjects !== undefined && !this.tlsConfig?.serverOptions.ca) {
      throw new NbdConfigError(
        `export "${name}": allow.certSubjects needs tls.ca to verify client certificates against`,
      );
    }
    this.table.set(name, {
      name,
      device,
      access,
      ...(options.allow !== undefined && { allow: cloneAllow(options.allow) }),
      ...(options.description !== undefined && { description: options.description }),
      readOnlyOption: options.readOnly ?? false,
      removed: false,
      sessions: new Set(),
    });
    this.log.info({ export: name, device: device.name, sizeBytes: device.sizeBytes }, "nbd export added");
  }

  /** Points export `name` at another device (`udm reload`): requests parsed from now on go to it. */
  replaceExportDevice(name: string, device: BlockDevice): void {
    const entry = this.table.get(name);
    if (!entry) throw new RangeError(`no export named "${name}"`);
    entry.device = device;
    this.log.info(
      { export: name, device: device.name, sizeBytes: device.sizeBytes },
      "nbd export device replaced",
    );
  }

  /**
   * Renames export `name` to `newName` (`udm rename`): connected clients stay on it, new ones
   * open it by the new name only; `options.allow` replaces its allow list (absent: everyone).
   */
  renameExport(name: string, newName: string, options: Pick<NbdExportOptions, "allow"> = {}): void {
    const entry = this.table.get(name);
    if (!entry) throw new RangeError(`no export named "${name}"`);
    validateExportName(newName);
    if (this.table.has(newName)) throw new NbdConfigError(`export "${newName}" already exists`);
    const access = compileAllowList(options.allow);
    // In place: sessions in transmission hold this entry (for reloads and draining).
    const mutable = entry as { -readonly [K in keyof ExportEntry]: ExportEntry[K] };
    mutable.name = newName;
    mutable.access = access;
    if (options.allow) mutable.allow = cloneAllow(options.allow);
    else delete mutable.allow;
    const rebuilt = [...this.table.entries()].map(([n, e]): [string, ExportEntry] =>
      n === name ? [newName, e] : [n, e],
    );
    this.table.clear();
    for (const [n, e] of rebuilt) this.table.set(n, e);
    this.log.info({ export: newName, from: name }, "nbd export renamed");
  }

  /** Refuses new opens of `name`, then drains and disconnects its clients. */
  async removeExport(name: string): Promise<void> {
    const entry = this.table.get(name);
    if (!entry) throw new RangeError(`no export named "${name}"`);
    entry.removed = true;
    this.table.delete(name);
    await Promise.all([...entry.sessions].map((s) => s.drain(`export "${name}" removed`)));
    this.log.info({ export: name }, "nbd export removed");
  }

  /** The export table, with the number of connections in transmission on each. */
  exports(): Array<{
    name: string;
    device: BlockDevice;
    description?: string;
    readOnly: boolean;
    allow?: NbdAllowList;
    connections: number;
  }> {
    return [...this.table.values()].map((e) => ({
      name: e.name,
      device: e.device,
      ...(e.description !== undefined && { description: e.description }),
      ...(e.allow !== undefined && { allow: cloneAllow(e.allow) }),
      readOnly: isReadOnly(e),
      connections: e.sessions.size,
    }));
  }

  /**
   * Listens on TCP (`{ host, port }`, default 127.0.0.1:10809, port 0 = any) or a Unix socket
   * (`{ path }`), or on a listening socket passed as a file descriptor (`{ fd }`, systemd socket
   * activation); may be called several times. Resolves with "HOST:PORT" or the socket path.
   */
  async listen(
    address: { host?: string; port?: number } | { path: string } | { fd: number },
  ): Promise<string> {
    if (this.shuttingDown) throw new Error("NbdServer is closed");
    const server = net.createServer({ noDelay: true }, (socket) => this.admit(socket));
    // After listening, errors (EMFILE on accept...) are logged: they must not end the process.
    const onError = (err: Error) => this.log.error({ err: err.message }, "nbd listener error");
    if ("fd" in address) {
      // A socket already bound and listening, passed by systemd (socket activation) or a parent.
      await listenOn(server, { fd: address.fd });
      server.on("error", onError);
      this.netServers.push(server);
      const bound = server.address();
      const where =
        typeof bound === "string"
          ? bound || `fd ${address.fd}`
          : bound
            ? bound.family === "IPv6"
              ? `[${bound.address}]:${bound.port}`
              : `${bound.address}:${bound.port}`
            : `fd ${address.fd}`;
      this.log.info({ fd: address.fd, address: where }, "nbd server listening on a passed socket");
      return where;
    }
    if ("path" in address) {
      await removeStaleSocket(address.path);
      await listenOn(server, { path: address.path });
      server.on("error", onError);
      this.netServers.push(server);
      this.log.info({ path: address.path }, "nbd server listening");
      return address.path;
    }
    const host = address.host ?? "127.0.0.1";
    await listenOn(server, { host, port: address.port ?? NBD_DEFAULT_PORT });
    server.on("error", onError);
    this.netServers.push(server);
    const bound = server.address() as net.AddressInfo;
    const where =
      bound.family === "IPv6" ? `[${bound.address}]:${bound.port}` : `${bound.address}:${bound.port}`;
    this.log.info({ address: where }, "nbd server listening");
    return where;
  }

  /**
   * Holds new connections (accepted, their handshake not begun, its timeout not started) until
   * the returned function is called: a server binds its addresses first, so a port in use fails
   * before anything is created, and adds its exports after; a client that connects meanwhile
   * waits for them instead of finding none. `close()` drops held connections.
   *
   * @example
   * ```ts
   * const release = server.holdConnections();
   * await server.listen({ port: 10809 }); // EADDRINUSE here, before the devices exist
   * server.addExport("disk", await FileDevice.open("disk.img"));
   * release();
   * ```
   */
  holdConnections(): () => void {
    this.heldSockets ??= [];
    return () => {
      const held = this.heldSockets ?? [];
      this.heldSockets = null;
      for (const socket of held) if (!socket.destroyed) this.onConnection(socket);
    };
  }

  private admit(socket: net.Socket): void {
    if (!this.heldSockets) {
      this.onConnection(socket);
      return;
    }
    // A held socket's errors must not reach the process before onConnection adds its handler.
    socket.on("error", () => socket.destroy());
    this.heldSockets.push(socket);
  }

  /**
   * Stops accepting, answers new requests ESHUTDOWN, lets in-flight requests finish, closes
   * every connection and flushes every export's device (devices stay open: the caller owns
   * them). `force` drops connections at once; a forced call also cuts short a pending close.
   * Nothing waits for a device longer than `shutdownGraceMs`: connections whose requests are
   * still in flight then are closed unanswered (none of those requests was acknowledged), and a
   * flush that does not finish in that time is logged and left behind.
   */
  close(options: { force?: boolean } = {}): Promise<void> {
    this.shuttingDown = true;
    if (options.force) for (const c of this.connections) c.socket.destroy();
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    for (const socket of this.heldSockets?.splice(0) ?? []) socket.destroy();
    const stopped = Promise.all(
      this.netServers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))),
    );
    const pending: Array<Promise<void>> = [];
    for (const c of this.connections) {
      if (c.session) pending.push(c.session.drain("server shutting down"));
      else c.socket.destroy();
    }
    if (!(await within(Promise.all(pending), this.shutdownGraceMs))) {
      const busy = [...this.connections].filter((c) => (c.session?.inFlight ?? 0) > 0);
      this.log.warn(
        {
          graceMs: this.shutdownGraceMs,
          connections: busy.map((c) => c.id),
          requests: busy.reduce((n, c) => n + (c.session?.inFlight ?? 0), 0),
        },
        "nbd shutdown: requests still in flight after the grace period; closing their connections unanswered",
      );
      for (const c of this.connections) c.socket.destroy();
    }
    await Promise.all(
      [...this.table.values()].map(async (e) => {
        if (e.device.readOnly) return;
        try {
          if (!(await within(e.device.flush(), this.shutdownGraceMs))) {
            this.log.error(
              { export: e.name, graceMs: this.shutdownGraceMs },
              "nbd flush on shutdown did not finish in time; not waiting for it",
            );
          }
        } catch (err) {
          this.log.error({ export: e.name, err: (err as Error).message }, "nbd flush on shutdown failed");
        }
      }),
    );
    await stopped;
    this.log.info({}, "nbd server closed");
  }

  private handshakeConfig(connectionId: number, peerAddress: string | null): HandshakeConfig {
    return {
      lookup: (name) => this.lookup(name),
      list: () => [...this.table.values()],
      peerAddress,
      ...(this.tlsConfig && { tls: this.tlsConfig }),
      isShuttingDown: () => this.shuttingDown,
      log: this.log,
      connectionId,
    };
  }

  /** "" is the default export: the one named "", else the only export if there is just one. */
  private lookup(name: string): ExportEntry | undefined {
    const entry = this.table.get(name);
    if (entry || name !== "") return entry;
    return this.table.size === 1 ? [...this.table.values()][0] : undefined;
  }

  private onConnection(socket: net.Socket): void {
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : "unix";
    // Errors are answered per connection; one must never reach the process.
    socket.on("error", (err) => this.log.debug({ peer, err: err.message }, "nbd socket error"));
    if (this.shuttingDown) {
      socket.destroy();
      return;
    }
    if (this.connections.size >= this.maxConnections) {
      this.log.warn(
        { peer, maxConnections: this.maxConnections },
        "nbd connection refused: too many connections",
      );
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    const conn: Connection = { id: this.nextConnectionId++, socket, session: null };
    this.connections.add(conn);
    const timer = setTimeout(() => {
      this.log.warn({ connection: conn.id, peer }, "nbd handshake timed out");
      socket.destroy();
    }, this.handshakeTimeoutMs);
    socket.on("close", () => {
      clearTimeout(timer);
      this.connections.delete(conn);
    });
    negotiate(socket, this.handshakeConfig(conn.id, socket.remoteAddress ?? null)).then(
      (agreed) => {
        clearTimeout(timer);
        if (!agreed) {
          this.log.debug({ connection: conn.id, peer }, "nbd client aborted the handshake");
          return;
        }
        if (agreed.entry.removed || this.shuttingDown || socket.destroyed) {
          agreed.stream.destroy();
          return;
        }
        const session = new TransmissionSession({
          negotiated: agreed,
          connectionId: conn.id,
          peer,
          log: this.log,
          debug: this.debug,
          maxInFlightBytes: this.maxInFlightBytes,
        });
        conn.session = session;
        const entry = agreed.entry;
        entry.sessions.add(session);
        const info = { connection: conn.id, peer, export: entry.name };
        this.log.info(
          {
            ...info,
            options: agreed.options,
            structured: agreed.structured,
            tls: agreed.tls,
            metaContexts: agreed.metaContexts.map((c) => c.name),
          },
          "nbd connection open",
        );
        this.emit("open", info);
        session.closed.then(() => {
          entry.sessions.delete(session);
          this.log.info(info, "nbd connection closed");
          this.emit("close", info);
        });
      },
      (err: Error) => {
        clearTimeout(timer);
        const closedByPeer = err.message === "peer closed the connection";
        this.log[closedByPeer ? "debug" : "warn"](
          { connection: conn.id, peer, err: err.message },
          "nbd handshake failed",
        );
        socket.destroy();
      },
    );
  }
}

/** Waits for `work` at most `ms`: true if it settled in time (its rejection is rethrown), false if not. */
async function within(work: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([work.then(() => true as const), late]);
  } finally {
    clearTimeout(timer);
  }
}

function cloneAllow(allow: NbdAllowList): NbdAllowList {
  return {
    ...(allow.addresses !== undefined && { addresses: [...allow.addresses] }),
    ...(allow.certSubjects !== undefined && { certSubjects: [...allow.certSubjects] }),
  };
}

function positive(value: number | undefined, fallback: number, what: string): number {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value < 1)
    throw new RangeError(`${what} must be a positive integer, got ${value}`);
  return value;
}

function listenOn(server: net.Server, options: net.ListenOptions | { fd: number }): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(options, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

/** Removes a Unix socket file left by a dead server (nobody accepts on it); anything else is left alone. */
async function removeStaleSocket(path: string): Promise<void> {
  const st = await fsp.stat(path).catch(() => null);
  if (!st?.isSocket()) return;
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect({ path }, () => {
      probe.destroy();
      resolve(true);
    });
    probe.on("error", () => resolve(false));
  });
  if (!alive) await fsp.unlink(path);
}
