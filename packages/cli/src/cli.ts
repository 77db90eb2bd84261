import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { formatSize, parseSize, SECTOR_SIZE, type TargetProgress } from "@udm/kcopyd";
import { Command, CommanderError, Option } from "commander";
import {
  ControlError,
  ControlUnavailableError,
  controlRequest,
  DEFAULT_CONTROL_TIMEOUT_SECONDS,
} from "./control-protocol.js";
import { CONTROL_SOCKET_NAME, DEFAULT_DATA_DIR, LOG_LEVELS, type LogLevel } from "./defaults.js";
import type { DeviceInfo, SegmentLine } from "./device-manager.js";
import { canonicalSpec } from "./device-pool.js";
import type { Logger } from "./logger.js";
import { configureProgress, createProgress, PLAIN_PROGRESS_INTERVAL_MS } from "./progress.js";
import { formatTableLine, TableParseError } from "./table-parser.js";
import { EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError } from "./usage-error.js";

/** Interval between polls of a running merge. */
const MERGE_POLL_MS = 500;
/** Interval between polls of `udm wait` (the event counter is in memory: a poll is cheap). */
const WAIT_POLL_MS = 200;

type InfoRow = DeviceInfo & { connections: number };

/** `udm info -c` columns: heading and value, as dmsetup names them where it has them. */
const INFO_COLUMNS: Record<string, { heading: string; value: (r: InfoRow) => string }> = {
  name: { heading: "Name", value: (r) => r.name },
  state: { heading: "Stat", value: (r) => r.state },
  open: { heading: "Open", value: (r) => String(r.connections) },
  segments: { heading: "Targ", value: (r) => String(r.targets.length) },
  events: { heading: "Event", value: (r) => String(r.events) },
  sectors: { heading: "Sectors", value: (r) => String(r.sizeSectors) },
  targets: { heading: "Targets", value: (r) => r.targets.join("+") },
};
const DEFAULT_INFO_COLUMNS = "name,state,open,segments,events";

function parseInfoColumns(text: string): string[] {
  const fields = text.split(",").map((f) => f.trim());
  for (const f of fields) {
    if (!Object.hasOwn(INFO_COLUMNS, f)) {
      throw new UsageError(
        `-o ${text}: unknown field "${f}" (fields: ${Object.keys(INFO_COLUMNS).join(", ")})`,
      );
    }
  }
  return fields;
}

/**
 * `dmsetup info -c` lines: aligned columns under headings; without headings the fields are
 * joined by ":" (dmsetup's default separator), or by `separator` whenever one is given.
 */
export function formatInfoColumns(
  rows: InfoRow[],
  fields: string[],
  options: { headings: boolean; separator?: string | undefined },
): string[] {
  const cols = fields.map((f) => INFO_COLUMNS[f]!);
  const table = rows.map((r) => cols.map((c) => c.value(r)));
  if (options.separator !== undefined || !options.headings) {
    const sep = options.separator ?? ":";
    const lines = table.map((cells) => cells.join(sep));
    return options.headings ? [cols.map((c) => c.heading).join(sep), ...lines] : lines;
  }
  const all = [cols.map((c) => c.heading), ...table];
  const widths = cols.map((_, i) => Math.max(...all.map((cells) => cells[i]!.length)));
  return all.map((cells) =>
    cells
      .map((cell, i) => cell.padEnd(widths[i]!))
      .join(" ")
      .trimEnd(),
  );
}

function sizeOption(text: string, option: string): number {
  try {
    return parseSize(text);
  } catch (err) {
    throw new UsageError(`${option}: ${(err as Error).message}`);
  }
}

function sectorsOption(text: string, option: string): number {
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(Number(text))) {
    throw new UsageError(`${option} "${text}": expected a whole number of 512-byte sectors`);
  }
  return Number(text);
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

interface GlobalOptions {
  control?: string;
  logLevel?: LogLevel;
  logFormat?: "pretty" | "json";
  progress?: boolean;
  progressInterval?: string;
  verbose?: boolean;
  quiet?: boolean;
  timeout?: string;
}

/** udm's version, from the package.json next to dist/. */
export function udmVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as {
      version?: string;
    };
    return pkg.version ?? "unknown";
  } catch {
    return "unknown";
  }
}

function controlPath(cmd: Command): string {
  const opts = cmd.optsWithGlobals<GlobalOptions>();
  return resolve(opts.control ?? process.env.UDM_CONTROL ?? `${DEFAULT_DATA_DIR}/${CONTROL_SOCKET_NAME}`);
}

/** `--timeout SECONDS` in milliseconds (0: wait forever). */
function controlTimeoutMs(cmd: Command): number {
  const text = cmd.optsWithGlobals<GlobalOptions>().timeout ?? String(DEFAULT_CONTROL_TIMEOUT_SECONDS);
  if (!/^\d+(\.\d+)?$/.test(text) || !Number.isFinite(Number(text))) {
    throw new UsageError(`--timeout "${text}": expected a number of seconds (0 waits forever)`);
  }
  return Math.round(Number(text) * 1000);
}

/** One request to the server of a command, bounded by its `--timeout`. */
function send(cmd: Command, verb: string, args: Record<string, unknown> = {}): Promise<unknown> {
  return controlRequest(controlPath(cmd), verb, args, { timeoutMs: controlTimeoutMs(cmd) });
}

/** The logger of a command; loaded on demand (pino) so client verbs start fast. */
async function logger(cmd: Command, fallback: LogLevel): Promise<Logger> {
  const { createLogger } = await import("./logger.js");
  const opts = cmd.optsWithGlobals<GlobalOptions>();
  if (opts.verbose && opts.quiet) throw new UsageError("-v/--verbose and -q/--quiet are mutually exclusive");
  if ((opts.verbose || opts.quiet) && opts.logLevel)
    throw new UsageError("give --log-level or -v/-q, not both");
  const level =
    (opts.verbose ? "debug" : opts.quiet ? "error" : opts.logLevel) ??
    (process.env.UDM_LOG_LEVEL as LogLevel | undefined) ??
    fallback;
  return createLogger(LOG_LEVELS.includes(level) ? level : fallback, {
    ...(opts.logFormat && { pretty: opts.logFormat === "pretty" }),
  });
}

function print(lines: string | string[]): void {
  const text = Array.isArray(lines) ? lines.join("\n") : lines;
  if (text !== "") process.stdout.write(`${text}\n`);
}

function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** Reads `--table LINE...` or `--table-file F` into the request arguments of create/reload. */
function tableArgs(opts: { table?: string[]; tableFile?: string }): Record<string, unknown> {
  const cwd = process.cwd();
  if (opts.table?.length && opts.tableFile) throw new UsageError("give --table or --table-file, not both");
  if (opts.tableFile) {
    const file = resolve(opts.tableFile);
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      throw new UsageError(`--table-file ${opts.tableFile}: ${(err as Error).message}`);
    }
    return { lines: [text], file: opts.tableFile, cwd, baseDir: dirname(file) };
  }
  if (!opts.table?.length)
    throw new UsageError(
      "a table is needed: --table '<start> <length> <target> <args...>' or --table-file FILE",
    );
  return { lines: opts.table, file: "--table", cwd };
}

function formatSegments(entries: Array<{ name: string; lines: SegmentLine[] }>, named: boolean): string[] {
  return entries.flatMap((e) => e.lines.map((l) => formatTableLine(named ? e.name : null, l)));
}

/**
 * One line about background work: `resync: 12.0 MiB / 1.00 GiB (1.2%), ETA 40 s`.
 *
 * @example
 * ```ts
 * formatProgress({ operation: "merge", doneBytes: 512, totalBytes: 1024 }); // "merge: 512 B / 1.00 KiB (50.0%)"
 * ```
 */
export function formatProgress(p: TargetProgress): string {
  const pct = p.totalBytes > 0 ? (100 * p.doneBytes) / p.totalBytes : 100;
  const eta =
    p.etaSeconds !== undefined && Number.isFinite(p.etaSeconds) ? `, ETA ${Math.ceil(p.etaSeconds)} s` : "";
  return `${p.operation}: ${formatSize(p.doneBytes)} / ${formatSize(p.totalBytes)} (${pct.toFixed(1)}%)${eta}`;
}

/** What the `status` verb answers for each device. */
interface StatusEntry {
  name: string;
  lines: SegmentLine[];
  progress?: TargetProgress | null;
}

/** Status lines of each device, each followed by an indented progress line while work runs. */
function formatStatus(entries: StatusEntry[], named: boolean): string[] {
  return entries.flatMap((e) => [
    ...formatSegments([e], named),
    ...(e.progress ? [`  ${formatProgress(e.progress)}`] : []),
  ]);
}

function formatInfo(info: DeviceInfo & { connections: number }): string[] {
  const p = info.progress;
  return [
    `Name:              ${info.name}`,
    `State:             ${info.state.toUpperCase()}`,
    `Size:              ${info.sizeSectors} sectors (${formatSize(info.sizeBytes)})`,
    `Number of targets: ${info.targets.length}`,
    `Targets:           ${info.targets.join(" ")}`,
    `Open count:        ${info.connections}`,
    `Event number:      ${info.events}`,
    `Uses:              ${info.uses.map((u) => `@${u}`).join(" ") || "-"}`,
    `Used by:           ${info.usedBy.join(" ") || "-"}`,
    ...(info.state === "suspended" ? [`Held requests:     ${info.heldRequests}`] : []),
    ...(p ? [`Progress:          ${formatProgress(p)}`] : []),
    `Allowed clients:   ${formatAllow(info.allow)}`,
  ];
}

/** `udm info`'s one-line view of an export's allow list. */
function formatAllow(allow: DeviceInfo["allow"]): string {
  if (!allow) return "everyone";
  const parts: string[] = [];
  if (allow.addresses) parts.push(`addresses ${allow.addresses.join(",") || "(none)"}`);
  if (allow.certSubjects)
    parts.push(`certificates ${allow.certSubjects.map((c) => JSON.stringify(c)).join(" ")}`);
  return parts.join(" and ");
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Prints the status lines of the devices (or one) whose targets are of the given types. */
async function targetStatus(
  cmd: Command,
  name: string | undefined,
  types: string[],
  json: boolean,
): Promise<void> {
  const entries = (await send(cmd, "status", name ? { name } : {})) as StatusEntry[];
  const matching = entries.filter((e) => e.lines.some((l) => types.includes(l.targetType)));
  if (name && matching.length === 0) {
    throw new ControlError("EINVAL", `${name} has no ${types.join("/")} target`);
  }
  if (json) return printJson(matching.map((e) => ({ ...e, progress: e.progress ?? null })));
  print(formatStatus(matching, !name));
}

/** Polls a device's background progress with a bar until it has none. */
async function waitForProgress(cmd: Command, name: string, label: string): Promise<void> {
  let bar: ReturnType<typeof createProgress> | undefined;
  for (;;) {
    const [info] = (await send(cmd, "info", { name })) as DeviceInfo[];
    const p = info?.progress;
    if (!p) break;
    bar ??= createProgress(label, p.totalBytes);
    bar.update(p.doneBytes, p.totalBytes);
    await sleep(MERGE_POLL_MS);
  }
  // The work is over (the last poll saw it running): the bar ends full.
  bar?.done();
}

/**
 * Builds the `udm` command line (commander). Every command has `--help` with an example.
 *
 * @example
 * ```ts
 * await buildProgram().parseAsync(["node", "udm", "ls"]);
 * ```
 */
export function buildProgram(): Command {
  const program = new Command("udm")
    .description(
      "udm: a userspace device-mapper (kcopyd, mirror, snapshot) served over NBD, managed like dmsetup.\n" +
        "Exit codes: 0 ok, 1 operation failed, 2 usage error.",
    )
    .option(
      "--control <path>",
      `control socket of a running "udm serve" (env UDM_CONTROL; default ${DEFAULT_DATA_DIR}/${CONTROL_SOCKET_NAME})`,
    )
    .option(
      "--timeout <seconds>",
      `client commands: give up (exit 1) when the server does not answer a request within SECONDS; the server goes on with it (default ${DEFAULT_CONTROL_TIMEOUT_SECONDS}; 0 waits forever; merge and resync waits poll, each poll bounded, and have no overall limit)`,
    )
    .addOption(new Option("--log-level <level>", "log level (env UDM_LOG_LEVEL)").choices(LOG_LEVELS))
    .option("-v, --verbose", "log level debug")
    .option("-q, --quiet", "log level error: only failures")
    .addOption(
      new Option(
        "--log-format <format>",
        "log lines on stderr: pretty (default on a terminal) or json (default otherwise)",
      ).choices(["pretty", "json"]),
    )
    .option(
      "--progress",
      "show progress of long jobs (the default; with -q too): a bar on a terminal, else a line every few seconds",
    )
    .option("--no-progress", "no progress bar or lines")
    .option(
      "--progress-interval <seconds>",
      `seconds between progress lines without a terminal (default ${PLAIN_PROGRESS_INTERVAL_MS / 1000})`,
    )
    .version(`udm ${udmVersion()}`, "-V, --version", "print udm's version and exit")
    .showHelpAfterError("(run with --help for usage)")
    .enablePositionalOptions(false)
    .exitOverride();
  program.hook("preAction", (_program, action) => {
    const opts = action.optsWithGlobals<GlobalOptions>();
    const interval = opts.progressInterval;
    if (interval !== undefined && (!/^\d+(\.\d+)?$/.test(interval) || !Number.isFinite(Number(interval)))) {
      throw new UsageError(`--progress-interval "${interval}": expected a number of seconds`);
    }
    configureProgress({
      // --progress wins over -q; --no-progress turns it off.
      enabled: opts.progress ?? !opts.quiet,
      ...(interval !== undefined && { intervalMs: Math.round(Number(interval) * 1000) }),
    });
  });
  program.addHelpText(
    "after",
    "\nExample (a session):\n" +
      "  udm serve &                                   # origin, snap0, mirror0 on 127.0.0.1:10809\n" +
      "  nbd-client 127.0.0.1 10809 -N origin /dev/nbd0\n" +
      "  udm snapshot create origin snap1 --cow udm-data/snap1.cow --size 1G\n" +
      "  udm status snap1 && udm snapshot merge snap1\n",
  );
  const example = (cmd: Command, text: string) =>
    cmd.addHelpText("after", `\nExample:\n  ${text.split("\n").join("\n  ")}\n`);

  // serve
  example(
    program
      .command("serve")
      .description(
        "serve every device of a table (or --export, or the embedded default) as NBD exports of the same name",
      )
      .option(
        "--table <file>",
        "table file: NAME: <start> <length> <target> <args...> lines (paths relative to the file)",
      )
      .option(
        "--export <name=device>",
        "serve DEVICE (path, file:, mem:SIZE, nbd://) as export NAME (repeatable)",
        collect,
        [],
      )
      .option("--listen <host:port>", "TCP address (default 127.0.0.1:10809; port 0 picks a free one)")
      .option("--unix <path>", "also (or only, without --listen) serve on a Unix socket")
      .option(
        "--data-dir <dir>",
        "directory of the metadata record (udm.meta.json), the embedded default and the control socket",
        DEFAULT_DATA_DIR,
      )
      .option("--tls-cert <file>", "TLS certificate (PEM)")
      .option("--tls-key <file>", "TLS private key (PEM)")
      .option(
        "--tls-ca <file>",
        "CA to verify client certificates: a certificate that does not verify is refused; clients without one stay anonymous",
      )
      .option("--tls-verify-client", "require a client certificate signed by --tls-ca")
      .option("--tls-required", "refuse clients that do not start TLS")
      .option(
        "--allow-address <export=cidr,...>",
        'only clients from these addresses see and open EXPORT: IPs, CIDRs (10.0.0.0/8), "unix" for the Unix socket (repeatable; applies to a later "udm create" of that name too)',
        collect,
        [],
      )
      .option("-r, --read-only", "every export refuses writes (clients see NBD_FLAG_READ_ONLY)")
      .option("--read-only-export <name>", "this export refuses writes (repeatable)", collect, [])
      .option(
        "--run <command>",
        "captive mode: run COMMAND (sh -c) once listening, with $uri $nbd $port $unixsocket $exportname $tls set; stop when it exits and exit with its status",
      )
      .option("--exit-with-parent", "stop (cleanly) when the process that started udm ends")
      .option(
        "--print-uri",
        "print one URI per export on stdout instead of the banner (nbds:// under TLS, nbd+unix:// for --unix)",
      )
      .option("--pidfile <file>", "write udm's PID to FILE once listening (removed on exit)")
      .option(
        "--allow-cert <export=subject>",
        'only clients with a certificate verified by --tls-ca whose CN (or full subject "O=..., CN=...") is SUBJECT see and open EXPORT (repeatable; with --allow-address both must match)',
        collect,
        [],
      )
      .action(async (opts, cmd: Command) => {
        const log = await logger(cmd, "info");
        const { runServe } = await import("./serve.js");
        if (Boolean(opts.tlsCert) !== Boolean(opts.tlsKey))
          throw new UsageError("--tls-cert and --tls-key go together");
        if ((opts.tlsVerifyClient || opts.tlsRequired || opts.tlsCa) && !opts.tlsCert) {
          throw new UsageError(
            "--tls-ca, --tls-verify-client and --tls-required need --tls-cert and --tls-key",
          );
        }
        if (opts.allowCert.length > 0 && !opts.tlsCa) {
          throw new UsageError(
            `--allow-cert "${opts.allowCert[0]}" needs --tls-ca (client certificates are verified against it)`,
          );
        }
        await runServe(
          {
            tableFile: opts.table,
            exports: opts.export,
            allowAddress: opts.allowAddress,
            allowCert: opts.allowCert,
            listen: opts.listen,
            unix: opts.unix,
            control: cmd.optsWithGlobals<GlobalOptions>().control,
            dataDir: opts.dataDir,
            readOnly: Boolean(opts.readOnly),
            readOnlyExports: opts.readOnlyExport,
            ...(opts.run !== undefined && { run: opts.run }),
            exitWithParent: Boolean(opts.exitWithParent),
            printUri: Boolean(opts.printUri),
            ...(opts.pidfile !== undefined && { pidfile: opts.pidfile }),
            ...(opts.tlsCert && {
              tls: {
                certFile: opts.tlsCert,
                keyFile: opts.tlsKey,
                caFile: opts.tlsCa,
                verifyClient: Boolean(opts.tlsVerifyClient),
                required: Boolean(opts.tlsRequired),
              },
            }),
          },
          log,
        );
      }),
    "udm serve                         # embedded default in ./udm-data on 127.0.0.1:10809\n" +
      "udm serve --table my.table --listen 0.0.0.0:10809\n" +
      "udm serve --export disk=disk.img --export scratch=mem:1G\n" +
      "udm serve --export disk=disk.img --listen 0.0.0.0:10809 --allow-address disk=10.0.0.0/8,unix --unix /run/udm.sock\n" +
      "udm serve -r --export disk=disk.img --listen 127.0.0.1:0 --run 'nbdcopy $uri backup.img'",
  );

  // copy
  example(
    program
      .command("copy")
      .description(
        "copy SRC to 1..8 destinations with kcopyd (holes stay holes); the last line gives bytes, MiB/s (of data, for sparse sources) and the write error bit mask; Ctrl-C exits 130, SIGTERM 143",
      )
      .argument("<src>", "source device (path, file:, mem:SIZE, nbd://, @NAME of --table-file)")
      .argument("<dest...>", "destination devices")
      .option("--sector <n>", "first sector on the source and the destinations", "0")
      .option("--count <n>", "sectors to copy (default: to the end of the source)")
      .option("--size <size>", "bytes to copy instead of --count: 512, 4k, 1G, 1GiB")
      .option("--pages <n>", "kcopyd memory budget in 4 KiB pages")
      .option("--ignore-error", "keep copying after errors (every sub-job is tried)")
      .option("--seq", "write sub-jobs in ascending order (WRITE_SEQ)")
      .option(
        "--dense",
        "read and write every sector, holes too (the kernel kcopyd's behaviour); by default source holes stay holes, as with cp, nbdcopy and qemu-img convert",
      )
      .option("--skip-holes", "keep source holes as holes (the default; kept for old scripts)")
      .option(
        "--keep-partial",
        "on Ctrl-C or SIGTERM keep a destination file this copy created (removed by default)",
      )
      .option(
        "--table-file <file>",
        "table file whose devices @NAME arguments refer to (repeatable)",
        collect,
        [],
      )
      .option(
        "--table <line>",
        "inline 'NAME: <start> <length> <target> <args>' line (repeatable)",
        collect,
        [],
      )
      .action(async (src: string, dests: string[], opts, cmd: Command) => {
        const log = await logger(cmd, "warn");
        const { runCopy, formatCopySummary } = await import("./copy-command.js");
        if (opts.count !== undefined && opts.size !== undefined)
          throw new UsageError("--count and --size are mutually exclusive");
        if (opts.dense && opts.skipHoles)
          throw new UsageError("--dense and --skip-holes are mutually exclusive");
        let count: number | undefined;
        if (opts.count !== undefined) count = sectorsOption(opts.count, "--count");
        if (opts.size !== undefined) {
          const bytes = sizeOption(opts.size, "--size");
          if (bytes % SECTOR_SIZE)
            throw new UsageError(`--size ${opts.size}: must be a multiple of 512 bytes`);
          count = bytes / SECTOR_SIZE;
        }
        let pages: number | undefined;
        if (opts.pages !== undefined) {
          pages = sectorsOption(opts.pages, "--pages");
          if (pages < 1) throw new UsageError("--pages must be at least 1");
        }
        const summary = await runCopy(
          src,
          dests,
          {
            sector: sectorsOption(opts.sector, "--sector"),
            ...(count !== undefined && { count }),
            ...(pages !== undefined && { pages }),
            ignoreError: Boolean(opts.ignoreError),
            seq: Boolean(opts.seq),
            skipHoles: !opts.dense,
            keepPartial: Boolean(opts.keepPartial),
            tableFiles: opts.tableFile,
            tableLines: opts.table,
          },
          log,
        );
        print(formatCopySummary(summary, dests));
        if (summary.readErr || summary.writeErr) process.exitCode = EXIT_FAILED;
      }),
    "udm copy a.img b.img c.img d.img\n" +
      "udm copy --size 1G disk.img nbd://backup:10809/disk\n" +
      "udm copy --dense disk.img /dev/sdb           # every sector, holes too\n" +
      "udm copy --ignore-error --table 'bad: 0 2048 error' a.img b.img @bad",
  );

  // dmsetup verbs against a running server
  const request = send;

  example(
    program
      .command("create")
      .description("create a device from a table (several lines = several segments)")
      .argument(
        "[name]",
        "device name (optional with a NAME:-format --table-file: creates every device in it)",
      )
      .option("--table <line>", "table line '<start> <length> <target> <args...>' (repeatable)", collect, [])
      .option("--table-file <file>", "file of table lines (dmsetup format, or NAME: lines)")
      .action(async (name: string | undefined, opts, cmd: Command) => {
        const result = (await request(cmd, "create", { ...(name && { name }), ...tableArgs(opts) })) as {
          created: string[];
        };
        print(`created ${result.created.join(", ")}`);
      }),
    "udm create lin --table '0 2048 linear /srv/a.img 0'\n" +
      "udm create big --table '0 2048 linear a.img 0' --table '2048 2048 linear b.img 0'\n" +
      "udm create snapm --table '0 2097152 snapshot-origin @mirror0'",
  );

  example(
    program
      .command("remove")
      .description(
        "remove a device; refused (EBUSY, naming the holder) while another device uses it, NBD clients are connected or it is merging",
      )
      .argument("<name>")
      .option("--force", "disconnect connected NBD clients, abort a merge in progress (a used device stays)")
      .action(async (name: string, opts, cmd: Command) => {
        await request(cmd, "remove", { name, ...(opts.force && { force: true }) });
        print(`removed ${name}`);
      }),
    "udm remove lin",
  );

  example(
    program
      .command("ls")
      .description("list devices")
      .option("--json", "machine-readable output")
      .action(async (opts, cmd: Command) => {
        const rows = (await request(cmd, "ls")) as Array<DeviceInfo & { connections: number }>;
        if (opts.json) return printJson(rows);
        if (rows.length === 0) return print("No devices found");
        print(
          rows.map(
            (r) =>
              `${r.name}\t(${r.sizeSectors} sectors, ${r.targets.join("+")}, ${r.state}${r.connections ? `, ${r.connections} connection(s)` : ""})`,
          ),
        );
      }),
    "udm ls --json",
  );

  for (const verb of ["table", "status"] as const) {
    example(
      program
        .command(verb)
        .description(
          verb === "table"
            ? "print the table of a device (or all, as NAME: lines) in dmsetup's format"
            : 'print the status of a device (or all) in dmsetup\'s format; a resync or merge in progress adds an indented line with percent and ETA (--json: "progress")',
        )
        .argument("[name]")
        .option("--json", "machine-readable output")
        .action(async (name: string | undefined, opts, cmd: Command) => {
          const entries = (await request(cmd, verb, name ? { name } : {})) as StatusEntry[];
          if (opts.json) return printJson(entries);
          if (entries.length === 0) return print("No devices found");
          print(verb === "status" ? formatStatus(entries, !name) : formatSegments(entries, !name));
        }),
      verb === "table"
        ? "udm table mirror0      # 0 2097152 mirror disk 2 /srv/mirror0.log 1024 2 ..."
        : "udm status            # snap0: 0 2097152 snapshot 16/2228224 16",
    );
  }

  example(
    program
      .command("info")
      .description("show state, size, targets, users and background progress of a device (or all)")
      .argument("[name]")
      .option("--json", "machine-readable output")
      .option("-c, --columns", "one line per device, in columns (dmsetup info -c)")
      .option(
        "-o, --options <fields>",
        `columns of -c, comma-separated: ${Object.keys(INFO_COLUMNS).join(",")} (default ${DEFAULT_INFO_COLUMNS})`,
      )
      .option("--noheadings", "-c: no heading line (fields then separated by ':')")
      .option("--separator <text>", "-c: separate fields with TEXT instead of aligning them")
      .action(async (name: string | undefined, opts, cmd: Command) => {
        if (!opts.columns && (opts.options || opts.noheadings || opts.separator !== undefined))
          throw new UsageError("-o, --noheadings and --separator go with -c/--columns");
        const fields = opts.columns ? parseInfoColumns(opts.options ?? DEFAULT_INFO_COLUMNS) : [];
        const rows = (await request(cmd, "info", name ? { name } : {})) as InfoRow[];
        if (opts.json) return printJson(rows);
        if (opts.columns)
          return print(
            formatInfoColumns(rows, fields, { headings: !opts.noheadings, separator: opts.separator }),
          );
        print(rows.map((r) => formatInfo(r).join("\n")).join("\n\n"));
      }),
    "udm info mirror0\nudm info -c --noheadings -o name,open,segments,events",
  );

  example(
    program
      .command("rename")
      .description("rename a device and its export; connected clients stay connected (dmsetup rename)")
      .argument("<name>")
      .argument("<new-name>")
      .action(async (name: string, newName: string, _opts, cmd: Command) => {
        await request(cmd, "rename", { name, newName });
        print(`renamed ${name} to ${newName}`);
      }),
    "udm rename scratch scratch-old",
  );

  example(
    program
      .command("deps")
      .description(
        "list the devices a device opens: files, block devices, nbd:// URIs, @udm devices (dmsetup deps)",
      )
      .argument("[name]")
      .option("--json", "machine-readable output")
      .action(async (name: string | undefined, opts, cmd: Command) => {
        const rows = (await request(cmd, "info", name ? { name } : {})) as InfoRow[];
        if (opts.json) return printJson(rows.map((r) => ({ name: r.name, devices: r.devices })));
        print(
          rows.map(
            (r) =>
              `${name ? "" : `${r.name}: `}${r.devices.length} dependencies\t: ${r.devices.map((d) => `(${d})`).join(" ")}`,
          ),
        );
      }),
    "udm deps mirror0   # 3 dependencies\t: (/srv/a.img) (/srv/b.img) (/srv/mirror0.log)",
  );

  example(
    program
      .command("targets")
      .description("list the target types udm builds, with their table arguments (dmsetup targets)")
      .action(async () => {
        const { allTargets } = await import("./targets.js");
        const targets = allTargets();
        const width = Math.max(...targets.map((t) => t.name.length)) + 2;
        print(targets.map((t) => `${t.name.padEnd(width)}${t.usage}`));
      }),
    "udm targets",
  );

  example(
    program
      .command("version")
      .description("print udm's version and, when one answers on the control socket, the server's")
      .action(async (_opts, cmd: Command) => {
        print(`udm version:     ${udmVersion()}`);
        try {
          const v = (await send(cmd, "version")) as { version: string; pid: number; node: string };
          print(`server version:  ${v.version} (pid ${v.pid}, node ${v.node})`);
        } catch (err) {
          if (!(err instanceof ControlUnavailableError)) throw err;
          print(`server version:  none answers on ${controlPath(cmd)}`);
        }
      }),
    "udm version",
  );

  example(
    program
      .command("wait")
      .description(
        "wait until the event counter of a device passes EVENT_NR (default 0): a mirror leg failure, a finished resync... (dmsetup wait; see udm info -c -o events)",
      )
      .argument("<name>")
      .argument("[event_nr]", "event number to pass", "0")
      .action(async (name: string, eventText: string, _opts, cmd: Command) => {
        const eventNr = sectorsOption(eventText, "event_nr");
        for (;;) {
          const [info] = (await request(cmd, "info", { name })) as InfoRow[];
          if (info && info.events > eventNr) return;
          await sleep(WAIT_POLL_MS);
        }
      }),
    "udm wait mirror0 $(udm info -c --noheadings -o events mirror0) && udm status mirror0   # the next event",
  );

  example(
    program
      .command("suspend")
      .description("drain in-flight I/O, hold new I/O (clients wait, they are not failed) and flush")
      .argument("<name>")
      .option(
        "--noflush",
        "do not flush the table after draining (a device stacked on a suspended one then suspends at once)",
      )
      .action(async (name: string, opts, cmd: Command) => {
        await request(cmd, "suspend", { name, ...(opts.noflush && { noflush: true }) });
        print(`suspended ${name}`);
      }),
    "udm suspend origin && cp --sparse=always udm-data/origin.img backup.img && udm resume origin",
  );

  example(
    program
      .command("resume")
      .description("release held I/O and restart background work")
      .argument("<name>")
      .action(async (name: string, _opts, cmd: Command) => {
        await request(cmd, "resume", { name });
        print(`resumed ${name}`);
      }),
    "udm resume origin",
  );

  example(
    program
      .command("reload")
      .description(
        "load a new table; an active device switches to it at once (suspend, swap, resume: clients stay connected), a suspended one on resume",
      )
      .argument("<name>")
      .option("--table <line>", "table line (repeatable)", collect, [])
      .option("--table-file <file>", "file of table lines")
      .option("--force", "reload to a smaller size although devices or NBD clients hold the device")
      .action(async (name: string, opts, cmd: Command) => {
        await request(cmd, "reload", { name, ...tableArgs(opts), ...(opts.force && { force: true }) });
        print(`reloaded ${name}`);
      }),
    "udm reload mirror0 --table '0 2097152 mirror core 1 1024 2 a.img 0 c.img 0'",
  );

  example(
    program
      .command("message")
      .description("send a message to the target at SECTOR (dmsetup message)")
      .argument("<name>")
      .argument("<sector>")
      .argument("<message...>")
      .action(async (name: string, sector: string, message: string[], _opts, cmd: Command) => {
        const result = (await request(cmd, "message", {
          name,
          sector: sectorsOption(sector, "sector"),
          argv: message,
        })) as {
          reply: string | null;
        };
        if (result.reply !== null) print(result.reply);
      }),
    "udm message flaky 0 error_reads",
  );

  // snapshot
  const snapshot = example(
    program.command("snapshot").description("dm-snapshot: create, merge, status and inspect snapshots"),
    "udm snapshot create origin snap1 --cow snap1.cow --size 1G\nudm snapshot merge snap1",
  );
  example(
    snapshot
      .command("create")
      .description(
        "take a snapshot of a snapshot-origin device on a running server (origin suspended meanwhile: no write lost)",
      )
      .argument("<origin>", "name of a snapshot-origin device")
      .argument("<name>", "name of the new snapshot device")
      .requiredOption("--cow <device>", "COW device (path, file:, mem:SIZE, nbd://)")
      .option("--size <size>", "create a missing COW file of this size (sparse): 1G, 512M")
      .option("--chunk <sectors>", "chunk size in sectors (power of two)", "8")
      .option("--chunk-size <size>", "chunk size in bytes instead of --chunk: 4k, 16k")
      .option("--transient", "transient store (N): exceptions live in memory only")
      .option("--overflow-ok", "persistent store PO: a full COW fails writes instead of invalidating")
      .option(
        "--reuse-cow",
        "keep the COW's content (load the exceptions of the snapshot it already holds) instead of zeroing its header chunk as lvcreate does",
      )
      .action(async (origin: string, name: string, opts, cmd: Command) => {
        let chunkSectors = sectorsOption(opts.chunk, "--chunk");
        let chunkOption = `--chunk ${opts.chunk}`;
        if (opts.chunkSize !== undefined) {
          const bytes = sizeOption(opts.chunkSize, "--chunk-size");
          if (bytes % SECTOR_SIZE)
            throw new UsageError(`--chunk-size ${opts.chunkSize}: must be a multiple of 512 bytes`);
          chunkSectors = bytes / SECTOR_SIZE;
          chunkOption = `--chunk-size ${opts.chunkSize}`;
        }
        if (chunkSectors < 1 || !Number.isInteger(Math.log2(chunkSectors))) {
          throw new UsageError(
            `${chunkOption}: the chunk size must be a power of two number of sectors (8 = 4 KiB), got ${chunkSectors}`,
          );
        }
        if (opts.size !== undefined && sizeOption(opts.size, "--size") < 2 * chunkSectors * SECTOR_SIZE) {
          throw new UsageError(
            `--size ${opts.size}: a COW needs at least a header and a metadata chunk (${2 * chunkSectors * SECTOR_SIZE} bytes)`,
          );
        }
        if (opts.transient && opts.overflowOk)
          throw new UsageError("--overflow-ok applies to persistent snapshots only");
        if (opts.transient && opts.reuseCow)
          throw new UsageError(
            "--reuse-cow applies to persistent snapshots only (a transient COW keeps nothing)",
          );
        await request(cmd, "snapshot-create", {
          origin,
          name,
          cow: canonicalSpec(opts.cow, process.cwd()),
          ...(opts.size !== undefined && { createSizeBytes: sizeOption(opts.size, "--size") }),
          chunkSectors,
          persistent: !opts.transient,
          overflowOk: Boolean(opts.overflowOk),
          reuseCow: Boolean(opts.reuseCow),
        });
        print(`created snapshot ${name} of ${origin}`);
      }),
    "udm snapshot create origin snap1 --cow udm-data/snap1.cow --size 1G",
  );
  example(
    snapshot
      .command("merge")
      .description(
        "merge a snapshot back into its origin (reload as snapshot-merge); the device is removed when done",
      )
      .argument("<name>")
      .option("--wait", "wait for the merge to finish (the default)")
      .option("--no-wait", "start the merge and return")
      .action(async (name: string, opts, cmd: Command) => {
        await request(cmd, "snapshot-merge", { name });
        if (opts.wait === false) return print(`merging ${name}`);
        let progress: ReturnType<typeof createProgress> | undefined;
        for (;;) {
          const s = (await request(cmd, "merge-status", { name })) as {
            state: string;
            error?: string;
            progress: { doneBytes: number; totalBytes: number } | null;
          };
          if (s.progress) {
            progress ??= createProgress("merge", s.progress.totalBytes);
            progress.update(s.progress.doneBytes, s.progress.totalBytes);
          }
          if (s.state === "done") {
            progress?.done();
            break;
          }
          if (s.state === "failed") {
            progress?.stop();
            throw new ControlError("EIO", `merge of ${name} failed: ${s.error}`);
          }
          await sleep(MERGE_POLL_MS);
        }
        print(`merged ${name} into its origin`);
      }),
    "udm snapshot merge snap0",
  );
  example(
    snapshot
      .command("status")
      .description("status lines of the snapshot devices (or one): allocated/total and metadata sectors")
      .argument("[name]")
      .option("--json", "machine-readable output")
      .action(async (name: string | undefined, opts, cmd: Command) => {
        await targetStatus(cmd, name, ["snapshot-origin", "snapshot", "snapshot-merge"], Boolean(opts.json));
      }),
    "udm snapshot status snap0   # 0 2097152 snapshot 16/2228224 16",
  );
  example(
    snapshot
      .command("inspect")
      .description(
        "read a COW device offline: header, metadata areas, exceptions, usage; explains a corrupt header",
      )
      .argument("<cow>", "COW device (path, file:, ...)")
      .option("--json", "machine-readable output")
      .action(async (cow: string, opts) => {
        const { offlineInspectors } = await import("./targets.js");
        const inspect = offlineInspectors().cow;
        if (!inspect) throw new ControlError("ENOTSUP", "snapshot inspection is not available in this build");
        const report = await inspect(canonicalSpec(cow, process.cwd()));
        print(opts.json ? JSON.stringify(report.json, null, 2) : report.text);
        if (!report.ok) process.exitCode = EXIT_FAILED;
      }),
    "udm snapshot inspect udm-data/snap0.cow",
  );

  // mirror
  const mirror = example(
    program.command("mirror").description("dm-mirror: status, resync, inspect disk logs"),
    "udm mirror status\nudm mirror resync --log m.log --region-size 1024 a.img b.img",
  );
  example(
    mirror
      .command("status")
      .description("status lines of the mirror devices (or one), with resync progress")
      .argument("[name]")
      .option("--json", "machine-readable output")
      .action(async (name: string | undefined, opts, cmd: Command) => {
        await targetStatus(cmd, name, ["mirror"], Boolean(opts.json));
      }),
    "udm mirror status mirror0   # 0 2097152 mirror 2 a.img b.img 2048/2048 1 AA 3 disk m.log A",
  );
  example(
    mirror
      .command("resync")
      .description(
        "NAME: force a full resync of a running mirror and wait for it; PRIMARY LEG...: resync devices offline (only what the log marks, unless --full)",
      )
      .argument("<devices...>", "a mirror device NAME, or PRIMARY LEG... for an offline resync")
      .option(
        "--log <device>",
        "offline: the mirror's disk log (default: a core log, which resyncs everything)",
      )
      .option("--core", "offline: no disk log (every region is resynced)")
      .option("--region-size <sectors>", "offline: region size in sectors (power of two)")
      .option("--full", "offline: resync every region whatever the log says")
      .option("--no-wait", "online: start the resync and return")
      .action(async (devices: string[], opts, cmd: Command) => {
        const offline =
          devices.length > 1 || opts.regionSize !== undefined || opts.log !== undefined || opts.core;
        if (!offline) {
          const name = devices[0]!;
          await request(cmd, "message", { name, sector: 0, argv: ["resync"] });
          if (!opts.wait) return print(`resyncing ${name}`);
          await waitForProgress(cmd, name, "resync");
          return print(`${name} is in sync`);
        }
        if (opts.log && opts.core) throw new UsageError("--log and --core are mutually exclusive");
        if (opts.regionSize === undefined)
          throw new UsageError("an offline resync needs --region-size <sectors>");
        if (devices.length < 2)
          throw new UsageError("an offline resync needs PRIMARY and at least one more LEG");
        const { runOfflineResync } = await import("./mirror-resync-command.js");
        const s = await runOfflineResync(
          {
            primary: devices[0]!,
            legs: devices.slice(1),
            regionSectors: sectorsOption(opts.regionSize, "--region-size"),
            ...(opts.log && { log: opts.log }),
            full: Boolean(opts.full),
          },
          await logger(cmd, "warn"),
        );
        const mibps = s.bytes / 2 ** 20 / Math.max(s.seconds, 1e-6);
        print(
          `resynced ${s.regionsCopied} of ${s.regions} region(s), ${s.bytes} bytes (${formatSize(s.bytes)}) written to legs in ${s.seconds.toFixed(2)} s, ${mibps.toFixed(1)} MiB/s; ${s.inSync ? "all legs in sync" : `NOT in sync: ${s.status}`}`,
        );
        if (!s.inSync) process.exitCode = EXIT_FAILED;
      }),
    "udm mirror resync mirror0\n" + "udm mirror resync --log m.log --region-size 1024 a.img b.img",
  );
  example(
    mirror
      .command("inspect-log")
      .description("read a mirror disk log offline: header, region count, out-of-sync regions")
      .argument("<log>", "log device (path, file:, ...)")
      .option("--json", "machine-readable output")
      .action(async (log: string, opts) => {
        const { offlineInspectors } = await import("./targets.js");
        const inspect = offlineInspectors().mirrorLog;
        if (!inspect)
          throw new ControlError("ENOTSUP", "mirror log inspection is not available in this build");
        const report = await inspect(canonicalSpec(log, process.cwd()));
        print(opts.json ? JSON.stringify(report.json, null, 2) : report.text);
        if (!report.ok) process.exitCode = EXIT_FAILED;
      }),
    "udm mirror inspect-log udm-data/mirror0.log",
  );

  return program;
}

/**
 * Runs the udm command line and returns its exit code (0 ok, 1 failed, 2 usage).
 *
 * @example
 * ```ts
 * process.exitCode = await runCli(process.argv);
 * ```
 */
export async function runCli(argv: string[]): Promise<number> {
  const program = buildProgram();
  const setExit = (cmd: Command) => {
    cmd.exitOverride();
    cmd.configureOutput({ writeErr: (s) => process.stderr.write(s), outputError: (s, write) => write(s) });
    for (const sub of cmd.commands) setExit(sub);
  };
  setExit(program);
  if (argv.length <= 2) {
    // Like dmsetup and nbdkit: no command is a usage error, not a success.
    process.stderr.write(program.helpInformation());
    return EXIT_USAGE;
  }
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === "number" ? process.exitCode : EXIT_OK;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (
        err.code === "commander.helpDisplayed" ||
        err.code === "commander.version" ||
        err.code === "commander.help"
      ) {
        return EXIT_OK;
      }
      if (err.code === "commander.executeSubCommandAsync") return EXIT_USAGE;
      return err.exitCode === 0 ? EXIT_OK : EXIT_USAGE;
    }
    if (err instanceof UsageError) {
      process.stderr.write(`udm: ${err.message}\n(run with --help for usage)\n`);
      return EXIT_USAGE;
    }
    if (
      err instanceof ControlError ||
      err instanceof ControlUnavailableError ||
      err instanceof TableParseError
    ) {
      process.stderr.write(`udm: ${err.message}\n`);
      return EXIT_FAILED;
    }
    const e = err as Error;
    process.stderr.write(`udm: ${e?.message ?? String(err)}\n`);
    if (process.env.UDM_DEBUG) process.stderr.write(`${e?.stack}\n`);
    return EXIT_FAILED;
  }
}
