//! An anonymous host mapping that backs guest memory.

use std::io;

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

/// An owned anonymous private mapping (unmapped on drop).
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
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
        };
        if backing == Backing::TransparentHuge {
            m.advise(libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
        }
        Ok(m)
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

    fn advise(&self, advice: i32, name: &'static str) -> Result<(), MappingError> {
        // SAFETY: the range is exactly this mapping, which we own.
        let r = unsafe { libc::madvise(self.ptr as *mut libc::c_void, self.len, advice) };
        if r != 0 {
            return Err(MappingError::Madvise {
                advice: name,
                addr: self.ptr as usize,
                len: self.len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The mapping as a byte slice.
    ///
    /// # Safety
    /// The guest may write this memory concurrently; callers must accept
    /// torn reads (the dirty log tells them to read a page again).
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
        // SAFETY: unmapping exactly the range we mapped; no references to it
        // outlive self (KVM slots are removed before chunks are dropped).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_mapping_is_zeroed_and_populates() {
        let m = Mapping::new(1 << 20, Backing::Anonymous).unwrap();
        m.populate().unwrap();
        // SAFETY: nobody else writes this mapping.
        assert!(unsafe { m.as_slice() }.iter().all(|&b| b == 0));
    }
}
