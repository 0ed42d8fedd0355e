//! The builtin demo's script: its ten steps, in order, on a
//! `builtin:dirty` guest, and what each shows.
//!
//! 1. start: `vmhop run`, and the guest's progress grows;
//! 2. pause (progress frozen), verify, resume (progress grows again);
//! 3. a full and an incremental checkpoint while the guest runs, listed
//!    with `vmhop checkpoints`;
//! 4. the original VM stopped, the incremental checkpoint restored lazily
//!    as a new VM that carries on from the checkpoint's progress, verified;
//! 5. NUMA moves with each mode (to another node and back, or in place on
//!    a one-node host), each verified;
//! 6. a host migration to a second `vmhop run --incoming` on this host:
//!    the source exits 0, the guest carries on there, verified;
//! 7. a disk through a checkpoint (a second VM, `builtin:disk`): the
//!    checkpoint refers to the image, the guest writes on, the restored
//!    disk is as it was at the checkpoint (`disk.rs`);
//! 8. host–guest sockets (a third VM, `builtin:vsock`): a host program's
//!    connection echoes through a NUMA move and a checkpoint, the restored
//!    checkpoint resets its guest's transport and takes new connections,
//!    the stopped VM's connection reads end of file (`vsock.rs`);
//! 9. a thousand resets the guest asks for through the reset device (a
//!    fourth VM, `builtin:reset`), each checked by the guest, the rate
//!    printed (`reset.rs`);
//! 10. stop.
//!
//! Owns the order and the parameters of the steps and what each step
//! records in [`Found`]; steps 5 and 6, the moves, are in `moves.rs`. The
//! processes are `supervise`'s, the requests and checks `checks`'s, the
//! text `render`'s.

mod disk;
mod moves;
mod reset;
mod vsock;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::checks::{self, check, progress, verify, watch};
use super::render::{self, group, plural, Out};
use super::report::{CheckpointsFound, Found, PauseFound, RestoreFound, StartFound};
use super::supervise::{Supervisor, VmProcess};
use super::{CliError, CliResult, DemoArgs, DemoError};
use crate::api::checkpoint::ChainListing;
use crate::api::run::{Arrival, Started};
use crate::api::vm::VmState;
use crate::api::Endpoint;
use crate::util::{format_size, parse_size};

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

/// Steps of the demo, for the `[n/10]` headers.
const STEPS: u32 = 10;
/// Names of the VM the demo boots and of its restored twin (which keeps
/// its name when it migrates: a VM brings its configuration along).
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

/// The demo's parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    memory: String,
    memory_bytes: u64,
    vcpus: u32,
    rate: u64,
}

impl Plan {
    /// The plan `vmhop demo`'s options ask for; bad values are usage errors.
    pub(super) fn from_args(a: &DemoArgs) -> Result<Plan, CliError> {
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

/// Runs the script; exit 1 (with the failed step's message) if a step fails.
pub(super) fn run(plan: Plan, sup: Supervisor, out: Out, linux: String) -> CliResult {
    let mut d = Demo {
        plan,
        out,
        found: Found::default(),
        sup,
    };
    let started = Instant::now();
    if let Err(e) = d.steps() {
        return Err(super::failure(e, &d.sup));
    }
    let summary = d.found.summary(d.plan.memory_bytes, d.plan.vcpus);
    super::conclude(
        &mut d.sup,
        &d.out,
        started,
        None,
        Some(&linux),
        &d.found,
        |total_s| format!("\n{}\n\n{linux}", summary.text(total_s)),
    )
}

struct Demo {
    plan: Plan,
    out: Out,
    found: Found,
    /// Declared last so that the work dir goes after everything else.
    sup: Supervisor,
}

/// What step 3 leaves for step 4.
struct Checkpointed {
    dir: std::path::PathBuf,
    id: u32,
    /// Progress read just before and just after the incremental checkpoint.
    before: u64,
    after: u64,
}

impl Demo {
    fn steps(&mut self) -> Result<(), DemoError> {
        self.out.raw(&format!(
            "vmhop demo: a {} builtin:dirty guest on {} vCPU(s), writing {} pages/s, driven through\n\
             its HTTP API exactly as the vmhop CLI would (work dir {})",
            format_size(self.plan.memory_bytes),
            self.plan.vcpus,
            group(self.plan.rate),
            self.sup.dir().display()
        ));
        let mut vm = self.start()?;
        self.pause_verify_resume(&mut vm)?;
        let ck = self.checkpoints(&mut vm)?;
        let mut restored = self.restore(vm, &ck)?;
        self.numa(&mut restored)?;
        let migrated = self.migrate(restored)?;
        self.disk()?;
        self.vsock()?;
        self.reset_loop()?;
        self.out.step(10, STEPS, "stop");
        migrated.stop("stop the migrated VM")?;
        self.out.line("VM stopped; its vmhop process exited 0");
        Ok(())
    }

    /// Step 1: boot the guest and watch it work.
    fn start(&mut self) -> Result<VmProcess, DemoError> {
        let p = &self.plan;
        self.out.step(
            1,
            STEPS,
            &format!(
                "start: vmhop run --guest {} --vcpus {} --memory {}",
                p.guest(),
                p.vcpus,
                p.memory
            ),
        );
        let socket = "vm.sock";
        let args = [
            "run".into(),
            "--name".into(),
            VM_NAME.into(),
            "--api-socket".into(),
            self.sup.dir().join(socket).display().to_string(),
            "--vcpus".into(),
            p.vcpus.to_string(),
            "--memory".into(),
            p.memory.clone(),
            "--guest".into(),
            p.guest(),
            "--json".into(),
        ];
        let t = Instant::now();
        let mut vm = self.sup.spawn("run", &args, socket, "vm.log")?;
        let up_ms = t.elapsed().as_secs_f64() * 1e3;
        let started: Started = vm.start_report()?;
        self.out.line(format!(
            "VM '{}' up in {up_ms:.0} ms (pid {}, API socket {})",
            started.name,
            vm.pid(),
            vm.socket().display()
        ));
        let w = watch(&mut vm, "watch the new VM", FIRST_WATCH)?;
        w.require_growth("watch the new VM")?;
        self.out.line(format!(
            "{} (≈{} pages/s)",
            render::watch_text(&w),
            group(w.per_sec())
        ));
        self.found.start = Some(StartFound {
            vm: started,
            up_ms,
            progress: w,
        });
        Ok(vm)
    }

    /// Step 2: pause, show the guest frozen, verify, resume.
    fn pause_verify_resume(&mut self, vm: &mut VmProcess) -> Result<(), DemoError> {
        self.out.step(2, STEPS, "pause, verify, resume");
        let p = checks::set_state(vm, "pause", Endpoint::Pause, VmState::Paused)?;
        let pause_us = p.pause_us.unwrap_or(0);
        self.out.line(format!(
            "paused: every vCPU stopped in {} µs",
            group(pause_us)
        ));
        let frozen = watch(vm, "watch the paused VM", FROZEN_WATCH)?;
        frozen.require_frozen("watch the paused VM")?;
        self.out.line(format!(
            "progress {} → {} over {:.2} s: frozen",
            group(frozen.before),
            group(frozen.after),
            frozen.secs
        ));
        let (v, _) = verify(vm, "verify the paused VM")?;
        self.out.line(render::verify_text(&v));
        checks::set_state(vm, "resume", Endpoint::Resume, VmState::Running)?;
        let w = watch(vm, "watch the resumed VM", WATCH)?;
        w.require_growth("watch the resumed VM")?;
        self.out
            .line(format!("resumed: {}", render::watch_text(&w)));
        self.found.pause = Some(PauseFound {
            pause_us,
            frozen,
            verify: v,
            resumed: w,
        });
        Ok(())
    }

    /// Step 3: a full and an incremental checkpoint while the guest runs.
    fn checkpoints(&mut self, vm: &mut VmProcess) -> Result<Checkpointed, DemoError> {
        let dir = self.sup.dir().join("checkpoints");
        self.out.step(
            3,
            STEPS,
            &format!("checkpoints while the VM runs (into {})", dir.display()),
        );
        let full = checks::checkpoint(vm, "full checkpoint", &dir, None)?;
        self.out.line(render::CHECKPOINT_HEADER);
        self.out.line(render::checkpoint_line(&full));
        thread::sleep(RUN_BETWEEN_CHECKPOINTS);
        let before = progress(vm, "progress before the incremental checkpoint")?;
        let inc = checks::checkpoint(vm, "incremental checkpoint", &dir, Some(full.id))?;
        let after = progress(vm, "progress after the incremental checkpoint")?;
        self.out.line(render::checkpoint_line(&inc));
        if full.zero_pages > 0 {
            self.out.line(format!(
                "(zero pages are not stored: the full checkpoint skipped {})",
                group(full.zero_pages)
            ));
        }
        let list = self.list_checkpoints(&dir)?;
        let id = inc.id;
        self.found.checkpoints = Some(CheckpointsFound {
            full,
            incremental: inc,
            list,
        });
        Ok(Checkpointed {
            dir,
            id,
            before,
            after,
        })
    }

    /// `vmhop checkpoints DIR`, run as a user would: its text is shown as
    /// is; with `--json`, its report is kept instead.
    fn list_checkpoints(&mut self, dir: &Path) -> Result<Option<ChainListing>, DemoError> {
        let dir_arg = dir.display().to_string();
        if self.out.json() {
            return self
                .sup
                .json(&["checkpoints", &dir_arg, "--json"])
                .map(Some);
        }
        let text = self.sup.output(&["checkpoints", &dir_arg])?;
        self.out.line(format!("$ vmhop checkpoints {dir_arg}"));
        self.out.line(
            text.lines()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        Ok(None)
    }

    /// Step 4: stop the VM, restore the incremental checkpoint lazily as a
    /// new VM, and show it carries on from the checkpoint.
    fn restore(&mut self, mut vm: VmProcess, ck: &Checkpointed) -> Result<VmProcess, DemoError> {
        self.out.step(
            4,
            STEPS,
            &format!("restore checkpoint {} lazily as a new VM", ck.id),
        );
        thread::sleep(RUN_BEFORE_STOP);
        let at_stop = progress(&mut vm, "progress before stopping the VM")?;
        vm.stop("stop the original VM")?;
        self.out.line(format!(
            "original VM stopped at progress {}",
            group(at_stop)
        ));
        let socket = "restored.sock";
        let args = [
            "restore".into(),
            format!("{}@{}", ck.dir.display(), ck.id),
            "--name".into(),
            RESTORED_NAME.into(),
            "--api-socket".into(),
            self.sup.dir().join(socket).display().to_string(),
            "--json".into(),
        ];
        let mut r = self.sup.spawn("restore", &args, socket, "restored.log")?;
        let started: Started = r.start_report()?;
        let Some(Arrival::Restored(rep)) = started.restore else {
            return Err(check(
                "restore",
                format!("its start report names no restore: {:?}", started.restore),
            ));
        };
        if rep.id != ck.id {
            return Err(check(
                "restore",
                format!("restored checkpoint {} instead of {}", rep.id, ck.id),
            ));
        }
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
        let step = "watch the restored VM";
        let w = watch(&mut r, step, WATCH)?;
        w.require_from(step, ck.before, "before the checkpoint was taken")?;
        w.require_growth(step)?;
        let taken = format!("taken at {}–{}", group(ck.before), group(ck.after));
        let whence = if w.before < at_stop {
            format!(
                "it continues from the checkpoint ({taken}), not from where the stopped VM was ({})",
                group(at_stop)
            )
        } else {
            format!("it continues from the checkpoint ({taken})")
        };
        self.out
            .line(format!("{}:\n{whence}", render::watch_text(&w)));
        let (v, waited) = verify(&mut r, "verify the restored VM")?;
        let waited_s = waited.as_secs_f64();
        self.out.line(format!(
            "{}{}",
            render::verify_text(&v),
            render::waited_text(waited_s)
        ));
        self.found.restore = Some(RestoreFound {
            report: rep,
            progress_at_stop: at_stop,
            checkpoint_progress: [ck.before, ck.after],
            progress: w,
            verify: v,
            verify_waited_ms: waited_s * 1e3,
        });
        Ok(r)
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
    fn plan_rejects_a_bad_memory_size_as_usage() {
        let e = Plan::from_args(&args("lots", None)).unwrap_err();
        assert_eq!(e.code, crate::cli::EXIT_USAGE);
        assert!(e.message.contains("--memory"), "{}", e.message);
    }

    #[test]
    fn plan_rejects_a_zero_rate_as_usage() {
        let e = Plan::from_args(&args("512M", Some(0))).unwrap_err();
        assert_eq!(e.code, crate::cli::EXIT_USAGE);
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
}
