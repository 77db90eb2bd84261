// A process that does snapshot work on files until it is killed (kill -9 tests):
//   node --import ./ts-register.mjs crash-child.mjs copy  DIR SIZE   -> origin writes through snapshot-origin forever
//   node --import ./ts-register.mjs crash-child.mjs merge DIR SIZE   -> snapshot-merge of DIR/cow.img into DIR/origin.img
// It prints "progress N" lines so the parent knows work is under way.
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { FileDevice, KcopydClient } from "@udm/kcopyd";
import { setMergeBatchBytes, snapshotMergeTarget, snapshotOriginTarget, snapshotTarget } from "@udm/snapshot";

const [mode, dir, sizeText] = process.argv.slice(2);
const size = Number(sizeText);
const originPath = join(dir, "origin.img");
const cowPath = join(dir, "cow.img");
const devices = {
  [originPath]: await FileDevice.open(originPath),
  [cowPath]: await FileDevice.open(cowPath),
};
const ctx = { openDevice: async (spec) => devices[spec], kcopyd: new KcopydClient() };

if (mode === "copy") {
  const origin = await snapshotOriginTarget.create([originPath], size, ctx);
  await snapshotTarget.create([originPath, cowPath, "P", "8"], size, ctx);
  let n = 0;
  const worker = async () => {
    for (;;) {
      const at = Math.floor(Math.random() * (size - 9000));
      await origin.write(at, randomBytes(1 + Math.floor(Math.random() * 9000)));
      if (++n % 20 === 0) console.log(`progress ${n}`);
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
} else if (mode === "merge") {
  setMergeBatchBytes(8192);
  // Slow origin writes down a little, so the parent's kill lands in the middle of the merge
  // even on a fast disk.
  const origin = devices[originPath];
  devices[originPath] = new Proxy(origin, {
    get(target, prop) {
      if (prop === "write") {
        return async (...args) => {
          await new Promise((r) => setTimeout(r, 3));
          return target.write(...args);
        };
      }
      const value = target[prop];
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  const merge = await snapshotMergeTarget.create([originPath, cowPath, "P", "0"], size, ctx);
  for (;;) {
    console.log(`progress ${merge.progress().doneBytes}`);
    await new Promise((r) => setTimeout(r, 1));
  }
} else {
  throw new Error(`unknown mode ${mode}`);
}
