import { spawn } from "node:child_process";
import { constants } from "node:os";
import type { Logger } from "./logger.js";

/** Where a client reaches the server: what `--print-uri`, `--run` and the banner are built from. */
export type ServeAddress = { host: string; port: number } | { path: string } | { fd: number; where: string };

/**
 * The NBD URI of export `name` at `address` (NBD URI spec): `nbd://HOST:PORT/NAME`,
 * `nbd+unix:///NAME?socket=PATH`, and `nbds` / `nbds+unix` under TLS ("" for a passed socket
 * whose address is unknown).
 *
 * @example
 * ```ts
 * exportUri("disk", { host: "127.0.0.1", port: 10809 }, false); // "nbd://127.0.0.1:10809/disk"
 * exportUri("disk", { path: "/run/udm.sock" }, true); // "nbds+unix:///disk?socket=/run/udm.sock"
 * ```
 */
export function exportUri(name: string, address: ServeAddress, tls: boolean): string {
  const scheme = tls ? "nbds" : "nbd";
  const exportPart = encodeURIComponent(name);
  if ("path" in address) return `${scheme}+unix:///${exportPart}?socket=${address.path}`;
  if ("fd" in address) {
    if (address.where.startsWith("/")) return `${scheme}+unix:///${exportPart}?socket=${address.where}`;
    // A passed socket whose address cannot be found has no URI.
    if (address.where.startsWith("fd ")) return "";
    return `${scheme}://${address.where}/${exportPart}`;
  }
  const host = address.host.includes(":") ? `[${address.host}]` : address.host;
  return `${scheme}://${host}:${address.port}/${exportPart}`;
}

/**
 * nbdkit's `--run` variables for the first export at the first address: `uri`, `nbd` (the same
 * URI, nbdkit's preferred form), `port` and `unixsocket` (one of them empty), `exportname`,
 * and `tls` (0 off, 1 on, 2 required).
 */
export function captiveVariables(
  exportName: string,
  address: ServeAddress,
  tls: "off" | "on" | "require",
): Record<string, string> {
  const uri = exportUri(exportName, address, tls === "require");
  const path =
    "path" in address ? address.path : "fd" in address && address.where.startsWith("/") ? address.where : "";
  const port =
    "port" in address
      ? String(address.port)
      : "fd" in address && !path
        ? (/:(\d+)$/.exec(address.where)?.[1] ?? "")
        : "";
  return {
    uri,
    nbd: uri,
    port,
    unixsocket: path,
    exportname: exportName,
    tls: tls === "off" ? "0" : tls === "on" ? "1" : "2",
  };
}

/**
 * Captive mode (`udm serve --run CMD`): runs CMD with `/bin/sh -c`, the variables both in its
 * environment and set as shell variables before it (as nbdkit does), and resolves with the exit
 * status to pass on: CMD's own, or 128 + signal number when a signal ended it.
 */
export function runCaptive(command: string, variables: Record<string, string>, log: Logger): Promise<number> {
  const assignments = Object.entries(variables)
    .map(([k, v]) => `${k}=${shellQuote(v)}`)
    .join(" ");
  return new Promise((resolve) => {
    const child = spawn("/bin/sh", ["-c", `${assignments}\n${command}`], {
      env: { ...process.env, ...variables },
      stdio: "inherit",
    });
    log.info({ childPid: child.pid, command }, "--run: command started");
    child.on("error", (err) => {
      log.error({ command, err: err.message }, "--run: cannot start the command");
      resolve(127);
    });
    child.on("exit", (code, signal) => {
      const status = code ?? 128 + (signal ? (constants.signals[signal] ?? 0) : 0);
      log.info({ command, status, ...(signal && { signal }) }, "--run: command ended, stopping");
      resolve(status);
    });
  });
}

function shellQuote(text: string): string {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

/**
 * `--exit-with-parent`: calls `stop` once the process that started udm is gone. Node has no
 * prctl(PR_SET_PDEATHSIG), so this polls getppid(): the parent's death re-parents udm (to init or
 * a subreaper) and the parent PID changes.
 */
export function watchParent(stop: () => void, intervalMs = 500): () => void {
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid !== parent) {
      clearInterval(timer);
      stop();
    }
  }, intervalMs);
  timer.unref();
  return () => clearInterval(timer);
}
