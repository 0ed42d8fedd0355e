//! The real VM as the engine's [`Source`]: its memory chunks, and its
//! disks as slots of their own (`vmm::store`): a disk's written blocks are
//! its dirty log, its layers are where their data is read, and its
//! copy-before-write protection keeps the blocks still to be copied at a
//! pause as they were, as userfaultfd write protection does for memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{PageRun, Source, TransferError};
use crate::memory::cow::CopyOnWrite;
use crate::memory::{DirtyBitmap, VolatileSlice, PAGE_SIZE};
use crate::vmm::store::{is_store_slot, store_address, BlockStore, STORE_SLOTS};
use crate::vmm::{Pause, Vm, VmError, VmState};

/// Blocks of a disk read at a time to hand to a sink.
const STORE_READ_BLOCKS: u64 = 256;

fn no_slot(slot: u32) -> VmError {
    VmError::NoChunk(slot)
}

/// Copy-on-write over a transfer's memory, and the protection of its
/// disks' blocks; dropping it lifts whatever protection is left.
pub struct VmCow {
    memory: Option<CopyOnWrite>,
    stores: Vec<Arc<dyn BlockStore>>,
}

impl Drop for VmCow {
    fn drop(&mut self) {
        for s in &self.stores {
            s.unprotect();
        }
    }
}

fn store(vm: &Vm, slot: u32) -> Result<(usize, Arc<dyn BlockStore>), VmError> {
    let i = slot.wrapping_sub(STORE_SLOTS) as usize;
    vm.stores()
        .get(i)
        .cloned()
        .map(|s| (i, s))
        .ok_or_else(|| no_slot(slot))
}

/// Hands the blocks `bits` of store `index` to `each`, read a batch at a
/// time into a buffer of its own.
fn read_store(
    index: usize,
    slot: u32,
    s: &dyn BlockStore,
    bits: &DirtyBitmap,
    each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
) -> Result<(), TransferError> {
    let mut buf = vec![0u8; (STORE_READ_BLOCKS * PAGE_SIZE) as usize];
    for (first, n) in bits.runs() {
        let mut at = first;
        while at < first + n {
            let k = (first + n - at).min(STORE_READ_BLOCKS);
            let data = &mut buf[..(k * PAGE_SIZE) as usize];
            s.read_blocks(at, data).map_err(|source| VmError::Store {
                disk: s.id(),
                what: format!("reading blocks {at}+{k}"),
                source,
            })?;
            each(PageRun {
                slot,
                first: at,
                gpa: store_address(index, at * PAGE_SIZE),
                data: VolatileSlice::from(&mut data[..]),
            })?;
            at += k;
        }
    }
    Ok(())
}

impl Source for Vm {
    type Pause = Pause;
    type Saved = Vec<crate::vmm::vcpu::VcpuState>;
    type State = VmState;
    type Cow = VmCow;

    fn slot_pages(&self, slot: u32) -> Option<u64> {
        if is_store_slot(slot) {
            return store(self, slot).ok().map(|(_, s)| s.blocks());
        }
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

    fn all_pages(&self, slot: u32) -> Option<DirtyBitmap> {
        if is_store_slot(slot) {
            // A full copy of a disk over its base image sends what differs
            // from the base: the blocks its top holds.
            return store(self, slot).ok().map(|(_, s)| s.held_blocks());
        }
        self.slot_pages(slot).map(DirtyBitmap::full)
    }

    fn present_pages(&self, slot: u32) -> Result<DirtyBitmap, VmError> {
        if is_store_slot(slot) {
            // A sink that starts out empty (a migration's new file) needs
            // every block, whichever layer holds it; holes cross as zero
            // runs.
            return Ok(DirtyBitmap::full(store(self, slot)?.1.blocks()));
        }
        let mem = self.memory();
        let c = mem
            .chunks()
            .find(|c| c.slot == slot)
            .ok_or_else(|| no_slot(slot))?;
        if c.mapping.is_file_backed() {
            // A clone's view of its image: pages it never touched hold the
            // image's data but are absent from pagemap.
            return Ok(DirtyBitmap::full(c.pages()));
        }
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

    fn arm_cow(&self, slots: &[u32]) -> Result<VmCow, VmError> {
        let mem = self.memory();
        let ranges: Vec<(usize, usize)> = mem
            .chunks()
            .filter(|c| slots.contains(&c.slot))
            .map(|c| (c.mapping.as_ptr() as usize, c.mapping.len()))
            .collect();
        let stores = slots
            .iter()
            .filter(|&&s| is_store_slot(s))
            .map(|&s| store(self, s).map(|(_, st)| st))
            .collect::<Result<_, _>>()?;
        // Disks need nothing armed: their device protects blocks itself.
        let memory = match ranges.is_empty() {
            true => None,
            false => Some(CopyOnWrite::arm(&ranges)?),
        };
        Ok(VmCow { memory, stores })
    }

    fn protect(&self, cow: &VmCow, slot: u32, pages: &DirtyBitmap) -> Result<u64, VmError> {
        if is_store_slot(slot) {
            return Ok(store(self, slot)?.1.protect(pages));
        }
        let Some(cow) = cow.memory.as_ref() else {
            return Err(no_slot(slot));
        };
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
        cow: &VmCow,
        each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        if let Some(m) = cow.memory.as_ref() {
            // The read lock keeps the protected memory in place while it is read.
            let _mem = self.memory();
            m.drain(&mut |r| {
                each(PageRun {
                    slot: r.slot,
                    first: r.first,
                    gpa: r.gpa,
                    data: r.data,
                })
            })?;
        }
        let all = self.stores();
        for s in &cow.stores {
            let index = all
                .iter()
                .position(|a| Arc::ptr_eq(a, s))
                .expect("a transfer's disk is the VM's");
            let slot = STORE_SLOTS + index as u32;
            // The sink's error stops the drain; the device only sees that
            // it stopped.
            let mut failed: Option<TransferError> = None;
            let drained = s.drain(&mut |first, bytes: &[u8]| {
                let mut copy = bytes.to_vec();
                let r = each(PageRun {
                    slot,
                    first,
                    gpa: store_address(index, first * PAGE_SIZE),
                    data: VolatileSlice::from(&mut copy[..]),
                });
                r.map_err(|e| {
                    failed = Some(e);
                    std::io::Error::other("the sink failed")
                })
            });
            if let Some(e) = failed {
                return Err(e);
            }
            drained.map_err(|source| VmError::Store {
                disk: s.id(),
                what: "reading protected blocks".into(),
                source,
            })?;
        }
        Ok(())
    }

    fn cow_faults(&self, cow: &VmCow) -> u64 {
        cow.memory.as_ref().map_or(0, |m| m.faults())
            + cow.stores.iter().map(|s| s.saved_blocks()).sum::<u64>()
    }

    fn read_pages(
        &self,
        slot: u32,
        pages: &DirtyBitmap,
        each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        if is_store_slot(slot) {
            let (index, s) = store(self, slot)?;
            return read_store(index, slot, &*s, pages, each);
        }
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
