export * from "./export-entry.js";
export * from "./handshake.js";
export * from "./server.js";
export * from "./transmission.js";
export * from "./validate.js";
export * from "./wire.js";
