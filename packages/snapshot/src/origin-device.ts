import {
  type BlockDevice,
  checkRange,
  type Extent,
  IoError,
  type TargetDevice,
  type WriteOptions,
  type WriteZeroesOptions,
} from "@udm/kcopyd";
import type { OriginState } from "./origin-state.js";
import { forEachPiece } from "./snapshot-state.js";

/**
 * Most bytes of an origin write held for copy-outs as one piece: its chunks are copied out
 * together, then it is written in one request (the kernel splits at every chunk; one piece per
 * chunk would make a large write cost a device request per chunk).
 */
export const ORIGIN_PIECE_BYTES = 128 * 1024;

/**
 * dm `snapshot-origin <origin>`: the origin as users write to it. Reads pass through; every
 * write (also write-zeroes and discard) is cut into pieces of whole chunks and each piece held
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
  private closed = false;

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

  /**
   * Where origin writes are cut: every ORIGIN_PIECE_BYTES (or largest chunk, if larger), never
   * across a chunk of any snapshot (chunk sizes are powers of two, so a multiple of the largest
   * chunk is a boundary of every snapshot). Without snapshots a write is one piece.
   */
  private boundary(): number {
    let largest = 0;
    for (const s of this.originState.snapshots) largest = Math.max(largest, s.chunkBytes);
    return largest ? Math.max(largest, ORIGIN_PIECE_BYTES) : Number.MAX_SAFE_INTEGER;
  }

  private aborted = false;

  /** Once closing (or aborted at shutdown), a request in flight starts no more pieces (they fail with EIO). */
  private readonly stopped = (): Error | null =>
    this.closed || this.aborted
      ? new IoError(
          "EIO",
          this.name,
          `device is ${this.closed ? "closing" : "stopping"}: the rest of the request was not written`,
        )
      : null;

  /** Cuts a write-like request into pieces, each held until every snapshot has copied its chunks out. */
  private originPieces(
    offsetBytes: number,
    lengthBytes: number,
    io: (at: number, length: number, bufAt: number) => Promise<void>,
  ): Promise<void> {
    return forEachPiece(
      offsetBytes,
      lengthBytes,
      this.boundary(),
      (at, length, bufAt) => this.originState.originWrite(at, length, () => io(at, length, bufAt)),
      this.stopped,
    );
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, data.length);
    const merging = this.originState.merging;
    if (merging) {
      await merging.mapWrite(offsetBytes, data, options);
      return;
    }
    await this.originPieces(offsetBytes, data.length, (at, length, bufAt) =>
      this.origin.write(at, data.subarray(bufAt, bufAt + length), options),
    );
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    const merging = this.originState.merging;
    if (merging) {
      await merging.mapWriteZeroes(offsetBytes, lengthBytes, options);
      return;
    }
    await this.originPieces(offsetBytes, lengthBytes, (at, length) =>
      this.origin.writeZeroes(at, length, options),
    );
  }

  /** A discard changes origin content like a write, so snapshots copy the chunks out first. */
  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offsetBytes, lengthBytes);
    // During a merge discards have no effect (`snapshot_merge_map`).
    if (this.originState.merging) return;
    await this.originPieces(offsetBytes, lengthBytes, (at, length) =>
      this.origin.discard(at, length, options),
    );
  }

  async flush(): Promise<void> {
    const merging = this.originState.merging;
    await Promise.all([this.origin.flush(), merging ? merging.state.cow.flush() : undefined]);
  }

  /** Process shutdown: requests in flight fail their unstarted pieces (see `TargetDevice.abortRequests`). */
  abortRequests(): void {
    this.aborted = true;
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    checkRange(this, offsetBytes, lengthBytes);
    if (this.originState.merging) return lengthBytes ? [{ offsetBytes, lengthBytes, kind: "data" }] : [];
    return this.origin.extents(offsetBytes, lengthBytes);
  }

  /** Requests in flight stop starting pieces; the origin device stays open (the caller owns it). */
  async close(): Promise<void> {
    this.closed = true;
  }
}
