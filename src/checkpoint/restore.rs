//! Restoring a VM from any checkpoint of a chain.
//!
//! Everything that can be checked without reading page data is checked
//! before the VM exists: every file's header, footer, index and state
//! checksums, the chain's links, and that every page lies in guest memory.
//! Then:
//! - **eager**: every page is read (and its checksum verified) straight
//!   into guest memory before any vCPU runs;
//! - **lazy** (default): guest memory is registered with userfaultfd, the
//!   vCPUs start at once, a handler thread serves each first touch from the
//!   file holding that page's latest version, and a background pass loads
//!   the rest. A page found corrupt then stops the VM at once, with a
//!   message naming the file and the page (the guest gets zeros for it, not
//!   the bad data). Use eager restore to check every page before running.
//!
//! Each page is read once, from the file that holds its latest version
//! (`ResolvedChain::page_map`), whatever the chain's length.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use userfaultfd::{Event, Uffd, UffdBuilder};

use super::chain::{Chain, ResolvedChain};
use super::format::{IndexEntry, Kind, PAGE_SIZE};
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

/// Opens checkpoint `id` (None: the latest) of `dir` and checks all it can.
pub fn open(dir: &Path, id: Option<u32>) -> Result<Opened, RestoreError> {
    let t = Instant::now();
    let chain = Chain::open(dir)?;
    let resolved = chain.resolve(id)?;
    tracing::debug!("restore: chain opened and validated in {:?}", t.elapsed());
    let top = resolved.top();
    let file = top.path().to_path_buf();
    let content = |reason: String| RestoreError::Content {
        file: file.clone(),
        reason,
    };
    let state: VmState = serde_json::from_slice(top.state())
        .map_err(|e| content(format!("the saved VM state is not readable: {e}")))?;
    let config: VmConfig = serde_json::from_slice(top.config())
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
    tracing::debug!("restore: page map built in {:?}", t.elapsed());
    let header = top.header().clone();
    let checkpoint = CheckpointRef {
        dir: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
        chain_id: header.chain_id,
        id: header.id,
    };
    Ok(Opened {
        chain: Arc::new(resolved),
        config,
        state,
        stored_pages,
        checkpoint,
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
fn load_eager(o: &Opened, memory: &GuestMemory) -> Result<(), String> {
    let pages = data_pages(&o.chain);
    let all = runs(&pages, memory);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let per = all.len().div_ceil(threads).max(1);
    let (pages, chain) = (&pages, &o.chain);
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
    ranges: Vec<(usize, u64, usize)>,
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
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, HANDLER_POLL.as_millis() as i32) };
            if n <= 0 {
                continue;
            }
            match self.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => self.serve(addr as usize, &mut buf),
                Ok(_) => {}
                Err(_) => {}
            }
        }
    }

    /// Loads every page the guest has not touched yet.
    fn background(&self, pages: &[(u64, usize, IndexEntry)], memory_runs: &[(usize, usize)]) {
        let mut buf = vec![0u8; MAX_RUN_PAGES * PAGE_SIZE];
        for &(i, n) in memory_runs {
            if self
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                return;
            }
            let run = &pages[i..i + n];
            let (gpa, r, _) = run[0];
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
    }
}

fn is_exists(e: &userfaultfd::Error) -> bool {
    matches!(e, userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno) if *errno as i32 == libc::EEXIST)
        || matches!(e, userfaultfd::Error::PartiallyCopied(_))
}

/// Restores checkpoint `id` of `dir` as a VM called `name` (None: the saved
/// name). Lazy unless `eager`. The VM runs unless `paused`.
pub fn restore(
    dir: &Path,
    id: Option<u32>,
    name: Option<String>,
    paused: bool,
    eager: bool,
    console: &crate::devices::Console,
) -> Result<(Arc<Vm>, RestoreReport, crate::devices::Devices), RestoreError> {
    let t = Instant::now();
    let mut o = open(dir, id)?;
    if let Some(n) = name {
        o.config.name = n;
    }
    let state = std::mem::take(&mut o.state.vcpus);
    let machine = o.state.machine.take().map(Box::new);
    let mut devs = crate::devices::build(&o.config, console, &o.state.devices).map_err(|e| {
        RestoreError::Content {
            file: dir.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    let device_set = std::mem::take(&mut devs.set);
    let lazy_slot: Arc<Mutex<Option<Arc<Lazy>>>> = Arc::new(Mutex::new(None));
    let load: crate::vmm::vm::Loader<'_> = if eager {
        Box::new(|m: &GuestMemory| load_eager(&o, m))
    } else {
        let slot = lazy_slot.clone();
        let o = &o;
        Box::new(move |m: &GuestMemory| {
            let uffd = UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .create()
                .map_err(|e| format!("userfaultfd for a lazy restore failed: {e} (use --eager)"))?;
            let mut ranges = Vec::new();
            for c in m.chunks() {
                uffd.register(c.mapping.as_ptr() as *mut _, c.mapping.len())
                    .map_err(|e| {
                        format!("userfaultfd register of guest {:#x}: {e}", c.range.start)
                    })?;
                ranges.push((c.mapping.as_ptr() as usize, c.range.start, c.mapping.len()));
            }
            let lazy = Arc::new(Lazy {
                uffd,
                chain: o.chain.clone(),
                ranges,
                done: AtomicBool::new(false),
                failure: Mutex::new(None),
            });
            let h = lazy.clone();
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(move || h.handler())
                .map_err(|e| e.to_string())?;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(lazy);
            Ok(())
        })
    };
    let vm = Vm::new(
        o.config.clone(),
        Start::Restore {
            vcpus: state,
            machine,
            load,
        },
        paused,
        device_set,
    )?;
    let resume_ms = t.elapsed().as_secs_f64() * 1e3;
    vm.set_last_checkpoint(Some(o.checkpoint.clone()));
    let _ = vm.reset_checkpoint_dirty();
    vm.start_dirty_log()?;
    let lazy = lazy_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(lazy) = lazy {
        let vm2 = vm.clone();
        vm.set_loading(true);
        std::thread::Builder::new()
            .name("lazy-load".into())
            .spawn(move || {
                let pages = data_pages(&lazy.chain);
                let memory_runs = runs(&pages, &vm2.memory());
                lazy.background(&pages, &memory_runs);
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
            })
            .map_err(|e| RestoreError::Content {
                file: dir.to_path_buf(),
                reason: format!("cannot start the loader thread: {e}"),
            })?;
    }
    let top = o.chain.top().header().clone();
    Ok((
        vm,
        RestoreReport {
            operation: "restore".into(),
            id: top.id,
            kind: top.kind,
            chain_files: o.chain.readers.len(),
            lazy: !eager,
            pages: o.stored_pages,
            resume_ms,
        },
        devs,
    ))
}
