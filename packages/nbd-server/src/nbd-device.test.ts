import { mkdtempSync, rmSync } from "node:fs";
import { createServer, connect as netConnect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type BlockDevice, IoError, MemoryDevice, openDevice, type StatusContext } from "@udm/kcopyd";
import fc from "fast-check";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { NbdDevice } from "./nbd-device.js";
import { registerNbdSchemes } from "./register.js";
import { NbdServer } from "./server.js";

const SIZE = 1 << 20;
let server: NbdServer;
let disk: MemoryDevice;
let uri: string;
const devices: NbdDevice[] = [];

async function connect(options: Parameters<typeof NbdDevice.connect>[1] = {}): Promise<NbdDevice> {
  const d = await NbdDevice.connect(uri, options);
  devices.push(d);
  return d;
}

beforeEach(async () => {
  server = new NbdServer();
  disk = new MemoryDevice(SIZE);
  server.addExport("disk", disk);
  server.addExport("ro", new MemoryDevice(SIZE), { readOnly: true });
  uri = `nbd://${await server.listen({ host: "127.0.0.1", port: 0 })}/disk`;
});

afterEach(async () => {
  for (const d of devices.splice(0)) await d.close().catch(() => {});
  await server.close({ force: true });
});

describe("NbdDevice against NbdServer", () => {
  it("behaves like the device it reaches (fast-check model)", async () => {
    const dev = await connect();
    expect(dev.sizeBytes).toBe(SIZE);
    expect(dev.structuredReplies).toBe(true);
    const model = Buffer.alloc(SIZE);
    const range = fc
      .tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 200_000 }))
      .map(([o, l]) => [o, Math.min(l, SIZE - o)] as const);
    const op = fc.oneof(
      fc.record({
        kind: fc.constant("write" as const),
        r: range,
        byte: fc.integer({ min: 1, max: 255 }),
        fua: fc.boolean(),
      }),
      fc.record({ kind: fc.constant("zero" as const), r: range, mayTrim: fc.boolean() }),
      fc.record({ kind: fc.constant("discard" as const), r: range }),
      fc.record({ kind: fc.constant("read" as const), r: range }),
      fc.record({ kind: fc.constant("flush" as const) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 25 }), async (ops) => {
        // Ops run one after another; the pipelining test below covers concurrency.
        for (const o of ops) {
          if (o.kind === "write") {
            const [off, len] = o.r;
            const data = Buffer.alloc(len, o.byte);
            await dev.write(off, data, { fua: o.fua });
            data.copy(model, off);
          } else if (o.kind === "zero") {
            await dev.writeZeroes(o.r[0], o.r[1], { mayTrim: o.mayTrim });
            model.fill(0, o.r[0], o.r[0] + o.r[1]);
          } else if (o.kind === "discard") {
            await dev.discard(o.r[0], o.r[1]);
            model.fill(0, o.r[0], o.r[0] + o.r[1]); // MemoryDevice discards to zeros
          } else if (o.kind === "read") {
            const got = await dev.read(o.r[0], o.r[1]);
            expect(got.equals(model.subarray(o.r[0], o.r[0] + o.r[1]))).toBe(true);
          } else await dev.flush();
        }
        const all = await dev.read(0, SIZE);
        expect(all.equals(model)).toBe(true);
        for (const e of await dev.extents(0, SIZE)) {
          if (e.kind !== "data") {
            expect(model.subarray(e.offsetBytes, e.offsetBytes + e.lengthBytes).every((b) => b === 0)).toBe(
              true,
            );
          }
        }
      }),
      { numRuns: 25 },
    );
  });

  it("pipelines many concurrent reads and writes on one connection", async () => {
    const dev = await connect();
    await Promise.all(Array.from({ length: 128 }, (_, i) => dev.write(i * 4096, Buffer.alloc(4096, i))));
    const reads = await Promise.all(Array.from({ length: 128 }, (_, i) => dev.read(i * 4096, 4096)));
    reads.forEach((b, i) => {
      expect(b.every((x) => x === i)).toBe(true);
    });
  });

  it("reports holes from base:allocation", async () => {
    await disk.write(128 * 1024, Buffer.alloc(65536, 1));
    const dev = await connect();
    expect(await dev.extents(0, 512 * 1024)).toEqual([
      { offsetBytes: 0, lengthBytes: 128 * 1024, kind: "hole" },
      { offsetBytes: 128 * 1024, lengthBytes: 65536, kind: "data" },
      { offsetBytes: 192 * 1024, lengthBytes: 320 * 1024, kind: "hole" },
    ]);
  });

  it("readIntoSparse: the zero runs are the holes the server sent for this read, whatever extents() says", async () => {
    await disk.write(128 * 1024, Buffer.alloc(65536, 1));
    // A lying hint on the server side must change neither the bytes nor the vouched runs.
    disk.extents = async (o: number, l: number) => [
      { offsetBytes: o, lengthBytes: l, kind: "hole" as const },
    ];
    const dev = await connect();
    const target = Buffer.alloc(512 * 1024, 0xee);
    const zeros = await dev.readIntoSparse(0, target);
    expect(target.equals(await disk.read(0, 512 * 1024))).toBe(true);
    expect(zeros).toEqual([
      { offsetBytes: 0, lengthBytes: 128 * 1024 },
      { offsetBytes: 192 * 1024, lengthBytes: 320 * 1024 },
    ]);
  });

  it("publishes the server's own status contexts, so they stack through NBD", async () => {
    (disk as BlockDevice).statusContexts = (): StatusContext[] => [
      {
        name: "udm:test-map",
        description: "flag 5 on the second 256 KiB",
        query: async (o: number, l: number) => {
          const out: Array<{ lengthBytes: number; flags: number }> = [];
          for (let pos = o; pos < o + l; ) {
            const next = Math.min(o + l, (Math.floor(pos / 262144) + 1) * 262144);
            out.push({ lengthBytes: next - pos, flags: Math.floor(pos / 262144) === 1 ? 5 : 0 });
            pos = next;
          }
          return out;
        },
      },
    ];
    const dev = await connect();
    const contexts = dev.statusContexts();
    expect(contexts.map((c) => c.name)).toEqual(["udm:test-map"]);
    expect(await contexts[0]?.query(131072, 524288)).toEqual([
      { lengthBytes: 131072, flags: 0 },
      { lengthBytes: 262144, flags: 5 },
      { lengthBytes: 131072, flags: 0 },
    ]);
    // Re-served by a second server, the remote context is listed and answered there too.
    const proxy = new NbdServer();
    proxy.addExport("again", dev);
    const again = await NbdDevice.connect(
      `nbd://${await proxy.listen({ host: "127.0.0.1", port: 0 })}/again`,
    );
    devices.push(again);
    expect(await again.statusContexts()[0]?.query(0, 1 << 20)).toEqual([
      { lengthBytes: 262144, flags: 0 },
      { lengthBytes: 262144, flags: 5 },
      { lengthBytes: 524288, flags: 0 },
    ]);
    await again.close();
    await proxy.close();
  });

  it("is read-only on a read-only export and names errors", async () => {
    const ro = await NbdDevice.connect(uri.replace(/disk$/, "ro"));
    devices.push(ro);
    expect(ro.readOnly).toBe(true);
    await expect(ro.write(0, Buffer.alloc(1))).rejects.toThrow(/read-only/);
    const dev = await connect();
    await expect(dev.read(SIZE - 1, 2)).rejects.toThrow(RangeError);
    await expect(NbdDevice.connect(uri.replace(/disk$/, "missing"))).rejects.toThrow(/missing/);
  });

  it("opens through openDevice for nbd:// and nbd+unix:// URIs", async () => {
    registerNbdSchemes();
    const dir = mkdtempSync(join(tmpdir(), "udm-nbd-"));
    try {
      const sock = join(dir, "nbd.sock");
      await server.listen({ path: sock });
      await disk.write(0, Buffer.from("hello"));
      const a = await openDevice(uri);
      const b = await openDevice(`nbd+unix:///disk?socket=${sock}`, { readOnly: true });
      expect((await a.read(0, 5)).toString()).toBe("hello");
      expect((await b.read(0, 5)).toString()).toBe("hello");
      expect(b.readOnly).toBe(true);
      await a.close();
      await b.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("fails requests with EIO when the connection drops and no reconnect is set", async () => {
    const dev = await connect();
    const health: boolean[] = [];
    dev.watchHealth((h) => health.push(h));
    await server.close({ force: true });
    const err = await dev.read(0, 512).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(IoError);
    expect((err as IoError).code).toBe("EIO");
    expect(health).toEqual([false]);
  });

  it("reconnects, replays what was in flight and reports health", async () => {
    const where = uri.replace(/^nbd:\/\//, "").replace(/\/disk$/, "");
    const port = Number(where.split(":")[1]);
    const dev = await connect({ reconnect: { retries: 50, delayMs: 20 } });
    const health: boolean[] = [];
    dev.watchHealth((h) => health.push(h));
    await dev.write(0, Buffer.alloc(4096, 3));
    await server.close({ force: true });
    const pending = dev.read(0, 4096);
    await new Promise((r) => setTimeout(r, 60));
    server = new NbdServer();
    server.addExport("disk", disk);
    await server.listen({ host: "127.0.0.1", port });
    expect((await pending).every((b) => b === 3)).toBe(true);
    expect(health).toEqual([false, true]);
  });

  it("with holdRequests: false, fails requests at once while down and reconnects in the background", async () => {
    const port = Number(
      uri
        .replace(/^nbd:\/\//, "")
        .replace(/\/disk$/, "")
        .split(":")[1],
    );
    const dev = await connect({
      reconnect: { retries: Number.POSITIVE_INFINITY, delayMs: 20, holdRequests: false },
    });
    const health: boolean[] = [];
    const back = new Promise<void>((resolve) =>
      dev.watchHealth((h) => {
        health.push(h);
        if (h) resolve();
      }),
    );
    await dev.write(0, Buffer.alloc(4096, 5));
    await server.close({ force: true });
    // Many retries later (the server is gone), a request still fails at once instead of waiting.
    await new Promise((r) => setTimeout(r, 100));
    const err = await dev.read(0, 512).catch((e: unknown) => e);
    expect((err as IoError).code).toBe("EIO");
    server = new NbdServer();
    server.addExport("disk", disk);
    await server.listen({ host: "127.0.0.1", port });
    await back;
    expect(health).toEqual([false, true]);
    expect((await dev.read(0, 4096)).every((b) => b === 5)).toBe(true);
    await dev.close();
  });

  it("close() during a reconnect attempt does not revive the device", async () => {
    const port = Number(
      uri
        .replace(/^nbd:\/\//, "")
        .replace(/\/disk$/, "")
        .split(":")[1],
    );
    const dev = await connect({
      reconnect: { retries: Number.POSITIVE_INFINITY, delayMs: 20, holdRequests: false },
    });
    await server.close({ force: true });
    // The server comes back behind a proxy on the old port that holds each connection until
    // released: a reconnect attempt is under way when close() runs, and completes after it.
    server = new NbdServer();
    server.addExport("disk", disk);
    const upstreamPort = Number((await server.listen({ host: "127.0.0.1", port: 0 })).split(":")[1]);
    let release!: () => void;
    const released = new Promise<void>((r) => {
      release = r;
    });
    let accepted!: () => void;
    const attempt = new Promise<void>((r) => {
      accepted = r;
    });
    const sockets: Socket[] = [];
    const proxy = createServer((client) => {
      sockets.push(client);
      client.on("error", () => {});
      accepted();
      void released.then(() => {
        const upstream = netConnect(upstreamPort, "127.0.0.1");
        sockets.push(upstream);
        upstream.on("error", () => {});
        client.pipe(upstream).pipe(client);
        client.on("close", () => upstream.destroy());
        upstream.on("close", () => client.destroy());
      });
    });
    await new Promise<void>((resolve) => proxy.listen(port, "127.0.0.1", resolve));
    try {
      await attempt;
      await dev.close();
      release();
      await new Promise((r) => setTimeout(r, 300));
      expect(((await dev.read(0, 512).catch((e: unknown) => e)) as IoError).code).toBe("ESHUTDOWN");
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => proxy.close(resolve));
    }
  });

  it("devices opened by URI (table arguments, mirror legs) reconnect by default", async () => {
    const port = Number(
      uri
        .replace(/^nbd:\/\//, "")
        .replace(/\/disk$/, "")
        .split(":")[1],
    );
    registerNbdSchemes();
    const dev = await openDevice(uri);
    const health: boolean[] = [];
    const back = new Promise<void>((resolve) =>
      dev.watchHealth?.((h) => {
        health.push(h);
        if (h) resolve();
      }),
    );
    await server.close({ force: true });
    expect(((await dev.read(0, 512).catch((e: unknown) => e)) as IoError).code).toBe("EIO");
    server = new NbdServer();
    server.addExport("disk", disk);
    await server.listen({ host: "127.0.0.1", port });
    await back; // NBD_URI_RECONNECT retries every second
    expect(health).toEqual([false, true]);
    await dev.write(0, Buffer.alloc(512, 9));
    expect((await disk.read(0, 512)).every((b) => b === 9)).toBe(true);
    await dev.close();
  });
});
