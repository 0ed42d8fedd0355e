//! NUMA moves and placement through the real binary, on this one-node host:
//! `numa-migrate` in each mode (live, stop-copy, kernel) re-homes a running
//! builtin:dirty guest onto host node 0, one guest node out of two, a paused
//! VM, the bounded stop-copy fallback of a live move that cannot converge,
//! every refusal (unknown node, unknown guest node, bad mode, a second
//! operation), and `numa-stat`.
//!
//! Owns only what a single-node host can prove: every move here has node 0
//! as both source and target, so placement is checked for "all present
//! pages on node 0" and for the new memory actually being switched in
//! (slot host addresses change in the copy modes). Moves between real nodes
//! are the NUMA box's job (`tests/numabox.rs`, `scenarios/numa_migrate.sh`),
//! as is a target node without enough free memory, which cannot be made on
//! one node without exhausting the machine.
//!
//! Nothing here asserts a timing: budgets and downtimes are only checked
//! for consistency with each other (longest pause ≤ all pauses ≤ total).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::Duration;

use common::{
    assert_one_line_error, memory_map, one_json_object, parse_cpu_list, vmhop, CmdOutput, Slot, Vm,
    MIB, PAGE,
};
use serde_json::Value;

/// Generous bound for a running guest to show progress (polling, not timing).
const PROGRESS_WAIT: Duration = Duration::from_secs(15);

/// The default chunk (one KVM slot, the unit of a live move).
const DEFAULT_CHUNK: u64 = 32 * MIB;

/// Starts a builtin:dirty VM with 2 vCPUs and the extra `run` arguments.
/// `guest` adds options to builtin:dirty (e.g. ",rate=20000").
fn dirty_vm(guest_opts: &str, extra: &[&str]) -> Vm {
    let guest = format!("builtin:dirty{guest_opts}");
    let mut args = vec!["--vcpus", "2", "--guest", guest.as_str()];
    args.extend_from_slice(extra);
    Vm::start(&args)
}

/// The CPUs of host node `node`, from `vmhop topology --json`.
fn host_node_cpus(node: u64) -> Vec<u32> {
    let out = vmhop(&["topology", "--json"]);
    assert_eq!(out.code, Some(0), "topology failed\n{}", out.describe());
    let topo = one_json_object(&out.stdout);
    let nodes = topo["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("topology has no nodes list: {topo}"));
    let n = nodes
        .iter()
        .find(|n| n["id"].as_u64() == Some(node))
        .unwrap_or_else(|| panic!("topology has no node {node}: {topo}"));
    let mut cpus: Vec<u32> = n["cpus"]
        .as_array()
        .unwrap_or_else(|| panic!("node {node} has no cpus list: {topo}"))
        .iter()
        .map(|c| c.as_u64().expect("cpu id") as u32)
        .collect();
    cpus.sort_unstable();
    assert!(!cpus.is_empty(), "node {node} has no CPUs: {topo}");
    cpus
}

/// Runs `numa-migrate ARGS --json` and returns the report; panics unless it
/// exits 0 with exactly one JSON object on stdout.
fn migrate(vm: &Vm, args: &[&str]) -> Value {
    let mut all = vec!["numa-migrate"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = vm.cli_ok(&all);
    let report = one_json_object(&out.stdout);
    assert_eq!(
        report["operation"], "numa-migrate",
        "report of {args:?}: {report}"
    );
    report
}

/// `numa-stat --json`, parsed.
fn numa_stat(vm: &Vm) -> Value {
    let out = vm.cli_ok(&["numa-stat", "--json"]);
    one_json_object(&out.stdout)
}

/// Asserts `verify --json` exits 0 with ok=true and some pages checked.
fn assert_verifies(vm: &Vm, when: &str) {
    let out = vm.cli(&["verify", "--json"]);
    assert!(
        !out.stderr.contains("panicked"),
        "verify {when} panicked\n{}",
        out.describe()
    );
    let report = one_json_object(&out.stdout);
    assert_eq!(
        out.code,
        Some(0),
        "verify {when} failed: {report}\n{}",
        vm.logs()
    );
    assert_eq!(report["ok"], true, "verify {when}: {report}");
    assert!(
        report["pages_checked"].as_u64().unwrap_or(0) > 0,
        "verify {when} checked no pages: {report}"
    );
}

/// Asserts the VM is running, its guest makes progress and its memory
/// verifies — what every failed or finished move must leave behind.
fn assert_still_running(vm: &Vm, when: &str) {
    assert_eq!(vm.state(), "running", "state {when}\n{}", vm.logs());
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    assert_verifies(vm, when);
    let q = vm.progress();
    vm.wait_progress_above(q, PROGRESS_WAIT);
}

/// A `{"<node>": pages}` map as numbers, with its keys checked.
fn pages_by_node(v: &Value, what: &str) -> BTreeMap<u64, u64> {
    v.as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {v}"))
        .iter()
        .map(|(k, n)| {
            (
                k.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{what} has a non-numeric node key {k:?}: {v}")),
                n.as_u64()
                    .unwrap_or_else(|| panic!("{what}[{k}] is not a page count: {v}")),
            )
        })
        .collect()
}

/// A report field as u64, or a panic naming it.
fn u64_field(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("report has no unsigned {field}: {report}"))
}

/// The vCPU ids `numa-stat` puts on guest node `g`.
fn vcpus_of_guest_node(stat: &Value, g: u64) -> BTreeSet<String> {
    stat["vcpus"]
        .as_array()
        .unwrap_or_else(|| panic!("numa-stat has no vcpus list: {stat}"))
        .iter()
        .filter(|v| v["guest_node"].as_u64() == Some(g))
        .map(|v| v["id"].as_u64().expect("vcpu id").to_string())
        .collect()
}

/// Checks what every successful move to host node 0 must report, whatever
/// the mode: the echo of the request, consistent pause figures, all pages
/// of the moved guest nodes on node 0 afterwards (measured by the kernel),
/// and the moved guest nodes' vCPUs allowed exactly node 0's CPUs.
/// `node_pages` is the moved guest nodes' size in pages; `moved_vcpus` the
/// vCPU ids on them.
fn assert_move_report(
    report: &Value,
    mode: &str,
    guest_nodes: &[u64],
    node_pages: u64,
    moved_vcpus: &BTreeSet<String>,
) {
    assert_eq!(report["mode"], mode, "{report}");
    assert_eq!(report["to_node"], 0, "{report}");
    let reported: Vec<u64> = report["guest_nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no guest_nodes list: {report}"))
        .iter()
        .map(|g| g.as_u64().expect("guest node id"))
        .collect();
    assert_eq!(reported, guest_nodes, "guest_nodes: {report}");

    let downtime = u64_field(report, "downtime_us");
    let paused_total = u64_field(report, "paused_total_us");
    let pauses = u64_field(report, "pauses");
    u64_field(report, "rounds");
    u64_field(report, "pages_moved");
    u64_field(report, "fallback_chunks");
    u64_field(report, "peak_extra_bytes");
    assert!(report["converged"].is_boolean(), "converged: {report}");
    let total_ms = report["total_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no total_ms: {report}"));
    assert!(
        downtime <= paused_total,
        "longest pause above all pauses together: {report}"
    );
    assert!(
        paused_total as f64 / 1e3 <= total_ms,
        "paused longer than the whole move took: {report}"
    );
    assert!(total_ms > 0.0, "total_ms: {report}");
    if pauses == 0 {
        assert_eq!(paused_total, 0, "no pause but paused time: {report}");
    }

    let before = pages_by_node(&report["placement_before"], "placement_before");
    let present_before: u64 = before.values().sum();
    assert!(
        present_before > 0 && present_before <= node_pages,
        "placement_before counts {present_before} pages of {node_pages}: {report}"
    );
    let after = pages_by_node(&report["placement_after"], "placement_after");
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        vec![0],
        "pages left off node 0 after the move: {report}"
    );
    let not_present = u64_field(report, "not_present_after");
    assert_eq!(
        after[&0] + not_present,
        node_pages,
        "placement_after plus not_present_after is not the moved nodes' size: {report}"
    );
    assert!(
        after[&0] >= present_before,
        "fewer pages present after the move than before: {report}"
    );

    let node0 = host_node_cpus(0);
    let vcpu_cpus = report["vcpu_cpus"]
        .as_object()
        .unwrap_or_else(|| panic!("no vcpu_cpus object: {report}"));
    let keys: BTreeSet<String> = vcpu_cpus.keys().cloned().collect();
    assert_eq!(&keys, moved_vcpus, "vcpu_cpus lists other vCPUs: {report}");
    for (id, list) in vcpu_cpus {
        let list = list
            .as_str()
            .unwrap_or_else(|| panic!("vcpu_cpus[{id}] is not a cpulist: {report}"));
        assert_eq!(
            parse_cpu_list(list),
            node0,
            "vCPU {id} may run on {list}, not node 0's CPUs: {report}"
        );
    }
}

/// Checks `numa-stat` for a VM whose every guest node is bound to host
/// node 0: policy bind:0, present pages only on node 0, exact counts, and
/// every vCPU allowed exactly node 0's CPUs.
fn assert_stat_on_node0(stat: &Value, sizes: &[u64]) {
    let nodes = stat["guest_nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("numa-stat has no guest_nodes: {stat}"));
    assert_eq!(nodes.len(), sizes.len(), "guest node count: {stat}");
    for (g, (n, &size)) in nodes.iter().zip(sizes).enumerate() {
        assert_eq!(n["guest_node"], g as u64, "{stat}");
        assert_eq!(n["size_bytes"], size, "{stat}");
        assert_eq!(n["policy"], "bind:0", "guest node {g} policy: {stat}");
        assert_eq!(
            n["sampled"], false,
            "a {size}-byte node should be counted, not sampled: {stat}"
        );
        let hosts = pages_by_node(&n["host_nodes"], "host_nodes");
        assert_eq!(
            hosts.keys().copied().collect::<Vec<_>>(),
            vec![0],
            "guest node {g} has pages off node 0 (or none): {stat}"
        );
        assert!(hosts[&0] > 0, "guest node {g} has no present page: {stat}");
        let not_present = n["not_present"]
            .as_u64()
            .unwrap_or_else(|| panic!("no not_present: {stat}"));
        assert_eq!(
            hosts[&0] + not_present,
            size / PAGE,
            "guest node {g}: present + not present is not its size: {stat}"
        );
    }
    let node0 = host_node_cpus(0);
    let vcpus = stat["vcpus"]
        .as_array()
        .unwrap_or_else(|| panic!("numa-stat has no vcpus: {stat}"));
    assert_eq!(vcpus.len(), 2, "vCPU count: {stat}");
    for v in vcpus {
        let list = v["allowed_cpus"]
            .as_str()
            .unwrap_or_else(|| panic!("vCPU without allowed_cpus: {stat}"));
        assert_eq!(parse_cpu_list(list), node0, "vCPU {v}: {stat}");
    }
    assert!(stat["query_ms"].as_f64().is_some(), "no query_ms: {stat}");
}

/// Polls `numa-stat` until every guest node has a present page (each vCPU
/// sweeps its own slice, and one may start later than the other); returns
/// that numa-stat. Bounded by `PROGRESS_WAIT`.
fn wait_every_guest_node_touched(vm: &Vm) -> Value {
    let deadline = std::time::Instant::now() + PROGRESS_WAIT;
    loop {
        let stat = numa_stat(vm);
        let touched = stat["guest_nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().all(|n| {
                n["host_nodes"]
                    .as_object()
                    .is_some_and(|h| h.values().any(|p| p.as_u64().unwrap_or(0) > 0))
            })
        });
        if touched {
            return stat;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a guest node never got a present page within {PROGRESS_WAIT:?}: {stat}\n{}",
            vm.logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Moves guest node 0 of a fresh 128 MiB VM to host node 0 in `mode` and
/// checks the report, placement, slots, the guest's memory and progress.
/// Returns the report and the slots before and after.
fn move_fresh_vm(mode: &str) -> (Value, Vec<Slot>, Vec<Slot>) {
    let vm = dirty_vm("", &["--memory", "128M"]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let stat = numa_stat(&vm);
    let slots_before = memory_map(&vm);
    let report = migrate(&vm, &["--to-node", "0", "--mode", mode]);
    assert_move_report(
        &report,
        mode,
        &[0],
        128 * MIB / PAGE,
        &vcpus_of_guest_node(&stat, 0),
    );
    let slots_after = memory_map(&vm);
    assert_stat_on_node0(&numa_stat(&vm), &[128 * MIB]);
    assert_still_running(&vm, &format!("after a {mode} move"));
    (report, slots_before, slots_after)
}

/// Asserts the move left the guest's memory layout (slots, their guest
/// nodes, addresses and sizes) as it was. The host address is not compared:
/// the copy modes move the new memory onto the old address with mremap.
fn assert_layout_kept(before: &[Slot], after: &[Slot], report: &Value) {
    let layout = |s: &[Slot]| -> Vec<(u64, u64, u64)> {
        s.iter().map(|s| (s.guest_node, s.gpa, s.len)).collect()
    };
    assert_eq!(
        layout(before),
        layout(after),
        "the move changed the guest memory layout: {report}"
    );
}

#[test]
fn live_move_to_node0_pauses_once_per_chunk_and_keeps_memory_consistent() {
    let (report, before, after) = move_fresh_vm("live");
    assert_layout_kept(&before, &after, &report);
    let chunks = before.iter().filter(|s| s.guest_node == 0).count() as u64;
    assert_eq!(chunks, 128 * MIB / DEFAULT_CHUNK, "default chunking");
    assert_eq!(
        u64_field(&report, "pauses"),
        chunks,
        "one pause per chunk: {report}"
    );
    assert_eq!(
        u64_field(&report, "peak_extra_bytes"),
        DEFAULT_CHUNK,
        "live holds one chunk extra at most: {report}"
    );
    assert!(
        u64_field(&report, "rounds") >= chunks,
        "at least one round per chunk: {report}"
    );
    let present: u64 = pages_by_node(&report["placement_before"], "placement_before")
        .values()
        .sum();
    assert!(
        u64_field(&report, "pages_moved") >= present,
        "a live move copies every present page at least once: {report}"
    );
    assert!(
        u64_field(&report, "fallback_chunks") <= chunks,
        "more fallbacks than chunks: {report}"
    );
    let over = u64_field(&report, "pauses_over_budget");
    assert!(
        over <= chunks,
        "more pauses over budget than chunks: {report}"
    );
    assert_eq!(
        u64_field(&report, "downtime_us") > u64_field(&report, "max_downtime_us"),
        over > 0,
        "a pause is over budget exactly when the longest is: {report}"
    );
    assert_eq!(
        report["converged"],
        u64_field(&report, "fallback_chunks") == 0 && over == 0,
        "converged must mean no fallback chunk and every real pause within budget: {report}"
    );
    assert!(report.get("batches").is_none() || report["batches"].is_null());
}

#[test]
fn stop_copy_move_to_node0_pauses_once_and_holds_the_whole_node_extra() {
    let (report, before, after) = move_fresh_vm("stop-copy");
    assert_layout_kept(&before, &after, &report);
    assert_eq!(u64_field(&report, "pauses"), 1, "{report}");
    assert_eq!(
        u64_field(&report, "downtime_us"),
        u64_field(&report, "paused_total_us"),
        "one pause: longest = total: {report}"
    );
    assert_eq!(
        u64_field(&report, "peak_extra_bytes"),
        128 * MIB,
        "stop-copy holds a second copy of the whole node: {report}"
    );
    let present: u64 = pages_by_node(&report["placement_before"], "placement_before")
        .values()
        .sum();
    assert!(
        u64_field(&report, "pages_moved") >= present,
        "stop-copy copies every present page: {report}"
    );
    assert_eq!(report["converged"], true, "{report}");
    assert_eq!(u64_field(&report, "fallback_chunks"), 0, "{report}");
}

#[test]
fn kernel_move_to_node0_never_pauses_and_reports_batches() {
    let (report, before, after) = move_fresh_vm("kernel");
    assert_layout_kept(&before, &after, &report);
    assert_eq!(u64_field(&report, "downtime_us"), 0, "{report}");
    assert_eq!(u64_field(&report, "paused_total_us"), 0, "{report}");
    assert_eq!(u64_field(&report, "pauses"), 0, "{report}");
    assert!(u64_field(&report, "pages_moved") > 0, "{report}");
    let b = &report["batches"];
    let count = b["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("kernel mode without batches.count: {report}"));
    let per = b["pages_per_batch"]
        .as_u64()
        .unwrap_or_else(|| panic!("no batches.pages_per_batch: {report}"));
    let median = b["median_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("no batches.median_us: {report}"));
    let max = b["max_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("no batches.max_us: {report}"));
    assert!(per > 0, "{report}");
    assert!(
        count >= (128 * MIB / PAGE).div_ceil(per),
        "too few move_pages batches to cover the node: {report}"
    );
    assert!(median <= max, "{report}");
}

#[test]
fn json_and_text_output_agree_on_a_move() {
    let vm = dirty_vm(",rate=50000", &["--memory", "128M"]);
    let out = vm.cli_ok(&["numa-migrate", "--to-node", "0", "--mode", "stop-copy"]);
    assert!(
        out.stdout.contains("node 0") && !out.stdout.trim_start().starts_with('{'),
        "text output of a move should be readable text:\n{}",
        out.describe()
    );
    assert!(
        out.stderr.trim().is_empty(),
        "a successful move printed on stderr:\n{}",
        out.describe()
    );
    assert_still_running(&vm, "after a text-mode move");
}

#[test]
fn moving_guest_node_1_leaves_guest_node_0_alone() {
    let vm = dirty_vm(
        "",
        &[
            "--numa",
            "guest-node=0,size=64M,host-node=0",
            "--numa",
            "guest-node=1,size=64M,host-node=0",
        ],
    );
    let stat = wait_every_guest_node_touched(&vm);
    assert_stat_on_node0(&stat, &[64 * MIB, 64 * MIB]);
    let node1_vcpus = vcpus_of_guest_node(&stat, 1);

    for mode in ["stop-copy", "live", "kernel"] {
        let before = memory_map(&vm);
        let report = migrate(
            &vm,
            &["--to-node", "0", "--guest-node", "1", "--mode", mode],
        );
        assert_move_report(&report, mode, &[1], 64 * MIB / PAGE, &node1_vcpus);
        let after = memory_map(&vm);
        assert_layout_kept(&before, &after, &report);
        let node1_chunks = before.iter().filter(|s| s.guest_node == 1).count() as u64;
        let moved = u64_field(&report, "pages_moved");
        match mode {
            "stop-copy" => {
                assert_eq!(
                    u64_field(&report, "peak_extra_bytes"),
                    64 * MIB,
                    "only guest node 1 is copied: {report}"
                );
                assert!(
                    moved > 0 && moved <= 64 * MIB / PAGE,
                    "stop-copy of guest node 1 copied more than its pages: {report}"
                );
            }
            "live" => {
                assert_eq!(
                    u64_field(&report, "pauses"),
                    node1_chunks,
                    "one pause per chunk of guest node 1: {report}"
                );
                assert_eq!(
                    u64_field(&report, "peak_extra_bytes"),
                    DEFAULT_CHUNK,
                    "{report}"
                );
            }
            _ => assert!(
                moved > 0 && moved <= 64 * MIB / PAGE,
                "the kernel moved more than guest node 1's pages: {report}"
            ),
        }
        assert_stat_on_node0(&numa_stat(&vm), &[64 * MIB, 64 * MIB]);
        assert_still_running(&vm, &format!("after a {mode} move of guest node 1"));
    }
}

#[test]
fn paused_vm_stays_paused_through_every_mode_and_verifies() {
    let vm = dirty_vm("", &["--memory", "128M"]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    vm.cli_ok(&["pause"]);
    assert_eq!(vm.state(), "paused");
    let frozen = vm.progress();
    let stat = numa_stat(&vm);
    for mode in ["live", "stop-copy", "kernel"] {
        let report = migrate(&vm, &["--to-node", "0", "--mode", mode]);
        assert_move_report(
            &report,
            mode,
            &[0],
            128 * MIB / PAGE,
            &vcpus_of_guest_node(&stat, 0),
        );
        assert_eq!(
            vm.state(),
            "paused",
            "a {mode} move resumed a paused VM: {report}"
        );
        assert_eq!(
            vm.progress(),
            frozen,
            "the guest ran during a {mode} move of a paused VM: {report}"
        );
        assert_verifies(&vm, &format!("after a {mode} move of a paused VM"));
        assert_eq!(vm.state(), "paused", "verify resumed a paused VM");
    }
    thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.progress(), frozen, "the paused guest ran");
    vm.cli_ok(&["resume"]);
    assert_still_running(&vm, "after resuming the moved VM");
}

/// Runs a refused `numa-migrate` and checks the VM is unharmed.
fn refused(vm: &Vm, args: &[&str], code: i32, expect: &[&str]) -> CmdOutput {
    let mut all = vec!["numa-migrate"];
    all.extend_from_slice(args);
    let out = vm.cli(&all);
    assert_eq!(
        out.code,
        Some(code),
        "numa-migrate {args:?} should exit {code}\n{}",
        out.describe()
    );
    assert!(
        out.stdout.trim().is_empty(),
        "a refused move printed on stdout\n{}",
        out.describe()
    );
    for e in expect {
        assert!(
            out.stderr.contains(e),
            "numa-migrate {args:?}: message should mention {e:?}\n{}",
            out.describe()
        );
    }
    assert!(
        !out.stderr.contains("panicked"),
        "numa-migrate {args:?} panicked\n{}",
        out.describe()
    );
    assert_still_running(vm, &format!("after the refused numa-migrate {args:?}"));
    assert_stat_on_node0(&numa_stat(vm), &[128 * MIB]);
    out
}

#[test]
fn refused_moves_exit_nonzero_with_one_line_and_leave_the_vm_running() {
    let vm = dirty_vm(",rate=50000", &["--memory", "128M"]);
    let slots = memory_map(&vm);

    // A node the user named that does not exist is theirs to change:
    // 404, exit 2 (api::error's table).
    let out = refused(
        &vm,
        &["--to-node", "7"],
        2,
        &["host node 7", "does not exist", "HTTP 404"],
    );
    assert_one_line_error(&out, "--to-node 7");
    let out = refused(
        &vm,
        &["--to-node", "7", "--json"],
        2,
        &["host node 7", "does not exist"],
    );
    assert_one_line_error(&out, "--to-node 7 --json");

    let out = refused(
        &vm,
        &["--to-node", "0", "--guest-node", "5"],
        2,
        &["guest node 5", "does not exist"],
    );
    assert_one_line_error(&out, "--guest-node 5");

    // A budget out of range: the VM's process refuses it (400), exit 2,
    // naming the bad value.
    refused(
        &vm,
        &["--to-node", "0", "--max-downtime-ms", "0"],
        2,
        &["above 0", "HTTP 400"],
    );
    // The API refuses the same budget itself (curl users get no clap).
    let r = vm.http(
        "PUT",
        "/api/v1/vm.numa-migrate",
        Some(r#"{"to_node":0,"max_downtime_ms":0}"#),
    );
    assert_eq!(r.status, 400, "a zero budget through the API: {}", r.body);
    assert!(r.body.contains("max_downtime_ms"), "{}", r.body);
    refused(&vm, &["--to-node", "0", "--mode", "bogus"], 2, &["bogus"]);
    refused(&vm, &["--to-node", "zero"], 2, &["zero"]);
    refused(&vm, &["--guest-node", "0"], 2, &["--to-node"]);

    assert_eq!(memory_map(&vm), slots, "a refused move touched the slots");
}

/// The outcome of a move racing another: (first, second).
fn race_two_moves(vm: &Vm) -> (CmdOutput, CmdOutput) {
    let socket = vm.socket_str().to_string();
    // A live move of a fast-dirtying 256 MiB guest under a 10 µs budget
    // iterates every chunk to its round limit: the longest move there is.
    let first = thread::spawn(move || {
        vmhop(&[
            "numa-migrate",
            "--to-node",
            "0",
            "--max-downtime-ms",
            "0.01",
            "--json",
            "--api-socket",
            &socket,
        ])
    });
    thread::sleep(Duration::from_millis(150));
    let second = vm.cli(&["numa-migrate", "--to-node", "0", "--mode", "stop-copy"]);
    (first.join().expect("first move thread"), second)
}

#[test]
fn a_second_move_during_a_move_is_refused_with_409_and_the_first_completes() {
    let vm = dirty_vm("", &["--memory", "256M"]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let mut attempts = Vec::new();
    // Which one takes the operation lock is a race; a run where they did not
    // overlap at all (both succeed) says nothing, so try again a few times.
    for _ in 0..5 {
        let (first, second) = race_two_moves(&vm);
        let conflict = |o: &CmdOutput| o.code == Some(1) && o.stderr.contains("another operation");
        match (conflict(&first), conflict(&second)) {
            (false, false) => {
                assert_eq!(first.code, Some(0), "first move\n{}", first.describe());
                assert_eq!(second.code, Some(0), "second move\n{}", second.describe());
                attempts.push(format!("{}\n{}", first.describe(), second.describe()));
                continue;
            }
            (true, true) => panic!(
                "both moves were refused\n{}\n{}",
                first.describe(),
                second.describe()
            ),
            (first_lost, _) => {
                let (winner, loser) = if first_lost {
                    (second, first)
                } else {
                    (first, second)
                };
                assert_eq!(
                    winner.code,
                    Some(0),
                    "the move holding the lock failed\n{}",
                    winner.describe()
                );
                assert_one_line_error(&loser, "the refused concurrent move");
                assert!(
                    loser.stderr.contains("409"),
                    "the refusal should carry HTTP 409\n{}",
                    loser.describe()
                );
                assert!(
                    loser.stdout.trim().is_empty(),
                    "the refused move printed on stdout\n{}",
                    loser.describe()
                );
                assert_still_running(&vm, "after two racing moves");
                assert_stat_on_node0(&numa_stat(&vm), &[256 * MIB]);
                return;
            }
        }
    }
    panic!(
        "five pairs of moves never overlapped:\n{}",
        attempts.join("\n")
    );
}

#[test]
fn numa_stat_counts_every_page_on_node0_with_bind_policy_and_node0_cpus() {
    let vm = dirty_vm(",rate=50000", &["--memory", "128M"]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let stat = numa_stat(&vm);
    assert_stat_on_node0(&stat, &[128 * MIB]);
    let vcpus: Vec<u64> = stat["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .map(|v| v["id"].as_u64().expect("vcpu id"))
        .collect();
    assert_eq!(vcpus, vec![0, 1], "{stat}");
    for v in stat["vcpus"].as_array().expect("vcpus") {
        assert_eq!(v["guest_node"], 0, "{stat}");
    }

    let text = vm.cli_ok(&["numa-stat"]);
    assert!(
        text.stdout.contains("bind:0") && !text.stdout.trim_start().starts_with('{'),
        "text numa-stat should name the policy:\n{}",
        text.describe()
    );
    // Reading placement must not disturb the guest.
    assert_still_running(&vm, "after numa-stat");
}

#[test]
fn live_move_that_cannot_converge_falls_back_chunk_by_chunk_and_verifies() {
    let vm = dirty_vm("", &["--memory", "128M", "--chunk-size", "16M"]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    let stat = numa_stat(&vm);
    let chunks = memory_map(&vm).iter().filter(|s| s.guest_node == 0).count() as u64;
    assert_eq!(chunks, 8, "--chunk-size 16M over 128 MiB");
    let report = migrate(&vm, &["--to-node", "0", "--max-downtime-ms", "0.01"]);
    assert_move_report(
        &report,
        "live",
        &[0],
        128 * MIB / PAGE,
        &vcpus_of_guest_node(&stat, 0),
    );
    assert_eq!(report["converged"], false, "{report}");
    let fallback = u64_field(&report, "fallback_chunks");
    assert!(
        fallback > 0 && fallback <= chunks,
        "fallback_chunks should be 1..={chunks}: {report}"
    );
    assert_eq!(u64_field(&report, "pauses"), chunks, "{report}");
    assert_eq!(
        u64_field(&report, "peak_extra_bytes"),
        16 * MIB,
        "one 16 MiB chunk extra at most: {report}"
    );
    assert_still_running(&vm, "after a live move that fell back to stop-copy");
}

/// Status readers hammering the API while the moves below run.
const STATUS_CLIENTS: usize = 4;
/// Moves of guest node 0 (chunk 0 holds the progress counters status reads)
/// per mode in the stress test.
const STRESS_MOVES_PER_MODE: usize = 12;

#[test]
fn status_in_a_tight_loop_during_repeated_moves_never_sees_a_half_swapped_chunk() {
    // Before replace_chunk took the memory write lock and swapped without a
    // hole, a status landing between its two mremaps read the unmapped
    // chunk 0 and vmhop died of SIGSEGV.
    let vm = dirty_vm("", &["--memory", "64M"]);
    let p0 = vm.progress();
    vm.wait_progress_above(p0, PROGRESS_WAIT);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (answers, moves) = thread::scope(|s| {
        let clients: Vec<_> = (0..STATUS_CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    let mut ok = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = common::http(vm.socket(), "GET", "/api/v1/vm.status", None)
                            .map_err(|e| format!("status after {ok} answers: {e}"))?;
                        if r.status != 200 {
                            return Err(format!("status answered {}: {}", r.status, r.body));
                        }
                        ok += 1;
                    }
                    Ok::<u64, String>(ok)
                })
            })
            .collect();
        let mut moves = 0;
        for i in 0..2 * STRESS_MOVES_PER_MODE {
            let mode = if i % 2 == 0 { "live" } else { "stop-copy" };
            let out = vm.cli(&[
                "numa-migrate",
                "--to-node",
                "0",
                "--guest-node",
                "0",
                "--mode",
                mode,
                "--json",
            ]);
            if out.code != Some(0) {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                panic!(
                    "move {i} ({mode}) failed while status was polled\n{}\n{}",
                    out.describe(),
                    vm.logs()
                );
            }
            moves += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let answers: Vec<Result<u64, String>> = clients
            .into_iter()
            .map(|c| c.join().expect("status client thread"))
            .collect();
        (answers, moves)
    });
    let mut total = 0;
    for a in &answers {
        match a {
            Ok(n) => total += n,
            Err(e) => panic!("a status client failed: {e}\n{}", vm.logs()),
        }
    }
    assert_eq!(moves, 2 * STRESS_MOVES_PER_MODE);
    assert!(
        total > moves as u64,
        "status was hardly asked during the moves: {total} answers"
    );
    assert_still_running(&vm, "after moves raced by status readers");
    assert!(
        vm.progress() > p0,
        "the guest made no progress over the moves"
    );
}

/// Guest memory of the sparse-guest tests, and the working set the guest
/// writes in it: most pages are never touched.
const SPARSE_MEMORY: &str = "128M";
const SPARSE_WSS: &str = "8M";
const SPARSE_WSS_PAGES: u64 = 8 * MIB / PAGE;

/// `not_present` of guest node 0 in a fresh numa-stat.
fn stat_not_present(vm: &Vm) -> u64 {
    let stat = numa_stat(vm);
    u64_field(&stat["guest_nodes"][0], "not_present")
}

/// Waits until the guest has touched its whole working set once (it does
/// so gradually after it starts), so that later counts of present pages
/// change only by what a move does.
fn wait_working_set_present(vm: &Vm, wss_pages: u64) {
    let total = 128 * MIB / PAGE;
    let deadline = std::time::Instant::now() + PROGRESS_WAIT;
    loop {
        let present = total - stat_not_present(vm);
        if present >= wss_pages {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {present} pages present after {PROGRESS_WAIT:?}, the working set is {wss_pages}\n{}",
            vm.logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Moves guest node 0 of `vm` live and then stop-copy, and checks that the
/// pages that were never faulted in stay so: a copy move sends only the
/// pages that hold memory and faults in only those on the target. The
/// baseline is each report's own `placement_before` (the guest may still
/// be touching its working set for the first time before that).
fn assert_moves_keep_untouched_pages_unpopulated(vm: &Vm, what: &str) {
    let total = 128 * MIB / PAGE;
    // The guest's working set, page tables and progress blocks may fault
    // in a few more pages during a move; 1% of the memory allows for that,
    // a copy that populated the whole node would not fit.
    let slack = total / 100;
    for mode in ["live", "stop-copy"] {
        let report = migrate(vm, &["--to-node", "0", "--mode", mode]);
        let present: u64 = pages_by_node(&report["placement_before"], "placement_before")
            .values()
            .sum();
        let before = total - present;
        assert!(
            before > total / 2,
            "{what}: the guest should leave most of its {total} pages untouched, \
             {before} were not present before the {mode} move: {report}"
        );
        let after = u64_field(&report, "not_present_after");
        assert!(
            after + slack >= before && after <= before,
            "{what}: a {mode} move changed the not-present pages from {before} to {after}: {report}"
        );
        let stat = stat_not_present(vm);
        assert!(
            stat + slack >= before && stat <= before,
            "{what}: after a {mode} move numa-stat has {stat} pages not present, {before} before"
        );
        assert_still_running(vm, &format!("{what}, after a {mode} move"));
    }
}

#[test]
fn moves_of_a_sparse_guest_leave_its_untouched_pages_unpopulated() {
    let guest = format!(",wss={SPARSE_WSS},rate=20000");
    let vm = dirty_vm(&guest, &["--memory", SPARSE_MEMORY]);
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    wait_working_set_present(&vm, SPARSE_WSS_PAGES);
    assert_moves_keep_untouched_pages_unpopulated(&vm, "a booted sparse guest");
}

#[test]
fn moves_of_a_lazily_restored_sparse_guest_leave_its_zero_pages_unloaded() {
    // A lazy restore loads only the non-zero pages in the background and
    // answers first touches of zero pages on demand: once loading is done,
    // the pages the guest never touched are still not faulted in, and a
    // move must not fault them in either.
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_str = dir.path().to_str().expect("UTF-8 tempdir");
    {
        let guest = format!(",wss={SPARSE_WSS},rate=20000");
        let vm = dirty_vm(&guest, &["--memory", SPARSE_MEMORY]);
        let p = vm.progress();
        vm.wait_progress_above(p, PROGRESS_WAIT);
        wait_working_set_present(&vm, SPARSE_WSS_PAGES);
        vm.cli_ok(&["checkpoint", "--dir", dir_str, "--json"]);
    }
    let vm = Vm::start_command(&["restore", &format!("{dir_str}@1")], &[]);
    let deadline = std::time::Instant::now() + PROGRESS_WAIT;
    while vm.status()["loading"] == true {
        assert!(
            std::time::Instant::now() < deadline,
            "the lazy restore was still loading after {PROGRESS_WAIT:?}\n{}",
            vm.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let p = vm.progress();
    vm.wait_progress_above(p, PROGRESS_WAIT);
    wait_working_set_present(&vm, SPARSE_WSS_PAGES);
    assert_moves_keep_untouched_pages_unpopulated(&vm, "a lazily restored sparse guest");
}
