//! virtio-net's data path, on the device's worker thread: frames from the
//! TAP into the guest's receive buffers, frames from the guest's transmit
//! buffers to the TAP, and the control queue.
//!
//! Receive: a frame is read from the TAP only when the guest has a buffer
//! for it (a chain taken first, given back if the TAP has nothing), so
//! whatever the guest has no room for stays in the TAP's own queue — also
//! while the device is quiesced. Without MRG_RXBUF a frame goes into one
//! chain, and a frame larger than the chain is dropped (counted); with it,
//! into as many chains as it needs, `num_buffers` saying how many. If the
//! chains offered are not enough, they are given back and the frame waits
//! in the device (one frame at most, kept across a quiesce) until the
//! driver adds more; a frame larger than the whole ring is dropped. The
//! net header the TAP wrote is passed to the guest as it is (checksum and
//! segmentation fields), `num_buffers` set by the device.
//!
//! Transmit: each chain is one frame, net header first, written to the TAP
//! as the guest wrote it (so its offload fields reach the kernel). A chain
//! with a device-writable buffer, a buffer outside guest memory, less than
//! a header and an Ethernet header, or more than [`MAX_FRAME`] bytes is
//! dropped and counted; so is a frame the TAP refuses (a link down, a
//! segmentation request it cannot do). Transmit never blocks on the TAP.
//!
//! A receive chain with a device-readable buffer, a buffer outside guest
//! memory, or no room for the header is the driver's bug the device cannot
//! work around: DEVICE_NEEDS_RESET. So is a control request with no
//! device-writable ack byte.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_net as vn;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::tap::Tap;
use super::{Counters, Shared, CTRL_QUEUE, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::devices::virtio::{serve_requests, QueueBroken, QueueHandler, Rings};
use crate::memory::DeviceGuestMemory;

/// Largest frame (without the net header) either way: a 64 KiB segment
/// with an Ethernet and a VLAN header.
pub const MAX_FRAME: usize = 65536 + 18;
/// Shortest frame the device passes on: an Ethernet header.
const ETH_HLEN: usize = 14;
/// Most command bytes of a control request the device reads.
const MAX_CTRL: usize = 4096;

/// The handler for a driver that accepted `acked`; a handler that cannot
/// be made breaks the device (DEVICE_NEEDS_RESET) at its first use.
pub(super) fn handler(shared: Arc<Shared>, acked: u64) -> Box<dyn QueueHandler> {
    match NetHandler::new(shared.clone(), acked) {
        Ok(h) => Box::new(h),
        Err(e) => Box::new(Broken(format!(
            "{}: cannot serve TAP {}: {e}",
            shared.name,
            shared.tap.name()
        ))),
    }
}

/// A handler that could not be made: every use breaks the device.
struct Broken(String);

impl QueueHandler for Broken {
    fn notified(&mut self, _: &mut Rings<'_>, _: u16) -> Result<(), QueueBroken> {
        Err(QueueBroken(self.0.clone()))
    }
}

/// What reading the TAP gave.
enum Read {
    /// A frame of this many bytes, header included.
    Frame(usize),
    /// The TAP has no frame.
    Empty,
    /// A frame the guest cannot have (too short, truncated): dropped.
    Dropped,
}

struct NetHandler {
    shared: Arc<Shared>,
    /// The worker's handle on the TAP.
    tap: Tap,
    /// The TAP, edge-triggered: readable means a frame may be there.
    epoll: Epoll,
    mrg: bool,
    announce: bool,
    /// A frame read from the TAP (header first), `rx_len` bytes of it.
    rx: Vec<u8>,
    /// Bytes of the frame waiting for buffers (0: none).
    rx_len: usize,
    /// The TAP may have frames (cleared when a read finds none).
    tap_readable: bool,
    tx: Vec<u8>,
    /// A TAP write failed already (logged once per handler).
    tx_error_seen: bool,
}

impl NetHandler {
    fn new(shared: Arc<Shared>, acked: u64) -> std::io::Result<NetHandler> {
        let tap = shared.tap.try_clone()?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            tap.fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
        )?;
        Ok(NetHandler {
            shared,
            tap,
            epoll,
            mrg: acked & 1 << vn::VIRTIO_NET_F_MRG_RXBUF != 0,
            announce: acked & 1 << vn::VIRTIO_NET_F_GUEST_ANNOUNCE != 0,
            // One more than the largest frame: a read that fills it was cut.
            rx: vec![0; VNET_HDR_LEN + MAX_FRAME + 1],
            rx_len: 0,
            tap_readable: true,
            tx: vec![0; VNET_HDR_LEN + MAX_FRAME],
            tx_error_seen: false,
        })
    }

    fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn read_frame(&mut self) -> Read {
        loop {
            return match self.tap.read_frame(&mut self.rx) {
                Ok(n) if n == self.rx.len() || n < VNET_HDR_LEN + ETH_HLEN => {
                    Counters::add(&self.counters().rx_dropped, 1);
                    Read::Dropped
                }
                Ok(n) => Read::Frame(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => Read::Empty,
                Err(e) => {
                    // A TAP that errors on read (its interface gone) has
                    // nothing to give; the next readiness event tries again.
                    tracing::debug!("{}: reading TAP {}: {e}", self.shared.name, self.tap.name());
                    Read::Empty
                }
            };
        }
    }

    /// Moves frames from the TAP into receive buffers while there are both.
    fn rx(&mut self, rings: &mut Rings<'_>) -> Result<(), QueueBroken> {
        if !rings.ready(RX_QUEUE) {
            return Ok(());
        }
        let mut suppressed = false;
        loop {
            if self.rx_len == 0 && !self.tap_readable {
                return Ok(());
            }
            if !suppressed {
                // Buffers the driver adds while frames flow need no kick.
                rings.disable_notification(RX_QUEUE)?;
                suppressed = true;
            }
            let Some(first) = rings.pop(RX_QUEUE)? else {
                if rings.holding() {
                    return Ok(());
                }
                // No buffer: ask for a kick when the driver adds one.
                if rings.enable_notification(RX_QUEUE)? {
                    suppressed = false;
                    continue;
                }
                return Ok(());
            };
            if self.rx_len == 0 {
                match self.read_frame() {
                    Read::Frame(n) => self.rx_len = n,
                    Read::Empty => {
                        rings.unpop(RX_QUEUE)?;
                        self.tap_readable = false;
                        return Ok(());
                    }
                    Read::Dropped => {
                        rings.unpop(RX_QUEUE)?;
                        continue;
                    }
                }
            }
            if !self.deliver(rings, first)? {
                return Ok(());
            }
        }
    }

    /// Puts the waiting frame into `first` (and, with MRG_RXBUF, the
    /// chains after it); false if it must wait for more buffers.
    fn deliver(
        &mut self,
        rings: &mut Rings<'_>,
        first: DescriptorChain<&DeviceGuestMemory>,
    ) -> Result<bool, QueueBroken> {
        let mem = rings.mem();
        let need = self.rx_len;
        let head = first.head_index();
        let bufs = writable(mem, first).map_err(|e| receive_chain(head, &e))?;
        let cap: usize = bufs.iter().map(|b| b.1 as usize).sum();
        let mut chains = vec![(head, bufs, cap)];
        if !self.mrg {
            if cap < need {
                // The driver's buffers are smaller than this frame: drop it
                // and keep the buffer for the next.
                rings.unpop(RX_QUEUE)?;
                self.drop_rx();
                return Ok(true);
            }
        } else {
            let mut total = cap;
            while total < need {
                let Some(c) = rings.pop(RX_QUEUE)? else {
                    for _ in 0..chains.len() {
                        rings.unpop(RX_QUEUE)?;
                    }
                    if chains.len() >= rings.size(RX_QUEUE) as usize {
                        // The whole ring cannot hold it.
                        self.drop_rx();
                        return Ok(true);
                    }
                    if rings.holding() {
                        return Ok(false);
                    }
                    return rings.notify_beyond_avail(RX_QUEUE);
                };
                let h = c.head_index();
                let b = writable(mem, c).map_err(|e| receive_chain(h, &e))?;
                let n: usize = b.iter().map(|x| x.1 as usize).sum();
                total += n;
                chains.push((h, b, n));
            }
        }
        let count = chains.len() as u16;
        self.rx[10..12].copy_from_slice(&count.to_le_bytes());
        let mut at = 0;
        for (h, bufs, _) in &chains {
            let start = at;
            for &(addr, len) in bufs {
                if at == need {
                    break;
                }
                let n = (len as usize).min(need - at);
                mem.write_slice(&self.rx[at..at + n], GuestAddress(addr))
                    .map_err(|e| receive_chain(*h, &e.to_string()))?;
                at += n;
            }
            rings.add_used(RX_QUEUE, *h, (at - start) as u32)?;
            if at == need {
                break;
            }
        }
        let c = self.counters();
        Counters::add(&c.rx_packets, 1);
        Counters::add(&c.rx_bytes, (need - VNET_HDR_LEN) as u64);
        self.rx_len = 0;
        Ok(true)
    }

    fn drop_rx(&mut self) {
        Counters::add(&self.counters().rx_dropped, 1);
        self.rx_len = 0;
    }

    /// One frame from the guest to the TAP; the used length is 0.
    fn transmit(&mut self, mem: &DeviceGuestMemory, chain: DescriptorChain<&DeviceGuestMemory>) {
        let head = chain.head_index();
        let mut len = 0usize;
        let mut bad = None;
        for d in chain {
            let n = d.len() as usize;
            if d.is_write_only() {
                bad = Some("a device-writable buffer".to_string());
            } else if len + n > self.tx.len() {
                bad = Some(format!("more than {} bytes", self.tx.len()));
            } else if let Err(e) = mem.read_slice(&mut self.tx[len..len + n], d.addr()) {
                bad = Some(format!("buffer {:#x}+{n:#x}: {e}", d.addr().0));
            }
            if bad.is_some() {
                break;
            }
            len += n;
        }
        if bad.is_none() && len < VNET_HDR_LEN + ETH_HLEN {
            bad = Some(format!(
                "{len} bytes, less than a header and an Ethernet header"
            ));
        }
        let c = &self.shared.counters;
        if let Some(why) = bad {
            tracing::debug!("{}: transmit chain {head} dropped: {why}", self.shared.name);
            Counters::add(&c.tx_dropped, 1);
            return;
        }
        match self.tap.write_frame(&self.tx[..len]) {
            Ok(_) => {
                Counters::add(&c.tx_packets, 1);
                Counters::add(&c.tx_bytes, (len - VNET_HDR_LEN) as u64);
            }
            Err(e) => {
                Counters::add(&c.tx_dropped, 1);
                if !self.tx_error_seen {
                    self.tx_error_seen = true;
                    tracing::warn!(
                        "{}: TAP {} refused a frame (dropped; further ones are only counted): {e}",
                        self.shared.name,
                        self.tap.name()
                    );
                }
            }
        }
    }

    /// One control request: class and command, then the ack byte.
    fn control(
        &mut self,
        mem: &DeviceGuestMemory,
        chain: DescriptorChain<&DeviceGuestMemory>,
    ) -> Result<u32, QueueBroken> {
        let head = chain.head_index();
        let mut cmd = Vec::new();
        let mut ack = None;
        let mut well_formed = true;
        for d in chain {
            if d.is_write_only() {
                ack.get_or_insert(d.addr());
            } else if ack.is_some() {
                // A readable buffer after the ack.
                well_formed = false;
            } else {
                let n = (d.len() as usize).min(MAX_CTRL - cmd.len());
                let at = cmd.len();
                cmd.resize(at + n, 0);
                if mem.read_slice(&mut cmd[at..], d.addr()).is_err() {
                    well_formed = false;
                }
            }
        }
        let Some(ack) = ack else {
            return Err(QueueBroken(format!(
                "control request {head} has no device-writable ack byte"
            )));
        };
        let ok = well_formed
            && match (cmd.first().copied(), cmd.get(1).copied()) {
                (Some(c), Some(a))
                    if c as u32 == vn::VIRTIO_NET_CTRL_ANNOUNCE
                        && a as u32 == vn::VIRTIO_NET_CTRL_ANNOUNCE_ACK
                        && self.announce =>
                {
                    self.shared
                        .status
                        .fetch_and(!(vn::VIRTIO_NET_S_ANNOUNCE as u16), Ordering::SeqCst);
                    true
                }
                _ => false,
            };
        let status = match ok {
            true => vn::VIRTIO_NET_OK,
            false => vn::VIRTIO_NET_ERR,
        } as u8;
        mem.write_obj(status, ack)
            .map_err(|e| QueueBroken(format!("control request {head}: ack byte: {e}")))?;
        Ok(1)
    }
}

fn receive_chain(head: u16, why: &str) -> QueueBroken {
    QueueBroken(format!("receive chain {head}: {why}"))
}

/// The device-writable buffers of a receive chain, as (address, length),
/// each checked to lie in guest memory; an error says what is wrong.
fn writable(
    mem: &DeviceGuestMemory,
    chain: DescriptorChain<&DeviceGuestMemory>,
) -> Result<Vec<(u64, u32)>, String> {
    let mut out = Vec::new();
    for d in chain {
        if !d.is_write_only() {
            return Err("a device-readable buffer".into());
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(format!(
                "buffer {:#x}+{:#x} is not in guest memory",
                d.addr().0,
                d.len()
            ));
        }
        out.push((d.addr().0, d.len()));
    }
    let cap: u64 = out.iter().map(|b| b.1 as u64).sum();
    if cap < VNET_HDR_LEN as u64 {
        return Err(format!("{cap} bytes, less than the net header"));
    }
    Ok(out)
}

impl QueueHandler for NetHandler {
    fn serve(
        &mut self,
        mem: &DeviceGuestMemory,
        queue: u16,
        chain: DescriptorChain<&DeviceGuestMemory>,
    ) -> Result<u32, QueueBroken> {
        match queue {
            TX_QUEUE => {
                self.transmit(mem, chain);
                Ok(0)
            }
            CTRL_QUEUE => self.control(mem, chain),
            q => Err(QueueBroken(format!("queue {q} takes no requests"))),
        }
    }

    fn notified(&mut self, rings: &mut Rings<'_>, queue: u16) -> Result<(), QueueBroken> {
        match queue {
            RX_QUEUE => self.rx(rings),
            q => serve_requests(self, rings, q),
        }
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn event(&mut self, rings: &mut Rings<'_>) -> Result<(), QueueBroken> {
        // Consume the edge; a resume's kick comes here too, and a frame
        // may have arrived while the device was parked.
        let mut ev = [EpollEvent::default(); 1];
        let _ = self.epoll.wait(0, &mut ev);
        self.tap_readable = true;
        self.rx(rings)
    }
}
