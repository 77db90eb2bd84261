import { randomBytes } from "node:crypto";
import { createServer, type Socket, connect as tcpConnect } from "node:net";
import { MemoryDevice } from "@udm/kcopyd";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { STREAM_RECEIVE_ENV, takeOverReads } from "./direct-receive.js";
import { RawPeer } from "./raw-peer.js";
import { NbdServer } from "./server.js";
import { encodeOption, encodeRequest, NBD_CMD_READ, NBD_CMD_WRITE, NBD_OPT_EXPORT_NAME } from "./wire.js";

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

describe("direct receive after the handshake", () => {
  it("a WRITE whose header came with the handshake gets its own payload buffer, never a view of the scratch", async () => {
    const server = new NbdServer();
    // A device that holds each write (and its buffer) until released, as a slow disk would.
    const held: Array<{ data: Buffer; release: () => void }> = [];
    const inner = new MemoryDevice(1 << 20);
    const holding = Object.assign(Object.create(inner) as MemoryDevice, {
      write: (offset: number, data: Buffer) =>
        new Promise<void>((resolve, reject) => {
          held.push({ data, release: () => inner.write(offset, data).then(resolve, reject) });
        }),
    });
    server.addExport("held", holding);
    const address = await server.listen({ host: "127.0.0.1", port: 0 });
    const p = await RawPeer.connect(address);
    const cookie = (n: number) => {
      const c = Buffer.alloc(8);
      c.writeUInt32BE(n, 4);
      return c;
    };
    const until = async (n: number) => {
      while (held.length < n) await new Promise((r) => setTimeout(r, 5));
    };
    try {
      await p.greet(3);
      // The option and WRITE A's header in one packet: the header is read during the handshake.
      p.write(
        Buffer.concat([
          encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from("held")),
          encodeRequest(0, NBD_CMD_WRITE, cookie(1), 0n, 4096),
        ]),
      );
      await p.read(10);
      await new Promise((r) => setTimeout(r, 50));
      const a = Buffer.alloc(4096, 0xa1);
      const b = Buffer.alloc(4096, 0xb2);
      const c = Buffer.alloc(4096, 0xc3);
      // A's payload and all of B arrive in one read (into the scratch), C in a later one.
      p.write(Buffer.concat([a, encodeRequest(0, NBD_CMD_WRITE, cookie(2), 8192n, 4096), b]));
      await until(2);
      p.write(Buffer.concat([encodeRequest(0, NBD_CMD_WRITE, cookie(3), 16384n, 4096), c]));
      await until(3);
      const [ha, hb, hc] = held as [(typeof held)[0], (typeof held)[0], (typeof held)[0]];
      expect([ha.data.equals(a), hb.data.equals(b), hc.data.equals(c)]).toEqual([true, true, true]);
      for (const h of held) h.release();
      for (let i = 0; i < 3; i++) expect((await p.reply()).error).toBe(0);
      expect((await inner.read(0, 4096)).equals(a)).toBe(true);
      expect((await inner.read(8192, 4096)).equals(b)).toBe(true);
    } finally {
      p.close();
      await server.close({ force: true });
    }
  });
});
