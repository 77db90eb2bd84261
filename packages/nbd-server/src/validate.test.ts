import { IoError } from "@udm/kcopyd";
import { describe, expect, it } from "vitest";
import { nbdErrorOf, type RequestContext, validateRequest } from "./validate.js";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EPERM,
  type NbdRequest,
} from "./wire.js";

const ctx: RequestContext = { sizeBytes: 1 << 20, readOnly: false, structured: true, hasMetaContexts: true };
const req = (type: number, flags: number, offset: bigint, length: number): NbdRequest => ({
  type,
  flags,
  offset,
  length,
  cookie: Buffer.alloc(8),
});
const errorOf = (r: NbdRequest, c: Partial<RequestContext> = {}) =>
  validateRequest(r, { ...ctx, ...c })?.error ?? 0;

describe("validateRequest", () => {
  it("accepts well-formed requests with every flag their command takes", () => {
    expect(errorOf(req(NBD_CMD_READ, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF, 0n, 4096))).toBe(0);
    expect(errorOf(req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 4096n, 4096))).toBe(0);
    expect(
      errorOf(req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, 0n, 1 << 20)),
    ).toBe(0);
    expect(errorOf(req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0n, 1 << 20))).toBe(0);
    expect(errorOf(req(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 0n, 0))).toBe(0);
    expect(errorOf(req(NBD_CMD_CACHE, 0, 0n, 1 << 20))).toBe(0);
    expect(errorOf(req(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0n, 0))).toBe(0);
    expect(errorOf(req(NBD_CMD_DISC, 0xffff, 5n, 5))).toBe(0);
  });

  it("refuses unknown commands and flags, and flags on the wrong command", () => {
    expect(errorOf(req(9, 0, 0n, 0))).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_READ, 0x8000, 0n, 512))).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0n, 512))).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0n, 512))).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0n, 512), { structured: false })).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_FLUSH, 0, 1n, 0))).toBe(NBD_EINVAL);
  });

  it("answers out-of-range with EINVAL, or ENOSPC for writes, including 64-bit overflow", () => {
    expect(errorOf(req(NBD_CMD_READ, 0, BigInt(1 << 20), 1))).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_READ, 0, BigInt(1 << 20), 0))).toBe(0);
    expect(errorOf(req(NBD_CMD_WRITE, 0, BigInt((1 << 20) - 1), 2))).toBe(NBD_ENOSPC);
    expect(errorOf(req(NBD_CMD_WRITE_ZEROES, 0, 2n ** 64n - 1n, 1))).toBe(NBD_ENOSPC);
    expect(errorOf(req(NBD_CMD_TRIM, 0, 2n ** 64n - 1n, 0xffffffff))).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_BLOCK_STATUS, 0, 2n ** 63n, 1))).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_CACHE, 0, 1n << 21n, 1))).toBe(NBD_EINVAL);
  });

  it("refuses oversized payloads, read-only writes and block status without a context", () => {
    expect(errorOf(req(NBD_CMD_READ, 0, 0n, (32 << 20) + 1), { sizeBytes: 1 << 30 })).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_WRITE, 0, 0n, (32 << 20) + 1), { sizeBytes: 1 << 30 })).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_TRIM, 0, 0n, 1 << 29), { sizeBytes: 1 << 30 })).toBe(0);
    for (const t of [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES]) {
      expect(errorOf(req(t, 0, 0n, 512), { readOnly: true })).toBe(NBD_EPERM);
    }
    expect(errorOf(req(NBD_CMD_READ, 0, 0n, 512), { readOnly: true })).toBe(0);
    expect(errorOf(req(NBD_CMD_BLOCK_STATUS, 0, 0n, 512), { hasMetaContexts: false })).toBe(NBD_EINVAL);
    expect(errorOf(req(NBD_CMD_BLOCK_STATUS, 0, 0n, 0))).toBe(NBD_EINVAL);
  });
});

describe("nbdErrorOf", () => {
  it("maps device errors to protocol numbers", () => {
    expect(nbdErrorOf(new IoError("ENOSPC", "d", "full"))).toBe(NBD_ENOSPC);
    expect(nbdErrorOf(new IoError("ENOTSUP", "d", "no"))).toBe(NBD_ENOTSUP);
    expect(nbdErrorOf(Object.assign(new Error("ro"), { code: "EROFS" }))).toBe(NBD_EPERM);
    expect(nbdErrorOf(new RangeError("outside"))).toBe(NBD_EINVAL);
    expect(nbdErrorOf("weird")).toBe(NBD_EIO);
  });
});
