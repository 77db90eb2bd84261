import { registerDeviceScheme } from "@udm/kcopyd";
import { NbdDevice } from "./nbd-device.js";

/** URI schemes NbdDevice opens. */
export const NBD_SCHEMES = ["nbd", "nbd+unix", "nbds", "nbds+unix"] as const;

/**
 * The reconnect policy of devices opened by URI (table arguments such as a mirror leg
 * `nbd://HOST:PORT/EXPORT`): while the server is unreachable, requests fail at once with EIO (a
 * mirror fails the leg and goes on), and the device retries every second until it is closed; when
 * it is back, `watchHealth` reports it healthy (a mirror resyncs the leg).
 */
export const NBD_URI_RECONNECT = {
  retries: Number.POSITIVE_INFINITY,
  delayMs: 1000,
  holdRequests: false,
} as const;

/**
 * Makes `openDevice("nbd://HOST:PORT/EXPORT")` (and `nbd+unix`, `nbds`, `nbds+unix`) return an
 * NbdDevice. Called when the package is imported; calling it again is harmless.
 *
 * @example
 * ```ts
 * registerNbdSchemes();
 * const remote = await openDevice("nbd://127.0.0.1:10809/disk");
 * ```
 */
export function registerNbdSchemes(): void {
  for (const scheme of NBD_SCHEMES) {
    registerDeviceScheme(scheme, (spec, options) =>
      NbdDevice.connect(spec, {
        reconnect: { ...NBD_URI_RECONNECT },
        ...(options.readOnly !== undefined && { readOnly: options.readOnly }),
      }),
    );
  }
}

registerNbdSchemes();
