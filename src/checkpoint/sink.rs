//! The checkpoint-file sink: pages sent while the guest runs go straight to
//! the file. The pause's last pages normally reach it after the resume,
//! write-protected in the pause and read through the engine's
//! copy-on-write; where that is unavailable they are sent in the pause and
//! only staged in memory (a memcpy), then written after the guest resumes.
//! Either way the pause does not grow with disk speed. The file becomes visible only when complete (see
//! `checkpoint::format`).

use std::collections::BTreeMap;

use super::format::{CheckpointWriter, Header, WrittenCheckpoint};
use crate::memory::volatile::copy_parallel;
use crate::memory::{Backing, DirtyBitmap, Mapping, PAGE_SIZE};
use crate::transfer::{AfterCommit, PageRun, Sink, SinkError};
use crate::vmm::{Pause, Vm, VmState};

/// Bytes of guest memory copied at a time into the sink's own buffer before
/// they are checksummed and written: the guest may change its memory while
/// it is read, and a checksum must cover exactly the bytes written.
const BOUNCE_BYTES: usize = 1 << 20;

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

/// Writes one checkpoint file.
pub struct FileSink {
    dir: std::path::PathBuf,
    header: Header,
    writer: Option<CheckpointWriter>,
    /// Pre-faulted room for the pages sent in the pause.
    staging: Option<Mapping>,
    /// Bytes of `staging` in use.
    staging_used: usize,
    /// Pages staged in the pause: (gpa, where).
    staged: Vec<(u64, Staged)>,
    stop_after: bool,
    taken: Option<BTreeMap<u32, DirtyBitmap>>,
    /// A stable copy of the pages being written while the guest runs.
    bounce: Vec<u8>,
    /// What was written, once complete.
    pub written: Option<WrittenCheckpoint>,
}

impl FileSink {
    /// A sink writing checkpoint `header` into `dir`; with `stop_after` the
    /// VM stays paused after the commit.
    pub fn new(dir: &std::path::Path, header: Header, stop_after: bool) -> Self {
        FileSink {
            dir: dir.to_path_buf(),
            header,
            writer: None,
            staging: None,
            staging_used: 0,
            staged: Vec::new(),
            stop_after,
            taken: None,
            bounce: Vec::new(),
            written: None,
        }
    }

    fn err(message: impl std::fmt::Display) -> SinkError {
        SinkError {
            sink: "checkpoint",
            message: message.to_string(),
        }
    }

    fn writer(&mut self) -> Result<&mut CheckpointWriter, SinkError> {
        self.writer
            .as_mut()
            .ok_or_else(|| Self::err("the checkpoint file is not open"))
    }
}

impl Sink<Vm> for FileSink {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn begin(&mut self, _vm: &Vm, _slots: &[u32]) -> Result<(), SinkError> {
        self.writer =
            Some(CheckpointWriter::create(&self.dir, self.header.clone()).map_err(Self::err)?);
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
        let mut bounce = std::mem::take(&mut self.bounce);
        bounce.resize(BOUNCE_BYTES.min(len), 0);
        let mut written = 0;
        let mut at = 0;
        let result = loop {
            if at >= len {
                break Ok(written);
            }
            let n = bounce.len().min(len - at);
            let part = run.data.subslice(at, n).map_err(Self::err)?;
            part.copy_to(&mut bounce[..n]);
            match self.writer().and_then(|w| {
                w.add_pages(run.gpa + at as u64, &bounce[..n])
                    .map_err(Self::err)
            }) {
                Ok(k) => written += k,
                Err(e) => break Err(e),
            }
            at += n;
        };
        self.bounce = bounce;
        result
    }

    fn before_pause(&mut self, expected_pages: u64) -> Result<(), SinkError> {
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
        state: &VmState,
    ) -> Result<AfterCommit, SinkError> {
        let config = serde_json::to_vec(&state.config).map_err(Self::err)?;
        let st = serde_json::to_vec(state).map_err(Self::err)?;
        let w = self.writer()?;
        w.set_config(&config);
        w.set_state(&st);
        // The next incremental holds what the guest dirties from now on.
        self.taken = vm.reset_checkpoint_dirty();
        Ok(if self.stop_after {
            AfterCommit::StayPaused
        } else {
            AfterCommit::Resume
        })
    }

    fn complete(&mut self, vm: &Vm) -> Result<(), SinkError> {
        let staged = std::mem::take(&mut self.staged);
        let result = (|| {
            let staging = self.staging.take();
            let w = self.writer()?;
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
                w.add_pages(*gpa, data).map_err(Self::err)?;
            }
            let w = self.writer.take().expect("checked above");
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
                    vm.restore_checkpoint_dirty(t);
                }
                Err(e)
            }
        }
    }

    fn abort(&mut self, vm: &Vm) {
        if let Some(w) = self.writer.take() {
            w.abort();
        }
        if let Some(t) = self.taken.take() {
            vm.restore_checkpoint_dirty(t);
        }
    }
}
