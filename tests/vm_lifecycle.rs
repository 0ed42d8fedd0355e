//! A VM's life through the real binary: start, progress, pause/resume,
//! verify (and its catching a host-side corruption), idling, pinning,
//! NUMA layout, huge pages, status fields and every way of stopping.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    cpu_time, memory_map, one_json_object, parse_cpu_list, parse_gpa, threads, Slot, Vm, MIB, PAGE,
    WORKING_SET_START,
};
use serde_json::Value;

/// Generous bound for a running guest to show progress (polling, not timing).
const PROGRESS_WAIT: Duration = Duration::from_secs(10);

/// A dirty guest's working-set pages for `memory_bytes` of guest memory.
fn working_set_pages(memory_bytes: u64) -> u64 {
    (memory_bytes - WORKING_SET_START) / PAGE
}

/// Runs `verify --json` and returns (exit code, report).
fn verify_json(vm: &Vm) -> (Option<i32>, Value) {
    let out = vm.cli(&["verify", "--json"]);
    assert!(
        !out.stderr.contains("panicked"),
        "verify panicked\n{}",
        out.describe()
    );
    (out.code, one_json_object(&out.stdout))
}

/// Asserts `verify` passes, with the report for the message.
fn assert_verifies(vm: &Vm) {
    let (code, report) = verify_json(vm);
    assert_eq!(code, Some(0), "verify failed: {report}\n{}", vm.logs());
    assert_eq!(report["ok"], Value::Bool(true), "verify report: {report}");
    assert!(
        report["pages_checked"].as_u64().unwrap_or(0) > 0,
        "verify checked no pages: {report}"
    );
}

/// The address inside the vmhop process that backs guest-physical `gpa`.
fn host_address(map: &[Slot], gpa: u64) -> u64 {
    let s = map
        .iter()
        .find(|s| s.gpa <= gpa && gpa < s.gpa + s.len)
        .unwrap_or_else(|| panic!("gpa {gpa:#x} is in no slot of debug.memory-map"));
    s.host_addr + (gpa - s.gpa)
}

/// Opens the vmhop process's memory for reading and writing (we are its
/// parent, so ptrace access is allowed).
fn process_memory(vm: &Vm) -> std::fs::File {
    let path = format!("/proc/{}/mem", vm.pid());
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"))
}

/// Violations of a verify report that name `gpa`.
fn violations_at(report: &Value, gpa: u64) -> usize {
    report["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("verify report has no violations list: {report}"))
        .iter()
        .filter(|v| parse_gpa(&v["gpa"]) == Some(gpa))
        .count()
}

/// Starts a 64 MiB, 2-vCPU dirty guest and waits until it has swept its
/// working set at least twice, so every page carries a counter and a tag.
fn dirty_vm_after_two_sweeps() -> Vm {
    let vm = Vm::start(&[
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest",
        "builtin:dirty",
    ]);
    vm.wait_progress_above(2 * working_set_pages(64 * MIB), PROGRESS_WAIT);
    vm
}

#[test]
fn dirty_guest_with_two_vcpus_makes_progress() {
    let vm = Vm::start(&[
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest",
        "builtin:dirty",
    ]);
    let first = vm.progress();
    let later = vm.wait_progress_above(first, PROGRESS_WAIT);
    assert!(later > first);
    assert_eq!(vm.state(), "running");
}

#[test]
fn pause_stops_the_guest_and_resume_restarts_it() {
    let vm = Vm::start(&[
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest",
        "builtin:dirty",
    ]);
    vm.wait_progress_above(0, PROGRESS_WAIT);

    vm.cli_ok(&["pause"]);
    let s = vm.status();
    assert_eq!(s["state"], "paused", "status after pause: {s}");
    let paused_at = s["guest"]["progress"].as_u64().expect("progress");
    thread::sleep(Duration::from_millis(300));
    let still = vm.progress();
    assert_eq!(still, paused_at, "progress moved while paused");
    assert_eq!(vm.state(), "paused");

    vm.cli_ok(&["resume"]);
    assert_eq!(vm.state(), "running");
    vm.wait_progress_above(still, PROGRESS_WAIT);
}

#[test]
fn verify_passes_on_a_running_dirty_guest_and_prints_one_json_object() {
    let vm = dirty_vm_after_two_sweeps();
    assert_verifies(&vm);

    let text = vm.cli(&["verify"]);
    assert_eq!(text.code, Some(0), "text verify\n{}", text.describe());

    // verify pauses only for the check: the guest runs on afterwards.
    assert_eq!(vm.state(), "running");
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
}

#[test]
fn verify_catches_a_counter_corrupted_from_the_host() {
    let vm = dirty_vm_after_two_sweeps();
    vm.cli_ok(&["pause"]);
    assert_verifies(&vm);

    // A page in the middle of vCPU 0's slice (the first half of the
    // working set): not the slice's first page, so a counter far above
    // its predecessor's must be reported at this very page.
    let target = WORKING_SET_START + (working_set_pages(64 * MIB) / 4) * PAGE;
    let map = memory_map(&vm);
    let mem = process_memory(&vm);
    let addr = host_address(&map, target);
    let mut page = [0u8; 16];
    mem.read_exact_at(&mut page, addr)
        .expect("read the page from /proc/<pid>/mem");
    let tag = u64::from_le_bytes(page[8..16].try_into().unwrap());
    assert_eq!(
        tag, target,
        "before corruption the page at {target:#x} should carry its own gpa as tag"
    );
    mem.write_all_at(&(1u64 << 62).to_le_bytes(), addr)
        .expect("write the counter into /proc/<pid>/mem");

    let (code, report) = verify_json(&vm);
    assert_eq!(
        code,
        Some(1),
        "verify must fail on a corrupted page: {report}"
    );
    assert_eq!(report["ok"], Value::Bool(false), "{report}");
    assert!(
        violations_at(&report, target) > 0,
        "no violation reported at {target:#x}: {report}"
    );

    let text = vm.cli(&["verify"]);
    assert_eq!(text.code, Some(1), "text verify\n{}", text.describe());
    assert!(
        format!("{}{}", text.stdout, text.stderr).contains(&format!("{target:#x}")),
        "text verify does not name {target:#x}\n{}",
        text.describe()
    );

    // verify of a paused VM leaves it paused.
    assert_eq!(vm.state(), "paused");
}

#[test]
fn verify_catches_two_pages_swapped_by_the_host() {
    let vm = dirty_vm_after_two_sweeps();
    vm.cli_ok(&["pause"]);

    // One page in the middle of each vCPU's half of the working set.
    let pages = working_set_pages(64 * MIB);
    let a = WORKING_SET_START + (pages / 4) * PAGE;
    let b = WORKING_SET_START + (3 * pages / 4) * PAGE;
    let map = memory_map(&vm);
    let mem = process_memory(&vm);
    let (ha, hb) = (host_address(&map, a), host_address(&map, b));
    let mut pa = vec![0u8; PAGE as usize];
    let mut pb = vec![0u8; PAGE as usize];
    mem.read_exact_at(&mut pa, ha).expect("read page a");
    mem.read_exact_at(&mut pb, hb).expect("read page b");
    mem.write_all_at(&pb, ha).expect("write page b over a");
    mem.write_all_at(&pa, hb).expect("write page a over b");

    let (code, report) = verify_json(&vm);
    assert_eq!(code, Some(1), "verify must fail on swapped pages: {report}");
    assert!(
        violations_at(&report, a) > 0,
        "no violation at {a:#x}: {report}"
    );
    assert!(
        violations_at(&report, b) > 0,
        "no violation at {b:#x}: {report}"
    );
}

#[test]
fn idle_guest_does_not_burn_a_cpu() {
    let vm = Vm::start(&["--memory", "64M", "--guest", "builtin:idle"]);
    assert_eq!(vm.state(), "running");
    let (cpu0, wall0) = (cpu_time(vm.pid()), Instant::now());
    thread::sleep(Duration::from_secs(1));
    let (cpu1, wall1) = (cpu_time(vm.pid()), Instant::now());
    let share = (cpu1 - cpu0).as_secs_f64() / (wall1 - wall0).as_secs_f64();
    assert!(
        share < 0.2,
        "idle VM used {:.0}% of a core over {:?}",
        share * 100.0,
        wall1 - wall0
    );
}

#[test]
fn paused_start_has_no_progress_until_resume() {
    let vm = Vm::start(&["--memory", "64M", "--guest", "builtin:dirty", "--paused"]);
    let s = vm.status();
    assert_eq!(s["state"], "paused", "{s}");
    assert_eq!(s["guest"]["progress"], 0, "{s}");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.progress(), 0, "a --paused guest ran");

    vm.cli_ok(&["resume"]);
    assert_eq!(vm.state(), "running");
    vm.wait_progress_above(0, PROGRESS_WAIT);
}

#[test]
fn vcpu_threads_are_pinned_to_their_host_nodes_cpus() {
    let node0 = std::fs::read_to_string("/sys/devices/system/node/node0/cpulist")
        .expect("read node0 cpulist");
    let node0 = parse_cpu_list(&node0);
    let vm = Vm::start(&[
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest",
        "builtin:dirty",
    ]);
    let all = threads(vm.pid());
    for name in ["vcpu0", "vcpu1"] {
        let (_, cpus) = all
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no thread named {name}; threads: {all:?}"));
        assert_eq!(
            cpus, &node0,
            "{name} may run on {cpus:?}, node 0 has {node0:?}"
        );
    }
}

#[test]
fn two_guest_nodes_on_one_host_node_show_in_status_and_verify() {
    let vm = Vm::start(&[
        "--numa",
        "guest-node=0,size=64M,host-node=0",
        "--numa",
        "guest-node=1,size=64M,host-node=0",
        "--guest",
        "builtin:dirty",
    ]);
    let s = vm.status();
    assert_eq!(s["memory_bytes"], 128 * MIB, "{s}");
    let numa = s["numa"]
        .as_array()
        .unwrap_or_else(|| panic!("status numa is not a list: {s}"));
    assert_eq!(numa.len(), 2, "{s}");
    for (i, n) in numa.iter().enumerate() {
        assert_eq!(n["guest_node"], i as u64, "{s}");
        assert_eq!(n["size_bytes"], 64 * MIB, "{s}");
        assert_eq!(n["host_node"], 0, "{s}");
    }
    vm.wait_progress_above(2 * working_set_pages(128 * MIB), PROGRESS_WAIT);
    assert_verifies(&vm);
}

/// Asserts that vmhop exited 0, removed its socket and did not panic.
fn assert_clean_exit(mut vm: Vm, how: &str) {
    let status = vm.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "after {how}: {status}\n{}",
        vm.logs()
    );
    assert!(
        !vm.socket().exists(),
        "after {how} the socket {} is still there",
        vm.socket().display()
    );
    assert!(
        !vm.stderr().contains("panicked"),
        "after {how}\n{}",
        vm.logs()
    );
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let vm = Vm::start(&["--memory", "64M", "--guest", "builtin:dirty"]);
    vm.signal(libc::SIGTERM);
    assert_clean_exit(vm, "SIGTERM");
}

#[test]
fn sigint_stops_the_vm_cleanly() {
    let vm = Vm::start(&["--memory", "64M", "--guest", "builtin:dirty"]);
    vm.signal(libc::SIGINT);
    assert_clean_exit(vm, "SIGINT");
}

#[test]
fn stop_command_stops_the_vm_cleanly() {
    let vm = Vm::start(&[
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest",
        "builtin:dirty",
    ]);
    vm.cli_ok(&["stop"]);
    assert_clean_exit(vm, "vmhop stop");
}

#[test]
fn api_socket_is_readable_and_writable_by_its_owner_only() {
    let vm = Vm::start(&["--memory", "64M"]);
    let mode = std::fs::metadata(vm.socket())
        .expect("stat the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode is {:o}", mode & 0o777);
}

#[test]
fn hugepage_backed_guest_runs_and_verifies() {
    let vm = Vm::start(&["--memory", "64M", "--hugepages", "--guest", "builtin:dirty"]);
    vm.wait_progress_above(2 * working_set_pages(64 * MIB), PROGRESS_WAIT);
    assert_verifies(&vm);
}

#[test]
fn status_json_has_the_contract_fields() {
    let vm = Vm::start(&[
        "--name",
        "fields",
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest",
        "builtin:dirty",
    ]);
    let out = vm.cli_ok(&["status", "--json"]);
    let s = one_json_object(&out.stdout);
    assert_eq!(s["name"], "fields", "{s}");
    assert!(
        matches!(s["state"].as_str(), Some("running" | "paused" | "stopped")),
        "{s}"
    );
    assert_eq!(s["vcpus"], 2, "{s}");
    assert_eq!(s["memory_bytes"], 64 * MIB, "{s}");
    assert_eq!(s["guest"]["kind"], "builtin:dirty", "{s}");
    assert!(s["guest"]["progress"].is_u64(), "{s}");
    assert!(s["numa"].is_array(), "{s}");
}
