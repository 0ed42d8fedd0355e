//! The VM: KVM objects, guest memory registration as memory slots, the vCPU
//! threads and their pause/resume, dirty logging, and the VM's lifecycle.
//!
//! Moving memory (checkpoints, NUMA moves, migration) is the transfer
//! engine's job (`crate::transfer`); this module offers it the primitives:
//! pause, dirty logs, vCPU state, re-homing a chunk's memory.

pub mod bus;
pub mod config;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use config::{NodeConfig, VmConfig};
pub use state::VmState;
pub use vm::{CheckpointRef, Pause, RunState, Setup, Start, Vm, VmError};

/// Whether this host's KVM is the paravirtualised PVM (`kvm_pvm`), which
/// emulates guest CPL0 code (about a million instructions per second): far
/// too slow to boot a Linux kernel, fine for the CPL3 builtin guests.
pub fn kvm_is_paravirtualised() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}
