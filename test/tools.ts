/**
 * External tools the end-to-end tests drive (nbdinfo, nbdcopy, qemu-io, nbdkit, openssl...).
 * Locally a missing tool skips its tests; under CI=true it fails them (scripts/setup.sh installs
 * every tool, so a missing one there is a broken setup, never a silent skip).
 *
 * @example
 * ```ts
 * withTools("nbdinfo", "nbdcopy")("copies both ways", async () => { ... });
 * const hasNbdkit = requireTool("nbdkit");
 * ```
 */
import { spawnSync } from "node:child_process";
import { it } from "vitest";

export const CI = process.env.CI === "true";

/** Whether `tool` is on PATH. */
export function hasTool(tool: string): boolean {
  return spawnSync("sh", ["-c", `command -v ${tool}`]).status === 0;
}

/** Whether `tool` is on PATH; throws under CI when it is not. */
export function requireTool(tool: string): boolean {
  const found = hasTool(tool);
  if (!found && CI) throw new Error(`${tool} is required under CI=true (scripts/setup.sh installs it)`);
  return found;
}

/** `it` when every tool is installed (or under CI, where a missing tool must fail), else `it.skip`. */
export const withTools = (...tools: string[]) => (CI || tools.every(hasTool) ? it : it.skip);
