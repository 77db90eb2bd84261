// Child process of mirror-kill.test.ts: a write storm on a 2-leg mirror with a disk log, until
// the parent kills it with SIGKILL. Usage: node --import ./ts-register.mjs kill-writer.mjs DIR [FIRST_SEQ].
// A restarted writer passes a FIRST_SEQ above the last run's, so values keep increasing.
// Block b (4 KiB) only ever gets increasing sequence numbers (u32 LE, repeated over the block);
// after each completed flush it prints `F b:seq,...`: those values are durable.
import { join } from "node:path";
import { FileDevice, KcopydClient } from "@udm/kcopyd";
import { mirrorTarget } from "@udm/mirror";

const dir = process.argv[2];
const SIZE = 16 * 2 ** 20;
const BLOCK = 4096;
const WRITERS = 8;
const files = {
  a: await FileDevice.open(join(dir, "a.img")),
  b: await FileDevice.open(join(dir, "b.img")),
  log: await FileDevice.open(join(dir, "log.img")),
};
const mirror = await mirrorTarget.create("disk 2 log 128 2 a 0 b 0".split(" "), SIZE, {
  kcopyd: new KcopydClient(),
  openDevice: async (spec) => files[spec],
});
let seq = Number(process.argv[3] ?? 0);
const acked = new Map();
async function writer(id) {
  for (;;) {
    const blocks = SIZE / BLOCK / WRITERS;
    const block = Math.floor(Math.random() * blocks) * WRITERS + id;
    const n = ++seq;
    const data = Buffer.alloc(BLOCK);
    for (let i = 0; i < BLOCK; i += 4) data.writeUInt32LE(n, i);
    await mirror.write(block * BLOCK, data);
    acked.set(block, n);
  }
}
async function flusher() {
  for (;;) {
    await new Promise((r) => setTimeout(r, 20));
    const snapshot = [...acked];
    acked.clear();
    await mirror.flush();
    process.stdout.write(`F ${snapshot.map(([b, n]) => `${b}:${n}`).join(",")}\n`);
  }
}
process.stdout.write("READY\n");
for (let i = 0; i < WRITERS; i++) void writer(i);
void flusher();
