# Block-layer data integrity, no filesystem: 8 writers at once (O_DIRECT, 64 KiB requests, spread
# over the connections of `nbd-client -C N`), a flush, then 8 readers compare.
# In: DEV (default /dev/nbd0, at least 16 MiB); /run/udm/pattern.bin (1 MiB).
# Out: writer k put the pattern at MiB 2k+1 (k = 0..7); the host checks that and zeros elsewhere.
. /run/udm/lib.sh
DEV=${DEV:-/dev/nbd0}
PATTERN=/run/udm/pattern.bin
UNITS_PER_MIB=16 # 64 KiB requests

step "8 parallel O_DIRECT writers on $DEV"
pids=""
for k in 0 1 2 3 4 5 6 7; do
  dd if=$PATTERN of="$DEV" bs=64K seek=$(((2 * k + 1) * UNITS_PER_MIB)) oflag=direct conv=notrunc 2>/dev/null &
  pids="$pids $!"
done
for p in $pids; do wait "$p" || die "a writer failed"; done
sync
/usr/sbin/blockdev --flushbufs "$DEV"

step "8 parallel O_DIRECT readers"
pids=""
for k in 0 1 2 3 4 5 6 7; do
  dd if="$DEV" of=/tmp/back.$k bs=64K skip=$(((2 * k + 1) * UNITS_PER_MIB)) count=$UNITS_PER_MIB iflag=direct 2>/dev/null &
  pids="$pids $!"
done
for p in $pids; do wait "$p" || die "a reader failed"; done
for k in 0 1 2 3 4 5 6 7; do
  cmp /tmp/back.$k $PATTERN || die "MiB $((2 * k + 1)) differs"
done
step "ok"
