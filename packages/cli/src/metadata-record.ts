import { createHash } from "node:crypto";
import {
  closeSync,
  existsSync,
  fsyncSync,
  linkSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  unlinkSync,
  writeSync,
} from "node:fs";
import { basename, dirname, join } from "node:path";

/** One device as the record keeps it: its table lines and where relative paths resolve. */
export interface RecordedDevice {
  name: string;
  /** dmsetup table lines `<start> <length> <target> <args...>`, one per segment. */
  lines: string[];
  baseDir: string;
  /** An LVM-like merge (`udm snapshot merge`) in progress: resumed, and the device removed when done. */
  merging?: boolean;
  /**
   * Message settings meant to persist (`udm message NAME SECTOR read_balance on`), sent again
   * when the device is started from the record; a reload drops them (a new target, as in dm).
   */
  messages?: RecordedMessage[];
}

/** One persisted `dmsetup message`: the sector that picks the segment, and the words. */
export interface RecordedMessage {
  sector: number;
  argv: string[];
}

/** What the server runs: every device, `@NAME` dependencies before their users. */
export interface MetadataState {
  devices: RecordedDevice[];
}

/** The table file a record was started from, to tell a hand-edited table from the record's own changes. */
export interface RecordSource {
  tableFile: string;
  sha256: string;
}

/** A record as read back. */
export interface MetadataVersion {
  seqno: number;
  written: string;
  state: MetadataState;
  source?: RecordSource;
}

const FORMAT = "udm-metadata";
const VERSION = 1;

/** A record that cannot be used; the message names the file and the backup to use. */
export class MetadataRecordError extends Error {
  override name = "MetadataRecordError";
}

/**
 * The steps of one record write, in order; `UDM_CRASH_AT=record:<step>` kills the process
 * (SIGKILL) right after that step, for crash-point tests.
 */
export const RECORD_STEPS = ["temp-written", "temp-synced", "archived", "renamed", "dir-synced"] as const;
export type RecordStep = (typeof RECORD_STEPS)[number];

/** Kills the process after `step` when `UDM_CRASH_AT` names it (`<scope>:<step>`). */
export function crashPoint(scope: string, step: string): void {
  if (process.env.UDM_CRASH_AT === `${scope}:${step}`) process.kill(process.pid, "SIGKILL");
}

/** sha256 of a table file's text (how a record recognises the table it was started from). */
export function tableChecksum(text: string): string {
  return createHash("sha256").update(text).digest("hex");
}

function checksum(body: object): string {
  return createHash("sha256").update(JSON.stringify(body)).digest("hex");
}

function fsyncPath(path: string): void {
  const fd = openSync(path, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * The metadata record of a running server (LVM's metadata with its archive): one JSON file,
 * replaced atomically (temp file, fsync, rename, fsync of the folder) with an increasing
 * sequence number and a sha256 of its content; the version it replaces is kept in
 * `<file>.archive/` (the last `keep`). A record that does not parse or whose checksum is wrong
 * is refused, naming the file and the newest valid archived version.
 *
 * @example
 * ```ts
 * const record = new MetadataRecord("udm-data/udm.meta.json");
 * const last = record.read(); // null when there is none yet
 * await record.write({ devices: [{ name: "lin", lines: ["0 2048 linear a.img 0"], baseDir: "/srv" }] });
 * ```
 */
export class MetadataRecord {
  readonly archiveDir: string;
  private seqno: number | undefined;
  /** Written into every version (set by the server at start). */
  source: RecordSource | undefined;

  constructor(
    readonly path: string,
    private readonly options: { keep?: number } = {},
  ) {
    this.archiveDir = `${path}.archive`;
  }

  /** The current version, or null when no record exists. Throws MetadataRecordError. */
  read(): MetadataVersion | null {
    if (!existsSync(this.path)) {
      this.seqno = 0;
      return null;
    }
    try {
      const version = parseRecord(readFileSync(this.path, "utf8"));
      this.seqno = version.seqno;
      return version;
    } catch (err) {
      const backup = this.newestValidArchive();
      throw new MetadataRecordError(
        `metadata record ${this.path} is unusable (${(err as Error).message}): ${
          backup
            ? `the newest valid backup is ${backup.path} (seqno ${backup.seqno}); copy it over ${this.path} to start from it`
            : `no valid backup in ${this.archiveDir}; move ${this.path} away to start from the table file`
        }`,
      );
    }
  }

  /** Writes the next version durably; resolves with its sequence number. */
  async write(state: MetadataState): Promise<number> {
    if (this.seqno === undefined) this.read();
    const seqno = this.seqno! + 1;
    const body = {
      format: FORMAT,
      version: VERSION,
      seqno,
      written: new Date().toISOString(),
      ...(this.source && { source: this.source }),
      ...state,
    };
    const text = `${JSON.stringify({ ...body, sha256: checksum(body) }, null, 2)}\n`;
    const dir = dirname(this.path);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const temp = join(dir, `.${basename(this.path)}.${process.pid}.tmp`);
    // A temp file left by a writer killed before its rename is not the record: drop it.
    for (const f of readdirSync(dir)) {
      if (f.startsWith(`.${basename(this.path)}.`) && f.endsWith(".tmp")) unlinkSync(join(dir, f));
    }
    const fd = openSync(temp, "w", 0o600);
    try {
      writeSync(fd, text);
      crashPoint("record", "temp-written");
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    crashPoint("record", "temp-synced");
    if (existsSync(this.path)) {
      // The version being replaced goes to the archive (a hard link: it is durable already).
      mkdirSync(this.archiveDir, { recursive: true });
      const archived = join(this.archiveDir, `${basename(this.path)}.${String(this.seqno).padStart(8, "0")}`);
      if (existsSync(archived)) unlinkSync(archived);
      linkSync(this.path, archived);
      fsyncPath(this.archiveDir);
      this.prune();
    }
    crashPoint("record", "archived");
    renameSync(temp, this.path);
    crashPoint("record", "renamed");
    fsyncPath(dir);
    crashPoint("record", "dir-synced");
    this.seqno = seqno;
    return seqno;
  }

  /** Archived versions, newest first. */
  archived(): string[] {
    if (!existsSync(this.archiveDir)) return [];
    const prefix = `${basename(this.path)}.`;
    return readdirSync(this.archiveDir)
      .filter((f) => f.startsWith(prefix) && /^\d+$/.test(f.slice(prefix.length)))
      .sort()
      .reverse()
      .map((f) => join(this.archiveDir, f));
  }

  private prune(): void {
    for (const old of this.archived().slice(this.options.keep ?? 5)) unlinkSync(old);
  }

  private newestValidArchive(): { path: string; seqno: number } | null {
    for (const path of this.archived()) {
      try {
        return { path, seqno: parseRecord(readFileSync(path, "utf8")).seqno };
      } catch {}
    }
    return null;
  }
}

/** Parses and checks one record text (format, version, checksum, shape). */
export function parseRecord(text: string): MetadataVersion {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new Error(`not JSON, a half-written file? ${(err as Error).message}`);
  }
  if (!parsed || typeof parsed !== "object") throw new Error("not a JSON object");
  const { sha256, ...body } = parsed as Record<string, unknown>;
  if (body.format !== FORMAT)
    throw new Error(`format is ${JSON.stringify(body.format)}, expected "${FORMAT}"`);
  if (body.version !== VERSION) throw new Error(`version ${JSON.stringify(body.version)} is not ${VERSION}`);
  if (sha256 !== checksum(body)) throw new Error("checksum mismatch: the file was changed or damaged");
  const { seqno, written, devices, source } = body as Record<string, unknown> & { source?: RecordSource };
  if (typeof seqno !== "number" || !Number.isSafeInteger(seqno) || seqno < 1) throw new Error("bad seqno");
  if (!Array.isArray(devices)) throw new Error("no device list");
  for (const d of devices as RecordedDevice[]) {
    if (
      typeof d?.name !== "string" ||
      typeof d.baseDir !== "string" ||
      !Array.isArray(d.lines) ||
      d.lines.some((l) => typeof l !== "string") ||
      (d.messages !== undefined &&
        (!Array.isArray(d.messages) ||
          d.messages.some(
            (m) =>
              !Number.isSafeInteger(m?.sector) ||
              !Array.isArray(m.argv) ||
              m.argv.some((a) => typeof a !== "string"),
          )))
    ) {
      throw new Error(`bad device entry ${JSON.stringify(d).slice(0, 80)}`);
    }
  }
  return {
    seqno,
    written: String(written),
    state: { devices: devices as RecordedDevice[] },
    ...(source && typeof source.tableFile === "string" && typeof source.sha256 === "string" && { source }),
  };
}
