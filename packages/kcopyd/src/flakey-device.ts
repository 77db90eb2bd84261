import {
  type BlockDevice,
  checkRange,
  type Extent,
  SECTOR_SIZE,
  type TargetDevice,
  type WriteOptions,
  type WriteZeroesOptions,
} from "./block-device.js";
import { IoError } from "./errors.js";
import { allocData } from "./poison.js";

/** What a down interval does, as dm-flakey's features (none: every I/O fails). */
export interface FlakeyFeatures {
  /** Writes are acknowledged and silently discarded; reads work. */
  dropWrites?: boolean;
  /** Writes fail with EIO; reads work. */
  errorWrites?: boolean;
  /** Reads fail with EIO; writes work. */
  errorReads?: boolean;
}

export interface FlakeyOptions extends FlakeyFeatures {
  /** Offset into the inner device, in bytes (the table's `<offset>` is in sectors). */
  startBytes?: number;
  lengthBytes?: number;
  upIntervalSeconds: number;
  downIntervalSeconds: number;
  /** Milliseconds clock; defaults to performance.now. Tests pass their own. */
  now?: () => number;
  name?: string;
}

/** `auto` follows the up/down intervals; `up`/`down` pin the state (the deterministic switch). */
export type FlakeyMode = "auto" | "up" | "down";

/**
 * dm `flakey`: a window of another device that is reliable for `up` seconds, then unreliable for
 * `down` seconds, repeating from creation. Table:
 * `flakey <dev> <offset> <up> <down> [<#features> drop_writes|error_writes|error_reads]`.
 *
 * @example
 * ```ts
 * const leg = new FlakeyDevice(disk, { upIntervalSeconds: 0, downIntervalSeconds: 1, errorWrites: true });
 * leg.setMode("up");   // behave until the test says otherwise
 * leg.setMode("down"); // now every write fails with EIO
 * ```
 */
export class FlakeyDevice implements TargetDevice {
  readonly targetType = "flakey";
  readonly name: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly startBytes: number;
  readonly features: Readonly<FlakeyFeatures>;
  private readonly upMs: number;
  private readonly downMs: number;
  private readonly now: () => number;
  private readonly createdMs: number;
  private mode: FlakeyMode = "auto";

  constructor(
    readonly inner: BlockDevice,
    options: FlakeyOptions,
  ) {
    if (options.dropWrites && options.errorWrites) {
      throw new RangeError("flakey: drop_writes and error_writes are mutually exclusive");
    }
    if (!(options.upIntervalSeconds >= 0) || !(options.downIntervalSeconds >= 0)) {
      throw new RangeError("flakey: intervals must be non-negative seconds");
    }
    this.startBytes = options.startBytes ?? 0;
    if (this.startBytes % SECTOR_SIZE !== 0) throw new RangeError("flakey: offset must be whole sectors");
    this.sizeBytes = options.lengthBytes ?? inner.sizeBytes - this.startBytes;
    checkRange(inner, this.startBytes, this.sizeBytes);
    this.upMs = options.upIntervalSeconds * 1000;
    this.downMs = options.downIntervalSeconds * 1000;
    this.features = {
      dropWrites: !!options.dropWrites,
      errorWrites: !!options.errorWrites,
      errorReads: !!options.errorReads,
    };
    this.now = options.now ?? (() => performance.now());
    this.createdMs = this.now();
    this.logicalBlockSize = inner.logicalBlockSize;
    this.readOnly = inner.readOnly;
    this.name = options.name ?? `flakey(${inner.name})`;
  }

  /** Pins the device up or down, or returns it to its intervals (`auto`). */
  setMode(mode: FlakeyMode): void {
    this.mode = mode;
  }

  /** True while the device is in a down interval (or pinned down). */
  isDown(): boolean {
    if (this.mode !== "auto") return this.mode === "down";
    const period = this.upMs + this.downMs;
    if (this.downMs === 0) return false;
    if (period === 0) return true;
    return (this.now() - this.createdMs) % period >= this.upMs;
  }

  table(): string {
    const f: string[] = [];
    if (this.features.dropWrites) f.push("drop_writes");
    if (this.features.errorWrites) f.push("error_writes");
    if (this.features.errorReads) f.push("error_reads");
    const base = `${this.inner.name} ${this.startBytes / SECTOR_SIZE} ${this.upMs / 1000} ${this.downMs / 1000}`;
    return f.length ? `${base} ${f.length} ${f.join(" ")}` : base;
  }

  status(): string {
    return "";
  }

  /** How a write behaves now: pass it on, drop it, or fail it. */
  private writeFate(): "pass" | "drop" | "fail" {
    if (!this.isDown()) return "pass";
    const f = this.features;
    if (f.dropWrites) return "drop";
    if (f.errorWrites) return "fail";
    if (f.errorReads) return "pass";
    return "fail";
  }

  private readFails(): boolean {
    if (!this.isDown()) return false;
    const f = this.features;
    if (f.errorReads) return true;
    return !(f.dropWrites || f.errorWrites);
  }

  private eio(what: string, offsetBytes: number, lengthBytes: number): IoError {
    return new IoError("EIO", this.name, `${what} at ${offsetBytes}+${lengthBytes} failed (flakey down)`);
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = allocData(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    if (this.readFails()) throw this.eio("read", offsetBytes, target.length);
    await this.inner.readInto(this.startBytes + offsetBytes, target);
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length);
    const fate = this.writeFate();
    if (fate === "fail") throw this.eio("write", offsetBytes, data.length);
    if (fate === "pass") await this.inner.write(this.startBytes + offsetBytes, data, options);
  }

  async flush(): Promise<void> {
    const fate = this.writeFate();
    if (fate === "fail") throw new IoError("EIO", this.name, "flush failed (flakey down)");
    if (fate === "pass") await this.inner.flush();
  }

  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    const fate = this.writeFate();
    if (fate === "fail") throw this.eio("discard", offsetBytes, lengthBytes);
    if (fate === "pass") await this.inner.discard(this.startBytes + offsetBytes, lengthBytes, options);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    const fate = this.writeFate();
    if (fate === "fail") throw this.eio("write-zeroes", offsetBytes, lengthBytes);
    if (fate === "pass") await this.inner.writeZeroes(this.startBytes + offsetBytes, lengthBytes, options);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    const inner = await this.inner.extents(this.startBytes + offsetBytes, lengthBytes);
    return inner.map((e) => ({ ...e, offsetBytes: e.offsetBytes - this.startBytes }));
  }

  async close(): Promise<void> {}
}
