import { execFileSync, spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, requireTool, startServe, udm } from "./cli-helpers.js";

let dir: string;
const hasNbdinfo = requireTool("nbdinfo");
const hasOpenssl = requireTool("openssl");

beforeAll(() => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-opts-"));
  writeFileSync(join(dir, "disk.img"), Buffer.alloc(1 << 20, 3));
}, 300_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

function openssl(args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: "ignore" });
}

function nbdinfo(args: string[]) {
  return spawnSync("nbdinfo", args, { encoding: "utf8", timeout: 30_000 });
}

describe("udm serve options", () => {
  test.runIf(hasNbdinfo)(
    "--export NAME=DEVICE and --unix serve plain devices on TCP and a Unix socket",
    async () => {
      const sock = join(dir, "nbd.sock");
      const serve = await startServe(
        [
          "--export",
          "disk=disk.img",
          "--export",
          "scratch=mem:2M",
          "--listen",
          "127.0.0.1:0",
          "--unix",
          sock,
          "--control",
          join(dir, "c1.sock"),
        ],
        { cwd: dir },
      );
      try {
        expect(serve.stdout()).toContain(`nbdinfo 'nbd+unix:///disk?socket=${sock}'`);
        const tcp = nbdinfo(["--json", `nbd://127.0.0.1:${serve.port}/disk`]);
        expect(JSON.parse(tcp.stdout).exports[0]["export-size"]).toBe(1 << 20);
        const unix = nbdinfo(["--size", `nbd+unix:///scratch?socket=${sock}`]);
        expect(unix.stdout.trim()).toBe(String(2 << 20));
        const table = udm(["--control", join(dir, "c1.sock"), "table"], { cwd: dir });
        expect(table.stdout).toBe(
          `disk: 0 2048 linear ${join(dir, "disk.img")} 0\nscratch: 0 4096 linear mem:2M 0\n`,
        );
      } finally {
        expect(await serve.stop()).toBe(0);
      }
    },
  );

  test.runIf(hasNbdinfo && hasOpenssl)(
    "--tls-cert/--tls-key/--tls-required: nbds:// works, the clear text is refused",
    async () => {
      openssl(
        [
          "req",
          "-x509",
          "-newkey",
          "ec",
          "-pkeyopt",
          "ec_paramgen_curve:prime256v1",
          "-nodes",
          "-keyout",
          "ca-key.pem",
        ].concat(
          ["-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=udm test CA"],
          [
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
          ],
        ),
      );
      writeFileSync(
        join(dir, "server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
      );
      openssl([
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
      ]);
      openssl(
        [
          "x509",
          "-req",
          "-in",
          "server.csr",
          "-CA",
          "ca-cert.pem",
          "-CAkey",
          "ca-key.pem",
          "-CAcreateserial",
        ].concat(["-out", "server-cert.pem", "-days", "2", "-extfile", "server.ext"]),
      );
      const caDir = join(dir, "ca-only");
      mkdirSync(caDir);
      copyFileSync(join(dir, "ca-cert.pem"), join(caDir, "ca-cert.pem"));
      const serve = await startServe(
        ["--export", "disk=disk.img", "--listen", "127.0.0.1:0", "--control", join(dir, "c2.sock")].concat([
          "--tls-cert",
          "server-cert.pem",
          "--tls-key",
          "server-key.pem",
          "--tls-required",
        ]),
        { cwd: dir },
      );
      try {
        const secure = nbdinfo(["--json", `nbds://127.0.0.1:${serve.port}/disk?tls-certificates=${caDir}`]);
        expect(secure.status).toBe(0);
        expect(JSON.parse(secure.stdout).TLS).toBe(true);
        expect(nbdinfo([`nbd://127.0.0.1:${serve.port}/disk`]).status).not.toBe(0);
      } finally {
        expect(await serve.stop()).toBe(0);
      }
    },
  );

  test("a table file that does not parse: exit 1, file:line and argument named, nothing served", () => {
    writeFileSync(join(dir, "bad.table"), "# ok\nok: 0 8 zero\nbad: 0 8 linear disk.img eight\n");
    const r = udm(
      ["serve", "--table", "bad.table", "--listen", "127.0.0.1:0", "--control", join(dir, "c3.sock")],
      { cwd: dir },
    );
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(
      /udm: bad\.table:3: linear argument 2 \("eight"\): offset \(sectors\) must be a non-negative whole number/,
    );
  });

  test("a table file that cannot be read: exit 1 naming --table and the file, nothing served", () => {
    const r = udm(
      ["serve", "--table", "missing.table", "--listen", "127.0.0.1:0", "--control", join(dir, "c5.sock")],
      { cwd: dir },
    );
    expect(r.stderr).toMatch(
      /^udm: --table missing\.table: cannot read the file \(ENOENT: no such file or directory/m,
    );
    expect(r.status).toBe(1);
  });

  test("a busy port: exit 1 naming the address", async () => {
    const blocker: Server = createServer();
    await new Promise<void>((r) => blocker.listen(0, "127.0.0.1", r));
    const port = (blocker.address() as { port: number }).port;
    try {
      const r = udm(
        ["serve", "--export", "d=mem:1M", "--listen", `127.0.0.1:${port}`, "--control", join(dir, "c4.sock")],
        { cwd: dir },
      );
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/EADDRINUSE|in use/);
    } finally {
      blocker.close();
    }
  });

  test.each([
    [["serve", "--listen", "localhost"], /--listen "localhost": expected HOST:PORT/],
    [["serve", "--export", "noequals"], /--export "noequals": expected NAME=DEVICE/],
    [["serve", "--tls-cert", "x.pem"], /--tls-cert and --tls-key go together/],
    [["serve", "--log-level", "loud"], /argument 'loud' is invalid/],
    [
      ["copy", "--size", "12Q", "a.img", "b.img"],
      /^udm: --size: invalid size "12Q": expected a number with an optional unit \(512, 4k, 1G, 1GiB, 2048s\)\n/,
    ],
    [["copy", "--size", "1000", "a.img", "b.img"], /--size 1000: must be a multiple of 512 bytes/],
    [
      ["copy", "--count", "1.5", "a.img", "b.img"],
      /--count "1.5": expected a whole number of 512-byte sectors/,
    ],
    [["copy", "--count", "8", "--size", "4k", "a.img", "b.img"], /--count and --size are mutually exclusive/],
    [["snapshot", "create", "o", "s", "--cow", "c", "--size", "12Q"], /--size: invalid size "12Q"/],
    [
      ["snapshot", "create", "o", "s", "--cow", "c", "--chunk", "3"],
      /--chunk 3: the chunk size must be a power of two number of sectors \(8 = 4 KiB\), got 3/,
    ],
    [
      ["snapshot", "create", "o", "s", "--cow", "c", "--chunk-size", "3k"],
      /--chunk-size 3k: the chunk size must be a power of two number of sectors \(8 = 4 KiB\), got 6/,
    ],
    [
      ["snapshot", "create", "o", "s", "--cow", "c", "--chunk-size", "1000"],
      /--chunk-size 1000: must be a multiple of 512 bytes/,
    ],
    [
      ["snapshot", "create", "o", "s", "--cow", "c", "--size", "4k"],
      /--size 4k: a COW needs at least a header and a metadata chunk \(8192 bytes\)/,
    ],
    [
      ["snapshot", "create", "o", "s", "--cow", "c", "--transient", "--reuse-cow"],
      /--reuse-cow applies to persistent snapshots only/,
    ],
    [["snapshot", "create", "o", "s"], /required option '--cow <device>' not specified/],
    [["message", "x", "zero", "resync"], /sector "zero": expected a whole number of 512-byte sectors/],
    [
      ["mirror", "resync", "--region-size", "abc", "a.img", "b.img"],
      /--region-size "abc": expected a whole number/,
    ],
    [
      ["mirror", "resync", "--region-size", "8", "a.img"],
      /an offline resync needs PRIMARY and at least one more LEG/,
    ],
    [["create", "x", "--table-file", "missing.table"], /--table-file missing\.table: ENOENT/],
    [["create", "x", "--table", "0 8 zero", "--table-file", "t"], /give --table or --table-file, not both/],
    [["--timeout", "-1", "ls"], /--timeout "-1": expected a number of seconds/],
  ])("usage error %j exits 2", (args, message) => {
    const r = udm(args, { cwd: dir });
    expect(r.stderr).toMatch(message);
    expect(r.status).toBe(2);
  });
});
