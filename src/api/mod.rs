//! The API: HTTP/1.1 + JSON on a Unix socket (see docs/api.md).
//!
//! `server` and `client` are the transport; `routes` maps requests to VM
//! operations; the request and report types here are the only thing the
//! CLI (client) and the VMM (server) share.

pub mod client;
pub mod routes;
pub mod server;

use serde::{Deserialize, Serialize};

pub use crate::guest::verify::VerifyReport;
use crate::vmm::RunState;

/// Path prefix of every endpoint.
pub const PREFIX: &str = "/api/v1";

/// `GET /api/v1/vm.status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// VM name.
    pub name: String,
    /// running, paused or stopped.
    pub state: RunState,
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
}

/// The guest part of a status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuestStatus {
    /// e.g. "builtin:dirty".
    pub kind: String,
    /// Pages written so far (builtin:dirty); 0 for idle.
    pub progress: u64,
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

/// Reply of pause / resume / stop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateReply {
    /// The state after the call.
    pub state: RunState,
    /// For pause: microseconds it took to stop every vCPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
}

/// One chunk of guest memory (debug endpoint): where its host memory is.
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
