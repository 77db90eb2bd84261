import { isPoisoned, watchPoison } from "@udm/kcopyd";
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

describe("BufferPool in poison mode (UDM_POISON=1)", () => {
  it("hands out poison, and catches a buffer written while idle or given back twice", () => {
    const caught: string[] = [];
    const stop = watchPoison((err) => caught.push(err.message));
    try {
      const pool = new BufferPool(1 << 20, { poison: true });
      const a = pool.take(8192);
      expect(isPoisoned(a)).toBe(true);
      a.fill(7);
      pool.give(a);
      expect(isPoisoned(a)).toBe(true); // what a socket still holding it would send
      pool.give(a);
      expect(caught).toEqual(["UDM_POISON: a 8192-byte reply buffer was given back twice"]);
      a.fill(1, 100, 200); // a device still filling a buffer that was given back
      const b = pool.take(8192);
      expect(b).not.toBe(a); // the written buffer is dropped, not handed out
      expect(isPoisoned(b)).toBe(true);
      expect(caught[1]).toBe(
        "UDM_POISON: a pooled 8192-byte reply buffer was written after it was given back",
      );
    } finally {
      stop();
    }
  });
});
