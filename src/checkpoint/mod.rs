//! Checkpoints: the on-disk format, its page index and chains (`format`,
//! `index`, `chain`), taking a checkpoint of a running VM (`create`, which
//! runs the transfer engine with the file sink beside it, `sink`), and
//! restoring one (`restore`).
//!
//! It also owns a running VM's place in a chain ([`ChainPosition`]): the
//! checkpoint its state extends and the pages written since, which the
//! next incremental checkpoint stores. The VM only feeds the accumulator
//! it is handed; what the pages mean is this module's.

pub mod chain;
pub mod create;
pub mod disks;
pub mod format;
pub mod image;
pub mod index;
pub mod reset;
pub mod restore;
pub mod sink;

use std::path::PathBuf;
use std::sync::Arc;

use crate::memory::DirtyAccumulator;

/// A checkpoint a VM's state extends: the next incremental's parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRef {
    /// Directory (canonical).
    pub dir: PathBuf,
    /// Chain id.
    pub chain_id: u64,
    /// Checkpoint id.
    pub id: u32,
}

/// Where a running VM stands in a checkpoint chain.
#[derive(Debug, Default)]
pub struct ChainPosition {
    /// The checkpoint last written or restored (None: none yet, so the
    /// next checkpoint is full).
    pub last: Option<CheckpointRef>,
    /// Pages dirtied since `last`, fed by the VM from the first checkpoint
    /// or restore on (its disks' written blocks too, by slot).
    pub since: Arc<DirtyAccumulator>,
    /// The base image each disk's chain refers to, by disk id: blocks no
    /// checkpoint of the chain holds are that image's.
    pub bases: std::collections::BTreeMap<String, format::BaseImage>,
}
