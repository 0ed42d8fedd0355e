//! Taking a checkpoint of a running VM: decides full or incremental, runs
//! the transfer engine with the file sink, and reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::chain::Chain;
use super::disks::CheckpointDisks;
use super::format::Header;
use super::sink::FileSink;
use super::{ChainPosition, CheckpointRef};
pub use crate::api::checkpoint::{CheckpointReport, CheckpointRequest};
use crate::transfer::{transfer, FirstPass, Plan};
use crate::vmm::Vm;

/// The pause the pre-copy aims at, below the budget: the engine's fixed
/// overhead estimate does not cover stopping and restarting vCPUs busy in
/// the guest, which took 0.3–0.6 ms of a hot guest's pause on a quiet host.
const CHECKPOINT_PAUSE_AIM: Duration = Duration::from_micros(600);

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

/// A checkpoint failed; the VM runs on and earlier checkpoints are intact.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The directory cannot be used.
    #[error("checkpoint directory {}: {message}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
        /// Whose fault: a directory that cannot be made or read is the
        /// request's; a damaged chain in it makes it unusable.
        kind: crate::api::ErrorKind,
    },
    /// Writing failed.
    #[error("checkpoint failed: {0}")]
    Transfer(#[from] crate::transfer::TransferError),
    /// Dirty tracking for the chain could not be kept on.
    #[error("checkpoint failed: {0}")]
    Vm(#[from] crate::vmm::VmError),
    /// A disk cannot take part now.
    #[error("checkpoint refused: {0}")]
    Disk(#[from] super::disks::DiskCheckpointError),
}

impl crate::api::Classify for CheckpointError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            CheckpointError::Dir { kind, .. } => *kind,
            CheckpointError::Transfer(_) | CheckpointError::Vm(_) => ErrorKind::Failed,
            CheckpointError::Disk(e) => e.kind(),
        }
    }
}

fn dir_io(dir: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::Dir {
        dir: dir.to_path_buf(),
        kind: match crate::api::ErrorKind::of_io(&e) {
            crate::api::ErrorKind::Failed => crate::api::ErrorKind::Unusable,
            k => k,
        },
        message: e.to_string(),
    }
}

/// Checkpoints `vm` into `req.dir`. Incremental when the directory's
/// latest checkpoint is the one this VM last wrote or was restored from
/// (`position`) and `full` is not asked for; full otherwise. On success
/// `position` moves to the new checkpoint.
pub fn checkpoint(
    vm: &Vm,
    position: &mut ChainPosition,
    req: &CheckpointRequest,
) -> Result<CheckpointReport, CheckpointError> {
    checkpoint_tuned(vm, position, req, PauseTuning::default())
}

/// [`checkpoint`] with a chosen way of bounding the pause.
pub fn checkpoint_tuned(
    vm: &Vm,
    position: &mut ChainPosition,
    req: &CheckpointRequest,
    tuning: PauseTuning,
) -> Result<CheckpointReport, CheckpointError> {
    std::fs::create_dir_all(&req.dir).map_err(|e| dir_io(&req.dir, e))?;
    let dir = req.dir.canonicalize().map_err(|e| dir_io(&req.dir, e))?;
    let chain = Chain::open(&dir).map_err(|e| CheckpointError::Dir {
        dir: dir.clone(),
        kind: crate::api::Classify::kind(&e),
        message: e.to_string(),
    })?;
    // From now on every page the VM's dirty logs show is kept for the
    // chain, whatever else fetches them.
    vm.keep_dirty(position.since.clone())?;
    let parent = position.last.clone().filter(|last| {
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
    let disks = CheckpointDisks::plan(vm, &dir, chain_id, parent.is_none(), &position.bases)?;
    let mut slots: Vec<u32> = vm.memory().chunks().map(|c| c.slot).collect();
    slots.extend(disks.slots(vm));
    let mut sink = FileSink::new(&dir, header, req.stop_after, position.since.clone());
    sink.disks = Some(disks);
    let first_pass = if parent.is_some() {
        FirstPass::Accumulated(position.since.clone())
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
    position.last = Some(CheckpointRef {
        dir: dir.clone(),
        chain_id,
        id,
    });
    if let Some(d) = sink.disks.as_ref() {
        position.bases = d.bases().collect();
    }
    Ok(CheckpointReport {
        operation: "checkpoint".into(),
        id,
        parent: parent_id,
        kind,
        guest_stall_us: None,
        downtime_us: r.downtime_us,
        total_ms: r.total_ms,
        pages_total: vm.memory().size() / crate::memory::PAGE_SIZE,
        pages_written: written.pages_written,
        bytes_written: written.bytes_written,
        zero_pages: written.zero_pages,
        disk_blocks: written.disk_blocks,
        disk_zero_blocks: written.disk_zero_blocks,
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
