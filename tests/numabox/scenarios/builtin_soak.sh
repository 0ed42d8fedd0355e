#!/bin/sh
# builtin-soak: starts and stops builtin guests in the box, many times in
# one boot, and reports every VM that stopped by itself.
#
#   builtin_soak.sh [ROUNDS [SECONDS [GUEST [TEST_FAULT]]]]
#
# Each round starts `vmhop run --vcpus 2 --guest GUEST` with one 64 MiB
# guest node bound to host node 0 (the numa_migrate scenario's VM, default
# GUEST builtin:dirty,fill=random), lets it run SECONDS seconds while
# checking once a second that it still runs and querying it as the
# numa_migrate scenario does before any move (numa-stat, verify, which
# pauses it), then stops it. A VM that
# stopped by itself (a guest exception reported by the builtin guests' IDT,
# a triple fault, a vCPU error) has its stop reason, its output and the
# kernel's last words and the last 60 `kvm` trace events printed, and the
# round counts as failed. Exits 1 if
# any round failed. Defaults: 10 rounds of 5 s. TEST_FAULT (gp, ud, pf,
# int=N) is passed to vmhop as --test-hook guest-fault=FAULT, so that every round
# must stop with that exception (checks the IDT path on kvm-amd).
#
# Busybox sh. A diagnostic for intermittent guest stops: many more guest
# starts per box boot than the move scenarios give.
set -eu

rounds="${1:-10}"
seconds="${2:-5}"
guest="${3:-builtin:dirty,fill=random}"
hook=""
if [ -n "${4:-}" ]; then
    hook="guest-fault=$4"
fi
VMHOP="${VMHOP:-/bin/vmhop}"
tag="builtin-soak"
sock=/tmp/soak.sock
vmlog=/tmp/soak.log

say() {
    echo "$tag: $*"
}

# Waits up to 30 s for vmhop (pid $1) to exit; if it does not, prints its
# threads' states and the kernel's last words, kills it and returns 1.
reap() {
    j=0
    while kill -0 "$1" 2>/dev/null; do
        j=$((j + 1))
        if [ "$j" -gt 60 ]; then
            say "vmhop (pid $1) did not exit within 30 s; threads: tid (comm) state ... utime stime"
            for t in /proc/"$1"/task/*; do
                cut -d' ' -f1-3,14,15 "$t/stat" 2>/dev/null || true
            done
            dmesg 2>/dev/null | tail -n 10
            kill -9 "$1" 2>/dev/null || true
            wait "$1" 2>/dev/null || true
            return 1
        fi
        sleep 0.5
    done
    wait "$1" 2>/dev/null
}

# KVM's trace events (the box's /init turns them on), printed for each
# round that failed: later rounds push them out of the ring buffer.
trace=/sys/kernel/tracing

failed=0
r=1
while [ "$r" -le "$rounds" ]; do
    rm -f "$sock"
    # shellcheck disable=SC2086  # no hook, or the option and its value
    "$VMHOP" run --api-socket "$sock" --vcpus 2 --guest "$guest" \
        --numa guest-node=0,size=64M,host-node=0 ${hook:+--test-hook $hook} >"$vmlog" 2>&1 &
    pid=$!
    i=0
    until "$VMHOP" status --api-socket "$sock" --json >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || break
        i=$((i + 1))
        [ "$i" -lt 240 ] || break
        sleep 0.5
    done
    s=0
    status=""
    while [ "$s" -lt "$seconds" ] && kill -0 "$pid" 2>/dev/null; do
        status="$("$VMHOP" status --api-socket "$sock" --json 2>/dev/null || true)"
        case "$status" in
        *stop_reason*) break ;;
        esac
        "$VMHOP" numa-stat --api-socket "$sock" >/dev/null 2>&1 || true
        "$VMHOP" verify --api-socket "$sock" >/dev/null 2>&1 || true
        sleep 1
        s=$((s + 1))
    done
    stopped=0
    if kill -0 "$pid" 2>/dev/null && ! echo "$status" | grep -q stop_reason; then
        stopped=1
        "$VMHOP" stop --api-socket "$sock" >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    fi
    # vmhop exits 0 after a stop, 1 when the VM stopped by itself.
    reap "$pid" && rc=0 || rc=$?
    if [ "$stopped" = 1 ] && [ "$rc" = 0 ]; then
        say "round $r: ok, ran ${seconds} s: $status"
    else
        failed=$((failed + 1))
        say "round $r: FAIL: the VM stopped by itself after ~${s} s (vmhop exit $rc)"
        say "round $r: last status: $status"
        echo "$tag: --- vmhop run output ---"
        cat "$vmlog"
        echo "$tag: --- dmesg (last 10 lines) ---"
        dmesg 2>/dev/null | tail -n 10
        if [ -f "$trace/trace" ]; then
            # The exits before a shutdown, else the last events (a vCPU thread's
            # teardown fills the tail after the VM stopped).
            echo "$tag: --- kvm trace: 80 events up to the first shutdown exit, else the last 60 ---"
            grep -B 80 -m 1 'reason shutdown' "$trace/trace" || tail -n 60 "$trace/trace"
        fi
    fi
    r=$((r + 1))
done
say "$failed of $rounds rounds stopped by themselves"
[ "$failed" -eq 0 ]
