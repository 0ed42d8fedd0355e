#!/usr/bin/env bash
# Boot the NUMA box (a two-node host with KVM, inside QEMU TCG) and run one
# scenario script in it.
#
#   tests/numabox/run.sh SCENARIO [EXTRA_FILE[:/path/in/box] ...]
#
# SCENARIO is a shell script; it becomes /scenario.sh in the box and its
# exit status is the result. Each EXTRA_FILE is copied to /files/<name> in
# the box, or to /path/in/box when given as FILE:/path/in/box.
#
# Environment:
#   VMHOP_BIN        a static vmhop binary to use instead of building one;
#                    "none" boots without /bin/vmhop
#   NUMABOX_TIMEOUT  seconds QEMU may run before it is killed (default 600)
#   NUMABOX_SILENCE  seconds the box may print nothing before it counts as
#                    frozen and is killed (default 300)
#   NUMABOX_BUILD_TIMEOUT  seconds the cargo build may take (default 1800)
#   NUMABOX_CACHE    the folder setup.sh filled (default <repo>/target/numabox-cache)
#   NUMABOX_LOG      console log file (default <repo>/target/numabox-logs/<scenario>.log)
#   NUMABOX_SCENARIO_ARGS  words passed to the scenario as "$@" (e.g. a mode),
#                    so one script can serve several cases
#   NUMABOX_KEEP=1   keep the work folder (initramfs staging) for debugging
#   NUMABOX_TCG_THREAD  QEMU's TCG mode: "multi" (default, one host thread
#                    per box CPU) or "single" (one thread runs both); for
#                    comparing box failures, see README "The platform's own fault"
#   NUMABOX_KVM_AMD  parameters for the box's kvm-amd module (e.g. "npt=0"),
#                    for comparing box failures
#   NUMABOX_NUMA_BALANCING  the box's kernel.numa_balancing (e.g. 0; default:
#                    the kernel's), for comparing box failures
#   NUMABOX_QEMU     the QEMU command (words; default qemu-system-x86_64), for
#                    trying another build: "/path/qemu-system-x86_64 -L DIR"
#   NUMABOX_NODES    2 (default: two nodes of one CPU and 1 GiB each, distance
#                    20) or 4 (four nodes of one CPU and 512 MiB each, with
#                    distances that differ by pair, as `numa_distances`
#                    below: 0-1 and 2-3 near (12), 0-2 and 1-3 farther (20),
#                    0-3 and 1-2 far (30))
#
# The console is streamed to stdout and to the log. Exits 0 only when the
# box printed "NUMABOX-RESULT: PASS"; 124 when the timeout fired.
set -euo pipefail

die() {
    echo "numabox run: ERROR: $*" >&2
    exit 1
}
note() {
    echo "numabox run: $*" >&2
}

[ "$#" -ge 1 ] || die "usage: $0 SCENARIO [EXTRA_FILE[:/path/in/box] ...]"
scenario="$1"
shift
[ -f "$scenario" ] || die "scenario $scenario does not exist"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${NUMABOX_CACHE:-$repo/target/numabox-cache}"
kdir="$cache/current"
timeout_s="${NUMABOX_TIMEOUT:-600}"
silence_s="${NUMABOX_SILENCE:-300}"
build_timeout_s="${NUMABOX_BUILD_TIMEOUT:-1800}"
scenario_args="${NUMABOX_SCENARIO_ARGS:-}"
name="$(basename "$scenario" .sh)"
if [ -n "$scenario_args" ]; then
    # One log per scenario and argument set, so runs of one script with
    # different modes do not overwrite each other's console.
    name="$name-$(printf '%s' "$scenario_args" | tr -c 'A-Za-z0-9._-' '_')"
fi
log="${NUMABOX_LOG:-$repo/target/numabox-logs/$name.log}"
modules=(irqbypass ccp kvm kvm-amd)
tcg_thread="${NUMABOX_TCG_THREAD:-multi}"
case "$tcg_thread" in single | multi) ;; *) die "NUMABOX_TCG_THREAD=$tcg_thread: expected single or multi" ;; esac
read -r -a qemu <<<"${NUMABOX_QEMU:-qemu-system-x86_64}"

for tool in "${qemu[0]}" cpio gzip timeout readelf; do
    command -v "$tool" >/dev/null || die "$tool not found; run tests/numabox/setup.sh first"
done
[ -x /bin/busybox ] || die "/bin/busybox not found; run tests/numabox/setup.sh first"
[ -f "$kdir/.complete" ] || die "no kernel in $kdir; run tests/numabox/setup.sh first"
for m in "${modules[@]}"; do
    [ -s "$kdir/modules/$m.ko" ] || die "module $kdir/modules/$m.ko missing; run tests/numabox/setup.sh again"
done

is_static() {
    ! readelf -l "$1" 2>/dev/null | grep -q 'program interpreter'
}

# --- the vmhop binary -------------------------------------------------------
# Built static (the box has no libc) into its own target folder so that the
# RUSTFLAGS change does not invalidate the normal build.
if [ "${VMHOP_BIN:-}" = "none" ]; then
    vmhop=""
    note "VMHOP_BIN=none: booting without /bin/vmhop"
elif [ -n "${VMHOP_BIN:-}" ]; then
    vmhop="$VMHOP_BIN"
    [ -f "$vmhop" ] || die "VMHOP_BIN=$vmhop does not exist"
    note "using VMHOP_BIN=$vmhop"
else
    build_dir="${NUMABOX_BUILD_DIR:-$repo/target/numabox-build}"
    vmhop="$build_dir/x86_64-unknown-linux-gnu/release/vmhop"
    stale=""
    if [ ! -f "$vmhop" ]; then
        stale="not built yet"
    else
        newer="$(find "$repo/src" "$repo/Cargo.toml" "$repo/Cargo.lock" "$repo/build.rs" \
            -newer "$vmhop" -print -quit 2>/dev/null || true)"
        [ -z "$newer" ] || stale="$newer changed"
    fi
    if [ -n "$stale" ]; then
        note "building static vmhop ($stale) into $build_dir"
        start=$(date +%s)
        # CARGO_ENCODED_RUSTFLAGS would override RUSTFLAGS.
        (cd "$repo" && unset CARGO_ENCODED_RUSTFLAGS && CARGO_TARGET_DIR="$build_dir" \
            RUSTFLAGS="-C target-feature=+crt-static" \
            timeout "$build_timeout_s" cargo build --release \
            --target x86_64-unknown-linux-gnu --bin vmhop) \
            || die "static release build of vmhop failed (see cargo output above)"
        note "build took $(($(date +%s) - start)) s"
    else
        note "reusing $vmhop (newer than the sources)"
    fi
    [ -f "$vmhop" ] || die "cargo build succeeded but $vmhop is missing"
fi
if [ -n "$vmhop" ]; then
    is_static "$vmhop" || die "$vmhop is dynamically linked; the box has no libc (build with -C target-feature=+crt-static)"
fi

# --- the initramfs ----------------------------------------------------------
mkdir -p "$repo/target/numabox-work" "$(dirname "$log")"
work="$(mktemp -d "$repo/target/numabox-work/$name.XXXXXX")"
qemu_pid=""
tail_pid=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    if [ -n "$tail_pid" ]; then
        kill "$tail_pid" 2>/dev/null || true
    fi
    if [ "${NUMABOX_KEEP:-0}" = 1 ]; then
        note "kept work folder $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# vmrun_returns KO: "SYMBOL OFFSET" (decimal) for the instruction after
# every vmrun in module KO, relative to the function that holds it.
vmrun_returns() {
    local sym="" base=0 want=0 addr line
    objdump -d --no-show-raw-insn "$1" 2>/dev/null | while IFS= read -r line; do
        if [[ "$line" =~ ^([0-9a-f]+)\ \<([^\>+]+)\>:$ ]]; then
            sym="${BASH_REMATCH[2]}" base=$((16#${BASH_REMATCH[1]})) want=0
        elif [[ "$line" =~ ^\ *([0-9a-f]+):[[:space:]]+([a-z0-9]+) ]]; then
            addr=$((16#${BASH_REMATCH[1]}))
            if [ "$want" = 1 ]; then echo "$sym $((addr - base))"; fi
            want=0
            if [ "${BASH_REMATCH[2]}" = vmrun ]; then want=1; fi
        fi
    done || true
}

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,files,lib/modules/numabox}
cp /bin/busybox "$root/bin/busybox"
for m in "${modules[@]}"; do
    cp "$kdir/modules/$m.ko" "$root/lib/modules/numabox/$m.ko"
done
# Where the box's KVM resumes after each VMRUN, as "SYMBOL OFFSET" lines
# (bytes into kvm_amd's SYMBOL): /init looks for these addresses among the
# guest rips of KVM's trace when a scenario fails, the platform's own fault
# (README.md, "The platform's own fault"). Best effort: without objdump
# the file is empty and a failure is only not recognised as the platform's.
vmrun_returns "$kdir/modules/kvm-amd.ko" >"$root/lib/modules/numabox/vmrun-returns"
# The box's TAP and bridge (setup.sh's box-net-modules), for the Linux
# guests' network: /init loads them in their order after KVM's.
if [ -s "$kdir/box-net-modules/order" ]; then
    mkdir -p "$root/lib/modules/numabox/net"
    while read -r m; do
        cp "$kdir/box-net-modules/$m.ko" "$root/lib/modules/numabox/net/$m.ko"
    done <"$kdir/box-net-modules/order"
    cp "$kdir/box-net-modules/order" "$root/lib/modules/numabox/net/order"
fi
if [ -n "$vmhop" ]; then
    # Debug info only makes the initramfs bigger; keep the symbols.
    strip --strip-debug -o "$root/bin/vmhop" "$vmhop" 2>/dev/null || cp "$vmhop" "$root/bin/vmhop"
    chmod 755 "$root/bin/vmhop"
fi
cp "$here/init.sh" "$root/init"
chmod 755 "$root/init"
cp "$scenario" "$root/scenario.sh"
chmod 755 "$root/scenario.sh"
printf '%s\n' "$scenario_args" >"$root/scenario.args"
printf '%s' "${NUMABOX_KVM_AMD:-}" >"$root/kvm-amd.params"
printf '%s' "${NUMABOX_NUMA_BALANCING:-}" >"$root/numa-balancing"
for spec in "$@"; do
    src="${spec%%:*}"
    if [ "$src" = "$spec" ]; then
        dest="/files/$(basename "$src")"
    else
        dest="${spec#*:}"
    fi
    case "$dest" in /*) ;; *) die "destination $dest of $spec is not an absolute path" ;; esac
    [ -e "$src" ] || die "extra file $src does not exist"
    mkdir -p "$root$(dirname "$dest")"
    cp -a "$src" "$root$dest"
done
# The kernel opens /dev/console before /init runs; without the node /init
# starts without stdio (it reopens the console itself once devtmpfs is up).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true

initrd="$work/initrd.gz"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 >"$initrd") \
    || die "building the initramfs from $root failed"
note "initramfs $(du -h "$initrd" | cut -f1), kernel $(cat "$kdir/package" 2>/dev/null || echo "$kdir")"

# --- boot -------------------------------------------------------------------
note "booting scenario $scenario${scenario_args:+ $scenario_args} (timeout ${timeout_s}s), console log $log"
: >"$log"
start=$(date +%s)
# no_timer_check: on a loaded host the emulated 8254 can miss the kernel's
# early timer check, which then panics with "IO-APIC + timer doesn't work!"
# before /init runs (seen once in 148 boots with two boxes at a time).
# loglevel=5 instead of quiet: the box kernel's warnings (and the taint
# they leave) reach the console, so a crash report comes with its history.
# The EPYC features TCG cannot emulate are turned off by name: QEMU drops
# them anyway, and would print a warning per feature and CPU.
cpu="EPYC,+svm,-fxsr-opt,-misalignsse,-osvw,-topoext,-nrip-save,-xsavec"
case "${NUMABOX_NODES:-2}" in
2)
    numa=(-smp 2 -m 2G
        -object memory-backend-ram,id=m0,size=1G
        -object memory-backend-ram,id=m1,size=1G
        -numa node,nodeid=0,cpus=0,memdev=m0
        -numa node,nodeid=1,cpus=1,memdev=m1)
    ;;
4)
    numa=(-smp 4 -m 2G)
    for n in 0 1 2 3; do
        numa+=(-object "memory-backend-ram,id=m$n,size=512M" -numa "node,nodeid=$n,cpus=$n,memdev=m$n")
    done
    # numa_distances: near pairs 12, farther 20, far 30.
    for d in 0,1,12 2,3,12 0,2,20 1,3,20 0,3,30 1,2,30; do
        IFS=, read -r a b v <<<"$d"
        numa+=(-numa "dist,src=$a,dst=$b,val=$v")
    done
    ;;
*) die "NUMABOX_NODES must be 2 or 4, not ${NUMABOX_NODES}" ;;
esac
timeout -k 10 "$timeout_s" "${qemu[@]}" \
    -accel "tcg,thread=$tcg_thread" -cpu "$cpu" "${numa[@]}" \
    -kernel "$kdir/vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 loglevel=5 no_timer_check" \
    -nographic -no-reboot \
    </dev/null >"$log" 2>&1 &
qemu_pid=$!
tail -s 0.2 -n +1 -f --pid="$qemu_pid" "$log" &
tail_pid=$!
# A box whose kernel reports an RCU stall or a task blocked for minutes
# (the hung-task detector, 120 s) has frozen (the platform's fault,
# README.md "The platform's own fault"): stop it now rather than at the
# timeout, minutes later.
# A box that prints nothing for NUMABOX_SILENCE seconds has frozen too,
# silently: every scenario prints a line per check, and its longest wait
# without printing (linux.sh's BOOT_DEADLINE, a guest's boot to its first
# beat) is 240 s, so a scenario always gets to report its own failure
# first.
stalled="$work/box-stalled"
silent="$work/box-silent"
(
    size=-1
    quiet_since=$(date +%s)
    while kill -0 "$qemu_pid" 2>/dev/null; do
        now_size=$(wc -c <"$log" 2>/dev/null || echo 0)
        if [ "$now_size" != "$size" ]; then
            size=$now_size
            quiet_since=$(date +%s)
        elif [ $(($(date +%s) - quiet_since)) -ge "$silence_s" ]; then
            : >"$silent"
            kill "$qemu_pid" 2>/dev/null
            break
        fi
        # The box's own kernel messages start the line ("[  30.36] rcu: ...");
        # scenarios print a guest's behind "guest| ".
        if grep -qE '^\[ *[0-9.]*\] (rcu: INFO: rcu_[a-z]* detected stalls|INFO: task .* blocked for more than)' "$log" 2>/dev/null; then
            : >"$stalled"
            sleep 5 # the rest of the stall report
            kill "$qemu_pid" 2>/dev/null
            break
        fi
        sleep 2
    done
) &
watch_pid=$!
set +e
wait "$qemu_pid"
qemu_rc=$?
set -e
qemu_pid=""
wait "$tail_pid" 2>/dev/null || true
tail_pid=""
kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true
elapsed=$(($(date +%s) - start))

# Unanchored at the start (console escapes or a kernel message may share
# the line) but anchored at the end, so a scenario that prints /init's
# source does not count as a result.
result="$(tr -d '\r' <"$log" | grep -oE 'NUMABOX-RESULT: (PASS|FAIL \(exit [0-9]+\))$' | tail -n 1 || true)"
# No result line: the box's kernel crashed (panic=-1 ends QEMU), froze or
# reset, before the scenario could say anything. A user-space VMM cannot
# do that to a kernel; tests/numabox.rs boots again on this marker.
died="BOX DIED (no NUMABOX-RESULT line: the box's kernel crashed or froze, the platform's fault, see tests/numabox/README.md)"
if [ -z "$result" ]; then
    if [ -f "$stalled" ]; then
        note "$died: the box kernel reported an RCU stall or a hung task; QEMU stopped after ${elapsed}s; log $log"
        exit 1
    fi
    if [ -f "$silent" ]; then
        note "$died: the box printed nothing for ${silence_s}s; QEMU stopped after ${elapsed}s; log $log"
        exit 1
    fi
    note "$died"
fi
if [ "$qemu_rc" -eq 124 ] || [ "$qemu_rc" -eq 137 ]; then
    note "TIMEOUT: QEMU killed after ${timeout_s}s (${result:-no result line}); log $log"
    exit 124
fi
if [ "$qemu_rc" -ne 0 ]; then
    note "FAIL: QEMU exited with status $qemu_rc after ${elapsed}s (${result:-no result line}); log $log"
    exit 1
fi
case "$result" in
    "NUMABOX-RESULT: PASS")
        note "PASS: scenario $name in ${elapsed}s"
        exit 0
        ;;
    "")
        note "FAIL: the box printed no NUMABOX-RESULT line (${elapsed}s); log $log"
        exit 1
        ;;
    *)
        note "FAIL: the box reported ${result#NUMABOX-RESULT: } after ${elapsed}s; log $log"
        exit 1
        ;;
esac
