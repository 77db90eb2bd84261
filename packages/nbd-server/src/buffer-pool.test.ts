import { describe, expect, it } from "vitest";
import { BufferPool } from "./buffer-pool.js";

describe("BufferPool", () => {
  it("hands back a freed buffer of the same size and keeps no more than its budget", () => {
    const pool = new BufferPool(3 * 8192);
    const a = pool.take(8192);
    const b = pool.take(8192);
    expect(a).not.toBe(b);
    pool.give(a);
    expect(pool.take(8192)).toBe(a);
    expect(pool.take(8192)).not.toBe(b);
    for (let i = 0; i < 10; i++) pool.give(Buffer.allocUnsafeSlow(8192));
    expect(pool.idleBytes).toBe(3 * 8192);
  });

  it("never keeps views into shared memory or small buffers", () => {
    const pool = new BufferPool(1 << 20);
    pool.give(Buffer.allocUnsafeSlow(16384).subarray(0, 8192));
    pool.give(Buffer.allocUnsafe(100));
    expect(pool.idleBytes).toBe(0);
    expect(pool.take(100).length).toBe(100);
  });
});
