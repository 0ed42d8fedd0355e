//! Taking a checkpoint of a running VM: decides full or incremental, runs
//! the transfer engine with the file sink, and reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::chain::Chain;
use super::format::{Header, Kind};
use super::sink::FileSink;
use crate::transfer::{transfer, FirstPass, Plan};
use crate::vmm::{CheckpointRef, Vm};

/// Pause budget of a checkpoint's last round.
pub const CHECKPOINT_MAX_DOWNTIME: Duration = Duration::from_millis(1);

/// The pause the pre-copy aims at, below the budget: the engine's fixed
/// overhead estimate does not cover stopping and restarting vCPUs busy in
/// the guest, which took 0.3–0.6 ms of a hot guest's pause on a quiet host.
const CHECKPOINT_PAUSE_AIM: Duration = Duration::from_micros(600);

/// Body of `PUT /api/v1/vm.checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// Checkpoint directory (created if missing).
    pub dir: PathBuf,
    /// Start a new chain with a full checkpoint.
    #[serde(default)]
    pub full: bool,
    /// Stop the VM once the checkpoint is safely on disk.
    #[serde(default)]
    pub stop_after: bool,
}

/// How a checkpoint bounds its pause; the defaults are what the API and
/// the CLI use. The benchmarks compare the alternatives.
#[derive(Debug, Clone, Copy)]
pub struct PauseTuning {
    /// Write-protect the pages still dirty at the pause and write them
    /// after the resume, copying any the guest writes first
    /// (copy-on-write), instead of copying them all in the pause.
    pub protect_in_pause: bool,
    /// Throttle the vCPUs step by step while the dirty set does not shrink
    /// to the budget (auto-converge).
    pub auto_converge: bool,
}

impl Default for PauseTuning {
    fn default() -> Self {
        PauseTuning {
            protect_in_pause: true,
            auto_converge: true,
        }
    }
}

/// What a checkpoint did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointReport {
    /// Always "checkpoint".
    pub operation: String,
    /// Checkpoint id.
    pub id: u32,
    /// Parent id (null for a full checkpoint).
    pub parent: Option<u32>,
    /// "full" or "incremental".
    pub kind: Kind,
    /// Microseconds no vCPU ran.
    pub downtime_us: u64,
    /// Whole operation, ms.
    pub total_ms: f64,
    /// Pages of guest memory.
    pub pages_total: u64,
    /// Distinct non-zero pages stored in the file.
    pub pages_written: u64,
    /// Size of the checkpoint file.
    pub bytes_written: u64,
    /// Zero pages not stored.
    pub zero_pages: u64,
    /// Copy rounds (the paused one included).
    pub rounds: u32,
    /// Pages the pause dealt with: write-protected (see `pages_protected`)
    /// or staged by a copy.
    pub pages_in_pause: u64,
    /// Of those, pages write-protected in the pause and written after it.
    pub pages_protected: u64,
    /// Protected pages the guest wrote before they were written out: each
    /// cost the writing vCPU a fault and a page copy.
    pub cow_faults: u64,
    /// The highest throttle auto-converge put on the vCPUs, percent
    /// (0: the guest ran at full speed).
    pub throttle_max_percent: u32,
    /// Whether the dirty set converged to the pause budget.
    pub converged: bool,
    /// Checkpoint directory.
    pub dir: PathBuf,
    /// The file.
    pub path: PathBuf,
    /// Whether the VM was stopped afterwards.
    pub stopped: bool,
    /// Where the pause went.
    pub pause_breakdown: crate::transfer::PauseBreakdown,
    /// Where the whole checkpoint went: pre-copy, pause, writing the
    /// pages protected in the pause, completing the file (fsync).
    pub phases: crate::transfer::Phases,
}

/// A checkpoint failed; the VM runs on and earlier checkpoints are intact.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The directory cannot be used.
    #[error("checkpoint directory {dir}: {message}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Writing failed.
    #[error("checkpoint failed: {0}")]
    Transfer(#[from] crate::transfer::TransferError),
}

fn dir_err(dir: &Path, m: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Dir {
        dir: dir.to_path_buf(),
        message: m.to_string(),
    }
}

/// Checkpoints `vm` into `req.dir`. Incremental when the directory's
/// latest checkpoint is the one this VM last wrote or was restored from
/// and `full` is not asked for; full otherwise.
pub fn checkpoint(vm: &Vm, req: &CheckpointRequest) -> Result<CheckpointReport, CheckpointError> {
    checkpoint_tuned(vm, req, PauseTuning::default())
}

/// [`checkpoint`] with a chosen way of bounding the pause.
pub fn checkpoint_tuned(
    vm: &Vm,
    req: &CheckpointRequest,
    tuning: PauseTuning,
) -> Result<CheckpointReport, CheckpointError> {
    std::fs::create_dir_all(&req.dir).map_err(|e| dir_err(&req.dir, e))?;
    let dir = req.dir.canonicalize().map_err(|e| dir_err(&req.dir, e))?;
    let chain = Chain::open(&dir).map_err(|e| dir_err(&dir, e))?;
    let parent = vm.last_checkpoint().filter(|last| {
        !req.full
            && last.dir == dir
            && chain
                .get(last.id)
                .is_some_and(|e| e.chain_id == last.chain_id)
    });
    let header = match &parent {
        Some(p) => Header::incremental(p.chain_id, chain.next_id(), p.id),
        None => Header::full(chain.next_id()),
    };
    let (id, chain_id, kind, parent_id) = (header.id, header.chain_id, header.kind, header.parent);
    let mut sink = FileSink::new(&dir, header, req.stop_after);
    let slots: Vec<u32> = vm.memory().chunks().map(|c| c.slot).collect();
    let first_pass = if parent.is_some() {
        FirstPass::SinceCheckpoint
    } else {
        FirstPass::All
    };
    let mut plan = Plan::new(slots, first_pass, true, CHECKPOINT_PAUSE_AIM);
    plan.protect_in_pause = tuning.protect_in_pause;
    plan.auto_converge = tuning.auto_converge;
    let r = transfer(vm, &mut sink, &plan)?;
    let written = sink
        .written
        .take()
        .expect("a completed file sink has written its file");
    vm.set_last_checkpoint(Some(CheckpointRef {
        dir: dir.clone(),
        chain_id,
        id,
    }));
    Ok(CheckpointReport {
        operation: "checkpoint".into(),
        id,
        parent: parent_id,
        kind,
        downtime_us: r.downtime_us,
        total_ms: r.total_ms,
        pages_total: vm.memory().size() / crate::memory::PAGE_SIZE,
        pages_written: written.pages_written,
        bytes_written: written.bytes_written,
        zero_pages: written.zero_pages,
        rounds: r.rounds,
        pages_in_pause: r.pages_in_pause,
        pages_protected: r.pages_protected,
        cow_faults: r.cow_faults,
        throttle_max_percent: r.throttle_max_percent,
        converged: r.converged,
        dir,
        path: written.path,
        stopped: req.stop_after,
        pause_breakdown: r.pause_breakdown,
        phases: r.phases,
    })
}
