//! The VM: KVM objects, guest memory registration as memory slots, the vCPU
//! threads and their pause/resume, dirty logging, and the VM's lifecycle.
//!
//! Moving memory (checkpoints, NUMA moves, migration) is the transfer
//! engine's job (`crate::transfer`); this module offers it the primitives:
//! pause, dirty logs, vCPU state, re-homing a chunk's memory.

pub mod bus;
pub mod config;
pub mod probe;
pub mod state;
pub mod store;
pub mod vcpu;
pub mod vm;

pub use config::ConfigError;
pub use config::{GuestSpec, NodeConfig, VmConfig};
pub use state::VmState;
pub use vm::{Pause, RunState, Setup, Start, StepError, Vm, VmError};
