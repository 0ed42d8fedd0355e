//! Scenarios of `builtin:net`: how fast the CPL3 virtio-net driver gets
//! frames through vmhop's device and a TAP, against a host thread doing
//! the same on a TAP of its own in the same run, and what a checkpoint or
//! a NUMA move costs the guest's traffic.
//!
//! Each run works in a network namespace of its own (the measuring thread
//! enters it and leaves it at the end; vmhop's threads started meanwhile
//! live there too), with two persistent TAPs made there and up: `vbt0`,
//! the VM's card, and `vbt1`, the baseline's. Frames are 72 bytes as the
//! guest sends them: the 12-byte virtio net header (all zero: no offload)
//! and a minimum Ethernet frame of type 0x88b5.
//!
//! - `net-tx`: `builtin:net,mode=tx` (the transmit ring kept full, one
//!   notify per batch at most) against one host thread writing the same
//!   frames to `vbt1`'s file descriptor in a loop. Both counted by the
//!   kernel: the frames each TAP took in (its interface's receive count).
//! - `net-rx`: a host thread sends frames out of the TAP as fast as it
//!   can (a packet socket bound to it: the kernel queues each for whoever
//!   reads the TAP, dropping beyond its queue); `builtin:net,mode=rx`
//!   frames/s against one host thread reading `vbt1`, fed by the same
//!   kind of sender. Both counted by the reader (the guest, the thread).
//! - `net-rtt`: `builtin:net` (echo mode: a frame out, its echo back, the
//!   next) round trips/s, the echo a packet socket thread on the TAP,
//!   against a host thread writing a frame to `vbt1` and reading its echo
//!   from the same kind of echo thread.
//! - `net-pause`: `builtin:net,mode=tx` at full speed through a full and
//!   an incremental checkpoint and a stop-copy and a live NUMA move (to
//!   the node it is on): vmhop's pause against a bare pause + resume of
//!   the same VM, and the guest's longest stall (the longest gap between
//!   two batches of frames the device took: quiesce, pause and resume
//!   together, as the traffic felt them) against the same measure around
//!   a bare pause + resume, and over as long a window with no operation.
//!
//! The guest spins on its rings (builtin guests poll): it holds a core
//! while vmhop's worker thread serves the card, where the baseline is one
//! thread. On 2 cores shared with other work, say the load with any
//! figure.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmhop::checkpoint::create::{checkpoint_tuned, CheckpointRequest, PauseTuning};
use vmhop::devices::virtio::net::tap::Tap;
use vmhop::devices::Console;
use vmhop::guest::net::{NetMode, ETHERTYPE, FRAME_LEN, MAGIC, MAGIC_AT, SEQ_AT, TYPE_AT};
use vmhop::guest::GuestSpec;
use vmhop::memory::layout::DEFAULT_CHUNK_SIZE;
use vmhop::numa::{numa_migrate, Mode, NumaMigrateRequest};
use vmhop::vmm::config::NetConfig;
use vmhop::vmm::{NodeConfig, VmConfig};

use super::fixture::{check_alive, failed, pause_round_trip_us, scratch_dir, BenchVm};
use super::{median, vm_step, wait_until, BenchError, RunCtx, Sample, Scenario};

/// The VM's TAP and the baseline's.
const VM_TAP: &str = "vbt0";
const HOST_TAP: &str = "vbt1";
/// The VM card's MAC.
const VM_MAC: &str = "52:54:00:be:4c:01";
/// Guest memory: the card's rings and buffers live in the reserved area.
const VM_BYTES: u64 = 64 << 20;
/// How long each side is measured.
const WINDOW: Duration = Duration::from_secs(2);
/// Frames (or round trips) the guest completes before a window opens.
const WARM_FRAMES: u64 = 1000;
/// Bare pause + resume round trips for the pause baselines.
const ROUND_TRIPS: usize = 20;
/// Time between two measured operations, so that the guest's stall
/// windows hold one operation each.
const SETTLE: Duration = Duration::from_millis(100);
/// How long a read waits for a frame before looking at the clock again.
const POLL_MS: i32 = 10;

/// The scenarios of this module, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    vec![net_tx(), net_rx(), net_rtt(), net_pause()]
}

// ---- the namespace and its TAPs ----

/// A network namespace of the calling thread's own, left (back to the one
/// it was in) when dropped. The namespace goes with its last user: its
/// TAPs with it.
struct Netns {
    home: File,
}

impl Netns {
    /// Enters a new namespace with the two TAPs made and up.
    fn enter() -> Result<Netns, BenchError> {
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(failed("opening /proc/thread-self/ns/net"))?;
        // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread into
        // a new namespace; no memory is touched.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(BenchError::Failed(format!(
                "unshare(CLONE_NEWNET): {} (the network benchmarks need root)",
                std::io::Error::last_os_error()
            )));
        }
        let ns = Netns { home };
        for tap in [VM_TAP, HOST_TAP] {
            ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip(&["link", "set", tap, "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // SAFETY: setns moves only this thread back into the namespace
        // whose descriptor `home` holds.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// Runs `ip ARGS` (in this thread's namespace: a child starts in it).
fn ip(args: &[&str]) -> Result<(), BenchError> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(failed(format!("running ip {}", args.join(" "))))?;
    if !out.status.success() {
        return Err(BenchError::Failed(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Frames the kernel took in on interface `dev` (written to its TAP) and
/// frames it dropped on the way out (the TAP's queue full).
fn link_counts(dev: &str) -> Result<(u64, u64), BenchError> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-s", "link", "show", "dev", dev])
        .output()
        .map_err(failed(format!("running ip -s link show dev {dev}")))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(failed(format!("ip -j -s link show dev {dev}'s output")))?;
    let stats = &v[0]["stats64"];
    match (
        stats["rx"]["packets"].as_u64(),
        stats["tx"]["dropped"].as_u64(),
    ) {
        (Some(rx), Some(dropped)) => Ok((rx, dropped)),
        _ => Err(BenchError::Failed(format!(
            "ip -j -s link show dev {dev} has no packet counts: {v}"
        ))),
    }
}

// ---- frames and packet sockets ----

/// A frame as the guest sends one: net header, broadcast destination,
/// `mac` as source, the type, sequence number `seq`, the magic.
fn frame(mac: [u8; 6], seq: u64) -> [u8; FRAME_LEN as usize] {
    let mut f = [0u8; FRAME_LEN as usize];
    f[12..18].copy_from_slice(&[0xff; 6]);
    f[18..24].copy_from_slice(&mac);
    put(&mut f, TYPE_AT, &ETHERTYPE.to_be_bytes());
    put(&mut f, SEQ_AT, &seq.to_le_bytes());
    put(&mut f, MAGIC_AT, &MAGIC.to_le_bytes());
    f
}

fn put(f: &mut [u8], at: u64, bytes: &[u8]) {
    f[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

/// Whether `f` (net header first) is one of ours; its sequence number.
fn ours(f: &[u8]) -> Option<u64> {
    let at = |o: u64, n: usize| f.get(o as usize..o as usize + n);
    if at(TYPE_AT, 2)? != ETHERTYPE.to_be_bytes() || at(MAGIC_AT, 8)? != MAGIC.to_le_bytes() {
        return None;
    }
    Some(u64::from_le_bytes(at(SEQ_AT, 8)?.try_into().ok()?))
}

/// A packet socket bound to one interface, for frames of our type.
struct Packet {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
}

impl Packet {
    fn bind(dev: &str) -> Result<Packet, BenchError> {
        let err = |what: &str| {
            BenchError::Failed(format!(
                "{what} (packet socket on {dev}): {}",
                std::io::Error::last_os_error()
            ))
        };
        let proto = ETHERTYPE.to_be();
        // SAFETY: plain socket creation; the descriptor is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if raw < 0 {
            return Err(err("socket(AF_PACKET)"));
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(dev).map_err(failed("interface name"))?;
        // SAFETY: `name` is a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(err("if_nametoindex"));
        }
        // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll of the length given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(err("bind"));
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval, which `tv` is.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Packet { fd, addr })
    }

    /// Sends one Ethernet frame (no net header) out of the interface.
    fn send(&self, eth: &[u8]) -> bool {
        // SAFETY: `eth` has eth.len() bytes; `addr` names the interface.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                eth.as_ptr() as *const libc::c_void,
                eth.len(),
                0,
                &self.addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        r == eth.len() as isize
    }

    /// One frame the interface received (not one sent through it) into
    /// `buf`; None on the receive timeout.
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: `buf` has buf.len() bytes and `from` `len`; both outlive
        // the call.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        };
        (n >= 14 && from.sll_pkttype != libc::PACKET_OUTGOING).then_some(n as usize)
    }
}

/// A host thread on a packet socket, stopped and joined when dropped.
struct Peer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Peer {
    /// Sends every frame of our type that `dev` receives back out of it,
    /// its addresses swapped; counts them.
    fn echo(dev: &str) -> Result<Peer, BenchError> {
        let sock = Packet::bind(dev)?;
        Ok(Peer::spawn(move |stop, count| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Some(n) = sock.recv(&mut buf) else {
                    continue;
                };
                let mut out = buf;
                out[0..6].copy_from_slice(&buf[6..12]);
                out[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0xec]);
                if sock.send(&out[..n]) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }))
    }

    /// Sends frames of our type out of `dev` as fast as it can; counts
    /// the ones the kernel took.
    fn flood(dev: &str) -> Result<Peer, BenchError> {
        let sock = Packet::bind(dev)?;
        Ok(Peer::spawn(move |stop, count| {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let f = frame([2, 0, 0, 0, 0, 0xec], seq);
                if sock.send(&f[12..]) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
            }
        }))
    }

    fn spawn(f: impl FnOnce(&AtomicBool, &AtomicU64) + Send + 'static) -> Peer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || f(&s, &c));
        Peer {
            stop,
            count,
            thread: Some(thread),
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits up to [`POLL_MS`] for `tap` to have a frame to read.
fn wait_readable(tap: &Tap) {
    let mut p = libc::pollfd {
        fd: tap.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, which `p` is, for the duration of the call.
    unsafe { libc::poll(&mut p, 1, POLL_MS) };
}

/// CPU time (ns) the calling thread has used so far.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The thread of this process named `comm` (a device worker).
fn thread_named(comm: &str) -> Result<u32, BenchError> {
    let tasks = std::fs::read_dir("/proc/self/task").map_err(failed("listing /proc/self/task"))?;
    for t in tasks.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if name.trim_end() == comm {
            if let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) {
                return Ok(tid);
            }
        }
    }
    Err(BenchError::Failed(format!(
        "no thread named '{comm}' in this process"
    )))
}

/// CPU time (ns) thread `tid` of this process has used so far (the first
/// field of its schedstat: time on a CPU).
fn task_cpu_ns(tid: u32) -> Result<u64, BenchError> {
    let p = format!("/proc/self/task/{tid}/schedstat");
    let s = std::fs::read_to_string(&p).map_err(failed(format!("reading {p}")))?;
    s.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| BenchError::Failed(format!("{p} says '{}'", s.trim())))
}

/// The card's worker thread (`vio-net ID`, docs/devices.md).
const WORKER: &str = "vio-net net0";

/// What one side of a rate measurement gives.
#[derive(Debug, Clone, Copy)]
struct Rate {
    /// Frames per second.
    frames_per_s: f64,
    /// CPU time per frame of the thread that serves the TAP (vmhop's
    /// worker, the baseline's own thread), ns.
    cpu_ns_per_frame: f64,
}

/// The source address of the baselines' frames (a local one).
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];

// ---- the VM ----

/// Boots `builtin:net,mode=MODE` with one vCPU and its card on [`VM_TAP`].
fn boot_net(mode: NetMode) -> Result<BenchVm, BenchError> {
    let card = NetConfig::parse(&format!("tap={VM_TAP},mac={VM_MAC}"), "net0")
        .map_err(failed("the bench's --net"))?;
    let config = VmConfig {
        name: "bench-net".into(),
        vcpus: 1,
        nodes: vec![NodeConfig {
            guest_node: 0,
            size: VM_BYTES,
            host_node: None,
            vcpus: None,
        }],
        guest: GuestSpec::Net {
            mmio: 0,
            mac: [0; 6],
            mode,
        },
        hugepages: false,
        chunk_size: DEFAULT_CHUNK_SIZE,
        disks: Vec::new(),
        nets: vec![card],
        vsock: None,
    };
    vmhop::service::build::boot(config, &Console::Stdout, false, &Default::default())
        .map(|m| BenchVm::new(m.vm))
        .map_err(vm_step(format!("booting builtin:net,mode={}", mode.name())))
}

/// Waits until the guest made [`WARM_FRAMES`] of progress.
fn warm(vm: &BenchVm) -> Result<(), BenchError> {
    if !wait_until(super::fixture::GUEST_LIMIT, || {
        vm.progress() >= WARM_FRAMES || vm.guest_stop_reason().is_some()
    }) {
        return Err(BenchError::Failed(format!(
            "builtin:net did not get {WARM_FRAMES} frames through within {:?}",
            super::fixture::GUEST_LIMIT
        )));
    }
    check_alive(vm)
}

/// The guest's counters must show no bad frame (a damaged magic, an echo
/// of a frame never sent).
fn check_counts(vm: &BenchVm) -> Result<(), BenchError> {
    match vmhop::guest::net::counts(&vm.memory()) {
        Some(c) if c.bad == 0 => Ok(()),
        Some(c) => Err(BenchError::Failed(format!(
            "builtin:net saw {} bad frames",
            c.bad
        ))),
        None => Err(BenchError::Failed("not a builtin:net guest".into())),
    }
}

/// The guest's progress per second over `window`.
fn guest_rate(vm: &BenchVm, window: Duration) -> Result<f64, BenchError> {
    let (n0, t0) = (vm.progress(), Instant::now());
    std::thread::sleep(window);
    let (n1, t1) = (vm.progress(), Instant::now());
    check_alive(vm)?;
    Ok((n1 - n0) as f64 / (t1 - t0).as_secs_f64())
}

// ---- net-tx ----

/// Frames/s the kernel took in on [`VM_TAP`] from `builtin:net,mode=tx`,
/// with the worker's CPU per frame; and the frames/s the guest counted.
fn guest_tx(window: Duration) -> Result<(Rate, f64), BenchError> {
    let vm = boot_net(NetMode::Tx)?;
    warm(&vm)?;
    let worker = thread_named(WORKER)?;
    let (k0, c0, t0, g0) = (
        link_counts(VM_TAP)?.0,
        task_cpu_ns(worker)?,
        Instant::now(),
        vm.progress(),
    );
    std::thread::sleep(window);
    let (k1, c1, t1, g1) = (
        link_counts(VM_TAP)?.0,
        task_cpu_ns(worker)?,
        Instant::now(),
        vm.progress(),
    );
    check_alive(&vm)?;
    check_counts(&vm)?;
    let s = (t1 - t0).as_secs_f64();
    let frames = (k1 - k0).max(1);
    Ok((
        Rate {
            frames_per_s: (k1 - k0) as f64 / s,
            cpu_ns_per_frame: (c1 - c0) as f64 / frames as f64,
        },
        (g1 - g0) as f64 / s,
    ))
}

/// Frames/s the kernel took in on [`HOST_TAP`] from one host thread
/// writing them to its descriptor, with that thread's CPU per frame.
fn host_tx(window: Duration) -> Result<Rate, BenchError> {
    let tap = Tap::open(HOST_TAP).map_err(failed(format!("opening TAP {HOST_TAP}")))?;
    let k0 = link_counts(HOST_TAP)?.0;
    let (t0, c0) = (Instant::now(), thread_cpu_ns());
    let mut seq = 0u64;
    while t0.elapsed() < window {
        // A batch between two looks at the clock.
        for _ in 0..64 {
            tap.write_frame(&frame(HOST_MAC, seq))
                .map_err(failed(format!("writing a frame to TAP {HOST_TAP}")))?;
            seq += 1;
        }
    }
    let (s, cpu) = (t0.elapsed().as_secs_f64(), thread_cpu_ns() - c0);
    let frames = link_counts(HOST_TAP)?.0 - k0;
    Ok(Rate {
        frames_per_s: frames as f64 / s,
        cpu_ns_per_frame: cpu as f64 / frames.max(1) as f64,
    })
}

/// `net-tx`.
fn net_tx() -> Scenario {
    Scenario::new(
        "net-tx",
        "builtin:net,mode=tx frames/s (72-byte frames: net header + minimum Ethernet frame; the transmit ring of 64 kept full, a notify only when the device asks), counted by the kernel on the VM's TAP; baseline: one host thread writing the same frames to a second TAP's descriptor, counted likewise",
        |ctx: &RunCtx| {
            let window = ctx.window(WINDOW);
            let _ns = Netns::enter()?;
            let host_first = ctx.run.is_multiple_of(2);
            let (guest, host) = if host_first {
                let h = host_tx(window)?;
                (guest_tx(window)?, h)
            } else {
                let g = guest_tx(window)?;
                (g, host_tx(window)?)
            };
            Ok(vec![
                Sample::new("frames/s", "frames/s", guest.0.frames_per_s).vs(host.frames_per_s),
                Sample::new("CPU per frame: vmhop's worker vs the writer", "ns", guest.0.cpu_ns_per_frame)
                    .vs(host.cpu_ns_per_frame),
                Sample::new("frames/s the guest counted", "frames/s", guest.1).vs(guest.0.frames_per_s),
            ])
        },
    )
}

// ---- net-rx ----

/// Frames/s `builtin:net,mode=rx` received while a sender floods its TAP,
/// with the worker's CPU per frame; the frames the TAP dropped per second
/// (queue full) and the frames sent per second.
fn guest_rx(window: Duration) -> Result<(Rate, f64, f64), BenchError> {
    let vm = boot_net(NetMode::Rx)?;
    let sender = Peer::flood(VM_TAP)?;
    warm(&vm)?;
    let worker = thread_named(WORKER)?;
    let (d0, s0, c0, g0) = (
        link_counts(VM_TAP)?.1,
        sender.count(),
        task_cpu_ns(worker)?,
        vm.progress(),
    );
    let t0 = Instant::now();
    std::thread::sleep(window);
    let (g1, c1) = (vm.progress(), task_cpu_ns(worker)?);
    let s = t0.elapsed().as_secs_f64();
    let (d1, s1) = (link_counts(VM_TAP)?.1, sender.count());
    drop(sender);
    check_alive(&vm)?;
    check_counts(&vm)?;
    let rate = Rate {
        frames_per_s: (g1 - g0) as f64 / s,
        cpu_ns_per_frame: (c1 - c0) as f64 / (g1 - g0).max(1) as f64,
    };
    Ok((rate, (d1 - d0) as f64 / s, (s1 - s0) as f64 / s))
}

/// Frames/s one host thread read from [`HOST_TAP`] while a sender floods
/// it, as [`guest_rx`].
fn host_rx(window: Duration) -> Result<(Rate, f64, f64), BenchError> {
    let tap = Tap::open(HOST_TAP).map_err(failed(format!("opening TAP {HOST_TAP}")))?;
    let sender = Peer::flood(HOST_TAP)?;
    let mut buf = [0u8; 2048];
    let mut read = |until: Instant| -> Result<u64, BenchError> {
        let mut n = 0;
        while Instant::now() < until {
            match tap.read_frame(&mut buf) {
                Ok(len) => n += u64::from(ours(&buf[..len]).is_some()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&tap),
                Err(e) => return Err(failed(format!("reading TAP {HOST_TAP}"))(e)),
            }
        }
        Ok(n)
    };
    read(Instant::now() + window / 4)?;
    let (d0, s0) = (link_counts(HOST_TAP)?.1, sender.count());
    let (t0, c0) = (Instant::now(), thread_cpu_ns());
    let n = read(t0 + window)?;
    let (s, cpu) = (t0.elapsed().as_secs_f64(), thread_cpu_ns() - c0);
    let (d1, s1) = (link_counts(HOST_TAP)?.1, sender.count());
    let rate = Rate {
        frames_per_s: n as f64 / s,
        cpu_ns_per_frame: cpu as f64 / n.max(1) as f64,
    };
    Ok((rate, (d1 - d0) as f64 / s, (s1 - s0) as f64 / s))
}

/// `net-rx`.
fn net_rx() -> Scenario {
    Scenario::new(
        "net-rx",
        "builtin:net,mode=rx frames/s received (every buffer given back at once, a notify only when the device asks) while a host thread sends 60-byte frames out of the VM's TAP as fast as it can (a packet socket; the TAP drops beyond its queue); baseline: one host thread reading a second TAP fed by the same kind of sender",
        |ctx: &RunCtx| {
            let window = ctx.window(WINDOW);
            let _ns = Netns::enter()?;
            let host_first = ctx.run.is_multiple_of(2);
            let (guest, host) = if host_first {
                let h = host_rx(window)?;
                (guest_rx(window)?, h)
            } else {
                let g = guest_rx(window)?;
                (g, host_rx(window)?)
            };
            Ok(vec![
                Sample::new("frames/s", "frames/s", guest.0.frames_per_s).vs(host.0.frames_per_s),
                Sample::new("CPU per frame: vmhop's worker vs the reader", "ns", guest.0.cpu_ns_per_frame)
                    .vs(host.0.cpu_ns_per_frame),
                Sample::new("dropped by the TAP (queue full)", "frames/s", guest.1).vs(host.1),
                Sample::new("sent by the sender", "frames/s", guest.2).vs(host.2),
            ])
        },
    )
}

// ---- net-rtt ----

/// Round trips/s of `builtin:net` (echo) with an echo thread on its TAP.
fn guest_rtt(window: Duration) -> Result<f64, BenchError> {
    let vm = boot_net(NetMode::Echo)?;
    let _echo = Peer::echo(VM_TAP)?;
    warm(&vm)?;
    let r = guest_rate(&vm, window)?;
    check_counts(&vm)?;
    Ok(r)
}

/// Round trips/s of one host thread: a frame written to [`HOST_TAP`], its
/// echo read back (an echo thread on that TAP), the next.
fn host_rtt(window: Duration) -> Result<f64, BenchError> {
    let tap = Tap::open(HOST_TAP).map_err(failed(format!("opening TAP {HOST_TAP}")))?;
    let _echo = Peer::echo(HOST_TAP)?;
    let mut buf = [0u8; 2048];
    let mut trips = |until: Instant| -> Result<u64, BenchError> {
        let mut seq = 0u64;
        while Instant::now() < until {
            tap.write_frame(&frame(HOST_MAC, seq))
                .map_err(failed(format!("writing a frame to TAP {HOST_TAP}")))?;
            // Its echo (others: IPv6 chatter of the new link), or a resend
            // after a silence, as the guest does.
            let give_up = Instant::now() + Duration::from_millis(50);
            loop {
                match tap.read_frame(&mut buf) {
                    Ok(len) if ours(&buf[..len]) == Some(seq) => {
                        seq += 1;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > give_up {
                            break;
                        }
                        wait_readable(&tap)
                    }
                    Err(e) => return Err(failed(format!("reading TAP {HOST_TAP}"))(e)),
                }
            }
        }
        Ok(seq)
    };
    trips(Instant::now() + window / 4)?;
    let t0 = Instant::now();
    let n = trips(t0 + window)?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// `net-rtt`.
fn net_rtt() -> Scenario {
    Scenario::new(
        "net-rtt",
        "builtin:net (echo mode) round trips/s: a frame out through the card and the TAP, echoed by a host thread on a packet socket, back through the TAP and the card, the next; baseline: one host thread writing the frame to a second TAP's descriptor and reading the echo of the same kind of echo thread",
        |ctx: &RunCtx| {
            let window = ctx.window(WINDOW);
            let _ns = Netns::enter()?;
            let host_first = ctx.run.is_multiple_of(2);
            let (guest, host) = if host_first {
                let h = host_rtt(window)?;
                (guest_rtt(window)?, h)
            } else {
                let g = guest_rtt(window)?;
                (g, host_rtt(window)?)
            };
            Ok(vec![
                Sample::new("round trips/s", "trips/s", guest).vs(host),
                Sample::new("round trip", "µs", 1e6 / guest).vs(1e6 / host),
            ])
        },
    )
}

// ---- net-pause ----

/// The guest's longest stall over `f` (a fresh window before it, the
/// guest given [`SETTLE`] afterwards to close its gap), µs; with what `f`
/// returned.
fn stall_over<T>(
    vm: &BenchVm,
    f: impl FnOnce() -> Result<T, BenchError>,
) -> Result<(T, f64), BenchError> {
    std::thread::sleep(SETTLE);
    vmhop::guest::reset_longest_stall(vm);
    let r = f()?;
    std::thread::sleep(SETTLE);
    let stall = vmhop::guest::longest_stall_us(vm).ok_or_else(|| {
        BenchError::Failed("KVM gave no TSC rate: the guest's stall is unknown".into())
    })?;
    check_alive(vm)?;
    Ok((r, stall as f64))
}

/// A checkpoint of `vm` into `dir` (full or incremental).
fn checkpoint(vm: &BenchVm, dir: &Path, full: bool) -> Result<u64, BenchError> {
    let req = CheckpointRequest {
        dir: dir.to_path_buf(),
        full,
        stop_after: false,
    };
    let mut chain = vm.chain.lock().unwrap_or_else(|e| e.into_inner());
    let r = checkpoint_tuned(vm, &mut chain, &req, PauseTuning::default())
        .map_err(failed(format!("checkpoint into {}", dir.display())))?;
    Ok(r.downtime_us)
}

/// A NUMA move of guest node 0 to the host node it is on.
fn numa_move(vm: &BenchVm, mode: Mode) -> Result<u64, BenchError> {
    let to_node = vm.host_nodes().first().copied().unwrap_or(0);
    let req = NumaMigrateRequest {
        to_node,
        guest_node: Some(0),
        mode,
        max_downtime_ms: None,
    };
    let r = numa_migrate(vm, &req, &Default::default()).map_err(failed(format!(
        "numa_migrate {mode:?} to host node {to_node}"
    )))?;
    Ok(r.downtime_us)
}

/// `net-pause`.
fn net_pause() -> Scenario {
    Scenario::new(
        "net-pause",
        "builtin:net,mode=tx sending at full speed (64 MiB VM, 1 vCPU) through a full and an incremental checkpoint (fresh dir in /var/tmp) and a stop-copy and a live NUMA move: vmhop's pause µs (baseline: bare vm.pause()+vm.resume(), median of 20) and the guest's longest stall between two batches of frames the device took (baseline: the same around one bare pause+resume); the stall over as long a window with no operation",
        |ctx: &RunCtx| {
            let _ns = Netns::enter()?;
            let dir = scratch_dir()?;
            let dir = dir.path().to_path_buf();
            let vm = boot_net(NetMode::Tx)?;
            warm(&vm)?;
            let rtt = pause_round_trip_us(&vm, ctx.iterations(ROUND_TRIPS))?;
            let mut bare = Vec::new();
            let mut quiet = Vec::new();
            for _ in 0..ctx.iterations(5) {
                let (_, s) = stall_over(&vm, || {
                    let p = vm.pause().map_err(vm_step("pausing the VM"))?;
                    vm.resume(p).map_err(vm_step("resuming the VM"))
                })?;
                bare.push(s);
                quiet.push(stall_over(&vm, || Ok(()))?.1);
            }
            let (bare, quiet) = (median(&bare), median(&quiet));
            let mut out = Vec::new();
            let (full, full_stall) = stall_over(&vm, || checkpoint(&vm, &dir, true))?;
            let (incr, incr_stall) = stall_over(&vm, || checkpoint(&vm, &dir, false))?;
            let (stop, stop_stall) = stall_over(&vm, || numa_move(&vm, Mode::StopCopy))?;
            let (live, live_stall) = stall_over(&vm, || numa_move(&vm, Mode::Live))?;
            for (what, pause, stall) in [
                ("full checkpoint", full, full_stall),
                ("incremental checkpoint", incr, incr_stall),
                ("stop-copy NUMA move", stop, stop_stall),
                ("live NUMA move", live, live_stall),
            ] {
                out.push(Sample::new(format!("{what}: pause"), "µs", pause as f64).vs(rtt));
                out.push(Sample::new(format!("{what}: guest stall"), "µs", stall).vs(bare));
            }
            out.push(Sample::new("guest stall, no operation", "µs", quiet));
            let frames = guest_rate(&vm, ctx.window(Duration::from_millis(500)))?;
            check_counts(&vm)?;
            out.push(Sample::new("frames/s after the operations", "frames/s", frames));
            Ok(out)
        },
    )
}
