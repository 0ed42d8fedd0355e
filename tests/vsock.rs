//! `--vsock cid=N,socket=PATH` on the real binary and KVM: options refused
//! before the VM starts (exit codes as the service layer's table gives),
//! the device in `status` with its host socket (mode 0600, removed when the
//! VM ends), and its state through a NUMA move, a checkpoint of the running
//! VM and a restore onto another socket. The builtin guests do not drive
//! the device: connections themselves are tested in the device's unit
//! tests (src/devices/virtio/vsock/tests.rs).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{vmhop_expecting_exit, Vm};
use serde_json::Value;

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
