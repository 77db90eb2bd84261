import { MemoryDevice } from "@udm/kcopyd";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  type ClientIdentity,
  compileAllowList,
  NbdConfigError,
  parseSubject,
  validateExportDescription,
  validateExportName,
} from "./access.js";
import { NbdServer } from "./server.js";

const at = (address: string | null): ClientIdentity => ({ address, certSubject: null });
const withCert = (address: string | null, subject: Array<[string, string]>): ClientIdentity => ({
  address,
  certSubject: subject,
});

describe("validateExportName", () => {
  it("accepts ordinary names, the default export and 4096 bytes exactly", () => {
    for (const name of ["", "disk0", "vm/root disk", "диск", "a".repeat(4096), "é".repeat(2048)]) {
      expect(() => validateExportName(name)).not.toThrow();
    }
  });

  it("refuses control characters, NUL, over-long names and lone surrogates, naming the problem", () => {
    expect(() => validateExportName("a\nb")).toThrow(/control character U\+000A at index 1/);
    expect(() => validateExportName("a\u007f")).toThrow(/U\+007F/);
    expect(() => validateExportName("a\u0085")).toThrow(/U\+0085/);
    expect(() => validateExportName("x\0")).toThrow(/NUL/);
    expect(() => validateExportName("a".repeat(4097))).toThrow(/4097 bytes of UTF-8; .* at most 4096/);
    expect(() => validateExportName("é".repeat(2049))).toThrow(/4098 bytes/);
    expect(() => validateExportName("a\ud800b")).toThrow(/surrogate/);
    expect(() => validateExportName("a\udc00")).toThrow(/surrogate/);
    expect(() => validateExportName("a\ud83d\ude00")).not.toThrow(); // a proper pair
    expect(() => validateExportDescription("x".repeat(4097))).toThrow(NbdConfigError);
    expect(() => validateExportDescription("two\nlines")).not.toThrow();
  });

  it("addExport refuses bad names and entries with NbdConfigError, and keeps the table unchanged", () => {
    const server = new NbdServer();
    const dev = new MemoryDevice(4096);
    expect(() => server.addExport("bad\tname", dev)).toThrow(NbdConfigError);
    expect(() => server.addExport("ok", dev, { description: "\0" })).toThrow(/description/);
    expect(() => server.addExport("ok", dev, { allow: { addresses: ["10.0.0.0/33"] } })).toThrow(
      /"10.0.0.0\/33": prefix length must be an integer 0..32/,
    );
    expect(() => server.addExport("ok", dev, { allow: { certSubjects: ["host"] } })).toThrow(/needs tls.ca/);
    expect(server.exports()).toEqual([]);
    server.addExport("ok", dev, { allow: { addresses: ["unix"] } });
    expect(server.exports()[0]?.allow).toEqual({ addresses: ["unix"] });
  });
});

describe("compileAllowList", () => {
  it("allows everyone without a list, and nobody with empty lists", () => {
    expect(compileAllowList(undefined).allows(at("192.0.2.1"))).toBe(true);
    expect(compileAllowList({ addresses: [] }).allows(at("127.0.0.1"))).toBe(false);
    expect(compileAllowList({ addresses: [] }).allows(at(null))).toBe(false);
    expect(compileAllowList({ certSubjects: [] }).allows(withCert(null, [["CN", "a"]]))).toBe(false);
  });

  it("matches IPv4 and IPv6 addresses and subnets, IPv4-mapped peers, and unix", () => {
    const rule = compileAllowList({ addresses: ["10.0.0.0/8", "192.0.2.7", "fd00::/8", "::1", "unix"] });
    expect(rule.allows(at("10.255.1.2"))).toBe(true);
    expect(rule.allows(at("::ffff:10.1.1.1"))).toBe(true);
    expect(rule.allows(at("11.0.0.1"))).toBe(false);
    expect(rule.allows(at("192.0.2.7"))).toBe(true);
    expect(rule.allows(at("192.0.2.8"))).toBe(false);
    expect(rule.allows(at("fd12:3456::1"))).toBe(true);
    expect(rule.allows(at("fe80::1"))).toBe(false);
    expect(rule.allows(at("::1"))).toBe(true);
    expect(rule.allows(at(null))).toBe(true);
    expect(compileAllowList({ addresses: ["127.0.0.1"] }).allows(at(null))).toBe(false);
  });

  it("matches IPv4 /n subnets like a bit-prefix model", () => {
    const ip = (n: number) => [24, 16, 8, 0].map((s) => (n >>> s) & 255).join(".");
    fc.assert(
      fc.property(
        fc.nat({ max: 0xffffffff }),
        fc.integer({ min: 0, max: 32 }),
        fc.nat({ max: 0xffffffff }),
        (net, prefix, addr) => {
          const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
          const expected = (net & mask) >>> 0 === (addr & mask) >>> 0;
          expect(compileAllowList({ addresses: [`${ip(net)}/${prefix}`] }).allows(at(ip(addr)))).toBe(
            expected,
          );
        },
      ),
      { numRuns: 300 },
    );
  });

  it("refuses malformed address entries, naming them", () => {
    for (const bad of ["localhost", "10.0.0.0/", "10.0.0.0/-1", "::1/129", "1.2.3.4/8x", "300.1.1.1", ""]) {
      expect(() => compileAllowList({ addresses: [bad] })).toThrow(
        new RegExp(`entry "${bad.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}"`),
      );
    }
  });

  it("matches a certificate by CN or by full subject, never a client without one", () => {
    const rule = compileAllowList({ certSubjects: ["backup host", "O=Example, CN=web"] });
    expect(rule.allows(withCert("10.0.0.1", [["CN", "backup host"]]))).toBe(true);
    expect(
      rule.allows(
        withCert("10.0.0.1", [
          ["O", "Other"],
          ["CN", "backup host"],
        ]),
      ),
    ).toBe(true);
    expect(
      rule.allows(
        withCert(null, [
          ["CN", "web"],
          ["O", "Example"],
        ]),
      ),
    ).toBe(true);
    expect(rule.allows(withCert(null, [["CN", "web"]]))).toBe(false); // full subject differs
    expect(
      rule.allows(
        withCert(null, [
          ["CN", "web"],
          ["O", "Example"],
          ["C", "FR"],
        ]),
      ),
    ).toBe(false);
    expect(rule.allows(withCert(null, [["CN", "Backup Host"]]))).toBe(false);
    expect(rule.allows(at("10.0.0.1"))).toBe(false);
  });

  it("needs every list given to match", () => {
    const rule = compileAllowList({ addresses: ["127.0.0.0/8"], certSubjects: ["a"] });
    expect(rule.allows(withCert("127.0.0.1", [["CN", "a"]]))).toBe(true);
    expect(rule.allows(withCert("10.0.0.1", [["CN", "a"]]))).toBe(false);
    expect(rule.allows(at("127.0.0.1"))).toBe(false);
  });

  it("parses both subject notations with escapes, and refuses junk", () => {
    expect(parseSubject("/O=Example/CN=backup host")).toEqual([
      ["O", "Example"],
      ["CN", "backup host"],
    ]);
    expect(parseSubject("o=A\\, Inc., cn=x")).toEqual([
      ["O", "A, Inc."],
      ["CN", "x"],
    ]);
    expect(() => parseSubject("CN=a, junk")).toThrow(/"junk" is not ATTRIBUTE=value/);
    expect(() => compileAllowList({ certSubjects: [""] })).toThrow(/non-empty/);
  });
});
