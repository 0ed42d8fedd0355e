//! The guest's own stall figure: builtin:dirty times the gap between two
//! pages it writes with the TSC, and `status` and the operations' reports
//! give the longest. Checked against stalls of known length: a user pause
//! (bounded below by the sleep between pause and resume, above by the
//! time from sending pause to resume returning) and the pause a stop-copy
//! NUMA move reports itself.

mod common;

use std::time::{Duration, Instant};

use common::{one_json_object, Vm};

const PROGRESS_WAIT: Duration = Duration::from_secs(15);

fn stall(vm: &Vm) -> u64 {
    let s = vm.status();
    s["guest"]["longest_stall_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no guest.longest_stall_us: {s}"))
}

#[test]
fn a_pause_of_known_length_shows_as_the_guests_longest_stall() {
    pause_shows_as_stall("builtin:dirty");
}

/// A paced guest spends most of its time held by PACE: a pause that lands
/// there must still show (the guest moves its stamp by the hold PACE
/// meant, not by the time PACE took).
#[test]
fn a_pause_of_known_length_shows_as_the_stall_of_a_paced_guest_too() {
    pause_shows_as_stall("builtin:dirty,rate=1000");
}

fn pause_shows_as_stall(guest: &str) {
    let vm = Vm::start(&["--guest", guest, "--memory", "64M", "--vcpus", "2"]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let before = stall(&vm);
    assert!(
        before < 300_000,
        "the guest saw a 300 ms stall before any pause: {before} µs"
    );
    let t0 = Instant::now();
    vm.cli_ok(&["pause"]);
    std::thread::sleep(Duration::from_millis(300));
    vm.cli_ok(&["resume"]);
    let bound = t0.elapsed();
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let after = stall(&vm);
    assert!(
        after >= 300_000,
        "a 300 ms pause shows as a {after} µs stall"
    );
    assert!(
        after <= bound.as_micros() as u64 + 2_000,
        "the stall ({after} µs) is longer than pause-to-resume ({bound:?})"
    );
}

#[test]
fn a_numa_moves_report_gives_the_stall_the_guest_felt_at_least_its_pause() {
    let vm = Vm::start(&[
        "--guest",
        "builtin:dirty",
        "--memory",
        "64M",
        "--vcpus",
        "2",
    ]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let out = vm.cli_ok(&[
        "numa-migrate",
        "--to-node",
        "0",
        "--mode",
        "stop-copy",
        "--json",
    ]);
    let r = one_json_object(&out.stdout);
    let downtime = r["downtime_us"].as_u64().expect("downtime_us");
    let felt = r["guest_stall_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("no guest_stall_us in {r}"));
    // The guest's gap spans the whole pause; 2% for the TSC rate's rounding.
    assert!(
        felt * 102 / 100 >= downtime,
        "the guest felt {felt} µs, the move paused it {downtime} µs: {r}"
    );
    // status keeps the longest since the start, the move's included.
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    assert!(stall(&vm) >= felt);
    let ck = tempfile::tempdir().expect("tempdir");
    let out = vm.cli_ok(&[
        "checkpoint",
        "--dir",
        ck.path().to_str().expect("utf-8"),
        "--json",
    ]);
    let r = one_json_object(&out.stdout);
    let felt = r["guest_stall_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("no guest_stall_us in {r}"));
    let downtime = r["downtime_us"].as_u64().expect("downtime_us");
    assert!(
        felt * 102 / 100 >= downtime,
        "{felt} µs felt, {downtime} µs paused: {r}"
    );
}

/// A pause that saves the vCPUs' state (a checkpoint's) ends a paced
/// vCPU's hold early, so the guest runs on before the hold PACE reported:
/// it is ahead of its pace, and no stall. The guest once took the
/// negative gap for an enormous one (u64 wrap-around: 7.1e12 µs).
#[test]
fn a_hold_ended_early_by_a_pause_is_no_stall_at_all() {
    // 50 pages/s per vCPU: every page is followed by a 20 ms hold, so each
    // checkpoint's pause lands in one and ends it.
    let vm = Vm::start(&[
        "--guest",
        "builtin:dirty,rate=100",
        "--memory",
        "64M",
        "--vcpus",
        "2",
    ]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let ck = tempfile::tempdir().expect("tempdir");
    for _ in 0..5 {
        vm.cli_ok(&["checkpoint", "--dir", ck.path().to_str().expect("utf-8")]);
        let p = vm.progress();
        vm.wait_progress_above(p, PROGRESS_WAIT);
    }
    let felt = stall(&vm);
    assert!(
        felt < 10_000_000,
        "the guest reports a {felt} µs stall after five checkpoints that each paused it for \
         milliseconds"
    );
}
