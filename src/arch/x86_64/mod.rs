//! x86-64: CPUID per vCPU, the registers and MSRs a 64-bit Linux boot
//! starts with, the Linux loader (boot_params, e820, command line, initrd)
//! and the ACPI tables that describe the machine and its NUMA nodes.
//!
//! This module writes guest memory and sets up vCPU registers before the
//! first run; it does not create the VM, run vCPUs or own devices.

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod linux;
pub mod regs;
