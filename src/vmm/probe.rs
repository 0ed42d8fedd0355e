//! What this host's KVM can run, found by trying it: a Linux guest's kernel
//! runs at CPL0, which some KVMs (the paravirtualised PVM of our
//! development machines) emulate at a million or two instructions per
//! second, far too slowly to boot, while they run CPL3 code natively. The
//! probe runs the same short loop at CPL0 and at CPL3 in a throwaway VM
//! and compares the two, rather than guess from a module's name: a KVM
//! that runs kernel code as it runs user code (hardware-assisted, or
//! itself emulated, as in the NUMA box under QEMU's TCG, whose absolute
//! speed varies with the host's load) takes about as long for both.
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
/// A CPL0 loop this fast needs no comparison: 100,000 instructions in 2 ms
/// is 50 million a second.
const FAST_ENOUGH: Duration = Duration::from_millis(2);
/// How many times slower than at CPL3 the loop may run at CPL0: PVM
/// measured about 500 times here; KVM that runs kernel code like user code
/// about 1 (the VM entry and exit of each run are in both).
const MAX_SLOWDOWN: f64 = 10.0;
/// Tries before the probe says no: the first may pay for the host's
/// scheduling or the code's first translation.
const TRIES: usize = 3;
/// The port the loop reports its end on.
const DONE_PORT: u16 = 0x80;

/// The privilege level a probe loop runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ring {
    /// Kernel code.
    Kernel,
    /// User code.
    User,
}

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
        "this host's KVM emulates guest kernel code: it ran it {slowdown:.0} times slower than \
         the same user code ({rate:.1} million instructions per second), so a Linux guest \
         would take hours to boot. {BOX_HINT}"
    )]
    TooSlow {
        /// Millions of kernel-mode instructions per second measured.
        rate: f64,
        /// How many times slower kernel code ran than user code.
        slowdown: f64,
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

/// Runs the loop once at `ring` in a fresh VM; how long it took.
fn run_once(kvm_sys: &Kvm, ring: Ring) -> Result<Duration, ProbeError> {
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
    // GDT: null, 64-bit code and data at DPL 0, then at DPL 3.
    let gdt: [u64; 5] = [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_fa00_0000_ffff,
        0x00cf_f200_0000_ffff,
    ];
    put(
        GDT,
        &gdt.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<_>>(),
    );
    // One 2 MiB page, identity-mapped, user-accessible at every level.
    put(PML4, &(PDPT | 0x7).to_le_bytes());
    put(PDPT, &(PD | 0x7).to_le_bytes());
    put(PD, &0x87u64.to_le_bytes());
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
    let dpl = match ring {
        Ring::Kernel => 0,
        Ring::User => 3,
    };
    let seg = |selector: u16, type_: u8, l: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector | dpl as u16,
        type_,
        present: 1,
        dpl,
        db: u8::from(l == 0),
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    // Kernel selectors 0x08/0x10, user ones 0x18/0x20 (with RPL 3).
    let (code, data) = match ring {
        Ring::Kernel => (0x08, 0x10),
        Ring::User => (0x18, 0x20),
    };
    sregs.cs = seg(code, 0xb, 1);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = seg(data, 0x3, 0);
    }
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 1 | 1 << 4 | 1 << 31; // PE, ET, PG
    sregs.efer = 1 << 8 | 1 << 10; // LME, LMA
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // IOPL 3: the loop's `out` exits to vmhop from CPL3 too.
    let regs = kvm_bindings::kvm_regs {
        rip: CODE,
        rflags: 2 | 3 << 12,
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
    let (mut kernel, mut user) = (Duration::MAX, Duration::MAX);
    for _ in 0..TRIES {
        kernel = kernel.min(run_once(&kvm_sys, Ring::Kernel)?);
        if kernel <= FAST_ENOUGH {
            return Ok(());
        }
        user = user.min(run_once(&kvm_sys, Ring::User)?);
        if kernel.as_secs_f64() <= MAX_SLOWDOWN * user.as_secs_f64() {
            return Ok(());
        }
    }
    let instructions = 2.0 * LOOP_ITERATIONS as f64;
    Err(ProbeError::TooSlow {
        rate: instructions / kernel.as_secs_f64() / 1e6,
        slowdown: kernel.as_secs_f64() / user.as_secs_f64(),
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
