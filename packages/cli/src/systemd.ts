import { spawnSync } from "node:child_process";
import { readFileSync, readlinkSync } from "node:fs";
import type { Logger } from "./logger.js";

/** The first file descriptor systemd passes (SD_LISTEN_FDS_START). */
export const SD_LISTEN_FDS_START = 3;

/**
 * The listening sockets systemd passed (socket activation, sd_listen_fds(3)): file descriptors
 * 3..3+LISTEN_FDS-1 when LISTEN_PID is this process, else none. Like `sd_listen_fds(1)` it
 * removes LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from the environment, so children (`--run`)
 * do not take the sockets for theirs.
 *
 * @example
 * ```ts
 * for (const fd of takeListenFds()) await server.listen({ fd });
 * ```
 */
export function takeListenFds(env: NodeJS.ProcessEnv = process.env, pid = process.pid): number[] {
  const pidText = env.LISTEN_PID;
  const countText = env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (pidText === undefined || countText === undefined) return [];
  if (Number(pidText) !== pid) return [];
  const count = Number(countText);
  if (!Number.isSafeInteger(count) || count < 1) return [];
  return Array.from({ length: count }, (_, i) => SD_LISTEN_FDS_START + i);
}

/**
 * The path a passed Unix socket is bound to (Node cannot tell for a socket opened from a file
 * descriptor): its inode from /proc/self/fd, looked up in /proc/net/unix. Undefined when the
 * descriptor is not a named Unix socket or /proc is not there.
 */
export function unixSocketPath(fd: number): string | undefined {
  try {
    const inode = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/self/fd/${fd}`))?.[1];
    if (!inode) return undefined;
    for (const line of readFileSync("/proc/net/unix", "utf8").split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields[6] === inode && fields[7]?.startsWith("/")) return fields[7];
    }
  } catch {
    // No /proc: the banner names the descriptor instead.
  }
  return undefined;
}

/** How `sdNotify` reached systemd. */
export type NotifyPath = "native" | "systemd-notify" | "none";

/**
 * Sends `message` to the service manager (`sd_notify(0, "READY=1")`, `STOPPING=1`) when
 * NOTIFY_SOCKET is set. Node cannot send on a Unix datagram socket, so this uses the native addon of
 * @udm/kcopyd (`notifySocket`, a sendto(2) of the message), else the `systemd-notify --ready
 * --pid=PID` command (the service then needs `NotifyAccess=all` unless udm runs as root, which
 * may send on behalf of its own PID), else it logs a warning: a `Type=notify` unit would then time
 * out, `Type=simple` is the fallback.
 */
export async function sdNotify(
  log: Logger,
  message = "READY=1",
  env: NodeJS.ProcessEnv = process.env,
): Promise<NotifyPath> {
  const socket = env.NOTIFY_SOCKET;
  if (!socket) return "none";
  const { nativeFileOps } = await import("@udm/kcopyd");
  const native = nativeFileOps();
  if (native?.notifySocket) {
    try {
      native.notifySocket(socket, `${message}\nMAINPID=${process.pid}`);
      log.debug({ notifySocket: socket, via: "native" }, "sd_notify sent");
      return "native";
    } catch (err) {
      log.warn({ notifySocket: socket, err: (err as Error).message }, "sd_notify through the addon failed");
    }
  }
  const fields = message.split("\n").filter((l) => l !== "READY=1");
  const r = spawnSync(
    "systemd-notify",
    [...(message.includes("READY=1") ? ["--ready"] : []), `--pid=${process.pid}`, ...fields],
    { env, encoding: "utf8", timeout: 5000 },
  );
  if (r.status === 0) {
    log.debug({ notifySocket: socket, via: "systemd-notify" }, "sd_notify sent");
    return "systemd-notify";
  }
  log.warn(
    { notifySocket: socket, err: r.error?.message ?? r.stderr?.trim() },
    "cannot notify systemd (no native addon, systemd-notify failed): use Type=simple",
  );
  return "none";
}
