//! What a checkpoint or a migration stream carries besides memory: the
//! configuration and every vCPU's state, captured in one pause.

use serde::{Deserialize, Serialize};

use super::config::VmConfig;
use super::vcpu::VcpuState;

/// The VM's non-memory state at one instant.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The configuration it runs with.
    pub config: VmConfig,
    /// Host node of each guest node at that instant.
    pub host_nodes: Vec<u32>,
    /// Every vCPU, by id.
    pub vcpus: Vec<VcpuState>,
}
