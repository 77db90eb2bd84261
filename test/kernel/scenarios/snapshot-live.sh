# A snapshot of a mounted, busy ext4: write files on the origin, freeze, let the host take the
# snapshot (host_call snapshot), thaw and change the origin; then the snapshot, mounted read-only,
# shows the files as of the snapshot and passes e2fsck -n, and the origin shows the changes.
# In: ORIGIN (default /dev/nbd0); SNAP_EXPORT (default snap0, attached on /dev/nbd1 after the
# host_call); /run/udm/files/*; /run/udm/pattern.bin (1 MiB).
# Out (host checks): snapshot = /dir/* only; origin = /dir/* without hello.txt, /big.bin, /after.txt.
. /run/udm/lib.sh
ORIGIN=${ORIGIN:-/dev/nbd0}
SNAP_EXPORT=${SNAP_EXPORT:-snap0}
SNAP=/dev/nbd1
PATTERN=/run/udm/pattern.bin

step "mkfs.ext4 $ORIGIN, write files"
mkfs_ext4 "$ORIGIN"
mount -t ext4 "$ORIGIN" /mnt || die "mount $ORIGIN"
mkdir /mnt/dir
cp /run/udm/files/* /mnt/dir/

step "freeze, snapshot, thaw"
fsfreeze --freeze /mnt || die "fsfreeze"
host_call snapshot
fsfreeze --unfreeze /mnt

step "change the origin"
for i in 0 1 2 3; do
  dd if=$PATTERN of=/mnt/big.bin bs=1M seek=$i count=1 conv=notrunc 2>/dev/null || die "big.bin"
done
rm /mnt/dir/hello.txt
echo "after the snapshot" >/mnt/after.txt
sync

step "the snapshot, read-only"
attach "$SNAP_EXPORT" $SNAP
mkdir -p /snap
mount -t ext4 -o ro,noload $SNAP /snap || die "mount -o ro $SNAP"
for f in /run/udm/files/*; do
  cmp "$f" "/snap/dir/${f##*/}" || die "snapshot: dir/${f##*/} differs"
done
[ ! -e /snap/big.bin ] || die "snapshot shows big.bin, written after the snapshot"
[ ! -e /snap/after.txt ] || die "snapshot shows after.txt, written after the snapshot"
umount /snap
fsck_clean $SNAP
detach $SNAP

step "the origin"
[ ! -e /mnt/dir/hello.txt ] || die "origin still has dir/hello.txt"
[ "$(cat /mnt/after.txt)" = "after the snapshot" ] || die "origin: after.txt"
umount /mnt
fsck_clean "$ORIGIN"
step "ok"
