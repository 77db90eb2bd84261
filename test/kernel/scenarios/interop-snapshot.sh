# dm-snapshot on-disk format, both ways, with the kernel's own dm-snapshot.
# udm -> kernel: ORIGIN_U (default /dev/nbd0) with COW stores written by udm: COW_GOOD (/dev/nbd1),
#   and two deliberately broken copies COW_BADHDR (/dev/nbd2, header byte 0 changed) and COW_BADEX
#   (/dev/nbd3, one exception's new_chunk changed). For each, the kernel activates
#   `snapshot ORIGIN COW P 8` and the job prints the sha256 of what it reads (or that it refused).
# kernel -> udm: ORIGIN_K (/dev/nbd4) and an empty COW_K (/dev/nbd5): the kernel's snapshot-origin
#   gets /run/udm/pattern.bin (1 MiB) at 4 MiB, its snapshot gets the pattern's first 4 KiB at
#   20 MiB; the job prints the snapshot's sha256, then removes both so the COW is complete.
# Output lines: RESULT <name> sha <hex> | RESULT <name> refused <why> | RESULT <name> status <...>
. /run/udm/lib.sh
ORIGIN_U=${ORIGIN_U:-/dev/nbd0}
ORIGIN_K=${ORIGIN_K:-/dev/nbd4}
COW_K=${COW_K:-/dev/nbd5}
CHUNK=8

read_snapshot() { # NAME ORIGIN COW
  sectors=$(/usr/sbin/blockdev --getsz "$2")
  if "$DMSETUP" create "$1" --table "0 $sectors snapshot $2 $3 P $CHUNK" >/tmp/dm.err 2>&1; then
    [ -b "/dev/mapper/$1" ] || die "/dev/mapper/$1 is not a block device"
    echo "RESULT $1 status $("$DMSETUP" status "$1")"
    echo "RESULT $1 sha $(sha256sum </dev/mapper/"$1" | cut -d' ' -f1)"
    "$DMSETUP" remove "$1" || die "dmsetup remove $1"
  else
    echo "RESULT $1 refused $(tr '\n' ' ' </tmp/dm.err)"
  fi
}

step "udm -> kernel: kernel dm-snapshot reads udm's COW"
read_snapshot good "$ORIGIN_U" "${COW_GOOD:-/dev/nbd1}"
read_snapshot badhdr "$ORIGIN_U" "${COW_BADHDR:-/dev/nbd2}"
read_snapshot badex "$ORIGIN_U" "${COW_BADEX:-/dev/nbd3}"

step "kernel -> udm: kernel dm-snapshot writes a COW"
sectors=$(/usr/sbin/blockdev --getsz "$ORIGIN_K")
dm_create korigin "0 $sectors snapshot-origin $ORIGIN_K"
dm_create ksnap "0 $sectors snapshot $ORIGIN_K $COW_K P $CHUNK"
# As LVM does: the origin learns the snapshot's chunk size (its bio split boundary) on resume.
# Without this, one large origin write copies out only its first chunk.
"$DMSETUP" suspend korigin && "$DMSETUP" resume korigin || die "suspend/resume korigin"
dd if=/run/udm/pattern.bin of=/dev/mapper/korigin bs=1M seek=4 oflag=direct 2>/dev/null || die "origin write"
dd if=/run/udm/pattern.bin of=/dev/mapper/ksnap bs=4096 count=1 seek=5120 oflag=direct 2>/dev/null ||
  die "snapshot write"
echo "RESULT kernel status $("$DMSETUP" status ksnap)"
echo "RESULT kernel sha $(sha256sum </dev/mapper/ksnap | cut -d' ' -f1)"
"$DMSETUP" remove ksnap || die "dmsetup remove ksnap"
"$DMSETUP" remove korigin || die "dmsetup remove korigin"
step "ok"
