//! vmhop: a KVM virtual machine monitor that moves a running VM's memory
//! across NUMA nodes, through time (checkpoints) and across hosts.
//!
//! The dependency direction runs one way:
//! `cli → api → operations (checkpoint, numa, migration) → transfer → vmm →
//! memory / host → kvm crates`. The transfer engine knows the VM only
//! through its `Source` trait and sinks only through `Sink`.

pub mod api;
pub mod arch;
pub mod balance;
pub mod checkpoint;
pub mod cli;
pub mod devices;
pub mod guest;
pub mod host;
pub mod memory;
pub mod migration;
pub mod numa;
pub mod service;
pub mod transfer;
pub mod util;
pub mod vmm;
