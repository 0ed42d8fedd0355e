//! The framed migration stream: a versioned header, then numbered frames
//! (layout in `docs/migration-stream.md`).
//!
//! This module owns the byte layout and every check a receiver makes on
//! it: magic, version, frame sizes, sequence numbers, the `done` frame
//! that names how many frames each connection carried, and the shape of
//! each frame's payload. How a frame is protected depends on the
//! connection ([`Integrity`]): on a connection sealed by key mode's Noise
//! channel (`noise.rs`) the AEAD authenticates every byte and frames carry
//! no checksum; otherwise each frame ends with a crc32c that also covers
//! the session nonce, so a frame recorded from another session is refused
//! (which catches accidents, not attackers: TLS is what protects that
//! mode). It does not know what the config and state payloads contain, in
//! which order the engine sends frames, or how pages are compressed (it
//! carries the [`Encoding`] byte and the data; `compress.rs` turns them
//! into pages).
//!
//! Each direction of a connection is its own stream, with its own header
//! and its own sequence numbers from 0: source → destination carries the
//! VM, destination → source carries acks and errors.

use std::fmt;
use std::io::{self, Read, Write};

use super::compress::Encoding;
use super::noise::{seal_error, SealError};
use crate::memory::{VolatileSlice, PAGE_SIZE};

/// First eight bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"VMHOPMIG";
/// The stream version this code writes and the only one it reads (2: the
/// `done` frame names every connection's frame count, and sealed
/// connections carry no crc32c).
pub const VERSION: u32 = 2;
/// Magic plus version.
pub const STREAM_HEADER_LEN: usize = 12;
/// kind u8, flags u8, reserved u16, payload length u32, sequence u64.
pub const FRAME_HEADER_LEN: usize = 16;
/// The crc32c after each payload (checksummed connections only).
pub const CHECKSUM_LEN: usize = 4;
/// Most connections one migration may use.
pub const MAX_CONNECTIONS: u32 = 64;
/// Bytes of a [`Link`] on the wire: migration id, index, count.
pub const LINK_LEN: usize = 24;
/// Bytes in the session nonce that every frame's checksum covers.
pub const SESSION_NONCE_LEN: usize = 32;
/// Most pages one `Pages` frame carries (8 MiB): big enough that the frame
/// overhead vanishes, small enough that a receiver's buffer stays modest.
pub const MAX_PAGES_PER_FRAME: u32 = 2048;
/// Largest payload a frame may have: a full `Pages` frame plus room for
/// its 16-byte prefix (and for config or state blobs of that size).
pub const MAX_PAYLOAD: usize = (MAX_PAGES_PER_FRAME as usize) * PAGE_LEN + 4096;
/// Largest frame on the wire.
pub const MAX_FRAME_LEN: usize = FRAME_HEADER_LEN + MAX_PAYLOAD + CHECKSUM_LEN;

/// Bytes in one guest page.
const PAGE_LEN: usize = PAGE_SIZE as usize;
/// gpa u64, encoding u8, reserved [u8; 3], count u32.
const PAGES_PREFIX_LEN: usize = 16;
/// gpa u64, pages u64.
const ZERO_PAYLOAD_LEN: usize = 16;
/// A payload buffer grows by at most this much before the bytes to fill it
/// arrive: a header that claims a large payload cannot make the receiver
/// allocate much more than the sender really sent.
const BODY_GROWTH: usize = 1 << 20;
/// Frames are gathered into writes of this size: large enough that small
/// frames (zero runs, acks) do not cost a syscall each, small enough to
/// stay in the CPU's cache: page data copied out of guest memory into it
/// is checksummed and written to the connection from there, so each byte
/// comes from memory once.
const WRITE_BUFFER_LEN: usize = 256 << 10;
/// Page data received straight into its destination is read (and
/// checksummed, while in cache) this much at a time.
const READ_PIECE_LEN: usize = 256 << 10;

const KIND_CONFIG: u8 = 1;
const KIND_PAGES: u8 = 2;
const KIND_ZERO: u8 = 3;
const KIND_STATE: u8 = 4;
const KIND_END_OF_ROUND: u8 = 5;
const KIND_DONE: u8 = 6;
const KIND_ACK: u8 = 7;
const KIND_ERROR: u8 = 8;
const KIND_ABORT: u8 = 9;
const KIND_STORAGE: u8 = 10;

/// The secret-free value that ties a stream's frames to one authenticated
/// session (from the handshake in `auth.rs`). Frames written
/// under one nonce fail the checksum under any other.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionNonce(pub [u8; SESSION_NONCE_LEN]);

impl fmt::Debug for SessionNonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionNonce(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// How the frames of a connection are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// Each frame ends with a crc32c over the frame and the session nonce
    /// (insecure and TLS connections).
    Checksum,
    /// The connection is sealed (key mode's Noise channel): every byte is
    /// authenticated below the frames, which carry no checksum.
    Sealed,
}

/// Which connection of a migration a stream is: each connection names the
/// migration it belongs to, its index and how many there are. The source
/// sends it in its handshake hello; key mode binds it into the Noise
/// prologue, TLS into its session export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Random, the same on every connection of one migration.
    pub migration: [u8; 16],
    /// This connection's index, below `count`.
    pub index: u32,
    /// Connections in the migration, 1..=[`MAX_CONNECTIONS`].
    pub count: u32,
}

impl Link {
    /// The only connection of migration `migration`.
    pub fn single(migration: [u8; 16]) -> Link {
        Link {
            migration,
            index: 0,
            count: 1,
        }
    }

    /// The wire form: migration id, index u32, count u32 (little-endian).
    pub fn to_bytes(&self) -> [u8; LINK_LEN] {
        let mut b = [0u8; LINK_LEN];
        b[..16].copy_from_slice(&self.migration);
        b[16..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Reads the wire form; fails if index or count are impossible.
    pub fn from_bytes(b: &[u8; LINK_LEN]) -> Result<Link, LinkError> {
        let mut migration = [0u8; 16];
        migration.copy_from_slice(&b[..16]);
        let index = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        let count = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        let link = Link {
            migration,
            index,
            count,
        };
        link.check()?;
        Ok(link)
    }

    fn check(&self) -> Result<(), LinkError> {
        if self.count == 0 || self.count > MAX_CONNECTIONS || self.index >= self.count {
            return Err(LinkError {
                index: self.index,
                count: self.count,
            });
        }
        Ok(())
    }
}

/// A connection numbered outside its migration's connections.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "connection {index} of {count}: a migration has 1 to {MAX_CONNECTIONS} connections, numbered \
     from 0"
)]
pub struct LinkError {
    /// The connection's index.
    pub index: u32,
    /// How many the migration says it has.
    pub count: u32,
}

/// What is wrong with the run of pages a `Pages` or `Zero` frame names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PagesError {
    /// More pages than a frame carries, or none.
    #[error("{0} pages; a frame carries 1 to {MAX_PAGES_PER_FRAME}")]
    Count(u32),
    /// A run of no pages.
    #[error("a run of 0 pages")]
    Empty,
    /// Its address is not page-aligned.
    #[error("address {0:#x} is not page-aligned")]
    Unaligned(u64),
    /// It runs past the end of the address space.
    #[error("{pages} pages from {gpa:#x} run past the end of the address space")]
    PastEnd {
        /// Its first page.
        gpa: u64,
        /// Its page count.
        pages: u64,
    },
    /// Raw data of the wrong length.
    #[error("{len} bytes of raw data for {count} pages, expected {expected}")]
    RawLength {
        /// Bytes of data.
        len: usize,
        /// Pages.
        count: u32,
        /// Bytes expected.
        expected: usize,
    },
    /// Compressed pages without data.
    #[error("no {encoding} data for {count} pages")]
    NoData {
        /// The compression.
        encoding: Encoding,
        /// Pages.
        count: u32,
    },
}

/// Everything a stream's frames are bound to: the session, how they are
/// protected and which connection of the migration they travel on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Folded into each checksum (checksummed connections).
    pub session: SessionNonce,
    /// Checksum or sealed.
    pub integrity: Integrity,
    /// Which connection of how many.
    pub link: Link,
}

impl Binding {
    /// A checksummed stream of `session`, the only connection of its
    /// migration.
    pub fn checksummed(session: &SessionNonce) -> Binding {
        Binding {
            session: *session,
            integrity: Integrity::Checksum,
            link: Link::single([0; 16]),
        }
    }

    /// Bytes after each payload.
    fn trailer_len(&self) -> usize {
        match self.integrity {
            Integrity::Checksum => CHECKSUM_LEN,
            Integrity::Sealed => 0,
        }
    }
}

/// What a destination acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// The config was accepted and memory is ready: send pages.
    Config,
    /// Memory and state arrived and were loaded: the destination can run
    /// the VM.
    Done,
    /// Everything up to an `end-of-round` is in guest memory: the source
    /// measures the link end to end, and never runs ahead of a slow
    /// receiver by more than a round.
    Round,
    /// The disks a `storage` frame announced have files here: send their
    /// blocks.
    Storage,
}

impl AckKind {
    fn to_byte(self) -> u8 {
        match self {
            AckKind::Config => 1,
            AckKind::Done => 2,
            AckKind::Round => 3,
            AckKind::Storage => 4,
        }
    }

    fn from_byte(b: u8) -> Option<AckKind> {
        match b {
            1 => Some(AckKind::Config),
            2 => Some(AckKind::Done),
            3 => Some(AckKind::Round),
            4 => Some(AckKind::Storage),
            _ => None,
        }
    }
}

/// One frame of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The VM's configuration (JSON, opaque here). Source → destination,
    /// first.
    Config(Vec<u8>),
    /// `count` consecutive 4 KiB pages from guest-physical `gpa`, encoded
    /// as `encoding` (see `compress.rs`).
    Pages {
        /// Guest-physical address of the first page (page-aligned).
        gpa: u64,
        /// How `data` is encoded.
        encoding: Encoding,
        /// Number of pages, 1..=`MAX_PAGES_PER_FRAME`.
        count: u32,
        /// The encoded pages; `count × 4096` bytes when raw.
        data: Vec<u8>,
    },
    /// `pages` consecutive all-zero pages from `gpa`.
    Zero {
        /// Guest-physical address of the first page (page-aligned).
        gpa: u64,
        /// Number of pages, at least 1.
        pages: u64,
    },
    /// The VM's vCPU and device state (opaque here).
    State(Vec<u8>),
    /// With `--copy-storage`: the disks whose blocks follow as pages at
    /// their own addresses (JSON, opaque here). Source → destination,
    /// after the config's ack.
    Storage(Vec<u8>),
    /// The end of one pre-copy round (0 is the first, full round).
    EndOfRound {
        /// The round that ended.
        round: u32,
    },
    /// Everything was sent. On the wire it names how many frames each
    /// connection of the migration carried before it (the reader checks
    /// its own connection's count; see [`FrameReader::done_counts`] for
    /// the others), so a connection cut short is caught even where the cut
    /// fell between two frames.
    Done,
    /// Destination → source: a step succeeded.
    Ack {
        /// What is acknowledged.
        what: AckKind,
    },
    /// Destination → source: the destination refused or failed; the
    /// message says why, for the source's user.
    Error(String),
    /// Either way: the sender gives up the migration (cancel, timeout).
    Abort(String),
}

impl Frame {
    /// The frame's kind as a word, for messages.
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind())
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Config(_) => KIND_CONFIG,
            Frame::Pages { .. } => KIND_PAGES,
            Frame::Zero { .. } => KIND_ZERO,
            Frame::State(_) => KIND_STATE,
            Frame::Storage(_) => KIND_STORAGE,
            Frame::EndOfRound { .. } => KIND_END_OF_ROUND,
            Frame::Done => KIND_DONE,
            Frame::Ack { .. } => KIND_ACK,
            Frame::Error(_) => KIND_ERROR,
            Frame::Abort(_) => KIND_ABORT,
        }
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_CONFIG => "config",
        KIND_PAGES => "pages",
        KIND_ZERO => "zero",
        KIND_STATE => "state",
        KIND_END_OF_ROUND => "end-of-round",
        KIND_DONE => "done",
        KIND_ACK => "ack",
        KIND_ERROR => "error",
        KIND_ABORT => "abort",
        KIND_STORAGE => "storage",
        _ => "unknown",
    }
}

/// What is wrong with a stream, and where: `frame` is the frame's
/// sequence number (0 for the first frame), `offset` the byte offset of
/// its header in the stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The first bytes are not the migration magic.
    #[error("not a vmhop migration stream: it starts with {got:?}, expected {MAGIC:?}")]
    NotMigrationStream {
        /// The first eight bytes received.
        got: [u8; 8],
    },
    /// A stream of another version.
    #[error("the peer speaks migration stream version {theirs}; this vmhop speaks version {ours}")]
    Version {
        /// The version this code speaks.
        ours: u32,
        /// The version in the stream header.
        theirs: u32,
    },
    /// End of stream inside the stream header.
    #[error("stream ended after {got} bytes of its {STREAM_HEADER_LEN}-byte header")]
    HeaderTruncated {
        /// Bytes received.
        got: usize,
    },
    /// End of stream inside a frame.
    #[error("stream ended after {got} bytes in frame {frame} (at offset {offset}; the frame needs {needed} bytes)")]
    Truncated {
        /// The frame's sequence number.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// Bytes of the frame received.
        got: usize,
        /// Bytes the frame needs (its header only, if the header is incomplete).
        needed: usize,
    },
    /// End of stream between frames, before the stream's end was agreed.
    #[error("the peer closed the stream after {frames} frames ({offset} bytes)")]
    Closed {
        /// Frames received.
        frames: u64,
        /// Bytes received.
        offset: u64,
    },
    /// A frame whose checksum does not match.
    #[error("frame {frame} (at offset {offset}) fails its checksum: expected {expected:#010x}, got {got:#010x} (corrupt, or from another session)")]
    Checksum {
        /// The frame's position.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// The checksum computed here.
        expected: u32,
        /// The checksum in the stream.
        got: u32,
    },
    /// A sealed connection's record that does not authenticate, or the
    /// channel failed: the frame is not what the peer sent.
    #[error("frame {frame} (at offset {offset}) is not authentic: {source}")]
    Unauthentic {
        /// The frame being read or written.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// What the sealed channel found.
        #[source]
        source: SealError,
    },
    /// A frame out of order (lost, repeated or replayed).
    #[error("frame at offset {offset} has sequence number {got}, expected {expected}")]
    Sequence {
        /// The frame's offset.
        offset: u64,
        /// The next sequence number.
        expected: u64,
        /// The sequence number in the frame.
        got: u64,
    },
    /// A frame kind this version does not know.
    #[error("frame {frame} (at offset {offset}) has unknown kind {kind}")]
    UnknownKind {
        /// The frame's position.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// The kind byte.
        kind: u8,
    },
    /// A payload above [`MAX_PAYLOAD`].
    #[error("frame {frame} (at offset {offset}) claims a {len}-byte payload; the limit is {MAX_PAYLOAD}")]
    TooLarge {
        /// The frame's position.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// The claimed payload length.
        len: usize,
    },
    /// A frame whose fields do not make sense for its kind (read or about
    /// to be written).
    #[error("{kind} frame {frame} (at offset {offset}) is malformed: {reason}")]
    Malformed {
        /// The frame's position.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// The frame's kind.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A `Pages` or `Zero` frame whose run of pages is impossible (read or
    /// about to be written).
    #[error("{kind} frame {frame} (at offset {offset}) is malformed: {problem}")]
    BadPages {
        /// The frame's position.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// The frame's kind.
        kind: &'static str,
        /// What is wrong.
        #[source]
        problem: PagesError,
    },
    /// No byte arrived within the read timeout.
    #[error("timed out reading frame {frame} (at offset {offset}) after {got} of its bytes")]
    Timeout {
        /// The frame's position.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// Bytes of the frame received before the timeout.
        got: usize,
    },
    /// Reading or writing the connection failed.
    #[error("{op} frame {frame} (at offset {offset}) failed: {source}")]
    Io {
        /// "reading" or "writing".
        op: &'static str,
        /// The frame's position.
        frame: u64,
        /// The frame's offset.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An earlier error left the stream at an unknown position.
    #[error("the stream is unusable after an earlier error")]
    Broken,
}

/// Where a reader or writer stands in its stream.
#[derive(Debug, Clone, Copy)]
struct Position {
    /// The next frame's sequence number.
    seq: u64,
    /// Bytes of the stream so far.
    offset: u64,
}

fn checksum(header: &[u8], parts: &[&[u8]], session: &SessionNonce) -> u32 {
    let mut crc = crc32c::crc32c(header);
    for part in parts {
        crc = crc32c::crc32c_append(crc, part);
    }
    crc32c::crc32c_append(crc, &session.0)
}

/// An I/O error of frame `frame`, or, reading, what the sealed channel
/// under it found wrong with what arrived.
fn io_error(op: &'static str, frame: u64, offset: u64, source: io::Error) -> ProtocolError {
    let sealed = if op == "reading" {
        seal_error(source)
    } else {
        Err(source)
    };
    match sealed {
        Ok(source) => ProtocolError::Unauthentic {
            frame,
            offset,
            source,
        },
        Err(source) => ProtocolError::Io {
            op,
            frame,
            offset,
            source,
        },
    }
}

/// Checks a `Pages` frame's fields.
fn check_pages(
    gpa: u64,
    encoding: Encoding,
    count: u32,
    data_len: usize,
) -> Result<(), PagesError> {
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(PagesError::Count(count));
    }
    check_run(gpa, u64::from(count))?;
    let raw_len = count as usize * PAGE_LEN;
    match encoding {
        Encoding::Raw if data_len != raw_len => Err(PagesError::RawLength {
            len: data_len,
            count,
            expected: raw_len,
        }),
        _ if data_len == 0 => Err(PagesError::NoData { encoding, count }),
        _ => Ok(()),
    }
}

/// Checks a run of pages from `gpa`.
fn check_run(gpa: u64, pages: u64) -> Result<(), PagesError> {
    if pages == 0 {
        return Err(PagesError::Empty);
    }
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return Err(PagesError::Unaligned(gpa));
    }
    if pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| gpa.checked_add(len))
        .is_none()
    {
        return Err(PagesError::PastEnd { gpa, pages });
    }
    Ok(())
}

/// The payload after a frame's prefix: bytes of vmhop's own, or guest
/// memory, which the guest may be writing while it is copied.
enum Body<'a, 'g> {
    Bytes(&'a [u8]),
    Guest(&'a VolatileSlice<'g>),
}

impl Body<'_, '_> {
    fn len(&self) -> usize {
        match self {
            Body::Bytes(b) => b.len(),
            Body::Guest(g) => g.len(),
        }
    }
}

/// Where a receiver wants the data of raw `Pages` frames to land: guest
/// memory, read into straight from the connection instead of through a
/// buffer of the reader's own.
pub trait PageTarget {
    /// The memory (exactly `count` pages long) that `count` raw pages from
    /// `gpa` are read into, or None to receive them as a [`Frame::Pages`]
    /// like any other frame (pages outside the target's memory, which the
    /// caller then refuses by name). Bytes land there before the frame's
    /// checksum and sequence number are checked: a receiver that gets an
    /// error must treat the memory as garbage.
    fn place(&mut self, gpa: u64, count: u32) -> Option<&mut [u8]>;
}

/// What [`FrameReader::read_into`] read.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A frame, as [`FrameReader::read_frame`] returns it.
    Frame(Frame),
    /// A raw `Pages` frame whose `count` pages from `gpa` were read into
    /// the memory the target gave, and checked.
    Placed {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Number of pages.
        count: u32,
    },
}

/// The pages of a frame whose header and prefix say it is a well-formed
/// raw `Pages` frame (zero flags and reserved bytes, a valid run, the
/// right length), which may then be placed; None for anything else, which
/// is read (and refused) the usual way.
fn placeable(header: &[u8], prefix: &[u8], body_len: usize) -> Option<(u64, u32)> {
    if header[1] != 0 || header[2..4] != [0, 0] || prefix.len() != PAGES_PREFIX_LEN {
        return None;
    }
    if Encoding::from_byte(prefix[8]) != Some(Encoding::Raw) || prefix[9..12] != [0, 0, 0] {
        return None;
    }
    let gpa = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes"));
    check_pages(gpa, Encoding::Raw, count, body_len).ok()?;
    Some((gpa, count))
}

/// Writes one direction of a migration stream.
///
/// The stream header is buffered when the writer is made; frames are
/// buffered until [`FrameWriter::flush`] (or until the buffer fills). A
/// write error leaves the writer broken: later writes fail with
/// [`ProtocolError::Broken`].
pub struct FrameWriter<W: Write> {
    out: W,
    /// What is not yet handed to `out`: `buf[..filled]`.
    buf: Box<[u8]>,
    filled: usize,
    binding: Binding,
    pos: Position,
    broken: bool,
}

impl<W: Write> FrameWriter<W> {
    /// A checksummed writer whose frames belong to `session`, the only
    /// connection of its migration; buffers the stream header.
    pub fn new(inner: W, session: &SessionNonce) -> FrameWriter<W> {
        FrameWriter::bound(inner, &Binding::checksummed(session))
    }

    /// A writer for the connection `binding` describes; buffers the stream
    /// header.
    pub fn bound(inner: W, binding: &Binding) -> FrameWriter<W> {
        let mut buf = vec![0u8; WRITE_BUFFER_LEN].into_boxed_slice();
        buf[..8].copy_from_slice(&MAGIC);
        buf[8..STREAM_HEADER_LEN].copy_from_slice(&VERSION.to_le_bytes());
        FrameWriter {
            out: inner,
            buf,
            filled: STREAM_HEADER_LEN,
            binding: *binding,
            pos: Position {
                seq: 0,
                offset: STREAM_HEADER_LEN as u64,
            },
            broken: false,
        }
    }

    /// Buffers one frame, checking its fields first (a `Pages` frame with
    /// the wrong amount of raw data, an unaligned address, an oversized
    /// payload are refused here rather than by the receiver).
    pub fn write_frame(&mut self, frame: &Frame) -> Result<(), ProtocolError> {
        match frame {
            Frame::Config(bytes) | Frame::State(bytes) | Frame::Storage(bytes) => {
                self.write_raw(frame.kind(), &[], Body::Bytes(bytes))
            }
            Frame::Pages {
                gpa,
                encoding,
                count,
                data,
            } => self.write_pages(*gpa, *encoding, *count, data),
            Frame::Zero { gpa, pages } => {
                check_run(*gpa, *pages).map_err(|problem| self.bad_pages(KIND_ZERO, problem))?;
                let mut payload = [0u8; ZERO_PAYLOAD_LEN];
                payload[..8].copy_from_slice(&gpa.to_le_bytes());
                payload[8..].copy_from_slice(&pages.to_le_bytes());
                self.write_raw(KIND_ZERO, &payload, Body::Bytes(&[]))
            }
            Frame::EndOfRound { round } => {
                self.write_raw(KIND_END_OF_ROUND, &round.to_le_bytes(), Body::Bytes(&[]))
            }
            Frame::Done => {
                if self.binding.link.count != 1 {
                    return Err(self.malformed(
                        KIND_DONE,
                        format!(
                            "on one of {} connections, done must name every connection's \
                             frame count (write_done)",
                            self.binding.link.count
                        ),
                    ));
                }
                self.write_done(&[self.pos.seq])
            }
            Frame::Ack { what } => self.write_raw(KIND_ACK, &[what.to_byte()], Body::Bytes(&[])),
            Frame::Error(msg) | Frame::Abort(msg) => {
                self.write_raw(frame.kind(), &[], Body::Bytes(msg.as_bytes()))
            }
        }
    }

    /// Buffers a `Pages` frame from borrowed data: the same bytes as
    /// `write_frame(&Frame::Pages { .. })` without first copying the pages
    /// into a `Vec`.
    pub fn write_pages(
        &mut self,
        gpa: u64,
        encoding: Encoding,
        count: u32,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        let prefix = self.pages_prefix(gpa, encoding, count, data.len())?;
        self.write_raw(KIND_PAGES, &prefix, Body::Bytes(data))
    }

    /// Writes a raw `Pages` frame of the guest memory `data` (`count`
    /// pages from `gpa`): the same bytes as [`FrameWriter::write_pages`]
    /// of a copy of it, but the memory is read once, a buffer's worth at a
    /// time, into the writer's buffer, where it is checksummed and sent
    /// from; the checksum covers exactly the bytes sent, whatever the guest
    /// writes meanwhile.
    pub fn write_guest_pages(
        &mut self,
        gpa: u64,
        count: u32,
        data: &VolatileSlice<'_>,
    ) -> Result<(), ProtocolError> {
        let prefix = self.pages_prefix(gpa, Encoding::Raw, count, data.len())?;
        self.write_raw(KIND_PAGES, &prefix, Body::Guest(data))
    }

    fn pages_prefix(
        &self,
        gpa: u64,
        encoding: Encoding,
        count: u32,
        len: usize,
    ) -> Result<[u8; PAGES_PREFIX_LEN], ProtocolError> {
        check_pages(gpa, encoding, count, len)
            .map_err(|problem| self.bad_pages(KIND_PAGES, problem))?;
        let mut prefix = [0u8; PAGES_PREFIX_LEN];
        prefix[..8].copy_from_slice(&gpa.to_le_bytes());
        prefix[8] = encoding.to_byte();
        prefix[12..].copy_from_slice(&count.to_le_bytes());
        Ok(prefix)
    }

    /// Buffers the `done` frame that ends the stream, naming how many
    /// frames each connection of the migration carried before its end
    /// (`frames[i]` for connection `i`; this connection's entry is the
    /// number of frames before this `done`).
    pub fn write_done(&mut self, frames: &[u64]) -> Result<(), ProtocolError> {
        let link = self.binding.link;
        if frames.len() != link.count as usize
            || frames.get(link.index as usize) != Some(&self.pos.seq)
        {
            return Err(self.malformed(
                KIND_DONE,
                format!(
                    "frame counts {frames:?} for connection {} of {} which sent {} frames",
                    link.index, link.count, self.pos.seq
                ),
            ));
        }
        let mut payload = Vec::with_capacity(4 + 8 * frames.len());
        payload.extend_from_slice(&link.count.to_le_bytes());
        for f in frames {
            payload.extend_from_slice(&f.to_le_bytes());
        }
        self.write_raw(KIND_DONE, &payload, Body::Bytes(&[]))
    }

    /// Sends everything buffered to the inner writer and flushes it.
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        if self.broken {
            return Err(ProtocolError::Broken);
        }
        self.drain()
            .and_then(|()| self.out.flush())
            .map_err(|source| {
                self.broken = true;
                io_error(
                    "writing",
                    self.pos.seq.saturating_sub(1),
                    self.pos.offset,
                    source,
                )
            })
    }

    /// Bytes of the stream so far (header included), buffered or sent.
    pub fn bytes_written(&self) -> u64 {
        self.pos.offset
    }

    /// Frames written so far.
    pub fn frames_written(&self) -> u64 {
        self.pos.seq
    }

    /// The connection this stream belongs to, and how it is protected.
    pub fn binding(&self) -> &Binding {
        &self.binding
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// The inner writer, mutably. Writing to it directly corrupts the
    /// stream; reading from it (for a reply) is what it is for.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    fn malformed(&self, kind: u8, reason: String) -> ProtocolError {
        ProtocolError::Malformed {
            frame: self.pos.seq,
            offset: self.pos.offset,
            kind: kind_name(kind),
            reason,
        }
    }

    fn bad_pages(&self, kind: u8, problem: PagesError) -> ProtocolError {
        ProtocolError::BadPages {
            frame: self.pos.seq,
            offset: self.pos.offset,
            kind: kind_name(kind),
            problem,
        }
    }

    /// Hands the buffered bytes to the inner writer.
    fn drain(&mut self) -> io::Result<()> {
        if self.filled > 0 {
            let filled = std::mem::take(&mut self.filled);
            self.out.write_all(&self.buf[..filled])?;
        }
        Ok(())
    }

    /// Buffers `bytes` (or, when they do not fit, sends what is buffered
    /// and then them), feeding them to `crc`.
    fn put(&mut self, bytes: &[u8], crc: &mut Option<u32>) -> io::Result<()> {
        if let Some(c) = crc {
            *c = crc32c::crc32c_append(*c, bytes);
        }
        if self.filled + bytes.len() > self.buf.len() {
            self.drain()?;
            if bytes.len() >= self.buf.len() {
                return self.out.write_all(bytes);
            }
        }
        self.buf[self.filled..self.filled + bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
        Ok(())
    }

    /// Copies guest memory into the buffer a piece at a time, feeding each
    /// piece to `crc` while it is still in cache, and sends every full
    /// buffer.
    fn put_guest(&mut self, src: &VolatileSlice<'_>, crc: &mut Option<u32>) -> io::Result<()> {
        let mut at = 0;
        while at < src.len() {
            if self.filled == self.buf.len() {
                self.drain()?;
            }
            let n = (self.buf.len() - self.filled).min(src.len() - at);
            let dst = &mut self.buf[self.filled..self.filled + n];
            let piece = src
                .subslice(at, n)
                .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
            piece.copy_to(dst);
            if let Some(c) = crc {
                *c = crc32c::crc32c_append(*c, dst);
            }
            self.filled += n;
            at += n;
        }
        Ok(())
    }

    fn write_raw(
        &mut self,
        kind: u8,
        prefix: &[u8],
        body: Body<'_, '_>,
    ) -> Result<(), ProtocolError> {
        if self.broken {
            return Err(ProtocolError::Broken);
        }
        let len = prefix.len() + body.len();
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge {
                frame: self.pos.seq,
                offset: self.pos.offset,
                len,
            });
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[0] = kind;
        // header[1] (flags) and header[2..4] (reserved) stay zero.
        header[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        header[8..16].copy_from_slice(&self.pos.seq.to_le_bytes());
        let mut crc = (self.binding.integrity == Integrity::Checksum).then_some(0u32);
        let mut result = self
            .put(&header, &mut crc)
            .and_then(|()| self.put(prefix, &mut crc))
            .and_then(|()| match body {
                Body::Bytes(b) => self.put(b, &mut crc),
                Body::Guest(g) => self.put_guest(g, &mut crc),
            });
        if let Some(c) = crc {
            let c = crc32c::crc32c_append(c, &self.binding.session.0);
            result = result.and_then(|()| self.put(&c.to_le_bytes(), &mut None));
        }
        if let Err(source) = result {
            self.broken = true;
            return Err(io_error("writing", self.pos.seq, self.pos.offset, source));
        }
        self.pos.seq += 1;
        self.pos.offset += (FRAME_HEADER_LEN + len + self.binding.trailer_len()) as u64;
        Ok(())
    }
}

/// Reads one direction of a migration stream, checking everything.
///
/// The stream header is checked at the first [`FrameReader::read_frame`].
/// A read timeout before any byte of a frame leaves the reader usable (try
/// again); any other error leaves it broken: later reads fail with
/// [`ProtocolError::Broken`].
pub struct FrameReader<R: Read> {
    inner: R,
    state: ReadState,
}

impl<R: Read> FrameReader<R> {
    /// A reader that accepts only checksummed frames of `session`, the only
    /// connection of its migration.
    pub fn new(inner: R, session: &SessionNonce) -> FrameReader<R> {
        FrameReader::bound(inner, &Binding::checksummed(session))
    }

    /// A reader for the connection `binding` describes.
    pub fn bound(inner: R, binding: &Binding) -> FrameReader<R> {
        FrameReader {
            inner,
            state: ReadState::new(binding),
        }
    }

    /// Reads and checks the next frame.
    pub fn read_frame(&mut self) -> Result<Frame, ProtocolError> {
        self.state.read_frame(&mut self.inner)
    }

    /// Reads and checks the next frame, as [`FrameReader::read_frame`],
    /// but reads the data of a raw `Pages` frame straight into the memory
    /// `target` places it in.
    pub fn read_into(&mut self, target: &mut dyn PageTarget) -> Result<Received, ProtocolError> {
        self.state.read(&mut self.inner, Some(target))
    }

    /// Bytes of the stream read so far (header included).
    pub fn bytes_read(&self) -> u64 {
        self.state.pos.offset
    }

    /// Frames read so far.
    pub fn frames_read(&self) -> u64 {
        self.state.pos.seq
    }

    /// The inner reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// After `done`: how many frames it says each connection of the
    /// migration carried (this connection's entry was checked; the others
    /// are the caller's to check).
    pub fn done_counts(&self) -> Option<&[u64]> {
        self.state.done.as_deref()
    }

    /// The largest payload buffer this reader has allocated: never much
    /// more than the bytes that arrived (see `BODY_GROWTH`).
    pub fn largest_buffer(&self) -> usize {
        self.state.largest_buffer
    }
}

/// Both directions over one connection: frames written go out through a
/// [`FrameWriter`], frames read come in through the reader's checks.
///
/// This exists because a connection (a TLS one in particular) cannot be
/// split into a read half and a write half: the source writes pages and
/// reads acks on the same `Box<dyn Conn>`.
pub struct FrameStream<C: Read + Write> {
    writer: FrameWriter<C>,
    read: ReadState,
}

impl<C: Read + Write> FrameStream<C> {
    /// Both directions of `conn`, checksummed, for `session`, the only
    /// connection of its migration.
    pub fn new(conn: C, session: &SessionNonce) -> FrameStream<C> {
        FrameStream::bound(conn, &Binding::checksummed(session))
    }

    /// Both directions of the connection `binding` describes.
    pub fn bound(conn: C, binding: &Binding) -> FrameStream<C> {
        FrameStream {
            writer: FrameWriter::bound(conn, binding),
            read: ReadState::new(binding),
        }
    }

    /// See [`FrameWriter::write_frame`].
    pub fn write_frame(&mut self, frame: &Frame) -> Result<(), ProtocolError> {
        self.writer.write_frame(frame)
    }

    /// See [`FrameWriter::write_pages`].
    pub fn write_pages(
        &mut self,
        gpa: u64,
        encoding: Encoding,
        count: u32,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        self.writer.write_pages(gpa, encoding, count, data)
    }

    /// See [`FrameWriter::write_done`].
    pub fn write_done(&mut self, frames: &[u64]) -> Result<(), ProtocolError> {
        self.writer.write_done(frames)
    }

    /// See [`FrameWriter::flush`].
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.writer.flush()
    }

    /// Frames written so far.
    pub fn frames_written(&self) -> u64 {
        self.writer.frames_written()
    }

    /// See [`FrameReader::done_counts`].
    pub fn done_counts(&self) -> Option<&[u64]> {
        self.read.done.as_deref()
    }

    /// Flushes what was written (the peer may be waiting for it before it
    /// replies), then reads the next frame: see [`FrameReader::read_frame`].
    pub fn read_frame(&mut self) -> Result<Frame, ProtocolError> {
        self.writer.flush()?;
        self.read.read_frame(self.writer.get_mut())
    }

    /// Flushes what was written, then reads the next frame: see
    /// [`FrameReader::read_into`].
    pub fn read_into(&mut self, target: &mut dyn PageTarget) -> Result<Received, ProtocolError> {
        self.writer.flush()?;
        self.read.read(self.writer.get_mut(), Some(target))
    }

    /// See [`FrameWriter::write_guest_pages`].
    pub fn write_guest_pages(
        &mut self,
        gpa: u64,
        count: u32,
        data: &VolatileSlice<'_>,
    ) -> Result<(), ProtocolError> {
        self.writer.write_guest_pages(gpa, count, data)
    }

    /// The connection this stream belongs to, and how it is protected.
    pub fn binding(&self) -> &Binding {
        self.writer.binding()
    }

    /// Bytes written so far, buffered or sent.
    pub fn bytes_written(&self) -> u64 {
        self.writer.bytes_written()
    }

    /// Hands back the data buffer of a frame read earlier, to be reused
    /// for the next one.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() > self.read.spare.capacity() {
            self.read.spare = buf;
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.pos.offset
    }

    /// The connection (to set timeouts or take a shutdown handle).
    pub fn get_ref(&self) -> &C {
        self.writer.get_ref()
    }
}

/// The reading side's position and checks, apart from the reader itself
/// so [`FrameStream`] can share one connection with a writer.
struct ReadState {
    binding: Binding,
    header_checked: bool,
    pos: Position,
    broken: bool,
    /// A payload buffer handed back by the caller, reused for the next
    /// frame: a fresh 8 MiB buffer per frame costs page faults every time.
    spare: Vec<u8>,
    /// What `done` said each connection carried.
    done: Option<Vec<u64>>,
    /// The largest payload buffer allocated (for the fuzz tests' bound).
    largest_buffer: usize,
}

/// How a `read_full` ended short of filling its buffer.
enum Short {
    /// End of stream after this many bytes.
    Eof(usize),
    /// An error after this many bytes.
    Err(usize, io::Error),
}

/// Fills `buf` from `r`; retries interrupted reads.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<(), Short> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(Short::Eof(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // TLS reports a peer that hung up without a close_notify this
            // way: for the stream it is an end like any other.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Short::Eof(got)),
            Err(e) => return Err(Short::Err(got, e)),
        }
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl ReadState {
    fn new(binding: &Binding) -> ReadState {
        ReadState {
            binding: *binding,
            header_checked: false,
            pos: Position { seq: 0, offset: 0 },
            broken: false,
            spare: Vec::new(),
            done: None,
            largest_buffer: 0,
        }
    }

    fn read_frame(&mut self, r: &mut impl Read) -> Result<Frame, ProtocolError> {
        match self.read(r, None)? {
            Received::Frame(f) => Ok(f),
            Received::Placed { .. } => unreachable!("nothing is placed without a target"),
        }
    }

    fn read(
        &mut self,
        r: &mut impl Read,
        target: Option<&mut dyn PageTarget>,
    ) -> Result<Received, ProtocolError> {
        if self.broken {
            return Err(ProtocolError::Broken);
        }
        let result = self.read_frame_inner(r, target);
        match &result {
            Ok(_) => {}
            // Nothing of the frame was read: the stream is still in step.
            Err(ProtocolError::Timeout { got: 0, .. }) => {}
            Err(_) => self.broken = true,
        }
        result
    }

    fn read_stream_header(&mut self, r: &mut impl Read) -> Result<(), ProtocolError> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        let got = match read_full(r, &mut header) {
            Ok(()) => STREAM_HEADER_LEN,
            Err(Short::Eof(got)) => got,
            Err(Short::Err(got, e)) if is_timeout(&e) => {
                return Err(ProtocolError::Timeout {
                    frame: 0,
                    offset: 0,
                    got,
                })
            }
            Err(Short::Err(_, source)) => return Err(io_error("reading", 0, 0, source)),
        };
        // Judge the magic as soon as there is one: a foreign peer is told
        // so even if it sent fewer than twelve bytes.
        if got >= MAGIC.len() && header[..8] != MAGIC {
            return Err(ProtocolError::NotMigrationStream {
                got: header[..8].try_into().expect("8 bytes"),
            });
        }
        if got < STREAM_HEADER_LEN {
            return Err(ProtocolError::HeaderTruncated { got });
        }
        let theirs = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
        if theirs != VERSION {
            return Err(ProtocolError::Version {
                ours: VERSION,
                theirs,
            });
        }
        self.header_checked = true;
        self.pos.offset = STREAM_HEADER_LEN as u64;
        Ok(())
    }

    /// Reads the frame's crc32c and compares it with `expected`.
    fn check_trailer(
        &self,
        r: &mut impl Read,
        expected: u32,
        short: &dyn Fn(usize, usize, Short) -> ProtocolError,
        needed: usize,
    ) -> Result<(), ProtocolError> {
        let mut crc = [0u8; CHECKSUM_LEN];
        read_full(r, &mut crc).map_err(|s| short(needed - CHECKSUM_LEN, needed, s))?;
        let got = u32::from_le_bytes(crc);
        if got != expected {
            return Err(ProtocolError::Checksum {
                frame: self.pos.seq,
                offset: self.pos.offset,
                expected,
                got,
            });
        }
        Ok(())
    }

    fn read_frame_inner(
        &mut self,
        r: &mut impl Read,
        target: Option<&mut dyn PageTarget>,
    ) -> Result<Received, ProtocolError> {
        if !self.header_checked {
            self.read_stream_header(r)?;
        }
        let Position { seq: frame, offset } = self.pos;
        // A short read at `done` bytes into the frame, which needs `needed`.
        let short = |done: usize, needed: usize, short: Short| match short {
            Short::Eof(0) if done == 0 => ProtocolError::Closed {
                frames: frame,
                offset,
            },
            Short::Eof(got) => ProtocolError::Truncated {
                frame,
                offset,
                got: done + got,
                needed,
            },
            Short::Err(got, e) if is_timeout(&e) => ProtocolError::Timeout {
                frame,
                offset,
                got: done + got,
            },
            Short::Err(_, source) => io_error("reading", frame, offset, source),
        };

        let mut header = [0u8; FRAME_HEADER_LEN];
        read_full(r, &mut header).map_err(|s| short(0, FRAME_HEADER_LEN, s))?;
        let kind = header[0];
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge { frame, offset, len });
        }
        let trailer_len = self.binding.trailer_len();
        let needed = FRAME_HEADER_LEN + len + trailer_len;
        // Page data is read straight into its own buffer, apart from the
        // prefix, so it is never moved again.
        let prefix_len = if kind == KIND_PAGES && len >= PAGES_PREFIX_LEN {
            PAGES_PREFIX_LEN
        } else {
            0
        };
        let mut prefix = [0u8; PAGES_PREFIX_LEN];
        let prefix = &mut prefix[..prefix_len];
        read_full(r, prefix).map_err(|s| short(FRAME_HEADER_LEN, needed, s))?;
        let body_len = len - prefix_len;
        if let Some((gpa, count)) = target
            .is_some()
            .then(|| placeable(&header, prefix, body_len))
            .flatten()
        {
            let place = target.expect("checked above").place(gpa, count);
            if let Some(dst) = place.filter(|d| d.len() == body_len) {
                // Straight into its destination, a piece at a time, each
                // piece checksummed while it is in cache. What lands before
                // a check fails is the receiver's to throw away with the
                // stream.
                let mut crc = (self.binding.integrity == Integrity::Checksum)
                    .then(|| crc32c::crc32c_append(crc32c::crc32c(&header), prefix));
                let mut at = 0;
                while at < body_len {
                    let n = READ_PIECE_LEN.min(body_len - at);
                    read_full(r, &mut dst[at..at + n])
                        .map_err(|s| short(FRAME_HEADER_LEN + prefix_len + at, needed, s))?;
                    if let Some(c) = &mut crc {
                        *c = crc32c::crc32c_append(*c, &dst[at..at + n]);
                    }
                    at += n;
                }
                if let Some(c) = crc {
                    let expected = crc32c::crc32c_append(c, &self.binding.session.0);
                    self.check_trailer(r, expected, &short, needed)?;
                }
                let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
                if seq != frame {
                    return Err(ProtocolError::Sequence {
                        offset,
                        expected: frame,
                        got: seq,
                    });
                }
                self.pos.seq += 1;
                self.pos.offset += needed as u64;
                return Ok(Received::Placed { gpa, count });
            }
        }
        let mut body = std::mem::take(&mut self.spare);
        body.clear();
        // Grown as the bytes arrive, not to the declared length at once.
        while body.len() < body_len {
            let have = body.len();
            body.resize(have + (body_len - have).min(BODY_GROWTH), 0);
            self.largest_buffer = self.largest_buffer.max(body.capacity());
            read_full(r, &mut body[have..])
                .map_err(|s| short(FRAME_HEADER_LEN + prefix_len + have, needed, s))?;
        }
        if self.binding.integrity == Integrity::Checksum {
            let expected = checksum(&header, &[prefix, &body], &self.binding.session);
            self.check_trailer(r, expected, &short, needed)?;
        }
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if seq != frame {
            return Err(ProtocolError::Sequence {
                offset,
                expected: frame,
                got: seq,
            });
        }
        let malformed = |reason: String| ProtocolError::Malformed {
            frame,
            offset,
            kind: kind_name(kind),
            reason,
        };
        let bad_pages = |problem| ProtocolError::BadPages {
            frame,
            offset,
            kind: kind_name(kind),
            problem,
        };
        if header[1] != 0 || header[2..4] != [0, 0] {
            return Err(malformed(format!(
                "flags {:#04x} and reserved bytes {:02x?} must be zero in version {VERSION}",
                header[1],
                &header[2..4]
            )));
        }
        let exact = |want: usize| {
            if len == want {
                Ok(())
            } else {
                Err(malformed(format!(
                    "payload is {len} bytes, expected {want}"
                )))
            }
        };
        let text = |body: Vec<u8>| {
            String::from_utf8(body).map_err(|e| malformed(format!("message is not UTF-8: {e}")))
        };
        let parsed = match kind {
            KIND_CONFIG => Frame::Config(body),
            KIND_STATE => Frame::State(body),
            KIND_STORAGE => Frame::Storage(body),
            KIND_PAGES => {
                if prefix_len != PAGES_PREFIX_LEN {
                    return Err(malformed(format!(
                        "payload is {len} bytes, shorter than its {PAGES_PREFIX_LEN}-byte prefix"
                    )));
                }
                let gpa = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
                let encoding = Encoding::from_byte(prefix[8])
                    .ok_or_else(|| malformed(format!("unknown encoding {}", prefix[8])))?;
                if prefix[9..12] != [0, 0, 0] {
                    return Err(malformed("reserved bytes must be zero".to_string()));
                }
                let count = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes"));
                check_pages(gpa, encoding, count, body.len()).map_err(bad_pages)?;
                Frame::Pages {
                    gpa,
                    encoding,
                    count,
                    data: body,
                }
            }
            KIND_ZERO => {
                exact(ZERO_PAYLOAD_LEN)?;
                let gpa = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                let pages = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
                check_run(gpa, pages).map_err(bad_pages)?;
                Frame::Zero { gpa, pages }
            }
            KIND_END_OF_ROUND => {
                exact(4)?;
                Frame::EndOfRound {
                    round: u32::from_le_bytes(body[..4].try_into().expect("4 bytes")),
                }
            }
            KIND_DONE => {
                let link = self.binding.link;
                exact(4 + 8 * link.count as usize)?;
                let count = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
                if count != link.count {
                    return Err(malformed(format!(
                        "it names {count} connections; this is connection {} of {}",
                        link.index, link.count
                    )));
                }
                let counts: Vec<u64> = body[4..]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                let ours = counts[link.index as usize];
                if ours != frame {
                    return Err(malformed(format!(
                        "it says this connection carried {ours} frames before it, but {frame} \
                         arrived"
                    )));
                }
                self.done = Some(counts);
                Frame::Done
            }
            KIND_ACK => {
                exact(1)?;
                let what = AckKind::from_byte(body[0])
                    .ok_or_else(|| malformed(format!("unknown ack {}", body[0])))?;
                Frame::Ack { what }
            }
            KIND_ERROR => Frame::Error(text(body)?),
            KIND_ABORT => Frame::Abort(text(body)?),
            _ => {
                return Err(ProtocolError::UnknownKind {
                    frame,
                    offset,
                    kind,
                })
            }
        };
        self.pos.seq += 1;
        self.pos.offset += needed as u64;
        Ok(Received::Frame(parsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const SESSION: SessionNonce = SessionNonce([7; SESSION_NONCE_LEN]);

    fn every_kind() -> Vec<Frame> {
        let pages: Vec<u8> = (0..2 * PAGE_LEN).map(|i| (i % 251) as u8).collect();
        vec![
            Frame::Config(br#"{"vcpus":2}"#.to_vec()),
            Frame::Pages {
                gpa: 0x10_0000,
                encoding: Encoding::Raw,
                count: 2,
                data: pages,
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
            Frame::Storage(br#"[{"id":"disk0","bytes":4096}]"#.to_vec()),
            Frame::EndOfRound { round: 3 },
            Frame::Ack {
                what: AckKind::Config,
            },
            Frame::Ack {
                what: AckKind::Storage,
            },
            Frame::Ack {
                what: AckKind::Done,
            },
            Frame::Error("config refused: 2 guest nodes, this host has 1".into()),
            Frame::Abort("cancelled by migrate-cancel".into()),
            Frame::Config(Vec::new()),
            Frame::Done,
        ]
    }

    fn encode(frames: &[Frame], session: &SessionNonce) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), session);
        for f in frames {
            w.write_frame(f).unwrap();
        }
        w.flush().unwrap();
        let n = w.bytes_written();
        let bytes = w.get_ref().clone();
        assert_eq!(n, bytes.len() as u64);
        bytes
    }

    fn decode_all(bytes: &[u8], session: &SessionNonce) -> Result<Vec<Frame>, ProtocolError> {
        let mut r = FrameReader::new(bytes, session);
        let mut frames = Vec::new();
        loop {
            let f = r.read_frame()?;
            let done = f == Frame::Done;
            frames.push(f);
            if done {
                return Ok(frames);
            }
        }
    }

    #[test]
    fn every_frame_kind_round_trips_over_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let frames = every_kind();
        let sent = frames.clone();
        let writer = std::thread::spawn(move || {
            let mut w = FrameWriter::new(a, &SESSION);
            for f in &sent {
                w.write_frame(f).unwrap();
            }
            w.flush().unwrap();
            w.bytes_written()
        });
        let mut r = FrameReader::new(b, &SESSION);
        for f in &frames {
            assert_eq!(&r.read_frame().unwrap(), f);
        }
        let written = writer.join().unwrap();
        assert_eq!(r.bytes_read(), written);
        assert_eq!(r.frames_read(), frames.len() as u64);
        // The writer is gone: a clean end between frames.
        let err = r.read_frame().unwrap_err();
        assert!(
            matches!(err, ProtocolError::Closed { frames, .. } if frames == every_kind().len() as u64),
            "{err}"
        );
    }

    #[test]
    fn a_frame_stream_writes_and_reads_on_one_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut s = FrameStream::new(b, &SESSION);
            assert!(matches!(s.read_frame().unwrap(), Frame::Config(_)));
            s.write_frame(&Frame::Ack {
                what: AckKind::Config,
            })
            .unwrap();
            assert_eq!(s.read_frame().unwrap(), Frame::Done);
            s.write_frame(&Frame::Error("no".into())).unwrap();
            s.flush().unwrap();
        });
        let mut s = FrameStream::new(a, &SESSION);
        s.write_frame(&Frame::Config(b"{}".to_vec())).unwrap();
        assert_eq!(
            s.read_frame().unwrap(),
            Frame::Ack {
                what: AckKind::Config
            }
        );
        s.write_frame(&Frame::Done).unwrap();
        assert_eq!(s.read_frame().unwrap(), Frame::Error("no".into()));
        peer.join().unwrap();
        assert!(s.bytes_read() > 0 && s.bytes_written() > 0);
    }

    /// Guest memory of `pages` pages, each different.
    fn guest(pages: usize) -> Vec<u8> {
        (0..pages * PAGE_LEN)
            .map(|i| ((i / 7) ^ (i / PAGE_LEN)) as u8)
            .collect()
    }

    #[test]
    fn guest_pages_go_out_as_the_same_bytes_as_a_copy_of_them() {
        // Larger than the write buffer, and after a small frame: the pages
        // cross several buffer flushes at an odd offset.
        let mut mem = guest(100);
        let copy = mem.clone();
        let mut a = FrameWriter::new(Vec::new(), &SESSION);
        a.write_frame(&Frame::EndOfRound { round: 1 }).unwrap();
        a.write_guest_pages(0x20_0000, 100, &VolatileSlice::from(&mut mem[..]))
            .unwrap();
        a.flush().unwrap();
        let mut b = FrameWriter::new(Vec::new(), &SESSION);
        b.write_frame(&Frame::EndOfRound { round: 1 }).unwrap();
        b.write_pages(0x20_0000, Encoding::Raw, 100, &copy).unwrap();
        b.flush().unwrap();
        assert!(a.get_ref() == b.get_ref());
        assert_eq!(a.bytes_written(), b.bytes_written());
        let err = a
            .write_guest_pages(0x20_0001, 100, &VolatileSlice::from(&mut mem[..]))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::BadPages { .. }), "{err}");
    }

    /// A page target over a buffer at guest-physical `base`; it refuses
    /// runs that do not fit, as guest memory does.
    struct Target {
        base: u64,
        mem: Vec<u8>,
        placed: u32,
    }

    impl PageTarget for Target {
        fn place(&mut self, gpa: u64, count: u32) -> Option<&mut [u8]> {
            let at = gpa.checked_sub(self.base)? as usize;
            let len = count as usize * PAGE_LEN;
            self.placed += 1;
            self.mem.get_mut(at..at.checked_add(len)?)
        }
    }

    #[test]
    fn raw_pages_are_read_straight_into_their_target_and_other_frames_as_usual() {
        let data = guest(80);
        let frames = vec![
            Frame::Pages {
                gpa: 0x10_0000,
                encoding: Encoding::Raw,
                count: 80,
                data: data.clone(),
            },
            Frame::Pages {
                gpa: 0x10_0000,
                encoding: Encoding::Lz4,
                count: 3,
                data: vec![1, 2, 3],
            },
            // Outside the target: read as a frame, for the caller to refuse.
            Frame::Pages {
                gpa: 0x90_0000,
                encoding: Encoding::Raw,
                count: 1,
                data: data[..PAGE_LEN].to_vec(),
            },
            Frame::Zero {
                gpa: 0x10_0000,
                pages: 2,
            },
            Frame::Done,
        ];
        let bytes = encode(&frames, &SESSION);
        let mut t = Target {
            base: 0x10_0000,
            mem: vec![0; 100 * PAGE_LEN],
            placed: 0,
        };
        let mut r = FrameReader::new(&bytes[..], &SESSION);
        assert_eq!(
            r.read_into(&mut t).unwrap(),
            Received::Placed {
                gpa: 0x10_0000,
                count: 80
            }
        );
        assert!(t.mem[..data.len()] == data[..]);
        for f in &frames[1..] {
            assert_eq!(r.read_into(&mut t).unwrap(), Received::Frame(f.clone()));
        }
        // Asked for the two raw frames only.
        assert_eq!(t.placed, 2);
        assert_eq!(r.bytes_read(), bytes.len() as u64);

        // A changed byte of placed data fails the frame's checksum.
        let mut bad = bytes.clone();
        bad[STREAM_HEADER_LEN + FRAME_HEADER_LEN + PAGES_PREFIX_LEN + 5000] ^= 1;
        let mut r = FrameReader::new(&bad[..], &SESSION);
        let err = r.read_into(&mut t).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Checksum { frame: 0, .. }),
            "{err}"
        );
        // Cut inside the placed data: a truncated frame.
        let mut r = FrameReader::new(&bytes[..STREAM_HEADER_LEN + 300_000], &SESSION);
        let err = r.read_into(&mut t).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Truncated { got: 300_000, .. }),
            "{err}"
        );
    }

    #[test]
    fn write_pages_matches_write_frame() {
        let data = vec![5u8; PAGE_LEN];
        let frame = Frame::Pages {
            gpa: 0,
            encoding: Encoding::Raw,
            count: 1,
            data: data.clone(),
        };
        let mut w = FrameWriter::new(Vec::new(), &SESSION);
        w.write_pages(0, Encoding::Raw, 1, &data).unwrap();
        w.flush().unwrap();
        assert!(w.get_ref() == &encode(&[frame], &SESSION));
    }

    #[test]
    fn every_prefix_of_a_stream_is_refused_cleanly() {
        let bytes = encode(&every_kind(), &SESSION);
        for len in 0..bytes.len() {
            let err = decode_all(&bytes[..len], &SESSION).unwrap_err();
            match err {
                ProtocolError::HeaderTruncated { got } => assert_eq!(got, len),
                ProtocolError::Truncated { got, needed, .. } => {
                    assert!(got > 0 && got < needed, "{err}")
                }
                ProtocolError::Closed { offset, .. } => assert_eq!(offset, len as u64),
                other => panic!("prefix of {len} bytes: unexpected {other}"),
            }
        }
        assert_eq!(decode_all(&bytes, &SESSION).unwrap(), every_kind());
    }

    #[test]
    fn truncation_names_the_frame_and_the_bytes() {
        let bytes = encode(&[Frame::State(vec![1; 10]), Frame::Done], &SESSION);
        // Header, then 4 bytes into frame 0.
        let err = decode_all(&bytes[..STREAM_HEADER_LEN + 4], &SESSION).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stream ended after 4 bytes in frame 0 (at offset 12; the frame needs 16 bytes)"
        );
        let frame0 = FRAME_HEADER_LEN + 10 + CHECKSUM_LEN;
        let err = decode_all(&bytes[..STREAM_HEADER_LEN + frame0 + 17], &SESSION).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stream ended after 17 bytes in frame 1 (at offset 42; the frame needs 32 bytes)"
        );
    }

    #[test]
    fn foreign_streams_and_other_versions_are_refused() {
        for garbage in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"VMHOPCKP\x01\0\0\0",
            b"SSH-2.0-",
        ] {
            let err = decode_all(garbage, &SESSION).unwrap_err();
            assert!(
                err.to_string().starts_with("not a vmhop migration stream"),
                "{err}"
            );
        }
        let mut bytes = encode(&[Frame::Done], &SESSION);
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let err = decode_all(&bytes, &SESSION).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the peer speaks migration stream version 1; this vmhop speaks version 2"
        );
    }

    #[test]
    fn random_garbage_after_the_header_is_refused() {
        let mut bytes = encode(&[], &SESSION);
        let mut x: u32 = 12345;
        for _ in 0..4096 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            bytes.push((x >> 16) as u8);
        }
        assert!(decode_all(&bytes, &SESSION).is_err());
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_frame_is_refused() {
        let frames = [
            Frame::Pages {
                gpa: 0x3000,
                encoding: Encoding::Raw,
                count: 1,
                data: vec![0xC3; PAGE_LEN],
            },
            Frame::EndOfRound { round: 1 },
            Frame::Done,
        ];
        let bytes = encode(&frames, &SESSION);
        for i in STREAM_HEADER_LEN..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode_all(&bad, &SESSION).is_err(),
                    "flip of bit {bit} of byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn frames_of_another_session_are_refused() {
        let other = SessionNonce([8; SESSION_NONCE_LEN]);
        let recorded = encode(&[Frame::Config(b"{}".to_vec()), Frame::Done], &other);
        let err = decode_all(&recorded, &SESSION).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Checksum { frame: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("another session"), "{err}");
        // A frame of this session spliced in at the wrong place.
        let ours = encode(&[Frame::Config(b"{}".to_vec()), Frame::Done], &SESSION);
        let frame0_len = FRAME_HEADER_LEN + 2 + CHECKSUM_LEN;
        let mut replayed = ours[..STREAM_HEADER_LEN + frame0_len].to_vec();
        replayed.extend_from_slice(&ours[STREAM_HEADER_LEN..STREAM_HEADER_LEN + frame0_len]);
        let err = decode_all(&replayed, &SESSION).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Sequence {
                    expected: 1,
                    got: 0,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// A stream with one frame written by hand, with a valid checksum.
    fn hand_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = encode(&[], &SESSION);
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[0] = kind;
        header[1] = flags;
        header[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&checksum(&header, &[payload], &SESSION).to_le_bytes());
        bytes
    }

    #[test]
    fn well_checksummed_nonsense_is_refused_by_name() {
        let err = decode_all(&hand_frame(42, 0, b""), &SESSION).unwrap_err();
        assert_eq!(
            err.to_string(),
            "frame 0 (at offset 12) has unknown kind 42"
        );
        let err = decode_all(&hand_frame(KIND_DONE, 1, b""), &SESSION).unwrap_err();
        assert!(err.to_string().contains("flags 0x01"), "{err}");
        let cases: Vec<(u8, Vec<u8>, &str)> = vec![
            (KIND_DONE, vec![0], "expected 12"),
            (
                KIND_DONE,
                [2u32.to_le_bytes().to_vec(), vec![0; 8]].concat(),
                "names 2 connections; this is connection 0 of 1",
            ),
            (
                KIND_DONE,
                [1u32.to_le_bytes().to_vec(), 3u64.to_le_bytes().to_vec()].concat(),
                "carried 3 frames before it, but 0 arrived",
            ),
            (KIND_ACK, vec![9], "unknown ack 9"),
            (KIND_END_OF_ROUND, vec![1, 2], "expected 4"),
            (KIND_ERROR, vec![0xff, 0xfe], "not UTF-8"),
            (KIND_PAGES, vec![0; 8], "shorter than its 16-byte prefix"),
            (
                KIND_ZERO,
                [1u64.to_le_bytes(), 1u64.to_le_bytes()].concat(),
                "not page-aligned",
            ),
            (
                KIND_ZERO,
                [0u64.to_le_bytes(), 0u64.to_le_bytes()].concat(),
                "0 pages",
            ),
            (
                KIND_ZERO,
                [0xFFFF_F000u64.to_le_bytes(), u64::MAX.to_le_bytes()].concat(),
                "past the end",
            ),
        ];
        for (kind, payload, want) in cases {
            let err = decode_all(&hand_frame(kind, 0, &payload), &SESSION).unwrap_err();
            assert!(
                matches!(
                    err,
                    ProtocolError::Malformed { .. } | ProtocolError::BadPages { .. }
                ) && err.to_string().contains(want),
                "kind {kind}: {err}"
            );
        }
        let pages_prefix = |encoding: u8, count: u32| {
            let mut p = vec![0u8; PAGES_PREFIX_LEN];
            p[8] = encoding;
            p[12..].copy_from_slice(&count.to_le_bytes());
            p
        };
        for (payload, want) in [
            (pages_prefix(7, 1), "unknown encoding 7"),
            (pages_prefix(0, 0), "0 pages"),
            (pages_prefix(0, MAX_PAGES_PER_FRAME + 1), "a frame carries"),
            ([pages_prefix(0, 1), vec![0; 100]].concat(), "expected 4096"),
            (pages_prefix(1, 1), "no lz4 data"),
        ] {
            let err = decode_all(&hand_frame(KIND_PAGES, 0, &payload), &SESSION).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_before_its_payload_is_read() {
        let mut bytes = encode(&[], &SESSION);
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[0] = KIND_STATE;
        header[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&header);
        let err = decode_all(&bytes, &SESSION).unwrap_err();
        assert!(
            matches!(err, ProtocolError::TooLarge { len, .. } if len == u32::MAX as usize),
            "{err}"
        );
        let mut w = FrameWriter::new(Vec::new(), &SESSION);
        let err = w
            .write_frame(&Frame::State(vec![0; MAX_PAYLOAD + 1]))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn the_writer_refuses_frames_the_reader_would_refuse() {
        let mut w = FrameWriter::new(Vec::new(), &SESSION);
        for bad in [
            Frame::Pages {
                gpa: 0,
                encoding: Encoding::Raw,
                count: 2,
                data: vec![0; PAGE_LEN],
            },
            Frame::Pages {
                gpa: 1,
                encoding: Encoding::Raw,
                count: 1,
                data: vec![0; PAGE_LEN],
            },
            Frame::Zero { gpa: 0, pages: 0 },
        ] {
            let err = w.write_frame(&bad).unwrap_err();
            assert!(matches!(err, ProtocolError::BadPages { .. }), "{err}");
        }
        // Nothing was written for them: the stream is still in step.
        w.write_frame(&Frame::Done).unwrap();
        w.flush().unwrap();
        assert_eq!(
            decode_all(w.get_ref(), &SESSION).unwrap(),
            vec![Frame::Done]
        );
    }

    mod sealed {
        use super::*;
        use crate::migration::noise::{sealed_pair, Sealed, RECORD_HEADER_LEN};
        use std::io::Cursor;
        use std::ops::Range;

        const KEY: [u8; 32] = [4; 32];

        fn binding() -> Binding {
            Binding {
                session: SESSION,
                integrity: Integrity::Sealed,
                link: Link::single([5; 16]),
            }
        }

        /// Record boundaries of a sealed stream.
        fn records(bytes: &[u8]) -> Vec<Range<usize>> {
            let mut at = 0;
            let mut out = Vec::new();
            while at + RECORD_HEADER_LEN <= bytes.len() {
                let len = u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
                out.push(at..(at + RECORD_HEADER_LEN + len).min(bytes.len()));
                at += RECORD_HEADER_LEN + len;
            }
            out
        }

        /// `frames` through a sealed writer (flushed after each frame, so
        /// each frame starts a record), and the responder of the same
        /// handshake, ready to open them.
        fn encode_sealed(frames: &[Frame]) -> (Vec<u8>, Sealed<Cursor<Vec<u8>>>) {
            let (w, r) = sealed_pair(&KEY, b"test", Vec::new(), Cursor::new(Vec::new()));
            let mut w = FrameWriter::bound(w, &binding());
            for f in frames {
                w.write_frame(f).unwrap();
                w.flush().unwrap();
            }
            (w.get_ref().get_ref().clone(), r)
        }

        /// Seals `frames`, lets `mutate` change the sealed bytes (given
        /// the record boundaries) and reads them back through the frame
        /// layer.
        fn tampered(
            frames: &[Frame],
            mutate: impl FnOnce(&[u8], &[Range<usize>]) -> Vec<u8>,
        ) -> Result<Vec<Frame>, ProtocolError> {
            let (bytes, mut r) = encode_sealed(frames);
            *r.get_mut() = Cursor::new(mutate(&bytes, &records(&bytes)));
            let mut reader = FrameReader::bound(r, &binding());
            let mut out = Vec::new();
            loop {
                let f = reader.read_frame()?;
                let done = f == Frame::Done;
                out.push(f);
                if done {
                    assert_eq!(reader.done_counts(), Some(&[out.len() as u64 - 1][..]));
                    return Ok(out);
                }
            }
        }

        fn frames() -> Vec<Frame> {
            vec![
                Frame::Config(b"{}".to_vec()),
                Frame::Pages {
                    gpa: 0x3000,
                    encoding: Encoding::Raw,
                    count: 20,
                    data: (0..20 * PAGE_LEN).map(|i| (i % 241) as u8).collect(),
                },
                Frame::EndOfRound { round: 0 },
                Frame::State(vec![1; 50]),
                Frame::Done,
            ]
        }

        fn assert_unauthentic(r: Result<Vec<Frame>, ProtocolError>, frame_no: u64) {
            match r {
                Err(e @ ProtocolError::Unauthentic { frame, .. }) => {
                    assert_eq!(frame, frame_no, "{e}");
                    let msg = e.to_string();
                    assert!(
                        msg.contains("is not authentic") && msg.contains("tampered with"),
                        "{msg}"
                    );
                }
                other => panic!("expected frame {frame_no} to be unauthentic: {other:?}"),
            }
        }

        #[test]
        fn sealed_frames_round_trip_without_checksums_in_records_of_at_most_64_kib() {
            let all = every_kind();
            assert_eq!(tampered(&all, |b, _| b.to_vec()).unwrap(), all);
            let (bytes, _) = encode_sealed(&frames());
            let recs = records(&bytes);
            assert!(recs.iter().all(|r| r.len() <= RECORD_HEADER_LEN + 65_535));
            // 20 pages (80 KiB) need two records.
            assert!(recs.len() > frames().len(), "{}", recs.len());
            let mut w = FrameWriter::bound(Vec::new(), &binding());
            let mut c = FrameWriter::new(Vec::new(), &SESSION);
            for f in &frames() {
                w.write_frame(f).unwrap();
                c.write_frame(f).unwrap();
            }
            assert_eq!(
                c.bytes_written() - w.bytes_written(),
                (CHECKSUM_LEN * frames().len()) as u64
            );
        }

        #[test]
        fn sealed_raw_pages_are_opened_straight_into_their_target() {
            let data = guest(40);
            let frames = vec![
                Frame::Pages {
                    gpa: 0x10_0000,
                    encoding: Encoding::Raw,
                    count: 40,
                    data: data.clone(),
                },
                Frame::Done,
            ];
            let (bytes, mut r) = encode_sealed(&frames);
            *r.get_mut() = Cursor::new(bytes.clone());
            let mut t = Target {
                base: 0x10_0000,
                mem: vec![0; 40 * PAGE_LEN],
                placed: 0,
            };
            let mut reader = FrameReader::bound(r, &binding());
            assert_eq!(
                reader.read_into(&mut t).unwrap(),
                Received::Placed {
                    gpa: 0x10_0000,
                    count: 40
                }
            );
            assert!(t.mem == data);
            assert_eq!(
                reader.read_into(&mut t).unwrap(),
                Received::Frame(Frame::Done)
            );
            // A changed byte in the second record of the pages.
            let recs = records(&bytes);
            let mut bad = bytes.clone();
            bad[recs[1].start + 100] ^= 4;
            let (_, mut r) = encode_sealed(&frames);
            *r.get_mut() = Cursor::new(bad);
            let mut reader = FrameReader::bound(r, &binding());
            let err = reader.read_into(&mut t).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Unauthentic { frame: 0, .. }),
                "{err}"
            );
        }

        #[test]
        fn a_changed_byte_in_any_record_is_refused_naming_the_frame() {
            let n = records(&encode_sealed(&frames()).0).len();
            for rec in 0..n {
                let r = tampered(&frames(), |b, recs| {
                    let mut bad = b.to_vec();
                    let mid = (recs[rec].start + recs[rec].end) / 2;
                    bad[mid] ^= 0x04;
                    bad
                });
                assert!(
                    matches!(r, Err(ProtocolError::Unauthentic { .. })),
                    "record {rec}: {r:?}"
                );
            }
            // The page data: record 1 holds frame 1's header and first pages.
            assert_unauthentic(
                tampered(&frames(), |b, recs| {
                    let mut bad = b.to_vec();
                    bad[recs[1].start + 100] ^= 1;
                    bad
                }),
                1,
            );
        }

        #[test]
        fn replayed_reordered_and_foreign_records_are_refused() {
            let order = |o: &'static [usize]| {
                move |b: &[u8], recs: &[Range<usize>]| -> Vec<u8> {
                    o.iter()
                        .flat_map(|&i| b[recs[i].clone()].to_vec())
                        .collect()
                }
            };
            // Records: 0 stream header and config, 1-2 the pages frame,
            // 3 end-of-round, 4 state, 5 done.
            assert_eq!(records(&encode_sealed(&frames()).0).len(), 6);
            // The end-of-round replayed in place of the state.
            assert_unauthentic(tampered(&frames(), order(&[0, 1, 2, 3, 3, 4, 5])), 3);
            // The two records of the pages frame swapped.
            assert_unauthentic(tampered(&frames(), order(&[0, 2, 1, 3, 4, 5])), 1);
            // A record of page data dropped.
            assert_unauthentic(tampered(&frames(), order(&[0, 2, 3, 4, 5])), 1);
            // The same record from another session (same key, another
            // handshake) in its place.
            let (other, _) = encode_sealed(&frames());
            let orecs = records(&other);
            let r = tampered(&frames(), |b, recs| {
                let mut out = b[..recs[2].start].to_vec();
                out.extend_from_slice(&other[orecs[2].clone()]);
                out.extend_from_slice(&b[recs[3].start..]);
                out
            });
            assert_unauthentic(r, 1);
            // A whole stream of another session.
            assert_unauthentic(tampered(&frames(), |_, _| other.clone()), 0);
        }

        #[test]
        fn a_stream_cut_anywhere_is_refused() {
            let (bytes, _) = encode_sealed(&frames());
            let recs = records(&bytes);
            // At every record boundary before the end, the done included:
            // the reader sees the end before `done`.
            for cut in recs.iter().map(|r| r.start) {
                let r = tampered(&frames(), |b, _| b[..cut].to_vec());
                assert!(
                    matches!(
                        r,
                        Err(ProtocolError::Closed { .. }
                            | ProtocolError::Truncated { .. }
                            | ProtocolError::HeaderTruncated { .. })
                    ),
                    "cut at {cut}: {r:?}"
                );
            }
            // Inside a record.
            for cut in [1, recs[2].start + 7, bytes.len() - 1] {
                let r = tampered(&frames(), |b, _| b[..cut].to_vec());
                assert!(r.is_err(), "cut at {cut}: {r:?}");
            }
            // Just before the done: the peer closed after 4 frames.
            let r = tampered(&frames(), |b, recs| b[..recs[5].start].to_vec());
            assert!(
                matches!(r, Err(ProtocolError::Closed { frames: 4, .. })),
                "{r:?}"
            );
        }

        #[test]
        fn a_done_that_miscounts_the_frames_is_refused() {
            // A sender (with the key) whose done names 7 frames on the only
            // connection: frames were lost somewhere.
            let (w, r) = sealed_pair(&KEY, b"test", Vec::new(), Cursor::new(Vec::new()));
            let mut w = FrameWriter::bound(w, &binding());
            w.write_frame(&Frame::EndOfRound { round: 0 }).unwrap();
            w.write_raw(
                KIND_DONE,
                &[1u32.to_le_bytes().to_vec(), 7u64.to_le_bytes().to_vec()].concat(),
                Body::Bytes(&[]),
            )
            .unwrap();
            w.flush().unwrap();
            let mut r = r;
            *r.get_mut() = Cursor::new(w.get_ref().get_ref().clone());
            let mut reader = FrameReader::bound(r, &binding());
            reader.read_frame().unwrap();
            let err = reader.read_frame().unwrap_err();
            assert!(
                err.to_string()
                    .contains("carried 7 frames before it, but 1 arrived"),
                "{err}"
            );
            // And the writer refuses a done for one of several connections
            // without every connection's count.
            let mut w = FrameWriter::bound(
                Vec::new(),
                &Binding {
                    link: Link {
                        migration: [0; 16],
                        index: 1,
                        count: 2,
                    },
                    ..binding()
                },
            );
            assert!(w.write_frame(&Frame::Done).is_err());
            assert!(w.write_done(&[5, 1]).is_err());
            w.write_done(&[5, 0]).unwrap();
        }
    }

    #[test]
    fn a_read_timeout_between_frames_can_be_retried() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let mut w = FrameWriter::new(a, &SESSION);
        w.write_frame(&Frame::EndOfRound { round: 0 }).unwrap();
        w.flush().unwrap();
        let mut r = FrameReader::new(b, &SESSION);
        assert_eq!(r.read_frame().unwrap(), Frame::EndOfRound { round: 0 });
        let err = r.read_frame().unwrap_err();
        assert!(
            matches!(err, ProtocolError::Timeout { got: 0, .. }),
            "{err}"
        );
        w.write_frame(&Frame::Done).unwrap();
        w.flush().unwrap();
        assert_eq!(r.read_frame().unwrap(), Frame::Done);
    }

    #[test]
    fn a_read_timeout_inside_a_frame_breaks_the_reader() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let bytes = encode(&[Frame::Done], &SESSION);
        a.write_all(&bytes[..bytes.len() - 3]).unwrap();
        let mut r = FrameReader::new(b, &SESSION);
        let err = r.read_frame().unwrap_err();
        assert!(
            matches!(err, ProtocolError::Timeout { got: 29, .. }),
            "{err}"
        );
        a.write_all(&bytes[bytes.len() - 3..]).unwrap();
        assert!(matches!(r.read_frame(), Err(ProtocolError::Broken)));
    }
}
