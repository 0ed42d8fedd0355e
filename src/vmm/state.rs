//! What a checkpoint or a migration stream carries besides memory and the
//! configuration (which travels beside it): every vCPU's state, the
//! VM-wide KVM state (interrupt controllers, timer, clock) and every
//! device's state, captured in one pause.

use std::collections::BTreeMap;

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use super::config::VmConfig;
use super::vcpu::VcpuState;

/// Version of the state this vmhop writes and reads. 1: vCPU registers
/// (builtin guests); 2: adds the local APICs, debug registers, irqchip,
/// PIT, kvmclock and device states of Linux guests; 3: devices keyed by
/// type and id, and no copy of the configuration (it travels beside the
/// state). vmhop has had no release: only version 3 is read.
pub const STATE_VERSION: u32 = 3;

/// Every device's saved state: device type → device id → its state.
pub type DeviceStates = BTreeMap<String, BTreeMap<String, serde_json::Value>>;

/// Saved state that does not fit the configuration it came with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Written by another version of vmhop.
    #[error("the saved VM state has version {found}; this vmhop reads version {STATE_VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// Its vCPUs are not the configuration's.
    #[error("the saved state holds {state} vCPUs but the configuration {config}")]
    Vcpus {
        /// vCPUs in the state.
        state: usize,
        /// vCPUs in the configuration.
        config: u32,
    },
    /// Its guest nodes are not the configuration's.
    #[error("the saved state places {state} guest nodes but the configuration has {config}")]
    Nodes {
        /// Guest nodes in the state.
        state: usize,
        /// Guest nodes in the configuration.
        config: usize,
    },
}

/// The VM's non-memory state at one instant.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Format version of this state (see [`STATE_VERSION`]).
    pub version: u32,
    /// Host node of each guest node at that instant.
    pub host_nodes: Vec<u32>,
    /// Every vCPU, by id.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip, PIT and clock (guests that have them).
    #[serde(default)]
    pub machine: Option<MachineState>,
    /// Each device's saved state, by type and id.
    #[serde(default)]
    pub devices: DeviceStates,
}

impl VmState {
    /// Checks, once for every restore and arrival, that this state can be
    /// loaded into a VM of `config`.
    pub fn check(&self, config: &VmConfig) -> Result<(), StateError> {
        if self.version != STATE_VERSION {
            return Err(StateError::Version {
                found: self.version,
            });
        }
        if self.vcpus.len() != config.vcpus as usize {
            return Err(StateError::Vcpus {
                state: self.vcpus.len(),
                config: config.vcpus,
            });
        }
        if self.host_nodes.len() != config.nodes.len() {
            return Err(StateError::Nodes {
                state: self.host_nodes.len(),
                config: config.nodes.len(),
            });
        }
        Ok(())
    }
}

/// VM-wide KVM state of a guest with an in-kernel irqchip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}
