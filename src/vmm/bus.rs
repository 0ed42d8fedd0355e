//! The VM's port-I/O bus: devices register the port ranges they serve, and
//! the vCPU threads route every `in`/`out` exit through it.
//!
//! This module owns the routing and the [`PioDevice`] trait; it names no
//! device. What a device answers, and the state it saves, is the device's
//! own business (`crate::devices`).

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

/// Whatever saves the VM's devices: the VM asks it in a pause and knows no
/// device (`crate::devices::persist` implements it).
pub trait SaveDevices: Send + Sync {
    /// Every device's state, by type and id.
    fn save(&self) -> Result<crate::vmm::state::DeviceStates, String>;
}

/// Registering a device failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
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

/// What the VM is handed to wire its devices: the bus, the interrupt
/// lines devices raise (an eventfd per line, registered as a KVM irqfd on
/// that GSI of the in-kernel irqchip), and what saves their states.
#[derive(Default)]
pub struct DeviceSet {
    /// The port-I/O bus.
    pub bus: IoBus,
    /// (eventfd, GSI) of every interrupt line.
    pub irq_lines: Vec<(vmm_sys_util::eventfd::EventFd, u32)>,
    /// Saves every device's state (None: no device has any).
    pub states: Option<Box<dyn SaveDevices>>,
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSet")
            .field("bus", &self.bus)
            .field("irq_lines", &self.irq_lines.len())
            .finish_non_exhaustive()
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
