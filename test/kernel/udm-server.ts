/**
 * A udm NbdServer on 127.0.0.1 (port 0) for the kernel tests, counting connections per export.
 */
import type { BlockDevice } from "@udm/kcopyd";
import { NbdServer } from "@udm/nbd-server";

export interface UdmTestServer {
  server: NbdServer;
  port: number;
  /** Connections that reached transmission, per export name. */
  connections: Map<string, number>;
  close(): Promise<void>;
}

/**
 * Serves each device under its name on 127.0.0.1 and a free port.
 *
 * @example
 * ```ts
 * const { port, close } = await serveExports({ disk: await FileDevice.open(img) });
 * ```
 */
export async function serveExports(exports: Record<string, BlockDevice>): Promise<UdmTestServer> {
  const server = new NbdServer();
  for (const [name, device] of Object.entries(exports)) server.addExport(name, device);
  const connections = new Map<string, number>();
  server.on("open", (info: { export: string }) => {
    connections.set(info.export, (connections.get(info.export) ?? 0) + 1);
  });
  const address = await server.listen({ host: "127.0.0.1", port: 0 });
  const port = Number(address.slice(address.lastIndexOf(":") + 1));
  return { server, port, connections, close: () => server.close() };
}
