/**
 * SIGTERM stops `udm serve` within seconds whatever is in flight (issue #14 item 4): the export is
 * an NBD device whose backend never answers a READ, a client has such a READ in flight, and the
 * server must still exit (the drain, the flush and the device close are each bounded).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type BlockDevice, MemoryDevice } from "@udm/kcopyd";
import { NbdDevice, NbdServer } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, type ServeProcess, startServe } from "./cli-helpers.js";

/** Far above the bounded stop (3 s drain + 3 s flush + 3 s device close), far below "never". */
const EXIT_BOUND_MS = 60_000;

let dir: string;
let backend: NbdServer;
let serve: ServeProcess | undefined;
let reads = 0;

beforeAll(async () => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-sigterm-"));
  // The backend: a real NBD server whose device never completes a read or a flush.
  const stuck: BlockDevice = Object.create(new MemoryDevice(1 << 20));
  stuck.readInto = () => {
    reads++;
    return new Promise<void>(() => {});
  };
  stuck.flush = () => new Promise<void>(() => {});
  backend = new NbdServer();
  backend.addExport("stuck", stuck);
  const at = await backend.listen({ host: "127.0.0.1", port: 0 });
  serve = await startServe(
    [
      "--data-dir",
      "data",
      "--listen",
      "127.0.0.1:0",
      "--control",
      join(dir, "ctl.sock"),
      "--export",
      `stuck=nbd://${at}/stuck`,
    ],
    { cwd: dir },
  );
}, 120_000);

afterAll(async () => {
  if (serve && serve.child.exitCode === null && serve.child.signalCode === null) serve.child.kill("SIGKILL");
  await backend?.close({ force: true });
  rmSync(dir, { recursive: true, force: true });
});

describe("udm serve and SIGTERM", () => {
  test("exits within seconds while a READ is stuck in the device below it", async () => {
    const client = await NbdDevice.connect(`nbd://127.0.0.1:${serve!.port}/stuck`);
    const read = client.read(0, 4096).then(
      () => "answered",
      (err: Error) => `failed: ${err.message}`,
    );
    while (reads === 0) await new Promise((r) => setTimeout(r, 10));
    const started = Date.now();
    const code = await Promise.race([
      serve!.stop(),
      new Promise<"still running">((r) => setTimeout(() => r("still running"), EXIT_BOUND_MS)),
    ]);
    const tookMs = Date.now() - started;
    expect(code, serve!.stderr().slice(-2000)).not.toBe("still running");
    // Not a clean stop: a device never answered, which the log and the exit code say.
    expect(code).toBe(1);
    expect(serve!.stderr()).toMatch(/requests still in flight after the grace period/);
    // The client's read was never answered: its connection was closed.
    expect(await read).toMatch(/^failed: /);
    console.log(`udm serve exited ${tookMs} ms after SIGTERM with a READ stuck in the device`);
    await client.close().catch(() => undefined);
  }, 120_000);
});
