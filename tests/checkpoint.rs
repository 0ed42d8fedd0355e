//! Checkpoints through the real binary: chains of full and incremental
//! checkpoints of a running guest, restoring every id (lazily and eagerly)
//! to exactly its moment, restored VMs continuing their chain, `--full`,
//! `--stop-after`, `merge`, damaged and foreign files, a VM killed in the
//! middle of a checkpoint, a full disk, and one operation at a time.
//!
//! The guest is `builtin:dirty` with 2 vCPUs, rate-limited so that
//! checkpoints of a debug build stay short. Its `progress` counter lives in
//! guest memory, so a restored VM reports the progress of the moment its
//! checkpoint was taken: after a restore it must lie between the progress
//! seen just before the `checkpoint` command and just after it, and
//! `verify` (the host-side memory invariant) must hold.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_one_line_error, index_of, vmhop, vmhop_expecting_exit, CmdOutput, Vm};
use serde_json::Value;

/// Generous bound for a running guest to show progress (polling, not timing).
const PROGRESS_WAIT: Duration = Duration::from_secs(10);

/// Bound for a background event (a temp file appearing, a VM stopping).
const EVENT_WAIT: Duration = Duration::from_secs(20);

/// Memory of the small test VMs.
const SMALL: &str = "64M";

/// The guest of the small VMs: a dirty guest, rate-limited so that it keeps
/// dirtying pages during a checkpoint without outrunning a debug build's
/// writer (about 100 MB/s on a loaded machine; each page the guest dirties
/// during a checkpoint's live rounds is written again).
const GUEST: &str = "builtin:dirty,rate=10000";

/// Memory of the big VMs, whose full checkpoint takes a while.
const BIG: &str = "256M";

/// The guest of the big VMs: random filler, so that every page is data and
/// a full checkpoint takes seconds; a low rate keeps it from re-dirtying
/// much of it meanwhile.
const BIG_GUEST: &str = "builtin:dirty,rate=2000,fill=random";

/// Starts a 2-vCPU dirty guest and waits until it makes progress.
fn dirty_vm(memory: &str, guest: &str) -> Vm {
    let vm = Vm::start(&["--vcpus", "2", "--memory", memory, "--guest", guest]);
    vm.wait_progress_above(0, PROGRESS_WAIT);
    vm
}

/// Pages the guest dirties between two checkpoints of a test.
const GUEST_WORK: u64 = 1000;

/// Lets the guest dirty `GUEST_WORK` pages past progress `from`.
fn let_guest_work(vm: &Vm, from: u64) {
    vm.wait_progress_above(from + GUEST_WORK, PROGRESS_WAIT);
}

/// Parses a command's stdout as exactly one JSON object.
fn one_json_object(out: &CmdOutput) -> Value {
    common::one_json_object_in(&out.stdout, &out.describe())
}

/// A fresh temporary directory for checkpoints.
fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmhop-ckpt-test-")
        .tempdir()
        .expect("create tempdir")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `DIR@ID`.
fn target(dir: &Path, id: u64) -> String {
    format!("{}@{id}", dir.display())
}

/// The file of checkpoint `id` in `dir`.
fn ckpt_file(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("ckpt-{id:06}.vmhop"))
}

/// One checkpoint taken by a test, with the guest progress seen just before
/// the command and just after it returned.
#[derive(Debug, Clone)]
struct Taken {
    report: Value,
    before: u64,
    after: u64,
}

impl Taken {
    fn id(&self) -> u64 {
        self.report["id"].as_u64().expect("report id")
    }

    fn kind(&self) -> &str {
        self.report["kind"].as_str().expect("report kind")
    }

    fn parent(&self) -> Option<u64> {
        self.report["parent"].as_u64()
    }
}

/// Runs `checkpoint --dir DIR --json EXTRA` against `vm`, which must
/// succeed, and records the progress around it.
fn take_checkpoint(vm: &Vm, dir: &Path, extra: &[&str]) -> Taken {
    let before = vm.progress();
    let mut args = vec!["checkpoint", "--dir", path_str(dir), "--json"];
    args.extend_from_slice(extra);
    let out = vm.cli_ok(&args);
    let after = vm.progress();
    let report = one_json_object(&out);
    assert_eq!(report["operation"], "checkpoint", "report: {report}");
    for field in [
        "downtime_us",
        "total_ms",
        "pages_total",
        "pages_written",
        "bytes_written",
    ] {
        assert!(report[field].is_number(), "report lacks {field}: {report}");
    }
    let path = PathBuf::from(report["path"].as_str().expect("report path"));
    let id = report["id"].as_u64().expect("report id");
    assert_eq!(
        path.file_name(),
        ckpt_file(dir, id).file_name(),
        "report: {report}"
    );
    assert!(
        path.is_file(),
        "{} does not exist: {report}",
        path.display()
    );
    Taken {
        report,
        before,
        after,
    }
}

/// The entries `vmhop checkpoints DIR --json` lists.
fn checkpoints_json(dir: &Path) -> Vec<Value> {
    let out = vmhop(&["checkpoints", path_str(dir), "--json"]);
    assert_eq!(out.code, Some(0), "checkpoints failed\n{}", out.describe());
    one_json_object(&out)["checkpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("checkpoints --json has no list\n{}", out.describe()))
        .clone()
}

/// (id, parent, kind) of every checkpoint `vmhop checkpoints` lists.
fn listed(dir: &Path) -> Vec<(u64, Option<u64>, String)> {
    checkpoints_json(dir)
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().expect("id"),
                e["parent"].as_u64(),
                e["kind"].as_str().expect("kind").to_string(),
            )
        })
        .collect()
}

/// Restores `DIR@ID` with `vmhop restore` and the given options.
fn restore(dir: &Path, id: u64, extra: &[&str]) -> Vm {
    Vm::start_command(&["restore", &target(dir, id)], extra)
}

/// Asserts `verify` passes.
///
/// While a lazy restore's background pass loads pages, vmhop refuses
/// pause, resume and verify with 409 "another operation ... is in
/// progress" (`Vm::try_operation` checks the loading flag); verify is
/// retried until the load is done. That refusal is asserted against by
/// `a_lazily_restored_vm_takes_commands_while_it_loads`.
fn assert_verifies(vm: &Vm, what: &str) {
    let deadline = Instant::now() + EVENT_WAIT;
    let out = loop {
        let out = vm.cli(&["verify", "--json"]);
        if out.code == Some(1) && out.stderr.contains("in progress") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        break out;
    };
    assert!(
        !out.stderr.contains("panicked"),
        "{what}: verify panicked\n{}",
        out.describe()
    );
    assert_eq!(
        out.code,
        Some(0),
        "{what}: verify failed\n{}\n{}",
        out.describe(),
        vm.logs()
    );
    let report = one_json_object(&out);
    assert_eq!(report["ok"], Value::Bool(true), "{what}: verify: {report}");
    assert!(
        report["pages_checked"].as_u64().unwrap_or(0) > 0,
        "{what}: verify checked no pages: {report}"
    );
}

/// Checks a VM restored paused from `taken`: paused, its progress that of
/// the checkpoint's moment, memory consistent; then resumes it and checks
/// that it runs on, still consistent. Returns the restored progress.
fn check_restored_then_resume(vm: &Vm, taken: &Taken, what: &str) -> u64 {
    assert_eq!(vm.state(), "paused", "{what}: restored with --paused");
    let p = vm.progress();
    assert!(
        taken.before <= p && p <= taken.after,
        "{what}: restored progress {p} is outside [{}, {}], the progress seen around \
         the checkpoint command",
        taken.before,
        taken.after
    );
    assert_verifies(vm, what);
    assert_eq!(
        vm.progress(),
        p,
        "{what}: a paused restored VM made progress"
    );
    vm.cli_ok(&["resume"]);
    vm.wait_progress_above(p, PROGRESS_WAIT);
    assert_eq!(vm.state(), "running", "{what}: after resume");
    assert_verifies(vm, &format!("{what}, after running on"));
    p
}

/// Names of the entries of `dir`.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Polls until `f` returns Some, within `limit`; panics with `what`.
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

/// The `.ckpt-*.tmp` file of `dir` and its size, if one exists.
fn temp_file(dir: &Path) -> Option<(PathBuf, u64)> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        (name.starts_with(".ckpt-") && name.ends_with(".tmp"))
            .then(|| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
    })
}

/// Runs `vmhop checkpoint` against `socket` in a scoped background thread.
fn checkpoint_in_background<'s>(
    scope: &'s thread::Scope<'s, '_>,
    socket: &'s str,
    dir: &'s Path,
    extra: &'s [&'s str],
) -> thread::ScopedJoinHandle<'s, CmdOutput> {
    scope.spawn(move || {
        let mut args = vec![
            "checkpoint",
            "--api-socket",
            socket,
            "--dir",
            path_str(dir),
            "--json",
        ];
        args.extend_from_slice(extra);
        vmhop(&args)
    })
}

// ---------------------------------------------------------------------------
// Chains, restore, merge
// ---------------------------------------------------------------------------

#[test]
fn every_checkpoint_of_a_chain_restores_to_its_moment_and_runs_on() {
    let dir = tempdir();
    let taken: Vec<Taken> = {
        let vm = dirty_vm(SMALL, GUEST);
        let mut taken: Vec<Taken> = Vec::new();
        for i in 1..=5u64 {
            let t = take_checkpoint(&vm, dir.path(), &[]);
            assert_eq!(t.id(), i, "ids count up from 1: {}", t.report);
            if i == 1 {
                assert_eq!(t.kind(), "full", "the first checkpoint: {}", t.report);
                assert_eq!(t.parent(), None, "the first checkpoint: {}", t.report);
            } else {
                assert_eq!(t.kind(), "incremental", "checkpoint {i}: {}", t.report);
                assert_eq!(t.parent(), Some(i - 1), "checkpoint {i}: {}", t.report);
            }
            assert_eq!(vm.state(), "running", "after checkpoint {i}");
            // The guest dirties more before the next one.
            let_guest_work(&vm, t.after);
            taken.push(t);
        }
        taken
    };
    assert_eq!(
        listed(dir.path()),
        vec![
            (1, None, "full".to_string()),
            (2, Some(1), "incremental".to_string()),
            (3, Some(2), "incremental".to_string()),
            (4, Some(3), "incremental".to_string()),
            (5, Some(4), "incremental".to_string()),
        ]
    );
    // Each restored VM holds a different moment of the guest.
    let mut seen = Vec::new();
    for t in &taken {
        let vm = restore(dir.path(), t.id(), &["--paused"]);
        seen.push(check_restored_then_resume(
            &vm,
            t,
            &format!("restore of checkpoint {}", t.id()),
        ));
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "restored progress does not grow along the chain: {seen:?}"
    );
}

/// KVM writes into guest memory while a vCPU's kvmclock MSRs are restored
/// (the wall clock at once; the system-time page is faulted in to be
/// cached). A restore must have the checkpoint's pages in place, or
/// registered for lazy loading, before that: a page KVM faulted in first
/// kept zeros, since a lazy loader cannot fill a present page, and a Linux
/// guest lost kernel data. The hook puts the clock inside the builtin
/// guest's PML4 page, so such a restore loses its page tables and the
/// guest dies at once.
#[test]
fn pages_kvm_writes_while_the_vcpu_state_is_restored_keep_their_content() {
    let dir = tempdir();
    let taken = {
        let vm = Vm::start(&[
            "--vcpus",
            "2",
            "--memory",
            SMALL,
            "--guest",
            GUEST,
            "--test-hook",
            "guest-kvmclock",
        ]);
        vm.wait_progress_above(0, PROGRESS_WAIT);
        let full = take_checkpoint(&vm, dir.path(), &[]);
        let_guest_work(&vm, full.after);
        take_checkpoint(&vm, dir.path(), &[])
    };
    for (how, extra) in [("lazily", &[][..]), ("eagerly", &["--eager"][..])] {
        let mut args = vec!["--paused"];
        args.extend_from_slice(extra);
        let vm = restore(dir.path(), taken.id(), &args);
        check_restored_then_resume(&vm, &taken, &format!("restored {how}"));
        // Long enough for a guest without page tables to have died.
        vm.wait_progress_above(vm.progress() + GUEST_WORK, PROGRESS_WAIT);
        assert_eq!(vm.state(), "running", "restored {how}\n{}", vm.logs());
    }
}

/// A guest rewriting its working set non-stop never lets pre-copy
/// converge: the pause write-protects the pages still dirty and the
/// guest's writes to them after the resume go through copy-on-write.
/// Every checkpoint must still restore to its moment — a page written
/// out in its post-pause version breaks the guest's sweep invariant.
#[test]
fn checkpoints_of_a_guest_rewriting_memory_non_stop_restore_to_their_moment() {
    let dir = tempdir();
    let taken: Vec<Taken> = {
        let vm = dirty_vm(SMALL, "builtin:dirty,wss=16M");
        (0..4)
            .map(|_| {
                let t = take_checkpoint(&vm, dir.path(), &[]);
                let_guest_work(&vm, t.after);
                t
            })
            .collect()
    };
    let protected: u64 = taken
        .iter()
        .map(|t| {
            t.report["pages_protected"]
                .as_u64()
                .expect("pages_protected")
        })
        .sum();
    let faults: u64 = taken
        .iter()
        .map(|t| t.report["cow_faults"].as_u64().expect("cow_faults"))
        .sum();
    let reports: Vec<String> = taken.iter().map(|t| t.report.to_string()).collect();
    assert!(protected > 0, "no page was write-protected: {reports:#?}");
    assert!(
        faults > 0,
        "the guest never wrote a protected page: {reports:#?}"
    );
    for (i, t) in taken.iter().enumerate() {
        let how: &[&str] = if i % 2 == 0 {
            &["--paused"]
        } else {
            &["--paused", "--eager"]
        };
        let vm = restore(dir.path(), t.id(), how);
        check_restored_then_resume(&vm, t, &format!("restore {how:?} of checkpoint {}", t.id()));
    }
}

#[test]
fn a_restored_vm_continues_its_chain_with_incrementals() {
    let dir = tempdir();
    let mut taken: Vec<Taken> = Vec::new();
    {
        let vm = dirty_vm(SMALL, GUEST);
        for _ in 0..3 {
            taken.push(take_checkpoint(&vm, dir.path(), &[]));
            let_guest_work(&vm, taken.last().expect("taken").after);
        }
    }
    // Branch off the middle of the chain, then cycle restore → run →
    // checkpoint → restore of that new checkpoint.
    let mut from = taken[1].clone();
    for next_id in 4..=6u64 {
        let vm = restore(dir.path(), from.id(), &["--paused"]);
        check_restored_then_resume(&vm, &from, &format!("restore of checkpoint {}", from.id()));
        let t = take_checkpoint(&vm, dir.path(), &[]);
        assert_eq!(t.id(), next_id, "the directory's next id: {}", t.report);
        assert_eq!(
            t.kind(),
            "incremental",
            "a VM restored from {} continues its chain: {}",
            from.id(),
            t.report
        );
        assert_eq!(
            t.parent(),
            Some(from.id()),
            "the parent is the restored checkpoint: {}",
            t.report
        );
        drop(vm);
        from = t;
    }
    let vm = restore(dir.path(), from.id(), &["--paused"]);
    check_restored_then_resume(&vm, &from, "restore of the last checkpoint of the cycles");
    assert_eq!(
        listed(dir.path()),
        vec![
            (1, None, "full".to_string()),
            (2, Some(1), "incremental".to_string()),
            (3, Some(2), "incremental".to_string()),
            (4, Some(2), "incremental".to_string()),
            (5, Some(4), "incremental".to_string()),
            (6, Some(5), "incremental".to_string()),
        ]
    );
}

/// Starts a restore in one of its forms and returns it with the `restore`
/// part of the `--json` line it printed.
fn restore_form(command: &[&str], extra: &[&str]) -> (Vm, Value) {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let vm = Vm::start_command(command, &args);
    // The JSON line is printed once the API is up; give it a moment.
    let line = wait_for(EVENT_WAIT, "the restore's --json line", || {
        let out = vm.stdout();
        out.contains('\n').then_some(out)
    });
    let v: Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("the --json line is not JSON ({e}): {line:?}"));
    let report = v["restore"].clone();
    assert_eq!(report["operation"], "restore", "--json line: {v}");
    (vm, report)
}

#[test]
fn eager_and_lazy_restores_in_both_forms_give_the_same_vm() {
    let dir = tempdir();
    let t = {
        let vm = dirty_vm(SMALL, GUEST);
        take_checkpoint(&vm, dir.path(), &[]);
        let_guest_work(&vm, vm.progress());
        take_checkpoint(&vm, dir.path(), &[])
    };
    let tgt = target(dir.path(), 2);
    let forms: [(&[&str], &[&str], bool); 4] = [
        (&["restore", &tgt], &["--paused"], false),
        (&["restore", &tgt], &["--paused", "--eager"], true),
        (&["run", "--restore", &tgt], &["--paused"], false),
        (&["run", "--restore", &tgt], &["--paused", "--eager"], true),
    ];
    let mut progress = Vec::new();
    for (command, extra, eager) in forms {
        let what = format!("{command:?} {extra:?}");
        let (vm, report) = restore_form(command, extra);
        assert_eq!(report["id"], 2, "{what}: {report}");
        assert_eq!(report["lazy"], Value::Bool(!eager), "{what}: {report}");
        progress.push(check_restored_then_resume(&vm, &t, &what));
    }
    assert!(
        progress.iter().all(|p| *p == progress[0]),
        "every form restores the same moment: {progress:?}"
    );
}

#[test]
fn a_lazily_restored_vm_takes_commands_while_it_loads() {
    let dir = tempdir();
    let t = {
        let vm = dirty_vm(BIG, BIG_GUEST);
        take_checkpoint(&vm, dir.path(), &[])
    };
    let vm = restore(dir.path(), 1, &["--paused"]);
    // Loading 256 MiB of data in the background takes a while; the user's
    // next commands come in meanwhile and must not be refused as if a
    // checkpoint were running.
    let out = vm.cli(&["resume"]);
    assert_eq!(
        out.code,
        Some(0),
        "resume right after a lazy restore --paused\n{}",
        out.describe()
    );
    let out = vm.cli(&["pause"]);
    assert_eq!(
        out.code,
        Some(0),
        "pause right after a lazy restore\n{}",
        out.describe()
    );
    let p = vm.progress();
    assert!(p >= t.before, "restored progress {p} < {}", t.before);
    assert_verifies(&vm, "the lazily restored VM");
    vm.cli_ok(&["resume"]);
    vm.wait_progress_above(p, PROGRESS_WAIT);
}

#[test]
fn full_flag_starts_a_new_chain() {
    let dir = tempdir();
    let taken: Vec<Taken> = {
        let vm = dirty_vm(SMALL, GUEST);
        let mut taken = Vec::new();
        for extra in [&[][..], &[][..], &["--full"][..], &[][..]] {
            let t = take_checkpoint(&vm, dir.path(), extra);
            let_guest_work(&vm, t.after);
            taken.push(t);
        }
        taken
    };
    assert_eq!(taken[2].kind(), "full", "--full: {}", taken[2].report);
    assert_eq!(taken[2].parent(), None, "--full: {}", taken[2].report);
    assert_eq!(
        taken[3].kind(),
        "incremental",
        "after --full: {}",
        taken[3].report
    );
    assert_eq!(
        taken[3].parent(),
        Some(3),
        "after --full: {}",
        taken[3].report
    );
    let entries = checkpoints_json(dir.path());
    let chain: Vec<&Value> = entries.iter().map(|e| &e["chain_id"]).collect();
    assert_eq!(chain.len(), 4, "listing: {entries:?}");
    assert_eq!(chain[0], chain[1], "1 and 2 share a chain: {entries:?}");
    assert_eq!(chain[2], chain[3], "3 and 4 share a chain: {entries:?}");
    assert_ne!(chain[1], chain[2], "--full starts a new chain: {entries:?}");
    // Both chains restore, the new one from its own full checkpoint.
    for t in [&taken[1], &taken[3]] {
        let vm = restore(dir.path(), t.id(), &["--paused"]);
        check_restored_then_resume(&vm, t, &format!("restore of checkpoint {}", t.id()));
    }
}

#[test]
fn stop_after_ends_the_vm_and_its_checkpoint_restores() {
    let dir = tempdir();
    let mut vm = dirty_vm(SMALL, GUEST);
    let first = take_checkpoint(&vm, dir.path(), &[]);
    let_guest_work(&vm, first.after);
    let before = vm.progress();
    let out = vm.cli_ok(&[
        "checkpoint",
        "--dir",
        path_str(dir.path()),
        "--json",
        "--stop-after",
    ]);
    let report = one_json_object(&out);
    assert_eq!(report["id"], 2, "report: {report}");
    assert_eq!(report["kind"], "incremental", "report: {report}");
    assert_eq!(report["stopped"], Value::Bool(true), "report: {report}");
    let status = vm.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "vmhop run after --stop-after: {status}\n{}",
        vm.logs()
    );
    assert!(
        !vm.socket().exists(),
        "the API socket {} remains after the VM exited",
        vm.socket().display()
    );
    // The guest never ran after the checkpoint's pause, so its progress at
    // the end is the checkpoint's; the restore must show exactly that.
    let vm2 = restore(dir.path(), 2, &["--paused"]);
    let t = Taken {
        report,
        before,
        after: u64::MAX,
    };
    check_restored_then_resume(&vm2, &t, "restore of a --stop-after checkpoint");
}

#[test]
fn merging_a_chain_gives_one_full_checkpoint_with_the_same_state() {
    let dir = tempdir();
    let taken: Vec<Taken> = {
        let vm = dirty_vm(SMALL, GUEST);
        let mut taken = Vec::new();
        for _ in 0..4 {
            let t = take_checkpoint(&vm, dir.path(), &[]);
            let_guest_work(&vm, t.after);
            taken.push(t);
        }
        taken
    };
    let out = vmhop(&["merge", &target(dir.path(), 3), "--json"]);
    assert_eq!(out.code, Some(0), "merge failed\n{}", out.describe());
    let merged = one_json_object(&out);
    assert_eq!(merged["id"], 5, "merge takes the next id: {merged}");
    let entries = checkpoints_json(dir.path());
    let e5 = entries
        .iter()
        .find(|e| e["id"] == 5)
        .unwrap_or_else(|| panic!("merged checkpoint not listed: {entries:?}"));
    assert_eq!(e5["kind"], "full", "merged: {e5}");
    assert_eq!(e5["parent"], Value::Null, "merged: {e5}");
    assert_eq!(entries.len(), 5, "the merged files stay: {entries:?}");
    // It holds each page's latest data along the chain 1 → 2 → 3, once.
    let expected = data_pages(&[1, 2, 3].map(|id| ckpt_file(dir.path(), id)));
    let merged_index = index_of(&ckpt_file(dir.path(), 5));
    assert_eq!(
        merged["pages_written"], expected as u64,
        "merge report: {merged}"
    );
    assert_eq!(merged_index.len(), expected, "entries of the merged file");
    assert!(
        merged_index.iter().all(|e| e.2 & 1 == 0),
        "a full checkpoint has no zero entries"
    );

    // Restoring 3 and its merge gives the same VM.
    let (vm, chain_report) = restore_form(&["restore", &target(dir.path(), 3)], &["--paused"]);
    let p3 = check_restored_then_resume(&vm, &taken[2], "restore of checkpoint 3");
    drop(vm);
    assert_eq!(chain_report["chain_files"], 3, "{chain_report}");
    // The merged file stands alone: the chain it came from is gone.
    for id in 1..=4 {
        std::fs::remove_file(ckpt_file(dir.path(), id)).expect("remove a merged file");
    }
    let (vm, merged_report) = restore_form(&["restore", &target(dir.path(), 5)], &["--paused"]);
    assert_eq!(merged_report["chain_files"], 1, "{merged_report}");
    let p5 = check_restored_then_resume(&vm, &taken[2], "restore of the merged checkpoint");
    assert_eq!(
        p5, p3,
        "the merged checkpoint restores checkpoint 3's moment"
    );
}

#[test]
fn checkpoint_of_a_paused_vm_leaves_it_paused() {
    let dir = tempdir();
    let vm = dirty_vm(SMALL, GUEST);
    vm.cli_ok(&["pause"]);
    let p = vm.progress();
    let first = take_checkpoint(&vm, dir.path(), &[]);
    let second = take_checkpoint(&vm, dir.path(), &[]);
    assert_eq!(vm.state(), "paused", "after two checkpoints of a paused VM");
    assert_eq!(
        (first.before, first.after, second.after),
        (p, p, p),
        "a paused guest made progress during a checkpoint"
    );
    assert_eq!(second.kind(), "incremental", "{}", second.report);
    vm.cli_ok(&["resume"]);
    vm.wait_progress_above(p, PROGRESS_WAIT);
    drop(vm);
    for t in [&first, &second] {
        let r = restore(dir.path(), t.id(), &["--paused"]);
        check_restored_then_resume(&r, t, &format!("restore of paused checkpoint {}", t.id()));
    }
}

#[test]
fn a_second_checkpoint_during_one_is_refused_with_409() {
    let dir = tempdir();
    let other = tempdir();
    let vm = dirty_vm(BIG, BIG_GUEST);
    let socket = vm.socket_str().to_string();
    let (first, cli, raw) = thread::scope(|s| {
        let first = checkpoint_in_background(s, &socket, dir.path(), &[]);
        wait_for(EVENT_WAIT, "the first checkpoint's temp file", || {
            temp_file(dir.path())
        });
        let cli = vm.cli(&["checkpoint", "--dir", path_str(other.path()), "--json"]);
        let body = format!(r#"{{"dir": "{}"}}"#, other.path().display());
        let raw = vm.http("PUT", "/api/v1/vm.checkpoint", Some(&body));
        // Both were refused while the first was still writing.
        assert!(
            temp_file(dir.path()).is_some(),
            "the first checkpoint ended before the second was refused: the test proves nothing"
        );
        (first.join().expect("checkpoint thread"), cli, raw)
    });
    assert_eq!(
        first.code,
        Some(0),
        "the first checkpoint\n{}",
        first.describe()
    );
    assert_eq!(one_json_object(&first)["id"], 1);
    assert_eq!(
        cli.code,
        Some(1),
        "the second checkpoint\n{}",
        cli.describe()
    );
    assert_one_line_error(&cli, "the second checkpoint");
    assert!(
        cli.stderr.contains("another operation") && cli.stderr.contains("in progress"),
        "the refusal says why\n{}",
        cli.describe()
    );
    assert_eq!(raw.status, 409, "raw PUT vm.checkpoint: {}", raw.body);
    let err = raw.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("in progress"), "409 body: {}", raw.body);
    assert!(
        !file_names(other.path()).iter().any(|n| n.contains("ckpt")),
        "a refused checkpoint wrote files: {:?}",
        file_names(other.path())
    );
    assert_eq!(vm.state(), "running");
    assert_verifies(&vm, "after the two checkpoints");
}

// ---------------------------------------------------------------------------
// Damaged chains
// ---------------------------------------------------------------------------

/// A pristine chain A (ids 1..3, full + 2 incrementals) and a chain B of
/// another VM (ids 1..2), made once and copied by each damage test.
struct Fixture {
    a: PathBuf,
    b: PathBuf,
}

/// Fixture directories are named this plus the test process's pid.
const FIXTURE_PREFIX: &str = "checkpoint-fixture-";

/// Removes the fixtures of earlier test processes that are gone (a static
/// is never dropped, so each run leaves its fixture behind).
fn remove_stale_fixtures(tmp: &Path) {
    for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(FIXTURE_PREFIX) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Builds the shared fixture, once per test process, under cargo's
/// per-target temp dir.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_stale_fixtures(tmp);
        let root = tmp.join(format!("{FIXTURE_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (a, b) = (root.join("a"), root.join("b"));
        for (dir, count) in [(&a, 3), (&b, 2)] {
            let vm = dirty_vm(SMALL, GUEST);
            for _ in 0..count {
                let t = take_checkpoint(&vm, dir, &[]);
                let_guest_work(&vm, t.after);
            }
        }
        Fixture { a, b }
    })
}

/// A private copy of chain A.
fn chain_copy() -> tempfile::TempDir {
    let dir = tempdir();
    for id in 1..=3 {
        std::fs::copy(ckpt_file(&fixture().a, id), ckpt_file(dir.path(), id))
            .expect("copy a fixture file");
    }
    dir
}

/// Runs `vmhop restore TARGET EXTRA` expecting a clean failure: exit 2 (a
/// checkpoint the user named that is missing or cannot be used, api::error's
/// table), one line on stderr, no panic, no VM left (the process exited and
/// its socket is gone). Returns the message.
fn restore_fails(target: &str, extra: &[&str]) -> String {
    let sockdir = tempdir();
    let socket = sockdir.path().join("api.sock");
    let mut args = vec!["restore", target, "--api-socket", path_str(&socket)];
    args.extend_from_slice(extra);
    let out = vmhop_expecting_exit(&args, &socket);
    let what = format!("restore {target} {extra:?}");
    assert_eq!(out.code, Some(2), "{what}\n{}", out.describe());
    assert_one_line_error(&out, &what);
    assert!(!socket.exists(), "{what}: the API socket remains");
    out.stderr.trim().to_string()
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "the message should contain {p:?}: {msg}");
    }
}

/// How many pages hold data after the chain `files` (full first): each
/// page's entry in the newest file that has one, zero entries left out.
fn data_pages(files: &[PathBuf]) -> usize {
    let mut latest = std::collections::BTreeMap::new();
    for f in files {
        for (gpa, _, flags) in index_of(f) {
            latest.insert(gpa, flags & 1 == 0);
        }
    }
    latest.values().filter(|data| **data).count()
}

/// Flips every bit of the byte at `offset` of `file`.
fn flip_byte(file: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open for damage");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).expect("read a byte");
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).expect("write a byte");
}

/// Damages a page the file's index points at (a record the index does not
/// reference is dead space, which no restore reads) in the middle of the
/// page data of checkpoint 2; returns the page's gpa.
fn damage_page_data(dir: &Path) -> u64 {
    let file = ckpt_file(dir, 2);
    let live: Vec<(u64, u64, u32)> = index_of(&file)
        .into_iter()
        .filter(|e| e.2 & 1 == 0)
        .collect();
    assert!(!live.is_empty(), "checkpoint 2 stores no pages");
    let (gpa, offset, _) = live[live.len() / 2];
    flip_byte(&file, offset + 2048);
    gpa
}

#[test]
fn damaged_page_data_fails_an_eager_restore() {
    let dir = chain_copy();
    let gpa = damage_page_data(dir.path());
    let msg = restore_fails(&target(dir.path(), 2), &["--eager"]);
    assert_names(
        &msg,
        &[
            "ckpt-000002.vmhop",
            "checksum mismatch",
            &format!("{gpa:#x}"),
        ],
    );
}

#[test]
fn damaged_page_data_found_by_a_lazy_restore_ends_vmhop_with_exit_1() {
    // The documented behaviour (src/checkpoint/restore.rs, README exit
    // codes): the VM starts, the corrupt page stops it at once, and
    // `vmhop restore` exits 1 with a message naming the file and the page,
    // so a supervisor sees the failure; the guest never sees the bad data.
    let dir = chain_copy();
    let gpa = damage_page_data(dir.path());
    let sock_dir = tempdir();
    let sock = sock_dir.path().join("api.sock");
    let out = vmhop(&[
        "restore",
        &target(dir.path(), 2),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_names(
        &out.stderr,
        &[
            "cannot run on",
            "ckpt-000002.vmhop",
            "checksum mismatch",
            &format!("{gpa:#x}"),
        ],
    );
    assert!(
        !out.stderr.contains("panicked"),
        "vmhop panicked\n{}",
        out.describe()
    );
    assert!(!sock.exists(), "the API socket remains after the failure");
}

#[test]
fn damaged_header_is_refused() {
    let dir = chain_copy();
    // The creation time: covered by the header checksum only.
    flip_byte(&ckpt_file(dir.path(), 2), 41);
    for extra in [&[][..], &["--eager"][..]] {
        let msg = restore_fails(&target(dir.path(), 3), extra);
        assert_names(&msg, &["ckpt-000002.vmhop", "header"]);
        assert!(
            msg.contains("checksum") || msg.contains("corrupt"),
            "the message should say the header is corrupt: {msg}"
        );
    }
}

/// Offset and length of section `i` (0 pages, 1 config, 2 state, 3 disks,
/// 4 index) of a checkpoint file, from its (144-byte) footer.
fn section_of(file: &Path, i: usize) -> (u64, u64) {
    let data = std::fs::read(file).expect("read checkpoint file");
    let footer = &data[data.len() - 144..];
    let u64_at = |o: usize| u64::from_le_bytes(footer[o..o + 8].try_into().expect("8"));
    (u64_at(24 + 16 * i), u64_at(32 + 16 * i))
}

#[test]
fn a_damaged_index_or_state_anywhere_in_a_chain_of_three_is_refused() {
    // A restore starts creating the VM from the restored file's config and
    // state while the whole chain is checked beside it; damage anywhere in
    // the chain's indexes or states must still be refused before any vCPU
    // runs, lazily and eagerly alike.
    for (id, section, name) in [
        (1, 4, "index section"),
        (2, 4, "index section"),
        (3, 4, "index section"),
        (1, 2, "state section"),
        (3, 2, "state section"),
    ] {
        let dir = chain_copy();
        let file = ckpt_file(dir.path(), id);
        let (offset, len) = section_of(&file, section);
        assert!(len > 0, "checkpoint {id}: section {section} is empty");
        flip_byte(&file, offset + len / 2);
        for extra in [&[][..], &["--eager"][..]] {
            let msg = restore_fails(&target(dir.path(), 3), extra);
            assert_names(
                &msg,
                &[&format!("ckpt-{id:06}.vmhop"), "checksum mismatch", name],
            );
        }
    }
}

#[test]
fn a_damaged_file_is_listed_as_damaged_and_blocks_only_what_depends_on_it() {
    let dir = chain_copy();
    flip_byte(&ckpt_file(dir.path(), 2), 41);
    let out = vmhop(&["checkpoints", dir.path().to_str().unwrap(), "--json"]);
    assert_eq!(out.code, Some(0), "listing still works: {}", out.describe());
    let v = common::one_json_object(&out.stdout);
    let ids: Vec<u64> = v["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3], "{v}");
    let damaged = v["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{v}");
    assert_eq!(damaged[0]["id"], 2, "{v}");
    assert!(
        damaged[0]["reason"].as_str().unwrap().contains("header"),
        "{v}"
    );
    let text = vmhop(&["checkpoints", dir.path().to_str().unwrap()]);
    assert!(text.stdout.contains("DAMAGED"), "{}", text.describe());
    // Checkpoint 1 does not depend on 2: it restores; 3 does: refused, naming 2.
    let vm = restore(dir.path(), 1, &["--paused"]);
    assert_verifies(&vm, "restore of checkpoint 1 next to a damaged 2");
    drop(vm);
    let msg = restore_fails(&target(dir.path(), 3), &[]);
    assert_names(&msg, &["ckpt-000002.vmhop", "damaged"]);
}

#[test]
fn truncated_file_is_refused() {
    let dir = chain_copy();
    let file = ckpt_file(dir.path(), 3);
    let len = std::fs::metadata(&file).expect("metadata").len();
    for cut in [len / 2, len - 1, 100] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open");
        f.set_len(cut).expect("truncate");
        drop(f);
        let msg = restore_fails(&target(dir.path(), 3), &[]);
        assert_names(&msg, &["ckpt-000003.vmhop", "truncated"]);
    }
}

#[test]
fn missing_parent_is_refused_and_the_rest_of_the_chain_restores() {
    let dir = chain_copy();
    std::fs::remove_file(ckpt_file(dir.path(), 2)).expect("remove checkpoint 2");
    let msg = restore_fails(&target(dir.path(), 3), &[]);
    assert_names(
        &msg,
        &["ckpt-000003.vmhop", "parent checkpoint 2 is missing"],
    );
    let vm = restore(dir.path(), 1, &["--paused"]);
    assert_verifies(&vm, "restore of checkpoint 1 with 2 missing");
}

#[test]
fn unsupported_format_version_is_refused() {
    let dir = chain_copy();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(ckpt_file(dir.path(), 3))
        .expect("open");
    // Versions 1 and 2 (before disks), and 4, a newer format.
    for v in [1u32, 2, 4] {
        f.write_all_at(&v.to_le_bytes(), 8).expect("write version");
        let msg = restore_fails(&target(dir.path(), 3), &[]);
        assert_names(
            &msg,
            &[
                "ckpt-000003.vmhop",
                &format!("version {v} is not supported"),
                "reads version 3",
            ],
        );
    }
}

#[test]
fn file_from_another_chain_is_refused() {
    let dir = chain_copy();
    // Another VM's checkpoint 2 put in place of this chain's.
    std::fs::copy(ckpt_file(&fixture().b, 2), ckpt_file(dir.path(), 2)).expect("copy");
    let msg = restore_fails(&target(dir.path(), 3), &[]);
    assert_names(&msg, &["ckpt-000003.vmhop", "ckpt-000002.vmhop", "chain"]);
    let msg = restore_fails(&target(dir.path(), 2), &["--eager"]);
    assert_names(&msg, &["ckpt-000002.vmhop", "chain"]);
    // Another VM's checkpoint 1 renamed to id 2: its header says 1.
    std::fs::copy(ckpt_file(&fixture().b, 1), ckpt_file(dir.path(), 2)).expect("copy");
    let msg = restore_fails(&target(dir.path(), 3), &[]);
    assert_names(&msg, &["ckpt-000002.vmhop"]);
}

#[test]
fn missing_directory_unknown_id_and_empty_directory_are_refused() {
    let parent = tempdir();
    let missing = parent.path().join("no-such-dir");
    let msg = restore_fails(path_str(&missing), &[]);
    assert_names(&msg, &[path_str(&missing)]);
    let msg = restore_fails(&target(&missing, 1), &[]);
    assert_names(&msg, &[path_str(&missing)]);

    let msg = restore_fails(&target(&fixture().a, 999), &[]);
    assert_names(&msg, &[path_str(&fixture().a), "999"]);

    let empty = tempdir();
    let msg = restore_fails(path_str(empty.path()), &[]);
    assert_names(&msg, &[path_str(empty.path()), "no checkpoints"]);
}

// ---------------------------------------------------------------------------
// Crashes and a full disk
// ---------------------------------------------------------------------------

#[test]
fn kill_during_a_checkpoint_leaves_earlier_ones_intact() {
    let dir = tempdir();
    let mut vm = dirty_vm(BIG, BIG_GUEST);
    let first = take_checkpoint(&vm, dir.path(), &[]);
    let_guest_work(&vm, first.after);
    let second = take_checkpoint(&vm, dir.path(), &[]);
    let socket = vm.socket_str().to_string();
    let out = thread::scope(|s| {
        // A new full checkpoint: long enough to be killed in the middle.
        let job = checkpoint_in_background(s, &socket, dir.path(), &["--full"]);
        let (tmp, size) = wait_for(EVENT_WAIT, "the checkpoint to be half written", || {
            temp_file(dir.path()).filter(|(_, size)| *size >= 16 << 20)
        });
        vm.signal(libc::SIGKILL);
        let status = vm.wait_exit();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "vmhop run: {status}"
        );
        eprintln!("killed vmhop while {} had {size} bytes", tmp.display());
        job.join().expect("checkpoint thread")
    });
    assert_eq!(
        out.code,
        Some(1),
        "the interrupted checkpoint command\n{}",
        out.describe()
    );
    assert_one_line_error(&out, "the interrupted checkpoint command");
    // A crash leaves at most the temp file, which listings ignore.
    assert!(
        !ckpt_file(dir.path(), 3).exists(),
        "the interrupted checkpoint became visible: {:?}",
        file_names(dir.path())
    );
    assert_eq!(
        listed(dir.path()),
        vec![
            (1, None, "full".to_string()),
            (2, Some(1), "incremental".to_string()),
        ],
        "checkpoints lists only the complete ones (files: {:?})",
        file_names(dir.path())
    );
    let r1 = restore(dir.path(), 1, &["--paused", "--eager"]);
    check_restored_then_resume(&r1, &first, "restore of checkpoint 1 after the crash");
    drop(r1);
    let r2 = restore(dir.path(), 2, &["--paused"]);
    check_restored_then_resume(&r2, &second, "restore of checkpoint 2 after the crash");
    // The chain goes on past the crash's leftover.
    let third = take_checkpoint(&r2, dir.path(), &[]);
    assert_eq!(
        (third.id(), third.parent(), third.kind()),
        (3, Some(2), "incremental"),
        "{}",
        third.report
    );
    assert!(
        temp_file(dir.path()).is_none(),
        "a temp file remains: {:?}",
        file_names(dir.path())
    );
}

/// A tmpfs mounted on a fresh directory; unmounted (and the directory
/// removed) on drop, even when the test fails.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempdir();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a file still open in a vmhop being torn down must not keep
        // the mount behind.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn full_disk_fails_the_checkpoint_and_the_vm_runs_on() {
    let roomy = tempdir();
    let fresh = tempdir();
    let disk = Tmpfs::mount("64M");
    let small_dir = disk.path().join("ckpts");
    let vm = dirty_vm(BIG, BIG_GUEST);
    let first = take_checkpoint(&vm, roomy.path(), &[]);

    let out = vm.cli(&["checkpoint", "--dir", path_str(&small_dir), "--json"]);
    assert_eq!(
        out.code,
        Some(1),
        "checkpoint onto a full disk\n{}",
        out.describe()
    );
    assert_one_line_error(&out, "checkpoint onto a full disk");
    assert!(
        out.stderr.contains("no space left") || out.stderr.contains("disk is full"),
        "the message should say the disk is full\n{}",
        out.describe()
    );
    assert_names(&out.stderr, &[path_str(&small_dir), "ckpt-000001"]);
    assert!(
        file_names(&small_dir).is_empty(),
        "a failed checkpoint left files: {:?}",
        file_names(&small_dir)
    );
    assert_eq!(vm.state(), "running", "after the failed checkpoint");
    let_guest_work(&vm, vm.progress());
    assert_verifies(&vm, "after the failed checkpoint");

    // The failed checkpoint does not count: the VM's chain in the roomy
    // directory goes on from checkpoint 1, and holds every page dirtied
    // since, also those dirtied before the failure.
    let second = take_checkpoint(&vm, roomy.path(), &[]);
    assert_eq!(
        (second.id(), second.parent(), second.kind()),
        (2, Some(first.id()), "incremental"),
        "{}",
        second.report
    );
    let elsewhere = take_checkpoint(&vm, fresh.path(), &[]);
    assert_eq!(
        (elsewhere.id(), elsewhere.parent(), elsewhere.kind()),
        (1, None, "full"),
        "{}",
        elsewhere.report
    );
    drop(vm);
    let r = restore(roomy.path(), 2, &["--paused"]);
    check_restored_then_resume(&r, &second, "restore of the checkpoint after a full disk");
}
