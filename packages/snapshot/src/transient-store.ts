import { type BlockDevice, SECTOR_SIZE } from "@udm/kcopyd";
import type { ExceptionStore, StoreUsage } from "./exception-store.js";

/**
 * The `N` store (`dm-snap-transient.c`): COW chunks from chunk 0 on, exceptions only in memory,
 * commits succeed at once. Nothing survives the device being removed.
 *
 * @example
 * ```ts
 * const store = new TransientStore(cow, 16);
 * const chunk = store.prepareException(); // 0, then 1, 2, ...
 * ```
 */
export class TransientStore implements ExceptionStore {
  readonly tableType = "N" as const;
  readonly userspaceSupportsOverflow = false;
  /** Next free sector on the COW (the kernel counts sectors here, not chunks). */
  private nextFreeSectors = 0;

  constructor(
    readonly cow: BlockDevice,
    readonly chunkSectors: number,
  ) {}

  private get cowSectors(): number {
    return Math.floor(this.cow.sizeBytes / SECTOR_SIZE);
  }

  prepareException(): number | null {
    if (this.cowSectors < this.nextFreeSectors + this.chunkSectors) return null;
    const chunk = this.nextFreeSectors / this.chunkSectors;
    this.nextFreeSectors += this.chunkSectors;
    return chunk;
  }

  async commitException(_oldChunk: number, _newChunk: number, valid: boolean): Promise<boolean> {
    return valid;
  }

  async dropSnapshot(): Promise<void> {}

  usage(): StoreUsage {
    return { totalSectors: this.cowSectors, sectorsAllocated: this.nextFreeSectors, metadataSectors: 0 };
  }
}
