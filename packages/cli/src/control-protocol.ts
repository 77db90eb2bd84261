import { connect } from "node:net";

/**
 * The control protocol between `udm` commands and `udm serve`: JSON lines over a Unix socket
 * (mode 0600). Each request is one line `{"id":1,"verb":"status","args":{"name":"mirror0"}}`,
 * answered by one line `{"id":1,"ok":true,"result":...}` or
 * `{"id":1,"ok":false,"error":{"code":"ENOENT","message":"no device \"x\""}}`. A connection may
 * send several requests; they are answered in order.
 */
export interface ControlRequest {
  id: number;
  verb: string;
  args?: Record<string, unknown>;
}

export type ControlResponse =
  | { id: number; ok: true; result: unknown }
  | { id: number; ok: false; error: { code: string; message: string } };

/** Longest request line the server accepts (a table of a few thousand lines). */
export const MAX_CONTROL_LINE_BYTES = 4 * 1024 * 1024;

/** An error the server answered with. */
export class ControlError extends Error {
  override name = "ControlError";
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * No reply within the client's timeout. The server keeps working on the request (a suspend
 * waiting for in-flight I/O may still complete); the client only stops waiting.
 */
export class ControlTimeoutError extends ControlError {
  override name = "ControlTimeoutError";
  constructor(
    readonly verb: string,
    readonly timeoutMs: number,
    message: string,
  ) {
    super("ETIMEDOUT", message);
  }
}

/** Default wait for one control reply, in seconds (`udm --timeout`); 0 waits forever. */
export const DEFAULT_CONTROL_TIMEOUT_SECONDS = 30;

/** Options of one control request. */
export interface ControlRequestOptions {
  /** Give up after this many milliseconds without a reply (ControlTimeoutError); 0 or absent: wait forever. */
  timeoutMs?: number;
}

/** The server could not be reached at the control socket. */
export class ControlUnavailableError extends Error {
  override name = "ControlUnavailableError";
}

/**
 * Sends one request to a running `udm serve` and returns its result (throws ControlError).
 *
 * @example
 * ```ts
 * const devices = await controlRequest("udm-data/control.sock", "ls");
 * ```
 */
export function controlRequest(
  path: string,
  verb: string,
  args: Record<string, unknown> = {},
  options: ControlRequestOptions = {},
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    let buffered = "";
    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const settle = (fn: () => void) => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      socket.destroy();
      fn();
    };
    const timeoutMs = options.timeoutMs ?? 0;
    if (timeoutMs > 0) {
      timer = setTimeout(() => {
        const name = typeof args.name === "string" ? args.name : undefined;
        settle(() =>
          reject(
            new ControlTimeoutError(
              verb,
              timeoutMs,
              `no reply to "${verb}"${name ? ` ${name}` : ""} from ${path} within ${timeoutMs / 1000} s (--timeout SECONDS, 0 waits forever); the server goes on with the request${name ? `: check it with "udm info ${name}"` : ""}`,
            ),
          ),
        );
      }, timeoutMs);
    }
    socket.setEncoding("utf8");
    socket.on("connect", () =>
      socket.write(`${JSON.stringify({ id: 1, verb, args } satisfies ControlRequest)}\n`),
    );
    socket.on("data", (chunk: string) => {
      buffered += chunk;
      const nl = buffered.indexOf("\n");
      if (nl < 0) return;
      let response: ControlResponse;
      try {
        response = JSON.parse(buffered.slice(0, nl)) as ControlResponse;
      } catch {
        settle(() => reject(new ControlError("EPROTO", `bad reply from ${path}: ${buffered.slice(0, 200)}`)));
        return;
      }
      settle(() =>
        response.ok
          ? resolve(response.result)
          : reject(new ControlError(response.error.code, response.error.message)),
      );
    });
    socket.on("error", (err: NodeJS.ErrnoException) => {
      settle(() =>
        reject(
          err.code === "ENOENT" || err.code === "ECONNREFUSED"
            ? new ControlUnavailableError(
                `no udm server at ${path} (${err.code}): start one with "udm serve", or point --control / UDM_CONTROL at its socket`,
              )
            : err,
        ),
      );
    });
    socket.on("close", () =>
      settle(() =>
        reject(new ControlError("EPROTO", `${path}: the server closed the connection without a reply`)),
      ),
    );
  });
}
