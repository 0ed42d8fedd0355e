//! A NUMA move that fails midway leaves the VM on its old memory: the chunks
//! already moved are moved back. The failure is injected with vmhop's test
//! hook (--test-hook numa-fail-chunk=K), since a node running out of memory
//! halfway cannot be arranged on a one-node host.

mod common;

use std::time::Duration;

use common::Vm;

#[test]
fn a_live_move_failing_midway_moves_the_moved_chunks_back_and_the_vm_runs_on() {
    let vm = Vm::start_command_env(
        &["run"],
        &[
            "--vcpus",
            "2",
            "--memory",
            "256M",
            "--guest",
            "builtin:dirty,rate=20000",
            "--test-hook",
            "numa-fail-chunk=3",
        ],
        &[],
    );
    let before = vm.wait_progress_above(1000, Duration::from_secs(10));
    let out = vm.cli(&["numa-migrate", "--to-node", "0", "--mode", "live"]);
    assert_eq!(
        out.code,
        Some(1),
        "the injected failure must fail the move\n{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains("3 chunk(s) already moved were moved back"),
        "the message must say what was undone\n{}",
        out.describe()
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    // The VM runs on, consistent, on its old node and policy.
    assert_eq!(vm.state(), "running");
    vm.wait_progress_above(before + 1000, Duration::from_secs(10));
    let v = vm.cli_ok(&["verify", "--json"]);
    assert!(v.stdout.contains("\"ok\":true"), "{}", v.describe());
    let stat = vm.cli_ok(&["numa-stat", "--json"]);
    assert!(
        stat.stdout.contains("\"policy\":\"bind:0\""),
        "{}",
        stat.describe()
    );
    // The same VM can still move: the hook only fails live moves, and a
    // stop-copy moves every chunk.
    let sc = vm.cli(&["numa-migrate", "--to-node", "0", "--mode", "stop-copy"]);
    assert_eq!(sc.code, Some(0), "{}", sc.describe());
    let v = vm.cli_ok(&["verify", "--json"]);
    assert!(v.stdout.contains("\"ok\":true"), "{}", v.describe());
}

/// The `vcpuN` threads of vmhop process `pid`: (name, allowed CPUs), sorted.
fn vcpu_threads(pid: u32) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = common::threads(pid)
        .into_iter()
        .filter(|(name, _)| name.starts_with("vcpu"))
        .collect();
    v.sort();
    v
}

/// Restricts thread `name` of process `pid` to `cpu` alone.
fn pin_thread(pid: u32, name: &str, cpu: usize) {
    let tid = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/<pid>/task")
        .flatten()
        .find(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .unwrap_or_else(|| panic!("vmhop {pid} has no thread {name}"));
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the set's capacity (CPU_SETSIZE) on any test host.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; the call only
    // changes the scheduling of thread `tid`.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity({tid}): {}",
        std::io::Error::last_os_error()
    );
}

/// A move whose memory already moved fails at `step` (the test hook
/// --test-hook numa-fail-finish=STEP): it must answer an error that says the move
/// was undone, and leave the VM as it was — running, consistent, on its old
/// policy, and with its vCPU threads on exactly their old CPUs (vCPU 0 is
/// first narrowed to CPU 0 alone, which a move to node 0 would widen to all
/// of node 0's CPUs).
fn a_move_failing_after_its_memory_moved_is_undone(step: &str, mode: &str) {
    let hook = format!("numa-fail-finish={step}");
    let vm = Vm::start(&[
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest",
        "builtin:dirty,rate=20000",
        "--test-hook",
        &hook,
    ]);
    let p = vm.wait_progress_above(1000, Duration::from_secs(10));
    pin_thread(vm.pid(), "vcpu0", 0);
    let cpus_before = vcpu_threads(vm.pid());
    assert_eq!(cpus_before[0].1, vec![0], "{cpus_before:?}");

    let out = vm.cli(&["numa-migrate", "--to-node", "0", "--mode", mode]);
    assert_eq!(
        out.code,
        Some(1),
        "the injected failure must fail the move\n{}",
        out.describe()
    );
    common::assert_one_line_error(&out, "a move failing after its memory moved");
    assert!(
        out.stderr
            .contains(&format!("injected failure in the {step} step")),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("the move was undone"),
        "the message must say the move was undone\n{}",
        out.describe()
    );
    assert_eq!(
        vcpu_threads(vm.pid()),
        cpus_before,
        "the vCPUs must be back on their old CPUs"
    );
    assert_eq!(vm.state(), "running");
    vm.wait_progress_above(p + 1000, Duration::from_secs(10));
    let v = vm.cli_ok(&["verify", "--json"]);
    assert!(v.stdout.contains("\"ok\":true"), "{}", v.describe());
    let stat = vm.cli_ok(&["numa-stat", "--json"]);
    assert!(
        stat.stdout.contains("\"policy\":\"bind:0\""),
        "{}",
        stat.describe()
    );
    let status = vm.status();
    assert_eq!(status["numa"][0]["host_node"], 0, "{status}");
}

#[test]
fn a_kernel_move_whose_policy_rebind_fails_is_undone() {
    a_move_failing_after_its_memory_moved_is_undone("policy", "kernel");
}

#[test]
fn a_live_move_whose_vcpu_repin_fails_is_undone_and_the_vcpus_keep_their_cpus() {
    a_move_failing_after_its_memory_moved_is_undone("repin", "live");
}

#[test]
fn a_stop_copy_move_whose_placement_query_fails_is_undone() {
    a_move_failing_after_its_memory_moved_is_undone("placement", "stop-copy");
}
