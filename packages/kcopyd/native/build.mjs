// Builds the optional native addon (native/build/Release/udm_fileops.node) with node-gyp, unless
// the prebuilt one of the package tarball (native/prebuilds, see prebuild.mjs) loads.
// Run by the package's `install` script. Fails soft: without a compiler, Node headers or
// node-gyp, udm keeps working through the pure-JS path (see src/native.ts), so this never
// fails the install; it prints one line saying why the addon is missing.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
if (process.env.UDM_NO_NATIVE === "1") {
  console.log("@udm/kcopyd: UDM_NO_NATIVE=1, native addon not built (pure-JS path)");
  process.exit(0);
}
// A prebuilt binary that loads here (shipped in the package tarball) makes compiling unneeded:
// installs then need no compiler. UDM_BUILD_FROM_SOURCE=1 compiles anyway.
if (process.env.UDM_BUILD_FROM_SOURCE !== "1" && existsSync(join(here, "prebuilds"))) {
  try {
    const require = createRequire(import.meta.url);
    const path = require("node-gyp-build").path(here);
    if (path.includes("/prebuilds/")) {
      require(path);
      console.log(`@udm/kcopyd: using the prebuilt native addon (${path})`);
      process.exit(0);
    }
  } catch (err) {
    console.log(
      `@udm/kcopyd: the prebuilt addon does not load here (${err.message.split("\n")[0]}): building from source`,
    );
  }
}
const args = ["rebuild"];
// Use the running Node's own headers (Debian's nodejs ships them in /usr/include/node) so the
// build works offline, unless a nodedir was configured (.npmrc `nodedir=`).
const prefix = dirname(dirname(process.execPath));
if (!process.env.npm_config_nodedir && existsSync(join(prefix, "include/node/node_api.h"))) {
  args.push(`--nodedir=${prefix}`);
}
// pnpm and npm put node-gyp on PATH for install scripts; run by hand, use npm's bundled copy.
const npmGyp = join(prefix, "lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js");
const onPath = spawnSync("node-gyp", ["--version"], { shell: true, stdio: "ignore" }).status === 0;
const result =
  onPath || !existsSync(npmGyp)
    ? spawnSync("node-gyp", args, { cwd: here, encoding: "utf8", shell: true })
    : spawnSync(process.execPath, [npmGyp, ...args], { cwd: here, encoding: "utf8" });
if (result.status !== 0) {
  const output = `${result.stdout ?? ""}\n${result.stderr ?? ""}\n${result.error ?? ""}`;
  const lines = output.split("\n").filter((line) => line.trim() && !line.startsWith("gyp info"));
  const reason =
    lines.find((line) => /: error:|not found|ENOTFOUND|No such file/i.test(line)) ??
    lines.find((line) => /gyp ERR! stack Error/.test(line)) ??
    `node-gyp exited with ${result.status}`;
  console.log(`@udm/kcopyd: native addon not built, using the pure-JS path (${reason.trim()})`);
}
