import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, rmdirSync, rmSync, statSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** Repository root. */
export const ROOT = fileURLToPath(new URL("..", import.meta.url));
/** The built `udm` executable, run as the user runs it. */
export const UDM = fileURLToPath(new URL("../packages/cli/bin/udm.js", import.meta.url));

/**
 * Builds the CLI (tsc -b) once per test run; test files may run in parallel, so a directory lock
 * keeps two builds from writing the same outputs at once.
 */
export function buildCli(): void {
  const lock = `${ROOT}/node_modules/.udm-cli-build.lock`;
  for (let i = 0; ; i++) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      // A lock older than 5 minutes belongs to a crashed run.
      try {
        if (Date.now() - statSync(lock).mtimeMs > 300_000) rmdirSync(lock);
      } catch {}
      if (i > 600) throw new Error(`timed out waiting for ${lock}`);
      execFileSync("sleep", ["0.5"]);
    }
  }
  try {
    // `tsc -p ... --noEmit` updates the build info without emitting, after which `tsc -b` believes
    // a stale dist is up to date: forget the build info when a source is newer than its output.
    const src = `${ROOT}/packages/cli/src`;
    const stale = readdirSync(src).some((f) => {
      if (!f.endsWith(".ts") || f.endsWith(".test.ts")) return false;
      const out = `${ROOT}/packages/cli/dist/${f.replace(/\.ts$/, ".js")}`;
      return !existsSync(out) || statSync(out).mtimeMs < statSync(`${src}/${f}`).mtimeMs;
    });
    if (stale) rmSync(`${ROOT}/packages/cli/tsconfig.tsbuildinfo`, { force: true });
    execFileSync("npx", ["tsc", "-b", "packages/cli"], { cwd: ROOT, stdio: "pipe" });
  } catch (err) {
    const e = err as { stdout?: Buffer; stderr?: Buffer };
    throw new Error(`tsc -b packages/cli failed:\n${e.stdout?.toString()}${e.stderr?.toString()}`);
  } finally {
    rmdirSync(lock);
  }
}

export interface UdmResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `udm ARGS...` to completion. */
export function udm(args: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): UdmResult {
  const r = spawnSync(process.execPath, [UDM, ...args], {
    cwd: options.cwd ?? ROOT,
    env: { ...process.env, UDM_LOG_LEVEL: "warn", ...options.env },
    encoding: "utf8",
    timeout: 60_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Runs `udm ARGS...` without blocking the event loop (needed while the test itself does NBD I/O). */
export function udmAsync(
  args: string[],
  options: { cwd?: string; env?: NodeJS.ProcessEnv } = {},
): Promise<UdmResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [UDM, ...args], {
      cwd: options.cwd ?? ROOT,
      env: { ...process.env, UDM_LOG_LEVEL: "warn", ...options.env },
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
    child.on("close", (status) => resolve({ status, stdout, stderr }));
  });
}

/** A running `udm serve`: its process, the NBD address and everything it printed. */
export interface ServeProcess {
  child: ChildProcess;
  port: number;
  stdout: () => string;
  stderr: () => string;
  /** Sends SIGTERM and resolves with the exit code. */
  stop(): Promise<number | null>;
}

/** Starts `udm serve ARGS...` and waits for its "listening on nbd[s]://HOST:PORT" line. */
export function startServe(
  args: string[],
  options: { cwd: string; env?: NodeJS.ProcessEnv },
): Promise<ServeProcess> {
  const child = spawn(process.execPath, [UDM, "serve", ...args], {
    cwd: options.cwd,
    env: { ...process.env, UDM_LOG_LEVEL: "info", ...options.env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`udm serve did not start:\n${stdout}\n${stderr}`));
    }, 30_000);
    child.stderr!.on("data", (d) => {
      stderr += d;
    });
    child.stdout!.on("data", (d) => {
      stdout += d;
      const m = /listening on nbds?:\/\/[^:]+:(\d+)/.exec(stdout);
      if (m && stdout.includes("\n")) {
        clearTimeout(timer);
        resolve({
          child,
          port: Number(m[1]),
          stdout: () => stdout,
          stderr: () => stderr,
          stop: () => {
            if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
            return exited;
          },
        });
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`udm serve exited with ${code}:\n${stdout}\n${stderr}`));
    });
  });
}

export { requireTool } from "./tools.js";
