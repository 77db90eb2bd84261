/**
 * Records what real NBD clients send (client -> server bytes) through a tiny TCP proxy in
 * front of an NbdServer, into test/fixtures/nbd-sessions/*.bin, for the fuzzer to mutate.
 * Run by hand when the clients or the server's handshake change:
 *   node --import ./test/torture/register-ts.mjs test/torture/record-sessions.ts
 * Every recording targets export "rec" (1 MiB, memory).
 */
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { MemoryDevice } from "@udm/kcopyd";
import { NbdServer } from "@udm/nbd-server";

export const RECORDED_EXPORT = "rec";
export const RECORDED_EXPORT_BYTES = 1024 * 1024;

const OUT = new URL("../fixtures/nbd-sessions/", import.meta.url);

const server = new NbdServer();
server.addExport(RECORDED_EXPORT, new MemoryDevice(RECORDED_EXPORT_BYTES), {
  description: "recording target",
});
const upstream = await server.listen({ host: "127.0.0.1", port: 0 });
const [upHost, upPort] = upstream.split(":") as [string, string];

// One recording per client connection: a multi-conn client (nbdcopy) opens several.
let recording: Buffer[][] = [];
const proxy = net.createServer((client) => {
  const up = net.connect({ host: upHost, port: Number(upPort) });
  const mine: Buffer[] = [];
  recording.push(mine);
  client.on("data", (c: Buffer) => {
    mine.push(Buffer.from(c));
    up.write(c);
  });
  up.on("data", (c: Buffer) => client.write(c));
  client.on("close", () => up.destroy());
  up.on("close", () => client.destroy());
  client.on("error", () => up.destroy());
  up.on("error", () => client.destroy());
});
await new Promise<void>((resolve) => proxy.listen(0, "127.0.0.1", resolve));
const port = (proxy.address() as net.AddressInfo).port;
const uri = `nbd://127.0.0.1:${port}/${RECORDED_EXPORT}`;
const dir = mkdtempSync(join(tmpdir(), "udm-record-"));
const src = join(dir, "src.img");
writeFileSync(src, Buffer.alloc(64 * 1024, 0xa5));

const sessions: Array<[string, string, string[]]> = [
  // nbdcopy writes a 64 KiB file (multi-conn, structured replies, block status on the source side)
  ["nbdcopy-write", "nbdcopy", ["--target-is-zero", src, uri]],
  ["nbdcopy-read", "nbdcopy", [uri, "null:"]],
  ["nbdinfo-map", "nbdinfo", ["--map", uri]],
  ["nbdinfo-list", "nbdinfo", ["--list", `nbd://127.0.0.1:${port}`]],
  [
    "qemu-io",
    "qemu-io",
    [
      "-f",
      "raw",
      "-c",
      "write -P 0x5a 4096 8192",
      "-c",
      "write -f 0 4096",
      "-c",
      "read -P 0x5a 8192 4096",
      "-c",
      "discard 65536 65536",
      "-c",
      "write -z 131072 65536",
      "-c",
      "flush",
      uri,
    ],
  ],
];

for (const [name, cmd, args] of sessions) {
  recording = [];
  // async: the proxy runs on this process's event loop
  await promisify(execFile)(cmd, args, { timeout: 30_000 });
  await new Promise((r) => setTimeout(r, 200));
  // keep the longest connection of the run (the one that did the I/O)
  const bytes =
    recording.map((c) => Buffer.concat(c)).sort((a, b) => b.length - a.length)[0] ?? Buffer.alloc(0);
  writeFileSync(new URL(`${name}.bin`, OUT), bytes);
  console.log(`${name}: ${bytes.length} bytes from ${recording.length} connection(s)`);
}
rmSync(dir, { recursive: true, force: true });
proxy.close();
await server.close({ force: true });
