/**
 * STARTTLS end-to-end: certificates made by openssl, NbdServer in TLS-mandatory mode, libnbd's
 * nbdinfo and NbdDevice as clients, with and without a required client certificate.
 */
import { execFile, execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MemoryDevice } from "@udm/kcopyd";
import { NbdDevice, NbdServer } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect } from "vitest";
import { CI, hasTool, withTools } from "./tools.js";

function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: 30_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} failed: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

let dir: string;
/** libnbd's tls-certificates layout: ca-cert.pem (+ client-cert.pem, client-key.pem). */
let caOnly: string;
let withClientCert: string;
let wrongClientCert: string;
let pem: { ca: Buffer; cert: Buffer; key: Buffer };
const disk = new MemoryDevice(4 << 20);

function openssl(args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: "ignore" });
}

function makeCert(name: string, subject: string, ext: string): void {
  writeFileSync(join(dir, `${name}.ext`), ext);
  openssl(
    ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"].concat([
      "-keyout",
      `${name}-key.pem`,
      "-out",
      `${name}.csr`,
      "-subj",
      subject,
    ]),
  );
  openssl(
    ["x509", "-req", "-in", `${name}.csr`, "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem"].concat([
      "-CAcreateserial",
      "-out",
      `${name}-cert.pem`,
      "-days",
      "2",
      "-extfile",
      `${name}.ext`,
    ]),
  );
}

beforeAll(() => {
  if (!hasTool("openssl") && !CI) return;
  dir = mkdtempSync(join(tmpdir(), "udm-nbd-tls-"));
  openssl(
    ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"].concat(
      ["-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=udm test CA"],
      ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    ),
  );
  makeCert(
    "server",
    "/CN=localhost",
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
  );
  makeCert("client", "/CN=udm client", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n");
  // A client certificate from another CA of the same name (so GnuTLS clients do present it,
  // matching the server's CA list), which does not verify against ours.
  openssl(
    ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"].concat(
      ["-keyout", "rogue-ca-key.pem", "-out", "rogue-ca-cert.pem", "-days", "2", "-subj", "/CN=udm test CA"],
      ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    ),
  );
  writeFileSync(join(dir, "rogue.ext"), "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n");
  openssl(
    [
      "req",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:prime256v1",
      "-nodes",
      "-keyout",
      "rogue-key.pem",
    ].concat(["-out", "rogue.csr", "-subj", "/CN=udm client"]),
  );
  openssl(
    ["x509", "-req", "-in", "rogue.csr", "-CA", "rogue-ca-cert.pem", "-CAkey", "rogue-ca-key.pem"].concat([
      "-CAcreateserial",
      "-out",
      "rogue-cert.pem",
      "-days",
      "2",
      "-extfile",
      "rogue.ext",
    ]),
  );
  wrongClientCert = join(dir, "wrong-client");
  mkdirSync(wrongClientCert);
  copyFileSync(join(dir, "ca-cert.pem"), join(wrongClientCert, "ca-cert.pem"));
  copyFileSync(join(dir, "rogue-cert.pem"), join(wrongClientCert, "client-cert.pem"));
  copyFileSync(join(dir, "rogue-key.pem"), join(wrongClientCert, "client-key.pem"));
  caOnly = join(dir, "ca-only");
  withClientCert = join(dir, "with-client");
  mkdirSync(caOnly);
  mkdirSync(withClientCert);
  copyFileSync(join(dir, "ca-cert.pem"), join(caOnly, "ca-cert.pem"));
  copyFileSync(join(dir, "ca-cert.pem"), join(withClientCert, "ca-cert.pem"));
  copyFileSync(join(dir, "client-cert.pem"), join(withClientCert, "client-cert.pem"));
  copyFileSync(join(dir, "client-key.pem"), join(withClientCert, "client-key.pem"));
  pem = {
    ca: readFileSync(join(dir, "ca-cert.pem")),
    cert: readFileSync(join(dir, "server-cert.pem")),
    key: readFileSync(join(dir, "server-key.pem")),
  };
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

async function start(requireClientCert: boolean, ca = true): Promise<{ server: NbdServer; address: string }> {
  const tls = ca ? pem : { cert: pem.cert, key: pem.key };
  const server = new NbdServer({ tls: { ...tls, required: true, requireClientCert } });
  server.addExport("disk", disk, { description: "over TLS" });
  return { server, address: await server.listen({ host: "127.0.0.1", port: 0 }) };
}

describe("STARTTLS, TLS mandatory", () => {
  withTools("openssl", "nbdinfo")("serves nbdinfo over nbds:// and refuses it in the clear", async () => {
    const { server, address } = await start(false);
    try {
      const info = JSON.parse(
        await run("nbdinfo", ["--json", `nbds://${address}/disk?tls-certificates=${caOnly}`]),
      );
      expect(info.TLS).toBe(true);
      expect(info.exports[0]["export-size"]).toBe(4 << 20);
      // libnbd 1.14 reports NBD_REP_ERR_TLS_REQD as "Operation not supported".
      await expect(run("nbdinfo", ["--json", `nbd://${address}/disk`])).rejects.toThrow(/TLS|not supported/i);
    } finally {
      await server.close({ force: true });
    }
  });

  withTools("openssl")("serves NbdDevice over nbds://, and NbdDevice refuses a wrong CA", async () => {
    const { server, address } = await start(false);
    try {
      const dev = await NbdDevice.connect(`nbds://${address}/disk?tls-certificates=${caOnly}`);
      await dev.write(4096, Buffer.alloc(65536, 0x3c), { fua: true });
      expect((await dev.read(4096, 65536)).every((b) => b === 0x3c)).toBe(true);
      await dev.close();
      await expect(NbdDevice.connect(`nbd://${address}/disk`)).rejects.toThrow(/TLS/);
      await expect(
        NbdDevice.connect(`nbds://${address}/disk`, { tls: { ca: pem.cert } }), // not the issuing CA
      ).rejects.toThrow(/TLS handshake failed/);
    } finally {
      await server.close({ force: true });
    }
  });

  withTools("openssl", "nbdinfo")(
    "with a CA: a client certificate that does not verify is refused, an anonymous client is not",
    async () => {
      const { server, address } = await start(false);
      try {
        // tlswrongcert of the NBD tester: a certificate, but not one our CA signed.
        await expect(
          run("nbdinfo", ["--json", `nbds://${address}/disk?tls-certificates=${wrongClientCert}`]),
        ).rejects.toThrow();
        expect(
          JSON.parse(await run("nbdinfo", ["--json", `nbds://${address}/disk?tls-certificates=${caOnly}`]))
            .exports[0]["export-size"],
        ).toBe(4 << 20);
        expect(
          JSON.parse(
            await run("nbdinfo", ["--json", `nbds://${address}/disk?tls-certificates=${withClientCert}`]),
          ).TLS,
        ).toBe(true);
      } finally {
        await server.close({ force: true });
      }
      // Without a CA nothing is checked, so no certificate is refused.
      const noCa = await start(false, false);
      try {
        expect(
          JSON.parse(
            await run("nbdinfo", [
              "--json",
              `nbds://${noCa.address}/disk?tls-certificates=${wrongClientCert}`,
            ]),
          ).TLS,
        ).toBe(true);
      } finally {
        await noCa.server.close({ force: true });
      }
    },
  );

  withTools("openssl", "nbdinfo")("requires a client certificate when configured", async () => {
    const { server, address } = await start(true);
    try {
      const info = JSON.parse(
        await run("nbdinfo", ["--json", `nbds://${address}/disk?tls-certificates=${withClientCert}`]),
      );
      expect(info.TLS).toBe(true);
      await expect(
        run("nbdinfo", ["--json", `nbds://${address}/disk?tls-certificates=${caOnly}`]),
      ).rejects.toThrow();
      const dev = await NbdDevice.connect(`nbds://${address}/disk?tls-certificates=${withClientCert}`);
      expect(dev.sizeBytes).toBe(4 << 20);
      await dev.close();
    } finally {
      await server.close({ force: true });
    }
  });
});
