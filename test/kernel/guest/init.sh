#!/bin/sh
# /init of the udm kernel-test guest (busybox sh). Mounts the pseudo filesystems, loads the modules
# listed in /etc/udm/modules (dependency order, computed on the host from modules.dep), brings up
# eth0 with no default route, attaches the exports listed in /run/udm/exports with nbd-client,
# runs /run/udm/job.sh with ttyS1 as stdin/stdout/stderr, prints the result marker, powers off.
export PATH=/usr/sbin:/usr/bin
# No udev here: without this, dmsetup waits for udev and creates no /dev/mapper nodes.
export DM_DISABLE_UDEV=1
export HOME=/root TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=256m tmpfs /tmp
mkdir -p /mnt /dev/mapper
echo /usr/sbin/modprobe >/proc/sys/kernel/modprobe

JOB=/dev/ttyS1
stty -F "$JOB" raw -echo 2>/dev/null
say() { echo "$*" >"$JOB"; }
finish() {
  say "__UDM_JOB_RC__=$1"
  sync
  poweroff -f
  sleep 5
}

while read -r mod args; do
  [ -n "$mod" ] || continue
  # shellcheck disable=SC2086
  insmod "/lib/modules/$(uname -r)/$mod" $args || { say "init: insmod $mod failed"; finish 120; }
done </etc/udm/modules

ip link set lo up
ip link set eth0 up || { say "init: no eth0"; finish 121; }
ip addr add 10.0.2.15/24 dev eth0

SERVER=10.0.2.100
PORT=$(cat /run/udm/port)
while read -r name dev conns bs; do
  [ -n "$name" ] || continue
  if ! out=$(nbd-client "$SERVER" "$PORT" "$dev" -N "$name" -b "$bs" -C "$conns" 2>&1); then
    say "init: nbd-client for export '$name' on $dev failed: $out"
    finish 122
  fi
done </run/udm/exports

cd /tmp || finish 123
sh /run/udm/job.sh <"$JOB" >"$JOB" 2>&1
rc=$?

# Disconnect cleanly (NBD_CMD_DISC after outstanding requests) so the server sees an orderly close.
while read -r name dev conns bs; do
  [ -n "$name" ] && nbd-client -d "$dev" >/dev/null 2>&1
done </run/udm/exports
finish "$rc"
