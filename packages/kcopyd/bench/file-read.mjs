/**
 * Microbenchmark of FileDevice.readInto: 4 KiB random reads from a cached file at QD1 and QD16,
 * through the thread pool only (`syncReadMaxBytes: 0`, what FileDevice did before the synchronous
 * page-cache path) and with the default synchronous path, alternating within one run (the
 * machine is shared: compare the ratio, not the absolute figures).
 *
 *   npx tsc -b packages/kcopyd && node packages/kcopyd/bench/file-read.mjs [file] [--size=GiB] [--rounds=3]
 *     [--seconds=2] [--block=KiB (4)] [--sync-max=bytes (the default SYNC_READ_MAX_BYTES)]
 *
 * `--block=256 --sync-max=1048576` measures whether a read size is worth serving synchronously.
 * Besides µs per read, it reports the longest event-loop delay (how long other
 * work, e.g. another NBD connection, waits behind the synchronous copies).
 *
 * Without a file argument a random 1 GiB file is created in os.tmpdir() and removed at the end.
 * The file is read once first so that it is in the page cache.
 */
import { randomFillSync } from "node:crypto";
import { closeSync, createReadStream, openSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { FileDevice } from "../dist/index.js";

const MiB = 1024 * 1024;
const arg = (name, fallback) => {
  const a = process.argv.find((x) => x.startsWith(`--${name}=`));
  return a ? Number(a.slice(name.length + 3)) : fallback;
};
const createBytes = arg("size", 1) * 1024 * MiB;
const rounds = arg("rounds", 3);
const seconds = arg("seconds", 2);
const BLOCK = arg("block", 4) * 1024;
const syncMax = arg("sync-max", undefined);
let path = process.argv.slice(2).find((x) => !x.startsWith("--"));
const created = !path;
if (!path) {
  path = join(tmpdir(), `udm-file-read-bench-${process.pid}.img`);
  const fd = openSync(path, "w");
  const chunk = Buffer.allocUnsafe(8 * MiB);
  for (let done = 0; done < createBytes; done += chunk.length) writeSync(fd, randomFillSync(chunk));
  closeSync(fd);
}
await new Promise((resolve, reject) =>
  createReadStream(path, { highWaterMark: 8 * MiB })
    .on("data", () => {})
    .on("end", resolve)
    .on("error", reject),
);

/** Runs `qd` loops of random reads for `seconds`; µs per op (wall / ops) and the longest event-loop delay (µs). */
async function run(dev, qd) {
  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  const blocks = Math.floor(dev.sizeBytes / BLOCK);
  const deadline = performance.now() + seconds * 1000;
  let ops = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: qd }, async () => {
      const buf = Buffer.allocUnsafe(BLOCK);
      while (performance.now() < deadline) {
        await dev.readInto(Math.floor(Math.random() * blocks) * BLOCK, buf);
        ops++;
      }
    }),
  );
  delay.disable();
  return { us: ((performance.now() - start) * 1000) / ops, loopMax: delay.max / 1000 };
}

const modes = [
  ["thread pool (before)", { syncReadMaxBytes: 0 }],
  ["sync page cache (after)", syncMax === undefined ? {} : { syncReadMaxBytes: syncMax }],
];
const results = {};
for (let round = 0; round < rounds; round++) {
  for (const qd of [1, 16]) {
    for (const [label, options] of round % 2 ? [...modes].reverse() : modes) {
      const dev = await FileDevice.open(path, { readOnly: true, ...options });
      try {
        const r = await run(dev, qd);
        const key = `QD${qd} ${label}`;
        results[key] = [...(results[key] ?? []), r];
        if (round === 0 && label.startsWith("sync")) console.error(`QD${qd} stats`, dev.readStats);
      } finally {
        await dev.close();
      }
    }
  }
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const fmt = (xs) => xs.map((x) => x.toFixed(1)).join("/");
console.log(
  `${BLOCK / 1024} KiB random reads (sync cap ${syncMax ?? "default"}), ${(statSync(path).size / 1024 / MiB).toFixed(2)} GiB cached file ${path}, ${rounds} rounds of ${seconds} s, load ${readFileSync("/proc/loadavg", "utf8").trim()}`,
);
for (const qd of [1, 16]) {
  const b = results[`QD${qd} thread pool (before)`];
  const a = results[`QD${qd} sync page cache (after)`];
  const before = median(b.map((r) => r.us));
  const after = median(a.map((r) => r.us));
  console.log(
    `QD${qd}: before ${before.toFixed(1)} µs/op (${Math.round(1e6 / before)} IOPS), after ${after.toFixed(1)} µs/op (${Math.round(1e6 / after)} IOPS), speed-up ${(before / after).toFixed(2)}x; ` +
      `event-loop delay max before ${median(b.map((r) => r.loopMax)).toFixed(0)} µs, after ${median(a.map((r) => r.loopMax)).toFixed(0)} µs; ` +
      `runs µs/op before ${fmt(b.map((r) => r.us))} after ${fmt(a.map((r) => r.us))}`,
  );
}
if (created) rmSync(path, { force: true });
