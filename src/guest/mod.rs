//! The builtin guests: small x86-64 programs shipped inside vmhop that run
//! their work loop at CPL3 (long mode, paging on), with an IDT whose CPL0
//! handlers report any exception or interrupt to the test device, and the
//! host-side `verify` of their memory invariant.
//!
//! This module writes the guest's tables and code into guest memory and
//! describes the vCPUs' boot state; it does not run vCPUs (see `vmm`).
//!
//! Guest-physical map of the reserved first 2 MiB (see docs/test-device.md):
//!
//! | address    | what                                                  |
//! |------------|-------------------------------------------------------|
//! | 0x1000     | GDT (fixed entries, then one TSS descriptor per vCPU) |
//! | 0x2000     | IDT: 256 gates                                        |
//! | 0x3000     | control page: magic, kind, vCPU count                 |
//! | 0x4000     | per-vCPU blocks, 64 bytes each                        |
//! | 0x5000     | per-vCPU TSSes, 128 bytes apart                       |
//! | 0x7000     | the I/O permission bitmap they share (to 0x9001)      |
//! | 0x10000    | code                                                  |
//! | 0x11000    | test-fault routine (test hook only)                   |
//! | 0x12000    | IDT handlers (CPL0)                                   |
//! | 0x20000    | per-vCPU range tables, one page each                  |
//! | 0x60000    | per-vCPU exception stacks, one page each              |
//! | 0x100000   | page tables (PML4, PDPT, one PD per GiB)              |
//! | 0x140000   | `builtin:net`: state, queues, buffers, to 0x1f0000    |
//! | 0x140000   | or `builtin:vsock`'s (`vsock`), to 0x1a0000           |
//! | 0x200000 … | the working set                                       |

pub mod abi;
pub mod net;
pub mod program;
pub mod setup;
pub mod verify;
pub mod vsock;

/// Pages the builtin guest has written so far: the sum of its vCPUs'
/// progress counters in guest memory (0 for a guest that is not builtin,
/// whose memory vmhop does not interpret).
pub fn progress(vm: &crate::vmm::Vm) -> u64 {
    let c = vm.config();
    if !c.guest.is_builtin() {
        return 0;
    }
    let m = vm.memory();
    (0..c.vcpus as u64)
        .filter_map(|v| {
            m.read_u64(setup::BLOCKS_ADDR + v * program::block::SIZE + program::block::PROGRESS)
        })
        .sum()
}

/// Whether the guest keeps the longest gap in its vCPU blocks: the dirty
/// guest between two pages, the network guest's `tx` and `rx` modes
/// between two batches of frames.
fn keeps_stall(guest: &GuestSpec) -> bool {
    use crate::vmm::config::NetMode;
    match guest {
        GuestSpec::Dirty { .. } => true,
        GuestSpec::Net { mode, .. } => matches!(mode, NetMode::Tx | NetMode::Rx),
        _ => false,
    }
}

/// The longest stall any vCPU of the builtin dirty guest (or the network
/// guest sending or receiving at full speed) felt since the window began
/// (the start, or [`reset_longest_stall`]): the longest gap between two
/// pages it wrote (batches of frames), in µs, not counting what pacing
/// held it back. None for other guests, or when KVM did not give the TSC
/// rate.
pub fn longest_stall_us(vm: &crate::vmm::Vm) -> Option<u64> {
    let c = vm.config();
    if !keeps_stall(&c.guest) {
        return None;
    }
    let khz = u64::from(vm.tsc_khz()?);
    let m = vm.memory();
    (0..c.vcpus as u64)
        .filter_map(|v| {
            m.read_u64(setup::BLOCKS_ADDR + v * program::block::SIZE + program::block::MAX_GAP)
        })
        .max()
        .map(|cycles| cycles.saturating_mul(1000) / khz)
}

/// Starts a new stall window: zeroes every vCPU's longest gap (marked
/// dirty, as a device write is). A vCPU in the middle of its compare may
/// write back the gap it just measured, which belongs to the new window
/// anyway.
pub fn reset_longest_stall(vm: &crate::vmm::Vm) {
    let c = vm.config();
    if !keeps_stall(&c.guest) {
        return;
    }
    for v in 0..c.vcpus as u64 {
        vm.write_u64_marked(
            setup::BLOCKS_ADDR + v * program::block::SIZE + program::block::MAX_GAP,
            0,
        );
    }
}

/// Guest memory the builtin guests keep for their code and tables.
pub const RESERVED_BYTES: u64 = 2 << 20;
/// Smallest VM a builtin guest runs in: the reserved area plus 2 MiB of work.
pub const MIN_MEMORY: u64 = crate::vmm::config::MIN_BUILTIN_MEMORY;

/// Which guest runs: part of the VM's configuration.
pub use crate::vmm::config::GuestSpec;
/// Most vCPUs the builtin guests have tables (blocks, TSSs, stacks) for:
/// the VMM's own limit.
pub use crate::vmm::config::MAX_VCPUS;
