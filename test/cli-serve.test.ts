import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NbdDevice } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, requireTool, type ServeProcess, startServe, udm, udmAsync } from "./cli-helpers.js";

let dir: string;
let serve: ServeProcess | undefined;
const devices: NbdDevice[] = [];
const hasNbdinfo = requireTool("nbdinfo");

const ctl = () => ["--control", join(dir, "ctl.sock")];
const run = (...args: string[]) => udm([...ctl(), ...args], { cwd: dir });
const runAsync = (...args: string[]) => udmAsync([...ctl(), ...args], { cwd: dir });

async function connect(name: string): Promise<NbdDevice> {
  const dev = await NbdDevice.connect(`nbd://127.0.0.1:${serve!.port}/${name}`);
  devices.push(dev);
  return dev;
}

async function disconnectAll(): Promise<void> {
  for (const d of devices.splice(0)) await d.close().catch(() => undefined);
}

beforeAll(async () => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-serve-"));
  serve = await startServe(["--data-dir", "data", "--listen", "127.0.0.1:0", ...ctl()], { cwd: dir });
}, 300_000);

afterAll(async () => {
  await disconnectAll();
  if (serve && serve.child.exitCode === null) {
    serve.child.kill("SIGKILL");
  }
  rmSync(dir, { recursive: true, force: true });
});

describe("udm serve: the embedded default", () => {
  test("creates ./data with a table file and prints how to attach each export", () => {
    const out = serve!.stdout();
    expect(out).toContain(`udm: created the embedded default in ${join(dir, "data")}`);
    for (const [index, name] of ["origin", "snap0", "mirror0"].entries()) {
      // Each export its own device: attaching them all at once must not collide.
      expect(out).toContain(`nbd-client 127.0.0.1 ${serve!.port} -N ${name} /dev/nbd${index}`);
      expect(out).toContain(`nbdinfo nbd://127.0.0.1:${serve!.port}/${name}`);
    }
    expect(readFileSync(join(dir, "data/udm.table"), "utf8")).toMatch(
      /^origin: 0 2097152 snapshot-origin origin\.img$/m,
    );
    expect(statSync(join(dir, "ctl.sock")).mode & 0o777).toBe(0o600);
  });

  test.runIf(hasNbdinfo)("nbdinfo --list sees origin, snap0 and mirror0", () => {
    const r = spawnSync("nbdinfo", ["--list", `nbd://127.0.0.1:${serve!.port}`], {
      encoding: "utf8",
      timeout: 30_000,
    });
    expect(r.status).toBe(0);
    for (const name of ["origin", "snap0", "mirror0"]) expect(r.stdout).toContain(`export="${name}"`);
    expect(r.stdout).toMatch(/export-size: 1073741824/);
  });
});

describe("dmsetup verbs over the control socket", () => {
  test("ls, table, status and info (human and --json)", () => {
    expect(run("ls").stdout).toBe(
      "origin\t(2097152 sectors, snapshot-origin, active)\nsnap0\t(2097152 sectors, snapshot, active)\nmirror0\t(2097152 sectors, mirror, active)\n",
    );
    const table = run("table");
    expect(table.status).toBe(0);
    expect(table.stdout).toContain(
      `snap0: 0 2097152 snapshot ${join(dir, "data/origin.img")} ${join(dir, "data/snap0.cow")} P 8\n`,
    );
    expect(run("table", "origin").stdout).toBe(`0 2097152 snapshot-origin ${join(dir, "data/origin.img")}\n`);
    expect(run("status", "snap0").stdout).toMatch(/^0 2097152 snapshot \d+\/2228224 \d+\n$/);
    expect(run("status", "mirror0").stdout).toMatch(
      /^0 2097152 mirror 2 \S+mirror0-a\.img \S+mirror0-b\.img 2048\/2048 1 AA 3 disk \S+mirror0\.log A\n$/,
    );
    const info = JSON.parse(run("info", "snap0", "--json").stdout);
    expect(info).toMatchObject([
      { name: "snap0", state: "active", sizeSectors: 2097152, targets: ["snapshot"] },
    ]);
    expect(run("info", "origin").stdout).toMatch(
      /^Name: +origin\nState: +ACTIVE\nSize: +2097152 sectors \(1\.00 GiB\)/,
    );
    expect(JSON.parse(run("status", "--json").stdout)).toHaveLength(3);
  });

  test("create, table round trip through reload, message, remove", () => {
    expect(
      run("create", "lin", "--table", "0 2048 linear data/origin.img 0", "--table", "2048 8 zero").status,
    ).toBe(0);
    const table = run("table", "lin").stdout.trim().split("\n");
    expect(table).toEqual([`0 2048 linear ${join(dir, "data/origin.img")} 0`, "2048 8 zero"]);
    const reload = run("reload", "lin", ...table.flatMap((l) => ["--table", l]));
    expect(reload.stderr).toBe("");
    expect(run("table", "lin").stdout.trim().split("\n")).toEqual(table);

    const mirrorTable = run("table", "mirror0").stdout.trim();
    expect(run("reload", "mirror0", "--table", mirrorTable).status).toBe(0);
    expect(run("table", "mirror0").stdout.trim()).toBe(mirrorTable);

    expect(run("message", "mirror0", "0", "read_balance", "on").status).toBe(0);
    const bad = run("message", "mirror0", "0", "bogus");
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/unknown mirror message "bogus"/);

    expect(run("create", "top", "--table", "0 1024 linear @lin 1024").status).toBe(0);
    const busy = run("remove", "lin");
    expect(busy.status).toBe(1);
    expect(busy.stderr).toMatch(/lin is in use by top: remove those first/);
    expect(run("remove", "top").status).toBe(0);
    expect(run("remove", "lin").status).toBe(0);
    expect(run("ls").stdout).not.toContain("lin");
  });

  test.each([
    [
      ["create", "x", "--table", "0 2048 linear data/origin.img x"],
      /^udm: --table:1: linear argument 2 \("x"\): offset \(sectors\) must be a non-negative whole number, got "x" \(usage: linear <dev> <offset_sectors>\)\n$/,
    ],
    [
      ["create", "x", "--table", "0 2048 linear missing.img 0"],
      /^udm: --table:1: linear argument 1 \("missing\.img"\): device ".*missing\.img" does not exist/,
    ],
    [
      ["create", "x", "--table", "0 8 stripe"],
      /^udm: --table:1: unknown target type "stripe": expected one of linear, zero, error, flakey, mirror, snapshot-origin, snapshot, snapshot-merge\n$/,
    ],
    [
      ["create", "x", "--table", "0 8 zero", "--table", "16 8 zero"],
      /^udm: --table:2: x: segment starts at sector 16, expected 8/,
    ],
    [
      ["create", "x", "--table", "0 2097152 mirror core 1 1000 2 data/mirror0-a.img 0 data/mirror0-b.img 0"],
      /^udm: --table:1: mirror argument 3 \("1000"\): .*power of two/,
    ],
    [
      ["create", "x", "--table", "0 8 snapshot data/origin.img data/snap0.cow Q 8"],
      /^udm: --table:1: snapshot argument 3 \("Q"\)/,
    ],
    [
      ["create", "x", "--table", "0 8 zero", "--table", "4 8 zero"],
      /^udm: --table:2: x: segment starts at sector 4, expected 8 \(it overlaps the previous segment, which ends at sector 7;/,
    ],
    [
      ["create", "x", "--table", "8 8 zero"],
      /^udm: --table:1: x: segment starts at sector 8, expected 0 \(the first segment must start at 0;/,
    ],
    [
      ["create", "x", "--table", "0 8 snapshot data/origin.img"],
      /^udm: --table:1: snapshot: snapshot requires 4 or more arguments: .*got 1 \(usage: snapshot <origin> <cow> <P\|PO\|N> <chunk_sectors>/,
    ],
    [
      ["create", "x", "--table", "0 8 zero extra"],
      /^udm: --table:1: zero: expected \(no arguments\), got 1 argument\(s\)/,
    ],
    [
      ["create", "x", "--table", "0 8 flakey data/origin.img 0 1 1 1 bogus"],
      /^udm: --table:1: flakey argument 6 \("bogus"\): unknown flakey feature "bogus" \(expected drop_writes, error_writes, error_reads\)/,
    ],
    [
      ["create", "x", "--table", "0 x zero"],
      /^udm: --table:1: length "x" must be a whole number of 512-byte sectors\n$/,
    ],
    [["create", "x", "--table", "zero"], /^udm: --table:1: start sector "zero" must be a whole number/],
    [
      ["create", "x", "--table", "0 8"],
      /^udm: --table:1: missing target type: expected one of linear, zero, error, flakey, mirror, snapshot-origin, snapshot, snapshot-merge\n$/,
    ],
    [
      ["create", "x", "--table", "0 8 linear @nobody 0"],
      /^udm: --table:1: linear argument 1 \("@nobody"\): no udm device "nobody" \(expected @NAME of an existing device\)/,
    ],
    [
      ["create", "--table-file", "mixed.table"],
      /^udm: mixed\.table:3: expected "NAME: <start> <length> <target> <args\.\.\.>"\n$/,
    ],
    [
      ["create", "--table-file", "dup.table"],
      /^udm: dup\.table:2: d1: segment starts at sector 0, expected 8 \(it overlaps the previous segment/,
    ],
    [["create", "nope", "--table-file", "dup.table"], /^udm: dup\.table:2: d1: segment starts at sector 0/],
    [
      ["create", "nope", "--table-file", "two.table"],
      /^udm: two\.table defines no device "nope" \(it defines: t1, t2\)\n$/,
    ],
    [["create", "--table-file", "dmsetup.table"], /a device name is needed for dmsetup-format table lines/],
    [
      ["create", "a/b", "--table", "0 8 zero"],
      /^udm: --table:1: invalid device name "a\/b": expected letters, digits/,
    ],
    [["message", "mirror0", "99999999", "resync"], /mirror0: sector 99999999 is outside the device/],
    [["create", "origin", "--table", "0 8 zero"], /^udm: --table:1: device "origin" already exists\n$/],
    [
      ["snapshot", "create", "origin", "sx", "--cow", "nothere.cow"],
      /^udm: COW .*nothere\.cow: device ".*nothere\.cow" does not exist \(give --size to create it\)\n$/,
    ],
    [["snapshot", "create", "nope", "sx", "--cow", "nothere.cow"], /^udm: no device "nope"/],
    [["create", "--table-file", "exists.table"], /^udm: exists\.table:2: device "snap0" already exists\n$/],
    [["remove", "nope"], /^udm: no device "nope" \(devices: origin, snap0, mirror0\)\n$/],
    [["suspend", "nope"], /no device "nope"/],
  ])("%j fails with exit 1 and a message naming the problem", (args, message) => {
    writeFileSync(join(dir, "mixed.table"), "m1: 0 8 zero\n# a dmsetup line has no NAME:\n0 8 zero\n");
    writeFileSync(join(dir, "dup.table"), "d1: 0 8 zero\nd1: 0 8 zero\n");
    writeFileSync(join(dir, "two.table"), "t1: 0 8 zero\nt2: 0 8 zero\n");
    writeFileSync(join(dir, "dmsetup.table"), "0 8 zero\n");
    writeFileSync(join(dir, "exists.table"), "fresh: 0 8 zero\nsnap0: 0 8 zero\n");
    const r = run(...args);
    expect(r.stderr).toMatch(message);
    expect(r.status).toBe(1);
  });

  test("failed creates left nothing behind", () => {
    expect(run("ls").stdout.trim().split("\n")).toHaveLength(3);
  });

  test("a table file in NAME: format creates several devices", () => {
    const file = join(dir, "more.table");
    writeFileSync(file, "# two\nm1: 0 64 zero\nm2: 0 32 linear @m1 16\n");
    const r = run("create", "--table-file", file);
    expect(r.stdout).toBe("created m1, m2\n");
    expect(run("remove", "m2").status).toBe(0);
    expect(run("remove", "m1").status).toBe(0);
  });

  test("a second server on the same control socket refuses to start and opens nothing", () => {
    const r = udm(["serve", "--data-dir", "data", "--listen", "127.0.0.1:0", ...ctl()], { cwd: dir });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/another udm server is listening on .*ctl\.sock/);
    // Another control socket, same data directory: the data is locked.
    const other = udm(
      ["serve", "--data-dir", "data", "--listen", "127.0.0.1:0", "--control", join(dir, "other.sock")],
      {
        cwd: dir,
      },
    );
    expect(other.status).toBe(1);
    expect(other.stderr).toMatch(
      new RegExp(`data is in use by another udm serve \\(pid ${serve!.child.pid}\\)`),
    );
    expect(run("ls").status).toBe(0);
  });

  test("usage errors exit 2; no server exits 1", () => {
    expect(run("create", "x").status).toBe(2);
    expect(run("ls", "--bogus").status).toBe(2);
    const none = udm(["--control", join(dir, "none.sock"), "ls"], { cwd: dir });
    expect(none.status).toBe(1);
    expect(none.stderr).toMatch(/no udm server at .*none\.sock/);
    const env = udm(["ls"], { cwd: dir, env: { UDM_CONTROL: join(dir, "ctl.sock") } });
    expect(env.status).toBe(0);
  });
});

describe("suspend, snapshots and merge under live NBD clients", () => {
  test("suspend holds I/O (the client waits, nothing fails) and resume releases it", async () => {
    expect(run("create", "vol", "--table", "0 8192 linear mem:4M 0").status).toBe(0);
    const vol = await connect("vol");
    await vol.write(0, Buffer.alloc(4096, 1));
    const suspended = await runAsync("suspend", "vol");
    expect(suspended.status).toBe(0);
    let settled = false;
    const held = vol.write(4096, Buffer.alloc(4096, 2)).finally(() => {
      settled = true;
    });
    // Wait until the server holds the request (it must arrive, and must not complete).
    let heldRequests = 0;
    for (let i = 0; i < 200 && heldRequests === 0; i++) {
      heldRequests = JSON.parse((await runAsync("info", "vol", "--json")).stdout)[0].heldRequests;
    }
    expect(heldRequests).toBe(1);
    expect(settled).toBe(false);
    expect((await runAsync("info", "vol")).stdout).toMatch(/State: +SUSPENDED/);
    expect((await runAsync("resume", "vol")).status).toBe(0);
    await held;
    expect(
      (await vol.read(0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2)])),
    ).toBe(true);
    // udm copy writes to an export of a running server through nbd://.
    const payload = Buffer.alloc(1 << 20);
    for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE(i, i);
    writeFileSync(join(dir, "payload.bin"), payload);
    const copied = await udmAsync(["copy", "payload.bin", `nbd://127.0.0.1:${serve!.port}/vol`], {
      cwd: dir,
    });
    expect(copied.stdout).toMatch(/^copied 1048576 bytes .* write error mask: 0x0\n$/);
    expect((await vol.read(0, 1 << 20)).equals(payload)).toBe(true);
    await disconnectAll();
    expect(run("remove", "vol").status).toBe(0);
  });

  test("--timeout: a suspend whose in-flight I/O never completes exits 1 with a clear message; the server stays healthy", async () => {
    expect(run("create", "tbase", "--table", "0 2048 linear mem:1M 0").status).toBe(0);
    expect(run("create", "tlin", "--table", "0 2048 linear @tbase 0").status).toBe(0);
    const lin = await connect("tlin");
    expect(run("suspend", "tbase").status).toBe(0);
    // In flight on tlin, held below it by the suspended tbase: tlin's drain cannot finish.
    const write = lin.write(0, Buffer.alloc(4096, 7));
    for (let i = 0; i < 200; i++) {
      if (JSON.parse((await runAsync("info", "tbase", "--json")).stdout)[0].heldRequests === 1) break;
    }
    const timedOut = await runAsync("--timeout", "1", "suspend", "tlin");
    expect(timedOut.stdout).toBe("");
    expect(timedOut.stderr).toMatch(
      /^udm: no reply to "suspend" tlin from .*ctl\.sock within 1 s \(--timeout SECONDS, 0 waits forever\); the server goes on with the request: check it with "udm info tlin"\n$/,
    );
    expect(timedOut.status).toBe(1);
    // Queries and table verbs still answer; resuming the lower device lets the drain finish.
    expect((await runAsync("status", "tlin")).stdout).toBe("0 2048 linear\n");
    expect((await runAsync("resume", "tbase")).status).toBe(0);
    await write;
    let state = "";
    for (let i = 0; i < 200 && state !== "suspended"; i++) {
      state = JSON.parse((await runAsync("info", "tlin", "--json")).stdout)[0].state;
    }
    expect(state).toBe("suspended");
    expect((await runAsync("resume", "tlin")).status).toBe(0);
    expect((await lin.read(0, 4096)).equals(Buffer.alloc(4096, 7))).toBe(true);
    const bad = await runAsync("--timeout", "soon", "ls");
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--timeout "soon": expected a number of seconds \(0 waits forever\)/);
    await disconnectAll();
    expect((await runAsync("remove", "tlin")).status).toBe(0);
    expect((await runAsync("remove", "tbase")).status).toBe(0);
  });

  test("snapshot create on a live origin keeps the old content; merge brings it back and removes the snapshot", async () => {
    const origin = await connect("origin");
    const before = Buffer.alloc(65536, 0xa5);
    await origin.write(1 << 20, before);
    await origin.flush();
    const created = await runAsync(
      "snapshot",
      "create",
      "origin",
      "s1",
      "--cow",
      "s1.cow",
      "--size",
      "64M",
      "--chunk-size",
      "4k",
    );
    expect(created.stderr).toBe("");
    expect(created.status).toBe(0);
    expect(statSync(join(dir, "s1.cow")).size).toBe(64 * 2 ** 20);
    await origin.write(1 << 20, Buffer.alloc(65536, 0x5a));
    const s1 = await connect("s1");
    expect((await s1.read(1 << 20, 65536)).equals(before)).toBe(true);
    expect((await runAsync("status", "s1")).stdout).toMatch(/^0 2097152 snapshot \d+\/131072 \d+\n$/);
    await disconnectAll();

    const merged = await runAsync("snapshot", "merge", "s1");
    expect(merged.stderr).toBe("");
    expect(merged.stdout).toBe("merged s1 into its origin\n");
    expect(merged.status).toBe(0);
    expect((await runAsync("ls")).stdout).not.toContain("s1");
    const again = await connect("origin");
    expect((await again.read(1 << 20, 65536)).equals(before)).toBe(true);
    await disconnectAll();
  });

  test("mirror resync NAME forces a full resync and waits; mirror and snapshot status filter by target", async () => {
    const r = await runAsync("mirror", "resync", "mirror0");
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe("mirror0 is in sync\n");
    expect((await runAsync("mirror", "status")).stdout).toMatch(
      /^mirror0: 0 2097152 mirror 2 .* 2048\/2048 1 AA 3 disk .*A\n$/,
    );
    const snaps = (await runAsync("snapshot", "status")).stdout;
    expect(snaps).toMatch(
      /^origin: 0 2097152 snapshot-origin\nsnap0: 0 2097152 snapshot \d+\/2228224 \d+\n$/,
    );
    const notMirror = await runAsync("mirror", "status", "snap0");
    expect(notMirror.status).toBe(1);
    expect(notMirror.stderr).toMatch(/snap0 has no mirror target/);
  });

  test("udm status shows a resync in progress with percent (human and --json); nbdinfo maps the mirror segment of a two-segment device as out of sync until it is", async () => {
    writeFileSync(join(dir, "rl-a.img"), Buffer.alloc(1 << 20, 0x61));
    writeFileSync(join(dir, "rl-b.img"), Buffer.alloc(1 << 20));
    expect(run("create", "rleg", "--table", "0 2048 linear rl-b.img 0").status).toBe(0);
    // The second leg is suspended: the resync's writes to it are held, so it stays in progress.
    expect(run("suspend", "rleg").status).toBe(0);
    // Two segments: a zero one, then the mirror (its offsets shifted by 1 MiB in the device).
    const created = run(
      "create",
      "rmir",
      "--table",
      "0 2048 zero",
      "--table",
      "2048 2048 mirror core 1 64 2 rl-a.img 0 @rleg 0",
    );
    expect(created.stderr).toBe("");
    expect(created.status).toBe(0);
    const human = (await runAsync("status", "rmir")).stdout;
    expect(human).toMatch(
      /^0 2048 zero\n2048 2048 mirror 2 \S+rl-a\.img @rleg \d+\/32 1 \w\w 1 core\n {2}resync: [\d.]+ \w+ \/ 1\.00 MiB \(\d+\.\d%\)(, ETA \d+ s)?\n$/,
    );
    const all = (await runAsync("status")).stdout;
    expect(all).toMatch(
      /\nrmir: 0 2048 zero\nrmir: 2048 2048 mirror .*\n {2}resync: .* \/ 1\.00 MiB \(\d+\.\d%\)/,
    );
    const [entry] = JSON.parse((await runAsync("status", "rmir", "--json")).stdout);
    expect(entry).toMatchObject({ name: "rmir", progress: { operation: "resync", totalBytes: 1 << 20 } });
    expect(entry.progress.doneBytes).toBeLessThan(1 << 20);
    expect((await runAsync("mirror", "status", "rmir")).stdout).toMatch(/\n {2}resync: .*\(\d+\.\d%\)/);
    expect((await runAsync("info", "rmir")).stdout).toMatch(
      /Progress: +resync: .* \/ 1\.00 MiB \(\d+\.\d%\)/,
    );
    // The mirror segment's NBD context, mapped into the device: every region of it is out of sync.
    const outOfSync = () => {
      const r = spawnSync("nbdinfo", ["--map=mirror:out-of-sync", `nbd://127.0.0.1:${serve!.port}/rmir`], {
        encoding: "utf8",
        timeout: 30_000,
      });
      expect(r.stderr).toBe("");
      return r.stdout
        .trim()
        .split("\n")
        .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
    };
    if (hasNbdinfo) {
      expect(outOfSync()).toEqual([
        [0, 1 << 20, 0],
        [1 << 20, 1 << 20, 1],
      ]);
    }

    expect((await runAsync("resume", "rleg")).status).toBe(0);
    let done = entry;
    for (let i = 0; i < 600 && done.progress !== null; i++) {
      done = JSON.parse((await runAsync("status", "rmir", "--json")).stdout)[0];
    }
    expect(done.progress).toBe(null);
    expect((await runAsync("status", "rmir")).stdout).toMatch(
      /^0 2048 zero\n2048 2048 mirror 2 \S+ @rleg 32\/32 1 AA 1 core\n$/,
    );
    expect(readFileSync(join(dir, "rl-b.img")).equals(Buffer.alloc(1 << 20, 0x61))).toBe(true);
    if (hasNbdinfo) expect(outOfSync()).toEqual([[0, 2 << 20, 0]]);
    expect((await runAsync("remove", "rmir")).status).toBe(0);
    expect((await runAsync("remove", "rleg")).status).toBe(0);
  });

  test("udm status shows a merge in progress with percent (human and --json); the merged device goes away", async () => {
    writeFileSync(join(dir, "mo.img"), Buffer.alloc(4 << 20));
    writeFileSync(join(dir, "ms.cow"), Buffer.alloc(4 << 20));
    expect(run("create", "mo", "--table", "0 8192 linear mo.img 0").status).toBe(0);
    expect(run("create", "ms", "--table", "0 8192 snapshot @mo ms.cow P 8").status).toBe(0);
    const data = Buffer.alloc(1 << 20);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(Math.imul(i, 2654435761) >>> 0, i);
    const ms = await connect("ms");
    await ms.write(0, data); // a writable snapshot: 1 MiB of exceptions to merge
    await ms.flush();
    await disconnectAll();
    // The origin is suspended: the merge's writes to it are held, so it stays in progress.
    expect(run("suspend", "mo").status).toBe(0);
    const started = await runAsync("snapshot", "merge", "ms", "--no-wait");
    expect(started.stdout).toBe("merging ms\n");
    expect(started.status).toBe(0);
    expect((await runAsync("status", "ms")).stdout).toMatch(
      /^0 8192 snapshot-merge \d+\/8192 \d+\n {2}merge: [\d.]+ \w+ \/ 1\.00 MiB \(\d+\.\d%\)(, ETA \d+ s)?\n$/,
    );
    const [entry] = JSON.parse((await runAsync("status", "ms", "--json")).stdout);
    expect(entry).toMatchObject({ name: "ms", progress: { operation: "merge", totalBytes: 1 << 20 } });
    expect((await runAsync("snapshot", "status")).stdout).toMatch(
      /\nms: 0 8192 snapshot-merge .*\n {2}merge: /,
    );
    expect((await runAsync("resume", "mo")).status).toBe(0);
    let listed = true;
    for (let i = 0; i < 600 && listed; i++) listed = (await runAsync("ls")).stdout.includes("ms\t");
    expect(listed).toBe(false);
    expect(
      readFileSync(join(dir, "mo.img"))
        .subarray(0, 1 << 20)
        .equals(data),
    ).toBe(true);
    expect((await runAsync("remove", "mo")).status).toBe(0);
  });

  test("snapshot create under a stream of writes: no write fails, none is lost or torn in the snapshot", async () => {
    const origin = await connect("origin");
    const base = 8 << 20;
    const block = 4096;
    let stop = false;
    let written = 0;
    const writer = (async () => {
      for (let i = 0; !stop || i < 8; i++) {
        await origin.write(base + i * block, Buffer.alloc(block, (i % 250) + 1));
        written = i + 1;
      }
    })();
    const created = await runAsync("snapshot", "create", "origin", "s3", "--cow", "s3.cow", "--size", "64M");
    stop = true;
    await writer;
    expect(created.status).toBe(0);
    const s3 = await connect("s3");
    const snapView = await s3.read(base, written * block);
    const originView = await origin.read(base, written * block);
    for (let i = 0; i < written; i++) {
      const fill = (i % 250) + 1;
      expect(originView.subarray(i * block, (i + 1) * block).equals(Buffer.alloc(block, fill))).toBe(true);
      const snap = snapView.subarray(i * block, (i + 1) * block);
      // Whole: either before the snapshot (written) or after it (the old zeros), never torn.
      expect(snap.equals(Buffer.alloc(block, fill)) || snap.equals(Buffer.alloc(block))).toBe(true);
    }
    // The writes the snapshot saw form a prefix of the stream.
    const seen = [...Array(written).keys()].map((i) => snapView[i * block] !== 0);
    expect(seen.indexOf(false) === -1 || !seen.slice(seen.indexOf(false)).includes(true)).toBe(true);
    await disconnectAll();
    expect(run("remove", "s3").status).toBe(0);
  });

  test("snapshot create on an old COW starts a new snapshot (header zeroed) unless --reuse-cow; a COW in use is refused", async () => {
    const at = 16 << 20;
    const origin = await connect("origin");
    const fill = async (v: number) => {
      await origin.write(at, Buffer.alloc(4096, v));
      await origin.flush();
    };
    const snapRead = async (name: string) => {
      const dev = await connect(name);
      const b = await dev.read(at, 4096);
      await dev.close();
      devices.splice(devices.indexOf(dev), 1);
      return b[0];
    };
    await fill(0xa1);
    expect(run("snapshot", "create", "origin", "r1", "--cow", "r.cow", "--size", "16M").status).toBe(0);
    await fill(0xb2); // r1 keeps 0xa1 in r.cow
    expect(await snapRead("r1")).toBe(0xa1);
    const busy = run("snapshot", "create", "origin", "r9", "--cow", "r.cow");
    expect(busy.stderr).toMatch(
      /^udm: COW .*r\.cow is in use by r1: a new snapshot needs a COW of its own\n$/,
    );
    expect(busy.status).toBe(1);
    expect(run("remove", "r1").status).toBe(0);

    expect(run("snapshot", "create", "origin", "r2", "--cow", "r.cow").status).toBe(0);
    expect(await snapRead("r2")).toBe(0xb2); // not r1's 0xa1
    await fill(0xc3); // r2 keeps 0xb2
    expect(run("remove", "r2").status).toBe(0);
    expect(run("snapshot", "create", "origin", "r3", "--cow", "r.cow", "--reuse-cow").status).toBe(0);
    expect(await snapRead("r3")).toBe(0xb2); // r2's exceptions, reloaded
    expect(run("remove", "r3").status).toBe(0);
    await disconnectAll();
  });

  test("an invalidated snapshot fails every read with EIO, also a large read of a hole", async () => {
    const img = join(dir, "inv.img");
    writeFileSync(img, "");
    truncateSync(img, 4 << 20); // sparse: the server could answer reads of it from extents alone
    writeFileSync(join(dir, "inv.cow"), Buffer.alloc(64 << 10)); // header, one area, 14 chunks
    expect(run("create", "invo", "--table", "0 8192 snapshot-origin inv.img").status).toBe(0);
    expect(run("create", "invs", "--table", "0 8192 snapshot inv.img inv.cow P 8").status).toBe(0);
    const origin = await connect("invo");
    for (let chunk = 0; chunk < 16; chunk++) await origin.write(chunk * 4096, Buffer.alloc(4096, 0xaa));
    expect((await runAsync("status", "invs")).stdout).toBe("0 8192 snapshot Invalid\n");
    const snap = await connect("invs");
    await expect(snap.read(0, 4096)).rejects.toThrow(/EIO|Input\/output/);
    await expect(snap.read(2 << 20, 64 << 10)).rejects.toThrow(/EIO|Input\/output/);
    await disconnectAll();
    expect((await runAsync("remove", "invs")).status).toBe(0);
    expect((await runAsync("remove", "invo")).status).toBe(0);
  });

  test("snapshot create refuses a device that is not a snapshot-origin", () => {
    const r = run("snapshot", "create", "mirror0", "s2", "--cow", "mem:64M");
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/mirror0 is a mirror device: a snapshot needs a snapshot-origin device/);
  });
});

describe("NBD meta contexts of served devices", () => {
  test.runIf(hasNbdinfo)(
    "nbdinfo --map=snapshot:exceptions on a two-segment device maps the snapshot segment's chunks to device offsets",
    async () => {
      writeFileSync(join(dir, "so.img"), Buffer.alloc(1 << 20));
      writeFileSync(join(dir, "so.cow"), Buffer.alloc(1 << 20));
      writeFileSync(
        join(dir, "seg.table"),
        "so: 0 2048 snapshot-origin so.img\nseg2: 0 2048 zero\nseg2: 2048 2048 snapshot so.img so.cow P 8\n",
      );
      expect(run("create", "--table-file", "seg.table").stdout).toBe("created so, seg2\n");
      const so = await connect("so");
      await so.write(5 * 4096, Buffer.alloc(4096, 9)); // copies chunk 5 out to seg2's COW
      await so.flush();
      await disconnectAll();
      const map = (ctx: string, name: string) =>
        spawnSync("nbdinfo", [`--map=${ctx}`, `nbd://127.0.0.1:${serve!.port}/${name}`], {
          encoding: "utf8",
          timeout: 30_000,
        });
      const r = map("snapshot:exceptions", "seg2");
      expect(r.stderr).toBe("");
      expect(r.status).toBe(0);
      const rows = r.stdout
        .trim()
        .split("\n")
        .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
      expect(rows).toEqual([
        [0, (1 << 20) + 5 * 4096, 0],
        [(1 << 20) + 5 * 4096, 4096, 1],
        [(1 << 20) + 6 * 4096, (1 << 20) - 6 * 4096, 0],
      ]);
      // The mirror's context passes through the gate too (the embedded mirror0 is in sync).
      const m = map("mirror:out-of-sync", "mirror0");
      expect(m.status).toBe(0);
      expect(m.stdout.trim().split(/\s+/).slice(0, 3)).toEqual(["0", String(1 << 30), "0"]);
      expect(run("remove", "seg2").status).toBe(0);
      expect(run("remove", "so").status).toBe(0);
    },
  );
});

describe("offline inspection", () => {
  test("snapshot inspect reads the live COW; a non-COW is explained with exit 1", () => {
    const ok = run("snapshot", "inspect", "data/snap0.cow");
    expect(ok.status).toBe(0);
    expect(ok.stdout).toMatch(/SnAp version 1, valid/);
    expect(ok.stdout).toMatch(/chunk size: +8 sectors/);
    expect(JSON.parse(run("snapshot", "inspect", "data/snap0.cow", "--json").stdout)).toMatchObject({
      valid: true,
      chunkSectors: 8,
    });
    const bad = run("snapshot", "inspect", "data/mirror0-a.img");
    expect(bad.status).toBe(1);
    expect(bad.stdout).toMatch(/not a usable snapshot COW store \(magic\)/);
  });

  test("mirror inspect-log reads the disk log", () => {
    const r = run("mirror", "inspect-log", "data/mirror0.log");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/2048 regions/);
    expect(JSON.parse(run("mirror", "inspect-log", "data/mirror0.log", "--json").stdout)).toMatchObject({
      regionCount: 2048,
    });
    expect(run("mirror", "inspect-log", "data/origin.img").status).toBe(1);
  });
});

describe("shutdown and restart", () => {
  test("SIGTERM drains, flushes and exits 0; a second start reuses the data", async () => {
    const origin = await connect("origin");
    await origin.write(0, Buffer.from("kept across restarts"));
    await origin.flush();
    await disconnectAll();
    const tableBefore = readFileSync(join(dir, "data/udm.table"), "utf8");
    // A request held by a suspended device at shutdown is let through, not lost.
    const client = await connect("origin");
    expect((await runAsync("suspend", "origin")).status).toBe(0);
    const held = client.write(4096, Buffer.from("held at shutdown"));
    for (let i = 0; i < 200; i++) {
      if (JSON.parse((await runAsync("info", "origin", "--json")).stdout)[0].heldRequests === 1) break;
    }
    const stopped = serve!.stop();
    await held;
    expect(await stopped).toBe(0);
    devices.splice(0);
    expect(serve!.stderr()).toMatch(/"msg":"stopped"/);

    serve = await startServe(["--data-dir", "data", "--listen", "127.0.0.1:0", ...ctl()], { cwd: dir });
    expect(serve.stdout()).not.toContain("created the embedded default");
    expect(readFileSync(join(dir, "data/udm.table"), "utf8")).toBe(tableBefore);
    const again = await connect("origin");
    expect((await again.read(0, 20)).toString()).toBe("kept across restarts");
    expect((await again.read(4096, 16)).toString()).toBe("held at shutdown");
    // snap0 still holds the origin as it was at first start (all zeros): its COW was reused.
    const snap0 = await connect("snap0");
    expect((await snap0.read(0, 20)).equals(Buffer.alloc(20))).toBe(true);
    await disconnectAll();
    expect(await serve.stop()).toBe(0);
  });
});

describe("shutdown behind a huge request", () => {
  test("SIGTERM with a 1 GiB WRITE_ZEROES in flight to a snapshot export: the server exits within seconds, the request fails with EIO", async () => {
    const own = mkdtempSync(join(tmpdir(), "udm-cli-serve-term-"));
    const server = await startServe(
      ["--data-dir", "data", "--listen", "127.0.0.1:0", "--control", join(own, "ctl.sock")],
      { cwd: own },
    );
    try {
      const snap = await NbdDevice.connect(`nbd://127.0.0.1:${server.port}/snap0`);
      const zeroing = snap.writeZeroes(0, 1 << 30).then(
        () => null,
        (err: Error) => err,
      );
      // The request is running once the snapshot has started allocating exceptions for it.
      const status = () => udm(["--control", join(own, "ctl.sock"), "status", "snap0"], { cwd: own }).stdout;
      const before = status();
      for (let i = 0; i < 100 && status() === before; i++) await new Promise((r) => setTimeout(r, 50));
      const started = Date.now();
      const code = await server.stop();
      const tookMs = Date.now() - started;
      expect(tookMs).toBeLessThan(15_000);
      expect(code).toBe(0);
      expect(server.stderr()).toMatch(/requests still running: failing what they have not started/);
      expect((await zeroing)?.message).toMatch(/EIO|shutting down|closed/);
      await snap.close().catch(() => undefined);
    } finally {
      if (server.child.exitCode === null) server.child.kill("SIGKILL");
      rmSync(own, { recursive: true, force: true });
    }
  }, 60_000);
});
