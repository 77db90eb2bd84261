/**
 * CI-sized crash torture (issue #8 item 1): `udm serve` with a disk-log mirror and an origin
 * with two persistent snapshots, SIGKILLed under random I/O and restarted, UDM_TORTURE_ITERATIONS
 * times (default 5) with a fixed seed (UDM_TORTURE_SEED). Longer runs: `pnpm torture`.
 */
import { describe, expect, it } from "vitest";
import { buildCli } from "./cli-helpers.js";
import { formatSummary, runCrashTorture } from "./torture/crash-torture.js";

const ITERATIONS = Number(process.env.UDM_TORTURE_ITERATIONS ?? 5);
const SEED = Number(process.env.UDM_TORTURE_SEED ?? 20261124);

describe("crash torture of udm serve", () => {
  it(`loses no acknowledged data over ${ITERATIONS} kill -9 restarts (seed ${SEED})`, async () => {
    buildCli();
    const summary = await runCrashTorture({ iterations: ITERATIONS, seed: SEED, maxRunMs: 1500 });
    console.log(formatSummary(summary));
    expect(summary.failures).toEqual([]);
    expect(summary.kills).toBe(ITERATIONS);
    expect(summary.mirrorLegChecks).toBeGreaterThan(0);
    expect(summary.bytesVerified).toBeGreaterThan(0);
  }, 600_000);
});
