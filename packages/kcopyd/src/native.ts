/**
 * Optional native helpers for what Node's fs lacks: SEEK_DATA/SEEK_HOLE, hole punching and
 * block-device ioctls. Loaded lazily; when the addon is not built every caller has a pure-JS path.
 */
export interface NativeFileOps {
  /** lseek(fd, offset, SEEK_DATA): next data offset at or after `offset`, or -1 (ENXIO: none). */
  seekData(fd: number, offset: number): number;
  /** lseek(fd, offset, SEEK_HOLE): next hole offset at or after `offset` (EOF counts as a hole). */
  seekHole(fd: number, offset: number): number;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE) on a file, BLKDISCARD on a block device. */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /** fallocate(ZERO_RANGE | KEEP_SIZE) on a file, BLKZEROOUT on a block device. */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
}

let cached: NativeFileOps | null | undefined;

/** The native helpers, or null when the addon is not available. */
export function nativeFileOps(): NativeFileOps | null {
  if (cached === undefined) cached = null;
  return cached;
}
