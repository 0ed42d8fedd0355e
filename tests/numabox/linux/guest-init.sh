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
#    checkpoint continues it; a reboot starts again at 1). ~1 s sleep a beat.
#
# Kernel command line words it reads from /proc/cmdline:
#   vmhop.action=poweroff-after=N   poweroff -f after beat N
#   vmhop.action=reboot-after=N     reboot -f after beat N
#   vmhop.files=K                   number of files (default 4)
#   vmhop.file_mb=M                 size of each file in MiB (default 8)
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
    esac
done
is_num() {
    case "$1" in
    "" | *[!0-9]*) return 1 ;;
    esac
}
if ! is_num "$after" || ! is_num "$files" || ! is_num "$file_mb"; then
    say "bad vmhop.* words on the command line; using defaults"
    action=none after=0 files=4 file_mb=8
fi
[ "$files" -ge 1 ] || files=1
if [ "$action" = none ]; then
    say "checker files=$files size_mb=$file_mb action=none"
else
    say "checker files=$files size_mb=$file_mb action=$action after=$after"
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
KERNEL_TROUBLE='soft lockup|hard lockup|rcu.*stall|clocksource.*unstable|call trace|kernel bug|general protection'
# Only what the kernel logs from here on counts: the checker watches the
# guest through checkpoints, restores and moves, not its boot.
boot_log_lines="$(dmesg 2>/dev/null | wc -l)"
boot_trouble="$(dmesg 2>/dev/null | grep -iE "$KERNEL_TROUBLE" | head -n 1 || true)"
[ -z "$boot_trouble" ] || echo "vmhop-guest: boot log: $boot_trouble"
beat=0
next=0
while :; do
    beat=$((beat + 1))
    bad=0
    i=0
    while [ "$i" -lt "$files" ]; do
        got="$(md5sum "$dir/f$i" 2>/dev/null)"
        got="${got%% *}"
        eval "want=\$sum$i"
        if [ "$got" != "$want" ]; then
            echo "vmhop-check: beat $beat FAIL file=$dir/f$i want=$want got=${got:-unreadable}"
            bad=$((bad + 1))
        fi
        i=$((i + 1))
    done
    # The kernel's own health: a checkpoint, restore or move must not
    # leave a lockup, an RCU stall, an unstable clocksource or an oops.
    trouble="$(dmesg 2>/dev/null | tail -n +"$((boot_log_lines + 1))" | grep -iE "$KERNEL_TROUBLE" | head -n 1 || true)"
    if [ -n "$trouble" ]; then
        echo "vmhop-check: beat $beat FAIL kernel: $trouble"
        bad=$((bad + 1))
    fi
    fill "$next"
    next=$(((next + 1) % files))
    if [ "$bad" -eq 0 ]; then
        read -r up _ </proc/uptime
        echo "vmhop-check: beat $beat ok files=$files up=$up"
    fi
    if [ "$action" != none ] && [ "$beat" -ge "$after" ]; then
        echo "vmhop-check: action $action after beat $beat"
        sync
        "$action" -f
        echo "vmhop-check: $action -f returned"
        while :; do sleep 3600; done
    fi
    sleep 1
done
