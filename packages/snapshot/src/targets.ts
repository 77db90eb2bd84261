import { parseUintArg, TargetArgError, type TargetContext, type TargetType } from "@udm/kcopyd";
import { CowFormatError, chunkSizeProblem } from "./cow-format.js";
import type { ExceptionStore } from "./exception-store.js";
import { MergeDevice } from "./merge-device.js";
import { OriginDevice } from "./origin-device.js";
import { type OriginState, originStateOf, sameStorage } from "./origin-state.js";
import { PersistentStore } from "./persistent-store.js";
import { SnapshotDevice, type SnapshotFeatures } from "./snapshot-device.js";
import { SnapshotState } from "./snapshot-state.js";
import { TransientStore } from "./transient-store.js";

/** A parsed `snapshot`/`snapshot-merge` line (`snapshot_ctr`, `dm_exception_store_create`). */
export interface SnapshotTableArgs {
  originSpec: string;
  cowSpec: string;
  persistent: boolean;
  /** `PO`: userspace understands `Overflow`. */
  overflow: boolean;
  /** 0: from the COW header (persistent only). */
  chunkSectors: number;
  features: SnapshotFeatures;
}

const FEATURES = ["discard_zeroes_cow", "discard_passdown_origin"] as const;

/**
 * Parses `<origin> <cow> <P|PO|N> <chunk_sectors> [<#features> <feature>...]`, throwing a
 * TargetArgError that names the bad argument.
 *
 * @example
 * ```ts
 * parseSnapshotArgs(["/dev/vg/lv", "/dev/vg/cow", "PO", "16"], "snapshot");
 * // { persistent: true, overflow: true, chunkSectors: 16, ... }
 * ```
 */
export function parseSnapshotArgs(args: string[], targetName: string): SnapshotTableArgs {
  if (args.length < 4) {
    throw new TargetArgError(
      null,
      `${targetName} requires 4 or more arguments: <origin> <cow> <P|PO|N> <chunk_sectors>, got ${args.length}`,
    );
  }
  const type = args[2]!;
  const m = /^([pP])([oO]?)$|^([nN])$/.exec(type);
  if (!m) throw new TargetArgError(2, `store type must be P, PO or N, got "${type}"`);
  const persistent = m[1] !== undefined;
  const chunkSectors = parseUintArg(args, 3, "chunk size (sectors)");
  if (chunkSectors) {
    const problem = chunkSizeProblem(chunkSectors, []);
    if (problem) throw new TargetArgError(3, `chunk size ${chunkSectors} ${problem}`);
  } else if (!persistent) {
    throw new TargetArgError(3, "chunk size not set: a transient (N) snapshot needs a chunk size in sectors");
  }
  const features: SnapshotFeatures = { discardZeroesCow: false, discardPassdownOrigin: false };
  if (args.length > 4) {
    const count = parseUintArg(args, 4, "feature count");
    if (count > FEATURES.length)
      throw new TargetArgError(4, `invalid number of feature arguments ${count} (0 to 2)`);
    if (args.length !== 5 + count) {
      throw new TargetArgError(
        4,
        `feature count ${count} does not match the ${args.length - 5} feature argument(s)`,
      );
    }
    for (let i = 5; i < args.length; i++) {
      const f = args[i]!.toLowerCase();
      if (f === "discard_zeroes_cow") features.discardZeroesCow = true;
      else if (f === "discard_passdown_origin") features.discardPassdownOrigin = true;
      else
        throw new TargetArgError(i, `unrecognised feature "${args[i]}" (expected ${FEATURES.join(" or ")})`);
    }
    if (features.discardPassdownOrigin && !features.discardZeroesCow) {
      throw new TargetArgError(null, "discard_passdown_origin feature depends on discard_zeroes_cow");
    }
  }
  return {
    originSpec: args[0]!,
    cowSpec: args[1]!,
    persistent,
    overflow: m[2] !== undefined && m[2] !== "",
    chunkSectors,
    features,
  };
}

/** dm `snapshot-origin <origin>`. */
export const snapshotOriginTarget: TargetType = {
  name: "snapshot-origin",
  usage: "<origin>",
  async create(args, lengthBytes, context) {
    if (args.length !== 1)
      throw new TargetArgError(null, `expected ${this.usage}, got ${args.length} argument(s)`);
    const dev = await context.openDevice(args[0]!);
    if (lengthBytes > dev.sizeBytes) {
      throw new TargetArgError(
        0,
        `${dev.name} is ${dev.sizeBytes} bytes, the table line maps ${lengthBytes}`,
      );
    }
    return new OriginDevice(dev, originStateOf(dev), lengthBytes, context.deviceName);
  },
};

interface Built {
  state: SnapshotState;
  originState: OriginState;
  parsed: SnapshotTableArgs;
  /**
   * Present when a live snapshot uses the same COW: moves its store and tables to `state`, then
   * calls `activate` in the same tick (no origin write slips between). For preresume.
   */
  handOver?: (activate: () => void) => Promise<void>;
}

/**
 * Opens the devices and the store, or, when a live snapshot uses the same COW, prepares to take
 * its store and tables over (`handOver`, run in preresume: building leaves the live one as it is).
 */
async function buildSnapshot(
  args: string[],
  lengthBytes: number,
  context: TargetContext,
  isMerge: boolean,
  targetName: string,
): Promise<Built> {
  const parsed = parseSnapshotArgs(args, targetName);
  if (isMerge && !parsed.persistent) {
    throw new TargetArgError(
      2,
      "snapshot-merge needs a persistent store (P or PO): a transient snapshot cannot merge",
    );
  }
  const origin = await context.openDevice(parsed.originSpec);
  const cow = await context.openDevice(parsed.cowSpec);
  if (sameStorage(cow, origin)) throw new TargetArgError(1, "COW device cannot be the same as origin device");
  if (lengthBytes > origin.sizeBytes) {
    throw new TargetArgError(
      0,
      `${origin.name} is ${origin.sizeBytes} bytes, the table line maps ${lengthBytes}`,
    );
  }
  if (parsed.chunkSectors) {
    const problem = chunkSizeProblem(parsed.chunkSectors, [origin, cow]);
    if (problem) throw new TargetArgError(3, `chunk size ${parsed.chunkSectors} ${problem}`);
  }
  const originState = originStateOf(origin);
  const name = context.deviceName ?? `${targetName}(${cow.name})`;
  const log = context.log;
  const source = originState.findSharingCow(cow);
  if (source) {
    if (source.isMerge && !isMerge) {
      throw new TargetArgError(
        1,
        `${cow.name} belongs to a merging snapshot; it cannot become a plain snapshot again`,
      );
    }
    if (source.store instanceof PersistentStore !== parsed.persistent) {
      throw new TargetArgError(
        2,
        `${cow.name} is in use by a ${source.store.tableType} snapshot; the store type must match`,
      );
    }
    return {
      ...prepareHandOver(source, originState, lengthBytes, parsed, context, isMerge, name),
      originState,
      parsed,
    };
  }
  if (isMerge && originState.merging) {
    throw new TargetArgError(0, `${origin.name} already has a merging snapshot`);
  }
  if (!isMerge && originState.merging) {
    // The origin does not yet hold what its users see (unmerged chunks are on the merging COW).
    throw new TargetArgError(
      0,
      `${origin.name} is merging a snapshot (${originState.merging.state.name}): wait for the merge to finish before taking a new snapshot`,
    );
  }
  let store: ExceptionStore;
  let exceptions: Array<{ oldChunk: number; newChunk: number }> = [];
  let valid = true;
  if (parsed.persistent) {
    const loaded = await PersistentStore.open(cow, {
      chunkSectors: parsed.chunkSectors,
      overflow: parsed.overflow,
      ...(log && { log }),
    });
    const problem = chunkSizeProblem(loaded.store.chunkSectors, [origin, cow]);
    if (problem) {
      throw new CowFormatError(
        cow.name,
        "chunk_size",
        `chunk size ${loaded.store.chunkSectors} from the header ${problem}`,
      );
    }
    ({ store, exceptions, valid } = loaded);
    log?.info(
      {
        snapshot: name,
        cow: cow.name,
        chunkSectors: store.chunkSectors,
        exceptions: exceptions.length,
        valid,
        created: loaded.created,
      },
      loaded.created ? "new persistent COW initialised" : "persistent COW loaded",
    );
  } else {
    store = new TransientStore(cow, parsed.chunkSectors);
  }
  const state = new SnapshotState({
    origin,
    cow,
    store,
    lengthBytes,
    kcopyd: context.kcopyd,
    isMerge,
    name,
    ...(log && { log }),
  });
  for (const e of exceptions) state.complete.set(e.oldChunk, e.newChunk);
  if (!valid) {
    state.valid = false;
    log?.warn({ snapshot: name, cow: cow.name }, "snapshot is marked invalid");
  }
  return { state, originState, parsed };
}

/**
 * A new target's state on a live snapshot's store (`__find_snapshots_sharing_cow` in the
 * constructor) and the handover itself (`__handover_exceptions` in `snapshot_resume`): the live
 * one keeps serving, valid, until `handOver` runs in preresume; a reload that fails before leaves
 * it untouched.
 */
function prepareHandOver(
  source: SnapshotState,
  originState: OriginState,
  lengthBytes: number,
  parsed: SnapshotTableArgs,
  context: TargetContext,
  isMerge: boolean,
  name: string,
): { state: SnapshotState; handOver: (activate: () => void) => Promise<void> } {
  const state = new SnapshotState({
    origin: source.origin,
    cow: source.cow,
    store: source.store,
    lengthBytes,
    kcopyd: context.kcopyd,
    isMerge,
    name,
    ...(context.log && { log: context.log }),
  });
  const handOver = async (activate: () => void) => {
    if (source.handedOver) throw new Error(`${source.name} was handed over to another target already`);
    // Finish the exceptions in flight; the source stays active meanwhile so no origin write slips
    // past it, and the last check, the swap and `activate` happen in one tick.
    while (source.pending.size) await source.drainPending();
    if (source.store instanceof PersistentStore) source.store.userspaceSupportsOverflow = parsed.overflow;
    for (const [oldChunk, newChunk] of source.complete) state.complete.set(oldChunk, newChunk);
    state.valid = source.valid;
    state.overflowed = source.overflowed;
    // The source gets no more I/O, and must not touch the COW again.
    source.valid = false;
    source.handedOver = true;
    originState.unregister(source);
    activate();
    context.log?.info({ from: source.name, to: name }, "snapshot exceptions handed over");
  };
  return { state, handOver };
}

/** dm `snapshot <origin> <cow> <P|PO|N> <chunk_sectors> [<#features> discard_zeroes_cow discard_passdown_origin]`. */
export const snapshotTarget: TargetType = {
  name: "snapshot",
  usage: "<origin> <cow> <P|PO|N> <chunk_sectors> [<#features> discard_zeroes_cow discard_passdown_origin]",
  async create(args, lengthBytes, context) {
    const { state, originState, parsed, handOver } = await buildSnapshot(
      args,
      lengthBytes,
      context,
      false,
      "snapshot",
    );
    const device = new SnapshotDevice(state, originState, parsed.features, context.deviceName);
    const activate = () => {
      originState.register(state);
      state.active = true;
    };
    if (handOver) device.preresume = () => handOver(activate);
    else activate();
    return device;
  },
};

/** dm `snapshot-merge <origin> <cow> P <chunk_sectors>`: merges the snapshot back into the origin. */
export const snapshotMergeTarget: TargetType = {
  name: "snapshot-merge",
  usage: "<origin> <cow> <P|PO> <chunk_sectors>",
  async create(args, lengthBytes, context) {
    const { state, originState, parsed, handOver } = await buildSnapshot(
      args,
      lengthBytes,
      context,
      true,
      "snapshot-merge",
    );
    if (originState.merging)
      throw new TargetArgError(0, `${state.origin.name} already has a merging snapshot`);
    const device = new MergeDevice(
      state,
      originState,
      context.kcopyd,
      context.log,
      context.deviceName,
      parsed.features,
    );
    const activate = () => {
      originState.register(state);
      state.active = true;
      originState.merging = device;
      device.countExceptions();
      device.start();
    };
    if (handOver) {
      device.preresume = async () => {
        if (originState.merging)
          throw new TargetArgError(0, `${state.origin.name} already has a merging snapshot`);
        await handOver(activate);
      };
    } else activate();
    return device;
  },
};

/** The three dm-snapshot targets, for the CLI's target registry. */
export const snapshotTargets: TargetType[] = [snapshotOriginTarget, snapshotTarget, snapshotMergeTarget];
