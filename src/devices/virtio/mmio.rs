//! The virtio-mmio transport (virtio 1.x, 4.2: register layout version 2,
//! modern devices only): the registers a driver reads and writes in the
//! device's window, the device status state machine and feature
//! negotiation, queue set-up, and the hand-over of the queues to the
//! device's worker thread at DRIVER_OK.
//!
//! Registers are served on vCPU threads and do no I/O: a QueueNotify that
//! reaches vmhop (no ioeventfd caught it) only signals the queue's eventfd.
//! The transport owns its saved state ([`TransportState`]); the device below
//! it owns the rest (`VirtioDevice::State`).

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Worker, WorkerArgs, WorkerGone};
use super::{features, status, SavedQueue, Signals, VirtioDevice, INT_CONFIG};
use crate::devices::DeviceError;
use crate::host::affinity::PinnedThreads;
use crate::memory::DeviceMemory;
use crate::vmm::bus::{BusError, DeviceSet, IoAction, IoEvent, MmioDevice};

/// Size of a device's window: one page, so windows stay page-aligned.
pub const MMIO_WINDOW: u64 = crate::arch::x86_64::layout::VIRTIO_MMIO_WINDOW;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2: virtio 1.x, no legacy.
const VERSION: u32 = 2;
/// "VMHP": the subsystem vendor id vmhop's devices report.
const VENDOR_ID: u32 = u32::from_le_bytes(*b"VMHP");
/// First byte of the device-specific configuration space.
const CONFIG_START: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// Version of [`TransportState`]; a state of another version is refused.
pub const TRANSPORT_STATE_VERSION: u32 = 1;

/// A virtio-mmio device's state in a checkpoint or migration stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportState<S> {
    /// [`TRANSPORT_STATE_VERSION`] when written.
    pub version: u32,
    /// virtio device id.
    pub device_type: u32,
    /// Features the device offered (guest-visible: must match on restore).
    pub offered: u64,
    /// Device status register, DEVICE_NEEDS_RESET apart.
    pub status: u32,
    /// DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus: bits the driver has not acknowledged yet.
    pub interrupt_status: u32,
    /// Every queue, positions as the worker left them.
    pub queues: Vec<SavedQueue>,
    /// The device's own state.
    pub device: S,
}

/// Taking a device's state failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The device still serves requests: quiesce it first.
    #[error("{0}: the device was not quiesced before its state was taken")]
    NotQuiesced(String),
    /// Its worker is gone.
    #[error(transparent)]
    Worker(#[from] WorkerGone),
}

/// A saved state that does not fit the device being built.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Another state version.
    #[error("{device}: saved transport state version {found}, this vmhop reads version {TRANSPORT_STATE_VERSION}")]
    Version {
        /// The device.
        device: String,
        /// The version found.
        found: u32,
    },
    /// Something the guest sees differs.
    #[error("{device}: the saved {what} is {saved}, the device here has {here}: the guest would see its device change")]
    Mismatch {
        /// The device.
        device: String,
        /// What differs.
        what: &'static str,
        /// Saved value.
        saved: String,
        /// This device's value.
        here: String,
    },
    /// The saved state is not one a device could be in.
    #[error("{device}: saved state is invalid: {why}")]
    Invalid {
        /// The device.
        device: String,
        /// What is wrong.
        why: String,
    },
    /// Creating an eventfd or the worker thread failed.
    #[error("{device}: {what}: {source}")]
    Os {
        /// The device.
        device: String,
        /// What was being made.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The registers and queues behind the lock the vCPU threads share.
#[derive(Debug)]
struct Regs {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked: u64,
    queue_sel: u32,
    config_generation: u32,
    /// Register copies of the queues; the worker has the live ones while
    /// the device is active.
    queues: Vec<Queue>,
    worker: Option<Worker>,
    /// The VMM quiesced the device (survives a driver reset).
    quiesced: bool,
    /// The live queues as the worker gave them when it parked.
    parked: Option<Vec<QueueState>>,
    /// The set whose guest node's CPUs its workers follow, and the node.
    pins: Option<(PinnedThreads, u32)>,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport<D: VirtioDevice> {
    device: Arc<D>,
    name: String,
    signals: Arc<Signals>,
    notify: Vec<EventFd>,
    memory: DeviceMemory,
    regs: Mutex<Regs>,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.name)
            .finish()
    }
}

fn new_queues(max_sizes: &[u16], device: &str) -> Result<Vec<Queue>, RestoreError> {
    max_sizes
        .iter()
        .map(|&m| {
            Queue::new(m).map_err(|e| RestoreError::Invalid {
                device: device.into(),
                why: format!("queue size {m}: {e}"),
            })
        })
        .collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A fresh device (reset state). `irqfd` is its interrupt line's
    /// eventfd when the VM has an irqchip.
    pub fn new(
        device: D,
        memory: DeviceMemory,
        irqfd: Option<EventFd>,
    ) -> Result<Self, RestoreError> {
        let name = device.name();
        let queues = new_queues(&device.queue_max_sizes(), &name)?;
        let notify = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| RestoreError::Os {
                device: name.clone(),
                what: "notify eventfd",
                source,
            })?;
        Ok(MmioTransport {
            device: Arc::new(device),
            name,
            signals: Arc::new(Signals::new(irqfd)),
            notify,
            memory,
            regs: Mutex::new(Regs {
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                acked: 0,
                queue_sel: 0,
                config_generation: 0,
                queues,
                worker: None,
                quiesced: false,
                parked: None,
                pins: None,
            }),
        })
    }

    /// A device as `state` saved it. A device the driver had activated
    /// comes back with its worker parked: call [`MmioTransport::resume`]
    /// once the VM's memory is attached, which kicks every queue and raises
    /// an interrupt. The device's guest-visible identity (type, features,
    /// queue sizes) must match the saved one.
    pub fn restore(
        device: D,
        memory: DeviceMemory,
        irqfd: Option<EventFd>,
        state: &TransportState<D::State>,
    ) -> Result<Self, RestoreError> {
        let t = Self::new(device, memory, irqfd)?;
        let name = t.name.clone();
        let mismatch = |what, saved: String, here: String| RestoreError::Mismatch {
            device: name.clone(),
            what,
            saved,
            here,
        };
        let invalid = |why: String| RestoreError::Invalid {
            device: name.clone(),
            why,
        };
        if state.version != TRANSPORT_STATE_VERSION {
            return Err(RestoreError::Version {
                device: name.clone(),
                found: state.version,
            });
        }
        if state.device_type != t.device.device_type() {
            return Err(mismatch(
                "device type",
                state.device_type.to_string(),
                t.device.device_type().to_string(),
            ));
        }
        let offered = t.device.features();
        if state.offered != offered {
            return Err(mismatch(
                "feature set",
                format!("{:#x}", state.offered),
                format!("{offered:#x}"),
            ));
        }
        if state.acked & !offered != 0 {
            return Err(invalid(format!(
                "the driver accepted features {:#x} the device never offered",
                state.acked & !offered
            )));
        }
        let max: Vec<u16> = t.device.queue_max_sizes();
        let saved_max: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
        if saved_max != max {
            return Err(mismatch(
                "queue sizes",
                format!("{saved_max:?}"),
                format!("{max:?}"),
            ));
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Queue::try_from(QueueState::from(*q))
                    .map_err(|e| invalid(format!("queue {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        t.signals.set(state.interrupt_status, state.needs_reset);
        {
            let mut r = t.lock();
            r.status = state.status & !status::NEEDS_RESET;
            r.device_features_sel = state.device_features_sel;
            r.driver_features_sel = state.driver_features_sel;
            r.acked = state.acked;
            r.queue_sel = state.queue_sel;
            r.config_generation = state.config_generation;
            r.queues = queues;
            r.quiesced = true;
            if r.status & status::DRIVER_OK != 0 && !state.needs_reset {
                t.start_worker(&mut r).map_err(|source| RestoreError::Os {
                    device: name.clone(),
                    what: "worker thread",
                    source,
                })?;
            }
            r.quiesced = false;
        }
        Ok(t)
    }

    /// Makes the device's worker thread (the one running now and every one
    /// started later) follow the CPUs `threads` gives `guest_node`.
    pub fn pin_workers(&self, threads: PinnedThreads, guest_node: u32) {
        let mut r = self.lock();
        if let Some(w) = r.worker.as_mut() {
            w.follow(&threads, guest_node);
        }
        r.pins = Some((threads, guest_node));
    }

    /// The device below the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device's signals (interrupt status, NEEDS_RESET).
    pub fn signals(&self) -> &Signals {
        &self.signals
    }

    /// The ioeventfds KVM should signal for this device at window `base`:
    /// one per queue, a 4-byte write of the queue's index to QueueNotify.
    pub fn ioevents(&self, base: u64) -> std::io::Result<Vec<IoEvent>> {
        self.notify
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                Ok(IoEvent {
                    fd: fd.try_clone()?,
                    addr: base + reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64,
                    datamatch: Some(i as u32),
                })
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops taking requests (the vCPUs may still run): the request being
    /// served completes, the rest waits in the avail rings. Until
    /// [`MmioTransport::resume`], the device writes nothing into guest
    /// memory, and its state can be taken.
    pub fn quiesce(&self) -> Result<(), WorkerGone> {
        let mut r = self.lock();
        r.quiesced = true;
        if let Some(w) = &r.worker {
            let q = w.quiesce()?;
            r.parked = Some(q);
        }
        Ok(())
    }

    /// Serves again after [`MmioTransport::quiesce`] or a restore: every
    /// queue is kicked and an interrupt raised.
    pub fn resume(&self) -> Result<(), WorkerGone> {
        let mut r = self.lock();
        r.quiesced = false;
        r.parked = None;
        match &r.worker {
            Some(w) => w.resume(),
            None => Ok(()),
        }
    }

    /// [`MmioTransport::quiesce`] as every device's `Persist::quiesce`
    /// reports it: a [`DeviceError`] naming the device (and so do
    /// [`MmioTransport::resume_device`] and [`MmioTransport::save_device`]).
    pub fn quiesce_device(&self) -> Result<(), DeviceError> {
        self.quiesce().map_err(|e| self.worker_error(e))
    }

    /// [`MmioTransport::resume`] as every device's `Persist::resume`
    /// reports it.
    pub fn resume_device(&self) -> Result<(), DeviceError> {
        self.resume().map_err(|e| self.worker_error(e))
    }

    /// [`MmioTransport::save`] as every device's `Persist::save` reports it.
    pub fn save_device(&self) -> Result<TransportState<D::State>, DeviceError> {
        self.save().map_err(|e| self.worker_error(e))
    }

    fn worker_error(&self, e: impl std::error::Error + Send + Sync + 'static) -> DeviceError {
        DeviceError::Virtio {
            device: self.name.clone(),
            source: Box::new(e),
        }
    }

    /// The device's name, for messages.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The device's state; it must be quiesced (or never activated).
    pub fn save(&self) -> Result<TransportState<D::State>, SaveError> {
        let r = self.lock();
        let queues: Vec<SavedQueue> = match (&r.worker, &r.parked) {
            (None, _) => r.queues.iter().map(|q| q.state().into()).collect(),
            (Some(_), Some(parked)) => parked.iter().map(|&q| q.into()).collect(),
            (Some(_), None) => return Err(SaveError::NotQuiesced(self.name.clone())),
        };
        Ok(TransportState {
            version: TRANSPORT_STATE_VERSION,
            device_type: self.device.device_type(),
            offered: self.device.features(),
            status: r.status,
            needs_reset: self.signals.needs_reset(),
            device_features_sel: r.device_features_sel,
            driver_features_sel: r.driver_features_sel,
            acked: r.acked,
            queue_sel: r.queue_sel,
            config_generation: r.config_generation,
            interrupt_status: self.signals.status(),
            queues,
            device: self.device.save(),
        })
    }

    /// Hands the queues to a new worker (DRIVER_OK, or a restore of an
    /// active device); parked if the device is quiesced.
    fn start_worker(&self, r: &mut Regs) -> std::io::Result<()> {
        let event_idx = r.acked & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(r.queues.len());
        for q in r.queues.iter_mut() {
            q.set_event_idx(event_idx);
            let live = Queue::try_from(q.state()).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?;
            queues.push(live);
        }
        let notify = self
            .notify
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<Result<Vec<_>, _>>()?;
        if r.quiesced {
            r.parked = Some(queues.iter().map(|q| q.state()).collect());
        }
        let mut worker = Worker::spawn(WorkerArgs {
            device: self.name.clone(),
            queues,
            notify,
            handler: self.device.handler(r.acked),
            signals: self.signals.clone(),
            memory: self.memory.clone(),
            paused: r.quiesced,
        })?;
        if let Some((threads, node)) = &r.pins {
            worker.follow(threads, *node);
        }
        r.worker = Some(worker);
        Ok(())
    }

    /// Whether the driver's ready queues lie in guest memory (when the
    /// memory is there to check).
    fn queues_valid(&self, r: &Regs) -> Result<(), String> {
        let Some(mem) = self.memory.access() else {
            return Ok(());
        };
        for (i, q) in r.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&*mem) {
                return Err(format!(
                    "queue {i} (size {}, descriptors at {:#x}, avail ring at {:#x}, used ring at {:#x}) does not lie in guest memory",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                ));
            }
        }
        Ok(())
    }

    /// The driver wrote 0 to Status: back to a fresh device.
    fn reset(&self, r: &mut Regs) {
        if let Some(w) = r.worker.take() {
            if let Err(e) = w.stop() {
                tracing::warn!("{}: reset: {e}", self.name);
            }
        }
        for q in r.queues.iter_mut() {
            q.reset();
        }
        // Notifications meant for the old queues must not wake the next
        // worker into serving a half-set-up queue.
        for fd in &self.notify {
            let _ = fd.read();
        }
        r.status = 0;
        r.device_features_sel = 0;
        r.driver_features_sel = 0;
        r.acked = 0;
        r.queue_sel = 0;
        r.parked = None;
        self.signals.set(0, false);
        self.device.reset();
    }

    fn set_status(&self, r: &mut Regs, v: u32) {
        if v == 0 {
            self.reset(r);
            return;
        }
        let old = r.status;
        if v & old != old {
            tracing::debug!(
                "{}: status {v:#x} clears bits of {old:#x} without a reset: ignored",
                self.name
            );
            return;
        }
        let mut new = v;
        if new & !old & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if r.acked & !offered != 0 || r.acked & features::VERSION_1 == 0 {
                // The driver reads Status back and finds FEATURES_OK unset.
                tracing::debug!(
                    "{}: driver features {:#x} refused (offered {offered:#x}, VERSION_1 required)",
                    self.name,
                    r.acked
                );
                new &= !(status::FEATURES_OK | status::DRIVER_OK);
            }
        }
        if new & !old & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
            } else if let Err(why) = self.queues_valid(r) {
                self.signals.set_needs_reset(&self.name, &why);
            } else if let Err(e) = self.start_worker(r) {
                self.signals
                    .set_needs_reset(&self.name, &format!("cannot start its worker: {e}"));
            }
        }
        r.status = new;
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let r = self.lock();
        let queue = r.queues.get(r.queue_sel as usize);
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match r.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size() as u32),
            reg::VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| q.ready() as u32),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.signals.status(),
            reg::VIRTIO_MMIO_STATUS => {
                r.status
                    | if self.signals.needs_reset() {
                        status::NEEDS_RESET
                    } else {
                        0
                    }
            }
            reg::VIRTIO_MMIO_CONFIG_GENERATION => r.config_generation,
            // No shared memory regions: their length reads as -1.
            reg::VIRTIO_MMIO_SHM_LEN_LOW | reg::VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_reg(&self, offset: u32, v: u32) {
        let mut r = self.lock();
        let r = &mut *r;
        // The queue registers can change only before DRIVER_OK: after it
        // the worker has the live queues.
        let configurable = r.status & status::DRIVER_OK == 0;
        let sel = r.queue_sel as usize;
        let queue = r.queues.get_mut(sel).filter(|_| configurable);
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => r.device_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => r.driver_features_sel = v,
            // Fixed once FEATURES_OK is set.
            reg::VIRTIO_MMIO_DRIVER_FEATURES if r.status & status::FEATURES_OK == 0 => {
                match r.driver_features_sel {
                    0 => r.acked = (r.acked & !0xffff_ffff) | v as u64,
                    1 => r.acked = (r.acked & 0xffff_ffff) | (v as u64) << 32,
                    _ => {}
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => r.queue_sel = v,
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                if let (Some(q), Ok(n)) = (queue, u16::try_from(v)) {
                    q.set_size(n);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = queue {
                    q.set_ready(v == 1);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if let Some(q) = queue {
                    // Each address is a LOW register and the HIGH one 4
                    // bytes above it.
                    let (lo, hi) = match offset & 4 {
                        0 => (Some(v), None),
                        _ => (None, Some(v)),
                    };
                    match offset & !4 {
                        reg::VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Reached only when no ioeventfd caught the write.
                if let Some(fd) = self.notify.get(v as usize) {
                    let _ = fd.write(1);
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.signals.ack(v),
            reg::VIRTIO_MMIO_STATUS => self.set_status(r, v),
            _ => {}
        }
    }
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) -> IoAction {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
        } else {
            // The spec allows only aligned 32-bit register accesses.
            data.fill(0);
        }
        IoAction::Continue
    }

    fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) -> IoAction {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
        } else if let (Ok(b), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_reg(offset as u32, u32::from_le_bytes(b));
        }
        IoAction::Continue
    }
}

/// Putting a device on the VM's MMIO bus failed.
#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    /// Its window overlaps another.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An eventfd could not be made.
    #[error("{device}: cannot create its {what} eventfd: {source}")]
    EventFd {
        /// The device.
        device: String,
        /// Which one.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The interrupt line of a device on GSI `gsi` (None: the VM has no
/// irqchip, the device raises nothing): an eventfd registered in `set` as
/// the irqfd of that GSI, and the copy the device pulses.
pub fn irq_line(
    set: &mut DeviceSet,
    device: &str,
    gsi: Option<u32>,
) -> Result<Option<EventFd>, PlugError> {
    let Some(gsi) = gsi else { return Ok(None) };
    let err = |source| PlugError::EventFd {
        device: device.into(),
        what: "interrupt",
        source,
    };
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(err)?;
    set.irq_lines.push((fd.try_clone().map_err(err)?, gsi));
    Ok(Some(fd))
}

/// Puts `transport` on `set`'s MMIO bus at `base` (one [`MMIO_WINDOW`]),
/// with its QueueNotify ioeventfds.
pub fn plug<D: VirtioDevice>(
    set: &mut DeviceSet,
    base: u64,
    transport: Arc<MmioTransport<D>>,
) -> Result<(), PlugError> {
    let events = transport
        .ioevents(base)
        .map_err(|source| PlugError::EventFd {
            device: transport.name.clone(),
            what: "notify",
            source,
        })?;
    set.mmio.insert(base, MMIO_WINDOW, transport)?;
    set.ioevents.extend(events);
    Ok(())
}

/// Registers by offset, for tests and guests that drive a device by hand.
pub mod regs {
    pub use virtio_bindings::virtio_mmio::*;
}

/// Marks the configuration as changed: the generation moves and the driver
/// gets a configuration interrupt.
impl<D: VirtioDevice> MmioTransport<D> {
    /// The device's configuration changed under the driver (a resize, a
    /// writeback mode it did not ask for).
    pub fn config_changed(&self) {
        let mut r = self.lock();
        r.config_generation = r.config_generation.wrapping_add(1);
        self.signals.raise(INT_CONFIG);
    }
}
