//! The checkpoint-file sink: pages sent while the guest runs go straight to
//! the file; pages sent in the pause are only staged in memory (a memcpy),
//! and written after the guest resumes, so the pause does not grow with
//! disk speed. The file becomes visible only when complete (see
//! `checkpoint::format`).

use std::collections::BTreeMap;

use crate::checkpoint::format::{CheckpointWriter, Header, WrittenCheckpoint};
use crate::memory::{Backing, Chunk, DirtyBitmap, Mapping, PAGE_SIZE};
use crate::transfer::{AfterCommit, Sink, SinkError};
use crate::vmm::{Pause, Vm, VmState};

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

impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn begin(&mut self, _vm: &Vm, _chunks: &[&Chunk]) -> Result<(), SinkError> {
        self.writer =
            Some(CheckpointWriter::create(&self.dir, self.header.clone()).map_err(Self::err)?);
        Ok(())
    }

    fn pages(
        &mut self,
        chunk: &Chunk,
        first: u64,
        data: &[u8],
        paused: bool,
    ) -> Result<u64, SinkError> {
        let gpa = chunk.range.start + first * PAGE_SIZE;
        if paused {
            let at = self.staging_used;
            let room = self.staging.as_ref().filter(|m| at + data.len() <= m.len());
            let where_ = match room {
                Some(m) => {
                    // SAFETY: [at, at+len) lies inside the staging mapping
                    // (checked above), which only this sink uses.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(m.as_ptr().add(at), data.len()) };
                    crate::memory::copy_parallel(dst, data);
                    self.staging_used += data.len();
                    Staged::Room(at, data.len())
                }
                None => Staged::Heap(data.to_vec()),
            };
            self.staged.push((gpa, where_));
            return Ok(data.len() as u64);
        }
        self.writer()?.add_pages(gpa, data).map_err(Self::err)
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
