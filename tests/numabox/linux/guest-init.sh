#!/bin/busybox sh
# shellcheck shell=dash
# /init of the Linux test guest (copied verbatim into the guest initramfs by
# build-guest-initrd.sh). Runs as PID 1 on the guest kernel; busybox only.
#
# 1. Mounts proc, sys, devtmpfs and a tmpfs on /tmp; prints what the guest
#    kernel sees, one fact a line, in a fixed form tests parse:
#      vmhop-guest: kernel=RELEASE
#      vmhop-guest: cmdline=...
#      vmhop-guest: nodes=N
#      vmhop-guest: node N cpus=LIST memtotal_kb=K distance=D0,D1,...
#      vmhop-guest: cpus online=LIST
#      vmhop-guest: clocksource=NAME
#      vmhop-guest: checker files=K size_mb=M action=...
# 2. Runs the checker forever: K tmpfs files of M MiB of random data, their
#    md5sums kept in shell variables; every beat re-checks every file,
#    rewrites one (round-robin) with fresh random data, records its new sum
#    and prints
#      vmhop-check: beat N ok files=K up=SECONDS
#    or, for every file whose sum changed behind its back,
#      vmhop-check: beat N FAIL file=PATH want=MD5 got=MD5
#      vmhop-check: beat N FAIL kernel: <a kernel log line of a lockup,
#                   RCU stall, unstable clocksource or oops>
#    N counts from 1 and never resets while the guest lives (a restored
#    checkpoint continues it; a reboot starts again at 1). ~1 s sleep a beat
#    (vmhop.beat_sleep).
#
# 3. With a disk (vmhop.disk=SERIAL): loads the virtio and ext4 modules
#    from /lib/vmhop-modules (build-guest-initrd.sh puts them there), mounts
#    the ext4 virtio disk whose serial is SERIAL on /disk and checks it every
#    beat too: it syncs and drops the page cache (so what follows is read
#    from the device), re-checks K files of 256 KiB against their sums and
#    /disk/beat against the last beat, then rewrites one file (round-robin,
#    fsynced) and /disk/beat. A background writer rewrites /disk/scratch
#    with fsync all the time, so requests are in flight whenever the VM is
#    checkpointed or moved. A failure prints
#      vmhop-check: beat N FAIL disk file=PATH want=MD5 got=MD5
#      vmhop-check: beat N FAIL disk beat=B want=B'
#    Lines of the setup:
#      vmhop-guest: modules loaded=N [failed=LIST]
#      vmhop-guest: disk SERIAL=/dev/vdX mounted ext4 files=K
#      vmhop-guest: disk SERIAL FAIL <why>
#    With a control disk (vmhop.ctl=SERIAL, read-only to the guest), every
#    beat reads its first block past the page cache: "poweroff" there makes
#    the checker stop the writer, unmount the disk ("vmhop-check: disk
#    unmounted") and run poweroff -f, so a test ends the guest cleanly when
#    it is ready rather than after a fixed number of beats.
#
# 4. With a network (vmhop.net=ADDR/PREFIX): configures eth0 (the
#    virtio-net card; virtio_net is among the modules) with that static
#    address and brings it and lo up, makes /tmp/www/small (64 KiB of
#    random data) and, with vmhop.www=M (M > 0), /tmp/www/big (M MiB),
#    prints their sha256 sums and serves /tmp/www with busybox httpd on
#    port 80; vmhop.stream=IP:PORT sends the decimal
#    numbers 1, 2, 3, ... one a line, ~STREAM_LINES a tenth of a second, to
#    IP:PORT over one TCP connection (busybox nc) for as long as it lasts,
#    so the listener can check that its bytes come in order with no gap.
#    Lines:
#      vmhop-guest: net eth0 ADDR/PREFIX mac=MAC
#      vmhop-guest: net www /small size_kb=64 sha256=SUM up=SECONDS
#      vmhop-guest: net www /big size_mb=M sha256=SUM up=SECONDS
#      vmhop-guest: net stream to IP:PORT started
#      vmhop-guest: net FAIL <why>
#      vmhop-net: stream to IP:PORT ended (printed if the connection ends)
#
# 5. With vsock (vmhop.vsock=PORT:HOSTPORT): waits for the virtio-vsock
#    transport (vmw_vsock_virtio_transport, among the modules) to bind the
#    device, then runs /bin/vmhop-vsock (tests/numabox/linux/vmhop-vsock.c)
#    twice in the background: `serve vsock:PORT`, an AF_VSOCK listener
#    that checks and echoes what each connection sends, and `client
#    vsock:2:HOSTPORT - retry`, a connection to the host (cid 2) that sends
#    the tool's counted stream a round at a time and checks its echo,
#    connecting again a second after it ended (a restored guest's
#    transport is reset). Both print their events on the console:
#      vmhop-guest: vsock listening on PORT, connecting to host port HOSTPORT
#      vmhop-guest: vsock FAIL <why>
#      vmhop-vsock: serve vsock:PORT: conn N open from cid C port P
#      vmhop-vsock: client vsock:2:HOSTPORT: conn N open
#      vmhop-vsock: ...: conn N ended after B bytes: REASON
#      vmhop-vsock: ...: conn N: FAIL ...
#
# Kernel command line words it reads from /proc/cmdline:
#   vmhop.action=poweroff-after=N   poweroff -f after beat N
#   vmhop.action=reboot-after=N     reboot -f after beat N
#   vmhop.files=K                   number of files (default 4)
#   vmhop.file_mb=M                 size of each file in MiB (default 8)
#   vmhop.beat_sleep=S              seconds slept after each beat (default
#                                   1; busybox takes fractions: 0.2)
#   vmhop.disk=SERIAL               the ext4 disk to check (see 3.)
#   vmhop.disk_files=K              files on it (default 4)
#   vmhop.ctl=SERIAL                the control disk (see 3.)
#   vmhop.net=ADDR/PREFIX           eth0's static address (see 4.)
#   vmhop.www=M                     serve an M MiB file over HTTP (see 4.)
#   vmhop.stream=IP:PORT            the counting TCP stream (see 4.)
#   vmhop.vsock=PORT:HOSTPORT       the vsock listener and client (see 5.)
# Before acting it prints "vmhop-check: action poweroff|reboot after beat N".
# It never exits: if the action returns, it says so and sleeps forever.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/tmp
# Without a /dev/console node in the initramfs the kernel starts us without
# stdio; devtmpfs has one now.
exec </dev/console >/dev/console 2>&1

say() {
    echo "vmhop-guest: $*"
}

# --- what the guest sees ------------------------------------------------------
say "kernel=$(uname -r)"
say "cmdline=$(cat /proc/cmdline)"
nodes=0
for n in /sys/devices/system/node/node[0-9]*; do
    [ -d "$n" ] || continue
    nodes=$((nodes + 1))
done
say "nodes=$nodes"
for n in /sys/devices/system/node/node[0-9]*; do
    [ -d "$n" ] || continue
    id="${n##*/node}"
    cpus="$(cat "$n/cpulist" 2>/dev/null)"
    mem="$(sed -n 's/.*MemTotal: *\([0-9][0-9]*\) kB.*/\1/p' "$n/meminfo" 2>/dev/null)"
    dist="$(tr -s ' \t' ',' <"$n/distance" 2>/dev/null)"
    say "node $id cpus=${cpus:-none} memtotal_kb=${mem:-0} distance=${dist:-none}"
done
say "cpus online=$(cat /sys/devices/system/cpu/online 2>/dev/null)"
say "clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)"

# --- options from the kernel command line -------------------------------------
action=none
after=0
files=4
file_mb=8
beat_sleep=1
disk_serial=""
disk_files=4
ctl_serial=""
net_addr=""
www_mb=0
stream=""
vsock=""
# shellcheck disable=SC2013  # words, not lines
for w in $(cat /proc/cmdline); do
    case "$w" in
    vmhop.action=poweroff-after=*)
        action=poweroff
        after="${w#vmhop.action=poweroff-after=}"
        ;;
    vmhop.action=reboot-after=*)
        action=reboot
        after="${w#vmhop.action=reboot-after=}"
        ;;
    vmhop.files=*) files="${w#vmhop.files=}" ;;
    vmhop.file_mb=*) file_mb="${w#vmhop.file_mb=}" ;;
    vmhop.beat_sleep=*) beat_sleep="${w#vmhop.beat_sleep=}" ;;
    vmhop.disk=*) disk_serial="${w#vmhop.disk=}" ;;
    vmhop.disk_files=*) disk_files="${w#vmhop.disk_files=}" ;;
    vmhop.ctl=*) ctl_serial="${w#vmhop.ctl=}" ;;
    vmhop.net=*) net_addr="${w#vmhop.net=}" ;;
    vmhop.www=*) www_mb="${w#vmhop.www=}" ;;
    vmhop.stream=*) stream="${w#vmhop.stream=}" ;;
    vmhop.vsock=*) vsock="${w#vmhop.vsock=}" ;;
    esac
done
is_num() {
    case "$1" in
    "" | *[!0-9]*) return 1 ;;
    esac
}
if ! is_num "$after" || ! is_num "$files" || ! is_num "$file_mb" || ! is_num "$disk_files" ||
    ! is_num "$www_mb"; then
    say "bad vmhop.* words on the command line; using defaults"
    action=none after=0 files=4 file_mb=8 disk_files=4 www_mb=0
fi
case "$beat_sleep" in
"" | *[!0-9.]*)
    say "bad vmhop.beat_sleep=$beat_sleep; sleeping 1 s a beat"
    beat_sleep=1
    ;;
esac
[ "$disk_files" -ge 1 ] || disk_files=1
[ "$files" -ge 1 ] || files=1
if [ "$action" = none ]; then
    say "checker files=$files size_mb=$file_mb action=none"
else
    say "checker files=$files size_mb=$file_mb action=$action after=$after"
fi

# --- modules and disks ------------------------------------------------------------
if [ -s /lib/vmhop-modules/order ]; then
    loaded=0
    failed=""
    while read -r m; do
        if insmod "/lib/vmhop-modules/$m.ko" 2>/dev/null; then
            loaded=$((loaded + 1))
        else
            failed="$failed $m"
        fi
    done </lib/vmhop-modules/order
    say "modules loaded=$loaded${failed:+ failed=${failed# }}"
fi

# by_serial SERIAL: the /dev/vdX whose virtio-blk serial is SERIAL (waits
# up to 20 s for the device to appear).
by_serial() {
    t=0
    while [ "$t" -lt 20 ]; do
        for b in /sys/block/vd*; do
            [ -f "$b/serial" ] || continue
            if [ "$(cat "$b/serial")" = "$1" ]; then
                echo "/dev/${b##*/}"
                return 0
            fi
        done
        t=$((t + 1))
        sleep 1
    done
    return 1
}

disk_dir=""
writer_pid=""
if [ -n "$disk_serial" ]; then
    if ! dev="$(by_serial "$disk_serial")"; then
        say "disk $disk_serial FAIL no virtio disk with that serial ($(cat /sys/block/vd*/serial 2>/dev/null | tr '\n' ' '))"
    elif ! mkdir -p /disk || ! mount -t ext4 "$dev" /disk; then
        say "disk $disk_serial FAIL mount -t ext4 $dev /disk failed"
    else
        disk_dir=/disk
        say "disk $disk_serial=$dev mounted ext4 files=$disk_files"
    fi
fi
ctl_dev=""
if [ -n "$ctl_serial" ]; then
    if ctl_dev="$(by_serial "$ctl_serial")"; then
        say "control disk $ctl_serial=$ctl_dev"
    else
        say "control disk $ctl_serial FAIL no virtio disk with that serial"
        ctl_dev=""
    fi
fi

# --- the network ------------------------------------------------------------------
# Lines per burst of the stream, a burst every 0.1 s: a few KiB/s, enough
# to see the count go on through every move without filling the box's RAM.
STREAM_LINES=200
net_up=""
if [ -n "$net_addr" ]; then
    t=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$t" -lt 20 ]; do
        t=$((t + 1))
        sleep 1
    done
    if [ ! -e /sys/class/net/eth0 ]; then
        say "net FAIL no eth0 (interfaces: $(ls /sys/class/net | tr '\n' ' '))"
    elif ip link set lo up && ip addr add "$net_addr" dev eth0 && ip link set eth0 up; then
        net_up=1
        say "net eth0 $net_addr mac=$(cat /sys/class/net/eth0/address)"
    else
        say "net FAIL ip addr add $net_addr dev eth0 failed"
    fi
fi
if [ -n "$net_up" ]; then
    mkdir -p /tmp/www
    dd if=/dev/urandom of=/tmp/www/small bs=65536 count=1 2>/dev/null
    s="$(sha256sum /tmp/www/small)"
    read -r up _ </proc/uptime
    say "net www /small size_kb=64 sha256=${s%% *} up=$up"
    if [ "$www_mb" -gt 0 ]; then
        dd if=/dev/urandom of=/tmp/www/big bs=1048576 count="$www_mb" 2>/dev/null
        read -r up _ </proc/uptime
        s="$(sha256sum /tmp/www/big)"
        read -r up2 _ </proc/uptime
        say "net www /big size_mb=$www_mb sha256=${s%% *} up=$up2 (written at up=$up)"
    fi
    httpd -p 80 -h /tmp/www || say "net FAIL httpd -p 80 -h /tmp/www failed"
fi
if [ -n "$net_up" ] && [ -n "$stream" ]; then
    (
        i=0
        while :; do
            seq "$((i + 1))" "$((i + STREAM_LINES))" || exit 1
            i=$((i + STREAM_LINES))
            sleep 0.1
        done | nc "${stream%:*}" "${stream##*:}"
        echo "vmhop-net: stream to $stream ended (nc exit $?)"
    ) &
    say "net stream to $stream started"
fi

# --- vsock ------------------------------------------------------------------------
if [ -n "$vsock" ]; then
    vs_port="${vsock%%:*}"
    vs_host="${vsock#*:}"
    t=0
    while ! ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/ 2>/dev/null | grep -q '^virtio' &&
        [ "$t" -lt 20 ]; do
        t=$((t + 1))
        sleep 1
    done
    if ! is_num "$vs_port" || ! is_num "$vs_host" || [ "$vs_host" = "$vsock" ]; then
        say "vsock FAIL vmhop.vsock=$vsock is not PORT:HOSTPORT"
    elif ! ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/ 2>/dev/null | grep -q '^virtio'; then
        say "vsock FAIL no virtio-vsock device bound to vmw_vsock_virtio_transport within 20 s"
    else
        vmhop-vsock serve "vsock:$vs_port" &
        vmhop-vsock client "vsock:2:$vs_host" - retry &
        say "vsock listening on $vs_port, connecting to host port $vs_host"
    fi
fi

# disk_fill I: disk file I gets fresh random data, fsynced; its sum goes to
# variable dsumI.
disk_fill() {
    dd if=/dev/urandom of="$disk_dir/new" bs=65536 count=4 conv=fsync 2>/dev/null
    mv "$disk_dir/new" "$disk_dir/d$1"
    s="$(md5sum "$disk_dir/d$1")"
    eval "dsum$1=\${s%% *}"
}

# disk_beat B: /disk/beat says B, fsynced.
disk_beat() {
    echo "$1" >"$disk_dir/beat.new"
    mv "$disk_dir/beat.new" "$disk_dir/beat"
    sync
}

if [ -n "$disk_dir" ]; then
    i=0
    while [ "$i" -lt "$disk_files" ]; do
        disk_fill "$i"
        i=$((i + 1))
    done
    disk_beat 0
    # Requests in flight whenever the VM is checkpointed or moved.
    # It stops between two writes when /tmp/stop-writer appears (a killed
    # loop would leave its dd holding the disk busy).
    (
        while [ ! -e /tmp/stop-writer ]; do
            dd if=/dev/zero of="$disk_dir/scratch" bs=65536 count=16 conv=fsync 2>/dev/null
        done
    ) &
    writer_pid=$!
fi

# --- the checker ----------------------------------------------------------------
dir=/tmp/vmhop-check
mkdir -p "$dir"

# fill I: file I gets fresh random data; its sum goes to variable sumI.
fill() {
    dd if=/dev/urandom of="$dir/new" bs=1048576 count="$file_mb" 2>/dev/null
    mv "$dir/new" "$dir/f$1"
    s="$(md5sum "$dir/f$1")"
    eval "sum$1=\${s%% *}"
}

i=0
while [ "$i" -lt "$files" ]; do
    fill "$i"
    i=$((i + 1))
done

# Kernel log lines that mean the guest is not well.
KERNEL_TROUBLE='soft lockup|hard lockup|rcu.*stall|clocksource.*unstable|call trace|kernel bug|general protection|warning: cpu'
# Only what the kernel logs from here on counts: the checker watches the
# guest through checkpoints, restores and moves, not its boot.
boot_log_lines="$(dmesg 2>/dev/null | wc -l)"
boot_trouble="$(dmesg 2>/dev/null | grep -iE "$KERNEL_TROUBLE" | head -n 1 || true)"
[ -z "$boot_trouble" ] || echo "vmhop-guest: boot log: $boot_trouble"
# check_sums N PATH_PREFIX VAR_PREFIX WHAT: files PATH_PREFIX0.. against
# the sums in variables VAR_PREFIX0..; each mismatch is a FAIL line
# ("FAIL WHATfile=...") and counts in bad.
check_sums() {
    i=0
    while [ "$i" -lt "$1" ]; do
        got="$(md5sum "$2$i" 2>/dev/null)"
        got="${got%% *}"
        eval "want=\$$3$i"
        if [ "$got" != "$want" ]; then
            echo "vmhop-check: beat $beat FAIL $4file=$2$i want=$want got=${got:-unreadable}"
            bad=$((bad + 1))
        fi
        i=$((i + 1))
    done
}

beat=0
next=0
while :; do
    beat=$((beat + 1))
    bad=0
    check_sums "$files" "$dir/f" sum ""
    # The kernel's own health: a checkpoint, restore or move must not
    # leave a lockup, an RCU stall, an unstable clocksource or an oops.
    trouble="$(dmesg 2>/dev/null | tail -n +"$((boot_log_lines + 1))" | grep -iE "$KERNEL_TROUBLE" | head -n 1 || true)"
    if [ -n "$trouble" ]; then
        echo "vmhop-check: beat $beat FAIL kernel: $trouble"
        bad=$((bad + 1))
    fi
    if [ -n "$disk_dir" ]; then
        # Read from the device, not from the page cache.
        sync
        echo 3 >/proc/sys/vm/drop_caches
        check_sums "$disk_files" "$disk_dir/d" dsum "disk "
        got="$(cat "$disk_dir/beat" 2>/dev/null)"
        if [ "$got" != "$((beat - 1))" ]; then
            echo "vmhop-check: beat $beat FAIL disk beat=${got:-unreadable} want=$((beat - 1))"
            bad=$((bad + 1))
        fi
        disk_fill "$((next % disk_files))"
        disk_beat "$beat"
    fi
    fill "$next"
    next=$(((next + 1) % files))
    if [ "$bad" -eq 0 ]; then
        read -r up _ </proc/uptime
        echo "vmhop-check: beat $beat ok files=$files up=$up"
    fi
    if [ -n "$ctl_dev" ]; then
        word="$(dd if="$ctl_dev" bs=4096 count=1 iflag=direct 2>/dev/null | head -c 8)"
        if [ "$word" = poweroff ]; then
            action=poweroff
            after=0
        fi
    fi
    if [ "$action" != none ] && [ "$beat" -ge "$after" ]; then
        echo "vmhop-check: action $action after beat $beat"
        if [ -n "$writer_pid" ]; then
            touch /tmp/stop-writer
            wait "$writer_pid" 2>/dev/null
        fi
        if [ -n "$disk_dir" ]; then
            if umount "$disk_dir"; then
                echo "vmhop-check: disk unmounted"
            else
                echo "vmhop-check: beat $beat FAIL disk umount $disk_dir failed"
            fi
        fi
        sync
        "$action" -f
        echo "vmhop-check: $action -f returned"
        while :; do sleep 3600; done
    fi
    sleep "$beat_sleep"
done
