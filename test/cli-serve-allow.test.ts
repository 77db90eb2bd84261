import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, requireTool, startServe, udm } from "./cli-helpers.js";

// `udm serve --allow-address / --allow-cert`: per-export allow lists, checked with the real
// built CLI and real `nbdinfo --list` over TCP (127.0.0.1), a Unix socket and TLS.

let dir: string;
const hasNbdinfo = requireTool("nbdinfo");
const hasOpenssl = requireTool("openssl");

beforeAll(() => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-allow-"));
}, 300_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

function nbdinfo(args: string[]) {
  return spawnSync("nbdinfo", args, { encoding: "utf8", timeout: 30_000 });
}

/** Export names `nbdinfo --list --json URI` sees (sorted); throws with nbdinfo's stderr on failure. */
function listed(uri: string): string[] {
  const r = nbdinfo(["--list", "--json", uri]);
  if (r.status !== 0) throw new Error(`nbdinfo --list ${uri} failed (${r.status}): ${r.stderr}`);
  const exports = JSON.parse(r.stdout).exports as Array<{ "export-name": string }>;
  return exports.map((x) => x["export-name"]).sort();
}

describe("udm serve --allow-address", () => {
  test.runIf(hasNbdinfo)(
    "an export allowed only for 10.0.0.0/8 is invisible to 127.0.0.1; unix admits the Unix-socket client; later creates keep the rule",
    async () => {
      const sock = join(dir, "nbd.sock");
      const control = join(dir, "c1.sock");
      writeFileSync(join(dir, "open.img"), Buffer.alloc(1 << 20, 7));
      const serve = await startServe(
        [
          "--export",
          "open=open.img",
          "--export",
          "private=mem:1M",
          "--export",
          "local=mem:2M",
          "--export",
          "both=mem:1M",
          "--listen",
          "127.0.0.1:0",
          "--unix",
          sock,
          "--control",
          control,
          "--allow-address",
          "private=10.0.0.0/8",
          "--allow-address",
          "local=unix",
          // Repeated flags add entries: 127.0.0.1 from the second one, unix from the first.
          "--allow-address",
          "both=fd00::/8,unix",
          "--allow-address",
          "both=127.0.0.1",
        ],
        { cwd: dir },
      );
      const tcp = `nbd://127.0.0.1:${serve.port}`;
      const unix = `nbd+unix:///?socket=${sock}`;
      try {
        expect(listed(tcp)).toEqual(["both", "open"]);
        expect(listed(unix)).toEqual(["both", "local", "open"]);

        // Hidden means hidden: opening it by name is refused like an unknown export.
        expect(nbdinfo(["--size", `${tcp}/private`]).status).not.toBe(0);
        expect(nbdinfo(["--size", `${tcp}/local`]).status).not.toBe(0);
        expect(nbdinfo(["--size", `nbd+unix:///local?socket=${sock}`]).stdout.trim()).toBe(String(2 << 20));
        expect(nbdinfo(["--size", `${tcp}/open`]).stdout.trim()).toBe(String(1 << 20));

        const info = udm(["--control", control, "info", "--json"], { cwd: dir });
        expect(info.status).toBe(0);
        const allow = Object.fromEntries(
          (JSON.parse(info.stdout) as Array<{ name: string; allow?: unknown }>).map((r) => [r.name, r.allow]),
        );
        expect(allow).toEqual({
          open: undefined,
          private: { addresses: ["10.0.0.0/8"] },
          local: { addresses: ["unix"] },
          both: { addresses: ["fd00::/8", "unix", "127.0.0.1"] },
        });
        const text = udm(["--control", control, "info", "private"], { cwd: dir });
        expect(text.stdout).toMatch(/^Allowed clients: {3}addresses 10\.0\.0\.0\/8$/m);

        // The rule belongs to the name: removed and created again, "local" is still Unix-only.
        expect(udm(["--control", control, "remove", "local"], { cwd: dir }).status).toBe(0);
        expect(listed(unix)).toEqual(["both", "open"]);
        const created = udm(["--control", control, "create", "local", "--table", "0 4096 zero"], {
          cwd: dir,
        });
        expect(created.stderr).toBe("");
        expect(created.status).toBe(0);
        expect(listed(tcp)).toEqual(["both", "open"]);
        expect(listed(unix)).toEqual(["both", "local", "open"]);
        // A name without a rule created later is visible to everyone.
        expect(
          udm(["--control", control, "create", "extra", "--table", "0 8 zero"], { cwd: dir }).status,
        ).toBe(0);
        expect(listed(tcp)).toEqual(["both", "extra", "open"]);
      } finally {
        expect(await serve.stop()).toBe(0);
      }
    },
  );

  test.each([
    [
      ["--allow-address", "disk=10.0.0.0/33"],
      /^udm: --allow-address "disk=10\.0\.0\.0\/33": .*"10\.0\.0\.0\/33": prefix length must be an integer 0\.\.32\n/,
    ],
    [
      ["--allow-address", "disk=10.0.0.1,localhost"],
      /^udm: --allow-address "disk=10\.0\.0\.1,localhost": .*"localhost" is not an IPv4\/IPv6 address, a CIDR subnet/,
    ],
    [["--allow-address", "disk"], /^udm: --allow-address "disk": expected EXPORT=CIDR/],
    [["--allow-address", "disk="], /^udm: --allow-address "disk=": expected EXPORT=CIDR/],
    [["--allow-address", "=10.0.0.0/8"], /^udm: --allow-address "=10\.0\.0\.0\/8": expected EXPORT=CIDR/],
    [
      ["--allow-address", "nosuch=10.0.0.0/8"],
      /^udm: --allow-address "nosuch=10\.0\.0\.0\/8": no export named "nosuch" \(exports: "disk"\)/m,
    ],
    [["--allow-cert", "disk=backup host"], /^udm: --allow-cert "disk=backup host" needs --tls-ca/],
  ])("serve %j: exit 2 naming the flag and the value, nothing served", (flags, message) => {
    const control = join(dir, "bad.sock");
    const r = udm(
      ["serve", "--export", "disk=mem:1M", "--listen", "127.0.0.1:0", "--control", control, ...flags],
      { cwd: dir, env: { UDM_LOG_LEVEL: "error" } },
    );
    expect(r.stderr).toMatch(message);
    expect(r.status).toBe(2);
    expect(r.stdout).not.toMatch(/listening/);
  });
});

describe("udm serve --allow-cert", () => {
  test.runIf(hasNbdinfo && hasOpenssl)(
    "an export allowed for one certificate CN is listed only to a client presenting it",
    async () => {
      const openssl = (args: string[]) => execFileSync("openssl", args, { cwd: dir, stdio: "ignore" });
      const key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
      openssl(
        ["req", "-x509", ...key, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2"].concat([
          "-subj",
          "/CN=udm allow CA",
          "-addext",
          "basicConstraints=critical,CA:TRUE",
          "-addext",
          "keyUsage=critical,keyCertSign,cRLSign",
        ]),
      );
      const sign = (name: string, subject: string, ext: string) => {
        writeFileSync(join(dir, `${name}.ext`), ext);
        openssl(["req", ...key, "-keyout", `${name}-key.pem`, "-out", `${name}.csr`, "-subj", subject]);
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
      };
      sign("server", "/CN=localhost", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n");
      sign("backup", "/O=udm test/CN=backup host", "extendedKeyUsage=clientAuth\n");
      sign("other", "/O=udm test/CN=other host", "extendedKeyUsage=clientAuth\n");
      // nbdinfo's tls-certificates directory: ca-cert.pem, client-cert.pem, client-key.pem.
      const clientDir = (name: string) => {
        const d = join(dir, `client-${name}`);
        mkdirSync(d);
        execFileSync("cp", ["ca-cert.pem", join(d, "ca-cert.pem")], { cwd: dir });
        execFileSync("cp", [`${name}-cert.pem`, join(d, "client-cert.pem")], { cwd: dir });
        execFileSync("cp", [`${name}-key.pem`, join(d, "client-key.pem")], { cwd: dir });
        return d;
      };
      const backupDir = clientDir("backup");
      const otherDir = clientDir("other");
      const control = join(dir, "c2.sock");
      const serve = await startServe(
        ["--export", "open=mem:1M", "--export", "backup=mem:1M", "--listen", "127.0.0.1:0"].concat([
          "--control",
          control,
          "--tls-cert",
          "server-cert.pem",
          "--tls-key",
          "server-key.pem",
          "--tls-ca",
          "ca-cert.pem",
          "--allow-cert",
          "backup=backup host",
        ]),
        { cwd: dir },
      );
      const uri = (certs: string) => `nbds://127.0.0.1:${serve.port}/?tls-certificates=${certs}`;
      try {
        expect(listed(uri(backupDir))).toEqual(["backup", "open"]);
        expect(listed(uri(otherDir))).toEqual(["open"]);
        // Plain text: no certificate, so not listed.
        expect(listed(`nbd://127.0.0.1:${serve.port}`)).toEqual(["open"]);
        const info = udm(["--control", control, "info", "--json", "backup"], { cwd: dir });
        expect(JSON.parse(info.stdout)[0].allow).toEqual({ certSubjects: ["backup host"] });
      } finally {
        expect(await serve.stop()).toBe(0);
      }
    },
  );
});
