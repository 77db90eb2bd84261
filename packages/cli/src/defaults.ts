/** Where `udm serve` keeps the embedded default and the control socket. */
export const DEFAULT_DATA_DIR = "udm-data";
/** File name of the control socket in the data directory. */
export const CONTROL_SOCKET_NAME = "control.sock";
/** Log levels `--log-level` accepts. */
export const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
