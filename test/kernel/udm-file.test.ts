/**
 * The Linux kernel's nbd driver on plain udm exports (FileDevice served by @udm/nbd-server): ext4
 * made, written and checked in the guest, its files read back on the host from the image; and 8
 * parallel O_DIRECT writers over `nbd-client -C 4`, their bytes found in the backing file.
 */
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { FileDevice } from "@udm/kcopyd";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { expectExt4Files, expectPatternLayout, guestFiles, MiB, sampleFiles } from "./checks.js";
import { serveExports, type UdmTestServer } from "./udm-server.js";
import { checkGuestPrerequisites, describeGuestRun, runGuest } from "./vm.js";

async function makeImage(file: string, sizeBytes: number): Promise<FileDevice> {
  return FileDevice.open(file, { createSizeBytes: sizeBytes });
}

describe("kernel nbd client on plain udm file exports", () => {
  let dir: string;
  let udm: UdmTestServer;
  let disk: FileDevice;
  let raw: FileDevice;

  beforeAll(async () => {
    checkGuestPrerequisites();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-kfile-"));
    disk = await makeImage(path.join(dir, "disk.img"), 64 * MiB);
    raw = await makeImage(path.join(dir, "raw.img"), 32 * MiB);
    udm = await serveExports({ disk, raw });
  });
  afterAll(async () => {
    await udm?.close();
    await disk?.close();
    await raw?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test("ext4 (1 connection) and parallel O_DIRECT pattern I/O (nbd-client -C 4)", async () => {
    const pattern = randomBytes(MiB);
    const files = sampleFiles();
    const r = await runGuest({
      port: udm.port,
      exports: [
        { name: "disk", device: "/dev/nbd0" },
        { name: "raw", device: "/dev/nbd1", connections: 4 },
      ],
      script: [
        "DEV=/dev/nbd0 sh /run/udm/scenarios/ext4-files.sh || exit $?",
        "DEV=/dev/nbd1 sh /run/udm/scenarios/pattern-io.sh",
        "",
      ].join("\n"),
      files: guestFiles(files, pattern),
      timeoutMs: 120_000,
    });
    expect(r.status, describeGuestRun(r)).toBe(0);
    expect(Object.fromEntries(udm.connections)).toEqual({ disk: 1, raw: 4 });
    expectExt4Files(path.join(dir, "disk.img"), files, pattern);
    expectPatternLayout(fs.readFileSync(path.join(dir, "raw.img")), pattern);
  }, 180_000);
});
