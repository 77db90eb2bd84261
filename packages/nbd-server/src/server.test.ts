import { connect as netConnect } from "node:net";
import { MemoryDevice } from "@udm/kcopyd";
import { afterEach, describe, expect, it } from "vitest";
import { NbdDevice } from "./nbd-device.js";
import { NbdServer } from "./server.js";

let server: NbdServer | undefined;

afterEach(async () => {
  await server?.close({ force: true });
  server = undefined;
});

describe("NbdServer.holdConnections", () => {
  it("a client that connects before the exports exist waits for them, then finds them", async () => {
    server = new NbdServer();
    const release = server.holdConnections();
    const address = await server.listen({ host: "127.0.0.1", port: 0 });
    const [host, port] = [
      address.slice(0, address.lastIndexOf(":")),
      Number(address.slice(address.lastIndexOf(":") + 1)),
    ];
    const raw = netConnect({ host, port });
    let received = Buffer.alloc(0);
    raw.on("data", (d: Buffer) => {
      received = Buffer.concat([received, d]);
    });
    await new Promise<void>((resolve, reject) => raw.once("connect", resolve).once("error", reject));
    // An unheld server greets at once; a held one says nothing (the server runs in this process).
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(received.length).toBe(0);
    const client = NbdDevice.connect(`nbd://${address}/disk`);
    server.addExport("disk", new MemoryDevice(1 << 20));
    release();
    const dev = await client;
    expect(dev.sizeBytes).toBe(1 << 20);
    await dev.close();
    await new Promise<void>((resolve) => {
      if (received.length >= 8) resolve();
      else raw.on("data", () => received.length >= 8 && resolve());
    });
    expect(received.subarray(0, 8).toString("latin1")).toBe("NBDMAGIC");
    raw.destroy();
  });

  it("close() drops the held connections", async () => {
    server = new NbdServer();
    server.holdConnections();
    const address = await server.listen({ host: "127.0.0.1", port: 0 });
    const raw = netConnect({ host: "127.0.0.1", port: Number(address.split(":").at(-1)) });
    raw.on("error", () => {});
    await new Promise<void>((resolve) => raw.once("connect", resolve));
    const closed = new Promise<void>((resolve) => raw.once("close", () => resolve()));
    await new Promise((resolve) => setTimeout(resolve, 50));
    await server.close();
    server = undefined;
    await closed;
  });
});
