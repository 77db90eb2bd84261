// bench suite "mirror" (for bench/suites/): @udm/mirror against a plain FileDevice and dd.
//
// Cases (each run ROUNDS times in rotating order; the median is reported):
//   - sequential 1 MiB writes, 8 in flight, to a 2-leg mirror (disk log, legs in sync) vs one
//     plain file; the time includes the final flush (fdatasync of every file);
//   - 4 KiB random writes, 16 in flight, same devices, same final flush;
//   - a full resync (core log, default sync: every region copied, kcopyd, default leg -> leg 1)
//     vs `dd bs=1M conv=notrunc,fdatasync` of the same file; the source is evicted from the page
//     cache before each run (`dd iflag=nocache count=0`), both include making the copy durable;
//   - resync time vs the number of dirty regions of a 64 GiB sparse mirror (a disk log written
//     with N dirty regions): only those regions are copied.
// Everything runs in this process (no child): the mirror is a library, as the NBD server uses it.
import { execFileSync } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { promises as fsp } from "node:fs";
import { join } from "node:path";
import { FileDevice, KcopydClient } from "@udm/kcopyd";
import { mirrorTarget } from "@udm/mirror";

export const name = "mirror";

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const ROUNDS = 3;
const REGION_SECTORS = 1024;

function evict(path) {
  execFileSync("dd", [`if=${path}`, "iflag=nocache", "count=0", "status=none"]);
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

async function openFiles(dir, names, sizeBytes) {
  const out = {};
  for (const n of names) {
    const path = join(dir, `${n}.img`);
    await fsp.rm(path, { force: true });
    out[n] = await FileDevice.open(path, { createSizeBytes: sizeBytes });
  }
  return out;
}

async function createMirror(line, sizeBytes, devices) {
  return mirrorTarget.create(line.split(" "), sizeBytes, {
    kcopyd: new KcopydClient(),
    openDevice: async (spec) => devices[spec],
  });
}

async function closeAll(devs) {
  for (const d of Object.values(devs)) await d.close();
}

/** Writes `count` buffers from `offsetOf(i)` with `depth` in flight, then flushes. */
async function writeLoad(dev, count, size, depth, offsetOf) {
  const buf = Buffer.alloc(size);
  randomFillSync(buf);
  const started = performance.now();
  const inflight = new Set();
  for (let i = 0; i < count; i++) {
    const p = dev.write(offsetOf(i), buf).finally(() => inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= depth) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  await dev.flush();
  return (performance.now() - started) / 1000;
}

async function writeCase(ctx, kind, sizeBytes) {
  const plain = [];
  const naive = [];
  const mirror = [];
  const seq = kind === "seq";
  const ioSize = seq ? MiB : 4096;
  const count = seq ? sizeBytes / MiB : ctx.quick ? 2000 : 20000;
  const offsetOf = seq ? (i) => i * MiB : () => Math.floor(Math.random() * (sizeBytes / 4096)) * 4096;
  for (let round = 0; round < (ctx.quick ? 1 : ROUNDS); round++) {
    const order = ["plain", "naive", "mirror"];
    for (let k = 0; k < order.length; k++) {
      const which = order[(k + round) % order.length];
      const devs = await openFiles(ctx.workDir, ["p", "a", "b", "log"], sizeBytes);
      ctx.log(`${kind} ${which} round ${round + 1}`);
      if (which === "plain") {
        plain.push(await writeLoad(devs.p, count, ioSize, seq ? 8 : 16, offsetOf));
      } else if (which === "naive") {
        // The same bytes to two files with no mirror logic: what one disk allows for two legs.
        const both = {
          write: (offset, data) => Promise.all([devs.a.write(offset, data), devs.b.write(offset, data)]),
          flush: () => Promise.all([devs.a.flush(), devs.b.flush()]),
        };
        naive.push(await writeLoad(both, count, ioSize, seq ? 8 : 16, offsetOf));
      } else {
        const m = await createMirror(`disk 3 log ${REGION_SECTORS} nosync 2 a 0 b 0`, sizeBytes, devs);
        mirror.push(await writeLoad(m, count, ioSize, seq ? 8 : 16, offsetOf));
        await m.close();
      }
      await closeAll(devs);
    }
  }
  const bytes = count * ioSize;
  const label = seq ? "sequential 1 MiB writes (QD 8)" : "4 KiB random writes (QD 16)";
  const rate = (s) => (seq ? bytes / MiB / s : count / s);
  const unit = seq ? "MiB/s" : "IOPS";
  return [
    { case: label, tool: "plain FileDevice", [unit]: rate(median(plain)) },
    {
      case: label,
      tool: "2 files, no mirror logic",
      [unit]: rate(median(naive)),
      "vs plain": median(plain) / median(naive),
    },
    {
      case: label,
      tool: "2-leg mirror",
      [unit]: rate(median(mirror)),
      "vs plain": median(plain) / median(mirror),
    },
  ];
}

async function resyncCase(ctx, sizeBytes) {
  const src = join(ctx.workDir, "a.img");
  await fsp.rm(src, { force: true });
  const fh = await fsp.open(src, "w");
  const chunk = Buffer.alloc(16 * MiB);
  for (let done = 0; done < sizeBytes; done += chunk.length) {
    randomFillSync(chunk);
    await fh.write(chunk, 0, chunk.length, done);
  }
  await fh.close();
  const udm = [];
  const dd = [];
  for (let round = 0; round < (ctx.quick ? 1 : ROUNDS); round++) {
    for (const which of round % 2 ? ["dd", "udm"] : ["udm", "dd"]) {
      const dst = join(ctx.workDir, "b.img");
      await fsp.rm(dst, { force: true });
      evict(src);
      ctx.log(`resync ${which} round ${round + 1}`);
      if (which === "dd") {
        const started = performance.now();
        execFileSync("dd", [`if=${src}`, `of=${dst}`, "bs=1M", "conv=notrunc,fdatasync", "status=none"]);
        dd.push((performance.now() - started) / 1000);
      } else {
        const a = await FileDevice.open(src);
        const b = await FileDevice.open(dst, { createSizeBytes: sizeBytes });
        const started = performance.now();
        const m = await createMirror(`core 1 ${REGION_SECTORS} 2 a 0 b 0`, sizeBytes, { a, b });
        await m.waitForSync();
        await b.flush();
        udm.push((performance.now() - started) / 1000);
        await m.close();
        await a.close();
        await b.close();
      }
    }
  }
  const mib = sizeBytes / MiB;
  return [
    { case: `full resync of ${mib} MiB`, tool: "dd bs=1M", "MiB/s": mib / median(dd) },
    {
      case: `full resync of ${mib} MiB`,
      tool: "udm mirror",
      "MiB/s": mib / median(udm),
      "vs dd": median(dd) / median(udm),
    },
  ];
}

async function dirtyRegionsCase(ctx) {
  const size = 64 * GiB;
  const regionBytes = REGION_SECTORS * 512;
  const regions = size / regionBytes;
  const rows = [];
  for (const dirty of ctx.quick ? [1, 10] : [1, 10, 100, 1000]) {
    const times = [];
    for (let round = 0; round < (ctx.quick ? 1 : ROUNDS); round++) {
      const devs = await openFiles(ctx.workDir, ["a", "b", "log"], size);
      const header = Buffer.alloc(1024);
      header.writeUInt32LE(0x4d695272, 0);
      header.writeUInt32LE(2, 4);
      header.writeBigUInt64LE(BigInt(regions), 8);
      const bitmap = Buffer.alloc(regions / 8, 0xff);
      const data = Buffer.alloc(regionBytes, 7);
      for (let i = 0; i < dirty; i++) {
        const r = Math.floor((i * regions) / dirty);
        bitmap[r >> 3] &= ~(1 << (r & 7));
        await devs.a.write(r * regionBytes, data);
      }
      await devs.log.write(0, Buffer.concat([header, bitmap]));
      ctx.log(`${dirty} dirty regions round ${round + 1}`);
      const started = performance.now();
      const m = await createMirror(`disk 2 log ${REGION_SECTORS} 2 a 0 b 0`, size, devs);
      await m.waitForSync();
      await devs.b.flush();
      times.push((performance.now() - started) / 1000);
      await m.close();
      await closeAll(devs);
    }
    rows.push({
      case: `64 GiB mirror, ${dirty} dirty region(s) of 512 KiB`,
      tool: "udm mirror",
      seconds: median(times),
    });
  }
  return rows;
}

/** @param {{ workDir: string, quick: boolean, log: (msg: string) => void }} ctx */
export async function run(ctx) {
  const size = ctx.quick ? 64 * MiB : GiB;
  return [
    ...(await writeCase(ctx, "seq", size)),
    ...(await writeCase(ctx, "rand", size)),
    ...(await resyncCase(ctx, size)),
    ...(await dirtyRegionsCase(ctx)),
  ];
}

export function notes(rows) {
  const seq = rows.find((r) => r.case.startsWith("sequential") && r.tool === "2-leg mirror");
  const resync = rows.find((r) => r.case.startsWith("full resync") && r.tool === "udm mirror");
  return [
    "Legs, log and plain device are files in the same directory (one disk), so a 2-leg mirror",
    "writes twice the bytes of the plain device: on one disk 0.5x is the ceiling for page-cache-bound",
    "runs; the issue's 0.8x target assumes legs on separate disks. The '2 files, no mirror logic' row",
    "writes the same bytes to both leg files directly: the mirror's own cost is the gap to that row.",
    `Targets (issue 5): 2-leg sequential writes >= 0.8x plain: ${seq ? seq["vs plain"].toFixed(2) : "?"}x;`,
    `full resync >= 0.9x dd: ${resync ? resync["vs dd"].toFixed(2) : "?"}x.`,
    '"vs plain" and "vs dd" are speed ratios (higher is better).',
  ].join("\n");
}
