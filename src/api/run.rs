//! What the CLI asks of its own process rather than of a VM's API socket:
//! running a VMM (`run`, `restore`, `run --incoming`) and the commands that
//! read the host or a checkpoint directory (`topology`, `checkpoints`,
//! `merge`). The service implements [`Local`]; `main` hands it to the CLI,
//! so the CLI names no layer below this one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checkpoint::{ChainListing, CheckpointTarget, DropReport, MergeReport, RestoreReport};
use super::error::ApiError;
use super::migration::{AuthFiles, ReceiveReport};
use super::numa::TopologyReport;
use super::vm::VmState;

/// Where a Linux guest's console (COM1) goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleTarget {
    /// vmhop's standard output.
    Stdout,
    /// vmhop's standard error (when stdout carries `--json`).
    Stderr,
    /// A file, appended to.
    File(PathBuf),
}

/// How the VM comes to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartSpec {
    /// A fresh guest.
    Boot,
    /// From a checkpoint.
    Restore {
        /// Which checkpoint.
        target: CheckpointTarget,
        /// Load all memory before the vCPUs run (else lazily).
        eager: bool,
        /// A clone: map the checkpoint's shared image copy-on-write.
        #[serde(default)]
        shared: bool,
    },
    /// From a migration source.
    Incoming {
        /// `tcp://ADDR:PORT` or `unix:PATH`.
        address: String,
        /// Give up after the first failed source.
        once: bool,
        /// How sources are authenticated.
        auth: AuthFiles,
    },
}

/// Everything `vmhop run` was told, as given: the service checks it once,
/// when it builds the VM, and answers a [`ApiError`] of kind bad request
/// (exit 2) for what does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// VM name (a restore keeps the saved name unless `name_given`).
    pub name: String,
    /// Whether the user named the VM.
    pub name_given: bool,
    /// The API socket to serve.
    pub api_socket: PathBuf,
    /// vCPUs (None: 1).
    pub vcpus: Option<u32>,
    /// `--memory` as given (None: 256 MiB, or the sum of `numa`).
    pub memory: Option<String>,
    /// `--numa` options, as given.
    pub numa: Vec<String>,
    /// `--guest`, as given.
    pub guest: Option<String>,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// Where the console goes.
    pub console: ConsoleTarget,
    /// Transparent huge pages.
    pub hugepages: bool,
    /// `--disk` options, as given (`path=FILE[,readonly][,id=NAME]...`).
    pub disks: Vec<String>,
    /// `--net` options, as given (`tap=NAME[,mac=MAC][,id=ID]`).
    #[serde(default)]
    pub nets: Vec<String>,
    /// `--vsock`, as given (`cid=N,socket=PATH`).
    #[serde(default)]
    pub vsock: Option<String>,
    /// `--chunk-size` as given (None: the default).
    pub chunk_size: Option<String>,
    /// Start (or restore) with the vCPUs stopped.
    pub paused: bool,
    /// Boot, restore or incoming.
    pub start: StartSpec,
    /// Test hooks (`--test-hook NAME=VALUE`, hidden; docs/test-device.md).
    pub test_hooks: Vec<String>,
    /// `--reset-base`: the checkpoint resets are armed for at start.
    #[serde(default)]
    pub reset_base: Option<super::checkpoint::CheckpointTarget>,
    /// `--reset-input`: the file every reset copies into the guest's input
    /// buffer (read again at each reset).
    #[serde(default)]
    pub reset_input: Option<std::path::PathBuf>,
}

/// What a `run` process has to say while it runs; the CLI renders it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RunEvent {
    /// Waiting for an incoming migration.
    Waiting(Waiting),
    /// The VM runs (or is paused) and its API answers.
    Started(Started),
    /// A line for the user on stderr (a warning, what happened).
    Notice(String),
}

/// A process waiting for an incoming migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Waiting {
    /// Always `incoming`.
    pub state: VmState,
    /// Where it listens.
    pub listening: String,
    /// How sources must authenticate.
    pub security: String,
    /// Its API socket.
    pub api_socket: PathBuf,
    /// Its process id.
    pub pid: u32,
}

/// A VM that came up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    /// VM name.
    pub name: String,
    /// Running or paused.
    pub state: VmState,
    /// The process id.
    pub pid: u32,
    /// Its API socket.
    pub api_socket: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// The guest kind.
    pub guest: String,
    /// How it came: booted, restored or arrived.
    pub restore: Option<Arrival>,
}

/// How a VM that did not boot came to be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Arrival {
    /// From a checkpoint.
    Restored(RestoreReport),
    /// From a migration source.
    Migrated(ReceiveReport),
}

/// How a `run` process ended without an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunEnd {
    /// `stop`, SIGTERM or SIGINT.
    Stopped,
    /// The guest powered off or rebooted; what it did.
    GuestEnded(String),
    /// The VM went to another host, or was checkpointed with stop-after.
    Handed(String),
}

/// The in-process half of vmhop that the CLI drives.
pub trait Local {
    /// Runs a VMM until it stops, telling `events` what happens.
    fn run(&self, spec: RunSpec, events: &mut dyn FnMut(RunEvent)) -> Result<RunEnd, ApiError>;
    /// The host's NUMA nodes.
    fn topology(&self) -> Result<TopologyReport, ApiError>;
    /// The checkpoints in `dir`.
    fn checkpoints(&self, dir: &Path) -> Result<ChainListing, ApiError>;
    /// Folds a chain into one new full checkpoint.
    fn merge(&self, target: &CheckpointTarget) -> Result<MergeReport, ApiError>;
    /// Deletes one checkpoint (and its clone image); refused while clones
    /// of it run or other checkpoints depend on it.
    fn delete(&self, target: &CheckpointTarget) -> Result<DropReport, ApiError>;
    /// Removes the clone images of `dir`'s checkpoints; refused while
    /// clones of them run.
    fn drop_images(&self, dir: &Path) -> Result<DropReport, ApiError>;
    /// Whether this host's KVM can run a Linux guest's kernel code at a
    /// usable speed, found by running a few instructions of it; the error
    /// says why not and what to do instead.
    fn linux_capable(&self) -> Result<(), ApiError>;
}
