export * from "../../packages/snapshot/bench/snapshot.mjs";
