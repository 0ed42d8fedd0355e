//! The state a vCPU starts a 64-bit Linux boot with (the kernel's
//! Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long mode,
//! paging with an identity map of the low 4 GiB, flat `__BOOT_CS` (0x10) and
//! `__BOOT_DS` (0x18) segments, `%rsi` pointing at boot_params, interrupts
//! off; plus the MSRs and local-APIC wiring firmware would leave behind.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use crate::memory::GuestMemory;

/// kvmclock's wall clock: KVM writes it into guest memory when it is set.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// kvmclock's per-vCPU system time: KVM maps the page it names when set.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// Guest-physical address of the boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// The boot IDT (empty: the kernel installs its own before enabling interrupts).
pub const IDT_ADDR: u64 = 0x520;
/// Top of the boot stack.
pub const STACK_TOP: u64 = 0x8ff0;
/// The PML4 of the identity map (its PDPT and four page directories follow
/// it, up to 0xf000).
pub const PML4_ADDR: u64 = 0x9000;
/// How many GiB the identity map covers.
const IDENTITY_GIB: u64 = 4;

/// GDT selectors the boot protocol names.
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry bits: present, writable, user-accessible, (in a PD) a
/// 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_USER: u64 = 0x4;
const PDE_HUGE: u64 = 0x80;
/// Size of one page-table page.
const TABLE_BYTES: u64 = 0x1000;

/// Writing the boot tables or setting a vCPU's boot state failed; each
/// variant names the address or the vCPU and ioctl.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory has no page where a table goes.
    #[error("guest memory has no page at {gpa:#x} for the {what}")]
    NoPage {
        /// Where the entry goes.
        gpa: u64,
        /// "boot tables" or "page tables".
        what: &'static str,
    },
    /// A vCPU ioctl failed.
    #[error("{ioctl} (vCPU {vcpu}): {source}")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// The vCPU.
        vcpu: u32,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MSR list does not fit one KVM_SET_MSRS.
    #[error("MSR list of vCPU {vcpu}: {source}")]
    MsrList {
        /// The vCPU.
        vcpu: u32,
        /// What the list's wrapper refused.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM set the MSRs before this one and refused it.
    #[error("KVM_SET_MSRS (vCPU {vcpu}): KVM refused MSR {index:#x}")]
    MsrRefused {
        /// The vCPU.
        vcpu: u32,
        /// The MSR.
        index: u32,
    },
}

/// A vCPU ioctl's error, naming it.
fn kvm(ioctl: &'static str, vcpu: u32) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm {
        ioctl,
        vcpu,
        source,
    }
}

/// A descriptor in the packed GDT format.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The unpacked segment KVM wants for a descriptor.
fn segment(selector: u16, flags: u16, limit: u32) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: if flags & 0x8000 != 0 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Flags of the flat 64-bit code, data and TSS descriptors.
const CODE_FLAGS: u16 = 0xa09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS_FLAGS: u16 = 0x808b;

/// Writes the boot GDT, IDT and identity-mapping page tables.
pub fn write_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let w = |gpa: u64, v: u64| {
        mem.write_u64(gpa, v).ok_or(RegsError::NoPage {
            gpa,
            what: "boot tables",
        })
    };
    let gdt = [
        0,
        0,
        gdt_entry(CODE_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        w(GDT_ADDR + i as u64 * 8, *e)?;
    }
    w(IDT_ADDR, 0)?;
    write_identity_map(mem, PML4_ADDR, IDENTITY_GIB, false)
}

/// Writes page tables that map the low `gib` GiB of guest-physical memory
/// onto themselves with 2 MiB pages: the PML4 at `pml4`, its one PDPT in
/// the next page, then one page directory per GiB. `user` sets the U/S bit
/// at every level (the builtin guests run at CPL3).
pub fn write_identity_map(
    mem: &GuestMemory,
    pml4: u64,
    gib: u64,
    user: bool,
) -> Result<(), RegsError> {
    let w = |gpa: u64, v: u64| {
        mem.write_u64(gpa, v).ok_or(RegsError::NoPage {
            gpa,
            what: "page tables",
        })
    };
    let flags = PTE_PRESENT_RW | if user { PTE_USER } else { 0 };
    let pdpt = pml4 + TABLE_BYTES;
    w(pml4, pdpt | flags)?;
    for g in 0..gib {
        let pd = pdpt + TABLE_BYTES * (1 + g);
        w(pdpt + g * 8, pd | flags)?;
        for i in 0..512u64 {
            w(pd + i * 8, (g << 30) | (i << 21) | flags | PDE_HUGE)?;
        }
    }
    Ok(())
}

/// Puts the boot vCPU at `entry` in 64-bit mode with `%rsi = boot_params`.
pub fn setup_boot_cpu(fd: &VcpuFd, entry: u64, boot_params: u64) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS", 0))?;
    let code = segment(BOOT_CS, CODE_FLAGS, 0xfffff);
    let data = segment(BOOT_DS, DATA_FLAGS, 0xfffff);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_TSS, TSS_FLAGS, 0xfffff);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET | CR0_PG) & !(1 << 30 | 1 << 29);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS", 0))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: STACK_TOP,
        rbp: STACK_TOP,
        rsi: boot_params,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS", 0))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU", 0))
}

/// MSR numbers set at boot.
mod msr {
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}
/// MISC_ENABLE: fast string operations, as firmware leaves them.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs on, default type write-back. Without it a guest
/// kernel sees all memory uncached and crawls.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Sets the MSRs firmware would leave for a 64-bit kernel on every vCPU.
pub fn setup_msrs(fd: &VcpuFd, id: u32) -> Result<(), RegsError> {
    let list = [
        (msr::SYSENTER_CS, 0),
        (msr::SYSENTER_ESP, 0),
        (msr::SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::LSTAR, 0),
        (msr::CSTAR, 0),
        (msr::SFMASK, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (msr::MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    set_msr_list(fd, id, &list)
}

/// Sets `(index, value)` MSRs of vCPU `id` in one KVM_SET_MSRS, naming the
/// first one KVM refuses. For short fixed lists; a saved state's MSRs go
/// through `vcpu::restore_state`, in batches.
pub fn set_msr_list(fd: &VcpuFd, id: u32, list: &[(u32, u64)]) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&entries).map_err(|source| RegsError::MsrList { vcpu: id, source })?;
    let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS", id))?;
    if n != entries.len() {
        return Err(RegsError::MsrRefused {
            vcpu: id,
            index: entries[n].index,
        });
    }
    Ok(())
}

/// Local APIC register offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const DELIVERY_EXTINT: u32 = 7;
const DELIVERY_NMI: u32 = 4;

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b: Vec<u8> = regs[off..off + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

/// Wires LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as the MP
/// spec's "virtual wire" mode that firmware leaves.
pub fn setup_lint(fd: &VcpuFd, id: u32) -> Result<(), RegsError> {
    let mut lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC", id))?;
    for (off, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let v = lapic_reg(&lapic.regs, off);
        set_lapic_reg(&mut lapic.regs, off, (v & !0x700) | (mode << 8));
    }
    fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC", id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_descriptor_is_flat_long_mode() {
        let s = segment(BOOT_CS, CODE_FLAGS, 0xfffff);
        assert_eq!(
            (s.l, s.db, s.g, s.present, s.s, s.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(gdt_entry(CODE_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }
}
