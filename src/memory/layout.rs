//! The guest-physical layout: where each guest node's memory sits.
//!
//! Memory starts at 0 and runs up to the 32-bit MMIO hole (3 GiB .. 4 GiB,
//! where a Linux guest's devices and the LAPIC/IOAPIC live); whatever does
//! not fit below the hole continues at 4 GiB. Guest nodes follow each other
//! in id order. Each node is cut into chunks of at most `chunk_size` that
//! never cross the hole.

use serde::{Deserialize, Serialize};

/// Page size of guest memory tracking (dirty log, checkpoints).
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole (first address above it).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Default chunk size: the unit of a live NUMA move's pauses (re-homing a
/// chunk costs ~0.1 ms per 32 MiB in the pause, plus KVM dropping its
/// translations of it), of dirty bitmaps and of copies. KVM slots span
/// whole runs of chunks, so their number does not grow with it.
pub const DEFAULT_CHUNK_SIZE: u64 = 32 << 20;

/// A guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRange {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRange {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    /// Whether `gpa` lies inside.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.start && gpa < self.end()
    }
}

/// Lays out nodes of the given sizes; returns each node's chunks.
pub fn layout(node_sizes: &[u64], chunk_size: u64) -> Vec<Vec<GuestRange>> {
    let mut next = 0u64;
    let mut out = Vec::with_capacity(node_sizes.len());
    for &size in node_sizes {
        let mut left = size;
        let mut chunks = Vec::new();
        while left > 0 {
            if next == MMIO_HOLE_START {
                next = MMIO_HOLE_END;
            }
            let room_below_hole = if next < MMIO_HOLE_START {
                MMIO_HOLE_START - next
            } else {
                u64::MAX
            };
            let len = left.min(chunk_size).min(room_below_hole);
            chunks.push(GuestRange { start: next, len });
            next += len;
            left -= len;
        }
        out.push(chunks);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_follow_each_other_in_chunks() {
        let l = layout(&[64 << 20, 40 << 20], 32 << 20);
        assert_eq!(l[0].len(), 2);
        assert_eq!(l[1][0].start, 64 << 20);
        assert_eq!(l[1][1].len, 8 << 20);
    }

    #[test]
    fn memory_skips_the_mmio_hole() {
        let l = layout(&[4 << 30], 1 << 30);
        let total: u64 = l[0].iter().map(|r| r.len).sum();
        assert_eq!(total, 4 << 30);
        for r in &l[0] {
            assert!(
                r.end() <= MMIO_HOLE_START || r.start >= MMIO_HOLE_END,
                "{r:?}"
            );
        }
        assert_eq!(l[0].last().unwrap().end(), MMIO_HOLE_END + (1 << 30));
    }
}
