const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  s: 512,
  k: 2 ** 10,
  kb: 1e3,
  kib: 2 ** 10,
  m: 2 ** 20,
  mb: 1e6,
  mib: 2 ** 20,
  g: 2 ** 30,
  gb: 1e9,
  gib: 2 ** 30,
  t: 2 ** 40,
  tb: 1e12,
  tib: 2 ** 40,
  p: 2 ** 50,
  pb: 1e15,
  pib: 2 ** 50,
};

/**
 * Parses a size as admins write it: `512`, `4k`, `1G`, `1GiB`, `10GB` (decimal), `2048s` (sectors).
 * Single letters and `iB` suffixes are binary, as in dd, qemu-img and LVM.
 *
 * @example
 * ```ts
 * parseSize("1G"); // 1073741824
 * parseSize("8s"); // 4096
 * ```
 */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new RangeError(
      `invalid size "${text}": expected a number with an optional unit (512, 4k, 1G, 1GiB, 2048s)`,
    );
  }
  const bytes = Number(m[1]) * unit;
  if (!Number.isSafeInteger(bytes))
    throw new RangeError(`invalid size "${text}": not a whole number of bytes`);
  return bytes;
}

/** Formats bytes with a binary unit for humans: `1.5 GiB`. */
export function formatSize(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}
