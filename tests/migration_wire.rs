//! An attacker on the path of a key-protected host migration: a proxy
//! between two real vmhop processes that reads, rewrites or cuts the bytes
//! the source sends. With `--auth-key-file` nothing of the guest may be
//! readable on the wire, and no change to it may reach a running guest:
//! the migration fails, the source runs on and the destination runs
//! nothing.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{one_json_object, Vm};

/// Where the builtin guests keep their control page, which starts with
/// their magic (docs/test-device.md) and never changes after boot.
const CONTROL_ADDR: u64 = 0x3000;
/// The control page's first eight bytes.
const GUEST_MAGIC: &[u8; 8] = b"VMHOPGST";

/// Version 1 of the migration handshake (`auth.rs` before issue 22): its
/// hello, then with a key a 32-byte proof each way, then the stream in
/// clear.
const V1_AUTH_HELLO: &[u8; 12] = b"VMHOPAUT\x01\0\0\0";
/// The source's handshake bytes in version 1 with a key: magic, version,
/// method, role and reserved (16), its nonce (32), its proof (32).
const V1_PSK_HANDSHAKE_LEN: usize = 16 + 32 + 32;
/// Version 1's stream header: magic and version.
const V1_STREAM_HEADER: &[u8; 12] = b"VMHOPMIG\x01\0\0\0";
/// Version 1 frame: kind, flags, reserved, payload length, sequence.
const V1_FRAME_HEADER_LEN: usize = 16;
/// Version 1 `pages` payload prefix: gpa, encoding, reserved, count.
const V1_PAGES_PREFIX_LEN: usize = 16;
const V1_KIND_PAGES: u8 = 2;
const V1_ENCODING_RAW: u8 = 0;
/// The session nonce every version 1 frame's crc32c covers after the frame.
const V1_SESSION_LEN: usize = 32;

/// On a stream the proxy cannot parse, where it flips a bit: well past any
/// handshake and the configuration, inside the first round's page data.
const OPAQUE_FLIP_AT: u64 = 4 << 20;

/// What the attacker does to the bytes from the source.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// Rewrite the guest's control page in flight; on a version 1 stream
    /// fix the frame's crc32c up (it is linear, and the unknown session
    /// nonce cancels out), on any other flip a bit of page data.
    Tamper,
    /// Forward this many bytes, then cut the stream to the destination.
    Truncate(u64),
}

/// What the proxy saw and did.
#[derive(Debug, Default)]
struct Log {
    /// Bytes the source sent.
    from_source: u64,
    /// The guest's magic crossed in clear.
    saw_guest_magic: bool,
    /// The stream was version 1 in clear, and parsed.
    parsed_v1: bool,
    /// What it changed, in words (empty: nothing yet).
    changed: Vec<String>,
}

/// A man in the middle on a Unix socket; serves one connection.
struct Proxy {
    path: PathBuf,
    log: Arc<Mutex<Log>>,
}

impl Proxy {
    fn start(dir: &Path, to: &Path, attack: Attack) -> Proxy {
        let path = dir.join("proxy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let to = to.to_path_buf();
        let l = log.clone();
        thread::spawn(move || {
            let (src, _) = listener.accept().unwrap();
            let dst = UnixStream::connect(&to).unwrap();
            let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            // Destination → source: acks and errors, untouched.
            thread::spawn(move || copy_then_close(dst2, src2));
            forward_source(src, dst, attack, &l);
        });
        Proxy { path, log }
    }

    fn addr(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

fn copy_then_close(mut from: UnixStream, mut to: UnixStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// crc32c is affine: for messages of one length, crc(m ^ d) = crc(m) ^
/// crc(d) ^ crc(0). The change to a frame's checksum from changing its
/// bytes by `delta` is therefore computable without the rest of the
/// frame, the session nonce included.
fn crc_delta(delta: &[u8]) -> u32 {
    crc32c::crc32c(delta) ^ crc32c::crc32c(&vec![0u8; delta.len()])
}

/// Relays the source's bytes to the destination, attacking them.
fn forward_source(mut src: UnixStream, mut dst: UnixStream, attack: Attack, log: &Mutex<Log>) {
    // Bytes received and not yet forwarded: on a version 1 stream, whole
    // frames are held until their checksum can be fixed (the source sends
    // a frame whole before it waits for any reply, so holding one back
    // never stalls it).
    let mut pending: Vec<u8> = Vec::new();
    // Bytes forwarded so far.
    let mut sent: u64 = 0;
    // Version 1 parse state: None until decided; Some(true) parsing.
    let mut v1: Option<bool> = None;
    let mut buf = vec![0u8; 1 << 16];
    let cut = match attack {
        Attack::Truncate(n) => n,
        Attack::Tamper => u64::MAX,
    };
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut l = log.lock().unwrap();
            l.from_source += n as u64;
            // The magic may straddle two reads: look across the seam.
            let tail = pending.len().min(7);
            let mut window = pending[pending.len() - tail..].to_vec();
            window.extend_from_slice(&buf[..n]);
            if window.windows(8).any(|w| w == GUEST_MAGIC) {
                l.saw_guest_magic = true;
            }
        }
        pending.extend_from_slice(&buf[..n]);
        if v1.is_none() && sent + pending.len() as u64 >= V1_AUTH_HELLO.len() as u64 {
            let parse = pending.starts_with(V1_AUTH_HELLO);
            v1 = Some(parse);
            log.lock().unwrap().parsed_v1 = parse;
        }
        let ready = match (v1, attack) {
            (Some(true), Attack::Tamper) => v1_ready(&mut pending, sent, log),
            (None, _) => 0,
            _ => pending.len(),
        };
        if attack == Attack::Tamper && v1 == Some(false) {
            let at = OPAQUE_FLIP_AT;
            if (sent..sent + ready as u64).contains(&at) {
                pending[(at - sent) as usize] ^= 0x01;
                log.lock()
                    .unwrap()
                    .changed
                    .push(format!("flipped bit 0 of byte {at} of the stream"));
            }
        }
        let ready = ready.min(usize::try_from(cut.saturating_sub(sent)).unwrap_or(usize::MAX));
        if dst.write_all(&pending[..ready]).is_err() {
            break;
        }
        sent += ready as u64;
        pending.drain(..ready);
        if sent >= cut {
            log.lock()
                .unwrap()
                .changed
                .push(format!("cut the stream after {sent} bytes"));
            // The destination sees the end; the source's further bytes go
            // nowhere, as on a link that died one way.
            let _ = dst.shutdown(std::net::Shutdown::Write);
            while let Ok(n) = src.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            return;
        }
    }
    let _ = dst.shutdown(std::net::Shutdown::Write);
}

/// On a version 1 stream with a key: how many bytes at the front of
/// `pending` (which starts at stream offset `sent`) may be forwarded now;
/// rewrites the guest's magic in the `pages` frame that carries it and
/// fixes that frame's checksum.
fn v1_ready(pending: &mut [u8], sent: u64, log: &Mutex<Log>) -> usize {
    let clear_from = (V1_PSK_HANDSHAKE_LEN + V1_STREAM_HEADER.len()) as u64;
    let mut at = 0usize;
    // The handshake and the stream header pass as they come.
    if sent < clear_from {
        at = usize::try_from(clear_from - sent)
            .unwrap()
            .min(pending.len());
        if sent + (at as u64) < clear_from {
            return at;
        }
    }
    // Then whole frames only.
    loop {
        let rest = &pending[at..];
        if rest.len() < V1_FRAME_HEADER_LEN {
            return at;
        }
        let len = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
        let frame_len = V1_FRAME_HEADER_LEN + len + 4;
        if rest.len() < frame_len {
            return at;
        }
        let frame = &mut pending[at..at + frame_len];
        if frame[0] == V1_KIND_PAGES && len >= V1_PAGES_PREFIX_LEN {
            let p = &frame[V1_FRAME_HEADER_LEN..];
            let gpa = u64::from_le_bytes(p[..8].try_into().unwrap());
            let count = u32::from_le_bytes(p[12..16].try_into().unwrap()) as u64;
            if p[8] == V1_ENCODING_RAW && (gpa..gpa + count * 4096).contains(&CONTROL_ADDR) {
                let off = V1_FRAME_HEADER_LEN + V1_PAGES_PREFIX_LEN + (CONTROL_ADDR - gpa) as usize;
                assert_eq!(&frame[off..off + 8], GUEST_MAGIC);
                // "VMHOPGST" becomes "VMHOPBAD".
                let mut delta = vec![0u8; V1_FRAME_HEADER_LEN + len + V1_SESSION_LEN];
                for (i, b) in b"BAD".iter().enumerate() {
                    delta[off + 5 + i] = frame[off + 5 + i] ^ b;
                    frame[off + 5 + i] = *b;
                }
                let crc_at = V1_FRAME_HEADER_LEN + len;
                let crc = u32::from_le_bytes(frame[crc_at..].try_into().unwrap());
                let fixed = crc ^ crc_delta(&delta);
                frame[crc_at..].copy_from_slice(&fixed.to_le_bytes());
                log.lock().unwrap().changed.push(format!(
                    "rewrote the guest magic at {CONTROL_ADDR:#x} in the pages frame from \
                     {gpa:#x} and fixed its crc32c from {crc:#010x} to {fixed:#010x}"
                ));
            }
        }
        at += frame_len;
    }
}

fn key_file(dir: &Path) -> String {
    let key = dir.join("key");
    std::fs::write(&key, "a key both hosts share, long enough").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key.to_str().unwrap().to_string()
}

/// A source running `builtin:dirty` in 32 MiB.
fn source() -> Vm {
    Vm::start(&["--memory", "32M", "--guest", "builtin:dirty"])
}

/// The source ran on after a failed migration: running, progressing, intact.
fn assert_source_runs_on(src: &Vm, what: &str) {
    assert_eq!(src.state(), "running", "{what}\n{}", src.logs());
    let p = src.progress();
    src.wait_progress_above(p, Duration::from_secs(10));
    let v = one_json_object(&src.cli_ok(&["verify", "--json"]).stdout);
    assert_eq!(v["ok"], true, "{what}: verify failed: {v}\n{}", src.logs());
}

/// Migrates `src` through a proxy doing `attack` to a key-protected
/// destination; returns the migrate's output, the proxy's log and the
/// destination.
fn migrate_through(src: &Vm, dir: &Path, attack: Attack) -> (common::CmdOutput, Proxy, Vm) {
    let key = key_file(dir);
    let dst_path = dir.join("dst.sock");
    let dst = Vm::start(&[
        "--incoming",
        &format!("unix:{}", dst_path.display()),
        "--auth-key-file",
        &key,
    ]);
    let proxy = Proxy::start(dir, &dst_path, attack);
    src.wait_progress_above(0, Duration::from_secs(10));
    let out = src.cli(&[
        "migrate",
        "--to",
        &proxy.addr(),
        "--json",
        "--auth-key-file",
        &key,
    ]);
    (out, proxy, dst)
}

#[test]
fn a_page_rewritten_on_the_wire_with_its_checksum_fixed_up_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = source();
    let (out, proxy, dst) = migrate_through(&src, dir.path(), Attack::Tamper);
    let log = proxy.log.lock().unwrap();
    assert!(
        !log.changed.is_empty(),
        "the proxy found nothing to change: {log:?}\n{}",
        out.describe()
    );
    if out.code == Some(0) {
        let v = dst.cli(&["verify", "--json"]);
        panic!(
            "the destination accepted a tampered stream and runs the changed guest \
             (the proxy {:?}); its verify says: {}",
            log.changed,
            v.stdout.trim()
        );
    }
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(out.stderr.contains("runs on here"), "{}", out.describe());
    assert_source_runs_on(&src, "after a tampered stream");
    let s = dst.status();
    assert_eq!(s["state"], "incoming", "the destination runs nothing: {s}");
    let why = s["last_error"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains("tampered") || why.contains("authentic"),
        "the destination says the stream is not authentic: {s}"
    );
}

#[test]
fn with_a_key_nothing_of_the_guest_crosses_the_wire_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = source();
    let (out, proxy, dst) = migrate_through(&src, dir.path(), Attack::Truncate(u64::MAX));
    assert_eq!(out.code, Some(0), "{}\n{}", out.describe(), dst.logs());
    assert!(src.wait_exit().success(), "{}", src.logs());
    let log = proxy.log.lock().unwrap();
    assert!(log.from_source > 16 << 20, "the guest crossed: {log:?}");
    assert!(
        !log.saw_guest_magic,
        "the guest's control page crossed the wire in clear: {log:?}"
    );
}

#[test]
fn a_stream_cut_on_the_wire_fails_cleanly_and_the_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let src = source();
    let (out, proxy, dst) = migrate_through(&src, dir.path(), Attack::Truncate(2 << 20));
    let log = proxy.log.lock().unwrap();
    assert!(
        log.changed.iter().any(|c| c.starts_with("cut")),
        "the proxy cut nothing: {log:?}\n{}",
        out.describe()
    );
    assert_eq!(out.code, Some(1), "{}\n{}", out.describe(), dst.logs());
    assert!(out.stderr.contains("runs on here"), "{}", out.describe());
    assert_source_runs_on(&src, "after a cut stream");
    let s = dst.status();
    assert_eq!(s["state"], "incoming", "the destination runs nothing: {s}");
    let why = s["last_error"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains("closed the stream") || why.contains("stream ended"),
        "the destination says the stream ended early: {s}"
    );
}
