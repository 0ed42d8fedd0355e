//! What the demo found, as data: one serde struct per step, which the
//! steps fill in as they pass. With `--json` it is the one object the
//! demo prints, inside the [`Outcome`] both demos share; without, the
//! builtin demo's closing summary is made from it.
//!
//! Owns the shape of `vmhop demo --json` (docs: README's demo section).
//! The reports inside are the API's own types, as the VMs returned them.

use std::path::Path;

use serde::Serialize;

use super::checks::Watch;
use super::render::Summary;
use crate::api::checkpoint::{ChainListing, CheckpointReport, RestoreReport};
use crate::api::migration::{MigrateReport, ReceiveReport};
use crate::api::numa::{NumaMigrateReport, NumaStatReport};
use crate::api::run::Started;
use crate::api::vm::VerifyReport;

/// Everything the builtin demo found, step by step (a step that did not
/// run is left out).
#[derive(Debug, Default, Serialize)]
pub(super) struct Found {
    /// Step 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<StartFound>,
    /// Step 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseFound>,
    /// Step 3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointsFound>,
    /// Step 4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreFound>,
    /// Step 5.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numa: Option<NumaFound>,
    /// Step 6.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationFound>,
    /// Step 7.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskFound>,
    /// Step 8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockFound>,
    /// Step 9.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<ResetFound>,
}

/// Step 8: host–guest sockets through a move, a checkpoint and a restore.
#[derive(Debug, Serialize)]
pub(super) struct VsockFound {
    /// The device's answer to the host program's `CONNECT`.
    pub connect: String,
    /// The echoes on that one connection: at the start, after the NUMA
    /// move, after the checkpoint, after the restore.
    pub echoes: Vec<EchoFound>,
    /// The NUMA move's report.
    pub numa_move: NumaMigrateReport,
    /// The checkpoint's report.
    pub checkpoint: CheckpointReport,
    /// `transport_resets` of the restored VM's device (1: its guest was
    /// told).
    pub restored_transport_resets: u64,
    /// The echo on a new connection to the restored VM.
    pub restored_echo: EchoFound,
    /// The original's connection read end of file once it stopped.
    pub end_of_file_after_stop: bool,
}

/// One line echoed by the guest.
#[derive(Debug, Serialize)]
pub(super) struct EchoFound {
    /// When in the step.
    pub when: String,
    /// Bytes sent and read back.
    pub bytes: u64,
    /// From the write to the last byte read back, µs.
    pub round_trip_us: f64,
}

/// Step 9: a thousand resets the guest asked for.
#[derive(Debug, Serialize)]
pub(super) struct ResetFound {
    /// The checkpoint taken while the guest waited to be armed.
    pub checkpoint: CheckpointReport,
    /// The `vm.reset` that armed it.
    pub armed: crate::api::vm::ResetReport,
    /// From arming until `status` showed the thousand resets, s.
    pub secs: f64,
    /// Guest-driven resets per second over that time.
    pub resets_per_s: f64,
    /// `status.reset` then.
    pub status: crate::api::vm::ResetStatus,
    /// The verify after the loop.
    pub verify: VerifyReport,
}

/// Step 7: a disk through a checkpoint.
#[derive(Debug, Serialize)]
pub(super) struct DiskFound {
    /// The checkpoint's report.
    pub checkpoint: crate::api::checkpoint::CheckpointReport,
    /// What verify found on the running VM after the guest wrote on.
    pub after_checkpoint: crate::api::vm::DiskVerifyReport,
    /// What verify found on the restored (paused) VM.
    pub restored: crate::api::vm::DiskVerifyReport,
}

/// Step 1: the VM came up and its guest works.
#[derive(Debug, Serialize)]
pub(super) struct StartFound {
    /// What `vmhop run --json` printed.
    pub vm: Started,
    /// From spawning the process until that report, ms.
    pub up_ms: f64,
    /// The guest's progress over the first watch.
    pub progress: Watch,
}

/// Step 2: pause, verify, resume.
#[derive(Debug, Serialize)]
pub(super) struct PauseFound {
    /// How long stopping every vCPU took.
    pub pause_us: u64,
    /// Progress while paused (unchanged).
    pub frozen: Watch,
    /// The verify of the paused guest.
    pub verify: VerifyReport,
    /// Progress once resumed (growing).
    pub resumed: Watch,
}

/// Step 3: a full and an incremental checkpoint while the guest runs.
#[derive(Debug, Serialize)]
pub(super) struct CheckpointsFound {
    /// The full one.
    pub full: CheckpointReport,
    /// The incremental one on it.
    pub incremental: CheckpointReport,
    /// `vmhop checkpoints DIR --json` (only read with `--json`; the text
    /// demo shows the command's own text).
    pub list: Option<ChainListing>,
}

/// Step 4: the lazy restore of the incremental checkpoint.
#[derive(Debug, Serialize)]
pub(super) struct RestoreFound {
    /// What `vmhop restore --json` reported.
    pub report: RestoreReport,
    /// The original VM's progress when it was stopped.
    pub progress_at_stop: u64,
    /// Progress read just before and just after the incremental checkpoint.
    pub checkpoint_progress: [u64; 2],
    /// The restored guest's progress.
    pub progress: Watch,
    /// Its verify.
    pub verify: VerifyReport,
    /// How long the verify waited for the background load, ms.
    pub verify_waited_ms: f64,
}

/// Step 5: the NUMA moves.
#[derive(Debug, Serialize)]
pub(super) struct NumaFound {
    /// The host's nodes with memory.
    pub host_nodes: Vec<u32>,
    /// Whether there is only one (the moves are then in place).
    pub one_node: bool,
    /// Placement before the moves.
    pub stat_before: NumaStatReport,
    /// Each move.
    pub moves: Vec<MoveFound>,
    /// Placement after them.
    pub stat_after: NumaStatReport,
}

/// One NUMA move and the verify after it.
#[derive(Debug, Serialize)]
pub(super) struct MoveFound {
    /// The host node the memory came from.
    pub from: u32,
    /// The move's report.
    pub report: NumaMigrateReport,
    /// The verify after it.
    pub verify: VerifyReport,
}

/// Step 6: the host migration to a second vmhop process.
#[derive(Debug, Serialize)]
pub(super) struct MigrationFound {
    /// Where the destination listened.
    pub to: String,
    /// The source's report.
    pub report: MigrateReport,
    /// What the destination printed when the VM arrived.
    pub arrival: ReceiveReport,
    /// The source's progress just before the migration.
    pub progress_before: u64,
    /// The source process's exit code (0, or the step fails).
    pub source_exit: i32,
    /// The guest's progress on the destination.
    pub progress: Watch,
    /// The verify on the destination.
    pub verify: VerifyReport,
}

impl Found {
    /// The figures the closing summary tells, for a guest of
    /// `memory_bytes` on `vcpus`.
    pub(super) fn summary(&self, memory_bytes: u64, vcpus: u32) -> Summary {
        let pause = self.pause.as_ref();
        let restore = self.restore.as_ref();
        let numa = self.numa.as_ref();
        let migration = self.migration.as_ref();
        let verifies = usize::from(pause.is_some())
            + usize::from(restore.is_some())
            + numa.map_or(0, |n| n.moves.len())
            + usize::from(migration.is_some());
        Summary {
            memory_bytes,
            vcpus,
            verifies,
            pause_us: pause.map_or(0, |p| p.pause_us),
            checkpoints: self
                .checkpoints
                .as_ref()
                .map(|c| (c.full.clone(), c.incremental.clone())),
            restore_ms: restore.map(|r| r.report.resume_ms),
            one_node: numa.is_some_and(|n| n.one_node),
            moves: numa.map_or_else(Vec::new, |n| {
                n.moves
                    .iter()
                    .map(|m| (m.report.mode, m.report.downtime_us))
                    .collect()
            }),
            migration: migration.map(|m| m.report.clone()),
        }
    }
}

/// The one JSON object a demo prints with `--json`: what it found, and how
/// it ended.
#[derive(Debug, Serialize)]
pub(super) struct Outcome<'a, T: Serialize> {
    /// Always "demo".
    pub operation: &'static str,
    /// "linux" for `demo --kernel`; absent for the builtin guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<&'static str>,
    /// Always true: a failed demo prints an error instead.
    pub ok: bool,
    /// The whole demo, ms.
    pub total_ms: f64,
    /// Its work directory.
    pub work_dir: &'a Path,
    /// Whether the directory was left behind (`--keep-dir`, or it could
    /// not be removed).
    pub work_dir_kept: bool,
    /// What the builtin demo says of Linux guests on this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux_guests: Option<&'a str>,
    /// The steps' findings.
    #[serde(flatten)]
    pub found: &'a T,
}
