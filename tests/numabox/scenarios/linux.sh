#!/bin/sh
# A Linux guest under vmhop, inside the NUMA box.
#
#   linux.sh STEP [verbose]
#   STEP = boot | poweroff | reboot | checkpoint | numa-moves | numa-live | numa-stop-copy | numa-kernel
#          | migrate
#          | boot-loop (not in the suite: see below)
#
# Needs two extra files (run.sh arguments): the guest kernel at
# /files/vmlinuz (the box's own Debian kernel does) and the guest initramfs
# at /files/guest.cpio.gz (tests/numabox/linux/build-guest-initrd.sh, with
# the guest modules); numa-moves also /files/disk.img and
# /files/e2fsck.static. Its
# /init prints "vmhop-guest: ..." lines (the NUMA view of the guest kernel)
# and then a checksum heartbeat "vmhop-check: beat N ok|FAIL ..." about once
# a second; see tests/numabox/linux/guest-init.sh.
#
# Every STEP starts the same VM: 2 vCPUs, guest node 0 (128 MiB, vCPU 0) on
# host node 0, guest node 1 (128 MiB, vCPU 1) on host node 1, console to a
# file, and waits for the first beat. Then the guest must have seen two
# nodes with the right CPUs and 50..100% of 128 MiB each (the kernel image,
# ~45 MiB, is reserved on whichever node holds it), 75..100% of 256 MiB in
# all. Then:
#   boot        3 more beats, all ok and consecutive; then the guest is reset
#               in place (`vmhop reset --to`) to one checkpoint $RESETS
#               times (100), each time while it works past it: every
#               time its first beat after the reset must continue from the
#               checkpoint's beat, with its uptime not before the
#               checkpoint's, ok (the checker also watches the kernel log
#               for warnings, lockups and stalls); 2 more beats
#               consecutive after the last; stop; vmhop exits 0. This
#               boot's guest beats every 0.2 s (vmhop.beat_sleep) with 2
#               files of 1 MiB, so that the resets fit in about a minute.
#   poweroff    the guest runs `poweroff -f` after beat 3 (kernel command
#   reboot      line vmhop.action=...-after=3) / `reboot -f`: vmhop must exit
#               0 by itself and say "powered off" / "rebooted".
#   checkpoint  a full checkpoint, 3 beats, an incremental one; stop; each is
#               restored (lazily) in turn: its beats must continue the count
#               from where the checkpoint was taken (no reset to 1, which
#               would be a reboot), stay ok and consecutive, and uptime must
#               not go back. The VM has the ext4 data disk (no control
#               disk): each restore puts it in a new sparse file over the
#               chain, and the checker there finds every file with the sum
#               it had at that checkpoint and /disk/beat at that beat — a
#               file written after the checkpoint is back as it was.
#   numa-MODE   numa-migrate --guest-node 0 --to-node 1 --mode MODE; a fresh
#               numa-stat must show >= 99% of guest node 0's present pages
#               on host node 1 (bind:1, vCPU 0 on node 1's CPUs) and guest
#               node 1 still on host node 1; then 3 more beats ok.
#   numa-moves  the same checks after each of three moves of guest node 0
#               in one VM (what the suite runs: one boot instead of three):
#               live to host node 1, stop-copy back to host node 0, kernel
#               to host node 1. This VM also has an ext4 data disk
#               (/files/disk.img, made by the test with mkfs.ext4) that its
#               checker writes and checks every beat, with a writer keeping
#               requests in flight through each move, and a read-only
#               control disk: at the end the box writes "poweroff" there,
#               the guest unmounts its disk and powers off, vmhop must exit
#               0 by itself, and e2fsck -fn (/files/e2fsck.static) must find
#               the filesystem clean.
#   migrate     a second vmhop waits with run --incoming unix:... and the
#               guest nodes swapped (guest node 0 to host node 1, 1 to 0);
#               vmhop migrate moves the VM there: the source must exit 0,
#               the destination's console must carry on counting from where
#               the source stopped (no reboot, uptime not back), 3 more
#               beats ok, and numa-stat there must show the swapped nodes.
#               The VM has the ext4 data disk and the control disk of
#               numa-moves, sent with migrate --copy-storage into new
#               files at other paths (the destination's --disk
#               id=...,path=...): the report must count the blocks, the
#               destination's status must name the new files, the checker
#               goes on checking its files there, and the destination's
#               guest powers off clean (its control disk the copy, e2fsck
#               on the copied data disk) as in numa-moves.
#   Network (numa-moves, migrate, checkpoint): the box makes a bridge br0
#               holding the box's address $BOX_IP and two persistent TAPs,
#               tap0 (the VM's) and tap1 (a migration's destination, a
#               restored VM); the guest sets $GUEST_IP on eth0 and serves
#               random files over HTTP (busybox httpd) whose sha256 sums it
#               prints: /small (64 KiB) and, in numa-moves, /big (16 MiB).
#               numa-moves and migrate also have it stream the
#               numbers 1, 2, 3, ... one a line over one TCP connection to a
#               box listener (busybox nc -l): after each move, and on the
#               destination, the listener must still run (one connection,
#               never reset), its byte count must have grown, and the bytes
#               must be exactly the lines 1..N in order (no gap, no
#               repeat). numa-moves fetches /big (wget) before the moves
#               and /small after them, migrate /small on the destination,
#               checkpoint /small from each restored VM (on tap1): the
#               box's sha256 must be the guest's. migrate reports the longest time the stream stood
#               still around the migration (emulated time, never asserted).
#   vsock (numa-moves, checkpoint, migrate): the VM has a virtio-vsock
#               device (cid 3, socket /tmp/vs/NAME.sock, one per VM, in a
#               folder only root may write) and the guest
#               (vmhop.vsock=5000:5001) runs tests/numabox/linux/
#               vmhop-vsock.c's tool: an AF_VSOCK listener on port 5000
#               and a client connecting to host port 5001 (again after a
#               reset); the box runs the same tool (taken out of the guest
#               initramfs): a server at the socket's PATH_5001 and, once
#               the guest listens, a client sending CONNECT 5000. Each
#               connection carries a counted byte stream that its server
#               checks and echoes and its client checks again, so data is
#               checked both ways on both. After each NUMA move and each
#               checkpoint of the running VM both connections must carry on
#               (still the one connection at the box's end, more checked
#               bytes, nothing ended in the guest); when a VM's vmhop ends
#               (stop; the migration's source) the box's ends of its
#               connections must end, not hang; a restored VM and the
#               migration's destination (on sockets of their own) must show
#               the guest's two connections from before reset (its
#               transport reset), its client back on the new socket and a
#               new box connection echoing.
#   boot-loop   boot, wait for the first beat, stop; again, up to
#               $BOOT_LOOP times (20): a tool for catching the box's
#               spontaneous triple fault (issue 9), whose KVM trace the box
#               prints when a scenario fails (tests/numabox/init.sh).
# "verbose" boots the guest without `quiet` (its whole boot log on the console).
#
# Busybox sh. Prints "linux[STEP]: ok: ..." per passed check and, on the
# first failed one, "linux[STEP]: FAIL: ..." followed by the guest console's
# tail, vmhop's output, status --json and the last kernel messages. Never
# checks timings: they are emulated here (deadlines only catch hangs).
set -eu

step="${1:-}"
verbose="${2:-}"
case "$step" in
boot | poweroff | reboot | checkpoint | numa-moves | numa-live | numa-stop-copy | numa-kernel | migrate | boot-loop) ;;
*)
    echo "linux: usage: linux.sh boot|poweroff|reboot|checkpoint|numa-moves|numa-live|numa-stop-copy|numa-kernel|migrate|boot-loop [verbose]"
    exit 2
    ;;
esac
case "$verbose" in
"" | verbose) ;;
*)
    echo "linux: unknown option '$verbose' (expected verbose or nothing)"
    exit 2
    ;;
esac

VMHOP="${VMHOP:-/bin/vmhop}"
files="${NUMABOX_FILES:-/files}"
kernel="$files/vmlinuz"
initrd="$files/guest.cpio.gz"
tag="linux[$step${2:+ $2}]"
RESETS="${NUMABOX_RESETS:-100}"
errf=/tmp/cmd.err
ckdir=/tmp/ck
MIB_KB=1024
NODE_MB=128

# Deadlines (seconds). Everything runs emulated: a nested guest at TCG speed.
BOOT_DEADLINE=240   # vmhop run -> first beat
BEAT_DEADLINE=60    # any further beat
EXIT_DEADLINE=120   # poweroff/reboot after the first beat; stop -> exit

# The guest: 4 files of 4 MiB checked and one rewritten every beat.
cmdline="console=ttyS0 vmhop.files=4 vmhop.file_mb=4"
# The boot step's resets want a guest that beats often (see "boot" above).
[ "$step" != boot ] || cmdline="console=ttyS0 vmhop.files=2 vmhop.file_mb=1 vmhop.beat_sleep=0.2"
[ "$verbose" = verbose ] || cmdline="quiet $cmdline"

# The data disk (a copy of /files/disk.img), the control disk and e2fsck.
disk_img=/tmp/disk.img
ctl_img=/tmp/ctl.img
fsck="$files/e2fsck.static"
# vmhop run arguments beyond the common ones (the disks, when a step has them).
vm_args=""

# The network (with_net): the box's bridge address, the guest's address
# and MAC, the stream listener's port and the size of the big HTTP file
# (16 MiB over the nested virtio-net took ~95 s of box time under load:
# one step fetches it, the others fetch the 64 KiB one).
BOX_IP=10.0.2.1
GUEST_IP=10.0.2.15
GUEST_MAC=52:54:00:12:34:56
STREAM_PORT=7000
WWW_MB=16
stream_file=/tmp/stream.bin
# vsock (with_vsock): the guest's context id, the port its listener takes
# and the host port its client connects to. The devices' sockets live in
# a folder only root may write (vmhop refuses one others could write),
# one socket per VM: $vsock_dir/NAME.sock.
VSOCK_CID=3
VSOCK_PORT=5000
VSOCK_HOST_PORT=5001
vsock_dir=/tmp/vs
vsock_tool=/tmp/vsock-tool/bin/vmhop-vsock
vsock_words=""
vsock_pids=""
# Bytes each of the current VM's two connections had carried at the last
# vsock_check, and how many "conn ... ended" lines its console may show
# (a restored or migrated guest's two connections from before the reset).
vsock_h2g_seen=0
vsock_g2h_seen=0
vsock_ends_ok=0
# The guest's command line words for it, and the card for a destination
# or a restored VM (on the other TAP), when the step has a network.
net_words=""
net_dst_args=""
small_sum=""
big_sum=""
listener_pid=""
sampler_pid=""
stream_seen=0

# The VM being watched: its name, vmhop pid, console and output files.
vm=""
vm_pid=""
con=""
out=""
err=""

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

diagnose() {
    if [ -n "$con" ] && [ -f "$con" ]; then
        # "guest| " keeps the guest's kernel messages apart from the box's
        # own on the box console (run.sh watches the latter for RCU stalls).
        echo "$tag: --- guest console $con (last 40 lines) ---"
        tr -d '\r' <"$con" | tail -n 40 | sed 's/^/guest| /'
    fi
    for f in "$out" "$err"; do
        if [ -n "$f" ] && [ -s "$f" ]; then
            echo "$tag: --- $f ---"
            cat "$f"
        fi
    done
    if [ -n "$vm_pid" ] && [ -d "/proc/$vm_pid" ]; then
        echo "$tag: --- status of $vm ---"
        "$VMHOP" status --name "$vm" --json 2>&1 || true
        echo "$tag: --- vmhop threads: tid (comm) state ... utime stime (fields 1-3, 14-15) ---"
        for t in /proc/"$vm_pid"/task/*; do
            cut -d' ' -f1-3,14,15 "$t/stat" 2>/dev/null || true
        done
    fi
    echo "$tag: --- dmesg (last 20 lines) ---"
    dmesg 2>/dev/null | tail -n 20
}

cleanup() {
    for p in "$vm_pid" "$listener_pid" "$sampler_pid" $vsock_pids; do
        if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
            kill "$p" 2>/dev/null || true
        fi
    done
}
trap cleanup EXIT

# --- JSON helpers (vmhop prints one JSON object on one line) --------------

# json_obj KEY JSON: the inside of the (last) flat object "KEY":{...}.
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

# guest_node_obj G STAT: guest node G's object in numa-stat's guest_nodes.
guest_node_obj() {
    printf '%s\n' "$2" | sed 's/{"guest_node":/\n&/g' | grep "^{\"guest_node\":$1,"
}

# vcpu_cpus G STAT: allowed_cpus of every vCPU of guest node G (one a line).
vcpu_cpus() {
    printf '%s\n' "$2" | grep -o '{"id":[^{}]*}' | grep "\"guest_node\":$1[,}]" |
        sed -n 's/.*"allowed_cpus":"\([^"]*\)".*/\1/p'
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

# check_share NODE OBJ WHAT: >= 99% of the present pages in OBJ on NODE.
check_share() {
    total="$(pages_total "$2")"
    on="$(pages_on "$1" "$2")"
    [ "$total" -gt 0 ] || fail "$3: no present page at all ({$2})"
    if [ $((on * 100)) -lt $((total * 99)) ]; then
        fail "$3: only $on of $total present pages on host node $1 ({$2})"
    fi
    say "ok: $3: $on of $total present pages on host node $1"
}

# --- the guest console -----------------------------------------------------------

# console: the current VM's console without carriage returns.
console() {
    [ -f "$con" ] || return 0
    tr -d '\r' <"$con"
}

# beats: the beat numbers on the console, one a line, in order.
beats() {
    console | sed -n 's/.*vmhop-check: beat \([0-9][0-9]*\) .*/\1/p'
}

last_beat() {
    b="$(beats | tail -n 1)"
    echo "${b:-0}"
}

# beat_up N: the guest uptime (seconds) printed with beat N.
beat_up() {
    console | sed -n "s/.*vmhop-check: beat $1 ok .* up=\([0-9.][0-9.]*\).*/\1/p" | tail -n 1
}

# check_console WHAT: no checksum failure and no kernel panic so far.
check_console() {
    bad="$(console | grep -m 1 'vmhop-check: beat [0-9]* FAIL' || true)"
    [ -z "$bad" ] || fail "$1: the guest checker failed: $bad"
    if console | grep -q 'Kernel panic'; then
        fail "$1: the guest kernel panicked"
    fi
}

# check_consecutive FIRST WHAT: the beats on the console run FIRST, FIRST+1, ...
# with no gap, repeat or restart.
check_consecutive() {
    seq_err="$(beats | awk -v first="$1" '
        { want = (NR == 1) ? first : prev + 1
          if ($1 != want) { print "beat " $1 " where " want " was due"; exit }
          prev = $1 }')"
    [ -z "$seq_err" ] || fail "$2: beats not consecutive: $seq_err ($(beats | tr '\n' ' '))"
}

# guest_stopped N WHAT: fails if the watched VM's guest stopped for good
# (vmhop's error output says so) before beat N.
guest_stopped() {
    if [ -n "$err" ] && grep -q 'the guest shut down\|KVM_RUN failed' "$err" 2>/dev/null; then
        fail "$2: the guest stopped before beat $1: $(grep -m 1 'vCPU' "$err")"
    fi
}

# wait_beat N DEADLINE WHAT: the console shows beat >= N within DEADLINE s;
# fails early if vmhop exits, the checker fails or the kernel panics.
wait_beat() {
    t=0
    while [ "$(last_beat)" -lt "$1" ]; do
        check_console "$3"
        # A guest that stopped (a triple fault, a vCPU error) will not beat
        # again: say so now rather than at the deadline. A Linux guest's
        # triple fault also ends vmhop, so its error file is read again
        # once vmhop is gone: reported as "vmhop exited", a guest dying
        # while it booted was not seen as the platform's fault
        # (tests/numabox.rs, PLATFORM_FAILED).
        guest_stopped "$1" "$3"
        if ! kill -0 "$vm_pid" 2>/dev/null; then
            guest_stopped "$1" "$3"
            fail "$3: vmhop ($vm) exited before beat $1"
        fi
        t=$((t + 1))
        [ "$t" -le "$2" ] || fail "$3: no beat $1 within ${2}s (last beat $(last_beat))"
        sleep 1
    done
    check_console "$3"
}

# --- vmhop ------------------------------------------------------------------------

# start NAME CMD...: runs CMD (a vmhop run or restore) in the background as
# the watched VM NAME, console in /tmp/NAME.console.
start() {
    vm="$1"
    shift
    con="/tmp/$vm.console"
    out="/tmp/$vm.out"
    err="/tmp/$vm.err"
    rm -f "$con"
    say "starting $vm: $*"
    "$@" --console "$con" --json >"$out" 2>"$err" &
    vm_pid=$!
}

# stop_vm WHAT: vmhop stop, then the process must exit 0 within the deadline.
stop_vm() {
    if ! "$VMHOP" stop --name "$vm" >/dev/null 2>"$errf"; then
        fail "$1: vmhop stop --name $vm failed: $(cat "$errf")"
    fi
    wait_exit "$1: after stop"
    say "ok: $1: $vm stopped, vmhop exited 0"
}

# wait_exit WHAT: the watched vmhop exits within the deadline, with status 0.
wait_exit() {
    t=0
    while kill -0 "$vm_pid" 2>/dev/null; do
        t=$((t + 1))
        [ "$t" -le "$EXIT_DEADLINE" ] || fail "$1: vmhop ($vm) still running after ${EXIT_DEADLINE}s"
        sleep 1
    done
    set +e
    wait "$vm_pid"
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || fail "$1: vmhop ($vm) exited with status $rc"
    vm_pid=""
}

# cli WHAT ARGS...: a vmhop client command on the watched VM; prints stdout.
cli() {
    what="$1"
    shift
    if ! cli_out="$("$VMHOP" "$@" --name "$vm" --json 2>"$errf")"; then
        fail "$what: vmhop $* failed: $(cat "$errf")"
    fi
    printf '%s\n' "$cli_out"
}

# check_node G WHAT: the guest saw node G with CPU G and about 128 MiB.
check_node() {
    line="$(console | grep -m 1 "vmhop-guest: node $1 " || true)"
    [ -n "$line" ] || fail "$2: the guest has no node $1 ($(console | grep 'vmhop-guest: node' | tr '\n' ';'))"
    cpus="$(printf '%s\n' "$line" | sed -n 's/.* cpus=\([^ ]*\).*/\1/p')"
    kb="$(printf '%s\n' "$line" | sed -n 's/.* memtotal_kb=\([0-9][0-9]*\).*/\1/p')"
    [ "$cpus" = "$1" ] || fail "$2: guest node $1 has cpus '$cpus', not $1 ($line)"
    full=$((NODE_MB * MIB_KB))
    if [ -z "$kb" ] || [ "$kb" -gt "$full" ] || [ $((kb * 2)) -lt "$full" ]; then
        fail "$2: guest node $1 has MemTotal '$kb' kB, not 50..100% of $NODE_MB MiB ($line)"
    fi
    say "ok: $2: guest node $1: cpus $cpus, MemTotal $kb kB"
    node_kb_total=$((node_kb_total + kb))
}

# boot_vm: the common start, up to the first beat and the guest's NUMA view.
boot_vm() {
    extra="${1:-}"
    for f in "$kernel" "$initrd"; do
        [ -s "$f" ] || fail "$f missing (pass it to run.sh as an extra file)"
    done
    start lx "$VMHOP" run --name lx --vcpus 2 \
        --numa guest-node=0,size=${NODE_MB}M,host-node=0,cpus=0 \
        --numa guest-node=1,size=${NODE_MB}M,host-node=1,cpus=1 \
        --kernel "$kernel" --initrd "$initrd" --cmdline "$cmdline${extra:+ $extra}" $vm_args
    wait_beat 1 "$BOOT_DEADLINE" "boot"
    console | grep 'vmhop-guest:' | sed "s/^/$tag: guest: /"
    say "ok: boot: first beat: $(console | grep -m 1 'vmhop-check: beat')"
    nodes="$(console | sed -n 's/.*vmhop-guest: nodes=\([0-9][0-9]*\).*/\1/p' | head -n 1)"
    [ "$nodes" = 2 ] || fail "boot: the guest sees '$nodes' NUMA nodes, not 2"
    say "ok: boot: the guest sees 2 NUMA nodes"
    node_kb_total=0
    check_node 0 "boot"
    check_node 1 "boot"
    all=$((2 * NODE_MB * MIB_KB))
    [ $((node_kb_total * 4)) -ge $((all * 3)) ] ||
        fail "boot: the nodes' MemTotal add up to $node_kb_total kB, under 75% of $((2 * NODE_MB)) MiB"
    say "ok: boot: MemTotal $node_kb_total kB in all"
    online="$(console | sed -n 's/.*vmhop-guest: cpus online=\([^ ]*\).*/\1/p' | head -n 1)"
    [ "$online" = 0-1 ] || fail "boot: guest CPUs online '$online', not 0-1"
    say "ok: boot: guest CPUs online 0-1"
}

# more_beats K WHAT: K more beats after the last one, all ok, and every beat
# on this console consecutive from FIRST_BEAT.
more_beats() {
    from="$(last_beat)"
    wait_beat $((from + $1)) "$BEAT_DEADLINE" "$2"
    check_consecutive "$first_beat" "$2"
    say "ok: $2: beats $((from + 1))..$(last_beat) ok"
}

# check_placement STAT G H WHAT: numa-stat has guest node G bound to and
# >= 99% present on host node H.
check_placement() {
    obj="$(guest_node_obj "$2" "$1")"
    [ -n "$obj" ] || fail "$4: numa-stat has no guest node $2: $1"
    policy="$(json_str policy "$obj")"
    [ "$policy" = "bind:$3" ] || fail "$4: guest node $2 policy is '$policy', not bind:$3"
    check_share "$3" "$(json_obj host_nodes "$obj")" "$4: guest node $2 ($policy)"
}

# check_vcpus STAT G H WHAT: every vCPU of guest node G may run exactly on
# host node H's CPUs.
check_vcpus() {
    want="$(cat "/sys/devices/system/node/node$3/cpulist")"
    got="$(vcpu_cpus "$2" "$1")"
    [ -n "$got" ] || fail "$4: numa-stat lists no vCPU of guest node $2"
    for c in $got; do
        [ "$c" = "$want" ] || fail "$4: a vCPU of guest node $2 may run on CPUs '$c', not host node $3's '$want'"
    done
    say "ok: $4: guest node $2's vCPU(s) on host node $3's CPUs ($want)"
}

# --- the steps ------------------------------------------------------------------------

# first_beat_after BYTES WHAT: the first beat line the console got past
# its first BYTES bytes (polled every 0.1 s): sets fb_line and fb_beat.
first_beat_after() {
    t=0
    while :; do
        fb_line="$(tail -c +"$(($1 + 1))" "$con" | tr -d '\r' | grep -m 1 'vmhop-check: beat ' || true)"
        [ -z "$fb_line" ] || break
        check_console "$2"
        guest_stopped "?" "$2"
        kill -0 "$vm_pid" 2>/dev/null || fail "$2: vmhop ($vm) exited"
        t=$((t + 1))
        [ "$t" -le $((BEAT_DEADLINE * 10)) ] || fail "$2: no beat within ${BEAT_DEADLINE}s"
        sleep 0.1
    done
    case "$fb_line" in *" FAIL "*) fail "$2: $fb_line" ;; esac
    fb_beat="$(printf '%s\n' "$fb_line" | sed -n 's/.*vmhop-check: beat \([0-9][0-9]*\) .*/\1/p')"
}

# reset_loop: a full checkpoint, then RESETS resets to it in place, each
# taken while the guest works past it (it has printed the beat after the
# checkpoint); see "boot" above.
reset_loop() {
    take_checkpoint full "reset base"
    base="$ckdir@$ck_id"
    base_before="$ck_before" base_after="$ck_after"
    base_up="$(beat_up "$ck_before")"
    wait_beat $((base_after + 1)) "$BEAT_DEADLINE" "after the reset base"
    i=0 pages=0
    while [ "$i" -lt "$RESETS" ]; do
        i=$((i + 1))
        what="reset $i of $RESETS"
        # Paused, the console's end is where the reset happens.
        cli "$what: pause" pause >/dev/null
        size="$(wc -c <"$con")"
        report="$(cli "$what" reset --to "$base")"
        n="$(json_num pages_rewritten "$report")"
        [ -n "$n" ] || fail "$what: the report has no pages_rewritten: $report"
        pages=$((pages + n))
        cli "$what: resume" resume >/dev/null
        first_beat_after "$size" "$what"
        if [ "$fb_beat" -le "$base_before" ] || [ "$fb_beat" -gt $((base_after + 1)) ]; then
            fail "$what: the first beat after it is $fb_beat, not the one after the checkpoint (taken between beats $base_before and $base_after): $fb_line"
        fi
        up="$(printf '%s\n' "$fb_line" | sed -n 's/.* up=\([0-9.][0-9.]*\).*/\1/p')"
        if [ -n "$base_up" ] && [ -n "$up" ]; then
            awk -v a="$up" -v b="$base_up" 'BEGIN { exit !(a + 0 >= b + 0) }' ||
                fail "$what: guest uptime $up s is before the checkpoint's $base_up s"
        fi
        [ $((i % 20)) -ne 0 ] || say "ok: resets 1..$i: each went on at beat $fb_beat ($report)"
    done
    say "ok: $RESETS resets to $base, $pages pages rewritten in all; every first beat after them continued the checkpoint's count"
    # The guest carries on from the last one: 2 more beats, consecutive.
    size="$(wc -c <"$con")"
    last="$fb_beat"
    wait_beat $((last + 2)) "$BEAT_DEADLINE" "after the resets"
    after="$(tail -c +"$((size + 1))" "$con" | tr -d '\r' | sed -n 's/.*vmhop-check: beat \([0-9][0-9]*\) .*/\1/p' | tr '\n' ' ')"
    want="$((last + 1)) $((last + 2)) "
    case "$after" in "$want"*) ;; *) fail "after the resets: beats '$after', not $want..." ;; esac
    check_console "after the resets"
    say "ok: after the resets: beats $after ok"
}

step_boot() {
    boot_vm
    first_beat=1
    more_beats 3 "running"
    reset_loop
    stop_vm "stop"
}

# step_end ACTION WORD: the guest runs ACTION -f after beat 3; vmhop must
# exit 0 by itself and print WORD.
step_end() {
    boot_vm "vmhop.action=$1-after=3"
    first_beat=1
    t=0
    while kill -0 "$vm_pid" 2>/dev/null; do
        check_console "$1"
        t=$((t + 1))
        [ "$t" -le "$EXIT_DEADLINE" ] ||
            fail "$1: vmhop still running ${EXIT_DEADLINE}s after the first beat (last beat $(last_beat))"
        sleep 1
    done
    check_console "$1"
    console | grep -q "vmhop-check: action $1 after beat 3" ||
        fail "$1: vmhop exited but the guest never ran $1 -f (last beat $(last_beat))"
    check_consecutive 1 "$1"
    say "ok: $1: the guest ran $1 -f after beat 3"
    wait_exit "$1"
    say "ok: $1: vmhop exited 0 by itself"
    if ! cat "$out" "$err" | grep -qi "$2"; then
        fail "$1: vmhop's output does not say '$2'"
    fi
    say "ok: $1: vmhop says: $(cat "$out" "$err" | grep -i -m 1 "$2")"
}

# take_checkpoint KIND WHAT: a checkpoint of kind KIND; sets ck_id, ck_before
# (last beat before it) and ck_after (last beat once it returned).
take_checkpoint() {
    ck_before="$(last_beat)"
    full=""
    [ "$1" = full ] && full="--full"
    report="$(cli "$2" checkpoint --dir "$ckdir" $full)"
    ck_after="$(last_beat)"
    say "$2: $report"
    kind="$(json_str kind "$report")"
    [ "$kind" = "$1" ] || fail "$2: report kind is '$kind', not $1"
    ck_id="$(json_num id "$report")"
    [ -n "$ck_id" ] || fail "$2: report has no id"
    say "ok: $2: $kind checkpoint id $ck_id between beats $ck_before and $ck_after"
}

# restore_and_check ID BEFORE AFTER UP NAME: restores $ckdir@ID (lazily) as
# NAME; its first beat must be after BEFORE and at most AFTER+2, with uptime
# not below UP; 3 beats ok and consecutive; stop.
restore_and_check() {
    vsock_args=""
    if [ -n "$vsock_words" ]; then
        vsock_listen "$5"
        vsock_args="--vsock socket=$(vsock_sock "$5")"
    fi
    start "$5" "$VMHOP" restore "$ckdir@$1" --name "$5" $net_dst_args $vsock_args
    what="restore @$1"
    wait_beat 1 "$BOOT_DEADLINE" "$what"
    first_beat="$(beats | head -n 1)"
    say "$what: first beat: $(console | grep -m 1 'vmhop-check: beat')"
    [ "$first_beat" -gt "$2" ] ||
        fail "$what: first beat $first_beat is not after beat $2 (the count restarted: a reboot, not a restore)"
    [ "$first_beat" -le $(($3 + 2)) ] ||
        fail "$what: first beat $first_beat is past beat $(($3 + 2)) (checkpoint taken between beats $2 and $3)"
    say "ok: $what: the count continues at beat $first_beat (checkpoint between beats $2 and $3)"
    up="$(beat_up "$first_beat")"
    if [ -n "$4" ] && [ -n "$up" ]; then
        awk -v a="$up" -v b="$4" 'BEGIN { exit !(a + 0 >= b + 0) }' ||
            fail "$what: guest uptime went back from $4 s to $up s"
        say "ok: $what: guest uptime $4 s -> $up s"
    fi
    check_consecutive "$first_beat" "$what"
    more_beats 2 "$what"
    [ -z "$net_words" ] || fetch_www "$what" small
    [ -z "$vsock_words" ] || vsock_after_reset "$what"
    stop_vm "$what"
    [ -z "$vsock_words" ] || vsock_ended "$5" "$what"
}

step_checkpoint() {
    with_disks data-only
    with_net
    with_vsock
    boot_vm "$disk_words $net_words $vsock_words"
    first_beat=1
    check_disk_mounted
    check_net_up
    vsock_up "before the checkpoints"
    more_beats 1 "before the checkpoints"
    take_checkpoint full "full checkpoint"
    vsock_check "after the full checkpoint"
    id0="$ck_id" before0="$ck_before" after0="$ck_after" up0="$(beat_up "$ck_before")"
    wait_beat $((after0 + 3)) "$BEAT_DEADLINE" "after the full checkpoint"
    take_checkpoint incremental "incremental checkpoint"
    id1="$ck_id" before1="$ck_before" after1="$ck_after" up1="$(beat_up "$ck_before")"
    [ "$id1" != "$id0" ] || fail "incremental checkpoint: same id $id1 as the full one"
    vsock_check "after the incremental checkpoint"
    more_beats 1 "after the checkpoints"
    check_consecutive 1 "after the checkpoints"
    stop_vm "before restoring"
    vsock_ended lx "before restoring"
    "$VMHOP" checkpoints "$ckdir" 2>&1 | sed "s/^/$tag: checkpoints: /" || true
    restore_and_check "$id0" "$before0" "$after0" "$up0" r0
    restore_and_check "$id1" "$before1" "$after1" "$up1" r1
}

# check_before_moves WHAT: both guest nodes on their own host node.
check_before_moves() {
    stat="$(cli "$1" numa-stat)"
    say "numa-stat before: $stat"
    check_placement "$stat" 0 0 "$1"
    check_placement "$stat" 1 1 "$1"
}

# numa_move MODE TO WHAT: guest node 0 to host node TO in MODE; numa-stat
# then has it there (bind:TO, its vCPU on TO's CPUs) and guest node 1 still
# on host node 1; 3 more beats ok.
numa_move() {
    read -r move_start _ </proc/uptime
    report="$(cli "numa-migrate $1" numa-migrate --guest-node 0 --to-node "$2" --mode "$1")"
    say "numa-migrate report: $report"
    [ "$(json_str mode "$report")" = "$1" ] || fail "numa-migrate: report mode is not $1"
    check_console "numa-migrate $1"
    stat="$(cli "$3" numa-stat)"
    say "numa-stat after: $stat"
    check_placement "$stat" 0 "$2" "$3"
    check_placement "$stat" 1 1 "$3"
    check_vcpus "$stat" 0 "$2" "$3"
    more_beats 3 "$3"
    [ -z "$listener_pid" ] || {
        stream_check "$3"
        say "$3: the stream's longest standstill since the move began: $(stream_stall "$move_start") (emulated time)"
    }
    [ -z "$vsock_words" ] || vsock_check "$3"
}

step_numa() {
    boot_vm
    first_beat=1
    check_before_moves "before the move"
    numa_move "$1" 1 "after the move"
    stop_vm "stop"
}

# with_disks [data-only]: the next boot_vm gets the ext4 data disk and
# (unless data-only) the control disk.
with_disks() {
    for f in "$files/disk.img" "$fsck"; do
        [ -s "$f" ] || fail "disk: $f missing (pass it to run.sh as an extra file)"
    done
    cp "$files/disk.img" "$disk_img"
    vm_args="--disk path=$disk_img,id=data,serial=vmhop-data"
    disk_words="vmhop.disk=vmhop-data"
    if [ "${1:-}" != data-only ]; then
        dd if=/dev/zero of="$ctl_img" bs=4096 count=1 2>/dev/null
        vm_args="$vm_args --disk path=$ctl_img,id=ctl,serial=vmhop-ctl,readonly"
        disk_words="$disk_words vmhop.ctl=vmhop-ctl"
    fi
}

# check_disk_mounted: the guest loaded every module and mounted its disk.
check_disk_mounted() {
    mods="$(console | grep -m 1 'vmhop-guest: modules loaded=' || true)"
    [ -n "$mods" ] || fail "disk: the guest loaded no modules (is /lib/vmhop-modules in its initramfs?)"
    case "$mods" in *failed=*) fail "disk: $mods" ;; esac
    bad="$(console | grep -m 1 'vmhop-guest: .*disk .*FAIL' || true)"
    [ -z "$bad" ] || fail "disk: $bad"
    line="$(console | grep -m 1 'vmhop-guest: disk vmhop-data=' || true)"
    [ -n "$line" ] || fail "disk: the guest never mounted its data disk"
    say "ok: disk: ${line#*vmhop-guest: }"
}

# poweroff_by_ctl WHAT: "poweroff" on the control disk; the guest unmounts
# its disk and powers off, vmhop exits 0, e2fsck finds the disk clean.
poweroff_by_ctl() {
    printf 'poweroff' | dd of="$ctl_img" conv=notrunc 2>/dev/null
    t=0
    while kill -0 "$vm_pid" 2>/dev/null; do
        check_console "$1"
        t=$((t + 1))
        [ "$t" -le "$EXIT_DEADLINE" ] ||
            fail "$1: vmhop still running ${EXIT_DEADLINE}s after the control disk said poweroff (last beat $(last_beat))"
        sleep 1
    done
    check_console "$1"
    console | grep -q "vmhop-check: disk unmounted" ||
        fail "$1: vmhop exited but the guest never unmounted its disk (last beat $(last_beat))"
    wait_exit "$1"
    say "ok: $1: the guest unmounted its disk and powered off; vmhop exited 0"
    if ! fsck_out="$("$fsck" -fn "$disk_img" 2>&1)"; then
        printf '%s\n' "$fsck_out" | sed "s/^/$tag: fsck: /"
        fail "$1: e2fsck -fn $disk_img found problems"
    fi
    say "ok: $1: e2fsck -fn finds the disk clean: $(printf '%s\n' "$fsck_out" | tail -n 1)"
}

step_numa_moves() {
    with_disks
    with_net big stream
    with_vsock
    boot_vm "$disk_words $net_words $vsock_words"
    first_beat=1
    check_disk_mounted
    check_net_up
    vsock_up "before the moves"
    fetch_www "before the moves" big
    net_card "after the fetch"
    stream_check "before the moves"
    say "before the moves: the stream's longest standstill so far, without a move: $(stream_stall 0) (emulated time)"
    check_before_moves "before the moves"
    numa_move live 1 "after the live move"
    numa_move stop-copy 0 "after the stop-copy move"
    numa_move kernel 1 "after the kernel move"
    fetch_www "after the moves" small
    poweroff_by_ctl "poweroff"
}

step_migrate() {
    with_disks
    with_net stream
    with_vsock
    boot_vm "$disk_words $net_words $vsock_words"
    first_beat=1
    check_disk_mounted
    check_net_up
    vsock_up "before the migration"
    more_beats 1 "before the migration"
    stream_check "before the migration"
    say "before the migration: the stream's longest standstill so far, without a move: $(stream_stall 0) (emulated time)"
    src_pid="$vm_pid" src_err="$err"
    sock=/tmp/vmhop-migration.sock
    dst_disk=/tmp/dx-data.img dst_ctl=/tmp/dx-ctl.img
    rm -f "$dst_disk" "$dst_ctl"
    vsock_listen dx
    start dx "$VMHOP" run --name dx --incoming "unix:$sock" \
        --numa guest-node=0,host-node=1 --numa guest-node=1,host-node=0 $net_dst_args \
        --vsock "socket=$(vsock_sock dx)" \
        --disk "id=data,path=$dst_disk" --disk "id=ctl,path=$dst_ctl"
    t=0
    until "$VMHOP" status --name dx --json 2>/dev/null | grep -q '"incoming"'; do
        t=$((t + 1))
        [ "$t" -le "$EXIT_DEADLINE" ] || fail "migrate: the destination never waited ($(cat "$err"))"
        sleep 1
    done
    say "ok: migrate: the destination waits on unix:$sock"
    dst_con="$con"
    con=/tmp/lx.console
    mig_before="$(last_beat)"
    up_before="$(beat_up "$mig_before")"
    con="$dst_con"
    read -r mig_start _ </proc/uptime
    if ! report="$("$VMHOP" migrate --name lx --to "unix:$sock" --copy-storage --json 2>"$errf")"; then
        # diagnose shows the destination (the last VM started): the
        # source's side of the story first.
        {
            echo "$tag: --- source console /tmp/lx.console (last 40 lines) ---"
            tr -d '\r' </tmp/lx.console | tail -n 40 | sed 's/^/guest| /'
            echo "$tag: --- source stderr $src_err ---"
            cat "$src_err"
            echo "$tag: --- source status ---"
            "$VMHOP" status --name lx --json 2>&1 || true
        } >&2
        fail "migrate: vmhop migrate failed: $(cat "$errf")"
    fi
    mig_after="$(con=/tmp/lx.console; last_beat)"
    read -r mig_end _ </proc/uptime
    say "migrate report: $report"
    blocks="$(json_num disk_blocks_sent "$report")"
    [ "${blocks:-0}" -gt 0 ] || fail "migrate: --copy-storage sent no disk blocks: $report"
    say "ok: migrate: --copy-storage sent $blocks disk blocks"
    # The source process ends by itself once the VM runs there.
    t=0
    while kill -0 "$src_pid" 2>/dev/null; do
        t=$((t + 1))
        [ "$t" -le "$EXIT_DEADLINE" ] || fail "migrate: the source vmhop still runs after ${EXIT_DEADLINE}s"
        sleep 1
    done
    set +e
    wait "$src_pid"
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || fail "migrate: the source vmhop exited with $rc: $(cat "$src_err")"
    say "ok: migrate: the source vmhop exited 0"
    vsock_ended lx "migrate"
    what="on the destination"
    wait_beat 1 "$BEAT_DEADLINE" "$what"
    first_beat="$(beats | head -n 1)"
    [ "$first_beat" -gt "$mig_before" ] ||
        fail "$what: first beat $first_beat is not after beat $mig_before (the count restarted)"
    [ "$first_beat" -le $((mig_after + 2)) ] ||
        fail "$what: first beat $first_beat is past beat $((mig_after + 2))"
    say "ok: $what: the count continues at beat $first_beat (migrated between beats $mig_before and $mig_after)"
    up="$(beat_up "$first_beat")"
    if [ -n "$up_before" ] && [ -n "$up" ]; then
        awk -v a="$up" -v b="$up_before" 'BEGIN { exit !(a + 0 >= b + 0) }' ||
            fail "$what: guest uptime went back from $up_before s to $up s"
        say "ok: $what: guest uptime $up_before s -> $up s"
    fi
    dst_status="$(cli "$what" status)"
    case "$dst_status" in
    *"\"path\":\"$dst_disk\""*) ;;
    *) fail "$what: status does not name the copied data disk $dst_disk: $dst_status" ;;
    esac
    say "ok: $what: the disks are the copies $dst_disk and $dst_ctl"
    # From now on the control disk and the data disk e2fsck checks are the
    # destination's copies.
    disk_img="$dst_disk" ctl_img="$dst_ctl"
    more_beats 3 "$what"
    stream_check "$what"
    say "$what: the stream's longest standstill since the migration began: $(stream_stall "$mig_start") (migrate returned at box uptime $mig_end; emulated time)"
    fetch_www "$what" small
    net_card "$what"
    vsock_after_reset "$what"
    stat="$(cli "$what" numa-stat)"
    say "numa-stat there: $stat"
    check_placement "$stat" 0 1 "$what"
    check_placement "$stat" 1 0 "$what"
    poweroff_by_ctl "poweroff"
}

# --- the network ------------------------------------------------------------------

# net_setup: once a box, the bridge br0 with the box's address and the
# persistent TAPs tap0 and tap1 on it (busybox brctl and tunctl; the tun
# and bridge modules come from tests/numabox/init.sh).
net_setup() {
    [ -z "$(ip link show br0 2>/dev/null)" ] || return 0
    [ -c /dev/net/tun ] || fail "net: /dev/net/tun missing (did the box load tun.ko? run tests/numabox/setup.sh again)"
    ip link set lo up
    brctl addbr br0 2>"$errf" || fail "net: brctl addbr br0: $(cat "$errf") (did the box load bridge.ko?)"
    # No spanning tree (the kernel's default; busybox brctl cannot say
    # so), hence no forwarding delay on a port that comes up.
    echo 0 >/sys/class/net/br0/bridge/stp_state
    ip addr add "$BOX_IP/24" dev br0 || fail "net: ip addr add $BOX_IP/24 dev br0 failed"
    ip link set br0 up
    for t in tap0 tap1; do
        tunctl -t "$t" >/dev/null 2>"$errf" || fail "net: tunctl -t $t: $(cat "$errf")"
        brctl addif br0 "$t" || fail "net: brctl addif br0 $t failed"
        ip link set "$t" up
    done
    say "ok: net: bridge br0 ($BOX_IP/24) with tap0 and tap1"
}

# with_net [big] [stream]: the next boot_vm gets a card on tap0 and the
# guest an address and the small HTTP file; "big" adds the big one;
# "stream" also starts the box's listener (and a sampler of its byte count
# every 0.2 s, for stream_stall) and has the guest connect to it.
# Destinations and restored VMs get tap1.
with_net() {
    net_setup
    vm_args="$vm_args --net tap=tap0,mac=$GUEST_MAC,id=lan"
    net_dst_args="--net tap=tap1,id=lan"
    case " $* " in
    *" big "*) net_words="vmhop.net=$GUEST_IP/24 vmhop.www=$WWW_MB" ;;
    *) net_words="vmhop.net=$GUEST_IP/24 vmhop.www=0" ;;
    esac
    case " $* " in *" stream "*) ;; *) return 0 ;; esac
    : >"$stream_file"
    # busybox nc ends the connection when its stdin ends: give it one that
    # never does. $! is the pipeline's last process, nc itself.
    tail -f /dev/null | nc -l -p "$STREAM_PORT" >"$stream_file" 2>/tmp/stream.err &
    listener_pid=$!
    (
        while kill -0 "$listener_pid" 2>/dev/null; do
            read -r up _ </proc/uptime
            echo "$up $(stat -c %s "$stream_file")"
            sleep 0.2
        done
    ) >/tmp/stream.samples 2>/dev/null &
    sampler_pid=$!
    net_words="$net_words vmhop.stream=$BOX_IP:$STREAM_PORT"
}

# check_net_up: the guest configured eth0 and serves its file; keeps the
# file's sha256 (the guest's console says it once, at boot).
check_net_up() {
    bad="$(console | grep -m 1 'vmhop-guest: net FAIL' || true)"
    [ -z "$bad" ] || fail "net: $bad"
    line="$(console | grep -m 1 'vmhop-guest: net eth0 ' || true)"
    [ -n "$line" ] || fail "net: the guest never configured eth0"
    case "$line" in *" mac=$GUEST_MAC") ;; *) fail "net: eth0 has not the card's MAC $GUEST_MAC: $line" ;; esac
    say "ok: net: ${line#*vmhop-guest: }"
    small_sum="$(console | sed -n 's/.*vmhop-guest: net www \/small size_kb=64 sha256=\([0-9a-f]*\).*/\1/p' | head -n 1)"
    [ -n "$small_sum" ] || fail "net: the guest never said it serves /small"
    say "ok: net: the guest serves /small (64 KiB, sha256 $small_sum)"
    case "$net_words" in *"vmhop.www=0"*) return 0 ;; esac
    big_sum="$(console | sed -n 's/.*vmhop-guest: net www \/big size_mb=[0-9]* sha256=\([0-9a-f]*\).*/\1/p' | head -n 1)"
    [ -n "$big_sum" ] || fail "net: the guest never said it serves /big"
    say "ok: net: the guest serves /big ($WWW_MB MiB, sha256 $big_sum)"
}

# fetch_www WHAT small|big: the box fetches http://GUEST/small or /big;
# its size and sha256 must be the ones the guest made at boot.
fetch_www() {
    if [ "$2" = big ]; then
        want_size=$((WWW_MB * 1048576)) want_sum="$big_sum"
    else
        want_size=65536 want_sum="$small_sum"
    fi
    rm -f /tmp/www.got
    read -r t0 _ </proc/uptime
    if ! timeout 300 wget -q -O /tmp/www.got "http://$GUEST_IP/$2" 2>"$errf"; then
        fail "$1: wget http://$GUEST_IP/$2 failed: $(cat "$errf") ($(stat -c %s /tmp/www.got 2>/dev/null || echo 0) bytes)"
    fi
    read -r t1 _ </proc/uptime
    size="$(stat -c %s /tmp/www.got)"
    got="$(sha256sum /tmp/www.got)"
    got="${got%% *}"
    rm -f /tmp/www.got
    [ "$size" -eq "$want_size" ] || fail "$1: fetched $size bytes of /$2, not $want_size"
    [ "$got" = "$want_sum" ] || fail "$1: /$2 fetched with sha256 $got, the guest's is $want_sum"
    say "ok: $1: fetched http://$GUEST_IP/$2: $size bytes, sha256 as the guest's ($(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s emulated)"
}

# stream_check WHAT: the box's listener still holds the guest's one
# connection, has received more than at the last check, and every complete
# line so far is 1, 2, 3, ... in order.
stream_check() {
    t=0
    while :; do
        kill -0 "$listener_pid" 2>/dev/null ||
            fail "$1: the box's listener ended: the stream's connection closed after $(stat -c %s "$stream_file") bytes ($(cat /tmp/stream.err))"
        ended="$(console | grep -m 1 'vmhop-net: stream .* ended' || true)"
        [ -z "$ended" ] || fail "$1: the guest says: $ended"
        n="$(stat -c %s "$stream_file")"
        [ "$n" -le "$stream_seen" ] || break
        t=$((t + 1))
        [ "$t" -le "$BEAT_DEADLINE" ] || fail "$1: no new stream bytes within ${BEAT_DEADLINE}s (still $n)"
        sleep 1
    done
    head -c "$n" "$stream_file" >/tmp/stream.snap
    lines="$(tr -cd '\n' </tmp/stream.snap | wc -c)"
    [ "$lines" -gt 0 ] || fail "$1: $n stream bytes but not one whole line"
    seq 1 "$lines" >/tmp/stream.want
    want_bytes="$(stat -c %s /tmp/stream.want)"
    if ! head -c "$want_bytes" /tmp/stream.snap | cmp -s - /tmp/stream.want; then
        fail "$1: the stream's first $lines lines are not 1..$lines: $(head -c "$want_bytes" /tmp/stream.snap | cmp - /tmp/stream.want 2>&1 | head -n 1)"
    fi
    rm -f /tmp/stream.snap /tmp/stream.want
    say "ok: $1: the stream's one connection carries on: $n bytes (was $stream_seen), lines 1..$lines in order"
    stream_seen="$n"
}

# net_card WHAT: prints the watched VM's card as `status` has it (TAP,
# MAC, the offloads the guest turned on, the counters): for reading a
# slow or failed transfer, not checked.
net_card() {
    card="$("$VMHOP" status --name "$vm" --json 2>/dev/null | grep -o '"kind":"virtio-net"[^]]*' || true)"
    say "$1: the card: ${card:-(status has no virtio-net card)}"
}

# stream_stall FROM: the longest time the stream's byte count stood still
# since box uptime FROM (0: since its first byte), from the sampler's
# record (emulated time: a figure to report, never asserted).
stream_stall() {
    awk -v from="$1" '$1 >= from && $2 > 0 {
            if (n == "") { n = $2; last = $1; next }
            if ($2 > n) { if ($1 - last > max) { max = $1 - last; a = last; b = $1 }; n = $2; last = $1 }
        }
        END { printf "%.1f s (box uptime %.1f to %.1f)", max, a, b }' /tmp/stream.samples
}

# --- vsock ------------------------------------------------------------------------

# vsock_sock NAME: the vsock device's socket of VM NAME.
vsock_sock() {
    echo "$vsock_dir/$1.sock"
}

# with_vsock: the next boot_vm gets a virtio-vsock device (cid VSOCK_CID,
# socket vsock_sock lx) and the guest its listener and its client
# (vmhop.vsock=, tests/numabox/linux/guest-init.sh). The box has no
# compiler: it takes the same static vmhop-vsock out of the guest's
# initramfs. The box's echo server for the guest's client starts now
# (vsock_listen), before the guest can connect.
with_vsock() {
    mkdir -p "$vsock_dir" /tmp/vsock-tool
    chmod 700 "$vsock_dir"
    if [ ! -x "$vsock_tool" ]; then
        (cd /tmp/vsock-tool && zcat "$initrd" | cpio -i -d bin/vmhop-vsock) 2>"$errf" ||
            fail "vsock: taking bin/vmhop-vsock out of $initrd failed: $(cat "$errf")"
        [ -x "$vsock_tool" ] ||
            fail "vsock: $initrd has no bin/vmhop-vsock (tests/numabox/linux/build-guest-initrd.sh builds it)"
    fi
    vm_args="$vm_args --vsock cid=$VSOCK_CID,socket=$(vsock_sock lx)"
    vsock_words="vmhop.vsock=$VSOCK_PORT:$VSOCK_HOST_PORT"
    vsock_listen lx
}

# vsock_listen NAME: the box's checking echo server at the device's
# PATH_<VSOCK_HOST_PORT> of VM NAME, where its guest's client arrives;
# status in $vsock_dir/NAME.g2h, events in NAME.g2h.log.
vsock_listen() {
    "$vsock_tool" serve "unix:$(vsock_sock "$1")_$VSOCK_HOST_PORT" "$vsock_dir/$1.g2h" \
        >"$vsock_dir/$1.g2h.log" 2>&1 &
    vsock_pids="$vsock_pids $!"
}

# vsock_connect NAME: a box process connects to VM NAME's guest listener
# through the device's socket (Firecracker's CONNECT VSOCK_PORT) and
# exchanges checked rounds; status in $vsock_dir/NAME.h2g, events in
# NAME.h2g.log. It exits once its connection ends.
vsock_connect() {
    "$vsock_tool" client "unix:$(vsock_sock "$1"):$VSOCK_PORT" "$vsock_dir/$1.h2g" \
        >"$vsock_dir/$1.h2g.log" 2>&1 &
    vsock_pids="$vsock_pids $!"
}

# vsock_console_ok WHAT: no vsock failure on the watched VM's console, and
# no more ended guest connections than vsock_ends_ok.
vsock_console_ok() {
    bad="$(console | grep -m 1 'vmhop-guest: vsock FAIL\|vmhop-vsock: .*FAIL' || true)"
    [ -z "$bad" ] || fail "$1: vsock: the guest says: $bad"
    ends="$(console | grep -c 'vmhop-vsock: .* ended after' || true)"
    if [ "$ends" -gt "$vsock_ends_ok" ]; then
        fail "$1: vsock: a guest connection ended: $(console | grep 'vmhop-vsock: .* ended after' | tail -n 1)"
    fi
}

# vsock_wait_console WHAT PATTERN: the watched VM's console shows a line
# matching PATTERN (grep) within BEAT_DEADLINE; prints it.
vsock_wait_console() {
    t=0
    until line="$(console | grep -m 1 "$2")"; do
        bad="$(console | grep -m 1 'vmhop-guest: vsock FAIL\|vmhop-vsock: .*FAIL' || true)"
        [ -z "$bad" ] || fail "$1: vsock: the guest says: $bad"
        kill -0 "$vm_pid" 2>/dev/null || fail "$1: vsock: vmhop ($vm) exited"
        t=$((t + 1))
        [ "$t" -le "$BEAT_DEADLINE" ] || fail "$1: vsock: no '$2' on the guest console within ${BEAT_DEADLINE}s"
        sleep 1
    done
    printf '%s\n' "$line"
}

# vsock_one_conn WHAT FILE: FILE (a vmhop-vsock status) names exactly one
# connection, conn 1, still open; prints its bytes.
vsock_one_conn() {
    st="$(cat "$2" 2>/dev/null || true)"
    case "$st" in
    "conn=1 state=open bytes="*) ;;
    "") echo 0; return 0 ;;
    *) fail "$1: vsock: $2 says '$(printf '%s' "$st" | tr '\n' ';')', not one open connection ($(tail -n 3 "$2.log" 2>/dev/null | tr '\n' ';'))" ;;
    esac
    [ "$(printf '%s\n' "$st" | wc -l)" -eq 1 ] || fail "$1: vsock: $2 has more than one connection: $(tr '\n' ';' <"$2")"
    echo "${st#conn=1 state=open bytes=}"
}

# vsock_check WHAT: both vsock connections of the watched VM carry on —
# the box's to the guest's listener (NAME.h2g) and the guest's to the
# box (NAME.g2h): each the one connection its box end has had, open, with
# more checked bytes than at the last check — and the guest reports no
# failure and no connection ended.
vsock_check() {
    for dir in h2g g2h; do
        eval "seen=\$vsock_${dir}_seen"
        t=0
        while :; do
            vsock_console_ok "$1"
            bytes="$(vsock_one_conn "$1" "$vsock_dir/$vm.$dir")"
            [ "$bytes" -le "$seen" ] || break
            t=$((t + 1))
            [ "$t" -le "$BEAT_DEADLINE" ] ||
                fail "$1: vsock: no new checked bytes on $vm.$dir within ${BEAT_DEADLINE}s (still $bytes; $(tail -n 3 "$vsock_dir/$vm.$dir.log" | tr '\n' ';'))"
            sleep 1
        done
        eval "vsock_${dir}_seen=$bytes"
    done
    say "ok: $1: vsock: both connections carry on: box to guest port $VSOCK_PORT $vsock_h2g_seen bytes echoed and checked, guest to host port $VSOCK_HOST_PORT $vsock_g2h_seen bytes checked and echoed"
}

# vsock_up WHAT: after the first boot: the guest's listener runs and its
# client reached the box's server; the box connects to the listener; both
# connections carry checked bytes.
vsock_up() {
    line="$(vsock_wait_console "$1" 'vmhop-guest: vsock listening')"
    say "ok: $1: ${line#*vmhop-guest: }"
    vsock_wait_console "$1" "vmhop-vsock: serve vsock:$VSOCK_PORT: listening" >/dev/null
    vsock_connect "$vm"
    vsock_h2g_seen=0 vsock_g2h_seen=0 vsock_ends_ok=0
    vsock_check "$1"
}

# vsock_ended NAME WHAT: VM NAME's process is gone: the box's ends of both
# its connections must have ended (EOF or an error: never a hang) within
# EXIT_DEADLINE.
vsock_ended() {
    for dir in h2g g2h; do
        f="$vsock_dir/$1.$dir"
        t=0
        until grep -q '^conn=1 state=ended' "$f" 2>/dev/null; do
            t=$((t + 1))
            [ "$t" -le "$EXIT_DEADLINE" ] ||
                fail "$2: vsock: $1's connection ($f: $(tr '\n' ';' <"$f")) still open ${EXIT_DEADLINE}s after $1 ended: a hang"
            sleep 1
        done
        r="$(sed -n 's/^conn=1 state=ended bytes=\([0-9]*\) reason=\(.*\)/\2 after \1 bytes/p' "$f")"
        if [ "$dir" = h2g ]; then ended_h2g="$r"; else ended_g2h="$r"; fi
    done
    say "ok: $2: vsock: $1's connections ended at the box: box to guest: $ended_h2g; guest to box: $ended_g2h"
}

# vsock_after_reset WHAT: on a restored or migrated VM (the watched one,
# its box server started before it with vsock_listen): the guest's two
# connections from before were reset (its transport was), its client
# connected again to this VM's socket, a new box connection reaches its
# listener, and both carry checked bytes.
vsock_after_reset() {
    client_end="$(vsock_wait_console "$1" "vmhop-vsock: client vsock:2:$VSOCK_HOST_PORT: conn [0-9]* ended after")"
    server_end="$(vsock_wait_console "$1" "vmhop-vsock: serve vsock:$VSOCK_PORT: conn [0-9]* ended after")"
    say "ok: $1: vsock: the guest's connections from before were reset: ${client_end#*vmhop-vsock: }; ${server_end#*vmhop-vsock: }"
    vsock_ends_ok=2
    vsock_connect "$vm"
    vsock_h2g_seen=0 vsock_g2h_seen=0
    vsock_check "$1"
}

step_boot_loop() {
    n=0
    while [ "$n" -lt "${BOOT_LOOP:-20}" ]; do
        n=$((n + 1))
        say "boot-loop: boot $n"
        boot_vm
        stop_vm "boot-loop $n"
    done
}

say "kernel $kernel ($(wc -c <"$kernel" 2>/dev/null || echo missing) bytes), initrd $initrd ($(wc -c <"$initrd" 2>/dev/null || echo missing) bytes)"
say "guest command line: $cmdline"
case "$step" in
boot) step_boot ;;
poweroff) step_end poweroff "powered off" ;;
reboot) step_end reboot "rebooted" ;;
checkpoint) step_checkpoint ;;
numa-moves) step_numa_moves ;;
numa-*) step_numa "${step#numa-}" ;;
migrate) step_migrate ;;
boot-loop) step_boot_loop ;;
esac
say "ok: all checks passed"
