import { randomBytes } from "node:crypto";
import { createServer, type Socket, connect as tcpConnect } from "node:net";
import { MemoryDevice } from "@udm/kcopyd";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { STREAM_RECEIVE_ENV, takeOverReads } from "./direct-receive.js";
import { RawPeer } from "./raw-peer.js";
import { NbdServer } from "./server.js";
import { encodeRequest, NBD_CMD_READ, NBD_CMD_WRITE } from "./wire.js";

describe("takeOverReads", () => {
  it("takes over an accepted TCP socket (Node's onread internals found), not with UDM_NBD_STREAM_RECEIVE=1", async () => {
    const saved = process.env[STREAM_RECEIVE_ENV];
    delete process.env[STREAM_RECEIVE_ENV];
    const accepted: Socket[] = [];
    const server = createServer((s) => accepted.push(s));
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as { port: number }).port;
    const clients = [tcpConnect(port, "127.0.0.1"), tcpConnect(port, "127.0.0.1")];
    try {
      while (accepted.length < 2) await new Promise((r) => setTimeout(r, 5));
      const [a, b] = accepted as [Socket, Socket];
      a.pause();
      expect(takeOverReads(a)).toEqual([]);
      process.env[STREAM_RECEIVE_ENV] = "1";
      expect(takeOverReads(b)).toBeNull();
    } finally {
      if (saved === undefined) delete process.env[STREAM_RECEIVE_ENV];
      else process.env[STREAM_RECEIVE_ENV] = saved;
      for (const c of [...clients, ...accepted]) c.destroy();
      await new Promise((r) => server.close(r));
    }
  });
});

describe.each([
  { mode: "direct receive", stream: false },
  { mode: "stream receive (UDM_NBD_STREAM_RECEIVE=1)", stream: true },
])("WRITE payloads, $mode", ({ stream }) => {
  let server: NbdServer;
  let disk: MemoryDevice;
  let address: string;
  const saved = process.env[STREAM_RECEIVE_ENV];
  beforeEach(async () => {
    if (stream) process.env[STREAM_RECEIVE_ENV] = "1";
    else delete process.env[STREAM_RECEIVE_ENV];
    server = new NbdServer();
    disk = new MemoryDevice(8 << 20);
    server.addExport("disk", disk);
    address = await server.listen({ host: "127.0.0.1", port: 0 });
  });
  afterEach(async () => {
    if (saved === undefined) delete process.env[STREAM_RECEIVE_ENV];
    else process.env[STREAM_RECEIVE_ENV] = saved;
    await server.close({ force: true });
  });

  it("serves pipelined WRITEs and READs whose bytes arrive in pieces of every size", async () => {
    const p = await RawPeer.connect(address);
    try {
      await p.greet();
      await p.go("disk");
      const expected = Buffer.alloc(8 << 20);
      const wire: Buffer[] = [];
      const reads: Array<{ cookie: bigint; offset: number; length: number }> = [];
      const sizes = [256 * 1024, 4096, 100_003, 1 << 20, 17, 65536, 300_000, 1];
      let cookie = 1n;
      let offset = 3; // unaligned, no two ranges overlapping
      for (const size of sizes) {
        const data = randomBytes(size);
        data.copy(expected, offset);
        const c = Buffer.alloc(8);
        c.writeBigUInt64BE(cookie++);
        wire.push(encodeRequest(0, NBD_CMD_WRITE, c, BigInt(offset), size), data);
        const r = Buffer.alloc(8);
        r.writeBigUInt64BE(cookie);
        reads.push({ cookie: cookie++, offset, length: size });
        wire.push(encodeRequest(0, NBD_CMD_READ, r, BigInt(offset), size));
        offset += size + 4097;
      }
      const bytes = Buffer.concat(wire);
      // Pieces from 1 byte to past a socket read, each sent on its own turn.
      let at = 0;
      for (let k = 0; at < bytes.length; k++) {
        const n = Math.min(bytes.length - at, [1, 15, 16, 17, 4095, 70_000, 200_000, 3][k % 8] as number);
        p.socket.write(bytes.subarray(at, at + n));
        at += n;
        await new Promise((r) => setImmediate(r));
      }
      // MemoryDevice answers at once, so each WRITE's reply comes before its READ's.
      for (const r of reads) {
        const w = await p.reply();
        expect([w.cookie, w.error]).toEqual([r.cookie - 1n, 0]);
        const d = await p.reply(r.length);
        expect([d.cookie, d.error]).toEqual([r.cookie, 0]);
        expect(d.payload.equals(expected.subarray(r.offset, r.offset + r.length))).toBe(true);
      }
      expect((await disk.read(0, 8 << 20)).equals(expected)).toBe(true);
    } finally {
      p.close();
    }
  });
});
