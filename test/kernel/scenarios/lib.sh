# Helpers for the guest jobs (busybox sh): `. /run/udm/lib.sh`.
# busybox sh runs its own applets before anything on PATH (mke2fs, blkdiscard, ...), so the real
# tools are always called by full path.
set -eu
# Per-run settings from runGuest({ env }) (DEV=/dev/nbd0 ...).
[ ! -f /run/udm/env ] || . /run/udm/env
MKFS_EXT4=/usr/sbin/mkfs.ext4
E2FSCK=/usr/sbin/e2fsck
DMSETUP=/usr/sbin/dmsetup

die() {
  echo "FAIL: $*"
  exit 1
}

# Prints a step so the host's failure message shows how far the job got.
step() { echo "== [$(cut -d" " -f1 /proc/uptime)s] $*"; }

# host_call ARGS...: asks the test (onHostRequest) and waits; the answer is in $HOST_REPLY.
host_call() {
  echo "@@host $*" >/dev/ttyS1
  IFS= read -r HOST_REPLY
  [ "$HOST_REPLY" != "__UDM_HOST_ERROR__" ] || die "host_call $* failed on the host"
}

# mkfs_ext4 DEV [extra mkfs args]: a small, deterministic ext4 (no lazy init: the image is complete).
mkfs_ext4() {
  dev=$1
  shift
  "$MKFS_EXT4" -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$@" "$dev"
}

# fsck_clean DEV: e2fsck -n (read-only) must report no problem.
fsck_clean() {
  "$E2FSCK" -fn "$1" >/tmp/fsck.out 2>&1 || {
    cat /tmp/fsck.out
    die "e2fsck -n $1 found problems"
  }
}

# dm_create NAME TABLE: creates a dm device and checks the node is a block device (no udev here).
dm_create() {
  "$DMSETUP" create "$1" --table "$2" || die "dmsetup create $1"
  [ -b "/dev/mapper/$1" ] || die "/dev/mapper/$1 is not a block device"
}

# attach NAME DEV [CONNECTIONS]: connects one more export of the test's server mid-job.
attach() {
  /usr/sbin/nbd-client 10.0.2.100 "$(cat /run/udm/port)" "$2" -N "$1" -b 4096 -C "${3:-1}" >/tmp/attach.out 2>&1 || {
    cat /tmp/attach.out
    die "nbd-client could not attach export $1 on $2"
  }
}

# detach DEV: NBD_CMD_DISC after the outstanding requests.
detach() { /usr/sbin/nbd-client -d "$1" >/dev/null 2>&1 || die "nbd-client -d $1"; }
