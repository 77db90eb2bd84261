import {
  type BlockDevice,
  KcopydClient,
  MemoryDevice,
  TargetArgError,
  type TargetContext,
} from "@udm/kcopyd";
import { afterEach, describe, expect, test } from "vitest";
import { type MirrorDevice, mirrorTarget, parseMirrorTable } from "./index.js";

const SECTORS = 10 * 1024; // ten 1024-sector regions

let open: MirrorDevice[] = [];
afterEach(async () => {
  for (const m of open) await m.close();
  open = [];
});

function context(sizeBytes = SECTORS * 512): TargetContext & { devices: Map<string, BlockDevice> } {
  const devices = new Map<string, BlockDevice>();
  return {
    devices,
    kcopyd: new KcopydClient(),
    async openDevice(spec) {
      let dev = devices.get(spec);
      if (!dev) {
        if (spec.startsWith("missing")) throw new RangeError(`device "${spec}" does not exist`);
        dev = new MemoryDevice(spec.startsWith("small") ? 1536 : sizeBytes, { name: spec });
        devices.set(spec, dev);
      }
      return dev;
    },
  };
}

async function create(line: string, ctx = context()): Promise<MirrorDevice> {
  const m = (await mirrorTarget.create(line.split(" "), SECTORS * 512, ctx)) as MirrorDevice;
  open.push(m);
  return m;
}

async function argError(line: string, ctx = context()): Promise<TargetArgError> {
  const err = await mirrorTarget.create(line.split(" "), SECTORS * 512, ctx).then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(TargetArgError);
  return err as TargetArgError;
}

describe("mirror table parsing", () => {
  test.each([
    ["linear 1 1024 2 a 0 b 0", 0, /unknown mirror log type "linear"/],
    ["core x 1024 2 a 0 b 0", 1, /log argument count must be a non-negative whole number/],
    ["core 3 1024 nosync x 2 a 0 b 0", 1, /core log takes 1 or 2 arguments/],
    ["disk 1 1024 2 a 0 b 0", 1, /disk log takes 2 or 3 arguments/],
    ["core 1 1000 2 a 0 b 0", 2, /power of two/],
    ["core 1 1 2 a 0 b 0", 2, /power of two of at least 2/],
    ["core 1 16384 2 a 0 b 0", 2, /larger than the mirror/],
    ["core 2 1024 fast 2 a 0 b 0", 3, /unknown log sync argument "fast"/],
    ["core 1 1024 1 a 0", 3, /2 to 9 legs, got 1/],
    ["core 1 1024 10 a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 j 0", 3, /2 to 9 legs, got 10/],
    ["core 1 1024 2 a 0 b", 3, /2 legs need 4 <dev> <offset> arguments, only 3 given/],
    ["core 1 1024 2 a 0 b -5", 7, /offset of leg 1 \(sectors\) must be a non-negative whole number/],
    ["core 1 1024 2 a 0 b 0 1 keep_log", 8, /keep_log requires the handle_errors feature/],
    ["core 1 1024 2 a 0 b 0 1 fast_reads", 9, /unknown mirror feature "fast_reads"/],
    ["core 1 1024 2 a 0 b 0 2 handle_errors", 8, /feature count 2 does not match the 1 feature/],
    ["core 1 1024 2 a 0 b 0 1 handle_errors extra", 8, /feature count 1 does not match the 2/],
  ])("%s -> argument %i", async (line, index, message) => {
    const err = await argError(line);
    expect(err.argIndex).toBe(index);
    expect(err.message).toMatch(message);
  });

  test("too many regions for the mirror's size are refused with the smallest region size that fits", () => {
    let err: unknown;
    try {
      parseMirrorTable("core 1 2 2 a 0 b 0".split(" "), 2 ** 31);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(TargetArgError);
    expect((err as TargetArgError).argIndex).toBe(2);
    expect((err as TargetArgError).message).toMatch(
      /gives 1073741824 regions, more than 67108864: use at least 32 sectors/,
    );
  });

  test("a leg that is too small for offset + length names the offset argument", async () => {
    const err = await argError("core 1 1024 2 a 0 b 8");
    expect(err.argIndex).toBe(7);
    expect(err.message).toMatch(/leg b is 5242880 bytes: offset 8 sectors \+ mirror length/);
  });

  test("a device that cannot be opened names its argument", async () => {
    const err = await argError("core 1 1024 2 a 0 missing-b 0");
    expect(err.argIndex).toBe(6);
    expect(err.message).toMatch(/cannot open leg "missing-b"/);
  });

  test("a log device too small for the bitmap is refused", async () => {
    const ctx = context();
    const err = await argError("disk 2 small.log 2 2 a 0 b 0", ctx);
    expect(err.argIndex).toBe(2);
    // The kernel's part needs 2048 bytes, udm's per-leg bits (640 bytes a leg) 1536 more.
    expect(err.message).toMatch(/small.log is 1536 bytes; 5120 regions of 2 legs need 3584/);
  });

  test("parseMirrorTable reports the pieces", () => {
    expect(
      parseMirrorTable("disk 3 l 8 nosync 3 a 0 b 16 c 32 2 handle_errors keep_log".split(" "), 1024),
    ).toEqual({
      logType: "disk",
      logDevice: "l",
      logDeviceArg: 2,
      regionSectors: 8,
      sync: "nosync",
      legs: [
        { spec: "a", offsetSectors: 0, argIndex: 6 },
        { spec: "b", offsetSectors: 16, argIndex: 8 },
        { spec: "c", offsetSectors: 32, argIndex: 10 },
      ],
      handleErrors: true,
      keepLog: true,
    });
  });
});

describe("table and status lines, as dmsetup prints them", () => {
  test("disk log, in sync: the example from the issue", async () => {
    const m = await create(
      "disk 2 mirror.log 1024 nosync 2 a.img 0 b.img 0".replace(" 2 mirror.log", " 3 mirror.log"),
    );
    // nosync applies to the first activation only: once the log is initialised it is not echoed,
    // so a table written back never asks a later activation to trust the legs.
    expect(m.table()).toBe("disk 2 mirror.log 1024 2 a.img 0 b.img 0");
    expect(m.status()).toBe("2 a.img b.img 10/10 1 AA 3 disk mirror.log A");
  });

  test("core log with default sync resyncs everything, then reports 10/10", async () => {
    const m = await create("core 1 1024 2 a 0 b 0");
    expect(m.table()).toBe("core 1 1024 2 a 0 b 0");
    await m.waitForSync();
    expect(m.status()).toBe("2 a b 10/10 1 AA 1 core");
  });

  test("features and offsets are echoed", async () => {
    const ctx = context(SECTORS * 512 + 65536);
    const m = await create("core 2 1024 sync 3 a 128 b 0 c 64 2 handle_errors keep_log", ctx);
    expect(m.table()).toBe("core 2 1024 sync 3 a 128 b 0 c 64 2 handle_errors keep_log");
    const m2 = await create("disk 2 l 512 2 a 0 b 0 1 handle_errors", context());
    expect(m2.table()).toBe("disk 2 l 512 2 a 0 b 0 1 handle_errors");
    await m2.waitForSync();
    expect(m2.status()).toBe("2 a b 20/20 1 AA 3 disk l A");
  });

  test("table() round-trips through the parser", async () => {
    for (const line of [
      "core 1 2048 2 x 0 y 0",
      "core 1 1024 4 a 0 b 0 c 0 d 0 1 handle_errors",
      "disk 3 log 1024 sync 2 a 0 b 0",
    ]) {
      const m = await create(line);
      const again = await create(m.table());
      expect(again.table()).toBe(line);
    }
  });

  test("the last region may be short", async () => {
    const ctx = context();
    const m = (await mirrorTarget.create(
      "core 1 1024 2 a 0 b 0".split(" "),
      (SECTORS - 512) * 512,
      ctx,
    )) as MirrorDevice;
    open.push(m);
    await m.waitForSync();
    expect(m.status()).toBe("2 a b 10/10 1 AA 1 core");
  });
});
