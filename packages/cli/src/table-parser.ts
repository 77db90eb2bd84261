import { SECTOR_SIZE, TargetArgError, type TargetContext, type TargetType } from "@udm/kcopyd";

/** Where a table line came from, for error messages: a file (or `--table`) and a 1-based line. */
export interface TableSource {
  file: string;
  line: number;
}

/** One dmsetup table line: `<start> <length> <target> <args...>`, in sectors. */
export interface TableLine {
  startSectors: number;
  lengthSectors: number;
  targetType: string;
  args: string[];
  source: TableSource;
}

/** The table of one udm device: its segments in order, contiguous from sector 0. */
export interface DeviceTable {
  name: string;
  lines: TableLine[];
}

/**
 * A table that does not parse. The message names the file, the line, the argument (when one is
 * at fault) and what was expected, e.g.
 * `t.table:3: mirror argument 4 ("x"): region size must be a non-negative whole number`.
 */
export class TableParseError extends Error {
  override name = "TableParseError";
  constructor(
    readonly source: TableSource,
    readonly detail: string,
    /** 0-based index into the target arguments, when one argument is at fault. */
    readonly argIndex: number | null = null,
  ) {
    super(`${source.file}:${source.line}: ${detail}`);
  }
}

/** A device name: what NBD clients ask for and `@NAME` refers to. */
export const DEVICE_NAME_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9_.+-]*$/;

/** Throws a TableParseError unless `name` is a valid device name. */
export function checkDeviceName(name: string, source: TableSource): void {
  if (!DEVICE_NAME_PATTERN.test(name) || name.length > 127) {
    throw new TableParseError(
      source,
      `invalid device name "${name}": expected letters, digits, "_", ".", "+" or "-" (at most 127, not starting with "." "+" "-")`,
    );
  }
}

/** Splits a line into words (whitespace separated; dm tables have no quoting). */
function words(text: string): string[] {
  return text
    .trim()
    .split(/\s+/)
    .filter((w) => w !== "");
}

function parseSectors(text: string | undefined, what: string, source: TableSource): number {
  if (text === undefined) {
    throw new TableParseError(source, `missing ${what}: expected "<start> <length> <target> <args...>"`);
  }
  if (!/^\d+$/.test(text)) {
    throw new TableParseError(source, `${what} "${text}" must be a whole number of 512-byte sectors`);
  }
  if (!Number.isSafeInteger(Number(text) * SECTOR_SIZE)) {
    throw new TableParseError(
      source,
      `${what} "${text}" is too large: at most ${Math.floor(Number.MAX_SAFE_INTEGER / SECTOR_SIZE)} sectors`,
    );
  }
  return Number(text);
}

/**
 * Parses one dmsetup table line (`<start> <length> <target> <args...>`) without opening anything.
 *
 * @example
 * ```ts
 * parseTableLine("0 2048 linear /dev/sdb 0", { file: "--table", line: 1 }, registry);
 * // { startSectors: 0, lengthSectors: 2048, targetType: "linear", args: ["/dev/sdb", "0"], ... }
 * ```
 */
export function parseTableLine(
  text: string,
  source: TableSource,
  registry: ReadonlyMap<string, TargetType>,
): TableLine {
  const [start, length, targetType, ...args] = words(text);
  const startSectors = parseSectors(start, "start sector", source);
  const lengthSectors = parseSectors(length, "length", source);
  if (lengthSectors === 0) throw new TableParseError(source, "length must be at least 1 sector");
  if (targetType === undefined) {
    throw new TableParseError(
      source,
      `missing target type: expected one of ${[...registry.keys()].join(", ")}`,
    );
  }
  if (!registry.has(targetType)) {
    throw new TableParseError(
      source,
      `unknown target type "${targetType}": expected one of ${[...registry.keys()].join(", ")}`,
    );
  }
  return { startSectors, lengthSectors, targetType, args, source };
}

/** Checks that segments start at 0 and are contiguous. */
export function checkSegments(table: DeviceTable): void {
  let next = 0;
  for (const line of table.lines) {
    if (line.startSectors !== next) {
      const why =
        next === 0
          ? "the first segment must start at 0"
          : line.startSectors > next
            ? `a gap: sectors ${next}-${line.startSectors - 1} are not mapped`
            : `it overlaps the previous segment, which ends at sector ${next - 1}`;
      throw new TableParseError(
        line.source,
        `${table.name}: segment starts at sector ${line.startSectors}, expected ${next} (${why}; segments must be contiguous from 0, in order)`,
      );
    }
    if (!Number.isSafeInteger((next + line.lengthSectors) * SECTOR_SIZE)) {
      throw new TableParseError(line.source, `${table.name}: the device would be too large`);
    }
    next += line.lengthSectors;
  }
}

function stripComment(text: string): string {
  const hash = text.indexOf("#");
  return hash < 0 ? text : text.slice(0, hash);
}

/**
 * Parses the lines of ONE device as `dmsetup create --table` takes them (no `NAME:` prefix);
 * several lines make one device of several segments. Blank lines and `#` comments are skipped.
 *
 * @example
 * ```ts
 * parseDeviceTable("big", "0 2048 linear a.img 0\n2048 2048 linear b.img 0", "--table", registry);
 * ```
 */
export function parseDeviceTable(
  name: string,
  text: string | string[],
  file: string,
  registry: ReadonlyMap<string, TargetType>,
): DeviceTable {
  const lines = Array.isArray(text) ? text.flatMap((t) => t.split("\n")) : text.split("\n");
  checkDeviceName(name, { file, line: 1 });
  const table: DeviceTable = { name, lines: [] };
  lines.forEach((raw, i) => {
    const body = stripComment(raw);
    if (body.trim() === "") return;
    table.lines.push(parseTableLine(body, { file, line: i + 1 }, registry));
  });
  if (table.lines.length === 0) throw new TableParseError({ file, line: 1 }, `${name}: the table is empty`);
  checkSegments(table);
  return table;
}

/**
 * Parses a udm table file: `NAME: <start> <length> <target> <args...>` lines, `#` comments.
 * Lines of one name form one device, in order; devices keep the order of their first line.
 *
 * @example
 * ```ts
 * const tables = parseTableFile("origin: 0 2097152 snapshot-origin origin.img\n", "udm.table", registry);
 * ```
 */
export function parseTableFile(
  text: string,
  file: string,
  registry: ReadonlyMap<string, TargetType>,
): DeviceTable[] {
  const byName = new Map<string, DeviceTable>();
  text.split("\n").forEach((raw, i) => {
    const source = { file, line: i + 1 };
    const body = stripComment(raw);
    if (body.trim() === "") return;
    const colon = body.indexOf(":");
    const name = colon < 0 ? "" : body.slice(0, colon).trim();
    if (colon < 0 || name === "" || /\s/.test(name)) {
      throw new TableParseError(source, 'expected "NAME: <start> <length> <target> <args...>"');
    }
    checkDeviceName(name, source);
    const line = parseTableLine(body.slice(colon + 1), source, registry);
    let table = byName.get(name);
    if (!table) {
      table = { name, lines: [] };
      byName.set(name, table);
    }
    table.lines.push(line);
  });
  const tables = [...byName.values()];
  for (const table of tables) checkSegments(table);
  return tables;
}

/** Thrown by the probe context instead of opening a device: the arguments before it parsed. */
class ProbeStop extends Error {}

/**
 * Validates the target arguments of a line WITHOUT opening devices: runs the target's constructor
 * with a context whose `openDevice` stops it at the first device. Arguments the target checks
 * before its first open are validated here; `checkSpec` validates each device argument's form.
 */
export async function probeTableLine(
  line: TableLine,
  registry: ReadonlyMap<string, TargetType>,
  context: Omit<TargetContext, "openDevice">,
  checkSpec: (spec: string) => void,
): Promise<void> {
  const target = registry.get(line.targetType)!;
  // Set once the probe stopped the target: whatever it throws from then on (targets may wrap
  // the stop in their own error) is the stop, not a problem with the line.
  let stopped = false;
  const probe: TargetContext = {
    ...context,
    async openDevice(spec: string) {
      try {
        checkSpec(spec);
      } catch (err) {
        throw new TargetArgError(argIndexOf(line, spec), (err as Error).message);
      }
      stopped = true;
      throw new ProbeStop("probe: table arguments checked up to the first device");
    },
  };
  try {
    const dev = await target.create(line.args, line.lengthSectors * SECTOR_SIZE, probe);
    // A target that opens no device (zero, error) is complete: release what it built.
    await dev.close();
  } catch (err) {
    if (stopped || err instanceof ProbeStop) return;
    throw targetError(line, err, registry);
  }
}

/** The index of a device argument in a line, or null. */
export function argIndexOf(line: TableLine, spec: string): number | null {
  const i = line.args.indexOf(spec);
  return i < 0 ? null : i;
}

/** Wraps an error from a target constructor with the file, line, argument and usage. */
export function targetError(
  line: TableLine,
  err: unknown,
  registry?: ReadonlyMap<string, TargetType>,
): Error {
  if (err instanceof TableParseError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const argIndex = err instanceof TargetArgError ? err.argIndex : null;
  const usage = registry?.get(line.targetType)?.usage;
  const where =
    argIndex === null
      ? `${line.targetType}`
      : `${line.targetType} argument ${argIndex + 1}${line.args[argIndex] === undefined ? "" : ` ("${line.args[argIndex]}")`}`;
  const hint = err instanceof TargetArgError && usage ? ` (usage: ${line.targetType} ${usage})` : "";
  return new TableParseError(line.source, `${where}: ${message}${hint}`, argIndex);
}

/** Formats a line as a table file prints it: `NAME: <start> <length> <target> <args>`. */
export function formatTableLine(
  name: string | null,
  line: { startSectors: number; lengthSectors: number; targetType: string; args: string },
): string {
  const body = `${line.startSectors} ${line.lengthSectors} ${line.targetType}${line.args ? ` ${line.args}` : ""}`;
  return name === null ? body : `${name}: ${body}`;
}
