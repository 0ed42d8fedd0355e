//! Step 8 of the builtin demo: host–guest sockets through a move. A VM
//! runs `builtin:vsock` (a CPL3 virtio-vsock driver that accepts every
//! connection and echoes it) with `--vsock`; the demo connects to the
//! VM's socket as any host program would, with Firecracker's `CONNECT
//! <port>`, and echoes a line: before and after a NUMA move and a
//! checkpoint of the running VM, on the same connection. The checkpoint
//! restored as a new VM on a socket of its own tells its guest that the
//! transport was reset and takes new connections, while the original's
//! connection still echoes; once the original stops, its connection reads
//! end of file instead of hanging. No TAP or privilege is needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::super::checks::{self, check, QUICK};
use super::super::render::group;
use super::super::report::{EchoFound, VsockFound};
use super::super::supervise::{VmProcess, NO_BODY};
use super::{Demo, DemoError, Started, STEPS};
use crate::api::numa::{Mode, NumaMigrateRequest};
use crate::api::run::Arrival;
use crate::api::vm::StatusReport;
use crate::api::Endpoint;

/// The guest port the host connects to (the guest takes any).
const GUEST_PORT: u32 = 1234;
/// The guest's context id.
const CID: u32 = 3;
/// How long one socket operation may take before the step fails.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// How long the restored guest may take to see its transport reset.
const RESET_WAIT: Duration = Duration::from_secs(10);
/// How often `status` is read meanwhile.
const POLL: Duration = Duration::from_millis(20);

/// A host program's connection to a VM's guest port.
struct Conn {
    stream: BufReader<UnixStream>,
    /// The `OK <hostport>` line the device answered.
    ok: String,
    sent: u64,
}

impl Conn {
    /// Connects to `socket` and asks for [`GUEST_PORT`].
    fn open(step: &str, socket: &Path) -> Result<Conn, DemoError> {
        let io = |what: &str, e: std::io::Error| {
            check(step, format!("{what} {}: {e}", socket.display()))
        };
        let mut s = UnixStream::connect(socket).map_err(|e| io("connecting to", e))?;
        s.set_read_timeout(Some(SOCKET_WAIT))
            .and_then(|()| s.set_write_timeout(Some(SOCKET_WAIT)))
            .map_err(|e| io("setting timeouts on", e))?;
        s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .map_err(|e| io("writing CONNECT to", e))?;
        let mut stream = BufReader::new(s);
        let mut ok = String::new();
        stream
            .read_line(&mut ok)
            .map_err(|e| io("reading the answer to CONNECT from", e))?;
        let ok = ok.trim_end().to_string();
        if !ok.starts_with("OK ") {
            return Err(check(
                step,
                format!("CONNECT {GUEST_PORT} was answered '{ok}', not OK <port>"),
            ));
        }
        Ok(Conn {
            stream,
            ok,
            sent: 0,
        })
    }

    /// Sends a numbered line and reads it back.
    fn echo(&mut self, step: &str, when: &str) -> Result<EchoFound, DemoError> {
        let line = format!("hello from the host, line {}, {when}\n", self.sent + 1);
        let t = Instant::now();
        let s = self.stream.get_mut();
        s.write_all(line.as_bytes())
            .map_err(|e| check(step, format!("writing to the guest: {e}")))?;
        let mut back = vec![0u8; line.len()];
        self.stream
            .read_exact(&mut back)
            .map_err(|e| check(step, format!("reading the echo: {e}")))?;
        let round_trip_us = t.elapsed().as_secs_f64() * 1e6;
        if back != line.as_bytes() {
            return Err(check(
                step,
                format!(
                    "the guest echoed {:?}, not {:?}",
                    String::from_utf8_lossy(&back),
                    line
                ),
            ));
        }
        self.sent += 1;
        Ok(EchoFound {
            when: when.into(),
            bytes: line.len() as u64,
            round_trip_us,
        })
    }

    /// Whether the connection reads end of file (or a reset) now: the VM
    /// behind it is gone and nothing hangs.
    fn ends(&mut self) -> Result<bool, DemoError> {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(check(
                "read the stopped VM's connection",
                format!("no end of file within {SOCKET_WAIT:?}: {e}"),
            )),
        }
    }
}

/// The vsock device's `transport_resets` counter in `status`.
fn transport_resets(vm: &mut VmProcess, step: &str) -> Result<u64, DemoError> {
    let s: StatusReport = vm.call(step, Endpoint::Status, NO_BODY, QUICK)?;
    Ok(s.devices
        .unwrap_or_default()
        .iter()
        .find(|d| d.kind == "virtio-vsock")
        .and_then(|d| d.counters.get("transport_resets").copied())
        .unwrap_or(0))
}

impl Demo {
    /// Step 8.
    pub(super) fn vsock(&mut self) -> Result<(), DemoError> {
        let dir = self.sup.dir().to_path_buf();
        let socket = dir.join("vsock.sock");
        let spec = format!("cid={CID},socket={}", socket.display());
        self.out.step(
            8,
            STEPS,
            &format!("host–guest sockets: vmhop run --guest builtin:vsock --vsock {spec}"),
        );
        let api = "vsock-vm.sock";
        let args = [
            "run".into(),
            "--name".into(),
            "demo-vsock".into(),
            "--api-socket".into(),
            dir.join(api).display().to_string(),
            "--vcpus".into(),
            "1".into(),
            "--memory".into(),
            "64M".into(),
            "--guest".into(),
            "builtin:vsock".into(),
            "--vsock".into(),
            spec,
            "--json".into(),
        ];
        let mut vm = self.sup.spawn("run", &args, api, "vsock.log")?;
        let _: Started = vm.start_report()?;
        let mut c = Conn::open("connect to the guest", &socket)?;
        let first = c.echo("echo through the socket", "at the start")?;
        self.out.line(format!(
            "a host program connected to {} and sent CONNECT {GUEST_PORT}: answered '{}'; \
             a line of {} bytes echoed in {:.0} µs",
            socket.display(),
            c.ok,
            first.bytes,
            first.round_trip_us
        ));
        let status: StatusReport = vm.call("status", Endpoint::Status, NO_BODY, QUICK)?;
        let home = status.numa.first().map_or(0, |n| n.host_node);
        let req = NumaMigrateRequest {
            to_node: home,
            guest_node: None,
            mode: Mode::StopCopy,
            max_downtime_ms: None,
        };
        let moved = checks::numa_move(&mut vm, "move the vsock guest", &req)?;
        let after_move = c.echo("echo after the move", "after a NUMA move")?;
        self.out.line(format!(
            "NUMA move (stop-copy to node {home}, guest paused {} µs): the same connection \
             echoes ({:.0} µs)",
            group(moved.downtime_us),
            after_move.round_trip_us
        ));
        let ck_dir = dir.join("vsock-checkpoints");
        let ck = checks::checkpoint(&mut vm, "checkpoint the vsock guest", &ck_dir, None)?;
        let after_ck = c.echo("echo after the checkpoint", "after a checkpoint")?;
        self.out.line(format!(
            "checkpoint {} of the running VM (guest paused {} µs): the same connection \
             echoes ({:.0} µs)",
            ck.id,
            group(ck.downtime_us),
            after_ck.round_trip_us
        ));

        let rsocket = dir.join("vsock-restored.sock");
        let api = "vsock-restored-vm.sock";
        let args = [
            "restore".into(),
            format!("{}@{}", ck_dir.display(), ck.id),
            "--name".into(),
            "demo-vsock-restored".into(),
            "--api-socket".into(),
            dir.join(api).display().to_string(),
            "--vsock".into(),
            format!("socket={}", rsocket.display()),
            "--json".into(),
        ];
        let mut r = self
            .sup
            .spawn("restore", &args, api, "vsock-restored.log")?;
        let started: Started = r.start_report()?;
        if !matches!(started.restore, Some(Arrival::Restored(_))) {
            return Err(check(
                "restore the vsock guest",
                "its start report names no restore",
            ));
        }
        let step = "the restored guest's transport reset";
        let t = Instant::now();
        let mut resets = transport_resets(&mut r, step)?;
        while resets == 0 {
            if t.elapsed() > RESET_WAIT {
                return Err(check(
                    step,
                    format!("status shows no TRANSPORT_RESET delivered within {RESET_WAIT:?}"),
                ));
            }
            thread::sleep(POLL);
            resets = transport_resets(&mut r, step)?;
        }
        let mut c2 = Conn::open("connect to the restored guest", &rsocket)?;
        let restored = c2.echo(
            "echo through the restored VM's socket",
            "to the restored VM",
        )?;
        let original = c.echo(
            "echo to the original after the restore",
            "after the restore",
        )?;
        self.out.line(format!(
            "the checkpoint restored as a new VM on {}: its guest was told the transport \
             was reset (TRANSPORT_RESET: connections do not survive a restore), a new \
             connection echoes ({:.0} µs), and the original's still does",
            rsocket.display(),
            restored.round_trip_us
        ));
        vm.stop("stop the vsock guest")?;
        let eof = c.ends()?;
        if !eof {
            return Err(check(
                "read the stopped VM's connection",
                "it still gave bytes after its VM stopped",
            ));
        }
        self.out.line(
            "original stopped: its host connection reads end of file, no hang; \
             the restored VM stopped too",
        );
        r.stop("stop the restored vsock guest")?;
        self.found.vsock = Some(VsockFound {
            connect: c.ok.clone(),
            echoes: vec![first, after_move, after_ck, original],
            numa_move: moved,
            checkpoint: ck,
            restored_transport_resets: resets,
            restored_echo: restored,
            end_of_file_after_stop: eof,
        });
        Ok(())
    }
}
