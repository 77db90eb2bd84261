/**
 * dm-mirror in userspace (@udm/mirror) under the real kernel's nbd driver, one guest boot:
 * - mirror0 (disk log, 1 connection) and mirror0-c4 (core log, nbd-client -C 4): ext4 made and
 *   written in the guest; on the host both legs are identical and hold the files, the disk log says
 *   every region is in sync;
 * - mirror-raw (-C 4): 8 parallel O_DIRECT writers; both legs hold the pattern;
 * - mirror-fail: the second leg fails mid-write; the guest's ext4 stays clean and complete on the
 *   surviving leg, the mirror reports the leg dead.
 */
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { type BlockDevice, FileDevice, FlakeyDevice, KcopydClient } from "@udm/kcopyd";
import { type MirrorDevice, mirrorTarget } from "@udm/mirror";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import {
  expectExt4Files,
  expectPatternLayout,
  ext4ReadFile,
  guestFiles,
  hostFsckClean,
  MiB,
  sampleFiles,
} from "./checks.js";
import { tableContext } from "./table-context.js";
import { serveExports, type UdmTestServer } from "./udm-server.js";
import { checkGuestPrerequisites, describeGuestRun, runGuest } from "./vm.js";

const SECTOR = 512;
const REGION_SECTORS = 1024;
const DISK_LOG_MAGIC = 0x4d695272; // "MiRr"

describe("kernel nbd client on udm mirrors", () => {
  let dir: string;
  let kcopyd: KcopydClient;
  let udm: UdmTestServer;
  const files: FileDevice[] = [];
  const mirrors: Record<string, MirrorDevice> = {};
  let flakey: FlakeyDevice;
  const img = (name: string) => path.join(dir, name);

  async function file(name: string, sizeBytes: number): Promise<FileDevice> {
    const dev = await FileDevice.open(img(name), { createSizeBytes: sizeBytes });
    files.push(dev);
    return dev;
  }

  async function mirror(
    name: string,
    sizeBytes: number,
    log: string[],
    legs: Record<string, BlockDevice>,
    extra: Record<string, BlockDevice> = {},
  ): Promise<MirrorDevice> {
    const legArgs = Object.keys(legs).flatMap((spec) => [spec, "0"]);
    const args = [...log, String(Object.keys(legs).length), ...legArgs, "1", "handle_errors"];
    const ctx = tableContext({ ...legs, ...extra }, kcopyd, name);
    const dev = (await mirrorTarget.create(args, sizeBytes, ctx)) as MirrorDevice;
    mirrors[name] = dev;
    return dev;
  }

  beforeAll(async () => {
    checkGuestPrerequisites();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-kmirror-"));
    kcopyd = new KcopydClient();
    const size = 64 * MiB;
    await mirror(
      "mirror0",
      size,
      ["disk", "2", "m0.log", String(REGION_SECTORS)],
      {
        "m0a.img": await file("m0a.img", size),
        "m0b.img": await file("m0b.img", size),
      },
      { "m0.log": await file("m0.log", MiB) },
    );
    await mirror("mirror0-c4", size, ["core", "1", String(REGION_SECTORS)], {
      "m4a.img": await file("m4a.img", size),
      "m4b.img": await file("m4b.img", size),
    });
    await mirror("mirror-raw", 32 * MiB, ["core", "1", String(REGION_SECTORS)], {
      "mra.img": await file("mra.img", 32 * MiB),
      "mrb.img": await file("mrb.img", 32 * MiB),
    });
    flakey = new FlakeyDevice(await file("mfb.img", size), {
      upIntervalSeconds: 1,
      downIntervalSeconds: 0,
      errorWrites: true,
      name: "mfb-flakey",
    });
    flakey.setMode("up");
    await mirror("mirror-fail", size, ["core", "1", String(REGION_SECTORS)], {
      "mfa.img": await file("mfa.img", size),
      "mfb-flakey": flakey,
    });
    udm = await serveExports(mirrors);
  });

  afterAll(async () => {
    await udm?.close();
    for (const m of Object.values(mirrors)) await m.close();
    for (const f of files) await f.close();
    await kcopyd?.destroy();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test("ext4 and O_DIRECT patterns on mirrors (1 and 4 connections), and a leg failing mid-write", async () => {
    const pattern = randomBytes(MiB);
    const sample = sampleFiles();
    const r = await runGuest({
      port: udm.port,
      exports: [
        { name: "mirror0", device: "/dev/nbd0" },
        { name: "mirror0-c4", device: "/dev/nbd1", connections: 4 },
        { name: "mirror-raw", device: "/dev/nbd2", connections: 4 },
        { name: "mirror-fail", device: "/dev/nbd3" },
      ],
      script: [
        "set -e",
        "DEV=/dev/nbd0 sh /run/udm/scenarios/ext4-files.sh",
        "DEV=/dev/nbd1 sh /run/udm/scenarios/ext4-files.sh",
        "DEV=/dev/nbd2 sh /run/udm/scenarios/pattern-io.sh",
        "DEV=/dev/nbd3 sh /run/udm/scenarios/ext4-leg-fail.sh",
        "",
      ].join("\n"),
      files: guestFiles(sample, pattern),
      onHostRequest(request) {
        if (request !== "fail-leg") throw new Error(`unexpected host_call ${request}`);
        flakey.setMode("down");
        return "failed";
      },
      timeoutMs: 180_000,
    });
    expect(r.status, describeGuestRun(r)).toBe(0);
    expect(Object.fromEntries(udm.connections)).toEqual({
      mirror0: 1,
      "mirror0-c4": 4,
      "mirror-raw": 4,
      "mirror-fail": 1,
    });

    for (const name of ["mirror0", "mirror0-c4", "mirror-raw"]) {
      const m = mirrors[name]!;
      await m.waitForSync();
      await m.flush();
      expect(m.status(), name).toMatch(/ 1 AA /);
    }
    await mirrors.mirror0!.close(); // writes the disk log's final state
    for (const [a, b] of [
      ["m0a.img", "m0b.img"],
      ["m4a.img", "m4b.img"],
      ["mra.img", "mrb.img"],
    ] as const) {
      expect(fs.readFileSync(img(a)).equals(fs.readFileSync(img(b))), `${a} equals ${b}`).toBe(true);
    }
    expectExt4Files(img("m0a.img"), sample, pattern);
    expectExt4Files(img("m4a.img"), sample, pattern);
    expectPatternLayout(fs.readFileSync(img("mra.img")), pattern);

    // The kernel-format disk log: header, then one "clean" bit per region, all set.
    const log = fs.readFileSync(img("m0.log"));
    const regions = (64 * MiB) / SECTOR / REGION_SECTORS;
    expect(log.readUInt32LE(0)).toBe(DISK_LOG_MAGIC);
    expect(log.readUInt32LE(4)).toBe(2);
    expect(Number(log.readBigUInt64LE(8))).toBe(regions);
    expect(log.subarray(1024, 1024 + regions / 8).every((b) => b === 0xff)).toBe(true);

    // The failed leg: dead in the status, the survivor holds a clean, complete filesystem.
    const failed = mirrors["mirror-fail"]!;
    await failed.flush();
    expect(failed.legHealth(0)).toBe("A");
    // D (write failed) or F (flush failed: dm-flakey's error_writes fails flushes too, and F wins).
    expect(["D", "F"]).toContain(failed.legHealth(1));
    expectExt4Files(img("mfa.img"), sample, pattern);
    hostFsckClean(img("mfa.img"));
    expect(ext4ReadFile(img("mfa.img"), "/after.txt").toString()).toBe("written after the leg failed\n");
    expect(fs.readFileSync(img("mfa.img")).equals(fs.readFileSync(img("mfb.img")))).toBe(false);
  }, 240_000);
});
