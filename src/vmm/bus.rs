//! The VM's buses: the port-I/O bus, where devices register the port
//! ranges they serve, and the MMIO bus beside it, where devices register
//! windows of guest-physical addresses that no memory slot backs (the
//! virtio-mmio transports). The vCPU threads route every `in`/`out` exit
//! and every `MmioRead`/`MmioWrite` exit through them.
//!
//! This module owns the routing, the [`PioDevice`] and [`MmioDevice`]
//! traits, and the [`DeviceSet`] the VM is handed (buses, interrupt lines,
//! ioeventfds, the devices' view of guest memory); it names no device. What
//! a device answers, and the state it saves, is the device's own business
//! (`crate::devices`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// What the vCPU thread does after a device served an I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Re-enter the guest.
    Continue,
    /// Sleep until the instant (None: until woken by a command), answering
    /// commands meanwhile: how a builtin guest idles or keeps its pace.
    Wait(Option<Instant>),
    /// Complete the access now (KVM retires the instruction on a KVM_RUN
    /// with `immediate_exit`, which returns at once), then sleep as
    /// [`IoAction::Wait`] does: the device handed the request to another
    /// thread, which pauses the VM for it (a guest-driven reset). A state
    /// saved meanwhile has the access done, so a checkpoint taken then
    /// does not repeat the request when it is restored.
    Handoff(Instant),
    /// The guest asked to end the VM.
    Exit(GuestExit),
    /// The guest took an exception or interrupt it has no use for and
    /// reported it: the VM cannot run on.
    Fault(GuestFault),
}

/// An exception or interrupt a guest reported instead of triple-faulting
/// (the builtin guests' IDT does this, see docs/test-device.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// The IDT vector (0–31 exceptions, 32–255 interrupts).
    pub vector: u8,
    /// The error code the CPU pushed, for the exceptions that have one.
    pub error_code: Option<u32>,
    /// RIP in the interrupt frame: the faulting instruction for a fault,
    /// the one after it for a trap or an interrupt.
    pub rip: u64,
}

impl GuestFault {
    /// The architectural mnemonic of an exception vector (None: reserved
    /// or an interrupt).
    pub fn mnemonic(vector: u8) -> Option<&'static str> {
        const NAMES: [&str; 32] = [
            "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "", "#TS", "#NP", "#SS",
            "#GP", "#PF", "", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "", "", "", "", "", "",
            "#HV", "#VC", "#SX", "",
        ];
        NAMES
            .get(vector as usize)
            .copied()
            .filter(|n| !n.is_empty())
    }
}

impl std::fmt::Display for GuestFault {
    /// `guest exception: vector 13 (#GP) error code 0x0 at rip 0x10023`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest exception: vector {}", self.vector)?;
        match GuestFault::mnemonic(self.vector) {
            Some(m) => write!(f, " ({m})")?,
            None if self.vector >= 32 => write!(f, " (interrupt)")?,
            None => write!(f, " (reserved)")?,
        }
        if let Some(e) = self.error_code {
            write!(f, " error code {e:#x}")?;
        }
        write!(f, " at rip {:#x}", self.rip)
    }
}

/// How a guest ended the VM by itself, on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestExit {
    /// ACPI power-off (`poweroff`).
    PowerOff,
    /// A reset through the keyboard controller or the ACPI reset register
    /// (`reboot`): vmhop ends the VM, as Firecracker does.
    Reboot,
}

impl GuestExit {
    /// What to tell the user.
    pub fn describe(self) -> &'static str {
        match self {
            GuestExit::PowerOff => "the guest powered off",
            GuestExit::Reboot => "the guest rebooted",
        }
    }
}

/// A device reached through port I/O.
///
/// `port` is the absolute port; a device registered for several ranges
/// tells them apart by it. Accesses are 1, 2 or 4 bytes wide.
pub trait PioDevice: Send + Sync {
    /// Short name, the key of its saved state.
    fn name(&self) -> &'static str;
    /// An `in` from `port` by vCPU `vcpu`: fill `data`.
    fn read(&self, vcpu: u32, port: u16, data: &mut [u8]) -> IoAction;
    /// An `out` of `data` to `port` by vCPU `vcpu`.
    fn write(&self, vcpu: u32, port: u16, data: &[u8]) -> IoAction;
}

/// What the VM asks of its devices as a whole around every pause; it
/// knows no device (`crate::devices::persist::Registry` implements it).
pub trait DeviceControl: Send + Sync {
    /// Stops every device taking new requests and waits for those in
    /// flight, while the vCPUs may still run: until [`DeviceControl::resume`]
    /// no device writes guest memory, and their states can be taken.
    fn quiesce(&self) -> Result<(), DeviceError>;
    /// Lets every device serve again: each queue is kicked and an
    /// interrupt raised, so a request the guest queued meanwhile is seen.
    fn resume(&self) -> Result<(), DeviceError>;
    /// Every device's state, by type and id (quiesced).
    fn save(&self) -> Result<crate::vmm::state::DeviceStates, DeviceError>;
    /// What the devices with something to say report for `status`
    /// (attachments and counters); read while they run.
    fn status(&self) -> Vec<crate::api::vm::DeviceStatus> {
        Vec::new()
    }
    /// The VM runs on another host now: devices that can tell the network
    /// where the guest is do so (one round; the caller repeats it).
    fn announce(&self) {}
    /// Fails unless every device can take its state from `saved` in place
    /// (a reset): each device has one there, of its shape, and no saved
    /// device is missing. Changes nothing.
    fn check_load(&self, saved: &crate::vmm::state::DeviceStates) -> Result<(), DeviceError>;
    /// Puts every live device back into its state in `saved` (quiesced,
    /// vCPUs paused), after [`DeviceControl::check_load`] passed.
    fn load(&self, saved: &crate::vmm::state::DeviceStates) -> Result<(), DeviceError>;
    /// The disks, in the order of the VM's configuration.
    fn stores(&self) -> Vec<std::sync::Arc<dyn crate::vmm::store::BlockStore>> {
        Vec::new()
    }
}

/// A device failed to quiesce, resume or save.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} device {device}: {source}")]
pub struct DeviceError {
    /// What was asked: `quiesce`, `resume`, `save` or `load`.
    pub action: &'static str,
    /// The device, as `type/id`.
    pub device: String,
    /// What failed (the device's own error, or serde's).
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// A device reached through memory-mapped I/O: a window of guest-physical
/// addresses in the MMIO hole.
///
/// `offset` is relative to the window's start. Accesses are 1, 2, 4 or 8
/// bytes wide and may run past the window's end (a device decides what
/// that means). Called on vCPU threads: a device must answer quickly and
/// leave slow work (disk I/O) to a thread of its own.
pub trait MmioDevice: Send + Sync {
    /// Short name for messages (`virtio-blk disk0`).
    fn name(&self) -> String;
    /// A read of `data.len()` bytes at `offset` by vCPU `vcpu`: fill `data`.
    fn read(&self, vcpu: u32, offset: u64, data: &mut [u8]) -> IoAction;
    /// A write of `data` at `offset` by vCPU `vcpu`.
    fn write(&self, vcpu: u32, offset: u64, data: &[u8]) -> IoAction;
}

/// Registering a device failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim the same guest-physical addresses.
    #[error("MMIO window {base:#x}+{len:#x} of {new} overlaps that of {old}")]
    MmioOverlap {
        /// First address of the new window.
        base: u64,
        /// Its length.
        len: u64,
        /// The device being added.
        new: String,
        /// The device already there.
        old: String,
    },
    /// An empty window, or one that wraps around the address space.
    #[error("MMIO window {base:#x}+{len:#x} of {device} is empty or wraps around")]
    MmioWindow {
        /// First address.
        base: u64,
        /// Its length.
        len: u64,
        /// The device.
        device: String,
    },
    /// Two devices claim the same port.
    #[error("I/O ports {start:#x}+{len} of {new} overlap those of {old}")]
    Overlap {
        /// First port of the new range.
        start: u16,
        /// Its length.
        len: u16,
        /// The device being added.
        new: &'static str,
        /// The device already there.
        old: &'static str,
    },
}

/// What the VM is handed to wire its devices: the buses, the interrupt
/// lines devices raise (an eventfd per line, registered as a KVM irqfd on
/// that GSI of the in-kernel irqchip), the guest writes KVM turns into
/// eventfd signals without an exit (ioeventfds), the handle through which
/// devices see guest memory once the VM made it, and what saves their
/// states.
#[derive(Default)]
pub struct DeviceSet {
    /// The port-I/O bus.
    pub bus: IoBus,
    /// The MMIO bus.
    pub mmio: MmioBus,
    /// (eventfd, GSI) of every interrupt line.
    pub irq_lines: Vec<(vmm_sys_util::eventfd::EventFd, u32)>,
    /// Guest writes KVM signals on an eventfd instead of exiting.
    pub ioevents: Vec<IoEvent>,
    /// Guest memory as devices see it: the VM attaches it once its memory
    /// exists and detaches it before unmapping that memory.
    pub memory: crate::memory::DeviceMemory,
    /// Quiesces, resumes and saves the devices (None: no device has state).
    pub control: Option<Box<dyn DeviceControl>>,
    /// The devices' worker threads, by guest node: the VM gives each guest
    /// node's group the CPUs of its host node (and a NUMA move the new
    /// node's), so the workers run beside the vCPUs and memory they serve.
    pub threads: crate::host::affinity::PinnedThreads,
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSet")
            .field("bus", &self.bus)
            .field("mmio", &self.mmio)
            .field("irq_lines", &self.irq_lines.len())
            .field("ioevents", &self.ioevents)
            .finish_non_exhaustive()
    }
}

/// A guest MMIO write that KVM turns into an eventfd signal (KVM_IOEVENTFD):
/// the write completes in the kernel, no exit reaches vmhop, and a device
/// thread waiting on the eventfd wakes. Checked on this host's PVM KVM for
/// CPL3 guests (`kvm_mmio` tests below).
#[derive(Debug)]
pub struct IoEvent {
    /// The eventfd KVM signals.
    pub fd: vmm_sys_util::eventfd::EventFd,
    /// Guest-physical address of the write.
    pub addr: u64,
    /// Only a 4-byte write of this value matches (None: a write of any
    /// width and value).
    pub datamatch: Option<u32>,
}

impl IoEvent {
    /// Registers this ioeventfd with the VM `vm`.
    pub fn register(&self, vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
        let addr = kvm_ioctls::IoEventAddress::Mmio(self.addr);
        match self.datamatch {
            Some(v) => vm.register_ioevent(&self.fd, &addr, v),
            None => vm.register_ioevent(&self.fd, &addr, kvm_ioctls::NoDatamatch),
        }
    }
}

/// Guest-physical windows and the devices behind them.
#[derive(Default, Clone)]
pub struct MmioBus {
    /// First address of each window → (length, device).
    windows: BTreeMap<u64, (u64, Arc<dyn MmioDevice>)>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (base, (len, d)) in &self.windows {
            l.entry(&format_args!("{}@{base:#x}+{len:#x}", d.name()));
        }
        l.finish()
    }
}

impl MmioBus {
    /// An empty bus: every address reads as all ones and ignores writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes addresses `base .. base + len` to `device`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), BusError> {
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return Err(BusError::MmioWindow {
                base,
                len,
                device: device.name(),
            });
        };
        let clash = self
            .windows
            .range(..end)
            .next_back()
            .filter(|(&b, (l, _))| base < b + *l);
        if let Some((_, (_, old))) = clash {
            return Err(BusError::MmioOverlap {
                base,
                len,
                new: device.name(),
                old: old.name(),
            });
        }
        self.windows.insert(base, (len, device));
        Ok(())
    }

    /// The device whose window holds `addr`, and the offset in it.
    fn find(&self, addr: u64) -> Option<(&Arc<dyn MmioDevice>, u64)> {
        let (&base, (len, d)) = self.windows.range(..=addr).next_back()?;
        (addr - base < *len).then_some((d, addr - base))
    }

    /// Serves a read; an address nobody serves reads as all ones, like a
    /// bus with nothing on it.
    pub fn read(&self, vcpu: u32, addr: u64, data: &mut [u8]) -> IoAction {
        match self.find(addr) {
            Some((d, offset)) => d.read(vcpu, offset, data),
            None => {
                data.fill(0xff);
                IoAction::Continue
            }
        }
    }

    /// Serves a write; writes nobody serves are dropped.
    pub fn write(&self, vcpu: u32, addr: u64, data: &[u8]) -> IoAction {
        match self.find(addr) {
            Some((d, offset)) => d.write(vcpu, offset, data),
            None => IoAction::Continue,
        }
    }

    /// The windows, in address order: (first address, length, device).
    pub fn windows(&self) -> impl Iterator<Item = (u64, u64, &Arc<dyn MmioDevice>)> {
        self.windows.iter().map(|(&b, (l, d))| (b, *l, d))
    }
}

/// Port ranges and the devices behind them.
#[derive(Default, Clone)]
pub struct IoBus {
    /// First port of each range → (length, device).
    ranges: BTreeMap<u16, (u16, Arc<dyn PioDevice>)>,
}

impl std::fmt::Debug for IoBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (start, (len, d)) in &self.ranges {
            l.entry(&format_args!("{}@{start:#x}+{len}", d.name()));
        }
        l.finish()
    }
}

impl IoBus {
    /// An empty bus: every port reads as all ones and ignores writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes ports `start .. start + len` to `device`.
    pub fn insert(
        &mut self,
        start: u16,
        len: u16,
        device: Arc<dyn PioDevice>,
    ) -> Result<(), BusError> {
        let end = start as u32 + len as u32;
        let clash = self.ranges.iter().find(|(&s, (l, _))| {
            let e = s as u32 + *l as u32;
            (start as u32) < e && (s as u32) < end
        });
        if let Some((_, (_, old))) = clash {
            return Err(BusError::Overlap {
                start,
                len,
                new: device.name(),
                old: old.name(),
            });
        }
        self.ranges.insert(start, (len, device));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&Arc<dyn PioDevice>> {
        let (&start, (len, d)) = self.ranges.range(..=port).next_back()?;
        ((port as u32) < start as u32 + *len as u32).then_some(d)
    }

    /// Serves an `in`; a port nobody serves reads as all ones, like an
    /// empty ISA bus.
    pub fn read(&self, vcpu: u32, port: u16, data: &mut [u8]) -> IoAction {
        match self.find(port) {
            Some(d) => d.read(vcpu, port, data),
            None => {
                data.fill(0xff);
                IoAction::Continue
            }
        }
    }

    /// Serves an `out`; writes to a port nobody serves are dropped.
    pub fn write(&self, vcpu: u32, port: u16, data: &[u8]) -> IoAction {
        match self.find(port) {
            Some(d) => d.write(vcpu, port, data),
            None => IoAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Probe {
        name: &'static str,
        writes: AtomicU32,
    }

    impl PioDevice for Probe {
        fn name(&self) -> &'static str {
            self.name
        }
        fn read(&self, _: u32, port: u16, data: &mut [u8]) -> IoAction {
            data.fill(port as u8);
            IoAction::Continue
        }
        fn write(&self, _: u32, _: u16, _: &[u8]) -> IoAction {
            self.writes.fetch_add(1, Ordering::SeqCst);
            IoAction::Exit(GuestExit::PowerOff)
        }
    }

    fn probe(name: &'static str) -> Arc<Probe> {
        Arc::new(Probe {
            name,
            writes: AtomicU32::new(0),
        })
    }

    #[test]
    fn ports_reach_the_device_that_serves_them_and_only_it() {
        let mut bus = IoBus::new();
        let a = probe("a");
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0, 0x3fa, &mut b);
        assert_eq!(b[0], 0xfa);
        bus.read(0, 0x400, &mut b);
        assert_eq!(b[0], 0xff, "a port past the range reads as all ones");
        bus.read(0, 0x3f7, &mut b);
        assert_eq!(b[0], 0xff);
        assert_eq!(
            bus.write(0, 0x3ff, &[1]),
            IoAction::Exit(GuestExit::PowerOff)
        );
        assert_eq!(bus.write(0, 0x60, &[1]), IoAction::Continue);
        assert_eq!(a.writes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_guest_fault_names_its_vector_error_code_and_rip() {
        let gp = GuestFault {
            vector: 13,
            error_code: Some(0),
            rip: 0x10023,
        };
        assert_eq!(
            gp.to_string(),
            "guest exception: vector 13 (#GP) error code 0x0 at rip 0x10023"
        );
        let irq = GuestFault {
            vector: 0x40,
            error_code: None,
            rip: 0x11002,
        };
        assert_eq!(
            irq.to_string(),
            "guest exception: vector 64 (interrupt) at rip 0x11002"
        );
    }

    struct Window(&'static str);

    impl MmioDevice for Window {
        fn name(&self) -> String {
            self.0.into()
        }
        fn read(&self, _: u32, offset: u64, data: &mut [u8]) -> IoAction {
            data.fill(offset as u8);
            IoAction::Continue
        }
        fn write(&self, _: u32, offset: u64, _: &[u8]) -> IoAction {
            match offset {
                0x50 => IoAction::Exit(GuestExit::Reboot),
                _ => IoAction::Continue,
            }
        }
    }

    #[test]
    fn mmio_addresses_reach_their_window_at_its_offset_and_only_it() {
        let mut bus = MmioBus::new();
        bus.insert(0xd000_0000, 0x1000, Arc::new(Window("a")))
            .unwrap();
        bus.insert(0xd000_1000, 0x1000, Arc::new(Window("b")))
            .unwrap();
        let mut b = [0u8; 4];
        bus.read(0, 0xd000_0070, &mut b);
        assert_eq!(b, [0x70; 4]);
        bus.read(0, 0xd000_1fff, &mut [0u8; 1]);
        bus.read(0, 0xd000_2000, &mut b);
        assert_eq!(b, [0xff; 4], "past the last window reads as all ones");
        bus.read(0, 0xcfff_fffc, &mut b);
        assert_eq!(b, [0xff; 4], "below the first window too");
        assert_eq!(
            bus.write(0, 0xd000_1050, &[0; 4]),
            IoAction::Exit(GuestExit::Reboot),
            "offset 0x50 of window b"
        );
        assert_eq!(bus.write(0, 0xd000_3050, &[0; 4]), IoAction::Continue);
    }

    #[test]
    fn overlapping_or_empty_mmio_windows_are_refused() {
        let mut bus = MmioBus::new();
        bus.insert(0xd000_1000, 0x1000, Arc::new(Window("disk0")))
            .unwrap();
        for (base, len) in [
            (0xd000_1000, 0x1000),
            (0xd000_0800, 0x1000),
            (0xd000_1fff, 1),
            (0xd000_0000, 0x3000),
        ] {
            let e = bus.insert(base, len, Arc::new(Window("x"))).unwrap_err();
            assert!(e.to_string().contains("overlaps that of disk0"), "{e}");
        }
        assert!(bus.insert(0xd000_0000, 0, Arc::new(Window("x"))).is_err());
        assert!(bus.insert(u64::MAX, 2, Arc::new(Window("x"))).is_err());
        bus.insert(0xd000_0000, 0x1000, Arc::new(Window("before")))
            .unwrap();
        bus.insert(0xd000_2000, 0x1000, Arc::new(Window("after")))
            .unwrap();
        let names: Vec<String> = bus.windows().map(|w| w.2.name()).collect();
        assert_eq!(names, ["before", "disk0", "after"]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = IoBus::new();
        bus.insert(0x60, 1, probe("kbd-data")).unwrap();
        bus.insert(0x64, 1, probe("kbd-cmd")).unwrap();
        let e = bus.insert(0x5f, 2, probe("x")).unwrap_err();
        assert!(e.to_string().contains("kbd-data"), "{e}");
        assert!(bus.insert(0x64, 4, probe("y")).is_err());
        assert!(bus.insert(0x61, 3, probe("z")).is_ok());
    }
}

/// What this host's KVM does with a CPL3 guest's MMIO accesses, checked on
/// real KVM: the virtio transport's notify path rests on it.
#[cfg(test)]
mod kvm_mmio {
    use iced_x86::code_asm::*;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
    use vmm_sys_util::eventfd::EventFd;

    use crate::guest::{abi, setup, GuestSpec};
    use crate::memory::{Backing, Chunk, GuestMemory, GuestRange, Mapping, NodeMemory};

    /// A window in the 32-bit MMIO hole, where no memory slot lies.
    const WINDOW: u64 = 0xd000_0000;
    const MEMORY: u64 = 4 << 20;

    /// A one-vCPU VM whose vCPU runs `program` at CPL3 (the builtin guests'
    /// tables, with the identity map stretched over the MMIO hole), then
    /// exits through the test device's WAIT port.
    fn probe_vm(
        program: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> (VmFd, VcpuFd, GuestMemory) {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.set_tss_address(crate::memory::layout::MMIO_HOLE_END as usize - 0x8000)
            .expect("KVM_SET_TSS_ADDR");
        let mapping = Mapping::new(MEMORY as usize, Backing::Anonymous).expect("guest memory");
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEMORY,
            userspace_addr: mapping.as_ptr() as u64,
        };
        // SAFETY: the mapping is MEMORY bytes long and lives in the returned
        // GuestMemory, which the caller keeps beside the VM fd.
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        let mem = GuestMemory {
            nodes: vec![NodeMemory {
                guest_node: 0,
                host_node: None,
                size: MEMORY,
                backing: Backing::Anonymous,
                chunks: vec![Chunk {
                    range: GuestRange {
                        start: 0,
                        len: MEMORY,
                    },
                    slot: 0,
                    mapping,
                }],
            }],
        };
        let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        fd.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        setup::boot(
            &GuestSpec::Idle,
            &mem,
            std::slice::from_ref(&fd),
            &Default::default(),
        )
        .expect("guest tables");
        crate::arch::x86_64::regs::write_identity_map(&mem, setup::PML4_ADDR, 4, true)
            .expect("identity map over the MMIO hole");
        let mut a = CodeAssembler::new(64).unwrap();
        program(&mut a).unwrap();
        a.mov(dx, abi::PORT_WAIT as u32).unwrap();
        a.out(dx, eax).unwrap();
        let code = a.assemble(setup::CODE_ADDR).unwrap();
        mem.write_bytes(setup::CODE_ADDR, &code).unwrap();
        (vm, fd, mem)
    }

    /// One MMIO exit the vCPU took.
    #[derive(Debug, PartialEq, Eq)]
    enum Access {
        Read(u64, usize),
        Write(u64, Vec<u8>),
    }

    /// Runs the vCPU until the program's final `out`, answering every MMIO
    /// read with `answer`; returns the MMIO exits in order.
    fn run(fd: &mut VcpuFd, answer: u8) -> Vec<Access> {
        let mut seen = Vec::new();
        for _ in 0..100 {
            match fd.run().expect("KVM_RUN") {
                VcpuExit::MmioRead(addr, data) => {
                    data.fill(answer);
                    seen.push(Access::Read(addr, data.len()));
                }
                VcpuExit::MmioWrite(addr, data) => seen.push(Access::Write(addr, data.to_vec())),
                VcpuExit::IoOut(abi::PORT_WAIT, _) => return seen,
                other => panic!("unexpected exit {other:?} after {seen:?}"),
            }
        }
        panic!("the program did not finish: {seen:?}");
    }

    /// The experiment behind the virtio-mmio notify path: on this host a
    /// CPL3 write that matches an ioeventfd (with a 4-byte datamatch, or
    /// with none) signals it and never exits to vmhop; a write that does
    /// not match, and every read, exits as `MmioWrite`/`MmioRead` with its
    /// true width (4 and 8 bytes).
    #[test]
    fn cpl3_mmio_reaches_ioeventfds_and_otherwise_exits_with_its_width() {
        let (vm, mut fd, mem) = probe_vm(|a| {
            a.mov(rbx, WINDOW)?;
            a.mov(dword_ptr(rbx + 0x50), 0)?; // matches the datamatch 0
            a.mov(dword_ptr(rbx + 0x50), 1)?; // matches the datamatch 1
            a.mov(dword_ptr(rbx + 0x50), 7)?; // matches neither: an exit
            a.mov(dword_ptr(rbx + 0x150), 5)?; // no datamatch: any value
            a.mov(qword_ptr(rbx + 0x250), 9)?; // no ioeventfd: an exit
            a.mov(ecx, dword_ptr(rbx + 0x70))?; // a 4-byte read
            a.mov(r8, qword_ptr(rbx + 0x100))?; // an 8-byte read
            a.mov(rax, setup::CONTROL_ADDR + 0x100)?;
            a.mov(dword_ptr(rax), ecx)?;
            a.mov(qword_ptr(rax + 8), r8)?;
            Ok(())
        });
        let q0 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let q1 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let any = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_ioevent(&q0, &IoEventAddress::Mmio(WINDOW + 0x50), 0u32)
            .expect("KVM_IOEVENTFD with a datamatch");
        vm.register_ioevent(&q1, &IoEventAddress::Mmio(WINDOW + 0x50), 1u32)
            .expect("KVM_IOEVENTFD with a second datamatch at the same address");
        vm.register_ioevent(&any, &IoEventAddress::Mmio(WINDOW + 0x150), NoDatamatch)
            .expect("KVM_IOEVENTFD without a datamatch");
        let seen = run(&mut fd, 0xa5);
        assert_eq!(
            seen,
            vec![
                Access::Write(WINDOW + 0x50, 7u32.to_le_bytes().to_vec()),
                Access::Write(WINDOW + 0x250, 9u64.to_le_bytes().to_vec()),
                Access::Read(WINDOW + 0x70, 4),
                Access::Read(WINDOW + 0x100, 8),
            ]
        );
        assert_eq!(
            q0.read().ok(),
            Some(1),
            "the datamatch-0 eventfd fired once"
        );
        assert_eq!(
            q1.read().ok(),
            Some(1),
            "the datamatch-1 eventfd fired once"
        );
        assert_eq!(any.read().ok(), Some(1), "the any-value eventfd fired once");
        // What the reads returned reached the guest's registers.
        let out = setup::CONTROL_ADDR + 0x100;
        assert_eq!(mem.read_u64(out).map(|v| v as u32), Some(0xa5a5_a5a5));
        assert_eq!(mem.read_u64(out + 8), Some(0xa5a5_a5a5_a5a5_a5a5));
    }
}
