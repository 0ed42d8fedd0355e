//! Guest memory as devices see it: vm-memory's `GuestMemoryMmap` over the
//! same host mappings as the VM's chunks, with a dirty bitmap per chunk
//! that every write through it marks (vm-memory's `AtomicBitmap`, as
//! Firecracker and Cloud Hypervisor use).
//!
//! KVM's dirty log sees only what the vCPUs write. What a device writes —
//! data read from a disk, used-ring entries, status bytes — is written by a
//! vmhop thread, so it would be lost to every checkpoint, NUMA move and
//! migration taken meanwhile. Every device write goes through this view
//! (vm-memory marks its own writes; a device that hands guest memory to a
//! syscall marks what the syscall wrote), and the VM takes "pages written by
//! devices" per chunk beside KVM's log ([`DeviceMemory::take_dirty`]).
//!
//! How the engine merges the two: for each chunk it fetches KVM's log and
//! ORs [`DeviceMemory::take_dirty`] of that chunk into it, in either order,
//! each fetch clearing both. A device marks a page after it wrote it, so a
//! write either lands before the take (and the engine copies the new bytes
//! in that round) or marks the page for the next take. Inside a pause the
//! devices must be quiesced (no request in flight) before the last take, or
//! a device could still write after it: see `devices::virtio`'s quiesce.
//!
//! The view is attached once the VM's memory exists and detached before it
//! is unmapped; host addresses stay put for the VM's life (a NUMA move
//! swaps pages under the same address), so one view serves the whole VM.
//! A device holds [`DeviceMemory::access`] while it touches guest memory;
//! [`DeviceMemory::exclusive`] waits for every such access to end and keeps
//! new ones out, which a chunk swap needs.
//!
//! This module owns the view and its bitmaps; it does not know devices.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{DirtyBitmap, GuestMemory, PAGE_SIZE};

/// Guest memory through vm-memory, every region with its dirty bitmap.
pub type DeviceGuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Building or using the device view failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceMemoryError {
    /// vm-memory refused a chunk's mapping.
    #[error("guest memory at {gpa:#x} (+{len:#x}) cannot be seen by devices: {reason}")]
    Region {
        /// First guest-physical address of the chunk.
        gpa: u64,
        /// Its length.
        len: u64,
        /// vm-memory's error.
        reason: String,
    },
    /// A dirty-page range that is not one of the chunks the view was made of.
    #[error("no guest memory chunk starts at {gpa:#x} with {pages} pages")]
    NoChunk {
        /// First guest-physical address asked for.
        gpa: u64,
        /// Pages asked for.
        pages: u64,
    },
}

/// A shared handle on the device view of one VM's memory (cheap to clone;
/// every clone is the same view).
#[derive(Debug, Clone, Default)]
pub struct DeviceMemory {
    view: Arc<RwLock<Option<DeviceGuestMemory>>>,
}

/// Read access to the device view, for as long as the guard lives.
#[derive(Debug)]
pub struct DeviceMemoryGuard<'a> {
    guard: RwLockReadGuard<'a, Option<DeviceGuestMemory>>,
}

impl std::ops::Deref for DeviceMemoryGuard<'_> {
    type Target = DeviceGuestMemory;
    fn deref(&self) -> &DeviceGuestMemory {
        self.guard
            .as_ref()
            .expect("a guard is only made over an attached view")
    }
}

/// Keeps every device out of guest memory while it lives.
#[derive(Debug)]
pub struct DeviceMemoryExclusive<'a> {
    _guard: RwLockWriteGuard<'a, Option<DeviceGuestMemory>>,
}

impl DeviceMemory {
    /// A handle with no memory behind it yet: devices are built before the
    /// VM's memory exists.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the view over `memory`'s chunks, one vm-memory region (and one
    /// dirty bitmap) per chunk, replacing any earlier view.
    ///
    /// # Safety
    ///
    /// Every chunk's host mapping must stay mapped at its address, at least
    /// as long as its chunk's length, until [`DeviceMemory::detach`] returns
    /// (the VM detaches before it drops its memory).
    pub unsafe fn attach(&self, memory: &GuestMemory) -> Result<(), DeviceMemoryError> {
        let mut regions = Vec::new();
        for c in memory.chunks() {
            let bad = |reason: String| DeviceMemoryError::Region {
                gpa: c.range.start,
                len: c.range.len,
                reason,
            };
            // SAFETY: the caller guarantees the chunk's mapping stays mapped
            // until detach; it is a private anonymous read/write mapping of
            // range.len bytes. `build_raw` regions never unmap on drop.
            let r = unsafe {
                vm_memory::MmapRegion::<AtomicBitmap>::build_raw(
                    c.mapping.as_ptr(),
                    c.range.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .map_err(|e| bad(e.to_string()))?;
            let r = vm_memory::GuestRegionMmap::new(r, GuestAddress(c.range.start))
                .ok_or_else(|| bad("the range overflows".into()))?;
            regions.push(r);
        }
        let view =
            DeviceGuestMemory::from_regions(regions).map_err(|e| DeviceMemoryError::Region {
                gpa: 0,
                len: memory.size(),
                reason: e.to_string(),
            })?;
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Some(view);
        Ok(())
    }

    /// Drops the view once no device holds it; devices find no memory after
    /// it (their requests wait or fail, never touch unmapped memory).
    pub fn detach(&self) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether a view is attached.
    pub fn is_attached(&self) -> bool {
        self.view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The view, for as long as the guard lives (None: not attached).
    /// Hold it across every access to guest memory, including a syscall
    /// that reads or writes guest memory, and no longer.
    pub fn access(&self) -> Option<DeviceMemoryGuard<'_>> {
        let guard = self.view.read().unwrap_or_else(|e| e.into_inner());
        guard.is_some().then_some(DeviceMemoryGuard { guard })
    }

    /// Waits until no device touches guest memory and keeps them out while
    /// the result lives (a NUMA move's chunk swap). Devices should be
    /// quiesced first, or this waits for their request in flight.
    pub fn exclusive(&self) -> DeviceMemoryExclusive<'_> {
        DeviceMemoryExclusive {
            _guard: self.view.write().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Takes (and clears) the pages devices wrote in the chunk that starts
    /// at `gpa` and is `pages` pages long, in KVM's dirty-log layout. With
    /// no view attached, no device wrote anything.
    pub fn take_dirty(&self, gpa: u64, pages: u64) -> Result<DirtyBitmap, DeviceMemoryError> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let Some(view) = view.as_ref() else {
            return Ok(DirtyBitmap::new(pages));
        };
        let region = view
            .find_region(GuestAddress(gpa))
            .filter(|r| r.start_addr().0 == gpa && r.len() == pages * PAGE_SIZE)
            .ok_or(DeviceMemoryError::NoChunk { gpa, pages })?;
        let words = std::ops::Deref::deref(region).bitmap().get_and_reset();
        Ok(DirtyBitmap::from_words(words, pages))
    }

    /// Gives back pages taken by [`DeviceMemory::take_dirty`] whose copy
    /// failed, so that the next take reports them again.
    pub fn restore_dirty(&self, gpa: u64, taken: &DirtyBitmap) -> Result<(), DeviceMemoryError> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let Some(view) = view.as_ref() else {
            return Ok(());
        };
        let pages = taken.pages();
        let region = view
            .find_region(GuestAddress(gpa))
            .filter(|r| r.start_addr().0 == gpa && r.len() == pages * PAGE_SIZE)
            .ok_or(DeviceMemoryError::NoChunk { gpa, pages })?;
        let bitmap = std::ops::Deref::deref(region).bitmap();
        for (first, n) in taken.runs() {
            bitmap.set_addr_range((first * PAGE_SIZE) as usize, (n * PAGE_SIZE) as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, Chunk, GuestRange, Mapping, NodeMemory};
    use vm_memory::Bytes;

    /// Guest memory of `chunks` chunks of `chunk` bytes from address 0.
    pub(crate) fn memory(chunks: u64, chunk: u64) -> GuestMemory {
        GuestMemory {
            nodes: vec![NodeMemory {
                guest_node: 0,
                host_node: None,
                size: chunks * chunk,
                backing: Backing::Anonymous,
                chunks: (0..chunks)
                    .map(|i| Chunk {
                        range: GuestRange {
                            start: i * chunk,
                            len: chunk,
                        },
                        slot: i as u32,
                        mapping: Mapping::new(chunk as usize, Backing::Anonymous).unwrap(),
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn writes_through_the_view_mark_exactly_their_pages_per_chunk() {
        let mem = memory(2, 1 << 20);
        let dm = DeviceMemory::new();
        assert_eq!(dm.take_dirty(0, 256).unwrap().count(), 0, "no view yet");
        // SAFETY: `mem` outlives the view: detached below before it drops.
        unsafe { dm.attach(&mem) }.unwrap();
        {
            let view = dm.access().unwrap();
            // Page 3 of chunk 0, and a write across the chunk boundary:
            // the last page of chunk 0 and the first of chunk 1.
            view.write_obj(0xabu8, GuestAddress(3 * PAGE_SIZE + 5))
                .unwrap();
            view.write_slice(&[7u8; 16], GuestAddress((1 << 20) - 8))
                .unwrap();
        }
        let c0 = dm.take_dirty(0, 256).unwrap();
        let c1 = dm.take_dirty(1 << 20, 256).unwrap();
        assert_eq!(c0.runs(), vec![(3, 1), (255, 1)]);
        assert_eq!(c1.runs(), vec![(0, 1)]);
        assert_eq!(dm.take_dirty(0, 256).unwrap().count(), 0, "a take clears");
        // The bytes landed in the VM's own mapping.
        assert_eq!(mem.read_u64(3 * PAGE_SIZE).unwrap() >> 40, 0xab);
        // A failed copy gives its pages back.
        dm.restore_dirty(0, &c0).unwrap();
        assert_eq!(dm.take_dirty(0, 256).unwrap(), c0);
        assert!(dm.take_dirty(4096, 255).is_err(), "not a chunk");
        dm.detach();
        assert!(dm.access().is_none());
    }
}
