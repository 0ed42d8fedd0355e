//! The VM's own endpoints: status, pause, resume, stop, verify, and what a
//! `vmhop run` process says when its VM is up.

use serde::{Deserialize, Serialize};

/// What state a VM (or the process waiting for one) is in, as the API says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped and can resume.
    Paused,
    /// The guest stopped for good.
    Stopped,
    /// No VM yet: waiting for an incoming migration.
    Incoming,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Incoming => "incoming",
        })
    }
}

/// `GET /api/v1/vm.status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// VM name.
    pub name: String,
    /// running, paused or stopped.
    pub state: VmState,
    /// Why the guest stopped by itself, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// The guest and its progress counter.
    pub guest: GuestStatus,
    /// Guest nodes and where they are bound.
    pub numa: Vec<NodeStatus>,
    /// vmhop's process id.
    pub pid: u32,
    /// A lazy restore is still loading guest memory in the background.
    #[serde(default)]
    pub loading: bool,
    /// Devices with something to report (network cards, vsock): what they
    /// are attached to and their counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceStatus>>,
    /// The VM's disks.
    #[serde(default)]
    pub disks: Vec<DiskStatus>,
    /// Resets and the reset device's counters (absent until the VM was
    /// reset, armed, or its guest poked the reset device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<Box<ResetStatus>>,
}

/// The reset part of a status (docs/reset.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ResetStatus {
    /// The checkpoint resets go back to, `DIR@ID` (None: none armed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub armed: Option<String>,
    /// Resets done (API and guest-driven).
    pub resets: u64,
    /// Of those, resets the guest asked for through the reset device.
    pub guest_resets: u64,
    /// Resets per second over the last full second with resets (0 when
    /// there was none in the last two seconds).
    pub resets_per_s: f64,
    /// The last reset, µs: from the guest's request to its vCPUs running
    /// again for a guest-driven one, the downtime for an API one.
    pub last_reset_us: u64,
    /// The longest guest-driven reset so far, µs, measured as `last_reset_us`.
    pub max_reset_us: u64,
    /// Pokes at the reset device while no reset base was armed: ignored.
    pub ignored_pokes: u64,
    /// Checks the guest reported with its pokes (`builtin:reset` checks
    /// after every reset that the pages it dirtied before are back).
    pub guest_checks: u64,
    /// Of those, checks that found a page not back as at the checkpoint.
    pub guest_failed_checks: u64,
    /// Pages those checks found wrong.
    pub guest_wrong_pages: u64,
    /// Bytes of input the last reset wrote into the guest's input buffer.
    pub input_bytes: u64,
    /// Resets whose input could not be delivered (the file unreadable, no
    /// buffer registered while `--reset-input` is given, a buffer outside
    /// guest memory); the last reason in `input_error`.
    pub input_errors: u64,
    /// Why the last input could not be delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_error: Option<String>,
}

/// One device in a status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceStatus {
    /// Its type: `virtio-net`, `virtio-vsock`.
    pub kind: String,
    /// Its id (`net0`, `vsock`).
    pub id: String,
    /// What it is attached to: `tap`, `mac`, `offloads` (the receive
    /// offloads on at the TAP) for a card; `cid`, `socket` for vsock.
    #[serde(default)]
    pub info: std::collections::BTreeMap<String, String>,
    /// Its counters: `rx_packets`, `rx_bytes`, `rx_dropped`, `tx_packets`,
    /// `tx_bytes`, `tx_dropped` for a card (rx: to the guest); for vsock
    /// `connections` (open now), `connections_total`, `rx_bytes`,
    /// `tx_bytes`, `dropped`, `transport_resets`.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// One disk in a status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskStatus {
    /// Its id.
    pub id: String,
    /// The file its writes go to (the top layer).
    pub path: std::path::PathBuf,
    /// A restored disk still copying blocks from its checkpoint chain: a
    /// full checkpoint into a new chain waits (409) until it is done.
    pub filling: bool,
    /// How far the filling got, percent (while filling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filled_percent: Option<u64>,
    /// The read-only layer below the file, if any (a base image after a
    /// first checkpoint, or the checkpoint a restored disk fills from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
}

/// The guest part of a status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuestStatus {
    /// e.g. "builtin:dirty".
    pub kind: String,
    /// Pages written so far (builtin:dirty); 0 for idle.
    pub progress: u64,
    /// The longest stall the guest felt since it started, µs: the longest
    /// gap between two pages a builtin:dirty vCPU wrote, pacing not
    /// counted (absent for other guests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_stall_us: Option<u64>,
}

/// One guest node in a status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    /// Guest node id.
    pub guest_node: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Host node its memory is bound to.
    pub host_node: u32,
}

/// `GET /api/v1/vm.status` of a process still waiting for an incoming VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IncomingStatusReport {
    /// The VM name it will have (its configuration comes with the stream).
    pub name: String,
    /// Always `incoming`.
    pub state: VmState,
    /// Where it listens.
    pub listening: String,
    /// The source sending now, if any.
    pub source: Option<String>,
    /// Bytes received from it.
    pub bytes_received: u64,
    /// Pages received from it.
    pub pages_received: u64,
    /// Why the last source failed.
    pub last_error: Option<String>,
    /// vmhop's process id.
    pub pid: u32,
}

/// Either status a `vm.status` call may answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum AnyStatus {
    /// A process waiting for an incoming migration.
    Incoming(IncomingStatusReport),
    /// A VM.
    Vm(StatusReport),
}

/// Reply of pause / resume / stop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateReply {
    /// The state after the call.
    pub state: VmState,
    /// For pause: microseconds it took to stop every vCPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
}

/// One broken rule found by `verify`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Violation {
    /// vCPU whose slice it is in (None: the control data itself).
    pub vcpu: Option<u32>,
    /// Guest-physical address of the page, as hex.
    pub gpa: String,
    /// What is wrong.
    pub problem: String,
}

/// `PUT /api/v1/vm.verify`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    /// No violation.
    pub ok: bool,
    /// Working-set pages examined.
    pub pages_checked: u64,
    /// Total violations found.
    pub violation_count: u64,
    /// The first violations.
    pub violations: Vec<Violation>,
    /// What was checked on the disk guest's disk (`builtin:disk` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskVerifyReport>,
}

/// What `verify` checked on the disk `builtin:disk` drives, and the guest's
/// own counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskVerifyReport {
    /// Blocks (4 KiB, from block 0) the guest uses.
    pub blocks: u64,
    /// Blocks read from the disk and checked against the guest's table.
    pub blocks_checked: u64,
    /// Of those, blocks the table records a write to.
    pub blocks_written: u64,
    /// Requests the guest completed, whatever their status.
    pub requests: u64,
    /// Writes completed OK.
    pub writes: u64,
    /// Read-backs completed OK.
    pub reads: u64,
    /// FLUSH requests completed OK (`mode=seq-write`: one per pass over
    /// its blocks; the other modes negotiate no FLUSH).
    #[serde(default)]
    pub flushes: u64,
    /// Requests the device answered with an error status.
    pub io_errors: u64,
    /// Blocks the guest read back otherwise than it wrote them.
    pub guest_errors: u64,
    /// The block of the write in flight when the VM paused, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight_block: Option<u64>,
    /// Read slots (guest memory only the device writes) checked against
    /// the block read into them.
    pub slots_checked: u64,
}

/// One chunk of guest memory (`GET /api/v1/debug.memory-map`): where its
/// host memory is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemoryMapEntry {
    /// Guest node.
    pub guest_node: u32,
    /// Chunk number (the unit of NUMA moves and dirty logs).
    pub slot: u32,
    /// First guest-physical address.
    pub gpa: u64,
    /// Length.
    pub len: u64,
    /// Host virtual address in the vmhop process.
    pub host_addr: u64,
}

/// `PUT /api/v1/vm.cancel`'s answer (`migrate-cancel`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cancelled {
    /// Always true: the operation was told to stop.
    pub cancelled: bool,
}

/// `PUT vm.reset`: the running VM back to a checkpoint, in place.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// The checkpoint, `DIR@ID` (`DIR` alone: its latest).
    pub to: String,
}

/// How a reset found the pages to rewrite.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DirtySource {
    /// KVM's dirty log (and what devices wrote) since the VM last stood at
    /// the checkpoint: a restore from it, a checkpoint taken as it, or the
    /// last reset to it.
    DirtyLog,
    /// Every page of guest memory compared with the checkpoint's: the VM
    /// has not stood at the checkpoint since its dirty pages were tracked
    /// (the first reset of a booted VM, or after another checkpoint).
    Compare,
}

/// Where a reset's pause went, µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResetPauseBreakdown {
    /// Stopping every vCPU.
    pub stop_us: u64,
    /// Fetching the dirty logs (or comparing memory).
    pub fetch_us: u64,
    /// Rewriting the pages.
    pub copy_us: u64,
    /// Loading the vCPU, interrupt controller, clock and device state.
    pub state_us: u64,
    /// Restarting every vCPU.
    pub resume_us: u64,
}

/// What a reset did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResetReport {
    /// Always "reset".
    pub operation: String,
    /// The checkpoint directory (canonical).
    pub dir: std::path::PathBuf,
    /// The checkpoint id the VM is back at.
    pub id: u32,
    /// Microseconds no vCPU ran.
    pub downtime_us: u64,
    /// Whole operation, ms (arming included).
    pub total_ms: f64,
    /// Pages of guest memory.
    pub pages_total: u64,
    /// Pages rewritten from the checkpoint.
    pub pages_rewritten: u64,
    /// Disk blocks rewritten (no disk is reset yet: always 0).
    pub disk_blocks_rewritten: u64,
    /// How the pages to rewrite were found.
    pub dirty_source: DirtySource,
    /// This reset armed the VM for resets to this checkpoint: it loaded and
    /// validated the checkpoint into the VM's base image (later resets to
    /// it skip that).
    pub armed: bool,
    /// Time spent arming (0 when already armed), ms.
    pub arm_ms: f64,
    /// Where the pause went.
    pub pause_breakdown: ResetPauseBreakdown,
}
