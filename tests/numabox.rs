//! The NUMA box harness as cargo integration tests.
//!
//! Owns only the wiring from `cargo test` to the shell harness in
//! `tests/numabox/`: `setup.sh` (host packages, Debian kernel and KVM
//! modules, cached) runs once per test process, then each test boots one
//! scenario with `run.sh`. Booting, the initramfs and the static vmhop build
//! are the scripts' job; see `tests/numabox/README.md`.
//!
//! Nothing here skips: a host without QEMU, the kernel package or root
//! makes the test fail with the scripts' own error message, because a
//! silently skipped NUMA test would hide that placement went untested.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root (where `tests/numabox/` lives).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs one harness script (a path relative to the repository root) with
/// bash from the repository root, with extra environment, and returns its
/// captured output. Panics only if bash cannot be started at all.
fn run_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("bash")
        .arg(repo_root().join(script))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot start bash {script}: {e}"))
}

/// Both streams of a finished script, for assertions and failure messages.
fn combined(output: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `setup.sh` once for all tests in this process; every caller gets
/// the same verdict, so a broken host fails each test with the same message.
fn ensure_setup() {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = SETUP.get_or_init(|| {
        let setup = run_script("tests/numabox/setup.sh", &[], &[]);
        if setup.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tests/numabox/setup.sh failed ({}):\n{}",
                setup.status,
                combined(&setup)
            ))
        }
    });
    if let Err(message) = verdict {
        panic!("{message}");
    }
}

/// What vmhop logs when the builtin guest crashed by itself.
const GUEST_CRASH_IN_BOX: &str = "the guest shut down (triple fault)";

/// Boots the NUMA box with `scenario` (relative to the repository root),
/// passing `scenario_args` to it as words, and returns the console (run.sh's
/// stdout). Panics with the whole output unless the box reported PASS.
fn boot(scenario: &str, scenario_args: &str) -> String {
    ensure_setup();
    let boot_once = || {
        run_script(
            "tests/numabox/run.sh",
            &[scenario],
            &[("NUMABOX_SCENARIO_ARGS", scenario_args)],
        )
    };
    let mut run = boot_once();
    // Known and not yet understood: inside the box (kvm-amd on QEMU's
    // emulated SVM) the builtin guest now and then triple-faults on its own,
    // before any move, in roughly one boot in ten to twenty. That one
    // signature gets a single second boot, said out loud; any other
    // failure, or the same crash twice, fails the test.
    if !run.status.success() && String::from_utf8_lossy(&run.stdout).contains(GUEST_CRASH_IN_BOX) {
        eprintln!(
            "numabox: the guest crashed inside the box ({GUEST_CRASH_IN_BOX}); booting once more:\n{}",
            combined(&run)
        );
        run = boot_once();
    }
    assert!(
        run.status.success(),
        "tests/numabox/run.sh {scenario} (args {scenario_args:?}) failed ({}):\n{}",
        run.status,
        combined(&run)
    );
    String::from_utf8_lossy(&run.stdout).into_owned()
}

#[test]
fn numabox_smoke_boots_two_node_host_with_kvm() {
    let console = boot("tests/numabox/scenarios/smoke.sh", "");
    assert!(
        console.contains("/sys/devices/system/node/node1"),
        "the box's console never mentioned node1:\n{console}"
    );
}

/// The scenario that moves a builtin:dirty guest between the box's two
/// nodes (`MODE`) or checks the refusal to fill a full node (`MODE nomem`).
const NUMA_MIGRATE: &str = "tests/numabox/scenarios/numa_migrate.sh";

/// Boots the numa_migrate scenario with `args` and checks that it reached
/// its end and made the placement checks the brief names (the scenario
/// itself fails the box on any failed check).
fn numa_migrate_scenario(args: &str, expect: &[&str]) -> String {
    let console = boot(NUMA_MIGRATE, args);
    let tag = format!("numa-migrate[{args}]");
    for line in expect.iter().copied().chain(["ok: all checks passed"]) {
        assert!(
            console.contains(&format!("{tag}: {line}")),
            "the console never said {line:?}:\n{console}"
        );
    }
    console
}

/// What every successful move to node 1 and back must have printed.
const THERE_AND_BACK: &[&str] = &[
    "ok: to node 1: report placement_after:",
    "ok: to node 1: numa-stat:",
    "ok: to node 1: policy bind:1",
    "ok: to node 1: numa-stat allowed_cpus: 2 vCPU(s) on node 1's CPUs",
    "ok: to node 1: verify",
    "ok: back to node 0: report placement_after:",
    "ok: back to node 0: numa-stat:",
    "ok: back to node 0: policy bind:0",
    "ok: back to node 0: verify",
];

#[test]
fn numabox_live_move_to_node1_and_back() {
    numa_migrate_scenario("live", THERE_AND_BACK);
}

#[test]
fn numabox_stop_copy_move_to_node1_and_back() {
    numa_migrate_scenario("stop-copy", THERE_AND_BACK);
}

#[test]
fn numabox_kernel_move_to_node1_and_back() {
    numa_migrate_scenario("kernel", THERE_AND_BACK);
}

#[test]
fn numabox_move_to_node1_without_room_is_refused_and_vm_stays_on_node0() {
    numa_migrate_scenario(
        "live nomem",
        &[
            "ok: refused with exit 1 and one line",
            "ok: after the refused move: policy bind:0",
            "ok: after the refused move: numa-stat:",
            "ok: after the refused move: verify",
            "ok: to node 1 once it has room: numa-stat:",
        ],
    );
}
