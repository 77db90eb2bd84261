import {
  type Extent,
  IoError,
  type StatusContext,
  type TargetDevice,
  type TargetProgress,
  type WriteOptions,
  type WriteZeroesOptions,
  type ZeroRun,
} from "@udm/kcopyd";

/** Where a gate is in `dmsetup suspend`/`resume`. */
export type GateState = "active" | "suspended" | "closed";

/**
 * The stable face of one udm device (what NBD exports and `@NAME` users hold): forwards I/O to the
 * current table's device, and on suspend drains in-flight I/O and HOLDS new I/O (callers wait,
 * they are not failed) until resume. While suspended the table can be swapped (`udm reload`).
 *
 * @example
 * ```ts
 * const gate = new GateDevice("vol", table);
 * await gate.suspend();            // in-flight I/O done and flushed, new I/O waits
 * const old = gate.swap(newTable); // reload
 * await gate.resume();             // waiting I/O goes to newTable
 * ```
 */
export class GateDevice implements TargetDevice {
  readonly name: string;
  private inner: TargetDevice;
  private stateValue: GateState = "active";
  private inFlight = 0;
  private drainWaiters: Array<() => void> = [];
  private held: Array<{ resolve: () => void; reject: (err: Error) => void }> = [];
  /** Why the flush of the last suspend failed, if it did (the suspend itself succeeded). */
  lastFlushError: Error | null = null;
  /** Serialises suspend/resume/swap so a resume cannot overtake a suspend in progress. */
  private transition: Promise<unknown> = Promise.resolve();

  constructor(
    readonly deviceName: string,
    inner: TargetDevice,
  ) {
    this.name = `@${deviceName}`;
    this.inner = inner;
  }

  get state(): GateState {
    return this.stateValue;
  }

  /** The table device currently behind the gate. */
  get current(): TargetDevice {
    return this.inner;
  }

  /** Requests waiting for resume. */
  get heldRequests(): number {
    return this.held.length;
  }

  get targetType(): string {
    return this.inner.targetType;
  }
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get logicalBlockSize(): number {
    return this.inner.logicalBlockSize;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  table(): string {
    return this.inner.table();
  }
  status(): string {
    return this.inner.status();
  }
  progress(): TargetProgress | null {
    return this.inner.progress?.() ?? null;
  }

  async message(argv: string[]): Promise<string | undefined> {
    if (!this.inner.message) {
      throw new IoError("EINVAL", this.deviceName, `target ${this.inner.targetType} takes no messages`);
    }
    return this.inner.message(argv);
  }

  /**
   * dmsetup suspend: stop the target's background work, hold new I/O, wait for in-flight I/O,
   * flush (unless `flush: false`, dmsetup's `--noflush`: a device stacked on a suspended one
   * then suspends without waiting for it). Resolves when the device is quiescent. Suspending a
   * suspended device does nothing.
   */
  suspend(options: { flush?: boolean } = {}): Promise<void> {
    return this.serialise(() => this.suspendNow(options.flush !== false));
  }

  /** dmsetup resume: restart the target's background work and release held I/O. */
  resume(): Promise<void> {
    return this.serialise(() => this.resumeNow());
  }

  /**
   * dm's table switch, as one transition (a `resume` or `suspend` arriving meanwhile waits for
   * it): an active device is suspended (drained, flushed), then `prepare` runs (the new table's
   * preresume), then `next` replaces the table and the device is resumed. A suspended device
   * stays suspended (dmsetup reload loads the table; `resume` activates it). When `prepare`
   * fails, the old table stays in place, resumed if it was active, and the error is thrown.
   */
  replace(
    next: TargetDevice,
    prepare: () => Promise<void>,
  ): Promise<{ old: TargetDevice; resumed: boolean; resumeError?: Error }> {
    return this.serialise(async () => {
      if (this.stateValue === "closed") {
        throw new IoError("ESHUTDOWN", this.deviceName, "device removed");
      }
      const wasActive = this.stateValue === "active";
      if (wasActive) await this.suspendNow(true);
      try {
        await prepare();
      } catch (err) {
        if (wasActive) await this.resumeNow();
        throw err;
      }
      const old = this.inner;
      this.inner = next;
      if (!wasActive) return { old, resumed: false };
      try {
        await this.resumeNow();
        return { old, resumed: true };
      } catch (err) {
        // The new table is in place but its resume failed: the device stays suspended.
        return { old, resumed: false, resumeError: err as Error };
      }
    });
  }

  private async suspendNow(flush: boolean): Promise<void> {
    if (this.stateValue !== "active") return;
    await this.inner.suspend?.();
    this.stateValue = "suspended";
    await this.drained();
    // A device that cannot flush (an `error` segment) still suspends; the caller logs why.
    this.lastFlushError = null;
    if (!flush) return;
    try {
      await this.inner.flush();
    } catch (err) {
      this.lastFlushError = err as Error;
    }
  }

  private async resumeNow(): Promise<void> {
    if (this.stateValue !== "suspended") return;
    await this.inner.resume?.();
    this.stateValue = "active";
    for (const waiter of this.held.splice(0)) waiter.resolve();
  }

  /** Replaces the table device while suspended; returns the old one (the caller closes it). */
  swap(next: TargetDevice): TargetDevice {
    if (this.stateValue !== "suspended") {
      throw new Error(`${this.deviceName}: the device must be suspended to swap its table`);
    }
    const old = this.inner;
    this.inner = next;
    return old;
  }

  /** Fails held and future I/O with ESHUTDOWN; does not close the table device. */
  async close(): Promise<void> {
    if (this.stateValue === "closed") return;
    this.stateValue = "closed";
    const err = new IoError("ESHUTDOWN", this.deviceName, "device removed");
    for (const waiter of this.held.splice(0)) waiter.reject(err);
    await this.drained();
  }

  private serialise<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.transition.then(fn, fn);
    this.transition = run.catch(() => undefined);
    return run;
  }

  private drained(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /** Runs one request against the current table, waiting first while suspended. */
  private async gated<T>(op: (dev: TargetDevice) => Promise<T>): Promise<T> {
    while (this.stateValue === "suspended") {
      await new Promise<void>((resolve, reject) => this.held.push({ resolve, reject }));
    }
    if (this.stateValue === "closed") throw new IoError("ESHUTDOWN", this.deviceName, "device removed");
    this.inFlight++;
    try {
      return await op(this.inner);
    } finally {
      if (--this.inFlight === 0) for (const done of this.drainWaiters.splice(0)) done();
    }
  }

  read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    return this.gated((d) => d.read(offsetBytes, lengthBytes));
  }
  readInto(offsetBytes: number, target: Buffer): Promise<void> {
    return this.gated((d) => d.readInto(offsetBytes, target));
  }
  /** The current table's sparse read; a table without one is read plainly and vouches for nothing. */
  readIntoSparse(offsetBytes: number, target: Buffer): Promise<ZeroRun[]> {
    return this.gated(async (d) => {
      if (d.readIntoSparse) return d.readIntoSparse(offsetBytes, target);
      await d.readInto(offsetBytes, target);
      return [];
    });
  }
  write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.gated((d) => d.write(offsetBytes, data, options));
  }
  flush(): Promise<void> {
    return this.gated((d) => d.flush());
  }
  discard(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    return this.gated((d) => d.discard(offsetBytes, lengthBytes, options));
  }
  writeZeroes(offsetBytes: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    return this.gated((d) => d.writeZeroes(offsetBytes, lengthBytes, options));
  }
  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return this.gated((d) => d.extents(offsetBytes, lengthBytes));
  }

  /** The current table's meta contexts, with queries gated like I/O. */
  statusContexts(): StatusContext[] {
    return (this.inner.statusContexts?.() ?? []).map((ctx) => ({
      name: ctx.name,
      description: ctx.description,
      query: (offsetBytes: number, lengthBytes: number) =>
        this.gated((d) => {
          const now = d.statusContexts?.().find((c) => c.name === ctx.name);
          return now ? now.query(offsetBytes, lengthBytes) : Promise.resolve([{ lengthBytes, flags: 0 }]);
        }),
    }));
  }
}
