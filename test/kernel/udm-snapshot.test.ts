/**
 * dm-snapshot in userspace under the real kernel's nbd driver, driven through the `udm` CLI
 * (`udm serve --table`, `udm snapshot create`, `udm snapshot merge`), one guest boot:
 * - a snapshot taken with `udm snapshot create` while the guest's ext4 on the origin is mounted
 *   and busy (frozen for the instant, as LVM does around dmsetup suspend): the snapshot, mounted
 *   read-only in the guest, has the files as of the snapshot and passes e2fsck -n; after
 *   `udm snapshot merge`, the origin file on the host equals the snapshot byte for byte;
 * - 8 parallel O_DIRECT writers (nbd-client -C 4) on an origin with a snapshot: the origin holds
 *   the pattern, the snapshot still reads the old (zero) content through the COW;
 * - the same writers on a writable snapshot: the snapshot holds the pattern (in its COW), its
 *   origin file stays zero.
 */
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { NbdDevice } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { expectPatternLayout, ext4ReadFile, guestFiles, hostFsckClean, MiB, sampleFiles } from "./checks.js";
import { startUdmServe, type UdmServe } from "./udm-cli.js";
import { checkGuestPrerequisites, describeGuestRun, runGuest } from "./vm.js";

const ORIGIN_BYTES = 64 * MiB;
const RAW_BYTES = 32 * MiB;
const READ_PIECE = 4 * MiB;

/** Reads a whole export over NBD, as any client would. */
async function readExport(port: number, name: string): Promise<Buffer> {
  const dev = await NbdDevice.connect(`nbd://127.0.0.1:${port}/${name}`);
  try {
    const parts: Buffer[] = [];
    for (let at = 0; at < dev.sizeBytes; at += READ_PIECE) {
      parts.push(await dev.read(at, Math.min(READ_PIECE, dev.sizeBytes - at)));
    }
    return Buffer.concat(parts);
  } finally {
    await dev.close();
  }
}

function sparseFile(file: string, sizeBytes: number): void {
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, sizeBytes);
}

describe("kernel nbd client on udm snapshots (udm CLI)", () => {
  let dir: string;
  let serve: UdmServe;
  const img = (name: string) => path.join(dir, name);

  beforeAll(async () => {
    checkGuestPrerequisites();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-ksnap-"));
    sparseFile(img("origin.img"), ORIGIN_BYTES);
    sparseFile(img("raw.img"), RAW_BYTES);
    sparseFile(img("raw-cow.img"), 32 * MiB);
    sparseFile(img("w-origin.img"), RAW_BYTES);
    sparseFile(img("w-cow.img"), 32 * MiB);
    serve = await startUdmServe(
      dir,
      [
        `origin: 0 ${ORIGIN_BYTES / 512} snapshot-origin origin.img`,
        `raw-origin: 0 ${RAW_BYTES / 512} snapshot-origin raw.img`,
        `raw-snap: 0 ${RAW_BYTES / 512} snapshot raw.img raw-cow.img P 8`,
        `wsnap: 0 ${RAW_BYTES / 512} snapshot w-origin.img w-cow.img P 8`,
        "",
      ].join("\n"),
    );
  }, 120_000);

  afterAll(async () => {
    await serve?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test("udm snapshot create of a busy ext4, read-only in the guest, udm snapshot merge; COW under parallel writers on origin and snapshot", async () => {
    const pattern = randomBytes(MiB);
    const sample = sampleFiles();
    const cli: string[] = [];
    const r = await runGuest({
      port: serve.port,
      exports: [
        { name: "origin", device: "/dev/nbd0" },
        { name: "raw-origin", device: "/dev/nbd2", connections: 4 },
        { name: "wsnap", device: "/dev/nbd3", connections: 4 },
      ],
      script: [
        "set -e",
        "ORIGIN=/dev/nbd0 SNAP_EXPORT=snap0 sh /run/udm/scenarios/snapshot-live.sh",
        "DEV=/dev/nbd2 sh /run/udm/scenarios/pattern-io.sh",
        "DEV=/dev/nbd3 sh /run/udm/scenarios/pattern-io.sh",
        "",
      ].join("\n"),
      files: guestFiles(sample, pattern),
      async onHostRequest(request) {
        if (request !== "snapshot") throw new Error(`unexpected host_call ${request}`);
        const created = await serve.udm([
          "snapshot",
          "create",
          "origin",
          "snap0",
          "--cow",
          "cow.img",
          "--size",
          "32M",
          "--chunk",
          "8",
        ]);
        cli.push(created.out);
        if (created.status !== 0) throw new Error(`udm snapshot create failed: ${created.out}`);
        return "taken";
      },
      timeoutMs: 180_000,
    });
    expect(r.status, `${describeGuestRun(r)}\n--- udm ---\n${cli.join("\n")}\n${serve.child.stderr()}`).toBe(
      0,
    );

    // The snapshot as udm serves it: a clean ext4 with the files as of the snapshot.
    const snapView = await readExport(serve.port, "snap0");
    fs.writeFileSync(img("snap-view.img"), snapView);
    hostFsckClean(img("snap-view.img"));
    for (const [name, data] of Object.entries(sample)) {
      expect(ext4ReadFile(img("snap-view.img"), `/dir/${name}`).equals(data), `snapshot /dir/${name}`).toBe(
        true,
      );
    }
    expect(() => ext4ReadFile(img("snap-view.img"), "/after.txt")).toThrow();
    expect(ext4ReadFile(img("origin.img"), "/after.txt").toString()).toBe("after the snapshot\n");

    // Parallel writers on an origin with a snapshot: origin has the pattern, snapshot still zeros.
    expectPatternLayout(fs.readFileSync(img("raw.img")), pattern);
    expect(
      (await readExport(serve.port, "raw-snap")).every((b) => b === 0),
      "raw-snap reads zeros",
    ).toBe(true);

    // udm snapshot merge (waits until merged), then stop the server: origin == snapshot on disk.
    const merged = await serve.udm(["snapshot", "merge", "snap0"]);
    expect(merged.status, merged.out).toBe(0);
    await serve.stop();
    expect(serve.child.exited()?.code, serve.child.stderr()).toBe(0);
    expect(
      fs.readFileSync(img("origin.img")).equals(snapView),
      "origin equals the snapshot after merge",
    ).toBe(true);
    hostFsckClean(img("origin.img"));
  }, 300_000);
});
