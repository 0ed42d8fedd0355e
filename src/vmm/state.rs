//! What a checkpoint or a migration stream carries besides memory: the
//! configuration, every vCPU's state, the VM-wide KVM state (interrupt
//! controllers, timer, clock) and every device's state, captured in one
//! pause.

use std::collections::BTreeMap;

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use super::config::VmConfig;
use super::vcpu::VcpuState;

/// Version of the state section this vmhop writes. 1: configuration and
/// vCPU registers (builtin guests); 2: adds the local APICs, debug
/// registers, irqchip, PIT, kvmclock and device states of Linux guests.
pub const STATE_VERSION: u32 = 2;

fn version_1() -> u32 {
    1
}

/// The VM's non-memory state at one instant.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Format version of this state (see [`STATE_VERSION`]).
    #[serde(default = "version_1")]
    pub version: u32,
    /// The configuration it runs with.
    pub config: VmConfig,
    /// Host node of each guest node at that instant.
    pub host_nodes: Vec<u32>,
    /// Every vCPU, by id.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip, PIT and clock (guests that have them).
    #[serde(default)]
    pub machine: Option<MachineState>,
    /// Each device's saved state, by device name.
    #[serde(default)]
    pub devices: BTreeMap<String, serde_json::Value>,
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
