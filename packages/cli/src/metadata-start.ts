import type { DeviceManager, TableRequest } from "./device-manager.js";
import type { Logger } from "./logger.js";
import { type MetadataRecord, tableChecksum } from "./metadata-record.js";

/** Name of the record in the data directory. */
export const METADATA_RECORD_NAME = "udm.meta.json";

/**
 * Starts the devices of a server from its metadata record (what the last run had, runtime
 * snapshots, reloads and merges included) or, when there is none or the table file was edited
 * since, from the table file; from then on every change is recorded before it is acknowledged.
 * A damaged record throws MetadataRecordError (naming the file and the backup): nothing starts.
 *
 * @example
 * ```ts
 * const record = new MetadataRecord(join(dataDir, METADATA_RECORD_NAME));
 * const manager = new DeviceManager({ targets, log, exports: server, record: (s) => record.write(s) });
 * await startFromRecord(manager, record, { tableFile, tableText, requests }, log);
 * ```
 */
export async function startFromRecord(
  manager: DeviceManager,
  record: MetadataRecord,
  table: {
    tableFile?: string;
    tableText?: string;
    requests: TableRequest[];
    /** Called with the names about to be started, before anything is opened; may throw. */
    check?: (names: string[]) => void;
  },
  log: Logger,
): Promise<{ from: "record" | "table"; seqno: number }> {
  const last = record.read();
  const source =
    table.tableFile !== undefined && table.tableText !== undefined
      ? { tableFile: table.tableFile, sha256: tableChecksum(table.tableText) }
      : undefined;
  record.source = source;
  const edited =
    last && source && (last.source?.sha256 !== source.sha256 || last.source.tableFile !== source.tableFile);
  if (last && !edited) {
    table.check?.(last.state.devices.map((d) => d.name));
    await manager.activate(last.state, record.path);
    log.info(
      { record: record.path, seqno: last.seqno, devices: last.state.devices.length },
      "devices started from the metadata record",
    );
    return { from: "record", seqno: last.seqno };
  }
  if (edited) {
    log.warn(
      { record: record.path, seqno: last.seqno, tableFile: source.tableFile },
      "the table file changed since the metadata record was written: starting from the table file (the record's last version stays in its archive)",
    );
  }
  table.check?.(table.requests.map((r) => r.table.name));
  await manager.create(table.requests);
  return { from: "table", seqno: last?.seqno ?? 0 };
}
