//! Restoring a VM from any checkpoint of a chain.
//!
//! Everything that can be checked without reading page data is checked
//! before any vCPU runs: every file's header, footer, config, state and
//! index checksums, the chain's links, and that every page lies in guest
//! memory. The restored file's header, footer, config and state are read
//! first (the VM is built from them); the rest of the chain is validated on
//! a thread of its own while the VM is created paused, and a failure there
//! shuts down the VM, which never ran. Then:
//! - **eager**: every page is read (and its checksum verified) straight
//!   into guest memory, each run of pages populated first, before any vCPU
//!   runs;
//! - **lazy** (default): guest memory is registered with userfaultfd, the
//!   vCPUs start at once, a handler thread serves each first touch from the
//!   file holding that page's latest version, and background loaders (one
//!   per CPU) load the rest and map the zero page into every hole no file
//!   stores. A page found corrupt then stops the VM at once, with a
//!   message naming the file and the page (the guest gets zeros for it, not
//!   the bad data). Use eager restore to check every page before running.
//!
//! Each page is read once, from the file that holds its latest version
//! (`ResolvedChain::page_map`), whatever the chain's length.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd, UffdBuilder};

use super::chain::{Chain, ChainEntry, ChainError, ResolvedChain};
use super::disks::{block_of, default_restored_path, ChainDisk};
use super::format::{read_meta, Meta};
use super::image::{CloneImage, ImageKey};
use super::index::IndexEntry;
use super::{ChainPosition, CheckpointRef};
use crate::api::checkpoint::CheckpointTarget;
use crate::devices::virtio::block::{Shape, Stack};
use crate::memory::GuestMemory;
use crate::memory::PAGE_SIZE;
use crate::vmm::vm::Loader;
use crate::vmm::{Vm, VmConfig, VmState};

/// Largest run of pages read with one pread.
const MAX_RUN_PAGES: usize = 256;
/// Pages of a block: the unit a fault is served in, and that the fault
/// handler and the loaders claim so that no page is read twice.
const BLOCK_PAGES: usize = 16;
const BLOCK_BYTES: u64 = BLOCK_PAGES as u64 * PAGE_SIZE;
/// Most blocks one fault is served with: faults that follow each other
/// through memory double the blocks served each time, up to this.
const MAX_FAULT_BLOCKS: usize = 16;
/// Set in a block's owner once its loader has loaded it.
const LOADED: u8 = 0x80;
/// Longest the fault handler waits for a loader to finish a block.
const LOADER_WAIT: Duration = Duration::from_millis(20);
/// Runs in one part of the background load (see `Lazy::background`).
const PART_RUNS: usize = 16;
/// Owner of an unclaimed block.
const UNCLAIMED: u8 = 0;
/// Owner of a block the fault handler serves; loader k owns with `k + 2`.
const HANDLER: u8 = 1;
/// How often the fault handler looks whether loading has finished.
const HANDLER_POLL: Duration = Duration::from_millis(50);

/// A restore failed; no VM was started (or, lazily, the VM was stopped).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The chain or a file is unusable.
    #[error("{0}")]
    Chain(#[from] super::chain::ChainError),
    /// The saved VM state does not deserialize.
    #[error("{file}: the saved VM state is not readable: {source}")]
    State {
        /// The file.
        file: PathBuf,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// The saved configuration does not deserialize.
    #[error("{file}: the saved configuration is not readable: {source}")]
    Config {
        /// The file.
        file: PathBuf,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// The saved configuration is not one vmhop can run.
    #[error("{file}: the saved configuration is invalid: {source}")]
    InvalidConfig {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        #[source]
        source: crate::vmm::ConfigError,
    },
    /// A file holds a page outside the VM's memory.
    #[error("{file}: page {gpa:#x} lies outside the VM's {size} bytes of memory")]
    PageOutside {
        /// The file.
        file: PathBuf,
        /// The page.
        gpa: u64,
        /// The VM's memory size.
        size: u64,
    },
    /// A page to load has no place in the VM's memory as built.
    #[error("{file}: page {gpa:#x} is not in guest memory")]
    NotInMemory {
        /// The file.
        file: PathBuf,
        /// The page.
        gpa: u64,
    },
    /// A thread the restore needs could not start.
    #[error("{file}: cannot start the {what} thread: {source}")]
    Thread {
        /// The checkpoint restored.
        file: PathBuf,
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A thread of the restore panicked (a vmhop bug).
    #[error("{file}: {what} panicked")]
    Panicked {
        /// The checkpoint restored.
        file: PathBuf,
        /// Which thread.
        what: &'static str,
    },
    /// The VM was built without loading its memory (a vmhop bug).
    #[error("{file}: the VM was created without loading its memory")]
    NotLoaded {
        /// The checkpoint restored.
        file: PathBuf,
    },
    /// Creating the VM failed.
    #[error("{0}")]
    Vm(#[from] crate::vmm::VmError),
    /// `--disk` names a disk the checkpoint does not have.
    #[error("--disk id={id}: checkpoint {} has no disk {id} (it has: {have})", file.display())]
    NoSuchDisk {
        /// The checkpoint.
        file: PathBuf,
        /// The id given.
        id: String,
        /// The ids it has.
        have: String,
    },
    /// A `--disk` option is not `id=NAME,path=FILE`.
    #[error("--disk {given}: on a restore, give id=NAME,path=FILE (the rest of a disk's configuration comes from the checkpoint)")]
    DiskOption {
        /// The option as given.
        given: String,
    },
    /// The file a restored disk would land in exists.
    #[error("disk {disk}: {} already exists, and a restore never overwrites a file: give --disk id={disk},path=NEW, or remove it", path.display())]
    DiskExists {
        /// The disk.
        disk: String,
        /// The file.
        path: PathBuf,
    },
    /// A restored disk's file or its base image cannot be used.
    #[error("disk {disk}: {source}")]
    DiskFile {
        /// The disk.
        disk: String,
        /// The image's error, naming the file.
        #[source]
        source: Box<crate::devices::virtio::block::BlockError>,
    },
    /// The directory for restored disks cannot be made.
    #[error("cannot create {}: {source}", path.display())]
    RestoredDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A base image changed since the checkpoint recorded it.
    #[error("disk {disk}: its base image {} changed since the checkpoint: {why}; the disk cannot be restored from it", path.display())]
    BaseChanged {
        /// The disk.
        disk: String,
        /// The base image.
        path: PathBuf,
        /// What changed.
        why: String,
    },
    /// The checkpoint's disks table does not match its configuration.
    #[error("{}: the disks table does not match the saved configuration's disks", file.display())]
    DiskTable {
        /// The checkpoint.
        file: PathBuf,
    },
    /// A clone's image could not be built, opened or mapped.
    #[error("{0}")]
    Image(#[from] super::image::ImageError),
    /// Mapping a clone's image into guest memory failed.
    #[error("mapping clone image {} at guest {gpa:#x}: {source}", path.display())]
    MapImage {
        /// The image.
        path: PathBuf,
        /// The chunk's first guest-physical address.
        gpa: u64,
        /// mmap's error.
        #[source]
        source: crate::memory::MappingError,
    },
    /// Copying a restored disk's blocks failed.
    #[error("disk {disk}: {source}")]
    Fill {
        /// The disk.
        disk: String,
        /// What failed.
        #[source]
        source: crate::devices::virtio::block::StackError,
    },
}

impl crate::api::Classify for RestoreError {
    fn kind(&self) -> crate::api::ErrorKind {
        match self {
            RestoreError::Chain(e) => e.kind(),
            // The file's content: the checkpoint the user named is unusable.
            RestoreError::State { .. }
            | RestoreError::Config { .. }
            | RestoreError::InvalidConfig { .. }
            | RestoreError::PageOutside { .. }
            | RestoreError::NotInMemory { .. } => crate::api::ErrorKind::Unusable,
            RestoreError::Thread { .. }
            | RestoreError::Panicked { .. }
            | RestoreError::NotLoaded { .. } => crate::api::ErrorKind::Failed,
            RestoreError::Vm(e) => e.kind(),
            RestoreError::NoSuchDisk { .. }
            | RestoreError::DiskOption { .. }
            | RestoreError::DiskExists { .. } => crate::api::ErrorKind::BadRequest,
            RestoreError::DiskFile { source, .. } => source.kind(),
            RestoreError::RestoredDir { source, .. } => crate::api::ErrorKind::of_io(source),
            RestoreError::BaseChanged { .. } | RestoreError::DiskTable { .. } => {
                crate::api::ErrorKind::Unusable
            }
            RestoreError::Fill { .. } | RestoreError::MapImage { .. } => {
                crate::api::ErrorKind::Failed
            }
            RestoreError::Image(e) => e.kind(),
        }
    }
}

pub use crate::api::checkpoint::{RestorePhases, RestoreReport};

/// A checkpoint opened and checked, ready to be loaded.
pub struct Opened {
    /// The chain files.
    pub chain: Arc<ResolvedChain>,
    /// Its configuration.
    pub config: VmConfig,
    /// Its vCPU state.
    pub state: VmState,
    /// Non-zero pages across the chain (an upper bound until the page map
    /// is built: a page stored in several files counts once per file).
    pub stored_pages: u64,
    /// The checkpoint restored.
    pub checkpoint: CheckpointRef,
}

/// What a restore learns before validating the whole chain: enough to
/// create the VM.
struct Prepared {
    /// The chain's files, full checkpoint first.
    links: Vec<ChainEntry>,
    /// The restored file's checked header, config and state bytes.
    meta: Meta,
    config: VmConfig,
    state: VmState,
    checkpoint: CheckpointRef,
}

/// Lists `dir`, checks the links of the chain down to `id` and reads the
/// restored file's config and state (checksummed), without reading any
/// index.
fn prepare(dir: &Path, id: Option<u32>) -> Result<Prepared, RestoreError> {
    let links = Chain::open(dir)?.links(id)?;
    let top = links
        .last()
        .expect("a chain holds at least its full checkpoint");
    let file = top.path.clone();
    let meta = read_meta(&file).map_err(ChainError::from)?;
    if meta.header != super::chain::header_of(top) {
        return Err(ChainError::Inconsistent {
            file,
            reason: "the file changed since the directory was listed".into(),
        }
        .into());
    }
    let state: VmState =
        serde_json::from_slice(&meta.state).map_err(|source| RestoreError::State {
            file: file.clone(),
            source,
        })?;
    let config: VmConfig =
        serde_json::from_slice(&meta.config).map_err(|source| RestoreError::Config {
            file: file.clone(),
            source,
        })?;
    config
        .validate()
        .map_err(|source| RestoreError::InvalidConfig {
            file: file.clone(),
            source,
        })?;
    let checkpoint = CheckpointRef {
        dir: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
        chain_id: meta.header.chain_id,
        id: meta.header.id,
    };
    Ok(Prepared {
        links,
        meta,
        config,
        state,
        checkpoint,
    })
}

/// Opens and validates every file of `links`: header, footer, config,
/// state and index (checksums and entries), that the restored file still
/// holds the `meta` the VM is being built from, and that every page lies in
/// the guest memory of `config`. Returns the chain and its stored
/// (non-zero) page count.
fn validate(
    links: &[ChainEntry],
    meta: &Meta,
    config: &VmConfig,
) -> Result<(ResolvedChain, u64), RestoreError> {
    let resolved = ResolvedChain::open(links)?;
    let top = resolved.top();
    for d in &meta.disks {
        if let Some(why) = d.base.changed() {
            return Err(RestoreError::BaseChanged {
                disk: d.id.clone(),
                path: d.base.path.clone(),
                why,
            });
        }
    }
    if top.config() != meta.config.as_slice() || top.state() != meta.state.as_slice() {
        return Err(ChainError::Inconsistent {
            file: top.path().to_path_buf(),
            reason: "the file changed while it was being restored".into(),
        }
        .into());
    }
    let size: u64 = config.nodes.iter().map(|n| n.size).sum();
    let layout = crate::memory::layout::layout(
        &config.nodes.iter().map(|n| n.size).collect::<Vec<_>>(),
        config.chunk_size,
    );
    let mut ranges: Vec<(u64, u64)> = layout
        .iter()
        .flatten()
        .map(|r| (r.start, r.end()))
        .collect();
    ranges.sort_unstable();
    // Every index is sorted by gpa: a page outside guest memory shows up in
    // one of the gaps between memory ranges, found by binary search.
    let mut stored_pages = 0;
    for reader in &resolved.readers {
        let idx = reader.index();
        stored_pages += reader.data_entries();
        let mut gap_start = 0u64;
        // Disks' blocks live above guest memory's space; the format
        // checked them against the disks table.
        let disks = 1u64 << super::format::SPACE_SHIFT;
        for &(start, end) in ranges.iter().chain(std::iter::once(&(disks, disks))) {
            if let Some(gpa) = idx.first_at_or_after(gap_start).filter(|&g| g < start) {
                return Err(RestoreError::PageOutside {
                    file: reader.path().to_path_buf(),
                    gpa,
                    size,
                });
            }
            gap_start = end;
        }
        // Page alignment and order were checked when the reader parsed the index.
    }
    Ok((resolved, stored_pages))
}

/// Opens checkpoint `id` (None: the latest) of `dir` and checks all it can
/// without reading page data.
pub fn open(dir: &Path, id: Option<u32>) -> Result<Opened, RestoreError> {
    let p = prepare(dir, id)?;
    let (chain, stored_pages) = validate(&p.links, &p.meta, &p.config)?;
    Ok(Opened {
        chain: Arc::new(chain),
        config: p.config,
        state: p.state,
        stored_pages,
        checkpoint: p.checkpoint,
    })
}

/// Pages with data (gpa, reader, entry), sorted by gpa: each page's latest
/// version, zero pages left out.
fn data_pages(chain: &ResolvedChain) -> Vec<(u64, usize, IndexEntry)> {
    chain.memory_pages()
}

/// Runs of `pages` that are consecutive in guest memory, come from the same
/// file and lie in one chunk: (first index, count).
fn runs(pages: &[(u64, usize, IndexEntry)], memory: &GuestMemory) -> Vec<(usize, usize)> {
    cut_runs(pages, MAX_RUN_PAGES, |gpa| {
        memory.chunk_of(gpa).map(|c| c.range.end()).unwrap_or(0)
    })
}

/// Runs of `pages` that are consecutive in guest memory and come from the
/// same file, at most `max` pages, none reaching `end_of` its first page's
/// gpa: (first index, count).
fn cut_runs(
    pages: &[(u64, usize, IndexEntry)],
    max: usize,
    end_of: impl Fn(u64) -> u64,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        let end = end_of(pages[i].0);
        let mut j = i + 1;
        while j < pages.len()
            && j - i < max
            && pages[j].1 == pages[i].1
            && pages[j].0 == pages[j - 1].0 + PAGE_SIZE
            && pages[j].0 < end
        {
            j += 1;
        }
        out.push((i, j - i));
        i = j;
    }
    out
}

fn entries(pages: &[(u64, usize, IndexEntry)]) -> Vec<IndexEntry> {
    pages.iter().map(|p| p.2).collect()
}

/// Reads every page straight into guest memory, with one thread per CPU:
/// the cost is mostly faulting in fresh guest pages, which parallelises.
/// Each run's pages are populated (MADV_POPULATE_WRITE) before the read.
fn load_eager(chain: &ResolvedChain, memory: &GuestMemory) -> Result<(), RestoreError> {
    let pages = data_pages(chain);
    let all = runs(&pages, memory);
    let per = all.len().div_ceil(loader_threads()).max(1);
    let pages = &pages;
    std::thread::scope(|s| {
        let workers: Vec<_> = all
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> Result<(), RestoreError> {
                    for &(i, n) in part {
                        let run = &pages[i..i + n];
                        let (gpa, r, _) = run[0];
                        let len = n * PAGE_SIZE as usize;
                        let dst = memory.host_addr(gpa, len as u64).ok_or_else(|| {
                            RestoreError::NotInMemory {
                                file: chain.readers[r].path().to_path_buf(),
                                gpa,
                            }
                        })?;
                        // Fault the run's fresh pages in with one madvise
                        // before reading into them: several times cheaper
                        // than a fault per page inside the read's copy. A
                        // failure costs only speed: the read faults them in.
                        if let Some(c) = memory.chunk_of(gpa) {
                            let _ = c
                                .mapping
                                .populate_range((gpa - c.range.start) as usize, len);
                        }
                        // SAFETY: host_addr checked that [dst, dst+len) lies
                        // in one live chunk mapping; no vCPU runs yet, and
                        // runs do not overlap, so no one else touches it.
                        let out = unsafe { std::slice::from_raw_parts_mut(dst, len) };
                        chain.readers[r]
                            .read_pages(&entries(run), out)
                            .map_err(ChainError::from)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join().unwrap_or_else(|_| {
                Err(RestoreError::Panicked {
                    file: chain.top().path().to_path_buf(),
                    what: "a loader thread",
                })
            })
        })
    })
}

/// A lazy restore could not load a page; the VM stops with this message.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A file's page could not be read or failed its checksum.
    #[error("lazy restore: {0}")]
    Read(#[from] super::format::FormatError),
    /// A page to fill lies in no registered range.
    #[error("lazy restore: guest {gpa:#x} is not registered")]
    Unregistered {
        /// The page.
        gpa: u64,
    },
    /// Copying pages in to resolve a fault failed.
    #[error("lazy restore: resolving the fault at guest {gpa:#x} failed: {source}")]
    Resolve {
        /// The first page.
        gpa: u64,
        /// UFFDIO_COPY's error.
        #[source]
        source: userfaultfd::Error,
    },
    /// Copying pages in in the background failed.
    #[error("lazy restore: loading guest {gpa:#x} failed: {source}")]
    Load {
        /// The first page.
        gpa: u64,
        /// UFFDIO_COPY's error.
        #[source]
        source: userfaultfd::Error,
    },
    /// Mapping the zero page into a hole failed.
    #[error("lazy restore: mapping zeros at guest {gpa:#x} failed: {source}")]
    Zero {
        /// The page.
        gpa: u64,
        /// UFFDIO_ZEROPAGE's error.
        #[source]
        source: userfaultfd::Error,
    },
}

/// Setting up a lazy restore failed; an eager restore (`--eager`) needs
/// none of it.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// No userfaultfd.
    #[error("userfaultfd for a lazy restore failed: {0} (use --eager)")]
    Create(#[source] userfaultfd::Error),
    /// A range of guest memory could not be registered.
    #[error("userfaultfd register of guest {gpa:#x}+{len:#x}: {source}")]
    Register {
        /// Its first guest-physical address.
        gpa: u64,
        /// Its length.
        len: usize,
        /// UFFDIO_REGISTER's error.
        #[source]
        source: userfaultfd::Error,
    },
    /// The fault handler thread could not start.
    #[error("cannot start the fault handler thread: {0}")]
    Handler(#[source] std::io::Error),
}

/// Where the fault handler's last serve ended and how many blocks it had,
/// to tell a sweep through memory from scattered faults.
struct Readahead {
    next: u64,
    blocks: usize,
}

/// Shared state of a lazy load.
struct Lazy {
    uffd: Uffd,
    chain: Arc<ResolvedChain>,
    /// (host start, gpa start, len) of every registered range.
    ranges: Ranges,
    done: AtomicBool,
    /// The first failure; it stops the VM.
    failure: Mutex<Option<LazyError>>,
    /// Who loads each `BLOCK_BYTES` block of guest-physical memory: a
    /// block is claimed whole, by a loader or by the fault handler, which
    /// then makes every page of it present that has data.
    claims: Vec<AtomicU8>,
    /// Held by the fault handler while it serves a fault: once the loaders
    /// are done, taking it means every block the handler claimed is full.
    serving: Mutex<()>,
}

// SAFETY: Uffd is a file descriptor; the raw addresses in `ranges` are plain
// numbers naming guest memory, which outlives the loader (the VM holds it).
unsafe impl Send for Lazy {}
// SAFETY: see Send; all mutation goes through the Mutex and atomics.
unsafe impl Sync for Lazy {}

impl Lazy {
    fn host_of(&self, gpa: u64) -> Option<usize> {
        self.ranges
            .iter()
            .find(|(_, g, l)| gpa >= *g && gpa < g + *l as u64)
            .map(|(h, g, _)| h + (gpa - g) as usize)
    }

    fn fail(&self, e: LazyError) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }

    /// The newest file holding `gpa` and its entry there (that page's
    /// latest version), or None if no file stores it.
    fn latest(&self, gpa: u64) -> Option<(usize, IndexEntry)> {
        self.chain
            .readers
            .iter()
            .enumerate()
            .rev()
            .find_map(|(r, reader)| reader.index().get(gpa).map(|e| (r, e)))
    }

    /// Claims the block holding `gpa` for `who`: true if it was unclaimed,
    /// or a loader's own already.
    fn claim(&self, gpa: u64, who: u8) -> bool {
        let Some(c) = self.claims.get((gpa / BLOCK_BYTES) as usize) else {
            return false;
        };
        match c.compare_exchange(UNCLAIMED, who, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(owner) => owner & !LOADED == who && who != HANDLER,
        }
    }

    /// Marks the block holding `gpa` loaded by the loader that claimed it.
    fn loaded(&self, gpa: u64) {
        if let Some(c) = self.claims.get((gpa / BLOCK_BYTES) as usize) {
            c.fetch_or(LOADED, Ordering::AcqRel);
        }
    }

    /// Waits (a block's load takes tens of microseconds) until the loader
    /// that claimed the block holding `gpa` has loaded it, so that a fault
    /// there costs no read of its own; gives up after `LOADER_WAIT`.
    fn wait_for_loader(&self, gpa: u64) {
        let Some(c) = self.claims.get((gpa / BLOCK_BYTES) as usize) else {
            return;
        };
        let t = Instant::now();
        loop {
            let owner = c.load(Ordering::Acquire);
            if owner & LOADED != 0 || owner <= HANDLER || self.failed() || t.elapsed() > LOADER_WAIT
            {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Serves the page fault at host address `addr`: the whole block around
    /// it if no loader has claimed that block, else the page alone. A fault
    /// just past the blocks the last one was served with is taken for a
    /// sweep through memory (a guest, or a host thread, reading it all),
    /// and served with twice as many blocks as the last, up to
    /// `MAX_FAULT_BLOCKS`, as far as they are unclaimed. Pages already
    /// present are skipped.
    fn serve(&self, addr: usize, buf: &mut [u8], ahead: &mut Readahead) {
        let _serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        let page = addr & !(PAGE_SIZE as usize - 1);
        let Some(&(host, start, _)) = self
            .ranges
            .iter()
            .find(|(h, _, l)| page >= *h && page < h + l)
        else {
            return;
        };
        let gpa = start + (page - host) as u64;
        let (from, to) = if self.claim(gpa, HANDLER) {
            let sweep =
                gpa >= ahead.next && gpa - ahead.next < BLOCK_BYTES * MAX_FAULT_BLOCKS as u64;
            let want = if sweep {
                (ahead.blocks * 2).min(MAX_FAULT_BLOCKS)
            } else {
                1
            };
            let b = gpa - gpa % BLOCK_BYTES;
            let mut to = b + BLOCK_BYTES;
            let mut got = 1;
            while got < want && self.claim(to, HANDLER) {
                to += BLOCK_BYTES;
                got += 1;
            }
            ahead.blocks = got;
            (b, to)
        } else {
            // Most often a loader is loading this block right now.
            self.wait_for_loader(gpa);
            (gpa, gpa + PAGE_SIZE)
        };
        ahead.next = to;
        // A block claimed is filled whole, also where it spans two
        // registered ranges (two nodes: a node's size need only be a
        // multiple of the page size): the loaders skip it.
        let filled = self
            .ranges
            .iter()
            .map(|&(_, g, l)| (from.max(g), to.min(g + l as u64)))
            .filter(|(f, t)| f < t)
            .try_for_each(|(f, t)| self.fill(f, t, buf));
        if let Err(err) = filled {
            self.fail(err);
            // SAFETY: `page` is a registered, page-aligned guest page; zeros
            // unblock the vCPU, which the loader stops at once because of
            // the failure. EEXIST: it is there already.
            let _ = unsafe { self.uffd.zeropage(page as *mut _, PAGE_SIZE as usize, true) };
        }
        // The faulting page may have been loaded by someone else meanwhile,
        // and a copy skipping it wakes nobody.
        let _ = self.uffd.wake(page as *mut _, PAGE_SIZE as usize);
    }

    /// Makes the pages of guest [from, to) (in one registered range, at
    /// most `buf` long) present: each page's latest version, the zero page
    /// where no file has data. Pages already present are left alone.
    fn fill(&self, from: u64, to: u64, buf: &mut [u8]) -> Result<(), LazyError> {
        let n = ((to - from) as usize / PAGE_SIZE as usize).min(buf.len() / PAGE_SIZE as usize);
        let found: Vec<Option<(usize, IndexEntry)>> = (0..n)
            .map(|k| {
                self.latest(from + k as u64 * PAGE_SIZE)
                    .filter(|(_, e)| !e.zero)
            })
            .collect();
        let mut i = 0;
        while i < n {
            let data = found[i].is_some();
            let j = i + found[i..]
                .iter()
                .take_while(|f| f.is_some() == data)
                .count();
            let gpa = from + i as u64 * PAGE_SIZE;
            let len = (j - i) * PAGE_SIZE as usize;
            if data {
                let block: Vec<(usize, IndexEntry)> =
                    found[i..j].iter().flatten().copied().collect();
                let out = &mut buf[..len];
                self.read_block(&block, out)?;
                let dst = self.host_of(gpa).ok_or(LazyError::Unregistered { gpa })?;
                self.copy_missing(out, dst)
                    .map_err(|source| LazyError::Resolve { gpa, source })?;
            } else {
                self.zero_fill((gpa, len as u64))?;
            }
            i = j;
        }
        Ok(())
    }

    /// Reads the pages of `block` (consecutive in guest memory, possibly
    /// from several files) into `out`, checking each crc.
    fn read_block(
        &self,
        block: &[(usize, IndexEntry)],
        out: &mut [u8],
    ) -> Result<(), super::format::FormatError> {
        let mut i = 0;
        while i < block.len() {
            let r = block[i].0;
            let j = i + block[i..].iter().take_while(|(rr, _)| *rr == r).count();
            let entries: Vec<IndexEntry> = block[i..j].iter().map(|b| b.1).collect();
            self.chain.readers[r].read_pages(
                &entries,
                &mut out[i * PAGE_SIZE as usize..j * PAGE_SIZE as usize],
            )?;
            i = j;
        }
        Ok(())
    }

    /// Copies `src` into guest memory at host address `dst` (page-aligned,
    /// inside one registered range), skipping the pages already present: a
    /// first touch or another loader got there first, and what is there
    /// now may already hold the guest's writes.
    fn copy_missing(&self, src: &[u8], dst: usize) -> Result<(), userfaultfd::Error> {
        let mut off = 0;
        let mut retries = 0;
        while off < src.len() {
            let rest = src.len() - off;
            // SAFETY: [dst+off, dst+len) lies in one registered range and is
            // page-aligned; src holds `rest` bytes from `off`.
            let r = unsafe {
                self.uffd.copy(
                    src[off..].as_ptr() as *const _,
                    (dst + off) as *mut _,
                    rest,
                    true,
                )
            };
            match r {
                Ok(_) => return Ok(()),
                // Copied up to an existing page.
                Err(userfaultfd::Error::PartiallyCopied(n))
                    if n > 0 && n < rest && n.is_multiple_of(PAGE_SIZE as usize) =>
                {
                    off += n
                }
                Err(e) if is_exists(&e) => off += PAGE_SIZE as usize,
                // EAGAIN with nothing copied: the address space was changing.
                Err(userfaultfd::Error::PartiallyCopied(_)) if retries < 100 => {
                    retries += 1;
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn handler(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_FAULT_BLOCKS * BLOCK_PAGES * PAGE_SIZE as usize];
        let mut ahead = Readahead { next: 0, blocks: 0 };
        let fd = self.uffd.as_raw_fd();
        while !self.done.load(Ordering::Acquire) {
            if !crate::util::wait_readable(fd, HANDLER_POLL) {
                continue;
            }
            match self.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    self.serve(addr as usize, &mut buf, &mut ahead)
                }
                Ok(_) => {}
                Err(_) => {}
            }
        }
    }

    fn failed(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Loads every page the guest has not touched yet and maps the zero
    /// page into every hole no file stores a page for, so that no later
    /// first touch waits for the handler. The runs are cut into parts of
    /// `PART_RUNS` runs (and the holes among them), which `threads` workers
    /// take in guest-physical order, each as soon as it is free: the loaders
    /// sweep memory side by side, from its start, and none idles while
    /// another still has a long share.
    fn background(
        &self,
        pages: &[(u64, usize, IndexEntry)],
        memory_runs: &[(usize, usize)],
        threads: usize,
    ) {
        let holes = holes(pages, &self.ranges);
        let mut parts =
            block_aligned_parts(pages, memory_runs, memory_runs.len().div_ceil(PART_RUNS));
        if parts.is_empty() {
            parts.push(&[]);
        }
        // Part k owns the holes from its first run's gpa (0 for the first
        // part) up to the next part's first run.
        let bounds: Vec<u64> = (0..parts.len())
            .map(|k| if k == 0 { 0 } else { pages[parts[k][0].0].0 })
            .chain(std::iter::once(u64::MAX))
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (holes, parts, bounds, next) = (&holes, &parts, &bounds, &next);
        let worker = move |who: u8| loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(part) = parts.get(k) else { break };
            let lo = holes.partition_point(|h| h.0 < bounds[k]);
            let hi = holes.partition_point(|h| h.0 < bounds[k + 1]);
            if self.failed() || !self.load_part(pages, part, &holes[lo..hi], who) {
                break;
            }
        };
        std::thread::scope(|s| {
            for t in 1..threads.clamp(1, parts.len()) {
                let who = HANDLER + 1 + t as u8;
                // Without a thread, the others take its share.
                let _ = std::thread::Builder::new()
                    .name("lazy-load".into())
                    .spawn_scoped(s, move || worker(who));
            }
            worker(HANDLER + 1);
        });
    }

    /// Loads the runs `memory_runs` of `pages` and zero-fills `holes`, in
    /// guest-physical order, as loader `who`: the pages of blocks the fault
    /// handler claimed first are its to load, and skipped.
    fn load_part(
        &self,
        pages: &[(u64, usize, IndexEntry)],
        memory_runs: &[(usize, usize)],
        holes: &[(u64, u64)],
        who: u8,
    ) -> bool {
        let mut buf = vec![0u8; BLOCK_PAGES * PAGE_SIZE as usize];
        let mut h = 0;
        for &(i, n) in memory_runs {
            if self.failed() {
                return false;
            }
            let gpa = pages[i].0;
            while h < holes.len() && holes[h].0 < gpa {
                if let Err(e) = self.zero_fill(holes[h]) {
                    self.fail(e);
                    return false;
                }
                h += 1;
            }
            // Block by block, each claimed just before it is loaded: the
            // handler serves whole blocks to a toucher that overtakes this
            // loader, instead of a page at a time.
            let mut k = i;
            while k < i + n {
                let block = pages[k].0 / BLOCK_BYTES;
                let next = k + pages[k..i + n]
                    .iter()
                    .take_while(|p| p.0 / BLOCK_BYTES == block)
                    .count();
                if self.claim(pages[k].0, who) {
                    if let Err(e) = self.load(&pages[k..next], &mut buf) {
                        self.fail(e);
                        return false;
                    }
                    self.loaded(pages[k].0);
                }
                k = next;
            }
        }
        for &hole in &holes[h..] {
            if self.failed() {
                return false;
            }
            if let Err(e) = self.zero_fill(hole) {
                self.fail(e);
                return false;
            }
        }
        true
    }

    /// Reads `run` (pages consecutive in guest memory, in one chunk, from
    /// one file) and copies the pages not yet present into guest memory.
    fn load(&self, run: &[(u64, usize, IndexEntry)], buf: &mut [u8]) -> Result<(), LazyError> {
        let Some(&(gpa, r, _)) = run.first() else {
            return Ok(());
        };
        let len = run.len() * PAGE_SIZE as usize;
        let Some(dst) = self.host_of(gpa) else {
            return Ok(());
        };
        self.chain.readers[r].read_pages(&entries(run), &mut buf[..len])?;
        self.copy_missing(&buf[..len], dst)
            .map_err(|source| LazyError::Load { gpa, source })
    }

    /// Maps the zero page into the hole (gpa, len) of one registered range,
    /// skipping pages already there.
    fn zero_fill(&self, (gpa, len): (u64, u64)) -> Result<(), LazyError> {
        let Some(dst) = self.host_of(gpa) else {
            return Ok(());
        };
        self.zero_span(gpa, dst, len as usize)
    }

    /// [`zero_fill`](Self::zero_fill) of `len` bytes at host `dst` (guest
    /// `gpa`): where a page is already there, the span is halved, so a few
    /// pages touched meanwhile in a hole of thousands cost a few dozen
    /// ioctls, not one a page.
    fn zero_span(&self, gpa: u64, dst: usize, len: usize) -> Result<(), LazyError> {
        // SAFETY: [dst, dst+len) lies in one registered range (holes are
        // cut per range) and is page-aligned.
        match unsafe { self.uffd.zeropage(dst as *mut _, len, true) } {
            Ok(_) => Ok(()),
            Err(e) if len == PAGE_SIZE as usize => {
                if is_exists(&e) {
                    return Ok(());
                }
                Err(LazyError::Zero { gpa, source: e })
            }
            // Some page was there (the zeropage ioctl stops at it).
            Err(_) => {
                let half = (len / PAGE_SIZE as usize / 2) * PAGE_SIZE as usize;
                self.zero_span(gpa, dst, half)?;
                self.zero_span(gpa + half as u64, dst + half, len - half)
            }
        }
    }
}

/// The holes of guest memory (`ranges`) that none of `pages` (sorted by
/// gpa) covers: (gpa, len), sorted, each inside one range.
fn holes(pages: &[(u64, usize, IndexEntry)], ranges: &Ranges) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = ranges.iter().map(|&(_, g, l)| (g, g + l as u64)).collect();
    spans.sort_unstable();
    let mut out = Vec::new();
    let mut i = 0;
    for (start, end) in spans {
        let mut cur = start;
        while i < pages.len() && pages[i].0 < start {
            i += 1;
        }
        while i < pages.len() && pages[i].0 < end {
            let g = pages[i].0;
            if g > cur {
                out.push((cur, g - cur));
            }
            cur = g + PAGE_SIZE;
            i += 1;
        }
        if cur < end {
            out.push((cur, end - cur));
        }
    }
    out
}

/// `memory_runs` cut into at most `count` consecutive parts of about as
/// many runs, each starting with a new block: a block's pages then belong
/// to one part, whose loader loads all of them once it claims the block.
fn block_aligned_parts<'a>(
    pages: &[(u64, usize, IndexEntry)],
    memory_runs: &'a [(usize, usize)],
    count: usize,
) -> Vec<&'a [(usize, usize)]> {
    let per = memory_runs.len().div_ceil(count.max(1)).max(1);
    let mut parts = Vec::new();
    let mut start = 0;
    while start < memory_runs.len() {
        let mut end = (start + per).min(memory_runs.len());
        while end < memory_runs.len() {
            let (i, n) = memory_runs[end - 1];
            let last_block = pages[i + n - 1].0 / BLOCK_BYTES;
            if pages[memory_runs[end].0].0 / BLOCK_BYTES != last_block {
                break;
            }
            end += 1;
        }
        parts.push(&memory_runs[start..end]);
        start = end;
    }
    parts
}

/// Loader threads: one per CPU, at most 8.
fn loader_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

/// The page is already there (EEXIST): someone else resolved it first.
fn is_exists(e: &userfaultfd::Error) -> bool {
    matches!(e, userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno) if *errno as i32 == libc::EEXIST)
}

/// (host start, gpa start, len) of every range registered with userfaultfd:
/// one per piece of host memory (a node, or its part on one side of the
/// MMIO hole).
type Ranges = Vec<(usize, u64, usize)>;

/// A userfaultfd with all guest memory registered, and the registered
/// ranges.
fn register_uffd(m: &GuestMemory) -> Result<(Uffd, Ranges), UffdError> {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(UffdError::Create)?;
    // One registration per piece of host memory, not per chunk: each
    // splits a VMA under mmap_lock, and every fault looks its range up.
    let mut ranges = Vec::new();
    for run in m.contiguous_runs(u64::MAX) {
        let (host, gpa) = (run[0].mapping.as_ptr(), run[0].range.start);
        let len = run.iter().map(|c| c.mapping.len()).sum();
        uffd.register(host as *mut _, len)
            .map_err(|source| UffdError::Register { gpa, len, source })?;
        ranges.push((host as usize, gpa, len));
    }
    Ok((uffd, ranges))
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// What the validation thread returns: the chain and its stored page
/// count, and how long it took (ms).
type Validated = (Result<(ResolvedChain, u64), RestoreError>, f64);

/// What the loader that [`Restoring::take_start`] hands out leaves behind
/// for [`Restoring::finish`].
#[derive(Default)]
struct Loaded {
    /// The chain, once validated, and its stored page count.
    chain: Option<(Arc<ResolvedChain>, u64)>,
    /// The lazy loader (lazy restores).
    lazy: Option<Arc<Lazy>>,
    /// Why the validation refused the chain, if it did.
    refused: Option<RestoreError>,
    phases: RestorePhases,
    /// A clone's image, mapped.
    image: Option<CloneImage>,
}

/// How a restore fills guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Registered with userfaultfd; pages load on first touch and in the
    /// background while the vCPUs run.
    Lazy,
    /// Every page read (checksum verified) before the vCPUs run.
    Eager,
    /// A clone: guest memory maps the checkpoint's image on tmpfs
    /// copy-on-write (built first if no clone made it yet).
    Shared,
}

impl LoadMode {
    /// The mode `--eager` and `--shared` ask for (the CLI refuses both).
    pub fn of(eager: bool, shared: bool) -> LoadMode {
        match (eager, shared) {
            (_, true) => LoadMode::Shared,
            (true, false) => LoadMode::Eager,
            (false, false) => LoadMode::Lazy,
        }
    }
}

/// What [`Restoring::finish`] hands the service.
pub struct Finished {
    /// The restore's report.
    pub report: RestoreReport,
    /// The VM's place in the chain.
    pub position: ChainPosition,
    /// True while a lazy restore loads.
    pub loading: Arc<AtomicBool>,
    /// A clone's hold on its image, for as long as the VM runs.
    pub image: Option<CloneImage>,
}

/// The size of a clone image for `config`'s memory: its highest
/// guest-physical address (pages live at their address; holes cost
/// nothing on tmpfs).
fn image_size(config: &VmConfig) -> u64 {
    crate::memory::layout::layout(
        &config.nodes.iter().map(|n| n.size).collect::<Vec<_>>(),
        config.chunk_size,
    )
    .iter()
    .flatten()
    .map(|r| r.end())
    .max()
    .unwrap_or(0)
}

/// Writes each stored page of `chain` (checksum verified) at its
/// guest-physical address in `out`, one thread per CPU.
fn fill_image(chain: &ResolvedChain, out: &mut [u8]) -> Result<(), RestoreError> {
    let pages = data_pages(chain);
    // The image is one flat file: runs need not stop at chunk ends.
    let all = cut_runs(&pages, MAX_RUN_PAGES, |_| u64::MAX);
    let (base, size) = (out.as_mut_ptr() as usize, out.len());
    let per = all.len().div_ceil(loader_threads()).max(1);
    let pages = &pages;
    std::thread::scope(|s| {
        let workers: Vec<_> = all
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> Result<(), RestoreError> {
                    for &(i, n) in part {
                        let run = &pages[i..i + n];
                        let (gpa, r, _) = run[0];
                        let len = n * PAGE_SIZE as usize;
                        if gpa as usize + len > size {
                            return Err(RestoreError::NotInMemory {
                                file: chain.readers[r].path().to_path_buf(),
                                gpa,
                            });
                        }
                        // SAFETY: [base+gpa, base+gpa+len) lies inside `out`
                        // (checked just above), which the caller lends us
                        // exclusively for the scope; runs do not overlap,
                        // so no two threads write the same bytes.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut((base + gpa as usize) as *mut u8, len)
                        };
                        chain.readers[r]
                            .read_pages(&entries(run), dst)
                            .map_err(ChainError::from)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join().unwrap_or_else(|_| {
                Err(RestoreError::Panicked {
                    file: chain.top().path().to_path_buf(),
                    what: "an image builder thread",
                })
            })
        })
    })
}

/// The name of the image of the checkpoint whose header is `h`.
fn image_key(h: &super::format::Header) -> ImageKey {
    ImageKey {
        chain_id: h.chain_id,
        id: h.id,
        created_unix_ms: h.created_unix_ms,
    }
}

/// Maps `image` copy-on-write under every chunk of `m`, each at its
/// guest-physical address in the image.
fn map_image(image: &CloneImage, m: &GuestMemory) -> Result<(), RestoreError> {
    for c in m.chunks() {
        c.mapping
            .map_file_private(image.file(), c.range.start)
            .map_err(|source| RestoreError::MapImage {
                path: image.path().to_path_buf(),
                gpa: c.range.start,
                source,
            })?;
    }
    Ok(())
}

/// Where `--disk id=NAME,path=FILE` on a restore puts disk NAME (the new
/// file its top lands in, which must not exist).
pub use crate::vmm::config::DiskPlacement;

/// A restored disk: its new top and the chain's view below it.
struct RestoredDisk {
    id: String,
    path: PathBuf,
    top: Option<crate::devices::virtio::block::DiskImage>,
    view: Arc<ChainDisk>,
}

/// Creates each writable disk's top (a new sparse file, at its
/// placement or the default) and opens the chain's view of it; the
/// configuration's disks then name their tops.
fn restored_disks(
    dir: &Path,
    file: &Path,
    id: u32,
    meta: &Meta,
    config: &mut VmConfig,
    placements: &[DiskPlacement],
) -> Result<Vec<RestoredDisk>, RestoreError> {
    let have: Vec<&str> = meta.disks.iter().map(|d| d.id.as_str()).collect();
    for p in placements {
        if !have.contains(&p.id.as_str()) {
            return Err(RestoreError::NoSuchDisk {
                file: file.into(),
                id: p.id.clone(),
                have: if have.is_empty() {
                    "none".into()
                } else {
                    have.join(", ")
                },
            });
        }
    }
    let same = config.disks.len() == meta.disks.len()
        && config
            .disks
            .iter()
            .zip(&meta.disks)
            .all(|(c, d)| c.id == d.id);
    if !same {
        return Err(RestoreError::DiskTable { file: file.into() });
    }
    let mut out: Vec<RestoredDisk> = Vec::new();
    let made = (|| {
        for (cfg, rec) in config.disks.iter_mut().zip(&meta.disks) {
            if rec.readonly {
                // Its image is its content: opened read-only, as saved.
                continue;
            }
            let path = match placements.iter().find(|p| p.id == rec.id) {
                Some(p) => p.path.clone(),
                None => {
                    let path = default_restored_path(dir, &config.name, id, &rec.id);
                    let parent = path.parent().expect("a file in a directory");
                    std::fs::create_dir_all(parent).map_err(|source| {
                        RestoreError::RestoredDir {
                            path: parent.into(),
                            source,
                        }
                    })?;
                    path
                }
            };
            if path.symlink_metadata().is_ok() {
                return Err(RestoreError::DiskExists {
                    disk: rec.id.clone(),
                    path,
                });
            }
            let view = ChainDisk::open(rec).map_err(|e| RestoreError::DiskFile {
                disk: rec.id.clone(),
                source: Box::new(e.into()),
            })?;
            let top =
                crate::devices::virtio::block::DiskImage::create_sparse(&path, rec.size, cfg.cache)
                    .map_err(|e| RestoreError::DiskFile {
                        disk: rec.id.clone(),
                        source: Box::new(e.into()),
                    })?;
            cfg.path = path.clone();
            out.push(RestoredDisk {
                id: rec.id.clone(),
                path,
                top: Some(top),
                view: Arc::new(view),
            });
        }
        Ok(())
    })();
    if let Err(e) = made {
        for d in &out {
            let _ = std::fs::remove_file(&d.path);
        }
        return Err(e);
    }
    Ok(out)
}

/// A restore under way: the restored file's configuration and state read
/// and checked, the rest of the chain being validated on a thread of its
/// own while the service builds the VM.
///
/// Its steps, in order: [`Restoring::begin`], [`Restoring::take_start`]
/// (the state and the loader the new VM fills its memory with), then
/// [`Restoring::finish`] once the VM exists, or [`Restoring::abandon`] if
/// it could not be built.
///
/// Guest memory must hold the checkpoint's pages (or, lazily, be
/// registered with userfaultfd) before the vCPU state is restored:
/// restoring some MSRs makes KVM write into guest memory at once
/// (MSR_KVM_WALL_CLOCK_NEW) or fault a page in to cache it
/// (MSR_KVM_SYSTEM_TIME_NEW). A page faulted in before the registration
/// would keep zeros, since the loader cannot copy into a present page: a
/// Linux guest lost kernel data that way. So the VM calls the loader
/// between creating its memory and restoring the vCPUs, and the loader
/// waits for the validation there: a damaged file anywhere in the chain
/// is refused before the VM runs.
pub struct Restoring {
    dir: PathBuf,
    file: PathBuf,
    /// The configuration the VM is built with (the service may rename it).
    pub config: VmConfig,
    state: Option<VmState>,
    checkpoint: CheckpointRef,
    mode: LoadMode,
    /// The restored file's header (a clone's report comes from it when the
    /// chain is not validated).
    header: super::format::Header,
    /// Files in the chain.
    chain_files: usize,
    /// A clone's image, found at `begin` (then the chain is not validated).
    image: Option<CloneImage>,
    started: Instant,
    validator: Option<std::thread::JoinHandle<Validated>>,
    loaded: Arc<Mutex<Loaded>>,
    /// The writable disks, restored over the chain.
    disks: Vec<RestoredDisk>,
    /// The checkpoint's disks table.
    records: Vec<super::format::DiskRecord>,
}

impl Restoring {
    /// Reads and checks the restored file's config and state, and starts
    /// validating the whole chain on a thread of its own, memory filled
    /// as `mode` says. A clone whose image exists already (and that has
    /// no writable disk, whose reads need the chain) skips the validation:
    /// the image was built from a validated chain, every page checked.
    ///
    /// `name` renames the VM; each writable disk lands in a new sparse
    /// file, at its `placements` entry or by default at
    /// `DIR/restored/<vm>-<id>-<disk>.img`, over the chain's view of it.
    pub fn begin(
        target: &CheckpointTarget,
        mode: LoadMode,
        name: Option<String>,
        placements: &[DiskPlacement],
    ) -> Result<Restoring, RestoreError> {
        let started = Instant::now();
        let mut p = prepare(&target.dir, target.id)?;
        let meta_ms = ms_since(started);
        let file = p
            .links
            .last()
            .expect("a chain holds at least its full checkpoint")
            .path
            .clone();
        if let Some(n) = name {
            p.config.name = n;
        }
        let disks = restored_disks(
            &p.checkpoint.dir,
            &file,
            p.checkpoint.id,
            &p.meta,
            &mut p.config,
            placements,
        )?;
        let records = p.meta.disks.clone();
        let header = p.meta.header.clone();
        let chain_files = p.links.len();
        // A clone of an existing image skips the validation, unless a
        // writable disk needs the chain or a read-only disk's image changed
        // (which the validation refuses).
        let unchanged = || p.meta.disks.iter().all(|d| d.base.changed().is_none());
        let image = match mode {
            LoadMode::Shared if disks.is_empty() && unchanged() => {
                super::image::open(&image_key(&header), image_size(&p.config))?
            }
            _ => None,
        };
        let validator = if image.is_some() {
            None
        } else {
            let (links, meta, config) = (p.links, p.meta, p.config.clone());
            let v = std::thread::Builder::new()
                .name("restore-check".into())
                .spawn(move || {
                    let t = Instant::now();
                    (validate(&links, &meta, &config), ms_since(t))
                })
                .map_err(|source| RestoreError::Thread {
                    file: file.clone(),
                    what: "validation",
                    source,
                })?;
            Some(v)
        };
        let loaded = Loaded {
            phases: RestorePhases {
                meta_ms,
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(Restoring {
            dir: target.dir.clone(),
            file,
            config: p.config,
            state: Some(p.state),
            checkpoint: p.checkpoint,
            mode,
            header,
            chain_files,
            image,
            started,
            validator,
            loaded: Arc::new(Mutex::new(loaded)),
            disks,
            records,
        })
    }

    /// Each restored disk's layers (its new top over the chain's view),
    /// by id, for the devices; once.
    pub fn take_disks(&mut self) -> std::collections::BTreeMap<String, Stack> {
        self.disks
            .iter_mut()
            .filter_map(|d| {
                let top = d.top.take()?;
                Some((d.id.clone(), Stack::over(top, d.view.clone())))
            })
            .collect()
    }

    /// The file restored (for messages about its state).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The saved state, and the loader that fills the new VM's memory
    /// (eagerly, or by registering it for lazy loading) once the chain is
    /// validated; once.
    pub fn take_start(&mut self) -> (VmState, Loader<'static>) {
        let state = self.state.take().expect("take_start is called once");
        let validator = self.validator.take();
        let loaded = self.loaded.clone();
        let (mode, dir) = (self.mode, self.dir.clone());
        let views: Vec<Arc<ChainDisk>> = self.disks.iter().map(|d| d.view.clone()).collect();
        let found = self.image.take();
        let (key, size) = (image_key(&self.header), image_size(&self.config));
        let name = self.config.name.clone();
        let load: Loader<'static> = Box::new(move |m: &GuestMemory| {
            if let Some(mut image) = found {
                // A clone of an image that exists: nothing to read or check.
                let tl = Instant::now();
                let mut l = loaded.lock().unwrap_or_else(|e| e.into_inner());
                map_image(&image, m)?;
                image.register(&key, &name)?;
                l.phases.load_ms = ms_since(tl);
                l.image = Some(image);
                return Ok(());
            }
            let tw = Instant::now();
            let (checked, ms) = match validator.map(|v| v.join()) {
                Some(Ok(r)) => r,
                _ => (
                    Err(RestoreError::Panicked {
                        file: dir.clone(),
                        what: "the validation thread",
                    }),
                    0.0,
                ),
            };
            let mut l = loaded.lock().unwrap_or_else(|e| e.into_inner());
            l.phases.validate_ms = ms;
            l.phases.wait_ms = ms_since(tw);
            let (chain, stored) = match checked {
                Ok(c) => c,
                Err(e) => {
                    // The VM never runs: nothing of the damaged chain is used.
                    let msg = e.to_string();
                    l.refused = Some(e);
                    return Err(msg.into());
                }
            };
            let chain = Arc::new(chain);
            for v in &views {
                v.set_chain(chain.clone());
            }
            if mode == LoadMode::Shared {
                let tl = Instant::now();
                let mut failed = None;
                let image = super::image::open_or_build(&key, size, |out| {
                    fill_image(&chain, out).map_err(|e| {
                        let msg = e.to_string();
                        failed = Some(e);
                        msg
                    })
                });
                let mut image = match image {
                    Ok(i) => i,
                    Err(e) => {
                        let msg = e.to_string();
                        // A damaged page is the checkpoint's fault: answer
                        // with the page's own error.
                        l.refused = Some(failed.unwrap_or(e.into()));
                        return Err(msg.into());
                    }
                };
                map_image(&image, m)?;
                image.register(&key, &name)?;
                l.phases.load_ms = ms_since(tl);
                l.image = Some(image);
            } else if mode == LoadMode::Eager {
                let tl = Instant::now();
                if let Err(e) = load_eager(&chain, m) {
                    // A damaged page is the file's fault, not the VM's: the
                    // restore answers with this error, not the VM's.
                    let msg = e.to_string();
                    l.refused = Some(e);
                    return Err(msg.into());
                }
                l.phases.load_ms = ms_since(tl);
            } else {
                let tu = Instant::now();
                let (uffd, ranges) = register_uffd(m)?;
                let top = ranges
                    .iter()
                    .map(|&(_, g, l)| g + l as u64)
                    .max()
                    .unwrap_or(0);
                let claims = (0..top.div_ceil(BLOCK_BYTES))
                    .map(|_| AtomicU8::new(UNCLAIMED))
                    .collect();
                let lazy = Arc::new(Lazy {
                    uffd,
                    chain: chain.clone(),
                    ranges,
                    done: AtomicBool::new(false),
                    failure: Mutex::new(None),
                    claims,
                    serving: Mutex::new(()),
                });
                let h = lazy.clone();
                std::thread::Builder::new()
                    .name("uffd-faults".into())
                    .spawn(move || h.handler())
                    .map_err(UffdError::Handler)?;
                l.lazy = Some(lazy);
                l.phases.uffd_ms = ms_since(tu);
            }
            l.chain = Some((chain, stored));
            Ok(())
        });
        (state, load)
    }

    /// The VM could not be built: stops what the loader started, and
    /// returns the validation's own error if that is why.
    pub fn abandon(self) -> Option<RestoreError> {
        // The VM never ran: its disks' new files hold nothing of it.
        for d in &self.disks {
            let _ = std::fs::remove_file(&d.path);
        }
        let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lazy) = &l.lazy {
            lazy.done.store(true, Ordering::Release);
        }
        l.refused.take()
    }

    /// The VM `vm` (created paused, with its memory filled or registered)
    /// runs from the checkpoint: its chain position is set, a lazy restore's
    /// background load starts, and the vCPUs run unless `paused`. `built`
    /// is when the VM's creation began. Returns the report, the VM's place
    /// in the chain, and a flag that stays true while a lazy restore loads.
    pub fn finish(
        self,
        vm: &Arc<Vm>,
        paused: bool,
        built: Instant,
    ) -> Result<Finished, RestoreError> {
        let vm_ms = ms_since(built);
        let (chain, lazy, mut phases, image) = {
            let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            (
                l.chain.take(),
                l.lazy.take(),
                l.phases.clone(),
                l.image.take(),
            )
        };
        phases.vm_ms = vm_ms - phases.wait_ms - phases.load_ms - phases.uffd_ms;
        let handler = lazy.clone();
        let fail = |e: RestoreError| {
            if let Some(l) = &handler {
                l.done.store(true, Ordering::Release);
            }
            vm.shutdown();
            e
        };
        let validated = chain.is_some();
        let (chain_files, stored_pages) = match (&chain, &image) {
            (Some((c, stored)), _) => (c.readers.len(), *stored),
            // A clone of an existing image: the image holds the pages.
            (None, Some(i)) => (self.chain_files, i.held_pages()),
            (None, None) => {
                return Err(fail(RestoreError::NotLoaded {
                    file: self.dir.clone(),
                }))
            }
        };
        // The slots were registered with dirty logging on; from now on the
        // chain keeps every page written, for the next incremental.
        let position = ChainPosition {
            last: Some(self.checkpoint.clone()),
            since: Default::default(),
            bases: self
                .records
                .iter()
                .map(|d| (d.id.clone(), d.base.clone()))
                .collect(),
        };
        vm.keep_dirty(position.since.clone())
            .map_err(|e| fail(e.into()))?;
        let loading = Arc::new(AtomicBool::new(lazy.is_some()));
        let filling: Vec<Arc<dyn crate::vmm::store::BlockStore>> = vm
            .stores()
            .into_iter()
            .filter(|s| {
                block_of(&**s).is_ok_and(|b| matches!(b.stack().shape(), Shape::Filling { .. }))
            })
            .collect();
        if self.mode != LoadMode::Lazy {
            // Eager (and clones): every disk is whole before the vCPUs run.
            let tf = Instant::now();
            for s in &filling {
                let b = block_of(&**s).expect("filtered above");
                b.stack().fill(&AtomicBool::new(false)).map_err(|source| {
                    fail(RestoreError::Fill {
                        disk: s.id(),
                        source,
                    })
                })?;
            }
            phases.load_ms += ms_since(tf);
        } else if !filling.is_empty() {
            let vm2 = vm.clone();
            let started = std::thread::Builder::new()
                .name("disk-fill".into())
                .spawn(move || {
                    for s in filling {
                        let Ok(b) = block_of(&*s) else { continue };
                        if let Err(e) = b.stack().fill(&AtomicBool::new(false)) {
                            vm2.fail(format!("disk {}: {e}", s.id()));
                            return;
                        }
                    }
                });
            if let Err(e) = started {
                return Err(fail(RestoreError::Thread {
                    file: self.dir.clone(),
                    what: "disk filler",
                    source: e,
                }));
            }
        }
        if !paused {
            let ts = Instant::now();
            vm.resume_user().map_err(|e| fail(e.into()))?;
            phases.start_ms = ms_since(ts);
        }
        let resume_ms = ms_since(self.started);
        if let Some(lazy) = lazy {
            let vm2 = vm.clone();
            let flag = loading.clone();
            let started = std::thread::Builder::new()
                .name("lazy-load".into())
                .spawn(move || {
                    let pages = data_pages(&lazy.chain);
                    let memory_runs = runs(&pages, &vm2.memory());
                    lazy.background(&pages, &memory_runs, loader_threads());
                    let failure = lazy
                        .failure
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(ToString::to_string);
                    if let Some(f) = failure {
                        vm2.fail(f);
                    } else {
                        // Every page is in once the handler has filled the
                        // blocks it claimed: later first touches need no handler.
                        let _filled = lazy.serving.lock().unwrap_or_else(|e| e.into_inner());
                        for &(h, _, l) in &lazy.ranges {
                            let _ = lazy.uffd.unregister(h as *mut _, l);
                        }
                    }
                    lazy.done.store(true, Ordering::Release);
                    flag.store(false, Ordering::Release);
                });
            if let Err(e) = started {
                return Err(fail(RestoreError::Thread {
                    file: self.dir.clone(),
                    what: "loader",
                    source: e,
                }));
            }
        }
        let top = &self.header;
        let process_ms = crate::util::process_start().elapsed().as_secs_f64() * 1e3;
        let image_report = image
            .as_ref()
            .map(|i| crate::api::checkpoint::CloneImageReport {
                path: i.path().to_path_buf(),
                built: i.built,
                build_ms: i.build_ms,
                validated,
            });
        Ok(Finished {
            report: RestoreReport {
                operation: "restore".into(),
                id: top.id,
                kind: top.kind,
                chain_files,
                lazy: self.mode == LoadMode::Lazy,
                pages: stored_pages,
                disks: self
                    .disks
                    .iter()
                    .map(|d| crate::api::checkpoint::RestoredDisk {
                        id: d.id.clone(),
                        path: d.path.clone(),
                    })
                    .collect(),
                resume_ms,
                phases,
                process_ms,
                image: image_report,
            },
            position,
            loading,
            image,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(gpa: u64, file: usize) -> (u64, usize, IndexEntry) {
        let e = IndexEntry {
            gpa,
            offset: 4096 + gpa,
            crc: 0,
            zero: false,
        };
        (gpa, file, e)
    }

    /// Runs of `pages` as the loader cuts them, without a VM: consecutive
    /// gpas from one file, at most `max` pages.
    fn cut(pages: &[(u64, usize, IndexEntry)], max: usize) -> Vec<(usize, usize)> {
        cut_runs(pages, max, |_| u64::MAX)
    }

    /// Page `gpa`'s content in [`a_block_spanning_two_chunks_is_loaded_whole`].
    fn content(gpa: u64) -> Vec<u8> {
        (0..PAGE_SIZE as usize)
            .map(|i| (gpa / PAGE_SIZE * 7 + i as u64 % 251 + 1) as u8)
            .collect()
    }

    /// A lazy load of `chain` into `ranges` (host, gpa, len), registered
    /// with a new userfaultfd; no handler thread.
    fn lazy_over(ranges: &Ranges, chain: Arc<ResolvedChain>) -> Lazy {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .unwrap();
        for &(h, _, l) in ranges {
            uffd.register(h as *mut _, l).unwrap();
        }
        let top = ranges.iter().map(|&(_, g, l)| g + l as u64).max().unwrap();
        Lazy {
            uffd,
            chain,
            ranges: ranges.clone(),
            done: AtomicBool::new(false),
            failure: Mutex::new(None),
            claims: (0..top.div_ceil(BLOCK_BYTES))
                .map(|_| AtomicU8::new(UNCLAIMED))
                .collect(),
            serving: Mutex::new(()),
        }
    }

    /// A chain of one empty full checkpoint in `dir`.
    fn empty_chain(dir: &Path) -> Arc<ResolvedChain> {
        let w = super::super::format::CheckpointWriter::create(
            dir,
            super::super::format::Header::full(1),
        )
        .unwrap();
        w.finish().unwrap();
        Arc::new(Chain::open(dir).unwrap().resolve(None).unwrap())
    }

    #[test]
    fn zeros_fill_a_hole_around_pages_already_there_and_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        let len = 300 * PAGE_SIZE as usize;
        let m = crate::memory::Mapping::new(len, crate::memory::Backing::Anonymous).unwrap();
        let ranges: Ranges = vec![(m.as_ptr() as usize, 0, len)];
        let lazy = lazy_over(&ranges, empty_chain(dir.path()));
        let there = [0usize, 5, 6, 150, 299];
        for &p in &there {
            let data = content(p as u64);
            // SAFETY: page p of the registered mapping; data holds a page.
            unsafe {
                lazy.uffd
                    .copy(
                        data.as_ptr() as *const _,
                        m.as_ptr().add(p * PAGE_SIZE as usize) as *mut _,
                        PAGE_SIZE as usize,
                        true,
                    )
                    .unwrap();
            }
        }
        lazy.zero_fill((0, len as u64)).unwrap();
        lazy.uffd.unregister(m.as_ptr() as *mut _, len).unwrap();
        for p in 0..300 {
            // SAFETY: page p of a live mapping no one else writes.
            let got = unsafe {
                std::slice::from_raw_parts(
                    m.as_ptr().add(p * PAGE_SIZE as usize),
                    PAGE_SIZE as usize,
                )
            };
            if there.contains(&p) {
                assert!(
                    got == content(p as u64).as_slice(),
                    "page {p} was overwritten"
                );
            } else {
                assert!(got.iter().all(|&b| b == 0), "page {p} is not zero");
            }
        }
    }

    #[test]
    fn a_block_spanning_two_chunks_is_loaded_whole() {
        // Two chunks meeting one page into block 1 (a node's size need only
        // be a multiple of the page size): chunk A holds gpa 0..0x11000,
        // chunk B 0x11000..0x30000. A fault in A's part of block 1 claims
        // the block for the handler, so the loaders skip all of it.
        let (a_len, b_len) = (0x11000usize, 0x1f000usize);
        let dir = tempfile::tempdir().unwrap();
        let mut w = super::super::format::CheckpointWriter::create(
            dir.path(),
            super::super::format::Header::full(1),
        )
        .unwrap();
        for gpa in (0..(a_len + b_len) as u64).step_by(PAGE_SIZE as usize) {
            w.add_page(gpa, &content(gpa)).unwrap();
        }
        w.finish().unwrap();
        let chain = Arc::new(Chain::open(dir.path()).unwrap().resolve(None).unwrap());
        let a = crate::memory::Mapping::new(a_len, crate::memory::Backing::Anonymous).unwrap();
        let b = crate::memory::Mapping::new(b_len, crate::memory::Backing::Anonymous).unwrap();
        let ranges: Ranges = vec![
            (a.as_ptr() as usize, 0, a_len),
            (b.as_ptr() as usize, a_len as u64, b_len),
        ];
        let lazy = lazy_over(&ranges, chain.clone());
        let mut buf = vec![0u8; MAX_FAULT_BLOCKS * BLOCK_PAGES * PAGE_SIZE as usize];
        let mut ahead = Readahead { next: 0, blocks: 0 };
        lazy.serve(a.as_ptr() as usize + 0x10000, &mut buf, &mut ahead);
        let pages = chain.data_pages();
        // The loader's runs: consecutive pages of one chunk.
        let runs: Vec<(usize, usize)> = pages
            .chunk_by(|x, y| (x.0 < a_len as u64) == (y.0 < a_len as u64))
            .scan(0, |at, c| {
                let r = (*at, c.len());
                *at += c.len();
                Some(r)
            })
            .collect();
        lazy.background(&pages, &runs, 2);
        assert!(!lazy.failed(), "{:?}", lazy.failure.lock().unwrap());
        // As a lazy restore does once its loaders are done: a page still
        // missing would read as zeros from now on.
        for &(h, _, l) in &ranges {
            lazy.uffd.unregister(h as *mut _, l).unwrap();
        }
        for &(h, g, l) in &ranges {
            for off in (0..l).step_by(PAGE_SIZE as usize) {
                let gpa = g + off as u64;
                // SAFETY: off < l, inside a live mapping no one else writes.
                let got = unsafe {
                    std::slice::from_raw_parts((h + off) as *const u8, PAGE_SIZE as usize)
                };
                assert!(
                    got == content(gpa).as_slice(),
                    "guest page {gpa:#x} was not loaded"
                );
            }
        }
    }

    #[test]
    fn no_block_is_split_between_two_parts_of_the_background_load() {
        // Pages from two files alternating every 5 pages, with holes: runs
        // end in the middle of blocks everywhere.
        let pages: Vec<_> = (0..4000u64)
            .filter(|p| p % 7 != 3)
            .map(|p| page(p * PAGE_SIZE, (p / 5 % 2) as usize))
            .collect();
        let runs = cut(&pages, 3);
        for count in [1, 2, 3, 7, 64, runs.len(), runs.len() * 2] {
            let parts = block_aligned_parts(&pages, &runs, count);
            assert!(
                parts.len() <= count.max(1),
                "{count}: {} parts",
                parts.len()
            );
            let flat: Vec<(usize, usize)> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(flat, runs, "{count}: the parts are the runs, in order");
            let mut owner = std::collections::HashMap::new();
            for (k, part) in parts.iter().enumerate() {
                assert!(!part.is_empty(), "{count}: part {k} is empty");
                for &(i, n) in *part {
                    for p in &pages[i..i + n] {
                        let o = *owner.entry(p.0 / BLOCK_BYTES).or_insert(k);
                        assert_eq!(o, k, "{count}: block of {:#x} in parts {o} and {k}", p.0);
                    }
                }
            }
        }
        assert!(block_aligned_parts(&pages, &[], 4).is_empty());
    }
}
