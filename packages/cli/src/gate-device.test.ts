import { LinearDevice, MemoryDevice, type TargetDevice } from "@udm/kcopyd";
import fc from "fast-check";
import { describe, expect, test } from "vitest";
import { GateDevice } from "./gate-device.js";

/** Lets the event loop run a few turns: enough for any unblocked promise chain to settle. */
async function settle(): Promise<void> {
  for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
}

function tracked<T>(p: Promise<T>) {
  const state = { done: false, failed: false };
  p.then(
    () => {
      state.done = true;
    },
    () => {
      state.failed = true;
    },
  );
  return state;
}

/** A table device whose writes wait for `release()`; records the order of writes and flushes. */
class LatchedDevice extends LinearDevice {
  readonly events: string[] = [];
  private latch: Promise<void> = Promise.resolve();
  private open: () => void = () => {};
  hold(): void {
    this.latch = new Promise((r) => {
      this.open = r;
    });
  }
  release(): void {
    this.open();
  }
  override async write(offsetBytes: number, data: Buffer): Promise<void> {
    await this.latch;
    await super.write(offsetBytes, data);
    this.events.push(`write ${offsetBytes}`);
  }
  override async flush(): Promise<void> {
    this.events.push("flush");
  }
}

const MIB = 2 ** 20;

describe("GateDevice", () => {
  test("suspend waits for in-flight I/O, then flushes; new I/O is held, not failed, until resume", async () => {
    const mem = new MemoryDevice(MIB);
    const table = new LatchedDevice(mem, 0, MIB);
    const gate = new GateDevice("vol", table);
    table.hold();
    const inFlight = tracked(gate.write(0, Buffer.alloc(512, 1)));
    const suspended = tracked(gate.suspend());
    await settle();
    expect(suspended.done).toBe(false); // the write is still in flight
    table.release();
    await settle();
    expect(inFlight.done).toBe(true);
    expect(suspended.done).toBe(true);
    expect(table.events).toEqual(["write 0", "flush"]);
    expect(gate.state).toBe("suspended");

    const held = tracked(gate.write(4096, Buffer.alloc(512, 2)));
    const heldRead = tracked(gate.read(0, 512));
    await settle();
    expect(held).toEqual({ done: false, failed: false });
    expect(heldRead).toEqual({ done: false, failed: false });
    expect(gate.heldRequests).toBe(2);

    await gate.resume();
    await settle();
    expect(held.done && heldRead.done).toBe(true);
    expect((await mem.read(4096, 512)).equals(Buffer.alloc(512, 2))).toBe(true);
  });

  test("a table swapped while suspended receives the held I/O", async () => {
    const oldMem = new MemoryDevice(MIB);
    const newMem = new MemoryDevice(MIB);
    const gate = new GateDevice("vol", new LinearDevice(oldMem, 0, MIB));
    await gate.suspend();
    const held = gate.write(0, Buffer.from("after the swap"));
    expect(() => gate.swap(new LinearDevice(newMem, 0, MIB))).not.toThrow();
    await gate.resume();
    await held;
    expect((await newMem.read(0, 14)).toString()).toBe("after the swap");
    expect((await oldMem.read(0, 14)).equals(Buffer.alloc(14))).toBe(true);
  });

  test("swap refuses an active device; close fails held I/O with ESHUTDOWN", async () => {
    const gate = new GateDevice("vol", new LinearDevice(new MemoryDevice(MIB), 0, MIB));
    expect(() => gate.swap(gate.current)).toThrow(/must be suspended/);
    await gate.suspend();
    const held = gate.read(0, 512);
    await gate.close();
    await expect(held).rejects.toMatchObject({ code: "ESHUTDOWN" });
    await expect(gate.read(0, 512)).rejects.toMatchObject({ code: "ESHUTDOWN" });
  });

  test("target suspend/resume hooks run around the hold", async () => {
    const calls: string[] = [];
    const table = new LinearDevice(new MemoryDevice(MIB), 0, MIB) as TargetDevice;
    table.suspend = async () => {
      calls.push("target suspend");
    };
    table.resume = async () => {
      calls.push("target resume");
    };
    const gate = new GateDevice("vol", table);
    await gate.suspend();
    await gate.suspend(); // idempotent
    await gate.resume();
    await gate.resume();
    expect(calls).toEqual(["target suspend", "target resume"]);
  });

  test("property: writes issued across random suspend/resume cycles all complete with their data", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.boolean(), { minLength: 1, maxLength: 64 }), async (toggles) => {
        const mem = new MemoryDevice(64 * 512);
        const gate = new GateDevice("vol", new LinearDevice(mem, 0, 64 * 512));
        const writes: Array<Promise<void>> = [];
        for (const [i, toggle] of toggles.entries()) {
          writes.push(gate.write(i * 512, Buffer.alloc(512, i + 1)));
          if (toggle) await (gate.state === "active" ? gate.suspend() : gate.resume());
        }
        await gate.resume();
        await Promise.all(writes); // none rejected
        // One block per write: every write landed with its own data.
        for (let i = 0; i < toggles.length; i++) {
          expect((await mem.read(i * 512, 512)).equals(Buffer.alloc(512, i + 1))).toBe(true);
        }
      }),
      { numRuns: 50 },
    );
  });
});
