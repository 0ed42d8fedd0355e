//! `--vsock cid=N,socket=PATH` on the real binary and KVM: options refused
//! before the VM starts (exit codes as the service layer's table gives),
//! the device in `status` with its host socket (mode 0600, removed when the
//! VM ends), and its state through a NUMA move, a checkpoint of the running
//! VM and a restore onto another socket. The builtin guests do not drive
//! the device: connections themselves are tested in the device's unit
//! tests (src/devices/virtio/vsock/tests.rs).

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{vmhop_expecting_exit, Vm};
use serde_json::Value;

const EVENT_WAIT: Duration = Duration::from_secs(20);

fn vsock_status(vm: &Vm) -> Value {
    let s = vm.status();
    s["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no devices: {s}"))
        .iter()
        .find(|d| d["kind"] == "virtio-vsock")
        .cloned()
        .unwrap_or_else(|| panic!("no virtio-vsock in {s}"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn bad_vsock_options_are_refused_before_the_vm_starts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let api = d.join("api.sock");
    let taken = d.join("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let shared = d.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let long = format!("{}/{}", d.display(), "s".repeat(100));
    let cases: Vec<(String, i32, Vec<&str>)> = vec![
        (
            format!("cid=2,socket={}/v.sock", d.display()),
            2,
            vec!["cid=2", "context id"],
        ),
        (
            format!("cid=4294967295,socket={}/v.sock", d.display()),
            2,
            vec!["cid=4294967295", "context id"],
        ),
        (
            format!("cid=3,socket={long}"),
            2,
            vec!["Unix socket address"],
        ),
        (
            format!("cid=3,socket={}", taken.display()),
            1,
            vec!["taken.sock", "exists already"],
        ),
        (
            format!("cid=3,socket={}/v.sock", shared.display()),
            2,
            vec!["shared", "writable by other users"],
        ),
        (
            format!("cid=3,socket={}/missing/v.sock", d.display()),
            2,
            vec!["missing/v.sock", "No such file"],
        ),
    ];
    for (spec, code, needles) in cases {
        let out = vmhop_expecting_exit(
            &[
                "run",
                "--api-socket",
                api.to_str().unwrap(),
                "--vsock",
                &spec,
            ],
            &api,
        );
        assert_eq!(out.code, Some(code), "{spec}: {}", out.describe());
        for n in needles {
            assert!(out.stderr.contains(n), "{spec}: {n}: {}", out.describe());
        }
    }
    assert!(
        std::fs::read_dir(&shared).unwrap().next().is_none(),
        "nothing was made in the shared directory"
    );
}

#[test]
fn the_device_and_its_socket_travel_through_a_numa_move_a_checkpoint_and_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("v.sock");
    let spec = format!("cid=7,socket={}", sock.display());
    let vm = Vm::start(&["--guest", "builtin:dirty,rate=1000", "--vsock", &spec]);
    let v = vsock_status(&vm);
    assert_eq!(v["id"], "vsock");
    assert_eq!(v["info"]["cid"], "7");
    assert_eq!(v["info"]["socket"], sock.to_str().unwrap());
    assert_eq!(v["counters"]["transport_resets"], 0);
    assert_eq!(mode(&sock), 0o600, "the host socket is the user's only");

    // A NUMA move (to the node it is on: the device quiesces and resumes
    // all the same) and a checkpoint of the running VM keep the device and
    // its socket.
    vm.cli_ok(&["numa-migrate", "--to-node", "0", "--mode", "stop-copy"]);
    let ckpt = d.join("ckpt");
    let ckpt_s = ckpt.to_str().unwrap();
    vm.cli_ok(&["checkpoint", "--dir", ckpt_s]);
    assert_eq!(vsock_status(&vm)["info"]["socket"], sock.to_str().unwrap());
    assert!(sock.exists());

    // Restoring while the VM runs: its socket is taken (exit 1), a cid
    // cannot change (exit 2); on a socket of its own it starts.
    let target = format!("{ckpt_s}@1");
    let api = d.join("r.api");
    for (extra, code, needle) in [
        (vec![], 1, "exists already"),
        (
            vec![
                "--vsock".to_string(),
                format!("cid=8,socket={}/r.sock", d.display()),
            ],
            2,
            "cannot change",
        ),
    ] {
        let mut args = vec!["restore", &target, "--api-socket", api.to_str().unwrap()];
        args.extend(extra.iter().map(|s| s.as_str()));
        let out = vmhop_expecting_exit(&args, &api);
        assert_eq!(out.code, Some(code), "{args:?}: {}", out.describe());
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.describe());
    }
    let rsock = d.join("r.sock");
    let r = Vm::start_command(
        &["restore", &target],
        &["--vsock", &format!("socket={}", rsock.display())],
    );
    let v = vsock_status(&r);
    assert_eq!(v["info"]["cid"], "7", "the cid travels with the VM");
    assert_eq!(v["info"]["socket"], rsock.to_str().unwrap());
    assert_eq!(mode(&rsock), 0o600);
    assert!(sock.exists(), "the running VM keeps its socket");
    drop(r);
    drop(vm);
    // Killed on drop: the sockets stay (a stop removes them, below).
    let _ = std::fs::remove_file(&sock);
    let vm = Vm::start(&["--vsock", &spec]);
    vm.cli_ok(&["stop"]);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while sock.exists() {
        assert!(
            std::time::Instant::now() < until,
            "the socket outlived a stopped VM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Connects to the device's socket and CONNECTs to guest port `port`;
/// returns the stream once vmhop answered `OK <hostport>`.
fn connect(sock: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(EVENT_WAIT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8];
    while b[0] != b'\n' {
        s.read_exact(&mut b)
            .expect("vmhop answers the CONNECT line");
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let hostport: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("not an OK line: {line:?}"));
    assert!(hostport >= 1 << 30, "{line:?}");
    s
}

/// Sends `what` and reads the guest's echo of it.
fn echo(s: &mut UnixStream, what: &[u8]) {
    s.write_all(what).unwrap();
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back).expect("the guest echoes");
    assert_eq!(back, what);
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + EVENT_WAIT;
    while !f() {
        assert!(Instant::now() < until, "{what} within {EVENT_WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_host_process_talks_to_the_builtin_vsock_guest_through_moves_and_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("v.sock");
    let spec = format!("cid=5,socket={}", sock.display());
    let vm = Vm::start(&["--guest", "builtin:vsock", "--vsock", &spec]);
    let mut c = connect(&sock, 52);
    echo(&mut c, b"one");
    // A large write: many packets, the guest's and the device's credit.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = c.try_clone().unwrap();
    let sent = big.clone();
    let t = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut back = vec![0u8; big.len()];
    c.read_exact(&mut back).expect("the guest echoes 1 MB");
    t.join().unwrap();
    assert!(back == big, "the echo of 1 MB differs");

    // A NUMA move and a checkpoint of the running VM: the connection
    // carries on.
    vm.cli_ok(&["numa-migrate", "--to-node", "0", "--mode", "stop-copy"]);
    echo(&mut c, b"after the numa move");
    // Its worker follows guest node 0, as the other devices' do.
    let stat = common::one_json_object(&vm.cli_ok(&["numa-stat", "--json"]).stdout);
    let node0 = std::fs::read_to_string("/sys/devices/system/node/node0/cpulist").unwrap();
    let worker = stat["device_threads"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["device"] == "virtio-vsock cid 5"))
        .unwrap_or_else(|| panic!("numa-stat lists no vsock worker: {stat}"));
    assert_eq!(worker["guest_node"], 0, "{worker}");
    assert_eq!(
        common::parse_cpu_list(worker["allowed_cpus"].as_str().unwrap()),
        common::parse_cpu_list(&node0),
        "{worker}"
    );
    let ckpt = d.join("ckpt");
    let ckpt_s = ckpt.to_str().unwrap();
    vm.cli_ok(&["checkpoint", "--dir", ckpt_s]);
    echo(&mut c, b"after the checkpoint");
    assert_eq!(vsock_status(&vm)["counters"]["transport_resets"], 0);

    // The restored VM's guest is told its transport was reset, and takes
    // new connections; the original runs on with its own.
    let rsock = d.join("r.sock");
    let r = Vm::start_command(
        &["restore", &format!("{ckpt_s}@1")],
        &["--vsock", &format!("socket={}", rsock.display())],
    );
    wait_for("the restored guest's TRANSPORT_RESET", || {
        vsock_status(&r)["counters"]["transport_resets"] == 1
    });
    let mut c2 = connect(&rsock, 52);
    echo(&mut c2, b"to the restored guest");
    echo(&mut c, b"to the original");
    let v = vsock_status(&vm);
    assert_eq!(v["counters"]["connections"], 1, "{v}");

    // The original stops: its host connection reads EOF, not a hang.
    vm.cli_ok(&["stop"]);
    let mut b = [0u8; 8];
    match c.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("after the VM stopped, the host connection read {r:?}"),
    }
    echo(&mut c2, b"still");
}

#[test]
fn a_host_migration_resets_vsock_connections_and_the_destination_takes_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("v.sock");
    let dsock = d.join("dst.sock");
    let addr = format!("unix:{}", d.join("m.sock").display());
    let dst = Vm::start(&[
        "--incoming",
        &addr,
        "--vsock",
        &format!("socket={}", dsock.display()),
    ]);
    let src = Vm::start(&[
        "--guest",
        "builtin:vsock",
        "--vsock",
        &format!("cid=9,socket={}", sock.display()),
    ]);
    let mut c = connect(&sock, 52);
    echo(&mut c, b"before the migration");
    let out = src.cli(&["migrate", "--to", &addr, "--json"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    // The source's host connection ends: EOF, never a hang.
    let mut b = [0u8; 8];
    match c.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("after the migration, the source's connection read {r:?}"),
    }
    wait_for("the destination guest's TRANSPORT_RESET", || {
        vsock_status(&dst)["counters"]["transport_resets"] == 1
    });
    let v = vsock_status(&dst);
    assert_eq!(v["info"]["cid"], "9", "{v}");
    let mut c2 = connect(&dsock, 52);
    echo(&mut c2, b"after the migration");
    wait_for("the source's socket removed as its process ends", || {
        !sock.exists()
    });
}
