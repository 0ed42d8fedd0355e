//! `builtin:net`: a CPL3 guest that drives the first virtio-net card
//! itself, polling (builtin guests have no interrupt controller).
//!
//! The host writes the queues, the receive buffers (all posted) and a
//! frame template into the reserved area; the guest programs the card
//! through its MMIO registers from a table of (register, value) writes
//! (features: VERSION_1 only), then loops: write sequence number `n` into
//! a frame, post it on the transmit queue, notify, and poll the receive
//! queue's used ring until an echo of frame `n` comes back (whoever is on
//! the TAP's other side sends every frame of type [`ETHERTYPE`] back).
//! Each echo of `n` counts as progress and `n` moves on; an echo of an
//! older frame is a duplicate (counted), another frame type is foreign
//! (counted), an echo of a frame never sent or with a damaged payload is
//! bad. After [`SPIN`] polls with nothing, frame `n` is sent again (a
//! frame lost across a restore or a migration is allowed; the retry count
//! says how often).
//!
//! `verify` checks: no bad echo, and the sequence number equals the
//! progress count (both live in guest memory: a lost or stale page of the
//! guest's own state breaks it).
//!
//! Two more modes measure the card (`mode=`, [`NetMode`]): `tx` keeps the
//! transmit ring full of numbered frames and counts each one the device
//! hands back as used; `rx` counts every frame of type [`ETHERTYPE`] the
//! device delivers (others are foreign) and gives its buffer back at once.
//! Both publish a batch of ring entries at a time and notify only when the
//! device asks for it (`VRING_USED_F_NO_NOTIFY` clear: every notify is a
//! VM exit), and both keep the longest gap between two batches of
//! progress in the vCPU's block, as `builtin:dirty` does between pages:
//! the stall the traffic felt (`guest::longest_stall_us`). The sequence
//! number stays equal to the progress count, so `verify` holds too.

use super::setup::CONTROL_ADDR;
use crate::memory::GuestMemory;
pub use crate::vmm::config::NetMode;

/// The guest's state and parameters (one page).
pub const NET_ADDR: u64 = 0x140000;
/// The MMIO register writes that set the card up: (offset, value) pairs.
pub const INIT_ADDR: u64 = 0x141000;
/// Receive queue: descriptors, then the avail ring a page on, the used
/// ring a page further.
pub const RXQ_ADDR: u64 = 0x150000;
/// Transmit queue, laid out likewise.
pub const TXQ_ADDR: u64 = 0x160000;
/// Receive buffers, one page each.
pub const RXBUF_ADDR: u64 = 0x170000;
/// Transmit buffers (one frame each), one page each.
pub const TXBUF_ADDR: u64 = RXBUF_ADDR + QUEUE_SIZE * 4096;
/// Entries of each queue (a power of two: indexes are masked). Enough for
/// the `tx` and `rx` modes to hand the device a batch while the guest
/// refills the rest.
pub const QUEUE_SIZE: u64 = 64;
/// Bytes of a receive buffer.
pub const RXBUF_LEN: u32 = 4096;
/// Polls of the used ring before frame `n` is sent again.
pub const SPIN: u64 = 20_000_000;
/// The frames' Ethernet type (IEEE 802 local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
/// The payload's magic after the sequence number ("VMHOPNET").
pub const MAGIC: u64 = u64::from_le_bytes(*b"VMHOPNET");
/// Bytes of a frame the guest sends: the 12-byte net header and 60 bytes
/// of Ethernet frame (the minimum).
pub const FRAME_LEN: u32 = 12 + 60;
/// Offset in a frame (net header included) of the Ethernet type.
pub const TYPE_AT: u64 = 12 + 12;
/// Offset of the sequence number.
pub const SEQ_AT: u64 = 12 + 14;
/// Offset of the magic.
pub const MAGIC_AT: u64 = SEQ_AT + 8;

/// Offsets in the state page at [`NET_ADDR`].
pub mod state {
    /// The card's MMIO window.
    pub const MMIO: u64 = 0;
    /// Address of the register-write table.
    pub const INIT: u64 = 8;
    /// Entries in it.
    pub const NINIT: u64 = 16;
    /// The frame whose echo the guest waits for (= echoes seen).
    pub const SEQ: u64 = 24;
    /// Chains the guest has put on the transmit avail ring.
    pub const TX_AVAIL: u64 = 32;
    /// Receive used entries the guest has consumed.
    pub const RX_SEEN: u64 = 40;
    /// Chains the guest has put on the receive avail ring.
    pub const RX_AVAIL: u64 = 48;
    /// Frames sent again after a wait with no echo.
    pub const RETRIES: u64 = 56;
    /// Echoes of a frame never sent, or with a damaged payload.
    pub const BAD: u64 = 64;
    /// Echoes of a frame already echoed.
    pub const DUPS: u64 = 72;
    /// Frames of another type (the host's own traffic on the TAP).
    pub const FOREIGN: u64 = 80;
    /// Transmit used entries the guest has consumed (`tx` mode).
    pub const TX_SEEN: u64 = 88;
}

/// The control page's guest kind of `builtin:net`.
pub const KIND: u64 = super::setup::kind::NET;

/// Ring offsets inside a queue's area.
const AVAIL_AT: u64 = 0x1000;
const USED_AT: u64 = 0x2000;

/// Writes the card's queues, buffers, frames and register table for a
/// card at `mmio` with address `mac`. None if memory is missing.
pub fn install(memory: &GuestMemory, mmio: u64, mac: [u8; 6]) -> Option<()> {
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    let w = |gpa: u64, v: u64| memory.write_u64(gpa, v);
    memory.write_bytes(NET_ADDR, &[0u8; 4096])?;
    // Receive: every buffer posted.
    for i in 0..QUEUE_SIZE {
        let d = RXQ_ADDR + 16 * i;
        w(d, RXBUF_ADDR + i * 4096)?;
        // len, flags = WRITE, next = 0.
        w(d + 8, RXBUF_LEN as u64 | (VRING_DESC_F_WRITE as u64) << 32)?;
        memory.write_bytes(RXQ_ADDR + AVAIL_AT + 4 + 2 * i, &(i as u16).to_le_bytes())?;
    }
    memory.write_bytes(RXQ_ADDR + AVAIL_AT, &[0, 0])?;
    memory.write_bytes(RXQ_ADDR + AVAIL_AT + 2, &(QUEUE_SIZE as u16).to_le_bytes())?;
    // Transmit: descriptor i is frame buffer i.
    let mut frame = [0u8; FRAME_LEN as usize];
    frame[12..18].copy_from_slice(&[0xff; 6]);
    frame[18..24].copy_from_slice(&mac);
    frame[TYPE_AT as usize..TYPE_AT as usize + 2].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame[MAGIC_AT as usize..MAGIC_AT as usize + 8].copy_from_slice(&MAGIC.to_le_bytes());
    for i in 0..QUEUE_SIZE {
        let d = TXQ_ADDR + 16 * i;
        w(d, TXBUF_ADDR + i * 4096)?;
        w(d + 8, FRAME_LEN as u64)?;
        memory.write_bytes(TXBUF_ADDR + i * 4096, &frame)?;
    }
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
    for (q, at) in [(0u64, RXQ_ADDR), (1, TXQ_ADDR)] {
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
    w(NET_ADDR + state::MMIO, mmio)?;
    w(NET_ADDR + state::INIT, INIT_ADDR)?;
    w(NET_ADDR + state::NINIT, regs.len() as u64)?;
    w(NET_ADDR + state::RX_AVAIL, QUEUE_SIZE)?;
    Some(())
}

/// The guest's counters, as its memory holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Echoes seen (the frame it waits for).
    pub seq: u64,
    /// Frames sent again.
    pub retries: u64,
    /// Bad echoes.
    pub bad: u64,
    /// Duplicate echoes.
    pub dups: u64,
    /// Foreign frames.
    pub foreign: u64,
}

/// The counters of a `builtin:net` guest in `memory` (None: not one).
pub fn counts(memory: &GuestMemory) -> Option<Counts> {
    if memory.read_u64(CONTROL_ADDR + 8)? != KIND {
        return None;
    }
    let r = |o: u64| memory.read_u64(NET_ADDR + o);
    Some(Counts {
        seq: r(state::SEQ)?,
        retries: r(state::RETRIES)?,
        bad: r(state::BAD)?,
        dups: r(state::DUPS)?,
        foreign: r(state::FOREIGN)?,
    })
}
