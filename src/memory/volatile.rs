//! Volatile access to guest memory.
//!
//! vCPUs write guest memory while vmhop reads it (pre-copy rounds, status),
//! so a `&[u8]` over it would be a data race by Rust's rules. Every read of
//! memory the guest may be writing goes through vm-memory's
//! [`VolatileSlice`], which never forms a Rust reference to that memory; a
//! torn read is fine, because the dirty log sends such a page again.

pub use vm_memory::VolatileSlice;

use super::PAGE_SIZE;

/// Below this size a copy is not worth splitting over threads.
const PARALLEL_COPY_MIN: usize = 1 << 20;

/// An address range that may cross to another thread. `VolatileSlice`
/// holds a raw pointer and so is not `Send`.
#[derive(Clone, Copy)]
struct RawRange(usize, usize);

impl RawRange {
    fn of(s: &VolatileSlice<'_>) -> Self {
        RawRange(s.ptr_guard().as_ptr() as usize, s.len())
    }

    /// # Safety
    /// The range must come from a `VolatileSlice` that outlives the result.
    unsafe fn slice<'a>(self) -> VolatileSlice<'a> {
        // SAFETY: the caller guarantees the memory outlives 'a; the range
        // was a valid VolatileSlice when `of` took it.
        unsafe { VolatileSlice::new(self.0 as *mut u8, self.1) }
    }
}

/// Copies `src` into `dst` (as much as the shorter holds), split over the
/// host CPUs when large. Meant for copies inside a pause, when the vCPU
/// threads are stopped and every CPU is free.
pub fn copy_parallel(dst: &VolatileSlice<'_>, src: &VolatileSlice<'_>) {
    let len = src.len().min(dst.len());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    if len < PARALLEL_COPY_MIN || threads == 1 {
        src.copy_to_volatile_slice(*dst);
        return;
    }
    let part = len.div_ceil(threads).next_multiple_of(PAGE_SIZE as usize);
    let (d, s) = (RawRange::of(dst), RawRange::of(src));
    std::thread::scope(|scope| {
        // The calling thread copies the first part itself: one thread
        // fewer to start, and where it runs at real-time priority in a
        // pause (see `vmm::vm`), the scheduler places the helpers as if
        // its CPU were busy — they crowded onto the other CPUs before.
        let mut at = part.min(len);
        while at < len {
            let n = part.min(len - at);
            let (d, s) = (RawRange(d.0 + at, n), RawRange(s.0 + at, n));
            scope.spawn(move || {
                // SAFETY: both ranges lie inside `dst` and `src`, which the
                // caller keeps alive past this scope; each thread copies a
                // distinct part.
                let (d, s) = unsafe { (d.slice(), s.slice()) };
                s.copy_to_volatile_slice(d);
            });
            at += n;
        }
        let first = part.min(len);
        dst.subslice(0, first)
            .and_then(|d| src.subslice(0, first).map(|s| (d, s)))
            .map(|(d, s)| s.copy_to_volatile_slice(d))
            .expect("the first part lies inside both slices");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copy_copies_every_byte() {
        let mut a: Vec<u8> = (0..(3 << 20) + 4096).map(|i| (i % 251) as u8).collect();
        let mut b = vec![0u8; a.len()];
        let want = a.clone();
        copy_parallel(
            &VolatileSlice::from(&mut b[..]),
            &VolatileSlice::from(&mut a[..]),
        );
        assert_eq!(b, want);
    }
}
