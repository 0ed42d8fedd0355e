//! virtio 1.x devices (modern only) on the virtio-mmio transport, over
//! rust-vmm's `virtio-queue` and guest memory seen through vm-memory.
//!
//! This module owns what every virtio device shares: the [`VirtioDevice`]
//! trait a device implements, the [`Signals`] it raises (interrupt status,
//! the irqfd pulse, DEVICE_NEEDS_RESET), the queues' saved form, and the
//! worker thread that serves the queues (`worker`): every request runs
//! there, never on a vCPU thread. The transport's registers live in
//! [`mmio`]; each device in a module of its own ([`block`], [`net`], [`vsock`]).
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
pub mod net;
pub mod vsock;
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

/// What serves a device's queues, on its worker thread.
///
/// A request/response device (block, a control queue) implements `serve`
/// only: the worker takes every request a notified queue offers and hands
/// each to it. A device whose work also comes from outside the guest
/// (network RX waiting for frames, vsock waiting on host sockets) drives
/// its queues itself: it overrides `notified`, and gives the worker an fd
/// to wait on (`event_fd`; readable: `event` is called). Either way it
/// sees the live queues only through [`Rings`], on the worker thread.
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
    ) -> Result<u32, QueueBroken> {
        let _ = (mem, chain);
        Err(QueueBroken(format!("queue {queue} takes no requests")))
    }

    /// Queue `queue` was notified by the driver (or kicked after a resume
    /// or a restore). By default: every request it offers through `serve`,
    /// notification suppression handled as the spec wants.
    fn notified(&mut self, rings: &mut Rings<'_>, queue: u16) -> Result<(), QueueBroken> {
        serve_requests(self, rings, queue)
    }

    /// An fd the worker waits on besides the queues' notifications (an
    /// epoll fd of the handler's own); None: there is none.
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// `event_fd` is readable (also called after every resume's kick).
    fn event(&mut self, rings: &mut Rings<'_>) -> Result<(), QueueBroken> {
        let _ = rings;
        Ok(())
    }
}

/// Takes every request queue `queue` offers and hands each to `h.serve`:
/// notifications are disabled while it drains the queue and enabled again
/// (with EVENT_IDX, `avail_event` written after the last request taken)
/// before it looks once more. A quiesce stops it between two requests.
pub fn serve_requests<H: QueueHandler + ?Sized>(
    h: &mut H,
    rings: &mut Rings<'_>,
    queue: u16,
) -> Result<(), QueueBroken> {
    if !rings.ready(queue) {
        return Ok(());
    }
    loop {
        rings.disable_notification(queue)?;
        while let Some(chain) = rings.pop(queue)? {
            let head = chain.head_index();
            let len = h
                .serve(rings.mem(), queue, chain)
                .map_err(|e| QueueBroken(format!("queue {queue}, request {head}: {e}")))?;
            rings.add_used(queue, head, len)?;
        }
        if rings.holding() || !rings.enable_notification(queue)? {
            return Ok(());
        }
    }
}

/// The live queues of a device as its handler sees them on the worker
/// thread: taking chains, returning them used, and notification
/// suppression. The worker raises the interrupt afterwards for every queue
/// that used buffers and whose driver asked for it (`used_event` with
/// EVENT_IDX).
pub struct Rings<'a> {
    mem: &'a DeviceGuestMemory,
    queues: &'a mut [virtio_queue::Queue],
    hold: &'a AtomicBool,
    used: &'a mut [bool],
}

impl<'a> Rings<'a> {
    fn queue(&mut self, q: u16) -> Result<&mut virtio_queue::Queue, QueueBroken> {
        self.queues
            .get_mut(q as usize)
            .ok_or_else(|| QueueBroken(format!("the device has no queue {q}")))
    }

    /// Guest memory, as devices see it (writes are marked dirty).
    pub fn mem(&self) -> &'a DeviceGuestMemory {
        self.mem
    }

    /// The VMM is quiescing the device: take nothing more.
    pub fn holding(&self) -> bool {
        self.hold.load(Ordering::SeqCst)
    }

    /// Whether the driver set queue `q` up (a queue it never readied is
    /// never served).
    pub fn ready(&self, q: u16) -> bool {
        use virtio_queue::QueueT;
        self.queues.get(q as usize).is_some_and(|x| x.ready())
    }

    /// The next chain the driver offers on queue `q`; None when there is
    /// none, the queue is not ready, or the device is quiescing.
    pub fn pop(
        &mut self,
        q: u16,
    ) -> Result<Option<DescriptorChain<&'a DeviceGuestMemory>>, QueueBroken> {
        use virtio_queue::QueueOwnedT;
        if self.holding() || !self.ready(q) {
            return Ok(None);
        }
        let mem = self.mem;
        let queue = self.queue(q)?;
        let mut iter = queue
            .iter(mem)
            .map_err(|e| QueueBroken(format!("queue {q}: {e}")))?;
        Ok(iter.next())
    }

    /// Gives back the last chain taken from queue `q` (the next `pop`
    /// returns it again): a device that cannot use it yet.
    pub fn unpop(&mut self, q: u16) -> Result<(), QueueBroken> {
        use virtio_queue::QueueOwnedT;
        self.queue(q)?.go_to_previous_position();
        Ok(())
    }

    /// Puts chain `head` on queue `q`'s used ring with `len` bytes written.
    pub fn add_used(&mut self, q: u16, head: u16, len: u32) -> Result<(), QueueBroken> {
        use virtio_queue::QueueT;
        let mem = self.mem;
        self.queue(q)?
            .add_used(mem, head, len)
            .map_err(|e| QueueBroken(format!("queue {q}, request {head}: {e}")))?;
        self.used[q as usize] = true;
        Ok(())
    }

    /// Asks the driver not to notify queue `q` (the device is draining it).
    pub fn disable_notification(&mut self, q: u16) -> Result<(), QueueBroken> {
        use virtio_queue::QueueT;
        let mem = self.mem;
        self.queue(q)?
            .disable_notification(mem)
            .map_err(|e| QueueBroken(format!("queue {q}: {e}")))
    }

    /// The size the driver gave queue `q` (0 for no such queue).
    pub fn size(&self, q: u16) -> u16 {
        use virtio_queue::QueueT;
        self.queues.get(q as usize).map_or(0, |x| x.size())
    }

    /// Asks the driver to notify queue `q` once it adds buffers beyond
    /// those it has offered so far (not merely beyond those the device
    /// took: the device gave some back because they are not enough, e.g.
    /// for a large frame in mergeable buffers); true if it added some
    /// meanwhile. With EVENT_IDX this writes `avail_event` = the driver's
    /// avail index (virtio-queue writes the device's position).
    pub fn notify_beyond_avail(&mut self, q: u16) -> Result<bool, QueueBroken> {
        use virtio_queue::QueueT;
        use vm_memory::{Bytes, GuestAddress};
        let mem = self.mem;
        let queue = self.queue(q)?;
        let err = |e: &dyn std::fmt::Display| QueueBroken(format!("queue {q}: {e}"));
        let now = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| err(&e))?;
        if queue.event_idx_enabled() {
            // The used ring: flags, idx, `size` elements of 8 bytes, then
            // avail_event.
            let at = queue.used_ring() + 4 + 8 * queue.size() as u64;
            mem.store(now.0.to_le(), GuestAddress(at), Ordering::Relaxed)
                .map_err(|e| err(&e))?;
        } else {
            queue.enable_notification(mem).map_err(|e| err(&e))?;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let later = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| err(&e))?;
        Ok(later != now)
    }

    /// The driver's avail index of queue `q` (how many chains it has
    /// offered, wrapping).
    pub fn avail_idx(&self, q: u16) -> Result<u16, QueueBroken> {
        use virtio_queue::QueueT;
        let queue = self
            .queues
            .get(q as usize)
            .ok_or_else(|| QueueBroken(format!("the device has no queue {q}")))?;
        queue
            .avail_idx(self.mem, Ordering::Acquire)
            .map(|w| w.0)
            .map_err(|e| QueueBroken(format!("queue {q}: {e}")))
    }

    /// Asks the driver to notify queue `q` when it adds buffers; true if
    /// some arrived meanwhile (look again before waiting).
    pub fn enable_notification(&mut self, q: u16) -> Result<bool, QueueBroken> {
        use virtio_queue::QueueT;
        let mem = self.mem;
        self.queue(q)?
            .enable_notification(mem)
            .map_err(|e| QueueBroken(format!("queue {q}: {e}")))
    }
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
