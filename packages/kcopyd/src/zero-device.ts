import {
  checkRange,
  type Extent,
  type TargetDevice,
  type WriteOptions,
  type WriteZeroesOptions,
} from "./block-device.js";

/**
 * dm `zero`: reads return zeros, writes are accepted and dropped (a sparse "/dev/zero" disk).
 *
 * @example
 * ```ts
 * const z = new ZeroDevice(2 ** 40); // 1 TiB of zeros
 * ```
 */
export class ZeroDevice implements TargetDevice {
  readonly targetType = "zero";
  readonly logicalBlockSize = 512;
  readonly readOnly = false;
  readonly name: string;

  constructor(
    readonly sizeBytes: number,
    options: { name?: string } = {},
  ) {
    this.name = options.name ?? `zero:${sizeBytes}`;
  }

  table(): string {
    return "";
  }

  status(): string {
    return "";
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    checkRange(this, offsetBytes, lengthBytes);
    return Buffer.alloc(lengthBytes);
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    target.fill(0);
  }

  async write(offsetBytes: number, data: Buffer, _options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length);
  }

  async flush(): Promise<void> {}

  async discard(offsetBytes: number, lengthBytes: number, _options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, _options?: WriteZeroesOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    return lengthBytes ? [{ offsetBytes, lengthBytes, kind: "hole" }] : [];
  }

  async close(): Promise<void> {}
}
