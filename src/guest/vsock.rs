//! `builtin:vsock`: a CPL3 guest that serves the vsock device itself,
//! polling (builtin guests have no interrupt controller): it accepts every
//! connection the host asks for (REQUEST → RESPONSE), echoes every byte it
//! receives back on the same connection (RW → RW), answers a SHUTDOWN with
//! RST and a CREDIT_REQUEST with its credit, and counts the transport
//! resets the device reports on the event queue.
//!
//! The host writes the queues, the receive buffers (all posted, one
//! descriptor of a page each: header and data together), the event buffer
//! and the register table into the reserved area; the guest programs the
//! device from the table (features: VERSION_1 only) and loops. Credit: it
//! tells the device `buf_alloc` = 1 MiB and, per connection, `fwd_cnt` =
//! every byte it received on it (it consumes at once), kept in a table
//! indexed by the host port's low bits (host ports are handed out in
//! order, so up to [`CONNS`] connections at once never share an entry).
//! It sends without looking at the device's credit: an echo is never
//! larger than what came, and a host that does not read its echoes gets
//! its connection reset. Progress: echoes sent.

use super::setup::CONTROL_ADDR;
use crate::memory::GuestMemory;

/// The guest's state and parameters (one page).
pub const VSOCK_ADDR: u64 = 0x140000;
/// The MMIO register writes that set the device up: (offset, value) pairs.
pub const INIT_ADDR: u64 = 0x141000;
/// Per-connection `fwd_cnt`, 8 bytes each, by host port modulo [`CONNS`].
pub const CONN_ADDR: u64 = 0x142000;
/// Receive queue: descriptors, then the avail ring a page on, the used
/// ring a page further.
pub const RXQ_ADDR: u64 = 0x150000;
/// Transmit queue, laid out likewise.
pub const TXQ_ADDR: u64 = 0x160000;
/// Receive buffers, one page each.
pub const RXBUF_ADDR: u64 = 0x170000;
/// Transmit buffers, one page each.
pub const TXBUF_ADDR: u64 = 0x180000;
/// Event queue, laid out likewise.
pub const EVQ_ADDR: u64 = 0x190000;
/// The event buffer.
pub const EVBUF_ADDR: u64 = 0x193000;
/// Entries of each queue (a power of two: indexes are masked).
pub const QUEUE_SIZE: u64 = 16;
/// Connections the guest keeps credit for at once.
pub const CONNS: u64 = 64;
/// The guest's receive buffer per connection, as it tells the device.
pub const BUF_ALLOC: u32 = 1 << 20;
/// Bytes of a packet header.
pub const HDR: u64 = 44;

/// Offsets in the state page at [`VSOCK_ADDR`].
pub mod state {
    /// The device's MMIO window.
    pub const MMIO: u64 = 0;
    /// Address of the register-write table.
    pub const INIT: u64 = 8;
    /// Entries in it.
    pub const NINIT: u64 = 16;
    /// Receive used entries the guest has consumed.
    pub const RX_SEEN: u64 = 24;
    /// Chains the guest has put on the receive avail ring.
    pub const RX_AVAIL: u64 = 32;
    /// Chains the guest has put on the transmit avail ring.
    pub const TX_AVAIL: u64 = 40;
    /// Event used entries the guest has consumed.
    pub const EV_SEEN: u64 = 48;
    /// Chains the guest has put on the event avail ring.
    pub const EV_AVAIL: u64 = 56;
    /// Bytes echoed.
    pub const ECHOED: u64 = 64;
    /// Transport resets seen.
    pub const RESETS: u64 = 72;
    /// Connections accepted.
    pub const ACCEPTED: u64 = 80;
}

/// The control page's guest kind of `builtin:vsock`.
pub const KIND: u64 = super::setup::kind::VSOCK;

/// Ring offsets inside a queue's area.
pub const AVAIL_AT: u64 = 0x1000;
/// The used ring's offset inside a queue's area.
pub const USED_AT: u64 = 0x2000;

/// Writes the device's queues, buffers and register table for a device
/// at `mmio`. None if memory is missing.
pub fn install(memory: &GuestMemory, mmio: u64) -> Option<()> {
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    let w = |gpa: u64, v: u64| memory.write_u64(gpa, v);
    memory.write_bytes(VSOCK_ADDR, &[0u8; 4096])?;
    memory.write_bytes(CONN_ADDR, &[0u8; 4096])?;
    let write = (VRING_DESC_F_WRITE as u64) << 32;
    for i in 0..QUEUE_SIZE {
        // Receive: every buffer posted.
        let d = RXQ_ADDR + 16 * i;
        w(d, RXBUF_ADDR + i * 4096)?;
        w(d + 8, 4096 | write)?;
        memory.write_bytes(RXQ_ADDR + AVAIL_AT + 4 + 2 * i, &(i as u16).to_le_bytes())?;
        // Transmit: descriptor i is buffer i (its length set per packet).
        w(TXQ_ADDR + 16 * i, TXBUF_ADDR + i * 4096)?;
        w(TXQ_ADDR + 16 * i + 8, 0)?;
    }
    memory.write_bytes(RXQ_ADDR + AVAIL_AT, &[0, 0])?;
    memory.write_bytes(RXQ_ADDR + AVAIL_AT + 2, &(QUEUE_SIZE as u16).to_le_bytes())?;
    // Event: one buffer, posted (descriptor 0, reposted after each event).
    w(EVQ_ADDR, EVBUF_ADDR)?;
    w(EVQ_ADDR + 8, 8 | write)?;
    memory.write_bytes(EVQ_ADDR + AVAIL_AT, &[0, 0, 1, 0, 0, 0])?;
    // The driver's side of initialisation (virtio 1.x, 3.1.1).
    let s = |bits: u32| (VIRTIO_MMIO_STATUS as u64, bits as u64);
    let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    let drv = ack | VIRTIO_CONFIG_S_DRIVER;
    let fok = drv | VIRTIO_CONFIG_S_FEATURES_OK;
    let mut regs = vec![
        s(0),
        s(ack),
        s(drv),
        (VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64, 1),
        // VERSION_1 (bit 32).
        (VIRTIO_MMIO_DRIVER_FEATURES as u64, 1),
        (VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64, 0),
        (VIRTIO_MMIO_DRIVER_FEATURES as u64, 0),
        s(fok),
    ];
    for (q, at) in [(0u64, RXQ_ADDR), (1, TXQ_ADDR), (2, EVQ_ADDR)] {
        regs.extend([
            (VIRTIO_MMIO_QUEUE_SEL as u64, q),
            (VIRTIO_MMIO_QUEUE_NUM as u64, QUEUE_SIZE),
            (VIRTIO_MMIO_QUEUE_DESC_LOW as u64, at),
            (VIRTIO_MMIO_QUEUE_DESC_HIGH as u64, 0),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64, at + AVAIL_AT),
            (VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64, 0),
            (VIRTIO_MMIO_QUEUE_USED_LOW as u64, at + USED_AT),
            (VIRTIO_MMIO_QUEUE_USED_HIGH as u64, 0),
            (VIRTIO_MMIO_QUEUE_READY as u64, 1),
        ]);
    }
    regs.push(s(fok | VIRTIO_CONFIG_S_DRIVER_OK));
    for (i, (off, v)) in regs.iter().enumerate() {
        w(INIT_ADDR + 16 * i as u64, *off)?;
        w(INIT_ADDR + 16 * i as u64 + 8, *v)?;
    }
    w(VSOCK_ADDR + state::MMIO, mmio)?;
    w(VSOCK_ADDR + state::INIT, INIT_ADDR)?;
    w(VSOCK_ADDR + state::NINIT, regs.len() as u64)?;
    w(VSOCK_ADDR + state::RX_AVAIL, QUEUE_SIZE)?;
    w(VSOCK_ADDR + state::EV_AVAIL, 1)?;
    Some(())
}

/// The guest's counters, as its memory holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Bytes echoed.
    pub echoed: u64,
    /// Transport resets seen.
    pub resets: u64,
    /// Connections accepted.
    pub accepted: u64,
}

/// The counters of a `builtin:vsock` guest in `memory` (None: not one).
pub fn counts(memory: &GuestMemory) -> Option<Counts> {
    if memory.read_u64(CONTROL_ADDR + 8)? != KIND {
        return None;
    }
    let r = |o: u64| memory.read_u64(VSOCK_ADDR + o);
    Some(Counts {
        echoed: r(state::ECHOED)?,
        resets: r(state::RESETS)?,
        accepted: r(state::ACCEPTED)?,
    })
}
