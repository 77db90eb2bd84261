// @udm/kcopyd as a library others install: the packed tarball (with its prebuilt linux-x64
// addon, built here by the prepack script) installed with npm and with pnpm in an empty folder
// outside the workspace, where the README's example runs with the native addon active.
import { execFileSync, spawnSync } from "node:child_process";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { ROOT } from "./cli-helpers.js";
import { requireTool } from "./tools.js";

const PKG = join(ROOT, "packages/kcopyd");
let dir: string;
let tarball: string;
let unpacked: string;
const hasToolchain = ["python3", "make", "g++", "npm", "pnpm", "tar"].every(requireTool);

/** The README's example: the first ```js block after "## Example". */
function readmeExample(): string {
  const readme = readFileSync(join(PKG, "README.md"), "utf8");
  const section = readme.slice(readme.indexOf("## Example"));
  const m = /```js\n([\s\S]*?)```/.exec(section);
  if (!m) throw new Error("README.md has no ```js example after ## Example");
  return m[1]!;
}

beforeAll(() => {
  if (!hasToolchain) return;
  dir = mkdtempSync(join(tmpdir(), "udm-kcopyd-pkg-"));
  execFileSync("npx", ["tsc", "-b", "packages/kcopyd"], { cwd: ROOT, stdio: "pipe" });
  // npm pack runs the prepack script: prebuildify builds native/prebuilds from this source.
  execFileSync("npm", ["pack", "--pack-destination", dir], {
    cwd: PKG,
    stdio: ["ignore", "pipe", "pipe"],
    timeout: 240_000,
  });
  const packed = readdirSync(dir).filter((f) => f.endsWith(".tgz"));
  expect(packed).toEqual(["udm-kcopyd-0.1.0.tgz"]);
  tarball = join(dir, packed[0]!);
  unpacked = join(dir, "unpacked");
  mkdirSync(unpacked);
  execFileSync("tar", ["-xzf", tarball, "-C", unpacked]);
}, 300_000);

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function installAndRun(manager: "npm" | "pnpm"): { stdout: string; stderr: string } {
  const app = join(dir, `app-${manager}`);
  mkdirSync(app);
  writeFileSync(
    join(app, "package.json"),
    JSON.stringify({ name: `app-${manager}`, private: true, type: "module" }),
  );
  const args =
    manager === "npm"
      ? ["install", "--no-audit", "--no-fund", "--prefer-offline", tarball]
      : ["add", "--prefer-offline", tarball];
  // A clean environment: nothing of the workspace's own pnpm or npm settings.
  const env: NodeJS.ProcessEnv = { ...process.env, npm_config_nodedir: "/usr" };
  for (const k of Object.keys(env)) if (/^(npm_|pnpm_)/i.test(k) && k !== "npm_config_nodedir") delete env[k];
  const install = spawnSync(manager, args, { cwd: app, env, encoding: "utf8", timeout: 240_000 });
  expect(install.status, `${manager} ${args.join(" ")}:\n${install.stdout}\n${install.stderr}`).toBe(0);
  writeFileSync(join(app, "copy.mjs"), readmeExample());
  const run = spawnSync(process.execPath, ["copy.mjs"], { cwd: app, encoding: "utf8", timeout: 60_000 });
  expect(run.status, run.stderr).toBe(0);
  return { stdout: run.stdout, stderr: run.stderr };
}

describe.runIf(hasToolchain)("@udm/kcopyd package", () => {
  test("the tarball: prebuilt addon, sources for its source maps, LICENSE, README, metadata; no tests", () => {
    const files = (sub: string) =>
      readdirSync(join(unpacked, "package", sub), { recursive: true }) as string[];
    expect(existsSync(join(unpacked, "package/native/prebuilds/linux-x64/node.glibc.node"))).toBe(true);
    for (const f of ["LICENSE", "README.md", "native/fileops.c", "native/binding.gyp", "native/build.mjs"]) {
      expect(existsSync(join(unpacked, "package", f)), f).toBe(true);
    }
    expect(files("dist").filter((f) => f.includes(".test."))).toEqual([]);
    expect(files("src").filter((f) => f.includes(".test."))).toEqual([]);
    // Every source map's sources are in the tarball.
    for (const map of files("dist").filter((f) => f.endsWith(".map"))) {
      const { sources } = JSON.parse(readFileSync(join(unpacked, "package/dist", map), "utf8"));
      for (const s of sources as string[]) {
        expect(existsSync(join(unpacked, "package/dist", map, "..", s)), `${map} -> ${s}`).toBe(true);
      }
    }
    const pkg = JSON.parse(readFileSync(join(unpacked, "package/package.json"), "utf8"));
    expect(pkg).toMatchObject({ license: "MIT", engines: { node: ">=20.0.0" } });
    expect(pkg.description).toMatch(/kcopyd/);
    expect(readFileSync(join(unpacked, "package/LICENSE"), "utf8")).toMatch(/^MIT License/);
  });

  test("installed with npm in an empty folder: the README example runs with the addon active", () => {
    const { stdout } = installAndRun("npm");
    expect(stdout).toMatch(/read error: false, write error mask: 0\n/);
    expect(stdout).toMatch(/same data: true\n/);
    // Holes kept: far less than the 64 MiB source allocated.
    const allocated = Number(/copy\.img: (\d+) bytes allocated/.exec(stdout)?.[1]);
    expect(allocated).toBeLessThanOrEqual(2 << 20);
    expect(stdout).toMatch(/native addon: prebuilt\n/);
  }, 300_000);

  test("installed with pnpm (which runs no build scripts) in an empty folder: the prebuilt addon is active", () => {
    const { stdout } = installAndRun("pnpm");
    expect(stdout).toMatch(/same data: true\n/);
    expect(stdout).toMatch(/native addon: prebuilt\n/);
  }, 300_000);
});
