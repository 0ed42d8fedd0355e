//! `vmhop demo`: the project's main job shown end to end on a builtin guest
//! (this file), or on a Linux guest with `--kernel` (`linux.rs`).
//!
//! Owns: the demo's script (start, pause/verify/resume, checkpoints, lazy
//! restore, NUMA moves, stop), its temporary work directory, the child
//! `vmhop` processes it starts (and their clean-up on every path: success,
//! failure, Ctrl-C), and the compact text or `--json` it prints.
//!
//! Does not own any VM work. Like a user, it starts real `vmhop run` and
//! `vmhop restore` child processes (this same binary) on private API sockets
//! and drives them through the HTTP API; it only checks and renders the
//! reports they return. A step that fails ends the demo with a message
//! naming the step (exit 1); the VMs are stopped whatever happens.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

mod linux;

use clap::Args;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use super::{CliError, CliResult};
use crate::api::checkpoint::{
    CheckpointKind as Kind, CheckpointReport, CheckpointRequest, RestoreReport,
};
use crate::api::client::{call, ClientError};
use crate::api::numa::{
    Mode, NumaMigrateReport, NumaMigrateRequest, NumaStatReport, TopologyReport, VcpuStat,
};
use crate::api::run::Local;
use crate::api::vm::{StateReply, StatusReport, VerifyReport, VmState as RunState};
use crate::api::PREFIX;
use crate::util::{format_cpu_list, format_size, parse_size};

/// Guest dirty rate (pages/s) in an optimised build: fast enough that the
/// checkpoints and live moves have real work to chase, slow enough that the
/// numbers stay readable and every pre-copy converges. At 50 000 pages/s
/// (200 MiB/s) the guest dirties memory about as fast as this machine's
/// disk takes a checkpoint, and the checkpoint rounds then chase it for
/// seconds.
const RELEASE_RATE: u64 = 20_000;
/// Guest dirty rate in a debug build, whose checkpoint copy and checksums
/// run about ten times slower: at the release rate the guest would re-dirty
/// all its memory during every copy round and no checkpoint would converge.
const DEBUG_RATE: u64 = 5_000;

/// Steps of the demo, for the `[n/6]` headers.
const STEPS: u32 = 6;
/// Name of the VM the demo boots (and of its restored twin).
const VM_NAME: &str = "demo";
const RESTORED_NAME: &str = "demo-restored";

/// How long the guest is watched right after it starts.
const FIRST_WATCH: Duration = Duration::from_secs(1);
/// How long progress is watched to show it grows again.
const WATCH: Duration = Duration::from_millis(500);
/// How long progress is watched to show it is frozen while paused.
const FROZEN_WATCH: Duration = Duration::from_millis(300);
/// How long the guest runs between the full and the incremental checkpoint.
const RUN_BETWEEN_CHECKPOINTS: Duration = Duration::from_millis(500);
/// How long the original VM runs on after the incremental checkpoint, so
/// that the restored VM visibly goes back in time.
const RUN_BEFORE_STOP: Duration = Duration::from_secs(1);

/// How long a child VM may take to print its start report.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped child VM may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a child VM gets after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Bound on quick API calls (status, pause, resume, stop).
const QUICK: Duration = Duration::from_secs(10);
/// Bound on long API calls (verify, checkpoint, NUMA moves): far above what
/// they take, only there so a wedged VM cannot hang the demo.
const LONG: Duration = Duration::from_secs(180);
/// How long to keep retrying an action the VM refuses with 409 because it
/// is busy (a lazy restore loads its pages in the background meanwhile).
const BUSY_WAIT: Duration = Duration::from_secs(60);
/// Pause between such retries, and between polls of a child's exit.
const POLL: Duration = Duration::from_millis(25);
/// Lines of a failed child's log quoted in the error.
const LOG_TAIL_LINES: usize = 8;

/// What is said when a move cannot change node.
const ONE_NODE_NOTE: &str =
    "this host has one NUMA node: moving node 0 to node 0 still exercises the copy path";

/// Options of `vmhop demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Guest memory (K, M, G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Pages per second the guest writes [default: 20000; 5000 in a debug build].
    #[arg(long, value_name = "PAGES_PER_S")]
    pub rate: Option<u64>,
    /// Keep the work directory (checkpoints, VM logs) instead of removing it.
    #[arg(long)]
    pub keep_dir: bool,
    /// Print one JSON object with every report, instead of text.
    #[arg(long)]
    pub json: bool,
    /// Show the job on a Linux guest booted from this kernel instead
    /// (hardware-assisted KVM only; says so on a paravirtualised one).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// With --kernel: the initramfs (default: one the demo packs from the
    /// host's static busybox, whose checker prints a heartbeat).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// With --kernel: the kernel command line.
    #[arg(long, value_name = "STRING", requires = "kernel")]
    pub cmdline: Option<String>,
}

/// Why the demo failed; each message names the step and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The work directory could not be made.
    #[error("cannot create the demo's work directory {}: {source}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The path of this binary is unknown, so no VM can be started.
    #[error("cannot find the vmhop binary to start VMs with: {0}")]
    Exe(std::io::Error),
    /// A child's log file could not be created.
    #[error("cannot create the VM log {}: {source}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A child process could not be started.
    #[error("cannot start `vmhop {what}`: {source}")]
    Spawn {
        /// The subcommand.
        what: String,
        /// The OS error from fork/exec.
        source: std::io::Error,
    },
    /// A child VM never served its API.
    #[error("`vmhop {what}` did not come up: {reason}{log}")]
    NotUp {
        /// The subcommand.
        what: String,
        /// What happened instead.
        reason: String,
        /// The end of its log, if any.
        log: String,
    },
    /// An API call failed.
    #[error("{step}: {source}{log}")]
    Api {
        /// The demo step.
        step: String,
        /// The client's error (the server's message for 4xx/5xx).
        source: ClientError,
        /// Whether the VM died, and the end of its log.
        log: String,
    },
    /// An API call answered something that is not the expected report.
    #[error("{step}: unexpected reply from the VM: {reason}")]
    Reply {
        /// The demo step.
        step: String,
        /// The decoding error.
        reason: String,
    },
    /// A report says the step did not do what it should.
    #[error("{step}: {reason}")]
    Check {
        /// The demo step.
        step: String,
        /// What is wrong.
        reason: String,
    },
    /// A child VM did not exit cleanly after `stop`.
    #[error("`vmhop {what}` did not exit cleanly after stop: {reason}{log}")]
    Exit {
        /// The subcommand.
        what: String,
        /// Its exit status, or that it did not exit.
        reason: String,
        /// The end of its log.
        log: String,
    },
    /// The host topology could not be read.
    #[error("cannot read the host NUMA topology: {0}")]
    Topology(String),
    /// `vmhop checkpoints DIR` failed.
    #[error("`vmhop checkpoints {}` failed: {reason}", dir.display())]
    List {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Its exit status and stderr.
        reason: String,
    },
}

/// The host's NUMA nodes, read as a user would: `vmhop topology --json`.
fn read_topology(exe: &Path) -> Result<TopologyReport, DemoError> {
    let o = Command::new(exe)
        .args(["topology", "--json"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DemoError::Topology(e.to_string()))?;
    if !o.status.success() {
        return Err(DemoError::Topology(format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| DemoError::Topology(e.to_string()))
}

/// Runs the demo; exit 1 (with the failed step's message) if any step fails.
pub fn demo(local: &dyn Local, a: DemoArgs) -> CliResult {
    if let Some(kernel) = &a.kernel {
        if let Err(e) = local.linux_capable() {
            return Err(CliError::failed(format!("demo --kernel: {e}")));
        }
        return linux::demo(
            linux::LinuxPlan {
                kernel: kernel.clone(),
                initrd: a.initrd.clone(),
                cmdline: a.cmdline.clone(),
            },
            a.keep_dir,
            a.json,
        );
    }
    let plan = Plan::from_args(&a)?;
    let linux = linux_note(local.linux_capable().err());
    let exe = std::env::current_exe().map_err(|e| CliError::failed(DemoError::Exe(e)))?;
    interrupt::install();
    let work = WorkDir::create(a.keep_dir).map_err(CliError::failed)?;
    let mut d = Demo {
        exe,
        plan,
        out: Out { json: a.json },
        record: Map::new(),
        facts: Facts::default(),
        started: Instant::now(),
        linux,
        work,
    };
    match d.run() {
        Ok(()) => d.finish(),
        Err(e) => {
            let hint = if a.keep_dir {
                format!(
                    "\n  (checkpoints and VM logs kept in {})",
                    d.work.path.display()
                )
            } else {
                "\n  (rerun with --keep-dir to keep the checkpoints and VM logs)".to_string()
            };
            Err(CliError::failed(format!("demo failed: {e}{hint}")))
        }
    }
}

/// The demo's parameters, validated.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    memory: String,
    memory_bytes: u64,
    vcpus: u32,
    rate: u64,
}

impl Plan {
    fn from_args(a: &DemoArgs) -> Result<Plan, CliError> {
        let memory_bytes =
            parse_size(&a.memory).map_err(|e| CliError::usage(format!("--memory: {e}")))?;
        if a.vcpus == 0 {
            return Err(CliError::usage("--vcpus must be at least 1"));
        }
        let rate = a.rate.unwrap_or(if cfg!(debug_assertions) {
            DEBUG_RATE
        } else {
            RELEASE_RATE
        });
        if rate == 0 {
            return Err(CliError::usage("--rate must be at least 1 page per second"));
        }
        Ok(Plan {
            memory: a.memory.clone(),
            memory_bytes,
            vcpus: a.vcpus,
            rate,
        })
    }

    fn guest(&self) -> String {
        format!("builtin:dirty,rate={}", self.rate)
    }
}

/// Text output: nothing with `--json`, whose one object is printed at the end.
struct Out {
    json: bool,
}

impl Out {
    /// Prints text as it is. A reader that went away (`vmhop demo | head`)
    /// must not stop the demo half way: it still has VMs to stop.
    fn raw(&self, s: &str) {
        if !self.json {
            let _ = super::output::out_line(s);
        }
    }

    fn step(&self, n: u32, title: &str) {
        self.step_of(n, STEPS, title);
    }

    /// The header of step `n` of `total`.
    fn step_of(&self, n: u32, total: u32, title: &str) {
        self.raw(&format!("\n[{n}/{total}] {title}"));
    }

    /// Prints each line of `s` indented under the current step.
    fn line(&self, s: impl AsRef<str>) {
        for l in s.as_ref().lines() {
            self.raw(&format!("      {l}"));
        }
    }
}

/// What the summary paragraph is made of.
#[derive(Default)]
struct Facts {
    pause_us: u64,
    verifies: u32,
    full: Option<CheckpointReport>,
    incremental: Option<CheckpointReport>,
    restore_ms: f64,
    one_node: bool,
    /// Each NUMA move's mode and longest pause (µs).
    moves: Vec<(Mode, u64)>,
}

struct Demo {
    exe: PathBuf,
    plan: Plan,
    out: Out,
    /// Every step's reports, for `--json`.
    record: Map<String, Value>,
    facts: Facts,
    started: Instant,
    /// What the demo says of Linux guests on this host.
    linux: String,
    /// Declared last so it is dropped (removed) after everything else.
    work: WorkDir,
}

/// Progress read twice, some time apart.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
struct Watch {
    before: u64,
    after: u64,
    secs: f64,
}

impl Watch {
    fn per_sec(&self) -> u64 {
        if self.secs <= 0.0 {
            return 0;
        }
        (self.after.saturating_sub(self.before) as f64 / self.secs) as u64
    }

    fn text(&self) -> String {
        format!(
            "progress {} → {} pages written in {:.2} s",
            group(self.before),
            group(self.after),
            self.secs
        )
    }

    /// Fails unless the guest made progress between the two reads.
    fn require_growth(&self, step: &str) -> Result<(), DemoError> {
        if self.after > self.before {
            Ok(())
        } else {
            Err(check(
                step,
                format!(
                    "the guest made no progress ({} → {} over {:.2} s)",
                    self.before, self.after, self.secs
                ),
            ))
        }
    }
}

/// What step 3 leaves for step 4.
struct Checkpointed {
    dir: PathBuf,
    id: u32,
    /// Progress read just before and just after the incremental checkpoint.
    before: u64,
    after: u64,
}

impl Demo {
    fn run(&mut self) -> Result<(), DemoError> {
        self.out.raw(&format!(
            "vmhop demo: a {} builtin:dirty guest on {} vCPU(s), writing {} pages/s, driven through\n\
             its HTTP API exactly as the vmhop CLI would (work dir {})",
            format_size(self.plan.memory_bytes),
            self.plan.vcpus,
            group(self.plan.rate),
            self.work.path.display()
        ));
        let mut vm = self.start()?;
        self.pause_verify_resume(&mut vm)?;
        let ck = self.checkpoints(&mut vm)?;
        let mut restored = self.restore(vm, &ck)?;
        self.numa(&mut restored)?;
        self.stop(restored)
    }

    /// Step 1: boot the guest and watch it work.
    fn start(&mut self) -> Result<VmProcess, DemoError> {
        let p = &self.plan;
        self.out.step(
            1,
            &format!(
                "start: vmhop run --guest {} --vcpus {} --memory {}",
                p.guest(),
                p.vcpus,
                p.memory
            ),
        );
        let socket = self.work.path.join("vm.sock");
        let args = [
            "run".into(),
            "--name".into(),
            VM_NAME.into(),
            "--api-socket".into(),
            socket.display().to_string(),
            "--vcpus".into(),
            p.vcpus.to_string(),
            "--memory".into(),
            p.memory.clone(),
            "--guest".into(),
            p.guest(),
            "--json".into(),
        ];
        let t = Instant::now();
        let mut vm = VmProcess::spawn(
            &self.exe,
            "run",
            &args,
            socket,
            self.work.path.join("vm.log"),
        )?;
        let up_ms = t.elapsed().as_secs_f64() * 1e3;
        self.out.line(format!(
            "VM '{VM_NAME}' up in {up_ms:.0} ms (pid {}, API socket {})",
            vm.child.id(),
            vm.socket.display()
        ));
        let w = watch(&mut vm, "watch the new VM", FIRST_WATCH)?;
        w.require_growth("watch the new VM")?;
        self.out
            .line(format!("{} (≈{} pages/s)", w.text(), group(w.per_sec())));
        self.record.insert(
            "start".into(),
            json!({"vm": vm.start, "up_ms": up_ms, "progress": w}),
        );
        Ok(vm)
    }

    /// Step 2: pause, show the guest frozen, verify, resume.
    fn pause_verify_resume(&mut self, vm: &mut VmProcess) -> Result<(), DemoError> {
        self.out.step(2, "pause, verify, resume");
        let p: StateReply = vm.call("pause", "PUT", "vm.pause", None, QUICK)?;
        if p.state != RunState::Paused {
            return Err(check(
                "pause",
                format!("the VM is {:?} after pause", p.state),
            ));
        }
        let pause_us = p.pause_us.unwrap_or(0);
        self.facts.pause_us = pause_us;
        self.out.line(format!(
            "paused: every vCPU stopped in {} µs",
            group(pause_us)
        ));
        let frozen = watch(vm, "watch the paused VM", FROZEN_WATCH)?;
        if frozen.after != frozen.before {
            return Err(check(
                "watch the paused VM",
                format!(
                    "progress moved from {} to {} while paused",
                    frozen.before, frozen.after
                ),
            ));
        }
        self.out.line(format!(
            "progress {} → {} over {:.2} s: frozen",
            group(frozen.before),
            group(frozen.after),
            frozen.secs
        ));
        let v = self.verify(vm, "verify the paused VM")?;
        let r: StateReply = vm.call("resume", "PUT", "vm.resume", None, QUICK)?;
        if r.state != RunState::Running {
            return Err(check(
                "resume",
                format!("the VM is {:?} after resume", r.state),
            ));
        }
        let w = watch(vm, "watch the resumed VM", WATCH)?;
        w.require_growth("watch the resumed VM")?;
        self.out.line(format!("resumed: {}", w.text()));
        self.record.insert(
            "pause".into(),
            json!({"pause_us": pause_us, "frozen": frozen, "verify": v, "resumed": w}),
        );
        Ok(())
    }

    /// Step 3: a full and an incremental checkpoint while the guest runs.
    fn checkpoints(&mut self, vm: &mut VmProcess) -> Result<Checkpointed, DemoError> {
        let dir = self.work.path.join("checkpoints");
        self.out.step(
            3,
            &format!("checkpoints while the VM runs (into {})", dir.display()),
        );
        let full = checkpoint(vm, "full checkpoint", &dir, true)?;
        if full.kind != Kind::Full || full.parent.is_some() {
            return Err(check(
                "full checkpoint",
                format!(
                    "got a {} checkpoint with parent {:?}",
                    full.kind, full.parent
                ),
            ));
        }
        self.out.line(CHECKPOINT_HEADER);
        self.out.line(checkpoint_line(&full));
        thread::sleep(RUN_BETWEEN_CHECKPOINTS);
        let before = progress(vm, "progress before the incremental checkpoint")?;
        let inc = checkpoint(vm, "incremental checkpoint", &dir, false)?;
        let after = progress(vm, "progress after the incremental checkpoint")?;
        if inc.kind != Kind::Incremental || inc.parent != Some(full.id) {
            return Err(check(
                "incremental checkpoint",
                format!(
                    "got a {} checkpoint with parent {:?}, expected an incremental on {}",
                    inc.kind, inc.parent, full.id
                ),
            ));
        }
        self.out.line(checkpoint_line(&inc));
        if full.zero_pages > 0 {
            self.out.line(format!(
                "(zero pages are not stored: the full checkpoint skipped {})",
                group(full.zero_pages)
            ));
        }
        let listing = self.list_checkpoints(&dir)?;
        self.record.insert(
            "checkpoints".into(),
            json!({"full": full, "incremental": inc, "list": listing}),
        );
        let id = inc.id;
        self.facts.full = Some(full);
        self.facts.incremental = Some(inc);
        Ok(Checkpointed {
            dir,
            id,
            before,
            after,
        })
    }

    /// `vmhop checkpoints DIR`, run as a user would; its text is shown as is.
    fn list_checkpoints(&mut self, dir: &Path) -> Result<Value, DemoError> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("checkpoints").arg(dir).stdin(Stdio::null());
        if self.out.json {
            cmd.arg("--json");
        }
        let o = cmd.output().map_err(|e| DemoError::List {
            dir: dir.into(),
            reason: e.to_string(),
        })?;
        if !o.status.success() {
            return Err(DemoError::List {
                dir: dir.into(),
                reason: format!(
                    "{}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            });
        }
        let text = String::from_utf8_lossy(&o.stdout);
        if self.out.json {
            return serde_json::from_str(&text).map_err(|e| DemoError::List {
                dir: dir.into(),
                reason: format!("its --json output is not JSON: {e}"),
            });
        }
        self.out
            .line(format!("$ vmhop checkpoints {}", dir.display()));
        self.out.line(
            text.lines()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        Ok(Value::Null)
    }

    /// Step 4: stop the VM, restore the incremental checkpoint lazily as a
    /// new VM, and show it carries on from the checkpoint.
    fn restore(&mut self, mut vm: VmProcess, ck: &Checkpointed) -> Result<VmProcess, DemoError> {
        self.out.step(
            4,
            &format!("restore checkpoint {} lazily as a new VM", ck.id),
        );
        thread::sleep(RUN_BEFORE_STOP);
        let at_stop = progress(&mut vm, "progress before stopping the VM")?;
        vm.stop("stop the original VM")?;
        self.out.line(format!(
            "original VM stopped at progress {}",
            group(at_stop)
        ));

        let socket = self.work.path.join("restored.sock");
        let target = format!("{}@{}", ck.dir.display(), ck.id);
        let args = [
            "restore".into(),
            target,
            "--name".into(),
            RESTORED_NAME.into(),
            "--api-socket".into(),
            socket.display().to_string(),
            "--json".into(),
        ];
        let mut r = VmProcess::spawn(
            &self.exe,
            "restore",
            &args,
            socket,
            self.work.path.join("restored.log"),
        )?;
        let rep: RestoreReport =
            serde_json::from_value(r.start.get("restore").cloned().unwrap_or(Value::Null))
                .map_err(|e| DemoError::Reply {
                    step: "restore start report".into(),
                    reason: format!("no \"restore\" object ({e}): {}", r.start),
                })?;
        if rep.id != ck.id {
            return Err(check(
                "restore",
                format!("restored checkpoint {} instead of {}", rep.id, ck.id),
            ));
        }
        self.facts.restore_ms = rep.resume_ms;
        self.out.line(format!(
            "restored checkpoint {} from {}: vCPUs running after {:.1} ms ({} pages {})",
            rep.id,
            plural(rep.chain_files as u64, "file"),
            rep.resume_ms,
            group(rep.pages),
            if rep.lazy {
                "load lazily, on first touch or in the background"
            } else {
                "were loaded before the vCPUs ran"
            }
        ));
        let w = watch(&mut r, "watch the restored VM", WATCH)?;
        if w.before < ck.before {
            return Err(check(
                "watch the restored VM",
                format!("its progress {} is below {}, read before the checkpoint was taken: work was lost", w.before, ck.before),
            ));
        }
        w.require_growth("watch the restored VM")?;
        let whence = if w.before < at_stop {
            format!("it continues from the checkpoint (taken at {}–{}), not from where the stopped VM was ({})", group(ck.before), group(ck.after), group(at_stop))
        } else {
            format!(
                "it continues from the checkpoint (taken at {}–{})",
                group(ck.before),
                group(ck.after)
            )
        };
        self.out.line(format!("{}:\n{whence}", w.text()));
        let (v, waited) = verify_when_free(&mut r, "verify the restored VM")?;
        self.facts.verifies += 1;
        let wait_note = if waited.is_zero() {
            String::new()
        } else {
            format!(
                " (waited {:.2} s for the background page load to finish)",
                waited.as_secs_f64()
            )
        };
        self.out.line(format!("{}{wait_note}", verify_text(&v)));
        self.record.insert(
            "restore".into(),
            json!({"report": rep, "progress_at_stop": at_stop, "checkpoint_progress": [ck.before, ck.after], "progress": w, "verify": v, "verify_waited_ms": waited.as_secs_f64() * 1e3}),
        );
        Ok(r)
    }

    /// Step 5: move the guest's memory with each mode, verifying after each.
    fn numa(&mut self, vm: &mut VmProcess) -> Result<(), DemoError> {
        self.out.step(5, "NUMA moves");
        let topo = read_topology(&self.exe)?;
        let nodes: Vec<u32> = topo
            .nodes
            .iter()
            .filter(|n| n.total_bytes > 0)
            .map(|n| n.id)
            .collect();
        self.out.line(format!(
            "host: {} NUMA node(s) with memory: {}",
            nodes.len(),
            topo.nodes
                .iter()
                .filter(|n| n.total_bytes > 0)
                .map(|n| format!(
                    "node {} (CPUs {}, {} free)",
                    n.id,
                    format_cpu_list(&n.cpus),
                    format_size(n.free_bytes)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let status: StatusReport = vm.call("status", "GET", "vm.status", None, QUICK)?;
        let home = status.numa.first().map_or(0, |n| n.host_node);
        let moves = plan_moves(home, &nodes);
        self.facts.one_node = nodes.len() < 2;
        if self.facts.one_node {
            self.out.line(ONE_NODE_NOTE);
        } else {
            let away = moves.first().map_or(home, |m| m.2);
            self.out.line(format!(
                "moving the guest from host node {home} to node {away} and back, with each mode"
            ));
        }
        let stat_before: NumaStatReport =
            vm.call("numa-stat", "GET", "vm.numa-stat", None, LONG)?;
        self.out
            .line(format!("numa-stat before: {}", stat_text(&stat_before)));
        let mut records = Vec::new();
        for (mode, from, to) in moves {
            let step = format!("numa-migrate --mode {} --to-node {to}", mode_name(mode));
            let req = NumaMigrateRequest {
                to_node: to,
                guest_node: None,
                mode,
                max_downtime_ms: None,
            };
            let body = serde_json::to_value(&req).map_err(|e| DemoError::Reply {
                step: step.clone(),
                reason: e.to_string(),
            })?;
            let (rep, _): (NumaMigrateReport, _) =
                vm.call_when_free(&step, "PUT", "vm.numa-migrate", Some(body), LONG)?;
            let (v, _) = verify_when_free(vm, &format!("verify after {step}"))?;
            self.facts.verifies += 1;
            self.out.line(move_text(&rep, from, to, &v));
            let to_key = to.to_string();
            let stray: u64 = rep
                .placement_after
                .iter()
                .filter(|(n, _)| **n != to_key)
                .map(|(_, c)| c)
                .sum();
            if stray > 0 {
                self.out.line(format!(
                    "           note: {} page(s) are still on other nodes",
                    group(stray)
                ));
            }
            records.push(json!({"from": from, "report": rep, "verify": v}));
            self.facts.moves.push((rep.mode, rep.downtime_us));
        }
        let stat_after: NumaStatReport = vm.call("numa-stat", "GET", "vm.numa-stat", None, LONG)?;
        self.out
            .line(format!("numa-stat after:  {}", stat_text(&stat_after)));
        self.record.insert(
            "numa".into(),
            json!({"host_nodes": nodes, "one_node": self.facts.one_node, "stat_before": stat_before, "moves": records, "stat_after": stat_after}),
        );
        Ok(())
    }

    /// Step 6: stop the restored VM.
    fn stop(&mut self, vm: VmProcess) -> Result<(), DemoError> {
        self.out.step(6, "stop");
        vm.stop("stop the restored VM")?;
        self.out.line("VM stopped; its vmhop process exited 0");
        Ok(())
    }

    /// Work dir, summary, JSON.
    fn finish(&mut self) -> CliResult {
        let removed = self.work.remove();
        match &removed {
            Ok(true) => self
                .out
                .line(format!("work dir {} removed", self.work.path.display())),
            Ok(false) => self
                .out
                .line(format!("work dir kept: {}", self.work.path.display())),
            Err(e) => self.out.line(format!("warning: {e}")),
        }
        let total_s = self.started.elapsed().as_secs_f64();
        if self.out.json {
            let mut r = std::mem::take(&mut self.record);
            r.insert("operation".into(), json!("demo"));
            r.insert("ok".into(), json!(true));
            r.insert("total_ms".into(), json!(total_s * 1e3));
            r.insert("work_dir".into(), json!(self.work.path));
            r.insert("work_dir_kept".into(), json!(!matches!(removed, Ok(true))));
            r.insert("linux_guests".into(), json!(self.linux));
            return super::output::print_json(&Value::Object(r));
        }
        self.out
            .raw(&format!("\n{}", summary(&self.plan, &self.facts, total_s)));
        self.out.raw(&format!("\n{}", self.linux));
        Ok(())
    }

    /// Verifies (outside a restore's busy window) and counts it.
    fn verify(&mut self, vm: &mut VmProcess, step: &str) -> Result<VerifyReport, DemoError> {
        let v: VerifyReport = vm.call(step, "PUT", "vm.verify", None, LONG)?;
        require_ok(step, &v)?;
        self.facts.verifies += 1;
        self.out.line(verify_text(&v));
        Ok(v)
    }
}

/// Takes a checkpoint through the API.
fn checkpoint(
    vm: &mut VmProcess,
    step: &str,
    dir: &Path,
    full: bool,
) -> Result<CheckpointReport, DemoError> {
    let req = CheckpointRequest {
        dir: dir.to_path_buf(),
        full,
        stop_after: false,
    };
    let body = serde_json::to_value(&req).map_err(|e| DemoError::Reply {
        step: step.into(),
        reason: e.to_string(),
    })?;
    vm.call(step, "PUT", "vm.checkpoint", Some(body), LONG)
}

/// Verifies, waiting out a lazy restore's background load; fails on violations.
fn verify_when_free(vm: &mut VmProcess, step: &str) -> Result<(VerifyReport, Duration), DemoError> {
    let (v, waited): (VerifyReport, _) = vm.call_when_free(step, "PUT", "vm.verify", None, LONG)?;
    require_ok(step, &v)?;
    Ok((v, waited))
}

fn require_ok(step: &str, v: &VerifyReport) -> Result<(), DemoError> {
    if v.ok && v.pages_checked > 0 {
        return Ok(());
    }
    if v.ok {
        return Err(check(step, "verify checked no pages"));
    }
    let first = v
        .violations
        .first()
        .map(|x| format!("; first: {} {}", x.gpa, x.problem))
        .unwrap_or_default();
    Err(check(
        step,
        format!(
            "memory is inconsistent: {} violation(s) in {} pages checked{first}",
            v.violation_count, v.pages_checked
        ),
    ))
}

fn verify_text(v: &VerifyReport) -> String {
    format!(
        "verify ok: {} pages checked, no violation",
        group(v.pages_checked)
    )
}

fn progress(vm: &mut VmProcess, step: &str) -> Result<u64, DemoError> {
    let s: StatusReport = vm.call(step, "GET", "vm.status", None, QUICK)?;
    Ok(s.guest.progress)
}

/// Two status reads `over` apart.
fn watch(vm: &mut VmProcess, step: &str, over: Duration) -> Result<Watch, DemoError> {
    let before = progress(vm, step)?;
    let t = Instant::now();
    thread::sleep(over);
    let after = progress(vm, step)?;
    Ok(Watch {
        before,
        after,
        secs: t.elapsed().as_secs_f64(),
    })
}

fn check(step: &str, reason: impl Into<String>) -> DemoError {
    DemoError::Check {
        step: step.into(),
        reason: reason.into(),
    }
}

/// The moves of step 5 as (mode, from, to): with two or more memory nodes,
/// to the first other node and back for each mode; with one, in place.
fn plan_moves(home: u32, memory_nodes: &[u32]) -> Vec<(Mode, u32, u32)> {
    let away = memory_nodes.iter().copied().find(|&n| n != home);
    let mut moves = Vec::new();
    for mode in [Mode::Live, Mode::StopCopy, Mode::Kernel] {
        match away {
            Some(a) => {
                moves.push((mode, home, a));
                moves.push((mode, a, home));
            }
            None => moves.push((mode, home, home)),
        }
    }
    moves
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Live => "live",
        Mode::StopCopy => "stop-copy",
        Mode::Kernel => "kernel",
    }
}

/// Column titles over `checkpoint_line`s.
const CHECKPOINT_HEADER: &str =
    "kind          id  parent     pages       size      paused      total  rounds";

/// One checkpoint report as a row under `CHECKPOINT_HEADER`.
fn checkpoint_line(r: &CheckpointReport) -> String {
    format!(
        "{:<11}  {:>3}  {:>6}  {:>8}  {:>9}  {:>7} µs  {:>6} ms  {:>6}",
        r.kind.to_string(),
        r.id,
        r.parent.map_or_else(|| "-".to_string(), |p| p.to_string()),
        group(r.pages_written),
        format_size(r.bytes_written),
        group(r.downtime_us),
        group(r.total_ms.round() as u64),
        r.rounds
    )
}

/// "1 round", "2 rounds".
fn plural(n: u64, what: &str) -> String {
    format!("{} {what}{}", group(n), if n == 1 { "" } else { "s" })
}

/// One NUMA move on two lines: what it did, then placement and verify.
fn move_text(r: &NumaMigrateReport, from: u32, to: u32, v: &VerifyReport) -> String {
    let mut what = format!("{} pages in {:.0} ms", group(r.pages_moved), r.total_ms);
    if r.rounds > 0 {
        what += &format!(", {}", plural(u64::from(r.rounds), "round"));
    }
    what += &match r.pauses {
        0 => "; no pause".to_string(),
        1 => format!("; 1 pause of {} µs", group(r.downtime_us)),
        n => format!(
            "; {n} pauses, longest {} µs ({} µs in all)",
            group(r.downtime_us),
            group(r.paused_total_us)
        ),
    };
    if let Some(b) = &r.batches {
        what += &format!(
            "; {} move_pages calls, median {} µs",
            b.count,
            group(b.median_us)
        );
    }
    if r.fallback_chunks > 0 {
        what += &format!(
            "; did not converge: {} finished by stop-copy",
            plural(u64::from(r.fallback_chunks), "chunk")
        );
    }
    if r.pauses_over_budget > 0 {
        what += &format!(
            "; {} over the {} µs budget",
            plural(u64::from(r.pauses_over_budget), "pause"),
            group(r.max_downtime_us)
        );
    }
    format!(
        "{:<9}  node {from} → {to}: {what}\n           placement {} → {}; verify ok ({} pages)",
        mode_name(r.mode),
        fmt_placement(&r.placement_before),
        fmt_placement(&r.placement_after),
        group(v.pages_checked),
    )
}

fn fmt_placement(p: &BTreeMap<String, u64>) -> String {
    if p.is_empty() {
        return "no pages present".into();
    }
    p.iter()
        .map(|(n, c)| format!("node {n}: {} pages", group(*c)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn stat_text(r: &NumaStatReport) -> String {
    let mut parts: Vec<String> = r
        .guest_nodes
        .iter()
        .map(|g| {
            let np = if g.not_present > 0 {
                format!(", {} not present", group(g.not_present))
            } else {
                String::new()
            };
            format!(
                "guest node {} ({}, policy {}): {}{np}",
                g.guest_node,
                format_size(g.size_bytes),
                g.policy,
                fmt_placement(&g.host_nodes)
            )
        })
        .collect();
    parts.push(fmt_vcpus(&r.vcpus));
    parts.join("; ")
}

/// vCPUs grouped by the CPUs they may run on: "vCPUs 0, 1 on CPUs 0-1".
fn fmt_vcpus(v: &[VcpuStat]) -> String {
    let mut groups: Vec<(&str, Vec<u32>)> = Vec::new();
    for c in v {
        match groups.iter_mut().find(|g| g.0 == c.allowed_cpus) {
            Some(g) => g.1.push(c.id),
            None => groups.push((&c.allowed_cpus, vec![c.id])),
        }
    }
    groups
        .iter()
        .map(|(cpus, ids)| {
            let list = ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "{} {list} on CPUs {cpus}",
                if ids.len() == 1 { "vCPU" } else { "vCPUs" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The closing paragraph.
fn summary(p: &Plan, f: &Facts, total_s: f64) -> String {
    let mut s = format!(
        "Summary: vmhop ran a {} builtin:dirty guest on {} vCPU(s) and checked its memory from the host \
         {} times, always consistent. Pausing stopped every vCPU in {} µs.",
        format_size(p.memory_bytes),
        p.vcpus,
        f.verifies,
        group(f.pause_us)
    );
    if let (Some(full), Some(inc)) = (&f.full, &f.incremental) {
        s += &format!(
            " While it ran, a full checkpoint ({}, guest paused {} µs) and an incremental one ({} of pages \
             dirtied since, paused {} µs) were written; restoring the incremental one lazily as a new VM had its \
             vCPUs running again after {:.1} ms, carrying on from the checkpoint's progress.",
            format_size(full.bytes_written),
            group(full.downtime_us),
            format_size(inc.bytes_written),
            group(inc.downtime_us),
            f.restore_ms
        );
    }
    if !f.moves.is_empty() {
        let mut by_mode: Vec<(Mode, u64)> = Vec::new();
        for &(mode, us) in &f.moves {
            match by_mode.iter_mut().find(|x| x.0 == mode) {
                Some(x) => x.1 = x.1.max(us),
                None => by_mode.push((mode, us)),
            }
        }
        let pauses = by_mode
            .iter()
            .map(|(m, us)| {
                if *us == 0 {
                    format!("{} not at all", mode_name(*m))
                } else {
                    format!("{} at most {} µs", mode_name(*m), group(*us))
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let where_ = if f.one_node {
            "in place on this one-node host"
        } else {
            "to another host node and back"
        };
        s += &format!(
            " Its memory was then re-homed {where_} with each mode ({}); the moves paused the guest: {pauses}.",
            plural(f.moves.len() as u64, "move")
        );
    }
    s += &format!(" Total {total_s:.1} s.");
    wrap(&s, 78)
}

/// Wraps text at `width` columns on spaces.
fn wrap(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut col = 0;
    for w in s.split_whitespace() {
        let len = w.chars().count();
        if col > 0 && col + 1 + len > width {
            out.push('\n');
            col = 0;
        } else if col > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(w);
        col += len;
    }
    out
}

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::with_capacity(d.len() + d.len() / 3);
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The demo's private directory for sockets, checkpoints and VM logs.
struct WorkDir {
    path: PathBuf,
    keep: bool,
    removed: bool,
}

impl WorkDir {
    fn create(keep: bool) -> Result<WorkDir, DemoError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("vmhop-demo-{}-{nanos:08x}", std::process::id()));
        // 0700: the API sockets inside must not be reachable by other users.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| DemoError::WorkDir {
                path: path.clone(),
                source,
            })?;
        if !keep {
            interrupt::set_dir(Some(path.clone()));
        }
        Ok(WorkDir {
            path,
            keep,
            removed: false,
        })
    }

    /// Removes the directory unless it is to be kept; Ok(true) if removed.
    fn remove(&mut self) -> Result<bool, String> {
        if self.keep || self.removed {
            return Ok(self.removed);
        }
        interrupt::set_dir(None);
        self.removed = true;
        fs::remove_dir_all(&self.path)
            .map(|()| true)
            .map_err(|e| format!("cannot remove the work dir {}: {e}", self.path.display()))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// A child `vmhop run`/`restore` and its API socket. Dropping it stops the
/// VM: SIGTERM (vmhop then shuts the VM down cleanly), SIGKILL if it lingers.
struct VmProcess {
    what: String,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// The one JSON line it printed when its API came up.
    start: Value,
}

impl VmProcess {
    /// Starts `exe args...` (stderr to `log`) and waits for its JSON start line.
    fn spawn(
        exe: &Path,
        what: &str,
        args: &[String],
        socket: PathBuf,
        log: PathBuf,
    ) -> Result<VmProcess, DemoError> {
        let log_file = fs::File::create(&log).map_err(|source| DemoError::Log {
            path: log.clone(),
            source,
        })?;
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (prctl, pthread_sigmask, getppid) on
        // that child's own state; it allocates nothing on the success path.
        unsafe {
            cmd.pre_exec(move || {
                // If the demo dies without running its guards (SIGKILL, a
                // crash), the kernel still stops the VM.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                // The demo blocks SIGINT/SIGTERM for its signal thread; the
                // mask survives exec, so give the child the default one.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                // The demo may have died between fork and prctl.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other(
                        "the demo exited while starting this VM",
                    ));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| DemoError::Spawn {
            what: what.into(),
            source,
        })?;
        interrupt::add_child(child.id() as libc::pid_t);
        let stdout = child.stdout.take();
        // From here on the guard owns the child: every early return stops it.
        let mut vm = VmProcess {
            what: what.into(),
            child,
            socket,
            log,
            start: Value::Null,
        };
        let (tx, rx) = mpsc::channel();
        if let Some(out) = stdout {
            thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut line = String::new();
                if r.read_line(&mut line).is_ok() && !line.is_empty() {
                    let _ = tx.send(line);
                }
                // Keep draining so the child never blocks on a full pipe.
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            });
        }
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => {
                vm.start = serde_json::from_str(line.trim()).map_err(|e| DemoError::NotUp {
                    what: what.into(),
                    reason: format!(
                        "its first line is not a JSON start report ({e}): {}",
                        line.trim()
                    ),
                    log: vm.log_tail(),
                })?;
                Ok(vm)
            }
            Err(RecvTimeoutError::Timeout) => Err(DemoError::NotUp {
                what: what.into(),
                reason: format!("no start report within {} s", START_TIMEOUT.as_secs()),
                log: vm.log_tail(),
            }),
            Err(RecvTimeoutError::Disconnected) => {
                let reason = match vm.wait_exit(EXIT_TIMEOUT) {
                    Some(s) => format!("it exited ({s}) before serving its API"),
                    None => "it closed its stdout without a start report".into(),
                };
                Err(DemoError::NotUp {
                    what: what.into(),
                    reason,
                    log: vm.log_tail(),
                })
            }
        }
    }

    /// One API call, decoded into its report type.
    fn call<T: DeserializeOwned>(
        &mut self,
        step: &str,
        method: &str,
        ep: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<T, DemoError> {
        let v = call(
            &self.socket,
            method,
            &format!("{PREFIX}/{ep}"),
            body.as_ref(),
            Some(timeout),
        )
        .map_err(|source| DemoError::Api {
            step: step.into(),
            source,
            log: self.death_note(),
        })?;
        serde_json::from_value(v).map_err(|e| DemoError::Reply {
            step: step.into(),
            reason: e.to_string(),
        })
    }

    /// Like `call`, but retries while the VM answers 409 (busy: a lazy
    /// restore still loading, say), up to `BUSY_WAIT`; returns how long it waited.
    fn call_when_free<T: DeserializeOwned>(
        &mut self,
        step: &str,
        method: &str,
        ep: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<(T, Duration), DemoError> {
        let t = Instant::now();
        let mut waited = Duration::ZERO;
        loop {
            match self.call(step, method, ep, body.clone(), timeout) {
                Err(DemoError::Api {
                    source: ClientError::Api { status: 409, .. },
                    ..
                }) if t.elapsed() < BUSY_WAIT => {
                    thread::sleep(POLL);
                    waited = t.elapsed();
                }
                r => return r.map(|v| (v, waited)),
            }
        }
    }

    /// `vm.stop`, then waits for a clean exit.
    fn stop(mut self, step: &str) -> Result<(), DemoError> {
        let _: StateReply = self.call(step, "PUT", "vm.stop", None, QUICK)?;
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(DemoError::Exit {
                what: self.what.clone(),
                reason: format!("it exited with {s}"),
                log: self.log_tail(),
            }),
            None => Err(DemoError::Exit {
                what: self.what.clone(),
                reason: format!(
                    "still running {} s after stop; killed it",
                    EXIT_TIMEOUT.as_secs()
                ),
                log: self.log_tail(),
            }),
        }
    }

    /// Polls for the child's exit up to `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                _ => return None,
            }
        }
    }

    /// If the VM process has died: its exit status and the end of its log.
    fn death_note(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(s)) => format!(
                "\n  the VM process (`vmhop {}`) has exited ({s}){}",
                self.what,
                self.log_tail()
            ),
            _ => String::new(),
        }
    }

    /// The last lines of the child's stderr, indented, or "".
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "\n  last lines of {}:\n    {}",
            self.log.display(),
            tail.join("\n    ")
        )
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            // SAFETY: kill() only sends a signal; `pid` is our own child,
            // not yet reaped, so it cannot name an unrelated process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            if self.wait_exit(TERM_GRACE).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        interrupt::remove_child(pid);
    }
}

/// Ctrl-C or SIGTERM during the demo: stop the child VMs and remove the
/// work dir before exiting, instead of leaving them behind.
mod interrupt {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::TERM_GRACE;

    /// Live child VMs and the work dir to remove, shared with the signal thread.
    static STATE: Mutex<(Vec<libc::pid_t>, Option<PathBuf>)> = Mutex::new((Vec::new(), None));

    fn state() -> std::sync::MutexGuard<'static, (Vec<libc::pid_t>, Option<PathBuf>)> {
        STATE.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn add_child(pid: libc::pid_t) {
        state().0.push(pid);
    }

    pub(super) fn remove_child(pid: libc::pid_t) {
        state().0.retain(|&p| p != pid);
    }

    pub(super) fn set_dir(dir: Option<PathBuf>) {
        state().1 = dir;
    }

    /// Blocks SIGINT/SIGTERM in this thread (and the threads it starts
    /// later) and takes them on a dedicated thread that cleans up and exits
    /// with 130. Call before any other thread is started.
    pub(super) fn install() {
        let set = crate::util::block_stop_signals();
        let _ = std::thread::Builder::new()
            .name("demo-signals".into())
            .spawn(move || {
                let mut sig = 0;
                // SAFETY: `set` is an initialised signal set and `sig` a valid
                // out-pointer; sigwait only blocks this thread.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                let (pids, dir) = state().clone();
                for &pid in &pids {
                    // SAFETY: only sends a signal to a child we started and
                    // have not reaped (reaping removes it from the list).
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                // Let the VMs shut down (and close their files) before the
                // directory goes.
                let deadline = std::time::Instant::now() + TERM_GRACE;
                while std::time::Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
                    std::thread::sleep(super::POLL);
                }
                if let Some(d) = dir {
                    let _ = std::fs::remove_dir_all(d);
                }
                eprintln!("vmhop: demo interrupted; told its VMs to stop (SIGTERM) and removed its work dir");
                std::process::exit(130);
            });
    }

    /// Whether `pid` still runs (a zombie waiting to be reaped does not).
    fn alive(pid: libc::pid_t) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state letter follows the parenthesised command name.
            Ok(s) => s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[cfg(test)]
    pub(super) fn children() -> Vec<libc::pid_t> {
        state().0.clone()
    }
}

/// What the demo says about Linux guests on this host: where the same
/// steps run with a stock kernel.
fn linux_note(cannot: Option<crate::api::ApiError>) -> String {
    if let Some(why) = cannot {
        format!(
            "Linux guests: {why}\n\
             The same steps with a stock Debian kernel (boot on two NUMA nodes, checkpoint, lazy\n\
             restore, NUMA moves, poweroff, reboot) run inside the NUMA box, a two-node host with\n\
             KVM inside QEMU:\n\
             \x20   tests/numabox/linux/run-step.sh checkpoint   (or boot, numa-moves, poweroff,\n\
             \x20   reboot; see docs/linux-guests.md)"
        )
    } else {
        "Linux guests: vmhop run --kernel /boot/vmlinuz-$(uname -r) --initrd INITRD \\\n\
         \x20   --cmdline \"console=ttyS0 reboot=k\" (see docs/linux-guests.md); the scripted steps\n\
         \x20   with a stock kernel: tests/numabox/linux/run-step.sh checkpoint"
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(memory: &str, rate: Option<u64>) -> DemoArgs {
        DemoArgs {
            memory: memory.into(),
            vcpus: 2,
            rate,
            keep_dir: false,
            json: false,
            kernel: None,
            initrd: None,
            cmdline: None,
        }
    }

    #[test]
    fn group_inserts_thousands_separators() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(131_072), "131,072");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn plan_moves_on_one_node_moves_each_mode_in_place() {
        let m = plan_moves(0, &[0]);
        assert_eq!(
            m,
            vec![
                (Mode::Live, 0, 0),
                (Mode::StopCopy, 0, 0),
                (Mode::Kernel, 0, 0)
            ]
        );
    }

    #[test]
    fn plan_moves_on_two_nodes_goes_away_and_back_with_each_mode() {
        let m = plan_moves(1, &[0, 1]);
        assert_eq!(
            m,
            vec![
                (Mode::Live, 1, 0),
                (Mode::Live, 0, 1),
                (Mode::StopCopy, 1, 0),
                (Mode::StopCopy, 0, 1),
                (Mode::Kernel, 1, 0),
                (Mode::Kernel, 0, 1)
            ]
        );
    }

    #[test]
    fn plan_moves_picks_the_first_other_memory_node() {
        let m = plan_moves(0, &[0, 2, 3]);
        assert_eq!(m[0], (Mode::Live, 0, 2));
    }

    #[test]
    fn plan_rejects_a_bad_memory_size_as_usage() {
        let e = Plan::from_args(&args("lots", None)).unwrap_err();
        assert_eq!(e.code, super::super::EXIT_USAGE);
        assert!(e.message.contains("--memory"), "{}", e.message);
    }

    #[test]
    fn plan_rejects_a_zero_rate_as_usage() {
        let e = Plan::from_args(&args("512M", Some(0))).unwrap_err();
        assert_eq!(e.code, super::super::EXIT_USAGE);
    }

    #[test]
    fn plan_default_rate_follows_the_build() {
        let p = Plan::from_args(&args("512M", None)).unwrap();
        assert_eq!(
            p.rate,
            if cfg!(debug_assertions) {
                DEBUG_RATE
            } else {
                RELEASE_RATE
            }
        );
        assert_eq!(p.memory_bytes, 512 << 20);
        assert_eq!(p.guest(), format!("builtin:dirty,rate={}", p.rate));
    }

    #[test]
    fn watch_requires_growth() {
        let frozen = Watch {
            before: 10,
            after: 10,
            secs: 0.5,
        };
        assert!(matches!(
            frozen.require_growth("s"),
            Err(DemoError::Check { .. })
        ));
        let grew = Watch {
            before: 10,
            after: 60,
            secs: 0.5,
        };
        assert!(grew.require_growth("s").is_ok());
        assert_eq!(grew.per_sec(), 100);
    }

    #[test]
    fn require_ok_names_the_first_violation() {
        let v: VerifyReport = serde_json::from_value(json!({
            "ok": false, "pages_checked": 100, "violation_count": 2,
            "violations": [{"vcpu": 0, "gpa": "0x5000", "problem": "counter jumps"}]
        }))
        .unwrap();
        let e = require_ok("verify", &v).unwrap_err().to_string();
        assert!(
            e.contains("2 violation(s)") && e.contains("0x5000") && e.contains("counter jumps"),
            "{e}"
        );
    }

    #[test]
    fn require_ok_refuses_a_check_of_no_pages() {
        let v: VerifyReport = serde_json::from_value(
            json!({"ok": true, "pages_checked": 0, "violation_count": 0, "violations": []}),
        )
        .unwrap();
        assert!(require_ok("verify", &v).is_err());
    }

    #[test]
    fn fmt_placement_lists_nodes_with_grouped_counts() {
        let mut p = BTreeMap::new();
        assert_eq!(fmt_placement(&p), "no pages present");
        p.insert("0".to_string(), 131_072);
        p.insert("1".to_string(), 5);
        assert_eq!(fmt_placement(&p), "node 0: 131,072 pages, node 1: 5 pages");
    }

    #[test]
    fn fmt_vcpus_groups_vcpus_sharing_cpus() {
        let v = |id, cpus: &str| VcpuStat {
            id,
            guest_node: 0,
            allowed_cpus: cpus.into(),
        };
        assert_eq!(
            fmt_vcpus(&[v(0, "0-1"), v(1, "0-1")]),
            "vCPUs 0, 1 on CPUs 0-1"
        );
        assert_eq!(
            fmt_vcpus(&[v(0, "0"), v(1, "1")]),
            "vCPU 0 on CPUs 0, vCPU 1 on CPUs 1"
        );
    }

    #[test]
    fn wrap_breaks_lines_at_the_width() {
        let w = wrap("aaa bbb ccc ddd", 7);
        assert_eq!(w, "aaa bbb\nccc ddd");
        assert!(wrap(&"word ".repeat(50), 20)
            .lines()
            .all(|l| l.chars().count() <= 20));
    }

    #[test]
    fn work_dir_is_private_and_removed_unless_kept() {
        use std::os::unix::fs::PermissionsExt;
        let d = WorkDir::create(false).unwrap();
        let path = d.path.clone();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::write(path.join("f"), b"x").unwrap();
        drop(d);
        assert!(!path.exists());
        let mut kept = WorkDir::create(true).unwrap();
        assert_eq!(kept.remove(), Ok(false));
        let path = kept.path.clone();
        drop(kept);
        assert!(path.exists());
        fs::remove_dir_all(path).unwrap();
    }

    fn sh(script: &str, log: &Path) -> Result<VmProcess, DemoError> {
        VmProcess::spawn(
            Path::new("/bin/sh"),
            "sh",
            &["-c".into(), script.into()],
            PathBuf::from("/nonexistent.sock"),
            log.to_path_buf(),
        )
    }

    #[test]
    fn dropping_a_vm_process_terminates_the_child() {
        let d = WorkDir::create(false).unwrap();
        let vm = sh("echo '{\"up\": true}'; exec sleep 30", &d.path.join("log")).unwrap();
        assert_eq!(vm.start, json!({"up": true}));
        let pid = vm.child.id() as libc::pid_t;
        assert!(interrupt::children().contains(&pid));
        drop(vm);
        // Reaped by the guard: the pid no longer names our child.
        // SAFETY: waitpid on a pid that is no longer our child only fails (ECHILD).
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        assert_eq!(r, -1);
        assert!(!interrupt::children().contains(&pid));
    }

    #[test]
    fn a_child_that_dies_before_its_start_line_is_reported_with_its_log() {
        let d = WorkDir::create(false).unwrap();
        let e = sh("echo 'no KVM here' >&2; exit 3", &d.path.join("log"))
            .err()
            .expect("spawn must fail")
            .to_string();
        assert!(
            e.contains("did not come up")
                && e.contains("exit status: 3")
                && e.contains("no KVM here"),
            "{e}"
        );
    }

    #[test]
    fn a_child_that_prints_no_json_is_reported() {
        let d = WorkDir::create(false).unwrap();
        let e = sh("echo hello; exec sleep 30", &d.path.join("log"))
            .err()
            .expect("spawn must fail")
            .to_string();
        assert!(
            e.contains("not a JSON start report") && e.contains("hello"),
            "{e}"
        );
    }

    #[test]
    fn an_api_call_to_a_dead_vm_says_it_exited() {
        let d = WorkDir::create(false).unwrap();
        let mut vm = sh(
            "echo '{}'; echo 'guest crashed' >&2; exit 1",
            &d.path.join("log"),
        )
        .unwrap();
        vm.wait_exit(Duration::from_secs(5)).expect("sh exits");
        let e = vm
            .call::<Value>("status", "GET", "vm.status", None, QUICK)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("status: cannot connect")
                && e.contains("has exited")
                && e.contains("guest crashed"),
            "{e}"
        );
    }

    #[test]
    fn summary_mentions_each_part_and_pauses_per_mode() {
        let plan = Plan::from_args(&args("512M", None)).unwrap();
        let f = Facts {
            pause_us: 78,
            verifies: 5,
            one_node: true,
            moves: vec![(Mode::Live, 8546), (Mode::Live, 10), (Mode::Kernel, 0)],
            ..Facts::default()
        };
        let s = summary(&plan, &f, 9.5).replace('\n', " ");
        assert!(s.contains("512.0 MiB") || s.contains("512 MiB"), "{s}");
        assert!(
            s.contains("5 times")
                && s.contains("78 µs")
                && s.contains("live at most 8,546 µs")
                && s.contains("kernel not at all"),
            "{s}"
        );
        assert!(
            s.contains("in place on this one-node host")
                && s.contains("(3 moves)")
                && s.contains("Total 9.5 s"),
            "{s}"
        );
    }
}
