/**
 * NBD server benchmark: `udm serve --export` (as users run it), udm's NbdServer over a FileDevice
 * (the library path, in a child node process), `nbdkit file` and `qemu-nbd` serving the same file,
 * and `udm serve` with a 2-leg mirror export, driven by the same clients: nbdcopy sequential
 * write/read with 256 KiB (libnbd's default) and 1 MiB requests, and fio's nbd engine 4 KiB random
 * read/write at QD1 and QD16 (the workloads of shared/reference/nbd-baseline.md and issue 16).
 *
 * Each server is warmed up before it is measured. Each row is one workload: every server's figure
 * (MiB/s or IOPS), the ratios of issue 16 (medians of per-round ratios), and each server's CPU
 * seconds (user+system, /proc/PID/stat) per GiB moved.
 */
import { execFile, spawn } from "node:child_process";
import { randomFillSync } from "node:crypto";
import {
  closeSync,
  copyFileSync,
  existsSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
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

const UDM_SERVER_SCRIPT = `
const { FileDevice, tuneMallocForDataPath } = await import(process.env.UDM_KCOPYD);
const { NbdServer } = await import(process.env.UDM_NBD);
tuneMallocForDataPath?.(); // as udm serve does
const device = await FileDevice.open(process.env.UDM_DISK);
const server = new NbdServer();
server.addExport("", device);
await server.listen({ host: "127.0.0.1", port: Number(process.env.UDM_PORT) });
process.on("SIGTERM", async () => { await server.close(); await device.close(); process.exit(0); });
`;

/** `udm serve` as users run it (NBD_BENCH_CLI overrides the build; NBD_BENCH_BEFORE_CLI adds "serve before"). */
const CLI =
  process.env.NBD_BENCH_CLI ?? fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const BEFORE_CLI = process.env.NBD_BENCH_BEFORE_CLI;

/**
 * The servers. `uri` is the export's URI on `port`; `disk` and `mirror` are the files of the run.
 * "udm serve": `udm serve --export disk=FILE` (a linear table over the file, through the device
 * manager, as users run it); "udm lib": NbdServer over a FileDevice (the library path);
 * "udm mirror": `udm serve --table` with a 2-leg mirror (core log, nosync) over two files.
 */
function peerSpec(peer, files, port, workDir) {
  const serve = (cli, args) => ({
    cmd: process.execPath,
    args: [
      cli,
      "serve",
      "--listen",
      `127.0.0.1:${port}`,
      "--data-dir",
      join(workDir, `data-${port}`),
      ...args,
    ],
  });
  switch (peer) {
    case "udm serve":
      return { ...serve(CLI, ["--export", `disk=${files.disk}`]), uri: `nbd://127.0.0.1:${port}/disk` };
    case "serve before":
      return {
        ...serve(BEFORE_CLI, ["--export", `disk=${files.disk}`]),
        uri: `nbd://127.0.0.1:${port}/disk`,
      };
    case "udm mirror":
      return { ...serve(CLI, ["--table", files.mirrorTable]), uri: `nbd://127.0.0.1:${port}/m` };
    case "udm lib":
    case "lib before":
      return {
        cmd: process.execPath,
        args: ["--input-type=module", "-e", UDM_SERVER_SCRIPT],
        env: {
          UDM_NBD: peer === "udm lib" ? DIST : BEFORE_DIST,
          UDM_KCOPYD: KCOPYD_DIST,
          UDM_DISK: files.disk,
          UDM_PORT: String(port),
        },
        uri: `nbd://127.0.0.1:${port}/`,
      };
    case "nbdkit file":
      return {
        cmd: "nbdkit",
        args: ["-f", "-i", "127.0.0.1", "-p", String(port), "file", files.disk],
        uri: `nbd://127.0.0.1:${port}/`,
      };
    case "qemu-nbd":
      return {
        cmd: "qemu-nbd",
        args: ["-f", "raw", "-b", "127.0.0.1", "-p", String(port), "-x", "", "-t", "-e", "16", files.disk],
        uri: `nbd://127.0.0.1:${port}/`,
      };
    default:
      throw new Error(`unknown peer ${peer}`);
  }
}

async function startPeer(peer, files, workDir) {
  const port = await freePort();
  const spec = peerSpec(peer, files, port, workDir);
  const child = spawn(spec.cmd, spec.args, { stdio: "ignore", env: { ...process.env, ...spec.env } });
  await waitForPort(spec.uri, child, peer);
  return { child, uri: spec.uri };
}

async function waitForPort(uri, child, what) {
  for (let i = 0; i < 400; i++) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    const ok = await exec("nbdinfo", ["--size", uri], 5000).then(
      () => true,
      () => false,
    );
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${what} did not start at ${uri}`);
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

/** fio's nbd engine, 4 KiB: IOPS and the bytes moved (no ramp: every server is warmed up first). */
async function fio(uri, rw, iodepth, runtimeS) {
  const out = await exec("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${rw}`,
    "--bs=4k",
    `--iodepth=${iodepth}`,
    `--runtime=${runtimeS}`,
    "--time_based",
    "--output-format=json",
  ]);
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  const side = rw === "randread" ? job.read : job.write;
  return { value: side.iops, bytes: side.io_bytes };
}

/** nbdcopy with `requestSize`-byte requests (libnbd's default 256 KiB, or 1 MiB). */
async function nbdcopy(from, to, bytes, requestSize) {
  const seconds = await timed(() => exec("nbdcopy", [`--request-size=${requestSize}`, from, to]));
  return { value: bytes / MiB / seconds, bytes };
}

/** Before measuring, each server gets the same warm-up: JIT, pools, first-touch page faults. */
async function warmUp(uri, files, warmBytes) {
  await exec("nbdcopy", [files.warm, uri]);
  await exec("nbdcopy", [`--request-size=${MiB}`, files.warm, uri]);
  await exec("nbdcopy", [uri, "null:"]);
  await exec("fio", [
    "--name=warm",
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--rw=randrw",
    "--bs=4k",
    "--iodepth=16",
    `--size=${warmBytes}`,
    "--runtime=1",
    "--time_based",
    "--output-format=json",
  ]);
}

const PEERS = ["udm serve", "udm lib", "nbdkit file", "qemu-nbd", "udm mirror"];
const GiB = 1024 * MiB;

/**
 * @param {{ workDir: string, quick: boolean, log?: (msg: string) => void }} ctx
 * @returns {Promise<Array<Record<string, string | number>>>}
 */
export async function run(ctx) {
  if (!existsSync(DIST)) throw new Error(`${DIST} is missing: run \`tsc -b\` (pnpm bench builds it)`);
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run \`tsc -b\` (pnpm bench builds it)`);
  const copyBytes = (ctx.quick ? 256 : 1024) * MiB;
  const diskBytes = (ctx.quick ? 512 : 2048) * MiB;
  const fioSeconds = ctx.quick ? 3 : 8;
  const files = {
    disk: join(ctx.workDir, "nbd-disk.img"),
    src: join(ctx.workDir, "nbd-src.img"),
    warm: join(ctx.workDir, "nbd-warm.img"),
    legA: join(ctx.workDir, "mirror-a.img"),
    legB: join(ctx.workDir, "mirror-b.img"),
    mirrorTable: join(ctx.workDir, "mirror.table"),
  };
  writeRandomFile(files.disk, diskBytes);
  writeRandomFile(files.src, copyBytes);
  writeRandomFile(files.warm, 64 * MiB);
  copyFileSync(files.disk, files.legA);
  copyFileSync(files.disk, files.legB);
  // Both legs hold the same bytes: nosync (no initial resync competing with the measurement).
  writeFileSync(
    files.mirrorTable,
    `m: 0 ${diskBytes / 512} mirror core 2 1024 nosync 2 ${files.legA} 0 ${files.legB} 0\n`,
  );

  const peers = [...PEERS, ...(BEFORE_CLI ? ["serve before"] : []), ...(BEFORE_DIST ? ["lib before"] : [])];
  const workloads = [
    {
      case: `seq write ${copyBytes / MiB} MiB, 256 KiB requests (nbdcopy)`,
      unit: "MiB/s",
      copy: "write",
      rs: 256 * 1024,
    },
    {
      case: `seq write ${copyBytes / MiB} MiB, 1 MiB requests (nbdcopy)`,
      unit: "MiB/s",
      copy: "write",
      rs: MiB,
    },
    {
      case: `seq read ${diskBytes / MiB} MiB, 256 KiB requests (nbdcopy)`,
      unit: "MiB/s",
      copy: "read",
      rs: 256 * 1024,
    },
    {
      case: `seq read ${diskBytes / MiB} MiB, 1 MiB requests (nbdcopy)`,
      unit: "MiB/s",
      copy: "read",
      rs: MiB,
    },
    { case: "randread 4k QD1 (fio)", unit: "IOPS", rw: "randread", qd: 1 },
    { case: "randread 4k QD16 (fio)", unit: "IOPS", rw: "randread", qd: 16 },
    { case: "randwrite 4k QD1 (fio)", unit: "IOPS", rw: "randwrite", qd: 1 },
    { case: "randwrite 4k QD16 (fio)", unit: "IOPS", rw: "randwrite", qd: 16 },
  ];
  // NBD_BENCH_ROUNDS: more rounds of the quick sizes (medians hold better on a loaded machine).
  const rounds = Number(process.env.NBD_BENCH_ROUNDS) || (ctx.quick ? 1 : 3);
  /** samples[workload][peer] = [{ value, cpuPerGiB }, ...] over the rounds */
  const samples = workloads.map(() => Object.fromEntries(peers.map((p) => [p, []])));
  try {
    for (let round = 0; round < rounds; round++) {
      // Rotate the order each round so no peer always runs first or last.
      const order = peers.map((_, i) => peers[(i + round) % peers.length]);
      for (const peer of order) {
        const { child, uri } = await startPeer(peer, files, ctx.workDir);
        try {
          ctx.log?.(`round ${round + 1}/${rounds} ${peer}: warm-up`);
          await warmUp(uri, files, 64 * MiB);
          for (const [i, w] of workloads.entries()) {
            ctx.log?.(`round ${round + 1}/${rounds} ${peer}: ${w.case}`);
            const cpu0 = cpuSeconds(child.pid);
            const r =
              w.copy === "write"
                ? await nbdcopy(files.src, uri, copyBytes, w.rs)
                : w.copy === "read"
                  ? await nbdcopy(uri, "null:", diskBytes, w.rs)
                  : await fio(uri, w.rw, w.qd, fioSeconds);
            const cpu = cpuSeconds(child.pid) - cpu0;
            samples[i][peer].push({ value: r.value, cpuPerGiB: cpu / (r.bytes / GiB) });
          }
        } finally {
          await stopPeer(child);
        }
      }
    }
  } finally {
    for (const f of Object.values(files)) rmSync(f, { force: true });
  }
  const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  };
  const fmt = (v, unit) => (unit === "IOPS" ? Math.round(v) : Math.round(v * 10) / 10);
  const round2 = (x) => (Number.isFinite(x) ? Math.round(x * 100) / 100 : "n/a");
  /** Median over the rounds of the per-round ratio a/b (both ran in the same round). */
  const ratio = (s, a, b, key = "value") => round2(median(s[a].map((x, k) => x[key] / s[b][k][key])));
  return workloads.map((w, i) => {
    const s = samples[i];
    const row = { case: w.case, unit: w.unit };
    for (const p of peers) row[p] = fmt(median(s[p].map((x) => x.value)), w.unit);
    row["serve/nbdkit"] = ratio(s, "udm serve", "nbdkit file");
    row["lib/nbdkit"] = ratio(s, "udm lib", "nbdkit file");
    row["serve/lib"] = ratio(s, "udm serve", "udm lib");
    row["serve/qemu-nbd"] = ratio(s, "udm serve", "qemu-nbd");
    row["mirror/nbdkit"] = ratio(s, "udm mirror", "nbdkit file");
    if (BEFORE_CLI) row["serve/before"] = ratio(s, "udm serve", "serve before");
    if (BEFORE_DIST) row["lib/before"] = ratio(s, "udm lib", "lib before");
    for (const p of peers) row[`${p} cpu s/GiB`] = round2(median(s[p].map((x) => x.cpuPerGiB)));
    row["cpu serve/nbdkit"] = ratio(s, "udm serve", "nbdkit file", "cpuPerGiB");
    row["cpu mirror/nbdkit"] = ratio(s, "udm mirror", "nbdkit file", "cpuPerGiB");
    if (rounds > 1)
      row.runs = peers.map((p) => `${p}: ${s[p].map((x) => fmt(x.value, w.unit)).join("/")}`).join("; ");
    return row;
  });
}

/** Markdown under the table: how the figures were made. */
/** Issue 16's goals against one run's rows: one line per goal, met or the ratio it reached. */
export function goals(rows) {
  const lines = [];
  const check = (what, value, ok) => lines.push(`- ${what}: ${value} ${ok ? "(met)" : "(NOT met)"}`);
  const ratioGoals = [
    ["seq write, 256 KiB", "serve/nbdkit", 1.0],
    ["seq write, 1 MiB", "serve/nbdkit", 1.0],
    ["seq read, 256 KiB", "serve/nbdkit", 1.0],
    ["seq read, 1 MiB", "serve/nbdkit", 1.0],
    ["randwrite 4k QD1", "serve/nbdkit", 0.9],
    ["randread 4k QD1", "serve/nbdkit", 0.95],
    ["randread 4k QD16", "serve/nbdkit", 1.0],
    ["randwrite 4k QD16", "serve/nbdkit", 1.0],
  ];
  for (const [name, col, goal] of ratioGoals) {
    const [kind, size] = name.split(", ");
    const row = rows.find((r) => r.case.startsWith(kind) && (!size || r.case.includes(`${size} requests`)));
    if (row) check(`${name} udm serve / nbdkit ≥ ${goal}`, row[col], row[col] >= goal);
  }
  for (const r of rows.filter((x) => x.case.startsWith("seq"))) {
    check(
      `${r.case}: CPU-s/GiB udm serve / nbdkit ≤ 1.3`,
      r["cpu serve/nbdkit"],
      r["cpu serve/nbdkit"] <= 1.3,
    );
  }
  for (const r of rows) check(`${r.case}: udm serve / lib ≥ 0.9`, r["serve/lib"], r["serve/lib"] >= 0.9);
  for (const r of rows.filter((x) => x.case.startsWith("seq write"))) {
    check(`${r.case}: mirror (2 legs) / nbdkit ≥ 0.5`, r["mirror/nbdkit"], r["mirror/nbdkit"] >= 0.5);
  }
  return lines.join("\n");
}

export function notes(rows, { quick }) {
  const rounds = Number(process.env.NBD_BENCH_ROUNDS) || (quick ? 1 : 3);
  return [
    "Goals of issue 16 in this run:",
    "",
    goals(rows),
    "",
    `Medians of ${rounds} round(s) (server order rotated each round); ratios are medians of per-round ratios.`,
    'One random-filled file (page cache warm) served in turn by `udm serve --export disk=FILE` ("udm serve"),',
    'NbdServer over FileDevice in a child node process, malloc tuned as udm serve does ("udm lib"), `nbdkit -f file`,',
    "`qemu-nbd -f raw -t -e 16`,",
    'and `udm serve --table` with `mirror core 2 1024 nosync 2 A 0 B 0` over two copies of it ("udm mirror",',
    "two writes per byte, compared with nbdkit serving one file). Each server is warmed up first (64 MiB",
    "written at 256 KiB and 1 MiB, the file read once, 1 s of fio randrw QD16). Clients: nbdcopy",
    "(seq write from a random source file, seq read to null:, `--request-size` 256 KiB or 1 MiB) and fio's",
    "nbd engine (4 KiB, time-based, no ramp). `cpu s/GiB` is the server process's user+system CPU",
    "(/proc/PID/stat) during the workload divided by the GiB it moved.",
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
