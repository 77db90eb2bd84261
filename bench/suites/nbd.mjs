/**
 * NBD server benchmark: udm's NbdServer (built package, in a child node process) side by side
 * with `nbdkit file` and `qemu-nbd` serving the same file, driven by the same clients:
 * nbdcopy sequential write/read and fio's nbd engine 4 KiB random read/write at QD1 and QD16
 * (the workloads of shared/reference/nbd-baseline.md).
 *
 * Each row is one workload; columns are the peers' figures (MiB/s or IOPS), udm's ratio to
 * qemu-nbd and nbdkit, and the CPU seconds each server process used for that workload.
 */
import { execFile, spawn } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { closeSync, existsSync, openSync, readFileSync, rmSync, writeSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const name = "nbd";

const MiB = 1024 * 1024;
/** NBD_BENCH_DIST overrides the server build. */
const DIST =
  process.env.NBD_BENCH_DIST ??
  fileURLToPath(new URL("../../packages/nbd-server/dist/index.js", import.meta.url));
/**
 * NBD_BENCH_BEFORE_DIST: another build of the server (a saved copy of dist/ from an older commit,
 * kept where it still resolves @udm/kcopyd, e.g. packages/nbd-server/node_modules/.before/) run
 * as an extra peer "udm before", so a change is measured before/after in the same run.
 */
const BEFORE_DIST = process.env.NBD_BENCH_BEFORE_DIST;
const KCOPYD_DIST = fileURLToPath(new URL("../../packages/kcopyd/dist/index.js", import.meta.url));
const CLK_TCK = 100;

function exec(cmd, args, timeoutMs = 600_000) {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 64 * MiB }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(" ")}: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** utime+stime of a process in seconds (Linux /proc). */
function cpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return Number.NaN;
  }
}

function writeRandomFile(path, bytes) {
  const fd = openSync(path, "w");
  const chunk = Buffer.allocUnsafe(8 * MiB);
  try {
    for (let done = 0; done < bytes; done += chunk.length) {
      randomFillSync(chunk);
      writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - done));
    }
  } finally {
    closeSync(fd);
  }
}

async function waitForPort(port, child, what) {
  for (let i = 0; i < 400; i++) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    const ok = await new Promise((resolve) => {
      exec("nbdinfo", ["--size", `nbd://127.0.0.1:${port}/`], 5000).then(
        () => resolve(true),
        () => resolve(false),
      );
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${what} did not start on port ${port}`);
}

const UDM_SERVER_SCRIPT = `
const { FileDevice } = await import(process.env.UDM_KCOPYD);
const { NbdServer } = await import(process.env.UDM_NBD);
const device = await FileDevice.open(process.env.UDM_DISK);
const server = new NbdServer();
server.addExport("", device);
await server.listen({ host: "127.0.0.1", port: Number(process.env.UDM_PORT) });
process.on("SIGTERM", async () => { await server.close(); await device.close(); process.exit(0); });
`;

async function startPeer(peer, disk, port) {
  let child;
  if (peer === "udm" || peer === "udm before") {
    const dist = peer === "udm" ? DIST : BEFORE_DIST;
    child = spawn(process.execPath, ["--input-type=module", "-e", UDM_SERVER_SCRIPT], {
      stdio: "ignore",
      env: { ...process.env, UDM_NBD: dist, UDM_KCOPYD: KCOPYD_DIST, UDM_DISK: disk, UDM_PORT: String(port) },
    });
  } else if (peer === "nbdkit file") {
    child = spawn("nbdkit", ["-f", "-i", "127.0.0.1", "-p", String(port), "file", disk], { stdio: "ignore" });
  } else {
    child = spawn(
      "qemu-nbd",
      ["-f", "raw", "-b", "127.0.0.1", "-p", String(port), "-x", "", "-t", "-e", "16", disk],
      {
        stdio: "ignore",
      },
    );
  }
  await waitForPort(port, child, peer);
  return child;
}

async function stopPeer(child) {
  if (child.exitCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  process.kill(child.pid, "SIGTERM");
  const timer = setTimeout(() => child.exitCode === null && process.kill(child.pid, "SIGKILL"), 5000);
  await exited;
  clearTimeout(timer);
}

async function timed(fn) {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function fioIops(uri, rw, iodepth, runtimeS) {
  const out = await exec("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${rw}`,
    "--bs=4k",
    `--iodepth=${iodepth}`,
    "--ramp_time=1",
    `--runtime=${runtimeS}`,
    "--time_based",
    "--output-format=json",
  ]);
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  return rw === "randread" ? job.read.iops : job.write.iops;
}

/**
 * @param {{ workDir: string, quick: boolean }} ctx
 * @returns {Promise<Array<Record<string, string | number>>>}
 */
export async function run(ctx) {
  if (!existsSync(DIST)) throw new Error(`${DIST} is missing: run \`tsc -b\` (pnpm bench builds it)`);
  const copyBytes = (ctx.quick ? 256 : 1024) * MiB;
  const diskBytes = (ctx.quick ? 512 : 2048) * MiB;
  const fioSeconds = ctx.quick ? 3 : 8;
  const disk = join(ctx.workDir, "nbd-disk.img");
  const src = join(ctx.workDir, "nbd-src.img");
  writeRandomFile(disk, diskBytes);
  writeRandomFile(src, copyBytes);

  const peers = ["udm", ...(BEFORE_DIST ? ["udm before"] : []), "nbdkit file", "qemu-nbd"];
  const workloads = [
    { case: `seq write ${copyBytes / MiB} MiB (nbdcopy)`, unit: "MiB/s" },
    { case: `seq read ${diskBytes / MiB} MiB (nbdcopy)`, unit: "MiB/s" },
    { case: "randread 4k QD1 (fio)", unit: "IOPS", rw: "randread", qd: 1 },
    { case: "randread 4k QD16 (fio)", unit: "IOPS", rw: "randread", qd: 16 },
    { case: "randwrite 4k QD1 (fio)", unit: "IOPS", rw: "randwrite", qd: 1 },
    { case: "randwrite 4k QD16 (fio)", unit: "IOPS", rw: "randwrite", qd: 16 },
  ];
  const rounds = ctx.quick ? 1 : 3;
  /** samples[workload][peer] = [{ value, cpu }, ...] over the rounds */
  const samples = workloads.map(() => Object.fromEntries(peers.map((p) => [p, []])));
  try {
    for (let round = 0; round < rounds; round++) {
      // Rotate the order each round so no peer always runs first (cold) or last.
      const order = peers.map((_, i) => peers[(i + round) % peers.length]);
      for (const peer of order) {
        const port = await freePort();
        const child = await startPeer(peer, disk, port);
        const uri = `nbd://127.0.0.1:${port}/`;
        try {
          for (const [i, w] of workloads.entries()) {
            ctx.log?.(`nbd: round ${round + 1}/${rounds} ${peer}: ${w.case}`);
            const cpu0 = cpuSeconds(child.pid);
            let value;
            if (i === 0) value = copyBytes / MiB / (await timed(() => exec("nbdcopy", [src, uri])));
            else if (i === 1) value = diskBytes / MiB / (await timed(() => exec("nbdcopy", [uri, "null:"])));
            else value = await fioIops(uri, w.rw, w.qd, fioSeconds);
            samples[i][peer].push({ value, cpu: cpuSeconds(child.pid) - cpu0 });
          }
        } finally {
          await stopPeer(child);
        }
      }
    }
  } finally {
    rmSync(disk, { force: true });
    rmSync(src, { force: true });
  }
  const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  };
  const results = samples.map((byPeer) =>
    Object.fromEntries(
      Object.entries(byPeer).map(([p, xs]) => [
        p,
        {
          value: median(xs.map((x) => x.value)),
          cpu: median(xs.map((x) => x.cpu)),
          runs: xs.map((x) => x.value),
        },
      ]),
    ),
  );
  const fmt = (v, unit) => (unit === "IOPS" ? Math.round(v) : Math.round(v * 10) / 10);
  const ratio = (a, b) => (b > 0 ? Math.round((a / b) * 100) / 100 : "n/a");
  return workloads.map((w, i) => {
    const r = results[i];
    const row = { case: w.case, unit: w.unit };
    for (const p of peers) row[p] = fmt(r[p].value, w.unit);
    row["udm/qemu-nbd"] = ratio(r.udm.value, r["qemu-nbd"].value);
    row["udm/nbdkit"] = ratio(r.udm.value, r["nbdkit file"].value);
    if (BEFORE_DIST) {
      row["before/qemu-nbd"] = ratio(r["udm before"].value, r["qemu-nbd"].value);
      row["before/nbdkit"] = ratio(r["udm before"].value, r["nbdkit file"].value);
    }
    for (const p of peers) row[`${p} cpu s`] = Math.round(r[p].cpu * 100) / 100;
    row.runs = peers.map((p) => `${p}: ${r[p].runs.map((v) => fmt(v, w.unit)).join("/")}`).join("; ");
    return row;
  });
}

/** Markdown under the table: how the figures were made. */
export function notes(_rows, { quick }) {
  return [
    `Medians of ${quick ? 1 : 3} rounds (peer order rotated each round); "runs" lists every round.`,
    "One random-filled file (page cache warm) served in turn by udm (NbdServer over FileDevice, in a child",
    "node process), `nbdkit -f file` and `qemu-nbd -f raw -t -e 16`; clients are nbdcopy 1.14 (seq write",
    "from a random source file, seq read to null:) and fio's nbd engine (4 KiB, --ramp_time=1, time-based).",
    "`cpu s` is the server process's user+system CPU during that workload (/proc/PID/stat).",
    "Clients and servers share the machine's CPUs: compare columns within one run, not across runs.",
  ].join("\n");
}

// Standalone: node bench/suites/nbd.mjs [--quick] [workDir]
if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const quick = process.argv.includes("--quick");
  const workDir =
    process.argv.slice(2).find((a) => !a.startsWith("--")) ?? (await import("node:os")).tmpdir();
  const rows = await run({ workDir, quick, log: (m) => console.error(m) });
  console.table(rows);
}
