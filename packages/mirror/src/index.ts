export * from "./dirty-log.js";
export * from "./mirror-device.js";
export * from "./mirror-table.js";
export * from "./mirror-target.js";
export * from "./region-bitset.js";
export * from "./region-hash.js";
