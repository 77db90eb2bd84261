# dm-mirror disk log format, both ways, with the kernel's own dm-mirror (region 1024 sectors).
# udm -> kernel: legs LEG_UA (/dev/nbd0), LEG_UB (/dev/nbd1) and a disk log LOG_U (/dev/nbd2) that
#   udm left with some regions marked out of sync. The kernel mirror resyncs; the job waits until
#   it reports every region in sync and removes it. (The host checks that only udm's marked
#   regions were copied.)
# kernel -> udm: empty LEG_KA (/dev/nbd3), LEG_KB (/dev/nbd4), LOG_K (/dev/nbd5). Leg B is
#   dm-linear over LEG_KB with region 5 mapped to `error`; a `nosync` mirror gets
#   /run/udm/pattern.bin's first 512 KiB in regions 2, 5 and 9: region 5 fails on leg B, so the
#   kernel leaves it out of sync in its log. No handle_errors: with it, the kernel holds the failed
#   write until userspace (dmeventd) replaces the leg, and the job would hang.
. /run/udm/lib.sh
LEG_UA=${LEG_UA:-/dev/nbd0}
LEG_UB=${LEG_UB:-/dev/nbd1}
LOG_U=${LOG_U:-/dev/nbd2}
LEG_KA=${LEG_KA:-/dev/nbd3}
LEG_KB=${LEG_KB:-/dev/nbd4}
LOG_K=${LOG_K:-/dev/nbd5}
REGION=1024

# wait_in_sync NAME: until `dmsetup status` shows N/N regions in sync (at most ~60 s).
wait_in_sync() {
  i=0
  while :; do
    # shellcheck disable=SC2046
    set -- $("$DMSETUP" status "$1")
    [ "${6%/*}" = "${6#*/}" ] && return 0
    i=$((i + 1))
    [ $i -lt 300 ] || die "$1 not in sync: $*"
    sleep 0.2
  done
}

step "udm -> kernel: the kernel mirror reads udm's disk log"
sectors=$(/usr/sbin/blockdev --getsz "$LEG_UA")
dm_create umirror "0 $sectors mirror disk 2 $LOG_U $REGION 2 $LEG_UA 0 $LEG_UB 0"
echo "RESULT umirror initial $("$DMSETUP" status umirror)"
wait_in_sync umirror
echo "RESULT umirror final $("$DMSETUP" status umirror)"
"$DMSETUP" remove umirror || die "dmsetup remove umirror"

step "kernel -> udm: the kernel mirror writes its disk log"
sectors=$(/usr/sbin/blockdev --getsz "$LEG_KA")
bad=$((5 * REGION))
dm_create klegb "0 $bad linear $LEG_KB 0
$bad $REGION error
$((bad + REGION)) $((sectors - bad - REGION)) linear $LEG_KB $((bad + REGION))"
dm_create kmirror "0 $sectors mirror disk 3 $LOG_K $REGION nosync 2 $LEG_KA 0 /dev/mapper/klegb 0"
for r in 2 5 9; do
  dd if=/run/udm/pattern.bin of=/dev/mapper/kmirror bs=512K count=1 seek=$r oflag=direct 2>/dev/null ||
    die "mirror write to region $r failed (leg A is healthy)"
done
sync
sleep 1 # let the mirror's worker try (and fail) to recover region 5
echo "RESULT kmirror status $("$DMSETUP" status kmirror)"
"$DMSETUP" remove kmirror || die "dmsetup remove kmirror"
"$DMSETUP" remove klegb
step "ok"
