//! Step 9 of the builtin demo: a thousand resets the guest asks for. A
//! fourth VM runs `builtin:reset`: checkpointed while it waits to be armed,
//! then armed with one `vm.reset`, it loops on its own — checks that the
//! 64 pages it dirtied before the last reset are back as at the
//! checkpoint, dirties 64 others picked at random, pokes the reset device —
//! and vmhop's reset worker puts it back each time. The demo reads the
//! counters from `status` and verifies the whole working set at the end.

use std::thread;
use std::time::{Duration, Instant};

use super::super::checks::{self, check, verify, LONG, QUICK};
use super::super::render::group;
use super::super::report::ResetFound;
use super::super::supervise::NO_BODY;
use super::{Demo, DemoError, Started, STEPS};
use crate::api::vm::{ResetReport, ResetRequest, StatusReport};
use crate::api::Endpoint;

/// Resets the guest asks for before the step moves on.
const RESETS: u64 = 1000;
/// Pages the guest dirties between two resets.
const PAGES: u64 = 64;
/// How long the thousand resets may take at most (a loaded host).
const RESET_WAIT: Duration = Duration::from_secs(120);
/// How often `status` is read meanwhile.
const POLL: Duration = Duration::from_millis(20);

impl Demo {
    /// Step 9.
    pub(super) fn reset_loop(&mut self) -> Result<(), DemoError> {
        let dir = self.sup.dir().to_path_buf();
        let guest = format!("builtin:reset,pages={PAGES}");
        self.out.step(
            9,
            STEPS,
            &format!("a thousand resets the guest asks for: vmhop run --guest {guest}"),
        );
        let socket = "reset.sock";
        let args = [
            "run".into(),
            "--name".into(),
            "demo-reset".into(),
            "--api-socket".into(),
            dir.join(socket).display().to_string(),
            "--memory".into(),
            "64M".into(),
            "--guest".into(),
            guest,
            "--json".into(),
        ];
        let mut vm = self.sup.spawn("run", &args, socket, "reset.log")?;
        let _: Started = vm.start_report()?;
        let ck_dir = dir.join("reset-checkpoints");
        let step = "checkpoint the reset guest";
        let ck = checks::checkpoint(&mut vm, step, &ck_dir, None)?;
        let step = "arm the reset";
        let req = ResetRequest {
            to: format!("{}@{}", ck_dir.display(), ck.id),
        };
        let armed: ResetReport = vm.call(step, Endpoint::Reset, Some(&req), LONG)?;
        self.out.line(format!(
            "checkpoint {} taken while the guest waits to be armed; `vmhop reset --to` armed it \
             ({:.1} ms: the checkpoint validated, its pages kept in memory)",
            ck.id, armed.arm_ms
        ));
        let step = "watch the guest reset itself";
        let t = Instant::now();
        let status = loop {
            let s: StatusReport = vm.call(step, Endpoint::Status, NO_BODY, QUICK)?;
            let r = s.reset.unwrap_or_default();
            if r.guest_resets >= RESETS {
                break r;
            }
            if t.elapsed() > RESET_WAIT {
                return Err(check(
                    step,
                    format!("{} resets in {RESET_WAIT:?}, not {RESETS}", r.guest_resets),
                ));
            }
            thread::sleep(POLL);
        };
        let secs = t.elapsed().as_secs_f64();
        let per_s = status.guest_resets as f64 / secs;
        if status.guest_failed_checks > 0 || status.guest_checks + 2 < status.guest_resets {
            return Err(check(
                step,
                format!(
                    "the guest checked {} times in {} resets and found {} pages not back",
                    status.guest_checks, status.guest_resets, status.guest_wrong_pages
                ),
            ));
        }
        self.out.line(format!(
            "{} resets in {secs:.2} s: {} resets/s (last {} µs from the guest's request to \
             its vCPU running again, longest {} µs)",
            group(status.guest_resets),
            group(per_s as u64),
            group(status.last_reset_us),
            group(status.max_reset_us)
        ));
        let (v, _) = verify(&mut vm, "verify the reset guest")?;
        self.out.line(format!(
            "every reset verified: after {} of them the guest found the {PAGES} pages it had \
             dirtied back as at the checkpoint; verify: {} pages as at the checkpoint but \
             the iteration in progress",
            group(status.guest_checks),
            group(v.pages_checked)
        ));
        vm.stop("stop the reset guest")?;
        self.found.reset = Some(ResetFound {
            checkpoint: ck,
            armed,
            secs,
            resets_per_s: per_s,
            status: *status,
            verify: v,
        });
        Ok(())
    }
}
