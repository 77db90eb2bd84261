#!/usr/bin/env node
// udm's one benchmark runner: `pnpm bench [--quick] [SUITE...]` (root script: `tsc -b && node bench/run.mjs`).
//
// Every `bench/suites/<name>.mjs` is a suite:
//
//   export const name = "copy";
//   /** @param {{ workDir: string, quick: boolean, log: (msg: string) => void }} ctx */
//   export async function run(ctx) { return [{ case: "1 dest", "MiB/s": 812.4 }]; }
//
// `ctx.workDir` is a fresh temporary directory (under $UDM_BENCH_DIR or the OS temp dir) that the
// runner removes afterwards; `ctx.quick` is set by --quick (small sizes, one round); `ctx.log`
// prints a progress line on stderr. `run` returns one row per case, keys are the columns.
// A suite may also export `notes(rows, { quick })` returning markdown put under its table.
// The runner prints each suite as a table and writes bench/results/<suite>.md and .json with the
// date, the command and the host (CPU count and model, memory, Node version, kernel).
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { basename, dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const benchDir = dirname(fileURLToPath(import.meta.url));
const suitesDir = join(benchDir, "suites");
const resultsDir = join(benchDir, "results");

const USAGE = "usage: pnpm bench [--quick] [SUITE...]   (suites: bench/suites/*.mjs)";

function parseArgs(argv) {
  const options = { quick: false, names: [] };
  for (const arg of argv) {
    if (arg === "--quick") options.quick = true;
    else if (arg === "--help" || arg === "-h") {
      console.log(USAGE);
      process.exit(0);
    } else if (arg.startsWith("-")) throw new Error(`unknown option ${arg}\n${USAGE}`);
    else options.names.push(arg);
  }
  return options;
}

/** Formats one cell: integers as they are, other numbers with 2 decimals (3 digits when below 0.1). */
function cell(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) < 0.1 ? value.toPrecision(3) : value.toFixed(2);
  }
  return String(value);
}

/** Column names in order of first appearance across rows. */
function columnsOf(rows) {
  const columns = [];
  for (const row of rows) for (const key of Object.keys(row)) if (!columns.includes(key)) columns.push(key);
  return columns;
}

/** A plain-text table for the terminal: numbers right-aligned. */
export function textTable(rows) {
  const columns = columnsOf(rows);
  const widths = columns.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (values, numeric) =>
    values
      .map((v, i) => (numeric[i] ? v.padStart(widths[i]) : v.padEnd(widths[i])))
      .join("  ")
      .trimEnd();
  const numeric = columns.map((c) => rows.some((r) => typeof r[c] === "number"));
  return [
    line(columns, numeric),
    line(
      widths.map((w) => "-".repeat(w)),
      numeric,
    ),
    ...rows.map((r) =>
      line(
        columns.map((c) => cell(r[c])),
        numeric,
      ),
    ),
  ].join("\n");
}

/** A GitHub-flavoured markdown table. */
export function markdownTable(rows) {
  const columns = columnsOf(rows);
  const numeric = columns.map((c) => rows.some((r) => typeof r[c] === "number"));
  const escapePipes = (s) => s.replaceAll("|", "\\|");
  return [
    `| ${columns.map(escapePipes).join(" | ")} |`,
    `| ${numeric.map((n) => (n ? "---:" : "---")).join(" | ")} |`,
    ...rows.map((r) => `| ${columns.map((c) => escapePipes(cell(r[c]))).join(" | ")} |`),
  ].join("\n");
}

function hostInfo() {
  const cpus = os.cpus();
  return {
    hostname: os.hostname(),
    cpuCount: cpus.length,
    cpuModel: cpus[0]?.model ?? "unknown",
    totalMemoryBytes: os.totalmem(),
    node: process.version,
    platform: `${os.type()} ${os.release()} ${os.arch()}`,
    loadAverage: os.loadavg().map((x) => Number(x.toFixed(2))),
  };
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const available = (await readdir(suitesDir))
    .filter((f) => f.endsWith(".mjs"))
    .map((f) => basename(f, ".mjs"))
    .sort();
  for (const name of options.names) {
    if (!available.includes(name)) {
      throw new Error(`no bench suite "${name}" (have: ${available.join(", ") || "none"})`);
    }
  }
  const selected = options.names.length ? options.names : available;
  const command = `pnpm bench${options.quick ? " --quick" : ""}${options.names.length ? ` ${options.names.join(" ")}` : ""}`;
  await mkdir(resultsDir, { recursive: true });
  let failed = 0;
  for (const file of selected) {
    const suite = await import(pathToFileURL(join(suitesDir, `${file}.mjs`)).href);
    const name = suite.name ?? file;
    if (typeof suite.run !== "function") {
      console.error(`bench: ${file}.mjs exports no run(ctx)`);
      failed++;
      continue;
    }
    const workDir = await mkdtemp(join(process.env.UDM_BENCH_DIR ?? os.tmpdir(), `udm-bench-${name}-`));
    const started = new Date();
    console.error(`bench: ${name}${options.quick ? " (quick)" : ""} in ${workDir}`);
    try {
      const rows = await suite.run({
        workDir,
        quick: options.quick,
        log: (msg) => console.error(`bench: ${name}: ${msg}`),
      });
      if (!Array.isArray(rows))
        throw new Error(`suite ${name} returned ${typeof rows}, not an array of rows`);
      const seconds = (Date.now() - started.getTime()) / 1000;
      const host = hostInfo();
      console.log(`\n## ${name}\n\n${textTable(rows)}\n`);
      const heading = [
        `# bench: ${name}`,
        "",
        `\`${command}\` on ${started.toISOString()} (${seconds.toFixed(0)} s)`,
        "",
        `Host: ${host.cpuCount} × ${host.cpuModel}, ${(host.totalMemoryBytes / 2 ** 30).toFixed(1)} GiB RAM, ` +
          `Node ${host.node}, ${host.platform}, load average at the end ${host.loadAverage.join(" ")}`,
        "",
      ];
      const notes =
        typeof suite.notes === "function" ? suite.notes(rows, { quick: options.quick }) : suite.notes;
      await writeFile(
        join(resultsDir, `${name}.md`),
        `${[...heading, markdownTable(rows), "", ...(notes ? [notes, ""] : [])].join("\n")}`,
      );
      await writeFile(
        join(resultsDir, `${name}.json`),
        `${JSON.stringify({ suite: name, date: started.toISOString(), durationSeconds: seconds, command, quick: options.quick, host, rows }, null, 2)}\n`,
      );
      console.error(`bench: wrote bench/results/${name}.md and ${name}.json`);
    } catch (err) {
      failed++;
      console.error(`bench: suite ${name} failed: ${err?.stack ?? err}`);
    } finally {
      await rm(workDir, { recursive: true, force: true });
    }
  }
  if (failed) process.exitCode = 1;
}

await main().catch((err) => {
  console.error(`bench: ${err.message}`);
  process.exitCode = 2;
});
