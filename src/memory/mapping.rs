//! An anonymous host mapping that backs guest memory.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Backing;

/// Creating or preparing a mapping failed.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// mmap refused the mapping.
    #[error("mmap of {len} bytes failed: {source}")]
    Mmap {
        /// Requested length.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// mremap failed.
    #[error("mremap ({what}) of {addr:#x}+{len:#x} failed: {source}")]
    Mremap {
        /// Which step.
        what: &'static str,
        /// Start of the range.
        addr: usize,
        /// Length.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// madvise failed.
    #[error("madvise({advice}) on {addr:#x}+{len:#x} failed: {source}")]
    Madvise {
        /// Which advice.
        advice: &'static str,
        /// Start of the range.
        addr: usize,
        /// Length.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// An owned private mapping (unmapped on drop): anonymous memory, or a
/// clone's copy-on-write view of its image file
/// ([`Mapping::map_file_private`]).
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    /// Maps a file privately: pages not written yet are the file's, and
    /// `/proc/self/pagemap` shows only those this process touched.
    file_backed: AtomicBool,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointer is
// only an address. Concurrent access discipline (the guest writes while the
// VMM copies) is the VMM's, as for any guest memory.
unsafe impl Send for Mapping {}
// SAFETY: see Send; shared references only hand out the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of zeroed anonymous memory. Nothing is faulted in.
    pub fn new(len: usize, backing: Backing) -> Result<Mapping, MappingError> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address; no
        // existing memory is affected. The result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MappingError::Mmap {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let m = Mapping {
            ptr: ptr as *mut u8,
            len,
            file_backed: AtomicBool::new(false),
        };
        if backing == Backing::TransparentHuge {
            m.advise(libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
        }
        Ok(m)
    }

    /// Cuts the mapping in two at `at` (a multiple of the page size,
    /// strictly inside): `self` keeps the first part and the rest comes
    /// back as a mapping of its own, each unmapped on its own drop. Guest
    /// memory is mapped one piece per node this way, so that one KVM slot
    /// can span many chunks.
    pub fn split_off(&mut self, at: usize) -> Mapping {
        assert!(
            at > 0 && at < self.len && at.is_multiple_of(super::PAGE_SIZE as usize),
            "split of a {:#x}-byte mapping at {at:#x}",
            self.len
        );
        let rest = Mapping {
            ptr: self.ptr.wrapping_add(at),
            len: self.len - at,
            file_backed: AtomicBool::new(self.is_file_backed()),
        };
        self.len = at;
        rest
    }

    /// Replaces the whole mapping, in place (same address, `MAP_FIXED`),
    /// with a private copy-on-write mapping of `len()` bytes of `file` from
    /// `offset`: reads see the file, the first write to a page copies it
    /// into memory of this process's own, and the file never changes. What
    /// the old pages held is dropped. Meant for memory no vCPU has run on
    /// yet (a clone being built): a KVM slot over the range sees the
    /// change through its MMU notifier.
    pub fn map_file_private(&self, file: &std::fs::File, offset: u64) -> Result<(), MappingError> {
        // SAFETY: replaces exactly the range this value owns (MAP_FIXED over
        // our own mapping, never another's) with a private mapping of the
        // same length; the range stays mapped throughout, and the file
        // descriptor is valid for the call (the mapping keeps its own
        // reference to the file).
        let p = unsafe {
            libc::mmap(
                self.ptr as *mut libc::c_void,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MappingError::Mmap {
                len: self.len,
                source: io::Error::last_os_error(),
            });
        }
        self.file_backed.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the mapping is a private view of a file
    /// ([`Mapping::map_file_private`]): which pages hold data then cannot
    /// be read from `/proc/self/pagemap`.
    pub fn is_file_backed(&self) -> bool {
        self.file_backed.load(Ordering::Acquire)
    }

    /// Start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for guest memory).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Faults every page in for writing now (MADV_POPULATE_WRITE), so that
    /// later copies into it do not pay page faults. Fails with ENOMEM-like
    /// errors when the bound node has no room.
    pub fn populate(&self) -> Result<(), MappingError> {
        self.advise(MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")
    }

    /// Faults in `len` bytes from `offset` (whole pages) for writing now;
    /// see [`Mapping::populate`].
    pub fn populate_range(&self, offset: usize, len: usize) -> Result<(), MappingError> {
        self.advise_range(offset, len, MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")
    }

    /// Drops the pages of `len` bytes from `offset`: they read as zero
    /// again and hold no memory (MADV_DONTNEED on private anonymous memory).
    pub fn discard_range(&self, offset: usize, len: usize) -> Result<(), MappingError> {
        self.advise_range(offset, len, libc::MADV_DONTNEED, "MADV_DONTNEED")
    }

    fn advise(&self, advice: i32, name: &'static str) -> Result<(), MappingError> {
        self.advise_range(0, self.len, advice, name)
    }

    fn advise_range(
        &self,
        offset: usize,
        len: usize,
        advice: i32,
        name: &'static str,
    ) -> Result<(), MappingError> {
        let addr = self.ptr as usize + offset;
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(MappingError::Madvise {
                advice: name,
                addr,
                len,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        // SAFETY: the range lies inside this mapping (checked above), which
        // we own.
        let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
        if r != 0 {
            return Err(MappingError::Madvise {
                advice: name,
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Moves `other`'s pages to this mapping's address and returns this
    /// mapping's old pages as a mapping at a new address (free it when
    /// convenient). Both must have the same length.
    ///
    /// The address range stays mapped at every instant: the old pages move
    /// aside with `MREMAP_DONTUNMAP`, which leaves an empty mapping (reading
    /// zeros) in their place, and the new pages then *replace* that mapping
    /// in one `mremap`. So a reader racing the swap never faults, and no
    /// other thread's `mmap` can be placed in a hole that the second
    /// `MREMAP_FIXED` would then silently unmap. What a racing reader sees
    /// is old pages, zeros or new pages: callers that need a consistent view
    /// exclude readers (`Vm::replace_chunk` holds the memory write lock).
    ///
    /// Used to re-home guest memory without touching its KVM slot: KVM sees
    /// an MMU-notifier invalidation of this range only, and the memory
    /// policy moves with the pages' VMA. On failure nothing has changed.
    pub fn take_pages_of(&self, other: Mapping) -> Result<Mapping, MappingError> {
        let len = self.len;
        if other.len != len {
            return Err(MappingError::Mremap {
                what: "lengths differ",
                addr: self.ptr as usize,
                len,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        // A same-size mremap without MREMAP_FIXED is a no-op, so the old
        // pages need an explicit place to go: reserve one.
        // SAFETY: a fresh inaccessible reservation at a kernel-chosen address.
        let spare = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if spare == libc::MAP_FAILED {
            return Err(MappingError::Mremap {
                what: "reserving room for the old pages",
                addr: self.ptr as usize,
                len,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: moves our own whole mapping's pages onto the reservation
        // we just made (which it replaces); MREMAP_DONTUNMAP keeps our range
        // mapped, empty, so nothing that reads it through our address can
        // fault and no other mapping can take its place.
        let old = unsafe {
            libc::mremap(
                self.ptr as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                spare,
            )
        };
        if old == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            // SAFETY: releasing the reservation made above.
            unsafe { libc::munmap(spare, len) };
            return Err(MappingError::Mremap {
                what: "moving the old pages aside",
                addr: self.ptr as usize,
                len,
                source,
            });
        }
        // SAFETY: moves `other` (owned, same length) onto our address range,
        // replacing the empty mapping the first mremap left there in the
        // same call: the range is never unmapped.
        let r = unsafe {
            libc::mremap(
                other.ptr as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                self.ptr as *mut libc::c_void,
            )
        };
        if r == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            // SAFETY: puts the old pages back where they were, replacing the
            // empty mapping there (again without a hole).
            unsafe {
                libc::mremap(
                    old,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    self.ptr as *mut libc::c_void,
                )
            };
            return Err(MappingError::Mremap {
                what: "moving the new pages in",
                addr: self.ptr as usize,
                len,
                source,
            });
        }
        // Our range holds `other`'s pages now, and the old ones (perhaps a
        // clone's view of its image) moved with their kind.
        let was_file = self
            .file_backed
            .swap(other.is_file_backed(), Ordering::AcqRel);
        // `other`'s range is empty now: it must not be unmapped again.
        std::mem::forget(other);
        Ok(Mapping {
            ptr: old as *mut u8,
            len,
            file_backed: AtomicBool::new(was_file),
        })
    }

    /// `len` bytes from `offset` as volatile memory, for memory a guest or
    /// another thread may write concurrently; None if the range does not
    /// lie inside the mapping.
    pub fn volatile(&self, offset: usize, len: usize) -> Option<super::VolatileSlice<'_>> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: the range lies inside this live mapping (checked above),
        // which outlives the returned slice by its borrow of self.
        Some(unsafe { super::VolatileSlice::new(self.ptr.add(offset), len) })
    }

    /// The mapping as a byte slice.
    ///
    /// # Safety
    /// Nothing may write the mapping while the slice lives: use it only
    /// for memory no guest runs on (staging buffers, tests); guest memory
    /// is read through [`Mapping::volatile`].
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live mapping we own; the caller accepts
        // the concurrent-writer caveat above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// MADV_POPULATE_WRITE (Linux 5.14); libc may lack the constant.
const MADV_POPULATE_WRITE: i32 = 23;

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range this value owns (all it
        // mapped, or its part after split_off); no references to it outlive
        // self (KVM slots are removed before chunks are dropped).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_parts_are_contiguous_and_unmapped_each_on_its_own() {
        let mut a = Mapping::new(4 << 20, Backing::Anonymous).unwrap();
        let base = a.as_ptr() as usize;
        let b = a.split_off(1 << 20);
        assert_eq!((a.len(), b.len()), (1 << 20, 3 << 20));
        assert_eq!(b.as_ptr() as usize, base + (1 << 20));
        // SAFETY: both parts are ours, as long as their lengths.
        unsafe {
            a.as_ptr().write_bytes(1, a.len());
            b.as_ptr().write_bytes(2, b.len());
        }
        drop(a);
        // The second part outlives the first, whose range is gone.
        // SAFETY: nothing else writes to b.
        assert!(unsafe { b.as_slice() }.iter().all(|&x| x == 2));
        // SAFETY: mincore only reads the page-table state of a range.
        let gone = unsafe {
            let mut v = [0u8; 1];
            libc::mincore(base as *mut libc::c_void, 4096, v.as_mut_ptr())
        };
        assert_eq!(gone, -1, "the first part's range is unmapped");
    }

    #[test]
    fn take_pages_of_moves_contents_under_the_same_address() {
        let a = Mapping::new(1 << 20, Backing::Anonymous).unwrap();
        let b = Mapping::new(1 << 20, Backing::Anonymous).unwrap();
        // SAFETY: both mappings are ours and 1 MiB long.
        unsafe {
            a.as_ptr().write_bytes(1, 1 << 20);
            b.as_ptr().write_bytes(2, 1 << 20);
        }
        let addr = a.as_ptr();
        let old = a.take_pages_of(b).unwrap();
        assert_eq!(a.as_ptr(), addr);
        // SAFETY: as above.
        unsafe {
            assert!(a.as_slice().iter().all(|&x| x == 2));
            assert!(old.as_slice().iter().all(|&x| x == 1));
        }
    }

    #[test]
    fn take_pages_of_never_leaves_a_hole_for_a_concurrent_reader() {
        // On the old two-mremap swap (the range unmapped in between) the
        // reader below hits the hole and the test binary dies of SIGSEGV.
        const LEN: usize = 2 << 20;
        const SWAPS: usize = 2000;
        let a = Mapping::new(LEN, Backing::Anonymous).unwrap();
        a.populate().unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let reads = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for off in (0..LEN).step_by(4096) {
                        // SAFETY: inside `a`, which lives for the whole scope
                        // and is never unmapped while it does: that is the
                        // property under test.
                        let v = unsafe { a.as_ptr().add(off).read_volatile() };
                        std::hint::black_box(v);
                        reads += 1;
                    }
                }
                reads
            });
            for i in 0..SWAPS {
                let b = Mapping::new(LEN, Backing::Anonymous).unwrap();
                // SAFETY: `b` is ours and LEN bytes long; nobody else sees it.
                unsafe { b.as_ptr().write_bytes(i as u8 | 1, LEN) };
                drop(a.take_pages_of(b).unwrap());
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert!(reads > 0);
        let last = (SWAPS - 1) as u8 | 1;
        // SAFETY: the reader has finished; nobody else writes `a`.
        assert!(unsafe { a.as_slice() }.iter().all(|&x| x == last));
    }

    #[test]
    fn new_mapping_is_zeroed_and_populates() {
        let m = Mapping::new(1 << 20, Backing::Anonymous).unwrap();
        m.populate().unwrap();
        // SAFETY: nobody else writes this mapping.
        assert!(unsafe { m.as_slice() }.iter().all(|&b| b == 0));
    }
}
