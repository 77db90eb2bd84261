# Harness self-test (any NBD server): block-layer I/O with O_DIRECT, and the guest's isolation.
# Host gives /run/udm/pattern.bin (1 MiB) and checks the export's bytes afterwards:
#   [0, 1 MiB) = pattern, [8 MiB, 8 MiB + 4 KiB) = pattern's first 4 KiB, the last 4 KiB = pattern's
#   last 4 KiB.
. /run/udm/lib.sh
DEV=/dev/nbd0
PATTERN=/run/udm/pattern.bin

step "size: $(cat /sys/block/nbd0/size) sectors"
dd if=$PATTERN of=$DEV bs=1M count=1 oflag=direct 2>/dev/null || die "1 MiB O_DIRECT write"
dd if=$PATTERN of=$DEV bs=4096 count=1 seek=2048 oflag=direct 2>/dev/null || die "4 KiB write at 8 MiB"
last=$(($(/usr/sbin/blockdev --getsize64 $DEV) / 4096 - 1))
dd if=$PATTERN of=$DEV bs=4096 skip=255 count=1 seek=$last oflag=direct 2>/dev/null || die "last block"
sync

step "read back"
dd if=$DEV of=/tmp/back bs=1M count=1 iflag=direct 2>/dev/null
cmp /tmp/back $PATTERN || die "1 MiB read back differs"
[ "$(dd if=$DEV bs=4096 skip=2048 count=1 iflag=direct 2>/dev/null | sha256sum)" = \
  "$(head -c 4096 $PATTERN | sha256sum)" ] || die "block at 8 MiB differs"

step "isolation"
ip route | grep -q '^default' && die "guest has a default route"
PORT=$(cat /run/udm/port)
# An NBD server greets with "NBDMAGIC": the test's port answers, nothing else may.
greeting() { nc -w 1 "$1" "$2" </dev/null 2>/dev/null | head -c 8; }
[ "$(greeting 10.0.2.100 "$PORT")" = NBDMAGIC ] || die "no NBD greeting through the guestfwd"
[ -z "$(greeting 10.0.2.2 "$PORT")" ] || die "reached the host loopback via 10.0.2.2"
[ -z "$(greeting 10.0.2.100 $((PORT + 1)))" ] || die "reached a second port"
step "ok"
