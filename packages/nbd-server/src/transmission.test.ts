import { type BlockDevice, MemoryDevice, type StatusContext } from "@udm/kcopyd";
import fc from "fast-check";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { RawPeer } from "./raw-peer.js";
import { NbdServer } from "./server.js";
import {
  encodeRequest,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_DF,
  NBD_OPT_EXPORT_NAME,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
} from "./wire.js";

const SIZE = 4 << 20;
let server: NbdServer;
let address: string;
let disk: MemoryDevice;
const peers: RawPeer[] = [];

async function open(
  name = "disk",
  options: { structured?: boolean; contexts?: string[] } = {},
): Promise<{ p: RawPeer; flags: number; contextIds: Map<string, number> }> {
  const p = await RawPeer.connect(address);
  peers.push(p);
  await p.greet();
  const { flags, contextIds } = await p.go(name, options);
  return { p, flags, contextIds };
}

/** A fresh connection still reads what is on the disk. */
async function expectServing(): Promise<void> {
  const { p } = await open();
  p.request(NBD_CMD_READ, 0, 99n, 0n, 512);
  const r = await p.reply(512);
  expect(r.error).toBe(0);
  expect(r.payload.equals(await disk.read(0, 512))).toBe(true);
}

beforeEach(async () => {
  server = new NbdServer();
  disk = new MemoryDevice(SIZE);
  (disk as BlockDevice).statusContexts = (): StatusContext[] => [
    {
      name: "udm:odd-megabytes",
      description: "flags 1 on odd MiB",
      query: async (o: number, l: number) => {
        const out: Array<{ lengthBytes: number; flags: number }> = [];
        for (let pos = o; pos < o + l; ) {
          const next = Math.min(o + l, (Math.floor(pos / (1 << 20)) + 1) * (1 << 20));
          out.push({ lengthBytes: next - pos, flags: Math.floor(pos / (1 << 20)) % 2 });
          pos = next;
        }
        return out;
      },
    },
  ];
  await disk.write(0, Buffer.alloc(65536, 0x11));
  server.addExport("disk", disk);
  server.addExport("ro", new MemoryDevice(SIZE), { readOnly: true });
  address = await server.listen({ host: "127.0.0.1", port: 0 });
});

afterEach(async () => {
  for (const p of peers.splice(0)) p.close();
  await server.close({ force: true });
});

describe("simple replies", () => {
  it("writes, reads back, flushes, trims and zeroes", async () => {
    const { p, flags } = await open();
    expect(flags & NBD_FLAG_CAN_MULTI_CONN).toBeTruthy();
    expect(flags & NBD_FLAG_SEND_DF).toBe(0);
    const data = Buffer.alloc(8192, 0x5a);
    p.request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 1n, 4096n, data.length, data);
    expect((await p.reply()).error).toBe(0);
    p.request(NBD_CMD_READ, 0, 2n, 4096n, 8192);
    const r = await p.reply(8192);
    expect(r.cookie).toBe(2n);
    expect(r.payload.equals(data)).toBe(true);
    p.request(NBD_CMD_FLUSH, 0, 3n, 0n, 0);
    expect((await p.reply()).error).toBe(0);
    p.request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 4n, 4096n, 4096);
    expect((await p.reply()).error).toBe(0);
    p.request(NBD_CMD_TRIM, 0, 5n, 0n, 1 << 20);
    expect((await p.reply()).error).toBe(0);
    p.request(NBD_CMD_CACHE, 0, 6n, 0n, 1 << 20);
    expect((await p.reply()).error).toBe(0);
    expect((await disk.read(8192, 4096)).every((b) => b === 0)).toBe(true);
  });

  it("answers every bad request with the spec's error and keeps the connection", async () => {
    const { p } = await open();
    const cases: Array<[string, () => void, number]> = [
      ["unknown command", () => p.request(77, 0, 1n, 0n, 512), NBD_EINVAL],
      ["unknown flag", () => p.request(NBD_CMD_READ, 0x8000, 2n, 0n, 512), NBD_EINVAL],
      [
        "DF without structured replies",
        () => p.request(NBD_CMD_READ, NBD_CMD_FLAG_DF, 3n, 0n, 512),
        NBD_EINVAL,
      ],
      ["read past the end", () => p.request(NBD_CMD_READ, 0, 4n, BigInt(SIZE - 256), 512), NBD_EINVAL],
      ["offset overflowing 2^64", () => p.request(NBD_CMD_READ, 0, 5n, 0xffffffffffffff00n, 512), NBD_EINVAL],
      [
        "write past the end",
        () => p.request(NBD_CMD_WRITE, 0, 6n, BigInt(SIZE), 512, Buffer.alloc(512, 1)),
        NBD_ENOSPC,
      ],
      ["zero past the end", () => p.request(NBD_CMD_WRITE_ZEROES, 0, 7n, BigInt(SIZE), 512), NBD_ENOSPC],
      ["trim past the end", () => p.request(NBD_CMD_TRIM, 0, 8n, BigInt(SIZE), 512), NBD_EINVAL],
      ["FLUSH with a length", () => p.request(NBD_CMD_FLUSH, 0, 9n, 0n, 512), NBD_EINVAL],
      ["64 MiB read", () => p.request(NBD_CMD_READ, 0, 10n, 0n, 64 << 20), NBD_EINVAL],
      ["block status without a context", () => p.request(NBD_CMD_BLOCK_STATUS, 0, 11n, 0n, 512), NBD_EINVAL],
      ["REQ_ONE on a read", () => p.request(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 12n, 0n, 512), NBD_EINVAL],
    ];
    for (const [what, send, error] of cases) {
      send();
      const r = await p.reply(512);
      expect({ what, error: r.error }).toEqual({ what, error });
    }
    // The payload of the refused write was consumed: the stream is still in sync.
    p.request(NBD_CMD_READ, 0, 13n, 0n, 512);
    expect((await p.reply(512)).payload.equals(Buffer.alloc(512, 0x11))).toBe(true);
  });

  it("consumes a 40 MiB WRITE payload, refuses it, and carries on", async () => {
    const { p } = await open();
    p.request(NBD_CMD_WRITE, 0, 1n, 0n, 40 << 20, Buffer.alloc(40 << 20, 0xee));
    expect((await p.reply()).error).toBe(NBD_EINVAL);
    await expectServing();
    expect((await disk.read(0, 16)).every((b) => b === 0x11)).toBe(true);
  });

  it("refuses writes to a read-only export with EPERM, payload consumed", async () => {
    const { p, flags } = await open("ro");
    expect(flags & NBD_FLAG_READ_ONLY).toBeTruthy();
    p.request(NBD_CMD_WRITE, 0, 1n, 0n, 4096, Buffer.alloc(4096, 1));
    expect((await p.reply()).error).toBe(NBD_EPERM);
    p.request(NBD_CMD_TRIM, 0, 2n, 0n, 4096);
    expect((await p.reply()).error).toBe(NBD_EPERM);
    p.request(NBD_CMD_WRITE_ZEROES, 0, 3n, 0n, 4096);
    expect((await p.reply()).error).toBe(NBD_EPERM);
    p.request(NBD_CMD_READ, 0, 4n, 0n, 4096);
    const r = await p.reply(4096);
    expect(r.error).toBe(0);
    expect(r.payload.every((b) => b === 0)).toBe(true);
  });

  it("closes on a bad request magic, other connections unaffected", async () => {
    const { p } = await open();
    const bad = encodeRequest(0, NBD_CMD_READ, Buffer.alloc(8), 0n, 512);
    bad.writeUInt32BE(0x12345678, 0);
    p.write(bad);
    await p.closed;
    await expectServing();
  });

  it("survives a truncated request and a client vanishing with reads in flight", async () => {
    const { p } = await open();
    p.write(encodeRequest(0, NBD_CMD_WRITE, Buffer.alloc(8), 0n, 65536).subarray(0, 20));
    p.close();
    const { p: q } = await open();
    for (let i = 0; i < 64; i++) q.request(NBD_CMD_READ, 0, BigInt(i), 0n, 1 << 20);
    q.close();
    await expectServing();
  });

  it("serves pipelined requests, each reply matching its cookie", async () => {
    const { p } = await open();
    const n = 200;
    for (let i = 0; i < n; i++) {
      const data = Buffer.alloc(4096, i & 0xff);
      p.request(NBD_CMD_WRITE, 0, BigInt(1000 + i), BigInt(i * 4096), 4096, data);
    }
    const seen = new Set<bigint>();
    for (let i = 0; i < n; i++) {
      const r = await p.reply();
      expect(r.error).toBe(0);
      seen.add(r.cookie);
    }
    expect(seen.size).toBe(n);
    for (let i = 0; i < n; i++) p.request(NBD_CMD_READ, 0, BigInt(i), BigInt(i * 4096), 4096);
    for (let i = 0; i < n; i++) {
      const r = await p.reply(4096);
      expect(r.payload.every((b) => b === (Number(r.cookie) & 0xff))).toBe(true);
    }
  });

  it("answers a burst of 30000 requests, most answered at once, while the in-flight budget pauses reading", async () => {
    const small = new NbdServer({ maxInFlightBytesPerConnection: 256 * 1024 });
    small.addExport("disk", disk);
    const smallAddress = await small.listen({ host: "127.0.0.1", port: 0 });
    try {
      const p = await RawPeer.connect(smallAddress);
      peers.push(p);
      await p.greet();
      await p.go("disk");
      await disk.write(65536, Buffer.alloc(65536, 0x5a));
      const n = 30_000;
      const burst: Buffer[] = [];
      const cookie = Buffer.alloc(8);
      for (let i = 0; i < n; i++) {
        cookie.writeBigUInt64BE(BigInt(i), 0);
        // Every 100th is a 64 KiB read (holds budget); the rest are CACHE (answered without awaiting).
        const isRead = i % 100 === 0;
        burst.push(
          encodeRequest(0, isRead ? NBD_CMD_READ : NBD_CMD_CACHE, cookie, 65536n, isRead ? 65536 : 4096),
        );
      }
      p.write(Buffer.concat(burst));
      const seen = new Set<bigint>();
      for (let i = 0; i < n; i++) {
        const header = await p.read(16); // simple reply: magic, error, cookie
        expect(header.readUInt32BE(4)).toBe(0);
        const got = header.readBigUInt64BE(8);
        if (got % 100n === 0n) expect((await p.read(65536)).every((b) => b === 0x5a)).toBe(true);
        seen.add(got);
      }
      expect(seen.size).toBe(n);
      await expectServing();
    } finally {
      await small.close({ force: true });
    }
  });

  it("gathers a WRITE payload that arrives in pieces into a pooled buffer, reused only after the device's write resolved", async () => {
    // A device that records the buffer each write got and holds the write until released.
    const held: Array<{ data: Buffer; release: () => void }> = [];
    const inner = new MemoryDevice(SIZE);
    const holding = Object.assign(Object.create(inner) as MemoryDevice, {
      write: (offset: number, data: Buffer) =>
        new Promise<void>((resolve, reject) => {
          held.push({ data, release: () => inner.write(offset, data).then(resolve, reject) });
        }),
    });
    server.addExport("held", holding);
    const { p } = await open("held");
    const size = 256 * 1024; // more than one socket chunk (Node reads 64 KiB at a time)
    const until = async (n: number) => {
      while (held.length < n) await new Promise((r) => setTimeout(r, 5));
    };
    const a = Buffer.alloc(size, 0xa1);
    const b = Buffer.alloc(size, 0xb2);
    const c = Buffer.alloc(size, 0xc3);
    p.request(NBD_CMD_WRITE, 0, 1n, 0n, size, a);
    p.request(NBD_CMD_WRITE, 0, 2n, BigInt(size), size, b);
    await until(2);
    const [ha, hb] = held as [(typeof held)[0], (typeof held)[0]];
    // Both payloads are held by the device at once: never the same memory.
    expect(ha.data.buffer).not.toBe(hb.data.buffer);
    expect(ha.data.equals(a) && hb.data.equals(b)).toBe(true);
    ha.release();
    hb.release();
    expect((await p.reply()).error).toBe(0);
    expect((await p.reply()).error).toBe(0);
    p.request(NBD_CMD_WRITE, 0, 3n, BigInt(2 * size), size, c);
    await until(3);
    const hc = held[2] as (typeof held)[0];
    // Once both writes resolved, the next payload of that size reuses one of their buffers.
    expect([ha.data.buffer, hb.data.buffer]).toContain(hc.data.buffer);
    expect(hc.data.equals(c)).toBe(true);
    hc.release();
    expect((await p.reply()).error).toBe(0);
    expect((await inner.read(0, 3 * size)).equals(Buffer.concat([a, b, c]))).toBe(true);
  });

  it("finishes writes in flight before closing on DISC", async () => {
    const { p } = await open();
    const data = Buffer.alloc(1 << 20, 0x77);
    p.request(NBD_CMD_WRITE, 0, 1n, 0n, data.length, data);
    p.request(NBD_CMD_DISC, 0, 2n, 0n, 0);
    expect((await p.reply()).error).toBe(0);
    await p.closed;
    expect((await disk.read(0, 1 << 20)).equals(data)).toBe(true);
  });
});

describe("the Linux kernel client's path", () => {
  it("serves EXPORT_NAME then simple replies for READ, WRITE+FUA, FLUSH, TRIM and DISC", async () => {
    const p = await RawPeer.connect(address);
    peers.push(p);
    await p.greet(3);
    p.option(NBD_OPT_EXPORT_NAME, Buffer.from("disk"));
    const reply = await p.read(10); // NO_ZEROES: no 124-byte pad
    expect(Number(reply.readBigUInt64BE(0))).toBe(SIZE);
    expect(reply.readUInt16BE(8) & NBD_FLAG_CAN_MULTI_CONN).toBeTruthy();
    const data = Buffer.alloc(128 * 1024, 0x42);
    p.request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 1n, 65536n, data.length, data);
    p.request(NBD_CMD_FLUSH, 0, 2n, 0n, 0);
    const first = [await p.reply(), await p.reply()];
    expect(first.map((r) => r.error)).toEqual([0, 0]);
    p.request(NBD_CMD_READ, 0, 3n, 65536n, data.length);
    expect((await p.reply(data.length)).payload.equals(data)).toBe(true);
    p.request(NBD_CMD_TRIM, 0, 4n, 65536n, 65536);
    expect((await p.reply()).error).toBe(0);
    p.request(NBD_CMD_DISC, 0, 5n, 0n, 0);
    await p.closed;
    expect((await disk.read(65536, 65536)).every((b) => b === 0)).toBe(true);
    expect((await disk.read(131072, 65536)).equals(data.subarray(65536))).toBe(true);
  });
});

/** Reads `[offset, offset+length)` with structured replies: the bytes and the chunk kinds, in order. */
async function readStructured(
  p: RawPeer,
  cookie: bigint,
  offset: number,
  length: number,
): Promise<{ got: Buffer; kinds: string[] }> {
  p.request(NBD_CMD_READ, 0, cookie, BigInt(offset), length);
  const got = Buffer.alloc(length, 0xff);
  const kinds: string[] = [];
  for (;;) {
    const c = await p.reply();
    expect(c.cookie).toBe(cookie);
    if (c.type === NBD_REPLY_TYPE_OFFSET_DATA) {
      c.payload.copy(got, Number(c.payload.readBigUInt64BE(0)) - offset, 8);
      kinds.push("data");
    } else if (c.type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const at = Number(c.payload.readBigUInt64BE(0)) - offset;
      got.fill(0, at, at + c.payload.readUInt32BE(8));
      kinds.push("hole");
    } else expect(c.type).toBe(NBD_REPLY_TYPE_NONE);
    if (c.flags & NBD_REPLY_FLAG_DONE) return { got, kinds };
  }
}

describe("structured replies", () => {
  it("sends holes as OFFSET_HOLE and honours DF", async () => {
    await disk.write((1 << 20) - 4096, Buffer.alloc(4096, 0x22));
    const { p, flags } = await open("disk", { structured: true });
    expect(flags & NBD_FLAG_SEND_DF).toBeTruthy();
    // [0,64K) data, [64K,1M-4K) hole, [1M-4K,1M) data, [1M, 2M) hole
    p.request(NBD_CMD_READ, 0, 1n, 0n, 2 << 20);
    const got = Buffer.alloc(2 << 20, 0xff);
    const kinds: string[] = [];
    for (;;) {
      const c = await p.reply();
      expect(c.cookie).toBe(1n);
      if (c.type === NBD_REPLY_TYPE_OFFSET_DATA) {
        c.payload.copy(got, Number(c.payload.readBigUInt64BE(0)), 8);
        kinds.push("data");
      } else if (c.type === NBD_REPLY_TYPE_OFFSET_HOLE) {
        const at = Number(c.payload.readBigUInt64BE(0));
        got.fill(0, at, at + c.payload.readUInt32BE(8));
        kinds.push("hole");
      } else expect(c.type).toBe(NBD_REPLY_TYPE_NONE);
      if (c.flags & NBD_REPLY_FLAG_DONE) break;
    }
    expect(kinds).toEqual(["data", "hole", "data", "hole"]);
    expect(got.equals(await disk.read(0, 2 << 20))).toBe(true);

    p.request(NBD_CMD_READ, NBD_CMD_FLAG_DF, 2n, 0n, 1 << 20);
    const df = await p.reply();
    expect(df.type).toBe(NBD_REPLY_TYPE_OFFSET_DATA);
    expect(df.flags & NBD_REPLY_FLAG_DONE).toBeTruthy();
    expect(df.payload.subarray(8).equals(await disk.read(0, 1 << 20))).toBe(true);
  });

  it("a device whose extents() lies never changes what a READ returns (data from the read, holes only where the read vouched)", async () => {
    // The shape of a mirror asking a stale leg: extents() says the whole device is a hole.
    const data = Buffer.alloc(2 << 20, 0x5a);
    await disk.write(0, data);
    disk.extents = async (o: number, l: number) => [
      { offsetBytes: o, lengthBytes: l, kind: "hole" as const },
    ];
    const { p } = await open("disk", { structured: true });
    for (const [cookie, length] of [
      [1n, 4096],
      [2n, 64 * 1024],
      [3n, 1 << 20],
    ] as const) {
      const r = await readStructured(p, cookie, 0, length);
      expect(r.kinds, `a ${length}-byte read`).toEqual(["data"]);
      expect(r.got.equals(data.subarray(0, length))).toBe(true);
    }
    // Zero runs come from the read itself: MemoryDevice vouches for unallocated chunks.
    await disk.writeZeroes(1 << 20, 64 * 1024, { mayTrim: true });
    const mixed = await readStructured(p, 4n, (1 << 20) - 64 * 1024, 192 * 1024);
    expect(mixed.kinds).toEqual(["data", "hole", "data"]);
    expect(mixed.got.equals(await disk.read((1 << 20) - 64 * 1024, 192 * 1024))).toBe(true);
    // FAST_ZERO is no no-op over data the hint calls a hole: ENOTSUP, the data stays.
    p.request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 40n, 0n, 65536);
    const fast = await p.reply();
    expect(fast.type).toBe(NBD_REPLY_TYPE_ERROR);
    expect(fast.payload.readUInt32BE(0)).toBe(NBD_ENOTSUP);
    expect((await disk.read(0, 65536)).equals(data.subarray(0, 65536))).toBe(true);
    // A device that cannot vouch (no readIntoSparse) gets plain data, whatever extents() says.
    (disk as BlockDevice).readIntoSparse = undefined;
    const plain = await readStructured(p, 5n, (1 << 20) - 64 * 1024, 192 * 1024);
    expect(plain.kinds).toEqual(["data"]);
    expect(plain.got.equals(await disk.read((1 << 20) - 64 * 1024, 192 * 1024))).toBe(true);
    // BLOCK_STATUS stays what extents() says: advisory.
    const { p: q, contextIds } = await open("disk", { structured: true, contexts: ["base:allocation"] });
    q.request(NBD_CMD_BLOCK_STATUS, 0, 6n, 0n, 65536);
    const status = await q.reply();
    expect(status.type).toBe(NBD_REPLY_TYPE_BLOCK_STATUS);
    expect(status.payload.readUInt32BE(0)).toBe(contextIds.get("base:allocation"));
    expect(status.payload.readUInt32BE(8)).toBe(3); // HOLE|ZERO, as the (lying) hint says
  });

  it("answers errors as ERROR chunks with a message", async () => {
    const { p } = await open("disk", { structured: true });
    p.request(NBD_CMD_READ, 0, 7n, BigInt(SIZE), 512);
    const c = await p.reply();
    expect(c.type).toBe(NBD_REPLY_TYPE_ERROR);
    expect(c.flags & NBD_REPLY_FLAG_DONE).toBeTruthy();
    expect(c.payload.readUInt32BE(0)).toBe(NBD_EINVAL);
    expect(c.payload.toString("utf8", 6)).toContain("past the end");
  });

  it("reports base:allocation and a device's own context, with REQ_ONE", async () => {
    const { p, contextIds } = await open("disk", {
      structured: true,
      contexts: ["base:allocation", "udm:odd-megabytes"],
    });
    expect([...contextIds.keys()]).toEqual(["base:allocation", "udm:odd-megabytes"]);
    p.request(NBD_CMD_BLOCK_STATUS, 0, 1n, 0n, 3 << 20);
    const byId = new Map<number, Array<[number, number]>>();
    for (;;) {
      const c = await p.reply();
      expect(c.type).toBe(NBD_REPLY_TYPE_BLOCK_STATUS);
      const ext: Array<[number, number]> = [];
      for (let at = 4; at < c.payload.length; at += 8)
        ext.push([c.payload.readUInt32BE(at), c.payload.readUInt32BE(at + 4)]);
      byId.set(c.payload.readUInt32BE(0), ext);
      if (c.flags & NBD_REPLY_FLAG_DONE) break;
    }
    expect(byId.get(contextIds.get("base:allocation") as number)).toEqual([
      [65536, 0],
      [(3 << 20) - 65536, 3],
    ]);
    expect(byId.get(contextIds.get("udm:odd-megabytes") as number)).toEqual([
      [1 << 20, 0],
      [1 << 20, 1],
      [1 << 20, 0],
    ]);
    p.request(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 2n, 0n, 3 << 20);
    for (;;) {
      const c = await p.reply();
      expect(c.payload.length).toBe(12);
      if (c.flags & NBD_REPLY_FLAG_DONE) break;
    }
  });

  it("answers FAST_ZERO over data with ENOTSUP leaving it intact, over holes with success", async () => {
    const { p } = await open("disk", { structured: true });
    p.request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 1n, 0n, 65536);
    const c = await p.reply();
    expect(c.type).toBe(NBD_REPLY_TYPE_ERROR);
    expect(c.payload.readUInt32BE(0)).toBe(NBD_ENOTSUP);
    expect((await disk.read(0, 65536)).every((b) => b === 0x11)).toBe(true);
    p.request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 2n, 1n << 20n, 65536);
    expect((await p.reply()).error).toBe(0);
  });
});

describe("exports at run time", () => {
  it("sends new requests to a replaced device", async () => {
    const { p } = await open();
    const next = new MemoryDevice(SIZE);
    await next.write(0, Buffer.alloc(512, 0x99));
    server.replaceExportDevice("disk", next);
    p.request(NBD_CMD_READ, 0, 1n, 0n, 512);
    expect((await p.reply(512)).payload.every((b) => b === 0x99)).toBe(true);
  });

  it("drains a removed export: requests in flight finish, later ones get ESHUTDOWN, then it closes", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    const slow: BlockDevice = Object.create(disk);
    slow.write = async (o, d, opt) => {
      await gate;
      return disk.write(o, d, opt);
    };
    server.replaceExportDevice("disk", slow);
    const { p } = await open();
    p.request(NBD_CMD_WRITE, 0, 1n, 0n, 4096, Buffer.alloc(4096, 0x44));
    await new Promise((r) => setTimeout(r, 20));
    const removed = server.removeExport("disk");
    p.request(NBD_CMD_READ, 0, 2n, 0n, 512);
    const refused = await p.reply();
    expect(refused.cookie).toBe(2n);
    expect(refused.error).toBe(NBD_ESHUTDOWN);
    release();
    const done = await p.reply();
    expect(done.cookie).toBe(1n);
    expect(done.error).toBe(0);
    await p.closed;
    await removed;
    expect((await disk.read(0, 4096)).every((b) => b === 0x44)).toBe(true);
    expect(server.exports().map((e) => e.name)).toEqual(["ro"]);
  });
});

describe("server shutdown", () => {
  it("close() lets requests in flight finish, answers new ones ESHUTDOWN, then flushes the device", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    let flushes = 0;
    const slow: BlockDevice = Object.create(disk);
    slow.write = async (o, d, opt) => {
      await gate;
      return disk.write(o, d, opt);
    };
    slow.flush = async () => {
      flushes++;
    };
    server.replaceExportDevice("disk", slow);
    const { p } = await open();
    p.request(NBD_CMD_WRITE, 0, 1n, 8192n, 4096, Buffer.alloc(4096, 0x66));
    await new Promise((r) => setTimeout(r, 20));
    let closed = false;
    const closing = server.close().then(() => {
      closed = true;
    });
    p.request(NBD_CMD_READ, 0, 2n, 0n, 512);
    expect((await p.reply()).error).toBe(NBD_ESHUTDOWN);
    expect(closed).toBe(false);
    release();
    const done = await p.reply();
    expect([done.cookie, done.error]).toEqual([1n, 0]);
    await closing;
    expect(flushes).toBe(1);
    expect((await disk.read(8192, 4096)).every((b) => b === 0x66)).toBe(true);
    await expect(RawPeer.connect(address)).rejects.toThrow();
  });

  it("close() stops waiting for a device that never answers: after the grace period the connection is cut", async () => {
    const stuckServer = new NbdServer({ shutdownGraceMs: 300 });
    let reads = 0;
    let flushes = 0;
    const stuck: BlockDevice = Object.create(disk);
    stuck.readInto = () => {
      reads++;
      return new Promise<void>(() => {}); // never completes
    };
    stuck.flush = () => {
      flushes++;
      return new Promise<void>(() => {});
    };
    stuckServer.addExport("stuck", stuck);
    const at = await stuckServer.listen({ host: "127.0.0.1", port: 0 });
    const p = await RawPeer.connect(at);
    peers.push(p);
    await p.greet();
    await p.go("stuck");
    p.request(NBD_CMD_READ, 0, 1n, 0n, 4096);
    while (reads === 0) await new Promise((r) => setTimeout(r, 5));
    await stuckServer.close(); // resolves although the read and the flush never complete
    await p.closed; // the connection with the unanswered read was closed
    expect(flushes).toBe(1);
  });
});

describe("hostile input", () => {
  it("no sequence of requests or junk bytes harms the server or another connection", async () => {
    const { p: witness } = await open("disk", { structured: true });
    const request = fc
      .record({
        type: fc.integer({ min: 0, max: 10 }),
        flags: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffff })),
        offset: fc.oneof(
          fc.bigInt({ min: 0n, max: BigInt(SIZE) }),
          fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
        ),
        length: fc.oneof(fc.integer({ min: 0, max: 70_000 }), fc.integer({ min: 0, max: 0xffffffff })),
      })
      .map((r) => {
        const header = encodeRequest(
          r.flags,
          r.type === 2 ? 0 : r.type,
          Buffer.alloc(8, 7),
          r.offset,
          r.length,
        );
        // Writes carry (part of) their payload; a lying length just leaves the server waiting for more.
        return r.type === 1 ? Buffer.concat([header, Buffer.alloc(Math.min(r.length, 70_000), 1)]) : header;
      });
    const junk = fc.uint8Array({ minLength: 1, maxLength: 64 }).map((a) => Buffer.from(a));
    await fc.assert(
      fc.asyncProperty(
        fc.boolean(),
        fc.array(fc.oneof({ weight: 4, arbitrary: request }, { weight: 1, arbitrary: junk }), {
          maxLength: 12,
        }),
        async (structured, parts) => {
          const { p } = await open(structured ? "disk" : "ro", {
            structured,
            contexts: structured ? ["base:allocation"] : [],
          });
          for (const part of parts) p.write(part);
          await new Promise((r) => setTimeout(r, 5));
          p.close();
          witness.request(NBD_CMD_READ, 0, 1n, 0n, 512);
          const r = await witness.reply();
          expect(r.type).toBe(NBD_REPLY_TYPE_OFFSET_DATA);
        },
      ),
      { numRuns: 40 },
    );
    await expectServing();
  });
});
