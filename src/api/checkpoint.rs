//! Checkpoints, chains and restores: the request and reports of
//! `checkpoint`, the listing of `checkpoints`, `merge`'s report and what a
//! restore reports.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::transfer::{PauseBreakdown, Phases};

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// Every non-zero page of the VM; the root of a chain.
    Full,
    /// Only the pages written since the parent checkpoint.
    Incremental,
}

impl std::fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointKind::Full => "full",
            CheckpointKind::Incremental => "incremental",
        })
    }
}

/// Body of `PUT /api/v1/vm.checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// Checkpoint directory (created if missing); absolute, since the VM's
    /// process has a working directory of its own.
    pub dir: PathBuf,
    /// Start a new chain with a full checkpoint.
    #[serde(default)]
    pub full: bool,
    /// Stop the VM once the checkpoint is safely on disk.
    #[serde(default)]
    pub stop_after: bool,
}

impl CheckpointRequest {
    /// Checks what can be checked without the VM.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !self.dir.is_absolute() {
            return Err(ApiError::bad_request(format!(
                "dir must be an absolute path, got {}",
                self.dir.display()
            )));
        }
        Ok(())
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
    pub kind: CheckpointKind,
    /// Microseconds no vCPU ran.
    pub downtime_us: u64,
    /// The longest stall the guest felt during the checkpoint, µs, as the
    /// builtin:dirty guest measures it (absent for other guests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_stall_us: Option<u64>,
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
    /// Disk blocks stored with data (4 KiB each).
    #[serde(default)]
    pub disk_blocks: u64,
    /// Disk blocks recorded as zero extents (discarded or zeroed).
    #[serde(default)]
    pub disk_zero_blocks: u64,
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
    pub pause_breakdown: PauseBreakdown,
    /// Where the whole checkpoint went: pre-copy, pause, writing the
    /// pages protected in the pause, completing the file (fsync).
    pub phases: Phases,
}

/// One complete checkpoint file of a directory, as its header describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointEntry {
    /// Checkpoint id.
    pub id: u32,
    /// Parent id; `None` for a full checkpoint.
    pub parent: Option<u32>,
    /// Full or incremental.
    pub kind: CheckpointKind,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Bytes of disk blocks the file stores (blocks written since its
    /// parent; for a full checkpoint, those that differ from the base).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Id of the chain the file belongs to.
    pub chain_id: u64,
    /// Path of the file.
    pub path: PathBuf,
}

/// A checkpoint file whose header cannot be used: listed apart, with the
/// reason, so it blocks neither listing nor the other chains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedFile {
    /// The id its name gives.
    pub id: u32,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// `vmhop checkpoints DIR`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChainListing {
    /// The directory listed.
    pub dir: PathBuf,
    /// Its complete checkpoints, by id.
    pub checkpoints: Vec<CheckpointEntry>,
    /// Files whose header cannot be used.
    pub damaged: Vec<DamagedFile>,
}

/// `vmhop merge DIR[@ID]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MergeReport {
    /// Always "merge".
    pub operation: String,
    /// Id of the new full checkpoint.
    pub id: u32,
    /// Its file.
    pub path: PathBuf,
    /// Its size.
    pub bytes_written: u64,
    /// Non-zero pages stored.
    pub pages_written: u64,
    /// Disk blocks stored with data.
    #[serde(default)]
    pub disk_blocks: u64,
}

/// `vmhop delete DIR@ID` and `vmhop checkpoints DIR --drop-images`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DropReport {
    /// "delete" or "drop-images".
    pub operation: String,
    /// The checkpoint file deleted (`delete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The clone images removed.
    pub images: Vec<PathBuf>,
    /// The memory they held.
    pub image_bytes: u64,
}

/// A restored disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoredDisk {
    /// Its id.
    pub id: String,
    /// The new file its writes go to (filled from the checkpoint).
    pub path: PathBuf,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    /// Always "restore".
    pub operation: String,
    /// Checkpoint id restored.
    pub id: u32,
    /// Its kind.
    pub kind: CheckpointKind,
    /// Files read (the full checkpoint and the incrementals up to id).
    pub chain_files: usize,
    /// Whether pages load lazily after the vCPUs start.
    pub lazy: bool,
    /// Non-zero pages stored in the chain's files.
    pub pages: u64,
    /// The restored disks and the new files they landed in.
    #[serde(default)]
    pub disks: Vec<RestoredDisk>,
    /// Milliseconds from the start of the restore until the vCPUs could run.
    pub resume_ms: f64,
    /// Where `resume_ms` went.
    #[serde(default)]
    pub phases: RestorePhases,
    /// Milliseconds from the start of the vmhop process (its `main`) until
    /// the vCPUs could run: what a clone's start costs, process set-up
    /// included (not the exec and the dynamic loader before `main`).
    #[serde(default)]
    pub process_ms: f64,
    /// A clone (`--shared`): the image its memory maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<CloneImageReport>,
}

/// The image a clone's memory maps copy-on-write.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CloneImageReport {
    /// The image file (on tmpfs).
    pub path: PathBuf,
    /// Whether this restore built it (the first clone of a checkpoint does).
    pub built: bool,
    /// Milliseconds spent building it (0 if it existed).
    pub build_ms: f64,
    /// Whether this restore validated the checkpoint chain: a clone of an
    /// image that exists skips it (the image was built from a validated
    /// chain), unless it has disks, whose reads need the chain.
    pub validated: bool,
}

/// Where the time until the vCPUs could run went, in milliseconds. The
/// chain's validation runs on a thread of its own beside the VM's creation
/// up to the point where its memory must be filled: `resume_ms` is about
/// `meta` + the longer of `validate` and `vm` + `uffd` or `load` + `start`,
/// not their sum.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RestorePhases {
    /// Listing the directory, checking the chain's links, reading and
    /// checking the restored file's header, footer, config and state.
    pub meta_ms: f64,
    /// Validating every file of the chain (header, footer, config, state
    /// and index checksums, index entries, every page inside guest memory):
    /// the validation thread's own time.
    pub validate_ms: f64,
    /// Building the devices and creating the paused VM (KVM VM, memory
    /// mappings, slots registered with dirty logging on, vCPUs and their
    /// threads, vCPU state), without `wait`, `uffd` and `load`.
    pub vm_ms: f64,
    /// Lazy: creating the userfaultfd and registering guest memory.
    pub uffd_ms: f64,
    /// Waiting for the validation once the VM's memory was ready to fill.
    pub wait_ms: f64,
    /// Eager: reading every page into guest memory.
    pub load_ms: f64,
    /// Starting the vCPUs (0 when restored paused).
    pub start_ms: f64,
}

/// A checkpoint named on the command line: `DIR` (its latest) or `DIR@ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointTarget {
    /// The directory.
    pub dir: PathBuf,
    /// The id (None: the latest).
    pub id: Option<u32>,
}

impl std::str::FromStr for CheckpointTarget {
    type Err = ApiError;

    /// Parses `DIR[@ID]`.
    fn from_str(s: &str) -> Result<CheckpointTarget, ApiError> {
        match s.rsplit_once('@') {
            Some((d, id)) if !d.is_empty() => {
                let id: u32 = id.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "'{s}': the part after @ must be a checkpoint id (a number)"
                    ))
                })?;
                Ok(CheckpointTarget {
                    dir: PathBuf::from(d),
                    id: Some(id),
                })
            }
            _ => Ok(CheckpointTarget {
                dir: PathBuf::from(s),
                id: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_an_id() {
        let t: CheckpointTarget = "/ck@3".parse().unwrap();
        assert_eq!((t.dir, t.id), (PathBuf::from("/ck"), Some(3)));
        assert!("/a@b/ck".parse::<CheckpointTarget>().is_err());
        assert!("/ck@x".parse::<CheckpointTarget>().is_err());
        let t: CheckpointTarget = "/ck".parse().unwrap();
        assert_eq!((t.dir, t.id), (PathBuf::from("/ck"), None));
        let t: CheckpointTarget = "@5".parse().unwrap();
        assert_eq!(t.dir, PathBuf::from("@5"), "no directory before @: all dir");
    }
}
