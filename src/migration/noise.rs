//! The sealed channel of key mode (`--auth-key-file`): the Noise protocol
//! with a pre-shared key, through the `snow` crate.
//!
//! After the handshake (driven by `auth.rs`, whose messages this module
//! builds and checks), every byte of the frame stream travels inside
//! Noise transport messages, each encrypted and authenticated with the
//! keys the handshake agreed. Noise numbers its messages implicitly (the
//! AEAD nonce is a counter each side keeps), so a message removed,
//! repeated, reordered or taken from another connection fails its tag, as
//! does any changed byte. A stream cut cleanly between two messages is
//! caught a layer up, by the authenticated `done` frame that ends it
//! (`protocol.rs`).
//!
//! On the wire each message is a *record*: a 2-byte big-endian length,
//! then the Noise message (ciphertext and a 16-byte tag, 16 to 65,535
//! bytes). The frame stream is cut into records as it is written, so one
//! 8 MiB `pages` frame becomes 129 records; frames and records are not
//! aligned.
//!
//! This module owns the Noise parameters, the record layout and the checks
//! on records received. It does not know who the peer is or what the
//! prologue binds (`auth.rs`), nor what the stream carries (`protocol.rs`).

use std::io::{self, Read, Write};
use std::time::Duration;

use super::address::{Conn, ShutdownHandle};

/// The Noise protocol of key mode: no static keys, the pre-shared key mixed
/// in before the first message, X25519 ephemeral keys, AES-256-GCM and
/// SHA-256 (ring's). AES-GCM rather than ChaCha20-Poly1305 because it
/// sealed and opened about 3× faster on these AES-NI hosts (the ignored
/// test `aead_speed`: 1,169–1,690 against 460–571 MiB/s on one core).
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Largest Noise message (the Noise specification's limit).
pub const MAX_RECORD_LEN: usize = 65_535;
/// The AEAD tag at the end of each message.
pub const TAG_LEN: usize = 16;
/// Most stream bytes one record carries.
pub const MAX_RECORD_PAYLOAD: usize = MAX_RECORD_LEN - TAG_LEN;
/// The big-endian length before each message.
pub const RECORD_HEADER_LEN: usize = 2;
/// A handshake message of NNpsk0 with an empty payload: an ephemeral
/// public key and the tag of the empty payload.
pub const HANDSHAKE_MESSAGE_LEN: usize = 32 + TAG_LEN;
/// Bytes of the pre-shared key Noise takes.
pub const PSK_LEN: usize = 32;

/// Records sealed per write to the connection: one syscall per ~1 MiB.
const RECORDS_PER_WRITE: usize = 16;
/// Encrypted bytes read ahead of the record being opened, so that small
/// records do not cost a syscall each.
const READ_AHEAD_LEN: usize = 4 * (RECORD_HEADER_LEN + MAX_RECORD_LEN);

/// What is wrong with the encrypted stream. `record` counts records from 0
/// in this direction; `offset` is the byte offset of the record's length
/// in the encrypted stream after the handshake.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The record's tag does not verify.
    #[error(
        "record {record} (at byte {offset} of the encrypted stream) fails its authentication: \
         the stream was tampered with, reordered, replayed or cut, or belongs to another session"
    )]
    Unauthentic {
        /// The record's position.
        record: u64,
        /// The record's offset.
        offset: u64,
    },
    /// A length that cannot hold even the tag.
    #[error(
        "record {record} (at byte {offset} of the encrypted stream) declares {len} bytes, \
         fewer than its {TAG_LEN}-byte tag"
    )]
    TooShort {
        /// The record's position.
        record: u64,
        /// The record's offset.
        offset: u64,
        /// The declared length.
        len: usize,
    },
    /// Noise refused to seal a record (its message counter ran out).
    #[error("sealing record {record} failed: {reason}")]
    Seal {
        /// The record's position.
        record: u64,
        /// snow's reason.
        reason: String,
    },
    /// An earlier error left this direction unusable.
    #[error("the encrypted stream is unusable after an earlier error")]
    Broken,
}

impl SealError {
    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

/// Why a Noise handshake message was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The message does not verify: the peer has another key, or the
    /// message was recorded in another handshake (the prologue differs).
    #[error("the handshake message does not verify")]
    Unauthentic,
    /// snow refused to set up or run the handshake.
    #[error("Noise ({NOISE_PARAMS}): {0}")]
    Noise(String),
}

/// One side's Noise handshake, before the transport keys exist.
pub struct Handshake(snow::HandshakeState);

impl Handshake {
    /// A handshake with `psk` whose transcript starts with `prologue`: both
    /// sides must give the same prologue byte for byte, or the first
    /// message fails to verify.
    pub fn new(
        psk: &[u8; PSK_LEN],
        prologue: &[u8],
        initiator: bool,
    ) -> Result<Handshake, HandshakeError> {
        let noise = |e: snow::Error| HandshakeError::Noise(e.to_string());
        let params = NOISE_PARAMS.parse().map_err(noise)?;
        let builder = snow::Builder::new(params)
            .psk(0, psk)
            .and_then(|b| b.prologue(prologue))
            .map_err(noise)?;
        let state = if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        };
        Ok(Handshake(state.map_err(noise)?))
    }

    /// This side's next message (its payload is empty: the psk and the
    /// prologue are what it proves).
    pub fn write(&mut self) -> Result<[u8; HANDSHAKE_MESSAGE_LEN], HandshakeError> {
        let mut msg = [0u8; HANDSHAKE_MESSAGE_LEN];
        let n = self
            .0
            .write_message(&[], &mut msg)
            .map_err(|e| HandshakeError::Noise(e.to_string()))?;
        if n != HANDSHAKE_MESSAGE_LEN {
            return Err(HandshakeError::Noise(format!(
                "a handshake message of {n} bytes, expected {HANDSHAKE_MESSAGE_LEN}"
            )));
        }
        Ok(msg)
    }

    /// Takes the peer's next message.
    pub fn read(&mut self, msg: &[u8; HANDSHAKE_MESSAGE_LEN]) -> Result<(), HandshakeError> {
        // The payload is empty; a message that decrypts to more is not ours.
        let mut payload = [0u8; HANDSHAKE_MESSAGE_LEN];
        match self.0.read_message(msg, &mut payload) {
            Ok(0) => Ok(()),
            Ok(_) | Err(snow::Error::Decrypt) => Err(HandshakeError::Unauthentic),
            Err(e) => Err(HandshakeError::Noise(e.to_string())),
        }
    }

    /// The transcript hash, the same on both sides and unique to this
    /// handshake.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = [0u8; 32];
        let got = self.0.get_handshake_hash();
        let n = got.len().min(h.len());
        h[..n].copy_from_slice(&got[..n]);
        h
    }

    /// The connection, sealed with the keys this handshake agreed.
    pub fn into_sealed<C>(self, conn: C) -> Result<Sealed<C>, HandshakeError> {
        let transport = self
            .0
            .into_transport_mode()
            .map_err(|e| HandshakeError::Noise(e.to_string()))?;
        Ok(Sealed::new(conn, transport))
    }
}

/// A connection whose bytes travel in sealed records, both ways.
///
/// Reads are resumable: a read timeout keeps the bytes of a half-received
/// record, so the caller may try again. A record that fails to open, or a
/// write that failed, leaves that direction broken.
pub struct Sealed<C> {
    inner: C,
    transport: snow::TransportState,
    /// Records sealed by one `write`, sent with one `write_all`.
    out: Vec<u8>,
    /// Encrypted bytes received, not yet opened: `raw[raw_start..raw_end]`.
    raw: Vec<u8>,
    raw_start: usize,
    raw_end: usize,
    /// The opened payload of the last record, not yet read:
    /// `plain[plain_start..plain_end]`.
    plain: Vec<u8>,
    plain_start: usize,
    plain_end: usize,
    records_in: u64,
    offset_in: u64,
    records_out: u64,
    read_broken: bool,
    write_broken: bool,
}

impl<C> Sealed<C> {
    fn new(inner: C, transport: snow::TransportState) -> Sealed<C> {
        Sealed {
            inner,
            transport,
            out: vec![0; RECORDS_PER_WRITE * (RECORD_HEADER_LEN + MAX_RECORD_LEN)],
            raw: vec![0; READ_AHEAD_LEN],
            raw_start: 0,
            raw_end: 0,
            plain: vec![0; MAX_RECORD_LEN],
            plain_start: 0,
            plain_end: 0,
            records_in: 0,
            offset_in: 0,
            records_out: 0,
            read_broken: false,
            write_broken: false,
        }
    }

    /// Records opened so far.
    pub fn records_read(&self) -> u64 {
        self.records_in
    }

    /// Records sealed so far.
    pub fn records_written(&self) -> u64 {
        self.records_out
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }

    /// The connection underneath, to swap a test's input in.
    #[cfg(test)]
    pub(crate) fn get_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// Opens the record at `raw_start` (whose message is `len` bytes),
    /// straight into `buf` when it has room, else into `plain`. The number
    /// of bytes put into `buf`.
    fn open(&mut self, len: usize, buf: &mut [u8]) -> io::Result<usize> {
        let at = self.raw_start + RECORD_HEADER_LEN;
        let msg = &self.raw[at..at + len];
        // ring opens in place when the output can hold the ciphertext.
        let direct = buf.len() >= len;
        let opened = if direct {
            self.transport.read_message(msg, buf)
        } else {
            self.transport.read_message(msg, &mut self.plain)
        };
        let n = opened.map_err(|_| {
            self.read_broken = true;
            SealError::Unauthentic {
                record: self.records_in,
                offset: self.offset_in,
            }
            .into_io()
        })?;
        self.raw_start += RECORD_HEADER_LEN + len;
        self.records_in += 1;
        self.offset_in += (RECORD_HEADER_LEN + len) as u64;
        if direct {
            return Ok(n);
        }
        let give = n.min(buf.len());
        buf[..give].copy_from_slice(&self.plain[..give]);
        self.plain_start = give;
        self.plain_end = n;
        Ok(give)
    }
}

impl<C: Read> Read for Sealed<C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.plain_start < self.plain_end {
            let n = (self.plain_end - self.plain_start).min(buf.len());
            buf[..n].copy_from_slice(&self.plain[self.plain_start..self.plain_start + n]);
            self.plain_start += n;
            return Ok(n);
        }
        if self.read_broken {
            return Err(SealError::Broken.into_io());
        }
        loop {
            let have = self.raw_end - self.raw_start;
            if have >= RECORD_HEADER_LEN {
                let len_bytes = [self.raw[self.raw_start], self.raw[self.raw_start + 1]];
                let len = u16::from_be_bytes(len_bytes) as usize;
                if len < TAG_LEN {
                    self.read_broken = true;
                    return Err(SealError::TooShort {
                        record: self.records_in,
                        offset: self.offset_in,
                        len,
                    }
                    .into_io());
                }
                if have >= RECORD_HEADER_LEN + len {
                    match self.open(len, buf)? {
                        // An empty record (never written by vmhop, but
                        // valid): not the end of the stream.
                        0 => continue,
                        n => return Ok(n),
                    }
                }
            }
            // Room for a whole record after what is held: move it to the
            // front if needed (at most one record's worth).
            if self.raw.len() - self.raw_end < RECORD_HEADER_LEN + MAX_RECORD_LEN {
                self.raw.copy_within(self.raw_start..self.raw_end, 0);
                self.raw_end -= self.raw_start;
                self.raw_start = 0;
            }
            match self.inner.read(&mut self.raw[self.raw_end..]) {
                // The end; inside a record it is a cut, which the frame
                // layer reports (it sees the stream end inside a frame, or
                // without the `done` that must end it).
                Ok(0) => return Ok(0),
                Ok(n) => self.raw_end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A timeout keeps what arrived: the read may be retried.
                Err(e) => return Err(e),
            }
        }
    }
}

impl<C: Write> Write for Sealed<C> {
    /// Seals up to 16 records' worth of `buf` and sends them; returns how
    /// much of `buf` that was.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.write_broken {
            return Err(SealError::Broken.into_io());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let take = buf.len().min(RECORDS_PER_WRITE * MAX_RECORD_PAYLOAD);
        let mut at = 0;
        for chunk in buf[..take].chunks(MAX_RECORD_PAYLOAD) {
            let sealed = self
                .transport
                .write_message(chunk, &mut self.out[at + RECORD_HEADER_LEN..]);
            let n = match sealed {
                Ok(n) => n,
                Err(e) => {
                    self.write_broken = true;
                    return Err(io::Error::other(SealError::Seal {
                        record: self.records_out,
                        reason: e.to_string(),
                    }));
                }
            };
            // n ≤ MAX_RECORD_LEN, which fits the two bytes.
            self.out[at..at + RECORD_HEADER_LEN].copy_from_slice(&(n as u16).to_be_bytes());
            at += RECORD_HEADER_LEN + n;
            self.records_out += 1;
        }
        // The records' nonces are spent: if they do not all go out, the
        // peer can never open what follows.
        if let Err(e) = self.inner.write_all(&self.out[..at]) {
            self.write_broken = true;
            return Err(e);
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Conn for Sealed<Box<dyn Conn>> {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(timeout)
    }

    fn shutdown(&self) {
        self.inner.shutdown();
    }

    fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        self.inner.shutdown_handle()
    }

    fn peer(&self) -> String {
        self.inner.peer()
    }
}

/// The [`SealError`] inside an I/O error from a [`Sealed`] connection, if
/// that is what it is.
pub fn seal_error(e: io::Error) -> Result<SealError, io::Error> {
    if e.get_ref().is_some_and(|i| i.is::<SealError>()) {
        let inner = e.into_inner().expect("checked above");
        return Ok(*inner.downcast::<SealError>().expect("checked above"));
    }
    Err(e)
}

/// Both ends of a finished handshake, in memory: for the tests of this
/// layer and of the frames above it.
#[cfg(test)]
pub(crate) fn sealed_pair<A, B>(
    psk: &[u8; PSK_LEN],
    prologue: &[u8],
    initiator_conn: A,
    responder_conn: B,
) -> (Sealed<A>, Sealed<B>) {
    let mut i = Handshake::new(psk, prologue, true).unwrap();
    let mut r = Handshake::new(psk, prologue, false).unwrap();
    r.read(&i.write().unwrap()).unwrap();
    i.read(&r.write().unwrap()).unwrap();
    assert_eq!(i.hash(), r.hash());
    (
        i.into_sealed(initiator_conn).unwrap(),
        r.into_sealed(responder_conn).unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::os::unix::net::UnixStream;

    const PSK: [u8; PSK_LEN] = [3; PSK_LEN];

    /// `payload` sealed by a fresh initiator as records of at most
    /// `chunk` bytes each, and the responder that opens them.
    fn sealed(payload: &[u8], chunk: usize) -> (Vec<u8>, Sealed<Cursor<Vec<u8>>>) {
        let (mut w, r) = sealed_pair(&PSK, b"p", Vec::new(), Cursor::new(Vec::new()));
        for c in payload.chunks(chunk) {
            w.write_all(c).unwrap();
        }
        (w.get_ref().clone(), r)
    }

    fn open_all(bytes: Vec<u8>, mut r: Sealed<Cursor<Vec<u8>>>) -> io::Result<Vec<u8>> {
        r.inner = Cursor::new(bytes);
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Record boundaries of a sealed stream.
    fn records(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < bytes.len() {
            let len = u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
            out.push(at..at + RECORD_HEADER_LEN + len);
            at += RECORD_HEADER_LEN + len;
        }
        out
    }

    fn unauthentic(e: io::Error) -> (u64, u64) {
        match seal_error(e) {
            Ok(SealError::Unauthentic { record, offset }) => (record, offset),
            other => panic!("expected an unauthentic record, got {other:?}"),
        }
    }

    #[test]
    fn bytes_round_trip_in_records_of_at_most_65535_bytes() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let (bytes, r) = sealed(&payload, 200_000);
        let recs = records(&bytes);
        assert!(recs
            .iter()
            .all(|r| r.len() <= RECORD_HEADER_LEN + MAX_RECORD_LEN));
        // 200,000 bytes take 4 records, the remaining 100,000 take 2.
        assert_eq!(recs.len(), 6);
        assert_eq!(open_all(bytes, r).unwrap(), payload);
    }

    #[test]
    fn small_reads_get_every_byte_in_order() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let (bytes, mut r) = sealed(&payload, 70_000);
        r.inner = Cursor::new(bytes);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match r.read(&mut buf).unwrap() {
                0 => break,
                n => out.extend_from_slice(&buf[..n]),
            }
        }
        assert_eq!(out, payload);
    }

    #[test]
    fn nothing_of_the_payload_is_readable_on_the_wire() {
        let payload = b"VMHOPGST the guest's magic, many times over. ".repeat(100);
        let (bytes, _) = sealed(&payload, 1000);
        assert!(!bytes.windows(8).any(|w| w == b"VMHOPGST"));
    }

    /// Seals `payload` in records of at most `chunk` bytes, lets `mutate`
    /// change the sealed stream (given its record boundaries) and opens
    /// the result with the responder of the same handshake.
    fn tampered(
        payload: &[u8],
        chunk: usize,
        mutate: impl Fn(&[u8], &[std::ops::Range<usize>]) -> Vec<u8>,
    ) -> io::Result<Vec<u8>> {
        let (bytes, r) = sealed(payload, chunk);
        let bad = mutate(&bytes, &records(&bytes));
        open_all(bad, r)
    }

    #[test]
    fn the_untouched_stream_opens() {
        let payload = vec![0x5A; 3000];
        assert_eq!(
            tampered(&payload, 1000, |b, _| b.to_vec()).unwrap(),
            payload
        );
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let payload = vec![0x5A; 600];
        let len = sealed(&payload, 200).0.len();
        for i in 0..len {
            let r = tampered(&payload, 200, |b, _| {
                let mut bad = b.to_vec();
                bad[i] ^= 0x10;
                bad
            });
            // A changed length either breaks a tag or leaves the stream
            // short; either way no changed byte reads as the payload.
            match r {
                Ok(out) => assert!(
                    out.len() < payload.len() && payload.starts_with(&out),
                    "byte {i}"
                ),
                Err(e) => assert!(seal_error(e).is_ok(), "byte {i}"),
            }
        }
    }

    #[test]
    fn replayed_reordered_dropped_and_foreign_records_are_refused() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let cat = |order: &'static [usize]| {
            move |b: &[u8], recs: &[std::ops::Range<usize>]| -> Vec<u8> {
                assert_eq!(recs.len(), 3);
                order
                    .iter()
                    .flat_map(|&i| b[recs[i].clone()].to_vec())
                    .collect()
            }
        };
        // Record 1 again in place of record 2: its nonce is behind.
        let err = tampered(&payload, 1000, cat(&[0, 1, 1])).unwrap_err();
        assert_eq!(unauthentic(err).0, 2);
        // Records 1 and 2 swapped.
        let err = tampered(&payload, 1000, cat(&[0, 2, 1])).unwrap_err();
        assert_eq!(
            unauthentic(err),
            (1, (RECORD_HEADER_LEN + 1000 + TAG_LEN) as u64)
        );
        // Record 0 dropped.
        let err = tampered(&payload, 1000, cat(&[1, 2])).unwrap_err();
        assert_eq!(unauthentic(err).0, 0);
        // The tail dropped at a record boundary: a clean end, which the
        // frame layer refuses (no `done`); what was read is the original.
        let out = tampered(&payload, 1000, cat(&[0, 1])).unwrap();
        assert_eq!(out, payload[..2000]);
        // A record of another session (another handshake, same key and
        // prologue) in place of record 1.
        let (other, _) = sealed(&payload, 1000);
        let err = tampered(&payload, 1000, |b, recs| {
            let mut spliced = b[recs[0].clone()].to_vec();
            spliced.extend_from_slice(&other[records(&other)[1].clone()]);
            spliced
        })
        .unwrap_err();
        assert_eq!(unauthentic(err).0, 1);
        // A whole stream sealed under another prologue.
        let (mut w, _) = sealed_pair(&PSK, b"another prologue", Vec::new(), ());
        w.write_all(&payload).unwrap();
        let err = tampered(&payload, 1000, |_, _| w.inner.clone()).unwrap_err();
        assert_eq!(unauthentic(err).0, 0);
    }

    #[test]
    fn a_record_shorter_than_its_tag_is_refused() {
        let err = tampered(&[], 1, |_, _| vec![0, 5, 1, 2, 3, 4, 5]).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(seal_error(err), Ok(SealError::TooShort { len: 5, .. })),
            "{msg}"
        );
        assert!(msg.contains("declares 5 bytes"), "{msg}");
    }

    #[test]
    fn a_read_timeout_mid_record_can_be_retried() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let (mut w, mut r) = sealed_pair(&PSK, b"p", Vec::new(), b);
        w.write_all(b"hello, sealed world").unwrap();
        let bytes = w.inner;
        let mut a = a;
        a.write_all(&bytes[..10]).unwrap();
        let mut buf = [0u8; 64];
        let err = r.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        a.write_all(&bytes[10..]).unwrap();
        let n = r.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello, sealed world");
    }

    /// Seals and opens 256 MiB in records with each AEAD Noise offers and
    /// prints the rates. Run with `cargo test --release -- --ignored
    /// --nocapture aead_speed`.
    #[test]
    #[ignore]
    fn aead_speed() {
        const TOTAL: usize = 256 << 20;
        let data = vec![0xA5u8; 1 << 20];
        let mut out = vec![0u8; MAX_RECORD_LEN];
        let mut back = vec![0u8; MAX_RECORD_LEN];
        for params in [
            "Noise_NNpsk0_25519_AESGCM_SHA256",
            "Noise_NNpsk0_25519_ChaChaPoly_SHA256",
        ] {
            let build = |initiator: bool| {
                let b = snow::Builder::new(params.parse().unwrap())
                    .psk(0, &PSK)
                    .unwrap();
                if initiator {
                    b.build_initiator().unwrap()
                } else {
                    b.build_responder().unwrap()
                }
            };
            let (mut i, mut r) = (build(true), build(false));
            let mut m = [0u8; 128];
            let n = i.write_message(&[], &mut m).unwrap();
            r.read_message(&m[..n], &mut []).unwrap();
            let n = r.write_message(&[], &mut m).unwrap();
            i.read_message(&m[..n], &mut []).unwrap();
            let (mut i, mut r) = (
                i.into_transport_mode().unwrap(),
                r.into_transport_mode().unwrap(),
            );
            let t = std::time::Instant::now();
            let mut done = 0;
            while done < TOTAL {
                for c in data.chunks(MAX_RECORD_PAYLOAD) {
                    let n = i.write_message(c, &mut out).unwrap();
                    r.read_message(&out[..n], &mut back).unwrap();
                }
                done += data.len();
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{params}: seal+open {:.0} MiB/s",
                TOTAL as f64 / s / (1 << 20) as f64
            );
        }
    }
}
