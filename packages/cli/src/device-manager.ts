import { existsSync, unlinkSync } from "node:fs";
import {
  type BlockDevice,
  KcopydClient,
  type OpenDeviceOptions,
  SECTOR_SIZE,
  TargetArgError,
  type TargetContext,
  type TargetDevice,
  type TargetLogger,
  type TargetProgress,
  type TargetType,
} from "@udm/kcopyd";
import { canonicalSpec, DevicePool } from "./device-pool.js";
import { GateDevice, type GateState } from "./gate-device.js";
import {
  crashPoint,
  type MetadataState,
  type RecordedDevice,
  type RecordedMessage,
} from "./metadata-record.js";
import { SegmentedDevice } from "./segmented-device.js";
import {
  argIndexOf,
  checkDeviceName,
  type DeviceTable,
  formatTableLine,
  parseDeviceTable,
  probeTableLine,
  type TableLine,
  TableParseError,
  targetError,
} from "./table-parser.js";

/** What the manager needs from an NBD server (NbdServer has these): one export per device. */
export interface ExportTable {
  addExport(
    name: string,
    device: BlockDevice,
    options?: { description?: string; readOnly?: boolean; allow?: ExportAllowList },
  ): void;
  replaceExportDevice(name: string, device: BlockDevice): void;
  removeExport(name: string): Promise<void>;
  /** `udm rename`: the export takes the new name (and its allow list); clients stay connected. */
  renameExport?(name: string, newName: string, options?: { allow?: ExportAllowList }): void;
}

/**
 * Who may see and open an export (`NbdAllowList` of @udm/nbd-server): source addresses (IPs,
 * CIDRs, `"unix"`) and/or client certificate subjects; every list given must match.
 */
export interface ExportAllowList {
  addresses?: string[];
  certSubjects?: string[];
}

/** A device operation refused for a reason the user can fix (unknown name, device in use...). */
export class DeviceManagerError extends Error {
  override name = "DeviceManagerError";
  constructor(
    readonly code: "ENOENT" | "EEXIST" | "EBUSY" | "EINVAL" | "EIO",
    message: string,
  ) {
    super(message);
  }
}

/** A table to create, with the directory its relative paths are resolved against. */
export interface TableRequest {
  table: DeviceTable;
  /** Directory relative device paths are resolved against (the table file's, or the client's cwd). */
  baseDir: string;
}

/** One live udm device. */
interface UdmDevice {
  name: string;
  gate: GateDevice;
  lines: TableLine[];
  /** Directory the table's relative paths were resolved against. */
  baseDir: string;
  segments: TargetDevice[];
  /** Pool specs the current table holds (one entry per open). */
  held: string[];
  /** udm devices this one uses through `@NAME`. */
  uses: Set<string>;
  /** An LVM-like merge in progress or finished (see `snapshotMerge`). */
  merge?: { state: "merging" | "failed"; error?: string };
  /** dm's event_nr: target events (a leg failure, a finished resync) since creation (`udm wait`). */
  events?: number;
  /** Message settings meant to persist, the last of each kind per segment (see PERSISTED_MESSAGES). */
  messages?: RecordedMessage[];
}

/**
 * Messages whose setting is recorded and sent again on a start from the record, by target type:
 * tunables, not one-off actions (`resync`).
 */
export const PERSISTED_MESSAGES: Readonly<Record<string, readonly string[]>> = {
  mirror: ["read_balance", "resync_throttle", "regions_in_flight"],
};

/** A row of `udm ls` / `udm info`. */
export interface DeviceInfo {
  name: string;
  state: GateState;
  sizeBytes: number;
  sizeSectors: number;
  targets: string[];
  uses: string[];
  usedBy: string[];
  heldRequests: number;
  progress: TargetProgress | null;
  /** The export's allow list (`udm serve --allow-address/--allow-cert`); absent: everyone. */
  allow?: ExportAllowList;
  /** dm's event counter (`dmsetup info`'s "Event number"; `udm wait`). */
  events: number;
  /** Devices the table opens (canonical specs, and `@NAME` for udm devices): `udm deps`. */
  devices: string[];
}

/** One segment's line as `dmsetup table` / `dmsetup status` print it. */
export interface SegmentLine {
  startSectors: number;
  lengthSectors: number;
  targetType: string;
  args: string;
}

export interface DeviceManagerOptions {
  targets: Iterable<TargetType>;
  log: TargetLogger & { child(bindings: object): TargetLogger };
  /** The NBD server exporting every device (optional: `udm copy` uses tables offline). */
  exports?: ExportTable;
  /**
   * Allow lists by export name, applied whenever a device of that name is exported (also one
   * created, or removed and created again, later on).
   */
  exportAllow?: ReadonlyMap<string, ExportAllowList>;
  kcopyd?: KcopydClient;
  /**
   * Records what exists durably (`MetadataRecord.write`): called by every state-changing
   * command after its tables are built and before it is acknowledged (for reload and snapshot
   * create, while the devices are still suspended, before the switch). A rejection fails the
   * command and undoes it.
   */
  record?: (state: MetadataState) => Promise<unknown>;
}

/**
 * The state-changing commands, as crash-point scopes (`UDM_CRASH_AT=<scope>:<step>`, steps
 * `built` and `recorded`; snapshot create also `cow-zeroed`; `merged` is the removal of a
 * snapshot whose merge finished).
 */
export const COMMAND_SCOPES = [
  "create",
  "remove",
  "reload",
  "snapshot-create",
  "snapshot-merge",
  "merged",
  "rename",
  "message",
] as const;
export type CommandScope = (typeof COMMAND_SCOPES)[number];

/** A change not applied yet that the record must already show. */
type PendingChange = { device: RecordedDevice } | { removed: string } | { renamed: string; to: string };

/** Options of `udm remove` and `udm reload` (dmsetup's `--force`). */
export interface BusyOptions {
  /**
   * Remove a device with NBD clients connected (they are disconnected), or a snapshot in the
   * middle of a merge (the merge is reported aborted); reload to a smaller size although
   * clients are connected. A device another device is stacked on is never removed.
   */
  force?: boolean;
  /** NBD clients connected to the device's export (asked under the table lock). */
  connections?: () => number;
}

/** Options of an LVM-like `udm snapshot create`. */
export interface SnapshotCreateOptions {
  /** Canonical (absolute) COW spec. */
  cow: string;
  /** Create a missing COW file of this size (sparse). */
  createSizeBytes?: number;
  chunkSectors: number;
  persistent: boolean;
  overflowOk: boolean;
  /**
   * Keep what the COW holds (an existing snapshot's header and exceptions). By default a
   * persistent COW's header chunk is zeroed first, as lvcreate does, so the new snapshot starts
   * empty instead of silently reloading an old one's exceptions.
   */
  reuseCow?: boolean;
}

/**
 * The devices of one udm process: builds them from tables (opening each device spec once, shared
 * and refcounted, `@NAME` for other udm devices), keeps dependency order on create and remove,
 * and implements dmsetup's suspend / resume / reload through each device's GateDevice.
 *
 * @example
 * ```ts
 * const manager = new DeviceManager({ targets: basicTargets, log, exports: server });
 * await manager.create([{ table: parseDeviceTable("z", "0 2048 zero", "--table", manager.registry), baseDir: "." }]);
 * await manager.suspend("z"); await manager.resume("z");
 * ```
 */
export class DeviceManager {
  readonly registry: ReadonlyMap<string, TargetType>;
  readonly pool = new DevicePool();
  readonly kcopyd: KcopydClient;
  private readonly devices = new Map<string, UdmDevice>();
  private readonly log: DeviceManagerOptions["log"];
  private readonly exports: ExportTable | undefined;
  private readonly exportAllow: ReadonlyMap<string, ExportAllowList>;
  private readonly record: DeviceManagerOptions["record"];
  private lock: Promise<unknown> = Promise.resolve();
  /** How merges of devices that are gone ended (what `mergeState` answers for them). */
  private readonly finishedMerges = new Map<string, { state: "done" | "failed"; error?: string }>();

  constructor(options: DeviceManagerOptions) {
    this.registry = new Map([...options.targets].map((t) => [t.name, t]));
    this.log = options.log;
    this.exports = options.exports;
    this.exportAllow = options.exportAllow ?? new Map();
    this.kcopyd = options.kcopyd ?? new KcopydClient();
    this.record = options.record;
  }

  /** What the metadata record holds: every device, with `change` applied. */
  recordedState(change?: PendingChange): MetadataState {
    const devices: RecordedDevice[] = [];
    for (const dev of this.devices.values()) {
      if (change && "removed" in change && change.removed === dev.name) continue;
      if (change && "device" in change && change.device.name === dev.name) {
        devices.push(change.device);
        continue;
      }
      const recorded = this.recordedDevice(dev);
      if (change && "renamed" in change && change.renamed === dev.name) recorded.name = change.to;
      devices.push(recorded);
    }
    if (change && "device" in change && !this.devices.has(change.device.name)) devices.push(change.device);
    return { devices };
  }

  private recordedDevice(dev: UdmDevice): RecordedDevice {
    return {
      name: dev.name,
      lines: dev.lines.map((l) => formatTableLine(null, { ...l, args: l.args.join(" ") })),
      baseDir: dev.baseDir,
      ...(dev.merge?.state === "merging" && { merging: true }),
      ...(dev.messages?.length && { messages: dev.messages }),
    };
  }

  /**
   * Records the state (with `change` applied) for the command `scope`. Crash points for tests:
   * `UDM_CRASH_AT=<scope>:built` dies before the record is written, `<scope>:recorded` after.
   */
  private async commit(change: PendingChange | undefined, scope: CommandScope): Promise<void> {
    crashPoint(scope, "built");
    if (this.record) await this.record(this.recordedState(change));
    crashPoint(scope, "recorded");
  }

  /**
   * Starts what a metadata record says (`udm serve` after a restart): creates every device and
   * resumes the merges that were in progress.
   */
  activate(state: MetadataState, file: string): Promise<void> {
    const requests = state.devices.map((d) => ({
      table: parseDeviceTable(d.name, d.lines, file, this.registry),
      baseDir: d.baseDir,
    }));
    return this.exclusive(async () => {
      await this.validateCreate(requests);
      const lines = requests.flatMap((r) => r.table.lines.map((line) => ({ line, baseDir: r.baseDir })));
      await this.withSuspended(this.originsOfSnapshots(lines), () =>
        this.buildAll(requests, "create", () => {
          for (const d of state.devices) {
            if (d.messages?.length) this.get(d.name).messages = d.messages;
            if (!d.merging) continue;
            this.armMerge(this.get(d.name));
            this.log.info({ device: d.name }, "merge resumed from the metadata record");
          }
        }),
      );
      for (const d of state.devices) if (d.messages?.length) await this.replayMessages(this.get(d.name));
    });
  }

  /** Device names in creation order. */
  names(): string[] {
    return [...this.devices.keys()];
  }

  /** The stable device of a name (what NBD serves and `@NAME` resolves to). */
  device(name: string): GateDevice {
    return this.get(name).gate;
  }

  has(name: string): boolean {
    return this.devices.has(name);
  }

  /**
   * Creates devices (all or nothing): validates every table first without opening anything,
   * then builds them so that `@NAME` dependencies come first.
   */
  create(requests: TableRequest[]): Promise<void> {
    return this.exclusive(async () => {
      const lines = requests.flatMap((r) => r.table.lines.map((line) => ({ line, baseDir: r.baseDir })));
      await this.validateCreate(requests);
      await this.withSuspended(this.originsOfSnapshots(lines), () => this.buildAll(requests, "create"));
    });
  }

  /**
   * Removes a device: refused (EBUSY, naming the holder) while another device is stacked on it,
   * and, unless `force`, while NBD clients are connected or it is merging. Its export is drained
   * first.
   */
  remove(name: string, options: BusyOptions = {}): Promise<void> {
    return this.exclusive(() => {
      const dev = this.get(name);
      const users = this.usersOf(name);
      if (users.length) {
        throw new DeviceManagerError(
          "EBUSY",
          `${name} is in use by ${users.join(", ")}: remove those first${options.force ? " (--force does not remove a device another device uses)" : ""}`,
        );
      }
      if (dev.merge?.state === "merging" && !options.force) {
        throw new DeviceManagerError(
          "EBUSY",
          `${name} is merging into its origin: wait for the merge (udm snapshot merge ${name}), or --force to abort it`,
        );
      }
      const clients = options.connections?.() ?? 0;
      if (clients > 0 && !options.force) {
        throw new DeviceManagerError(
          "EBUSY",
          `${name} is open by ${clients} NBD client(s): disconnect them first, or --force to disconnect them`,
        );
      }
      const origins = this.originsOfSnapshots(dev.lines.map((line) => ({ line, baseDir: dev.baseDir })));
      return this.withSuspended(
        origins.filter((o) => o !== name),
        async () => {
          // Recorded first: `merge-status` asks while the device goes away.
          if (dev.merge?.state === "merging") {
            const progress = dev.gate.progress();
            const left = progress
              ? ` (${progress.totalBytes - progress.doneBytes} of ${progress.totalBytes} bytes not merged)`
              : "";
            this.finishedMerges.set(name, {
              state: "failed",
              error: `merge aborted: ${name} was removed with --force${left}`,
            });
            this.log.warn({ device: name }, "merging snapshot removed with --force: merge aborted");
          }
          await this.commit({ removed: name }, "remove");
          await this.removeLocked(name);
        },
      );
    });
  }

  /**
   * The live snapshot-origin devices of the origins that snapshot / snapshot-merge lines use:
   * dm requires them suspended while snapshot tables are loaded or unloaded.
   */
  private originsOfSnapshots(lines: Array<{ line: TableLine; baseDir: string }>): string[] {
    const out = new Set<string>();
    for (const { line, baseDir } of lines) {
      if (line.targetType !== "snapshot" && line.targetType !== "snapshot-merge") continue;
      const origin = line.args[0];
      if (origin === undefined) continue;
      for (const name of this.originDevicesOf(canonicalSpec(origin, baseDir))) out.add(name);
    }
    return [...out];
  }

  /**
   * dmsetup suspend: drain and hold I/O, flush (`noflush`: do not flush). Like the kernel's
   * per-device suspend lock, suspend and resume only serialise on the device itself, never on
   * the table lock: a reload or create waiting for I/O to drain (I/O held by another suspended
   * device) is unblocked by `udm resume` of that device.
   */
  async suspend(name: string, options: { noflush?: boolean } = {}): Promise<void> {
    await this.suspendGate(this.get(name).gate, !options.noflush);
  }

  private async suspendGate(gate: GateDevice, flush = true): Promise<void> {
    await gate.suspend({ flush });
    if (gate.lastFlushError) {
      this.log.warn({ device: gate.deviceName, err: gate.lastFlushError }, "suspended, but the flush failed");
    }
  }

  /** dmsetup resume (does not wait for the table lock, see `suspend`). */
  resume(name: string): Promise<void> {
    return this.get(name).gate.resume();
  }

  /**
   * dmsetup reload, dm's way: the new table is built while the old one keeps serving (targets
   * get the old device as `context.previous` and must leave it untouched), then an active
   * device is suspended (I/O held, never failed), each new segment's `preresume` runs, the
   * tables are swapped and the device resumed. A suspended device stays suspended (dmsetup
   * reload only loads; `udm resume` switches). A failure at any step leaves the old table
   * exactly as it was. A reload to a smaller size is refused (EBUSY) while other devices or
   * NBD clients hold the device, unless `force`.
   */
  reload(name: string, request: TableRequest, options: BusyOptions = {}): Promise<void> {
    return this.exclusive(() => this.reloadLocked(name, request, options));
  }

  /** dmsetup message NAME SECTOR ARGV...: goes to the segment holding SECTOR. */
  async message(name: string, sector: number, argv: string[]): Promise<string | undefined> {
    const dev = this.get(name);
    const index = dev.lines.findIndex(
      (l) => sector >= l.startSectors && sector < l.startSectors + l.lengthSectors,
    );
    const target = dev.segments[index];
    if (!target) {
      throw new DeviceManagerError("EINVAL", `${name}: sector ${sector} is outside the device`);
    }
    if (!target.message) {
      throw new DeviceManagerError("EINVAL", `${name}: target ${target.targetType} takes no messages`);
    }
    const reply = await target.message(argv);
    if (PERSISTED_MESSAGES[target.targetType]?.includes(argv[0] ?? "") && dev.segments[index] === target) {
      // A setting meant to persist: recorded (replacing the last of its kind for this segment).
      const start = dev.lines[index]!.startSectors;
      const kept = (dev.messages ?? []).filter((m) => !(m.sector === start && m.argv[0] === argv[0]));
      await this.commit(
        { device: { ...this.recordedDevice(dev), messages: [...kept, { sector: start, argv }] } },
        "message",
      );
      dev.messages = [...kept, { sector: start, argv: [...argv] }];
    }
    return reply;
  }

  /** Sends the recorded message settings to a device started from the record. */
  private async replayMessages(dev: UdmDevice): Promise<void> {
    for (const m of dev.messages ?? []) {
      const index = dev.lines.findIndex((l) => l.startSectors === m.sector);
      const target = dev.segments[index];
      if (!target?.message) {
        throw new DeviceManagerError(
          "EINVAL",
          `${dev.name}: the recorded message "${m.argv.join(" ")}" names no segment at sector ${m.sector}`,
        );
      }
      await target.message(m.argv);
      this.log.info(
        { device: dev.name, message: m.argv.join(" ") },
        "message setting restored from the metadata record",
      );
    }
  }

  /** `dmsetup table NAME` lines (one per segment). */
  table(name: string): SegmentLine[] {
    const dev = this.get(name);
    return dev.lines.map((l, i) => ({ ...lineHead(l), args: dev.segments[i]!.table() }));
  }

  /** `dmsetup status NAME` lines (one per segment). */
  status(name: string): SegmentLine[] {
    const dev = this.get(name);
    return dev.lines.map((l, i) => ({ ...lineHead(l), args: dev.segments[i]!.status() }));
  }

  /** What `udm info` shows about a device. */
  info(name: string): DeviceInfo {
    const dev = this.get(name);
    const allow = this.exportAllow.get(name);
    return {
      name,
      state: dev.gate.state,
      sizeBytes: dev.gate.sizeBytes,
      sizeSectors: dev.gate.sizeBytes / SECTOR_SIZE,
      targets: dev.lines.map((l) => l.targetType),
      uses: [...dev.uses],
      usedBy: this.usersOf(name),
      heldRequests: dev.gate.heldRequests,
      progress: dev.gate.progress(),
      ...(allow && { allow }),
      events: dev.events ?? 0,
      devices: [...new Set([...dev.held, ...[...dev.uses].map((u) => `@${u}`)])],
    };
  }

  /** The state of an LVM-like merge started by `snapshotMerge` (null when none is running). */
  mergeState(name: string): {
    state: "merging" | "failed" | "done";
    error?: string;
    progress: TargetProgress | null;
  } {
    const dev = this.devices.get(name);
    if (!dev) {
      const finished = this.finishedMerges.get(name);
      if (finished) return { ...finished, progress: null };
      this.get(name); // throws ENOENT naming the devices
    }
    if (!dev?.merge) throw new DeviceManagerError("EINVAL", `${name} is not merging`);
    return { ...dev.merge, progress: dev.gate.progress() };
  }

  /**
   * LVM-like `lvcreate -s`: suspends every snapshot-origin device of ORIGIN's origin, creates a
   * `snapshot` device on the same origin and the COW, resumes. No write is lost or torn: writes
   * in flight finish before, held writes see the new snapshot. Everything that can be checked is
   * checked before anything is written (the COW created or its header zeroed).
   */
  snapshotCreate(originName: string, snapName: string, options: SnapshotCreateOptions): Promise<void> {
    return this.exclusive(async () => {
      const source = { file: "snapshot create", line: 1 };
      checkDeviceName(snapName, source);
      const origin = this.get(originName);
      const line = origin.lines[0]!;
      if (origin.lines.length !== 1 || line.targetType !== "snapshot-origin") {
        throw new DeviceManagerError(
          "EINVAL",
          `${originName} is a ${origin.lines.map((l) => l.targetType).join("+")} device: a snapshot needs a snapshot-origin device (reload it as "0 ${origin.gate.sizeBytes / SECTOR_SIZE} snapshot-origin <dev>" first)`,
        );
      }
      const { cow } = options;
      const store = options.persistent ? (options.overflowOk ? "PO" : "P") : "N";
      const table: DeviceTable = {
        name: snapName,
        lines: [
          {
            startSectors: 0,
            lengthSectors: line.lengthSectors,
            targetType: "snapshot",
            args: [line.args[0]!, cow, store, String(options.chunkSectors)],
            source,
          },
        ],
      };
      const request = { table, baseDir: origin.baseDir };
      await this.validateCreate([request]);
      this.checkCowFree(cow);
      const create =
        options.createSizeBytes !== undefined && isPathSpec(cow) && !existsSync(cow)
          ? options.createSizeBytes
          : undefined;
      if (create === undefined) await this.checkCowUsable(cow, options);
      // Nothing written so far; from here on only an I/O error can fail the command.
      let created = false;
      try {
        if (create !== undefined) {
          const dev = await this.pool.acquire(cow, { createSizeBytes: create });
          created = true;
          await this.pool.release(cow);
          this.log.info({ device: snapName, cow, sizeBytes: dev.sizeBytes }, "created COW file");
        }
        if (options.persistent && !options.reuseCow) await this.zeroCowHeader(cow, options.chunkSectors);
        crashPoint("snapshot-create", "cow-zeroed");
        await this.withSuspended(
          this.originsOfSnapshots([{ line: table.lines[0]!, baseDir: origin.baseDir }]),
          () => this.buildAll([request], "snapshot-create"),
        );
      } catch (err) {
        if (created) {
          try {
            unlinkSync(cow);
          } catch {}
        }
        throw err;
      }
    });
  }

  /** A COW another live device uses would lose its exceptions: refused. */
  private checkCowFree(cow: string): void {
    const users = [...this.devices.values()].filter((d) =>
      cow.startsWith("@") ? d.uses.has(cow.slice(1)) : d.held.includes(cow),
    );
    if (users.length > 0 || (!cow.startsWith("@") && this.pool.refs(cow) > 0)) {
      throw new DeviceManagerError(
        "EBUSY",
        `COW ${cow} is in use${users.length ? ` by ${users.map((d) => d.name).join(", ")}` : ""}: a new snapshot needs a COW of its own`,
      );
    }
  }

  /** Opens an existing COW to check it is writable and holds a header and a metadata chunk. */
  private async checkCowUsable(cow: string, options: SnapshotCreateOptions): Promise<void> {
    let dev: BlockDevice;
    if (cow.startsWith("@")) {
      dev = this.get(cow.slice(1)).gate;
    } else {
      try {
        dev = await this.pool.acquire(cow);
      } catch (err) {
        throw new DeviceManagerError(
          "EINVAL",
          `COW ${cow}: ${(err as Error).message}${isPathSpec(cow) && !existsSync(cow) ? " (give --size to create it)" : ""}`,
        );
      }
    }
    try {
      if (dev.readOnly) throw new DeviceManagerError("EINVAL", `COW ${cow} is read-only`);
      const needed = 2 * options.chunkSectors * SECTOR_SIZE;
      if (options.persistent && dev.sizeBytes < needed) {
        throw new DeviceManagerError(
          "EINVAL",
          `COW ${cow} is ${dev.sizeBytes} bytes: a persistent COW needs at least a header and a metadata chunk (${needed} bytes)`,
        );
      }
    } finally {
      if (!cow.startsWith("@")) await this.pool.release(cow);
    }
  }

  /**
   * Zeroes the header chunk of a COW about to back a new snapshot (lvcreate zeroes the start of
   * the COW volume): the store then writes a fresh header instead of loading old exceptions.
   * Called once the COW was checked (`checkCowFree`, `checkCowUsable`).
   */
  private async zeroCowHeader(cow: string, chunkSectors: number): Promise<void> {
    const bytes = Math.max(chunkSectors, 1) * SECTOR_SIZE;
    const dev: BlockDevice = cow.startsWith("@") ? this.get(cow.slice(1)).gate : await this.pool.acquire(cow);
    try {
      await dev.write(0, Buffer.alloc(Math.min(bytes, dev.sizeBytes)));
      await dev.flush();
    } finally {
      if (!cow.startsWith("@")) await this.pool.release(cow);
    }
    this.log.info({ cow, bytes }, "zeroed the COW header chunk for a new snapshot");
  }

  /**
   * The devices a spec stands for, itself included: a pooled spec, or `@NAME` and everything
   * that device's table uses, recursively.
   */
  private stackOf(spec: string): Set<string> {
    const out = new Set<string>();
    const visit = (s: string) => {
      if (out.has(s)) return;
      out.add(s);
      const dev = s.startsWith("@") ? this.devices.get(s.slice(1)) : undefined;
      if (!dev) return;
      for (const held of dev.held) visit(held);
      for (const used of dev.uses) visit(`@${used}`);
    };
    visit(spec);
    return out;
  }

  /**
   * A snapshot's COW may not be its origin (dm: "COW device cannot be the same as origin
   * device"), nor a device stacked on the origin or on a snapshot-origin device of it: writing
   * the COW would write the origin, and building the snapshot would wait forever on the origin
   * devices suspended for it.
   */
  private checkCowNotOnOrigin(line: TableLine, baseDir: string): void {
    if (line.targetType !== "snapshot" && line.targetType !== "snapshot-merge") return;
    const [originArg, cowArg] = line.args;
    if (originArg === undefined || cowArg === undefined) return;
    const originSpec = canonicalSpec(originArg, baseDir);
    const cowSpec = canonicalSpec(cowArg, baseDir);
    const forbidden = new Set([originSpec, ...this.originDevicesOf(originSpec).map((n) => `@${n}`)]);
    // The nearest offender: the stack is in visiting order, the COW itself first.
    const hit = [...this.stackOf(cowSpec)].find((spec) => forbidden.has(spec));
    if (hit === undefined) return;
    const what = hit === originSpec ? `the origin ${hit}` : `${hit}, a snapshot-origin device of the origin`;
    throw new TableParseError(
      line.source,
      `${line.targetType} argument 2 ("${cowArg}"): the COW ${hit === cowSpec ? "is" : "stacks on"} ${what}: a COW must be a device of its own`,
    );
  }

  /**
   * LVM-like `lvconvert --merge`: reloads SNAP as `snapshot-merge` on the same origin and COW;
   * when the target reports the merge done (`whenMerged()`), the device is removed.
   */
  snapshotMerge(snapName: string): Promise<void> {
    return this.exclusive(async () => {
      const dev = this.get(snapName);
      const line = dev.lines[0]!;
      if (dev.lines.length !== 1 || line.targetType !== "snapshot") {
        throw new DeviceManagerError(
          "EINVAL",
          `${snapName} is not a snapshot (its target is ${line.targetType})`,
        );
      }
      const [origin, cow, store, chunk, ...features] = line.args;
      if (!store?.toUpperCase().startsWith("P")) {
        throw new DeviceManagerError(
          "EINVAL",
          `${snapName} has a transient COW (N): only persistent snapshots merge`,
        );
      }
      const table: DeviceTable = {
        name: snapName,
        lines: [{ ...line, targetType: "snapshot-merge", args: [origin!, cow!, store, chunk!, ...features] }],
      };
      // The snapshot hands its exceptions over while its table is built: hold its I/O meanwhile.
      const origins = this.originDevicesOf(canonicalSpec(origin!, dev.baseDir));
      await this.withSuspended([...origins, snapName], () =>
        this.reloadLocked(snapName, { table, baseDir: dev.baseDir }, { merging: true }),
      );
      this.armMerge(dev);
    });
  }

  /**
   * Follows the merge of a `snapshot-merge` device as LVM does: `merge-status` answers from
   * `dev.merge`, and the device is removed (and recorded so) when the merge is done.
   */
  private armMerge(dev: UdmDevice): void {
    const snapName = dev.name;
    const target = dev.segments[0] as TargetDevice & { whenMerged?: () => Promise<void> };
    if (dev.lines.length !== 1 || typeof target?.whenMerged !== "function") {
      throw new DeviceManagerError(
        "EINVAL",
        `${snapName}: the snapshot-merge target does not report completion`,
      );
    }
    const origin = dev.lines[0]!.args[0]!;
    dev.merge = { state: "merging" };
    this.finishedMerges.delete(snapName);
    target.whenMerged().then(
      () =>
        this.exclusive(async () => {
          // Reloaded or removed meanwhile: this merge is not the device's any more.
          if (this.devices.get(snapName) !== dev || dev.segments[0] !== target) return;
          const origins = this.originDevicesOf(canonicalSpec(origin, dev.baseDir));
          this.finishedMerges.set(snapName, { state: "done" });
          await this.withSuspended(origins, async () => {
            await this.commit({ removed: snapName }, "merged");
            await this.removeLocked(snapName);
          });
        }).catch((err: Error) => {
          dev.merge = { state: "failed", error: `merged, but removing failed: ${err.message}` };
        }),
      (err: Error) => {
        if (dev.segments[0] !== target) return;
        dev.merge = { state: "failed", error: err.message };
        this.log.error({ device: snapName, err }, "merge failed");
      },
    );
  }

  /**
   * Resumes every suspended device, so held requests can finish before a shutdown drains them.
   * All at once and without the table lock: a command waiting for a drain finishes once the
   * device holding its I/O is resumed.
   */
  async resumeAll(): Promise<void> {
    await Promise.all(
      [...this.devices.values()]
        .filter((dev) => dev.gate.state === "suspended")
        .map((dev) => {
          this.log.info({ device: dev.name }, "resuming for shutdown");
          return dev.gate.resume();
        }),
    );
  }

  /** Removes every device, users before what they use (server shutdown). */
  closeAll(): Promise<void> {
    return this.exclusive(async () => {
      let errors = 0;
      while (this.devices.size > 0) {
        let free = [...this.devices.keys()].filter((n) => this.usersOf(n).length === 0);
        if (free.length === 0) free = [...this.devices.keys()];
        for (const name of free.reverse()) {
          try {
            await this.removeLocked(name);
          } catch (err) {
            errors++;
            this.log.error({ device: name, err }, "closing device failed");
            this.devices.delete(name);
          }
        }
      }
      await this.kcopyd.destroy();
      if (errors) throw new Error(`${errors} device(s) failed to close cleanly`);
    });
  }

  /** snapshot-origin devices whose origin is the canonical spec (LVM suspends them around snapshot changes). */
  private originDevicesOf(originSpec: string): string[] {
    return [...this.devices.values()]
      .filter(
        (d) =>
          d.lines.length === 1 &&
          d.lines[0]!.targetType === "snapshot-origin" &&
          d.lines[0]!.args[0] !== undefined &&
          canonicalSpec(d.lines[0]!.args[0], d.baseDir) === originSpec,
      )
      .map((d) => d.name);
  }

  /** Runs fn with the named devices suspended (those already suspended stay so). */
  private async withSuspended<T>(names: string[], fn: () => Promise<T>): Promise<T> {
    const suspended: GateDevice[] = [];
    try {
      for (const name of names) {
        const gate = this.get(name).gate;
        if (gate.state !== "active") continue;
        await this.suspendGate(gate);
        suspended.push(gate);
      }
      return await fn();
    } finally {
      for (const gate of suspended.reverse()) await gate.resume();
    }
  }

  /** Runs fn alone: table changes never interleave. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn, fn);
    this.lock = run.catch(() => undefined);
    return run;
  }

  private get(name: string): UdmDevice {
    const dev = this.devices.get(name);
    if (!dev) {
      const known = this.names();
      throw new DeviceManagerError(
        "ENOENT",
        `no device "${name}"${known.length ? ` (devices: ${known.join(", ")})` : " (no devices)"}`,
      );
    }
    return dev;
  }

  private usersOf(name: string): string[] {
    return [...this.devices.values()].filter((d) => d.uses.has(name)).map((d) => d.name);
  }

  /** Checks every table of a create (names, arguments, `@NAME`s, COWs) before anything is opened. */
  private async validateCreate(requests: TableRequest[]): Promise<void> {
    const batch = new Map<string, TableRequest>();
    for (const r of requests) {
      const source = r.table.lines[0]?.source ?? { file: "table", line: 1 };
      if (this.devices.has(r.table.name) || batch.has(r.table.name)) {
        throw new TableParseError(source, `device "${r.table.name}" already exists`);
      }
      batch.set(r.table.name, r);
    }
    for (const r of requests) {
      for (const line of r.table.lines) {
        await this.probe(
          line,
          r.table.name,
          (dep) => this.devices.has(dep) || (batch.has(dep) && dep !== r.table.name),
        );
        this.checkCowNotOnOrigin(line, r.baseDir);
      }
    }
    orderByDependency(requests); // throws on a cycle
  }

  /** Builds validated tables, `@NAME` dependencies first, and records them; all or nothing. */
  private async buildAll(
    requests: TableRequest[],
    scope: CommandScope,
    beforeCommit?: () => void,
  ): Promise<void> {
    const created: string[] = [];
    try {
      for (const r of orderByDependency(requests)) {
        await this.build(r);
        created.push(r.table.name);
      }
      beforeCommit?.();
      await this.commit(undefined, scope);
    } catch (err) {
      for (const name of created.reverse()) {
        await this.removeLocked(name).catch((e: Error) =>
          this.log.error({ device: name, err: e }, "rollback failed"),
        );
      }
      throw err;
    }
  }

  private async probe(
    line: TableLine,
    deviceName: string,
    knownDevice: (name: string) => boolean,
  ): Promise<void> {
    await probeTableLine(
      line,
      this.registry,
      { kcopyd: this.kcopyd, deviceName, log: this.log.child({ device: deviceName, probe: true }) },
      (spec) => {
        if (spec.startsWith("@")) {
          const dep = spec.slice(1);
          if (dep === deviceName) throw new Error(`a device cannot use itself`);
          if (!knownDevice(dep)) {
            throw new Error(`no udm device "${dep}" (expected @NAME of an existing device)`);
          }
        }
      },
    );
  }

  /** Builds the table of one device, runs its preresume (dm's create = load + resume) and publishes it. */
  private async build(request: TableRequest): Promise<void> {
    const { name } = request.table;
    const built = await this.buildTable(request, undefined);
    try {
      await preresumeAll(built.segments, request.table.lines, this.registry);
    } catch (err) {
      await this.discard(built);
      throw err;
    }
    this.finishedMerges.delete(name);
    const gate = new GateDevice(name, built.device);
    this.devices.set(name, {
      name,
      gate,
      lines: request.table.lines,
      baseDir: request.baseDir,
      segments: built.segments,
      held: built.held,
      uses: built.uses,
    });
    this.watchEvents(this.devices.get(name)!);
    const allow = this.exportAllow.get(name);
    this.exports?.addExport(name, gate, {
      description: built.segments.map((s) => s.targetType).join("+"),
      ...(allow && { allow }),
    });
    this.log.info(
      { device: name, sizeBytes: gate.sizeBytes, targets: request.table.lines.length },
      "device created",
    );
  }

  private async buildTable(request: TableRequest, previous: UdmDevice | undefined) {
    const { name, lines } = request.table;
    const held: string[] = [];
    const uses = new Set<string>();
    const segments: TargetDevice[] = [];
    try {
      for (const [i, line] of lines.entries()) {
        const context: TargetContext = {
          openDevice: (spec, options) => this.openFor(line, spec, options, request.baseDir, held, uses),
          kcopyd: this.kcopyd,
          log: this.log.child({ device: name, ...(lines.length > 1 && { segment: i }) }),
          deviceName: name,
          ...(previous?.segments[i] && { previous: previous.segments[i] }),
        };
        const lengthBytes = line.lengthSectors * SECTOR_SIZE;
        let target: TargetDevice;
        try {
          target = await this.registry.get(line.targetType)!.create(line.args, lengthBytes, context);
        } catch (err) {
          throw targetError(line, err, this.registry);
        }
        segments.push(target);
        if (target.sizeBytes !== lengthBytes) {
          throw new TableParseError(
            line.source,
            `${line.targetType} built a device of ${target.sizeBytes / SECTOR_SIZE} sectors, the line says ${line.lengthSectors}`,
          );
        }
      }
    } catch (err) {
      await this.discard({ segments, held });
      throw err;
    }
    let start = 0;
    const device =
      segments.length === 1
        ? segments[0]!
        : new SegmentedDevice(
            `@${name}`,
            segments.map((target) => {
              const s = { startBytes: start, target };
              start += target.sizeBytes;
              return s;
            }),
          );
    return { device, segments, held, uses };
  }

  /** `context.openDevice` of one table line: `@NAME` or a pooled spec; errors name the argument. */
  private async openFor(
    line: TableLine,
    spec: string,
    options: OpenDeviceOptions | undefined,
    baseDir: string,
    held: string[],
    uses: Set<string>,
  ): Promise<BlockDevice> {
    try {
      if (spec.startsWith("@")) {
        const dep = this.devices.get(spec.slice(1));
        if (!dep) throw new Error(`no udm device "${spec.slice(1)}"`);
        uses.add(dep.name);
        return dep.gate;
      }
      const canonical = canonicalSpec(spec, baseDir);
      const dev = await this.pool.acquire(canonical, options);
      held.push(canonical);
      return dev;
    } catch (err) {
      if (err instanceof TargetArgError) throw err;
      throw new TargetArgError(argIndexOf(line, spec), (err as Error).message);
    }
  }

  /** Closes a table that was built but never served, and releases the devices it held. */
  private async discard(built: { segments: TargetDevice[]; held: string[] }): Promise<void> {
    await Promise.allSettled(built.segments.map((s) => s.close()));
    for (const spec of built.held) await this.pool.release(spec).catch(() => undefined);
  }

  private async reloadLocked(
    name: string,
    request: TableRequest,
    /** `merging`: record the device as an LVM-like merge in progress (`snapshotMerge`). */
    options: BusyOptions & { merging?: boolean } = {},
  ): Promise<void> {
    const dev = this.get(name);
    if (request.table.name !== name) request = { ...request, table: { ...request.table, name } };
    const dependents = this.dependentsOf(name);
    for (const line of request.table.lines) {
      await this.probe(line, name, (dep) => this.devices.has(dep) && !dependents.has(dep));
      this.checkCowNotOnOrigin(line, request.baseDir);
    }
    const last = request.table.lines[request.table.lines.length - 1];
    const newSize = last ? (last.startSectors + last.lengthSectors) * SECTOR_SIZE : 0;
    if (newSize < dev.gate.sizeBytes && !options.force) {
      const users = this.usersOf(name);
      const clients = options.connections?.() ?? 0;
      if (users.length || clients) {
        throw new DeviceManagerError(
          "EBUSY",
          `${name}: the new table is ${newSize / SECTOR_SIZE} sectors, smaller than the ${dev.gate.sizeBytes / SECTOR_SIZE} sectors ${[
            ...(users.length ? [`${users.join(", ")} (stacked on it)`] : []),
            ...(clients ? [`${clients} NBD client(s)`] : []),
          ].join(" and ")} may address: --force to reload anyway`,
        );
      }
    }
    // Built while the old table keeps serving; the old one is only touched after the suspend.
    const built = await this.buildTable(request, dev);
    let switched: Awaited<ReturnType<GateDevice["replace"]>>;
    try {
      switched = await dev.gate.replace(built.device, async () => {
        if (dev.gate.lastFlushError) {
          this.log.warn({ device: name, err: dev.gate.lastFlushError }, "suspended, but the flush failed");
        }
        await preresumeAll(built.segments, request.table.lines, this.registry);
        await this.commit(
          {
            device: {
              name,
              lines: request.table.lines.map((l) => formatTableLine(null, { ...l, args: l.args.join(" ") })),
              baseDir: request.baseDir,
              ...(options.merging && { merging: true }),
            },
          },
          options.merging ? "snapshot-merge" : "reload",
        );
      });
    } catch (err) {
      await this.discard(built);
      throw err;
    }
    const oldHeld = dev.held;
    Object.assign(dev, {
      lines: request.table.lines,
      baseDir: request.baseDir,
      segments: built.segments,
      held: built.held,
      uses: built.uses,
    });
    delete dev.merge;
    // A new table is a new target: message settings are gone (as in dm); so is their record.
    delete dev.messages;
    this.watchEvents(dev);
    this.exports?.replaceExportDevice(name, dev.gate);
    this.log.info(
      { device: name, targets: request.table.lines.length, resumed: switched.resumed },
      switched.resumed || switched.resumeError
        ? "table reloaded"
        : "table loaded; the device stays suspended until resume",
    );
    // The reload has happened: a failure to close the old table is logged, not reported as failure.
    await switched.old
      .close()
      .catch((err: Error) => this.log.warn({ device: name, err }, "closing the old table failed"));
    for (const spec of oldHeld) {
      await this.pool
        .release(spec)
        .catch((err: Error) => this.log.warn({ device: name, spec, err }, "closing a device failed"));
    }
    if (switched.resumeError) {
      throw new DeviceManagerError(
        "EIO",
        `${name}: the new table is loaded but resuming it failed (the device stays suspended): ${switched.resumeError.message}`,
      );
    }
  }

  /** Counts the events of the device's current segments (a replaced table's are ignored). */
  private watchEvents(dev: UdmDevice): void {
    for (const segment of dev.segments) {
      segment.onEvent?.(() => {
        if (!dev.segments.includes(segment)) return;
        dev.events = (dev.events ?? 0) + 1;
        this.log.info({ device: dev.name, events: dev.events }, "device event");
      });
    }
  }

  /**
   * `dmsetup rename`: the device and its export take a new name; clients stay connected. A device
   * other tables use (as `@NAME`) is refused: their tables would name a device that is gone.
   */
  rename(name: string, newName: string): Promise<void> {
    return this.exclusive(async () => {
      const dev = this.get(name);
      try {
        checkDeviceName(newName, { file: "rename", line: 1 });
      } catch (err) {
        throw new DeviceManagerError("EINVAL", (err as Error).message);
      }
      if (this.devices.has(newName))
        throw new DeviceManagerError("EEXIST", `device "${newName}" already exists`);
      const users = this.usersOf(name);
      if (users.length) {
        throw new DeviceManagerError(
          "EBUSY",
          `${name} is in use by ${users.join(", ")} (their tables name @${name}): remove or reload those first`,
        );
      }
      if (this.exports && !this.exports.renameExport) {
        throw new DeviceManagerError("EINVAL", "this server's export table cannot rename exports");
      }
      // Recorded under the new name before anything is renamed: a failed record changes nothing.
      await this.commit({ renamed: name, to: newName }, "rename");
      const allow = this.exportAllow.get(newName);
      this.exports?.renameExport?.(name, newName, { ...(allow && { allow }) });
      // Re-insert under the new name, keeping creation order.
      const entries = [...this.devices.entries()].map(([n, d]): [string, UdmDevice] =>
        n === name ? [newName, d] : [n, d],
      );
      this.devices.clear();
      for (const [n, d] of entries) this.devices.set(n, d);
      dev.name = newName;
      this.log.info({ device: newName, from: name }, "device renamed");
    });
  }

  /** Names of every device that uses `name`, directly or not (to refuse cycles). */
  private dependentsOf(name: string): Set<string> {
    const out = new Set<string>([name]);
    let grew = true;
    while (grew) {
      grew = false;
      for (const d of this.devices.values()) {
        if (!out.has(d.name) && [...d.uses].some((u) => out.has(u))) {
          out.add(d.name);
          grew = true;
        }
      }
    }
    return out;
  }

  private async removeLocked(name: string): Promise<void> {
    const dev = this.get(name);
    const users = this.usersOf(name);
    if (users.length) {
      throw new DeviceManagerError("EBUSY", `${name} is in use by ${users.join(", ")}: remove those first`);
    }
    // Held requests must drain through the export, so let them through first.
    await dev.gate.resume();
    await this.exports?.removeExport(name);
    await dev.gate.close();
    this.devices.delete(name);
    try {
      await dev.gate.current.close();
    } finally {
      for (const spec of dev.held) await this.pool.release(spec);
      this.log.info({ device: name }, "device removed");
    }
  }
}

/**
 * dm's preresume of a new table, segment by segment; an error names the table line. The old
 * table (if any) is suspended and drained when this runs.
 */
async function preresumeAll(
  segments: TargetDevice[],
  lines: TableLine[],
  registry: ReadonlyMap<string, TargetType>,
): Promise<void> {
  for (const [i, segment] of segments.entries()) {
    try {
      await segment.preresume?.();
    } catch (err) {
      throw targetError(lines[i]!, err, registry);
    }
  }
}

function lineHead(l: TableLine) {
  return { startSectors: l.startSectors, lengthSectors: l.lengthSectors, targetType: l.targetType };
}

function isPathSpec(spec: string): boolean {
  return spec.startsWith("/");
}

/** Orders tables so every `@NAME` a table uses comes before it; throws on a cycle. */
export function orderByDependency(requests: TableRequest[]): TableRequest[] {
  const byName = new Map(requests.map((r) => [r.table.name, r]));
  const out: TableRequest[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = (r: TableRequest, path: string[]) => {
    const name = r.table.name;
    if (state.get(name) === "done") return;
    if (state.get(name) === "visiting") {
      const line = r.table.lines[0]!;
      throw new TableParseError(
        line.source,
        `devices use each other in a cycle: ${[...path, name].join(" -> @")}`,
      );
    }
    state.set(name, "visiting");
    for (const line of r.table.lines) {
      for (const arg of line.args) {
        const dep = arg.startsWith("@") ? byName.get(arg.slice(1)) : undefined;
        if (dep) visit(dep, [...path, name]);
      }
    }
    state.set(name, "done");
    out.push(r);
  };
  for (const r of requests) visit(r, []);
  return out;
}

/** Formats segment lines as dmsetup prints them for a device (`NAME: start length type args`). */
export function formatSegmentLines(name: string | null, lines: SegmentLine[]): string[] {
  return lines.map((l) => formatTableLine(name, l));
}
