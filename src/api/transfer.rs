//! The parts of a report that come from the transfer engine: where a pause
//! and a whole transfer went. Checkpoints, NUMA moves and migrations embed
//! them in their own reports.

use serde::{Deserialize, Serialize};

/// Where a transfer's time went, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Phases {
    /// Until the pause: the first pass and the pre-copy rounds.
    pub precopy_ms: f64,
    /// The pause.
    pub pause_ms: f64,
    /// After the resume: sending the pages protected in the pause.
    pub drain_ms: f64,
    /// The sink's completion (writing out what it staged, fsync).
    pub complete_ms: f64,
}

/// The phases of the pause, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PauseBreakdown {
    /// Stopping every vCPU, each saving its registers as it stops.
    pub stop_us: u64,
    /// Fetching the last dirty logs.
    pub fetch_us: u64,
    /// Sending the last pages to the sink, or write-protecting them.
    pub copy_us: u64,
    /// Assembling the VM state from the saved vCPU registers.
    pub state_us: u64,
    /// The sink's commit (switching slots, recording state).
    pub commit_us: u64,
    /// Restarting every vCPU.
    pub resume_us: u64,
}
