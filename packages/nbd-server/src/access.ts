import { BlockList, isIPv4, isIPv6 } from "node:net";

/** Longest export name or description the protocol allows (UTF-8 bytes). */
export const MAX_EXPORT_STRING_BYTES = 4096;

/** The `allow` list entry that matches clients connected over a Unix socket. */
export const UNIX_SOCKET_CLIENT = "unix";

/**
 * Who may see and open an export. Every list given must match (an address AND a certificate
 * subject when both are set); an entry of a list matches if any of its entries does. An empty
 * list matches nobody. Clients that do not match never learn the export exists.
 */
export interface NbdAllowList {
  /**
   * Source addresses: IPv4/IPv6 addresses or CIDR subnets (`"10.0.0.0/8"`, `"fd00::/8"`,
   * `"127.0.0.1"`), or `"unix"` for clients on a Unix socket. IPv4-mapped IPv6 peers
   * (`::ffff:10.1.2.3`) match IPv4 entries.
   */
  addresses?: string[];
  /**
   * Client certificate subjects, checked only for certificates verified against `tls.ca` (a
   * plain-text client never matches). An entry without `=` is compared with the certificate's
   * common name (`"backup host"`); an entry with `=` is the full subject, as attribute=value
   * pairs separated by `,` (`"O=Example, CN=backup host"`, `\,` for a literal comma) or in
   * openssl's `/O=Example/CN=backup host` form, compared as a set.
   */
  certSubjects?: string[];
}

/** What the server knows about a client when it decides which exports it may see. */
export interface ClientIdentity {
  /** Source IP address, or null for a Unix-socket client. */
  address: string | null;
  /** Subject attributes of a client certificate verified against the CA; null without one. */
  certSubject: ReadonlyArray<readonly [string, string]> | null;
}

/** A compiled allow list: `allows(client)` answers in O(entries). */
export interface AccessRule {
  allows(client: ClientIdentity): boolean;
}

/** An export name or allow-list entry the server refuses, naming what is wrong with it. */
export class NbdConfigError extends RangeError {
  override readonly name = "NbdConfigError";
}

/** Everyone may see the export: no allow list was given. */
export const ALLOW_EVERYONE: AccessRule = { allows: () => true };

/**
 * Checks an export name as the server will hold it: at most 4096 bytes of UTF-8 (the protocol's
 * string limit), well-formed Unicode, no control characters (C0, DEL, C1: they break listings
 * and logs and no client can type them). "" is allowed: it is the default export.
 *
 * @example
 * ```ts
 * validateExportName("disk0"); // ok
 * validateExportName("a\nb"); // throws NbdConfigError: export name ... control character U+000A
 * ```
 */
export function validateExportName(name: string): void {
  if (typeof name !== "string") throw new NbdConfigError(`export name must be a string, got ${typeof name}`);
  checkProtocolString(name, "export name");
  for (let i = 0; i < name.length; i++) {
    const code = name.charCodeAt(i);
    if (code < 0x20 || (code >= 0x7f && code <= 0x9f)) {
      const hex = code.toString(16).toUpperCase().padStart(4, "0");
      throw new NbdConfigError(
        `export name ${quote(name)} contains control character U+${hex} at index ${i}`,
      );
    }
  }
}

/**
 * Checks an export description (sent in LIST and NBD_INFO_DESCRIPTION): at most 4096 bytes of
 * UTF-8, well-formed, no NUL.
 *
 * @example
 * ```ts
 * validateExportDescription("scratch disk"); // ok
 * ```
 */
export function validateExportDescription(description: string): void {
  if (typeof description !== "string") {
    throw new NbdConfigError(`export description must be a string, got ${typeof description}`);
  }
  checkProtocolString(description, "export description");
}

/** A UTF-16 surrogate without its pair: it would go out as U+FFFD and never match again. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function checkProtocolString(text: string, what: string): void {
  const bytes = Buffer.byteLength(text, "utf8");
  if (bytes > MAX_EXPORT_STRING_BYTES) {
    throw new NbdConfigError(
      `${what} ${quote(text)} is ${bytes} bytes of UTF-8; the NBD protocol allows at most ${MAX_EXPORT_STRING_BYTES}`,
    );
  }
  if (LONE_SURROGATE.test(text))
    throw new NbdConfigError(`${what} ${quote(text)} contains a lone UTF-16 surrogate`);
  if (text.includes("\0")) throw new NbdConfigError(`${what} ${quote(text)} contains a NUL character`);
}

function quote(text: string): string {
  return JSON.stringify(text.length > 64 ? `${text.slice(0, 64)}...` : text);
}

/**
 * Compiles an allow list, validating every entry (a bad address or subject throws
 * NbdConfigError naming it). `undefined` compiles to ALLOW_EVERYONE.
 *
 * @example
 * ```ts
 * const rule = compileAllowList({ addresses: ["10.0.0.0/8", "unix"] });
 * rule.allows({ address: "10.1.2.3", certSubject: null }); // true
 * rule.allows({ address: "192.168.1.1", certSubject: null }); // false
 * ```
 */
export function compileAllowList(allow: NbdAllowList | undefined): AccessRule {
  if (allow === undefined) return ALLOW_EVERYONE;
  if (typeof allow !== "object" || allow === null) {
    throw new NbdConfigError("allow must be an object { addresses?, certSubjects? }");
  }
  const checks: Array<(client: ClientIdentity) => boolean> = [];
  if (allow.addresses !== undefined) checks.push(compileAddresses(allow.addresses));
  if (allow.certSubjects !== undefined) checks.push(compileSubjects(allow.certSubjects));
  return { allows: (client) => checks.every((check) => check(client)) };
}

function compileAddresses(entries: string[]): (client: ClientIdentity) => boolean {
  if (!Array.isArray(entries)) throw new NbdConfigError("allow.addresses must be an array of strings");
  const list = new BlockList();
  let unix = false;
  for (const entry of entries) {
    if (typeof entry !== "string")
      throw new NbdConfigError(`allow.addresses entry ${String(entry)} is not a string`);
    const text = entry.trim();
    if (text === UNIX_SOCKET_CLIENT) {
      unix = true;
      continue;
    }
    const slash = text.indexOf("/");
    const ip = slash < 0 ? text : text.slice(0, slash);
    const family = isIPv4(ip) ? "ipv4" : isIPv6(ip) ? "ipv6" : null;
    if (!family) {
      throw new NbdConfigError(
        `allow.addresses entry "${entry}" is not an IPv4/IPv6 address, a CIDR subnet (10.0.0.0/8) or "unix"`,
      );
    }
    if (slash < 0) {
      list.addAddress(ip, family);
      continue;
    }
    const prefixText = text.slice(slash + 1);
    const maxPrefix = family === "ipv4" ? 32 : 128;
    const prefix = /^\d{1,3}$/.test(prefixText) ? Number(prefixText) : Number.NaN;
    if (!(prefix >= 0 && prefix <= maxPrefix)) {
      throw new NbdConfigError(
        `allow.addresses entry "${entry}": prefix length must be an integer 0..${maxPrefix}`,
      );
    }
    list.addSubnet(ip, prefix, family);
  }
  return (client) => {
    if (client.address === null) return unix;
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(client.address);
    if (mapped) return list.check(mapped[1] as string, "ipv4");
    return list.check(client.address, isIPv4(client.address) ? "ipv4" : "ipv6");
  };
}

function compileSubjects(entries: string[]): (client: ClientIdentity) => boolean {
  if (!Array.isArray(entries)) throw new NbdConfigError("allow.certSubjects must be an array of strings");
  const commonNames = new Set<string>();
  const fullSubjects: string[] = [];
  for (const entry of entries) {
    if (typeof entry !== "string" || entry.trim() === "") {
      throw new NbdConfigError(
        `allow.certSubjects entry ${JSON.stringify(entry)} must be a non-empty string`,
      );
    }
    if (!entry.includes("=")) commonNames.add(entry);
    else fullSubjects.push(subjectKey(parseSubject(entry)));
  }
  return (client) => {
    const subject = client.certSubject;
    if (!subject) return false;
    if (subject.some(([k, v]) => k === "CN" && commonNames.has(v))) return true;
    return fullSubjects.length > 0 && fullSubjects.includes(subjectKey(subject));
  };
}

/**
 * Parses a distinguished name written as `K=V, K=V` (with `\,` `\/` `\\` escapes) or openssl's
 * `/K=V/K=V` into attribute pairs, attribute names upper-cased.
 *
 * @example
 * ```ts
 * parseSubject("/O=Example/CN=backup host"); // [["O", "Example"], ["CN", "backup host"]]
 * ```
 */
export function parseSubject(text: string): Array<[string, string]> {
  const slashForm = text.startsWith("/");
  const separator = slashForm ? "/" : ",";
  const parts: string[] = [];
  let current = "";
  for (let i = slashForm ? 1 : 0; i < text.length; i++) {
    const c = text[i] as string;
    if (c === "\\" && i + 1 < text.length) {
      current += text[++i];
    } else if (c === separator) {
      parts.push(current);
      current = "";
    } else current += c;
  }
  parts.push(current);
  return parts.map((part) => {
    const eq = part.indexOf("=");
    const key = part.slice(0, eq).trim().toUpperCase();
    const value = part.slice(eq + 1).trim();
    if (eq < 0 || !/^[A-Z][A-Z0-9.-]*$/.test(key) || value === "") {
      throw new NbdConfigError(
        `certificate subject "${text}": "${part.trim()}" is not ATTRIBUTE=value (e.g. "O=Example, CN=host")`,
      );
    }
    return [key, value];
  });
}

function subjectKey(pairs: ReadonlyArray<readonly [string, string]>): string {
  return pairs
    .map(([k, v]) => `${k}=${v}`)
    .sort()
    .join("\n");
}

/**
 * A verified peer certificate's subject (node:tls `getPeerCertificate().subject`, whose values
 * are strings or arrays of strings for repeated attributes) as attribute pairs.
 *
 * @example
 * ```ts
 * subjectPairs({ O: "Example", CN: "host" }); // [["O", "Example"], ["CN", "host"]]
 * ```
 */
export function subjectPairs(
  subject: Record<string, string | string[] | undefined>,
): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (const [k, v] of Object.entries(subject)) {
    if (v === undefined) continue;
    for (const value of Array.isArray(v) ? v : [v]) out.push([k.toUpperCase(), value]);
  }
  return out;
}
