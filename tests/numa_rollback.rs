//! A NUMA move that fails midway leaves the VM on its old memory: the chunks
//! already moved are moved back. The failure is injected with vmhop's test
//! hook (VMHOP_TEST_FAIL_NUMA_CHUNK), since a node running out of memory
//! halfway cannot be arranged on a one-node host.

mod common;

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
        ],
        &[("VMHOP_TEST_FAIL_NUMA_CHUNK", "3")],
    );
    let before = vm.wait_progress_above(1000, std::time::Duration::from_secs(10));
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
    vm.wait_progress_above(before + 1000, std::time::Duration::from_secs(10));
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
