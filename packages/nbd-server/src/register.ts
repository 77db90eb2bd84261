import { registerDeviceScheme } from "@udm/kcopyd";
import { NbdDevice } from "./nbd-device.js";

/** URI schemes NbdDevice opens. */
export const NBD_SCHEMES = ["nbd", "nbd+unix", "nbds", "nbds+unix"] as const;

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
      NbdDevice.connect(spec, { ...(options.readOnly !== undefined && { readOnly: options.readOnly }) }),
    );
  }
}

registerNbdSchemes();
