import { checkRange, type Extent, type TargetDevice } from "./block-device.js";
import { IoError } from "./errors.js";

/**
 * dm `error`: every read, write, flush, discard and zero fails with EIO.
 *
 * @example
 * ```ts
 * const broken = new ErrorDevice(1 << 30);
 * await broken.read(0, 512); // throws IoError EIO
 * ```
 */
export class ErrorDevice implements TargetDevice {
  readonly targetType = "error";
  readonly logicalBlockSize = 512;
  readonly readOnly = false;
  readonly name: string;

  constructor(
    readonly sizeBytes: number,
    options: { name?: string } = {},
  ) {
    this.name = options.name ?? `error:${sizeBytes}`;
  }

  table(): string {
    return "";
  }

  status(): string {
    return "";
  }

  private fail(what: string, offsetBytes: number, lengthBytes: number): never {
    checkRange(this, offsetBytes, lengthBytes);
    throw new IoError("EIO", this.name, `${what} at ${offsetBytes}+${lengthBytes} failed`);
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    this.fail("read", offsetBytes, lengthBytes);
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    this.fail("read", offsetBytes, target.length);
  }

  async write(offsetBytes: number, data: Buffer): Promise<void> {
    this.fail("write", offsetBytes, data.length);
  }

  async flush(): Promise<void> {
    throw new IoError("EIO", this.name, "flush failed");
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.fail("discard", offsetBytes, lengthBytes);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.fail("write-zeroes", offsetBytes, lengthBytes);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    return lengthBytes ? [{ offsetBytes, lengthBytes, kind: "data" }] : [];
  }

  async close(): Promise<void> {}
}
