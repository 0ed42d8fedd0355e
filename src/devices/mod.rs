//! The devices a guest sees, each on the VM's I/O bus (`vmm::bus`) with its
//! own saved state: the builtin guests' test device, and for Linux guests
//! COM1 (the console), the i8042 (reboot), a CMOS clock and the ACPI
//! power-management registers (power-off).
//!
//! This module builds the set a configuration needs, fresh or from a
//! checkpoint's saved states; the VM routes I/O to it and knows no device.

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod persist;
pub mod serial;
pub mod test_device;
pub mod virtio;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::api::{Classify, ErrorKind};
use crate::vmm::bus::{BusError, DeviceSet, IoBus};
use crate::vmm::state::DeviceStates;
use crate::vmm::VmConfig;
use persist::Registry;

/// The guest node whose CPUs every virtio device's worker thread follows:
/// devices have no node of their own (`--disk` and `--net` take none), and
/// guest node 0 holds the memory a guest boots from and, by default, most
/// of its buffers.
pub const DEVICE_GUEST_NODE: u32 = 0;

/// Where a Linux guest's console (COM1) goes.
pub use crate::api::run::ConsoleTarget as Console;

/// Building the device set failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The console file cannot be opened.
    #[error("cannot open the console file {}: {source}", path.display())]
    Console {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd for an interrupt line could not be made.
    #[error("cannot create the eventfd of IRQ {irq}: {source}")]
    EventFd {
        /// The line.
        irq: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A saved device state does not load.
    #[error("saved state of device {device}: {reason}")]
    State {
        /// The device, `type/id`.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// The device cannot go back to a saved state in place (a reset).
    #[error("device {device} cannot be reset in place yet")]
    NoLoad {
        /// The device, `type/id`.
        device: String,
    },
    /// The saved VM had a device this one does not.
    #[error("the saved VM has device {device}, which this VM lacks: give it the same devices")]
    Missing {
        /// The device, `type/id`.
        device: String,
    },
    /// Two devices claim one port.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A disk cannot be opened or used.
    #[error(transparent)]
    Block(#[from] virtio::block::BlockError),
    /// A network card's TAP cannot be used, or its saved state does not fit.
    #[error(transparent)]
    Net(#[from] virtio::net::NetError),
    /// The vsock device's host socket cannot be made, or its saved state
    /// does not fit.
    #[error(transparent)]
    Vsock(#[from] virtio::vsock::VsockError),
    /// A virtio device's saved state does not fit it, or it could not start.
    #[error(transparent)]
    Transport(#[from] virtio::mmio::RestoreError),
    /// A virtio device could not be put on the MMIO bus.
    #[error(transparent)]
    Plug(#[from] virtio::mmio::PlugError),
    /// A virtio device's worker failed or its state could not be taken.
    #[error("{device}: {source}")]
    Virtio {
        /// The device.
        device: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// More virtio devices than the machine has windows and interrupt lines for.
    #[error("{count} virtio devices: the machine has room for {max}")]
    TooMany {
        /// Devices asked for.
        count: usize,
        /// The most there is room for.
        max: usize,
    },
}

impl Classify for DeviceError {
    fn kind(&self) -> ErrorKind {
        match self {
            DeviceError::Console { source, .. } => ErrorKind::of_io(source),
            DeviceError::EventFd { .. }
            | DeviceError::Bus(_)
            | DeviceError::Plug(_)
            | DeviceError::Virtio { .. } => ErrorKind::Failed,
            DeviceError::State { .. } | DeviceError::Missing { .. } => ErrorKind::Unusable,
            DeviceError::Block(e) => e.kind(),
            DeviceError::Net(e) => e.kind(),
            DeviceError::Vsock(e) => e.kind(),
            DeviceError::Transport(virtio::mmio::RestoreError::Os { .. }) => ErrorKind::Failed,
            DeviceError::Transport(_) => ErrorKind::Unusable,
            DeviceError::TooMany { .. } => ErrorKind::BadRequest,
            DeviceError::NoLoad { .. } => ErrorKind::Conflict,
        }
    }
}

/// Counts what the guest wrote to its console (to tell a silent guest).
struct Counted {
    out: Box<dyn Write + Send>,
    bytes: Arc<AtomicU64>,
}

impl Write for Counted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        self.out.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The devices of one VM, and handles on the ones vmhop itself talks to.
pub struct Devices {
    /// The bus and interrupt lines, for `Vm::new`.
    pub set: DeviceSet,
    /// COM1, for console input (Linux guests).
    pub serial: Option<Arc<serial::SerialPort>>,
    /// Bytes the guest has written to its console so far.
    pub console_bytes: Arc<AtomicU64>,
    /// The disks, in `--disk` order.
    pub disks: Disks,
    /// The reset device's line (builtin guests: the test device carries it).
    pub reset: Option<Arc<test_device::ResetLine>>,
}

/// Handing a VM's disk images to another process failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Flushing or unlocking an image for the hand-over failed.
    #[error("handing disk image {} over (fdatasync, F_OFD_SETLK F_UNLCK): {source}", path.display())]
    Release {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Its lock could not be taken back.
    #[error("taking the disk's lock back: {0}")]
    Retake(#[source] virtio::block::ImageError),
}

/// Handles on a VM's disks, in `--disk` order, for what vmhop itself reads
/// from them (the host-side `verify`).
#[derive(Clone, Default)]
pub struct Disks(Vec<Arc<virtio::MmioTransport<virtio::block::Block>>>);

impl Disks {
    /// Hands the images over to another process (a migration's switch, on
    /// shared storage): each is flushed to stable storage and its lock
    /// released. Call with the VM paused and its devices quiesced. On an
    /// error the images released so far are locked again.
    pub fn release(&self) -> Result<(), StorageError> {
        for (i, d) in self.0.iter().enumerate() {
            let image = d.device().image();
            let done = image
                .flush()
                .and_then(|()| image.unlock())
                .map_err(|source| StorageError::Release {
                    path: image.path().to_path_buf(),
                    source,
                });
            if let Err(e) = done {
                for d in &self.0[..i] {
                    let _ = d.device().image().lock();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Takes the images' locks back after [`Disks::release`] (the
    /// destination refused): fails if another process took one meanwhile.
    pub fn retake(&self) -> Result<(), StorageError> {
        for d in &self.0 {
            d.device().image().lock().map_err(StorageError::Retake)?;
        }
        Ok(())
    }

    /// The first disk that is not one flat image (an overlay over the
    /// chain's base since a checkpoint, or a restored disk still filling):
    /// its id and what it is. A destination on shared storage would open
    /// only the configured path, so such a disk cannot migrate that way.
    pub fn first_layered(&self) -> Option<(String, String)> {
        self.0.iter().find_map(|d| {
            let b = d.device();
            match b.stack().shape() {
                virtio::block::Shape::Flat => None,
                shape => Some((b.config().id.clone(), format!("{shape:?}"))),
            }
        })
    }

    /// Whether the VM has disks.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads `buf.len()` bytes of disk `disk` at byte `offset` as the
    /// guest sees it. Read with the device quiesced (a paused VM) to see a stable
    /// disk.
    pub fn read(&self, disk: usize, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let d = self.0.get(disk).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the VM has no disk {disk} (it has {})", self.0.len()),
            )
        })?;
        // Through the disk's layers: after a checkpoint its image is only
        // the lower layer, a restored disk fills from its chain.
        let stack = d.device().stack();
        stack.read_at(offset, buf).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "reading {} bytes of {} at {offset}: {e}",
                    buf.len(),
                    stack.path().display()
                ),
            )
        })
    }
}

/// Builds the devices `config` needs; `saved` holds their states by type
/// and id from a checkpoint or a source (empty for a fresh boot).
/// `stacks` holds, by disk id, the layers of disks that are not their
/// configured image alone (a restore's new tops over its checkpoint).
pub fn build(
    config: &VmConfig,
    console: &Console,
    saved: &DeviceStates,
    mut stacks: std::collections::BTreeMap<String, virtio::block::Stack>,
) -> Result<Devices, DeviceError> {
    let mut bus = IoBus::new();
    let mut reg = Registry::new();
    let mut irq_lines = Vec::new();
    let console_bytes = Arc::new(AtomicU64::new(0));
    let mut serial_port = None;
    let mut reset = None;
    match config.guest.is_builtin() {
        true => {
            let (start, len) = test_device::PORTS;
            let line = Arc::new(test_device::ResetLine::new());
            let args = (config.vcpus, config.guest.rate(), line.clone());
            let device = reg.build::<test_device::TestDevice>("test", args, saved)?;
            bus.insert(start, len, device)?;
            reset = Some(line);
        }
        false => {
            let out: Box<dyn Write + Send> = match console {
                Console::Stdout => Box::new(std::io::stdout()),
                Console::Stderr => Box::new(std::io::stderr()),
                Console::File(path) => Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|source| DeviceError::Console {
                            path: path.clone(),
                            source,
                        })?,
                ),
            };
            let out = Box::new(Counted {
                out,
                bytes: console_bytes.clone(),
            });
            let irq = serial::COM1_IRQ;
            let evt = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| DeviceError::EventFd { irq, source })?;
            let for_kvm = evt
                .try_clone()
                .map_err(|source| DeviceError::EventFd { irq, source })?;
            let port = reg.build::<serial::SerialPort>("com1", (evt, out), saved)?;
            bus.insert(serial::COM1_PORT, serial::COM1_LEN, port.clone())?;
            irq_lines.push((for_kvm, irq));
            serial_port = Some(port);
            let kbd = reg.build::<i8042::Keyboard>("i8042", (), saved)?;
            bus.insert(i8042::DATA_PORT, 1, kbd.clone())?;
            bus.insert(i8042::COMMAND_PORT, 1, kbd)?;
            let cmos = reg.build::<cmos::Cmos>("rtc", (), saved)?;
            bus.insert(cmos::INDEX_PORT, 2, cmos)?;
            let pm = reg.build::<acpi_pm::AcpiPm>("pm", (), saved)?;
            for (start, len) in acpi_pm::AcpiPm::ports() {
                bus.insert(start, len, pm.clone())?;
            }
        }
    }
    let mut set = DeviceSet {
        bus,
        irq_lines,
        ..Default::default()
    };
    // Disks, then network cards, then vsock: one virtio-mmio window and
    // (with an irqchip) one interrupt line each, in the order given; the
    // DSDT describes the same.
    let machine = crate::arch::x86_64::layout::virtio_slots(config.virtio_devices()).ok_or(
        DeviceError::TooMany {
            count: config.virtio_devices(),
            max: crate::arch::x86_64::layout::MAX_VIRTIO_DEVICES,
        },
    )?;
    let mut disks = Disks::default();
    let (disk_slots, machine) = machine.split_at(config.disks.len());
    let (net_slots, vsock_slot) = machine.split_at(config.nets.len());
    for (disk, slot) in config.disks.iter().zip(disk_slots) {
        let gsi = (!config.guest.is_builtin()).then_some(slot.gsi);
        let irqfd = virtio::mmio::irq_line(&mut set, &disk.id, gsi)?;
        let t = reg.build::<virtio::MmioTransport<virtio::block::Block>>(
            &disk.id,
            (
                disk.clone(),
                set.memory.clone(),
                irqfd,
                stacks.remove(&disk.id),
            ),
            saved,
        )?;
        t.pin_workers(set.threads.clone(), DEVICE_GUEST_NODE);
        disks.0.push(t.clone());
        reg.add_store(t.clone());
        virtio::mmio::plug(&mut set, slot.base, t)?;
    }
    for (net, slot) in config.nets.iter().zip(net_slots) {
        let gsi = (!config.guest.is_builtin()).then_some(slot.gsi);
        let irqfd = virtio::mmio::irq_line(&mut set, &net.id, gsi)?;
        let t = reg.build::<virtio::MmioTransport<virtio::net::Net>>(
            &net.id,
            (net.clone(), set.memory.clone(), irqfd),
            saved,
        )?;
        t.pin_workers(set.threads.clone(), DEVICE_GUEST_NODE);
        virtio::mmio::plug(&mut set, slot.base, t)?;
    }
    if let (Some(vsock), Some(slot)) = (&config.vsock, vsock_slot.first()) {
        let id = virtio::vsock::DEVICE_ID;
        let gsi = (!config.guest.is_builtin()).then_some(slot.gsi);
        let irqfd = virtio::mmio::irq_line(&mut set, id, gsi)?;
        let t = reg.build::<virtio::MmioTransport<virtio::vsock::Vsock>>(
            id,
            (vsock.clone(), set.memory.clone(), irqfd),
            saved,
        )?;
        t.pin_workers(set.threads.clone(), DEVICE_GUEST_NODE);
        virtio::mmio::plug(&mut set, slot.base, t)?;
    }
    reg.check_all_restored(saved)?;
    set.control = Some(Box::new(reg));
    Ok(Devices {
        set,
        serial: serial_port,
        console_bytes,
        disks,
        reset,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::vmm::config::GuestSpec;
    use crate::vmm::state::DeviceStates;
    use crate::vmm::NodeConfig;

    fn config(guest: GuestSpec) -> VmConfig {
        VmConfig {
            name: "devices".into(),
            vcpus: 2,
            nodes: vec![NodeConfig {
                guest_node: 0,
                size: 64 << 20,
                host_node: None,
                vcpus: None,
            }],
            guest,
            hugepages: false,
            chunk_size: crate::memory::layout::DEFAULT_CHUNK_SIZE,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        }
    }

    fn saved(d: &Devices) -> DeviceStates {
        d.set
            .control
            .as_ref()
            .expect("every device set saves its states")
            .save()
            .expect("saving devices")
    }

    #[test]
    fn every_device_s_state_round_trips_and_a_missing_device_is_refused() {
        let linux = config(GuestSpec::Linux(crate::arch::x86_64::linux::LinuxSpec {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
        }));
        let builtin = config(GuestSpec::Dirty {
            wss: None,
            rate: Some(1000),
            fill_random: false,
        });
        let mut types = BTreeMap::new();
        for c in [&linux, &builtin] {
            let d = build(
                c,
                &Console::Stderr,
                &DeviceStates::new(),
                Default::default(),
            )
            .unwrap();
            // Put state in the devices that keep some: the UART's line
            // control and scratch registers, the RTC's index.
            d.set.bus.write(0, serial::COM1_PORT + 3, &[0x03]);
            d.set.bus.write(0, serial::COM1_PORT + 7, &[0x5a]);
            d.set.bus.write(0, cmos::INDEX_PORT, &[0x0b]);
            let first = saved(&d);
            // Through JSON, as a checkpoint stores it.
            let json: DeviceStates =
                serde_json::from_str(&serde_json::to_string(&first).unwrap()).unwrap();
            let again = build(c, &Console::Stderr, &json, Default::default()).unwrap();
            assert_eq!(saved(&again), first, "{c:?}");
            for (t, ids) in &first {
                types.insert(t.clone(), ids.len());
            }
        }
        // Every device type vmhop builds was saved at least once.
        for t in ["serial", "i8042", "cmos", "acpi-pm", "test-device"] {
            assert!(types.contains_key(t), "{t} was not saved: {types:?}");
        }
        let d = build(
            &linux,
            &Console::Stderr,
            &DeviceStates::new(),
            Default::default(),
        )
        .unwrap();
        let mut b = [0u8];
        d.set.bus.read(0, serial::COM1_PORT + 7, &mut b);
        assert_eq!(b[0], 0, "a fresh UART's scratch register");
        // A state for a device this VM does not have is refused.
        let e = build(&builtin, &Console::Stderr, &saved(&d), Default::default())
            .err()
            .expect("refused");
        assert!(
            matches!(&e, DeviceError::Missing { device } if device == "acpi-pm/pm"),
            "{e}"
        );
    }
}
