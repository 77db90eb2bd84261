/**
 * On-disk format interop with the real kernel's device-mapper, one guest boot:
 * - udm -> kernel: udm's snapshot writes a persistent COW (origin writes copied out, a write to
 *   the snapshot itself); the kernel's `snapshot P 8` over the same origin and COW reads exactly
 *   what udm's snapshot serves. Two copies of that COW with one byte changed (header magic, one
 *   exception's new_chunk) must NOT read the same: the comparison is real.
 * - kernel -> udm: the kernel's snapshot-origin/snapshot write a COW through plain udm file
 *   exports; `udm snapshot inspect` lists exactly the kernel's exceptions, and udm's snapshot target
 *   serves the same bytes the kernel read.
 */
import { createHash, randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { FileDevice, KcopydClient } from "@udm/kcopyd";
import { inspectCow, snapshotOriginTarget, snapshotTarget } from "@udm/snapshot";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { MiB } from "./checks.js";
import { tableContext } from "./table-context.js";
import { runUdm } from "./udm-cli.js";
import { serveExports, type UdmTestServer } from "./udm-server.js";
import { checkGuestPrerequisites, describeGuestRun, runGuest } from "./vm.js";

const ORIGIN_BYTES = 32 * MiB;
const COW_BYTES = 16 * MiB;
const CHUNK_BYTES = 4096; // 8 sectors
const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** `RESULT <name> <key> <rest>` lines of the job, as name -> key -> rest. */
function results(output: string): Map<string, Map<string, string>> {
  const out = new Map<string, Map<string, string>>();
  for (const m of output.matchAll(/^RESULT (\S+) (\S+) ?(.*)$/gm)) {
    if (!out.has(m[1]!)) out.set(m[1]!, new Map());
    out.get(m[1]!)!.set(m[2]!, m[3]!.trim());
  }
  return out;
}

describe("dm-snapshot on-disk format: udm <-> the kernel", () => {
  let dir: string;
  let kcopyd: KcopydClient;
  let udm: UdmTestServer;
  const files: FileDevice[] = [];
  const img = (name: string) => path.join(dir, name);
  let udmSnapshotView: Buffer;
  let kOrigin: Buffer;

  async function file(name: string, sizeBytes: number, content?: Buffer): Promise<FileDevice> {
    if (content) fs.writeFileSync(img(name), content);
    const dev = await FileDevice.open(img(name), { createSizeBytes: sizeBytes });
    files.push(dev);
    return dev;
  }

  beforeAll(async () => {
    checkGuestPrerequisites();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-kinterop-"));
    kcopyd = new KcopydClient();

    // udm writes a COW: origin writes (copy-out of old chunks) and a write to the snapshot.
    fs.writeFileSync(img("u-origin.img"), randomBytes(ORIGIN_BYTES));
    fs.writeFileSync(img("u-cow.img"), Buffer.alloc(0));
    fs.truncateSync(img("u-cow.img"), COW_BYTES);
    const build = tableContext(
      {
        "u-origin.img": await FileDevice.open(img("u-origin.img")),
        "u-cow.img": await FileDevice.open(img("u-cow.img")),
      },
      kcopyd,
    );
    const origin = await snapshotOriginTarget.create(["u-origin.img"], ORIGIN_BYTES, build);
    const snap = await snapshotTarget.create(["u-origin.img", "u-cow.img", "P", "8"], ORIGIN_BYTES, build);
    await origin.write(1 * MiB, randomBytes(64 * 1024));
    await origin.write(5 * MiB + 8192, randomBytes(4096));
    await origin.write(ORIGIN_BYTES - 3 * CHUNK_BYTES, randomBytes(3 * CHUNK_BYTES));
    await snap.write(10 * MiB, randomBytes(2 * CHUNK_BYTES));
    await origin.flush();
    await snap.flush();
    udmSnapshotView = await snap.read(0, ORIGIN_BYTES);
    await snap.close();
    await origin.close();
    for (const spec of ["u-origin.img", "u-cow.img"]) await (await build.openDevice(spec)).close();

    // Two broken copies: header magic, and the first exception's new_chunk (area at chunk 1).
    const cow = fs.readFileSync(img("u-cow.img"));
    const badHeader = Buffer.from(cow);
    badHeader[0]! ^= 0xff;
    const badException = Buffer.from(cow);
    expect(badException.readBigUInt64LE(CHUNK_BYTES + 8)).toBeGreaterThan(1n); // a real exception
    badException[CHUNK_BYTES + 8]! ^= 0x01;
    fs.writeFileSync(img("u-cow-badhdr.img"), badHeader);
    fs.writeFileSync(img("u-cow-badex.img"), badException);

    // The kernel will write its COW for this origin.
    kOrigin = randomBytes(ORIGIN_BYTES);
    const exportsByName = {
      "u-origin": await file("u-origin.img", ORIGIN_BYTES),
      "u-cow": await file("u-cow.img", COW_BYTES),
      "u-cow-badhdr": await file("u-cow-badhdr.img", COW_BYTES),
      "u-cow-badex": await file("u-cow-badex.img", COW_BYTES),
      "k-origin": await file("k-origin.img", ORIGIN_BYTES, kOrigin),
      "k-cow": await file("k-cow.img", COW_BYTES),
    };
    udm = await serveExports(exportsByName);
  });

  afterAll(async () => {
    await udm?.close();
    for (const f of files) await f.close();
    await kcopyd?.destroy();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test("the kernel reads udm's COW exactly; udm reads the kernel's COW exactly", async () => {
    const pattern = randomBytes(MiB);
    const r = await runGuest({
      port: udm.port,
      exports: [
        { name: "u-origin", device: "/dev/nbd0" },
        { name: "u-cow", device: "/dev/nbd1" },
        { name: "u-cow-badhdr", device: "/dev/nbd2" },
        { name: "u-cow-badex", device: "/dev/nbd3" },
        { name: "k-origin", device: "/dev/nbd4" },
        { name: "k-cow", device: "/dev/nbd5" },
      ],
      script: new URL("./scenarios/interop-snapshot.sh", import.meta.url).pathname,
      files: { "/run/udm/pattern.bin": pattern },
      timeoutMs: 180_000,
    });
    expect(r.status, describeGuestRun(r)).toBe(0);
    const res = results(r.output);

    // udm -> kernel
    expect(res.get("good")?.get("sha"), r.output).toBe(sha256(udmSnapshotView));
    expect(res.get("badhdr")?.get("sha"), "a COW with a broken magic must not read the same").not.toBe(
      sha256(udmSnapshotView),
    );
    expect(res.get("badex")?.get("sha"), "a COW with a broken exception must not read the same").not.toBe(
      sha256(udmSnapshotView),
    );

    // kernel -> udm: the exceptions the kernel made, as udm's inspection lists them.
    const kcow = await FileDevice.open(img("k-cow.img"), { readOnly: true });
    const info = await inspectCow(kcow);
    await kcow.close();
    expect(info.valid).toBe(true);
    expect(info.chunkSectors).toBe(8);
    const firstOriginChunk = (4 * MiB) / CHUNK_BYTES;
    const expectedOld = [
      ...Array.from({ length: MiB / CHUNK_BYTES }, (_, i) => firstOriginChunk + i),
      (20 * MiB) / CHUNK_BYTES,
    ];
    expect(info.exceptions.map((e) => e.oldChunk).sort((a, b) => a - b)).toEqual(expectedOld);
    // The same through the CLI: `udm snapshot inspect --json` on the kernel's COW.
    const inspected = await runUdm(["snapshot", "inspect", "--json", img("k-cow.img")], dir);
    expect(inspected.status, inspected.out).toBe(0);
    const json = JSON.parse(inspected.out) as { exceptions: Array<{ oldChunk: number; newChunk: number }> };
    expect(json.exceptions).toEqual(info.exceptions);

    // ... and udm's snapshot target serves what the kernel's snapshot read.
    const expectedView = Buffer.from(kOrigin);
    pattern.copy(expectedView, 20 * MiB, 0, CHUNK_BYTES);
    expect(res.get("kernel")?.get("sha")).toBe(sha256(expectedView));
    const ctx = tableContext(
      {
        "k-origin.img": await FileDevice.open(img("k-origin.img"), { readOnly: true }),
        // The NBD export of this file (the guest is done with it) still holds the image lock.
        "k-cow.img": await FileDevice.open(img("k-cow.img"), { lock: false }),
      },
      kcopyd,
    );
    const snap = await snapshotTarget.create(["k-origin.img", "k-cow.img", "P", "0"], ORIGIN_BYTES, ctx);
    const view = await snap.read(0, ORIGIN_BYTES);
    await snap.close();
    for (const spec of ["k-origin.img", "k-cow.img"]) await (await ctx.openDevice(spec)).close();
    expect(view.equals(expectedView), "udm's view of the kernel's snapshot").toBe(true);
    const origin = fs.readFileSync(img("k-origin.img"));
    expect(origin.subarray(4 * MiB, 5 * MiB).equals(pattern)).toBe(true);
  }, 240_000);
});
