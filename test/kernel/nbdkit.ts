/**
 * nbdkit as a stand-in NBD server on 127.0.0.1, so the harness can be proven without udm.
 */
import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

export interface NbdkitServer {
  port: number;
  close(): Promise<void>;
}

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

/**
 * Starts `nbdkit PLUGIN ARGS...` on a free port of 127.0.0.1 and resolves once it listens (its
 * pidfile appears after the socket is bound).
 *
 * @example
 * ```ts
 * const server = await startNbdkit(["file", "/tmp/disk.img"]);
 * // ... runGuest({ port: server.port, ... })
 * await server.close();
 * ```
 */
export async function startNbdkit(pluginArgs: readonly string[]): Promise<NbdkitServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "udm-nbdkit-"));
  const pidfile = path.join(dir, "pid");
  const port = await freePort();
  const child: ChildProcess = spawn(
    "nbdkit",
    ["-f", "-i", "127.0.0.1", "-p", String(port), "-P", pidfile, "--exit-with-parent", ...pluginArgs],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const failed = new Promise<never>((_, reject) => {
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`nbdkit exited (${code}) before listening: ${stderr}`)));
  });
  failed.catch(() => {});
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(pidfile)) {
    if (Date.now() > deadline) throw new Error(`nbdkit did not listen within 10 s: ${stderr}`);
    await Promise.race([new Promise((r) => setTimeout(r, 20)), failed]);
  }
  return {
    port,
    async close() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
