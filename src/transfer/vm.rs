//! The real VM as the engine's [`Source`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{PageRun, Source, TransferError};
use crate::memory::cow::CopyOnWrite;
use crate::memory::{DirtyBitmap, PAGE_SIZE};
use crate::vmm::{Pause, Vm, VmError, VmState};

fn no_slot(slot: u32) -> VmError {
    VmError::NoChunk(slot)
}

impl Source for Vm {
    type Pause = Pause;
    type Saved = Vec<crate::vmm::vcpu::VcpuState>;
    type State = VmState;
    type Cow = CopyOnWrite;

    fn slot_pages(&self, slot: u32) -> Option<u64> {
        self.memory()
            .chunks()
            .find(|c| c.slot == slot)
            .map(|c| c.pages())
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        Vm::start_dirty_log(self)
    }

    fn dirty_logging(&self) -> bool {
        Vm::dirty_logging(self)
    }

    fn fetch_dirty(&self, slots: &[u32]) -> Result<BTreeMap<u32, DirtyBitmap>, VmError> {
        Vm::fetch_dirty(self, slots)
    }

    fn present_pages(&self, slot: u32) -> Result<DirtyBitmap, VmError> {
        let mem = self.memory();
        let c = mem
            .chunks()
            .find(|c| c.slot == slot)
            .ok_or_else(|| no_slot(slot))?;
        let words =
            crate::host::pagemap::populated(c.mapping.as_ptr(), c.pages()).map_err(|source| {
                VmError::Pagemap {
                    slot,
                    gpa: c.range.start,
                    source,
                }
            })?;
        let mut b = DirtyBitmap::new(c.pages());
        b.merge_words(&words);
        Ok(b)
    }

    fn set_throttle(&self, percent: u32) {
        Vm::set_throttle(self, percent)
    }

    fn pause_saving(&self) -> Result<(Pause, Self::Saved), VmError> {
        Vm::pause_saving(self)
    }

    fn pause_only(&self) -> Result<(Pause, Self::Saved), VmError> {
        Ok((Vm::pause(self)?, Vec::new()))
    }

    fn paused_since(&self, pause: &Pause) -> Instant {
        pause.since
    }

    fn save_state(&self, pause: &Pause, saved: Self::Saved) -> Result<VmState, VmError> {
        Vm::save_state(self, pause, saved)
    }

    fn resume(&self, pause: Pause) -> Result<Duration, VmError> {
        Vm::resume(self, pause)
    }

    fn arm_cow(&self, slots: &[u32]) -> Result<CopyOnWrite, VmError> {
        let mem = self.memory();
        let ranges: Vec<(usize, usize)> = mem
            .chunks()
            .filter(|c| slots.contains(&c.slot))
            .map(|c| (c.mapping.as_ptr() as usize, c.mapping.len()))
            .collect();
        Ok(CopyOnWrite::arm(&ranges)?)
    }

    fn protect(&self, cow: &CopyOnWrite, slot: u32, pages: &DirtyBitmap) -> Result<u64, VmError> {
        let mem = self.memory();
        let c = mem
            .chunks()
            .find(|c| c.slot == slot)
            .ok_or_else(|| no_slot(slot))?;
        if pages.pages() != c.pages() {
            return Err(VmError::Range {
                slot,
                first: 0,
                count: pages.pages(),
                pages: c.pages(),
            });
        }
        Ok(cow.protect(slot, c.mapping.as_ptr() as usize, c.range.start, pages)?)
    }

    fn drain(
        &self,
        cow: &CopyOnWrite,
        each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        // The read lock keeps the protected memory in place while it is read.
        let _mem = self.memory();
        cow.drain(&mut |r| {
            each(PageRun {
                slot: r.slot,
                first: r.first,
                gpa: r.gpa,
                data: r.data,
            })
        })
    }

    fn cow_faults(&self, cow: &CopyOnWrite) -> u64 {
        cow.faults()
    }

    fn read_pages(
        &self,
        slot: u32,
        pages: &DirtyBitmap,
        each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        // The read lock keeps the chunk's memory in place while it is read.
        let mem = self.memory();
        let c = mem
            .chunks()
            .find(|c| c.slot == slot)
            .ok_or_else(|| no_slot(slot))?;
        for (first, n) in pages.runs() {
            let (off, len) = ((first * PAGE_SIZE) as usize, (n * PAGE_SIZE) as usize);
            let data = c.mapping.volatile(off, len).ok_or(VmError::Range {
                slot,
                first,
                count: n,
                pages: c.pages(),
            })?;
            each(PageRun {
                slot,
                first,
                gpa: c.range.start + off as u64,
                data,
            })?;
        }
        Ok(())
    }
}
