import {
  type BlockDevice,
  checkRange,
  type Extent,
  type TargetDevice,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";
import type { OriginState } from "./origin-state.js";
import { splitAtBoundaries } from "./snapshot-state.js";

/**
 * dm `snapshot-origin <origin>`: the origin as users write to it. Reads pass through; every
 * write (also write-zeroes and discard) is split at the smallest snapshot chunk size and held
 * until each active snapshot lacking the chunk has durably copied it out. While a
 * snapshot-merge runs on the same origin, I/O goes through the merge's view instead.
 *
 * @example
 * ```ts
 * const origin = await snapshotOriginTarget.create(["disk.img"], size, context);
 * await origin.write(0, data); // copies chunk 0 to every snapshot's COW first
 * ```
 */
export class OriginDevice implements TargetDevice {
  readonly targetType = "snapshot-origin";
  readonly name: string;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;

  constructor(
    readonly origin: BlockDevice,
    private readonly originState: OriginState,
    readonly sizeBytes: number,
    name?: string,
  ) {
    this.name = name ?? origin.name;
    this.logicalBlockSize = origin.logicalBlockSize;
    this.readOnly = origin.readOnly;
  }

  table(): string {
    return this.origin.name;
  }

  status(): string {
    return "";
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    checkRange(this, offsetBytes, target.length);
    const merging = this.originState.merging;
    if (merging) await merging.mapRead(offsetBytes, target);
    else await this.origin.readInto(offsetBytes, target);
  }

  /** Split boundary: the smallest chunk of the origin's snapshots (`split_boundary`). */
  private boundary(): number {
    return this.originState.minimumChunkBytes() ?? Number.MAX_SAFE_INTEGER;
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length);
    const merging = this.originState.merging;
    if (merging) {
      await merging.mapWrite(offsetBytes, data, options);
      return;
    }
    await Promise.all(
      splitAtBoundaries(offsetBytes, data.length, this.boundary(), (at, length, bufAt) =>
        this.originState.originWrite(at, length, () =>
          this.origin.write(at, data.subarray(bufAt, bufAt + length), options),
        ),
      ),
    );
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    const merging = this.originState.merging;
    if (merging) {
      await merging.mapWriteZeroes(offsetBytes, lengthBytes, options);
      return;
    }
    await Promise.all(
      splitAtBoundaries(offsetBytes, lengthBytes, this.boundary(), (at, length) =>
        this.originState.originWrite(at, length, () => this.origin.writeZeroes(at, length, options)),
      ),
    );
  }

  /** A discard changes origin content like a write, so snapshots copy the chunks out first. */
  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    // During a merge discards have no effect (`snapshot_merge_map`).
    if (this.originState.merging) return;
    await Promise.all(
      splitAtBoundaries(offsetBytes, lengthBytes, this.boundary(), (at, length) =>
        this.originState.originWrite(at, length, () => this.origin.discard(at, length, options)),
      ),
    );
  }

  async flush(): Promise<void> {
    const merging = this.originState.merging;
    await Promise.all([this.origin.flush(), merging ? merging.state.cow.flush() : undefined]);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    if (this.originState.merging) return lengthBytes ? [{ offsetBytes, lengthBytes, kind: "data" }] : [];
    return this.origin.extents(offsetBytes, lengthBytes);
  }

  async close(): Promise<void> {}
}
