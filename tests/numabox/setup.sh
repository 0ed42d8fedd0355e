#!/usr/bin/env bash
# Prepare the NUMA box: the host packages (QEMU, static busybox, cpio) and a
# Debian kernel with the four modules KVM on emulated AMD SVM needs.
#
# Idempotent: a second run only checks what is already there. The kernel is
# never installed on this machine; its package is downloaded and unpacked
# into a cache folder and only the pieces the box boots are kept:
#
#   $NUMABOX_CACHE/kernel-<version>/vmlinuz
#   $NUMABOX_CACHE/kernel-<version>/modules/{irqbypass,ccp,kvm,kvm-amd}.ko
#   $NUMABOX_CACHE/kernel-<version>/guest-modules/*.ko and its `order` file:
#       what a Linux guest needs for its virtio disks, NICs and vsock and
#       for ext4, with their dependencies, in the order to load them
#   $NUMABOX_CACHE/kernel-<version>/box-net-modules/*.ko and `order`: the
#       box's own TAP and bridge (tun, bridge and their dependencies), for
#       the Linux guests' network (tests/numabox/init.sh loads them)
#   $NUMABOX_CACHE/current -> kernel-<version>
#
# NUMABOX_CACHE defaults to <repo>/target/numabox-cache.
# Exits non-zero with a message naming what is missing when anything fails.
set -euo pipefail

die() {
    echo "numabox setup: ERROR: $*" >&2
    exit 1
}
note() {
    echo "numabox setup: $*" >&2
}

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get install and apt-get download need it)"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${NUMABOX_CACHE:-$repo/target/numabox-cache}"
mkdir -p "$cache" || die "cannot create cache folder $cache"
cache="$(cd "$cache" && pwd)"

# Host packages: Debian package name -> a file it must provide.
# binutils: readelf (static checks) and strip (run.sh). e2fsprogs makes the
# Linux guest's ext4 disk image; e2fsck-static checks it inside the box,
# which has no libc.
# gcc and libc6-dev compile the guest's static vsock tool
# (linux/vmhop-vsock.c).
packages=(qemu-system-x86 busybox-static cpio xz-utils gzip binutils e2fsprogs e2fsck-static
    gcc libc6-dev)
declare -A provides=(
    [qemu-system-x86]=/usr/bin/qemu-system-x86_64
    [busybox-static]=/bin/busybox
    [cpio]=/usr/bin/cpio
    [xz-utils]=/usr/bin/xz
    [gzip]=/bin/gzip
    [binutils]=/usr/bin/readelf
    [e2fsprogs]=/usr/sbin/mkfs.ext4
    [e2fsck-static]=/sbin/e2fsck.static
    [gcc]=/usr/bin/gcc
    [libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a
)

# Serialise concurrent setups (two test processes sharing one cache) so that
# neither sees the other's half-unpacked kernel.
exec 9>"$cache/.lock"
flock -w 900 9 || die "timed out waiting for the lock $cache/.lock held by another setup"

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# apt-get install; refresh the package lists only when the install fails
# (stale lists name versions the mirror no longer has).
apt_install() {
    if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; then
        return 0
    fi
    note "apt-get install $* failed; running apt-get update and retrying"
    apt-get update || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
        || die "apt-get install $* failed even after apt-get update"
}

missing=()
for p in "${packages[@]}"; do
    is_installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    note "installing ${missing[*]}"
    apt_install "${missing[@]}"
fi
for p in "${packages[@]}"; do
    is_installed "$p" || die "package $p is still not installed"
    [ -e "${provides[$p]}" ] || die "package $p is installed but ${provides[$p]} is missing"
done
# The box has no libc: busybox must be the static build.
if readelf -l /bin/busybox 2>/dev/null | grep -q 'program interpreter'; then
    die "/bin/busybox is dynamically linked; the box needs the busybox-static package"
fi

# The box takes QEMU 10 or later and a box kernel from Debian 13's line
# (6.12), for faster boots. With Debian 12's own QEMU 7.2 and kernel 6.1
# the box's kernel crashed now and then in a thread running a KVM vCPU and
# guests triple-faulted on their own; on 6.12 both still happen (README,
# "The platform's own fault"). On
# Debian 12 both come from bookworm-backports, added as an apt source for
# this; its default priority (100) keeps every other package on the stable
# release.
qemu_min_major=10
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
backports=""
if [ "$codename" = bookworm ]; then
    backports=bookworm-backports
    bpo=/etc/apt/sources.list.d/vmhop-bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        note "adding $backports as an apt source ($bpo)"
        cat >"$bpo" <<'SOURCES' || die "cannot write $bpo"
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
        apt-get update || die "apt-get update failed"
    fi
fi
# apt options that pick a package from backports (none elsewhere).
from_backports=()
[ -z "$backports" ] || from_backports=(-t "$backports")

qemu_major() {
    qemu-system-x86_64 --version 2>/dev/null \
        | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}
qemu_have="$(qemu_major)"
if [ "${qemu_have:-0}" -lt "$qemu_min_major" ]; then
    note "installing qemu-system-x86 ${backports:+from $backports }(have: $(qemu-system-x86_64 --version 2>/dev/null | head -1))"
    apt_install "${from_backports[@]}" qemu-system-x86
    qemu_have="$(qemu_major)"
    [ "${qemu_have:-0}" -ge "$qemu_min_major" ] \
        || die "QEMU $qemu_min_major or later is needed; have: $(qemu-system-x86_64 --version 2>/dev/null | head -1)"
fi
note "$(qemu-system-x86_64 --version | head -1)"

# The kernel image package linux-image-amd64 currently points at (in
# backports on Debian 12).
resolve_kernel_package() {
    apt-cache "${from_backports[@]}" depends linux-image-amd64 2>/dev/null \
        | awk '$1 ~ /Depends:/ && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }'
}
kpkg="$(resolve_kernel_package || true)"
if [ -z "$kpkg" ]; then
    note "apt-cache does not know linux-image-amd64; running apt-get update"
    apt-get update || die "apt-get update failed"
    kpkg="$(resolve_kernel_package || true)"
fi
[ -n "$kpkg" ] || die "cannot resolve the kernel image package (apt-cache depends linux-image-amd64 names none)"
kver="${kpkg#linux-image-}"
kdir="$cache/kernel-$kver"

# Module paths under lib/modules/<kver>/kernel/, in insmod order. The box's
# /init loads them in the same order.
modules=(
    virt/lib/irqbypass
    drivers/crypto/ccp/ccp
    arch/x86/kvm/kvm
    arch/x86/kvm/kvm-amd
)

# What the Linux guest loads (tests/numabox/linux/guest-init.sh), by
# module name; their dependencies come along (each .ko names them in its
# `depends=`). virtio itself and virtio_ring are built in since 6.x.
guest_modules=(virtio_mmio virtio_blk virtio_net crc32c_generic ext4 vmw_vsock_virtio_transport)

# What the box itself loads for the guests' network: TAP devices for
# vmhop's `--net tap=` and a bridge joining them to the box's own address
# (tests/numabox/scenarios/linux.sh). Same resolution as the guest's.
box_net_modules=(tun bridge)

kernel_complete() {
    [ -f "$kdir/.complete" ] || return 1
    [ -s "$kdir/vmlinuz" ] || return 1
    local m
    for m in "${modules[@]}"; do
        [ -s "$kdir/modules/$(basename "$m").ko" ] || return 1
    done
    [ -s "$kdir/guest-modules/order" ] || return 1
    [ -s "$kdir/box-net-modules/order" ] || return 1
}

# Copies module $2 (a path under $1 as modules.order names it, without its
# compression suffix) to $3 as a plain .ko.
plain_module() {
    local src="$1/$2" out="$3"
    if [ -f "$src" ]; then
        cp "$src" "$out"
    elif [ -f "$src.xz" ]; then
        xz -dc "$src.xz" >"$out" || die "cannot decompress $2.xz"
    elif [ -f "$src.gz" ]; then
        gzip -dc "$src.gz" >"$out" || die "cannot decompress $2.gz"
    elif [ -f "$src.zst" ]; then
        command -v zstd >/dev/null || apt_install zstd
        zstd -qdc "$src.zst" >"$out" || die "cannot decompress $2.zst"
    else
        die "the kernel package has no module $2 (nor .xz/.gz/.zst)"
    fi
}

# Writes the modules named after $2 and their dependencies into $2,
# dependencies first, with the load order in its `order` file. $1 is the
# unpacked lib/modules/<kver>.
modules_into() {
    local mroot="$1" out="$2" seen=" " order=()
    shift 2
    mkdir -p "$out"
    # name -> path under $mroot, from modules.order (names use _ for -).
    resolve() {
        local name="${1//-/_}" p
        while read -r p; do
            local b="${p##*/}"
            b="${b%.ko}"
            if [ "${b//-/_}" = "$name" ]; then
                echo "$p"
                return 0
            fi
        done <"$mroot/modules.order"
        return 1
    }
    add() {
        local name="${1//-/_}" path deps d
        case "$seen" in *" $name "*) return 0 ;; esac
        seen="$seen$name "
        if ! path="$(resolve "$name")"; then
            # Built into the kernel: nothing to load.
            grep -q "/${name}.ko\$\|/${1}.ko\$" "$mroot/modules.builtin" 2>/dev/null \
                || note "guest module $name is neither a module nor built in; skipped"
            return 0
        fi
        plain_module "$mroot" "$path" "$out/$name.ko"
        deps="$(strings -a "$out/$name.ko" | sed -n 's/^depends=//p' | head -1)"
        for d in ${deps//,/ }; do
            add "$d"
        done
        order+=("$name")
    }
    local m
    for m in "$@"; do
        add "$m"
    done
    printf '%s\n' "${order[@]}" >"$out/order"
}

if kernel_complete; then
    note "kernel $kver already cached in $kdir"
else
    note "fetching $kpkg into $kdir"
    rm -rf "$kdir" "$cache/tmp"
    mkdir -p "$cache/tmp/deb" "$cache/tmp/root"
    # Downloading as root into a root-owned folder: skip apt's _apt sandbox
    # instead of letting it warn.
    if ! (cd "$cache/tmp/deb" && apt-get -o APT::Sandbox::User=root download "$kpkg"); then
        note "apt-get download $kpkg failed; running apt-get update and retrying"
        apt-get update || die "apt-get update failed"
        (cd "$cache/tmp/deb" && apt-get -o APT::Sandbox::User=root download "$kpkg") \
            || die "apt-get download $kpkg failed"
    fi
    deb="$(find "$cache/tmp/deb" -maxdepth 1 -name '*.deb' -print -quit)"
    [ -n "$deb" ] || die "apt-get download $kpkg produced no .deb in $cache/tmp/deb"
    dpkg -x "$deb" "$cache/tmp/root" || die "dpkg -x $deb failed"

    root="$cache/tmp/root"
    mkdir -p "$kdir/modules"
    vmlinuz="$root/boot/vmlinuz-$kver"
    [ -s "$vmlinuz" ] || die "$kpkg has no boot/vmlinuz-$kver"
    cp "$vmlinuz" "$kdir/vmlinuz"

    # Debian 12 ships plain .ko files; later kernels compress them. The
    # box's busybox insmod is not relied on to decompress: every module is
    # stored here as a plain .ko.
    moddir="$root/lib/modules/$kver/kernel"
    [ -d "$moddir" ] || die "$kpkg has no lib/modules/$kver/kernel"
    for m in "${modules[@]}"; do
        plain_module "$moddir" "$m.ko" "$kdir/modules/$(basename "$m").ko"
    done
    modules_into "$root/lib/modules/$kver" "$kdir/guest-modules" "${guest_modules[@]}"
    modules_into "$root/lib/modules/$kver" "$kdir/box-net-modules" "${box_net_modules[@]}"
    echo "$kpkg" >"$kdir/package"
    rm -rf "$cache/tmp"
    touch "$kdir/.complete"
    kernel_complete || die "kernel cache $kdir is incomplete after unpacking"
fi

ln -sfn "kernel-$kver" "$cache/current"
note "ready: kernel $kver, cache $cache/current"
