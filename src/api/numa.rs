//! NUMA: the host's topology, where a VM's pages live (`numa-stat`), and
//! the request and report of a NUMA move (`numa-migrate`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::transfer::PauseBreakdown;

/// Default downtime budget of a NUMA move, ms.
pub const DEFAULT_MAX_DOWNTIME_MS: f64 = 1.0;

/// The largest downtime budget any move accepts, in milliseconds: a pause
/// of a minute is no longer a budget, and larger numbers would overflow the
/// time arithmetic.
pub const MAX_DOWNTIME_LIMIT_MS: f64 = 60_000.0;

/// Checks a downtime budget in milliseconds, for any operation.
pub fn check_downtime_ms(ms: f64) -> Result<f64, ApiError> {
    if ms > 0.0 && ms <= MAX_DOWNTIME_LIMIT_MS {
        Ok(ms)
    } else {
        Err(ApiError::bad_request(format!(
            "max_downtime_ms must be a number of milliseconds above 0 and at most \
             {MAX_DOWNTIME_LIMIT_MS}, got {ms}"
        )))
    }
}

/// How to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Pre-copy chunk by chunk, short pauses.
    #[default]
    Live,
    /// One pause, copy everything.
    StopCopy,
    /// The kernel moves pages in place.
    Kernel,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "live" => Ok(Mode::Live),
            "stop-copy" => Ok(Mode::StopCopy),
            "kernel" => Ok(Mode::Kernel),
            _ => Err(format!(
                "unknown mode '{s}' (expected live, stop-copy or kernel)"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Live => "live",
            Mode::StopCopy => "stop-copy",
            Mode::Kernel => "kernel",
        })
    }
}

/// Body of `PUT /api/v1/vm.numa-migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaMigrateRequest {
    /// Target host node.
    pub to_node: u32,
    /// Guest node to move (None: all).
    #[serde(default)]
    pub guest_node: Option<u32>,
    /// Mode.
    #[serde(default)]
    pub mode: Mode,
    /// Downtime budget per pause, ms.
    #[serde(default)]
    pub max_downtime_ms: Option<f64>,
}

impl NumaMigrateRequest {
    /// The downtime budget asked for (or the default), checked.
    pub fn max_downtime_ms(&self) -> Result<f64, ApiError> {
        check_downtime_ms(self.max_downtime_ms.unwrap_or(DEFAULT_MAX_DOWNTIME_MS))
    }
}

/// Latencies of kernel-mode batches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BatchStats {
    /// move_pages calls.
    pub count: u64,
    /// Pages per call.
    pub pages_per_batch: u64,
    /// Median call latency, µs.
    pub median_us: u64,
    /// Slowest call, µs.
    pub max_us: u64,
    /// Pages still off the target after the batches that later move_pages
    /// calls moved while the guest ran.
    #[serde(default)]
    pub retried_pages: u64,
    /// Pages moved by move_pages with the guest paused.
    #[serde(default)]
    pub paused_pages: u64,
    /// Pages the kernel would not move at all, copied with the chunks that
    /// hold them in a stop-copy (the engine with the local sink).
    #[serde(default)]
    pub copied_pages: u64,
}

/// What a NUMA move did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NumaMigrateReport {
    /// Always "numa-migrate".
    pub operation: String,
    /// Mode used.
    pub mode: Mode,
    /// Target host node.
    pub to_node: u32,
    /// Guest nodes moved.
    pub guest_nodes: Vec<u32>,
    /// Longest pause, µs.
    pub downtime_us: u64,
    /// The longest stall the guest felt during the move, µs, as the
    /// builtin:dirty guest measures it (absent for other guests): in every
    /// mode, kernel page migration included, the figure to compare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_stall_us: Option<u64>,
    /// All pauses together, µs.
    pub paused_total_us: u64,
    /// Number of pauses.
    pub pauses: u32,
    /// Whole operation, ms.
    pub total_ms: f64,
    /// Copy rounds over all chunks.
    pub rounds: u32,
    /// Pages copied (or moved by the kernel).
    pub pages_moved: u64,
    /// Live: whether every pause really was within the budget
    /// (`max_downtime_ms`), measured from the vCPUs stopping to their
    /// running again, and no chunk fell back to a stop-copy.
    pub converged: bool,
    /// Chunks that fell back to a bounded stop-copy (live).
    pub fallback_chunks: u32,
    /// Pauses that really lasted longer than the budget (live).
    #[serde(default)]
    pub pauses_over_budget: u32,
    /// The downtime budget per pause, µs.
    #[serde(default)]
    pub max_downtime_us: u64,
    /// Extra memory held at most at one moment, bytes.
    pub peak_extra_bytes: u64,
    /// kernel mode: the move_pages batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<BatchStats>,
    /// Pages per host node before, from the kernel.
    pub placement_before: BTreeMap<String, u64>,
    /// Pages per host node after, from the kernel.
    pub placement_after: BTreeMap<String, u64>,
    /// Pages not faulted in (on no node) after.
    pub not_present_after: u64,
    /// Where the longest pause went (copy modes).
    pub longest_pause: PauseBreakdown,
    /// Each moved vCPU's allowed CPUs after.
    pub vcpu_cpus: BTreeMap<String, String>,
}

/// One guest node in `numa-stat`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuestNodeStat {
    /// Guest node id.
    pub guest_node: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// The kernel's memory policy of its memory, e.g. "bind:1".
    pub policy: String,
    /// Present pages per host node.
    pub host_nodes: BTreeMap<String, u64>,
    /// Pages not faulted in yet.
    pub not_present: u64,
    /// Whether counts were scaled up from a sample.
    pub sampled: bool,
}

/// One vCPU in `numa-stat`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VcpuStat {
    /// vCPU id.
    pub id: u32,
    /// Guest node.
    pub guest_node: u32,
    /// Host CPUs its thread may run on.
    pub allowed_cpus: String,
}

/// One device worker thread in `numa-stat`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceThreadStat {
    /// The thread's name (`comm`, e.g. `vio-blk disk0`).
    pub name: String,
    /// The device it serves (`virtio-blk disk0`).
    pub device: String,
    /// Its kernel thread id.
    pub tid: i32,
    /// The guest node whose vCPUs it follows.
    pub guest_node: u32,
    /// Host CPUs it may run on.
    pub allowed_cpus: String,
}

/// `GET /api/v1/vm.numa-stat`: where every guest node's pages live now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NumaStatReport {
    /// Guest nodes.
    pub guest_nodes: Vec<GuestNodeStat>,
    /// vCPUs.
    pub vcpus: Vec<VcpuStat>,
    /// Device worker threads (devices the guest has not activated have
    /// none).
    #[serde(default)]
    pub device_threads: Vec<DeviceThreadStat>,
    /// Time the kernel queries took, ms.
    pub query_ms: f64,
}

/// One host NUMA node in `vmhop topology`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostNodeReport {
    /// The kernel's node id.
    pub id: u32,
    /// Its CPUs, sorted (empty for a memory-only node).
    pub cpus: Vec<usize>,
    /// `MemTotal` of the node, bytes.
    pub total_bytes: u64,
    /// `MemFree` of the node, bytes.
    pub free_bytes: u64,
    /// Distance to node `j`, indexed by node id (10 = local, 0 = unknown).
    pub distances: Vec<u32>,
}

/// `vmhop topology`: the host's NUMA nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopologyReport {
    /// The nodes, ascending by id.
    pub nodes: Vec<HostNodeReport>,
}
