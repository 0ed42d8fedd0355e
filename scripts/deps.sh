#!/usr/bin/env bash
# Installs what building and testing vmhop needs on a fresh Debian 12 machine
# of this kind (run as root): libclang for the userfaultfd crate's bindings,
# and QEMU + busybox + cpio for the NUMA box (tests/numabox/).
# Fails loudly: a missing package or a missing /dev/kvm is an error, never a skip.
set -euo pipefail

PACKAGES=(libclang-dev qemu-system-x86 busybox-static cpio xz-utils binutils gzip)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/vmhop-apt.log 2>&1; then
        apt-get update >>/tmp/vmhop-apt.log 2>&1
        apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/vmhop-apt.log 2>&1 || {
            echo "deps: FAILED to install ${missing[*]} (see /tmp/vmhop-apt.log)" >&2
            tail -20 /tmp/vmhop-apt.log >&2
            exit 1
        }
    fi
fi

if [[ ! -c /dev/kvm ]]; then
    echo "deps: FATAL: /dev/kvm does not exist; vmhop needs KVM" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "deps: FATAL: cargo not found" >&2; exit 1; }
