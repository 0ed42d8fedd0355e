//! virtio-vsock's connections, on the device's worker thread: host sockets
//! joined to guest ports, the packets that carry them, and credit-based
//! flow control (virtio 1.2, 5.10.6).
//!
//! Connections: a host process that connects to `PATH` is asked for one
//! line, `CONNECT <port>\n` (read a byte at a time, so that what follows
//! it stays in the socket for the guest); the device then sends the guest
//! a REQUEST from a host port of its own and answers `OK <hostport>\n` on
//! the guest's RESPONSE (its RST closes the host socket). A guest REQUEST
//! to host port P connects to the listener at `PATH_P`: RESPONSE, or RST
//! if nobody listens there.
//!
//! Flow control: the device never sends the guest more than the guest's
//! credit (its `buf_alloc` less what the device sent beyond its
//! `fwd_cnt`), reading the host socket only as far as that credit and the
//! guest's receive buffer allow; it asks for credit (CREDIT_REQUEST) when
//! it has none. Each connection takes [`CONN_BUF`] bytes from the guest
//! beyond what it wrote to its host socket (its `buf_alloc`); a guest that
//! sends more is reset. The device tells the guest its `fwd_cnt` on every
//! packet, and on its own (CREDIT_UPDATE) once a quarter of the buffer was
//! written since it last did, or when asked.
//!
//! Ends: the guest's RST, or a write to the host socket that fails, ends a
//! connection (the host socket is closed: the host process reads EOF). A
//! SHUTDOWN from the guest shuts the host socket's direction(s) down; with
//! both directions it ends the connection with an RST. A host socket that
//! reaches EOF sends the guest a SHUTDOWN of both directions; the guest's
//! RST then ends it. A packet for no connection is answered with an RST.
//!
//! Bad input: a transmit chain the packet types reject (a device-writable
//! header, a short header, a payload over [`MAX_PKT_DATA`] or outside
//! guest memory), a packet not from the guest's cid or not to the host's,
//! is dropped and counted; a receive or event buffer the device cannot
//! write is returned unused (length 0) and counted. Answers waiting for
//! receive buffers are capped ([`MAX_PENDING_CTRL`]). Nothing here panics
//! on what the guest wrote.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{Counters, Shared, EVENT_QUEUE, HOST_CID, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{serve_requests, QueueBroken, QueueHandler, Rings};
use crate::memory::DeviceGuestMemory;

/// Largest payload of one packet either way (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Bytes from the guest a connection holds for its host socket (its
/// `buf_alloc`).
pub const CONN_BUF: u32 = 256 * 1024;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First host port the device gives host-initiated connections (as
/// Firecracker, well above the ports host listeners use).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll token of the listener.
const LISTENER: u64 = 0;
/// Most header-only packets waiting for receive buffers: a guest that
/// sends without ever taking its answers gets no more of them (dropped and
/// counted) rather than growing the queue without end.
pub const MAX_PENDING_CTRL: usize = 1024;

/// Operations (virtio 1.2, 5.10.6).
pub mod op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Connected.
    pub const RESPONSE: u16 = 2;
    /// Reset: the connection is gone.
    pub const RST: u16 = 3;
    /// No more data in the directions the flags say.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Here is my credit.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Tell me your credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender receives no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender sends no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// The only socket type served.
pub const TYPE_STREAM: u16 = 1;
/// Event id: the transport was reset (a restore, a migration).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The handler for the device; one that cannot be made breaks the device
/// (DEVICE_NEEDS_RESET) at its first use.
pub(super) fn handler(shared: Arc<Shared>) -> Box<dyn QueueHandler> {
    match Muxer::new(shared.clone()) {
        Ok(m) => Box::new(m),
        Err(e) => Box::new(Broken(format!(
            "{}: cannot serve socket {}: {e}",
            shared.name,
            shared.path.display()
        ))),
    }
}

struct Broken(String);

impl QueueHandler for Broken {
    fn notified(&mut self, _: &mut Rings<'_>, _: u16) -> Result<(), QueueBroken> {
        Err(QueueBroken(self.0.clone()))
    }
}

/// A connection: (host port, guest port).
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The host process connected; the device asked the guest (REQUEST).
    LocalInit,
    /// Both ends connected.
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// The guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: Wrapping<u32>,
    /// Bytes from the guest the host socket did not take yet.
    pending: VecDeque<u8>,
    /// The host socket may have data (edge-triggered: cleared when a
    /// read finds none).
    readable: bool,
    /// The host socket reached EOF (the guest was sent a SHUTDOWN).
    host_eof: bool,
    /// The guest sends no more: shut the host socket's write side once
    /// `pending` is written.
    peer_done_sending: bool,
    /// The guest receives no more: stop reading the host socket.
    peer_done_receiving: bool,
    /// A CREDIT_REQUEST went out and no credit came since.
    credit_asked: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Conn {
        Conn {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            pending: VecDeque::new(),
            readable: true,
            host_eof: false,
            peer_done_sending: false,
            peer_done_receiving: false,
            credit_asked: false,
        }
    }

    /// Bytes the guest has room for.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the device has data for the guest now.
    fn has_rx_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.peer_done_receiving
            && self.peer_credit() > 0
    }

    /// Writes what the host socket takes of `pending`; Err: it failed.
    fn flush(&mut self) -> std::io::Result<u32> {
        let mut n = 0u32;
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(k) => {
                    self.pending.drain(..k);
                    n += k as u32;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.fwd_cnt += Wrapping(n);
        if self.pending.is_empty() && self.peer_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(n)
    }
}

/// A host process that connected and has not finished its CONNECT line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A header-only packet for the guest.
#[derive(Debug, Clone, Copy)]
struct Ctrl {
    key: Key,
    op: u16,
    flags: u32,
}

struct Muxer {
    shared: Arc<Shared>,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    /// Epoll token of each connection.
    tokens: HashMap<u64, Key>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    next_local_port: u32,
    /// Header-only packets waiting for receive buffers, in order.
    ctrl: VecDeque<Ctrl>,
    /// TRANSPORT_RESET to deliver on the event queue.
    reset_pending: bool,
    scratch: Vec<u8>,
}

fn drop_count(shared: &Shared, why: &str) {
    tracing::debug!("{}: dropped: {why}", shared.name);
    Counters::add(&shared.counters.dropped, 1);
}

impl Muxer {
    fn new(shared: Arc<Shared>) -> std::io::Result<Muxer> {
        let listener = shared.listener.try_clone()?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER),
        )?;
        let reset_pending = shared.reset_pending.swap(false, Ordering::SeqCst);
        Ok(Muxer {
            shared,
            listener,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: LISTENER + 1,
            next_local_port: FIRST_LOCAL_PORT,
            ctrl: VecDeque::new(),
            reset_pending,
            scratch: vec![0; MAX_PKT_DATA as usize],
        })
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn watch(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                token,
            ),
        )
    }

    fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn add_conn(&mut self, key: Key, conn: Conn) {
        self.tokens.insert(conn.token, key);
        self.conns.insert(key, conn);
    }

    /// Ends connection `key` (its host socket closes); `rst`: tell the
    /// guest.
    fn kill(&mut self, key: Key, rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if c.state == State::Established {
                self.counters().connections.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.ctrl.retain(|p| p.key != key);
        if rst {
            self.send_ctrl(key, op::RST, 0);
        }
    }

    fn send_ctrl(&mut self, key: Key, op: u16, flags: u32) {
        if self.ctrl.len() >= MAX_PENDING_CTRL {
            return drop_count(
                &self.shared,
                &format!("answer {op} to port {}: the guest takes no answers", key.1),
            );
        }
        self.ctrl.push_back(Ctrl { key, op, flags });
    }

    fn established(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.state = State::Established;
            Counters::add(&self.shared.counters.connections, 1);
            Counters::add(&self.shared.counters.connections_total, 1);
        }
    }

    /// A host port for a host-initiated connection to guest port `peer`.
    fn local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = match p.checked_add(1) {
                Some(n) if n != u32::MAX => n,
                _ => FIRST_LOCAL_PORT,
            };
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    // ---- host side ----

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let t = self.token();
                    if self.watch(s.as_raw_fd(), t).is_ok() {
                        self.handshakes.insert(
                            t,
                            Handshake {
                                stream: s,
                                line: Vec::new(),
                            },
                        );
                        self.handshake(t);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: the connection waits in the
                    // backlog for the next event.
                    tracing::warn!("{}: accept: {e}", self.shared.name);
                    return;
                }
            }
        }
    }

    /// Reads the CONNECT line of handshake `t`, a byte at a time.
    fn handshake(&mut self, t: u64) {
        let Some(h) = self.handshakes.get_mut(&t) else {
            return;
        };
        let mut b = [0u8];
        let done = loop {
            match h.stream.read(&mut b) {
                Ok(0) => break Err(()),
                Ok(_) if b[0] == b'\n' => break Ok(()),
                Ok(_) if h.line.len() >= MAX_CONNECT_LINE => break Err(()),
                Ok(_) => h.line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break Err(()),
            }
        };
        let Some(h) = self.handshakes.remove(&t) else {
            return;
        };
        let port = std::str::from_utf8(&h.line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let (Ok(()), Some(peer)) = (done, port) else {
            // Closing it is the answer to a malformed line.
            tracing::debug!(
                "{}: a host connection sent {:?}, not CONNECT <port>",
                self.shared.name,
                String::from_utf8_lossy(&h.line)
            );
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            return;
        };
        let local = self.local_port(peer);
        let key = (local, peer);
        self.add_conn(key, Conn::new(h.stream, t, State::LocalInit));
        self.send_ctrl(key, op::REQUEST, 0);
    }

    /// A host socket is ready: flush what waits for it; note it readable.
    fn host_ready(&mut self, t: u64, ev: EventSet) {
        if self.handshakes.contains_key(&t) {
            self.handshake(t);
            return;
        }
        let Some(&key) = self.tokens.get(&t) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if ev.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            c.readable = true;
        }
        if ev.contains(EventSet::OUT) && !c.pending.is_empty() {
            match c.flush() {
                Ok(_) => self.maybe_credit_update(key),
                Err(_) => self.kill(key, true),
            }
        }
    }

    /// Tells the guest this connection's credit if a quarter of the buffer
    /// was written since it last heard.
    fn maybe_credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get(&key) {
            if (c.fwd_cnt - c.fwd_cnt_told).0 >= CONN_BUF / 4
                && !self
                    .ctrl
                    .iter()
                    .any(|p| p.key == key && p.op == op::CREDIT_UPDATE)
            {
                self.send_ctrl(key, op::CREDIT_UPDATE, 0);
            }
        }
    }

    // ---- guest to device ----

    /// One transmit chain; its used length is 0.
    fn transmit(
        &mut self,
        mem: &DeviceGuestMemory,
        mut chain: DescriptorChain<&DeviceGuestMemory>,
    ) {
        let pkt = match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(p) => p,
            Err(e) => return drop_count(&self.shared, &format!("transmit chain: {e}")),
        };
        if pkt.src_cid() != self.shared.cid || pkt.dst_cid() != HOST_CID {
            return drop_count(
                &self.shared,
                &format!(
                    "a packet from cid {} to cid {} (the guest is {}, the host {HOST_CID})",
                    pkt.src_cid(),
                    pkt.dst_cid(),
                    self.shared.cid
                ),
            );
        }
        let key = (pkt.dst_port(), pkt.src_port());
        if pkt.type_() != TYPE_STREAM {
            if pkt.op() != op::RST {
                self.send_ctrl(key, op::RST, 0);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = pkt.buf_alloc();
            c.peer_fwd_cnt = Wrapping(pkt.fwd_cnt());
            if c.peer_credit() > 0 {
                c.credit_asked = false;
            }
        }
        let state = self.conns.get(&key).map(|c| c.state);
        match (pkt.op(), state) {
            (op::REQUEST, None) => self.guest_connect(key, &pkt),
            (op::RESPONSE, Some(State::LocalInit)) => {
                self.established(key);
                let line = format!("OK {}\n", key.0);
                let ok = self
                    .conns
                    .get_mut(&key)
                    .is_some_and(|c| c.stream.write_all(line.as_bytes()).is_ok());
                if !ok {
                    self.kill(key, true);
                }
            }
            (op::RW, Some(State::Established)) => {
                let Some(data) = pkt.data_slice() else { return };
                let c = self.conns.get_mut(&key).expect("looked up above");
                let len = data.len();
                if c.peer_done_sending || c.pending.len() + len > CONN_BUF as usize {
                    // More than the credit the device gave.
                    drop_count(&self.shared, "a connection's guest sent beyond its credit");
                    return self.kill(key, true);
                }
                let mut buf = vec![0u8; len];
                if data.copy_to(&mut buf[..]) != len {
                    return drop_count(&self.shared, "a data buffer that cannot be read");
                }
                c.pending.extend(buf);
                Counters::add(&self.shared.counters.tx_bytes, len as u64);
                match c.flush() {
                    Ok(_) => self.maybe_credit_update(key),
                    Err(_) => self.kill(key, true),
                }
            }
            (op::CREDIT_UPDATE, Some(_)) => {}
            (op::CREDIT_REQUEST, Some(_)) => self.send_ctrl(key, op::CREDIT_UPDATE, 0),
            (op::SHUTDOWN, Some(_)) => {
                let flags = pkt.flags();
                let c = self.conns.get_mut(&key).expect("looked up above");
                if flags & SHUTDOWN_SEND != 0 {
                    c.peer_done_sending = true;
                    let _ = c.flush();
                }
                if flags & SHUTDOWN_RCV != 0 {
                    c.peer_done_receiving = true;
                    let _ = c.stream.shutdown(std::net::Shutdown::Read);
                }
                if flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    self.kill(key, true);
                }
            }
            (op::RST, Some(_)) => self.kill(key, false),
            (op::RST, None) => {}
            (_, _) => {
                // A packet for no connection (or out of turn): reset it.
                self.kill(key, true);
            }
        }
    }

    /// The guest connects to host port `key.0`: the listener at `PATH_P`.
    fn guest_connect(
        &mut self,
        key: Key,
        pkt: &VsockPacket<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) {
        let mut path = self.shared.path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        let stream = UnixStream::connect(&path).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let s = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "{}: guest port {} connects to {}: {e}",
                    self.shared.name,
                    key.1,
                    std::path::Path::new(&path).display()
                );
                return self.send_ctrl(key, op::RST, 0);
            }
        };
        let t = self.token();
        if self.watch(s.as_raw_fd(), t).is_err() {
            return self.send_ctrl(key, op::RST, 0);
        }
        let mut c = Conn::new(s, t, State::LocalInit);
        c.peer_buf_alloc = pkt.buf_alloc();
        c.peer_fwd_cnt = Wrapping(pkt.fwd_cnt());
        self.add_conn(key, c);
        self.established(key);
        self.send_ctrl(key, op::RESPONSE, 0);
    }

    // ---- device to guest ----

    /// What goes into the next receive buffer.
    fn next_rx(&self) -> Option<Next> {
        if let Some(p) = self.ctrl.front() {
            return Some(Next::Ctrl(*p));
        }
        self.conns
            .iter()
            .find(|(_, c)| c.has_rx_data())
            .map(|(k, _)| Next::Data(*k))
    }

    /// Fills receive buffers while there is something for the guest.
    fn rx(&mut self, rings: &mut Rings<'_>) -> Result<(), QueueBroken> {
        if !rings.ready(RX_QUEUE) {
            return Ok(());
        }
        let mem = rings.mem();
        loop {
            let Some(next) = self.next_rx() else {
                return Ok(());
            };
            let Some(mut chain) = rings.pop(RX_QUEUE)? else {
                if rings.holding() || !rings.enable_notification(RX_QUEUE)? {
                    return Ok(());
                }
                continue;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    drop_count(&self.shared, &format!("receive chain {head}: {e}"));
                    rings.add_used(RX_QUEUE, head, 0)?;
                    continue;
                }
            };
            let len = match next {
                Next::Ctrl(p) => {
                    self.ctrl.pop_front();
                    self.header(&mut pkt, p.key, p.op, p.flags, 0);
                    0
                }
                Next::Data(_) if pkt.data_slice().is_none() => {
                    drop_count(
                        &self.shared,
                        &format!("receive chain {head} has no data buffer"),
                    );
                    rings.add_used(RX_QUEUE, head, 0)?;
                    continue;
                }
                Next::Data(key) => match self.read_host(key, &pkt) {
                    Some(0) | None => {
                        rings.unpop(RX_QUEUE)?;
                        continue;
                    }
                    Some(n) => {
                        self.header(&mut pkt, key, op::RW, 0, n);
                        n
                    }
                },
            };
            rings.add_used(RX_QUEUE, head, PKT_HEADER_SIZE as u32 + len)?;
        }
    }

    /// Reads host socket `key` into the packet's data buffer, as far as the
    /// guest's credit goes; None or Some(0): nothing went in (the socket
    /// had nothing, reached EOF, or failed: handled here).
    fn read_host(
        &mut self,
        key: Key,
        pkt: &VsockPacket<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Option<u32> {
        let data = pkt.data_slice()?;
        let c = self.conns.get_mut(&key)?;
        let room = (data.len() as u32).min(c.peer_credit()).min(MAX_PKT_DATA) as usize;
        let r = loop {
            match c.stream.read(&mut self.scratch[..room]) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match r {
            Ok(0) => {
                c.host_eof = true;
                self.send_ctrl(key, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                None
            }
            Ok(n) => {
                data.copy_from(&self.scratch[..n]);
                c.rx_cnt += Wrapping(n as u32);
                if c.peer_credit() == 0 && !c.credit_asked {
                    c.credit_asked = true;
                    self.send_ctrl(key, op::CREDIT_REQUEST, 0);
                }
                Counters::add(&self.shared.counters.rx_bytes, n as u64);
                Some(n as u32)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                c.readable = false;
                None
            }
            Err(_) => {
                self.kill(key, true);
                None
            }
        }
    }

    /// Writes a packet header for connection `key` (its credit fields from
    /// the connection, when there still is one).
    fn header(
        &mut self,
        pkt: &mut VsockPacket<'_, impl vm_memory::bitmap::BitmapSlice>,
        key: Key,
        op: u16,
        flags: u32,
        len: u32,
    ) {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(c) => {
                c.fwd_cnt_told = c.fwd_cnt;
                (CONN_BUF, c.fwd_cnt.0)
            }
            None => (0, 0),
        };
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.shared.cid)
            .set_src_port(key.0)
            .set_dst_port(key.1)
            .set_len(len)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt);
    }

    /// Delivers a pending TRANSPORT_RESET into an event buffer.
    fn events(&mut self, rings: &mut Rings<'_>) -> Result<(), QueueBroken> {
        if !self.reset_pending || !rings.ready(EVENT_QUEUE) {
            return Ok(());
        }
        let mem = rings.mem();
        while let Some(mut chain) = rings.pop(EVENT_QUEUE)? {
            let head = chain.head_index();
            let d = chain.next();
            let ok = d.is_some_and(|d| {
                d.is_write_only()
                    && d.len() >= 4
                    && GuestMemoryBackend::check_range(mem, d.addr(), 4)
                    && mem
                        .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                        .is_ok()
            });
            if !ok {
                drop_count(
                    &self.shared,
                    &format!("event buffer {head} cannot hold an event"),
                );
                rings.add_used(EVENT_QUEUE, head, 0)?;
                continue;
            }
            rings.add_used(EVENT_QUEUE, head, 4)?;
            self.reset_pending = false;
            Counters::add(&self.shared.counters.transport_resets, 1);
            return Ok(());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Next {
    Ctrl(Ctrl),
    Data(Key),
}

impl QueueHandler for Muxer {
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
            q => Err(QueueBroken(format!("queue {q} takes no requests"))),
        }
    }

    fn notified(&mut self, rings: &mut Rings<'_>, queue: u16) -> Result<(), QueueBroken> {
        match queue {
            TX_QUEUE => serve_requests(self, rings, TX_QUEUE)?,
            EVENT_QUEUE => self.events(rings)?,
            _ => {}
        }
        // Transmitted packets may have given credit or asked for replies.
        self.rx(rings)
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn event(&mut self, rings: &mut Rings<'_>) -> Result<(), QueueBroken> {
        let mut evs = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut evs) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            for ev in &evs[..n] {
                match ev.data() {
                    LISTENER => self.accept(),
                    t => self.host_ready(t, ev.event_set()),
                }
            }
            if n < evs.len() {
                break;
            }
        }
        // A resume's kick comes here too: what arrived while parked.
        self.accept();
        self.events(rings)?;
        self.rx(rings)
    }
}
