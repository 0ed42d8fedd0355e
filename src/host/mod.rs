//! What the host offers for NUMA, below any guest: the topology read from sysfs, the memory-policy and page
//! migration syscalls (mbind, move_pages), thread CPU affinity, and placement
//! queries (which host node each page of a range is on, as the kernel says).
//!
//! This module knows nothing about guests or KVM: it works on host virtual
//! address ranges and thread ids.
//!
//! - [`topology`]: the host's nodes, their CPUs, memory and distances
//!   (`/sys/devices/system/node`), and the node the caller runs on;
//! - [`policy`]: `mbind`, `get_mempolicy` and `move_pages` on ranges of this
//!   process's address space;
//! - [`placement`]: the batched, optionally sampled page-location query behind
//!   `numa-stat` and the `placement_before/after` of `numa-migrate`;
//! - [`affinity`]: thread CPU affinity and the kernel's cpu-list syntax;
//! - [`pagemap`]: which pages of a range hold memory at all.
//!
//! Deciding which range goes to which node, and when, belongs to `vmm/`
//! (where memory starts) and `numa/` (moving it).

pub mod affinity;
pub mod pagemap;
pub mod placement;
pub mod policy;
pub mod topology;
