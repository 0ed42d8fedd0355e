//! `vmhop run` argument errors through the real binary: bad usage, values
//! out of range and things the user named that do not exist or cannot be
//! used all exit 2 (api::error's table) with a one-line message naming the
//! problem; never a panic, never a VM or socket left behind.

mod common;

use common::{assert_one_line_error, vmhop, CmdOutput};

/// Runs `vmhop run --api-socket <fresh path> ARGS`, asserts the exit code,
/// that nothing panicked and that no socket was left; returns the output.
fn run_fails(args: &[&str], code: i32) -> CmdOutput {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let mut all = vec!["run", "--api-socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = vmhop(&all);
    assert_eq!(out.code, Some(code), "vmhop {all:?}\n{}", out.describe());
    assert!(
        !out.stderr.contains("panicked"),
        "vmhop {all:?} panicked\n{}",
        out.describe()
    );
    assert!(!socket.exists(), "vmhop {all:?} left its socket behind");
    out
}

/// Bad usage: exit 2, one line on stderr that mentions every `needles`
/// (case-insensitively).
fn usage_error(args: &[&str], needles: &[&str]) {
    let out = run_fails(args, 2);
    assert_one_line_error(&out, &format!("{args:?}"));
    assert_mentions(&out, args, needles);
}

fn assert_mentions(out: &CmdOutput, args: &[&str], needles: &[&str]) {
    let msg = out.stderr.to_lowercase();
    for n in needles {
        assert!(
            msg.contains(&n.to_lowercase()),
            "{args:?}: message does not mention {n:?}\n{}",
            out.describe()
        );
    }
}

#[test]
fn zero_memory_is_a_usage_error() {
    usage_error(&["--memory", "0"], &["memory"]);
}

#[test]
fn memory_that_is_not_page_aligned_is_a_usage_error() {
    usage_error(&["--memory", "1000"], &["1000"]);
}

#[test]
fn memory_with_an_unknown_suffix_is_a_usage_error() {
    usage_error(&["--memory", "12Q"], &["12Q"]);
}

#[test]
fn zero_vcpus_is_a_usage_error() {
    usage_error(&["--vcpus", "0"], &["vcpus"]);
}

#[test]
fn unknown_builtin_guest_is_a_usage_error() {
    usage_error(&["--guest", "builtin:nope"], &["nope"]);
}

#[test]
fn unknown_dirty_guest_option_is_a_usage_error() {
    usage_error(&["--guest", "builtin:dirty,speed=3"], &["speed"]);
}

#[test]
fn numa_node_without_size_is_a_usage_error() {
    usage_error(&["--numa", "guest-node=0,host-node=0"], &["size"]);
}

#[test]
fn unknown_flag_is_a_usage_error() {
    // clap's standard rendering puts a usage hint after the error line, so
    // the first line must carry the message and name the flag.
    let out = run_fails(&["--bogus-flag"], 2);
    let first = out.stderr.lines().next().unwrap_or("");
    assert!(
        first.contains("--bogus-flag"),
        "first stderr line does not name the flag\n{}",
        out.describe()
    );
}

#[test]
fn memory_larger_than_the_host_is_the_request_s_to_change() {
    usage_error(&["--memory", "4096G"], &["memory"]);
}

#[test]
fn host_node_that_does_not_exist_is_the_request_s_to_change() {
    usage_error(
        &["--numa", "guest-node=0,size=64M,host-node=7"],
        &["node 7"],
    );
}

#[test]
fn memory_with_numa_must_equal_the_sum_of_the_numa_sizes() {
    usage_error(
        &["--memory", "512M", "--numa", "guest-node=0,size=256M"],
        &["512M", "256 MiB", "--numa"],
    );
}

#[test]
fn memory_with_numa_that_add_up_is_accepted() {
    let vm = common::Vm::start(&[
        "--memory",
        "128M",
        "--numa",
        "guest-node=0,size=64M",
        "--numa",
        "guest-node=1,size=64M",
    ]);
    assert_eq!(vm.status()["memory_bytes"], 128u64 << 20, "{}", vm.logs());
}
