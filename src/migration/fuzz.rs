//! Bounded property tests of the parsers of untrusted bytes on the
//! migration wire: the frame reader, key mode's sealed records and the
//! handshake, over arbitrary and mutated input (as `checkpoint/format.rs`
//! does for the checkpoint reader). Each property runs a few hundred cases
//! in a second or two; none may panic, every error must be a clean one,
//! and no input may make a reader allocate much more than it sent.
//!
//! cargo-fuzz would need a nightly toolchain; these run in the normal
//! suite instead.

use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use super::address::Conn;
use super::auth::{handshake_as_destination, handshake_as_source, Security, AUTH_MAGIC};
use super::auth::{AuthError, AUTH_VERSION};
use super::compress::Encoding;
use super::noise::{seal_error, sealed_pair, PSK_LEN};
use super::protocol::{
    AckKind, Binding, Frame, FrameReader, FrameWriter, Integrity, Link, PageTarget, ProtocolError,
    Received, SessionNonce, SESSION_NONCE_LEN,
};
use super::Address;

/// How far a payload buffer may grow before its bytes arrive (`protocol.rs`'s
/// `BODY_GROWTH`).
const BODY_GROWTH: usize = 1 << 20;
const SESSION: SessionNonce = SessionNonce([7; SESSION_NONCE_LEN]);
const PSK: [u8; PSK_LEN] = [9; PSK_LEN];
/// Bounds every handshake read, though none should wait: the peer's bytes
/// are all written and its side shut before the handshake starts.
const TIMEOUT: Duration = Duration::from_secs(2);

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(p, v)| Mutation::Insert(p, v)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Remove(p, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len().max(1);
    match m {
        Mutation::Set(p, b) if !bytes.is_empty() => bytes[p % len] = *b,
        Mutation::Truncate(p) => bytes.truncate(p % len),
        Mutation::Insert(p, v) => {
            let at = p % (bytes.len() + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        Mutation::Remove(p, n) if !bytes.is_empty() => {
            let at = p % len;
            let end = (at + n).min(bytes.len());
            bytes.drain(at..end);
        }
        _ => {}
    }
}

fn mutated(mut bytes: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        apply(&mut bytes, m);
    }
    bytes
}

/// Every kind of frame, small.
fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::Config(br#"{"vcpus":2}"#.to_vec()),
        Frame::Pages {
            gpa: 0x10_0000,
            encoding: Encoding::Raw,
            count: 1,
            data: (0..4096).map(|i| (i % 251) as u8).collect(),
        },
        Frame::Pages {
            gpa: 0x20_0000,
            encoding: Encoding::Lz4,
            count: 3,
            data: vec![1, 2, 3],
        },
        Frame::Zero {
            gpa: 0x1_0000_0000,
            pages: 1 << 20,
        },
        Frame::State(vec![9; 100]),
        Frame::EndOfRound { round: 3 },
        Frame::Ack {
            what: AckKind::Round,
        },
        Frame::Error("refused".into()),
        Frame::Abort("cancelled".into()),
        Frame::Done,
    ]
}

fn encode(binding: &Binding) -> Vec<u8> {
    let mut w = FrameWriter::bound(Vec::new(), binding);
    for f in &sample_frames() {
        w.write_frame(f).unwrap();
    }
    w.flush().unwrap();
    w.get_ref().clone()
}

/// A plaintext stream without checksums: what a sealed connection's frame
/// layer reads. Mutations of it reach every check behind the checksum.
fn unchecked() -> Binding {
    Binding {
        session: SESSION,
        integrity: Integrity::Sealed,
        link: Link::single([1; 16]),
    }
}

/// Reads frames until an error or `done`; checks the error is a clean
/// one and the payload buffer stayed within what the input could justify.
fn read_all<R: Read>(r: &mut FrameReader<R>) -> Result<Vec<Frame>, ProtocolError> {
    let mut frames = Vec::new();
    let result = loop {
        match r.read_frame() {
            Ok(Frame::Done) => {
                frames.push(Frame::Done);
                break Ok(frames);
            }
            Ok(f) => frames.push(f),
            Err(e) => break Err(e),
        }
    };
    assert!(
        r.largest_buffer() <= BODY_GROWTH,
        "a payload buffer of {} bytes",
        r.largest_buffer()
    );
    if let Err(e) = &result {
        assert!(!e.to_string().is_empty());
        // Broken for good after anything but a timeout.
        assert!(matches!(r.read_frame(), Err(ProtocolError::Broken)));
    }
    result
}

/// Guest memory from 0x10_0000 that raw pages are read straight into (the
/// destination's way), for the frames that fit it.
struct Guest(Vec<u8>);

impl PageTarget for Guest {
    fn place(&mut self, gpa: u64, count: u32) -> Option<&mut [u8]> {
        let at = gpa.checked_sub(0x10_0000)? as usize;
        let len = (count as usize).checked_mul(4096)?;
        self.0.get_mut(at..at.checked_add(len)?)
    }
}

/// As [`read_all`], placing raw pages into `guest`; placed frames come
/// back as the frame they were, with the data read from `guest`.
fn read_all_into<R: Read>(
    r: &mut FrameReader<R>,
    guest: &mut Guest,
) -> Result<Vec<Frame>, ProtocolError> {
    let mut frames = Vec::new();
    let result = loop {
        match r.read_into(guest) {
            Ok(Received::Frame(Frame::Done)) => {
                frames.push(Frame::Done);
                break Ok(frames);
            }
            Ok(Received::Frame(f)) => frames.push(f),
            Ok(Received::Placed { gpa, count }) => {
                let data = guest
                    .place(gpa, count)
                    .expect("it was placed there")
                    .to_vec();
                frames.push(Frame::Pages {
                    gpa,
                    encoding: Encoding::Raw,
                    count,
                    data,
                });
            }
            Err(e) => break Err(e),
        }
    };
    assert!(r.largest_buffer() <= BODY_GROWTH);
    if let Err(e) = &result {
        assert!(!e.to_string().is_empty());
        assert!(matches!(r.read_frame(), Err(ProtocolError::Broken)));
    }
    result
}

fn write_key(dir: &Path) -> Security {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("key");
    std::fs::write(&path, b"a key for the fuzz tests, 32 bytes").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    Security::psk_from_file(&path).unwrap()
}

/// Runs this side's handshake against a peer that has already sent
/// `peer_bytes` and shut its side: every read ends, in data or EOF.
fn handshake_against(
    peer_bytes: &[u8],
    security: &Security,
    source: bool,
) -> Result<super::Authenticated, AuthError> {
    let (mut peer, ours) = UnixStream::pair().unwrap();
    peer.write_all(peer_bytes).unwrap();
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let conn: Box<dyn Conn> = Box::new(ours);
    let r = if source {
        handshake_as_source(conn, security, &Address::Unix("/x".into()), TIMEOUT)
    } else {
        handshake_as_destination(conn, security, TIMEOUT)
    };
    if let Err(e) = &r {
        assert!(
            !matches!(e, AuthError::Timeout { .. }),
            "a handshake waited on a peer that had said everything: {e}"
        );
    }
    r
}

/// A plausible hello from `role` (1 source, 2 destination) with `method`,
/// then for a key a record the size of a Noise handshake message.
fn plausible_hello(method: u8, role: u8, link: (u32, u32)) -> Vec<u8> {
    let mut h = AUTH_MAGIC.to_vec();
    h.extend_from_slice(&AUTH_VERSION.to_le_bytes());
    h.extend_from_slice(&[method, role, 0, 0]);
    if method != 2 {
        h.extend_from_slice(&[0x42; 32]);
    }
    if role == 1 {
        h.extend_from_slice(&[3; 16]);
        h.extend_from_slice(&link.0.to_le_bytes());
        h.extend_from_slice(&link.1.to_le_bytes());
    }
    if method == 1 {
        h.extend_from_slice(&48u16.to_be_bytes());
        h.extend_from_slice(&[0x5a; 48]);
    }
    h
}

#[test]
fn a_header_claiming_a_large_payload_allocates_only_what_arrives() {
    let mut bytes = encode(&unchecked());
    bytes.truncate(12);
    let mut header = [0u8; 16];
    header[0] = 4; // state
    header[4..8].copy_from_slice(&(8u32 << 20).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&[0; 100]);
    let mut r = FrameReader::bound(&bytes[..], &unchecked());
    let err = read_all(&mut r).unwrap_err();
    assert!(
        matches!(err, ProtocolError::Truncated { got: 116, .. }),
        "{err}"
    );
    assert_eq!(r.largest_buffer(), BODY_GROWTH);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_reader(
        bytes in proptest::collection::vec(any::<u8>(), 0..9000),
        with_header in any::<bool>(),
        checksummed in any::<bool>(),
    ) {
        let binding = if checksummed { Binding::checksummed(&SESSION) } else { unchecked() };
        let input = if with_header {
            [&encode(&binding)[..12], &bytes[..]].concat()
        } else {
            bytes
        };
        let _ = read_all(&mut FrameReader::bound(&input[..], &binding));
    }

    #[test]
    fn mutated_streams_never_panic_the_frame_reader(
        muts in proptest::collection::vec(mutation(), 1..6),
        checksummed in any::<bool>(),
    ) {
        let binding = if checksummed { Binding::checksummed(&SESSION) } else { unchecked() };
        let input = mutated(encode(&binding), &muts);
        let r = read_all(&mut FrameReader::bound(&input[..], &binding));
        // With checksums, what reads as a whole stream is the original.
        if checksummed {
            if let Ok(frames) = r {
                prop_assert_eq!(frames, sample_frames());
            }
        }
    }

    #[test]
    fn mutated_streams_read_into_guest_memory_never_panic_or_pass_changed(
        muts in proptest::collection::vec(mutation(), 1..6),
        checksummed in any::<bool>(),
    ) {
        let binding = if checksummed { Binding::checksummed(&SESSION) } else { unchecked() };
        let input = mutated(encode(&binding), &muts);
        let mut guest = Guest(vec![0; 64 * 4096]);
        let r = read_all_into(&mut FrameReader::bound(&input[..], &binding), &mut guest);
        if checksummed {
            if let Ok(frames) = r {
                prop_assert_eq!(frames, sample_frames());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_open_as_a_sealed_record(
        bytes in proptest::collection::vec(any::<u8>(), 0..9000),
    ) {
        let (_, mut r) = sealed_pair(&PSK, b"fuzz", (), Cursor::new(bytes));
        let mut out = Vec::new();
        match r.read_to_end(&mut out) {
            // Only input without one whole record ends cleanly.
            Ok(_) => prop_assert!(out.is_empty()),
            Err(e) => prop_assert!(seal_error(e).is_ok()),
        }
    }

    #[test]
    fn a_mutated_sealed_stream_never_yields_changed_frames(
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let sealed = Binding { integrity: Integrity::Sealed, ..unchecked() };
        let (w, mut r) = sealed_pair(&PSK, b"fuzz", Vec::new(), Cursor::new(Vec::new()));
        let mut w = FrameWriter::bound(w, &sealed);
        for f in &sample_frames() {
            w.write_frame(f).unwrap();
            w.flush().unwrap();
        }
        let input = mutated(w.get_ref().get_ref().clone(), &muts);
        *r.get_mut() = Cursor::new(input);
        let mut reader = FrameReader::bound(r, &sealed);
        let mut got = Vec::new();
        loop {
            match reader.read_frame() {
                Ok(f) => {
                    let done = f == Frame::Done;
                    got.push(f);
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    break;
                }
            }
        }
        // Whatever was read is the sender's frames, in order.
        prop_assert_eq!(&got[..], &sample_frames()[..got.len()]);
        prop_assert!(reader.largest_buffer() <= BODY_GROWTH);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_handshake(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        with_key in any::<bool>(),
        as_source in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let security = if with_key { write_key(dir.path()) } else { Security::Insecure };
        let r = handshake_against(&bytes, &security, as_source);
        prop_assert!(r.is_err(), "random bytes passed a handshake");
    }

    #[test]
    fn mutated_hellos_and_key_exchanges_never_panic_the_handshake(
        muts in proptest::collection::vec(mutation(), 0..4),
        method in 0u8..2,
        as_source in any::<bool>(),
        link in (0u32..3, 0u32..3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let security = if method == 1 { write_key(dir.path()) } else { Security::Insecure };
        let peer_role = if as_source { 2 } else { 1 };
        let bytes = mutated(plausible_hello(method, peer_role, link), &muts);
        let r = handshake_against(&bytes, &security, as_source);
        // Without the key nothing passes; an unauthenticated hello may.
        if method == 1 {
            prop_assert!(r.is_err());
        }
        if let Err(e) = r {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
