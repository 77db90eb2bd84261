import { NBD_DEFAULT_PORT } from "./server.js";

/** Where and what an NBD URI points at. */
export interface NbdUri {
  /** `nbds` / `nbds+unix`: STARTTLS is mandatory. */
  tls: boolean;
  transport: "tcp" | "unix";
  /** TCP host (IPv6 without brackets). */
  host?: string;
  port?: number;
  /** Unix socket path (`?socket=`). */
  socketPath?: string;
  exportName: string;
  /** `?tls-certificates=DIR`: ca-cert.pem, and client-cert.pem + client-key.pem if present (libnbd layout). */
  tlsCertificates?: string;
  /** `?tls-hostname=NAME`: the name the server certificate must carry (default: host). */
  tlsHostname?: string;
}

const SCHEMES: Record<string, { tls: boolean; transport: "tcp" | "unix" }> = {
  nbd: { tls: false, transport: "tcp" },
  nbds: { tls: true, transport: "tcp" },
  "nbd+unix": { tls: false, transport: "unix" },
  "nbds+unix": { tls: true, transport: "unix" },
};

/**
 * Parses an NBD URI (the NBD project's URI spec, as libnbd and qemu read it):
 * `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, and `nbds://` / `nbds+unix://`
 * for TLS. The export name is the percent-decoded path after the first `/`.
 *
 * @example
 * ```ts
 * parseNbdUri("nbd://127.0.0.1:10809/disk"); // { transport: "tcp", host: "127.0.0.1", port: 10809, exportName: "disk", tls: false }
 * parseNbdUri("nbd+unix:///disk?socket=/run/udm.sock").socketPath; // "/run/udm.sock"
 * ```
 */
export function parseNbdUri(uri: string): NbdUri {
  const m = /^([a-z0-9+.-]+):\/\//i.exec(uri);
  const kind = m ? SCHEMES[(m[1] as string).toLowerCase()] : undefined;
  if (!m || !kind) {
    throw new RangeError(
      `"${uri}" is not an NBD URI (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`,
    );
  }
  const rest = uri.slice(m[0].length);
  const hostless = rest.startsWith("/");
  let url: URL;
  try {
    // URL only parses authorities for special schemes; swap in http to reuse its parser.
    url = new URL(hostless ? `http://placeholder${rest}` : `http://${rest}`);
  } catch {
    throw new RangeError(`"${uri}" is not a valid NBD URI`);
  }
  if (url.username || url.password)
    throw new RangeError(`"${uri}": user names in NBD URIs are not supported`);
  let exportName: string;
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ""));
  } catch {
    throw new RangeError(`"${uri}": the export name is not valid percent-encoding`);
  }
  const params = url.searchParams;
  const out: NbdUri = { tls: kind.tls, transport: kind.transport, exportName };
  const certs = params.get("tls-certificates");
  if (certs) out.tlsCertificates = certs;
  const tlsHostname = params.get("tls-hostname");
  if (tlsHostname) out.tlsHostname = tlsHostname;
  if (kind.transport === "unix") {
    const socket = params.get("socket");
    if (!socket) throw new RangeError(`"${uri}": nbd+unix URIs need ?socket=PATH`);
    if (!hostless)
      throw new RangeError(`"${uri}": nbd+unix URIs take no host (nbd+unix:///EXPORT?socket=PATH)`);
    out.socketPath = socket;
    return out;
  }
  if (hostless || !url.hostname) throw new RangeError(`"${uri}": missing host`);
  out.host = url.hostname.replace(/^\[(.*)\]$/, "$1");
  out.port = url.port ? Number(url.port) : NBD_DEFAULT_PORT;
  return out;
}
