#!/bin/sh
# numa-migrate between two real host nodes, inside the NUMA box.
#
#   numa_migrate.sh MODE            MODE = live | stop-copy | kernel
#   numa_migrate.sh MODE nomem      the refusal case
#   numa_migrate.sh sequence        live to 1, stop-copy to 0, kernel to 1
#
# MODE alone: a builtin:dirty guest (2 vCPUs, one 64 MiB guest node filled
# from the host so every page is present) bound to host node 0 is moved to
# node 1 with `numa-migrate --mode MODE`, then back to node 0. After each
# move: the report's placement_after and a fresh numa-stat both show >= 99%
# of the guest node's present pages on the target, the policy is bind:<to>,
# every vCPU may run exactly on the target's CPUs (report and numa-stat),
# verify passes and the guest keeps making progress.
#
# "kernel" alone differs: the guest (128 MiB, rate-limited, not filled from
# the host) is still touching pages for the first time while it moves, and
# vmhop waits 1 s after the memory moved and before it finishes
# (the test hook numa-finish-delay-ms). Every present page must be on the
# target, 100% (pages the guest touches first after move_pages went by
# included), and the guest must have taken new pages during the first
# move.
#
# "nomem": node 1 is filled (a tmpfs file allocated from CPU 1) until its
# free memory is smaller than the guest node, then the move to node 1 must
# exit 1 with a one-line message, and the VM must keep running on node 0
# (numa-stat unchanged, verify ok, progress). With the filler removed, the
# same move must then succeed — run by `vmhop balance`: with the vCPUs
# pinned to node 1's CPUs by taskset, a dry run while node 1 is full plans
# nothing and says why (and reports a socket that does not answer); with
# room, a dry run plans the move without running it, `balance` runs it, and
# a further dry run plans nothing.
#
# "sequence": a 256 MiB builtin:disk guest on node 0 (vCPU 0 drives a
# virtio-blk disk on a tmpfs image, cache=writeback; vCPU 1 sweeps memory
# as builtin:dirty does) is moved live to node 1, stop-copy back to node 0,
# then with --mode kernel to node 1 (the kernel move then meets pages that
# earlier mremap swaps put under the chunks). After each move every present
# page must be on the target: 100%, in the report's placement_after and in
# numa-stat; and the disk's worker thread, as numa-stat lists it and as
# /proc/PID/task/TID/status says (Cpus_allowed_list), runs exactly on the
# target's CPUs with the vCPUs. A kernel move may pause here (to move pages
# move_pages skipped while the guest ran).
#
# Busybox sh. Prints every check and the JSON reports; exits non-zero on the
# first failed check, saying which. Never prints or checks timings: they are
# emulated here.
set -eu

mode="${1:-}"
case_name="${2:-move}"
# Share of the present pages that must be on the target after a move, %.
need_share=99
case "$mode" in
live | stop-copy | kernel) ;;
sequence)
    case_name=sequence
    mode=live
    need_share=100
    ;;
*)
    echo "numa-migrate: usage: numa_migrate.sh live|stop-copy|kernel [nomem] | sequence"
    exit 2
    ;;
esac
case "$case_name" in
move | nomem | sequence) ;;
*)
    echo "numa-migrate: unknown case '$case_name' (expected nomem or nothing)"
    exit 2
    ;;
esac

VMHOP="${VMHOP:-/bin/vmhop}"
tag="numa-migrate[$1${2:+ $2}]"
sock=/tmp/vm.sock
vmlog=/tmp/vm.log
errf=/tmp/cmd.err
filler=/tmp/fill-node1
vm_pid=""
MIB=1048576

say() {
    echo "$tag: $*"
}

# On stderr, so that a failure inside a command substitution still reaches
# the console (the box sends both streams there).
fail() {
    echo "$tag: FAIL: $*" >&2
    diagnose >&2
    exit 1
}

# What a failure report needs besides the failed check: the VM's own output,
# its status, its threads' states and CPU use, and the kernel's last words.
diagnose() {
    if [ -s "$vmlog" ]; then
        echo "$tag: --- vmhop run output ---"
        cat "$vmlog"
    fi
    if [ -n "$vm_pid" ] && [ -d "/proc/$vm_pid" ]; then
        echo "$tag: --- status ---"
        "$VMHOP" status --api-socket "$sock" --json 2>&1 || true
        echo "$tag: --- vmhop threads: tid (comm) state ... utime stime (fields 1-3, 14-15) ---"
        for t in /proc/"$vm_pid"/task/*; do
            cut -d' ' -f1-3,14,15 "$t/stat" 2>/dev/null || true
        done
    fi
    echo "$tag: --- dmesg (last 20 lines) ---"
    dmesg 2>/dev/null | tail -n 20
    # The box's /init prints KVM's trace events after this (init.sh).
}

cleanup() {
    rm -f "$filler"
    if [ -n "$vm_pid" ] && kill -0 "$vm_pid" 2>/dev/null; then
        kill "$vm_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# --- JSON helpers (vmhop prints one JSON object on one line) --------------

# json_obj KEY JSON: the inside of the flat object "KEY":{...}.
json_obj() {
    printf '%s\n' "$2" | sed -n "s/.*\"$1\":{\([^{}]*\)}.*/\1/p"
}

# json_num KEY JSON: the integer value of "KEY":N.
json_num() {
    printf '%s\n' "$2" | sed -n "s/.*\"$1\":\(-\{0,1\}[0-9][0-9]*\).*/\1/p"
}

# json_str KEY JSON: the string value of "KEY":"...".
json_str() {
    printf '%s\n' "$2" | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"
}

# json_strs KEY JSON: every string value of "KEY":"..." (one a line).
json_strs() {
    printf '%s\n' "$2" | grep -o "\"$1\":\"[^\"]*\"" | sed "s/^\"$1\":\"\(.*\)\"$/\1/"
}

# pages_on NODE OBJ: pages on NODE in a placement object body ("0":12,"1":3).
pages_on() {
    on_node="$(printf '%s\n' "$2" | tr ',' '\n' | sed -n "s/^ *\"$1\": *\([0-9][0-9]*\) *$/\1/p")"
    echo "${on_node:-0}"
}

# pages_total OBJ: all pages in a placement object body.
pages_total() {
    printf '%s\n' "$1" | tr ',' '\n' | sed -n 's/^ *"[0-9][0-9]*": *\([0-9][0-9]*\) *$/\1/p' |
        awk '{ s += $1 } END { print s + 0 }'
}

# check_share NODE OBJ WHAT: >= $need_share% of the present pages in OBJ on
# NODE.
check_share() {
    total="$(pages_total "$2")"
    on="$(pages_on "$1" "$2")"
    [ "$total" -gt 0 ] || fail "$3: no present page at all ({$2})"
    if [ $((on * 100)) -lt $((total * need_share)) ]; then
        fail "$3: only $on of $total present pages on node $1, not ${need_share}% ({$2})"
    fi
    say "ok: $3: $on of $total present pages on node $1"
}

# --- vmhop helpers -----------------------------------------------------------

# cli ARGS...: runs a vmhop client command against the VM; prints its stdout;
# fails the scenario (with stderr) unless it exits 0.
cli() {
    if ! out="$("$VMHOP" "$@" --api-socket "$sock" 2>"$errf")"; then
        fail "vmhop $* exited non-zero: $(cat "$errf")"
    fi
    printf '%s\n' "$out"
}

node_cpus() {
    cat "/sys/devices/system/node/node$1/cpulist"
}

# node_free NODE: the node's free bytes as `vmhop topology --json` reports.
node_free() {
    topo="$("$VMHOP" topology --json)" || fail "vmhop topology --json failed"
    printf '%s\n' "$topo" | grep -o '{"id":[0-9][0-9]*,[^{}]*}' | grep "^{\"id\":$1," |
        sed -n 's/.*"free_bytes":\([0-9][0-9]*\).*/\1/p'
}

progress() {
    json_num progress "$(cli status --json)"
}

# wait_progress_above P WHAT: the guest's progress passes P within ~60 s.
wait_progress_above() {
    i=0
    while :; do
        p="$(progress)"
        [ -n "$p" ] || fail "$2: status has no progress"
        if [ "$p" -gt "$1" ]; then
            say "ok: $2: progress $1 -> $p"
            return 0
        fi
        i=$((i + 1))
        [ "$i" -lt 120 ] || fail "$2: guest progress stuck at $p"
        sleep 0.5
    done
}

check_running() {
    state="$(json_str state "$(cli status --json)")"
    [ "$state" = running ] || fail "$1: VM state is '$state', not running"
    wait_progress_above "$(progress)" "$1"
}

check_verify() {
    v="$(cli verify --json)"
    case "$v" in
    *'"ok":true'*) say "ok: $1: verify $(json_num pages_checked "$v") pages consistent" ;;
    *) fail "$1: verify failed: $v" ;;
    esac
}

# check_vcpus NODE WHAT LIST...: every cpulist given equals NODE's CPUs.
check_vcpus() {
    want="$(node_cpus "$1")"
    what="$2"
    shift 2
    [ "$#" -gt 0 ] || fail "$what: no vCPU listed"
    for c in "$@"; do
        [ "$c" = "$want" ] || fail "$what: a vCPU may run on CPUs '$c', not node $1's '$want'"
    done
    say "ok: $what: $# vCPU(s) on node $1's CPUs ($want)"
}

# check_stat NODE WHAT: a fresh numa-stat puts the guest node on NODE.
check_stat() {
    stat="$(cli numa-stat --json)"
    say "numa-stat $2: $stat"
    policy="$(json_str policy "$stat")"
    [ "$policy" = "bind:$1" ] || fail "$2: numa-stat policy is '$policy', not bind:$1"
    say "ok: $2: policy $policy"
    check_share "$1" "$(json_obj host_nodes "$stat")" "$2: numa-stat"
    # shellcheck disable=SC2046  # one cpulist a word
    check_vcpus "$1" "$2: numa-stat allowed_cpus" $(json_strs allowed_cpus "$stat")
}

# check_stat_policy NODE WHAT: numa-stat still binds the guest node to NODE.
check_stat_policy() {
    policy="$(json_str policy "$(cli numa-stat --json)")"
    [ "$policy" = "bind:$1" ] || fail "$2: numa-stat policy is '$policy', not bind:$1"
    say "ok: $2: policy $policy"
}

# check_workers NODE WHAT: every device worker thread numa-stat lists may
# run exactly on NODE's CPUs, by numa-stat and by /proc (none: no check).
check_workers() {
    [ -n "$disk" ] || return 0
    want="$(node_cpus "$1")"
    # The worker starts when the guest's driver sets DRIVER_OK.
    i=0
    while :; do
        stat="$(cli numa-stat --json)"
        tids="$(printf '%s\n' "$stat" | grep -o '"tid":[0-9]*' | sed 's/.*://')"
        [ -z "$tids" ] || break
        i=$((i + 1))
        [ "$i" -lt 60 ] || fail "$2: numa-stat lists no device thread after ~30 s: $stat"
        sleep 0.5
    done
    for t in $tids; do
        have="$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "/proc/$vm_pid/task/$t/status")"
        [ "$have" = "$want" ] ||
            fail "$2: device thread $t may run on CPUs '$have' (/proc), not node $1's '$want'"
    done
    say "ok: $2: device thread(s) $(echo $tids) on node $1's CPUs ($want), by numa-stat and /proc"
}

start_vm() {
    say "starting: vmhop run --vcpus 2 --guest $1 --numa $2 ${disk:+--disk $disk}"
    # shellcheck disable=SC2086  # no hook, or one option and its value
    "$VMHOP" run --api-socket "$sock" --vcpus 2 --guest "$1" --numa "$2" \
        ${disk:+--disk "$disk"} \
        ${finish_delay:+--test-hook numa-finish-delay-ms=$finish_delay} >"$vmlog" 2>&1 &
    vm_pid=$!
    i=0
    until "$VMHOP" status --api-socket "$sock" --json >/dev/null 2>&1; do
        kill -0 "$vm_pid" 2>/dev/null || fail "vmhop run exited before its API answered"
        i=$((i + 1))
        [ "$i" -lt 240 ] || fail "vmhop run did not answer within ~120 s"
        sleep 0.5
    done
    say "VM up: $(cli status --json)"
}

# move NODE WHAT: numa-migrate to NODE in $mode and every check after it.
move() {
    if ! report="$("$VMHOP" numa-migrate --api-socket "$sock" --to-node "$1" --mode "$mode" --json 2>"$errf")"; then
        fail "$2: numa-migrate --to-node $1 --mode $mode failed: $(cat "$errf")"
    fi
    say "report $2: $report"
    [ "$(json_str mode "$report")" = "$mode" ] || fail "$2: report mode is not $mode"
    [ "$(json_num to_node "$report")" = "$1" ] || fail "$2: report to_node is not $1"
    moved="$(json_num pages_moved "$report")"
    if [ -z "$moved" ] || [ "$moved" -le 0 ]; then
        fail "$2: pages_moved is '$moved'"
    fi
    if [ "$mode" = kernel ]; then
        if [ "$case_name" != sequence ]; then
            [ "$(json_num pauses "$report")" = 0 ] || fail "$2: kernel mode paused the VM"
        fi
        [ -n "$(json_obj batches "$report")" ] || fail "$2: kernel mode report has no batches"
    fi
    check_share "$1" "$(json_obj placement_after "$report")" "$2: report placement_after"
    if [ "$fresh" = yes ]; then
        before="$(pages_total "$(json_obj placement_before "$report")")"
        after="$(pages_total "$(json_obj placement_after "$report")")"
        # Only the first move must see new pages: by the move back the
        # guest may have touched all its memory.
        if [ "$1" = 1 ] && [ "$after" -le "$before" ]; then
            fail "$2: the guest took no new page during the move ($before present before, $after after)"
        fi
        say "ok: $2: the guest took $((after - before)) new pages during the move"
    fi
    # shellcheck disable=SC2046  # one cpulist a word
    check_vcpus "$1" "$2: report vcpu_cpus" $(json_obj vcpu_cpus "$report" | grep -o '"[0-9][0-9]*":"[^"]*"' | sed 's/^"[0-9]*":"\(.*\)"$/\1/')
    check_stat "$1" "$2"
    check_workers "$1" "$2"
    check_verify "$2"
    check_running "$2"
}

# --- the host ------------------------------------------------------------------

say "topology: $("$VMHOP" topology)"
say "topology json: $("$VMHOP" topology --json)"
for n in 0 1; do
    [ -d "/sys/devices/system/node/node$n" ] || fail "host node $n missing"
    [ -n "$(node_free $n)" ] || fail "vmhop topology does not list node $n"
done

guest_size=64
guest="builtin:dirty,fill=random"
fresh=no
finish_delay=""
if [ "$mode" = kernel ] && [ "$case_name" = move ]; then
    fresh=yes
    finish_delay=1000
    need_share=100
    guest_size=128
    guest="builtin:dirty,rate=1000"
fi
disk=""
if [ "$case_name" = sequence ]; then
    guest_size=256
    # 1024 blocks: a small table, so vCPU 1 sweeps nearly all of it.
    truncate -s 4M /tmp/seq-disk.img
    disk="path=/tmp/seq-disk.img,cache=writeback"
    guest="builtin:disk,blocks=1024"
fi

if [ "$case_name" = nomem ]; then
    # Leave node 1 with less free memory than the guest node will need.
    free1=$(($(node_free 1) / MIB))
    fill=$((free1 - 160))
    [ "$fill" -gt 0 ] || fail "node 1 has only ${free1} MiB free before filling"
    say "node 1 has ${free1} MiB free; allocating ${fill} MiB of tmpfs from CPU $(node_cpus 1)"
    taskset -c "$(node_cpus 1)" fallocate -l "${fill}M" "$filler" ||
        fail "cannot allocate the node 1 filler"
    free1=$(($(node_free 1) / MIB))
    free0=$(($(node_free 0) / MIB))
    say "now node 0 has ${free0} MiB free, node 1 ${free1} MiB"
    guest_size=$(((free1 / 32 + 3) * 32))
    [ $((guest_size + 64)) -lt "$free0" ] ||
        fail "node 0 (${free0} MiB free) cannot hold a ${guest_size} MiB guest node"
fi

start_vm "$guest" "guest-node=0,size=${guest_size}M,host-node=0"
check_stat 0 "before any move"
check_workers 0 "before any move"
check_verify "before any move"
check_running "before any move"

if [ "$case_name" = move ]; then
    move 1 "to node 1"
    move 0 "back to node 0"
elif [ "$case_name" = sequence ]; then
    # What the kernel did with huge pages explains pages move_pages leaves.
    say "thp: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unknown)"
    mode=live
    move 1 "live to node 1"
    mode=stop-copy
    move 0 "stop-copy back to node 0"
    mode=kernel
    move 1 "kernel to node 1"
    say "vmstat: $(grep -E '^(pgmigrate|thp_migration|thp_split|thp_deferred)' /proc/vmstat | tr '\n' ' ')"
else
    free1="$(node_free 1)"
    stat="$(cli numa-stat --json)"
    need=$(($(pages_total "$(json_obj host_nodes "$stat")") * 4096))
    [ "$need" -gt "$free1" ] ||
        fail "setup: the guest node has $need bytes present, node 1 still $free1 free"
    say "guest node 0 has $need bytes present; node 1 has $free1 free"
    set +e
    out="$("$VMHOP" numa-migrate --api-socket "$sock" --to-node 1 --mode "$mode" 2>"$errf")"
    rc=$?
    set -e
    msg="$(cat "$errf")"
    say "refused move: exit $rc, stdout '$out', stderr '$msg'"
    # A node without room is the request's to change (422, exit 2).
    [ "$rc" -eq 2 ] || fail "numa-migrate to a full node exited $rc, not 2"
    [ -z "$out" ] || fail "the refused move printed on stdout"
    if [ -z "$msg" ] || [ "$(printf '%s\n' "$msg" | wc -l)" -ne 1 ]; then
        fail "the refusal is not a one-line message"
    fi
    case "$msg" in
    *"node 1"*) ;;
    *) fail "the refusal does not name host node 1" ;;
    esac
    case "$msg" in
    *panicked*) fail "vmhop panicked" ;;
    esac
    say "ok: refused with exit 1 and one line"
    check_stat 0 "after the refused move"
    check_verify "after the refused move"
    check_running "after the refused move"

    # vmhop balance: the vCPUs pinned to node 1 from outside, memory left
    # on node 0. While node 1 is full the planner must leave it (and say
    # why); once node 1 has room it moves the guest node after its vCPUs.
    for t in /proc/"$vm_pid"/task/*; do
        case "$(cat "$t/comm")" in
        vcpu*) taskset -p -c "$(node_cpus 1)" "${t##*/}" >/dev/null || fail "taskset of ${t##*/}" ;;
        esac
    done
    say "vCPUs pinned to node 1's CPUs ($(node_cpus 1)) with taskset"
    balance_dir=/tmp/balance
    mkdir -p "$balance_dir"
    ln -sf "$sock" "$balance_dir/vm.sock"
    : >"$balance_dir/dead.sock"
    bal() {
        if ! out="$("$VMHOP" balance --socket-dir "$balance_dir" --json "$@" 2>"$errf")"; then
            fail "vmhop balance $* exited non-zero: $(cat "$errf")"
        fi
        printf '%s\n' "$out"
    }
    plan="$(bal --dry-run)"
    say "balance dry run with node 1 full: $plan"
    case "$plan" in *'"moves":[]'*) ;; *) fail "balance planned a move to a full node: $plan" ;; esac
    case "$plan" in *'"why":"its vCPUs run on node 1, but node 1 has not'*) ;; *) fail "balance did not say why it left the guest node: $plan" ;; esac
    case "$plan" in *'dead.sock'*) ;; *) fail "balance did not report the socket that does not answer: $plan" ;; esac
    say "ok: balance leaves the guest node while node 1 is full, and says why"

    rm -f "$filler"
    say "filler removed; node 1 has $(($(node_free 1) / MIB)) MiB free"
    plan="$(bal --dry-run)"
    say "balance dry run with room: $plan"
    case "$plan" in *'"to_node":1,'*'"rule":"affinity"'*) ;; *) fail "balance planned no affinity move to node 1: $plan" ;; esac
    case "$plan" in *'"outcomes":[]'*) ;; *) fail "a dry run ran moves: $plan" ;; esac
    check_stat_policy 0 "after the dry run"
    run="$(bal)"
    say "balance: $run"
    case "$run" in *'"report":{"operation":"numa-migrate"'*) ;; *) fail "balance ran no move: $run" ;; esac
    case "$run" in *'"error":'*) fail "a balance move failed: $run" ;; esac
    check_stat 1 "to node 1 once it has room"
    check_verify "after balance"
    check_running "after balance"
    plan="$(bal --dry-run)"
    case "$plan" in *'"moves":[]'*) ;; *) fail "balance wants to move again after its move: $plan" ;; esac
    say "ok: balance moved the guest node after its vCPUs, and then wants nothing more"
fi

cli stop >/dev/null
i=0
while kill -0 "$vm_pid" 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || fail "vmhop run did not exit after stop"
    sleep 0.5
done
vm_pid=""
say "ok: all checks passed"
