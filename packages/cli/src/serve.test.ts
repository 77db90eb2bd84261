import { describe, expect, test } from "vitest";
import { parseAllowOptions } from "./serve.js";
import { UsageError } from "./usage-error.js";

describe("parseAllowOptions", () => {
  test("repeated flags add up per export; a subject keeps its commas; both kinds in one list", () => {
    const allow = parseAllowOptions(
      ["disk=10.0.0.0/8, fd00::/8", "disk=unix", "scratch=127.0.0.1"],
      ["disk=O=Example, CN=backup host", "disk=other host"],
    );
    expect(Object.fromEntries(allow)).toEqual({
      disk: {
        addresses: ["10.0.0.0/8", "fd00::/8", "unix"],
        certSubjects: ["O=Example, CN=backup host", "other host"],
      },
      scratch: { addresses: ["127.0.0.1"] },
    });
    expect(parseAllowOptions([], []).size).toBe(0);
  });

  test.each([
    [["disk=10.0.0.0/8,"], [], /^--allow-address "disk=10\.0\.0\.0\/8,": allow\.addresses entry ""/],
    [["disk=300.1.1.1"], [], /^--allow-address "disk=300\.1\.1\.1": .*"300\.1\.1\.1" is not an IPv4/],
    [["bad name=unix"], [], /^--allow-address "bad name=unix": /],
    [[], ["disk=O=Example, =x"], /^--allow-cert "disk=O=Example, =x": certificate subject/],
    [[], ["disk"], /^--allow-cert "disk": expected EXPORT=SUBJECT/],
  ])("%j %j: a UsageError naming the flag and the value", (addresses, certs, message) => {
    expect(() => parseAllowOptions(addresses, certs)).toThrow(UsageError);
    expect(() => parseAllowOptions(addresses, certs)).toThrow(message);
  });
});
