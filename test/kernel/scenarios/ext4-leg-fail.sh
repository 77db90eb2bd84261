# ext4 on a mirror whose second leg fails while the filesystem is being written: the guest must not
# notice, and the filesystem stays clean.
# In: DEV (default /dev/nbd0); /run/udm/files/*; /run/udm/pattern.bin (1 MiB).
# host_call fail-leg: the host makes a leg fail all writes (and answers at once).
# Out: /dir/* and /big.bin (pattern x4) as in ext4-files.sh, plus /after.txt written after the failure.
. /run/udm/lib.sh
DEV=${DEV:-/dev/nbd0}
PATTERN=/run/udm/pattern.bin

step "mkfs.ext4 $DEV"
mkfs_ext4 "$DEV"
mount -t ext4 "$DEV" /mnt || die "mount $DEV"
mkdir /mnt/dir
cp /run/udm/files/* /mnt/dir/
sync

step "write while a leg fails"
(
  for i in 0 1 2 3; do
    dd if=$PATTERN of=/mnt/big.bin bs=1M seek=$i count=1 conv=notrunc,fsync 2>/dev/null || exit 1
  done
) &
writer=$!
host_call fail-leg
wait $writer || die "a write failed although one leg is still healthy"
echo "written after the leg failed" >/mnt/after.txt
sync
umount /mnt

step "e2fsck -n"
fsck_clean "$DEV"

step "read back"
mount -t ext4 -o ro "$DEV" /mnt || die "mount -o ro $DEV"
for f in /run/udm/files/*; do
  cmp "$f" "/mnt/dir/${f##*/}" || die "dir/${f##*/} differs after remount"
done
for i in 0 1 2 3; do
  dd if=/mnt/big.bin bs=1M skip=$i count=1 2>/dev/null | cmp - $PATTERN || die "big.bin MiB $i differs"
done
umount /mnt
step "ok"
