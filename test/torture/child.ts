/**
 * Starts a test server (`nbd-child.ts`, or any TypeScript entry point) as a child process,
 * so a crash is an observable exit and memory is measured from /proc.
 *
 * @example
 * ```ts
 * const child = await startChild("test/torture/nbd-child.ts", [JSON.stringify(config)]);
 * console.log(child.address, child.rssBytes());
 * await child.stop();
 * ```
 */
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const REPO_ROOT = fileURLToPath(new URL("../../", import.meta.url));
const REGISTER = fileURLToPath(new URL("./register-ts.mjs", import.meta.url));
/** Loading and transpiling the sources on a busy 2-core machine takes a few seconds. */
const START_TIMEOUT_MS = 60_000;

export interface RunningChild {
  readonly process: ChildProcess;
  readonly pid: number;
  /** "HOST:PORT" the child printed after `LISTENING`. */
  readonly address: string;
  /** Exit code or signal once the child ended; null while it runs. */
  exited(): { code: number | null; signal: NodeJS.Signals | null } | null;
  /** Everything the child wrote to stderr (the last 64 KiB). */
  stderr(): string;
  /** Resident set size now (VmRSS), in bytes; 0 once the process has exited. */
  rssBytes(): number;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the child is gone. */
  stop(graceMs?: number): Promise<void>;
  /** SIGKILL now; resolves when the child is gone. */
  kill(): Promise<void>;
}

/** Spawns `node --import register-ts.mjs <entry> ...args` and waits for `LISTENING <address>`. */
export async function startChild(
  entry: string,
  args: string[],
  options: { readyPattern?: RegExp; env?: NodeJS.ProcessEnv; cwd?: string; loader?: boolean } = {},
): Promise<RunningChild> {
  const ready = options.readyPattern ?? /LISTENING (\S+)/;
  const nodeArgs = options.loader === false ? [entry, ...args] : ["--import", REGISTER, entry, ...args];
  const proc = spawn(process.execPath, nodeArgs, {
    cwd: options.cwd ?? REPO_ROOT,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...options.env },
  });
  let err = "";
  let out = "";
  let exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  const gone = new Promise<void>((resolve) =>
    proc.once("exit", (code, signal) => {
      exit = { code, signal };
      resolve();
    }),
  );
  proc.stderr?.on("data", (c: Buffer) => {
    err = (err + c.toString()).slice(-65536);
  });
  const address = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`${entry} did not print ${ready} within ${START_TIMEOUT_MS} ms: ${err}`));
    }, START_TIMEOUT_MS);
    proc.stdout?.on("data", (c: Buffer) => {
      out += c.toString();
      const m = ready.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1] ?? "");
      }
      out = out.slice(-4096);
    });
    gone.then(() => {
      clearTimeout(timer);
      reject(new Error(`${entry} exited (${JSON.stringify(exit)}) before it was ready: ${err}`));
    });
  });
  const pid = proc.pid as number;
  return {
    process: proc,
    pid,
    address,
    exited: () => exit,
    stderr: () => err,
    rssBytes: () => {
      // 0 once the process is gone (a zombie has no VmRSS): callers check exited() for that.
      let status = "";
      try {
        status = readFileSync(`/proc/${pid}/status`, "utf8");
      } catch {}
      const m = /VmRSS:\s+(\d+) kB/.exec(status);
      return m ? Number(m[1]) * 1024 : 0;
    },
    async stop(graceMs = 5000) {
      if (exit) return;
      proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), graceMs);
      await gone;
      clearTimeout(t);
    },
    async kill() {
      if (exit) return;
      proc.kill("SIGKILL");
      await gone;
    },
  };
}
