//! Writes a builtin guest into fresh guest memory: GDT, TSS, page tables,
//! control blocks, range tables, code, and (optionally) random filler; and
//! gives each vCPU's boot registers.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::program::{self, block};
use super::MAX_VCPUS;
use super::{GuestSpec, RESERVED_BYTES};
use crate::memory::{GuestMemory, GuestRange, PAGE_SIZE};

/// GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// IDT: 256 16-byte gates.
pub const IDT_ADDR: u64 = 0x2000;
/// First vCPU's TSS; vCPU i's is `TSS_STRIDE` bytes further per i. All
/// share one I/O permission bitmap at [`IOMAP_ADDR`].
pub const TSS_ADDR: u64 = 0x5000;
/// Bytes between two vCPUs' TSSes (a TSS is 104 bytes).
const TSS_STRIDE: u64 = 0x80;
/// The I/O permission bitmap all TSSes share (8 KiB, every port allowed),
/// followed by its 0xff end byte.
pub const IOMAP_ADDR: u64 = TSS_ADDR + MAX_VCPUS as u64 * TSS_STRIDE;
/// Size of the I/O permission bitmap: one bit per port.
const IOMAP_BYTES: u64 = 0x2000;
/// Control page.
pub const CONTROL_ADDR: u64 = 0x3000;
/// First per-vCPU block.
pub const BLOCKS_ADDR: u64 = 0x4000;
/// Code.
pub const CODE_ADDR: u64 = 0x10000;
/// The test-fault routine (the `guest-fault` test hook only).
pub const TEST_FAULT_ADDR: u64 = 0x11000;
/// The IDT handlers (CPL0).
pub const HANDLERS_ADDR: u64 = 0x12000;
/// The disk guest's driver (vCPU 0 of `builtin:disk`).
pub const DISK_CODE_ADDR: u64 = 0x18000;
/// The disk guest's control data, in the control page.
pub const DISK_CONTROL_ADDR: u64 = CONTROL_ADDR + 0x100;
/// The disk guest's area (queue, buffers, then its table), at the start of
/// what is the working set for the other guests.
pub const DISK_AREA_ADDR: u64 = RESERVED_BYTES;
/// The guest kinds, as the control page records them.
pub mod kind {
    /// `builtin:idle`.
    pub const IDLE: u64 = 1;
    /// `builtin:dirty`.
    pub const DIRTY: u64 = 2;
    /// `builtin:disk`.
    pub const DISK: u64 = 3;
    /// `builtin:net`.
    pub const NET: u64 = 4;
    /// `builtin:vsock`.
    pub const VSOCK: u64 = 5;
    /// `builtin:reset`.
    pub const RESET: u64 = 6;
}
/// `builtin:reset`'s state page (`program::reset_state`).
pub const RESET_STATE_ADDR: u64 = 0xa0000;
/// `builtin:reset`'s input buffer, which it registers with the reset device.
pub const RESET_INPUT_ADDR: u64 = 0xa1000;
/// Its size.
pub const RESET_INPUT_BYTES: u64 = PAGE_SIZE;
/// GiB the page tables map at least for the disk guest: the virtio-mmio
/// windows sit in the MMIO hole below 4 GiB.
const DISK_MAPPED_GIB: u64 = 4;
/// First per-vCPU range table (one page each).
pub const RANGES_ADDR: u64 = 0x20000;
/// First per-vCPU exception stack (one page each, IST1 and RSP0 of its
/// TSS point at its top).
pub const STACKS_ADDR: u64 = RANGES_ADDR + MAX_VCPUS as u64 * PAGE_SIZE;
/// PML4; the PDPT follows, then one PD per GiB.
pub const PML4_ADDR: u64 = 0x100000;
/// Most GiB of guest-physical space the tables can map.
pub const MAX_MAPPED_GIB: u64 = 254;
/// Where the control page holds the guest's TSC rate in kHz (0: unknown),
/// for the dirty guest to turn PACE's hold into TSC cycles.
pub const CONTROL_TSC_KHZ: u64 = CONTROL_ADDR + 24;
/// Control page magic ("VMHOPGST"), its first word.
pub const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"VMHOPGST");
/// Largest number of ranges in one vCPU's table.
pub const MAX_RANGES: u64 = PAGE_SIZE / 16;
/// What the test suite asks of a builtin guest's boot (`--test-hook`,
/// see `crate::service::hooks`); the default is what users get.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestHooks {
    /// Make a dirty guest raise this exception at the start of its second
    /// sweep (see [`TestFault`]).
    pub fault: Option<TestFault>,
    /// Point vCPU 0's kvmclock (system time and wall clock, as a Linux
    /// guest sets them) into the unused top entries of the PML4 page, so
    /// that a restore whose loader misses the pages KVM writes while the
    /// vCPU state goes in loses the page tables and the guest dies.
    pub kvmclock: bool,
}

pub use super::program::TestFault;

/// Where that hook puts the wall clock (12 bytes) and the system time
/// (32 bytes): PML4 entries 504-505 and 508-511, far above the low
/// identity map the guest uses.
const TEST_WALL_CLOCK_ADDR: u64 = PML4_ADDR + 0xfc0;
const TEST_SYSTEM_TIME_ADDR: u64 = PML4_ADDR + 0xfe0;

/// Kernel code selector (GDT entry 1): the IDT handlers' CS.
const KERNEL_CS: u16 = 0x08;
/// Code selector: GDT entry 3, RPL 3.
const USER_CS: u16 = 0x1b;
/// Data selector: GDT entry 4, RPL 3.
const USER_DS: u16 = 0x23;
/// vCPU 0's TSS selector (GDT entries 5–6); vCPU i's is 16 bytes further.
const TSS_SEL: u16 = 0x28;
/// GDT entries before the TSS descriptors.
const GDT_FIXED_ENTRIES: u64 = 5;
/// IDT gate attributes: present, DPL3 (so that `int n` from CPL3 lands
/// too), 64-bit interrupt gate (IF cleared on entry).
const GATE_ATTR: u64 = 0xee;
/// The IST slot every gate uses.
const GATE_IST: u64 = 1;

const _: () = assert!(IOMAP_ADDR + IOMAP_BYTES < CODE_ADDR);
const _: () = assert!(GDT_ADDR + (GDT_FIXED_ENTRIES + 2 * MAX_VCPUS as u64) * 8 <= IDT_ADDR);
const _: () = assert!(STACKS_ADDR + MAX_VCPUS as u64 * PAGE_SIZE <= RESET_STATE_ADDR);
const _: () = assert!(RESET_INPUT_ADDR + RESET_INPUT_BYTES <= PML4_ADDR);
const _: () = assert!(DISK_CONTROL_ADDR + program::disk::ctl::SIZE <= CONTROL_ADDR + PAGE_SIZE);

/// Writing the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Guest memory does not hold what the guest needs.
    #[error("guest memory layout: {0}")]
    Layout(String),
    /// The assembler refused the program (a vmhop bug).
    #[error("assembling the builtin guest failed: {0}")]
    Assemble(String),
    /// Setting a vCPU's boot registers failed.
    #[error("{ioctl} (vCPU {vcpu}): {source}")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// The vCPU.
        vcpu: usize,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The identity map does not fit in guest memory.
    #[error("guest memory layout: {0}")]
    Tables(#[source] crate::arch::x86_64::regs::RegsError),
    /// The kvmclock test hook could not set its MSRs.
    #[error("the kvmclock test hook: {0}")]
    Hook(#[source] crate::arch::x86_64::regs::RegsError),
}

/// Boot state of one vCPU.
#[derive(Debug, Clone)]
pub struct BootState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
}

/// Bytes of the disk guest's table of `blocks` entries, whole pages.
fn disk_table_bytes(blocks: u64) -> u64 {
    (blocks * 8).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Bytes of the disk guest's area with a table of `blocks` entries: the
/// mixed mode's queue and buffers, the table, then the benchmark modes'
/// region (there in every mode, so that the memory the other vCPUs sweep
/// does not depend on the mode).
pub fn disk_area_bytes(blocks: u64) -> u64 {
    program::disk::area::SIZE + disk_table_bytes(blocks) + program::disk::bench::SIZE
}

/// Entries of the disk guest's table: `blocks=N`, else the most.
fn disk_table_cap(blocks: Option<u64>) -> u64 {
    blocks
        .unwrap_or(crate::vmm::config::MAX_DISK_GUEST_BLOCKS)
        .min(crate::vmm::config::MAX_DISK_GUEST_BLOCKS)
}

/// Pages of each vCPU's slice, as (gpa, pages) ranges in sweep order. The
/// disk guest's vCPU 0 has none: it drives the disk.
pub fn slices(
    memory: &GuestMemory,
    spec: &GuestSpec,
    vcpus: u32,
) -> Result<Vec<Vec<(u64, u64)>>, SetupError> {
    match spec {
        GuestSpec::Dirty { wss, .. } => sweep_slices(memory, RESERVED_BYTES, *wss, vcpus),
        GuestSpec::Disk { blocks, .. } => {
            let start = DISK_AREA_ADDR + disk_area_bytes(disk_table_cap(*blocks));
            let mut out = vec![Vec::new()];
            if vcpus > 1 {
                out.extend(sweep_slices(memory, start, None, vcpus - 1)?);
            }
            Ok(out)
        }
        GuestSpec::Idle
        | GuestSpec::Net { .. }
        | GuestSpec::Vsock { .. }
        | GuestSpec::Reset { .. } => Ok(vec![Vec::new(); vcpus as usize]),
        GuestSpec::Linux(_) => Err(not_builtin()),
    }
}

/// `vcpus` slices of the memory from `start` on (`wss` bytes of it, or all).
fn sweep_slices(
    memory: &GuestMemory,
    start: u64,
    wss: Option<u64>,
    vcpus: u32,
) -> Result<Vec<Vec<(u64, u64)>>, SetupError> {
    // Usable ranges per node: chunks merged, minus what lies before start.
    let mut nodes: Vec<Vec<GuestRange>> = Vec::new();
    for n in &memory.nodes {
        let mut rs: Vec<GuestRange> = Vec::new();
        for c in &n.chunks {
            let mut r = c.range;
            if r.end() <= start {
                continue;
            }
            if r.start < start {
                r = GuestRange {
                    start,
                    len: r.end() - start,
                };
            }
            match rs.last_mut() {
                Some(last) if last.end() == r.start => last.len += r.len,
                _ => rs.push(r),
            }
        }
        nodes.push(rs);
    }
    let usable: Vec<u64> = nodes
        .iter()
        .map(|rs| rs.iter().map(|r| r.len / PAGE_SIZE).sum())
        .collect();
    let total: u64 = usable.iter().sum();
    let want = match wss {
        Some(w) => (w / PAGE_SIZE).min(total),
        None => total,
    };
    if want < vcpus as u64 {
        return Err(SetupError::Layout(format!(
            "the working set ({want} pages) is smaller than one page per vCPU ({vcpus})"
        )));
    }
    let mut out = vec![Vec::new(); vcpus as usize];
    let mut taken = 0;
    for (ni, rs) in nodes.iter().enumerate() {
        let node_pages = if ni + 1 == nodes.len() {
            want - taken
        } else {
            (want * usable[ni]).checked_div(total).unwrap_or(0)
        };
        taken += node_pages;
        // Flatten the node's first node_pages pages and cut them in vcpus parts.
        for (v, slice) in out.iter_mut().enumerate() {
            let from = node_pages * v as u64 / vcpus as u64;
            let to = node_pages * (v as u64 + 1) / vcpus as u64;
            push_pages(slice, rs, from, to);
        }
    }
    for (v, s) in out.iter().enumerate() {
        if s.len() as u64 > MAX_RANGES {
            return Err(SetupError::Layout(format!(
                "vCPU {v}'s slice has too many ranges"
            )));
        }
    }
    Ok(out)
}

/// Appends pages [from, to) of the concatenated ranges `rs` to `slice`.
fn push_pages(slice: &mut Vec<(u64, u64)>, rs: &[GuestRange], from: u64, to: u64) {
    let mut base = 0;
    for r in rs {
        let n = r.len / PAGE_SIZE;
        let lo = from.max(base);
        let hi = to.min(base + n);
        if lo < hi {
            slice.push((r.start + (lo - base) * PAGE_SIZE, hi - lo));
        }
        base += n;
    }
}

fn not_builtin() -> SetupError {
    SetupError::Layout("a Linux guest is not a builtin guest".into())
}

/// Boots a builtin guest: writes it into memory and puts each vCPU (in id
/// order) at its entry.
pub fn boot(
    spec: &GuestSpec,
    memory: &GuestMemory,
    fds: &[kvm_ioctls::VcpuFd],
    hooks: &GuestHooks,
) -> Result<(), SetupError> {
    let vcpus = fds.len() as u32;
    let pace_batch = super::abi::pace_batch(spec.rate().map(|r| r as f64 / vcpus as f64));
    let boots = install(memory, spec, vcpus, pace_batch, hooks.fault)?;
    // Without it the guest counts its pacing as stalls, nothing worse.
    let khz = fds.first().and_then(|v| v.get_tsc_khz().ok()).unwrap_or(0);
    memory
        .write_u64(CONTROL_TSC_KHZ, u64::from(khz))
        .ok_or_else(|| SetupError::Layout("the control page is not in guest memory".into()))?;
    for (id, (v, b)) in fds.iter().zip(&boots).enumerate() {
        let kvm = |ioctl| {
            move |source| SetupError::Kvm {
                ioctl,
                vcpu: id,
                source,
            }
        };
        // Start from KVM's reset state so fields we do not set (APIC
        // base, pending interrupts) keep their defaults.
        let mut sregs = v.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        apply_sregs(&mut sregs, &b.sregs);
        v.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        v.set_regs(&b.regs).map_err(kvm("KVM_SET_REGS"))?;
    }
    if hooks.kvmclock {
        if let Some(v) = fds.first() {
            test_kvmclock(v)?;
        }
    }
    Ok(())
}

/// Enables kvmclock on `v` at the test addresses (see [`GuestHooks::kvmclock`]).
fn test_kvmclock(v: &kvm_ioctls::VcpuFd) -> Result<(), SetupError> {
    use crate::arch::x86_64::regs::{MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW};
    let list = [
        (MSR_KVM_WALL_CLOCK_NEW, TEST_WALL_CLOCK_ADDR),
        // Bit 0 enables the clock.
        (MSR_KVM_SYSTEM_TIME_NEW, TEST_SYSTEM_TIME_ADDR | 1),
    ];
    crate::arch::x86_64::regs::set_msr_list(v, 0, &list).map_err(SetupError::Hook)
}

/// Writes the whole guest into `memory` and returns each vCPU's boot state.
pub fn install(
    memory: &GuestMemory,
    spec: &GuestSpec,
    vcpus: u32,
    pace_batch: u64,
    test_fault: Option<TestFault>,
) -> Result<Vec<BootState>, SetupError> {
    let w = |gpa: u64, v: u64| {
        memory.write_u64(gpa, v).ok_or_else(|| {
            SetupError::Layout(format!("guest address {gpa:#x} is not backed by memory"))
        })
    };
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(SetupError::Layout(format!(
            "{vcpus} vCPUs: the builtin guests have tables for 1..={MAX_VCPUS}"
        )));
    }
    // GDT: null, kernel code/data (the IDT handlers' CS), user code/data,
    // then one 16-byte TSS descriptor per vCPU.
    let gdt: [u64; GDT_FIXED_ENTRIES as usize] = [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_fa00_0000_ffff,
        0x00cf_f200_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        w(GDT_ADDR + i as u64 * 8, *e)?;
    }
    // The I/O bitmap: zero bits allow every port. IOPL=3 alone would do on
    // bare metal, but the paravirtualised KVM of our CI hosts checks the
    // bitmap even then, and a TSS without one makes every `out` a #GP.
    // One bitmap serves every vCPU's TSS: each points at it by offset.
    memory
        .write_bytes(IOMAP_ADDR, &vec![0u8; IOMAP_BYTES as usize])
        .and_then(|()| memory.write_bytes(IOMAP_ADDR + IOMAP_BYTES, &[0xff]))
        .ok_or_else(|| SetupError::Layout("TSS does not fit".into()))?;
    for v in 0..vcpus as u64 {
        let tss = tss_addr(v);
        let stack_top = STACKS_ADDR + (v + 1) * PAGE_SIZE;
        memory
            .write_bytes(tss, &[0u8; TSS_STRIDE as usize])
            .ok_or_else(|| SetupError::Layout("TSS does not fit".into()))?;
        // RSP0 (+0x04) and IST1 (+0x24): this vCPU's exception stack.
        w(tss + 0x04, stack_top)?;
        w(tss + 0x1c + 8 * GATE_IST, stack_top)?;
        // The I/O map base (+0x66, a 16-bit offset from the TSS).
        w(tss + 0x64, (IOMAP_ADDR - tss) << 16)?;
        let limit = tss_limit(v);
        let lo = (limit & 0xffff)
            | (((limit >> 16) & 0xf) << 48)
            | ((tss & 0xff_ffff) << 16)
            | (0x89u64 << 40)
            | (((tss >> 24) & 0xff) << 56);
        let desc = GDT_ADDR + (GDT_FIXED_ENTRIES + 2 * v) * 8;
        w(desc, lo)?;
        w(desc + 8, tss >> 32)?;
    }

    // IDT: every vector to its handler stub, at CPL0 on IST1.
    let (handlers, entries) =
        program::handlers(HANDLERS_ADDR).map_err(|e| SetupError::Assemble(e.to_string()))?;
    if HANDLERS_ADDR + handlers.len() as u64 > DISK_CODE_ADDR {
        return Err(SetupError::Assemble("the IDT handlers do not fit".into()));
    }
    memory
        .write_bytes(HANDLERS_ADDR, &handlers)
        .ok_or_else(|| SetupError::Layout("the IDT handlers do not fit".into()))?;
    for (vector, &entry) in entries.iter().enumerate() {
        let (lo, hi) = idt_gate(entry);
        w(IDT_ADDR + vector as u64 * 16, lo)?;
        w(IDT_ADDR + vector as u64 * 16 + 8, hi)?;
    }

    // Identity page tables with 2 MiB pages, user-accessible at every level.
    let top = memory.chunks().map(|c| c.range.end()).max().unwrap_or(0);
    let mut gib = top.div_ceil(1 << 30);
    if let GuestSpec::Disk { .. } = spec {
        // The disk's register window, in the MMIO hole, user-accessible too.
        gib = gib.max(DISK_MAPPED_GIB);
    }
    if let GuestSpec::Net { mmio, .. } = spec {
        // The card's window, in the MMIO hole below 4 GiB, is reached
        // through the identity map like memory.
        gib = gib.max((mmio >> 30) + 1);
    }
    if let GuestSpec::Vsock { mmio } = spec {
        gib = gib.max((mmio >> 30) + 1);
    }
    if gib > MAX_MAPPED_GIB {
        return Err(SetupError::Layout(format!(
            "guest memory ends at {top:#x}, above what the builtin guests map"
        )));
    }
    crate::arch::x86_64::regs::write_identity_map(memory, PML4_ADDR, gib, true)
        .map_err(SetupError::Tables)?;

    // Code.
    let code = match spec {
        GuestSpec::Idle => program::idle(CODE_ADDR),
        GuestSpec::Dirty { .. } | GuestSpec::Disk { .. } => {
            program::dirty(CODE_ADDR, TEST_FAULT_ADDR)
        }
        GuestSpec::Net { mode, .. } => program::net(CODE_ADDR, *mode),
        GuestSpec::Vsock { .. } => program::vsock(CODE_ADDR),
        GuestSpec::Reset { .. } => program::reset_loop(
            CODE_ADDR,
            RESET_STATE_ADDR,
            RESET_INPUT_ADDR,
            RESET_INPUT_BYTES as u32,
            BLOCKS_ADDR,
        ),
        GuestSpec::Linux(_) => return Err(not_builtin()),
    }
    .map_err(|e| SetupError::Assemble(e.to_string()))?;
    if CODE_ADDR + code.len() as u64 > TEST_FAULT_ADDR {
        return Err(SetupError::Assemble("the guest's code does not fit".into()));
    }
    memory
        .write_bytes(CODE_ADDR, &code)
        .ok_or_else(|| SetupError::Layout("code does not fit".into()))?;
    if let Some(f) = test_fault {
        let code = program::test_fault(TEST_FAULT_ADDR, f)
            .map_err(|e| SetupError::Assemble(e.to_string()))?;
        memory
            .write_bytes(TEST_FAULT_ADDR, &code)
            .ok_or_else(|| SetupError::Layout("code does not fit".into()))?;
    }

    // Control page and per-vCPU blocks and range tables.
    let kind = match spec {
        GuestSpec::Idle => kind::IDLE,
        GuestSpec::Dirty { .. } => kind::DIRTY,
        GuestSpec::Disk { .. } => kind::DISK,
        GuestSpec::Net { .. } => kind::NET,
        GuestSpec::Vsock { .. } => kind::VSOCK,
        GuestSpec::Reset { .. } => kind::RESET,
        GuestSpec::Linux(_) => return Err(not_builtin()),
    };
    w(CONTROL_ADDR, CONTROL_MAGIC)?;
    w(CONTROL_ADDR + 8, kind)?;
    w(CONTROL_ADDR + 16, vcpus as u64)?;
    if let GuestSpec::Disk { blocks, mode, .. } = spec {
        install_disk(memory, disk_table_cap(*blocks), *mode)?;
    }
    let slices = slices(memory, spec, vcpus)?;
    let mut boots = Vec::new();
    for (v, slice) in slices.iter().enumerate() {
        let blk = BLOCKS_ADDR + v as u64 * block::SIZE;
        let table = RANGES_ADDR + v as u64 * PAGE_SIZE;
        w(blk + block::NRANGES, slice.len() as u64)?;
        w(blk + block::RANGES, table)?;
        w(blk + block::PROGRESS, 0)?;
        w(blk + block::SWEEP, 0)?;
        w(blk + block::PACE_BATCH, pace_batch)?;
        w(blk + block::LAST_TSC, 0)?;
        w(blk + block::MAX_GAP, 0)?;
        w(
            blk + block::FAULT_SWEEP,
            if test_fault.is_some() { 2 } else { 0 },
        )?;
        for (i, &(gpa, pages)) in slice.iter().enumerate() {
            w(table + i as u64 * 16, gpa)?;
            w(table + i as u64 * 16 + 8, pages)?;
        }
        let entry = match (spec, v) {
            (GuestSpec::Disk { .. }, 0) => DISK_CODE_ADDR,
            _ => CODE_ADDR,
        };
        boots.push(boot_state(v as u64, blk, entry));
    }
    if let GuestSpec::Net { mmio, mac, .. } = spec {
        super::net::install(memory, *mmio, *mac)
            .ok_or_else(|| SetupError::Layout("the network guest's queues do not fit".into()))?;
    }
    if let GuestSpec::Vsock { mmio } = spec {
        super::vsock::install(memory, *mmio)
            .ok_or_else(|| SetupError::Layout("the vsock guest's queues do not fit".into()))?;
    }
    if let GuestSpec::Dirty {
        fill_random: true, ..
    } = spec
    {
        fill_random(memory, &slices);
    }
    if let GuestSpec::Reset { pages, poke_always } = spec {
        install_reset(memory, *pages, *poke_always)?;
    }
    Ok(boots)
}

/// `builtin:reset`'s working set: guest memory from the end of the
/// reserved area to the first gap (the MMIO hole, or the end).
pub fn reset_working_set(memory: &GuestMemory) -> Option<(u64, u64)> {
    let mut end = RESERVED_BYTES;
    let mut runs: Vec<_> = memory.chunks().map(|c| c.range).collect();
    runs.sort_by_key(|r| r.start);
    for r in runs {
        if r.start <= end && r.end() > end {
            end = r.end();
        }
    }
    let pages = (end - RESERVED_BYTES) / PAGE_SIZE;
    (pages > 0).then_some((RESERVED_BYTES, pages))
}

/// Writes `builtin:reset`'s state page and tags every working-set page with
/// its own address (the pristine content its check and `verify` expect).
fn install_reset(memory: &GuestMemory, pages: u64, poke_always: bool) -> Result<(), SetupError> {
    use program::reset_state as st;
    let (base, n) = reset_working_set(memory)
        .ok_or_else(|| SetupError::Layout("builtin:reset has no working set".into()))?;
    let w = |gpa: u64, v: u64| {
        memory.write_u64(gpa, v).ok_or_else(|| {
            SetupError::Layout(format!("guest address {gpa:#x} is not backed by memory"))
        })
    };
    w(RESET_STATE_ADDR + st::WS_BASE, base)?;
    w(RESET_STATE_ADDR + st::WS_PAGES, n)?;
    w(RESET_STATE_ADDR + st::PAGES, pages)?;
    w(RESET_STATE_ADDR + st::POKE_ALWAYS, u64::from(poke_always))?;
    let end = base + n * PAGE_SIZE;
    for c in memory.chunks() {
        let (from, to) = (c.range.start.max(base), c.range.end().min(end));
        for gpa in (from..to).step_by(PAGE_SIZE as usize) {
            let at = (gpa - c.range.start + program::TAG_OFFSET) as usize;
            // SAFETY: gpa lies inside this chunk's range, so `at` + 8 is
            // inside its live mapping; no vCPU runs yet.
            unsafe {
                std::ptr::write_volatile(
                    c.mapping.as_ptr().add(at) as *mut [u8; 8],
                    gpa.to_le_bytes(),
                )
            };
        }
    }
    Ok(())
}

/// Writes the disk guest's driver for `mode`, its control data and its
/// zeroed area with a table of `table_cap` entries.
fn install_disk(
    memory: &GuestMemory,
    table_cap: u64,
    mode: crate::vmm::config::DiskMode,
) -> Result<(), SetupError> {
    use program::disk::{self, area, ctl};
    let code = disk::program_for(DISK_CODE_ADDR, DISK_CONTROL_ADDR, mode)
        .map_err(|e| SetupError::Assemble(e.to_string()))?;
    if DISK_CODE_ADDR + code.len() as u64 > RANGES_ADDR {
        return Err(SetupError::Assemble(
            "the disk guest's code does not fit".into(),
        ));
    }
    memory
        .write_bytes(DISK_CODE_ADDR, &code)
        .ok_or_else(|| SetupError::Layout("code does not fit".into()))?;
    let bytes = disk_area_bytes(table_cap);
    memory
        .write_bytes(DISK_AREA_ADDR, &vec![0u8; bytes as usize])
        .ok_or_else(|| {
            SetupError::Layout(format!(
                "builtin:disk needs {bytes} bytes of guest memory from {DISK_AREA_ADDR:#x} for its queue, buffers and table of {table_cap} blocks: give it more memory, or fewer blocks=N"
            ))
        })?;
    let mmio = crate::arch::x86_64::layout::virtio_slots(1)
        .and_then(|s| s.first().map(|s| s.base))
        .ok_or_else(|| SetupError::Layout("the machine has no virtio window".into()))?;
    // Fresh for each boot: a block an earlier run left on the disk is not
    // one of this run's.
    let nonce = crate::util::unix_ms() ^ u64::from(std::process::id()) << 40 | 1;
    let fields = [
        (ctl::MMIO, mmio),
        (ctl::AREA, DISK_AREA_ADDR),
        (ctl::TABLE, DISK_AREA_ADDR + area::SIZE),
        (ctl::TABLE_CAP, table_cap),
        (
            ctl::BUF,
            DISK_AREA_ADDR + area::SIZE + disk_table_bytes(table_cap),
        ),
        (ctl::RUN, nonce),
        (ctl::READ_EVERY, disk::READ_EVERY),
        (ctl::RNG, nonce.rotate_left(17)),
    ];
    memory
        .write_bytes(DISK_CONTROL_ADDR, &[0u8; ctl::SIZE as usize])
        .ok_or_else(|| SetupError::Layout("the control page does not fit".into()))?;
    for (at, v) in fields {
        memory
            .write_u64(DISK_CONTROL_ADDR + at, v)
            .ok_or_else(|| SetupError::Layout("the control page does not fit".into()))?;
    }
    Ok(())
}

/// vCPU `v`'s TSS.
fn tss_addr(v: u64) -> u64 {
    TSS_ADDR + v * TSS_STRIDE
}

/// vCPU `v`'s TSS limit: up to and including the shared bitmap's end byte.
fn tss_limit(v: u64) -> u64 {
    IOMAP_ADDR + IOMAP_BYTES - tss_addr(v)
}

/// A 64-bit interrupt gate to `entry` in the kernel code segment, on IST1.
fn idt_gate(entry: u64) -> (u64, u64) {
    let lo = (entry & 0xffff)
        | (KERNEL_CS as u64) << 16
        | GATE_IST << 32
        | GATE_ATTR << 40
        | ((entry >> 16) & 0xffff) << 48;
    (lo, entry >> 32)
}

/// Fills every working-set page with pseudo-random bytes, except the
/// counter and tag words, which start at zero as the invariant requires.
fn fill_random(memory: &GuestMemory, slices: &[Vec<(u64, u64)>]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ crate::util::unix_ms();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for &(gpa, pages) in slices.iter().flatten() {
        for p in 0..pages {
            for word in page.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            page[..16].fill(0);
            memory.write_bytes(gpa + p * PAGE_SIZE, &page);
        }
    }
}

/// Copies the registers a builtin guest sets from `ours` into `base` (the
/// vCPU's reset state), leaving the rest as KVM made it.
pub fn apply_sregs(base: &mut kvm_sregs, ours: &kvm_sregs) {
    *base = kvm_sregs {
        apic_base: base.apic_base,
        interrupt_bitmap: base.interrupt_bitmap,
        ..*ours
    };
}

fn seg(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn boot_state(vcpu: u64, block_addr: u64, entry: u64) -> BootState {
    let regs = kvm_regs {
        rip: entry,
        rdi: block_addr,
        // IOPL=3 so that `out`/`in` at CPL3 exit to the VMM; bit 1 is reserved-1.
        rflags: 0x3002,
        ..Default::default()
    };
    let mut sregs = kvm_sregs {
        cs: seg(USER_CS, 0xb, true),
        ds: seg(USER_DS, 0x3, false),
        es: seg(USER_DS, 0x3, false),
        fs: seg(USER_DS, 0x3, false),
        gs: seg(USER_DS, 0x3, false),
        ss: seg(USER_DS, 0x3, false),
        ..Default::default()
    };
    sregs.tr = kvm_segment {
        base: tss_addr(vcpu),
        limit: tss_limit(vcpu) as u32,
        selector: TSS_SEL + 16 * vcpu as u16,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = ((GDT_FIXED_ENTRIES + 2 * MAX_VCPUS as u64) * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 256 * 16 - 1;
    // CR0: PE | MP | ET | NE | WP | PG.
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = PML4_ADDR;
    // CR4: PAE | OSFXSR | OSXMMEXCPT.
    sregs.cr4 = 0x620;
    // EFER: LME | LMA.
    sregs.efer = 0x500;
    BootState { regs, sregs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{layout, Backing, Chunk, Mapping, NodeMemory};

    pub(crate) fn memory(nodes: &[u64]) -> GuestMemory {
        let l = layout::layout(nodes, 32 << 20);
        let mut slot = 0;
        GuestMemory {
            nodes: l
                .into_iter()
                .enumerate()
                .map(|(i, rs)| NodeMemory {
                    guest_node: i as u32,
                    host_node: None,
                    size: nodes[i],
                    backing: Backing::Anonymous,
                    chunks: rs
                        .into_iter()
                        .map(|r| {
                            slot += 1;
                            Chunk {
                                range: r,
                                slot,
                                mapping: Mapping::new(r.len as usize, Backing::Anonymous).unwrap(),
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn each_vcpu_slice_spans_every_node() {
        let m = memory(&[64 << 20, 64 << 20]);
        let s = slices(
            &m,
            &GuestSpec::Dirty {
                wss: None,
                rate: None,
                fill_random: false,
            },
            2,
        )
        .unwrap();
        for slice in &s {
            assert!(slice.iter().any(|&(g, _)| g < 64 << 20));
            assert!(slice.iter().any(|&(g, _)| g >= 64 << 20));
        }
        let pages: u64 = s.iter().flatten().map(|r| r.1).sum();
        assert_eq!(pages, (128 << 20) / PAGE_SIZE - RESERVED_BYTES / PAGE_SIZE);
    }

    #[test]
    fn wss_limits_the_working_set() {
        let m = memory(&[64 << 20]);
        let s = slices(
            &m,
            &GuestSpec::Dirty {
                wss: Some(1 << 20),
                rate: None,
                fill_random: false,
            },
            3,
        )
        .unwrap();
        let pages: u64 = s.iter().flatten().map(|r| r.1).sum();
        assert_eq!(pages, 256);
    }

    #[test]
    fn the_disk_guest_s_vcpu_0_drives_the_disk_and_the_others_sweep_after_its_area() {
        let m = memory(&[64 << 20]);
        let spec = GuestSpec::Disk {
            blocks: Some(1000),
            rate: None,
            mode: Default::default(),
        };
        let boots = install(&m, &spec, 3, 0, None).unwrap();
        assert_eq!(boots[0].regs.rip, DISK_CODE_ADDR);
        assert!(boots[1..].iter().all(|b| b.regs.rip == CODE_ADDR));
        let s = slices(&m, &spec, 3).unwrap();
        assert!(s[0].is_empty(), "vCPU 0 sweeps nothing: {s:?}");
        let area_end = DISK_AREA_ADDR + disk_area_bytes(1000);
        assert_eq!(s[1][0].0, area_end);
        let pages: u64 = s.iter().flatten().map(|r| r.1).sum();
        assert_eq!(pages, ((64 << 20) - area_end) / PAGE_SIZE);
        use program::disk::ctl;
        let c = |at| m.read_u64(DISK_CONTROL_ADDR + at).unwrap();
        assert_eq!(c(ctl::TABLE_CAP), 1000);
        assert_eq!(c(ctl::TABLE), DISK_AREA_ADDR + program::disk::area::SIZE);
        assert_eq!(c(ctl::MMIO), 0xd000_0000);
        assert_ne!(c(ctl::RUN), 0);
        // The page tables reach the MMIO window, user-accessible.
        let pdpt = m.read_u64(PML4_ADDR).unwrap() & !0xfff;
        let pd3 = m.read_u64(pdpt + 3 * 8).unwrap();
        assert_eq!(pd3 & 0x7, 0x7, "present, writable, user: {pd3:#x}");
    }

    /// A disk guest's memory and a disk as the guest would have left them
    /// after writing blocks 0..4 with tags 1..4 (block 4 in flight with
    /// tag 5, already on the disk), for `verify` to judge.
    fn written_disk_guest() -> (GuestMemory, Vec<u8>, u64) {
        use program::disk::{block_image, ctl, BLOCK_BYTES, RUNNING};
        let m = memory(&[64 << 20]);
        let spec = GuestSpec::Disk {
            blocks: Some(16),
            rate: None,
            mode: Default::default(),
        };
        install(&m, &spec, 1, 0, None).unwrap();
        let c = |at, v| m.write_u64(DISK_CONTROL_ADDR + at, v).unwrap();
        let run = m.read_u64(DISK_CONTROL_ADDR + ctl::RUN).unwrap();
        let table = m.read_u64(DISK_CONTROL_ADDR + ctl::TABLE).unwrap();
        c(ctl::STATE, RUNNING);
        c(ctl::BLOCKS, 16);
        c(ctl::TAG, 5);
        c(ctl::INFLIGHT_BLOCK, 4);
        c(ctl::INFLIGHT_TAG, 5);
        let mut disk = vec![0u8; 16 * BLOCK_BYTES as usize];
        for b in 0..5u64 {
            if b < 4 {
                m.write_u64(table + b * 8, b + 1).unwrap();
            }
            disk[(b * BLOCK_BYTES) as usize..((b + 1) * BLOCK_BYTES) as usize]
                .copy_from_slice(&block_image(b, b + 1, run));
        }
        (m, disk, run)
    }

    fn verify_with(m: &GuestMemory, disk: &[u8]) -> crate::api::vm::VerifyReport {
        let read = |d: usize, at: u64, buf: &mut [u8]| {
            assert_eq!(d, 0);
            let at = at as usize;
            buf.copy_from_slice(&disk[at..at + buf.len()]);
            Ok(())
        };
        super::super::verify::verify(m, &read)
    }

    #[test]
    fn verify_of_the_reset_guest_accepts_its_iteration_and_names_a_page_left_dirty() {
        let m = memory(&[16 << 20]);
        let spec = GuestSpec::Reset {
            pages: 8,
            poke_always: false,
        };
        install(&m, &spec, 1, 0, None).unwrap();
        let (base, n) = reset_working_set(&m).unwrap();
        assert_eq!((base, n), (RESERVED_BYTES, (14 << 20) / PAGE_SIZE));
        let ok = verify_with(&m, &[]);
        assert!(ok.ok && ok.pages_checked == n, "{ok:?}");
        // Iteration 5 in progress: its pages carry mark 6; that is fine.
        m.write_u64(RESET_INPUT_ADDR, 5).unwrap();
        for gpa in program::reset_pages(5, 8, base, n) {
            m.write_u64(gpa, 6).unwrap();
        }
        let v = verify_with(&m, &[]);
        assert!(v.ok, "{v:?}");
        // A page of iteration 4 still dirty: a reset that missed it.
        let stale = program::reset_pages(4, 8, base, n)
            .into_iter()
            .find(|g| !program::reset_pages(5, 8, base, n).contains(g))
            .unwrap();
        m.write_u64(stale, 5).unwrap();
        let v = verify_with(&m, &[]);
        assert_eq!(v.violation_count, 1, "{v:?}");
        assert_eq!(v.violations[0].gpa, format!("{stale:#x}"));
        assert!(v.violations[0].problem.contains("mark 0x5"), "{v:?}");
        m.write_u64(stale, 0).unwrap();
        // A byte past the tag, or a wrong tag: not as at the checkpoint.
        m.write_bytes(base + 100, &[1]).unwrap();
        m.write_u64(base + PAGE_SIZE + program::TAG_OFFSET, 7)
            .unwrap();
        assert_eq!(verify_with(&m, &[]).violation_count, 2);
    }

    #[test]
    fn verify_accepts_a_disk_as_the_guest_wrote_it_and_names_each_kind_of_damage() {
        use program::disk::{block_image, ctl, BLOCK_BYTES};
        let (m, disk, run) = written_disk_guest();
        let r = verify_with(&m, &disk);
        assert!(r.ok, "{r:?}");
        let d = r.disk.unwrap();
        assert_eq!((d.blocks_checked, d.blocks_written), (16, 4));
        assert_eq!(d.in_flight_block, Some(4));
        let at = |b: u64| (b * BLOCK_BYTES) as usize..((b + 1) * BLOCK_BYTES) as usize;
        let problem = |disk: &[u8]| {
            let r = verify_with(&m, disk);
            assert!(!r.ok && r.violation_count == 1, "{r:?}");
            r.violations[0].problem.clone()
        };
        // The write in flight had not reached the disk: fine too.
        let mut d2 = disk.clone();
        d2[at(4)].fill(0);
        assert!(verify_with(&m, &d2).ok);
        // A stale block (an older tag), a lost one, a torn one, one at the
        // wrong place, one of this run the table knows nothing of.
        let mut d2 = disk.clone();
        d2[at(2)].copy_from_slice(&block_image(2, 1, run));
        assert!(problem(&d2).contains("older than the tag 3"));
        let mut d2 = disk.clone();
        d2[at(1)].fill(0);
        assert!(problem(&d2).contains("lost on the disk"));
        let mut d2 = disk.clone();
        d2[at(3)][4000] ^= 1;
        assert!(problem(&d2).contains("from byte 4000"));
        let mut d2 = disk.clone();
        d2[at(0)].copy_from_slice(&block_image(1, 1, run));
        assert!(problem(&d2).contains("data of block 1"));
        let mut d2 = disk.clone();
        d2[at(9)].copy_from_slice(&block_image(9, 2, run));
        assert!(problem(&d2).contains("records no write"));
        // A block of an earlier run on a never-written block is no
        // violation: the image was used before.
        let mut d2 = disk.clone();
        d2[at(9)].copy_from_slice(&block_image(9, 2, run ^ 1));
        assert!(verify_with(&m, &d2).ok);
        // The guest's own counters.
        m.write_u64(DISK_CONTROL_ADDR + ctl::IOERRS, 3).unwrap();
        m.write_u64(DISK_CONTROL_ADDR + ctl::IOERR_WRITE, 1)
            .unwrap();
        m.write_u64(DISK_CONTROL_ADDR + ctl::IOERR_STATUS, 1)
            .unwrap();
        assert!(problem(&disk).contains(
            "3 of the guest's requests with an error (the last: a write of block 0, status IOERR)"
        ));
        m.write_u64(DISK_CONTROL_ADDR + ctl::IOERRS, 0).unwrap();
        m.write_u64(DISK_CONTROL_ADDR + ctl::ERRORS, 2).unwrap();
        assert!(problem(&disk).contains("read back 2 block(s)"));
    }

    #[test]
    fn verify_checks_the_read_slots_the_guest_vouched_for_and_skips_the_others() {
        use program::disk::{area, block_image, ctl, BLOCK_BYTES};
        let (m, disk, run) = written_disk_guest();
        let slot = |i: u64| DISK_AREA_ADDR + area::READ_BUF + i * BLOCK_BYTES;
        let meta = |i: u64| DISK_CONTROL_ADDR + ctl::SLOTS + i * 16;
        // Slot 3 holds block 2 (tag 3) as the device read it; slot 5 is
        // being read (tag 0) and holds the poison.
        m.write_bytes(slot(3), &block_image(2, 3, run)).unwrap();
        m.write_u64(meta(3), 2).unwrap();
        m.write_u64(meta(3) + 8, 3).unwrap();
        m.write_u64(meta(5), 1).unwrap();
        m.write_u64(slot(5), u64::MAX).unwrap();
        let r = verify_with(&m, &disk);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.disk.unwrap().slots_checked, 1);
        // A device write to the slot lost (the page as it was before the
        // read: the poison at its start).
        m.write_u64(slot(3), u64::MAX).unwrap();
        let r = verify_with(&m, &disk);
        assert!(!r.ok && r.violation_count == 1, "{r:?}");
        assert!(
            r.violations[0]
                .problem
                .contains("read slot 3 no longer holds block 2"),
            "{r:?}"
        );
        // A slot naming a tag the guest never issued.
        m.write_bytes(slot(3), &block_image(2, 3, run)).unwrap();
        m.write_u64(meta(3) + 8, 9).unwrap();
        let r = verify_with(&m, &disk);
        assert!(
            !r.ok && r.violations[0].problem.contains("never wrote"),
            "{r:?}"
        );
    }
}
