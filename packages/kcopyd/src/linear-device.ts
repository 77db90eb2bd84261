import {
  type BlockDevice,
  checkRange,
  type Extent,
  SECTOR_SIZE,
  shiftZeroRuns,
  type TargetDevice,
  type WriteOptions,
  type WriteZeroesOptions,
  type ZeroRun,
} from "./block-device.js";

/**
 * dm `linear`: a window of `lengthBytes` starting at `startBytes` of another device.
 * Table: `linear <dev> <offset_sectors>`; status is empty, as in the kernel.
 *
 * @example
 * ```ts
 * const part = new LinearDevice(disk, 2048 * 512, 100 * 2 ** 20); // like `0 204800 linear disk 2048`
 * ```
 */
export class LinearDevice implements TargetDevice {
  readonly targetType = "linear";
  readonly name: string;
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;

  constructor(
    readonly inner: BlockDevice,
    readonly startBytes: number,
    lengthBytes: number,
    options: { name?: string } = {},
  ) {
    if (startBytes % SECTOR_SIZE !== 0 || lengthBytes % SECTOR_SIZE !== 0) {
      throw new RangeError(`linear: start ${startBytes} and length ${lengthBytes} must be whole sectors`);
    }
    checkRange(inner, startBytes, lengthBytes);
    this.sizeBytes = lengthBytes;
    this.logicalBlockSize = inner.logicalBlockSize;
    this.readOnly = inner.readOnly;
    this.name = options.name ?? `linear(${inner.name})`;
  }

  table(): string {
    return `${this.inner.name} ${this.startBytes / SECTOR_SIZE}`;
  }

  status(): string {
    return "";
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    checkRange(this, offsetBytes, lengthBytes);
    return this.inner.read(this.startBytes + offsetBytes, lengthBytes);
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    return this.inner.readInto(this.startBytes + offsetBytes, target);
  }

  /** The inner device's sparse read, when it has one; otherwise a plain read vouching for nothing. */
  async readIntoSparse(offsetBytes: number, target: Buffer): Promise<ZeroRun[]> {
    checkRange(this, offsetBytes, target.length);
    const at = this.startBytes + offsetBytes;
    if (!this.inner.readIntoSparse) {
      await this.inner.readInto(at, target);
      return [];
    }
    return shiftZeroRuns(await this.inner.readIntoSparse(at, target), -this.startBytes);
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length);
    return this.inner.write(this.startBytes + offsetBytes, data, options);
  }

  async flush(): Promise<void> {
    return this.inner.flush();
  }

  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    return this.inner.discard(this.startBytes + offsetBytes, lengthBytes, options);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    return this.inner.writeZeroes(this.startBytes + offsetBytes, lengthBytes, options);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    const inner = await this.inner.extents(this.startBytes + offsetBytes, lengthBytes);
    return inner.map((e) => ({ ...e, offsetBytes: e.offsetBytes - this.startBytes }));
  }

  /** Closing a window does not close the device under it: the table owns devices. */
  async close(): Promise<void> {}
}
