//! Baselines for what key mode costs: the same bytes between this process
//! and a child of this benchmark, inside vmhop's TLS mode (rustls, TLS 1.3)
//! or inside its key mode's Noise channel, through vmhop's own handshakes
//! over TCP loopback. The plain TCP baseline is `migration::plain_tcp`.
//!
//! The child (`scenarios --stream-sink tls|noise DIR`) listens on loopback,
//! prints its port, authenticates one source with the credentials in DIR,
//! reads to the end and exits; the time runs from connecting until it has
//! exited.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmhop::migration::{
    connect, handshake_as_destination, handshake_as_source, Address, Listener, Security,
};

use super::fixture::{failed, random_bytes};
use super::BenchError;

/// The argument that turns this benchmark binary into a stream sink.
pub const STREAM_SINK_ARG: &str = "--stream-sink";
/// Block written and read.
const BLOCK: usize = 8 << 20;
/// How long connecting and each handshake read may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which authenticated stream.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// vmhop's TLS mode.
    Tls,
    /// vmhop's key mode (the Noise channel).
    Noise,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Tls => "tls",
            Kind::Noise => "noise",
        }
    }
}

/// A key file and a CA-signed certificate for `127.0.0.1`, in a private
/// directory that both ends of the baselines read.
pub struct Creds {
    dir: tempfile::TempDir,
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), BenchError> {
    std::fs::write(path, bytes).map_err(failed(format!("writing {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(failed(format!("chmod 600 {}", path.display())))
}

impl Creds {
    /// Makes a fresh key and a CA and host certificate.
    pub fn new() -> Result<Creds, BenchError> {
        let dir = tempfile::tempdir().map_err(failed("a temporary directory"))?;
        let tls = |e: rcgen::Error| BenchError::Failed(format!("making certificates: {e}"));
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().map_err(tls)?;
        let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(tls)?;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().map_err(tls)?;
        let cert = params.signed_by(&key, &issuer).map_err(tls)?;
        let d = dir.path();
        write_private(&d.join("host.crt"), cert.pem().as_bytes())?;
        write_private(&d.join("host.key"), key.serialize_pem().as_bytes())?;
        write_private(&d.join("ca.crt"), ca_cert.pem().as_bytes())?;
        write_private(&d.join("key"), &random_bytes(32, 0xc0ffee))?;
        Ok(Creds { dir })
    }

    /// The pre-shared key file.
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("key")
    }
}

fn security(kind: Kind, dir: &Path) -> Result<Security, BenchError> {
    match kind {
        Kind::Tls => Security::tls_from_files(
            &dir.join("host.crt"),
            &dir.join("host.key"),
            &dir.join("ca.crt"),
        ),
        Kind::Noise => Security::psk_from_file(&dir.join("key")),
    }
    .map_err(failed("loading the credentials"))
}

/// The sink: `scenarios --stream-sink tls|noise DIR`. Exits 1 with a
/// message if anything fails.
pub fn stream_sink(args: &[String]) {
    let run = || -> Result<(), String> {
        let (kind, dir) = match args {
            [k, d] if k == "tls" => (Kind::Tls, Path::new(d)),
            [k, d] if k == "noise" => (Kind::Noise, Path::new(d)),
            _ => return Err(format!("usage: {STREAM_SINK_ARG} tls|noise DIR")),
        };
        let security = security(kind, dir).map_err(|e| e.to_string())?;
        let at: Address = "tcp://127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
        let listener = Listener::bind(&at).map_err(|e| e.to_string())?;
        match listener.local_address() {
            Address::Tcp { port, .. } => println!("{port}"),
            other => return Err(format!("listening on {other}")),
        }
        let _ = std::io::stdout().flush();
        let conn = listener.accept().map_err(|e| e.to_string())?;
        let mut auth = handshake_as_destination(conn, &security, HANDSHAKE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; BLOCK];
        // The end: EOF, or TLS's error for a peer gone without close_notify.
        while let Ok(n) = auth.conn.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("stream sink: {e}");
        std::process::exit(1);
    }
}

/// Sends `bytes` random bytes through a `kind` stream to a sink child;
/// the time from connecting until the child has read them all and exited.
pub fn secure_stream(
    kind: Kind,
    creds: &Creds,
    bytes: u64,
    seed: u64,
) -> Result<Duration, BenchError> {
    let me = std::env::current_exe().map_err(failed("the benchmark's own path"))?;
    let mut child = Command::new(me)
        .arg(STREAM_SINK_ARG)
        .arg(kind.arg())
        .arg(creds.dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(failed("starting the stream sink"))?;
    let mut port = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut port)
        .map_err(failed("reading the sink's port"))?;
    let port: u16 = port
        .trim()
        .parse()
        .map_err(failed(format!("the sink's port {port:?}")))?;
    let to: Address = format!("tcp://127.0.0.1:{port}")
        .parse()
        .map_err(failed("the sink's address"))?;
    let security = security(kind, creds.dir.path())?;
    let data = random_bytes(BLOCK, seed);
    let t = Instant::now();
    let conn = connect(&to, HANDSHAKE_TIMEOUT).map_err(failed("connecting to the sink"))?;
    let mut auth = handshake_as_source(conn, &security, &to, HANDSHAKE_TIMEOUT)
        .map_err(failed("authenticating with the sink"))?;
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(BLOCK);
        auth.conn
            .write_all(&data[..n])
            .map_err(failed("writing to the sink"))?;
        left -= n as u64;
    }
    auth.conn.flush().map_err(failed("flushing to the sink"))?;
    drop(auth);
    let status = child.wait().map_err(failed("waiting for the sink"))?;
    if !status.success() {
        return Err(BenchError::Failed(format!(
            "the {kind:?} sink failed: {status}"
        )));
    }
    Ok(t.elapsed())
}
