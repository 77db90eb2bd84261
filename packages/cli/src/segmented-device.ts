import {
  allocData,
  checkRange,
  type Extent,
  IoError,
  mergeExtents,
  type StatusContext,
  shiftZeroRuns,
  type TargetDevice,
  type TargetProgress,
  type WriteOptions,
  type WriteZeroesOptions,
  type ZeroRun,
} from "@udm/kcopyd";

/** One segment: a target mapped at `[startBytes, startBytes + target.sizeBytes)` of the device. */
export interface Segment {
  startBytes: number;
  target: TargetDevice;
}

/**
 * A device of several segments, as a multi-line dm table: offsets map onto each segment's target.
 * I/O crossing a boundary is split. Segments must be contiguous from 0.
 *
 * @example
 * ```ts
 * const dev = new SegmentedDevice("big", [
 *   { startBytes: 0, target: a },
 *   { startBytes: a.sizeBytes, target: b },
 * ]);
 * ```
 */
export class SegmentedDevice implements TargetDevice {
  readonly targetType = "segmented";
  readonly sizeBytes: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;

  constructor(
    readonly name: string,
    readonly segments: readonly Segment[],
  ) {
    let next = 0;
    for (const s of segments) {
      if (s.startBytes !== next) {
        throw new RangeError(`${name}: segment at ${s.startBytes} is not contiguous (expected ${next})`);
      }
      next += s.target.sizeBytes;
    }
    if (segments.length === 0) throw new RangeError(`${name}: a device needs at least one segment`);
    this.sizeBytes = next;
    this.logicalBlockSize = Math.max(...segments.map((s) => s.target.logicalBlockSize));
    this.readOnly = segments.some((s) => s.target.readOnly);
  }

  table(): string {
    return this.segments.map((s) => s.target.table()).join("\n");
  }

  status(): string {
    return this.segments.map((s) => s.target.status()).join("\n");
  }

  /** Calls `fn` for each segment piece of `[offset, offset+length)`, in order. */
  private pieces(offsetBytes: number, lengthBytes: number) {
    checkRange(this, offsetBytes, lengthBytes);
    const out: Array<{ target: TargetDevice; at: number; length: number; done: number }> = [];
    let done = 0;
    for (const s of this.segments) {
      const end = s.startBytes + s.target.sizeBytes;
      const from = offsetBytes + done;
      if (done >= lengthBytes) break;
      if (from >= end) continue;
      const length = Math.min(end - from, lengthBytes - done);
      out.push({ target: s.target, at: from - s.startBytes, length, done });
      done += length;
    }
    return out;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const buf = allocData(lengthBytes);
    await this.readInto(offsetBytes, buf);
    return buf;
  }

  async readInto(offsetBytes: number, target: Buffer): Promise<void> {
    await Promise.all(
      this.pieces(offsetBytes, target.length).map((p) =>
        p.target.readInto(p.at, target.subarray(p.done, p.done + p.length)),
      ),
    );
  }

  /** Each segment's own sparse read (a segment without one vouches for nothing), in order. */
  async readIntoSparse(offsetBytes: number, target: Buffer): Promise<ZeroRun[]> {
    const parts = await Promise.all(
      this.pieces(offsetBytes, target.length).map(async (p) => {
        const into = target.subarray(p.done, p.done + p.length);
        if (!p.target.readIntoSparse) {
          await p.target.readInto(p.at, into);
          return [];
        }
        return shiftZeroRuns(await p.target.readIntoSparse(p.at, into), offsetBytes + p.done - p.at);
      }),
    );
    return parts.flat();
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    await Promise.all(
      this.pieces(offsetBytes, data.length).map((p) =>
        p.target.write(p.at, data.subarray(p.done, p.done + p.length), options),
      ),
    );
  }

  async flush(): Promise<void> {
    await Promise.all(this.segments.map((s) => s.target.flush()));
  }

  async discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    await Promise.all(
      this.pieces(offsetBytes, lengthBytes).map((p) => p.target.discard(p.at, p.length, options)),
    );
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    await Promise.all(
      this.pieces(offsetBytes, lengthBytes).map((p) => p.target.writeZeroes(p.at, p.length, options)),
    );
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    const parts = await Promise.all(
      this.pieces(offsetBytes, lengthBytes).map(async (p) => {
        const base = offsetBytes + p.done - p.at;
        return (await p.target.extents(p.at, p.length)).map((e) => ({
          ...e,
          offsetBytes: e.offsetBytes + base,
        }));
      }),
    );
    return mergeExtents(parts.flat());
  }

  /**
   * The NBD meta contexts of the segments, as one device: every name some segment publishes
   * (first description wins). A query maps offsets onto the segments; a segment without the
   * context reports flags 0 over its range. Contexts are looked up at query time, so a segment
   * whose contexts change (a reload) is followed.
   */
  statusContexts(): StatusContext[] {
    const byName = new Map<string, string>();
    for (const s of this.segments) {
      for (const c of s.target.statusContexts?.() ?? []) {
        if (!byName.has(c.name)) byName.set(c.name, c.description);
      }
    }
    return [...byName].map(([name, description]) => ({
      name,
      description,
      query: (offsetBytes: number, lengthBytes: number) => this.queryContext(name, offsetBytes, lengthBytes),
    }));
  }

  private async queryContext(
    name: string,
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Array<{ lengthBytes: number; flags: number }>> {
    const out: Array<{ lengthBytes: number; flags: number }> = [];
    const push = (length: number, flags: number) => {
      if (length <= 0) return;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.lengthBytes += length;
      else out.push({ lengthBytes: length, flags });
    };
    for (const p of this.pieces(offsetBytes, lengthBytes)) {
      const ctx = p.target.statusContexts?.().find((c) => c.name === name);
      if (!ctx) {
        push(p.length, 0);
        continue;
      }
      let covered = 0;
      for (const run of await ctx.query(p.at, p.length)) {
        const length = Math.min(run.lengthBytes, p.length - covered);
        push(length, run.flags);
        covered += length;
        if (covered >= p.length) break;
      }
      // A segment may answer for less than asked (allowed): stop there, the client asks again.
      if (covered < p.length) break;
    }
    return out;
  }

  async message(argv: string[]): Promise<string | undefined> {
    if (this.segments.length !== 1) {
      throw new IoError(
        "EINVAL",
        this.name,
        "message to a multi-segment device: name the sector of the segment",
      );
    }
    const target = this.segments[0]!.target;
    if (!target.message)
      throw new IoError("EINVAL", this.name, `target ${target.targetType} takes no messages`);
    return target.message(argv);
  }

  async suspend(): Promise<void> {
    for (const s of this.segments) await s.target.suspend?.();
  }

  async resume(): Promise<void> {
    for (const s of this.segments) await s.target.resume?.();
  }

  progress(): TargetProgress | null {
    for (const s of this.segments) {
      const p = s.target.progress?.();
      if (p) return p;
    }
    return null;
  }

  abortRequests(): void {
    for (const s of this.segments) s.target.abortRequests?.();
  }

  /** Closes every segment target (not the devices they were built on: the pool owns those). */
  async close(): Promise<void> {
    const results = await Promise.allSettled(this.segments.map((s) => s.target.close()));
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
  }
}
