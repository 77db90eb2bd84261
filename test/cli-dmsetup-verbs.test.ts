// dmsetup's verbs on a running `udm serve`: rename, deps, targets, version, wait (the event
// counter a mirror bumps on a leg failure and at the end of a resync), info -c.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NbdDevice } from "@udm/nbd-server";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildCli, ROOT, type ServeProcess, startServe, udm, udmAsync } from "./cli-helpers.js";
import { requireTool } from "./tools.js";

let dir: string;
let serve: ServeProcess;
const hasNbdinfo = requireTool("nbdinfo");
const ctl = () => ["--control", join(dir, "ctl.sock")];
const run = (...args: string[]) => udm([...ctl(), ...args], { cwd: dir });
const runAsync = (...args: string[]) => udmAsync([...ctl(), ...args], { cwd: dir });

beforeAll(async () => {
  buildCli();
  dir = mkdtempSync(join(tmpdir(), "udm-cli-dmsetup-"));
  serve = await startServe(["--export", "disk=mem:1M", "--listen", "127.0.0.1:0", ...ctl()], { cwd: dir });
}, 300_000);

afterAll(async () => {
  if (serve) expect(await serve.stop()).toBe(0);
  rmSync(dir, { recursive: true, force: true });
});

/** Resolves with the wait's result, or "pending" if it has not ended within `ms`. */
function settledWithin<T>(p: Promise<T>, ms: number): Promise<T | "pending"> {
  return Promise.race([p, new Promise<"pending">((r) => setTimeout(() => r("pending"), ms))]);
}

const events = (name: string) =>
  Number(run("info", "-c", "--noheadings", "-o", "events", name).stdout.trim());

describe("dmsetup verbs", () => {
  test("wait returns when a finished resync, then a leg failure, bump the event counter", async () => {
    writeFileSync(join(dir, "a.img"), Buffer.alloc(1 << 20, 0x61));
    writeFileSync(join(dir, "b.img"), Buffer.alloc(1 << 20));
    expect(run("create", "leg", "--table", "0 2048 linear b.img 0").status).toBe(0);
    // The second leg suspended: the resync's writes to it wait, so the mirror is not in sync yet.
    expect(run("suspend", "leg").status).toBe(0);
    expect(run("create", "m", "--table", "0 2048 mirror core 1 64 2 a.img 0 @leg 0").status).toBe(0);
    expect(events("m")).toBe(0);
    const waited = runAsync("wait", "m", "0");
    expect(await settledWithin(waited, 1000)).toBe("pending");
    expect(run("resume", "leg").status).toBe(0);
    expect((await waited).status).toBe(0);
    expect(events("m")).toBe(1);
    expect(run("status", "m").stdout).toMatch(/ 32\/32 1 AA /);

    // A leg that fails writes: the first failed write raises an event.
    expect(run("create", "bad", "--table", "0 2048 error").status).toBe(0);
    expect(run("create", "m2", "--table", "0 2048 mirror core 2 64 nosync 2 a.img 0 @bad 0").status).toBe(0);
    const before = events("m2"); // a nosync mirror is in sync from its creation: no event
    expect(before).toBe(0);
    const waited2 = runAsync("wait", "m2", String(before));
    expect(await settledWithin(waited2, 1000)).toBe("pending");
    const dev = await NbdDevice.connect(`nbd://127.0.0.1:${serve.port}/m2`);
    try {
      await dev.write(0, Buffer.alloc(4096, 0x7a));
      await dev.flush();
    } finally {
      await dev.close();
    }
    expect((await waited2).status).toBe(0);
    // One event per kind of error of the leg (dm-raid1's error_type bits): a failed user flush is
    // a write error too (write_callback), so the write and the flush make one event and `D`.
    expect(events("m2")).toBe(1);
    expect(run("status", "m2").stdout).toMatch(/ 2 \S+a\.img @bad \d+\/32 1 AD /);
    expect(run("info", "m2").stdout).toMatch(/^Event number: +1$/m);

    const cols = run("info", "-c", "--noheadings", "-o", "name,open,segments,events");
    expect(cols.stdout).toBe("disk:0:1:0\nleg:0:1:0\nm:0:1:1\nbad:0:1:0\nm2:0:1:1\n");
    expect(run("info", "-c", "-o", "name,events", "m2").stdout).toBe("Name Event\nm2   1\n");
    expect(run("info", "-c", "--separator", ",", "-o", "name,targets", "m2").stdout).toBe(
      "Name,Targets\nm2,mirror\n",
    );
    const badField = run("info", "-c", "-o", "name,colour");
    expect(badField.status).toBe(2);
    expect(badField.stderr).toMatch(/unknown field "colour"/);

    // deps: the files and udm devices the table opens.
    expect(run("deps", "m").stdout).toBe(`2 dependencies\t: (${join(dir, "a.img")}) (@leg)\n`);
    expect(JSON.parse(run("deps", "--json").stdout)).toContainEqual({ name: "bad", devices: [] });

    const missing = await runAsync("wait", "nosuch");
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/no device "nosuch"/);
    for (const name of ["m2", "bad", "m", "leg"]) expect(run("remove", name).status).toBe(0);
  });

  test.runIf(hasNbdinfo)(
    "rename: a connected client keeps its device, new clients use the new name",
    async () => {
      const dev = await NbdDevice.connect(`nbd://127.0.0.1:${serve.port}/disk`);
      try {
        await dev.write(0, Buffer.alloc(512, 0x42));
        const r = run("rename", "disk", "disk2");
        expect(r.stdout).toBe("renamed disk to disk2\n");
        expect(r.status).toBe(0);
        await dev.write(512, Buffer.alloc(512, 0x43));
        expect(
          (await dev.read(0, 1024)).equals(Buffer.concat([Buffer.alloc(512, 0x42), Buffer.alloc(512, 0x43)])),
        ).toBe(true);
        const size = (name: string) =>
          spawnSync("nbdinfo", ["--size", `nbd://127.0.0.1:${serve.port}/${name}`], { encoding: "utf8" });
        expect(size("disk2").stdout.trim()).toBe(String(1 << 20));
        expect(size("disk").status).not.toBe(0);
        expect(run("ls").stdout).toMatch(/^disk2\t/);
        expect(run("info", "-c", "--noheadings", "-o", "name,open", "disk2").stdout).toBe("disk2:1\n");
      } finally {
        await dev.close();
      }
      const taken = run("create", "other", "--table", "0 8 zero");
      expect(taken.status).toBe(0);
      const clash = run("rename", "disk2", "other");
      expect(clash.status).toBe(1);
      expect(clash.stderr).toMatch(/device "other" already exists/);
      expect(run("create", "user", "--table", "0 8 linear @other 0").status).toBe(0);
      const used = run("rename", "other", "other2");
      expect(used.status).toBe(1);
      expect(used.stderr).toMatch(/other is in use by user \(their tables name @other\)/);
      expect(run("rename", "disk2", "bad name").stderr).toMatch(/udm: .*bad name/);
      for (const name of ["user", "other"]) expect(run("remove", name).status).toBe(0);
      expect(run("rename", "disk2", "disk").status).toBe(0);
    },
  );

  test("targets lists every target type with its arguments; version shows the client's and the server's", () => {
    const targets = udm(["targets"]).stdout;
    for (const t of [
      "linear",
      "zero",
      "error",
      "flakey",
      "mirror",
      "snapshot-origin",
      "snapshot",
      "snapshot-merge",
    ]) {
      expect(targets).toMatch(new RegExp(`^${t} +\\S`, "m"));
    }
    const version = JSON.parse(readFileSync(join(ROOT, "packages/cli/package.json"), "utf8")).version;
    const v = run("version");
    expect(v.status).toBe(0);
    expect(v.stdout).toMatch(
      new RegExp(`^udm version: +${version}\\nserver version: +${version} \\(pid ${serve.child.pid}, node v`),
    );
    const none = udm(["--control", join(dir, "none.sock"), "version"]);
    expect(none.status).toBe(0);
    expect(none.stdout).toMatch(/^server version: +none answers on .*none\.sock$/m);
  });
});
