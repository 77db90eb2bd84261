#!/usr/bin/env bash
# Installs the Debian tools udm's tests drive (real NBD clients and peers). Idempotent: apt runs
# only when a tool is missing. Under CI=true a tool that still cannot be installed is an error.
set -euo pipefail

# tool -> Debian package
declare -A PACKAGES=(
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [nbdsh]=libnbd-bin
  [nbdkit]=nbdkit
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-nbd]=qemu-utils
  [fio]=fio
  [nbd-client]=nbd-client
  [losetup]=mount
  [openssl]=openssl
  [systemd-socket-activate]=systemd
  [systemd-notify]=systemd
)

missing=()
for tool in "${!PACKAGES[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGES[$tool]}")
done
# nbdsh needs Debian's python3 module (libnbd), not the pyenv python that may be first on PATH.
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=(python3-libnbd)

if ((${#missing[@]})); then
  mapfile -t unique < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: installing ${unique[*]}" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to apt-get install ${unique[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${unique[@]}" >/dev/null
fi

for tool in "${!PACKAGES[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "setup: $tool is still missing after install" >&2
    exit 1
  fi
done

# The real-kernel end-to-end tests (test/kernel/) need qemu, a Debian kernel and guest tools.
if [ -f "$(dirname "$0")/setup-kernel.sh" ]; then
  bash "$(dirname "$0")/setup-kernel.sh"
fi
