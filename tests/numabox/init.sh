#!/bin/busybox sh
# shellcheck shell=dash
# /init of the NUMA box (copied verbatim into the initramfs by run.sh).
#
# Brings up a minimal userland, loads KVM for emulated AMD SVM, runs
# /scenario.sh and reports on the console with exactly one line
#   NUMABOX-RESULT: PASS            or
#   NUMABOX-RESULT: FAIL (exit N)
# which run.sh looks for. It always ends with poweroff -f: if it ever exits
# instead, the kernel panics and panic=-1 with -no-reboot stops QEMU too.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/tmp

# If the initramfs had no /dev/console node the kernel started us without
# stdio; devtmpfs has one now.
exec </dev/console >/dev/console 2>&1

finish() {
    rc=$1
    if [ "$rc" -ne 0 ]; then
        kvm_trace
    fi
    if [ "$rc" -eq 0 ]; then
        echo "NUMABOX-RESULT: PASS"
    else
        echo "NUMABOX-RESULT: FAIL (exit $rc)"
    fi
    sync
    poweroff -f
    # poweroff -f does not return; if it somehow did, ending PID 1 panics
    # the kernel, which with panic=-1 and -no-reboot also stops QEMU.
    exit "$rc"
}

echo "numabox: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpus"
# run.sh's knobs for comparing box failures (README "Environment of run.sh").
if [ -s /numa-balancing ]; then
    if ! cat /numa-balancing >/proc/sys/kernel/numa_balancing; then
        echo "numabox: cannot set kernel.numa_balancing to '$(cat /numa-balancing)'"
        finish 93
    fi
    echo "numabox: kernel.numa_balancing = $(cat /proc/sys/kernel/numa_balancing)"
fi
kvm_amd_params="$(cat /kvm-amd.params 2>/dev/null)"
[ -z "$kvm_amd_params" ] || echo "numabox: kvm-amd parameters: $kvm_amd_params"

# Order matters: each needs symbols from the ones before it.
for m in irqbypass ccp kvm kvm-amd; do
    params=""
    [ "$m" != kvm-amd ] || params="$kvm_amd_params"
    # shellcheck disable=SC2086 # the parameters are words
    if ! insmod "/lib/modules/numabox/$m.ko" $params; then
        echo "numabox: insmod $m.ko failed"
        dmesg | tail -n 20
        finish 90
    fi
done
if [ ! -c /dev/kvm ]; then
    echo "numabox: /dev/kvm missing after loading kvm-amd"
    dmesg | tail -n 20
    finish 91
fi

# The TAP and bridge modules, when run.sh put them in (setup.sh's
# box-net-modules): only the scenarios with a guest network need them, and
# those check /dev/net/tun themselves, so a failure is reported, not fatal.
if [ -s /lib/modules/numabox/net/order ]; then
    net_failed=""
    while read -r m; do
        insmod "/lib/modules/numabox/net/$m.ko" 2>/dev/null || net_failed="$net_failed $m"
    done </lib/modules/numabox/net/order
    [ -z "$net_failed" ] || echo "numabox: net modules failed to load:$net_failed"
fi

# KVM's trace events, for every scenario, kept in the kernel's ring buffer
# and printed only when the scenario fails: the exits before a guest
# stopped by itself say what L1 KVM saw. On AMD, KVM resets the vCPU
# before it reports a shutdown (the VMCB is undefined after one), so vmhop
# can only read reset-state registers; the kvm_exit event still has the
# guest's rip and the event being delivered.
T=/sys/kernel/tracing
if mount -t tracefs nodev "$T" 2>/dev/null && [ -d "$T/events/kvm" ]; then
    echo 2048 >"$T/buffer_size_kb" 2>/dev/null || true
    echo 1 >"$T/events/kvm/enable" 2>/dev/null || true
else
    echo "numabox: no kvm tracepoints: a triple fault will show reset registers only"
fi

kvm_trace() {
    [ -f "$T/trace" ] || return 0
    echo 0 >"$T/tracing_on"
    # The exits before a shutdown, else the last events (a vCPU thread's
    # teardown fills the tail after the VM stopped).
    echo "numabox: --- kvm trace: 80 events up to the first shutdown exit, else the last 60 ---"
    grep -B 80 -m 1 'reason shutdown' "$T/trace" || tail -n 60 "$T/trace"
    box_vmrun_rips
}

# box_vmrun_rips: if a guest vCPU of KVM's trace exited at the address
# where the box's own KVM resumes after VMRUN (run.sh's vmrun-returns,
# placed by /proc/kallsyms), says so: a guest never runs the box's code, so
# the emulated CPU resumed the guest with the box's registers — the
# platform's fault, not vmhop's (README.md, "The platform's own fault"). A
# guest's own modules share the box's module area, so only that exact
# address counts. Busybox arithmetic is 64-bit: kernel addresses wrap to
# negative numbers, equal ones alike.
box_vmrun_rips() {
    [ -s /lib/modules/numabox/vmrun-returns ] || return 0
    rips="$(sed -n 's/.* kvm_exit: vcpu \([0-9]*\) reason [a-z_]* rip \(0x[0-9a-f]*\) .*/\1 \2/p' "$T/trace" | sort -u)"
    [ -n "$rips" ] || return 0
    while read -r sym off; do
        addr="$(grep -m 1 " $sym[[:space:]]*\[kvm_amd\]$" /proc/kallsyms | cut -d ' ' -f 1)"
        [ -n "$addr" ] || continue
        ret=$((0x$addr + off))
        [ "$ret" -ne "$off" ] || continue # kallsyms hides addresses (all zero)
        echo "$rips" | while read -r vcpu rip; do
            [ "$((rip))" -eq "$ret" ] &&
                echo "numabox: PLATFORM FAULT: guest vCPU $vcpu exited at $rip, which is the box's own kvm_amd $sym+$off, right after its VMRUN: the emulated CPU resumed the guest with the box's registers"
        done
    done </lib/modules/numabox/vmrun-returns
    return 0
}

# What scenarios may rely on (documented in README.md).
export NUMABOX=1
export NUMABOX_FILES=/files
export VMHOP=/bin/vmhop

cd /tmp || finish 92
# Word splitting is the point: NUMABOX_SCENARIO_ARGS holds plain words.
set -f
# shellcheck disable=SC2046
set -- $(cat /scenario.args 2>/dev/null)
set +f
echo "numabox: running /scenario.sh $*"
sh /scenario.sh "$@"
finish $?
