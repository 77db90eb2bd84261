import { pino } from "pino";
import pretty from "pino-pretty";

import type { LogLevel } from "./defaults.js";

export { LOG_LEVELS, type LogLevel } from "./defaults.js";

export type Logger = pino.Logger;

/**
 * The CLI's logger, on stderr: human lines (pino-pretty) on a TTY, JSON lines otherwise, so
 * `udm serve 2>log.jsonl` stays machine readable.
 *
 * @example
 * ```ts
 * const log = createLogger("info");
 * log.info({ device: "mirror0" }, "device created");
 * ```
 */
export function createLogger(level: LogLevel, options: { pretty?: boolean } = {}): Logger {
  const usePretty = options.pretty ?? process.stderr.isTTY === true;
  if (usePretty) {
    return pino(
      { level },
      pretty({
        destination: 2,
        sync: true,
        translateTime: "SYS:HH:MM:ss.l",
        ignore: "pid,hostname",
        singleLine: true,
      }),
    );
  }
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}
