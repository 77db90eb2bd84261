/**
 * Export visibility: per-export allow lists (client certificate subject, source address, Unix
 * socket) seen through libnbd's nbdinfo, NbdDevice and raw sockets, and the TLS-only mode that
 * reveals nothing before STARTTLS. A refused client must get exactly what an unknown name gets.
 */
import { execFile, execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MemoryDevice } from "@udm/kcopyd";
import {
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NbdDevice,
  NbdServer,
} from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { infoData, metaContextData, RawPeer } from "../packages/nbd-server/src/raw-peer.js";
import { CI, hasTool, withTools } from "./tools.js";

function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: 30_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(" ")} failed: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

let dir: string;
/** libnbd tls-certificates directories: CA only; CA + "udm client" cert; CA + "intruder" cert; CA + a self-signed "udm client". */
const certDirs = { caOnly: "", client: "", intruder: "", selfSigned: "" };
let pem: { ca: Buffer; cert: Buffer; key: Buffer };

function openssl(args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: "ignore" });
}

const EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

function makeCert(name: string, subject: string, ext: string): void {
  writeFileSync(join(dir, `${name}.ext`), ext);
  openssl(["req", ...EC, "-keyout", `${name}-key.pem`, "-out", `${name}.csr`, "-subj", subject]);
  openssl(
    [
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      "-CA",
      "ca-cert.pem",
      "-CAkey",
      "ca-key.pem",
      "-CAcreateserial",
    ].concat(["-out", `${name}-cert.pem`, "-days", "2", "-extfile", `${name}.ext`]),
  );
}

function certDir(name: string, client?: string): string {
  const d = join(dir, name);
  mkdirSync(d);
  copyFileSync(join(dir, "ca-cert.pem"), join(d, "ca-cert.pem"));
  if (client) {
    copyFileSync(join(dir, `${client}-cert.pem`), join(d, "client-cert.pem"));
    copyFileSync(join(dir, `${client}-key.pem`), join(d, "client-key.pem"));
  }
  return d;
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "udm-nbd-access-"));
  if (!hasTool("openssl") && !CI) return;
  const clientExt = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n";
  openssl(
    ["req", "-x509", ...EC, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2"].concat(
      ["-subj", "/CN=udm test CA", "-addext", "basicConstraints=critical,CA:TRUE"],
      ["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    ),
  );
  makeCert(
    "server",
    "/CN=localhost",
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
  );
  makeCert("client", "/O=udm tests/CN=udm client", clientExt);
  makeCert("intruder", "/CN=intruder", clientExt);
  // Same subject as the trusted client, but signed by nobody we trust.
  writeFileSync(join(dir, "forged.ext"), clientExt);
  openssl(
    ["req", "-x509", ...EC, "-keyout", "forged-key.pem", "-out", "forged-cert.pem", "-days", "2"].concat([
      "-subj",
      "/O=udm tests/CN=udm client",
      "-addext",
      "extendedKeyUsage=clientAuth",
    ]),
  );
  certDirs.caOnly = certDir("ca-only");
  certDirs.client = certDir("with-client", "client");
  certDirs.intruder = certDir("with-intruder", "intruder");
  certDirs.selfSigned = certDir("with-forged", "forged");
  pem = {
    ca: readFileSync(join(dir, "ca-cert.pem")),
    cert: readFileSync(join(dir, "server-cert.pem")),
    key: readFileSync(join(dir, "server-key.pem")),
  };
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** The export table every test serves: one export per kind of rule. */
function addExports(server: NbdServer): void {
  server.addExport("public", new MemoryDevice(1 << 20), { description: "everyone" });
  server.addExport("by-cn", new MemoryDevice(2 << 20), { allow: { certSubjects: ["udm client"] } });
  server.addExport("by-subject", new MemoryDevice(2 << 20), {
    allow: { certSubjects: ["/O=udm tests/CN=udm client"] },
  });
  server.addExport("loopback", new MemoryDevice(3 << 20), { allow: { addresses: ["127.0.0.0/8", "::1"] } });
  server.addExport("elsewhere", new MemoryDevice(4 << 20), { allow: { addresses: ["192.0.2.0/24"] } });
  server.addExport("unix-only", new MemoryDevice(5 << 20), { allow: { addresses: ["unix"] } });
  server.addExport("cn-and-unix", new MemoryDevice(6 << 20), {
    allow: { addresses: ["unix"], certSubjects: ["udm client"] },
  });
}

async function listJson(uri: string): Promise<string[]> {
  const out = JSON.parse(await run("nbdinfo", ["--list", "--json", uri]));
  return (out.exports as Array<{ "export-name": string }>).map((e) => e["export-name"]).sort();
}

async function rawPeer(address: string): Promise<RawPeer> {
  const p = await RawPeer.connect(address);
  await p.greet();
  return p;
}

/** The reply types (error or not) for INFO, GO and LIST_META_CONTEXT on `name`, then ABORT-free close. */
async function optionAnswers(address: string, name: string): Promise<number[]> {
  const p = await rawPeer(address);
  try {
    const answers: number[] = [];
    p.option(NBD_OPT_STRUCTURED_REPLY);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ACK);
    for (const [option, data] of [
      [NBD_OPT_INFO, infoData(name, [])],
      [NBD_OPT_LIST_META_CONTEXT, metaContextData(name, [])],
      [NBD_OPT_GO, infoData(name, [])],
    ] as const) {
      p.option(option, data);
      for (;;) {
        const r = await p.optionReply();
        if (r.replyType === NBD_REP_ACK || r.replyType >= 0x80000000) {
          answers.push(r.replyType);
          break;
        }
      }
      if (option === NBD_OPT_GO && answers.at(-1) === NBD_REP_ACK) break;
    }
    return answers;
  } finally {
    p.close();
  }
}

/** Whether EXPORT_NAME `name` gets the 10-byte reply (true) or a closed connection (false). */
async function exportNameOpens(address: string, name: string): Promise<boolean> {
  const p = await rawPeer(address);
  p.option(NBD_OPT_EXPORT_NAME, Buffer.from(name, "utf8"));
  try {
    await p.read(10);
    return true;
  } catch {
    return false;
  } finally {
    p.close();
  }
}

describe("per-export allow lists (plain text and TLS)", () => {
  let server: NbdServer;
  let tcp: string;
  let unixPath: string;

  beforeAll(async () => {
    if (!pem) return;
    server = new NbdServer({ tls: { ...pem, required: false } });
    addExports(server);
    tcp = await server.listen({ host: "127.0.0.1", port: 0 });
    unixPath = join(dir, "nbd.sock");
    await server.listen({ path: unixPath });
  });
  afterAll(async () => {
    await server?.close({ force: true });
  });

  withTools("openssl", "nbdinfo")(
    "nbdinfo --list shows each client only the exports it may open",
    async () => {
      expect(await listJson(`nbd://${tcp}`)).toEqual(["loopback", "public"]);
      expect(await listJson(`nbds://${tcp}?tls-certificates=${certDirs.caOnly}`)).toEqual([
        "loopback",
        "public",
      ]);
      expect(await listJson(`nbds://${tcp}?tls-certificates=${certDirs.client}`)).toEqual([
        "by-cn",
        "by-subject",
        "loopback",
        "public",
      ]);
      expect(await listJson(`nbds://${tcp}?tls-certificates=${certDirs.intruder}`)).toEqual([
        "loopback",
        "public",
      ]);
      // A self-signed certificate claiming the trusted subject identifies nobody.
      expect(await listJson(`nbds://${tcp}?tls-certificates=${certDirs.selfSigned}`)).toEqual([
        "loopback",
        "public",
      ]);
      expect(await listJson(`nbd+unix:///?socket=${unixPath}`)).toEqual(["public", "unix-only"]);
    },
  );

  withTools("openssl", "nbdinfo")(
    "nbdinfo opens an allowed export and fails on a refused one as on a missing one",
    async () => {
      const size = async (uri: string) => Number((await run("nbdinfo", ["--size", uri])).trim());
      expect(await size(`nbds://${tcp}/by-cn?tls-certificates=${certDirs.client}`)).toBe(2 << 20);
      expect(await size(`nbd://${tcp}/loopback`)).toBe(3 << 20);
      expect(await size(`nbd+unix:///unix-only?socket=${unixPath}`)).toBe(5 << 20);
      /** nbdinfo's error with the export name blanked out ("opened" if it succeeded). */
      const errorOf = (uri: string, name: string) =>
        run("nbdinfo", ["--size", uri]).then(
          () => "opened",
          (err: Error) => err.message.split(name).join("NAME"),
        );
      const missing = await errorOf(`nbd://${tcp}/no-such-export`, "no-such-export");
      expect(missing).toMatch(/no export named/);
      for (const uri of [
        `nbd://${tcp}/by-cn`,
        `nbds://${tcp}/by-cn?tls-certificates=${certDirs.intruder}`,
        `nbds://${tcp}/by-subject?tls-certificates=${certDirs.selfSigned}`,
        `nbd://${tcp}/elsewhere`,
        `nbd://${tcp}/unix-only`,
        `nbd+unix:///loopback?socket=${unixPath}`,
      ]) {
        expect(
          await run("nbdinfo", ["--size", uri]).then(
            () => uri,
            () => "refused",
          ),
        ).toBe("refused");
      }
      expect(await errorOf(`nbd://${tcp}/elsewhere`, "elsewhere")).toBe(missing);
      const viaTls = (name: string) =>
        errorOf(`nbds://${tcp}/${name}?tls-certificates=${certDirs.intruder}`, name);
      expect(await viaTls("by-cn")).toBe(await viaTls("no-such-export"));
    },
  );

  withTools("openssl")(
    "NbdDevice needs both a Unix socket and the certificate for an export that asks for both",
    async () => {
      // Over TCP with the right certificate: still hidden (the address list says unix only).
      await expect(
        NbdDevice.connect(`nbds://${tcp}/cn-and-unix?tls-certificates=${certDirs.client}`),
      ).rejects.toThrow();
      const dev = await NbdDevice.connect(`nbd+unix:///public?socket=${unixPath}`);
      expect(dev.sizeBytes).toBe(1 << 20);
      await dev.close();
      await expect(NbdDevice.connect(`nbd+unix:///cn-and-unix?socket=${unixPath}`)).rejects.toThrow();
    },
  );

  withTools("openssl")(
    "raw sockets: INFO, LIST_META_CONTEXT and GO answer a refused export exactly as an unknown one",
    async () => {
      const unknown = await optionAnswers(tcp, "no-such-export");
      expect(unknown).toEqual([NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNKNOWN]);
      for (const hidden of ["by-cn", "by-subject", "elsewhere", "unix-only", "cn-and-unix"]) {
        expect(await optionAnswers(tcp, hidden)).toEqual(unknown);
      }
      expect(await optionAnswers(tcp, "loopback")).toEqual([NBD_REP_ACK, NBD_REP_ACK, NBD_REP_ACK]);
      expect(await optionAnswers(unixPath, "loopback")).toEqual(unknown);
      expect(await optionAnswers(unixPath, "unix-only")).toEqual([NBD_REP_ACK, NBD_REP_ACK, NBD_REP_ACK]);
      expect(await exportNameOpens(tcp, "elsewhere")).toBe(false);
      expect(await exportNameOpens(tcp, "no-such-export")).toBe(false);
      expect(await exportNameOpens(tcp, "public")).toBe(true);
      expect(await exportNameOpens(unixPath, "unix-only")).toBe(true);
    },
  );

  it('the default export "" is hidden when the only export refuses the client', async () => {
    const solo = new NbdServer();
    solo.addExport("only", new MemoryDevice(4096), { allow: { addresses: ["unix"] } });
    const address = await solo.listen({ host: "127.0.0.1", port: 0 });
    try {
      expect(await optionAnswers(address, "")).toEqual([
        NBD_REP_ERR_UNKNOWN,
        NBD_REP_ERR_UNKNOWN,
        NBD_REP_ERR_UNKNOWN,
      ]);
      expect(await exportNameOpens(address, "")).toBe(false);
      const p = await rawPeer(address);
      p.option(NBD_OPT_LIST);
      expect((await p.optionReply()).replyType).toBe(NBD_REP_ACK); // no NBD_REP_SERVER first
      p.close();
    } finally {
      await solo.close({ force: true });
    }
  });
});

describe("TLS-only mode reveals nothing before STARTTLS", () => {
  withTools("openssl")(
    "every option but STARTTLS gets ERR_TLS_REQD, known and unknown names alike; EXPORT_NAME closes",
    async () => {
      const server = new NbdServer({ tls: { ...pem, required: true } });
      addExports(server);
      const address = await server.listen({ host: "127.0.0.1", port: 0 });
      try {
        const p = await rawPeer(address);
        const requests: Array<[number, Buffer | undefined]> = [
          [NBD_OPT_LIST, undefined],
          [NBD_OPT_STRUCTURED_REPLY, undefined],
          [NBD_OPT_INFO, infoData("public", [])],
          [NBD_OPT_INFO, infoData("no-such-export", [])],
          [NBD_OPT_LIST_META_CONTEXT, metaContextData("public", [])],
          [NBD_OPT_GO, infoData("public", [])],
          [NBD_OPT_GO, infoData("", [])],
          [999, Buffer.from("junk")],
        ];
        for (const [option, data] of requests) {
          p.option(option, data);
          const r = await p.optionReply();
          expect({ option: r.option, reply: r.replyType }).toEqual({ option, reply: NBD_REP_ERR_TLS_REQD });
          expect(r.data.toString("utf8")).not.toMatch(/public|export/);
        }
        // The connection is still in haggling: STARTTLS is acknowledged.
        p.option(NBD_OPT_STARTTLS);
        expect((await p.optionReply()).replyType).toBe(NBD_REP_ACK);
        p.close();
        for (const name of ["public", "no-such-export", ""])
          expect(await exportNameOpens(address, name)).toBe(false);
        // Nothing was listed in the clear, and nbdinfo in the clear fails.
        if (hasTool("nbdinfo") || CI) {
          await expect(run("nbdinfo", ["--list", `nbd://${address}`])).rejects.toThrow();
          expect(await listJson(`nbds://${address}?tls-certificates=${certDirs.client}`)).toContain("by-cn");
        }
      } finally {
        await server.close({ force: true });
      }
    },
  );
});
