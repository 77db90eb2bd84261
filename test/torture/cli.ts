/**
 * `pnpm torture [--iterations N] [--seed S] [--report [FILE]] [--keep] [--from-source]`: the crash torture of
 * `udm serve` (see crash-torture.ts), unbounded by the test suite's time budget.
 * Run as `node --import ./test/torture/register-ts.mjs test/torture/cli.ts ...`.
 * `--report` also runs the fuzz and load tests and writes a markdown report (default
 * torture-report.md): load held, faults survived, bad inputs tried, data lost.
 */
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { buildCli } from "../cli-helpers.js";
import { REPO_ROOT } from "./child.js";
import { formatSummary, runCrashTorture } from "./crash-torture.js";

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  if (i < 0) return undefined;
  const v = process.argv[i + 1];
  return v === undefined || v.startsWith("--") ? "" : v;
}

function positive(name: string, fallback: number): number {
  const v = arg(name);
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) {
    console.error(`torture: ${name} expects a non-negative integer, got "${v}"`);
    process.exit(2);
  }
  return n;
}

const iterations = positive("--iterations", 20);
const seed = positive("--seed", Math.floor(Math.random() * 2 ** 31));
const reportFile = arg("--report");
const started = Date.now();
const fromSource = process.argv.includes("--from-source");
if (!fromSource) buildCli();
const summary = await runCrashTorture({
  iterations,
  seed,
  keep: process.argv.includes("--keep"),
  fromSource,
  log: (line) => console.log(line),
});
const line = formatSummary(summary);
console.log(line);
for (const f of summary.failures) console.log(`  ${f}`);
if (summary.failures.length) console.log(`data directory kept for inspection: ${summary.dataDir}`);

/** Runs one vitest file and returns the summary line it prints (`fuzz-nbd: ...`). */
function vitestLine(file: string, prefix: string, env: NodeJS.ProcessEnv): Promise<string> {
  return new Promise((resolve) => {
    const p = spawn("npx", ["vitest", "run", file], { cwd: REPO_ROOT, env: { ...process.env, ...env } });
    let out = "";
    p.stdout.on("data", (c) => {
      out += c;
    });
    p.stderr.on("data", (c) => {
      out += c;
    });
    p.on("close", (status) => {
      // biome-ignore lint/suspicious/noControlCharactersInRegex: strip ANSI colours
      const clean = out.replace(/\u001b\[[0-9;]*m/g, "");
      const m = new RegExp(`${prefix}[^\\n]*`).exec(clean);
      const why =
        status === 0
          ? ""
          : ` — ${(/(AssertionError|Error): [^\n]*/.exec(clean) ?? ["see vitest output"])[0]}`;
      resolve(`${m ? m[0] : `${prefix} no summary line`} (vitest exit ${status}${why})`);
    });
  });
}

if (reportFile !== undefined) {
  const fuzz = await vitestLine("test/fuzz-nbd.test.ts", "fuzz-nbd:", {});
  const load = await vitestLine("test/load-nbd.test.ts", "load-nbd:", {});
  const faults = await vitestLine("test/torture/faults.test.ts", "tests:", {});
  const md = `# udm torture report

Generated ${new Date().toISOString()} in ${((Date.now() - started) / 1000).toFixed(0)} s.

| | |
|---|---|
| Crash torture | ${summary.iterations} iterations, ${summary.kills} kill -9, ${summary.requestsInFlightAtKill} requests in flight at the kills |
| Requests acknowledged | ${summary.requestsAcked} |
| Bytes verified after restarts | ${summary.bytesVerified} |
| Mirror legs compared after resync | ${summary.mirrorLegChecks} |
| COWs inspected | ${summary.cowInspections} |
| **Data lost** | **${summary.failures.length === 0 ? 0 : `${summary.failures.length} failures`}** |
| Seed | ${summary.seed} |

## Bad inputs tried (protocol fuzzing)

${fuzz}

## Device faults survived (test/torture/faults.test.ts: mirror leg, mirror log, COW failing and filling, origin read during copy-out)

${faults}

## Load held

${load}

## Failures

${summary.failures.length ? summary.failures.map((f) => `- ${f}`).join("\n") : "none"}

Replay: \`pnpm torture --iterations ${summary.iterations} --seed ${summary.seed}\`
`;
  const file = reportFile || "torture-report.md";
  writeFileSync(file, md);
  console.log(`report written to ${file}`);
}
process.exit(summary.failures.length ? 1 : 0);
