//! The on-disk format of one checkpoint file: writing it atomically and
//! reading it back with every byte checked.
//!
//! This module owns the byte layout (documented in
//! `docs/checkpoint-format.md`), the crash-safe write protocol (temp file,
//! fsync, rename, fsync of the directory) and the validation of a file on
//! open. It does not know how files form a chain (`chain.rs`), what the
//! opaque `config` and `state` sections contain (the VMM serializes them),
//! which pages are dirty (the transfer engine) or how pages get back into
//! guest memory (the restore code).
//!
//! Layout in short: a 4 KiB header block, then the page records (raw 4 KiB
//! pages, so page data is page-aligned in the file and can be mmapped for a
//! lazy restore), then the `config`, `state`, `disks` and `index` sections,
//! then a fixed-size footer that locates and checksums every section.
//!
//! Disks share the index with memory: the index's addresses are 64-bit,
//! guest memory in space 0 (below 2^56) and disk `i` of the `disks` table
//! in space `i + 1` (its blocks at `(i + 1) << 56 | offset`), so one
//! engine, one writer and one chain walk serve both.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::index::{Index, IndexEntry, IndexError, Section, CRC_LEN, MAX_RECORDS, RUN_LEN};
use crate::memory::{is_zero_page, PAGE_SIZE};

/// The format version this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 3;

/// First eight bytes of every checkpoint file.
pub const MAGIC: [u8; 8] = *b"VMHOPCKP";
/// Last eight bytes of every complete checkpoint file.
pub const TRAILER_MAGIC: [u8; 8] = *b"VMHOPEND";
/// Encoded size of the header fields (including their crc).
pub const HEADER_LEN: usize = 64;
/// The header is padded with zeros to this size so that page records start
/// page-aligned in the file.
pub const HEADER_BLOCK_LEN: usize = PAGE_SIZE as usize;
/// Encoded size of the footer (including its crc and the trailer magic).
pub const FOOTER_LEN: usize = 144;
/// Where the footer's own crc is (it covers the bytes before it).
const FOOTER_CRC_AT: usize = 132;
/// Where an address's space starts: memory is space 0, disk `i` of the
/// `disks` table space `i + 1`.
pub use crate::vmm::store::SPACE_SHIFT;

/// The address space of `addr`: 0 for guest memory, `i + 1` for disk `i`.
pub fn space_of(addr: u64) -> u64 {
    addr >> SPACE_SHIFT
}

/// One disk a checkpoint records, in the `disks` section: address space
/// `space` holds its blocks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskRecord {
    /// The disk's id (`--disk id=`).
    pub id: String,
    /// Its address space in the index (its place in the table, plus one).
    pub space: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Read-only disks store no block: their image is their content.
    pub readonly: bool,
    /// The image the disk's blocks are stored against: a block no file of
    /// the chain holds is this image's.
    pub base: BaseImage,
}

/// A base image, recorded by identity: a restore refuses one that changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseImage {
    /// Absolute path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// crc32c of the sampled blocks (see [`BaseImage::of`]).
    pub sample_crc: u32,
}

/// Bytes read from a base image for its identity: this much at its start
/// and end, and one block at each of [`IDENTITY_SAMPLES`] offsets evenly
/// spread between.
const IDENTITY_EDGE: u64 = 64 << 10;
/// Blocks sampled between the edges.
const IDENTITY_SAMPLES: u64 = 32;
/// Bytes of one sampled block.
const IDENTITY_BLOCK: u64 = 4096;

impl BaseImage {
    /// The identity of the image at `path` now: size, mtime and a crc32c
    /// of ~256 KiB sampled from it (its first and last 64 KiB, where
    /// partition tables and file system superblocks live, and 32 blocks
    /// spread between): cheap enough to check at every restore, which must
    /// start a lazy VM within milliseconds, where a checksum of the whole
    /// image would read all of it.
    pub fn of(path: &Path) -> io::Result<BaseImage> {
        use std::os::unix::fs::MetadataExt;
        let f = File::open(path)?;
        let meta = f.metadata()?;
        let size = meta.len();
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        let mut crc = 0u32;
        let mut take = |at: u64, len: u64| -> io::Result<()> {
            let at = at.min(size);
            let len = len.min(size - at) as usize;
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, at)?;
            crc = crc32c::crc32c_append(crc, &buf);
            Ok(())
        };
        take(0, IDENTITY_EDGE)?;
        for k in 1..=IDENTITY_SAMPLES {
            let at = size / (IDENTITY_SAMPLES + 1) * k;
            take(at - at % IDENTITY_BLOCK, IDENTITY_BLOCK)?;
        }
        take(size.saturating_sub(IDENTITY_EDGE), IDENTITY_EDGE)?;
        Ok(BaseImage {
            path: path.to_path_buf(),
            size,
            mtime_ns,
            sample_crc: crc,
        })
    }

    /// What differs between this recorded identity and the image's now,
    /// if anything.
    pub fn changed(&self) -> Option<String> {
        let now = match BaseImage::of(&self.path) {
            Ok(n) => n,
            Err(e) => return Some(format!("it cannot be read: {e}")),
        };
        if now.size != self.size {
            return Some(format!(
                "its size is {} bytes, the checkpoint recorded {}",
                now.size, self.size
            ));
        }
        if now.mtime_ns != self.mtime_ns {
            return Some(
                "it was modified after the checkpoint recorded it (its mtime changed)".into(),
            );
        }
        if now.sample_crc != self.sample_crc {
            return Some(
                "its content differs from what the checkpoint recorded (sampled checksum)".into(),
            );
        }
        None
    }
}

/// Bytes buffered before one large sequential write: big enough that the
/// syscall cost vanishes next to the copy, small enough to stay in cache.
const WRITE_BUFFER_LEN: usize = 8 << 20;
/// Runs of non-zero pages at least this long are written straight from the
/// caller's memory instead of being copied into the buffer first.
const DIRECT_WRITE_MIN: usize = 1 << 20;
/// Written bytes after which writeback to disk is started (see
/// `CheckpointWriter::start_writeback`).
const WRITEBACK_CHUNK: u64 = 8 << 20;
/// File mode of checkpoint files: they hold guest memory, which is private.
const CHECKPOINT_FILE_MODE: u32 = 0o600;

/// Full or incremental: the API's `CheckpointKind`, one byte on disk.
pub use crate::api::checkpoint::CheckpointKind as Kind;

fn kind_to_byte(k: Kind) -> u8 {
    match k {
        Kind::Full => 0,
        Kind::Incremental => 1,
    }
}

fn kind_from_byte(b: u8) -> Option<Kind> {
    match b {
        0 => Some(Kind::Full),
        1 => Some(Kind::Incremental),
        _ => None,
    }
}

/// Identity of a checkpoint file and its place in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Random id shared by every file of one chain (never 0).
    pub chain_id: u64,
    /// Checkpoint id, unique in its directory, from 1 up.
    pub id: u32,
    /// Id of the parent checkpoint; `None` exactly for full checkpoints.
    pub parent: Option<u32>,
    /// Full or incremental.
    pub kind: Kind,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Disk blocks the file stores (records in disk spaces): what
    /// `checkpoints` lists without reading the index. Set by the writer.
    pub disk_blocks: u64,
}

impl Header {
    /// The header of a new full checkpoint: starts a new chain (fresh random
    /// chain id), created now.
    pub fn full(id: u32) -> Header {
        Header {
            chain_id: new_chain_id(),
            id,
            parent: None,
            kind: Kind::Full,
            created_unix_ms: now_unix_ms(),
            disk_blocks: 0,
        }
    }

    /// The header of a new incremental checkpoint on top of `parent` in the
    /// chain `chain_id`, created now.
    pub fn incremental(chain_id: u64, id: u32, parent: u32) -> Header {
        Header {
            chain_id,
            id,
            parent: Some(parent),
            kind: Kind::Incremental,
            created_unix_ms: now_unix_ms(),
            disk_blocks: 0,
        }
    }

    /// Why this header cannot describe a checkpoint, if it cannot.
    fn invalid_reason(&self) -> Option<String> {
        if self.id == 0 {
            return Some("checkpoint id 0 is reserved".into());
        }
        if self.chain_id == 0 {
            return Some("chain id 0 is reserved".into());
        }
        match (self.kind, self.parent) {
            (Kind::Full, Some(p)) => Some(format!("full checkpoint names a parent ({p})")),
            (Kind::Incremental, None) => Some("incremental checkpoint without a parent".into()),
            (Kind::Incremental, Some(p)) if p == 0 || p >= self.id => Some(format!(
                "incremental checkpoint {} names parent {p}, which is not an earlier id",
                self.id
            )),
            _ => None,
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(PAGE_SIZE as usize as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.chain_id.to_le_bytes());
        b[24..28].copy_from_slice(&self.id.to_le_bytes());
        b[28..32].copy_from_slice(&self.parent.unwrap_or(0).to_le_bytes());
        b[32] = kind_to_byte(self.kind);
        b[40..48].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        b[48..56].copy_from_slice(&self.disk_blocks.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_LEN - 4]);
        b[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks the header at the start of `bytes` (the file is
    /// `len` bytes long); `bytes` may be shorter than the header.
    fn decode(path: &Path, bytes: &[u8], len: u64) -> Result<Header, FormatError> {
        let truncated = |detail: &str| FormatError::Truncated {
            path: path.to_path_buf(),
            len,
            detail: detail.to_string(),
        };
        if bytes.len() < MAGIC.len() {
            // Too short to tell; a prefix of the magic is most likely a cut file.
            if MAGIC.starts_with(bytes) {
                return Err(truncated("the file ends inside the header"));
            }
            return Err(FormatError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        if bytes[0..8] != MAGIC {
            return Err(FormatError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        if bytes.len() < 12 {
            return Err(truncated("the file ends inside the header"));
        }
        // The version is checked before the crc: a later version may lay the
        // rest of the header out differently, but keeps magic and version.
        let version = le_u32(&bytes[8..12]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(truncated("the file ends inside the header"));
        }
        let stored_crc = le_u32(&bytes[HEADER_LEN - 4..HEADER_LEN]);
        if crc32c::crc32c(&bytes[..HEADER_LEN - 4]) != stored_crc {
            return Err(FormatError::Checksum {
                path: path.to_path_buf(),
                section: "header".into(),
            });
        }
        let corrupt = |reason: String| FormatError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let page_size = le_u32(&bytes[12..16]);
        if page_size as usize != PAGE_SIZE as usize {
            return Err(corrupt(format!(
                "page size {page_size} (only {PAGE_SIZE} is supported)"
            )));
        }
        let kind = kind_from_byte(bytes[32])
            .ok_or_else(|| corrupt(format!("unknown checkpoint kind {}", bytes[32])))?;
        let parent = le_u32(&bytes[28..32]);
        let header = Header {
            chain_id: le_u64(&bytes[16..24]),
            id: le_u32(&bytes[24..28]),
            parent: (parent != 0).then_some(parent),
            kind,
            created_unix_ms: le_u64(&bytes[40..48]),
            disk_blocks: le_u64(&bytes[48..56]),
        };
        if let Some(reason) = header.invalid_reason() {
            return Err(corrupt(format!("inconsistent header: {reason}")));
        }
        Ok(header)
    }
}

impl crate::api::Classify for FormatError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            FormatError::Io { source, .. } => ErrorKind::of_io(source),
            FormatError::NoSpace { .. } => ErrorKind::Unusable,
            FormatError::BadMagic { .. }
            | FormatError::UnsupportedVersion { .. }
            | FormatError::Checksum { .. }
            | FormatError::Truncated { .. }
            | FormatError::Corrupt { .. }
            | FormatError::Layout { .. }
            | FormatError::Index { .. } => ErrorKind::Unusable,
            FormatError::AlreadyExists { .. } => ErrorKind::Conflict,
            FormatError::InvalidArgument { .. } | FormatError::Poisoned { .. } => ErrorKind::Failed,
        }
    }
}

/// Everything that can go wrong writing or reading a checkpoint file. Every
/// variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A system call on the file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The file (or directory) concerned.
        path: PathBuf,
        /// What vmhop was doing, e.g. "writing".
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file system is full (ENOSPC or EDQUOT).
    #[error(
        "{op} {path}: no space left on device (the disk is full); the checkpoint was not completed"
    )]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// What vmhop was doing, e.g. "writing".
        op: &'static str,
    },
    /// The file does not start with the checkpoint magic.
    #[error("{path}: not a vmhop checkpoint file (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a format version this vmhop cannot read.
    #[error("{path}: checkpoint format version {found} is not supported (this vmhop reads version {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the file.
        found: u32,
    },
    /// A section's bytes do not match their checksum.
    #[error("{path}: checksum mismatch in the {section} (the file is corrupted)")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Which section, e.g. "index" or "page at gpa 0x1000".
        section: String,
    },
    /// The file is shorter than its structure requires.
    #[error("{path}: truncated checkpoint file ({len} bytes): {detail}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
        /// What is missing.
        detail: String,
    },
    /// The footer's sections do not tile the file.
    #[error("{path}: corrupt checkpoint file: {source}")]
    Layout {
        /// The file.
        path: PathBuf,
        /// How they do not.
        #[source]
        source: LayoutError,
    },
    /// The index's checksum holds but its runs are impossible.
    #[error("{path}: corrupt checkpoint file: {source}")]
    Index {
        /// The file.
        path: PathBuf,
        /// What is wrong with the index.
        #[source]
        source: IndexError,
    },
    /// The checksums hold but the content is inconsistent.
    #[error("{path}: corrupt checkpoint file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is inconsistent.
        reason: String,
    },
    /// A checkpoint with this id is already in the directory.
    #[error("{path}: a checkpoint with this id already exists")]
    AlreadyExists {
        /// The final file name that is taken.
        path: PathBuf,
    },
    /// The caller passed something the format cannot represent.
    #[error("{path}: invalid request: {reason}")]
    InvalidArgument {
        /// The file being written or read.
        path: PathBuf,
        /// What is wrong with the request.
        reason: String,
    },
    /// An earlier write to this file failed, so it cannot be completed.
    #[error("{path}: an earlier write to this checkpoint failed; it cannot be completed")]
    Poisoned {
        /// The temp file being written.
        path: PathBuf,
    },
}

/// Maps an OS error to a `FormatError`, singling out a full disk so the user
/// reads "the disk is full" rather than an errno.
fn io_error(path: &Path, op: &'static str, source: io::Error) -> FormatError {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => FormatError::NoSpace {
            path: path.to_path_buf(),
            op,
        },
        _ => FormatError::Io {
            path: path.to_path_buf(),
            op,
            source,
        },
    }
}

/// The name of checkpoint `id`'s file in its directory.
pub fn checkpoint_file_name(id: u32) -> String {
    format!("ckpt-{id:06}.vmhop")
}

/// The name of the temp file checkpoint `id` is written to before it is
/// complete. Hidden, and not matching [`parse_checkpoint_file_name`].
pub fn temp_file_name(id: u32) -> String {
    format!(".ckpt-{id:06}.tmp")
}

/// The id of a complete checkpoint file name, or `None` for any other name
/// (temp files, non-canonical spellings such as `ckpt-1.vmhop`).
pub fn parse_checkpoint_file_name(name: &std::ffi::OsStr) -> Option<u32> {
    let name = std::str::from_utf8(name.as_bytes()).ok()?;
    let digits = name.strip_prefix("ckpt-")?.strip_suffix(".vmhop")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id: u32 = digits.parse().ok()?;
    // Only the canonical spelling counts, so one id maps to one file.
    (id != 0 && checkpoint_file_name(id) == name).then_some(id)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh random, non-zero chain id.
pub fn new_chain_id() -> u64 {
    loop {
        let mut buf = [0u8; 8];
        // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`,
        // which is a valid, exclusively borrowed buffer of that length.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        let id = if n == buf.len() as isize {
            u64::from_le_bytes(buf)
        } else {
            // getrandom cannot fail for 8 bytes on a booted system; should it,
            // time and pid still make collisions in one directory unlikely.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15
        };
        if id != 0 {
            return id;
        }
    }
}

/// Checks a page-granular request before anything is written.
fn check_pages_request(path: &Path, gpa: u64, len: usize) -> Result<(), FormatError> {
    let invalid = |reason: String| FormatError::InvalidArgument {
        path: path.to_path_buf(),
        reason,
    };
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return Err(invalid(format!("gpa {gpa:#x} is not page-aligned")));
    }
    if !len.is_multiple_of(PAGE_SIZE as usize) {
        return Err(invalid(format!(
            "page data of {len} bytes is not a multiple of {PAGE_SIZE}"
        )));
    }
    if gpa.checked_add(len as u64).is_none() {
        return Err(invalid(format!(
            "{len} bytes at gpa {gpa:#x} overflow the address space"
        )));
    }
    Ok(())
}

/// Writes one checkpoint file. Data goes to a hidden temp file in the
/// directory; [`CheckpointWriter::finish`] makes it visible under its final
/// name only once it is complete and on disk. Dropping an unfinished writer
/// removes the temp file.
pub struct CheckpointWriter {
    header: Header,
    tmp_path: PathBuf,
    final_path: PathBuf,
    dir: PathBuf,
    file: File,
    /// Bytes not yet written; they belong at `file_pos`.
    buf: Vec<u8>,
    /// Bytes of the file written so far (everything before `buf`).
    file_pos: u64,
    /// Bytes of the file whose writeback has been started.
    writeback_pos: u64,
    /// Logical end of the page records: `file_pos + buf.len()` between calls.
    data_end: u64,
    /// Index entries in the order pages were added (duplicates included).
    entries: Vec<IndexEntry>,
    /// Highest gpa stored with data so far: a zero page above it cannot
    /// supersede anything, so a full checkpoint need not remember it.
    max_data_gpa: Option<u64>,
    zero_adds: u64,
    /// Where each page already stored with data sits: a newer version of it
    /// (a page the guest dirtied again during pre-copy) overwrites that
    /// slot, so the file holds each page at most once.
    slots: std::collections::HashMap<u64, u64>,
    config: Vec<u8>,
    state: Vec<u8>,
    disks: Vec<DiskRecord>,
    poisoned: bool,
    /// Set once the file has its final name, so Drop leaves it alone.
    done: bool,
}

impl fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("header", &self.header)
            .field("tmp_path", &self.tmp_path)
            .field("data_end", &self.data_end)
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// What [`CheckpointWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenCheckpoint {
    /// Final path of the checkpoint file.
    pub path: PathBuf,
    /// Checkpoint id.
    pub id: u32,
    /// Size of the file in bytes.
    pub bytes_written: u64,
    /// Distinct non-zero pages stored (pages superseded in the same file
    /// are not counted).
    pub pages_written: u64,
    /// Zero pages not stored as data: in a full checkpoint the number of
    /// zero pages added (and skipped); in an incremental the number of zero
    /// entries in the index.
    pub zero_pages: u64,
    /// Disk blocks stored with data.
    pub disk_blocks: u64,
    /// Disk blocks recorded as zero extents.
    pub disk_zero_blocks: u64,
}

/// Why a disks table is not one, if it is not: spaces must be 1, 2, ... in
/// order, ids distinct.
fn check_disk_table(disks: &[DiskRecord]) -> Result<(), String> {
    for (i, d) in disks.iter().enumerate() {
        if d.space != i as u64 + 1 {
            return Err(format!(
                "disk {} of the disks table has space {}, expected {}",
                d.id,
                d.space,
                i + 1
            ));
        }
        if disks[..i].iter().any(|o| o.id == d.id) {
            return Err(format!("disk id {} appears twice in the disks table", d.id));
        }
        if d.size >= 1 << SPACE_SHIFT {
            return Err(format!(
                "disk {} is {} bytes, more than an address space holds",
                d.id, d.size
            ));
        }
    }
    Ok(())
}

/// Whether the block at `addr` (a disk space) lies inside its disk.
fn disk_block_fits(disks: &[DiskRecord], addr: u64) -> bool {
    let space = space_of(addr);
    let offset = addr & ((1 << SPACE_SHIFT) - 1);
    disks
        .get((space as usize).wrapping_sub(1))
        .is_some_and(|d| offset < d.size)
}

impl CheckpointWriter {
    /// Starts checkpoint `header.id` in `dir` (which must exist). Fails if
    /// the header is inconsistent or a checkpoint with that id is already
    /// there. A stale temp file of the same id (from a crash) is replaced.
    pub fn create(dir: &Path, header: Header) -> Result<Self, FormatError> {
        let final_path = dir.join(checkpoint_file_name(header.id));
        let tmp_path = dir.join(temp_file_name(header.id));
        if let Some(reason) = header.invalid_reason() {
            return Err(FormatError::InvalidArgument {
                path: final_path,
                reason,
            });
        }
        if final_path.exists() {
            return Err(FormatError::AlreadyExists { path: final_path });
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(CHECKPOINT_FILE_MODE)
            .open(&tmp_path)
            .map_err(|e| io_error(&tmp_path, "creating", e))?;
        let mut buf = Vec::with_capacity(WRITE_BUFFER_LEN);
        buf.extend_from_slice(&header.encode());
        buf.resize(HEADER_BLOCK_LEN, 0);
        Ok(CheckpointWriter {
            header,
            final_path,
            tmp_path,
            dir: dir.to_path_buf(),
            file,
            buf,
            file_pos: 0,
            writeback_pos: 0,
            data_end: HEADER_BLOCK_LEN as u64,
            entries: Vec::new(),
            max_data_gpa: None,
            zero_adds: 0,
            slots: std::collections::HashMap::new(),
            config: Vec::new(),
            state: Vec::new(),
            disks: Vec::new(),
            poisoned: false,
            done: false,
        })
    }

    /// The header this checkpoint is written with.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Sets the `config` section (opaque to this module). May be called any
    /// time before `finish`; the last call wins.
    pub fn set_config(&mut self, bytes: &[u8]) {
        self.config = bytes.to_vec();
    }

    /// Sets the `state` section (opaque to this module). May be called any
    /// time before `finish`; the last call wins.
    pub fn set_state(&mut self, bytes: &[u8]) {
        self.state = bytes.to_vec();
    }

    /// Sets the `disks` table: disk `i` (space `i + 1`) is `disks[i]`,
    /// whose `space` must say so. May be called any time before `finish`.
    pub fn set_disks(&mut self, disks: Vec<DiskRecord>) {
        self.disks = disks;
    }

    /// Appends one page (`data.len() == PAGE_SIZE`). Zero pages are skipped
    /// in a full checkpoint and recorded as zero entries in an incremental.
    /// Adding a page again supersedes the earlier version. Returns the bytes
    /// written to the file for it (0 for a zero page).
    pub fn add_page(&mut self, gpa: u64, data: &[u8]) -> Result<u64, FormatError> {
        if data.len() != PAGE_SIZE as usize {
            return Err(FormatError::InvalidArgument {
                path: self.tmp_path.clone(),
                reason: format!("a page must be {PAGE_SIZE} bytes, got {}", data.len()),
            });
        }
        self.add_pages(gpa, data)
    }

    /// Appends the contiguous pages starting at `gpa` (`data.len()` a
    /// multiple of `PAGE_SIZE`), with the same rules as `add_page`. The fast
    /// path: long runs of non-zero pages go to the file without a copy.
    pub fn add_pages(&mut self, gpa: u64, data: &[u8]) -> Result<u64, FormatError> {
        self.check_usable()?;
        check_pages_request(&self.tmp_path, gpa, data.len())?;
        // The index numbers records with 32 bits.
        let records = (self.data_end - HEADER_BLOCK_LEN as u64) / PAGE_SIZE;
        if records + data.len() as u64 / PAGE_SIZE > MAX_RECORDS {
            return Err(FormatError::InvalidArgument {
                path: self.tmp_path.clone(),
                reason: format!("a checkpoint file holds at most {MAX_RECORDS} page records"),
            });
        }
        let mut written = 0u64;
        let mut run_start: Option<usize> = None;
        for (i, page) in data.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let page_gpa = gpa + i as u64 * PAGE_SIZE;
            if is_zero_page(page) {
                if let Some(start) = run_start.take() {
                    written += self.emit(&data[start..i * PAGE_SIZE as usize])?;
                }
                self.record_zero(page_gpa);
            } else if let Some(&offset) = self.slots.get(&page_gpa) {
                if let Some(start) = run_start.take() {
                    written += self.emit(&data[start..i * PAGE_SIZE as usize])?;
                }
                self.overwrite(offset, page)?;
                written += PAGE_SIZE;
                self.entries.push(IndexEntry {
                    gpa: page_gpa,
                    offset,
                    crc: crc32c::crc32c(page),
                    zero: false,
                });
            } else {
                run_start.get_or_insert(i * PAGE_SIZE as usize);
                self.slots.insert(page_gpa, self.data_end);
                self.entries.push(IndexEntry {
                    gpa: page_gpa,
                    offset: self.data_end,
                    crc: crc32c::crc32c(page),
                    zero: false,
                });
                self.data_end += PAGE_SIZE;
                self.max_data_gpa = Some(self.max_data_gpa.map_or(page_gpa, |m| m.max(page_gpa)));
            }
        }
        if let Some(start) = run_start {
            written += self.emit(&data[start..])?;
        }
        Ok(written)
    }

    fn record_zero(&mut self, gpa: u64) {
        self.zero_adds += 1;
        let may_supersede = self.max_data_gpa.is_some_and(|m| gpa <= m);
        // A disk block that reads as zeros hides its base image's block,
        // even in a full checkpoint: it is a zero extent, never left out.
        if self.header.kind == Kind::Incremental || may_supersede || space_of(gpa) > 0 {
            self.entries.push(IndexEntry {
                gpa,
                offset: 0,
                crc: 0,
                zero: true,
            });
        }
    }

    fn check_usable(&self) -> Result<(), FormatError> {
        if self.poisoned {
            return Err(FormatError::Poisoned {
                path: self.tmp_path.clone(),
            });
        }
        Ok(())
    }

    /// Queues `bytes` for the file (they have already been given offsets).
    fn emit(&mut self, bytes: &[u8]) -> Result<u64, FormatError> {
        if bytes.len() >= DIRECT_WRITE_MIN {
            self.flush()?;
            self.write_at_end(bytes)?;
        } else {
            if self.buf.len() + bytes.len() > WRITE_BUFFER_LEN {
                self.flush()?;
            }
            self.buf.extend_from_slice(bytes);
        }
        Ok(bytes.len() as u64)
    }

    fn flush(&mut self) -> Result<(), FormatError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let result = self.write_at_end(&buf);
        self.buf = buf;
        self.buf.clear();
        result
    }

    /// Replaces the page stored at `offset` (still in the buffer, or
    /// already in the file).
    fn overwrite(&mut self, offset: u64, page: &[u8]) -> Result<(), FormatError> {
        if offset >= self.file_pos {
            let i = (offset - self.file_pos) as usize;
            self.buf[i..i + PAGE_SIZE as usize].copy_from_slice(page);
            return Ok(());
        }
        if let Err(e) = self.file.write_all_at(page, offset) {
            self.poisoned = true;
            return Err(io_error(&self.tmp_path, "writing", e));
        }
        Ok(())
    }

    fn write_at_end(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        if let Err(e) = self.file.write_all_at(bytes, self.file_pos) {
            self.poisoned = true;
            return Err(io_error(&self.tmp_path, "writing", e));
        }
        self.file_pos += bytes.len() as u64;
        self.start_writeback();
        Ok(())
    }

    /// Asks the kernel to start writing out what has been written so far,
    /// so the disk works while the caller produces the next pages and the
    /// fsync in `finish` has little left to do. Only a hint: errors are
    /// ignored here and reported by that fsync.
    fn start_writeback(&mut self) {
        if self.file_pos - self.writeback_pos < WRITEBACK_CHUNK {
            return;
        }
        use std::os::fd::AsRawFd;
        let len = self.file_pos - self.writeback_pos;
        // SAFETY: sync_file_range only reads the descriptor, which `self.file`
        // keeps open, and the range arguments; it touches no user memory.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.writeback_pos as i64,
                len as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.writeback_pos = self.file_pos;
    }

    /// Appends `bytes` through the buffer, folding them into `crc`.
    fn append(&mut self, bytes: &[u8], crc: &mut u32) -> Result<(), FormatError> {
        *crc = crc32c::crc32c_append(*crc, bytes);
        for chunk in bytes.chunks(WRITE_BUFFER_LEN) {
            if self.buf.len() + chunk.len() > WRITE_BUFFER_LEN {
                self.flush()?;
            }
            self.buf.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// Writes the index and footer, fsyncs the file, renames it to its final
    /// name and fsyncs the directory. On error the temp file is removed and
    /// no checkpoint becomes visible (unless only the directory fsync
    /// failed, after the rename).
    pub fn finish(mut self) -> Result<WrittenCheckpoint, FormatError> {
        let result = self.finish_inner();
        if result.is_ok() {
            self.done = true;
        }
        result
    }

    fn finish_inner(&mut self) -> Result<WrittenCheckpoint, FormatError> {
        self.check_usable()?;
        // Last version wins: a stable sort keeps the add order among equal
        // gpas, and dedup then keeps the last of each run.
        let mut entries = std::mem::take(&mut self.entries);
        entries.sort_by_key(|e| e.gpa);
        entries.dedup_by(|later, kept| {
            if later.gpa == kept.gpa {
                *kept = *later;
                true
            } else {
                false
            }
        });
        if self.header.kind == Kind::Full {
            entries.retain(|e| !e.zero || space_of(e.gpa) > 0);
        }
        let memory = entries.partition_point(|e| space_of(e.gpa) == 0);
        let pages_written = entries[..memory].iter().filter(|e| !e.zero).count() as u64;
        let disk_blocks = entries[memory..].iter().filter(|e| !e.zero).count() as u64;
        let disk_zero_blocks = (entries.len() - memory) as u64 - disk_blocks;
        let zero_pages = match self.header.kind {
            Kind::Full => self.zero_adds - disk_zero_blocks.min(self.zero_adds),
            Kind::Incremental => memory as u64 - pages_written,
        };
        self.check_disks(&entries[memory..])?;
        self.header.disk_blocks = disk_blocks;

        let pages_offset = HEADER_BLOCK_LEN as u64;
        let pages_len = self.data_end - pages_offset;
        let config = std::mem::take(&mut self.config);
        let state = std::mem::take(&mut self.state);
        let config_offset = self.data_end;
        let mut config_crc = 0;
        self.append(&config, &mut config_crc)?;
        let state_offset = config_offset + config.len() as u64;
        let mut state_crc = 0;
        self.append(&state, &mut state_crc)?;
        let disks = match self.disks.is_empty() {
            true => Vec::new(),
            false => serde_json::to_vec(&self.disks).map_err(|e| FormatError::InvalidArgument {
                path: self.tmp_path.clone(),
                reason: format!("the disks table does not serialize: {e}"),
            })?,
        };
        let disks_offset = state_offset + state.len() as u64;
        let mut disks_crc = 0;
        self.append(&disks, &mut disks_crc)?;
        let index_offset = disks_offset + disks.len() as u64;
        let mut index_crc = 0;
        let (index, index_runs) = Index::encode(&entries, pages_offset);
        self.append(&index, &mut index_crc)?;
        let index_len = index.len() as u64;
        let file_len = index_offset + index_len + FOOTER_LEN as u64;
        let footer = Footer {
            chain_id: self.header.chain_id,
            id: self.header.id,
            file_len,
            pages: Section {
                offset: pages_offset,
                len: pages_len,
            },
            config: Section {
                offset: config_offset,
                len: config.len() as u64,
            },
            state: Section {
                offset: state_offset,
                len: state.len() as u64,
            },
            disks: Section {
                offset: disks_offset,
                len: disks.len() as u64,
            },
            index: Section {
                offset: index_offset,
                len: index_len,
            },
            index_runs,
            config_crc,
            state_crc,
            disks_crc,
            index_crc,
        };
        let mut ignored = 0;
        self.append(&footer.encode(), &mut ignored)?;
        self.flush()?;
        debug_assert_eq!(self.file_pos, file_len);
        // The header, rewritten with what only the end knows.
        if let Err(e) = self.file.write_all_at(&self.header.encode(), 0) {
            self.poisoned = true;
            return Err(io_error(&self.tmp_path, "writing", e));
        }

        self.file
            .sync_all()
            .map_err(|e| io_error(&self.tmp_path, "fsyncing", e))?;
        rename_no_replace(&self.tmp_path, &self.final_path)?;
        // From here the file has its final name: never remove it.
        self.done = true;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(&self.dir, "fsyncing directory", e))?;
        Ok(WrittenCheckpoint {
            path: self.final_path.clone(),
            id: self.header.id,
            bytes_written: file_len,
            pages_written,
            zero_pages,
            disk_blocks,
            disk_zero_blocks,
        })
    }

    /// Checks the disks table and that every disk block added lies in one
    /// of its disks.
    fn check_disks(&self, entries: &[IndexEntry]) -> Result<(), FormatError> {
        let invalid = |reason: String| FormatError::InvalidArgument {
            path: self.tmp_path.clone(),
            reason,
        };
        check_disk_table(&self.disks).map_err(invalid)?;
        if let Some(e) = entries
            .iter()
            .find(|e| !disk_block_fits(&self.disks, e.gpa))
        {
            return Err(invalid(format!(
                "a disk block at address {:#x} is in no disk of the table",
                e.gpa
            )));
        }
        Ok(())
    }

    /// Abandons the checkpoint and removes its temp file.
    pub fn abort(self) {
        // Drop does the work.
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = std::fs::remove_file(&self.tmp_path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(
                        "removing unfinished checkpoint {}: {e}",
                        self.tmp_path.display()
                    );
                }
            }
        }
    }
}

/// Renames `from` to `to` unless `to` exists, so two writers of the same id
/// can never overwrite a complete checkpoint.
fn rename_no_replace(from: &Path, to: &Path) -> Result<(), FormatError> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| FormatError::InvalidArgument {
            path: p.to_path_buf(),
            reason: "path contains a NUL byte".into(),
        })
    };
    let (cfrom, cto) = (c(from)?, c(to)?);
    // SAFETY: both arguments are valid NUL-terminated strings that outlive
    // the call; renameat2 does not keep them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Err(FormatError::AlreadyExists {
            path: to.to_path_buf(),
        }),
        // File systems without RENAME_NOREPLACE: check, then rename.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if to.exists() {
                return Err(FormatError::AlreadyExists {
                    path: to.to_path_buf(),
                });
            }
            std::fs::rename(from, to).map_err(|e| io_error(to, "renaming into place", e))
        }
        _ => Err(io_error(to, "renaming into place", err)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footer {
    chain_id: u64,
    id: u32,
    file_len: u64,
    pages: Section,
    config: Section,
    state: Section,
    disks: Section,
    index: Section,
    /// Runs at the start of the index section; page crcs follow them.
    index_runs: u64,
    config_crc: u32,
    state_crc: u32,
    disks_crc: u32,
    index_crc: u32,
}

impl Footer {
    fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&self.chain_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.file_len.to_le_bytes());
        let sections = [self.pages, self.config, self.state, self.disks, self.index];
        for (i, s) in sections.iter().enumerate() {
            let at = 24 + i * 16;
            b[at..at + 8].copy_from_slice(&s.offset.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.len.to_le_bytes());
        }
        b[104..112].copy_from_slice(&self.index_runs.to_le_bytes());
        b[112..116].copy_from_slice(&self.config_crc.to_le_bytes());
        b[116..120].copy_from_slice(&self.state_crc.to_le_bytes());
        b[120..124].copy_from_slice(&self.disks_crc.to_le_bytes());
        b[124..128].copy_from_slice(&self.index_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..FOOTER_CRC_AT]);
        b[FOOTER_CRC_AT..FOOTER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b[FOOTER_LEN - 8..].copy_from_slice(&TRAILER_MAGIC);
        b
    }

    /// Decodes the footer; `None` if its crc does not match.
    fn decode(b: &[u8; FOOTER_LEN]) -> Option<Footer> {
        if crc32c::crc32c(&b[..FOOTER_CRC_AT]) != le_u32(&b[FOOTER_CRC_AT..FOOTER_CRC_AT + 4]) {
            return None;
        }
        let section = |i: usize| {
            let at = 24 + i * 16;
            Section {
                offset: le_u64(&b[at..at + 8]),
                len: le_u64(&b[at + 8..at + 16]),
            }
        };
        Some(Footer {
            chain_id: le_u64(&b[0..8]),
            id: le_u32(&b[8..12]),
            file_len: le_u64(&b[16..24]),
            pages: section(0),
            config: section(1),
            state: section(2),
            disks: section(3),
            index: section(4),
            index_runs: le_u64(&b[104..112]),
            config_crc: le_u32(&b[112..116]),
            state_crc: le_u32(&b[116..120]),
            disks_crc: le_u32(&b[120..124]),
            index_crc: le_u32(&b[124..128]),
        })
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Reads the header of a checkpoint file without validating the rest:
/// enough to list a directory.
pub fn read_header(path: &Path) -> Result<Header, FormatError> {
    let file = File::open(path).map_err(|e| io_error(path, "opening", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_error(path, "reading metadata of", e))?
        .len();
    read_header_from(&file, path, len).map(|(h, _)| h)
}

/// Reads and checks the header block; returns the header and the block.
fn read_header_from(file: &File, path: &Path, len: u64) -> Result<(Header, Vec<u8>), FormatError> {
    let mut block = vec![0u8; len.min(HEADER_BLOCK_LEN as u64) as usize];
    file.read_exact_at(&mut block, 0)
        .map_err(|e| read_error(path, len, e))?;
    let header = Header::decode(path, &block, len)?;
    if block.len() < HEADER_BLOCK_LEN {
        return Err(FormatError::Truncated {
            path: path.to_path_buf(),
            len,
            detail: "the file ends inside the header block".into(),
        });
    }
    Ok((header, block))
}

/// A read that hits the end of the file means the file shrank or lies
/// about its size: report it as truncation, not as an OS error.
fn read_error(path: &Path, len: u64, e: io::Error) -> FormatError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FormatError::Truncated {
            path: path.to_path_buf(),
            len,
            detail: "the file ended while reading it".into(),
        }
    } else {
        io_error(path, "reading", e)
    }
}

/// An open, validated checkpoint file. Opening checks the header, footer
/// and the `config`, `state` and `index` sections against their checksums;
/// page data is read (and checked) only on demand.
pub struct CheckpointReader {
    path: PathBuf,
    file: File,
    header: Header,
    file_len: u64,
    pages: Section,
    config: Vec<u8>,
    state: Vec<u8>,
    disks: Vec<DiskRecord>,
    index: Index,
}

impl fmt::Debug for CheckpointReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointReader")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("file_len", &self.file_len)
            .field("index", &self.index.len())
            .finish_non_exhaustive()
    }
}

/// A checkpoint file whose header, footer and layout have been checked;
/// its sections not yet read.
struct Framed {
    file: File,
    file_len: u64,
    header: Header,
    footer: Footer,
}

impl Framed {
    /// Opens `path` and checks its header, footer and section layout.
    fn open(path: &Path) -> Result<Framed, FormatError> {
        let file = File::open(path).map_err(|e| io_error(path, "opening", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| io_error(path, "reading metadata of", e))?
            .len();
        let (header, block) = read_header_from(&file, path, file_len)?;
        let corrupt = |reason: String| FormatError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if block[HEADER_LEN..].iter().any(|&b| b != 0) {
            return Err(corrupt("non-zero bytes in the header padding".into()));
        }
        let min_len = (HEADER_BLOCK_LEN + FOOTER_LEN) as u64;
        if file_len < min_len {
            return Err(FormatError::Truncated {
                path: path.to_path_buf(),
                len: file_len,
                detail: format!("a checkpoint file is at least {min_len} bytes"),
            });
        }

        let mut fb = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut fb, file_len - FOOTER_LEN as u64)
            .map_err(|e| read_error(path, file_len, e))?;
        if fb[FOOTER_LEN - 8..] != TRAILER_MAGIC {
            return Err(FormatError::Truncated {
                path: path.to_path_buf(),
                len: file_len,
                detail: "no footer at the end of the file (cut short, or never completed)".into(),
            });
        }
        let footer = Footer::decode(&fb).ok_or_else(|| FormatError::Checksum {
            path: path.to_path_buf(),
            section: "footer".into(),
        })?;
        if footer.file_len != file_len {
            return Err(corrupt(format!(
                "the footer records a length of {} bytes but the file has {file_len}",
                footer.file_len
            )));
        }
        if footer.chain_id != header.chain_id || footer.id != header.id {
            return Err(corrupt(format!(
                "the footer belongs to checkpoint {} of chain {:#x}, the header to checkpoint {} of chain {:#x}",
                footer.id, footer.chain_id, header.id, header.chain_id
            )));
        }
        check_layout(&footer).map_err(|source| FormatError::Layout {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Framed {
            file,
            file_len,
            header,
            footer,
        })
    }

    /// Reads and checksums the `config` and `state` sections.
    fn config_state(&self, path: &Path) -> Result<(Vec<u8>, Vec<u8>), FormatError> {
        let f = &self.footer;
        let config = read_section(
            &self.file,
            path,
            self.file_len,
            f.config,
            f.config_crc,
            "config",
        )?;
        let state = read_section(
            &self.file,
            path,
            self.file_len,
            f.state,
            f.state_crc,
            "state",
        )?;
        Ok((config, state))
    }
}

/// The parts of a checkpoint file a VM is built from, checked: the header,
/// footer and layout, and the `config` and `state` sections against their
/// checksums. The index and page data are not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The file's header.
    pub header: Header,
    /// The `config` section.
    pub config: Vec<u8>,
    /// The `state` section.
    pub state: Vec<u8>,
    /// The disks table.
    pub disks: Vec<DiskRecord>,
}

/// Reads and checks the [`Meta`] of `path`: what a restore needs to start
/// creating the VM while [`CheckpointReader::open`] checks the rest.
pub fn read_meta(path: &Path) -> Result<Meta, FormatError> {
    let framed = Framed::open(path)?;
    let (config, state) = framed.config_state(path)?;
    let disks = read_disks(&framed.file, path, framed.file_len, &framed.footer)?;
    Ok(Meta {
        header: framed.header,
        config,
        state,
        disks,
    })
}

impl CheckpointReader {
    /// Opens `path` and validates everything but the page data.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let framed = Framed::open(path)?;
        let (config, state) = framed.config_state(path)?;
        let Framed {
            file,
            file_len,
            header,
            footer,
        } = framed;
        let disks = read_disks(&file, path, file_len, &footer)?;
        let index = read_index(&file, path, file_len, &footer, header.kind)?;
        let corrupt = |reason: String| FormatError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        for (start, end) in index.spans() {
            if space_of(start) == 0 && space_of(end - 1) == 0 {
                continue;
            }
            if space_of(start) != space_of(end - 1)
                || !disk_block_fits(&disks, start)
                || !disk_block_fits(&disks, end - 1)
            {
                return Err(corrupt(format!(
                    "the index has blocks at {start:#x}..{end:#x}, in no disk of the disks table"
                )));
            }
        }
        let stored = index.spans_data_blocks(1 << SPACE_SHIFT);
        if stored != header.disk_blocks {
            return Err(corrupt(format!(
                "the header counts {} disk blocks, the index holds {stored}",
                header.disk_blocks
            )));
        }

        Ok(CheckpointReader {
            path: path.to_path_buf(),
            file,
            header,
            file_len,
            pages: footer.pages,
            config,
            state,
            disks,
            index,
        })
    }

    /// The disks table: disk `i` (space `i + 1`) is entry `i`.
    pub fn disks(&self) -> &[DiskRecord] {
        &self.disks
    }

    /// The file's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `config` section.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// The `state` section.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The open file, e.g. to mmap page data for a lazy restore: every
    /// non-zero entry's `offset` is page-aligned. Data read this way is not
    /// checked against its crc.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Index entries with page data (not zero pages).
    pub fn data_entries(&self) -> u64 {
        self.index.data_pages()
    }

    /// The page index: an entry per page, sorted by gpa.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Reads one page into `buf` (`PAGE_SIZE` bytes) and verifies its crc;
    /// a zero entry fills zeros. Uses pread, so readers can be shared
    /// between threads.
    pub fn read_page(&self, entry: &IndexEntry, buf: &mut [u8]) -> Result<(), FormatError> {
        self.read_pages(std::slice::from_ref(entry), buf)
    }

    /// Reads the pages of `entries` into consecutive `PAGE_SIZE` slots of
    /// `out` (`entries.len() * PAGE_SIZE` bytes), verifying each crc. Pages
    /// that follow each other in the file are read with one pread.
    pub fn read_pages(&self, entries: &[IndexEntry], out: &mut [u8]) -> Result<(), FormatError> {
        if out.len() != entries.len() * PAGE_SIZE as usize {
            return Err(FormatError::InvalidArgument {
                path: self.path.clone(),
                reason: format!("buffer of {} bytes for {} pages", out.len(), entries.len()),
            });
        }
        let pages_end = self.pages.offset + self.pages.len;
        for e in entries {
            let in_range = e.offset >= self.pages.offset
                && e.offset < pages_end
                && (e.offset - self.pages.offset).is_multiple_of(PAGE_SIZE);
            if !e.zero && !in_range {
                return Err(FormatError::InvalidArgument {
                    path: self.path.clone(),
                    reason: format!(
                        "index entry for gpa {:#x} points at offset {:#x}, outside the page data",
                        e.gpa, e.offset
                    ),
                });
            }
        }
        let mut i = 0;
        while i < entries.len() {
            if entries[i].zero {
                out[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize].fill(0);
                i += 1;
                continue;
            }
            // Extend the run while the next page follows in the file.
            let mut j = i + 1;
            while j < entries.len()
                && !entries[j].zero
                && entries[j].offset == entries[j - 1].offset + PAGE_SIZE
            {
                j += 1;
            }
            let dst = &mut out[i * PAGE_SIZE as usize..j * PAGE_SIZE as usize];
            self.file
                .read_exact_at(dst, entries[i].offset)
                .map_err(|e| read_error(&self.path, self.file_len, e))?;
            for (k, page) in dst.chunks_exact(PAGE_SIZE as usize).enumerate() {
                let e = &entries[i + k];
                if crc32c::crc32c(page) != e.crc {
                    return Err(FormatError::Checksum {
                        path: self.path.clone(),
                        section: format!("page at gpa {:#x} (file offset {:#x})", e.gpa, e.offset),
                    });
                }
            }
            i = j;
        }
        Ok(())
    }
}

/// How a footer's sections fail to tile the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A section does not start where the one before it ends.
    #[error("the {name} section starts at {offset:#x}, expected {expected:#x}")]
    Misplaced {
        /// The section.
        name: &'static str,
        /// Where it starts.
        offset: u64,
        /// Where it should.
        expected: u64,
    },
    /// A section's end does not fit in 64 bits.
    #[error("the {name} section's length {len:#x} overflows")]
    Overflow {
        /// The section.
        name: &'static str,
        /// Its length.
        len: u64,
    },
    /// The sections do not end where the footer starts.
    #[error("the sections end at {end:#x}, but the footer starts at {footer:#x}")]
    Footer {
        /// Where the sections end.
        end: u64,
        /// Where the footer starts.
        footer: u64,
    },
    /// The pages section is not whole pages.
    #[error("the pages section's length {0:#x} is not a multiple of the page size")]
    PagesLength(u64),
    /// The index section is not its runs and whole crcs.
    #[error("the index has {len} bytes, which is not {runs} runs and whole crcs")]
    IndexLength {
        /// Its length.
        len: u64,
        /// The runs the footer says it starts with.
        runs: u64,
    },
}

/// Checks that the sections tile the file exactly: header block, pages,
/// config, state, index, footer, in that order.
fn check_layout(f: &Footer) -> Result<(), LayoutError> {
    let mut expect = HEADER_BLOCK_LEN as u64;
    let named = [
        ("pages", f.pages),
        ("config", f.config),
        ("state", f.state),
        ("disks", f.disks),
        ("index", f.index),
    ];
    for (name, s) in named {
        if s.offset != expect {
            return Err(LayoutError::Misplaced {
                name,
                offset: s.offset,
                expected: expect,
            });
        }
        expect = s.end().ok_or(LayoutError::Overflow { name, len: s.len })?;
    }
    if expect.checked_add(FOOTER_LEN as u64) != Some(f.file_len) {
        return Err(LayoutError::Footer {
            end: expect,
            footer: f.file_len.saturating_sub(FOOTER_LEN as u64),
        });
    }
    if !f.pages.len.is_multiple_of(PAGE_SIZE) {
        return Err(LayoutError::PagesLength(f.pages.len));
    }
    let runs = f.index_runs.checked_mul(RUN_LEN as u64);
    let crcs = runs.and_then(|r| f.index.len.checked_sub(r));
    if !crcs.is_some_and(|c| c.is_multiple_of(CRC_LEN as u64)) {
        return Err(LayoutError::IndexLength {
            len: f.index.len,
            runs: f.index_runs,
        });
    }
    Ok(())
}

fn read_section(
    file: &File,
    path: &Path,
    file_len: u64,
    s: Section,
    crc: u32,
    name: &str,
) -> Result<Vec<u8>, FormatError> {
    // check_layout has bounded the section by the file length, so this
    // allocation is no larger than the file.
    let mut buf = vec![0u8; s.len as usize];
    file.read_exact_at(&mut buf, s.offset)
        .map_err(|e| read_error(path, file_len, e))?;
    if crc32c::crc32c(&buf) != crc {
        return Err(FormatError::Checksum {
            path: path.to_path_buf(),
            section: format!("{name} section"),
        });
    }
    Ok(buf)
}

/// Reads, checksums and parses the `disks` section (empty: no disks).
fn read_disks(
    file: &File,
    path: &Path,
    file_len: u64,
    footer: &Footer,
) -> Result<Vec<DiskRecord>, FormatError> {
    let bytes = read_section(
        file,
        path,
        file_len,
        footer.disks,
        footer.disks_crc,
        "disks",
    )?;
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let corrupt = |reason: String| FormatError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let disks: Vec<DiskRecord> = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(format!("the disks section is not a disks table: {e}")))?;
    check_disk_table(&disks).map_err(corrupt)?;
    Ok(disks)
}

/// Reads the index section (its runs, then its crcs, each straight into
/// its place), checksums it, then checks every run.
fn read_index(
    file: &File,
    path: &Path,
    file_len: u64,
    footer: &Footer,
    kind: Kind,
) -> Result<Index, FormatError> {
    let s = footer.index;
    // check_layout has bounded the section by the file length and split it
    // into whole runs and crcs, so these allocations are no larger than the
    // file.
    let runs_len = (footer.index_runs * RUN_LEN as u64) as usize;
    let mut runs = vec![0u8; runs_len];
    let mut crcs = vec![0u8; s.len as usize - runs_len];
    file.read_exact_at(&mut runs, s.offset)
        .and_then(|()| file.read_exact_at(&mut crcs, s.offset + runs_len as u64))
        .map_err(|e| read_error(path, file_len, e))?;
    // A damaged index is a checksum error first; only a well-summed index
    // with impossible runs is "corrupt".
    if crc32c::crc32c_append(crc32c::crc32c(&runs), &crcs) != footer.index_crc {
        return Err(FormatError::Checksum {
            path: path.to_path_buf(),
            section: "index section".into(),
        });
    }
    Index::decode(&runs, crcs, kind, footer.pages).map_err(|source| FormatError::Index {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A page whose bytes are derived from `seed`, never all zero.
    pub(crate) fn page(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut p = Vec::with_capacity(PAGE_SIZE as usize);
        while p.len() < PAGE_SIZE as usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            p.extend_from_slice(&x.to_le_bytes());
        }
        p
    }

    fn zero() -> Vec<u8> {
        vec![0u8; PAGE_SIZE as usize]
    }

    fn full_header(id: u32) -> Header {
        Header {
            chain_id: 0x1234_5678,
            id,
            parent: None,
            kind: Kind::Full,
            created_unix_ms: 1_700_000_000_000,
            disk_blocks: 0,
        }
    }

    fn read_all(r: &CheckpointReader) -> Vec<(u64, Vec<u8>)> {
        r.index()
            .iter()
            .map(|e| {
                let mut buf = zero();
                r.read_page(&e, &mut buf).unwrap();
                (e.gpa, buf)
            })
            .collect()
    }

    /// A small valid file: 3 data pages, config and state.
    fn sample(dir: &Path) -> PathBuf {
        let mut w = CheckpointWriter::create(dir, full_header(1)).unwrap();
        w.set_config(b"{\"vcpus\":1}");
        w.set_state(b"cpu-state");
        w.add_page(0, &page(1)).unwrap();
        w.add_page(0x2000, &page(2)).unwrap();
        w.add_page(0x5000, &page(3)).unwrap();
        w.finish().unwrap().path
    }

    #[test]
    fn checksum_is_standard_crc32c_as_documented() {
        // The check value of CRC-32C (Castagnoli), as in iSCSI and ext4.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn round_trip_keeps_header_sections_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        w.set_config(b"config-bytes");
        w.set_state(b"state-bytes");
        let mut run = Vec::new();
        for i in 0..4 {
            run.extend_from_slice(&page(i));
        }
        assert_eq!(w.add_pages(0x10000, &run).unwrap(), 4 * PAGE_SIZE);
        assert_eq!(w.add_page(0x1000, &page(9)).unwrap(), PAGE_SIZE);
        let out = w.finish().unwrap();
        assert_eq!(out.id, 1);
        assert_eq!(out.pages_written, 5);
        assert_eq!(out.zero_pages, 0);
        assert_eq!(out.path, dir.path().join("ckpt-000001.vmhop"));
        assert_eq!(
            out.bytes_written,
            std::fs::metadata(&out.path).unwrap().len()
        );

        let r = CheckpointReader::open(&out.path).unwrap();
        assert_eq!(r.header(), &full_header(1));
        assert_eq!(r.config(), b"config-bytes");
        assert_eq!(r.state(), b"state-bytes");
        assert_eq!(r.file_len(), out.bytes_written);
        let pages = read_all(&r);
        let gpas: Vec<u64> = pages.iter().map(|p| p.0).collect();
        assert_eq!(gpas, vec![0x1000, 0x10000, 0x11000, 0x12000, 0x13000]);
        assert_eq!(pages[0].1, page(9));
        for i in 0..4 {
            assert_eq!(pages[1 + i].1, page(i as u64));
        }
        for e in r.index().iter() {
            assert_eq!(e.offset % PAGE_SIZE, 0, "page data is page-aligned");
        }
    }

    #[test]
    fn large_runs_written_directly_round_trip() {
        // Runs above DIRECT_WRITE_MIN bypass the buffer; mix them with
        // buffered pages to check the offsets stay in step.
        let dir = tempfile::tempdir().unwrap();
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        let n = DIRECT_WRITE_MIN / PAGE_SIZE as usize + 3;
        let mut big = Vec::new();
        for i in 0..n {
            big.extend_from_slice(&page(100 + i as u64));
        }
        w.add_page(0, &page(1)).unwrap();
        w.add_pages(0x100000, &big).unwrap();
        w.add_page(0x1000, &page(2)).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.pages_written, n as u64 + 2);
        let r = CheckpointReader::open(&out.path).unwrap();
        let mut all = vec![0u8; r.index().len() * PAGE_SIZE as usize];
        let entries: Vec<IndexEntry> = r.index().iter().collect();
        r.read_pages(&entries, &mut all).unwrap();
        assert_eq!(&all[..PAGE_SIZE as usize], &page(1)[..]);
        assert_eq!(
            &all[PAGE_SIZE as usize..2 * PAGE_SIZE as usize],
            &page(2)[..]
        );
        assert_eq!(&all[2 * PAGE_SIZE as usize..], &big[..]);
    }

    #[test]
    fn repeated_page_last_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        w.add_page(0x3000, &page(1)).unwrap();
        w.add_page(0x4000, &page(2)).unwrap();
        w.add_page(0x3000, &page(3)).unwrap();
        w.add_page(0x3000, &page(4)).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.pages_written, 2);
        let r = CheckpointReader::open(&out.path).unwrap();
        let pages = read_all(&r);
        assert_eq!(pages, vec![(0x3000, page(4)), (0x4000, page(2))]);
    }

    #[test]
    fn zero_pages_are_skipped_in_a_full_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        let mut run = Vec::new();
        run.extend_from_slice(&page(1));
        run.extend_from_slice(&zero());
        run.extend_from_slice(&page(2));
        run.extend_from_slice(&zero());
        assert_eq!(w.add_pages(0, &run).unwrap(), 2 * PAGE_SIZE);
        assert_eq!(w.add_page(0x10000, &zero()).unwrap(), 0);
        // A page that was data and became zero in the same file disappears.
        w.add_page(0x20000, &page(3)).unwrap();
        w.add_page(0x20000, &zero()).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.pages_written, 2);
        assert_eq!(out.zero_pages, 4);
        let r = CheckpointReader::open(&out.path).unwrap();
        let gpas: Vec<u64> = r.index().iter().map(|e| e.gpa).collect();
        assert_eq!(gpas, vec![0, 0x2000]);
        assert!(r.index().iter().all(|e| !e.zero));
    }

    #[test]
    fn zero_pages_are_recorded_in_an_incremental() {
        let dir = tempfile::tempdir().unwrap();
        let h = Header::incremental(7, 2, 1);
        let mut w = CheckpointWriter::create(dir.path(), h.clone()).unwrap();
        w.add_page(0x1000, &zero()).unwrap();
        w.add_page(0x2000, &page(5)).unwrap();
        w.add_page(0x3000, &page(6)).unwrap();
        w.add_page(0x3000, &zero()).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.pages_written, 1);
        assert_eq!(out.zero_pages, 2);
        let r = CheckpointReader::open(&out.path).unwrap();
        assert_eq!(r.header(), &h);
        let idx: Vec<IndexEntry> = r.index().iter().collect();
        assert_eq!(idx.len(), 3);
        assert!(idx[0].zero && idx[0].offset == 0);
        assert!(!idx[1].zero);
        assert!(idx[2].zero);
        let mut buf = page(1);
        r.read_page(&idx[2], &mut buf).unwrap();
        assert_eq!(buf, zero());
    }

    #[test]
    fn a_large_index_reads_back_whole_and_a_damaged_one_is_refused() {
        // Zero pages of an incremental carry no page data, so the file stays
        // small; one data page in every 1000 cuts the index into ~1000 runs.
        let n = 1_000_000usize;
        let dir = tempfile::tempdir().unwrap();
        let h = Header::incremental(7, 2, 1);
        let mut w = CheckpointWriter::create(dir.path(), h).unwrap();
        let data = |i: usize| i % 1000 == 3;
        for i in 0..n as u64 {
            let p = if data(i as usize) { page(i) } else { zero() };
            w.add_page(i * PAGE_SIZE, &p).unwrap();
        }
        let out = w.finish().unwrap();
        let r = CheckpointReader::open(&out.path).unwrap();
        let idx = r.index();
        assert_eq!(idx.len(), n);
        assert_eq!(r.data_entries(), n.div_ceil(1000) as u64);
        for (i, e) in idx.iter().enumerate() {
            assert_eq!(e.gpa, i as u64 * PAGE_SIZE);
            assert_eq!(e.zero, !data(i), "entry {i}");
        }
        let mut buf = zero();
        r.read_page(&idx.get(1003 * PAGE_SIZE).unwrap(), &mut buf)
            .unwrap();
        assert_eq!(buf, page(1003));
        drop(r);
        // One flipped byte in the middle of the runs, then of the crcs.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out.path)
            .unwrap();
        let len = f.metadata().unwrap().len();
        let crcs = n.div_ceil(1000) * CRC_LEN;
        for back in [crcs + 1000 * RUN_LEN, crcs / 2] {
            let at = len - (FOOTER_LEN + back) as u64;
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
            let err = CheckpointReader::open(&out.path).unwrap_err().to_string();
            assert!(err.contains("index section"), "{err}");
            f.write_all_at(&b, at).unwrap();
        }
        CheckpointReader::open(&out.path).unwrap();
    }

    #[test]
    fn a_full_checkpoint_of_contiguous_pages_has_a_small_index() {
        // 4 MiB of data written in one stretch: one run and 1024 crcs.
        let dir = tempfile::tempdir().unwrap();
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        let data: Vec<u8> = (0..1024).flat_map(page).collect();
        w.add_pages(0, &data).unwrap();
        let out = w.finish().unwrap();
        let bytes = std::fs::read(&out.path).unwrap();
        let footer = &bytes[bytes.len() - FOOTER_LEN..];
        assert_eq!(le_u64(&footer[96..104]), (RUN_LEN + 1024 * CRC_LEN) as u64);
        assert_eq!(le_u64(&footer[104..112]), 1);
        let r = CheckpointReader::open(&out.path).unwrap();
        let mut back = vec![0u8; data.len()];
        let entries: Vec<IndexEntry> = r.index().iter().collect();
        r.read_pages(&entries, &mut back).unwrap();
        assert!(back == data);
    }

    #[test]
    fn empty_checkpoint_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let w = CheckpointWriter::create(dir.path(), full_header(3)).unwrap();
        let out = w.finish().unwrap();
        let r = CheckpointReader::open(&out.path).unwrap();
        assert!(r.index().is_empty());
        assert!(r.config().is_empty() && r.state().is_empty());
    }

    #[test]
    fn invalid_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bad = Header {
            parent: Some(1),
            ..full_header(2)
        };
        assert!(matches!(
            CheckpointWriter::create(dir.path(), bad),
            Err(FormatError::InvalidArgument { .. })
        ));
        let bad = Header::incremental(5, 2, 2);
        assert!(CheckpointWriter::create(dir.path(), bad).is_err());
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        assert!(w.add_page(0x10, &page(1)).is_err());
        assert!(w.add_page(0, &page(1)[..100]).is_err());
        assert!(w.add_pages(0, &[0u8; 100]).is_err());
        assert!(w.add_pages(u64::MAX - 0xfff, &page(1)).is_err());
        w.finish().unwrap();
        // The id is now taken.
        let err = CheckpointWriter::create(dir.path(), full_header(1)).unwrap_err();
        assert!(matches!(err, FormatError::AlreadyExists { .. }), "{err}");
    }

    #[test]
    fn checkpoint_is_invisible_until_finish_and_abort_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        w.add_page(0, &page(1)).unwrap();
        let tmp = dir.path().join(".ckpt-000001.tmp");
        assert!(tmp.exists());
        assert!(!dir.path().join("ckpt-000001.vmhop").exists());
        w.abort();
        assert!(!tmp.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let w = CheckpointWriter::create(dir.path(), full_header(2)).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let w = CheckpointWriter::create(dir.path(), full_header(3)).unwrap();
        let out = w.finish().unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![out.path.file_name().unwrap().to_owned()]);
    }

    #[test]
    fn stale_temp_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(temp_file_name(1)), b"junk from a crash").unwrap();
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        w.add_page(0, &page(1)).unwrap();
        let out = w.finish().unwrap();
        CheckpointReader::open(&out.path).unwrap();
        assert!(!dir.path().join(temp_file_name(1)).exists());
    }

    #[test]
    fn file_names_parse_only_in_canonical_form() {
        use std::ffi::OsStr;
        assert_eq!(
            parse_checkpoint_file_name(OsStr::new("ckpt-000001.vmhop")),
            Some(1)
        );
        assert_eq!(
            parse_checkpoint_file_name(OsStr::new("ckpt-4294967295.vmhop")),
            Some(u32::MAX)
        );
        for bad in [
            "ckpt-1.vmhop",
            "ckpt-000000.vmhop",
            ".ckpt-000001.tmp",
            "ckpt-00000a.vmhop",
            "ckpt-+00001.vmhop",
            "ckpt-000001.vmhop.bak",
        ] {
            assert_eq!(parse_checkpoint_file_name(OsStr::new(bad)), None, "{bad}");
        }
    }

    /// Opens `bytes` written to a file and returns the error, or `None` if
    /// open and reading every page succeeded.
    fn open_bytes(dir: &Path, bytes: &[u8]) -> (PathBuf, Option<FormatError>) {
        let path = dir.join("damaged.vmhop");
        std::fs::write(&path, bytes).unwrap();
        let result = CheckpointReader::open(&path).and_then(|r| {
            let mut buf = zero();
            for e in r.index().iter() {
                r.read_page(&e, &mut buf)?;
            }
            Ok(())
        });
        (path, result.err())
    }

    fn error_path(e: &FormatError) -> &Path {
        match e {
            FormatError::Io { path, .. }
            | FormatError::NoSpace { path, .. }
            | FormatError::BadMagic { path }
            | FormatError::UnsupportedVersion { path, .. }
            | FormatError::Checksum { path, .. }
            | FormatError::Truncated { path, .. }
            | FormatError::Corrupt { path, .. }
            | FormatError::Layout { path, .. }
            | FormatError::Index { path, .. }
            | FormatError::AlreadyExists { path }
            | FormatError::InvalidArgument { path, .. }
            | FormatError::Poisoned { path } => path,
        }
    }

    #[test]
    fn flipped_byte_in_each_section_is_detected_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read(sample(dir.path())).unwrap();
        let len = good.len();
        let footer_at = len - FOOTER_LEN;
        // Three data pages at gpas 0, 0x2000 and 0x5000: three runs and
        // three crcs.
        let index_at = footer_at - 3 * (RUN_LEN + CRC_LEN);
        let state_at = index_at - b"cpu-state".len();
        let config_at = state_at - b"{\"vcpus\":1}".len();
        let cases: Vec<(usize, &str)> = vec![
            (16, "header"),
            (24, "header"),
            (40, "header"),
            (HEADER_BLOCK_LEN + 5, "page at gpa 0x0"),
            (
                HEADER_BLOCK_LEN + PAGE_SIZE as usize + 100,
                "page at gpa 0x2000",
            ),
            (config_at + 1, "config"),
            (state_at + 2, "state"),
            (index_at + 3, "index"),
            (footer_at + 20, "footer"),
            (footer_at + 100, "footer"),
        ];
        for (pos, section) in cases {
            let mut bad = good.clone();
            bad[pos] ^= 0x40;
            let (path, err) = open_bytes(dir.path(), &bad);
            let err = err.unwrap_or_else(|| panic!("flip at {pos} undetected"));
            assert_eq!(error_path(&err), path);
            assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
            match &err {
                FormatError::Checksum { section: s, .. } => {
                    assert!(s.contains(section), "flip at {pos}: {err}")
                }
                other => panic!("flip at {pos} ({section}): unexpected {other}"),
            }
        }
        // Padding of the header block and the trailer magic are checked too.
        for pos in [HEADER_LEN + 1, len - 3] {
            let mut bad = good.clone();
            bad[pos] ^= 1;
            assert!(open_bytes(dir.path(), &bad).1.is_some(), "flip at {pos}");
        }
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read(sample(dir.path())).unwrap();
        // Flip one bit in every byte outside the (large) page data, and a
        // stride of bytes inside it.
        let page_data = HEADER_BLOCK_LEN + 64..HEADER_BLOCK_LEN + 3 * PAGE_SIZE as usize;
        for pos in (0..good.len()).filter(|p| !page_data.contains(p) || p % 97 == 0) {
            let mut bad = good.clone();
            bad[pos] ^= 0x10;
            let (_, err) = open_bytes(dir.path(), &bad);
            assert!(err.is_some(), "flip at byte {pos} went unnoticed");
        }
    }

    #[test]
    fn truncation_at_any_length_gives_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read(sample(dir.path())).unwrap();
        let mut lens: Vec<usize> = (0..80).collect();
        lens.extend((80..good.len()).step_by(61));
        lens.extend(good.len() - FOOTER_LEN - 2..good.len());
        for len in lens {
            let (path, err) = open_bytes(dir.path(), &good[..len]);
            let err = err.unwrap_or_else(|| panic!("truncation to {len} undetected"));
            assert!(
                matches!(err, FormatError::Truncated { .. }),
                "length {len}: expected truncation, got {err}"
            );
            assert!(err.to_string().contains(path.to_str().unwrap()));
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }

    #[test]
    fn truncation_after_open_is_reported_when_reading_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let r = CheckpointReader::open(&path).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_BLOCK_LEN as u64 + 100).unwrap();
        let mut buf = zero();
        let third = r.index().iter().nth(2).unwrap();
        let err = r.read_page(&third, &mut buf).unwrap_err();
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
    }

    #[test]
    fn wrong_magic_is_not_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = std::fs::read(sample(dir.path())).unwrap();
        bad[0] = b'X';
        let (path, err) = open_bytes(dir.path(), &bad);
        let err = err.unwrap();
        assert!(matches!(err, FormatError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains(path.to_str().unwrap()));
        let (_, err) = open_bytes(dir.path(), b"#!/bin/sh\necho hello\n");
        assert!(matches!(err.unwrap(), FormatError::BadMagic { .. }));
        assert!(matches!(
            read_header(&path),
            Err(FormatError::BadMagic { .. })
        ));
    }

    #[test]
    fn other_format_version_is_refused_by_number() {
        // Versions 1 and 2 (no disks) are older formats, 4 a newer one.
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read(sample(dir.path())).unwrap();
        for v in [1u32, 2, 4] {
            let mut bad = good.clone();
            bad[8..12].copy_from_slice(&v.to_le_bytes());
            let (path, err) = open_bytes(dir.path(), &bad);
            let err = err.unwrap();
            assert!(
                matches!(err, FormatError::UnsupportedVersion { found, .. } if found == v),
                "{err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(path.to_str().unwrap())
                    && msg.contains(&format!("version {v} is not supported"))
                    && msg.contains("reads version 3"),
                "{msg}"
            );
        }
    }

    #[test]
    fn footer_of_another_checkpoint_is_refused() {
        // Splice the tail of checkpoint 2 onto the head of checkpoint 1.
        let dir = tempfile::tempdir().unwrap();
        let one = std::fs::read(sample(dir.path())).unwrap();
        let mut w = CheckpointWriter::create(dir.path(), full_header(2)).unwrap();
        w.set_config(b"{\"vcpus\":1}");
        w.set_state(b"cpu-state");
        w.add_page(0, &page(1)).unwrap();
        w.add_page(0x2000, &page(2)).unwrap();
        w.add_page(0x5000, &page(3)).unwrap();
        let two = std::fs::read(w.finish().unwrap().path).unwrap();
        let mut spliced = one[..HEADER_BLOCK_LEN].to_vec();
        spliced.extend_from_slice(&two[HEADER_BLOCK_LEN..]);
        let (_, err) = open_bytes(dir.path(), &spliced);
        assert!(matches!(err.unwrap(), FormatError::Corrupt { .. }));
    }

    #[test]
    fn appended_garbage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = std::fs::read(sample(dir.path())).unwrap();
        bad.extend_from_slice(b"trailing");
        assert!(open_bytes(dir.path(), &bad).1.is_some());
    }

    #[test]
    fn missing_file_error_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt-000009.vmhop");
        let err = CheckpointReader::open(&path).unwrap_err();
        assert!(matches!(err, FormatError::Io { .. }));
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    }

    #[test]
    fn unwritable_directory_fails_at_create_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let err = CheckpointWriter::create(&missing, full_header(1)).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }

    /// Mounts a 1 MiB tmpfs for the ENOSPC test and unmounts it on drop.
    struct SmallTmpfs {
        dir: tempfile::TempDir,
    }

    impl SmallTmpfs {
        fn mount() -> Option<SmallTmpfs> {
            let dir = tempfile::tempdir().ok()?;
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .ok()?;
            status.success().then_some(SmallTmpfs { dir })
        }
    }

    impl Drop for SmallTmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }

    #[test]
    fn full_disk_error_names_the_file_and_removes_the_temp() {
        let Some(fs) = SmallTmpfs::mount() else {
            eprintln!("skipping: cannot mount a tmpfs (not root?)");
            return;
        };
        let dir = fs.dir.path();
        let mut w = CheckpointWriter::create(dir, full_header(1)).unwrap();
        // 2 MiB of pages into a 1 MiB file system, in direct and buffered
        // writes: one of the adds or finish must fail.
        let mut big = Vec::new();
        for i in 0..512 {
            big.extend_from_slice(&page(i));
        }
        let result = w
            .add_pages(0, &big)
            .and_then(|_| w.add_page(0x1000_0000, &page(7)));
        let err = match result {
            Err(e) => {
                // The writer is unusable afterwards.
                assert!(matches!(
                    w.add_page(0x2000_0000, &page(8)),
                    Err(FormatError::Poisoned { .. })
                ));
                drop(w);
                e
            }
            Ok(_) => w.finish().unwrap_err(),
        };
        assert!(matches!(err, FormatError::NoSpace { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(".ckpt-000001.tmp"), "{msg}");
        assert!(msg.contains("disk is full"), "{msg}");
        assert_eq!(
            std::fs::read_dir(dir).unwrap().count(),
            0,
            "temp file left behind"
        );

        // Small enough to fit: buffered writes fail only at finish.
        let mut w = CheckpointWriter::create(dir, full_header(2)).unwrap();
        w.add_pages(0, &big[..DIRECT_WRITE_MIN / 2]).unwrap();
        w.add_pages(0x100000, &big[..DIRECT_WRITE_MIN / 2]).unwrap();
        w.add_pages(0x200000, &big[..DIRECT_WRITE_MIN / 2]).unwrap();
        let err = w.finish().unwrap_err();
        assert!(matches!(err, FormatError::NoSpace { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0);
    }

    fn disk(id: &str, space: u64, size: u64) -> DiskRecord {
        DiskRecord {
            id: id.into(),
            space,
            size,
            readonly: false,
            base: BaseImage {
                path: format!("/images/{id}.img").into(),
                size,
                mtime_ns: 1_700_000_000_123_456_789,
                sample_crc: 0x1234_5678,
            },
        }
    }

    /// A full checkpoint with a memory page and blocks of two disks: disk
    /// a (1 MiB) data, zero, data at blocks 0..3; disk b (1 GiB) a zero
    /// extent at 1 MiB.
    fn with_disks(dir: &Path) -> (PathBuf, WrittenCheckpoint) {
        use crate::vmm::store::store_address;
        let mut w = CheckpointWriter::create(dir, full_header(1)).unwrap();
        w.set_config(b"{}");
        w.set_state(b"state");
        w.set_disks(vec![disk("a", 1, 1 << 20), disk("b", 2, 1 << 30)]);
        w.add_page(0x1000, &page(1)).unwrap();
        let blocks = [page(2), zero(), page(3)].concat();
        w.add_pages(store_address(0, 0), &blocks).unwrap();
        w.add_page(store_address(1, 1 << 20), &zero()).unwrap();
        let out = w.finish().unwrap();
        (out.path.clone(), out)
    }

    #[test]
    fn disk_blocks_round_trip_with_their_zero_extents_even_in_a_full_checkpoint() {
        use crate::vmm::store::store_address;
        let dir = tempfile::tempdir().unwrap();
        let (path, out) = with_disks(dir.path());
        assert_eq!(
            (out.pages_written, out.disk_blocks, out.disk_zero_blocks),
            (1, 2, 2)
        );
        assert_eq!(
            read_header(&path).unwrap().disk_blocks,
            2,
            "the header counts them"
        );
        let r = CheckpointReader::open(&path).unwrap();
        assert_eq!(r.disks(), &[disk("a", 1, 1 << 20), disk("b", 2, 1 << 30)]);
        let got: Vec<(u64, bool)> = r.index().iter().map(|e| (e.gpa, e.zero)).collect();
        let a = |b: u64| store_address(0, b * PAGE_SIZE);
        assert_eq!(
            got,
            vec![
                (0x1000, false),
                (a(0), false),
                (a(1), true),
                (a(2), false),
                (store_address(1, 1 << 20), true)
            ]
        );
        let pages = read_all(&r);
        assert_eq!(pages[1].1, page(2));
        assert_eq!(pages[3].1, page(3));
        assert_eq!(pages[2].1, zero());
    }

    #[test]
    fn a_disk_block_outside_its_disk_or_the_table_is_refused() {
        use crate::vmm::store::store_address;
        let dir = tempfile::tempdir().unwrap();
        // The writer refuses a block past its disk's end, or of no disk.
        for addr in [store_address(0, 1 << 20), store_address(2, 0)] {
            let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
            w.set_disks(vec![disk("a", 1, 1 << 20), disk("b", 2, 1 << 30)]);
            w.add_page(addr, &page(1)).unwrap();
            let e = w.finish().unwrap_err();
            assert!(matches!(e, FormatError::InvalidArgument { .. }), "{e}");
            assert!(e.to_string().contains("in no disk"), "{e}");
        }
        // A table with a space out of order.
        let mut w = CheckpointWriter::create(dir.path(), full_header(1)).unwrap();
        w.set_disks(vec![disk("a", 2, 1 << 20)]);
        assert!(w.finish().unwrap_err().to_string().contains("expected 1"));
        // The reader: a well-summed table that shrank disk a under its
        // blocks is corrupt.
        let (path, _) = with_disks(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let f = bytes.len() - FOOTER_LEN;
        let (off, len) = (
            le_u64(&bytes[f + 72..]) as usize,
            le_u64(&bytes[f + 80..]) as usize,
        );
        let table = String::from_utf8(bytes[off..off + len].to_vec()).unwrap();
        let shrunk = table.replacen("\"size\":1048576", "\"size\":4096   ", 1);
        assert_eq!(shrunk.len(), table.len());
        bytes[off..off + len].copy_from_slice(shrunk.as_bytes());
        let crc = crc32c::crc32c(&bytes[off..off + len]);
        bytes[f + 120..f + 124].copy_from_slice(&crc.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[f..f + FOOTER_CRC_AT]);
        bytes[f + FOOTER_CRC_AT..f + FOOTER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        let (p, err) = open_bytes(dir.path(), &bytes);
        let err = err.expect("refused");
        assert!(matches!(err, FormatError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains(p.to_str().unwrap()) && err.to_string().contains("no disk"),
            "{err}"
        );
    }

    #[test]
    fn every_byte_flip_and_every_truncation_of_a_file_with_disks_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = with_disks(dir.path());
        let good = std::fs::read(path).unwrap();
        let page_data = HEADER_BLOCK_LEN + 64..HEADER_BLOCK_LEN + 3 * PAGE_SIZE as usize;
        for pos in (0..good.len()).filter(|p| !page_data.contains(p) || p % 97 == 0) {
            let mut bad = good.clone();
            bad[pos] ^= 0x10;
            assert!(
                open_bytes(dir.path(), &bad).1.is_some(),
                "flip at byte {pos} went unnoticed"
            );
        }
        for len in (0..good.len())
            .step_by(37)
            .chain(good.len() - FOOTER_LEN - 2..good.len())
        {
            let (p, err) = open_bytes(dir.path(), &good[..len]);
            let err = err.unwrap_or_else(|| panic!("truncation to {len} undetected"));
            assert!(
                matches!(err, FormatError::Truncated { .. }),
                "length {len}: {err}"
            );
            assert!(err.to_string().contains(p.to_str().unwrap()));
        }
    }

    #[test]
    fn a_base_image_s_identity_notices_a_change_of_size_time_or_sampled_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.img");
        let bytes: Vec<u8> = (0..(8u64 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let id = BaseImage::of(&path).unwrap();
        assert_eq!(id.changed(), None);
        // Same bytes, a new mtime.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
        assert!(
            id.changed().unwrap().contains("modified"),
            "{:?}",
            id.changed()
        );
        // A changed first block with the recorded mtime put back (cp -p).
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(id.mtime_ns as u64);
        f.write_all_at(b"changed", 0).unwrap();
        f.set_modified(mtime).unwrap();
        assert!(
            id.changed().unwrap().contains("content"),
            "{:?}",
            id.changed()
        );
        f.set_len(4 << 20).unwrap();
        assert!(id.changed().unwrap().contains("size"), "{:?}", id.changed());
        std::fs::remove_file(&path).unwrap();
        assert!(id.changed().unwrap().contains("cannot be read"));
    }

    fn proptest_sample() -> &'static [u8] {
        static SAMPLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        SAMPLE.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let mut w = CheckpointWriter::create(dir.path(), Header::incremental(9, 3, 2)).unwrap();
            w.set_config(b"{}");
            w.set_state(&[7u8; 40]);
            w.add_page(0x1000, &page(1)).unwrap();
            w.add_page(0x3000, &zero()).unwrap();
            w.add_page(0x4000, &page(2)).unwrap();
            std::fs::read(w.finish().unwrap().path).unwrap()
        })
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

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

        /// Patches the checksums after mutating, so the fuzzer also reaches
        /// the structural checks behind them.
        fn reseal(bytes: &mut [u8]) {
            if bytes.len() >= HEADER_LEN {
                let crc = crc32c::crc32c(&bytes[..HEADER_LEN - 4]);
                bytes[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
            }
            if bytes.len() >= FOOTER_LEN {
                let f = bytes.len() - FOOTER_LEN;
                let crc = crc32c::crc32c(&bytes[f..f + FOOTER_CRC_AT]);
                bytes[f + FOOTER_CRC_AT..f + FOOTER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
                let dir = tempfile::tempdir().unwrap();
                let _ = open_bytes(dir.path(), &bytes);
            }

            #[test]
            fn mutated_valid_file_never_panics(muts in proptest::collection::vec(mutation(), 1..6), fix_crcs in any::<bool>()) {
                let dir = tempfile::tempdir().unwrap();
                let mut bytes = proptest_sample().to_vec();
                for m in &muts {
                    apply(&mut bytes, m);
                }
                if fix_crcs {
                    reseal(&mut bytes);
                }
                let _ = open_bytes(dir.path(), &bytes);
            }
        }
    }

    /// Writes 256 MiB of random pages through the writer and through a plain
    /// buffered write + fsync, and prints the ratio. Run with
    /// `cargo test --release -- --ignored --nocapture full_checkpoint_write_speed`.
    #[test]
    #[ignore]
    fn full_checkpoint_write_speed_is_close_to_plain_write() {
        const TOTAL: usize = 256 << 20;
        const CHUNK: usize = 2 << 20;
        let dir =
            tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or("/var/tmp".into())).unwrap();
        let mut data = Vec::with_capacity(TOTAL);
        let mut i = 0u64;
        while data.len() < TOTAL {
            data.extend_from_slice(&page(i));
            i += 1;
        }
        let plain = |n: u32| {
            let path = dir.path().join(format!("plain-{n}"));
            // SAFETY: sync takes no arguments and cannot fail.
            unsafe { libc::sync() };
            let t = std::time::Instant::now();
            let f = File::create(&path).unwrap();
            let mut w = std::io::BufWriter::with_capacity(WRITE_BUFFER_LEN, f);
            for c in data.chunks(CHUNK) {
                w.write_all(c).unwrap();
            }
            w.into_inner().unwrap().sync_all().unwrap();
            let s = t.elapsed().as_secs_f64();
            std::fs::remove_file(&path).unwrap();
            s
        };
        let ours = |n: u32| {
            // SAFETY: as above.
            unsafe { libc::sync() };
            let t = std::time::Instant::now();
            let mut w = CheckpointWriter::create(dir.path(), full_header(n)).unwrap();
            w.set_config(&[1u8; 2000]);
            for (k, c) in data.chunks(CHUNK).enumerate() {
                w.add_pages((k * CHUNK) as u64, c).unwrap();
            }
            let out = w.finish().unwrap();
            let s = t.elapsed().as_secs_f64();
            std::fs::remove_file(&out.path).unwrap();
            s
        };
        let (mut p, mut o) = (Vec::new(), Vec::new());
        for n in 1..=7 {
            p.push(plain(n));
            o.push(ours(n));
        }
        p.sort_by(f64::total_cmp);
        o.sort_by(f64::total_cmp);
        let (pm, om) = (p[p.len() / 2], o[o.len() / 2]);
        println!(
            "256 MiB: plain write+fsync median {:.3}s, checkpoint writer median {:.3}s, ratio {:.3} (plain {p:?}, ours {o:?})",
            pm,
            om,
            om / pm
        );
    }
}
