//! virtio-vsock driven through the transport's registers and
//! `MockSplitQueue`s over guest memory, with real Unix sockets on the host
//! side (in a private directory of the test's own).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::muxer::{
    op, CONN_BUF, MAX_PENDING_CTRL, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::*;
use crate::devices::virtio::mmio::regs::*;
use crate::devices::virtio::testing::{Driver, DriverQueue, TestMemory, MAX_WAIT};
use crate::devices::virtio::{status, MmioTransport};
use crate::memory::PAGE_SIZE;
use crate::vmm::bus::MmioDevice;

const MEMORY: u64 = 16 << 20;
const RXQ: u64 = 0x10000;
const TXQ: u64 = 0x20000;
const EVQ: u64 = 0x30000;
/// Receive buffers: a header and a data buffer, one page per chain.
const RX_DATA: u64 = 0x100000;
const EV_DATA: u64 = 0x300000;
/// Transmit packets, a 68 KiB slot each.
const TX_DATA: u64 = 0x400000;
const TX_SLOT: u64 = 0x11000;
const GUEST_CID: u64 = 3;
const HDR: usize = 44;
/// The guest's receive buffer per connection, as it tells the device.
const GUEST_BUF: u32 = 1 << 20;

/// A packet header as the spec lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    /// From guest port `src` to host port `dst`.
    fn guest(src: u32, dst: u32, op: u16) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF,
            fwd_cnt: 0,
        }
    }

    fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Hdr {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A private directory (mode 0700) for the device's sockets.
fn private_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vsock")
        .tempdir()
        .expect("a temporary directory")
}

fn config(dir: &tempfile::TempDir) -> VsockConfig {
    VsockConfig {
        cid: GUEST_CID,
        socket: dir.path().join("v.sock"),
    }
}

struct Rig<'m> {
    view: &'m vm_memory::GuestMemoryMmap,
    rx: DriverQueue<'m>,
    tx: DriverQueue<'m>,
    ev: DriverQueue<'m>,
    /// The next transmit slot.
    tx_next: u64,
    /// The receive chain of the last packet taken.
    last_head: u64,
}

impl<'m> Rig<'m> {
    fn new(view: &'m vm_memory::GuestMemoryMmap) -> Self {
        Rig {
            view,
            rx: DriverQueue::new(view, RXQ, QUEUE_SIZE),
            tx: DriverQueue::new(view, TXQ, QUEUE_SIZE),
            ev: DriverQueue::new(view, EVQ, QUEUE_SIZE),
            tx_next: 0,
            last_head: 0,
        }
    }

    /// Activates the device and posts `rx` receive chains (header and
    /// data buffer, split as Linux before 6.2 does).
    fn activate(&mut self, dev: &MmioTransport<Vsock>, rx: u16) {
        Driver { t: dev }.activate_queues(&[&self.rx, &self.tx, &self.ev], u64::MAX);
        self.post_rx(rx);
    }

    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let at = RX_DATA + self.rx.next_head() as u64 * 2 * PAGE_SIZE;
            self.rx
                .push(&[(at, HDR as u32, true), (at + PAGE_SIZE, 4096, true)]);
        }
    }

    /// The guest transmits `h` with `data`, header and data in one buffer.
    fn send(&mut self, dev: &MmioTransport<Vsock>, mut h: Hdr, data: &[u8]) {
        h.len = data.len() as u32;
        let at = TX_DATA + (self.tx_next % 64) * TX_SLOT;
        self.tx_next += 1;
        self.view.write_slice(&h.bytes(), GuestAddress(at)).unwrap();
        self.view
            .write_slice(data, GuestAddress(at + HDR as u64))
            .unwrap();
        self.tx.push(&[(at, (HDR + data.len()) as u32, false)]);
        Driver { t: dev }.notify(TX_QUEUE as u32);
        assert_eq!(
            self.tx.wait_used(1)[0].1,
            0,
            "transmit chains are used with 0 bytes"
        );
    }

    /// The next packet the device put in a receive buffer, and its data.
    fn recv(&mut self) -> (Hdr, Vec<u8>) {
        // The device may have used several buffers: take the next one.
        let until = Instant::now() + MAX_WAIT;
        while self.rx.used_idx() == self.rx.used_seen {
            assert!(Instant::now() < until, "no packet for the guest");
            std::thread::sleep(Duration::from_micros(200));
        }
        let e = self
            .rx
            .mock
            .used()
            .ring()
            .ref_at((self.rx.used_seen % QUEUE_SIZE) as usize)
            .unwrap()
            .load();
        self.rx.used_seen = self.rx.used_seen.wrapping_add(1);
        let (head, len) = (e.id(), e.len());
        self.last_head = head as u64;
        let at = RX_DATA + head as u64 * 2 * PAGE_SIZE;
        let mut b = [0u8; HDR];
        self.view.read_slice(&mut b, GuestAddress(at)).unwrap();
        let h = Hdr::parse(&b);
        assert_eq!(len, HDR as u32 + h.len, "used length: header and data");
        let mut data = vec![0u8; h.len as usize];
        self.view
            .read_slice(&mut data, GuestAddress(at + PAGE_SIZE))
            .unwrap();
        assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID), "{h:?}");
        assert_eq!(h.type_, TYPE_STREAM);
        // A buffer goes back, as a driver does.
        self.post_rx(1);
        (h, data)
    }

    /// No packet arrives for the guest until the device has served the
    /// notification below (a transmit it uses proves it ran).
    fn nothing_more(&mut self, dev: &MmioTransport<Vsock>) {
        // A packet for a port nobody uses: its RST is the next packet.
        self.send(dev, Hdr::guest(9, 9, op::CREDIT_REQUEST), &[]);
        let (h, _) = self.recv();
        assert_eq!((h.op, h.dst_port), (op::RST, 9), "unexpected: {h:?}");
    }
}

fn device(dir: &tempfile::TempDir, vm: &TestMemory) -> MmioTransport<Vsock> {
    MmioTransport::new(Vsock::new(config(dir)).unwrap(), vm.dm.clone(), None).unwrap()
}

/// Reads exactly `n` bytes from a blocking host socket (bounded wait).
fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(MAX_WAIT)).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("the host socket got the bytes");
    b
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(MAX_WAIT)).unwrap();
    let mut line = Vec::new();
    let mut c = [0u8];
    while c[0] != b'\n' {
        s.read_exact(&mut c).expect("a line from the device");
        line.push(c[0]);
    }
    String::from_utf8(line).unwrap()
}

/// The host side reads EOF (bounded wait).
fn assert_eof(s: &mut UnixStream) {
    s.set_read_timeout(Some(MAX_WAIT)).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        r => panic!("expected EOF on the host socket, got {r:?}"),
    }
}

/// A host process connects and CONNECTs to guest port `port`; the guest
/// accepts. Returns the host socket and the host port.
fn host_connect(
    rig: &mut Rig<'_>,
    dev: &MmioTransport<Vsock>,
    path: &PathBuf,
    port: u32,
) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (h, _) = rig.recv();
    assert_eq!((h.op, h.dst_port), (op::REQUEST, port), "{h:?}");
    assert!(h.src_port >= 1 << 30, "a host port of the device's: {h:?}");
    assert_eq!(h.buf_alloc, CONN_BUF);
    rig.send(dev, Hdr::guest(port, h.src_port, op::RESPONSE), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", h.src_port));
    (s, h.src_port)
}

#[test]
fn configuration_space_is_the_guest_cid_and_the_socket_is_private() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let dev = device(&dir, &vm);
    let d = Driver { t: &dev };
    assert_eq!(d.r(VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
    let mut cfg = [0u8; 8];
    dev.read(0, 0x100, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), GUEST_CID);
    let path = config(&dir).socket;
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600, "socket mode");
    drop(dev);
    assert!(!path.exists(), "the socket goes with the device");
}

#[test]
fn host_connect_reaches_the_guest_listener_and_bytes_flow_both_ways() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let dev = device(&dir, &vm);
    rig.activate(&dev, 16);
    let _ = vm.device_dirty();
    let path = config(&dir).socket;
    let (mut s, hp) = host_connect(&mut rig, &dev, &path, 1234);
    // Host to guest; bytes written right after the CONNECT line reach the
    // guest too.
    s.write_all(b"hello").unwrap();
    let (h, data) = rig.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, hp, 1234));
    assert_eq!(data, b"hello");
    // What the device wrote into guest memory is dirty: the header and the
    // data page of the receive buffer.
    let dirty: BTreeSet<u64> = vm
        .device_dirty()
        .into_iter()
        .flat_map(|(f, n)| f..f + n)
        .collect();
    let page = (RX_DATA + rig.last_head * 2 * PAGE_SIZE) / PAGE_SIZE;
    assert!(dirty.contains(&page), "header page {page}: {dirty:?}");
    assert!(
        dirty.contains(&(page + 1)),
        "data page {}: {dirty:?}",
        page + 1
    );
    // Guest to host.
    rig.send(&dev, Hdr::guest(1234, hp, op::RW), b"world");
    assert_eq!(read_n(&mut s, 5), b"world");
    let c = dev.device().counters().snapshot();
    assert_eq!(c["connections"], 1);
    assert_eq!(c["rx_bytes"], 5);
    assert_eq!(c["tx_bytes"], 5);
    rig.nothing_more(&dev);
}

#[test]
fn a_guest_connection_to_host_port_p_reaches_path_p_or_is_reset() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let dev = device(&dir, &vm);
    rig.activate(&dev, 16);
    let mut p = config(&dir).socket.into_os_string();
    p.push("_5000");
    let listener = UnixListener::bind(&p).unwrap();
    rig.send(&dev, Hdr::guest(40000, 5000, op::REQUEST), &[]);
    let (h, _) = rig.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, 5000, 40000));
    let (mut s, _) = listener.accept().unwrap();
    rig.send(&dev, Hdr::guest(40000, 5000, op::RW), b"ping");
    assert_eq!(read_n(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    let (h, data) = rig.recv();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"pong"[..]));
    // Nobody listens on port 5001.
    rig.send(&dev, Hdr::guest(40001, 5001, op::REQUEST), &[]);
    let (h, _) = rig.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 5001, 40001));
}

#[test]
fn the_device_sends_no_more_than_the_guest_s_credit_and_asks_for_more() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let dev = device(&dir, &vm);
    rig.activate(&dev, 16);
    let path = config(&dir).socket;
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 7\n").unwrap();
    let (h, _) = rig.recv();
    let hp = h.src_port;
    let mut resp = Hdr::guest(7, hp, op::RESPONSE);
    resp.buf_alloc = 100;
    rig.send(&dev, resp, &[]);
    assert_eq!(read_line(&mut s), format!("OK {hp}\n"));
    s.write_all(&[0x5a; 300]).unwrap();
    let mut got = 0;
    while got < 100 {
        let (h, data) = rig.recv();
        assert_eq!(h.op, op::RW, "{h:?}");
        got += data.len();
    }
    assert_eq!(got, 100, "exactly the credit");
    let (h, _) = rig.recv();
    assert_eq!(h.op, op::CREDIT_REQUEST, "out of credit, the device asks");
    // The guest consumed 100 bytes: 100 more may come, no more.
    let mut upd = Hdr::guest(7, hp, op::CREDIT_UPDATE);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    rig.send(&dev, upd, &[]);
    let mut got = 0;
    while got < 100 {
        let (h, data) = rig.recv();
        assert_eq!(h.op, op::RW, "{h:?}");
        got += data.len();
    }
    assert_eq!(got, 100);
    let (h, _) = rig.recv();
    assert_eq!(h.op, op::CREDIT_REQUEST);
    rig.nothing_more(&dev);
    // The device's own credit: a CREDIT_REQUEST is answered with its
    // buffer and what it wrote to the host socket.
    // (The guest's own credit stays as it was: nothing for it.)
    let mut rw = Hdr::guest(7, hp, op::RW);
    rw.buf_alloc = 100;
    rw.fwd_cnt = 100;
    rig.send(&dev, rw, &[1; 1000]);
    let mut ask = rw;
    ask.op = op::CREDIT_REQUEST;
    rig.send(&dev, ask, &[]);
    let (h, _) = rig.recv();
    assert_eq!(
        (h.op, h.buf_alloc, h.fwd_cnt),
        (op::CREDIT_UPDATE, CONN_BUF, 1000)
    );
}

#[test]
fn a_guest_that_sends_beyond_the_device_s_credit_is_reset() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let dev = device(&dir, &vm);
    rig.activate(&dev, 16);
    let path = config(&dir).socket;
    // The host process never reads: its socket fills, then the device's
    // buffer.
    let (mut s, hp) = host_connect(&mut rig, &dev, &path, 8);
    let chunk = vec![7u8; MAX_PKT_DATA as usize];
    let mut sent = 0u64;
    let rst = loop {
        rig.send(&dev, Hdr::guest(8, hp, op::RW), &chunk);
        sent += chunk.len() as u64;
        // Credit updates come as the host socket takes bytes; then the
        // reset.
        let mut last = None;
        while rig.rx.used_idx() != rig.rx.used_seen {
            let (h, _) = rig.recv();
            assert!(matches!(h.op, op::CREDIT_UPDATE | op::RST), "{h:?}");
            last = Some(h);
        }
        if let Some(h) = last.filter(|h| h.op == op::RST) {
            break h;
        }
        assert!(sent < 64 << 20, "no reset after {sent} bytes");
    };
    assert_eq!(rst.op, op::RST, "{rst:?}");
    assert!(
        sent > CONN_BUF as u64,
        "reset only beyond the credit ({sent})"
    );
    // The host process reads what was written, then EOF.
    s.set_read_timeout(Some(MAX_WAIT)).unwrap();
    let mut b = vec![0u8; 1 << 16];
    while s.read(&mut b).unwrap() > 0 {}
    assert!(dev.device().counters().snapshot()["dropped"] >= 1);
}

#[test]
fn rst_and_shutdown_end_connections_on_both_sides() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let dev = device(&dir, &vm);
    rig.activate(&dev, 16);
    let path = config(&dir).socket;
    // The guest resets: the host process reads EOF.
    let (mut a, ap) = host_connect(&mut rig, &dev, &path, 10);
    rig.send(&dev, Hdr::guest(10, ap, op::RST), &[]);
    assert_eof(&mut a);
    // The guest shuts both directions down: EOF, and an RST to the guest.
    let (mut b, bp) = host_connect(&mut rig, &dev, &path, 11);
    let mut sh = Hdr::guest(11, bp, op::SHUTDOWN);
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    rig.send(&dev, sh, &[]);
    let (h, _) = rig.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, bp, 11));
    assert_eof(&mut b);
    // The guest stops sending: the host reads what came, then EOF, and can
    // still send.
    let (mut c, cp) = host_connect(&mut rig, &dev, &path, 12);
    rig.send(&dev, Hdr::guest(12, cp, op::RW), b"last");
    let mut sh = Hdr::guest(12, cp, op::SHUTDOWN);
    sh.flags = SHUTDOWN_SEND;
    rig.send(&dev, sh, &[]);
    assert_eq!(read_n(&mut c, 4), b"last");
    assert_eof(&mut c);
    c.write_all(b"reply").unwrap();
    let (h, data) = rig.recv();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"reply"[..]));
    // The host process closes: the guest gets a SHUTDOWN of both
    // directions; its RST ends the connection.
    drop(c);
    let (h, _) = rig.recv();
    assert_eq!(
        (h.op, h.flags),
        (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    );
    rig.send(&dev, Hdr::guest(12, cp, op::RST), &[]);
    // A packet for no connection is reset.
    rig.send(&dev, Hdr::guest(13, 99, op::RW), b"x");
    let (h, _) = rig.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 99, 13));
    assert_eq!(dev.device().counters().snapshot()["connections"], 0);
    // A malformed CONNECT line closes the host socket.
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.write_all(b"HELLO 1\n").unwrap();
    assert_eof(&mut bad);
    rig.nothing_more(&dev);
}

#[test]
fn malformed_chains_are_dropped_without_harm() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let dev = device(&dir, &vm);
    rig.activate(&dev, 0);
    let d = Driver { t: &dev };
    let h = Hdr::guest(1, 2, op::REQUEST).bytes();
    view.write_slice(&h, GuestAddress(TX_DATA)).unwrap();
    let mut big = Hdr::guest(1, 2, op::RW);
    big.len = MAX_PKT_DATA + 1;
    view.write_slice(&big.bytes(), GuestAddress(TX_DATA + 0x1000))
        .unwrap();
    let mut cid = Hdr::guest(1, 2, op::REQUEST);
    cid.src_cid = 77;
    view.write_slice(&cid.bytes(), GuestAddress(TX_DATA + 0x2000))
        .unwrap();
    let chains: [&[(u64, u32, bool)]; 5] = [
        // A device-writable header.
        &[(TX_DATA, HDR as u32, true)],
        // A header shorter than a header.
        &[(TX_DATA, 20, false)],
        // A header outside guest memory.
        &[(MEMORY + 0x1000, HDR as u32, false)],
        // A payload over the limit.
        &[
            (TX_DATA + 0x1000, HDR as u32, false),
            (TX_DATA + 0x8000, 0x20000, false),
        ],
        // Another guest's cid.
        &[(TX_DATA + 0x2000, HDR as u32, false)],
    ];
    for c in chains {
        rig.tx.push(c);
    }
    d.notify(TX_QUEUE as u32);
    let used = rig.tx.wait_used(chains.len() as u16);
    assert!(used.iter().all(|u| u.1 == 0), "{used:?}");
    // Receive buffers the device cannot write: returned unused.
    rig.rx
        .push(&[(RX_DATA, HDR as u32, false), (RX_DATA + 0x1000, 4096, true)]);
    rig.rx.push(&[
        (MEMORY - 8, HDR as u32, true),
        (RX_DATA + 0x1000, 4096, true),
    ]);
    rig.rx.push(&[(RX_DATA, 8, true)]);
    rig.send(&dev, Hdr::guest(5, 6, op::RW), b"?");
    let used = rig.rx.wait_used(3);
    assert!(used.iter().all(|u| u.1 == 0), "{used:?}");
    let c = dev.device().counters().snapshot();
    assert_eq!(c["dropped"], 8, "{c:?}");
    assert_eq!(d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET, 0);
    // The device still serves: the RST for that packet comes once there
    // are buffers.
    rig.post_rx(4);
    d.notify(RX_QUEUE as u32);
    let (h, _) = rig.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 6, 5));
    rig.nothing_more(&dev);
}

#[test]
fn a_quiesce_keeps_connections_and_a_restore_resets_the_transport() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let dev = device(&dir, &vm);
    rig.activate(&dev, 16);
    rig.ev.push(&[(EV_DATA, 4, true)]);
    let path = config(&dir).socket;
    let (mut s, hp) = host_connect(&mut rig, &dev, &path, 20);
    // A checkpoint or a NUMA move: quiesce, save, resume. Bytes the host
    // sends meanwhile wait; the connection carries on.
    dev.quiesce().unwrap();
    let saved = dev.save().unwrap();
    s.write_all(b"during").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        rig.rx.used_idx(),
        rig.rx.used_seen,
        "nothing while quiesced"
    );
    dev.resume().unwrap();
    let (h, data) = rig.recv();
    assert_eq!(
        (h.op, h.src_port, data.as_slice()),
        (op::RW, hp, &b"during"[..])
    );
    rig.send(&dev, Hdr::guest(20, hp, op::RW), b"after");
    assert_eq!(read_n(&mut s, 5), b"after");
    assert_eq!(rig.ev.used_idx(), 0, "no transport reset without a restore");
    assert_eq!(
        saved.device,
        VsockState {
            version: VSOCK_STATE_VERSION,
            cid: GUEST_CID
        }
    );
    // The state a migration or a checkpoint takes now, through JSON as a
    // checkpoint keeps it.
    dev.quiesce().unwrap();
    let saved = dev.save().unwrap();
    let json: TransportState<VsockState> =
        serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
    // The VM ends (its host connections close); its restore on another
    // socket tells the guest its transport was reset.
    drop(dev);
    assert_eof(&mut s);
    let cfg2 = VsockConfig {
        cid: GUEST_CID,
        socket: dir.path().join("w.sock"),
    };
    let restored = <MmioTransport<Vsock> as Persist>::restore(
        (cfg2.clone(), vm.dm.clone(), None),
        Some(&json),
    )
    .unwrap();
    Persist::resume(&restored).unwrap();
    let until = Instant::now() + MAX_WAIT;
    while rig.ev.used_idx() == 0 {
        assert!(Instant::now() < until, "no TRANSPORT_RESET event");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rig.ev.wait_used(1)[0].1, 4);
    let id: u32 = view.read_obj(GuestAddress(EV_DATA)).unwrap();
    assert_eq!(id, super::muxer::EVENT_TRANSPORT_RESET);
    assert_eq!(
        restored.device().counters().snapshot()["transport_resets"],
        1
    );
    // And a new connection works on the restored device.
    let (mut s2, hp2) = host_connect(&mut rig, &restored, &cfg2.socket, 21);
    rig.send(&restored, Hdr::guest(21, hp2, op::RW), b"again");
    assert_eq!(read_n(&mut s2, 5), b"again");
    // Another cid is refused.
    let e = Vsock::restore(
        VsockConfig {
            cid: 4,
            socket: dir.path().join("x.sock"),
        },
        &json.device,
    )
    .unwrap_err();
    assert!(matches!(e, VsockError::Cid { saved: 3, here: 4 }), "{e}");
}

#[test]
fn socket_paths_that_exist_or_sit_in_a_shared_directory_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = private_dir();
    let taken = dir.path().join("taken");
    std::fs::write(&taken, b"").unwrap();
    let e = Vsock::new(VsockConfig {
        cid: 3,
        socket: taken.clone(),
    })
    .unwrap_err();
    assert!(matches!(e, VsockError::Exists { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind2::Conflict);
    assert!(e.to_string().contains("exists already"), "{e}");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let e = Vsock::new(VsockConfig {
        cid: 3,
        socket: shared.join("v.sock"),
    })
    .unwrap_err();
    assert!(matches!(e, VsockError::UnsafeDirectory { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind2::Unusable);
    assert!(!shared.join("v.sock").exists());
    let e = Vsock::new(VsockConfig {
        cid: 3,
        socket: dir.path().join("missing/v.sock"),
    })
    .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    assert_eq!(e.kind(), ErrorKind2::NotFound);
}

use crate::api::ErrorKind as ErrorKind2;

#[test]
fn a_guest_that_never_takes_its_answers_cannot_grow_the_device_s_queue() {
    let dir = private_dir();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut rig = Rig::new(&view);
    let dev = device(&dir, &vm);
    rig.activate(&dev, 0);
    // Packets for no connection, each owed an RST, with no receive buffer.
    let extra = 10;
    for i in 0..(MAX_PENDING_CTRL + extra) as u32 {
        rig.send(&dev, Hdr::guest(1, 1000 + i, op::RW), b"x");
    }
    assert_eq!(
        dev.device().counters().snapshot()["dropped"],
        extra as u64,
        "answers beyond the cap are dropped"
    );
    // Once buffers come, the answers kept arrive in order.
    rig.post_rx(8);
    Driver { t: &dev }.notify(RX_QUEUE as u32);
    for i in 0..8 {
        let (h, _) = rig.recv();
        assert_eq!((h.op, h.src_port), (op::RST, 1000 + i), "{h:?}");
    }
}
