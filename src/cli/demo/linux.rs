//! `vmhop demo --kernel K [--initrd I] [--cmdline S]`: the same job on a
//! Linux guest, for hosts with hardware-assisted KVM. Its script, in five
//! steps: boot on the host's NUMA nodes, a full and an incremental
//! checkpoint, a lazy restore of the incremental one, a live NUMA move,
//! stop. The guest's own console is the proof that it lives: without
//! `--initrd` the demo packs a small initramfs (`initramfs`) whose checker
//! prints a heartbeat with its memory checks, and every step waits for new
//! beats.
//!
//! It shares the builtin demo's supervision, requests and checks, and
//! rendering; what is its own is the console watching. On a paravirtualised
//! KVM that emulates guest kernel code (PVM), `demo` refuses before it gets
//! here, naming the NUMA-box command instead of waiting for a boot that
//! would take hours.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::checks::{self, check, QUICK};
use super::render::{self, Out};
use super::supervise::{Supervisor, VmProcess, NO_BODY};
use super::{initramfs, CliResult, DemoError};
use crate::api::checkpoint::{CheckpointReport, RestoreReport};
use crate::api::numa::TopologyReport;
use crate::api::numa::{Mode, NumaMigrateReport, NumaMigrateRequest, NumaStatReport};
use crate::api::run::{Arrival, Started};
use crate::api::vm::StatusReport;
use crate::api::Endpoint;

/// Steps of the Linux demo, for the `[n/5]` headers.
const STEPS: u32 = 5;
/// How long a boot may take to print its first heartbeat (or, with a
/// user's initramfs, anything at all).
const BOOT_WAIT: Duration = Duration::from_secs(180);
/// How long each later step waits for the console to move on.
const ALIVE_WAIT: Duration = Duration::from_secs(60);
/// How often the console is read while waiting.
const CONSOLE_POLL: Duration = Duration::from_millis(100);
/// Memory of each guest node.
const NODE_MEMORY: &str = "256M";
/// The demo's command line when none is given: the checker keeps four
/// files of 8 MiB in tmpfs.
const CMDLINE: &str = "console=ttyS0 reboot=k quiet vmhop.files=4 vmhop.file_mb=8";
/// The heartbeat line of the demo's checker.
const BEAT: &str = "vmhop-check: beat ";

/// What the user asked for.
pub(super) struct LinuxPlan {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs (None: the demo packs its own).
    pub initrd: Option<PathBuf>,
    /// The command line (None: the demo's).
    pub cmdline: Option<String>,
}

/// What the Linux demo found, for `--json`.
#[derive(Debug, Default, Serialize)]
struct LinuxFound {
    /// Until the console first moved, s.
    boot_s: f64,
    /// The full and the incremental checkpoint.
    checkpoints: Vec<CheckpointReport>,
    /// The lazy restore.
    #[serde(skip_serializing_if = "Option::is_none")]
    restore: Option<RestoreReport>,
    /// The live NUMA move.
    #[serde(skip_serializing_if = "Option::is_none")]
    numa_move: Option<NumaMigrateReport>,
}

/// Runs the Linux demo.
pub(super) fn run(plan: LinuxPlan, sup: Supervisor, out: Out) -> CliResult {
    let mut d = LinuxDemo {
        ours: plan.initrd.is_none(),
        plan,
        out,
        found: LinuxFound::default(),
        sup,
    };
    let started = Instant::now();
    if let Err(e) = d.steps() {
        return Err(super::failure(e, &d.sup));
    }
    super::conclude(
        &mut d.sup,
        &d.out,
        started,
        Some("linux"),
        None,
        &d.found,
        |_| String::new(),
    )
}

struct LinuxDemo {
    plan: LinuxPlan,
    out: Out,
    found: LinuxFound,
    /// The initramfs is the demo's own, whose checker beats.
    ours: bool,
    /// Declared last so that the work dir goes after everything else.
    sup: Supervisor,
}

impl LinuxDemo {
    fn steps(&mut self) -> Result<(), DemoError> {
        let initrd = match &self.plan.initrd {
            Some(i) => i.clone(),
            None => initramfs::pack(self.sup.dir())?,
        };
        let topo: TopologyReport = self.sup.json(&["topology", "--json"])?;
        let mut nodes: Vec<u32> = topo
            .nodes
            .iter()
            .filter(|n| n.total_bytes > 0)
            .map(|n| n.id)
            .collect();
        nodes.truncate(2);
        self.out.raw(&format!(
            "vmhop demo: Linux {} on 2 vCPUs and {} guest NUMA node(s) of {NODE_MEMORY} (host node(s) {:?}), driven\n\
             through its HTTP API exactly as the vmhop CLI would (work dir {})",
            self.plan.kernel.display(),
            nodes.len(),
            nodes,
            self.sup.dir().display()
        ));

        // 1: boot.
        self.out.step(1, STEPS, "boot the kernel");
        let console = self.sup.dir().join("console.txt");
        let socket = "lx.sock";
        let mut args: Vec<String> = vec![
            "run".into(),
            "--name".into(),
            "demo-linux".into(),
            "--api-socket".into(),
            self.sup.dir().join(socket).display().to_string(),
            "--vcpus".into(),
            "2".into(),
        ];
        for (g, h) in nodes.iter().enumerate() {
            let cpus = if nodes.len() == 1 {
                "0-1".to_string()
            } else {
                g.to_string()
            };
            args.push("--numa".into());
            args.push(format!(
                "guest-node={g},size={NODE_MEMORY},host-node={h},cpus={cpus}"
            ));
        }
        args.extend([
            "--kernel".into(),
            self.plan.kernel.display().to_string(),
            "--initrd".into(),
            initrd.display().to_string(),
            "--cmdline".into(),
            self.plan.cmdline.clone().unwrap_or_else(|| CMDLINE.into()),
            "--console".into(),
            console.display().to_string(),
            "--json".into(),
        ]);
        let mut vm = self.sup.spawn("run --kernel", &args, socket, "run.log")?;
        let t = Instant::now();
        let mut mark = self.wait_console("boot", &mut vm, &console, 0, BOOT_WAIT)?;
        self.found.boot_s = t.elapsed().as_secs_f64();
        self.out.line(format!(
            "the guest wrote to its console after {:.1} s",
            self.found.boot_s
        ));
        for l in fs::read_to_string(&console)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("vmhop-guest: "))
        {
            self.out.line(format!("guest: {l}"));
        }

        // 2: checkpoints.
        self.out.step(
            2,
            STEPS,
            "checkpoint the running guest: full, then incremental",
        );
        let dir = self.sup.dir().join("checkpoints");
        self.out.line(render::CHECKPOINT_HEADER);
        let mut parent = None;
        for step in ["full checkpoint", "incremental checkpoint"] {
            let r = checks::checkpoint(&mut vm, step, &dir, parent)?;
            self.out.line(render::checkpoint_line(&r));
            mark = self.wait_console(step, &mut vm, &console, mark, ALIVE_WAIT)?;
            parent = Some(r.id);
            self.found.checkpoints.push(r);
        }
        let last_id = parent.unwrap_or(0);
        vm.stop("stop the original VM")?;

        // 3: lazy restore.
        self.out.step(
            3,
            STEPS,
            "restore the incremental checkpoint lazily as a new VM",
        );
        let console2 = self.sup.dir().join("restored-console.txt");
        let socket2 = "restored.sock";
        let args2: Vec<String> = vec![
            "restore".into(),
            format!("{}@{last_id}", dir.display()),
            "--name".into(),
            "demo-linux-restored".into(),
            "--api-socket".into(),
            self.sup.dir().join(socket2).display().to_string(),
            "--console".into(),
            console2.display().to_string(),
            "--json".into(),
        ];
        let mut restored = self.sup.spawn("restore", &args2, socket2, "restore.log")?;
        let started: Started = restored.start_report()?;
        let Some(Arrival::Restored(rep)) = started.restore else {
            return Err(check(
                "restore",
                format!("its start report names no restore: {:?}", started.restore),
            ));
        };
        self.out.line(format!(
            "vCPUs running again {:.1} ms after the restore began",
            rep.resume_ms
        ));
        self.found.restore = Some(rep);
        let mark2 = self.wait_console("restore", &mut restored, &console2, 0, ALIVE_WAIT)?;
        if let Some(l) = last_line(&console2, BEAT) {
            self.out.line(format!("guest (restored): {l}"));
        }

        // 4: NUMA move.
        let from = *nodes.first().unwrap_or(&0);
        let to = *nodes.last().unwrap_or(&0);
        self.out.step(
            4,
            STEPS,
            &format!("move guest node 0 to host node {to}, live"),
        );
        let req = NumaMigrateRequest {
            to_node: to,
            guest_node: Some(0),
            mode: Mode::Live,
            max_downtime_ms: None,
        };
        let m = checks::numa_move(&mut restored, "numa-migrate", &req)?;
        self.out.line(render::move_text(&m, from, to));
        let stat: NumaStatReport =
            restored.call("numa-stat", Endpoint::NumaStat, NO_BODY, QUICK)?;
        self.out
            .line(format!("numa-stat after: {}", render::stat_text(&stat)));
        self.found.numa_move = Some(m);
        self.wait_console(
            "after the move",
            &mut restored,
            &console2,
            mark2,
            ALIVE_WAIT,
        )?;
        if let Some(l) = last_line(&console2, BEAT) {
            self.out.line(format!("guest (moved): {l}"));
        }

        // 5: stop.
        self.out.step(5, STEPS, "stop");
        restored.stop("stop the restored VM")?;
        self.out.line("done: the guest booted, was checkpointed twice, restored lazily and moved live, its checks passing throughout");
        Ok(())
    }

    /// Waits until `path`, `vm`'s console, grows past `from` bytes (with
    /// the demo's own initramfs: until a new heartbeat, and fails on a
    /// failed check); returns the new length. A VM process that ended
    /// meanwhile (a guest that triple-faulted, say) fails it at once, with
    /// the end of its log.
    fn wait_console(
        &self,
        step: &str,
        vm: &mut VmProcess,
        path: &Path,
        from: usize,
        limit: Duration,
    ) -> Result<usize, DemoError> {
        let deadline = Instant::now() + limit;
        loop {
            let text = fs::read_to_string(path).unwrap_or_default();
            if let Some(bad) = text
                .lines()
                .find(|l| l.contains(BEAT.trim_end()) && l.contains("FAIL"))
            {
                return Err(check(
                    step,
                    format!("the guest's memory check failed: {bad}"),
                ));
            }
            let new = text.get(from..).unwrap_or("");
            let alive = if self.ours {
                new.contains(BEAT)
            } else {
                !new.is_empty()
            };
            if alive {
                return Ok(text.len());
            }
            let mut died = vm.death_note();
            if died.is_empty() {
                // A guest that stopped by itself (a triple fault) leaves its
                // process up: its status says why.
                let status: Result<StatusReport, _> =
                    vm.call(step, Endpoint::Status, NO_BODY, QUICK);
                if let Some(why) = status.ok().and_then(|s| s.stop_reason) {
                    died = format!(": the guest stopped: {why}");
                }
            }
            if !died.is_empty() {
                return Err(check(
                    step,
                    format!(
                        "the guest wrote nothing new to its console ({}){died}",
                        path.display()
                    ),
                ));
            }
            if Instant::now() >= deadline {
                return Err(check(
                    step,
                    format!(
                        "the guest wrote nothing new to its console ({}) within {} s",
                        path.display(),
                        limit.as_secs()
                    ),
                ));
            }
            thread::sleep(CONSOLE_POLL);
        }
    }
}

/// The last line of `path` that contains `needle`.
fn last_line(path: &Path, needle: &str) -> Option<String> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .rev()
        .find(|l| l.contains(needle))
        .map(str::to_string)
}
