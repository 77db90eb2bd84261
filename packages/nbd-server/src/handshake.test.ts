import { type BlockDevice, MemoryDevice, type StatusContext } from "@udm/kcopyd";
import fc from "fast-check";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { infoData, metaContextData, RawPeer } from "./raw-peer.js";
import { NbdServer } from "./server.js";
import {
  encodeOption,
  IHAVEOPT,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from "./wire.js";

let server: NbdServer;
let address: string;
const peers: RawPeer[] = [];

async function peer(): Promise<RawPeer> {
  const p = await RawPeer.connect(address);
  peers.push(p);
  return p;
}

/** The server still completes a whole handshake on a fresh connection. */
async function expectServing(): Promise<void> {
  const p = await peer();
  await p.greet();
  const { sizeBytes } = await p.go("disk");
  expect(sizeBytes).toBe(1 << 20);
}

beforeEach(async () => {
  server = new NbdServer({ handshakeTimeoutMs: 2000 });
  const disk = new MemoryDevice(1 << 20);
  (disk as BlockDevice).statusContexts = (): StatusContext[] => [
    {
      name: "udm:test",
      description: "test context",
      query: async (_o: number, l: number) => [{ lengthBytes: l, flags: 1 }],
    },
  ];
  server.addExport("disk", disk, { description: "the disk" });
  server.addExport("other", new MemoryDevice(4096));
  address = await server.listen({ host: "127.0.0.1", port: 0 });
});

afterEach(async () => {
  for (const p of peers.splice(0)) p.close();
  await server.close({ force: true });
});

describe("greeting and client flags", () => {
  it("greets with NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES", async () => {
    const p = await peer();
    const g = await p.read(18);
    expect(g.toString("latin1", 0, 8)).toBe("NBDMAGIC");
    expect(g.readBigUInt64BE(8)).toBe(IHAVEOPT);
    expect(g.readUInt16BE(16)).toBe(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  });

  it("closes on client flags with unknown bits, and keeps serving others", async () => {
    const p = await peer();
    await p.greet(0x80000003);
    await p.closed;
    await expectServing();
  });

  it("closes on a bad option magic", async () => {
    const p = await peer();
    await p.greet();
    const bad = encodeOption(NBD_OPT_LIST);
    bad.writeUInt32BE(0xdeadbeef, 0);
    p.write(bad);
    await p.closed;
    await expectServing();
  });

  it("survives a client that closes in the middle of an option", async () => {
    const p = await peer();
    await p.greet();
    p.write(encodeOption(NBD_OPT_GO, infoData("disk", [])).subarray(0, 20));
    p.close();
    await expectServing();
  });

  it("times out a client that never finishes the handshake", async () => {
    const quick = new NbdServer({ handshakeTimeoutMs: 100 });
    const p = await RawPeer.connect(await quick.listen({ host: "127.0.0.1", port: 0 }));
    await p.read(18);
    await p.closed;
    await quick.close();
  });
});

describe("options", () => {
  it("answers an unknown option ERR_UNSUP and goes on", async () => {
    const p = await peer();
    await p.greet();
    p.option(4242, Buffer.from("some data"));
    const r = await p.optionReply();
    expect(r.option).toBe(4242);
    expect(r.replyType).toBe(NBD_REP_ERR_UNSUP);
    p.option(NBD_OPT_EXTENDED_HEADERS);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_UNSUP);
    expect((await p.go("disk")).sizeBytes).toBe(1 << 20);
  });

  it("lists exports with descriptions", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_LIST);
    const names: string[] = [];
    for (;;) {
      const r = await p.optionReply();
      if (r.replyType === NBD_REP_ACK) break;
      expect(r.replyType).toBe(NBD_REP_SERVER);
      const len = r.data.readUInt32BE(0);
      names.push(`${r.data.toString("utf8", 4, 4 + len)}=${r.data.toString("utf8", 4 + len)}`);
    }
    expect(names).toEqual(["disk=the disk", "other="]);
  });

  it("refuses LIST and STRUCTURED_REPLY with data, and a second STRUCTURED_REPLY", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_LIST, Buffer.from("x"));
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    p.option(NBD_OPT_STRUCTURED_REPLY, Buffer.from("x"));
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    p.option(NBD_OPT_STRUCTURED_REPLY);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ACK);
    p.option(NBD_OPT_STRUCTURED_REPLY);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
  });

  it("answers INFO with EXPORT, NAME, DESCRIPTION, BLOCK_SIZE and stays in haggling", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_INFO, infoData("disk", [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE]));
    const infos = new Map<number, Buffer>();
    for (;;) {
      const r = await p.optionReply();
      if (r.replyType === NBD_REP_ACK) break;
      expect(r.replyType).toBe(NBD_REP_INFO);
      infos.set(r.data.readUInt16BE(0), r.data.subarray(2));
    }
    expect(Number(infos.get(0)?.readBigUInt64BE(0))).toBe(1 << 20);
    expect(infos.get(NBD_INFO_NAME)?.toString()).toBe("disk");
    expect(infos.get(NBD_INFO_DESCRIPTION)?.toString()).toBe("the disk");
    const bs = infos.get(NBD_INFO_BLOCK_SIZE) as Buffer;
    expect([bs.readUInt32BE(0), bs.readUInt32BE(4), bs.readUInt32BE(8)]).toEqual([1, 4096, 32 * 1024 * 1024]);
    expect((await p.go("disk")).sizeBytes).toBe(1 << 20);
  });

  it("answers INFO/GO whose lengths lie with ERR_INVALID, unknown exports with ERR_UNKNOWN", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_GO, infoData("disk", [], 1000));
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    const extra = Buffer.concat([infoData("disk", [1]), Buffer.from([0])]);
    p.option(NBD_OPT_INFO, extra);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    p.option(NBD_OPT_GO, Buffer.from([0, 0]));
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    p.option(NBD_OPT_GO, infoData("nope", []));
    const r = await p.optionReply();
    expect(r.replyType).toBe(NBD_REP_ERR_UNKNOWN);
    expect(r.data.toString()).toContain("nope");
    expect((await p.go("other")).sizeBytes).toBe(4096);
  });

  it("answers STARTTLS without TLS configured with ERR_POLICY", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_STARTTLS);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_POLICY);
  });

  it("acknowledges ABORT and closes", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_ABORT);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ACK);
    await p.closed;
  });

  it("closes on EXPORT_NAME of an unknown export, serves a known one with or without the 124 zero bytes", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_EXPORT_NAME, Buffer.from("nope"));
    await p.closed;
    const q = await peer();
    await q.greet(1); // no NO_ZEROES: 10 bytes then 124 zeros
    q.option(NBD_OPT_EXPORT_NAME, Buffer.from("other"));
    const reply = await q.read(134);
    expect(Number(reply.readBigUInt64BE(0))).toBe(4096);
    expect(reply.subarray(10).every((b) => b === 0)).toBe(true);
  });

  it("refuses option data above 64 KiB with ERR_TOO_BIG, and closes above 16 MiB", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_LIST_META_CONTEXT, Buffer.alloc(100_000));
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_TOO_BIG);
    expect((await p.go("disk")).sizeBytes).toBe(1 << 20);
    const q = await peer();
    await q.greet();
    const h = encodeOption(NBD_OPT_LIST);
    h.writeUInt32BE(0x7fffffff, 12);
    q.write(h);
    await q.closed;
  });
});

describe("meta contexts", () => {
  it("refuses SET_META_CONTEXT before STRUCTURED_REPLY", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_SET_META_CONTEXT, metaContextData("disk", ["base:allocation"]));
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
  });

  it("lists base:allocation and the device's own contexts; SET gives them ids", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_STRUCTURED_REPLY);
    await p.optionReply();
    const list = async (queries: string[]) => {
      p.option(NBD_OPT_LIST_META_CONTEXT, metaContextData("disk", queries));
      const names: string[] = [];
      for (;;) {
        const r = await p.optionReply();
        if (r.replyType !== NBD_REP_META_CONTEXT) {
          expect(r.replyType).toBe(NBD_REP_ACK);
          return names;
        }
        expect(r.data.readUInt32BE(0)).toBe(0);
        names.push(r.data.toString("utf8", 4));
      }
    };
    expect(await list([])).toEqual(["base:allocation", "udm:test"]);
    expect(await list(["base:"])).toEqual(["base:allocation"]);
    expect(await list(["udm:test", "unknown:thing", "base:nope"])).toEqual(["udm:test"]);
    p.option(NBD_OPT_SET_META_CONTEXT, metaContextData("disk", ["base:allocation", "udm:test", "base:"]));
    const ids: number[] = [];
    for (;;) {
      const r = await p.optionReply();
      if (r.replyType !== NBD_REP_META_CONTEXT) break;
      ids.push(r.data.readUInt32BE(0));
    }
    expect(ids).toHaveLength(2);
    expect(new Set(ids).size).toBe(2);
  });

  it("answers a query length running past the data with ERR_INVALID", async () => {
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_STRUCTURED_REPLY);
    await p.optionReply();
    const data = metaContextData("disk", ["base:allocation"]);
    data.writeUInt32BE(500, 4 + 4 + 4); // the query's length lies
    p.option(NBD_OPT_SET_META_CONTEXT, data);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    const count = metaContextData("disk", []);
    count.writeUInt32BE(3, 8); // three queries announced, none present
    p.option(NBD_OPT_LIST_META_CONTEXT, count);
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
  });
});

describe("limits and shutdown", () => {
  it("refuses connections above maxConnections", async () => {
    const small = new NbdServer({ maxConnections: 1 });
    small.addExport("", new MemoryDevice(4096));
    const where = await small.listen({ host: "127.0.0.1", port: 0 });
    const a = await RawPeer.connect(where);
    await a.greet();
    const b = await RawPeer.connect(where);
    await b.closed;
    expect((await a.go("")).sizeBytes).toBe(4096);
    a.close();
    await small.close({ force: true });
  });

  it("cuts handshaking connections at shutdown, and close() resolves", async () => {
    const p = await peer();
    await p.greet();
    const closing = server.close();
    await p.closed; // handshaking connections are cut at shutdown
    await closing;
  });

  it("refuses GO for a removed export", async () => {
    await server.removeExport("other");
    const p = await peer();
    await p.greet();
    p.option(NBD_OPT_GO, infoData("other", []));
    expect((await p.optionReply()).replyType).toBe(NBD_REP_ERR_UNKNOWN);
    expect(() => server.addExport("disk", new MemoryDevice(1))).toThrow(/already exists/);
  });
});

describe("hostile handshakes", () => {
  it("no sequence of options or junk crashes the server or stops it serving others", async () => {
    const option = fc
      .record({
        option: fc.oneof(fc.integer({ min: 1, max: 12 }), fc.integer({ min: 0, max: 0xffffffff })),
        data: fc.oneof(
          fc.uint8Array({ maxLength: 40 }).map((a) => Buffer.from(a)),
          fc.constantFrom(infoData("disk", [1, 2, 3]), metaContextData("disk", ["base:allocation", "udm:"])),
        ),
      })
      .map(({ option, data }) => encodeOption(option, data));
    const junk = fc.uint8Array({ minLength: 1, maxLength: 32 }).map((a) => Buffer.from(a));
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 0, max: 3 }),
        fc.array(fc.oneof({ weight: 5, arbitrary: option }, { weight: 1, arbitrary: junk }), {
          maxLength: 10,
        }),
        async (flags, parts) => {
          const p = await peer();
          await p.greet(flags);
          for (const part of parts) p.write(part);
          await new Promise((r) => setTimeout(r, 5));
          p.close();
        },
      ),
      { numRuns: 60 },
    );
    await expectServing();
  });
});
