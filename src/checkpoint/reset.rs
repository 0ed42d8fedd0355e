//! Resetting a running VM to a checkpoint in place: same process, same
//! API socket, same devices; only the pages written since the VM last
//! stood at the checkpoint are rewritten, then the vCPU, interrupt
//! controller, clock and device state are loaded.
//!
//! The first reset to a checkpoint **arms** it ([`arm`]): the checkpoint
//! is opened and validated once (every file's checksums, the chain, that
//! its VM is this VM), and every stored page is read (its checksum
//! verified) into a base image the VM keeps: an anonymous mapping laid out
//! in guest-physical order, so that a page of the base is found at its
//! guest address. A damaged or foreign checkpoint is refused there, before
//! the VM is touched. Later resets to the same checkpoint read nothing
//! from disk.
//!
//! Which pages to rewrite ([`reset`]): when the VM's chain position says it
//! last stood at this checkpoint (restored from it, checkpointed as it, or
//! reset to it), the pages dirtied since are exactly what the chain keeps
//! for its next incremental (KVM's dirty log and what devices wrote), so
//! those alone are copied back. Otherwise every page is compared with the
//! base and the differing ones copied. Either way the VM then stands at the
//! checkpoint, its chain position says so and the dirty set starts afresh:
//! the next reset again rewrites only what changed.
//!
//! What this module does not do: reset disks (a VM whose devices cannot go
//! back in place is refused, see `Persist::load`), and make resets cheaper
//! than a dirty-log fetch of all memory (the dirty ring).

use std::path::PathBuf;
use std::time::Instant;

use super::chain::ChainError;
use super::restore::RestoreError;
use super::{ChainPosition, CheckpointRef};
use crate::api::checkpoint::CheckpointTarget;
pub use crate::api::vm::{DirtySource, ResetPauseBreakdown, ResetReport};
use crate::memory::{Backing, Mapping, MappingError, PAGE_SIZE};
use crate::vmm::{Vm, VmConfig, VmState};

/// Largest run of pages read with one pread while arming.
const MAX_RUN_PAGES: usize = 256;

/// A reset was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// The checkpoint cannot be opened or is damaged (nothing was touched).
    #[error("{0}")]
    Open(#[from] RestoreError),
    /// A page of the checkpoint cannot be read or fails its checksum
    /// (nothing was touched).
    #[error("{0}")]
    Page(#[from] ChainError),
    /// The checkpoint is of another VM.
    #[error("{}: the checkpoint is of another VM: {what}", file.display())]
    Differs {
        /// The checkpoint file.
        file: PathBuf,
        /// What differs.
        what: String,
    },
    /// The checkpoint's saved state does not fit its own configuration.
    #[error("{}: {source}", file.display())]
    State {
        /// The checkpoint file.
        file: PathBuf,
        /// What does not fit.
        #[source]
        source: crate::vmm::state::StateError,
    },
    /// This VM cannot take the checkpoint's state in place (a device that
    /// cannot be reset yet, say).
    #[error("{}: cannot reset this VM in place: {source}", file.display())]
    Unloadable {
        /// The checkpoint file.
        file: PathBuf,
        /// Why.
        #[source]
        source: crate::vmm::VmError,
    },
    /// The base image could not be mapped.
    #[error("cannot map the reset base image of {} bytes: {source}", len)]
    Image {
        /// Its size.
        len: u64,
        /// What failed.
        #[source]
        source: MappingError,
    },
    /// Pausing, fetching the dirty logs or resuming failed; guest memory
    /// was not rewritten.
    #[error("reset failed: {0}")]
    Vm(#[source] crate::vmm::VmError),
    /// Loading the state failed after memory was rewritten: the VM is
    /// stopped, since it is neither where it was nor at the checkpoint.
    #[error("reset failed after rewriting memory (the VM is stopped): {0}")]
    Load(#[source] crate::vmm::VmError),
}

impl crate::api::Classify for ResetError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            ResetError::Open(e) => e.kind(),
            ResetError::Page(e) => e.kind(),
            // The request must name a checkpoint of this VM.
            ResetError::Differs { .. } => ErrorKind::BadRequest,
            ResetError::State { .. } => ErrorKind::Unusable,
            ResetError::Unloadable { .. } => ErrorKind::Conflict,
            ResetError::Vm(e) => match e.kind() {
                ErrorKind::Conflict => ErrorKind::Conflict,
                _ => ErrorKind::Failed,
            },
            ResetError::Image { .. } | ResetError::Load(_) => ErrorKind::Failed,
        }
    }
}

/// A checkpoint armed for resets: validated once, its pages in memory.
pub struct ResetBase {
    target: CheckpointRef,
    file: PathBuf,
    state: VmState,
    /// Every page of the checkpoint at its guest-physical address (pages
    /// the checkpoint does not store read as zeros).
    image: Mapping,
    /// When arming finished.
    armed_ms: f64,
}

impl std::fmt::Debug for ResetBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetBase")
            .field("target", &self.target)
            .finish()
    }
}

impl ResetBase {
    /// The checkpoint it holds.
    pub fn target(&self) -> &CheckpointRef {
        &self.target
    }

    /// Whether it holds checkpoint `id` (None: the latest, which is never
    /// taken as armed) of directory `dir`.
    pub fn holds(&self, target: &CheckpointTarget) -> bool {
        let dir = target
            .dir
            .canonicalize()
            .unwrap_or_else(|_| target.dir.clone());
        target.id == Some(self.target.id) && dir == self.target.dir
    }
}

/// What differs between the checkpoint's VM and this one, in words; empty
/// if they are the same VM (the name may differ: a restore renames).
fn differences(saved: &VmConfig, live: &VmConfig) -> Vec<String> {
    let mut out = Vec::new();
    if saved.vcpus != live.vcpus {
        out.push(format!(
            "vCPUs: the checkpoint's VM has {}, this one {}",
            saved.vcpus, live.vcpus
        ));
    }
    let size = |c: &VmConfig| crate::util::format_size(c.memory_bytes());
    if saved.memory_bytes() != live.memory_bytes() {
        out.push(format!(
            "memory: the checkpoint's VM has {}, this one {}",
            size(saved),
            size(live)
        ));
    }
    let nodes = |c: &VmConfig| {
        c.nodes
            .iter()
            .map(|n| (n.guest_node, n.size, n.vcpus.clone()))
            .collect::<Vec<_>>()
    };
    if saved.memory_bytes() == live.memory_bytes() && nodes(saved) != nodes(live) {
        out.push(format!(
            "guest nodes: the checkpoint's VM has {} ({:?}), this one {} ({:?})",
            saved.nodes.len(),
            nodes(saved),
            live.nodes.len(),
            nodes(live)
        ));
    }
    if saved.chunk_size != live.chunk_size {
        out.push(format!(
            "chunk size: the checkpoint's VM has {}, this one {}",
            saved.chunk_size, live.chunk_size
        ));
    }
    if saved.guest != live.guest {
        out.push(format!(
            "guest: the checkpoint's VM runs {:?}, this one {:?}",
            saved.guest, live.guest
        ));
    }
    let disks = |c: &VmConfig| c.disks.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
    if disks(saved) != disks(live) {
        out.push(format!(
            "disks: the checkpoint's VM has {:?}, this one {:?}",
            disks(saved),
            disks(live)
        ));
    }
    out
}

/// Arms resets of `vm` to `target`: opens and validates the checkpoint,
/// checks it is of this VM and that its state loads in place, and reads
/// every stored page (checksums verified) into a new base image. The VM is
/// not touched.
pub fn arm(vm: &Vm, target: &CheckpointTarget) -> Result<ResetBase, ResetError> {
    let started = Instant::now();
    let opened = super::restore::open(&target.dir, target.id)?;
    let file = opened.chain.top().path().to_path_buf();
    let diffs = differences(&opened.config, vm.config());
    if !diffs.is_empty() {
        return Err(ResetError::Differs {
            file,
            what: diffs.join("; "),
        });
    }
    opened
        .state
        .check(&opened.config)
        .map_err(|source| ResetError::State {
            file: file.clone(),
            source,
        })?;
    vm.check_load(&opened.state)
        .map_err(|source| ResetError::Unloadable {
            file: file.clone(),
            source,
        })?;
    let len = vm
        .memory()
        .chunks()
        .map(|c| c.range.end())
        .max()
        .unwrap_or(0);
    let image = Mapping::new(len as usize, Backing::Anonymous)
        .map_err(|source| ResetError::Image { len, source })?;
    let pages = opened.chain.data_pages();
    let mut i = 0;
    while i < pages.len() {
        let (gpa, r, _) = pages[i];
        let mut j = i + 1;
        while j < pages.len()
            && j - i < MAX_RUN_PAGES
            && pages[j].1 == r
            && pages[j].0 == pages[j - 1].0 + PAGE_SIZE
        {
            j += 1;
        }
        let n = j - i;
        // Checked by `open`: every stored page lies in guest memory, below `len`.
        let bytes = n * PAGE_SIZE as usize;
        assert!(
            gpa as usize + bytes <= image.len(),
            "page {gpa:#x} past the image"
        );
        // SAFETY: [gpa, gpa + bytes) lies inside the image (asserted above),
        // which this function alone owns until it returns.
        let out =
            unsafe { std::slice::from_raw_parts_mut(image.as_ptr().add(gpa as usize), bytes) };
        let entries: Vec<_> = pages[i..j].iter().map(|p| p.2).collect();
        opened.chain.readers[r]
            .read_pages(&entries, out)
            .map_err(ChainError::from)?;
        i = j;
    }
    Ok(ResetBase {
        target: opened.checkpoint,
        file,
        state: opened.state,
        image,
        armed_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

fn us(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_micros() as u64
}

/// Resets `vm` to `base`'s checkpoint in place and moves its chain
/// `position` there. `armed` says whether `base` was armed for this reset
/// (reported). `in_pause` runs once the VM stands at the checkpoint, before
/// any vCPU runs again (the service fills the guest's input buffer there,
/// writing as a device does so that the next reset rewrites it too). The
/// VM must not be stopped; a paused VM stays paused.
pub fn reset(
    vm: &Vm,
    base: &ResetBase,
    position: &mut ChainPosition,
    armed: bool,
    in_pause: &mut dyn FnMut(),
) -> Result<ResetReport, ResetError> {
    let started = Instant::now();
    // From now on (if not already) the chain keeps every page written.
    vm.keep_dirty(position.since.clone())
        .map_err(ResetError::Vm)?;
    let source = if position.last.as_ref() == Some(&base.target) {
        DirtySource::DirtyLog
    } else {
        DirtySource::Compare
    };
    let chunks = vm.chunk_slots();
    let t_stop = Instant::now();
    let pause = vm.pause().map_err(ResetError::Vm)?;
    let t_fetch = Instant::now();
    // Every page KVM and the devices logged lands in the chain's
    // accumulator; what the fetch returns is the same, per chunk.
    if let Err(e) = vm.fetch_dirty(&chunks) {
        let _ = vm.resume(pause);
        return Err(ResetError::Vm(e));
    }
    let dirty = position.since.take();
    let t_copy = Instant::now();
    let mut rewritten = 0u64;
    let mut pages_total = 0u64;
    {
        let memory = vm.memory();
        let page = PAGE_SIZE as usize;
        for c in memory.chunks() {
            pages_total += c.pages();
            let host = c.mapping.as_ptr();
            // SAFETY: the image spans every chunk's guest range (arm sized
            // it to the highest chunk end) and is only read here.
            let img = unsafe { base.image.as_ptr().add(c.range.start as usize) };
            let copy = |p: u64| {
                let off = p as usize * page;
                // SAFETY: page p lies inside the chunk's live mapping and
                // the image's matching range; the vCPUs are paused and
                // devices quiesced, so no one else writes guest memory, and
                // the memory read guard keeps the chunk from being replaced.
                unsafe { std::ptr::copy_nonoverlapping(img.add(off), host.add(off), page) };
            };
            match source {
                DirtySource::DirtyLog => {
                    if let Some(b) = dirty.get(&c.slot) {
                        for (first, n) in b.runs() {
                            for p in first..first + n {
                                copy(p);
                            }
                            rewritten += n;
                        }
                    }
                }
                DirtySource::Compare => {
                    for p in 0..c.pages() {
                        let off = p as usize * page;
                        // SAFETY: as for `copy`: both pages lie in live
                        // mappings that no one writes meanwhile.
                        let same = unsafe {
                            std::slice::from_raw_parts(host.add(off), page)
                                == std::slice::from_raw_parts(img.add(off), page)
                        };
                        if !same {
                            copy(p);
                            rewritten += 1;
                        }
                    }
                }
            }
        }
    }
    let t_state = Instant::now();
    if let Err(e) = vm.load_state(&pause, &base.state) {
        drop(pause);
        let msg = format!(
            "reset to {}@{} failed after rewriting memory: {e}",
            base.target.dir.display(),
            base.target.id
        );
        vm.fail(msg);
        return Err(ResetError::Load(e));
    }
    // The VM stands at the checkpoint: the next incremental's parent, and
    // the point the next reset's dirty set counts from.
    position.last = Some(base.target.clone());
    in_pause();
    let t_resume = Instant::now();
    let downtime = vm.resume(pause).map_err(ResetError::Vm)?;
    let done = Instant::now();
    tracing::debug!("reset to {}: {rewritten} pages", base.file.display());
    Ok(ResetReport {
        operation: "reset".into(),
        dir: base.target.dir.clone(),
        id: base.target.id,
        downtime_us: downtime.as_micros() as u64,
        total_ms: done.duration_since(started).as_secs_f64() * 1e3
            + if armed { base.armed_ms } else { 0.0 },
        pages_total,
        pages_rewritten: rewritten,
        disk_blocks_rewritten: 0,
        dirty_source: source,
        armed,
        arm_ms: if armed { base.armed_ms } else { 0.0 },
        pause_breakdown: ResetPauseBreakdown {
            stop_us: us(t_stop, t_fetch),
            fetch_us: us(t_fetch, t_copy),
            copy_us: us(t_copy, t_state),
            state_us: us(t_state, t_resume),
            resume_us: us(t_resume, done),
        },
    })
}
