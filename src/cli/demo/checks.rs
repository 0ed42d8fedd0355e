//! What the demo's steps ask a VM, and what they check in its answers.
//!
//! Owns the typed requests of both demos (progress, pause, resume, verify,
//! checkpoint, NUMA move, host migration) and the checks that make a step
//! fail: a paused guest that moves, a running one that does not, a verify
//! with violations or with nothing checked, a checkpoint of the wrong kind
//! or parent. Each failure names its step.
//!
//! Does not own the processes it talks to (`supervise`'s) nor the order of
//! the steps (the scripts').

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::supervise::{VmProcess, NO_BODY};
use super::DemoError;
use crate::api::checkpoint::{CheckpointKind as Kind, CheckpointReport, CheckpointRequest};
use crate::api::migration::{MigrateReport, MigrateRequest};
use crate::api::numa::{NumaMigrateReport, NumaMigrateRequest};
use crate::api::vm::{StateReply, StatusReport, VerifyReport, VmState};
use crate::api::Endpoint;

/// Bound on quick API calls (status, pause, resume, stop).
pub(super) const QUICK: Duration = Duration::from_secs(10);
/// Bound on long API calls (verify, checkpoint, NUMA moves, migration): far
/// above what they take, only there so a wedged VM cannot hang the demo.
pub(super) const LONG: Duration = Duration::from_secs(180);

/// A failed check of `step`.
pub(super) fn check(step: &str, reason: impl Into<String>) -> DemoError {
    DemoError::Check {
        step: step.into(),
        reason: reason.into(),
    }
}

/// Progress read twice, some time apart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(super) struct Watch {
    /// Pages written at the first read.
    pub before: u64,
    /// At the second.
    pub after: u64,
    /// Seconds between them.
    pub secs: f64,
}

impl Watch {
    /// Pages written per second between the reads.
    pub(super) fn per_sec(&self) -> u64 {
        if self.secs <= 0.0 {
            return 0;
        }
        (self.after.saturating_sub(self.before) as f64 / self.secs) as u64
    }

    /// Fails unless the guest made progress between the two reads.
    pub(super) fn require_growth(&self, step: &str) -> Result<(), DemoError> {
        if self.after > self.before {
            return Ok(());
        }
        Err(check(
            step,
            format!(
                "the guest made no progress ({} → {} over {:.2} s)",
                self.before, self.after, self.secs
            ),
        ))
    }

    /// Fails if the guest made progress between the two reads.
    pub(super) fn require_frozen(&self, step: &str) -> Result<(), DemoError> {
        if self.after == self.before {
            return Ok(());
        }
        Err(check(
            step,
            format!(
                "progress moved from {} to {} while paused",
                self.before, self.after
            ),
        ))
    }

    /// Fails unless the guest carried on from at least `floor` (progress
    /// read before the checkpoint or the migration): nothing was lost.
    pub(super) fn require_from(&self, step: &str, floor: u64, what: &str) -> Result<(), DemoError> {
        if self.before >= floor {
            return Ok(());
        }
        Err(check(
            step,
            format!(
                "its progress {} is below {floor}, read {what}: work was lost",
                self.before
            ),
        ))
    }
}

/// The guest's progress counter (pages written so far).
pub(super) fn progress(vm: &mut VmProcess, step: &str) -> Result<u64, DemoError> {
    let s: StatusReport = vm.call(step, Endpoint::Status, NO_BODY, QUICK)?;
    Ok(s.guest.progress)
}

/// Two progress reads `over` apart.
pub(super) fn watch(vm: &mut VmProcess, step: &str, over: Duration) -> Result<Watch, DemoError> {
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

/// `pause` or `resume`; fails unless the VM is then in `want`.
pub(super) fn set_state(
    vm: &mut VmProcess,
    step: &str,
    ep: Endpoint,
    want: VmState,
) -> Result<StateReply, DemoError> {
    let r: StateReply = vm.call(step, ep, NO_BODY, QUICK)?;
    if r.state != want {
        return Err(check(step, format!("the VM is {} after {step}", r.state)));
    }
    Ok(r)
}

/// Verifies the guest's memory, waiting out a lazy restore's background
/// load; fails on violations. Returns how long it waited.
pub(super) fn verify(
    vm: &mut VmProcess,
    step: &str,
) -> Result<(VerifyReport, Duration), DemoError> {
    let (v, waited): (VerifyReport, _) =
        vm.call_when_free(step, Endpoint::Verify, NO_BODY, LONG)?;
    require_ok(step, &v)?;
    Ok((v, waited))
}

/// Fails unless `v` checked some pages and found nothing wrong.
pub(super) fn require_ok(step: &str, v: &VerifyReport) -> Result<(), DemoError> {
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

/// Takes a checkpoint into `dir`: a full one when `parent` is None, else
/// an incremental one on `parent`; fails if it is anything else.
pub(super) fn checkpoint(
    vm: &mut VmProcess,
    step: &str,
    dir: &Path,
    parent: Option<u32>,
) -> Result<CheckpointReport, DemoError> {
    let req = CheckpointRequest {
        dir: dir.to_path_buf(),
        full: parent.is_none(),
        stop_after: false,
    };
    let r: CheckpointReport = vm.call(step, Endpoint::Checkpoint, Some(&req), LONG)?;
    let want = if parent.is_none() {
        Kind::Full
    } else {
        Kind::Incremental
    };
    if r.kind != want || r.parent != parent {
        return Err(check(
            step,
            format!(
                "got a {} checkpoint with parent {:?}, expected a {want} one with parent {parent:?}",
                r.kind, r.parent
            ),
        ));
    }
    Ok(r)
}

/// A NUMA move, once the VM is free to make it.
pub(super) fn numa_move(
    vm: &mut VmProcess,
    step: &str,
    req: &NumaMigrateRequest,
) -> Result<NumaMigrateReport, DemoError> {
    let (r, _) = vm.call_when_free(step, Endpoint::NumaMigrate, Some(req), LONG)?;
    Ok(r)
}

/// A host migration to `to`; fails unless the report says it sent pages
/// and paused the guest.
pub(super) fn migrate(
    vm: &mut VmProcess,
    step: &str,
    to: &str,
) -> Result<MigrateReport, DemoError> {
    let req = MigrateRequest {
        to: to.into(),
        ..MigrateRequest::default()
    };
    let (r, _): (MigrateReport, _) =
        vm.call_when_free(step, Endpoint::Migrate, Some(&req), LONG)?;
    if r.pages_sent == 0 || r.rounds == 0 {
        return Err(check(
            step,
            format!(
                "the report says {} pages in {} rounds were sent",
                r.pages_sent, r.rounds
            ),
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_requires_growth_or_stillness() {
        let frozen = Watch {
            before: 10,
            after: 10,
            secs: 0.5,
        };
        assert!(matches!(
            frozen.require_growth("s"),
            Err(DemoError::Check { .. })
        ));
        assert!(frozen.require_frozen("s").is_ok());
        let grew = Watch {
            before: 10,
            after: 60,
            secs: 0.5,
        };
        assert!(grew.require_growth("s").is_ok());
        assert!(grew.require_frozen("s").is_err());
        assert_eq!(grew.per_sec(), 100);
    }

    #[test]
    fn watch_from_a_lower_count_than_before_means_lost_work() {
        let w = Watch {
            before: 10,
            after: 60,
            secs: 0.5,
        };
        assert!(w.require_from("s", 10, "before").is_ok());
        let e = w
            .require_from("s", 11, "before the migration")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("before the migration") && e.contains("lost"),
            "{e}"
        );
    }

    #[test]
    fn require_ok_names_the_first_violation() {
        let v: VerifyReport = serde_json::from_value(serde_json::json!({
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
            serde_json::json!({"ok": true, "pages_checked": 0, "violation_count": 0, "violations": []}),
        )
        .unwrap();
        assert!(require_ok("verify", &v).is_err());
    }
}
