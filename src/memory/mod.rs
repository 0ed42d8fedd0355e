//! Guest memory: the guest-physical layout, the host mappings that back it
//! (one set per guest NUMA node, bound to its host node), and dirty-page
//! bitmaps.
//!
//! This module owns host memory and addresses. It does not talk to KVM: the
//! VM (`crate::vmm::vm`) registers each run of contiguous chunks as one KVM
//! memory slot and fetches dirty logs into the bitmaps defined here. Devices
//! see the same memory through [`DeviceMemory`], which records what they
//! write (KVM's log cannot).

pub mod cow;
pub mod device;
pub mod dirty;
pub mod layout;
pub mod mapping;
pub mod volatile;

pub use device::{DeviceGuestMemory, DeviceMemory};
pub use dirty::{DirtyAccumulator, DirtyBitmap};
pub use layout::{GuestRange, PAGE_SIZE};
pub use mapping::{Mapping, MappingError};
pub use volatile::VolatileSlice;

use serde::{Deserialize, Serialize};

/// vm-memory refused guest memory as it is laid out here (see
/// [`GuestMemory::vm_memory_view`]).
#[derive(Debug, thiserror::Error)]
pub enum MemoryViewError {
    /// A chunk's mapping cannot be a vm-memory region.
    #[error("guest memory at {gpa:#x}: {source}")]
    Region {
        /// The chunk's first guest-physical address.
        gpa: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A chunk ends beyond the largest address.
    #[error("guest memory at {0:#x} overflows")]
    Overflow(u64),
    /// The regions do not make one guest memory.
    #[error("guest memory regions: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// Whether `data` is all zero bytes: the one zero-page check, which
/// checkpoints and migrations run on every page they copy out of guest
/// memory to skip zero pages. It ORs 64 bytes at a time as eight u64 words
/// (which the compiler vectorizes) and stops at the first non-zero block,
/// which for a page holding data is almost always the first; a zero page
/// costs ~50 ns here.
pub fn is_zero_page(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(word.try_into().expect("8-byte chunk"));
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// How a guest node's memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Anonymous private memory, 4 KiB pages.
    #[default]
    Anonymous,
    /// Anonymous private memory with transparent huge pages (MADV_HUGEPAGE).
    TransparentHuge,
}

/// One piece of a guest node's memory: a contiguous guest-physical range,
/// its own part of the node's host mapping, its own dirty bitmap. NUMA
/// moves replace chunks one at a time, so a move needs one chunk of spare
/// memory.
#[derive(Debug)]
pub struct Chunk {
    /// Guest-physical range.
    pub range: GuestRange,
    /// Chunk number, counting from 0 in guest-physical order: what dirty
    /// logs, the transfer engine's plans and the API call a "slot". The KVM
    /// slot holding it usually holds its neighbours too (`crate::vmm::vm`).
    pub slot: u32,
    /// The host memory behind it.
    pub mapping: Mapping,
}

impl Chunk {
    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.range.len / PAGE_SIZE
    }
}

/// The memory of one guest NUMA node.
#[derive(Debug)]
pub struct NodeMemory {
    /// Guest node id.
    pub guest_node: u32,
    /// Host node its memory is bound to (None: no binding, first-touch).
    pub host_node: Option<u32>,
    /// Size in bytes.
    pub size: u64,
    /// Backing kind.
    pub backing: Backing,
    /// Chunks in guest-physical order.
    pub chunks: Vec<Chunk>,
}

/// Guest memory seen through vm-memory, valid while the borrow lasts.
pub struct MemoryView<'a> {
    inner: vm_memory::GuestMemoryMmap,
    _borrow: std::marker::PhantomData<&'a GuestMemory>,
}

impl std::ops::Deref for MemoryView<'_> {
    type Target = vm_memory::GuestMemoryMmap;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

/// All guest memory, node by node.
#[derive(Debug, Default)]
pub struct GuestMemory {
    /// Guest nodes in id order.
    pub nodes: Vec<NodeMemory>,
}

impl GuestMemory {
    /// Total guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.nodes.iter().map(|n| n.size).sum()
    }

    /// Every chunk of every node, in guest-physical order.
    pub fn chunks(&self) -> impl Iterator<Item = &Chunk> {
        self.nodes.iter().flat_map(|n| n.chunks.iter())
    }

    /// Each node's chunks in runs that follow each other in guest-physical
    /// and in host memory (one mapping cut into chunks), each run at most
    /// `max` bytes unless a single chunk is larger: what one KVM slot or
    /// one userfaultfd registration covers.
    pub fn contiguous_runs(&self, max: u64) -> Vec<&[Chunk]> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let (mut first, mut len) = (0, 0);
            for (i, c) in n.chunks.iter().enumerate() {
                let follows = i > first && {
                    let p = &n.chunks[i - 1];
                    p.range.end() == c.range.start
                        && p.mapping.as_ptr().wrapping_add(p.mapping.len()) == c.mapping.as_ptr()
                        && len + c.range.len <= max
                };
                if !follows && i > first {
                    out.push(&n.chunks[first..i]);
                    (first, len) = (i, 0);
                }
                len += c.range.len;
            }
            if first < n.chunks.len() {
                out.push(&n.chunks[first..]);
            }
        }
        out
    }

    /// The chunk holding `gpa`.
    pub fn chunk_of(&self, gpa: u64) -> Option<&Chunk> {
        self.chunks().find(|c| c.range.contains(gpa))
    }

    /// Host address of guest-physical `gpa`, valid for `len` bytes within one
    /// chunk; None if the range is not backed by a single chunk.
    pub fn host_addr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let c = self.chunk_of(gpa)?;
        if gpa + len > c.range.end() {
            return None;
        }
        // The offset is within the mapping: checked just above.
        Some(
            c.mapping
                .as_ptr()
                .wrapping_add((gpa - c.range.start) as usize),
        )
    }

    /// Reads a little-endian u64 from guest memory (volatile: the guest may
    /// be writing it right now).
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let p = self.host_addr(gpa, 8)? as *const u64;
        // SAFETY: host_addr checked that 8 bytes at gpa are inside a live
        // mapping owned by self; guest-physical addresses we read are 8-byte
        // aligned by construction of the builtin guests' tables, and
        // read_unaligned avoids relying on it anyway.
        Some(u64::from_le_bytes(unsafe {
            std::ptr::read_volatile(p as *const [u8; 8])
        }))
    }

    /// Writes a little-endian u64 into guest memory.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Option<()> {
        let p = self.host_addr(gpa, 8)?;
        // SAFETY: as in read_u64, the 8 bytes are inside a live mapping.
        unsafe { std::ptr::write_volatile(p as *mut [u8; 8], v.to_le_bytes()) };
        Some(())
    }

    /// The same memory as vm-memory's `GuestMemoryMmap`, for crates that
    /// speak it (linux-loader). The view borrows `self`: no chunk can be
    /// replaced or dropped while it lives.
    pub fn vm_memory_view(&self) -> Result<MemoryView<'_>, MemoryViewError> {
        let mut regions = Vec::new();
        for c in self.chunks() {
            // SAFETY: the chunk's mapping is a live private anonymous
            // read/write mapping of exactly range.len bytes, owned by
            // `self`; the returned view borrows `self`, so the mapping
            // outlives it. `build_raw` regions do not unmap on drop.
            let r = unsafe {
                vm_memory::MmapRegion::build_raw(
                    c.mapping.as_ptr(),
                    c.range.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .map_err(|source| MemoryViewError::Region {
                gpa: c.range.start,
                source,
            })?;
            let r = vm_memory::GuestRegionMmap::new(r, vm_memory::GuestAddress(c.range.start))
                .ok_or(MemoryViewError::Overflow(c.range.start))?;
            regions.push(r);
        }
        let inner =
            vm_memory::GuestMemoryMmap::from_regions(regions).map_err(MemoryViewError::Regions)?;
        Ok(MemoryView {
            inner,
            _borrow: std::marker::PhantomData,
        })
    }

    /// Copies `data` into guest memory at `gpa` (within one chunk).
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) -> Option<()> {
        let p = self.host_addr(gpa, data.len() as u64)?;
        // SAFETY: the destination range lies within a live mapping (checked
        // by host_addr) and cannot overlap `data`, which is host memory
        // outside guest mappings or a distinct range.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_check_sees_every_byte() {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        assert!(is_zero_page(&page));
        for i in [0, 7, 8, 63, 64, 2049, PAGE_SIZE as usize - 1] {
            page[i] = 1;
            assert!(!is_zero_page(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero_page(&[0u8; 70]));
        assert!(!is_zero_page(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1][..]));
        assert!(is_zero_page(&[]));
    }
}
