#!/usr/bin/env bash
# Installs what the real-kernel end-to-end tests (test/kernel/) need: qemu, Debian's kernel and the
# guest tools packed into the initramfs. Idempotent: apt-get runs only for packages not installed,
# and waits for another apt/dpkg run to release its lock instead of failing.
set -euo pipefail

# qemu-system-x86: the VM; linux-image-amd64: the kernel and its modules (nbd, dm-*, ext4);
# busybox-static, nbd-client, dmsetup, e2fsprogs, kmod: the guest's tools; cpio, xz-utils: building
# the initramfs and unpacking the kernel; python3: the guest-to-host relay; nbdkit: the harness's
# own stand-in server (proves the harness without udm).
PACKAGES=(qemu-system-x86 linux-image-amd64 busybox-static nbd-client dmsetup e2fsprogs kmod cpio
  xz-utils python3 nbdkit)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

missing=()
for pkg in "${PACKAGES[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]})); then
  echo "setup-kernel: installing ${missing[*]}" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "setup-kernel: need root to apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  lock=(-o DPkg::Lock::Timeout=600)
  apt-get "${lock[@]}" update -qq >/dev/null
  apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for pkg in "${PACKAGES[@]}"; do
  if ! installed "$pkg"; then
    echo "setup-kernel: $pkg is still missing after install" >&2
    exit 1
  fi
done

# The kernel the harness boots: the newest one with both a vmlinuz and its modules.
if ! ls /boot/vmlinuz-* >/dev/null 2>&1 || ! ls -d /lib/modules/*/kernel >/dev/null 2>&1; then
  echo "setup-kernel: no /boot/vmlinuz-* with /lib/modules/*/kernel after installing linux-image-amd64" >&2
  exit 1
fi
