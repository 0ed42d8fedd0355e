//! The service: the VMM process between the API and the operations.
//!
//! It owns building a VM ([`build`]: boot, restore and incoming over one
//! assembly and one check of saved state), the process's life
//! ([`process`]: the API socket, signals, the serve loop, the switch from
//! waiting for a migration to running the VM that arrived), the VM's API
//! ([`vmm`]: each endpoint mapped to its operation, one operation at a
//! time, errors answered by kind), the test hooks ([`hooks`]) and the
//! in-process calls of the CLI ([`local`]).
//!
//! It does not move memory (the operations do, through the transfer
//! engine), know a device (`devices` builds them) or parse a command line
//! (`cli`): it speaks the API's types on both sides.

pub mod build;
pub mod hooks;
pub mod local;
pub mod process;
pub mod vmm;

pub use local::Service;
