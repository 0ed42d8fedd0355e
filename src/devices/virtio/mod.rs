//! virtio 1.x devices (modern only) on the virtio-mmio transport, over
//! rust-vmm's `virtio-queue` and guest memory seen through vm-memory.
//!
//! This module owns what every virtio device shares: the [`VirtioDevice`]
//! trait a device implements, the [`Signals`] it raises (interrupt status,
//! the irqfd pulse, DEVICE_NEEDS_RESET), the queues' saved form, and the
//! worker thread that serves the queues (`worker`): every request runs
//! there, never on a vCPU thread. The transport's registers live in
//! [`mmio`]; each device in a module of its own ([`block`]).
//!
//! Notifications: each queue has an eventfd. KVM signals it directly when
//! the guest writes the queue's index to QueueNotify (an ioeventfd with that
//! datamatch; checked on this host's PVM KVM from CPL3), and the transport
//! signals it itself when the write exits to vmhop instead (a VM built
//! without the ioeventfds). Either way only the worker serves the queue.
//!
//! Interrupts: with an in-kernel irqchip each device has an irqfd, and a
//! raise pulses it (edge-triggered: the DSDT must describe the line as edge).
//! Without one (the builtin guests, which poll the used ring) a raise only
//! sets the InterruptStatus bits, which the guest can still read.
//!
//! Quiescing (for checkpoints, NUMA moves and migration, with the vCPUs
//! still running): the worker stops taking requests from the avail rings,
//! finishes the one it serves, and parks; the device's state is then taken
//! as it is (`next_avail`/`next_used` never re-derived from guest memory).
//! Resuming, or restoring, kicks every queue and raises an interrupt, so a
//! request the guest queued meanwhile, a notification the device left
//! disabled, or a stale `avail_event` never leaves the guest waiting.

pub mod block;
pub mod mmio;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::DeviceGuestMemory;

pub use mmio::{MmioTransport, MMIO_WINDOW};

/// InterruptStatus bit: the device used buffers in a queue.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration changed (or the device
/// needs a reset).
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready: the queues are live.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device met an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The guest gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bits every device here offers or understands.
pub mod features {
    /// virtio 1.x (modern) device: required, legacy is not offered.
    pub const VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 =
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// `used_event`/`avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
}

/// What a device tells its driver on its own: the InterruptStatus bits
/// (each raise pulses the irqfd, when there is one) and DEVICE_NEEDS_RESET.
/// Shared by the transport (vCPU threads read and acknowledge it) and the
/// worker (which raises).
#[derive(Debug)]
pub struct Signals {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irqfd: Option<EventFd>,
}

impl Signals {
    /// Signals that pulse `irqfd` on every raise (None: no interrupt
    /// controller; the status bits alone say what happened).
    pub fn new(irqfd: Option<EventFd>) -> Self {
        Signals {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irqfd,
        }
    }

    /// Sets `bits` in InterruptStatus and pulses the interrupt line.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Some(fd) = &self.irqfd {
            // EAGAIN only if the counter were full, i.e. KVM stopped
            // reading it: the status bits still say what happened.
            let _ = fd.write(1);
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver's InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Marks the device as needing a reset (once) and tells the driver
    /// through a configuration-change interrupt, as the spec asks.
    pub fn set_needs_reset(&self, device: &str, why: &str) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            tracing::warn!("{device}: the device needs a reset: {why}");
            self.raise(INT_CONFIG);
        }
    }

    /// Whether DEVICE_NEEDS_RESET is set.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Back to a fresh device's signals (a driver reset), or to saved ones.
    fn set(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }
}

/// A request the device cannot complete the way the spec wants (it has no
/// status byte to report an error through, or the queue itself is broken):
/// the device then sets DEVICE_NEEDS_RESET and serves that queue no more.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QueueBroken(pub String);

/// What serves the requests of a device's queues, on its worker thread.
pub trait QueueHandler: Send + 'static {
    /// Serves `chain`, taken from queue `queue`; returns how many bytes it
    /// wrote into the chain's device-writable buffers (the used length).
    /// A request that fails but can report it (an I/O error, a bad sector)
    /// is served: its status byte says so.
    fn serve(
        &mut self,
        mem: &DeviceGuestMemory,
        queue: u16,
        chain: DescriptorChain<&DeviceGuestMemory>,
    ) -> Result<u32, QueueBroken>;
}

/// One virtio device model, below the transport: its identity, features,
/// configuration space and request handler. The transport owns the
/// registers, the queues and the worker.
pub trait VirtioDevice: Send + Sync + 'static {
    /// The device's own saved state (what the transport does not hold).
    type State: Serialize + for<'de> Deserialize<'de> + Clone + std::fmt::Debug + PartialEq;

    /// Name for messages and threads (`virtio-blk disk0`).
    fn name(&self) -> String;
    /// virtio device id (2: block).
    fn device_type(&self) -> u32;
    /// Feature bits offered (VERSION_1 among them).
    fn features(&self) -> u64;
    /// Largest size of each queue; their number is the device's queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads `data.len()` bytes of the configuration space at `offset`
    /// (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes configuration space (most of it is read-only).
    fn write_config(&self, offset: u64, data: &[u8]);
    /// The handler that serves the queues for a driver that accepted
    /// `acked` features, run on the worker thread.
    fn handler(&self, acked: u64) -> Box<dyn QueueHandler>;
    /// The driver reset the device: forget what it set.
    fn reset(&self);
    /// The device's state (the transport quiesced it first).
    fn save(&self) -> Self::State;
}

/// One queue's saved registers and positions (virtio-queue's `QueueState`,
/// which has no serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// Largest size the device offered.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next avail-ring entry the device takes, as it was.
    pub next_avail: u16,
    /// Next used-ring entry the device fills, as it was.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        SavedQueue {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

#[cfg(test)]
pub(crate) mod testing;
