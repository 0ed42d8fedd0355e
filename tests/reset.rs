//! `vmhop reset` through the real binary: a running builtin:dirty guest is
//! put back to a checkpoint in place, and its memory is then compared byte
//! for byte with a VM restored from the same checkpoint (both paused, read
//! through /proc/PID/mem); resets in a row rewrite only what the guest
//! wrote since; a reset after a NUMA move; a checkpoint of another VM, a
//! damaged checkpoint and a reset during a checkpoint are refused with the
//! VM running on untouched.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_one_line_error, index_of, memory_map, vmhop, CmdOutput, Vm};
use serde_json::Value;

/// Generous bound for a running guest to show progress (polling, not timing).
const PROGRESS_WAIT: Duration = Duration::from_secs(10);

/// Bound for a background event (a temp file appearing, a restore loading).
const EVENT_WAIT: Duration = Duration::from_secs(20);

/// Memory of the test VMs.
const SMALL: &str = "64M";

/// A rate-limited dirty guest: it keeps writing without outrunning a
/// checkpoint of a debug build.
const GUEST: &str = "builtin:dirty,rate=10000";

/// Pages the guest writes between a checkpoint and a reset.
const GUEST_WORK: u64 = 1000;

fn dirty_vm(memory: &str, guest: &str) -> Vm {
    let vm = Vm::start(&["--vcpus", "2", "--memory", memory, "--guest", guest]);
    vm.wait_progress_above(0, PROGRESS_WAIT);
    vm
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmhop-reset-")
        .tempdir()
        .expect("temp dir")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn target(dir: &Path, id: u64) -> String {
    format!("{}@{id}", dir.display())
}

fn one_json_object(out: &CmdOutput) -> Value {
    common::one_json_object_in(&out.stdout, &out.describe())
}

/// Checkpoints `vm` into `dir`; returns (progress just before, report).
fn checkpoint(vm: &Vm, dir: &Path) -> (u64, Value) {
    let before = vm.progress();
    let out = vm.cli_ok(&["checkpoint", "--dir", path_str(dir), "--json"]);
    (before, one_json_object(&out))
}

/// `vmhop reset --to DIR@ID --json`, which must succeed.
fn reset(vm: &Vm, to: &str) -> Value {
    let out = vm.cli_ok(&["reset", "--to", to, "--json"]);
    let r = one_json_object(&out);
    assert_eq!(r["operation"], "reset", "{r}");
    r
}

fn assert_verifies(vm: &Vm, what: &str) {
    let out = vm.cli_ok(&["verify", "--json"]);
    let r = one_json_object(&out);
    assert_eq!(r["ok"], true, "{what}: verify failed: {r}\n{}", vm.logs());
}

fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Every guest page of `vm` (paused), by guest-physical address, read
/// through /proc/PID/mem at the host addresses `debug.memory-map` gives.
fn guest_memory(vm: &Vm) -> Vec<(u64, Vec<u8>)> {
    let mem = std::fs::File::open(format!("/proc/{}/mem", vm.pid())).expect("open /proc/PID/mem");
    let mut slots = memory_map(vm);
    slots.sort_by_key(|s| s.gpa);
    slots
        .iter()
        .map(|s| {
            let mut buf = vec![0u8; s.len as usize];
            mem.read_exact_at(&mut buf, s.host_addr)
                .unwrap_or_else(|e| panic!("read guest {:#x}+{:#x}: {e}", s.gpa, s.len));
            (s.gpa, buf)
        })
        .collect()
}

/// Fails naming the first differing page unless `a` and `b` hold the same
/// guest memory.
fn assert_same_memory(a: &[(u64, Vec<u8>)], b: &[(u64, Vec<u8>)], what: &str) {
    let ranges = |m: &[(u64, Vec<u8>)]| m.iter().map(|(g, d)| (*g, d.len())).collect::<Vec<_>>();
    assert_eq!(ranges(a), ranges(b), "{what}: memory layouts differ");
    let mut differing = Vec::new();
    for ((gpa, x), (_, y)) in a.iter().zip(b) {
        for (i, (p, q)) in x.chunks(4096).zip(y.chunks(4096)).enumerate() {
            if p != q {
                differing.push(gpa + i as u64 * 4096);
            }
        }
    }
    assert!(
        differing.is_empty(),
        "{what}: {} pages differ, the first at guest {:#x}",
        differing.len(),
        differing[0]
    );
}

#[test]
fn a_reset_puts_memory_back_to_the_checkpoint_byte_for_byte() {
    let dir = tempdir();
    let vm = dirty_vm(SMALL, GUEST);
    let (before, ck) = checkpoint(&vm, dir.path());
    let after = vm.progress();
    assert_eq!(ck["id"], 1);
    vm.wait_progress_above(after + GUEST_WORK, PROGRESS_WAIT);
    // Paused, the reset leaves it paused: memory and progress hold still
    // for the comparison.
    vm.cli_ok(&["pause"]);
    let r = reset(&vm, &target(dir.path(), 1));
    assert_eq!(r["id"], 1, "{r}");
    assert_eq!(r["armed"], true, "the first reset arms: {r}");
    assert_eq!(r["dirty_source"], "dirty-log", "checkpointed as 1: {r}");
    assert!(r["pages_rewritten"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(vm.state(), "paused");
    let progress = vm.progress();
    assert!(
        (before..=after).contains(&progress),
        "progress after the reset is {progress}, the checkpoint was taken between {before} and {after}"
    );
    let restored = Vm::start_command(&["restore", &target(dir.path(), 1)], &["--paused"]);
    wait_for(EVENT_WAIT, "the restore to load", || {
        (restored.status()["loading"] == false).then_some(())
    });
    assert_eq!(restored.progress(), progress, "restore and reset disagree");
    assert_same_memory(
        &guest_memory(&vm),
        &guest_memory(&restored),
        "reset VM vs restored VM",
    );
    vm.cli_ok(&["resume"]);
    vm.wait_progress_above(progress + GUEST_WORK, PROGRESS_WAIT);
    assert_verifies(&vm, "after the reset");
}

#[test]
fn resets_in_a_row_rewrite_only_what_the_guest_wrote_since() {
    let dir = tempdir();
    let vm = dirty_vm(SMALL, GUEST);
    let (before, _) = checkpoint(&vm, dir.path());
    let after = vm.progress();
    let mut last = None;
    for round in 0..3 {
        vm.wait_progress_above(after + GUEST_WORK, PROGRESS_WAIT);
        let r = reset(&vm, &target(dir.path(), 1));
        assert_eq!(r["armed"], round == 0, "round {round}: {r}");
        assert_eq!(r["dirty_source"], "dirty-log", "round {round}: {r}");
        let (n, total) = (
            r["pages_rewritten"].as_u64().unwrap(),
            r["pages_total"].as_u64().unwrap(),
        );
        assert!(
            n > 0 && n < total / 2,
            "round {round}: {n} of {total} pages rewritten: {r}"
        );
        last = Some(n);
        // Back at the checkpoint: the guest starts again from its moment.
        let p = vm.progress();
        assert!(
            p >= before && p < after + GUEST_WORK,
            "round {round}: progress {p} after the reset, checkpoint between {before} and {after}"
        );
        assert_verifies(&vm, &format!("reset {round}"));
    }
    assert!(last.is_some());
    // After another checkpoint the VM no longer stands at 1: the next reset
    // to 1 compares memory, and rewrites what differs.
    checkpoint(&vm, dir.path());
    vm.wait_progress_above(after + GUEST_WORK, PROGRESS_WAIT);
    let r = reset(&vm, &target(dir.path(), 1));
    assert_eq!(r["dirty_source"], "compare", "{r}");
    assert_eq!(r["armed"], false, "{r}");
    assert!(r["pages_rewritten"].as_u64().unwrap() > 0, "{r}");
    assert_verifies(&vm, "reset after another checkpoint");
    // And the one after that counts from this reset again.
    vm.wait_progress_above(after + GUEST_WORK, PROGRESS_WAIT);
    let r = reset(&vm, &target(dir.path(), 1));
    assert_eq!(r["dirty_source"], "dirty-log", "{r}");
}

#[test]
fn a_reset_after_a_numa_move_restores_the_checkpoint() {
    let dir = tempdir();
    let vm = dirty_vm(SMALL, GUEST);
    let (before, _) = checkpoint(&vm, dir.path());
    let after = vm.progress();
    reset(&vm, &target(dir.path(), 1));
    vm.wait_progress_above(after + GUEST_WORK, PROGRESS_WAIT);
    vm.cli_ok(&["numa-migrate", "--to-node", "0", "--mode", "stop-copy"]);
    vm.wait_progress_above(after + GUEST_WORK * 2, PROGRESS_WAIT);
    vm.cli_ok(&["pause"]);
    let r = reset(&vm, &target(dir.path(), 1));
    assert_eq!(r["dirty_source"], "dirty-log", "{r}");
    assert_eq!(r["armed"], false, "{r}");
    let p = vm.progress();
    assert!(
        (before..=after).contains(&p),
        "progress {p} after the reset, checkpoint between {before} and {after}"
    );
    assert_verifies(&vm, "reset after a NUMA move");
    vm.cli_ok(&["resume"]);
    vm.wait_progress_above(p + GUEST_WORK, PROGRESS_WAIT);
}

#[test]
fn a_checkpoint_of_another_vm_is_refused_naming_what_differs() {
    let dir = tempdir();
    let other = dirty_vm(SMALL, GUEST);
    checkpoint(&other, dir.path());
    drop(other);
    let vm = dirty_vm("128M", GUEST);
    let p = vm.progress();
    let out = vm.cli(&["reset", "--to", &target(dir.path(), 1)]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert_one_line_error(&out, "reset to another VM's checkpoint");
    assert!(
        out.stderr.contains("another VM") && out.stderr.contains("memory"),
        "the refusal names what differs\n{}",
        out.describe()
    );
    let raw = vm.http(
        "PUT",
        "/api/v1/vm.reset",
        Some(&format!(r#"{{"to": "{}"}}"#, target(dir.path(), 1))),
    );
    assert_eq!(raw.status, 400, "{}", raw.body);
    assert_eq!(vm.state(), "running");
    vm.wait_progress_above(p + GUEST_WORK, PROGRESS_WAIT);
    assert_verifies(&vm, "after the refusal");
}

fn ckpt_file(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("ckpt-{id:06}.vmhop"))
}

#[test]
fn a_damaged_checkpoint_is_refused_before_the_vm_is_touched() {
    let dir = tempdir();
    let vm = dirty_vm(SMALL, GUEST);
    checkpoint(&vm, dir.path());
    damage_a_page(&ckpt_file(dir.path(), 1));
    vm.wait_progress_above(vm.progress() + GUEST_WORK, PROGRESS_WAIT);
    let p = vm.progress();
    let out = vm.cli(&["reset", "--to", &target(dir.path(), 1)]);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert_one_line_error(&out, "reset to a damaged checkpoint");
    assert!(
        out.stderr.contains("ckpt-000001.vmhop"),
        "the refusal names the file\n{}",
        out.describe()
    );
    // Not reset: the guest carries on from where it was.
    assert_eq!(vm.state(), "running");
    assert!(vm.progress() >= p, "the refused reset moved the guest back");
    vm.wait_progress_above(p + GUEST_WORK, PROGRESS_WAIT);
    assert_verifies(&vm, "after the refusal");
}

/// Flips a byte in the middle of a page stored in checkpoint `file`.
fn damage_a_page(file: &Path) {
    let live: Vec<_> = index_of(file)
        .into_iter()
        .filter(|e| e.2 & 1 == 0)
        .collect();
    let (_, offset, _) = live[live.len() / 2];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open for damage");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset + 2048).expect("read");
    b[0] ^= 0xff;
    f.write_all_at(&b, offset + 2048).expect("write");
}

/// The `.ckpt-*.tmp` file of `dir`, if one exists.
fn temp_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        (name.starts_with(".ckpt-") && name.ends_with(".tmp")).then(|| e.path())
    })
}

#[test]
fn a_reset_during_a_checkpoint_is_refused_with_409() {
    let first = tempdir();
    let dir = tempdir();
    let vm = dirty_vm("256M", "builtin:dirty,rate=2000,fill=random");
    checkpoint(&vm, first.path());
    let socket = vm.socket_str().to_string();
    let to = target(first.path(), 1);
    let (ck, cli, raw) = thread::scope(|s| {
        let ck = s.spawn(|| {
            vmhop(&[
                "checkpoint",
                "--api-socket",
                &socket,
                "--dir",
                path_str(dir.path()),
                "--full",
                "--json",
            ])
        });
        wait_for(EVENT_WAIT, "the checkpoint's temp file", || {
            temp_file(dir.path())
        });
        let cli = vm.cli(&["reset", "--to", &to]);
        let raw = vm.http(
            "PUT",
            "/api/v1/vm.reset",
            Some(&format!(r#"{{"to": "{to}"}}"#)),
        );
        assert!(
            temp_file(dir.path()).is_some(),
            "the checkpoint ended before the reset was refused: the test proves nothing"
        );
        (ck.join().expect("checkpoint thread"), cli, raw)
    });
    assert_eq!(ck.code, Some(0), "{}", ck.describe());
    assert_eq!(cli.code, Some(1), "{}", cli.describe());
    assert_one_line_error(&cli, "reset during a checkpoint");
    assert!(cli.stderr.contains("in progress"), "{}", cli.describe());
    assert_eq!(raw.status, 409, "{}", raw.body);
    // Once the checkpoint is done, the reset goes through.
    let r = reset(&vm, &to);
    assert_eq!(r["id"], 1, "{r}");
    assert_verifies(&vm, "after the reset");
}

#[test]
fn reset_base_arms_at_start_so_the_first_reset_uses_the_dirty_log() {
    let dir = tempdir();
    let vm = dirty_vm(SMALL, GUEST);
    checkpoint(&vm, dir.path());
    drop(vm);
    let to = target(dir.path(), 1);
    let restored = Vm::start_command(&["restore", &to], &["--reset-base", &to]);
    restored.wait_progress_above(0, PROGRESS_WAIT);
    let r = reset(&restored, &to);
    assert_eq!(r["armed"], false, "armed at start: {r}");
    assert_eq!(r["dirty_source"], "dirty-log", "restored from it: {r}");
    assert_verifies(&restored, "reset of a VM armed at start");
    // A base that is not this VM's is refused at start, naming what differs.
    let out = vmhop(&[
        "run",
        "--api-socket",
        path_str(&dir.path().join("other.sock")),
        "--memory",
        "128M",
        "--reset-base",
        &to,
    ]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("memory"), "{}", out.describe());
}

// ---- The reset device: resets the guest asks for ----

/// The reset guest's input buffer (docs/reset.md, `builtin:reset`).
const RESET_INPUT_ADDR: u64 = 0xa1000;

/// Guest-driven resets a test waits for: enough that a reset which left a
/// page dirty would be caught by the guest's own check many times over.
const GUEST_RESETS: u64 = 300;

/// Bound for the guest to reset itself `GUEST_RESETS` times (polling).
const RESET_LOOP_WAIT: Duration = Duration::from_secs(60);

/// `status.reset`, which must be there.
fn reset_status(vm: &Vm) -> Value {
    let s = vm.status();
    let r = s["reset"].clone();
    assert!(r.is_object(), "status has no reset part: {s}");
    r
}

fn counter(r: &Value, name: &str) -> u64 {
    r[name]
        .as_u64()
        .unwrap_or_else(|| panic!("status.reset has no {name}: {r}"))
}

/// Polls `status.reset` until `name` reaches `at_least`.
fn wait_counter(vm: &Vm, name: &str, at_least: u64) -> Value {
    let deadline = Instant::now() + RESET_LOOP_WAIT;
    loop {
        let s = vm.status();
        if let Some(n) = s["reset"][name].as_u64() {
            if n >= at_least {
                return s["reset"].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "status.reset.{name} did not reach {at_least} within {RESET_LOOP_WAIT:?}: {s}\n{}",
            vm.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `len` bytes of guest memory at `gpa` (within one slot), through
/// /proc/PID/mem.
fn read_guest(vm: &Vm, gpa: u64, len: usize) -> Vec<u8> {
    let slot = memory_map(vm)
        .into_iter()
        .find(|s| s.gpa <= gpa && gpa + len as u64 <= s.gpa + s.len)
        .unwrap_or_else(|| panic!("guest {gpa:#x} is in no slot"));
    let mem = std::fs::File::open(format!("/proc/{}/mem", vm.pid())).expect("open /proc/PID/mem");
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, slot.host_addr + (gpa - slot.gpa))
        .expect("read guest memory");
    buf
}

/// The input buffer's header (sequence, length) and its input bytes.
fn input_buffer(vm: &Vm) -> (u64, Vec<u8>) {
    let b = read_guest(vm, RESET_INPUT_ADDR, 4096);
    let seq = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let len = u64::from_le_bytes(b[8..16].try_into().unwrap()) as usize;
    assert!(len <= 4096 - 16, "input length {len} past the buffer");
    (seq, b[16..16 + len].to_vec())
}

/// With the VM paused: the resets done and the input buffer, read when no
/// reset went by meanwhile (a request the guest made just before the
/// pause may still be served, paused).
fn paused_input(vm: &Vm) -> (u64, u64, Vec<u8>) {
    loop {
        let before = counter(&reset_status(vm), "resets");
        let (seq, bytes) = input_buffer(vm);
        if counter(&reset_status(vm), "resets") == before {
            return (before, seq, bytes);
        }
    }
}

/// Checks the guest's own verdicts: it checked after (nearly) every reset
/// and never found a page the reset left as the guest had dirtied it.
fn assert_guest_checks_pass(r: &Value, what: &str) {
    let (resets, checks) = (counter(r, "guest_resets"), counter(r, "guest_checks"));
    assert!(
        checks + 2 >= resets && checks > 0,
        "{what}: the guest checked {checks} times in {resets} resets: {r}"
    );
    assert_eq!(counter(r, "guest_failed_checks"), 0, "{what}: {r}");
    assert_eq!(counter(r, "guest_wrong_pages"), 0, "{what}: {r}");
}

/// A reset guest, waiting to be armed, and its checkpoint 1 in `dir`.
fn reset_guest_with_checkpoint(dir: &Path, extra: &[&str]) -> Vm {
    let mut args = vec!["--memory", SMALL, "--guest", "builtin:reset,pages=64"];
    args.extend_from_slice(extra);
    let vm = Vm::start(&args);
    let (_, ck) = checkpoint(&vm, dir);
    assert_eq!(ck["id"], 1, "{ck}");
    vm
}

#[test]
fn a_guest_driven_reset_loop_puts_memory_back_every_time() {
    let dir = tempdir();
    let input = dir.path().join("input");
    std::fs::write(&input, b"first input").expect("write input");
    let vm = reset_guest_with_checkpoint(dir.path(), &["--reset-input", path_str(&input)]);
    // Unarmed, the guest waits: it does not poke the device.
    assert!(
        vm.status()["reset"].is_null(),
        "a guest waiting to be armed poked: {}",
        vm.status()
    );
    // Arming through the API is a reset too; from then on the guest loops.
    let r = reset(&vm, &target(dir.path(), 1));
    assert_eq!(r["armed"], true, "{r}");
    let r = wait_counter(&vm, "guest_resets", GUEST_RESETS);
    assert_guest_checks_pass(&r, "the loop");
    assert!(r["resets_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(counter(&r, "last_reset_us") > 0, "{r}");
    assert_eq!(counter(&r, "ignored_pokes"), 0, "{r}");
    assert_eq!(counter(&r, "input_errors"), 0, "{r}");
    assert_eq!(
        r["armed"].as_str(),
        Some(target(&dir.path().canonicalize().unwrap(), 1).as_str()),
        "{r}"
    );
    // Memory as the host sees it, paused at any moment: every page as at
    // the checkpoint but those of the iteration in progress.
    assert_verifies(&vm, "during the loop");
    // Every reset delivered the input file, read again at each reset.
    vm.cli_ok(&["pause"]);
    let (resets, seq, bytes) = paused_input(&vm);
    assert_eq!(seq, resets, "the buffer's sequence is the resets done");
    assert_eq!(bytes, b"first input");
    std::fs::write(&input, b"a second, longer input").expect("write input");
    vm.cli_ok(&["resume"]);
    wait_counter(
        &vm,
        "guest_resets",
        counter(&reset_status(&vm), "guest_resets") + 50,
    );
    vm.cli_ok(&["pause"]);
    let (_, _, bytes) = paused_input(&vm);
    assert_eq!(bytes, b"a second, longer input");
    vm.cli_ok(&["resume"]);
    // An input that cannot be read is counted, named, and the loop goes on.
    std::fs::remove_file(&input).expect("remove input");
    let r = wait_counter(&vm, "input_errors", 1);
    assert!(
        r["input_error"].as_str().unwrap_or("").contains("input"),
        "the error names the file: {r}"
    );
    let r = wait_counter(&vm, "guest_resets", counter(&r, "guest_resets") + 50);
    assert_guest_checks_pass(&r, "after the input went away");
    // The API keeps answering between the guest's resets: a checkpoint
    // (which waits for a reset in progress) and a verify.
    let later = tempdir();
    vm.cli_ok(&["checkpoint", "--dir", path_str(later.path()), "--json"]);
    assert_verifies(&vm, "after a checkpoint during the loop");
    let r = wait_counter(&vm, "guest_resets", counter(&r, "guest_resets") + 50);
    assert_guest_checks_pass(&r, "after a checkpoint during the loop");
    assert_eq!(vm.state(), "running");
}

#[test]
fn a_restore_armed_at_start_runs_the_guests_reset_loop_at_once() {
    let dir = tempdir();
    drop(reset_guest_with_checkpoint(dir.path(), &[]));
    let to = target(dir.path(), 1);
    let vm = Vm::start_command(&["restore", &to], &["--reset-base", &to]);
    let r = wait_counter(&vm, "guest_resets", GUEST_RESETS);
    assert_guest_checks_pass(&r, "restored with --reset-base");
    assert_verifies(&vm, "restored with --reset-base");
    // No input file: the header alone, an empty input.
    vm.cli_ok(&["pause"]);
    let (resets, seq, bytes) = paused_input(&vm);
    assert_eq!(seq, resets);
    assert!(bytes.is_empty(), "{bytes:?}");
}

#[test]
fn a_reset_device_poked_with_no_base_armed_ignores_the_poke_and_counts_it() {
    let vm = Vm::start(&[
        "--memory",
        SMALL,
        "--guest",
        "builtin:reset,pages=16,poke=always",
    ]);
    let r = wait_counter(&vm, "ignored_pokes", 100);
    assert_eq!(counter(&r, "resets"), 0, "{r}");
    assert!(r["armed"].is_null(), "{r}");
    assert_eq!(vm.state(), "running");
    // Never reset, its pages are those of its first iteration, again and
    // again: consistent.
    assert_verifies(&vm, "after ignored pokes");
}

#[test]
fn refused_resets_leave_the_guests_loop_on_its_armed_base() {
    let dir = tempdir();
    let vm = reset_guest_with_checkpoint(dir.path(), &[]);
    reset(&vm, &target(dir.path(), 1));
    let r = wait_counter(&vm, "guest_resets", 100);
    let armed = r["armed"].clone();
    // A checkpoint of this VM taken during the loop, then damaged.
    let damaged = tempdir();
    checkpoint(&vm, damaged.path());
    damage_a_page(&ckpt_file(damaged.path(), 1));
    let out = vm.cli(&["reset", "--to", &target(damaged.path(), 1)]);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert_one_line_error(&out, "reset to a damaged checkpoint during the loop");
    assert!(
        out.stderr.contains("ckpt-000001.vmhop"),
        "{}",
        out.describe()
    );
    // A checkpoint of another VM: refused, naming what differs.
    let foreign = tempdir();
    {
        let other = Vm::start(&["--memory", "128M", "--guest", "builtin:reset,pages=64"]);
        checkpoint(&other, foreign.path());
    }
    let out = vm.cli(&["reset", "--to", &target(foreign.path(), 1)]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("another VM") && out.stderr.contains("memory"),
        "{}",
        out.describe()
    );
    // The guest loops on, on the base armed before, every reset checked.
    let r = wait_counter(&vm, "guest_resets", counter(&r, "guest_resets") + 100);
    assert_eq!(r["armed"], armed, "a refused reset changed the base: {r}");
    assert_guest_checks_pass(&r, "after the refusals");
    assert_eq!(vm.state(), "running");
    assert_verifies(&vm, "after the refusals");
}
