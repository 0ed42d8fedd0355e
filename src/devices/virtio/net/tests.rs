//! virtio-net driven through the transport's registers and
//! `MockSplitQueue`s over guest memory. The backend is one end of a
//! `SOCK_SEQPACKET` socket pair standing in for the TAP (frames keep their
//! boundaries, as on a TAP; the test holds the other end), except where
//! the TAP itself is under test (in a network namespace of the test's own).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::mmio::regs::*;
use crate::devices::virtio::testing::{Driver, DriverQueue, TestMemory, MAX_WAIT};
use crate::devices::virtio::{status, MmioTransport, INT_CONFIG, INT_VRING};
use crate::memory::PAGE_SIZE;
use crate::vmm::bus::MmioDevice;

const MEMORY: u64 = 16 << 20;
const RXQ: u64 = 0x10000;
const TXQ: u64 = 0x20000;
const CTRLQ: u64 = 0x30000;
const TX_DATA: u64 = 0x300000;
const RX_DATA: u64 = 0x400000;
const CTRL_DATA: u64 = 0x500000;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Every feature the device may offer.
const ALL: u64 = u64::MAX;
const MRG: u64 = 1 << vn::VIRTIO_NET_F_MRG_RXBUF;

fn config() -> NetConfig {
    NetConfig {
        tap: "fake0".into(),
        mac: MacAddr(MAC),
        id: "net0".into(),
    }
}

/// A card whose TAP is one end of a socket pair; the other end.
fn card() -> (Net, File) {
    card_with(config())
}

/// As [`card`], configured as `cfg` says.
fn card_with(cfg: NetConfig) -> (Net, File) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into `fds`, which has room for two.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let tap = Tap::fake(File::from(a), "fake0");
    (Net::on(cfg, tap), File::from(b))
}

/// A frame as the TAP side sees it: the 12-byte header, then an Ethernet
/// frame of `len` bytes whose bytes after the addresses count from `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN + len];
    f[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&MAC);
    f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    for (i, b) in f[VNET_HDR_LEN + 12..].iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8);
    }
    f
}

fn send(peer: &File, f: &[u8]) {
    use std::io::Write;
    assert_eq!((&*peer).write(f).unwrap(), f.len());
}

/// The next frame the device wrote to the backend, waiting for it.
fn recv(peer: &File) -> Vec<u8> {
    use std::io::Read;
    let until = Instant::now() + MAX_WAIT;
    let mut buf = vec![0u8; 1 << 17];
    loop {
        match (&*peer).read(&mut buf) {
            Ok(n) => return buf[..n].to_vec(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < until, "no frame reached the backend");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("reading the backend: {e}"),
        }
    }
}

/// Nothing more reached the backend (after the device used every chain).
fn nothing_more(peer: &File) {
    use std::io::Read;
    let mut buf = [0u8; 64];
    let r = (&*peer).read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "an unexpected frame: {r:?}"
    );
}

fn dirty_pages(vm: &TestMemory) -> BTreeSet<u64> {
    vm.device_dirty()
        .into_iter()
        .flat_map(|(first, n)| first..first + n)
        .collect()
}

fn counters(dev: &MmioTransport<Net>) -> BTreeMap<String, u64> {
    dev.device().counters().snapshot()
}

struct Rig<'m> {
    rx: DriverQueue<'m>,
    tx: DriverQueue<'m>,
    ctrl: DriverQueue<'m>,
}

impl<'m> Rig<'m> {
    fn new(view: &'m vm_memory::GuestMemoryMmap) -> Self {
        Rig {
            rx: DriverQueue::new(view, RXQ, QUEUE_SIZE),
            tx: DriverQueue::new(view, TXQ, QUEUE_SIZE),
            ctrl: DriverQueue::new(view, CTRLQ, CTRL_QUEUE_SIZE),
        }
    }

    fn activate(&self, dev: &MmioTransport<Net>, want: u64) -> u64 {
        Driver { t: dev }.activate_queues(&[&self.rx, &self.tx, &self.ctrl], want)
    }
}

#[test]
fn configuration_space_has_the_mac_and_the_link_up_and_features_follow_the_tap() {
    let vm = TestMemory::new(MEMORY);
    let (net, _peer) = card();
    assert_eq!(net.tap_offloads(), 0, "a socket takes no TAP offloads");
    let dev = MmioTransport::new(net, vm.dm.clone(), None).unwrap();
    let d = Driver { t: &dev };
    assert_eq!(d.r(VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
    let mut cfg = [0u8; 10];
    dev.read(0, 0x100, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(
        u16::from_le_bytes([cfg[6], cfg[7]]),
        vn::VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    // The MAC is read-only.
    dev.write(0, 0x100, &[0xff; 6]);
    dev.read(0, 0x100, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    // No offload without a TAP that takes it; the rest always.
    let offered = offered_features(0);
    for b in [
        vn::VIRTIO_NET_F_MAC,
        vn::VIRTIO_NET_F_STATUS,
        vn::VIRTIO_NET_F_MRG_RXBUF,
        vn::VIRTIO_NET_F_CTRL_VQ,
        vn::VIRTIO_NET_F_GUEST_ANNOUNCE,
    ] {
        assert!(offered & 1 << b != 0, "feature {b} offered");
    }
    for b in [
        vn::VIRTIO_NET_F_CSUM,
        vn::VIRTIO_NET_F_GUEST_CSUM,
        vn::VIRTIO_NET_F_HOST_TSO4,
        vn::VIRTIO_NET_F_GUEST_TSO4,
    ] {
        assert_eq!(offered & 1 << b, 0, "feature {b} not offered");
    }
    let with = offered_features(tap::offload::CSUM | tap::offload::TSO4);
    assert!(with & 1 << vn::VIRTIO_NET_F_GUEST_TSO4 != 0);
    assert!(with & 1 << vn::VIRTIO_NET_F_HOST_TSO4 != 0);
    assert_eq!(with & 1 << vn::VIRTIO_NET_F_GUEST_TSO6, 0);
    // Receive offloads for the TAP: only what the driver takes, and
    // nothing without GUEST_CSUM.
    let guest_tso4 = 1 << vn::VIRTIO_NET_F_GUEST_TSO4;
    let guest_csum = 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
    assert_eq!(tap_offloads_for(guest_tso4, u32::MAX), 0);
    assert_eq!(
        tap_offloads_for(guest_tso4 | guest_csum, u32::MAX),
        tap::offload::CSUM | tap::offload::TSO4
    );
    assert_eq!(
        tap_offloads_for(guest_tso4 | guest_csum, tap::offload::CSUM),
        tap::offload::CSUM
    );
}

#[test]
fn transmitted_frames_reach_the_tap_with_their_header_and_bad_chains_are_dropped() {
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let (net, peer) = card();
    let dev = MmioTransport::new(net, vm.dm.clone(), None).unwrap();
    let d = Driver { t: &dev };
    rig.activate(&dev, ALL);
    let _ = vm.device_dirty();

    // One frame in one buffer, one split over three (header alone first).
    // The first asks for checksum offload: its header reaches the TAP as
    // the guest wrote it.
    let mut f1 = frame(60, 1);
    f1[0] = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    f1[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    f1[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    view.write_slice(&f1, GuestAddress(TX_DATA)).unwrap();
    rig.tx.push(&[(TX_DATA, f1.len() as u32, false)]);
    let f2 = frame(1500, 7);
    let at = TX_DATA + 0x10000;
    view.write_slice(&f2, GuestAddress(at)).unwrap();
    rig.tx.push(&[
        (at, VNET_HDR_LEN as u32, false),
        (at + VNET_HDR_LEN as u64, 100, false),
        (at + VNET_HDR_LEN as u64 + 100, 1400, false),
    ]);
    d.notify(TX_QUEUE as u32);
    let used = rig.tx.wait_used(2);
    assert!(used.iter().all(|u| u.1 == 0), "TX writes nothing: {used:?}");
    assert_eq!(recv(&peer), f1, "the frame, header as the guest wrote it");
    assert_eq!(recv(&peer), f2);
    assert!(
        !dirty_pages(&vm).contains(&(TX_DATA / PAGE_SIZE)),
        "transmit only reads the frame"
    );

    // Malformed: a device-writable buffer; a buffer outside guest memory;
    // less than a header and an Ethernet header; more than the largest
    // frame. Each is dropped, counted and used; the device serves on.
    rig.tx
        .push(&[(TX_DATA, 12, false), (TX_DATA + 12, 60, true)]);
    rig.tx.push(&[(MEMORY + 0x1000, 72, false)]);
    rig.tx.push(&[(TX_DATA, (VNET_HDR_LEN + 13) as u32, false)]);
    let huge = (VNET_HDR_LEN + rxtx::MAX_FRAME + 1) as u32;
    rig.tx.push(&[(TX_DATA, huge, false)]);
    let f3 = frame(64, 9);
    view.write_slice(&f3, GuestAddress(TX_DATA + 0x20000))
        .unwrap();
    rig.tx.push(&[(TX_DATA + 0x20000, f3.len() as u32, false)]);
    d.notify(TX_QUEUE as u32);
    rig.tx.wait_used(5);
    assert_eq!(recv(&peer), f3, "the good frame after the bad ones");
    nothing_more(&peer);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET, 0);
    let c = counters(&dev);
    assert_eq!(c["tx_packets"], 3);
    assert_eq!(c["tx_bytes"], 60 + 1500 + 64);
    assert_eq!(c["tx_dropped"], 4);
}

#[test]
fn received_frames_land_in_guest_buffers_marked_dirty() {
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let (net, peer) = card();
    let dev = MmioTransport::new(net, vm.dm.clone(), None).unwrap();
    let d = Driver { t: &dev };
    let acked = rig.activate(&dev, ALL & !MRG);
    assert_eq!(acked & MRG, 0);
    let _ = vm.device_dirty();

    // A frame before any buffer waits in the TAP, not dropped.
    let f1 = frame(100, 3);
    send(&peer, &f1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(counters(&dev)["rx_dropped"], 0);
    let b0 = RX_DATA + 5 * PAGE_SIZE;
    let b1 = RX_DATA + 9 * PAGE_SIZE;
    rig.rx.push(&[(b0, 2048, true)]);
    rig.rx.push(&[(b1, 2048, true)]);
    d.notify(RX_QUEUE as u32);
    let used = rig.rx.wait_used(1);
    assert_eq!(used[0], (0, f1.len() as u32));
    let mut got = vec![0u8; f1.len()];
    view.read_slice(&mut got, GuestAddress(b0)).unwrap();
    let mut want = f1.clone();
    want[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    assert_eq!(got, want);
    let dirty = dirty_pages(&vm);
    assert!(dirty.contains(&(b0 / PAGE_SIZE)), "{dirty:?}");
    assert!(!dirty.contains(&(b1 / PAGE_SIZE)), "{dirty:?}");

    // A frame larger than the buffer is dropped and the buffer kept for
    // the next, which arrives with no notify (the TAP's readiness).
    send(&peer, &frame(3000, 4));
    let f2 = frame(200, 5);
    send(&peer, &f2);
    let used = rig.rx.wait_used(1);
    assert_eq!(used[0], (1, f2.len() as u32));
    view.read_slice(&mut got[..20], GuestAddress(b1 + VNET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(&got[..20], &f2[VNET_HDR_LEN..VNET_HDR_LEN + 20]);
    assert!(dirty_pages(&vm).contains(&(b1 / PAGE_SIZE)));
    let c = counters(&dev);
    assert_eq!(
        (c["rx_packets"], c["rx_bytes"], c["rx_dropped"]),
        (2, 300, 1)
    );
    assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_VRING, INT_VRING);
}

#[test]
fn with_mergeable_buffers_a_large_frame_spans_chains_and_waits_for_enough() {
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let (net, peer) = card();
    let dev = MmioTransport::new(net, vm.dm.clone(), None).unwrap();
    let d = Driver { t: &dev };
    assert!(rig.activate(&dev, ALL) & MRG != 0);
    let f = frame(4000, 11);
    // 1500 bytes offered: not enough; the frame waits in the device.
    rig.rx.push(&[(RX_DATA, 1500, true)]);
    d.notify(RX_QUEUE as u32);
    send(&peer, &f);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.rx.used_idx(), 0, "not delivered into too little room");
    assert_eq!(counters(&dev)["rx_dropped"], 0);
    // Two more buffers: the frame spans three chains.
    rig.rx.push(&[(RX_DATA + 0x1000, 1500, true)]);
    rig.rx.push(&[(RX_DATA + 0x2000, 1500, true)]);
    d.notify(RX_QUEUE as u32);
    let used = rig.rx.wait_used(3);
    let total = f.len() as u32;
    assert_eq!(used, vec![(0, 1500), (1, 1500), (2, total - 3000)]);
    let mut got = vec![0u8; f.len()];
    for (i, (addr, len)) in [(RX_DATA, 1500), (RX_DATA + 0x1000, 1500)]
        .into_iter()
        .chain([(RX_DATA + 0x2000, total as usize - 3000)])
        .enumerate()
    {
        view.read_slice(&mut got[i * 1500..i * 1500 + len], GuestAddress(addr))
            .unwrap();
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(counters(&dev)["rx_packets"], 1);
}

#[test]
fn a_receive_chain_the_device_cannot_write_needs_a_reset_and_memory_is_untouched() {
    for bad in [
        [(RX_DATA, 2048, false)],       // device-readable
        [(MEMORY - 0x100, 2048, true)], // past the end of memory
        [(RX_DATA, 8, true)],           // no room for the header
    ] {
        let vm = TestMemory::new(MEMORY);
        let view = vm.mem.vm_memory_view().unwrap();
        let mut rig = Rig::new(&view);
        let (net, peer) = card();
        let dev = MmioTransport::new(net, vm.dm.clone(), None).unwrap();
        let d = Driver { t: &dev };
        rig.activate(&dev, ALL);
        view.write_slice(&[0xee; 64], GuestAddress(RX_DATA))
            .unwrap();
        let _ = vm.device_dirty();
        rig.rx.push(&bad);
        send(&peer, &frame(100, 1));
        d.notify(RX_QUEUE as u32);
        let until = Instant::now() + MAX_WAIT;
        while d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET == 0 {
            assert!(Instant::now() < until, "{bad:?}: no DEVICE_NEEDS_RESET");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        assert_eq!(rig.rx.used_idx(), 0);
        let mut b = [0u8; 64];
        view.read_slice(&mut b, GuestAddress(RX_DATA)).unwrap();
        assert_eq!(b, [0xee; 64], "{bad:?}");
        assert!(dirty_pages(&vm).is_empty(), "{bad:?}");
    }
}

#[test]
fn the_control_queue_acknowledges_an_announce_and_refuses_the_rest() {
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let (net, peer) = card();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dev = MmioTransport::new(net, vm.dm.clone(), Some(irq.try_clone().unwrap())).unwrap();
    let d = Driver { t: &dev };
    rig.activate(&dev, ALL);
    // The announce after a migration: status bit, config interrupt, RARP.
    dev.announce().unwrap();
    let mut st = [0u8; 2];
    dev.read(0, 0x106, &mut st);
    assert_eq!(
        u16::from_le_bytes(st),
        (vn::VIRTIO_NET_S_LINK_UP | vn::VIRTIO_NET_S_ANNOUNCE) as u16
    );
    assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    assert!(irq.read().is_ok());
    let rarp = recv(&peer);
    assert_eq!(rarp.len(), VNET_HDR_LEN + tap::RARP_LEN);
    assert_eq!(&rarp[VNET_HDR_LEN..VNET_HDR_LEN + 6], &[0xff; 6]);
    assert_eq!(&rarp[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12], &MAC);
    assert_eq!(&rarp[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14], &[0x80, 0x35]);
    // The driver acknowledges; then an unknown command.
    for (i, cmd) in [
        [
            vn::VIRTIO_NET_CTRL_ANNOUNCE as u8,
            vn::VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8,
        ],
        [vn::VIRTIO_NET_CTRL_RX as u8, 0],
    ]
    .iter()
    .enumerate()
    {
        let at = CTRL_DATA + 0x100 * i as u64;
        view.write_slice(cmd, GuestAddress(at)).unwrap();
        view.write_obj(0xaau8, GuestAddress(at + 0x10)).unwrap();
        rig.ctrl.push(&[(at, 2, false), (at + 0x10, 1, true)]);
    }
    d.notify(CTRL_QUEUE as u32);
    let used = rig.ctrl.wait_used(2);
    assert_eq!(used, vec![(0, 1), (2, 1)]);
    assert_eq!(rig.ctrl.byte(CTRL_DATA + 0x10), vn::VIRTIO_NET_OK as u8);
    assert_eq!(rig.ctrl.byte(CTRL_DATA + 0x110), vn::VIRTIO_NET_ERR as u8);
    dev.read(0, 0x106, &mut st);
    assert_eq!(u16::from_le_bytes(st), vn::VIRTIO_NET_S_LINK_UP as u16);
}

#[test]
fn state_saved_while_quiesced_restores_and_the_resume_sends_what_the_guest_queued() {
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let (net, peer) = card();
    let dev = MmioTransport::new(net, vm.dm.clone(), None).unwrap();
    let d = Driver { t: &dev };
    rig.activate(&dev, ALL);
    let f1 = frame(60, 1);
    view.write_slice(&f1, GuestAddress(TX_DATA)).unwrap();
    rig.tx.push(&[(TX_DATA, f1.len() as u32, false)]);
    d.notify(TX_QUEUE as u32);
    rig.tx.wait_used(1);
    assert_eq!(recv(&peer), f1);
    // Quiesced: a frame the guest queues is not sent, a frame the TAP
    // has is not received.
    dev.quiesce().unwrap();
    let f2 = frame(70, 2);
    view.write_slice(&f2, GuestAddress(TX_DATA + 0x1000))
        .unwrap();
    rig.tx.push(&[(TX_DATA + 0x1000, f2.len() as u32, false)]);
    d.notify(TX_QUEUE as u32);
    rig.rx.push(&[(RX_DATA, 2048, true)]);
    d.notify(RX_QUEUE as u32);
    let f3 = frame(80, 3);
    send(&peer, &f3);
    std::thread::sleep(Duration::from_millis(20));
    nothing_more(&peer);
    assert_eq!(rig.rx.used_idx(), 0);
    let state = dev.save().unwrap();
    assert_eq!(state.device.mac, MacAddr(MAC));
    assert_eq!(state.device.version, NET_STATE_VERSION);
    assert_eq!(state.queues[TX_QUEUE as usize].next_avail, 1);
    assert_eq!(state.queues[RX_QUEUE as usize].next_used, 0);
    let json = serde_json::to_string(&state).unwrap();
    drop(dev);

    // Restored on the same backend (a NUMA move keeps it; a checkpoint's
    // restore opens the TAP again).
    let state: TransportState<NetState> = serde_json::from_str(&json).unwrap();
    let (net, peer) = card();
    let net = net.restored(&state).unwrap();
    let dev = MmioTransport::restore(net, vm.dm.clone(), None, &state).unwrap();
    send(&peer, &f3);
    dev.resume().unwrap();
    assert_eq!(recv(&peer), f2, "the frame queued while quiesced is sent");
    rig.tx.wait_used(1);
    let used = rig.rx.wait_used(1);
    assert_eq!(used[0].1, f3.len() as u32);
    dev.quiesce().unwrap();
    let after = dev.save().unwrap();
    assert_eq!(after.queues[TX_QUEUE as usize].next_used, 2);
    assert_eq!(after.queues[RX_QUEUE as usize].next_used, 1);
}

#[test]
fn a_restore_on_another_mac_or_a_tap_without_the_negotiated_offloads_is_refused() {
    let vm = TestMemory::new(MEMORY);
    let (net, _peer) = card();
    let dev = MmioTransport::new(net, vm.dm.clone(), None).unwrap();
    let mut state = dev.save().unwrap();
    drop(dev);
    let mut cfg = config();
    cfg.mac = MacAddr([2, 0, 0, 0, 0, 9]);
    let (other, _p) = card_with(cfg);
    let e = other.restored(&state).unwrap_err();
    assert!(matches!(e, NetError::Mismatch { what: "MAC", .. }), "{e}");
    assert!(e.to_string().contains("52:54:00:12:34:56"), "{e}");
    // The guest's driver negotiated checksum offload, which a backend
    // without TAP offloads cannot carry.
    state.acked |= 1 << vn::VIRTIO_NET_F_CSUM;
    let (n, _p) = card();
    let e = n.restored(&state).unwrap_err();
    assert!(matches!(e, NetError::Offloads { .. }), "{e}");
    assert!(e.to_string().contains("csum"), "{e}");
    state.acked = 0;
    state.device.version = 99;
    let (n, _p) = card();
    assert!(matches!(
        n.restored(&state).unwrap_err(),
        NetError::Version { found: 99, .. }
    ));
}

/// Runs `f` on a thread of its own in a fresh network namespace (which
/// goes with the thread): TAPs it creates are nobody else's.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare changes this thread's namespaces only; the
        // thread is ours and ends with `f`.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn a_real_tap_is_created_takes_offloads_and_a_second_opener_is_told_it_is_busy() {
    in_netns(|| {
        let tap = Tap::open("vmhtest0").unwrap();
        let offloads = tap.probe_offloads();
        assert!(
            offloads & tap::offload::CSUM != 0,
            "this kernel's TAP takes checksum offload: {offloads:#x}"
        );
        tap.set_offload(tap::offload::CSUM | tap::offload::TSO4)
            .unwrap();
        let e = Tap::open("vmhtest0").unwrap_err();
        assert_eq!(e.os_error().raw_os_error(), Some(libc::EBUSY), "{e}");
        assert!(e.to_string().contains("busy"), "{e}");
        let e = NetError::Tap {
            id: "net0".into(),
            source: e,
        };
        assert_eq!(e.kind(), ErrorKind::Conflict);
        // A card on it offers the offloads the TAP takes.
        let n = Net::new(NetConfig {
            tap: "vmhtest1".into(),
            mac: MacAddr(MAC),
            id: "net1".into(),
        })
        .unwrap();
        assert!(n.features() & 1 << vn::VIRTIO_NET_F_GUEST_CSUM != 0);
        assert!(n.features() & 1 << vn::VIRTIO_NET_F_CSUM != 0);
    });
}

#[test]
fn bad_net_options_are_refused_with_the_reason() {
    for (spec, needle) in [
        ("mac=52:54:00:12:34:56", "names no tap"),
        ("tap=a/b", "not an interface name"),
        ("tap=averyveryverylongname", "not an interface name"),
        ("tap=t0,mac=52:54:00:12:34", "six hexadecimal octets"),
        ("tap=t0,mac=53:54:00:12:34:56", "multicast"),
        ("tap=t0,mac=00:00:00:00:00:00", "all zeros"),
        ("tap=t0,speed=10", "unknown option"),
    ] {
        let e = NetConfig::parse(spec, "net0").unwrap_err().to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
    let c = NetConfig::parse("tap=t0,id=lan", "net0").unwrap();
    assert_eq!(c.id, "lan");
    assert_eq!(c.mac.0[0] & 3, 2, "random MACs are local unicast");
    let c = NetConfig::parse("tap=t0,mac=52:54:00:ab:cd:ef", "net3").unwrap();
    assert_eq!(c.id, "net3");
    assert_eq!(c.mac.to_string(), "52:54:00:ab:cd:ef");
}

#[test]
fn frames_waiting_in_the_tap_or_the_device_survive_a_quiesce_and_resume() {
    // What a NUMA move does to the card: quiesce, resume, same device.
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let (net, peer) = card();
    let dev = MmioTransport::new(net, vm.dm.clone(), None).unwrap();
    let d = Driver { t: &dev };
    rig.activate(&dev, ALL);
    // A large frame waits in the device for more mergeable buffers.
    let big = frame(3000, 21);
    rig.rx.push(&[(RX_DATA, 1500, true)]);
    d.notify(RX_QUEUE as u32);
    send(&peer, &big);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.rx.used_idx(), 0);
    dev.quiesce().unwrap();
    // Frames the TAP gets meanwhile wait in it.
    let small = frame(100, 22);
    send(&peer, &small);
    rig.rx.push(&[(RX_DATA + 0x1000, 1500, true)]);
    rig.rx.push(&[(RX_DATA + 0x2000, 1500, true)]);
    rig.rx.push(&[(RX_DATA + 0x3000, 1500, true)]);
    d.notify(RX_QUEUE as u32);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.rx.used_idx(), 0, "nothing delivered while quiesced");
    dev.resume().unwrap();
    let used = rig.rx.wait_used(4);
    assert_eq!(
        used,
        vec![
            (0, 1500),
            (1, 1500),
            (2, big.len() as u32 - 3000),
            (3, small.len() as u32)
        ]
    );
    let mut got = vec![0u8; small.len()];
    view.read_slice(&mut got, GuestAddress(RX_DATA + 0x3000))
        .unwrap();
    assert_eq!(&got[VNET_HDR_LEN..], &small[VNET_HDR_LEN..]);
    let c = counters(&dev);
    assert_eq!((c["rx_packets"], c["rx_dropped"]), (2, 0));
}
