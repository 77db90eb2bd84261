// bench suite "copy": @udm/kcopyd (KcopydClient + FileDevice) against dd and cp on the same files.
//
// Cases, each timed as a whole process (Node's start-up counts against kcopyd) with its peak RSS
// from /usr/bin/time -f %M:
//   - a 2 GiB file of random data to one destination and to two (dd and cp run once per
//     destination, one after the other: they have no fan-out);
//   - a 1 TiB sparse file holding 1 GiB of data in 16 runs, copied with SKIP_HOLES, against the
//     same 1 GiB copied dense, and against `cp` (which also seeks over holes);
//   - FileDevice operations with the native addon against the pure-JS path (UDM_NO_NATIVE=1).
// Caching, stated in the table's notes: before every run the source is evicted from the page
// cache (posix_fadvise DONTNEED through `dd iflag=nocache count=0`), destinations are new empty
// files, and every tool's time includes making its writes durable (fdatasync / sync FILE).
// Each case runs ROUNDS times in rotating order and the median time is reported.
//
// This file is also the child process that runs one kcopyd copy: `node copy.mjs --child JSON`.
import { execFileSync, spawn } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { promises as fsp } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const name = "copy";

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const SECTOR = 512;
const PAGE = 4096;
/** The kcopyd client the benchmark runs: `udm copy`'s defaults unless stated here. */
const CLIENT = { pages: undefined, subJobSectors: undefined };
/** Runs of each case; the median is reported (the machine is shared and noisy). */
const ROUNDS = 5;

const thisFile = fileURLToPath(import.meta.url);
/** The child environment that forces kcopyd's pure-JS path (no addon: reads and writes through buffers). */
const NO_NATIVE = { ...process.env, UDM_NO_NATIVE: "1" };

/** Runs `argv` under /usr/bin/time; resolves with wall seconds, peak RSS (KiB) and stdout. */
function timed(argv, env = process.env) {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn("/usr/bin/time", ["-f", "%M", "--", ...argv], {
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => {
      stdout += d;
    });
    child.stderr.on("data", (d) => {
      stderr += d;
    });
    child.on("error", reject);
    child.on("close", (code) => {
      const seconds = (performance.now() - started) / 1000;
      const lines = stderr.trim().split("\n");
      const rssKiB = Number(lines.pop());
      if (code !== 0) reject(new Error(`${argv.join(" ")} exited with ${code}: ${lines.join("\n")}`));
      else resolve({ seconds, rssKiB, stdout });
    });
  });
}

/** Drops `path` from the page cache, so the next read comes from the disk. */
function evict(path) {
  execFileSync("dd", [`if=${path}`, "iflag=nocache", "count=0", "status=none"]);
}

async function fresh(paths) {
  for (const p of paths) await fsp.rm(p, { force: true });
}

async function makeRandomFile(path, bytes) {
  const fh = await fsp.open(path, "w");
  const chunk = Buffer.allocUnsafe(16 * MiB);
  try {
    for (let done = 0; done < bytes; done += chunk.length) {
      randomFillSync(chunk);
      const n = Math.min(chunk.length, bytes - done);
      await fh.write(chunk, 0, n, done);
    }
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/** A sparse file of `size` bytes holding `dataBytes` of random data in `runs` evenly spaced runs. */
async function makeSparseFile(path, size, dataBytes, runs) {
  const fh = await fsp.open(path, "w");
  const runBytes = dataBytes / runs;
  const chunk = Buffer.allocUnsafe(Math.min(16 * MiB, runBytes));
  try {
    await fh.truncate(size);
    for (let r = 0; r < runs; r++) {
      const at = Math.floor((r * size) / runs / MiB) * MiB;
      for (let done = 0; done < runBytes; done += chunk.length) {
        randomFillSync(chunk);
        await fh.write(chunk, 0, Math.min(chunk.length, runBytes - done), at + done);
      }
    }
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

function kcopydArgv(job) {
  return [process.execPath, thisFile, "--child", JSON.stringify(job)];
}

function median(values) {
  const s = [...values].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** One kcopyd copy in this (child) process; prints a JSON line with what the parent reports. */
async function child(job) {
  const { FileDevice, KcopydClient, KcopydFlags } = await import("@udm/kcopyd");
  const started = performance.now();
  const src = await FileDevice.open(job.src, { readOnly: true });
  const dests = [];
  for (const path of job.dests) dests.push(await FileDevice.open(path, { createSizeBytes: job.bytes }));
  const kc = new KcopydClient({ pages: job.pages, subJobSectors: job.subJobSectors });
  const count = job.bytes / SECTOR;
  const flags = job.skipHoles ? KcopydFlags.SKIP_HOLES : 0;
  const result = await kc.copyAsync(
    { dev: src, sector: 0, count },
    dests.map((dev) => ({ dev, sector: 0, count })),
    flags,
  );
  await Promise.all(dests.map((d) => d.flush()));
  const seconds = (performance.now() - started) / 1000;
  await kc.destroy();
  for (const d of [src, ...dests]) await d.close();
  console.log(
    JSON.stringify({
      ...result,
      seconds,
      budgetPages: kc.pool.totalPages,
      peakPages: kc.pool.peakPages,
      subJobSectors: kc.subJobSectors,
      maxRssKiB: process.resourceUsage().maxRSS,
    }),
  );
  if (result.readErr || result.writeErr) process.exitCode = 1;
}

/** Times FileDevice operations in this process, native addon on or off. */
async function fileOps({ sparsePath, densePath, denseBytes, native }) {
  const { FileDevice, nativeFileOps } = await import("@udm/kcopyd");
  const saved = process.env.UDM_NO_NATIVE;
  if (native) delete process.env.UDM_NO_NATIVE;
  else process.env.UDM_NO_NATIVE = "1";
  try {
    if (native && !nativeFileOps()) return [];
    const tool = native ? "FileDevice, native addon" : "FileDevice, pure JS";
    const sparse = await FileDevice.open(sparsePath, { readOnly: true });
    let t = performance.now();
    const extents = await sparse.extents(0, sparse.sizeBytes);
    const extentSeconds = (performance.now() - t) / 1000;
    await sparse.close();
    const dense = await FileDevice.open(densePath);
    t = performance.now();
    await dense.writeZeroes(0, denseBytes, { mayTrim: true });
    await dense.flush();
    const zeroSeconds = (performance.now() - t) / 1000;
    const blocks = (await fsp.stat(densePath)).blocks;
    await dense.close();
    return [
      {
        case: `extents of ${fmtBytes(sparse.sizeBytes)} sparse`,
        tool,
        "time s": extentSeconds,
        note: `${extents.length} extents (${extents.filter((e) => e.kind === "data").length} data)`,
      },
      {
        case: `writeZeroes ${fmtBytes(denseBytes)} (mayTrim)`,
        tool,
        "time s": zeroSeconds,
        "MiB/s": denseBytes / MiB / zeroSeconds,
        note: `${fmtBytes(blocks * 512)} left allocated`,
      },
    ];
  } finally {
    if (saved === undefined) delete process.env.UDM_NO_NATIVE;
    else process.env.UDM_NO_NATIVE = saved;
  }
}

function fmtBytes(bytes) {
  if (bytes >= TiB && bytes % TiB === 0) return `${bytes / TiB} TiB`;
  if (bytes >= GiB && bytes % GiB === 0) return `${bytes / GiB} GiB`;
  return `${(bytes / MiB).toFixed(0)} MiB`;
}

/**
 * @param {{ workDir: string, quick: boolean, log: (msg: string) => void }} ctx
 * @returns {Promise<Array<Record<string, string | number>>>}
 */
export async function run(ctx) {
  const { workDir, quick, log } = ctx;
  const size = quick ? 256 * MiB : 2 * GiB;
  const rounds = quick ? 1 : ROUNDS;
  const sparseSize = quick ? 64 * GiB : TiB;
  const sparseData = quick ? 128 * MiB : GiB;
  const src = join(workDir, "src.img");
  const sparse = join(workDir, "sparse.img");

  log(`writing ${fmtBytes(size)} of random data`);
  await makeRandomFile(src, size);
  log(`writing a ${fmtBytes(sparseSize)} sparse file with ${fmtBytes(sparseData)} of data`);
  await makeSparseFile(sparse, sparseSize, sparseData, 16);

  // "disk": destinations beside the source, source evicted before each run, writes made durable.
  // "tmpfs": destinations in /dev/shm and the source cached: what the engine costs in CPU alone.
  const groups = [{ label: "disk, cold source", dir: workDir, cold: true }];
  const shmDir = await tmpfsDir(2.5 * size);
  if (shmDir) groups.push({ label: "tmpfs, cached source", dir: shmDir, cold: false });
  else log("no /dev/shm with room for two copies: skipping the tmpfs cases");

  const kcopyd = (dests, bytes, from = src, skipHoles = false) =>
    kcopydArgv({ src: from, dests, bytes, skipHoles, ...CLIENT });
  const dd = (dest) => ["dd", `if=${src}`, `of=${dest}`, "bs=1M", "conv=notrunc,fdatasync", "status=none"];
  const cases = [];
  for (const g of groups) {
    const d1 = join(g.dir, "dst1.img");
    const d2 = join(g.dir, "dst2.img");
    const one = { group: g, bytes: size, case: `${fmtBytes(size)} → 1 file (${g.label})`, dests: [d1] };
    const two = { group: g, bytes: size, case: `${fmtBytes(size)} → 2 files (${g.label})`, dests: [d1, d2] };
    cases.push(
      { ...one, tool: "dd bs=1M", ref: true, argv: dd(d1) },
      { ...one, tool: "cp", argv: ["sh", "-c", `cp "${src}" "${d1}" && sync "${d1}"`] },
      { ...one, tool: "kcopyd", argv: kcopyd([d1], size) },
      { ...one, tool: "kcopyd, pure JS", env: NO_NATIVE, argv: kcopyd([d1], size) },
      {
        ...two,
        tool: "dd bs=1M ×2",
        ref: true,
        argv: ["sh", "-c", `${dd(d1).join(" ")} && ${dd(d2).join(" ")}`],
      },
      {
        ...two,
        tool: "cp ×2",
        argv: ["sh", "-c", `cp "${src}" "${d1}" && cp "${src}" "${d2}" && sync "${d1}" "${d2}"`],
      },
      { ...two, tool: "kcopyd", argv: kcopyd([d1, d2], size) },
      { ...two, tool: "kcopyd, pure JS", env: NO_NATIVE, argv: kcopyd([d1, d2], size) },
    );
  }
  const disk = groups[0];
  const d1 = join(workDir, "dst1.img");
  const sparseDst = join(workDir, "sparse-dst.img");
  const sparseCase = `${fmtBytes(sparseSize)} sparse (${fmtBytes(sparseData)} data) → 1 file (${disk.label})`;
  cases.push(
    {
      group: disk,
      bytes: sparseData,
      case: `${fmtBytes(sparseData)} dense → 1 file (${disk.label})`,
      tool: "kcopyd",
      dests: [d1],
      argv: kcopyd([d1], sparseData),
    },
    {
      group: disk,
      bytes: sparseData,
      case: sparseCase,
      tool: "kcopyd SKIP_HOLES",
      source: sparse,
      dests: [sparseDst],
      argv: kcopyd([sparseDst], sparseSize, sparse, true),
    },
    {
      group: disk,
      bytes: sparseData,
      case: sparseCase,
      tool: "cp --sparse=auto",
      source: sparse,
      dests: [sparseDst],
      argv: ["sh", "-c", `cp --sparse=auto "${sparse}" "${sparseDst}" && sync "${sparseDst}"`],
    },
  );

  const samples = new Map(cases.map((c) => [c, []]));
  try {
    for (let round = 0; round < rounds; round++) {
      // Rotate the order so no tool always runs right after the same neighbour.
      const order = cases.map((_, i) => cases[(i + round * 5) % cases.length]);
      for (const c of order) {
        await fresh(c.dests);
        if (c.group.cold) evict(c.source ?? src);
        else execFileSync("cat", [c.source ?? src], { stdio: ["ignore", "ignore", "inherit"] });
        log(`round ${round + 1}/${rounds}: ${c.case}, ${c.tool}`);
        const r = await timed(c.argv, c.env);
        let childReport;
        if (c.tool.startsWith("kcopyd")) childReport = JSON.parse(r.stdout.trim().split("\n").pop());
        samples.get(c).push({ ...r, childReport });
        await fresh(c.dests);
      }
    }
  } finally {
    if (shmDir) await fsp.rm(shmDir, { recursive: true, force: true });
  }

  const secondsOf = (c) => median(samples.get(c).map((s) => s.seconds));
  // The same tool's one-destination case in the same group, for the fan-out cost.
  const kcOneOf = (c) =>
    c.tool.startsWith("kcopyd") &&
    cases.find(
      (o) => o.group === c.group && o.tool === c.tool && o.bytes === c.bytes && o.dests.length === 1,
    );
  const rows = cases.map((c) => {
    const s = samples.get(c);
    const seconds = secondsOf(c);
    const same = (o) => o.group === c.group && o.bytes === c.bytes && o.dests.length === c.dests.length;
    const ddRef = cases.find((o) => o.ref && same(o));
    const report = s[s.length - 1].childReport;
    const row = {
      case: c.case,
      tool: c.tool,
      "time s": seconds,
      "range s": `${Math.min(...s.map((x) => x.seconds)).toFixed(2)}–${Math.max(...s.map((x) => x.seconds)).toFixed(2)}`,
      "MiB/s": c.bytes / MiB / seconds,
      "× dd": ddRef ? secondsOf(ddRef) / seconds : "",
      "× 1 dest": c.bytes === size && kcOneOf(c) ? seconds / secondsOf(kcOneOf(c)) : "",
      "peak RSS MiB": Math.max(...s.map((x) => x.rssKiB)) / 1024,
      note: "",
    };
    if (report) {
      const budgetMiB = (report.budgetPages * PAGE) / MiB;
      row.note = `budget ${report.budgetPages} pages (${budgetMiB} MiB), peak ${report.peakPages}; sub-job ${(report.subJobSectors * SECTOR) / 1024} KiB; RSS target < ${budgetMiB + 64} MiB`;
    }
    return row;
  });

  log("FileDevice operations, native and pure JS");
  const dense = join(workDir, "dense.img");
  for (const native of [true, false]) {
    execFileSync("dd", [
      `if=${src}`,
      `of=${dense}`,
      "bs=1M",
      `count=${sparseData / MiB}`,
      "conv=fdatasync",
      "status=none",
    ]);
    rows.push(...(await fileOps({ sparsePath: sparse, densePath: dense, denseBytes: sparseData, native })));
  }
  return rows;
}

/** A fresh directory in /dev/shm when it has `bytes` free, else null. */
async function tmpfsDir(bytes) {
  try {
    const st = await fsp.statfs("/dev/shm");
    if (st.bavail * st.bsize < bytes) return null;
    return await fsp.mkdtemp("/dev/shm/udm-bench-copy-");
  } catch {
    return null;
  }
}

/** Targets from issue 2, checked against the rows; printed under the table in the .md file. */
export function notes(rows, { quick }) {
  const kcopydRows = rows.filter((r) => r.tool.startsWith("kcopyd"));
  const rssOk = kcopydRows.every(
    (r) => r["peak RSS MiB"] < Number(/RSS target < (\d+(\.\d+)?)/.exec(r.note)?.[1] ?? 0),
  );
  const lines = [
    "Disk cases: the source is evicted from the page cache before every run (posix_fadvise DONTNEED via",
    "`dd iflag=nocache count=0`), destinations are new files, and every time includes fdatasync/sync of the",
    "destinations. tmpfs cases: the source is read into the page cache first and the destinations are in",
    "/dev/shm, so they measure CPU and memory-copy cost without the disk. Times are whole processes:",
    "kcopyd's include Node's start-up (about 0.1 s). dd and cp write two destinations one after the other.",
    `Median of ${quick ? 1 : ROUNDS} rounds in rotating order; the range shows the spread on this shared machine.`,
    "`kcopyd` runs with the native addon, so file-to-file slices move by copy_file_range(2) (no buffers: peak",
    "0 pages); `kcopyd, pure JS` is the same copy with UDM_NO_NATIVE=1 (read into the page budget, then write).",
    "From the disk to tmpfs the kernel refuses copy_file_range (EXDEV), so kcopyd falls back to buffers there.",
    "",
    "Targets (issue 2):",
  ];
  for (const r of kcopydRows) {
    if (r.tool !== "kcopyd") continue;
    if (typeof r["× dd"] === "number" && r.case.includes("→ 1 file")) {
      lines.push(
        `- one destination ≥ 1.0× dd, ${r.case}: ${r["× dd"].toFixed(2)}× ${r["× dd"] >= 1 ? "met" : "MISSED"}`,
      );
    }
    if (typeof r["× 1 dest"] === "number" && r.case.includes("→ 2 files")) {
      const x = r["× 1 dest"];
      lines.push(`- two destinations < 1.3× one, ${r.case}: ${x.toFixed(2)}× ${x < 1.3 ? "met" : "MISSED"}`);
    }
  }
  lines.push(`- peak RSS < page budget + 64 MiB: ${rssOk ? "met" : "MISSED"} (see the note column)`);
  const sparse = rows.find((r) => r.tool === "kcopyd SKIP_HOLES");
  const dense = rows.find((r) => r.tool === "kcopyd" && r.case.includes("dense"));
  if (sparse && dense) {
    const ratio = sparse["time s"] / dense["time s"];
    lines.push(
      `- SKIP_HOLES copy of the sparse file vs the same amount of data dense: ${ratio.toFixed(2)}× the time`,
    );
  }
  return lines.join("\n");
}

if (process.argv[1] === thisFile && process.argv[2] === "--child") {
  await child(JSON.parse(process.argv[3]));
}
