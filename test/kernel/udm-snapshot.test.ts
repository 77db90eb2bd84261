/**
 * dm-snapshot in userspace (@udm/snapshot) under the real kernel's nbd driver, one guest boot:
 * - a snapshot taken while the guest's ext4 on the origin is mounted and busy (frozen for the
 *   instant of the snapshot, as dmsetup suspend does): the snapshot, mounted read-only in the
 *   guest, has the files as of the snapshot and passes e2fsck -n; merged back, the origin on the
 *   host equals the snapshot byte for byte;
 * - 8 parallel O_DIRECT writers (nbd-client -C 4) on an origin with a snapshot: the origin holds
 *   the pattern, the snapshot still reads the old (zero) content through the COW.
 */
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { type BlockDevice, FileDevice, KcopydClient, type TargetDevice } from "@udm/kcopyd";
import { type MergeDevice, snapshotMergeTarget, snapshotOriginTarget, snapshotTarget } from "@udm/snapshot";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { expectPatternLayout, ext4ReadFile, guestFiles, hostFsckClean, MiB, sampleFiles } from "./checks.js";
import { tableContext } from "./table-context.js";
import { serveExports, type UdmTestServer } from "./udm-server.js";
import { checkGuestPrerequisites, describeGuestRun, runGuest } from "./vm.js";

const CHUNK_SECTORS = "8";
const ORIGIN_BYTES = 64 * MiB;
const RAW_BYTES = 32 * MiB;

async function readAll(dev: BlockDevice): Promise<Buffer> {
  return dev.read(0, dev.sizeBytes);
}

describe("kernel nbd client on udm snapshots", () => {
  let dir: string;
  let kcopyd: KcopydClient;
  let udm: UdmTestServer;
  let ctx: ReturnType<typeof tableContext>;
  const files: FileDevice[] = [];
  const targets: TargetDevice[] = [];
  const img = (name: string) => path.join(dir, name);

  async function file(name: string, sizeBytes: number): Promise<FileDevice> {
    const dev = await FileDevice.open(img(name), { createSizeBytes: sizeBytes });
    files.push(dev);
    return dev;
  }

  beforeAll(async () => {
    checkGuestPrerequisites();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-ksnap-"));
    kcopyd = new KcopydClient();
    ctx = tableContext(
      {
        "origin.img": await file("origin.img", ORIGIN_BYTES),
        "cow.img": await file("cow.img", 32 * MiB),
        "raw.img": await file("raw.img", RAW_BYTES),
        "raw-cow.img": await file("raw-cow.img", 32 * MiB),
      },
      kcopyd,
    );
    const origin = await snapshotOriginTarget.create(["origin.img"], ORIGIN_BYTES, ctx);
    const rawOrigin = await snapshotOriginTarget.create(["raw.img"], RAW_BYTES, ctx);
    const rawSnap = await snapshotTarget.create(
      ["raw.img", "raw-cow.img", "P", CHUNK_SECTORS],
      RAW_BYTES,
      ctx,
    );
    targets.push(origin, rawOrigin, rawSnap);
    udm = await serveExports({ origin, "raw-origin": rawOrigin, "raw-snap": rawSnap });
  });

  afterAll(async () => {
    await udm?.close();
    for (const t of targets.reverse()) await t.close();
    for (const f of files) await f.close();
    await kcopyd?.destroy();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test("live snapshot of a busy ext4, read-only in the guest, merged back; COW under parallel writers", async () => {
    const pattern = randomBytes(MiB);
    const sample = sampleFiles();
    let snapshot: TargetDevice | undefined;
    const r = await runGuest({
      port: udm.port,
      exports: [
        { name: "origin", device: "/dev/nbd0" },
        { name: "raw-origin", device: "/dev/nbd2", connections: 4 },
      ],
      script: [
        "set -e",
        "ORIGIN=/dev/nbd0 SNAP_EXPORT=snap0 sh /run/udm/scenarios/snapshot-live.sh",
        "DEV=/dev/nbd2 sh /run/udm/scenarios/pattern-io.sh",
        "",
      ].join("\n"),
      files: guestFiles(sample, pattern),
      async onHostRequest(request) {
        if (request !== "snapshot") throw new Error(`unexpected host_call ${request}`);
        snapshot = await snapshotTarget.create(
          ["origin.img", "cow.img", "P", CHUNK_SECTORS],
          ORIGIN_BYTES,
          ctx,
        );
        targets.push(snapshot);
        udm.server.addExport("snap0", snapshot);
        return "taken";
      },
      timeoutMs: 180_000,
    });
    expect(r.status, describeGuestRun(r)).toBe(0);
    expect(snapshot).toBeDefined();
    expect(Object.fromEntries(udm.connections)).toEqual({ origin: 1, snap0: 1, "raw-origin": 4 });

    // The snapshot as udm serves it: a clean ext4 with the files as of the snapshot.
    const snapView = await readAll(snapshot!);
    fs.writeFileSync(img("snap-view.img"), snapView);
    hostFsckClean(img("snap-view.img"));
    for (const [name, data] of Object.entries(sample)) {
      expect(ext4ReadFile(img("snap-view.img"), `/dir/${name}`).equals(data), `snapshot /dir/${name}`).toBe(
        true,
      );
    }
    expect(() => ext4ReadFile(img("snap-view.img"), "/after.txt")).toThrow();
    // The origin moved on.
    expect(ext4ReadFile(img("origin.img"), "/after.txt").toString()).toBe("after the snapshot\n");
    expect(snapView.equals(fs.readFileSync(img("origin.img")))).toBe(false);

    // Merge back (snapshot-merge takes the live snapshot's exceptions over): origin == snapshot.
    await udm.server.removeExport("snap0");
    const merge = (await snapshotMergeTarget.create(
      ["origin.img", "cow.img", "P", CHUNK_SECTORS],
      ORIGIN_BYTES,
      ctx,
    )) as MergeDevice;
    targets.push(merge);
    await merge.whenMerged();
    await merge.flush();
    expect(
      fs.readFileSync(img("origin.img")).equals(snapView),
      "origin equals the snapshot after merge",
    ).toBe(true);
    hostFsckClean(img("origin.img"));

    // Parallel writers on an origin with a snapshot: origin has the pattern, snapshot still zeros.
    expectPatternLayout(fs.readFileSync(img("raw.img")), pattern);
    const rawSnap = targets[2]!;
    expect(
      (await readAll(rawSnap)).every((b) => b === 0),
      "raw snapshot still reads zeros",
    ).toBe(true);
  }, 240_000);
});
