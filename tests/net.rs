//! Network cards (`--net`) through the real binary, in a network namespace
//! each test makes: the cards appear in `status` with their TAP, MAC and
//! counters; they travel with a checkpoint (restored on another TAP with
//! `--net tap=NAME,id=ID`), a NUMA move and a host migration, after which
//! the destination announces the guest's MAC on its own TAP; bad `--net`
//! options and busy TAPs are refused with the thing named.
//!
//! `builtin:net` drives the card from CPL3: it sends numbered frames and
//! checks each echo, which an echo thread of the test (a packet socket on
//! the TAP, in the namespace) sends back; its progress (echoes in order)
//! goes on through NUMA moves and a checkpoint's restore, and `verify`
//! finds no bad echo.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{one_json_object, vmhop, Vm};
use serde_json::Value;

/// Bound for a background event (announce frames arriving).
const EVENT_WAIT: Duration = Duration::from_secs(20);

const MAC: &str = "52:54:00:aa:bb:01";

/// A network namespace of the test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = Netns(format!("vmhop-net-{}-{k}", std::process::id()));
        sh(&["ip", "netns", "add", &ns.0]);
        ns
    }

    fn exec(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.0]
    }

    /// A persistent TAP in the namespace, up.
    fn tap(&self, name: &str) {
        sh(&[
            "ip", "-n", &self.0, "tuntap", "add", "dev", name, "mode", "tap",
        ]);
        sh(&["ip", "-n", &self.0, "link", "set", name, "up"]);
    }

    /// Runs vmhop ARGS inside the namespace.
    fn vmhop(&self, args: &[&str]) -> common::CmdOutput {
        let mut all = vec!["netns", "exec", &self.0, common::VMHOP];
        all.extend_from_slice(args);
        let out = Command::new("ip").args(&all).output().unwrap();
        common::CmdOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(args: &[&str]) {
    let s = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(s.success(), "{args:?}: {s}");
}

/// The network cards in `vm`'s status, by id.
fn cards(vm: &Vm) -> Vec<Value> {
    let s = vm.status();
    s["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no devices: {s}"))
        .iter()
        .filter(|d| d["kind"] == "virtio-net")
        .cloned()
        .collect()
}

fn card<'a>(cards: &'a [Value], id: &str) -> &'a Value {
    cards
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no card {id} in {cards:?}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + EVENT_WAIT;
    while !f() {
        assert!(Instant::now() < until, "{what} within {EVENT_WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cards_show_in_status_and_travel_with_a_checkpoint_and_a_numa_move() {
    let ns = Netns::new();
    ns.tap("vt0");
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    let net0 = format!("tap=vt0,mac={MAC},id=lan");
    let vm = Vm::start_wrapped(
        &ns.exec(),
        &["run"],
        &[
            "--memory",
            "64M",
            "--guest",
            "builtin:dirty,rate=10000",
            "--net",
            &net0,
            // A TAP that does not exist yet: vmhop creates it.
            "--net",
            "tap=vt1",
        ],
        &[],
    );
    vm.wait_progress_above(0, Duration::from_secs(10));
    let c = cards(&vm);
    assert_eq!(c.len(), 2, "{c:?}");
    let lan = card(&c, "lan");
    assert_eq!(lan["info"]["tap"], "vt0");
    assert_eq!(lan["info"]["mac"], MAC);
    for k in [
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "tx_dropped",
    ] {
        assert!(lan["counters"][k].is_u64(), "{k}: {lan}");
    }
    let net1 = card(&c, "net1");
    assert_eq!(net1["info"]["tap"], "vt1");
    let mac1 = net1["info"]["mac"].as_str().unwrap().to_string();
    // A TAP another process holds is busy: refused, named, exit 1.
    let busy = ns.vmhop(&[
        "run",
        "--api-socket",
        "/nonexistent/x.sock",
        "--net",
        "tap=vt0",
    ]);
    assert_eq!(busy.code, Some(1), "{}", busy.describe());
    assert!(
        busy.stderr.contains("vt0") && busy.stderr.contains("busy"),
        "{}",
        busy.describe()
    );

    // A NUMA move (to the node it is on: the devices quiesce and resume
    // all the same) keeps the cards.
    vm.cli_ok(&["numa-migrate", "--to-node", "0", "--mode", "stop-copy"]);
    assert_eq!(cards(&vm).len(), 2);

    vm.cli_ok(&["checkpoint", "--dir", dir_s, "--stop-after"]);
    drop(vm);
    // Restored with the card `lan` on another TAP, `net1` on its own.
    let target = format!("{dir_s}@1");
    let vm = Vm::start_wrapped(
        &ns.exec(),
        &["restore", &target],
        &["--net", "tap=vt2,id=lan"],
        &[],
    );
    let c = cards(&vm);
    let lan = card(&c, "lan");
    assert_eq!(lan["info"]["tap"], "vt2");
    assert_eq!(lan["info"]["mac"], MAC, "the MAC travels with the card");
    assert_eq!(card(&c, "net1")["info"]["mac"], mac1.as_str());
    let p = vm.progress();
    vm.wait_progress_above(p, Duration::from_secs(10));
    drop(vm);

    // A restore naming a card the checkpoint has not, or changing a MAC.
    for (spec, needle) in [
        ("tap=vt3,id=wan", "no network card 'wan'"),
        ("tap=vt3,id=lan,mac=52:54:00:aa:bb:02", "cannot change"),
        ("tap=vt1,id=lan", "two network cards would use TAP 'vt1'"),
    ] {
        let out = ns.vmhop(&[
            "restore",
            &target,
            "--api-socket",
            &format!("{dir_s}/r.sock"),
            "--net",
            spec,
        ]);
        assert_eq!(out.code, Some(2), "{spec}: {}", out.describe());
        assert!(out.stderr.contains(needle), "{spec}: {}", out.describe());
    }
}

#[test]
fn a_migrated_guest_keeps_its_cards_and_the_destination_announces_its_mac() {
    let ns = Netns::new();
    ns.tap("src0");
    ns.tap("dst0");
    let holder = tempfile::tempdir().unwrap();
    let addr = format!("unix:{}", holder.path().join("m.sock").display());
    let dst = Vm::start_wrapped(
        &ns.exec(),
        &["run"],
        &["--incoming", &addr, "--net", "tap=dst0,id=lan"],
        &[],
    );
    let echo_src = Echo::start(&ns.0, "src0");
    let echo_dst = Echo::start(&ns.0, "dst0");
    let net0 = format!("tap=src0,mac={MAC},id=lan");
    let src = Vm::start_wrapped(
        &ns.exec(),
        &["run"],
        &["--memory", "64M", "--guest", "builtin:net", "--net", &net0],
        &[],
    );
    src.wait_progress_above(100, Duration::from_secs(20));
    let out = src.cli(&["migrate", "--to", &addr, "--json"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.describe(), dst.logs());
    assert_eq!(one_json_object(&out.stdout)["operation"], "migrate");
    let c = cards(&dst);
    let lan = card(&c, "lan");
    assert_eq!(lan["info"]["tap"], "dst0");
    assert_eq!(lan["info"]["mac"], MAC);
    // The guest exchanges frames on the destination's TAP now.
    let p = dst.progress();
    dst.wait_progress_above(p + 100, Duration::from_secs(20));
    assert_verifies(&dst, "migrated");
    // Five RARP rounds, one frame each, on the destination's TAP only.
    let rarps = |e: &Echo| e.rarp.load(std::sync::atomic::Ordering::Relaxed);
    wait_for("five announce frames on dst0", || rarps(&echo_dst) >= 5);
    assert_eq!(rarps(&echo_src), 0, "the source announces nothing");
    assert_eq!(dst.state(), "running");
}

/// Sends every frame of `builtin:net`'s type that reaches TAP `tap` in
/// namespace `ns` back with the addresses swapped, until dropped, and
/// counts the RARP frames that reach it.
struct Echo {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// RARP frames seen arriving from vmhop.
    rarp: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

/// `builtin:net`'s Ethernet type.
const ETHERTYPE: u16 = 0x88b5;
/// The announce's Ethernet type.
const ETH_P_RARP: u16 = 0x8035;

impl Echo {
    fn start(ns: &str, tap: &str) -> Echo {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let rarp = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (ns, tap, flag, rarps) = (ns.to_string(), tap.to_string(), stop.clone(), rarp.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns moves this thread (only) into the namespace
            // whose fd `f` is open.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket creation.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            let name = std::ffi::CString::new(tap).unwrap();
            // SAFETY: `name` is a NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex > 0);
            // SAFETY: sockaddr_ll is plain data; all zeros is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `sll` is a sockaddr_ll of `len` bytes.
            let r = unsafe { libc::bind(fd, &sll as *const _ as *const libc::sockaddr, len) };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: SO_RCVTIMEO takes a timeval, which `tv` is.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            ready_tx.send(()).unwrap();
            let mut echoed = 0;
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: as above; `from` and `buf` outlive the call.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = len;
                // SAFETY: `buf` has buf.len() bytes, `from` from_len.
                let n = unsafe {
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                        &mut from as *mut _ as *mut libc::sockaddr,
                        &mut from_len,
                    )
                };
                if n < 14 || from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let n = n as usize;
                match u16::from_be_bytes([buf[12], buf[13]]) {
                    ETHERTYPE => {}
                    ETH_P_RARP => {
                        rarps.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    _ => continue,
                }
                let mut out = buf[..n].to_vec();
                out[0..6].copy_from_slice(&buf[6..12]);
                out[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0xec]);
                // SAFETY: `out` has out.len() bytes; `sll` names the TAP.
                let r = unsafe {
                    libc::sendto(
                        fd,
                        out.as_ptr() as *const libc::c_void,
                        out.len(),
                        0,
                        &sll as *const _ as *const libc::sockaddr,
                        len,
                    )
                };
                if r == n as isize {
                    echoed += 1;
                }
            }
            // SAFETY: `fd` is ours.
            unsafe { libc::close(fd) };
            echoed
        });
        ready_rx.recv_timeout(EVENT_WAIT).unwrap();
        Echo {
            stop,
            rarp,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn assert_verifies(vm: &Vm, what: &str) {
    let v = vm.cli_ok(&["verify", "--json"]);
    let r = one_json_object(&v.stdout);
    assert_eq!(r["ok"], true, "{what}: verify failed: {r}\n{}", vm.logs());
}

#[test]
fn a_cpl3_guest_exchanges_frames_with_the_tap_through_numa_moves_and_a_restore() {
    let ns = Netns::new();
    ns.tap("vt0");
    let _echo = Echo::start(&ns.0, "vt0");
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    let vm = Vm::start_wrapped(
        &ns.exec(),
        &["run"],
        &[
            "--memory",
            "64M",
            "--guest",
            "builtin:net",
            "--net",
            "tap=vt0",
        ],
        &[],
    );
    let p = vm.wait_progress_above(100, Duration::from_secs(20));
    let c = cards(&vm);
    let net0 = card(&c, "net0");
    assert!(
        net0["counters"]["tx_packets"].as_u64().unwrap() >= p,
        "{net0}"
    );
    assert!(
        net0["counters"]["rx_packets"].as_u64().unwrap() >= p,
        "{net0}"
    );
    assert_eq!(net0["counters"]["tx_dropped"], 0, "{net0}");
    assert_verifies(&vm, "running");
    for mode in ["stop-copy", "live", "kernel"] {
        let p = vm.progress();
        vm.cli_ok(&["numa-migrate", "--to-node", "0", "--mode", mode]);
        vm.wait_progress_above(p + 100, Duration::from_secs(20));
        assert_verifies(&vm, mode);
    }
    let p = vm.progress();
    vm.cli_ok(&["checkpoint", "--dir", dir_s]);
    vm.wait_progress_above(p + 100, Duration::from_secs(20));
    vm.cli_ok(&["stop"]);
    drop(vm);
    let vm = Vm::start_wrapped(&ns.exec(), &["restore", &format!("{dir_s}@1")], &[], &[]);
    let restored = vm.progress();
    assert!(restored >= p, "restored progress {restored} < {p}");
    // Frames in flight at the checkpoint are gone: the guest resends.
    vm.wait_progress_above(restored + 100, Duration::from_secs(30));
    assert_verifies(&vm, "restored");
}

#[test]
fn bad_net_and_vsock_options_are_refused_before_the_vm_starts() {
    for (args, needle) in [
        (vec!["--net", "tap=t0,mac=zz"], "six hexadecimal octets"),
        (vec!["--net", "mac=52:54:00:00:00:01"], "names no tap"),
        (
            vec!["--net", "tap=t0,id=a", "--net", "tap=t1,id=a"],
            "two network cards have the id 'a'",
        ),
        (
            vec!["--net", "tap=t0", "--net", "tap=t0,id=b"],
            "two network cards use TAP 't0'",
        ),
        (
            vec!["--vsock", "cid=2,socket=/tmp/v.sock"],
            "not a guest's context id",
        ),
        (vec!["--guest", "builtin:net"], "give --net tap=NAME"),
        (
            vec!["--guest", "builtin:net", "--net", "tap=t0", "--vcpus", "2"],
            "one vCPU",
        ),
    ] {
        let mut all = vec!["run", "--api-socket", "/nonexistent/x.sock"];
        if args[1].starts_with("tap=t0,mac=zz") {
            // Also on a destination, before it listens.
            let mut dst = all.clone();
            dst.extend_from_slice(&["--incoming", "unix:/nonexistent/m.sock"]);
            dst.extend_from_slice(&args);
            let out = vmhop(&dst);
            assert_eq!(out.code, Some(2), "{dst:?}: {}", out.describe());
            assert!(out.stderr.contains("hexadecimal"), "{}", out.describe());
        }
        all.extend_from_slice(&args);
        let out = vmhop(&all);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.describe());
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.describe());
    }
}

/// `builtin:net,mode=tx` and `mode=rx` (the benchmarks' guests) through
/// real cards: one VM floods its TAP, a second on another TAP of the same
/// bridge counts every frame of the type that reaches it. The sender's
/// frames leave through its card (counted by the device), the receiver's
/// count grows with them and neither sees a bad frame; the sender's
/// checkpoint reports the stall its traffic felt.
#[test]
fn a_sending_guest_reaches_a_receiving_guest_through_a_bridge() {
    let ns = Netns::new();
    ns.tap("vt0");
    ns.tap("vt1");
    sh(&["ip", "-n", &ns.0, "link", "add", "br0", "type", "bridge"]);
    for dev in ["vt0", "vt1"] {
        sh(&["ip", "-n", &ns.0, "link", "set", dev, "master", "br0"]);
    }
    sh(&["ip", "-n", &ns.0, "link", "set", "br0", "up"]);
    let rx = Vm::start_wrapped(
        &ns.exec(),
        &["run"],
        &[
            "--memory",
            "64M",
            "--guest",
            "builtin:net,mode=rx",
            "--net",
            "tap=vt1",
        ],
        &[],
    );
    let tx = Vm::start_wrapped(
        &ns.exec(),
        &["run"],
        &[
            "--memory",
            "64M",
            "--guest",
            "builtin:net,mode=tx",
            "--net",
            "tap=vt0",
        ],
        &[],
    );
    let sent = tx.wait_progress_above(10_000, Duration::from_secs(20));
    let got = rx.wait_progress_above(1_000, Duration::from_secs(20));
    let card0 = cards(&tx)[0].clone();
    assert!(
        card0["counters"]["tx_packets"].as_u64().unwrap() >= sent,
        "every frame the sender counted left through its card: {card0}"
    );
    let card1 = cards(&rx)[0].clone();
    assert!(
        card1["counters"]["rx_packets"].as_u64().unwrap() >= got,
        "every frame the receiver counted came through its card: {card1}"
    );
    assert_verifies(&tx, "the sender");
    assert_verifies(&rx, "the receiver");
    let dir = tempfile::tempdir().unwrap();
    let r = one_json_object(
        &tx.cli_ok(&[
            "checkpoint",
            "--dir",
            dir.path().to_str().unwrap(),
            "--json",
        ])
        .stdout,
    );
    assert!(
        r["guest_stall_us"].is_u64(),
        "a sending guest's checkpoint reports its stall: {r}"
    );
    let p = tx.progress();
    tx.wait_progress_above(p + 1_000, Duration::from_secs(20));
    assert_verifies(&tx, "the sender after its checkpoint");
}

#[test]
fn builtin_net_takes_a_mode_and_refuses_others() {
    let ns = Netns::new();
    ns.tap("vt0");
    for (spec, needle) in [
        (
            "builtin:net,mode=flood",
            "mode=flood is not a builtin:net mode",
        ),
        (
            "builtin:net,rate=5",
            "unknown option 'rate=5' for builtin:net",
        ),
    ] {
        let out = ns.vmhop(&["run", "--guest", spec, "--net", "tap=vt0"]);
        assert_eq!(out.code, Some(2), "{spec}: {}", out.describe());
        assert!(out.stderr.contains(needle), "{spec}: {}", out.describe());
    }
}
