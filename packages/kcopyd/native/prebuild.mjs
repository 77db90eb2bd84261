// Builds the prebuilt addon shipped in the package (native/prebuilds/linux-x64/node.glibc.node)
// with prebuildify, from this source, on this machine: nothing is downloaded. Run by the
// package's `prepack` script, so `pnpm pack` / `npm pack` tarballs carry it; node-gyp-build (see
// src/native.ts) loads it when no source build exists, e.g. under pnpm 10, which skips install
// scripts. N-API (NAPI_VERSION 8) keeps one binary good for every Node version from 20 on.
import { spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
if (process.platform !== "linux" || process.arch !== "x64") {
  console.log(
    `@udm/kcopyd: prebuilds are made on linux-x64 only (this is ${process.platform}-${process.arch})`,
  );
  process.exit(0);
}
const require = createRequire(import.meta.url);
const prebuildify = join(dirname(require.resolve("prebuildify/package.json")), "bin.js");
// The running Node's headers (Debian's nodejs ships them), as native/build.mjs does: offline.
const prefix = dirname(dirname(process.execPath));
const nodedir =
  process.env.npm_config_nodedir ??
  (existsSync(join(prefix, "include/node/node_api.h")) ? prefix : undefined);
const npmGyp = join(prefix, "lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js");
const env = {
  ...process.env,
  ...(nodedir && { npm_config_nodedir: nodedir }),
  ...(!process.env.PREBUILD_NODE_GYP && existsSync(npmGyp) && { PREBUILD_NODE_GYP: npmGyp }),
};
// Built in a copy of the sources: the package's own native/build (a source build some process
// may be loading) is left alone.
const work = mkdtempSync(join(tmpdir(), "udm-kcopyd-prebuild-"));
try {
  for (const file of ["binding.gyp", "fileops.c"]) cpSync(join(here, file), join(work, file));
  const result = spawnSync(
    process.execPath,
    [prebuildify, "--napi", "--strip", "--tag-libc", "--target", process.versions.node],
    { cwd: work, env, stdio: ["ignore", "inherit", "inherit"] },
  );
  if (result.status !== 0) {
    throw new Error(`@udm/kcopyd: prebuildify failed (exit ${result.status}): needs python3, make and g++`);
  }
  rmSync(join(here, "prebuilds"), { recursive: true, force: true });
  cpSync(join(work, "prebuilds"), join(here, "prebuilds"), { recursive: true });
  console.log("@udm/kcopyd: prebuilt native/prebuilds/linux-x64/node.glibc.node");
} finally {
  rmSync(work, { recursive: true, force: true });
}
