/**
 * An NbdServer over memory devices in its own process, so a test can watch it crash (exit)
 * and measure its memory: `node --import ./test/torture/register-ts.mjs nbd-child.ts CONFIG`.
 * CONFIG is JSON ({@link ChildConfig}); the process prints `LISTENING HOST:PORT` once ready and
 * serves until SIGTERM. Nothing catches uncaught errors: a server bug ends the process.
 */
import { MemoryDevice } from "@udm/kcopyd";
import { NbdServer, type NbdServerOptions } from "@udm/nbd-server";

export interface ChildConfig {
  exports: Array<{ name: string; sizeBytes: number; readOnly?: boolean; description?: string }>;
  server?: Omit<NbdServerOptions, "log" | "tls">;
}

const config = JSON.parse(process.argv[2] ?? "{}") as ChildConfig;
const server = new NbdServer(config.server ?? {});
for (const e of config.exports) {
  server.addExport(e.name, new MemoryDevice(e.sizeBytes), {
    readOnly: e.readOnly ?? false,
    ...(e.description !== undefined && { description: e.description }),
  });
}
const address = await server.listen({ host: "127.0.0.1", port: 0 });
process.stdout.write(`LISTENING ${address}\n`);
process.on("SIGTERM", () => {
  server.close({ force: true }).then(() => process.exit(0));
});
