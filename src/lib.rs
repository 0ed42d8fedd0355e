//! vmhop: a KVM virtual machine monitor that moves a running VM's memory
//! across NUMA nodes, through time (checkpoints) and across hosts.
//!
//! The dependency direction runs one way:
//! `cli → api → vmm / transfer / checkpoint → memory / numa → kvm crates`.

pub mod api;
pub mod arch;
pub mod checkpoint;
pub mod cli;
pub mod devices;
pub mod guest;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod numa;
pub mod transfer;
pub mod util;
pub mod vmm;
