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

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use userfaultfd::{Event, Uffd, UffdBuilder};

use super::chain::{Chain, ChainEntry, ChainError, ResolvedChain};
use super::format::{read_meta, IndexEntry, Kind, Meta, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::vmm::{CheckpointRef, Start, Vm, VmConfig, VmState};

/// Largest run of pages read with one pread.
const MAX_RUN_PAGES: usize = 256;
/// How often the fault handler looks whether loading has finished.
const HANDLER_POLL: Duration = Duration::from_millis(50);

/// A restore failed; no VM was started (or, lazily, the VM was stopped).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The chain or a file is unusable.
    #[error("{0}")]
    Chain(#[from] super::chain::ChainError),
    /// A file is readable but its content is not a vmhop VM.
    #[error("{file}: {reason}")]
    Content {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Creating the VM failed.
    #[error("{0}")]
    Vm(#[from] crate::vmm::VmError),
}

/// What a restore did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    /// Always "restore".
    pub operation: String,
    /// Checkpoint id restored.
    pub id: u32,
    /// Its kind.
    pub kind: Kind,
    /// Files read (the full checkpoint and the incrementals up to id).
    pub chain_files: usize,
    /// Whether pages load lazily after the vCPUs start.
    pub lazy: bool,
    /// Non-zero pages stored in the chain's files.
    pub pages: u64,
    /// Milliseconds from the start of the restore until the vCPUs could run.
    pub resume_ms: f64,
    /// Where `resume_ms` went.
    #[serde(default)]
    pub phases: RestorePhases,
}

/// Where the time until the vCPUs could run went, in milliseconds. The
/// chain's validation runs on a thread of its own beside the VM's creation
/// up to the point where its memory must be filled: `resume_ms` is about
/// `meta` + the longer of `validate` and `vm` + `uffd` or `load` + `start`,
/// not their sum.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RestorePhases {
    /// Listing the directory, checking the chain's links, reading and
    /// checking the restored file's header, footer, config and state.
    pub meta_ms: f64,
    /// Validating every file of the chain (header, footer, config, state
    /// and index checksums, index entries, every page inside guest memory):
    /// the validation thread's own time.
    pub validate_ms: f64,
    /// Building the devices and creating the paused VM (KVM VM, memory
    /// mappings, slots registered with dirty logging on, vCPUs and their
    /// threads, vCPU state), without `wait`, `uffd` and `load`.
    pub vm_ms: f64,
    /// Lazy: creating the userfaultfd and registering guest memory.
    pub uffd_ms: f64,
    /// Waiting for the validation once the VM's memory was ready to fill.
    pub wait_ms: f64,
    /// Eager: reading every page into guest memory.
    pub load_ms: f64,
    /// Starting the vCPUs (0 when restored paused).
    pub start_ms: f64,
}

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

/// Parses `DIR[@ID]`.
pub fn parse_target(s: &str) -> Result<(PathBuf, Option<u32>), String> {
    match s.rsplit_once('@') {
        Some((d, id)) if !d.is_empty() => {
            let id: u32 = id.parse().map_err(|_| {
                format!("'{s}': the part after @ must be a checkpoint id (a number)")
            })?;
            Ok((PathBuf::from(d), Some(id)))
        }
        _ => Ok((PathBuf::from(s), None)),
    }
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
    if meta.header != top.header() {
        return Err(ChainError::Inconsistent {
            file,
            reason: "the file changed since the directory was listed".into(),
        }
        .into());
    }
    let content = |reason: String| RestoreError::Content {
        file: file.clone(),
        reason,
    };
    let state: VmState = serde_json::from_slice(&meta.state)
        .map_err(|e| content(format!("the saved VM state is not readable: {e}")))?;
    let config: VmConfig = serde_json::from_slice(&meta.config)
        .map_err(|e| content(format!("the saved configuration is not readable: {e}")))?;
    config
        .validate()
        .map_err(|e| content(format!("the saved configuration is invalid: {e}")))?;
    if state.version > crate::vmm::state::STATE_VERSION {
        return Err(content(format!(
            "the saved VM state has version {}; this vmhop reads up to version {}",
            state.version,
            crate::vmm::state::STATE_VERSION
        )));
    }
    if state.vcpus.len() != config.vcpus as usize {
        return Err(content(format!(
            "the state holds {} vCPUs but the configuration {}",
            state.vcpus.len(),
            config.vcpus
        )));
    }
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
        stored_pages += idx.iter().filter(|e| !e.zero).count() as u64;
        let mut gap_start = 0u64;
        for &(start, end) in ranges.iter().chain(std::iter::once(&(u64::MAX, u64::MAX))) {
            let from = idx.partition_point(|e| e.gpa < gap_start);
            if let Some(e) = idx.get(from).filter(|e| e.gpa < start) {
                return Err(RestoreError::Content {
                    file: reader.path().to_path_buf(),
                    reason: format!(
                        "page {:#x} lies outside the VM's {size} bytes of memory",
                        e.gpa
                    ),
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
    chain.page_map().into_iter().filter(|p| !p.2.zero).collect()
}

/// Runs of `pages` that are consecutive in guest memory, come from the same
/// file and lie in one chunk: (first index, count).
fn runs(pages: &[(u64, usize, IndexEntry)], memory: &GuestMemory) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        let chunk_end = memory
            .chunk_of(pages[i].0)
            .map(|c| c.range.end())
            .unwrap_or(0);
        let mut j = i + 1;
        while j < pages.len()
            && j - i < MAX_RUN_PAGES
            && pages[j].1 == pages[i].1
            && pages[j].0 == pages[j - 1].0 + PAGE_SIZE as u64
            && pages[j].0 < chunk_end
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
fn load_eager(chain: &ResolvedChain, memory: &GuestMemory) -> Result<(), String> {
    let pages = data_pages(chain);
    let all = runs(&pages, memory);
    let per = all.len().div_ceil(loader_threads()).max(1);
    let pages = &pages;
    std::thread::scope(|s| {
        let workers: Vec<_> = all
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> Result<(), String> {
                    for &(i, n) in part {
                        let run = &pages[i..i + n];
                        let (gpa, r, _) = run[0];
                        let len = n * PAGE_SIZE;
                        let dst = memory
                            .host_addr(gpa, len as u64)
                            .ok_or_else(|| format!("page {gpa:#x} is not in guest memory"))?;
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
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err("a loader thread panicked".into()))
        })
    })
}

/// Shared state of a lazy load.
struct Lazy {
    uffd: Uffd,
    chain: Arc<ResolvedChain>,
    /// (host start, gpa start, len) of every registered chunk.
    ranges: Ranges,
    done: AtomicBool,
    failure: Mutex<Option<String>>,
}

// SAFETY: Uffd is a file descriptor; the raw addresses in `ranges` are plain
// numbers naming guest memory, which outlives the loader (the VM holds it).
unsafe impl Send for Lazy {}
// SAFETY: see Send; all mutation goes through the Mutex and atomics.
unsafe impl Sync for Lazy {}

impl Lazy {
    fn gpa_of(&self, host: usize) -> Option<u64> {
        self.ranges
            .iter()
            .find(|(h, _, l)| host >= *h && host < h + l)
            .map(|(h, g, _)| g + (host - h) as u64)
    }

    fn host_of(&self, gpa: u64) -> Option<usize> {
        self.ranges
            .iter()
            .find(|(_, g, l)| gpa >= *g && gpa < g + *l as u64)
            .map(|(h, g, _)| h + (gpa - g) as usize)
    }

    fn fail(&self, msg: String) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(msg);
    }

    /// Serves one page fault at host address `addr`.
    fn serve(&self, addr: usize, buf: &mut [u8]) {
        let page = addr & !(PAGE_SIZE - 1);
        let Some(gpa) = self.gpa_of(page) else { return };
        // The newest file holding the page has its latest version.
        let found = self
            .chain
            .readers
            .iter()
            .enumerate()
            .rev()
            .find_map(|(r, reader)| {
                let idx = reader.index();
                idx.binary_search_by_key(&gpa, |e| e.gpa)
                    .ok()
                    .map(|i| (r, idx[i]))
            });
        let r = match found {
            Some((_, e)) if e.zero => {
                // SAFETY: `page` is a registered, page-aligned guest page.
                unsafe { self.uffd.zeropage(page as *mut _, PAGE_SIZE, true) }.map(|_| ())
            }
            Some((r, e)) => match self.chain.readers[r].read_page(&e, buf) {
                // SAFETY: `page` is a registered, page-aligned guest page and
                // buf holds PAGE_SIZE bytes.
                Ok(()) => unsafe {
                    self.uffd
                        .copy(buf.as_ptr() as *const _, page as *mut _, PAGE_SIZE, true)
                }
                .map(|_| ()),
                Err(err) => {
                    self.fail(format!("lazy restore: {err}"));
                    // SAFETY: as above; zeros unblock the vCPU, which the
                    // loader stops at once because of the failure.
                    unsafe { self.uffd.zeropage(page as *mut _, PAGE_SIZE, true) }.map(|_| ())
                }
            },
            // SAFETY: as above.
            None => unsafe { self.uffd.zeropage(page as *mut _, PAGE_SIZE, true) }.map(|_| ()),
        };
        if let Err(e) = r {
            // EEXIST: the background pass got there first; wake the waiter.
            if !is_exists(&e) {
                self.fail(format!(
                    "lazy restore: resolving the fault at guest {gpa:#x} failed: {e}"
                ));
            }
            let _ = self.uffd.wake(page as *mut _, PAGE_SIZE);
        }
    }

    fn handler(self: Arc<Self>) {
        let mut buf = vec![0u8; PAGE_SIZE];
        let fd = self.uffd.as_raw_fd();
        while !self.done.load(Ordering::Acquire) {
            if !crate::util::wait_readable(fd, HANDLER_POLL) {
                continue;
            }
            match self.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => self.serve(addr as usize, &mut buf),
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
    /// first touch waits for the handler. `threads` workers each take a
    /// contiguous share of the runs (and the holes among them), each in
    /// guest-physical order.
    fn background(
        &self,
        pages: &[(u64, usize, IndexEntry)],
        memory_runs: &[(usize, usize)],
        threads: usize,
    ) {
        let holes = holes(pages, &self.ranges);
        let per = memory_runs.len().div_ceil(threads.max(1)).max(1);
        let parts: Vec<&[(usize, usize)]> = memory_runs.chunks(per).collect();
        // Part k owns the holes from its first run's gpa (0 for the first
        // part) up to the next part's first run.
        let bounds: Vec<u64> = (0..parts.len())
            .map(|k| if k == 0 { 0 } else { pages[parts[k][0].0].0 })
            .chain(std::iter::once(u64::MAX))
            .collect();
        let holes = &holes;
        std::thread::scope(|s| {
            for (k, part) in parts.iter().enumerate() {
                let (from, to) = (bounds[k], bounds[k + 1]);
                let lo = holes.partition_point(|h| h.0 < from);
                let hi = holes.partition_point(|h| h.0 < to);
                let mine = &holes[lo..hi];
                let work = move || self.load_part(pages, part, mine);
                if k + 1 == parts.len() {
                    work();
                } else if std::thread::Builder::new()
                    .name("lazy-load".into())
                    .spawn_scoped(s, work)
                    .is_err()
                {
                    // No thread: do its share here.
                    self.load_part(pages, part, mine);
                }
            }
            if parts.is_empty() {
                self.load_part(pages, &[], holes);
            }
        });
    }

    /// Loads the runs `memory_runs` of `pages` and zero-fills `holes`, in
    /// guest-physical order.
    fn load_part(
        &self,
        pages: &[(u64, usize, IndexEntry)],
        memory_runs: &[(usize, usize)],
        holes: &[(u64, u64)],
    ) {
        let mut buf = vec![0u8; MAX_RUN_PAGES * PAGE_SIZE];
        let mut h = 0;
        for &(i, n) in memory_runs {
            if self.failed() {
                return;
            }
            let run = &pages[i..i + n];
            let (gpa, r, _) = run[0];
            while h < holes.len() && holes[h].0 < gpa {
                if !self.zero_fill(holes[h]) {
                    return;
                }
                h += 1;
            }
            let len = n * PAGE_SIZE;
            let Some(dst) = self.host_of(gpa) else {
                continue;
            };
            if let Err(e) = self.chain.readers[r].read_pages(&entries(run), &mut buf[..len]) {
                self.fail(format!("lazy restore: {e}"));
                return;
            }
            // SAFETY: [dst, dst+len) lies in one registered chunk; buf holds len bytes.
            let whole = unsafe {
                self.uffd
                    .copy(buf.as_ptr() as *const _, dst as *mut _, len, true)
            };
            if whole.map(|c| c == len).unwrap_or(false) {
                continue;
            }
            // Some pages were faulted in meanwhile: copy page by page.
            for p in 0..n {
                let off = p * PAGE_SIZE;
                // SAFETY: as above, one page of the run.
                let r = unsafe {
                    self.uffd.copy(
                        buf[off..].as_ptr() as *const _,
                        (dst + off) as *mut _,
                        PAGE_SIZE,
                        true,
                    )
                };
                if let Err(e) = r {
                    if !is_exists(&e) {
                        self.fail(format!(
                            "lazy restore: loading guest {:#x} failed: {e}",
                            gpa + off as u64
                        ));
                        return;
                    }
                }
            }
        }
        for &hole in &holes[h..] {
            if self.failed() || !self.zero_fill(hole) {
                return;
            }
        }
    }

    /// Maps the zero page into the hole (gpa, len) of one registered chunk,
    /// skipping pages already there; false (and the failure recorded) if
    /// that failed.
    fn zero_fill(&self, (gpa, len): (u64, u64)) -> bool {
        let Some(dst) = self.host_of(gpa) else {
            return true;
        };
        // SAFETY: [dst, dst+len) lies in one registered chunk (holes are
        // cut per chunk) and is page-aligned.
        if unsafe { self.uffd.zeropage(dst as *mut _, len as usize, true) }.is_ok() {
            return true;
        }
        // Some page of the hole was touched meanwhile: page by page.
        for off in (0..len as usize).step_by(PAGE_SIZE) {
            // SAFETY: as above, one page of the hole.
            let r = unsafe { self.uffd.zeropage((dst + off) as *mut _, PAGE_SIZE, true) };
            if let Err(e) = r {
                if !is_exists(&e) {
                    self.fail(format!(
                        "lazy restore: mapping zeros at guest {:#x} failed: {e}",
                        gpa + off as u64
                    ));
                    return false;
                }
            }
        }
        true
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
            cur = g + PAGE_SIZE as u64;
            i += 1;
        }
        if cur < end {
            out.push((cur, end - cur));
        }
    }
    out
}

/// Loader threads: one per CPU, at most 8.
fn loader_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

fn is_exists(e: &userfaultfd::Error) -> bool {
    matches!(e, userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno) if *errno as i32 == libc::EEXIST)
        || matches!(e, userfaultfd::Error::PartiallyCopied(_))
}

/// (host start, gpa start, len) of every registered chunk.
type Ranges = Vec<(usize, u64, usize)>;

/// A userfaultfd with every chunk of guest memory registered, and the
/// chunks.
fn register_uffd(m: &GuestMemory) -> Result<(Uffd, Ranges), String> {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(|e| format!("userfaultfd for a lazy restore failed: {e} (use --eager)"))?;
    let mut ranges = Vec::new();
    for c in m.chunks() {
        uffd.register(c.mapping.as_ptr() as *mut _, c.mapping.len())
            .map_err(|e| format!("userfaultfd register of guest {:#x}: {e}", c.range.start))?;
        ranges.push((c.mapping.as_ptr() as usize, c.range.start, c.mapping.len()));
    }
    Ok((uffd, ranges))
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Restores checkpoint `id` of `dir` as a VM called `name` (None: the saved
/// name). Lazy unless `eager`. The VM runs unless `paused`.
///
/// The restored file's config and state are read first; then the whole
/// chain is validated on a thread of its own while the VM is created
/// paused. Its memory is filled (eager) or registered for lazy loading
/// only after the validation succeeded, and before the vCPU state goes in:
/// a damaged header, footer, index, config or state in any file of the
/// chain is refused and the VM, which never ran, is not created.
pub fn restore(
    dir: &Path,
    id: Option<u32>,
    name: Option<String>,
    paused: bool,
    eager: bool,
    console: &crate::devices::Console,
) -> Result<(Arc<Vm>, RestoreReport, crate::devices::Devices), RestoreError> {
    let t = Instant::now();
    let mut phases = RestorePhases::default();
    let mut p = prepare(dir, id)?;
    phases.meta_ms = ms_since(t);
    if let Some(n) = name {
        p.config.name = n;
    }
    let Prepared {
        links,
        meta,
        config,
        mut state,
        checkpoint,
    } = p;
    // Set by the loader Vm::new calls once the chain is validated.
    let loaded: RefCell<Option<(Arc<ResolvedChain>, u64)>> = RefCell::new(None);
    let lazy_slot: RefCell<Option<Arc<Lazy>>> = RefCell::new(None);
    let refused: RefCell<Option<RestoreError>> = RefCell::new(None);
    // The loader fills in its phases.
    let phases = RefCell::new(phases);
    let built = std::thread::scope(|s| {
        let validator = std::thread::Builder::new()
            .name("restore-check".into())
            .spawn_scoped(s, || {
                let t = Instant::now();
                (validate(&links, &meta, &config), ms_since(t))
            })
            .map_err(|e| RestoreError::Content {
                file: dir.to_path_buf(),
                reason: format!("cannot start the validation thread: {e}"),
            })?;
        // Guest memory must hold the checkpoint's pages (or, lazily, be
        // registered with userfaultfd) before the vCPU state is restored:
        // restoring some MSRs makes KVM write into guest memory at once
        // (MSR_KVM_WALL_CLOCK_NEW) or fault a page in to cache it
        // (MSR_KVM_SYSTEM_TIME_NEW). A page faulted in before the
        // registration would keep zeros, since the loader cannot copy into
        // a present page: a Linux guest lost kernel data that way. So Vm::new
        // calls this loader between creating the memory and restoring the
        // vCPUs, and it waits for the validation there.
        let load: crate::vmm::vm::Loader<'_> = Box::new(|m: &GuestMemory| {
            let tw = Instant::now();
            let (checked, ms) = validator.join().unwrap_or_else(|_| {
                (
                    Err(RestoreError::Content {
                        file: dir.to_path_buf(),
                        reason: "the validation thread panicked".into(),
                    }),
                    0.0,
                )
            });
            phases.borrow_mut().validate_ms = ms;
            phases.borrow_mut().wait_ms = ms_since(tw);
            let (chain, stored) = match checked {
                Ok(c) => c,
                Err(e) => {
                    // The VM never runs: nothing of the damaged chain is used.
                    let msg = e.to_string();
                    *refused.borrow_mut() = Some(e);
                    return Err(msg);
                }
            };
            let chain = Arc::new(chain);
            if eager {
                let tl = Instant::now();
                load_eager(&chain, m)?;
                phases.borrow_mut().load_ms = ms_since(tl);
            } else {
                let tu = Instant::now();
                let (uffd, ranges) = register_uffd(m)?;
                let lazy = Arc::new(Lazy {
                    uffd,
                    chain: chain.clone(),
                    ranges,
                    done: AtomicBool::new(false),
                    failure: Mutex::new(None),
                });
                let h = lazy.clone();
                std::thread::Builder::new()
                    .name("uffd-faults".into())
                    .spawn(move || h.handler())
                    .map_err(|e| format!("cannot start the fault handler thread: {e}"))?;
                *lazy_slot.borrow_mut() = Some(lazy);
                phases.borrow_mut().uffd_ms = ms_since(tu);
            }
            *loaded.borrow_mut() = Some((chain, stored));
            Ok(())
        });
        let tv = Instant::now();
        let mut devs = crate::devices::build(&config, console, &state.devices).map_err(|e| {
            RestoreError::Content {
                file: dir.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let device_set = std::mem::take(&mut devs.set);
        let vm = Vm::new(
            config.clone(),
            Start::Restore {
                vcpus: std::mem::take(&mut state.vcpus),
                machine: state.machine.take().map(Box::new),
                load,
                // Before any vCPU runs, so that no guest write escapes
                // the next incremental checkpoint.
                dirty_log: true,
            },
            true,
            device_set,
        );
        let vm_ms = ms_since(tv);
        Ok::<_, RestoreError>((vm, devs, vm_ms))
    });
    let lazy = lazy_slot.into_inner();
    // A handler started for a VM that will not exist stops polling.
    let handler_done = lazy.clone();
    let stop_handler = || {
        if let Some(l) = &handler_done {
            l.done.store(true, Ordering::Release);
        }
    };
    let (vm, devs, vm_ms) = match built {
        Ok((Ok(vm), devs, ms)) => (vm, devs, ms),
        Ok((Err(e), ..)) => {
            stop_handler();
            return Err(refused.into_inner().unwrap_or(e.into()));
        }
        Err(e) => {
            stop_handler();
            return Err(e);
        }
    };
    let mut phases = phases.into_inner();
    phases.vm_ms = vm_ms - phases.wait_ms - phases.load_ms - phases.uffd_ms;
    let fail = |e: RestoreError| {
        stop_handler();
        vm.shutdown();
        e
    };
    let Some((chain, stored_pages)) = loaded.into_inner() else {
        return Err(fail(RestoreError::Content {
            file: dir.to_path_buf(),
            reason: "the VM was created without loading its memory".into(),
        }));
    };
    vm.set_last_checkpoint(Some(checkpoint.clone()));
    let _ = vm.reset_checkpoint_dirty();
    // A no-op: the slots were registered with it (above).
    vm.start_dirty_log().map_err(|e| fail(e.into()))?;
    if lazy.is_some() {
        vm.set_loading(true);
    }
    if !paused {
        let ts = Instant::now();
        vm.resume_user().map_err(|e| fail(e.into()))?;
        phases.start_ms = ms_since(ts);
    }
    let resume_ms = ms_since(t);
    if let Some(lazy) = lazy {
        let vm2 = vm.clone();
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
                    .clone();
                if let Some(f) = failure {
                    vm2.fail(f);
                } else {
                    // Every page is in: later first touches need no handler.
                    for &(h, _, l) in &lazy.ranges {
                        let _ = lazy.uffd.unregister(h as *mut _, l);
                    }
                }
                lazy.done.store(true, Ordering::Release);
                vm2.set_loading(false);
            });
        if let Err(e) = started {
            return Err(fail(RestoreError::Content {
                file: dir.to_path_buf(),
                reason: format!("cannot start the loader thread: {e}"),
            }));
        }
    }
    let top = chain.top().header().clone();
    Ok((
        vm,
        RestoreReport {
            operation: "restore".into(),
            id: top.id,
            kind: top.kind,
            chain_files: chain.readers.len(),
            lazy: !eager,
            pages: stored_pages,
            resume_ms,
            phases,
        },
        devs,
    ))
}
