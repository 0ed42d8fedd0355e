//! The checkpoint-file sink: pages sent while the guest runs go straight to
//! the file. The pause's last pages normally reach it after the resume,
//! write-protected in the pause and read through the engine's
//! copy-on-write; where that is unavailable they are sent in the pause and
//! only staged in memory (a memcpy), then written after the guest resumes.
//! Either way the pause does not grow with disk speed. The file becomes visible only when complete (see
//! `checkpoint::format`).

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::format::{CheckpointWriter, FormatError, Header, WrittenCheckpoint};
use crate::memory::volatile::copy_parallel;
use crate::memory::{Backing, DirtyAccumulator, DirtyBitmap, Mapping, PAGE_SIZE};
use crate::transfer::{AfterCommit, PageRun, Sink, SinkError};
use crate::vmm::{Pause, Vm, VmConfig, VmState};

/// Bytes of guest memory copied at a time into one of the sink's own
/// buffers before the writer thread checksums and writes them: the guest
/// may change its memory while it is read, and a checksum must cover
/// exactly the bytes written.
const BOUNCE_BYTES: usize = 1 << 20;

/// Buffers in flight between the copying thread and the writer thread.
const BOUNCE_BUFFERS: usize = 4;

/// Rate of staging copies in the pause: memcpy into pre-faulted pages
/// (~11 GiB/s here; a conservative share of it).
const STAGING_RATE: f64 = 4.0 * (1u64 << 30) as f64;

/// Where a staged run of pages is kept.
enum Staged {
    /// In the staging mapping: (offset, length).
    Room(usize, usize),
    /// In a heap buffer (the staging mapping was full).
    Heap(Vec<u8>),
}

/// The writer thread, or reading pages for it, failed.
#[derive(Debug, thiserror::Error)]
enum WriterError {
    /// The thread could not start.
    #[error("spawning the checkpoint writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// Writing the file failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The thread panicked.
    #[error("the checkpoint writer thread panicked")]
    Panicked,
    /// It was joined before.
    #[error("the checkpoint writer was already stopped")]
    Stopped,
    /// A run of guest pages handed to the sink is shorter than it says.
    #[error("guest pages at +{at:#x}: {source}")]
    GuestRange {
        /// Offset into the run.
        at: usize,
        /// vm-memory's error.
        #[source]
        source: vm_memory::VolatileMemoryError,
    },
}

/// Pages for the writer thread: `len` bytes of `buf` go at `gpa`.
struct Job {
    gpa: u64,
    buf: Vec<u8>,
    len: usize,
}

/// The checkpoint writer on a thread of its own, so that copying the next
/// pages out of guest memory overlaps checking, checksumming and writing
/// the previous ones: one thread doing all of it is slower than the disk.
struct WriterThread {
    jobs: Option<SyncSender<Job>>,
    /// Bounce buffers handed back by the writer.
    free: Receiver<Vec<u8>>,
    /// Buffers taken back from `free` by `idle`, used first.
    spare: Vec<Vec<u8>>,
    thread: Option<JoinHandle<Result<CheckpointWriter, FormatError>>>,
}

impl WriterThread {
    fn start(mut w: CheckpointWriter) -> Result<Self, WriterError> {
        let (jobs, rx) = sync_channel::<Job>(BOUNCE_BUFFERS);
        let (give_back, free) = sync_channel::<Vec<u8>>(BOUNCE_BUFFERS);
        for _ in 0..BOUNCE_BUFFERS {
            give_back
                .send(vec![0u8; BOUNCE_BYTES])
                .expect("the channel holds every buffer");
        }
        let thread = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for job in rx {
                    w.add_pages(job.gpa, &job.buf[..job.len])?;
                    if job.buf.len() == BOUNCE_BYTES {
                        // A full channel means the copier is gone.
                        let _ = give_back.try_send(job.buf);
                    }
                }
                Ok(w)
            })
            .map_err(WriterError::Spawn)?;
        Ok(WriterThread {
            jobs: Some(jobs),
            free,
            spare: Vec::new(),
            thread: Some(thread),
        })
    }

    /// Waits for the writer to finish what it was given; its error if it
    /// failed.
    fn join(&mut self) -> Result<CheckpointWriter, WriterError> {
        self.jobs = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(w))) => Ok(w),
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(_)) => Err(WriterError::Panicked),
            None => Err(WriterError::Stopped),
        }
    }

    /// A free bounce buffer; None if the writer stopped (it failed).
    fn buffer(&mut self) -> Option<Vec<u8>> {
        self.spare.pop().or_else(|| self.free.recv().ok())
    }

    /// Waits until the writer has written everything queued (every buffer
    /// is back); false if it stopped (it failed).
    fn idle(&mut self) -> bool {
        while self.spare.len() < BOUNCE_BUFFERS {
            match self.free.recv() {
                Ok(b) => self.spare.push(b),
                Err(_) => return false,
            }
        }
        true
    }

    /// Queues pages; false if the writer stopped (it failed).
    fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }
}

/// Writes one checkpoint file.
pub struct FileSink {
    dir: std::path::PathBuf,
    header: Header,
    writer: Option<WriterThread>,
    /// Pre-faulted room for the pages sent in the pause.
    staging: Option<Mapping>,
    /// Bytes of `staging` in use.
    staging_used: usize,
    /// Pages staged in the pause: (gpa, where).
    staged: Vec<(u64, Staged)>,
    stop_after: bool,
    /// The chain's pages written since its last checkpoint; the commit
    /// takes them (they are this checkpoint's), a failure gives them back.
    since: Arc<DirtyAccumulator>,
    taken: Option<BTreeMap<u32, DirtyBitmap>>,
    /// The configuration and VM state recorded at the commit; serialized
    /// after the resume, which keeps ~0.2 ms of JSON out of the pause.
    state: Option<(VmConfig, VmState)>,
    /// What was written, once complete.
    pub written: Option<WrittenCheckpoint>,
    /// The VM's disks: overlays to switch to in the pause, and the disks
    /// table to record.
    pub disks: Option<super::disks::CheckpointDisks>,
}

impl FileSink {
    /// A sink writing checkpoint `header` into `dir`; with `stop_after` the
    /// VM stays paused after the commit. `since` accumulates the pages the
    /// next incremental checkpoint needs.
    pub fn new(
        dir: &std::path::Path,
        header: Header,
        stop_after: bool,
        since: Arc<DirtyAccumulator>,
    ) -> Self {
        FileSink {
            dir: dir.to_path_buf(),
            header,
            writer: None,
            staging: None,
            staging_used: 0,
            staged: Vec::new(),
            stop_after,
            since,
            taken: None,
            state: None,
            written: None,
            disks: None,
        }
    }

    fn err(message: impl std::fmt::Display) -> SinkError {
        SinkError {
            sink: "checkpoint",
            message: message.to_string(),
        }
    }

    fn writer(&mut self) -> Result<&mut WriterThread, SinkError> {
        self.writer
            .as_mut()
            .ok_or_else(|| Self::err("the checkpoint file is not open"))
    }

    /// The writer's own error, once it stopped.
    fn writer_failed(&mut self) -> SinkError {
        match self.writer.as_mut().map(|w| w.join()) {
            Some(Err(e)) => Self::err(e),
            _ => Self::err("the checkpoint writer stopped"),
        }
    }

    /// Hands `data` (guest memory or a staged copy) to the writer thread,
    /// one bounce buffer at a time.
    fn write(&mut self, gpa: u64, data: &VolatileOrBytes<'_>) -> Result<(), SinkError> {
        let len = data.len();
        let mut at = 0;
        while at < len {
            let Some(mut buf) = self.writer()?.buffer() else {
                return Err(self.writer_failed());
            };
            let n = buf.len().min(len - at);
            if let Err(e) = data.copy_to(at, &mut buf[..n]) {
                // Keep the pool whole: `idle` waits for every buffer.
                self.writer()?.spare.push(buf);
                return Err(Self::err(e));
            }
            let job = Job {
                gpa: gpa + at as u64,
                buf,
                len: n,
            };
            if !self.writer()?.send(job) {
                return Err(self.writer_failed());
            }
            at += n;
        }
        Ok(())
    }
}

/// Pages to write: guest memory (read volatile) or bytes of our own.
enum VolatileOrBytes<'a> {
    Guest(crate::memory::VolatileSlice<'a>),
    Bytes(&'a [u8]),
}

impl VolatileOrBytes<'_> {
    fn len(&self) -> usize {
        match self {
            VolatileOrBytes::Guest(v) => v.len(),
            VolatileOrBytes::Bytes(b) => b.len(),
        }
    }

    fn copy_to(&self, at: usize, out: &mut [u8]) -> Result<(), WriterError> {
        match self {
            VolatileOrBytes::Guest(v) => {
                v.subslice(at, out.len())
                    .map_err(|source| WriterError::GuestRange { at, source })?
                    .copy_to(out);
            }
            VolatileOrBytes::Bytes(b) => out.copy_from_slice(&b[at..at + out.len()]),
        }
        Ok(())
    }
}

impl Sink<Vm> for FileSink {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn begin(&mut self, _vm: &Vm, _slots: &[u32]) -> Result<(), SinkError> {
        if let Some(d) = self.disks.as_mut() {
            d.prepare().map_err(Self::err)?;
        }
        let w = CheckpointWriter::create(&self.dir, self.header.clone()).map_err(Self::err)?;
        self.writer = Some(WriterThread::start(w).map_err(Self::err)?);
        Ok(())
    }

    fn pages(&mut self, run: PageRun<'_>, paused: bool) -> Result<u64, SinkError> {
        let len = run.data.len();
        if paused {
            let at = self.staging_used;
            let room = self.staging.as_ref().and_then(|m| m.volatile(at, len));
            let where_ = match room {
                Some(dst) => {
                    copy_parallel(&dst, &run.data);
                    self.staging_used += len;
                    Staged::Room(at, len)
                }
                None => {
                    let mut v = vec![0u8; len];
                    run.data.copy_to(&mut v[..]);
                    Staged::Heap(v)
                }
            };
            self.staged.push((run.gpa, where_));
            return Ok(len as u64);
        }
        self.write(run.gpa, &VolatileOrBytes::Guest(run.data))?;
        Ok(len as u64)
    }

    fn before_pause(&mut self, expected_pages: u64) -> Result<(), SinkError> {
        // A writer still busy in the pause competes with the vCPU threads
        // for a CPU when they restart (2 CPUs here): let it finish first.
        if !self.writer()?.idle() {
            return Err(self.writer_failed());
        }
        if expected_pages == 0 {
            return Ok(());
        }
        let len = (expected_pages * PAGE_SIZE) as usize;
        if self.staging.as_ref().is_some_and(|m| m.len() >= len) {
            return Ok(());
        }
        // Faulting fresh pages costs ~1 GiB/s here, a copy into faulted
        // pages ~10: fault the room in now, while the guest still runs.
        let m = Mapping::new(len, Backing::Anonymous).map_err(Self::err)?;
        m.populate().map_err(Self::err)?;
        self.staging = Some(m);
        Ok(())
    }

    fn paused_rate(&self) -> f64 {
        STAGING_RATE
    }

    fn takes_late_pages(&self) -> bool {
        // The file is written after the resume anyway; the engine's
        // copy-on-write keeps those pages as they were at the pause.
        true
    }

    fn commit(
        &mut self,
        vm: &Vm,
        _pause: &Pause,
        state: VmState,
    ) -> Result<AfterCommit, SinkError> {
        self.state = Some((vm.config().clone(), state));
        if let Some(d) = self.disks.as_mut() {
            d.switch().map_err(Self::err)?;
        }
        // The next incremental holds what the guest dirties from now on.
        self.taken = Some(self.since.take());
        Ok(if self.stop_after {
            AfterCommit::StayPaused
        } else {
            AfterCommit::Resume
        })
    }

    fn complete(&mut self, _vm: &Vm) -> Result<(), SinkError> {
        let staged = std::mem::take(&mut self.staged);
        let result = (|| {
            let staging = self.staging.take();
            for (gpa, where_) in &staged {
                let data: &[u8] = match where_ {
                    Staged::Heap(v) => v,
                    Staged::Room(at, len) => {
                        let m = staging.as_ref().expect("room was in the staging mapping");
                        // SAFETY: the range was filled in `pages` and lies
                        // inside the mapping, which nothing writes now.
                        unsafe { std::slice::from_raw_parts(m.as_ptr().add(*at), *len) }
                    }
                };
                self.write(*gpa, &VolatileOrBytes::Bytes(data))?;
            }
            let mut w = self.writer()?.join().map_err(Self::err)?;
            self.writer = None;
            let (config, state) = self
                .state
                .take()
                .ok_or_else(|| Self::err("completed before a commit"))?;
            let config = serde_json::to_vec(&config).map_err(Self::err)?;
            let state = serde_json::to_vec(&state).map_err(Self::err)?;
            w.set_config(&config);
            w.set_state(&state);
            if let Some(d) = self.disks.as_mut() {
                w.set_disks(d.records().map_err(Self::err)?);
            }
            w.finish().map_err(Self::err)
        })();
        match result {
            Ok(written) => {
                self.written = Some(written);
                Ok(())
            }
            Err(e) => {
                // This checkpoint will not exist: its pages belong to the next.
                if let Some(t) = self.taken.take() {
                    self.since.give_back(t);
                }
                Err(e)
            }
        }
    }

    fn abort(&mut self, _vm: &Vm) {
        if let Some(d) = self.disks.as_mut() {
            d.abort();
        }
        if let Some(mut w) = self.writer.take() {
            // The writer removes its temp file when dropped.
            if let Ok(w) = w.join() {
                w.abort();
            }
        }
        if let Some(t) = self.taken.take() {
            self.since.give_back(t);
        }
    }
}
