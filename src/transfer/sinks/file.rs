//! The checkpoint-file sink: pages sent while the guest runs go straight to
//! the file; pages sent in the pause are only staged in memory (a memcpy),
//! and written after the guest resumes, so the pause does not grow with
//! disk speed. The file becomes visible only when complete (see
//! `checkpoint::format`).

use std::collections::BTreeMap;

use crate::checkpoint::format::{CheckpointWriter, Header, WrittenCheckpoint};
use crate::memory::{Chunk, DirtyBitmap, PAGE_SIZE};
use crate::transfer::{AfterCommit, Sink, SinkError};
use crate::vmm::{Pause, Vm, VmState};

/// Rate of staging copies in the pause (memcpy into fresh heap pages runs at
/// ~1-4 GiB/s here; the conservative end).
const STAGING_RATE: f64 = 1.5 * (1u64 << 30) as f64;

/// Writes one checkpoint file.
pub struct FileSink {
    dir: std::path::PathBuf,
    header: Header,
    writer: Option<CheckpointWriter>,
    staged: Vec<(u64, Vec<u8>)>,
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
            self.staged.push((gpa, data.to_vec()));
            return Ok(data.len() as u64);
        }
        self.writer()?.add_pages(gpa, data).map_err(Self::err)
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
            let w = self.writer()?;
            for (gpa, data) in &staged {
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
