import { isPoisoned, poisonEnabled, poisonFill, poisonViolation } from "./poison.js";

/** kcopyd's unit of memory accounting, as in the kernel. */
export const PAGE_SIZE = 4096;

/** A grant of `pages` pages and a buffer of exactly that size; give it back with `release()`. */
export interface PageLease {
  readonly pages: number;
  readonly buffer: Buffer;
  release(): void;
}

/**
 * A fixed budget of pages shared by every job of one kcopyd client. Requests are granted in
 * FIFO order; a request that does not fit waits for releases instead of allocating past the
 * budget (the kernel's pages_jobs list). Freed buffers of the common size are kept for reuse,
 * and kept plus leased memory never exceeds the budget.
 */
export class PagePool {
  readonly totalPages: number;
  private freePages: number;
  private readonly waiters: Array<{ pages: number; grant: (lease: PageLease) => void }> = [];
  private readonly spare: Buffer[] = [];
  private spareSize = 0;
  private peakLeasedPages = 0;

  constructor(totalPages: number) {
    if (!Number.isInteger(totalPages) || totalPages < 1) {
      throw new RangeError(`kcopyd page budget must be a positive whole number of pages, got ${totalPages}`);
    }
    this.totalPages = totalPages;
    this.freePages = totalPages;
  }

  get availablePages(): number {
    return this.freePages;
  }

  /** Most pages ever leased at once: the budget check for tests and benchmarks. */
  get peakPages(): number {
    return this.peakLeasedPages;
  }

  /** Resolves when `pages` pages are free and every earlier request was granted. */
  acquire(pages: number): Promise<PageLease> {
    if (!Number.isInteger(pages) || pages < 1 || pages > this.totalPages) {
      throw new RangeError(`cannot lease ${pages} pages from a budget of ${this.totalPages}`);
    }
    return new Promise((grant) => {
      this.waiters.push({ pages, grant });
      this.grantWaiters();
    });
  }

  private grantWaiters(): void {
    for (let head = this.waiters[0]; head && head.pages <= this.freePages; head = this.waiters[0]) {
      this.waiters.shift();
      this.freePages -= head.pages;
      this.peakLeasedPages = Math.max(this.peakLeasedPages, this.totalPages - this.freePages);
      head.grant(this.makeLease(head.pages));
    }
  }

  private makeLease(pages: number): PageLease {
    const bytes = pages * PAGE_SIZE;
    let buffer: Buffer | undefined;
    if (bytes === this.spareSize) buffer = this.spare.pop();
    else this.dropSpares();
    const poison = poisonEnabled();
    if (buffer && poison && !isPoisoned(buffer)) {
      poisonViolation(`a kcopyd page buffer of ${bytes} bytes was written after its release`);
      buffer = undefined;
    }
    buffer ??= Buffer.allocUnsafe(bytes);
    if (poison) poisonFill(buffer);
    let released = false;
    return {
      pages,
      buffer,
      release: () => {
        if (released) return;
        released = true;
        if (poisonEnabled()) poisonFill(buffer);
        this.keepSpare(buffer);
        this.freePages += pages;
        this.grantWaiters();
      },
    };
  }

  private keepSpare(buffer: Buffer): void {
    if (this.spareSize !== buffer.length) {
      this.dropSpares();
      this.spareSize = buffer.length;
    }
    this.spare.push(buffer);
  }

  private dropSpares(): void {
    this.spare.length = 0;
    this.spareSize = 0;
  }
}
