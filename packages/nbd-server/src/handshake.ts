import type { Duplex } from "node:stream";
import * as tls from "node:tls";
import type { TargetLogger } from "@udm/kcopyd";
import { type ClientIdentity, subjectPairs } from "./access.js";
import { contextNames, type ExportEntry, transmissionFlags } from "./export-entry.js";
import { SocketReader } from "./socket-reader.js";
import {
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReplyData,
  encodeOptionReply,
  encodeServerReplyData,
  IHAVEOPT,
  MAX_PAYLOAD_BYTES,
  MAX_STRING_BYTES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NbdProtocolError,
  OPTION_HEADER_BYTES,
  OPTION_NAMES,
  PREFERRED_BLOCK_BYTES,
} from "./wire.js";

/** Option data above this is refused with ERR_TOO_BIG (after skipping it): real options are tiny. */
export const MAX_OPTION_DATA_BYTES = 64 * 1024;
/** Option data above this is treated as abuse and the connection is closed. */
export const MAX_SKIPPABLE_OPTION_BYTES = 16 * 1024 * 1024;
/** Options per connection before we call it abuse (a client loops on errors forever). */
export const MAX_OPTIONS_PER_CONNECTION = 4096;

/** The smallest I/O unit we advertise: devices accept unaligned I/O, so 1 as qemu-nbd does for raw files. */
export const MINIMUM_BLOCK_BYTES = 1;

/** What the handshake needs from the server. */
export interface HandshakeConfig {
  /**
   * Resolves an export name ("" = the default export); undefined if unknown or removed. The
   * handshake itself hides exports whose allow list refuses the client.
   */
  lookup(name: string): ExportEntry | undefined;
  /** Exports to answer NBD_OPT_LIST with (filtered by allow lists here). */
  list(): ExportEntry[];
  /** The client's source IP address; null for a Unix-socket client. */
  peerAddress: string | null;
  /**
   * `serverOptions` holds cert/key/ca for a tls.Server wrapping the socket after STARTTLS. With a
   * `ca`, client certificates are requested (verified ones feed allow lists); they are
   * required only with `requireClientCert`.
   */
  tls?: { serverOptions: tls.TlsOptions; requireClientCert: boolean; required: boolean };
  isShuttingDown(): boolean;
  log: TargetLogger;
  connectionId: number;
}

/** What a successful handshake agreed on. */
export interface Negotiated {
  /** The socket, or the TLS stream over it after STARTTLS. */
  stream: Duplex;
  /** Bytes the client already sent past the handshake (pipelined first requests). */
  leftover: Buffer;
  entry: ExportEntry;
  structured: boolean;
  /** Selected meta contexts (SET_META_CONTEXT on this export), with the ids we gave them. */
  metaContexts: Array<{ id: number; name: string }>;
  tls: boolean;
  /** Options the client sent, in order, for the connection log line. */
  options: string[];
}

interface State {
  stream: Duplex;
  reader: SocketReader;
  tls: boolean;
  noZeroes: boolean;
  structured: boolean;
  meta: { entry: ExportEntry; contexts: Array<{ id: number; name: string }> } | null;
  nextContextId: number;
  options: string[];
  /** Who the client is, for allow lists; the certificate part is set by STARTTLS. */
  client: ClientIdentity;
}

/**
 * Runs the fixed-newstyle handshake on a fresh connection: greeting, client flags, then option
 * haggling until EXPORT_NAME or GO. Resolves null when the client aborts (NBD_OPT_ABORT);
 * rejects with NbdProtocolError when the connection must be closed (bad magic, bad client flags,
 * unknown export with EXPORT_NAME, abuse).
 *
 * @example
 * ```ts
 * const agreed = await negotiate(socket, config);
 * if (agreed) startTransmission(agreed);
 * ```
 */
export async function negotiate(socket: Duplex, config: HandshakeConfig): Promise<Negotiated | null> {
  socket.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
  const reader = new SocketReader(socket);
  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) {
    throw new NbdProtocolError(`client flags 0x${clientFlags.toString(16)} carry bits we did not advertise`);
  }
  const state: State = {
    stream: socket,
    reader,
    tls: false,
    noZeroes: (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0,
    structured: false,
    meta: null,
    nextContextId: 1,
    options: [],
    client: { address: config.peerAddress, certSubject: null },
  };
  for (let count = 0; ; count++) {
    if (count >= MAX_OPTIONS_PER_CONNECTION) throw new NbdProtocolError(`more than ${count} options`);
    const header = await state.reader.read(OPTION_HEADER_BYTES);
    if (header.readBigUInt64BE(0) !== IHAVEOPT) {
      throw new NbdProtocolError(`bad option magic 0x${header.readBigUInt64BE(0).toString(16)}`);
    }
    const option = header.readUInt32BE(8);
    const length = header.readUInt32BE(12);
    state.options.push(OPTION_NAMES[option] ?? `${option}`);
    if (length > MAX_OPTION_DATA_BYTES) {
      if (length > MAX_SKIPPABLE_OPTION_BYTES || option === NBD_OPT_EXPORT_NAME) {
        throw new NbdProtocolError(`option ${option} carries ${length} bytes of data`);
      }
      await state.reader.skip(length);
      reply(state, option, NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes is too large`);
      continue;
    }
    const data = await state.reader.read(length);
    const done = await handleOption(state, config, option, data);
    if (done === "abort") return null;
    if (done) return done;
  }
}

async function handleOption(
  state: State,
  config: HandshakeConfig,
  option: number,
  data: Buffer,
): Promise<Negotiated | "abort" | undefined> {
  if (option === NBD_OPT_ABORT) {
    reply(state, option, NBD_REP_ACK);
    state.stream.end();
    state.reader.detach();
    return "abort";
  }
  if (option === NBD_OPT_EXPORT_NAME) return exportName(state, config, data);
  if (config.isShuttingDown()) return reply(state, option, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
  if (option !== NBD_OPT_STARTTLS && config.tls?.required && !state.tls) {
    return reply(
      state,
      option,
      NBD_REP_ERR_TLS_REQD,
      "this server requires TLS: send NBD_OPT_STARTTLS first",
    );
  }
  switch (option) {
    case NBD_OPT_LIST:
      if (data.length) return reply(state, option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
      for (const e of config.list()) {
        if (!e.access.allows(state.client)) continue;
        reply(state, option, NBD_REP_SERVER, encodeServerReplyData(e.name, e.description ?? ""));
      }
      return reply(state, option, NBD_REP_ACK);
    case NBD_OPT_STARTTLS:
      return startTls(state, config, data);
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
      return infoOrGo(state, config, option, data);
    case NBD_OPT_STRUCTURED_REPLY:
      if (data.length)
        return reply(state, option, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
      if (state.structured)
        return reply(state, option, NBD_REP_ERR_INVALID, "structured replies already negotiated");
      state.structured = true;
      return reply(state, option, NBD_REP_ACK);
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
      return metaContext(state, config, option, data);
    default:
      // Includes NBD_OPT_EXTENDED_HEADERS: none of the clients we can test against speaks it yet.
      return reply(state, option, NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
  }
}

function reply(state: State, option: number, replyType: number, data?: Buffer | string): undefined {
  const payload = typeof data === "string" ? Buffer.from(data, "utf8") : data;
  state.stream.write(encodeOptionReply(option, replyType, payload));
  return undefined;
}

function exportName(state: State, config: HandshakeConfig, data: Buffer): Negotiated {
  if (config.isShuttingDown()) throw new NbdProtocolError("EXPORT_NAME while shutting down");
  if (config.tls?.required && !state.tls)
    throw new NbdProtocolError("EXPORT_NAME before STARTTLS on a TLS-only server");
  const name = data.toString("utf8");
  const entry = visibleExport(state, config, name);
  // EXPORT_NAME has no error reply: closing is the only answer the spec allows.
  if (!entry) throw new NbdProtocolError(`EXPORT_NAME for unknown export "${name}"`);
  state.stream.write(
    encodeExportNameReply(entry.device.sizeBytes, transmissionFlags(entry, state.structured), state.noZeroes),
  );
  return finish(state, entry);
}

/**
 * The export `name` resolves to, if this client may see it. A refused client gets exactly the
 * answer an unknown name gets (the log says why, for the administrator).
 */
function visibleExport(state: State, config: HandshakeConfig, name: string): ExportEntry | undefined {
  const entry = config.lookup(name);
  if (!entry || entry.access.allows(state.client)) return entry;
  config.log.warn(
    {
      connection: config.connectionId,
      export: entry.name,
      address: state.client.address ?? "unix",
      certSubject: state.client.certSubject?.map(([k, v]) => `${k}=${v}`).join(", ") ?? null,
    },
    "nbd export refused by its allow list (answered as unknown)",
  );
  return undefined;
}

function finish(state: State, entry: ExportEntry): Negotiated {
  const leftover = state.reader.detach();
  // Block status only counts if the final SET_META_CONTEXT named this export ("" and its real name alike).
  const metaContexts = state.meta && state.meta.entry === entry ? state.meta.contexts : [];
  return {
    stream: state.stream,
    leftover,
    entry,
    structured: state.structured,
    metaContexts,
    tls: state.tls,
    options: state.options,
  };
}

async function startTls(state: State, config: HandshakeConfig, data: Buffer): Promise<undefined> {
  const option = NBD_OPT_STARTTLS;
  if (!config.tls) return reply(state, option, NBD_REP_ERR_POLICY, "TLS is not configured on this server");
  if (data.length) return reply(state, option, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
  if (state.tls) return reply(state, option, NBD_REP_ERR_INVALID, "TLS is already active");
  reply(state, option, NBD_REP_ACK);
  const leftover = state.reader.detach();
  if (leftover.length) throw new NbdProtocolError("client sent data before the TLS handshake");
  // A tls.Server (never listening) wraps the socket: it is what checks client certificates.
  const tlsServer = tls.createServer({
    ...config.tls.serverOptions,
    requestCert: config.tls.requireClientCert || config.tls.serverOptions.ca !== undefined,
    rejectUnauthorized: config.tls.requireClientCert,
  });
  const raw = state.stream;
  const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
    const fail = (why: string) => reject(new NbdProtocolError(`TLS handshake failed: ${why}`));
    const onClose = () => fail("connection closed (client certificate refused?)");
    raw.once("close", onClose);
    tlsServer.once("secureConnection", (s: tls.TLSSocket) => {
      raw.off("close", onClose);
      resolve(s);
    });
    tlsServer.once("tlsClientError", (err: Error) => fail(err.message));
    tlsServer.emit("connection", raw);
  });
  // Later TLS errors are handled by whoever reads the stream; this keeps one from ever being unhandled.
  secure.on("error", (err) =>
    config.log.debug({ connection: config.connectionId, err: err.message }, "nbd TLS error"),
  );
  // With a CA, a certificate that does not verify is refused (as nbd-server does), not taken as
  // anonymous; a client with no certificate stays allowed unless requireClientCert.
  const presented = !secure.authorized && Object.keys(secure.getPeerCertificate() ?? {}).length > 0;
  if ((config.tls.requireClientCert || presented) && !secure.authorized) {
    secure.destroy();
    throw new NbdProtocolError(
      `client certificate refused: ${presented ? secure.authorizationError : "no certificate (one signed by the CA is required)"}`,
    );
  }
  // STARTTLS wipes everything negotiated in the clear.
  state.stream = secure;
  state.reader = new SocketReader(secure);
  state.tls = true;
  state.structured = false;
  state.meta = null;
  // Only a certificate that chains to our CA identifies anyone; a self-signed one says nothing.
  const peerCert = secure.authorized ? secure.getPeerCertificate() : null;
  state.client = {
    address: state.client.address,
    certSubject: peerCert?.subject
      ? subjectPairs(peerCert.subject as unknown as Record<string, string>)
      : null,
  };
  return undefined;
}

/** Parses `u32 len, name` at `at`; null if it runs past the data. */
function readString(data: Buffer, at: number): { text: string; next: number; bytes: number } | null {
  if (at + 4 > data.length) return null;
  const len = data.readUInt32BE(at);
  if (len > data.length - at - 4) return null;
  return { text: data.toString("utf8", at + 4, at + 4 + len), next: at + 4 + len, bytes: len };
}

function infoOrGo(
  state: State,
  config: HandshakeConfig,
  option: number,
  data: Buffer,
): Negotiated | undefined {
  const name = readString(data, 0);
  if (!name || name.next + 2 > data.length) {
    return reply(
      state,
      option,
      NBD_REP_ERR_INVALID,
      "malformed NBD_OPT_INFO/GO: name length runs past the data",
    );
  }
  const count = data.readUInt16BE(name.next);
  if (data.length !== name.next + 2 + 2 * count) {
    return reply(
      state,
      option,
      NBD_REP_ERR_INVALID,
      `malformed NBD_OPT_INFO/GO: ${count} info requests do not fit`,
    );
  }
  const wanted = new Set<number>();
  for (let i = 0; i < count; i++) wanted.add(data.readUInt16BE(name.next + 2 + 2 * i));
  const entry = name.bytes <= MAX_STRING_BYTES ? visibleExport(state, config, name.text) : undefined;
  if (!entry) return reply(state, option, NBD_REP_ERR_UNKNOWN, `no export named "${name.text}"`);
  const flags = transmissionFlags(entry, state.structured);
  reply(state, option, NBD_REP_INFO, encodeInfoExport(entry.device.sizeBytes, flags));
  if (wanted.has(NBD_INFO_NAME))
    reply(state, option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, entry.name));
  if (wanted.has(NBD_INFO_DESCRIPTION) && entry.description) {
    reply(state, option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, entry.description));
  }
  // BLOCK_SIZE is sent even when not requested (allowed): clients that ignore it lose nothing.
  reply(
    state,
    option,
    NBD_REP_INFO,
    encodeInfoBlockSize(
      MINIMUM_BLOCK_BYTES,
      Math.max(PREFERRED_BLOCK_BYTES, entry.device.logicalBlockSize),
      MAX_PAYLOAD_BYTES,
    ),
  );
  reply(state, option, NBD_REP_ACK);
  return option === NBD_OPT_GO ? finish(state, entry) : undefined;
}

function metaContext(state: State, config: HandshakeConfig, option: number, data: Buffer): undefined {
  const isSet = option === NBD_OPT_SET_META_CONTEXT;
  // SET replaces the previous selection even when it fails.
  if (isSet) state.meta = null;
  if (!state.structured) {
    return reply(
      state,
      option,
      NBD_REP_ERR_INVALID,
      "negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts",
    );
  }
  const name = readString(data, 0);
  if (!name || name.next + 4 > data.length) {
    return reply(state, option, NBD_REP_ERR_INVALID, "malformed meta context request: export name");
  }
  const count = data.readUInt32BE(name.next);
  const queries: string[] = [];
  let at = name.next + 4;
  for (let i = 0; i < count; i++) {
    const q = readString(data, at);
    if (!q) return reply(state, option, NBD_REP_ERR_INVALID, `malformed meta context request: query ${i}`);
    if (q.bytes > MAX_STRING_BYTES)
      return reply(state, option, NBD_REP_ERR_TOO_BIG, `query ${i} is too long`);
    queries.push(q.text);
    at = q.next;
  }
  if (at !== data.length)
    return reply(state, option, NBD_REP_ERR_INVALID, "meta context request has trailing data");
  const entry = name.bytes <= MAX_STRING_BYTES ? visibleExport(state, config, name.text) : undefined;
  if (!entry) return reply(state, option, NBD_REP_ERR_UNKNOWN, `no export named "${name.text}"`);
  const available = contextNames(entry.device);
  const matched: string[] = [];
  if (!isSet && queries.length === 0) matched.push(...available);
  for (const q of queries) {
    // In LIST, "namespace:" is a wildcard for the whole namespace; in SET it selects nothing.
    const hits =
      !isSet && q.endsWith(":") ? available.filter((c) => c.startsWith(q)) : available.filter((c) => c === q);
    for (const h of hits) if (!matched.includes(h)) matched.push(h);
  }
  const contexts: Array<{ id: number; name: string }> = [];
  for (const m of matched) {
    const id = isSet ? state.nextContextId++ : 0;
    contexts.push({ id, name: m });
    reply(state, option, NBD_REP_META_CONTEXT, encodeMetaContextReplyData(id, m));
  }
  if (isSet) state.meta = { entry, contexts };
  return reply(state, option, NBD_REP_ACK);
}
