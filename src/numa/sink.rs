//! The local-memory sink: copies chunks into new memory bound to a target
//! host node, then, in the pause, switches the chunks' KVM slots to it.
//! The old memory is freed after the guest runs again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::memory::volatile::copy_parallel;
use crate::memory::{Backing, Mapping, PAGE_SIZE};
use crate::transfer::{AfterCommit, PageRun, Sink, SinkError, Source};
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

impl Sink<Vm> for LocalSink {
    fn name(&self) -> &'static str {
        "local memory"
    }

    fn begin(&mut self, vm: &Vm, slots: &[u32]) -> Result<(), SinkError> {
        for &slot in slots {
            let (node, range) = {
                let mem = vm.memory();
                mem.nodes
                    .iter()
                    .find_map(|n| {
                        let c = n.chunks.iter().find(|c| c.slot == slot)?;
                        Some((n.guest_node, c.range))
                    })
                    .ok_or_else(|| self.err(format!("no memory slot {slot}")))?
            };
            let m = Vm::node_mapping(node, range.len, self.backing, self.target)
                .map_err(|e| self.err(e.to_string()))?;
            // Fault in now, not in the pause, the pages that will come: those
            // that hold memory. The rest stays untouched, as in the guest.
            // This is also where a node without room says so (ENOMEM).
            let present = vm
                .present_pages(slot)
                .map_err(|e| self.err(e.to_string()))?;
            for (first, n) in present.runs() {
                let (off, len) = ((first * PAGE_SIZE) as usize, (n * PAGE_SIZE) as usize);
                m.populate_range(off, len).map_err(|e| {
                    self.err(format!(
                        "host node {} cannot hold {len} more bytes for guest {:#x}+{len:#x}: {e}",
                        self.target,
                        range.start + off as u64,
                    ))
                })?;
            }
            self.new.insert(slot, m);
        }
        Ok(())
    }

    fn pages(&mut self, run: PageRun<'_>, paused: bool) -> Result<u64, SinkError> {
        let dst = self.new.get(&run.slot).ok_or_else(|| SinkError {
            sink: "local memory",
            message: format!("slot {} was not prepared", run.slot),
        })?;
        let off = (run.first * PAGE_SIZE) as usize;
        let len = run.data.len();
        let out = dst.volatile(off, len).ok_or_else(|| {
            self.err(format!(
                "pages {}+ of slot {} run past its end",
                run.first, run.slot
            ))
        })?;
        let t = Instant::now();
        if paused {
            copy_parallel(&out, &run.data);
        } else {
            run.data.copy_to_volatile_slice(out);
        }
        self.copy_time += t.elapsed();
        self.copied += len as u64;
        Ok(len as u64)
    }

    fn paused_rate(&self) -> f64 {
        if self.copied < (4 << 20) || self.copy_time.is_zero() {
            DEFAULT_COPY_RATE
        } else {
            self.copied as f64 / self.copy_time.as_secs_f64()
        }
    }

    fn needs_vcpu_state(&self) -> bool {
        // Switching memory reads no register: the pause holds vCPUs that
        // sleep instead of waking them to save state.
        false
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
        _state: VmState,
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
