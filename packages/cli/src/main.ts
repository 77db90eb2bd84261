#!/usr/bin/env node
// The `udm` executable (packages/cli/bin/udm.js imports this file).
import { runCli } from "./cli.js";

const code = await runCli(process.argv);
process.exitCode = code;
// Exit even if a library left a handle open (a socket in TIME_WAIT, a timer): the command is done.
setTimeout(() => process.exit(code), 1000).unref();
