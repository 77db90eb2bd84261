// `node --import ./test/torture/register-ts.mjs file.ts`: run workspace TypeScript unbuilt (see ts-hooks.mjs).
import { register } from "node:module";

register("./ts-hooks.mjs", import.meta.url);
