import { existsSync } from "node:fs";
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
import { SegmentedDevice } from "./segmented-device.js";
import {
  argIndexOf,
  checkDeviceName,
  type DeviceTable,
  formatTableLine,
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
    readonly code: "ENOENT" | "EEXIST" | "EBUSY" | "EINVAL",
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
}

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
  private lock: Promise<unknown> = Promise.resolve();

  constructor(options: DeviceManagerOptions) {
    this.registry = new Map([...options.targets].map((t) => [t.name, t]));
    this.log = options.log;
    this.exports = options.exports;
    this.exportAllow = options.exportAllow ?? new Map();
    this.kcopyd = options.kcopyd ?? new KcopydClient();
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
    return this.exclusive(() =>
      this.withSuspended(
        this.originsOfSnapshots(
          requests.flatMap((r) => r.table.lines.map((line) => ({ line, baseDir: r.baseDir }))),
        ),
        () => this.createLocked(requests),
      ),
    );
  }

  /** Removes a device nobody uses; its export is drained first. */
  remove(name: string): Promise<void> {
    return this.exclusive(() => {
      const dev = this.get(name);
      const origins = this.originsOfSnapshots(dev.lines.map((line) => ({ line, baseDir: dev.baseDir })));
      return this.withSuspended(
        origins.filter((o) => o !== name),
        () => this.removeLocked(name),
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
   * dmsetup suspend: drain and hold I/O, flush. The table lock is only held to start the suspend,
   * not while in-flight I/O drains: I/O that waits on another suspended device (a stacked `@NAME`)
   * completes once that one is resumed, and `udm resume` of it must not queue behind this drain.
   */
  async suspend(name: string): Promise<void> {
    const started = await this.exclusive(async () => ({ done: this.suspendGate(this.get(name).gate) }));
    await started.done;
  }

  private async suspendGate(gate: GateDevice): Promise<void> {
    await gate.suspend();
    if (gate.lastFlushError) {
      this.log.warn({ device: gate.deviceName, err: gate.lastFlushError }, "suspended, but the flush failed");
    }
  }

  /** dmsetup resume. */
  resume(name: string): Promise<void> {
    return this.exclusive(() => this.get(name).gate.resume());
  }

  /**
   * dmsetup reload + resume: builds the new table (targets get the old device as
   * `context.previous`), suspends, swaps, resumes, then closes the old table.
   */
  reload(name: string, request: TableRequest): Promise<void> {
    return this.exclusive(() => this.reloadLocked(name, request));
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
    return target.message(argv);
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
    };
  }

  /** The state of an LVM-like merge started by `snapshotMerge` (null when none is running). */
  mergeState(name: string): {
    state: "merging" | "failed" | "done";
    error?: string;
    progress: TargetProgress | null;
  } {
    const dev = this.devices.get(name);
    if (!dev) return { state: "done", progress: null };
    if (!dev.merge) throw new DeviceManagerError("EINVAL", `${name} is not merging`);
    return { ...dev.merge, progress: dev.gate.progress() };
  }

  /**
   * LVM-like `lvcreate -s`: suspends the snapshot-origin devices of ORIGIN's origin, creates a
   * `snapshot` device on the same origin and the COW, resumes. No write is lost or torn: writes
   * in flight finish before, held writes see the new snapshot.
   */
  snapshotCreate(originName: string, snapName: string, options: SnapshotCreateOptions): Promise<void> {
    return this.exclusive(async () => {
      checkDeviceName(snapName, { file: "snapshot create", line: 1 });
      const origin = this.get(originName);
      const line = origin.lines[0]!;
      if (origin.lines.length !== 1 || line.targetType !== "snapshot-origin") {
        throw new DeviceManagerError(
          "EINVAL",
          `${originName} is a ${origin.lines.map((l) => l.targetType).join("+")} device: a snapshot needs a snapshot-origin device (reload it as "0 ${origin.gate.sizeBytes / SECTOR_SIZE} snapshot-origin <dev>" first)`,
        );
      }
      if (options.createSizeBytes !== undefined && isPathSpec(options.cow) && !existsSync(options.cow)) {
        const dev = await this.pool.acquire(options.cow, { createSizeBytes: options.createSizeBytes });
        await this.pool.release(options.cow);
        this.log.info({ device: snapName, cow: options.cow, sizeBytes: dev.sizeBytes }, "created COW file");
      }
      if (options.persistent && !options.reuseCow)
        await this.zeroCowHeader(options.cow, options.chunkSectors);
      const store = options.persistent ? (options.overflowOk ? "PO" : "P") : "N";
      const args = [line.args[0]!, options.cow, store, String(options.chunkSectors)];
      const table: DeviceTable = {
        name: snapName,
        lines: [
          {
            startSectors: 0,
            lengthSectors: line.lengthSectors,
            targetType: "snapshot",
            args,
            source: { file: "snapshot create", line: 1 },
          },
        ],
      };
      await this.withSuspended([originName], () => this.createLocked([{ table, baseDir: origin.baseDir }]));
    });
  }

  /**
   * Zeroes the header chunk of a COW about to back a new snapshot (lvcreate zeroes the start of
   * the COW volume): the store then writes a fresh header instead of loading old exceptions.
   * Refused while a live device uses the same COW, whose exceptions this would destroy.
   */
  private async zeroCowHeader(cow: string, chunkSectors: number): Promise<void> {
    const users = [...this.devices.values()].filter((d) =>
      cow.startsWith("@") ? d.uses.has(cow.slice(1)) : d.held.includes(cow),
    );
    if (users.length > 0 || (!cow.startsWith("@") && this.pool.refs(cow) > 0)) {
      throw new DeviceManagerError(
        "EBUSY",
        `COW ${cow} is in use${users.length ? ` by ${users.map((d) => d.name).join(", ")}` : ""}: a new snapshot needs a COW of its own`,
      );
    }
    const bytes = Math.max(chunkSectors, 1) * SECTOR_SIZE;
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
      await dev.write(0, Buffer.alloc(Math.min(bytes, dev.sizeBytes)));
      await dev.flush();
    } finally {
      if (!cow.startsWith("@")) await this.pool.release(cow);
    }
    this.log.info({ cow, bytes }, "zeroed the COW header chunk for a new snapshot");
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
      const origins = this.originDevicesOf(canonicalSpec(origin!, dev.baseDir));
      await this.withSuspended(origins, () => this.reloadLocked(snapName, { table, baseDir: dev.baseDir }));
      const target = dev.segments[0] as TargetDevice & { whenMerged?: () => Promise<void> };
      if (typeof target.whenMerged !== "function") {
        throw new DeviceManagerError(
          "EINVAL",
          `${snapName}: the snapshot-merge target does not report completion`,
        );
      }
      dev.merge = { state: "merging" };
      target.whenMerged().then(
        () =>
          this.remove(snapName).catch((err: Error) => {
            dev.merge = { state: "failed", error: `merged, but removing failed: ${err.message}` };
          }),
        (err: Error) => {
          dev.merge = { state: "failed", error: err.message };
          this.log.error({ device: snapName, err }, "merge failed");
        },
      );
    });
  }

  /** Resumes every suspended device, so held requests can finish before a shutdown drains them. */
  resumeAll(): Promise<void> {
    return this.exclusive(async () => {
      for (const dev of this.devices.values()) {
        if (dev.gate.state === "suspended") {
          this.log.info({ device: dev.name }, "resuming for shutdown");
          await dev.gate.resume();
        }
      }
    });
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

  private async createLocked(requests: TableRequest[]): Promise<void> {
    const batch = new Map<string, TableRequest>();
    for (const r of requests) {
      const source = r.table.lines[0]?.source ?? { file: "table", line: 1 };
      if (this.devices.has(r.table.name) || batch.has(r.table.name)) {
        throw new TableParseError(source, `device "${r.table.name}" already exists`);
      }
      batch.set(r.table.name, r);
    }
    // Validate everything before opening anything.
    for (const r of requests) {
      for (const line of r.table.lines) {
        await this.probe(
          line,
          r.table.name,
          (dep) => this.devices.has(dep) || (batch.has(dep) && dep !== r.table.name),
        );
      }
    }
    const created: string[] = [];
    try {
      for (const r of orderByDependency(requests)) {
        await this.build(r);
        created.push(r.table.name);
      }
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

  /** Builds the table of one device and publishes it. */
  private async build(request: TableRequest): Promise<void> {
    const { name } = request.table;
    const built = await this.buildTable(request, undefined);
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
      await Promise.allSettled(segments.map((s) => s.close()));
      for (const spec of held) await this.pool.release(spec).catch(() => undefined);
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

  private async reloadLocked(name: string, request: TableRequest): Promise<void> {
    const dev = this.get(name);
    if (request.table.name !== name) request = { ...request, table: { ...request.table, name } };
    const dependents = this.dependentsOf(name);
    for (const line of request.table.lines) {
      await this.probe(line, name, (dep) => this.devices.has(dep) && !dependents.has(dep));
    }
    const built = await this.buildTable(request, dev);
    const wasSuspended = dev.gate.state === "suspended";
    try {
      await this.suspendGate(dev.gate);
    } catch (err) {
      await Promise.allSettled(built.segments.map((s) => s.close()));
      for (const spec of built.held) await this.pool.release(spec).catch(() => undefined);
      if (!wasSuspended) await dev.gate.resume().catch(() => undefined);
      throw err;
    }
    try {
      // dm's preresume: the new table takes over from the drained old one (a mirror's log and
      // per-leg state); a failure leaves the old table as it was.
      for (const segment of built.segments) await segment.preresume?.();
    } catch (err) {
      await Promise.allSettled(built.segments.map((s) => s.close()));
      for (const spec of built.held) await this.pool.release(spec).catch(() => undefined);
      if (!wasSuspended) await dev.gate.resume().catch(() => undefined);
      throw err;
    }
    const old = dev.gate.swap(built.device);
    const oldHeld = dev.held;
    Object.assign(dev, {
      lines: request.table.lines,
      baseDir: request.baseDir,
      segments: built.segments,
      held: built.held,
      uses: built.uses,
    });
    delete dev.merge;
    this.exports?.replaceExportDevice(name, dev.gate);
    await dev.gate.resume();
    this.log.info({ device: name, targets: request.table.lines.length }, "table reloaded");
    // The reload has happened: a failure to close the old table is logged, not reported as failure.
    await old
      .close()
      .catch((err: Error) => this.log.warn({ device: name, err }, "closing the old table failed"));
    for (const spec of oldHeld) {
      await this.pool
        .release(spec)
        .catch((err: Error) => this.log.warn({ device: name, spec, err }, "closing a device failed"));
    }
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
