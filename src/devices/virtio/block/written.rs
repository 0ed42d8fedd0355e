//! Which blocks of a disk the guest changed: the disk's dirty set, for a
//! checkpoint (only the blocks written since its parent) or a migration
//! with `--copy-storage` (written blocks are dirty blocks).
//!
//! Two bitmaps over the disk at one granularity: `data` (the block holds
//! new bytes: copy them) and `zero` (DISCARD or WRITE_ZEROES covered the
//! whole block: it reads as zeros, record a zero extent, copy nothing). A
//! block is in at most one of them: the last change wins. A block only
//! partly covered by a zeroing request holds data.
//!
//! Changes are recorded after the I/O (as devices mark guest memory after
//! writing it), so a taker that then reads the block sees the new bytes,
//! or the block shows again in its next take.

use std::sync::Mutex;

use crate::memory::DirtyBitmap;

/// Default granularity: one block-size block (and one guest page).
pub const DEFAULT_GRANULARITY: u64 = 4096;

/// The blocks changed since the last take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenSet {
    /// Bytes per bit.
    pub granularity: u64,
    /// Blocks holding new data.
    pub data: DirtyBitmap,
    /// Blocks now all zeros (discarded or zeroed whole).
    pub zero: DirtyBitmap,
}

impl WrittenSet {
    fn new(granularity: u64, blocks: u64) -> Self {
        WrittenSet {
            granularity,
            data: DirtyBitmap::new(blocks),
            zero: DirtyBitmap::new(blocks),
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.data.count() == 0 && self.zero.count() == 0
    }
}

/// A disk's changed blocks, recorded by its worker, taken by a checkpoint.
#[derive(Debug)]
pub struct WrittenBlocks {
    granularity: u64,
    blocks: u64,
    set: Mutex<WrittenSet>,
}

impl WrittenBlocks {
    /// Tracks a disk of `bytes` bytes at `granularity` (a power of two).
    pub fn new(bytes: u64, granularity: u64) -> Self {
        assert!(granularity.is_power_of_two(), "granularity {granularity}");
        let blocks = bytes.div_ceil(granularity);
        WrittenBlocks {
            granularity,
            blocks,
            set: Mutex::new(WrittenSet::new(granularity, blocks)),
        }
    }

    /// Bytes per tracked block.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WrittenSet> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes `offset .. offset + len` were written (or may have been: a
    /// write that failed half-way counts).
    pub fn record_write(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = ((offset + len - 1) / self.granularity).min(self.blocks.saturating_sub(1));
        let mut s = self.lock();
        for b in first..=last {
            s.data.set(b);
            s.zero.unset(b);
        }
    }

    /// Bytes `offset .. offset + len` now read as zeros. Whole blocks become
    /// zero extents; the partly covered blocks at either end hold data.
    pub fn record_zero(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.granularity;
        let end = offset + len;
        let whole_first = offset.div_ceil(g);
        let whole_end = end / g;
        if whole_first >= whole_end {
            self.record_write(offset, len);
            return;
        }
        if !offset.is_multiple_of(g) {
            self.record_write(offset, whole_first * g - offset);
        }
        if !end.is_multiple_of(g) {
            self.record_write(whole_end * g, end - whole_end * g);
        }
        let mut s = self.lock();
        for b in whole_first..whole_end.min(self.blocks) {
            s.zero.set(b);
            s.data.unset(b);
        }
    }

    /// Takes the changes so far, leaving none.
    pub fn take(&self) -> WrittenSet {
        let mut s = self.lock();
        std::mem::replace(&mut *s, WrittenSet::new(self.granularity, self.blocks))
    }

    /// Gives back a set taken by [`WrittenBlocks::take`] whose checkpoint
    /// failed. Blocks changed since the take keep their newer state.
    pub fn merge_back(&self, older: WrittenSet) {
        let mut s = self.lock();
        for b in 0..self.blocks.min(older.data.pages()) {
            if s.data.get(b) || s.zero.get(b) {
                continue;
            }
            if older.data.get(b) {
                s.data.set(b);
            } else if older.zero.get(b) {
                s.zero.set(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_zeroes_mark_blocks_and_the_last_change_wins() {
        let w = WrittenBlocks::new(64 << 10, 4096);
        w.record_write(0, 512);
        w.record_write(4096 * 3 - 1, 2); // straddles blocks 2 and 3
                                         // Zeroes blocks 5..=7 whole, and parts of 4 and 8.
        w.record_zero(4096 * 4 + 512, 4096 * 4);
        w.record_zero(4096 * 2, 4096); // block 2: written, then zeroed
        let s = w.take();
        assert_eq!(s.data.runs(), vec![(0, 1), (3, 2), (8, 1)]);
        assert_eq!(s.zero.runs(), vec![(2, 1), (5, 3)]);
        assert!(w.take().is_empty(), "a take leaves nothing");
        // Given back after a failed checkpoint: kept, but a newer change
        // to block 5 wins over the older zero extent.
        w.record_write(4096 * 5, 4096);
        w.merge_back(s);
        let again = w.take();
        assert_eq!(again.data.runs(), vec![(0, 1), (3, 3), (8, 1)]);
        assert_eq!(again.zero.runs(), vec![(2, 1), (6, 2)]);
    }
}
