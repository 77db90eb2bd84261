/** Exit codes of every udm command. */
export const EXIT_OK = 0;
/** The operation failed (I/O error, refused by the server, copy with errors). */
export const EXIT_FAILED = 1;
/** The command line is wrong (unknown option, bad size, missing argument). */
export const EXIT_USAGE = 2;

/**
 * A command-line mistake found after commander parsed the arguments (a size that does not
 * parse, conflicting options); exits with EXIT_USAGE.
 *
 * @example
 * ```ts
 * throw new UsageError("--count and --size are mutually exclusive");
 * ```
 */
export class UsageError extends Error {
  override name = "UsageError";
}
