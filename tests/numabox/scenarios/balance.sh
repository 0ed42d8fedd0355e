#!/bin/sh
# vmhop balance on a four-node host (run.sh with NUMABOX_NODES=4: one CPU
# and 512 MiB a node; distances 0-1 and 2-3 12, 0-2 and 1-3 20, 0-3 and
# 1-2 30).
#
# Three VMs (builtin:dirty, random-filled so every page is present), their
# API sockets in one directory: a (96 MiB) and b (32 MiB) on node 0, c
# (32 MiB) on node 2.
#   1. balance --dry-run: every guest node is where its vCPUs run; nothing
#      to move, nothing moved.
#   2. c's vCPUs pinned to node 3's CPU with taskset; balance moves c's
#      memory after them (rule affinity), and c runs on, verified.
#   3. balance --watch 1 --watermark 10 in the background; node 1 filled
#      until it has no room for a (but is not short itself), then node 0
#      filled until it is short (under 10% free): the watcher must move the largest guest node there (a) to the
#      nearest node with room — node 2 (distance 20), not node 3 (30), which
#      has as much room, nor node 1 (12), which has none — and leave b and c
#      alone, and move nothing more in the rounds that follow (hysteresis).
#
# Busybox sh. Prints every check; exits non-zero on the first failed one.
# Never checks timings (emulated here).
set -eu

VMHOP="${VMHOP:-/bin/vmhop}"
tag="balance"
dir=/tmp/vms
errf=/tmp/cmd.err
watch_log=/tmp/watch.log
MIB=1048576
pids=""
watch_pid=""

say() {
    echo "$tag: $*"
}

fail() {
    echo "$tag: FAIL: $*" >&2
    for v in a b c; do
        [ -s "/tmp/$v.log" ] && sed "s/^/$tag: $v.log: /" "/tmp/$v.log" >&2
    done
    [ -s "$watch_log" ] && sed "s/^/$tag: watch: /" "$watch_log" >&2
    dmesg 2>/dev/null | tail -n 20 >&2
    exit 1
}

cleanup() {
    rm -f /tmp/fill-node0 /tmp/fill-node1
    [ -z "$watch_pid" ] || kill "$watch_pid" 2>/dev/null || true
    for p in $pids; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

json_str() {
    printf '%s\n' "$2" | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"
}

node_cpus() {
    cat "/sys/devices/system/node/node$1/cpulist"
}

node_free() {
    "$VMHOP" topology --json | grep -o '{"id":[0-9][0-9]*,[^{}]*}' | grep "^{\"id\":$1," |
        sed -n 's/.*"free_bytes":\([0-9][0-9]*\).*/\1/p'
}

# policy VM: its guest node 0's policy (bind:N).
policy() {
    json_str policy "$("$VMHOP" numa-stat --api-socket "$dir/$1.sock" --json)"
}

check_policy() {
    p="$(policy "$1")"
    [ "$p" = "bind:$2" ] || fail "$3: $1 is $p, not bind:$2"
    say "ok: $3: $1 on node $2"
}

check_verify() {
    v="$("$VMHOP" verify --api-socket "$dir/$1.sock" --json 2>"$errf")" || fail "$2: verify $1: $(cat "$errf")"
    case "$v" in *'"ok":true'*) say "ok: $2: $1 verified" ;; *) fail "$2: verify $1: $v" ;; esac
}

# fill NODE MIB_LEFT FILE: tmpfs allocated from NODE's CPU until NODE has
# about MIB_LEFT MiB free.
fill() {
    free=$(($(node_free "$1") / MIB))
    n=$((free - $2))
    [ "$n" -gt 0 ] || fail "node $1 has only $free MiB free"
    taskset -c "$(node_cpus "$1")" fallocate -l "${n}M" "$3" || fail "cannot fill node $1"
    say "node $1: $free MiB free, filled $n MiB, now $(($(node_free "$1") / MIB)) MiB free"
}

bal() {
    if ! out="$("$VMHOP" balance --socket-dir "$dir" --json "$@" 2>"$errf")"; then
        fail "vmhop balance $* exited non-zero: $(cat "$errf")"
    fi
    printf '%s\n' "$out"
}

# --- the host and the VMs -------------------------------------------------------
nodes=0
for n in /sys/devices/system/node/node[0-9]*; do nodes=$((nodes + 1)); done
[ "$nodes" = 4 ] || fail "the box has $nodes nodes, not 4 (NUMABOX_NODES=4)"
say "distances: $(for n in 0 1 2 3; do printf '%s; ' "$(cat /sys/devices/system/node/node$n/distance)"; done)"
say "topology: $("$VMHOP" topology --json)"
mkdir -p "$dir"
for spec in a:96:0 b:32:0 c:32:2; do
    v="${spec%%:*}"
    rest="${spec#*:}"
    size="${rest%%:*}"
    node="${rest#*:}"
    "$VMHOP" run --api-socket "$dir/$v.sock" --vcpus 1 --guest builtin:dirty,fill=random,rate=1000 \
        --numa "guest-node=0,size=${size}M,host-node=$node" >"/tmp/$v.log" 2>&1 &
    pids="$pids $!"
done
for v in a b c; do
    i=0
    until "$VMHOP" status --api-socket "$dir/$v.sock" >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -lt 240 ] || fail "VM $v did not answer within ~120 s"
        sleep 0.5
    done
done
say "VMs up: a (96 MiB) and b (32 MiB) on node 0, c (32 MiB) on node 2"

# --- 1. a dry run at rest ---------------------------------------------------------
plan="$(bal --dry-run)"
say "dry run at rest: $plan"
case "$plan" in *'"vms":["a","b","c"]'*) ;; *) fail "balance did not find a, b and c: $plan" ;; esac
case "$plan" in *'"moves":[]'*) ;; *) fail "balance wants to move VMs that are at home: $plan" ;; esac
case "$plan" in *'"outcomes":[]'*) ;; *) fail "a dry run moved something: $plan" ;; esac
say "ok: at rest: a dry run plans nothing and moves nothing"

# --- 2. memory follows vCPUs pinned elsewhere ------------------------------------
cpid="$(echo "$pids" | awk '{ print $3 }')"
for t in /proc/"$cpid"/task/*; do
    case "$(cat "$t/comm")" in vcpu*) taskset -p -c "$(node_cpus 3)" "${t##*/}" >/dev/null ;; esac
done
say "c's vCPU pinned to node 3's CPU"
run="$(bal)"
say "balance: $run"
case "$run" in *'"vm":"c","guest_node":0,'*'"to_node":3,'*'"rule":"affinity"'*) ;; *) fail "balance did not plan c to node 3 by affinity: $run" ;; esac
case "$run" in *'"error":'*) fail "a move failed: $run" ;; esac
check_policy c 3 "after the affinity move"
check_policy a 0 "after the affinity move"
check_verify c "after the affinity move"

# --- 3. a node short of memory, under --watch -----------------------------------
"$VMHOP" balance --socket-dir "$dir" --json --watch 1 --watermark 10 >"$watch_log" 2>&1 &
watch_pid=$!
fill 1 80 /tmp/fill-node1
fill 0 16 /tmp/fill-node0
i=0
until [ "$(policy a)" = bind:2 ]; do
    kill -0 "$watch_pid" 2>/dev/null || fail "balance --watch exited: $(cat "$watch_log")"
    i=$((i + 1))
    [ "$i" -lt 120 ] || fail "balance --watch did not move a within ~120 s (a is $(policy a))"
    sleep 1
done
say "ok: under pressure: a moved to node 2 (distance 20) while node 1 (12) had no room and node 3 (30) was farther"
# Some more rounds: nothing else may move.
rounds="$(grep -c '"operation":"balance"' "$watch_log")"
i=0
while [ "$(grep -c '"operation":"balance"' "$watch_log")" -lt $((rounds + 3)) ]; do
    i=$((i + 1))
    [ "$i" -lt 120 ] || fail "balance --watch stopped planning"
    sleep 1
done
kill "$watch_pid"
watch_pid=""
moves="$(grep -o '"outcomes":\[[^]]*' "$watch_log" | grep -o '"to_node":[0-9]*' | sort | uniq -c | tr '\n' ';')"
say "watch rounds: $(grep -c '"operation":"balance"' "$watch_log"), moves run (count, target): $moves"
n_moves="$(grep -o '"outcomes":\[{"vm"' "$watch_log" | wc -l)"
[ "$n_moves" = 1 ] || fail "balance --watch ran moves in $n_moves rounds, not 1: $(cat "$watch_log")"
grep -q '"rule":"pressure","node":0,' "$watch_log" || fail "the move was not for node 0's pressure"
say "ok: --watch moved once and then left every VM where it was"
check_policy b 0 "after the pressure move"
check_policy c 3 "after the pressure move"
for v in a b c; do check_verify "$v" "after the pressure move"; done
say "ok: all checks passed"
