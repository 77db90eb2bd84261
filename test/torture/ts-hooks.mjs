/**
 * Node module hooks that run the workspace's TypeScript sources in a child process without a
 * build: `@udm/<pkg>` resolves to packages/<pkg>/src/index.ts (as vitest's aliases do), a
 * `./x.js` import from a .ts file finds `./x.ts`, and .ts files are transpiled one by one with
 * the TypeScript compiler (types are not checked here: `tsc -p tsconfig.test.json` does that).
 *
 * @example
 * ```sh
 * node --import ./test/torture/register-ts.mjs test/torture/nbd-child.ts '{"exports":[]}'
 * ```
 */
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { fileURLToPath, pathToFileURL } from "node:url";
import ts from "typescript";

const ROOT = new URL("../../", import.meta.url);

export async function resolve(specifier, context, next) {
  const m = /^@udm\/([a-z-]+)$/.exec(specifier);
  if (m) {
    const url = new URL(`packages/${m[1]}/src/index.ts`, ROOT);
    if (existsSync(url)) return { url: url.href, shortCircuit: true, format: "module" };
  }
  if (context.parentURL?.endsWith(".ts") && /^\.{1,2}\//.test(specifier) && specifier.endsWith(".js")) {
    const url = new URL(`${specifier.slice(0, -3)}.ts`, context.parentURL);
    if (existsSync(url)) return { url: url.href, shortCircuit: true, format: "module" };
  }
  return next(specifier, context);
}

export async function load(url, context, next) {
  if (url.startsWith("file:") && url.endsWith(".ts")) {
    const fileName = fileURLToPath(url);
    const source = await readFile(fileName, "utf8");
    const out = ts.transpileModule(source, {
      fileName,
      compilerOptions: {
        module: ts.ModuleKind.ESNext,
        target: ts.ScriptTarget.ES2022,
        verbatimModuleSyntax: true,
        inlineSourceMap: true,
      },
    });
    return { format: "module", source: out.outputText, shortCircuit: true };
  }
  return next(url, context);
}

export const rootUrl = pathToFileURL(fileURLToPath(ROOT)).href;
