# ext4 through the kernel's nbd driver: mkfs, mount, write known files, sync, umount, e2fsck -n,
# then mount read-only again and compare every file with its source.
# In: DEV (default /dev/nbd0); /run/udm/files/* (copied to /dir/); /run/udm/pattern.bin (1 MiB,
# written 4 times with O_DIRECT as /big.bin). The host checks the image's bytes with debugfs.
. /run/udm/lib.sh
DEV=${DEV:-/dev/nbd0}
PATTERN=/run/udm/pattern.bin

step "mkfs.ext4 $DEV"
mkfs_ext4 "$DEV"
mount -t ext4 "$DEV" /mnt || die "mount $DEV"

step "write files"
mkdir /mnt/dir
cp /run/udm/files/* /mnt/dir/
for i in 0 1 2 3; do
  dd if=$PATTERN of=/mnt/big.bin bs=1M seek=$i count=1 conv=notrunc oflag=direct 2>/dev/null ||
    die "O_DIRECT write of big.bin MiB $i"
done
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
  dd if=/mnt/big.bin bs=1M skip=$i count=1 iflag=direct 2>/dev/null | cmp - $PATTERN || die "big.bin MiB $i differs"
done
umount /mnt
step "ok"
