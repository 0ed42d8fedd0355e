#!/usr/bin/env bash
# Build the Linux test guest's initramfs: the host's static busybox,
# guest-init.sh as /init (it prints the guest's NUMA view and runs the
# tmpfs checksum checker; see that file for its output and options) and
# /bin/vmhop-vsock, the vsock test tool compiled here from vmhop-vsock.c
# (static: the guest has no libc; busybox has no vsock applet). The box
# takes the same binary out of this archive (scenarios/linux.sh).
#
#   tests/numabox/linux/build-guest-initrd.sh OUT.cpio.gz [MODULES_DIR]
#
# MODULES_DIR (setup.sh's $NUMABOX_CACHE/current/guest-modules: *.ko and an
# `order` file) goes in as /lib/vmhop-modules; /init loads them in order, so
# the guest finds its virtio-mmio disks and mounts ext4.
#
# Needs /bin/busybox from busybox-static, a C compiler with a static libc
# (gcc and libc6-dev; tests/numabox/setup.sh installs them), cpio and gzip. Writes OUT atomically (a temporary file renamed into
# place), so concurrent builders never see a half-written archive. Root is
# only needed for the /dev/console node; without it /init reopens the
# console itself once devtmpfs is mounted.
set -euo pipefail

die() {
    echo "build-guest-initrd: ERROR: $*" >&2
    exit 1
}

[ "$#" -eq 1 ] || [ "$#" -eq 2 ] || die "usage: $0 OUT.cpio.gz [MODULES_DIR]"
out="$1"
modules="${2:-}"
if [ -n "$modules" ]; then
    [ -s "$modules/order" ] || die "$modules/order is missing or empty (run tests/numabox/setup.sh)"
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
busybox=/bin/busybox

[ -x "$busybox" ] || die "$busybox not found; install busybox-static (tests/numabox/setup.sh does)"
if command -v readelf >/dev/null && readelf -l "$busybox" 2>/dev/null | grep -q 'program interpreter'; then
    die "$busybox is dynamically linked; the guest has no libc (install busybox-static)"
fi
for tool in cpio gzip cc; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

mkdir -p "$(dirname "$out")"
# Absolute: the archive is written from inside the staging folder.
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
stage="$(mktemp -d "${TMPDIR:-/tmp}/vmhop-guest-initrd.XXXXXX")"
tmp_out="$out.tmp.$$"
trap 'rm -rf "$stage" "$tmp_out"' EXIT

chmod 755 "$stage"
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run}
cp "$busybox" "$stage/bin/busybox"
cp "$here/guest-init.sh" "$stage/init"
chmod 755 "$stage/init" "$stage/bin/busybox"
cc -static -O2 -s -Wall -Werror -o "$stage/bin/vmhop-vsock" "$here/vmhop-vsock.c" \
    || die "compiling $here/vmhop-vsock.c (cc -static) failed: is libc6-dev installed?"
if command -v readelf >/dev/null && readelf -l "$stage/bin/vmhop-vsock" | grep -q 'program interpreter'; then
    die "$stage/bin/vmhop-vsock came out dynamically linked; the guest has no libc"
fi
if [ -n "$modules" ]; then
    mkdir -p "$stage/lib/vmhop-modules"
    while read -r m; do
        [ -f "$modules/$m.ko" ] || die "$modules/$m.ko is named in its order file but missing"
        cp "$modules/$m.ko" "$stage/lib/vmhop-modules/"
    done <"$modules/order"
    cp "$modules/order" "$stage/lib/vmhop-modules/order"
fi
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true

(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0 | gzip -9 -n >"$tmp_out") \
    || die "packing $stage into $out failed"
mv -f "$tmp_out" "$out"
echo "build-guest-initrd: $out ($(du -h "$out" | cut -f1))" >&2
