/**
 * Crash torture of `udm serve` (issue #8 item 1): a mirror with a disk log and an origin with
 * two persistent snapshots, served by `udm serve` in a child process; several NbdDevice
 * connections drive random reads, writes (some FUA), trims, write-zeroes and flushes; the
 * server is killed with SIGKILL at a random moment (copy-outs, resync and metadata commits are
 * running all the time); after the restart every device is read back and checked against the
 * crash model (test/torture/model.ts): acknowledged-then-flushed and FUA writes present, each
 * snapshot exactly the origin as of its creation; the mirror legs must become identical once
 * resynced, and `udm snapshot inspect` must find each COW valid.
 *
 * @example
 * ```ts
 * const summary = await runCrashTorture({ iterations: 5, seed: 1, log: console.log });
 * console.log(formatSummary(summary)); // torture: 5 iterations, 5 kills, ... 0 failures (seed 1)
 * ```
 */
import { spawn } from "node:child_process";
import {
  closeSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NbdDevice } from "@udm/nbd-server";
import { REPO_ROOT, type RunningChild, startChild } from "./child.js";
import { DeviceModel } from "./model.js";
import { mulberry32 } from "./nbd-script.js";

/** Device sizes: small enough to verify whole every iteration, big enough for many chunks/regions. */
export const ORIGIN_BYTES = 8 * 1024 * 1024;
export const MIRROR_BYTES = 8 * 1024 * 1024;
const COW_BYTES = 16 * 1024 * 1024;
const LOG_BYTES = 1024 * 1024;
/** 64-sector (32 KiB) regions: 256 regions to resync. */
const REGION_SECTORS = 64;
/** 8-sector (4 KiB) chunks, as lvcreate's default: one model block per chunk. */
const CHUNK_SECTORS = 8;
const SECTORS = (bytes: number) => bytes / 512;
const MIRROR_SYNC_TIMEOUT_MS = 120_000;

export interface TortureOptions {
  iterations: number;
  seed: number;
  /** Workload time before the kill, chosen per iteration in [min, max] ms. */
  minRunMs?: number;
  maxRunMs?: number;
  /** Run `udm` from the TypeScript sources, or the built CLI (`packages/cli/bin/udm.js`, default: much faster to start). */
  fromSource?: boolean;
  log?: (line: string) => void;
  /** Keep the data directory (for a post-mortem) instead of deleting it. */
  keep?: boolean;
}

export interface TortureSummary {
  seed: number;
  iterations: number;
  kills: number;
  /** Bytes compared against the model after restarts (all devices). */
  bytesVerified: number;
  /** Requests acknowledged by the server during the workloads. */
  requestsAcked: number;
  /** Requests in flight when the server was killed. */
  requestsInFlightAtKill: number;
  /** Mirror leg comparisons that found identical legs after resync. */
  mirrorLegChecks: number;
  cowInspections: number;
  /** Live reads racing a write that came back torn inside a sector (legal, reported). */
  subSectorTears: number;
  /** Iterations that started (and were killed) with the merge still running. */
  killsDuringMerge: number;
  mergesCompleted: number;
  failures: string[];
  dataDir: string;
}

/** One line: iterations, kills, bytes verified, failures and the seed to replay. */
export function formatSummary(s: TortureSummary): string {
  return (
    `torture: ${s.iterations} iterations, ${s.kills} kills (${s.requestsInFlightAtKill} requests in flight at the kills), ` +
    `${s.requestsAcked} requests acknowledged, ${s.bytesVerified} bytes verified, ${s.mirrorLegChecks} mirror leg ` +
    `comparisons, ${s.cowInspections} COW inspections, ${s.killsDuringMerge} kills during a merge ` +
    `(${s.mergesCompleted} merge completed, checked exactly), ${s.subSectorTears} live reads torn inside a sector ` +
    `by a racing write, ${s.failures.length} failures ` +
    `(replay: pnpm torture --iterations ${s.iterations} --seed ${s.seed})`
  );
}

interface Serve {
  child: RunningChild;
  address: string;
}

interface Devices {
  origin: DeviceModel;
  snapA: DeviceModel;
  snapB: DeviceModel;
  /** The snapshot being merged: what the merging device reads, and the origin once merged. */
  snapM: DeviceModel;
  mirror: DeviceModel;
}

function sparse(path: string, bytes: number): void {
  const fd = openSync(path, "w", 0o600);
  ftruncateSync(fd, bytes);
  closeSync(fd);
}

/** Runs the crash torture; failures are collected (with what was found and expected), not thrown. */
export async function runCrashTorture(options: TortureOptions): Promise<TortureSummary> {
  const log = options.log ?? (() => {});
  const rng = mulberry32(options.seed);
  const dir = mkdtempSync(join(tmpdir(), "udm-torture-"));
  const table = join(dir, "udm.table");
  const control = join(dir, "ctl.sock");
  const summary: TortureSummary = {
    seed: options.seed,
    iterations: 0,
    kills: 0,
    bytesVerified: 0,
    requestsAcked: 0,
    requestsInFlightAtKill: 0,
    mirrorLegChecks: 0,
    cowInspections: 0,
    killsDuringMerge: 0,
    mergesCompleted: 0,
    subSectorTears: 0,
    failures: [],
    dataDir: dir,
  };
  const fromSource = options.fromSource ?? false;
  const udmArgs = (args: string[]) =>
    fromSource
      ? [
          "--import",
          join(REPO_ROOT, "test/torture/register-ts.mjs"),
          join(REPO_ROOT, "packages/cli/src/main.ts"),
          ...args,
        ]
      : [join(REPO_ROOT, "packages/cli/bin/udm.js"), ...args];
  const udm = (args: string[]) =>
    new Promise<{ status: number | null; out: string }>((resolve) => {
      const p = spawn(process.execPath, udmArgs(["--control", control, ...args]), {
        cwd: dir,
        env: { ...process.env, UDM_LOG_LEVEL: "warn" },
      });
      let out = "";
      p.stdout.on("data", (c) => {
        out += c;
      });
      p.stderr.on("data", (c) => {
        out += c;
      });
      p.on("close", (status) => resolve({ status, out }));
    });
  const startServe = async (): Promise<Serve> => {
    const child = await startChild(
      fromSource ? join(REPO_ROOT, "packages/cli/src/main.ts") : join(REPO_ROOT, "packages/cli/bin/udm.js"),
      ["--control", control, "serve", "--table", table, "--listen", "127.0.0.1:0", "--data-dir", dir],
      {
        readyPattern: /listening on nbd:\/\/(\S+?) /,
        cwd: dir,
        env: { UDM_LOG_LEVEL: "warn" },
        loader: fromSource,
      },
    );
    return { child, address: child.address };
  };
  const fail = (what: string) => {
    summary.failures.push(`iteration ${summary.iterations} (seed ${options.seed}): ${what}`);
    log(`FAIL ${what}`);
  };

  // ---- build: origin data, snapA, more data, snapB (quiesced, so each snapshot is exact) ----
  sparse(join(dir, "origin.img"), ORIGIN_BYTES);
  sparse(join(dir, "snapA.cow"), COW_BYTES);
  sparse(join(dir, "snapB.cow"), COW_BYTES);
  sparse(join(dir, "snapM.cow"), COW_BYTES);
  sparse(join(dir, "mirror-a.img"), MIRROR_BYTES);
  sparse(join(dir, "mirror-b.img"), MIRROR_BYTES);
  sparse(join(dir, "mirror.log"), LOG_BYTES);
  const originLine = `origin: 0 ${SECTORS(ORIGIN_BYTES)} snapshot-origin origin.img`;
  const mirrorLine = `mirror0: 0 ${SECTORS(MIRROR_BYTES)} mirror disk 2 mirror.log ${REGION_SECTORS} 2 mirror-a.img 0 mirror-b.img 0`;
  const snapLine = (n: string) =>
    `${n}: 0 ${SECTORS(ORIGIN_BYTES)} snapshot origin.img ${n}.cow P ${CHUNK_SECTORS}`;
  writeFileSync(table, `${originLine}\n${mirrorLine}\n`);
  const models: Devices = {
    origin: new DeviceModel({ sizeBytes: ORIGIN_BYTES, seed: options.seed, trim: "zero-or-unchanged" }),
    snapA: new DeviceModel({ sizeBytes: ORIGIN_BYTES, seed: options.seed }),
    snapB: new DeviceModel({ sizeBytes: ORIGIN_BYTES, seed: options.seed }),
    snapM: new DeviceModel({ sizeBytes: ORIGIN_BYTES, seed: options.seed }),
    mirror: new DeviceModel({
      sizeBytes: MIRROR_BYTES,
      seed: options.seed ^ 0x5a5a,
      trim: "zero-or-unchanged",
    }),
  };
  let serve = await startServe();
  try {
    const origin = await NbdDevice.connect(`nbd://${serve.address}/origin`);
    const fill = async (fraction: number, blocks = 8, stride = 8) => {
      for (let b = 0; b < ORIGIN_BYTES / 4096; b += stride) {
        if (rng() > fraction) continue;
        const t = models.origin.beginWrite(b * 4096, blocks * 4096);
        await origin.write(b * 4096, models.origin.payload(t));
        models.origin.complete(t);
      }
      const f = models.origin.beginFlush();
      await origin.flush();
      models.origin.completeFlush(f);
    };
    await fill(0.6);
    const a = await udm([
      "snapshot",
      "create",
      "origin",
      "snapA",
      "--cow",
      join(dir, "snapA.cow"),
      "--chunk",
      String(CHUNK_SECTORS),
    ]);
    if (a.status !== 0) throw new Error(`udm snapshot create snapA failed: ${a.out}`);
    models.snapA = models.origin.clone();
    await fill(0.4);
    const b = await udm([
      "snapshot",
      "create",
      "origin",
      "snapB",
      "--cow",
      join(dir, "snapB.cow"),
      "--chunk",
      String(CHUNK_SECTORS),
    ]);
    if (b.status !== 0) throw new Error(`udm snapshot create snapB failed: ${b.out}`);
    models.snapB = models.origin.clone();
    await fill(0.3);
    const m = await udm([
      "snapshot",
      "create",
      "origin",
      "snapM",
      "--cow",
      join(dir, "snapM.cow"),
      "--chunk",
      String(CHUNK_SECTORS),
    ]);
    if (m.status !== 0) throw new Error(`udm snapshot create snapM failed: ${m.out}`);
    models.snapM = models.origin.clone();
    // Rewrite every other chunk: 1024 exceptions in snapM, none adjacent, so the merge commits
    // 1024 runs (copy, origin flush, FUA metadata) and is still running when the kills come.
    await fill(1, 1, 2);
    await origin.close();
  } finally {
    await serve.child.stop(20_000);
  }
  const mergeLine = `snapM: 0 ${SECTORS(ORIGIN_BYTES)} snapshot-merge origin.img snapM.cow P ${CHUNK_SECTORS}`;
  const baseTable = `${originLine}\n${snapLine("snapA")}\n${snapLine("snapB")}\n${mirrorLine}\n`;
  // As lvconvert --merge records the merge in the metadata, the table restarts it after a crash.
  writeFileSync(table, `${baseTable}${mergeLine}\n`);
  let merging = true;
  /** Merge left at each kill/restart: exceptions on disk after a kill, or exception sectors per the status line. */
  const mergeProgress: Array<number | null> = [];
  log(
    `built ${dir}: origin with snapA and snapB (persistent, ${CHUNK_SECTORS}-sector chunks), snapM merging, mirror0 with a disk log`,
  );
  /** The merge finished: the origin holds snapM's content; its line leaves the table. */
  // From the moment snapshot-merge is loaded the origin device shows the merge's view (dm loads
  // snapshot-merge on the origin): the origin must read as snapM did, merged or not.
  models.snapM.skipGenerationsTo(models.origin.nextGeneration);
  models.origin = models.snapM;
  const mergeDone = () => {
    if (!merging) return;
    merging = false;
    writeFileSync(table, baseTable);
    summary.mergesCompleted++;
    log(`iteration ${summary.iterations}: merge of snapM complete (no exception left)`);
  };

  // ---- iterations: start, verify, work, kill -9 ----
  for (let it = 0; it < options.iterations; it++) {
    summary.iterations = it + 1;
    serve = await startServe();
    if (merging && (it === 0 || rng() < 0.6)) {
      // The merge starts as the table loads: kill within its first moments, before any query.
      const ms = rng() * (it === 0 ? 100 : 400);
      await new Promise((r) => setTimeout(r, ms));
      await serve.child.kill();
      summary.kills++;
      const left = await mergeExceptionsOnDisk(udm, join(dir, "snapM.cow"));
      summary.cowInspections++;
      if (typeof left === "string") fail(`snapM.cow after a kill during its merge: ${left}`);
      else if (left > 0) summary.killsDuringMerge++;
      mergeProgress.push(typeof left === "number" ? left : null);
      if (left === 0) mergeDone(); // finished before the kill: the table forgets it
      log(
        `iteration ${it + 1}: killed ${Math.round(ms)} ms after the start; snapM.cow holds ${left} exceptions to merge`,
      );
      continue;
    }
    let conns: NbdDevice[] = [];
    try {
      // 1. what survived the last kill
      conns = await Promise.all(
        ["origin", "snapA", "snapB", "mirror0"].map((n) => NbdDevice.connect(`nbd://${serve.address}/${n}`)),
      );
      const [oDev, aDev, bDev, mDev] = conns as [NbdDevice, NbdDevice, NbdDevice, NbdDevice];
      const verify = async (name: string, dev: NbdDevice, model: DeviceModel) => {
        for (let off = 0; off < model.sizeBytes; off += 1 << 20) {
          const data = await dev.read(off, 1 << 20);
          const bad = model.verifyAfterCrash(off, data);
          summary.bytesVerified += data.length;
          for (const m of bad.slice(0, 5)) {
            fail(
              `${name} at ${m.offsetBytes}: found ${m.found} (sectors ${m.sectors}), expected one of ${m.expected.join(", ")}`,
            );
          }
          if (bad.length > 5) fail(`${name}: ${bad.length - 5} more blocks lost in this MiB`);
        }
      };
      // While snapM merges, it (and the origin device) read as snapM's content. Done (no
      // exception left, as lvm polls it): the origin keeps reading the same.
      let mergeDev: NbdDevice | null = null;
      if (merging) {
        const left = await mergeRemainingSectors(udm);
        mergeProgress.push(left);
        if (left === null) throw new Error("snapM (snapshot-merge) is not listed after the restart");
        mergeDev = await NbdDevice.connect(`nbd://${serve.address}/snapM`);
        conns.push(mergeDev);
        await verify("snapM (merging)", mergeDev, models.snapM);
        if (left === 0) {
          mergeDone();
          mergeDev = null;
        }
      }
      // While merging, the origin device shows the merge's view (dm loads snapshot-merge on the origin).
      await verify(merging ? "origin (merging)" : "origin", oDev, models.origin);
      await verify("snapA", aDev, models.snapA);
      await verify("snapB", bDev, models.snapB);
      await verify("mirror0", mDev, models.mirror);
      // 2. COWs valid while served
      for (const n of ["snapA", "snapB"]) {
        const r = await udm(["snapshot", "inspect", join(dir, `${n}.cow`)]);
        summary.cowInspections++;
        if (r.status !== 0) fail(`udm snapshot inspect ${n}.cow exited ${r.status}: ${r.out.slice(0, 400)}`);
      }
      // 3. every few iterations: let the mirror resync and compare its legs byte for byte
      if (it % 3 === 2 || it === options.iterations - 1) {
        const synced = await waitMirrorSynced(udm);
        if (!synced.ok) fail(`mirror0 did not report in-sync: ${synced.status}`);
        else {
          const f = models.mirror.beginFlush();
          await mDev.flush();
          models.mirror.completeFlush(f);
          const legA = readFileSync(join(dir, "mirror-a.img"));
          const legB = readFileSync(join(dir, "mirror-b.img"));
          summary.mirrorLegChecks++;
          if (!legA.equals(legB)) {
            const regionBytes = REGION_SECTORS * 512;
            const differing = (x: Buffer, y: Buffer) => {
              const out: number[] = [];
              for (let r = 0; r < MIRROR_BYTES / regionBytes; r++) {
                if (
                  x.compare(y, r * regionBytes, (r + 1) * regionBytes, r * regionBytes, (r + 1) * regionBytes)
                )
                  out.push(r);
              }
              return out;
            };
            const before = differing(legA, legB);
            // Tell "status ran ahead of the copy" from "the legs diverged for good".
            await new Promise((r) => setTimeout(r, 3000));
            const later = differing(
              readFileSync(join(dir, "mirror-a.img")),
              readFileSync(join(dir, "mirror-b.img")),
            );
            const log = await udm(["mirror", "inspect-log", join(dir, "mirror.log")]);
            fail(
              `mirror legs differ although the status says in sync (${synced.status}): regions ${before.join(",")}; ` +
                `3 s later: ${later.length ? `regions ${later.join(",")} still differ` : "identical"}; ` +
                `log: ${log.out.replace(/\s+/g, " ").slice(0, 200)}`,
            );
          }
        }
      }
      // 4. the workload, then kill -9 while it runs
      // A merge is fast: kill early while it runs.
      const runMs = merging
        ? 20 + rng() * 500
        : (options.minRunMs ?? 300) + rng() * ((options.maxRunMs ?? 2500) - (options.minRunMs ?? 300));
      let killed = false;
      const lanes: Array<Promise<void>> = [];
      const lane = (
        dev: NbdDevice,
        model: DeviceModel,
        laneSeed: number,
        readOnly: boolean,
        mayVanish = false,
      ) => {
        const r = mulberry32(laneSeed);
        return (async () => {
          while (!killed) {
            const n = 1 + Math.floor(r() * 8);
            const off = Math.floor(r() * (model.sizeBytes / 4096 - n)) * 4096;
            const len = n * 4096;
            const x = readOnly ? 0.99 : r();
            try {
              if (x < 0.4) {
                const fua = r() < 0.25;
                const t = model.beginWrite(off, len, { fua });
                await dev.write(off, model.payload(t), { fua });
                model.complete(t);
                summary.requestsAcked++;
              } else if (x < 0.47) {
                const t = model.beginTrim(off, len);
                await dev.discard(off, len).then(
                  () => model.complete(t),
                  (err: Error) => {
                    if (killed) throw err;
                    model.fail(t); // a device may refuse discards: nothing is promised
                  },
                );
                summary.requestsAcked++;
              } else if (x < 0.55) {
                const fua = r() < 0.25;
                const t = model.beginWriteZeroes(off, len, { fua });
                await dev.writeZeroes(off, len, { fua });
                model.complete(t);
                summary.requestsAcked++;
              } else if (x < 0.63) {
                const f = model.beginFlush();
                await dev.flush();
                model.completeFlush(f);
                summary.requestsAcked++;
              } else {
                const t = model.beginRead(off, len);
                const data = await dev.read(off, len);
                summary.requestsAcked++;
                for (const m of model.checkRead(t, data).slice(0, 3)) {
                  fail(
                    `live read of ${dev.name} at ${m.offsetBytes}: found ${m.found} (sectors ${m.sectors}), expected ${m.expected.join(", ")}`,
                  );
                }
              }
            } catch (err) {
              // the merging device is removed when its merge completes
              if (!killed && !(mayVanish && !(await stillListed(udm, "snapM"))))
                fail(`${dev.name}: ${(err as Error).message}`);
              return;
            }
          }
        })();
      };
      const extra = await Promise.all([
        NbdDevice.connect(`nbd://${serve.address}/origin`),
        NbdDevice.connect(`nbd://${serve.address}/mirror0`),
      ]);
      conns.push(...extra);
      const seedBase = Math.floor(rng() * 1e9);
      // I/O through the origin, during the merge too (it lands in the merge's view).
      lanes.push(
        lane(oDev, models.origin, seedBase + 1, false),
        lane(oDev, models.origin, seedBase + 2, false),
        lane(extra[0] as NbdDevice, models.origin, seedBase + 3, false),
      );
      if (merging && mergeDev) lanes.push(lane(mergeDev, models.snapM, seedBase + 8, true, true));
      lanes.push(
        lane(mDev, models.mirror, seedBase + 4, false),
        lane(extra[1] as NbdDevice, models.mirror, seedBase + 5, false),
        lane(aDev, models.snapA, seedBase + 6, true),
        lane(bDev, models.snapB, seedBase + 7, true),
      );
      await new Promise((r) => setTimeout(r, runMs));
      const inFlight = models.origin.inFlightCount + models.mirror.inFlightCount;
      killed = true;
      await serve.child.kill();
      summary.kills++;
      await Promise.allSettled(lanes);
      summary.requestsInFlightAtKill += inFlight;
      for (const m of Object.values(models)) m.crash();
      if (merging) {
        const left = await mergeExceptionsOnDisk(udm, join(dir, "snapM.cow"));
        summary.cowInspections++;
        if (typeof left === "string") fail(`snapM.cow after a kill during its merge: ${left}`);
        else if (left > 0) summary.killsDuringMerge++;
      }
      log(
        `iteration ${it + 1}: killed after ${Math.round(runMs)} ms with ${inFlight} requests in flight; ` +
          `${summary.failures.length} failures so far`,
      );
    } catch (err) {
      fail(`iteration aborted: ${(err as Error).stack ?? err}`);
      for (const m of Object.values(models)) m.crash();
    } finally {
      for (const c of conns) await c.close().catch(() => {});
      await serve.child.kill();
    }
    if (summary.failures.length >= 20) break;
  }

  // ---- final: a clean start finishes the merge and shows the same; the legs must match ----
  if (summary.failures.length < 20) {
    serve = await startServe();
    const conns: NbdDevice[] = [];
    try {
      if (merging) {
        const deadline = Date.now() + MIRROR_SYNC_TIMEOUT_MS;
        let left = await mergeRemainingSectors(udm);
        while (left !== 0 && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 200));
          left = await mergeRemainingSectors(udm);
        }
        mergeProgress.push(left);
        if (left !== 0)
          fail(`the merge of snapM did not finish after the last restart (${left} sectors left)`);
        else mergeDone();
      }
      log(
        `merge progress (exceptions left after early kills / sectors left at restarts): ${mergeProgress.join(" -> ")}`,
      );
      for (const [name, model] of [
        ["origin", models.origin],
        ["snapA", models.snapA],
        ["snapB", models.snapB],
        ["mirror0", models.mirror],
      ] as const) {
        const dev = await NbdDevice.connect(`nbd://${serve.address}/${name}`);
        conns.push(dev);
        for (let off = 0; off < model.sizeBytes; off += 1 << 20) {
          const data = await dev.read(off, 1 << 20);
          summary.bytesVerified += data.length;
          const bad = model.verifyAfterCrash(off, data);
          for (const m of bad.slice(0, 5))
            fail(`final ${name} at ${m.offsetBytes}: found ${m.found}, expected ${m.expected.join(", ")}`);
        }
      }
      const synced = await waitMirrorSynced(udm);
      if (!synced.ok) fail(`final: mirror0 did not report in-sync: ${synced.status}`);
      else {
        summary.mirrorLegChecks++;
        if (!readFileSync(join(dir, "mirror-a.img")).equals(readFileSync(join(dir, "mirror-b.img")))) {
          fail(`final: mirror legs differ after resync (${synced.status})`);
        }
      }
      for (const n of ["snapA", "snapB"]) {
        const r = await udm(["snapshot", "inspect", join(dir, `${n}.cow`)]);
        summary.cowInspections++;
        if (r.status !== 0)
          fail(`final: udm snapshot inspect ${n}.cow exited ${r.status}: ${r.out.slice(0, 400)}`);
      }
    } catch (err) {
      fail(`final check aborted: ${(err as Error).stack ?? err}`);
    } finally {
      for (const c of conns) await c.close().catch(() => {});
      await serve.child.stop(20_000);
    }
  }
  summary.subSectorTears = [...new Set(Object.values(models))].reduce((n, m) => n + m.subSectorTears, 0);
  if (!options.keep && summary.failures.length === 0) rmSync(dir, { recursive: true, force: true });
  return summary;
}

/** Whether `udm ls` still lists device `name`. */
async function stillListed(
  udm: (args: string[]) => Promise<{ status: number | null; out: string }>,
  name: string,
): Promise<boolean> {
  const r = await udm(["ls"]);
  return new RegExp(`^${name}\\b`, "m").test(r.out);
}

/** Exceptions in a COW file per `udm snapshot inspect --json` (offline), or why it is not valid. */
async function mergeExceptionsOnDisk(
  udm: (args: string[]) => Promise<{ status: number | null; out: string }>,
  cow: string,
): Promise<number | string> {
  const r = await udm(["snapshot", "inspect", cow, "--json"]);
  try {
    const j = JSON.parse(r.out) as { valid?: boolean; exceptions?: unknown[] };
    if (r.status !== 0 || j.valid !== true) return `inspect exited ${r.status}: ${r.out.slice(0, 300)}`;
    return j.exceptions?.length ?? 0;
  } catch {
    return `inspect printed no JSON (exit ${r.status}): ${r.out.slice(0, 300)}`;
  }
}

/** snapM's exception sectors left to merge (status `allocated/total metadata`), null if absent. */
async function mergeRemainingSectors(
  udm: (args: string[]) => Promise<{ status: number | null; out: string }>,
): Promise<number | null> {
  const r = await udm(["status", "snapM"]);
  const m = / snapshot-merge (\d+)\/\d+ (\d+)/.exec(r.out);
  return r.status === 0 && m ? Number(m[1]) - Number(m[2]) : null;
}

async function waitMirrorSynced(
  udm: (args: string[]) => Promise<{ status: number | null; out: string }>,
): Promise<{ ok: boolean; status: string }> {
  const deadline = Date.now() + MIRROR_SYNC_TIMEOUT_MS;
  let last = "";
  while (Date.now() < deadline) {
    const r = await udm(["status", "mirror0"]);
    last = r.out.trim();
    const m = / (\d+)\/(\d+) /.exec(last);
    if (r.status === 0 && m && m[1] === m[2]) return { ok: true, status: last };
    await new Promise((res) => setTimeout(res, 250));
  }
  return { ok: false, status: last };
}
