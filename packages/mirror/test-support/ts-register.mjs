// `node --import ./ts-register.mjs child.mjs`: lets a child process import the TypeScript sources.
import { register } from "node:module";

register("./ts-hooks.mjs", import.meta.url);
