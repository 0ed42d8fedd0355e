//! The soak run: one `builtin:dirty` guest (2 vCPUs, two guest nodes) put
//! through a long random mix of every operation vmhop has — full and
//! incremental checkpoints, lazy and eager restores of random ids into a
//! new process, NUMA moves in every mode, pause/resume, merges and host
//! migrations into a new process — with `verify` after every step and the
//! guest's progress checked to continue.
//!
//! Beside it runs a `builtin:disk` guest (2 vCPUs, two guest nodes, a raw
//! image in the run's directory): its steps are NUMA moves in every mode,
//! pause/resume, and a checkpoint-and-restore (a full checkpoint into a
//! fresh directory, the guest writing on, an incremental one, then a lazy
//! or an eager restore of either into a new process that replaces the
//! VM), each followed by `verify` of its memory and disk (every block it
//! uses, its read slots, no I/O error) and its progress checked to move on
//! — after a restore from the checkpoint's moment: its progress and
//! completed requests at least what they were just before that checkpoint.
//! Disk guests take no migration steps yet.
//!
//! "Continue" depends on the step. The guest's `progress` counter lives in
//! guest memory, so:
//! - after a checkpoint, NUMA move or pause/resume it never goes back and
//!   moves on;
//! - after a restore of checkpoint K it is K's moment: between the progress
//!   seen just before and just after K was taken (a merge of K holds K's
//!   moment too), and moves on from there;
//! - after a migration it is at least the source's last progress.
//!
//! Steps: `VMHOP_SOAK_STEPS` (default 100); seed: `VMHOP_SOAK_SEED`
//! (default random), printed first. On a violation the seed, the step and
//! the whole step history are printed before the test fails, so the run can
//! be repeated exactly (`scripts/soak.sh STEPS SEED`).

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{one_json_object_in, vmhop, CmdOutput, Vm};
use serde_json::Value;

/// Steps of a run when `VMHOP_SOAK_STEPS` is not set (the suite's run).
const DEFAULT_STEPS: u64 = 100;

/// The VM every run starts with; restores and migrations keep its shape.
const VM_ARGS: &[&str] = &[
    "--vcpus",
    "2",
    "--numa",
    "guest-node=0,size=64M,host-node=0",
    "--numa",
    "guest-node=1,size=64M,host-node=0",
    "--guest",
    "builtin:dirty",
];

/// The disk guest beside it (its `--disk` is added at start).
const DISK_VM_ARGS: &[&str] = &[
    "--vcpus",
    "2",
    "--numa",
    "guest-node=0,size=32M,host-node=0",
    "--numa",
    "guest-node=1,size=32M,host-node=0",
    "--guest",
    "builtin:disk,size=1M",
];

/// The disk guest's image (its guest uses the first 1 MiB: 256 blocks,
/// so its read-backs mostly find blocks it wrote).
const DISK_IMAGE_BYTES: u64 = 16 << 20;

/// Bound for a running guest to show progress, or a lazy restore to load.
const PROGRESS_WAIT: Duration = Duration::from_secs(10);

/// Checkpoints (merges included) per directory before the run moves on to a
/// fresh one. Each checkpoint of this guest is up to its 128 MiB, and the
/// directory before the previous one is deleted, so a run of any length
/// keeps at most two directories' worth on disk.
const CHECKPOINTS_PER_DIR: usize = 6;

/// splitmix64: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One kind of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    CheckpointFull,
    CheckpointIncremental,
    RestoreLazy,
    RestoreEager,
    NumaLive,
    NumaStopCopy,
    NumaKernel,
    PauseResume,
    Merge,
    Migrate,
    DiskNumaLive,
    DiskNumaStopCopy,
    DiskNumaKernel,
    DiskPauseResume,
    DiskCheckpointRestore,
}

/// Which of the run's two VMs a step acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    /// The `builtin:dirty` guest that every operation moves.
    Dirty,
    /// The `builtin:disk` guest.
    Disk,
}

/// Each operation with its weight in the random mix.
const MIX: &[(Op, u64)] = &[
    (Op::CheckpointFull, 2),
    (Op::CheckpointIncremental, 3),
    (Op::RestoreLazy, 3),
    (Op::RestoreEager, 2),
    (Op::NumaLive, 2),
    (Op::NumaStopCopy, 2),
    (Op::NumaKernel, 2),
    (Op::PauseResume, 3),
    (Op::Merge, 2),
    (Op::Migrate, 2),
    (Op::DiskNumaLive, 1),
    (Op::DiskNumaStopCopy, 1),
    (Op::DiskNumaKernel, 1),
    (Op::DiskPauseResume, 1),
    (Op::DiskCheckpointRestore, 1),
];

fn choose(rng: &mut Rng) -> Op {
    let total: u64 = MIX.iter().map(|(_, w)| w).sum();
    let mut r = rng.below(total);
    for &(op, w) in MIX {
        if r < w {
            return op;
        }
        r -= w;
    }
    unreachable!("r < total")
}

/// A checkpoint the run can restore: its id and the progress window of its
/// moment.
#[derive(Debug, Clone, Copy)]
struct Moment {
    id: u64,
    before: u64,
    after: u64,
}

/// What the run knows of the VM's previous checkpoint, which decides
/// whether the next one is incremental.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Previous {
    /// None in the current directory: the next checkpoint is full.
    None,
    /// This id, in the current directory: the next is incremental on it.
    Id(u64),
    /// Not known to the run (after a migration).
    Unknown,
}

/// A failed check: what the step saw.
type Violation = String;

struct Soak {
    root: tempfile::TempDir,
    vm: Vm,
    /// The disk guest, and the lowest progress it may show now.
    disk: Vm,
    disk_floor: u64,
    /// The lowest count of completed disk requests its verify may show.
    disk_requests: u64,
    /// The disk guest's checkpoint directories so far (one per
    /// checkpoint-and-restore step).
    disk_dirs: Vec<PathBuf>,
    /// The current checkpoint directory and the ones before it.
    dirs: Vec<PathBuf>,
    moments: Vec<Moment>,
    previous: Previous,
    /// The lowest progress the guest may show now.
    floor: u64,
    migrations: u64,
    rng: Rng,
}

/// A client command's JSON report, or a violation with its output.
fn report(out: &CmdOutput, what: &str) -> Result<Value, Violation> {
    if out.code != Some(0) {
        return Err(format!("{what} failed\n{}", out.describe()));
    }
    Ok(one_json_object_in(&out.stdout, &what))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("tempdir paths are UTF-8")
}

fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(msg())
    }
}

impl Soak {
    fn new(seed: u64) -> Soak {
        let root = tempfile::Builder::new()
            .prefix("vmhop-soak-")
            .tempdir()
            .expect("create the soak directory");
        let vm = Vm::start(VM_ARGS);
        let first = vm.wait_progress_above(0, PROGRESS_WAIT);
        // The image lives on the run's directory's file system (O_DIRECT
        // needs one that takes it: not a tmpfs).
        let image = root.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(DISK_IMAGE_BYTES))
            .expect("create the disk guest's image");
        let disk_arg = format!("path={}", path_str(&image));
        let mut args = DISK_VM_ARGS.to_vec();
        args.extend_from_slice(&["--disk", &disk_arg]);
        let disk = Vm::start(&args);
        let disk_floor = disk.wait_progress_above(0, PROGRESS_WAIT);
        let mut s = Soak {
            root,
            vm,
            disk,
            disk_floor,
            disk_requests: 0,
            disk_dirs: Vec::new(),
            dirs: Vec::new(),
            moments: Vec::new(),
            previous: Previous::None,
            floor: first,
            migrations: 0,
            rng: Rng(seed),
        };
        s.new_dir();
        s
    }

    fn dir(&self) -> &Path {
        self.dirs.last().expect("a checkpoint directory")
    }

    /// Moves on to a fresh checkpoint directory, deleting the one before
    /// the previous.
    fn new_dir(&mut self) {
        let d = self.root.path().join(format!("ck{}", self.dirs.len()));
        self.dirs.push(d);
        if self.dirs.len() >= 3 {
            let old = &self.dirs[self.dirs.len() - 3];
            let _ = std::fs::remove_dir_all(old);
        }
        self.moments.clear();
        self.previous = Previous::None;
    }

    /// The guest's progress, which must not be below the floor.
    fn progress(&self, when: &str) -> Result<u64, Violation> {
        self.progress_of(Which::Dirty, when)
    }

    fn vm_of(&self, w: Which) -> &Vm {
        match w {
            Which::Dirty => &self.vm,
            Which::Disk => &self.disk,
        }
    }

    fn floor_of(&self, w: Which) -> u64 {
        match w {
            Which::Dirty => self.floor,
            Which::Disk => self.disk_floor,
        }
    }

    /// `w`'s guest's progress, which must not be below its floor.
    fn progress_of(&self, w: Which, when: &str) -> Result<u64, Violation> {
        let p = self.vm_of(w).progress();
        let floor = self.floor_of(w);
        ensure(p >= floor, || {
            format!("{when}: {w:?} guest's progress went back to {p}, below {floor} seen before")
        })?;
        Ok(p)
    }

    /// Runs a client command, retrying while a lazy restore still loads
    /// (pause, resume, verify and NUMA moves answer 409 meanwhile).
    fn cli_when_loaded(&self, args: &[&str]) -> CmdOutput {
        self.cli_when_loaded_on(Which::Dirty, args)
    }

    /// [`Self::cli_when_loaded`] on `w`.
    fn cli_when_loaded_on(&self, w: Which, args: &[&str]) -> CmdOutput {
        let deadline = Instant::now() + PROGRESS_WAIT;
        loop {
            let out = self.vm_of(w).cli(args);
            let busy = out.code == Some(1)
                && (out.stderr.contains("in progress") || out.stderr.contains("being loaded"));
            if !busy || Instant::now() >= deadline {
                return out;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn verify(&self, when: &str) -> Result<(), Violation> {
        let out = self.cli_when_loaded(&["verify", "--json"]);
        let r = report(&out, &format!("{when}: verify"))?;
        ensure(
            r["ok"] == true && r["pages_checked"].as_u64().unwrap_or(0) > 0,
            || format!("{when}: verify: {r}\n{}", self.vm.logs()),
        )
    }

    /// The disk guest's verify: memory and every block it uses consistent,
    /// no I/O error, no bad read-back, its completed disk requests not
    /// below the floor; returns them.
    fn verify_disk(&self, when: &str) -> Result<u64, Violation> {
        let out = self.cli_when_loaded_on(Which::Disk, &["verify", "--json"]);
        let r = report(&out, &format!("{when}: verify of the disk guest"))?;
        let d = &r["disk"];
        let blocks = d["blocks"].as_u64().unwrap_or(0);
        ensure(
            r["ok"] == true
                && r["pages_checked"].as_u64().unwrap_or(0) > 0
                && blocks > 0
                && d["blocks_checked"].as_u64() == Some(blocks)
                && d["io_errors"] == 0
                && d["guest_errors"] == 0,
            || {
                format!(
                    "{when}: verify of the disk guest: {r}\n{}",
                    self.disk.logs()
                )
            },
        )?;
        let requests = d["requests"].as_u64().unwrap_or(0);
        ensure(requests >= self.disk_requests, || {
            format!(
                "{when}: the disk guest's requests went back to {requests}, below {} seen before",
                self.disk_requests
            )
        })?;
        Ok(requests)
    }

    /// The checks after a disk guest's step: running, memory and disk
    /// consistent, moving on.
    fn after_disk_step(&mut self) -> Result<String, Violation> {
        let requests = self.verify_disk("after the step")?;
        let state = self.disk.state();
        ensure(state == "running", || {
            format!("after the step the disk guest is {state}")
        })?;
        let p = self.progress_of(Which::Disk, "after the step")?;
        let q = self.disk.wait_progress_above(p, PROGRESS_WAIT);
        self.disk_floor = q;
        // Progress counts the sweeping vCPU's pages too: the disk itself
        // must move on.
        let deadline = Instant::now() + PROGRESS_WAIT;
        let more = loop {
            let n = self.verify_disk("after the step, the disk moving on")?;
            if n > requests {
                break n;
            }
            ensure(Instant::now() < deadline, || {
                format!("the disk guest stayed at {n} requests for {PROGRESS_WAIT:?}")
            })?;
            thread::sleep(Duration::from_millis(20));
        };
        self.disk_requests = more;
        Ok(format!("disk guest progress {q}, disk requests {more}"))
    }

    /// The checks after every step: running, consistent, moving on.
    fn after_step(&mut self) -> Result<String, Violation> {
        self.verify("after the step")?;
        let state = self.vm.state();
        ensure(state == "running", || {
            format!("after the step the VM is {state}")
        })?;
        let p = self.progress("after the step")?;
        let q = self.vm.wait_progress_above(p, PROGRESS_WAIT);
        self.floor = q;
        Ok(format!("progress {q}"))
    }

    /// `op`, or a checkpoint when `op` needs one and the directory has none.
    fn feasible(&self, op: Op) -> Op {
        match op {
            Op::RestoreLazy | Op::RestoreEager | Op::Merge if self.moments.is_empty() => {
                Op::CheckpointFull
            }
            op => op,
        }
    }

    fn step(&mut self, op: Op) -> Result<String, Violation> {
        let what = match op {
            Op::CheckpointFull => self.checkpoint(true)?,
            Op::CheckpointIncremental => self.checkpoint(false)?,
            Op::RestoreLazy => self.restore(false)?,
            Op::RestoreEager => self.restore(true)?,
            Op::NumaLive => self.numa(Which::Dirty, "live")?,
            Op::NumaStopCopy => self.numa(Which::Dirty, "stop-copy")?,
            Op::NumaKernel => self.numa(Which::Dirty, "kernel")?,
            Op::PauseResume => self.pause_resume(Which::Dirty)?,
            Op::Merge => self.merge()?,
            Op::Migrate => self.migrate()?,
            Op::DiskNumaLive => self.numa(Which::Disk, "live")?,
            Op::DiskNumaStopCopy => self.numa(Which::Disk, "stop-copy")?,
            Op::DiskNumaKernel => self.numa(Which::Disk, "kernel")?,
            Op::DiskPauseResume => self.pause_resume(Which::Disk)?,
            Op::DiskCheckpointRestore => self.disk_checkpoint_restore()?,
        };
        let after = match op {
            Op::DiskNumaLive
            | Op::DiskNumaStopCopy
            | Op::DiskNumaKernel
            | Op::DiskPauseResume
            | Op::DiskCheckpointRestore => self.after_disk_step()?,
            _ => self.after_step()?,
        };
        Ok(format!("{what}; {after}"))
    }

    fn checkpoint(&mut self, full: bool) -> Result<String, Violation> {
        if self.moments.len() >= CHECKPOINTS_PER_DIR {
            self.new_dir();
        }
        let dir = path_str(self.dir()).to_string();
        let mut args = vec!["checkpoint", "--dir", &dir, "--json"];
        if full {
            args.push("--full");
        }
        let before = self.progress("before the checkpoint")?;
        let out = self.vm.cli(&args);
        let after = self.progress("after the checkpoint")?;
        let r = report(&out, "checkpoint")?;
        let id = r["id"].as_u64().ok_or(format!("checkpoint id: {r}"))?;
        let expected = match (full, self.previous) {
            (true, _) | (_, Previous::None) => Some(("full", Value::Null)),
            (false, Previous::Id(p)) => Some(("incremental", Value::from(p))),
            (false, Previous::Unknown) => None,
        };
        if let Some((kind, parent)) = expected {
            ensure(r["kind"] == kind && r["parent"] == parent, || {
                format!("expected a {kind} checkpoint on {parent}, got {r}")
            })?;
        }
        self.moments.push(Moment { id, before, after });
        self.previous = Previous::Id(id);
        Ok(format!(
            "{} checkpoint {id} (parent {}) in {}, progress {before}..{after}",
            r["kind"].as_str().unwrap_or("?"),
            r["parent"],
            dir
        ))
    }

    fn restore(&mut self, eager: bool) -> Result<String, Violation> {
        let m = *self.rng.pick(&self.moments);
        let target = format!("{}@{}", path_str(self.dir()), m.id);
        let mut args = vec!["--paused"];
        if eager {
            args.push("--eager");
        }
        let new = Vm::start_command(&["restore", &target], &args);
        let old = std::mem::replace(&mut self.vm, new);
        let stopped = old.cli(&["stop"]);
        let mut old = old;
        ensure(stopped.code == Some(0), || {
            format!("stop of the old VM failed\n{}", stopped.describe())
        })?;
        let status = old.wait_exit();
        ensure(status.success(), || {
            format!("the old VM exited with {status}\n{}", old.logs())
        })?;
        drop(old);

        let state = self.vm.state();
        ensure(state == "paused", || {
            format!("restored with --paused, the VM is {state}")
        })?;
        let p = self.vm.progress();
        ensure(m.before <= p && p <= m.after, || {
            format!(
                "restore of {target}: progress {p} is outside [{}, {}], the checkpoint's moment",
                m.before, m.after
            )
        })?;
        self.verify("the restored VM, paused")?;
        let again = self.vm.progress();
        ensure(again == p, || {
            format!("a paused restored VM moved from {p} to {again}")
        })?;
        let out = self.cli_when_loaded(&["resume"]);
        ensure(out.code == Some(0), || {
            format!("resume after restore failed\n{}", out.describe())
        })?;
        self.floor = p;
        self.previous = Previous::Id(m.id);
        Ok(format!(
            "{} restore of {target}, progress {p} in [{}, {}]",
            if eager { "eager" } else { "lazy" },
            m.before,
            m.after
        ))
    }

    /// The disk guest: a full checkpoint into a fresh directory, more
    /// requests, an incremental one, then a lazy or eager restore of either
    /// (its disk into a new file beside the checkpoints) replacing the VM.
    /// The restored guest starts paused: it must verify, memory and disk
    /// together, at the checkpoint's moment, before it resumes.
    fn disk_checkpoint_restore(&mut self) -> Result<String, Violation> {
        let dir = self
            .root
            .path()
            .join(format!("disk-ck{}", self.disk_dirs.len()));
        let dir_s = path_str(&dir).to_string();
        // (requests, progress) just before each checkpoint.
        let mut moments = Vec::new();
        for full in [true, false] {
            let requests = self.verify_disk("before a disk checkpoint")?;
            let progress = self.progress_of(Which::Disk, "before a disk checkpoint")?;
            let mut args = vec!["checkpoint", "--dir", &dir_s, "--json"];
            if full {
                args.push("--full");
            }
            let r = report(&self.disk.cli(&args), "checkpoint of the disk guest")?;
            let id = r["id"].as_u64().ok_or(format!("checkpoint id: {r}"))?;
            moments.push((id, requests, progress));
            // The guest writes on before the next checkpoint.
            let deadline = Instant::now() + PROGRESS_WAIT;
            while self.verify_disk("after a disk checkpoint")? <= requests {
                ensure(Instant::now() < deadline, || {
                    format!("the disk guest stayed at {requests} requests after checkpoint {id}")
                })?;
                thread::sleep(Duration::from_millis(20));
            }
        }
        let &(id, requests, progress) = self.rng.pick(&moments);
        let eager = self.rng.below(2) == 1;
        let target = format!("{dir_s}@{id}");
        let mut args = vec!["--paused"];
        if eager {
            args.push("--eager");
        }
        let new = Vm::start_command(&["restore", &target], &args);
        let mut old = std::mem::replace(&mut self.disk, new);
        let stopped = old.cli(&["stop"]);
        ensure(stopped.code == Some(0), || {
            format!("stop of the old disk VM failed\n{}", stopped.describe())
        })?;
        let status = old.wait_exit();
        ensure(status.success(), || {
            format!("the old disk VM exited with {status}\n{}", old.logs())
        })?;
        drop(old);
        // The directory before this one served the VM just stopped.
        self.disk_dirs.push(dir);
        if self.disk_dirs.len() >= 2 {
            let _ = std::fs::remove_dir_all(&self.disk_dirs[self.disk_dirs.len() - 2]);
        }
        self.disk_floor = progress;
        self.disk_requests = requests;
        let state = self.disk.state();
        ensure(state == "paused", || {
            format!("the disk guest restored with --paused is {state}")
        })?;
        let at = self.verify_disk("the restored disk guest, paused")?;
        let out = self.cli_when_loaded_on(Which::Disk, &["resume"]);
        ensure(out.code == Some(0), || {
            format!(
                "resume of the restored disk guest failed\n{}",
                out.describe()
            )
        })?;
        Ok(format!(
            "{} restore of {target} (taken at {requests} requests): {at} requests",
            if eager { "eager" } else { "lazy" }
        ))
    }

    /// Waits until a lazy restore has loaded all memory.
    fn wait_loaded(&self) -> Result<(), Violation> {
        let deadline = Instant::now() + PROGRESS_WAIT;
        while self.vm.status()["loading"] == true {
            if Instant::now() >= deadline {
                return Err(format!("still loading after {PROGRESS_WAIT:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn numa(&mut self, w: Which, mode: &str) -> Result<String, Violation> {
        if w == Which::Dirty {
            self.wait_loaded()?;
        }
        let guest_node = *self.rng.pick(&[None, Some("0"), Some("1")]);
        let mut args = vec!["numa-migrate", "--to-node", "0", "--mode", mode, "--json"];
        if let Some(g) = guest_node {
            args.extend_from_slice(&["--guest-node", g]);
        }
        let before = self.progress_of(w, "before the NUMA move")?;
        let out = self.cli_when_loaded_on(w, &args);
        let r = report(&out, "numa-migrate")?;
        ensure(r["mode"] == mode, || format!("NUMA move report: {r}"))?;
        let s = self.vm_of(w).status();
        let on0 = s["numa"]
            .as_array()
            .is_some_and(|n| n.len() == 2 && n.iter().all(|g| g["host_node"] == 0));
        ensure(on0, || format!("after the NUMA move: {s}"))?;
        Ok(format!(
            "NUMA move {mode} of the {w:?} guest's node {} from progress {before}: {} pages, downtime {} µs",
            guest_node.unwrap_or("all"),
            r["pages_moved"],
            r["downtime_us"]
        ))
    }

    fn pause_resume(&mut self, w: Which) -> Result<String, Violation> {
        let out = self.cli_when_loaded_on(w, &["pause"]);
        ensure(out.code == Some(0), || {
            format!("pause failed\n{}", out.describe())
        })?;
        let state = self.vm_of(w).state();
        ensure(state == "paused", || {
            format!("after pause the {w:?} guest's VM is {state}")
        })?;
        let p = self.progress_of(w, "paused")?;
        match w {
            Which::Dirty => self.verify("paused")?,
            Which::Disk => self.verify_disk("paused").map(|_| ())?,
        }
        thread::sleep(Duration::from_millis(20));
        let q = self.progress_of(w, "still paused")?;
        ensure(p == q, || {
            format!("a paused {w:?} guest moved from {p} to {q}")
        })?;
        let out = self.cli_when_loaded_on(w, &["resume"]);
        ensure(out.code == Some(0), || {
            format!("resume failed\n{}", out.describe())
        })?;
        Ok(format!("pause of the {w:?} guest at {p}, verify, resume"))
    }

    fn merge(&mut self) -> Result<String, Violation> {
        let m = *self.rng.pick(&self.moments);
        let target = format!("{}@{}", path_str(self.dir()), m.id);
        let out = vmhop(&["merge", &target, "--json"]);
        let r = report(&out, "merge")?;
        let id = r["id"].as_u64().ok_or(format!("merge id: {r}"))?;
        let newest = self.moments.iter().map(|m| m.id).max().unwrap_or(0);
        ensure(id > newest, || {
            format!("merge of {target} took id {id}, not after {newest}: {r}")
        })?;
        // The merged checkpoint holds m's moment; the VM's own chain is
        // unchanged.
        self.moments.push(Moment { id, ..m });
        Ok(format!("merge of {target} into {id}"))
    }

    fn migrate(&mut self) -> Result<String, Violation> {
        self.wait_loaded()?;
        self.migrations += 1;
        let sock = self
            .root
            .path()
            .join(format!("migration-{}.sock", self.migrations));
        let addr = format!("unix:{}", path_str(&sock));
        let dst = Vm::start(&["--incoming", &addr]);
        let before = self.progress("before the migration")?;
        let out = self.vm.cli(&["migrate", "--to", &addr, "--json"]);
        let r = report(&out, "migrate").map_err(|e| format!("{e}\n{}", dst.logs()))?;
        let mut src = std::mem::replace(&mut self.vm, dst);
        let status = src.wait_exit();
        ensure(status.success(), || {
            format!(
                "the migration's source exited with {status}\n{}",
                src.logs()
            )
        })?;
        drop(src);
        let state = self.vm.state();
        ensure(state == "running", || {
            format!("after the migration the destination is {state}")
        })?;
        // At least the source's last progress (the floor is still the
        // source's).
        let p = self.progress("the destination")?;
        self.previous = Previous::Unknown;
        Ok(format!(
            "migration to {addr} from progress {before}: rounds {}, downtime {} µs, now {p}",
            r["rounds"], r["downtime_us"]
        ))
    }
}

fn seed_from_env() -> u64 {
    match std::env::var("VMHOP_SOAK_SEED") {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("VMHOP_SOAK_SEED={s:?}: {e}"))
        }
        _ => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            Rng(t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32).next()
        }
    }
}

fn steps_from_env() -> u64 {
    match std::env::var("VMHOP_SOAK_STEPS") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("VMHOP_SOAK_STEPS={s:?}: {e}")),
        _ => DEFAULT_STEPS,
    }
}

/// Why a step failed: its violation or a panic message from a helper.
fn failure_text(r: thread::Result<Result<String, Violation>>) -> Option<String> {
    match r {
        Ok(Ok(_)) => None,
        Ok(Err(v)) => Some(v),
        Err(p) => Some(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into()),
        ),
    }
}

#[test]
fn a_random_mix_of_every_operation_keeps_the_guest_consistent_and_moving() {
    let seed = seed_from_env();
    let steps = steps_from_env();
    println!("soak: seed {seed} (0x{seed:x}), {steps} steps");
    let started = Instant::now();
    let mut soak = Soak::new(seed);
    let mut history: Vec<String> = Vec::new();
    // Per operation: steps and their total time.
    let mut counts: BTreeMap<String, (u64, Duration)> = BTreeMap::new();
    for n in 1..=steps {
        let chosen = choose(&mut soak.rng);
        let op = soak.feasible(chosen);
        let t = Instant::now();
        let r = panic::catch_unwind(AssertUnwindSafe(|| soak.step(op)));
        let ms = t.elapsed().as_millis();
        match r {
            Ok(Ok(line)) => {
                let line = format!("step {n}: {op:?} ({ms} ms): {line}");
                println!("{line}");
                history.push(line);
                let c = counts.entry(format!("{op:?}")).or_default();
                c.0 += 1;
                c.1 += t.elapsed();
            }
            failed => {
                let why = failure_text(failed).unwrap_or_default();
                let mut text = String::new();
                let _ = writeln!(text, "soak VIOLATION at step {n} ({op:?}), seed {seed}");
                let _ = writeln!(text, "repeat with: scripts/soak.sh {steps} {seed}");
                let _ = writeln!(text, "--- history ---");
                for h in &history {
                    let _ = writeln!(text, "{h}");
                }
                let _ = writeln!(text, "step {n}: {op:?} ({ms} ms): FAILED");
                let _ = writeln!(text, "--- violation ---\n{why}");
                let _ = writeln!(text, "--- VM logs ---\n{}", soak.vm.logs());
                let _ = writeln!(text, "--- disk guest's VM logs ---\n{}", soak.disk.logs());
                eprintln!("{text}");
                panic!("soak violation at step {n} ({op:?}), seed {seed}: see the history above");
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "soak: done: seed {seed}, {steps} steps, {secs:.1} s, 0 violations, {} migrations",
        soak.migrations
    );
    for (op, (n, total)) in &counts {
        let mean = total.as_secs_f64() * 1000.0 / *n as f64;
        println!("soak:   {op}: {n} steps, mean {mean:.0} ms");
    }
}
