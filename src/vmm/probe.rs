//! What this host's KVM can run, found by trying it: a Linux guest's kernel
//! runs at CPL0, which some KVMs (the paravirtualised PVM of our
//! development machines) emulate at about a million instructions per
//! second, far too slowly to boot. The probe runs a short CPL0 loop in a
//! throwaway VM and times it, rather than guess from a module's name.
//!
//! Owns only the probe VM (one page-table tree, one code page, one vCPU);
//! it shares nothing with the VMs vmhop runs.

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};

use crate::memory::{Backing, Mapping};

/// Iterations of the probe loop (two instructions each).
const LOOP_ITERATIONS: u32 = 50_000;
/// The most the loop may take on a KVM that runs kernel code at a usable
/// speed: 100,000 instructions in 10 ms is 10 million a second, ten times
/// what PVM manages and far below hardware-assisted KVM, even nested under
/// an emulator (the NUMA box).
const MAX_LOOP_TIME: Duration = Duration::from_millis(10);
/// Tries before the probe says no: the first may pay for the host's
/// scheduling or the code's first translation.
const TRIES: usize = 3;
/// The port the loop reports its end on.
const DONE_PORT: u16 = 0x80;

/// Guest-physical layout of the probe VM (all in its one 2 MiB page).
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const CODE: u64 = 0x4000;
const MEMORY: usize = 2 << 20;

/// Where the NUMA box's Linux steps are described.
const BOX_HINT: &str = "Linux guests need hardware-assisted KVM (VT-x or AMD-V); on a host like \
this one, run them inside the NUMA box: tests/numabox/setup.sh && \
tests/numabox/linux/run-step.sh boot (README, \"Linux guests\")";

/// Why Linux guests cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// KVM itself failed.
    #[error("probing KVM: {what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The probe VM's memory could not be mapped.
    #[error("probing KVM: {0}")]
    Memory(#[from] crate::memory::MappingError),
    /// The probe's code did not assemble (a vmhop bug).
    #[error("probing KVM: assembling the probe: {0}")]
    Assemble(String),
    /// KVM would not run kernel code.
    #[error("this host's KVM cannot run guest kernel code: {exit}. {BOX_HINT}")]
    Refused {
        /// What KVM did instead.
        exit: String,
    },
    /// KVM runs kernel code far too slowly.
    #[error(
        "this host's KVM runs guest kernel code about {} times slower than hardware-assisted \
         KVM ({rate:.1} million instructions per second): a Linux guest would take hours to \
         boot. {BOX_HINT}", (1000.0 / rate).round()
    )]
    TooSlow {
        /// Millions of instructions per second measured.
        rate: f64,
    },
}

impl crate::api::Classify for ProbeError {
    fn kind(&self) -> crate::api::ErrorKind {
        crate::api::ErrorKind::Failed
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbeError {
    move |source| ProbeError::Kvm { what, source }
}

/// The probe loop: count `ecx` down, then `out` to [`DONE_PORT`].
fn probe_code() -> Result<Vec<u8>, ProbeError> {
    let asm = || -> Result<Vec<u8>, iced_x86::IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut top = a.create_label();
        a.mov(ecx, LOOP_ITERATIONS)?;
        a.set_label(&mut top)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.out(DONE_PORT as u32, al)?;
        a.assemble(CODE)
    };
    asm().map_err(|e| ProbeError::Assemble(e.to_string()))
}

/// Runs the CPL0 loop once in a fresh VM; how long it took.
fn run_once(kvm_sys: &Kvm) -> Result<Duration, ProbeError> {
    let vm = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    let mem = Mapping::new(MEMORY, Backing::Anonymous)?;
    let put = |gpa: u64, bytes: &[u8]| {
        // SAFETY: every write below lies inside the 2 MiB mapping, which no
        // vCPU runs on yet and nothing else knows of.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                mem.as_ptr().add(gpa as usize),
                bytes.len(),
            )
        }
    };
    // GDT: null, 64-bit code (DPL 0), data.
    let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    put(
        GDT,
        &gdt.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<_>>(),
    );
    // One 2 MiB page, identity-mapped, supervisor only.
    put(PML4, &(PDPT | 0x3).to_le_bytes());
    put(PDPT, &(PD | 0x3).to_le_bytes());
    put(PD, &0x83u64.to_le_bytes());
    put(CODE, &probe_code()?);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEMORY as u64,
        userspace_addr: mem.as_ptr() as u64,
    };
    // SAFETY: the mapping outlives the VM: both are dropped at the end of
    // this function, the VM first (declared after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let seg = |selector: u16, type_: u8, l: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(l == 0),
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 0xb, 1);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = seg(0x10, 0x3, 0);
    }
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 1 | 1 << 4 | 1 << 31; // PE, ET, PG
    sregs.efer = 1 << 8 | 1 << 10; // LME, LMA
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE,
        rflags: 2,
        rsp: 0x8000,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    let t = Instant::now();
    let exit = match vcpu.run() {
        Ok(VcpuExit::IoOut(DONE_PORT, _)) => return Ok(t.elapsed()),
        Ok(other) => format!("the probe loop exited with {other:?}"),
        Err(e) => format!("KVM_RUN failed: {e}"),
    };
    let rip = vcpu
        .get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_default();
    Err(ProbeError::Refused {
        exit: format!("{exit} at rip {rip}"),
    })
}

/// Whether this host's KVM runs guest kernel code at a usable speed.
pub fn linux_capable() -> Result<(), ProbeError> {
    let kvm_sys = Kvm::new().map_err(kvm("opening /dev/kvm"))?;
    let mut best = Duration::MAX;
    for _ in 0..TRIES {
        best = best.min(run_once(&kvm_sys)?);
        if best <= MAX_LOOP_TIME {
            return Ok(());
        }
    }
    let instructions = 2.0 * LOOP_ITERATIONS as f64;
    Err(ProbeError::TooSlow {
        rate: instructions / best.as_secs_f64() / 1e6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_answers_and_says_what_to_do_when_linux_cannot_run() {
        match linux_capable() {
            Ok(()) => {}
            Err(e @ ProbeError::TooSlow { .. }) | Err(e @ ProbeError::Refused { .. }) => {
                let m = e.to_string();
                assert!(m.contains("hardware-assisted KVM"), "{m}");
                assert!(m.contains("tests/numabox/linux/run-step.sh"), "{m}");
            }
            Err(e) => panic!("the probe itself failed: {e}"),
        }
    }
}
