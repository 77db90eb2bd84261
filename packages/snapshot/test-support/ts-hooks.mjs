// Module hooks that let a plain `node` child process run udm's TypeScript sources (for tests that
// kill -9 a real process): `@udm/<pkg>` resolves to packages/<pkg>/src/index.ts, `./x.js` next to
// a .ts file resolves to `./x.ts`, and .ts files are transpiled with the workspace's typescript.
// Transpiled output is cached under the OS temp dir by path, size and mtime, so only the first
// child of a run pays for loading typescript.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const packagesDir = new URL("../../", import.meta.url);
const cacheDir = join(tmpdir(), "udm-ts-transpile-cache");
let ts = null;

export async function resolve(specifier, context, next) {
  const m = /^@udm\/([a-z-]+)$/.exec(specifier);
  if (m) {
    return { url: new URL(`${m[1]}/src/index.ts`, packagesDir).href, shortCircuit: true };
  }
  if (specifier.endsWith(".js") && context.parentURL?.endsWith(".ts")) {
    const candidate = new URL(specifier.replace(/\.js$/, ".ts"), context.parentURL);
    if (existsSync(fileURLToPath(candidate))) return { url: candidate.href, shortCircuit: true };
  }
  return next(specifier, context);
}

export async function load(url, context, next) {
  if (!url.endsWith(".ts")) return next(url, context);
  const path = fileURLToPath(url);
  const st = statSync(path);
  const key = createHash("sha256").update(`${path}\0${st.size}\0${st.mtimeMs}`).digest("hex").slice(0, 32);
  const cached = join(cacheDir, `${key}.js`);
  if (existsSync(cached))
    return { format: "module", source: readFileSync(cached, "utf8"), shortCircuit: true };
  ts ??= (await import("typescript")).default;
  const out = ts.transpileModule(readFileSync(path, "utf8"), {
    fileName: path,
    compilerOptions: {
      module: ts.ModuleKind.ESNext,
      target: ts.ScriptTarget.ES2022,
      verbatimModuleSyntax: true,
      sourceMap: false,
    },
  });
  mkdirSync(cacheDir, { recursive: true });
  // Write then rename: concurrent children never read a half-written file.
  const tmp = `${cached}.${process.pid}.tmp`;
  writeFileSync(tmp, out.outputText);
  renameSync(tmp, cached);
  return { format: "module", source: out.outputText, shortCircuit: true };
}
