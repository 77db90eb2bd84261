/**
 * The `udm` CLI as the kernel tests drive it: `udm serve --table` as a child process (run from the
 * TypeScript sources with test/torture's loader, so no build is needed), and one-shot commands
 * against its control socket.
 */
import { spawn } from "node:child_process";
import * as path from "node:path";
import { REPO_ROOT, type RunningChild, startChild } from "../torture/child.js";

const CLI_MAIN = path.join(REPO_ROOT, "packages/cli/src/main.ts");
const REGISTER = path.join(REPO_ROOT, "test/torture/register-ts.mjs");

export interface UdmServe {
  child: RunningChild;
  port: number;
  control: string;
  /** Runs `udm --control <socket> ARGS...` in the table's directory. */
  udm(args: string[]): Promise<{ status: number | null; out: string }>;
  stop(): Promise<void>;
}

/** Runs `udm ARGS...` (from source) in `cwd`; resolves with its exit status and output. */
export function runUdm(args: string[], cwd: string): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ["--import", REGISTER, CLI_MAIN, ...args], {
      cwd,
      env: { ...process.env, UDM_LOG_LEVEL: "warn" },
    });
    let out = "";
    p.stdout.on("data", (c: Buffer) => {
      out += c;
    });
    p.stderr.on("data", (c: Buffer) => {
      out += c;
    });
    p.on("error", reject);
    p.on("close", (status) => resolve({ status, out }));
  });
}

/**
 * Starts `udm serve --table <dir>/udm.table --listen 127.0.0.1:0` with its control socket in `dir`.
 *
 * @example
 * ```ts
 * const serve = await startUdmServe(dir, "origin: 0 131072 snapshot-origin origin.img\n");
 * await serve.udm(["snapshot", "create", "origin", "snap0", "--cow", "cow.img", "--size", "32M"]);
 * await serve.stop();
 * ```
 */
export async function startUdmServe(dir: string, tableText: string): Promise<UdmServe> {
  const { writeFileSync } = await import("node:fs");
  const table = path.join(dir, "udm.table");
  writeFileSync(table, tableText);
  const control = path.join(dir, "udm.sock");
  const child = await startChild(
    CLI_MAIN,
    ["--control", control, "serve", "--table", table, "--listen", "127.0.0.1:0", "--data-dir", dir],
    { readyPattern: /listening on nbd:\/\/(\S+?) /, cwd: dir, env: { UDM_LOG_LEVEL: "warn" } },
  );
  const port = Number(child.address.slice(child.address.lastIndexOf(":") + 1));
  return {
    child,
    port,
    control,
    udm: (args) => runUdm(["--control", control, ...args], dir),
    stop: () => child.stop(10_000),
  };
}
