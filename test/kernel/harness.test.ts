/**
 * The harness on its own, against nbdkit (no udm code): a guest job writes through the kernel's nbd
 * driver with O_DIRECT, the host finds the bytes in the backing file; the guest reaches nothing but
 * the test's port; aborting a run leaves no qemu or relay behind.
 */
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { type NbdkitServer, startNbdkit } from "./nbdkit.js";
import { checkGuestPrerequisites, describeGuestRun, runGuest } from "./vm.js";

const MiB = 1024 * 1024;

/** PIDs of live processes whose command line contains `needle`. */
function processesMatching(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmd = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").replace(/\0/g, " ");
      if (cmd.includes(needle)) pids.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

describe("kernel harness (nbdkit file)", () => {
  let dir: string;
  let image: string;
  let server: NbdkitServer;

  beforeAll(async () => {
    checkGuestPrerequisites();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-kharness-"));
    image = path.join(dir, "disk.img");
    fs.writeFileSync(image, Buffer.alloc(0));
    fs.truncateSync(image, 64 * MiB);
    server = await startNbdkit(["file", image]);
  });
  afterAll(async () => {
    await server?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test("O_DIRECT writes through /dev/nbd0 land in the backing file; the guest is isolated; status and output return", async () => {
    const pattern = randomBytes(MiB);
    const r = await runGuest({
      port: server.port,
      exports: [{ name: "disk", device: "/dev/nbd0" }],
      // The scenario, then a deliberate failure: its status and output must come back too.
      script: `sh /run/udm/scenarios/harness-smoke.sh || exit 100\n. /run/udm/lib.sh\necho before\ndie 'on purpose'\n`,
      files: { "/run/udm/pattern.bin": pattern },
      timeoutMs: 90_000,
    });
    expect(r.status, describeGuestRun(r)).toBe(1);
    expect(r.output).toMatch(/\] ok\nbefore\nFAIL: on purpose\n$/);
    const disk = fs.readFileSync(image);
    expect(disk.subarray(0, MiB).equals(pattern)).toBe(true);
    expect(disk.subarray(8 * MiB, 8 * MiB + 4096).equals(pattern.subarray(0, 4096))).toBe(true);
    expect(disk.subarray(64 * MiB - 4096).equals(pattern.subarray(MiB - 4096))).toBe(true);
    // Nothing else was written.
    expect(disk.subarray(MiB, 8 * MiB).every((b) => b === 0)).toBe(true);
  }, 180_000);

  test("aborting a run leaves no qemu and no relay behind", async () => {
    const abort = new AbortController();
    const hung = await runGuest({
      port: server.port,
      exports: [{ name: "disk", device: "/dev/nbd0" }],
      script: ". /run/udm/lib.sh\nhost_call started\nsleep 600\n",
      onHostRequest: (request) => {
        expect(request).toBe("started");
        setTimeout(() => abort.abort(), 200);
        return "ok";
      },
      signal: abort.signal,
      timeoutMs: 90_000,
    });
    expect(hung.status).toBeNull();
    expect(hung.pid).toBeDefined();
    expect(() => process.kill(hung.pid!, 0)).toThrow();
    // The relay of the attached connection is gone too (it was qemu's child, in its process group).
    await new Promise((r) => setTimeout(r, 100));
    expect(processesMatching(`relay.py ${server.port}`)).toEqual([]);
  }, 180_000);
});
