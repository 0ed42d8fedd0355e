//! `vmhop balance` through the real binary on this one-node host: it finds
//! the VMs behind the sockets of a directory (and reports those that do not
//! answer), plans nothing for a VM already where its vCPUs run, holds one
//! lock per host, and refuses settings that make no sense. Moves between
//! real nodes, driven by balance, are the NUMA box's (`tests/numabox.rs`,
//! `numa_migrate.sh live nomem`); the planner's rules are unit-tested on
//! synthetic topologies (`src/balance`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{one_json_object, vmhop, Vm};

const VMHOP: &str = env!("CARGO_BIN_EXE_vmhop");

#[test]
fn a_dry_run_lists_every_vm_and_the_sockets_that_do_not_answer() {
    let vm = Vm::start(&["--guest", "builtin:dirty", "--memory", "64M"]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(vm.socket(), dir.path().join("web.sock")).expect("symlink");
    std::fs::write(dir.path().join("dead.sock"), b"").expect("dead socket file");
    std::fs::write(dir.path().join("notes.txt"), b"").expect("other file");
    let d = dir.path().to_str().expect("utf-8");
    let out = vmhop(&["balance", "--dry-run", "--json", "--socket-dir", d]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let round = one_json_object(&out.stdout);
    assert_eq!(round["operation"], "balance");
    assert_eq!(round["dry_run"], true);
    assert_eq!(round["vms"], serde_json::json!(["web"]), "{round}");
    let unreachable = round["unreachable"].as_array().expect("array");
    assert_eq!(unreachable.len(), 1, "{round}");
    assert!(
        unreachable[0]["socket"]
            .as_str()
            .is_some_and(|s| s.ends_with("dead.sock")),
        "{round}"
    );
    // One node: every guest node is where its vCPUs run.
    assert_eq!(round["plan"]["moves"], serde_json::json!([]), "{round}");
    assert_eq!(round["outcomes"], serde_json::json!([]), "{round}");
    let topo = vmhop(&["topology", "--json"]);
    let nodes = one_json_object(&topo.stdout)["nodes"]
        .as_array()
        .map(Vec::len);
    assert_eq!(round["nodes"].as_array().map(Vec::len), nodes);

    let text = vmhop(&["balance", "--socket-dir", d]);
    assert_eq!(text.code, Some(0), "{}", text.describe());
    assert!(text.stdout.contains("1 VM(s) (web)"), "{}", text.describe());
    assert!(
        text.stdout.contains("nothing to move"),
        "{}",
        text.describe()
    );
    assert!(text.stdout.contains("dead.sock"), "{}", text.describe());
    assert_eq!(vm.state(), "running");
}

#[test]
fn a_second_balance_on_the_same_host_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    let mut first = Command::new(VMHOP)
        .args(["balance", "--watch", "0.2", "--socket-dir", d])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start balance --watch");
    // The lock file appears once the first one holds it; a second process
    // must then be refused (polling, not timing: the bound only ends a hang).
    let lock = dir.path().join(".balance.lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        if lock.exists() {
            let out = vmhop(&["balance", "--dry-run", "--socket-dir", d]);
            if out.code != Some(0) {
                break out;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the second balance was never refused"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(second.code, Some(1), "{}", second.describe());
    assert!(
        second
            .stderr
            .contains("another vmhop balance runs on this host"),
        "{}",
        second.describe()
    );
    assert!(
        first.try_wait().expect("try_wait").is_none(),
        "the first one exited"
    );
    first.kill().expect("kill");
    first.wait().expect("wait");
    let after = vmhop(&["balance", "--dry-run", "--socket-dir", d]);
    assert_eq!(after.code, Some(0), "{}", after.describe());
}

#[test]
fn settings_that_make_no_sense_are_usage_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    for bad in [
        &["--watermark", "0"][..],
        &["--watermark", "80"],
        &["--max-mib-s", "0"],
        &["--max-mib-s", "-5"],
        &["--watch", "0"],
        &["--watch", "soon"],
        &["--mode", "teleport"],
    ] {
        let mut args = vec!["balance", "--dry-run", "--socket-dir", d];
        args.extend_from_slice(bad);
        let out = vmhop(&args);
        assert_eq!(out.code, Some(2), "{bad:?}: {}", out.describe());
        assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    }
}
