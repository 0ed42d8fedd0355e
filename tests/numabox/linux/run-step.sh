#!/usr/bin/env bash
# One Linux-guest step in the NUMA box, by hand: the box's Debian kernel
# boots as a vmhop guest on two NUMA nodes and the step's checks run (see
# tests/numabox/scenarios/linux.sh for each step; docs/linux-guests.md).
#
#   tests/numabox/linux/run-step.sh STEP [verbose]
#   STEP = boot | poweroff | reboot | checkpoint | numa-moves | numa-live | numa-stop-copy
#          | numa-kernel | migrate
#
# Runs setup.sh (cached after the first time), builds the guest initramfs,
# then run.sh with the kernel and the initramfs as the box's extra files.
# "verbose" shows the guest kernel's whole boot log. Needs root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
[ "$#" -ge 1 ] || { echo "usage: $0 STEP [verbose]" >&2; exit 2; }
"$repo/tests/numabox/setup.sh"
cache="${NUMABOX_CACHE:-$repo/target/numabox-cache}"
mkdir -p "$repo/target/numabox-work"
initrd="$repo/target/numabox-work/guest.cpio.gz"
"$here/build-guest-initrd.sh" "$initrd" "$cache/current/guest-modules"
# The ext4 data disk of the checkpoint, numa-moves and migrate steps (as
# tests/numabox.rs makes it), and the box's e2fsck.
disk="$repo/target/numabox-work/disk.img"
rm -f "$disk"
mkfs.ext4 -q -F -b 4096 -L vmhop-data -E lazy_itable_init=0,lazy_journal_init=0 "$disk" 32M
NUMABOX_SCENARIO_ARGS="$*" exec "$repo/tests/numabox/run.sh" \
    "$repo/tests/numabox/scenarios/linux.sh" \
    "$cache/current/vmlinuz:/files/vmlinuz" "$initrd:/files/guest.cpio.gz" \
    "$disk:/files/disk.img" "/sbin/e2fsck.static:/files/e2fsck.static"
