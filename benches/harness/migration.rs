//! Host migration over TCP loopback: this process's VM (the source) to a
//! `vmhop run --incoming` process (the destination), against a plain TCP
//! transfer of the same number of bytes between two processes (this one
//! and a child of this benchmark that reads to the end and exits).
//!
//! The guest's memory is full of random bytes (incompressible) or of the
//! dirty guest's own pattern (a counter and a tag per page, the rest zero:
//! compressible), so that neither zero-page skipping nor compression
//! flatters a figure unless the scenario says so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmhop::guest::GuestSpec;
use vmhop::migration::source::{migrate, InFlight, MigrateReport, MigrateRequest};
use vmhop::migration::Compression;

use super::fixture::{
    boot, check_alive, dirty_guest, failed, fill_working_set, mib_per_s, ms, pause_baseline,
    random_bytes, wss_bytes, PACED_RATE,
};
use super::streams::{secure_stream, Creds, Kind};
use super::{BenchError, RunCtx, Sample, Scenario};

/// The argument that turns this benchmark binary into the plain-TCP sink.
pub const TCP_SINK_ARG: &str = "--tcp-sink";
/// The vmhop binary the destination runs.
const VMHOP: &str = env!("CARGO_BIN_EXE_vmhop");
/// Block written by the plain TCP baseline.
const BLOCK: usize = 8 << 20;

/// The scenarios of this module, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario(
            "migrate-idle",
            "migrate a 1 GiB VM (builtin:idle, 900 MiB random bytes from the host) over TCP loopback to a `vmhop run --incoming` process: throughput MiB/s of page data (baseline: plain TCP transfer of as many bytes between two processes), total ms (same baseline), downtime µs (baseline: bare vm.pause()+vm.resume()), pause phases",
            Load::Idle,
            Compression::None,
        ),
        scenario(
            "migrate-10k",
            "as migrate-idle, the guest builtin:dirty wss=900M random-filled writing 10000 pages/s",
            Load::Paced,
            Compression::None,
        ),
        scenario(
            "migrate-lz4-random",
            "as migrate-idle with --compress lz4 on incompressible (random) memory",
            Load::Idle,
            Compression::Lz4,
        ),
        scenario(
            "migrate-lz4-pattern",
            "as migrate-idle with --compress lz4 on compressible memory (builtin:dirty wss=900M, no random fill, 10000 pages/s)",
            Load::Pattern,
            Compression::Lz4,
        ),
        scenario(
            "migrate-zstd-random",
            "as migrate-idle with --compress zstd on incompressible (random) memory",
            Load::Idle,
            Compression::Zstd,
        ),
        scenario(
            "migrate-zstd-pattern",
            "as migrate-lz4-pattern with --compress zstd",
            Load::Pattern,
            Compression::Zstd,
        ),
        scenario(
            "migrate-none-pattern",
            "as migrate-lz4-pattern without compression",
            Load::Pattern,
            Compression::None,
        ),
        key_scenario(),
    ]
}

/// What the guest does while it migrates.
#[derive(Clone, Copy)]
enum Load {
    /// builtin:idle over random bytes.
    Idle,
    /// builtin:dirty over random bytes at [`PACED_RATE`].
    Paced,
    /// builtin:dirty over its own pattern (compressible) at [`PACED_RATE`].
    Pattern,
}

/// A `vmhop run --incoming` process, killed if still there when dropped.
struct Destination {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
    listening: String,
}

impl Destination {
    /// `vmhop run --incoming tcp://127.0.0.1:0 EXTRA...`.
    fn start(extra: &[&std::ffi::OsStr]) -> Result<Destination, BenchError> {
        let dir = tempfile::tempdir().map_err(failed("a temporary directory"))?;
        let socket = dir.path().join("api.sock");
        let mut child = Command::new(VMHOP)
            .args([
                "run",
                "--incoming",
                "tcp://127.0.0.1:0",
                "--json",
                "--api-socket",
            ])
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(failed(format!("starting {VMHOP} run --incoming")))?;
        let out = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(failed("reading the destination's first line"))?;
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(failed(format!("the destination said {line:?}")))?;
        let listening = v["listening"]
            .as_str()
            .ok_or_else(|| BenchError::Failed(format!("no listening address in {v}")))?
            .to_string();
        Ok(Destination {
            child,
            socket,
            _dir: dir,
            listening,
        })
    }

    /// Checks the VM runs there, then stops it.
    fn stop(mut self) -> Result<(), BenchError> {
        let s = vmhop::api::client::call(&self.socket, "GET", "/api/v1/vm.status", None, None)
            .map_err(failed("status of the destination"))?;
        if s["state"] != "running" {
            return Err(BenchError::Failed(format!(
                "the destination is not running: {s}"
            )));
        }
        let _ = vmhop::api::client::call(&self.socket, "PUT", "/api/v1/vm.stop", None, None);
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The plain-TCP sink: listens on loopback, prints its port, reads one
/// connection to its end, exits. Run as `scenarios --tcp-sink`.
pub fn tcp_sink() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    println!("{}", l.local_addr().expect("local address").port());
    let _ = std::io::stdout().flush();
    let (mut s, _) = l.accept().expect("accept");
    let mut buf = vec![0u8; BLOCK];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// Sends `bytes` random bytes to a child process over TCP loopback; the
/// time from connecting until the child has read them all and exited.
fn plain_tcp(bytes: u64, seed: u64) -> Result<Duration, BenchError> {
    let me = std::env::current_exe().map_err(failed("the benchmark's own path"))?;
    let mut child = Command::new(me)
        .arg(TCP_SINK_ARG)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(failed("starting the TCP sink"))?;
    let mut port = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut port)
        .map_err(failed("reading the sink's port"))?;
    let port: u16 = port
        .trim()
        .parse()
        .map_err(failed(format!("the sink's port {port:?}")))?;
    let data = random_bytes(BLOCK, seed);
    let t = Instant::now();
    let mut s =
        TcpStream::connect(("127.0.0.1", port)).map_err(failed("connecting to the sink"))?;
    let _ = s.set_nodelay(true);
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(BLOCK);
        s.write_all(&data[..n])
            .map_err(failed("writing to the sink"))?;
        left -= n as u64;
    }
    drop(s);
    child.wait().map_err(failed("waiting for the sink"))?;
    Ok(t.elapsed())
}

fn scenario(
    name: &'static str,
    about: &'static str,
    load: Load,
    compression: Compression,
) -> Scenario {
    Scenario::new(name, about, move |ctx: &RunCtx| {
        let wss = wss_bytes(ctx);
        let guest = match load {
            Load::Idle => GuestSpec::Idle,
            Load::Paced => dirty_guest(wss, Some(PACED_RATE)),
            Load::Pattern => GuestSpec::Dirty {
                wss: Some(wss),
                rate: Some(PACED_RATE),
                fill_random: false,
            },
        };
        let vm = boot(ctx, "bench-migrate", guest)?;
        if matches!(load, Load::Idle) {
            fill_working_set(&vm, wss)?;
        }
        if matches!(load, Load::Pattern) {
            // Let the guest write its pattern over the whole working set.
            super::fixture::rewrite_working_set(&vm)?;
        }
        check_alive(&vm)?;
        let rtt = pause_baseline(ctx, &vm)?;
        let dst = Destination::start(&[])?;
        let req = MigrateRequest {
            to: dst.listening.clone(),
            compress: compression,
            ..Default::default()
        };
        let flight = Arc::new(InFlight::default());
        let r: MigrateReport =
            migrate(&vm, &req, &flight, &Default::default()).map_err(failed("migrating"))?;
        drop(vm);
        dst.stop()?;
        let plain = plain_tcp(r.page_bytes, 0x5eed + ctx.run as u64)?;
        let total = Duration::from_secs_f64(r.total_ms / 1e3);
        let mut out = vec![
            Sample::new(
                "throughput (page data)",
                "MiB/s",
                mib_per_s(r.page_bytes, total),
            )
            .vs(mib_per_s(r.page_bytes, plain)),
            Sample::new("total", "ms", r.total_ms).vs(ms(plain)),
            Sample::new("downtime", "µs", r.downtime_us as f64).vs(rtt),
            Sample::new(
                "bytes on the wire",
                "MiB",
                r.bytes_sent as f64 / (1u64 << 20) as f64,
            )
            .vs(r.page_bytes as f64 / (1u64 << 20) as f64),
            Sample::new("rounds", "rounds", r.rounds as f64),
            Sample::new("pages in pause", "pages", r.pages_in_pause as f64),
            Sample::new("throttle", "%", r.throttle_max_percent as f64),
        ];
        out.extend(super::fixture::pause_phases("pause: ", &r.pause_breakdown));
        Ok(out)
    })
}

/// Boots the migrate-idle guest and migrates it to a fresh destination,
/// with `key` on both ends if given; the report and the bare pause
/// round trip measured before.
fn migrate_idle_once(
    ctx: &RunCtx,
    key: Option<&std::path::Path>,
) -> Result<(MigrateReport, f64), BenchError> {
    let wss = wss_bytes(ctx);
    let vm = boot(ctx, "bench-migrate-key", GuestSpec::Idle)?;
    fill_working_set(&vm, wss)?;
    check_alive(&vm)?;
    let rtt = pause_baseline(ctx, &vm)?;
    let extra: Vec<&std::ffi::OsStr> = match key {
        Some(k) => vec!["--auth-key-file".as_ref(), k.as_os_str()],
        None => Vec::new(),
    };
    let dst = Destination::start(&extra)?;
    let req = MigrateRequest {
        to: dst.listening.clone(),
        auth_key_file: key.map(|k| k.to_path_buf()),
        ..Default::default()
    };
    let flight = Arc::new(InFlight::default());
    let r = migrate(&vm, &req, &flight, &Default::default()).map_err(failed("migrating"))?;
    drop(vm);
    dst.stop()?;
    Ok((r, rtt))
}

/// `migrate-key`: migrate-idle with a pre-shared key, so the stream runs
/// sealed in key mode's Noise channel; beside it in the same run, the same
/// migration without a key, and the same bytes over plain TCP, inside
/// vmhop's TLS mode and inside its Noise channel between two processes.
fn key_scenario() -> Scenario {
    Scenario::new(
        "migrate-key",
        "as migrate-idle with --auth-key-file on both ends (the stream sealed in Noise_NNpsk0_25519_AESGCM_SHA256): throughput MiB/s of page data vs the same migration without a key, vs plain TCP, vs a TLS 1.3 stream of as many bytes through vmhop's TLS mode (rustls) and vs a stream through vmhop's Noise channel alone (each between two processes), and those streams vs plain TCP; total ms, downtime µs (vs the migration without a key), bytes on the wire",
        move |ctx: &RunCtx| {
            let creds = Creds::new()?;
            let key = creds.key_file();
            let (open, _) = migrate_idle_once(ctx, None)?;
            let (r, _) = migrate_idle_once(ctx, Some(&key))?;
            let seed = 0x5eed + ctx.run as u64;
            let plain = plain_tcp(r.page_bytes, seed)?;
            let tls = secure_stream(Kind::Tls, &creds, r.page_bytes, seed)?;
            let noise = secure_stream(Kind::Noise, &creds, r.page_bytes, seed)?;
            let secs = |ms: f64| Duration::from_secs_f64(ms / 1e3);
            let rate = |d: Duration| mib_per_s(r.page_bytes, d);
            let keyed = rate(secs(r.total_ms));
            Ok(vec![
                Sample::new("throughput, key mode vs no key", "MiB/s", keyed)
                    .vs(mib_per_s(open.page_bytes, secs(open.total_ms))),
                Sample::new("throughput, key mode vs plain TCP", "MiB/s", keyed).vs(rate(plain)),
                Sample::new("throughput, key mode vs TLS stream", "MiB/s", keyed).vs(rate(tls)),
                Sample::new("throughput, key mode vs Noise stream", "MiB/s", keyed)
                    .vs(rate(noise)),
                Sample::new("TLS stream vs plain TCP", "MiB/s", rate(tls)).vs(rate(plain)),
                Sample::new("Noise stream vs plain TCP", "MiB/s", rate(noise)).vs(rate(plain)),
                Sample::new("Noise stream vs TLS stream", "MiB/s", rate(noise)).vs(rate(tls)),
                Sample::new("total, key mode vs no key", "ms", r.total_ms).vs(open.total_ms),
                Sample::new("downtime, key mode vs no key", "µs", r.downtime_us as f64)
                    .vs(open.downtime_us as f64),
                Sample::new(
                    "bytes on the wire (frames)",
                    "MiB",
                    r.bytes_sent as f64 / (1u64 << 20) as f64,
                )
                .vs(r.page_bytes as f64 / (1u64 << 20) as f64),
            ])
        },
    )
}
