/** POSIX error names a device may fail with; the NBD server maps them to NBD error codes. */
export type Errno = "EIO" | "EPERM" | "ENOSPC" | "EINVAL" | "ENOTSUP" | "EOVERFLOW" | "ESHUTDOWN" | "ENOMEM";

/**
 * An I/O error from a block device, carrying the errno the NBD server reports and the device name.
 *
 * @example
 * ```ts
 * throw new IoError("EIO", "error:1G", "read at 0+4096 failed");
 * ```
 */
export class IoError extends Error {
  readonly code: Errno;
  readonly device: string;

  constructor(code: Errno, device: string, message: string) {
    super(`${device}: ${message} (${code})`);
    this.name = "IoError";
    this.code = code;
    this.device = device;
  }
}

/** The errno of any thrown value: an IoError's code, a Node system error's code, else EIO. */
export function errnoOf(err: unknown): Errno {
  const code = (err as { code?: unknown } | null)?.code;
  switch (code) {
    case "EIO":
    case "EPERM":
    case "ENOSPC":
    case "EINVAL":
    case "ENOTSUP":
    case "EOVERFLOW":
    case "ESHUTDOWN":
    case "ENOMEM":
      return code;
    case "EACCES":
    case "EROFS":
      return "EPERM";
    case "EOPNOTSUPP":
      return "ENOTSUP";
    case "EFBIG":
    case "EDQUOT":
      return "ENOSPC";
    default:
      if (err instanceof RangeError) return "EINVAL";
      return "EIO";
  }
}
