//! The local-memory sink: copies chunks into new memory bound to a target
//! host node, then, in the pause, switches the chunks' KVM slots to it.
//! The old memory is freed after the guest runs again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::memory::{Backing, Chunk, Mapping, PAGE_SIZE};
use crate::transfer::{AfterCommit, Sink, SinkError};
use crate::vmm::{Pause, Vm, VmState};

/// Rate assumed for copies in the pause before any copy was timed
/// (ENVIRONMENT.md: memcpy between faulted buffers runs at ~11 GiB/s).
const DEFAULT_COPY_RATE: f64 = 4.0 * (1u64 << 30) as f64;

/// Copies guest memory into new memory on host node `target`.
#[derive(Debug)]
pub struct LocalSink {
    target: u32,
    backing: Backing,
    new: BTreeMap<u32, Mapping>,
    old: Vec<Mapping>,
    copied: u64,
    copy_time: Duration,
}

impl LocalSink {
    /// A sink moving memory to host node `target`.
    pub fn new(target: u32, backing: Backing) -> Self {
        LocalSink {
            target,
            backing,
            new: BTreeMap::new(),
            old: Vec::new(),
            copied: 0,
            copy_time: Duration::ZERO,
        }
    }

    fn err(&self, message: String) -> SinkError {
        SinkError {
            sink: "local memory",
            message,
        }
    }
}

impl Sink for LocalSink {
    fn name(&self) -> &'static str {
        "local memory"
    }

    fn begin(&mut self, vm: &Vm, chunks: &[&Chunk]) -> Result<(), SinkError> {
        for c in chunks {
            let node = vm
                .memory()
                .nodes
                .iter()
                .find(|n| n.chunks.iter().any(|x| x.slot == c.slot))
                .map(|n| n.guest_node)
                .unwrap_or(0);
            let m = Vm::node_mapping(node, c.range.len, self.backing, self.target)
                .map_err(|e| self.err(e.to_string()))?;
            // Fault the new memory in now, not in the pause; this is also
            // where a node without room says so (ENOMEM), before any harm.
            m.populate().map_err(|e| {
                self.err(format!(
                    "host node {} cannot hold {} more bytes for guest {:#x}+{:#x}: {e}",
                    self.target, c.range.len, c.range.start, c.range.len
                ))
            })?;
            self.new.insert(c.slot, m);
        }
        Ok(())
    }

    fn pages(
        &mut self,
        chunk: &Chunk,
        first: u64,
        data: &[u8],
        paused: bool,
    ) -> Result<u64, SinkError> {
        let dst = self.new.get(&chunk.slot).ok_or_else(|| SinkError {
            sink: "local memory",
            message: format!("slot {} was not prepared", chunk.slot),
        })?;
        let off = (first * PAGE_SIZE) as usize;
        if off + data.len() > dst.len() {
            return Err(self.err(format!(
                "pages {first}+ of slot {} run past its end",
                chunk.slot
            )));
        }
        let t = Instant::now();
        // SAFETY: dst is a live mapping of the same size as the chunk and
        // the range was checked above; source and destination are different
        // mappings, so they cannot overlap.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.as_ptr().add(off), data.len()) };
        if paused {
            crate::memory::copy_parallel(out, data);
        } else {
            out.copy_from_slice(data);
        }
        self.copy_time += t.elapsed();
        self.copied += data.len() as u64;
        Ok(data.len() as u64)
    }

    fn paused_rate(&self) -> f64 {
        if self.copied < (4 << 20) || self.copy_time.is_zero() {
            DEFAULT_COPY_RATE
        } else {
            self.copied as f64 / self.copy_time.as_secs_f64()
        }
    }

    fn commit_cost(&self) -> Duration {
        // Two mremaps per chunk move page tables, not pages: ~page-table
        // entries per 4 KiB page, far less per huge page.
        let per_gib = match self.backing {
            Backing::Anonymous => 2e-3,
            Backing::TransparentHuge => 0.1e-3,
        };
        let bytes: usize = self.new.values().map(|m| m.len()).sum();
        Duration::from_secs_f64(per_gib * bytes as f64 / (1u64 << 30) as f64)
    }

    fn commit(
        &mut self,
        vm: &Vm,
        pause: &Pause,
        _state: &VmState,
    ) -> Result<AfterCommit, SinkError> {
        let slots: Vec<u32> = self.new.keys().copied().collect();
        let mut done: Vec<u32> = Vec::new();
        for slot in slots {
            let m = self.new.remove(&slot).expect("key from the map");
            match vm.replace_chunk(pause, slot, m) {
                Ok(old) => {
                    self.old.push(old);
                    done.push(slot);
                }
                Err(e) => {
                    // Switch the chunks already moved back to their old memory.
                    for (s, old) in done.iter().zip(self.old.drain(..).collect::<Vec<_>>()) {
                        if let Ok(m) = vm.replace_chunk(pause, *s, old) {
                            drop(m);
                        }
                    }
                    return Err(self.err(format!(
                        "switching slot {slot} to the new memory failed: {e}"
                    )));
                }
            }
        }
        Ok(AfterCommit::Resume)
    }

    fn complete(&mut self, _vm: &Vm) -> Result<(), SinkError> {
        self.old.clear();
        Ok(())
    }

    fn abort(&mut self, _vm: &Vm) {
        self.new.clear();
    }
}
