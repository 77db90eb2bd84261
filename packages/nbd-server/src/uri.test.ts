import { describe, expect, it } from "vitest";
import { parseNbdUri } from "./uri.js";

describe("parseNbdUri", () => {
  it("parses TCP URIs with and without a port", () => {
    expect(parseNbdUri("nbd://127.0.0.1:10900/disk")).toEqual({
      tls: false,
      transport: "tcp",
      host: "127.0.0.1",
      port: 10900,
      exportName: "disk",
    });
    expect(parseNbdUri("nbd://example.org").port).toBe(10809);
    expect(parseNbdUri("nbd://example.org").exportName).toBe("");
    expect(parseNbdUri("nbd://[::1]:99/a%20b/c").host).toBe("::1");
    expect(parseNbdUri("nbd://[::1]:99/a%20b/c").exportName).toBe("a b/c");
  });

  it("parses Unix and TLS URIs", () => {
    expect(parseNbdUri("nbd+unix:///disk?socket=/run/udm.sock")).toEqual({
      tls: false,
      transport: "unix",
      socketPath: "/run/udm.sock",
      exportName: "disk",
    });
    const s = parseNbdUri("nbds://localhost/disk?tls-certificates=/etc/pki/udm&tls-hostname=srv");
    expect(s.tls).toBe(true);
    expect(s.tlsCertificates).toBe("/etc/pki/udm");
    expect(s.tlsHostname).toBe("srv");
    expect(parseNbdUri("nbds+unix:///?socket=/s").tls).toBe(true);
  });

  it("names what is wrong", () => {
    expect(() => parseNbdUri("http://x/y")).toThrow(/not an NBD URI/);
    expect(() => parseNbdUri("nbd+unix:///disk")).toThrow(/socket=PATH/);
    expect(() => parseNbdUri("nbd+unix://host/disk?socket=/s")).toThrow(/no host/);
    expect(() => parseNbdUri("nbd:///disk")).toThrow(/missing host/);
    expect(() => parseNbdUri("nbd://h/%zz")).toThrow(/percent/);
    expect(() => parseNbdUri("nbd://u:p@h/x")).toThrow(/user names/);
  });
});
