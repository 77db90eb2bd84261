import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  decodeOptionReplyHeader,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeHoleChunk,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
  NBD_REP_ERR_UNSUP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NbdProtocolError,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from "./wire.js";

describe("wire codecs", () => {
  it("round-trips compact requests, keeping the cookie's 8 bytes and full 64-bit offsets", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 0xffff }),
        fc.integer({ min: 0, max: 0xffff }),
        fc.uint8Array({ minLength: 8, maxLength: 8 }),
        fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
        fc.integer({ min: 0, max: 0xffffffff }),
        (flags, type, cookie, offset, length) => {
          const b = encodeRequest(flags, type, Buffer.from(cookie), offset, length);
          expect(b.length).toBe(28);
          expect(b.readUInt32BE(0)).toBe(REQUEST_MAGIC);
          const r = decodeRequest(b);
          expect(r).not.toBeNull();
          expect(r?.flags).toBe(flags);
          expect(r?.type).toBe(type);
          expect(r?.cookie.equals(Buffer.from(cookie))).toBe(true);
          expect(r?.offset).toBe(offset);
          expect(r?.length).toBe(length);
        },
      ),
    );
  });

  it("rejects a request with a bad magic", () => {
    const b = encodeRequest(0, 0, Buffer.alloc(8), 0n, 0);
    b.writeUInt32BE(0x25609514, 0);
    expect(decodeRequest(b)).toBeNull();
  });

  it("encodes replies byte for byte", () => {
    const cookie = Buffer.from("0102030405060708", "hex");
    expect(encodeSimpleReply(22, cookie).toString("hex")).toBe(
      `${SIMPLE_REPLY_MAGIC.toString(16)}000000160102030405060708`,
    );
    const hole = encodeHoleChunk(NBD_REPLY_FLAG_DONE, cookie, 4096n, 512);
    expect(hole.toString("hex")).toBe(
      `${STRUCTURED_REPLY_MAGIC.toString(16)}000100020102030405060708` +
        "0000000c" +
        "0000000000001000" +
        "00000200",
    );
    const err = encodeErrorChunk(cookie, 5, "boom");
    expect(err.readUInt16BE(6)).toBe(NBD_REPLY_TYPE_ERROR);
    expect(err.readUInt32BE(16)).toBe(10);
    expect(err.subarray(20).toString("hex")).toBe(`000000050004${Buffer.from("boom").toString("hex")}`);
    const errOff = encodeErrorChunk(cookie, 5, "", 77n);
    expect(errOff.readUInt16BE(6)).toBe(NBD_REPLY_TYPE_ERROR_OFFSET);
    expect(errOff.readBigUInt64BE(26)).toBe(77n);
    const bs = encodeBlockStatusChunk(0, cookie, 9, [
      { lengthBytes: 4096, flags: 3 },
      { lengthBytes: 512, flags: 0 },
    ]);
    expect(bs.subarray(16).toString("hex")).toBe(
      "00000014" + "00000009" + "0000100000000003" + "0000020000000000",
    );
  });

  it("caps error messages so a chunk stays small", () => {
    const err = encodeErrorChunk(Buffer.alloc(8), 5, "x".repeat(100_000));
    expect(err.length).toBeLessThan(2048);
  });

  it("encodes option replies and infos", () => {
    const r = encodeOptionReply(42, NBD_REP_ERR_UNSUP, Buffer.from("no"));
    expect(decodeOptionReplyHeader(r)).toEqual({ option: 42, replyType: NBD_REP_ERR_UNSUP, length: 2 });
    const bad = Buffer.from(r);
    bad[0] = 9;
    expect(() => decodeOptionReplyHeader(bad)).toThrow(NbdProtocolError);
    expect(encodeInfoExport(2 ** 40, 0x1ed).toString("hex")).toBe("0000" + "0000010000000000" + "01ed");
    expect(encodeInfoBlockSize(1, 4096, 1 << 25).toString("hex")).toBe(
      "0003" + "00000001" + "00001000" + "02000000",
    );
    expect(encodeExportNameReply(512, 1, true).length).toBe(10);
    expect(encodeExportNameReply(512, 1, false).length).toBe(134);
  });
});
