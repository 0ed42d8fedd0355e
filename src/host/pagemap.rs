//! Which pages of a range of this process hold memory, from
//! `/proc/self/pagemap` (present in RAM, or swapped out). A page that only
//! maps the kernel's shared zero page (read but never written, or filled
//! with `UFFDIO_ZEROPAGE` by a lazy restore) holds none; telling it apart
//! needs frame numbers, which only privileged readers get — unprivileged,
//! such pages count as holding memory, which costs a copy, never a page.

use std::io;
use std::os::unix::fs::FileExt;

/// Bit 63 of a pagemap entry: the page is present in RAM.
const PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out (it holds data too).
const SWAPPED: u64 = 1 << 62;
/// Bits 0–54: the page frame number (0 for unprivileged readers).
const PFN_MASK: u64 = (1 << 55) - 1;
/// Entries read per call.
const BATCH: usize = 4096;
/// Bytes per pagemap entry.
const ENTRY: u64 = 8;

/// For each 4 KiB page of `[addr, addr + pages * 4096)`, whether it holds
/// memory; returned as words of 64 pages (bit i of word i/64 is page i).
pub fn populated(addr: *const u8, pages: u64) -> io::Result<Vec<u64>> {
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let first = addr as u64 / 4096;
    let mut words = vec![0u64; pages.div_ceil(64) as usize];
    let mut buf = vec![0u8; BATCH * ENTRY as usize];
    let zero = zero_pfn();
    let mut done = 0u64;
    while done < pages {
        let n = (BATCH as u64).min(pages - done) as usize;
        let want = &mut buf[..n * ENTRY as usize];
        f.read_exact_at(want, (first + done) * ENTRY)
            .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/self/pagemap: {e}")))?;
        for (i, e) in want.chunks_exact(ENTRY as usize).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8-byte chunks"));
            let zero_page = e & PRESENT != 0 && zero.is_some_and(|z| e & PFN_MASK == z);
            if e & (PRESENT | SWAPPED) != 0 && !zero_page {
                let p = done + i as u64;
                words[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        done += n as u64;
    }
    Ok(words)
}

/// The frame number of the kernel's 4 KiB zero page, if this process may
/// read frame numbers: read from a fresh page that was only read.
fn zero_pfn() -> Option<u64> {
    static ZERO: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| {
        let len = 4096;
        // SAFETY: a fresh private anonymous mapping of one page, unmapped
        // below; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `p` is a readable page of ours; reading it maps the zero
        // page.
        unsafe { std::ptr::read_volatile(p as *const u8) };
        let mut e = [0u8; ENTRY as usize];
        let read = std::fs::File::open("/proc/self/pagemap")
            .and_then(|f| f.read_exact_at(&mut e, p as u64 / 4096 * ENTRY));
        // SAFETY: unmaps the page mapped above.
        unsafe { libc::munmap(p, len) };
        read.ok()?;
        let e = u64::from_le_bytes(e);
        let pfn = e & PFN_MASK;
        (e & PRESENT != 0 && pfn != 0).then_some(pfn)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_touched_pages_are_populated() {
        let v = vec![0u8; 64 * 4096 + 4096];
        // A page-aligned window into the buffer.
        let base = (v.as_ptr() as usize).next_multiple_of(4096) as *mut u8;
        // SAFETY: madvise on whole pages inside our own buffer drops their
        // contents (they are zero anyway), so the test starts from nothing.
        unsafe { libc::madvise(base as *mut _, 64 * 4096, libc::MADV_DONTNEED) };
        for p in [3usize, 40] {
            // SAFETY: inside the buffer, which we own.
            unsafe { base.add(p * 4096).write_volatile(1) };
        }
        let w = populated(base, 64).unwrap();
        assert_eq!(w, vec![(1 << 3) | (1 << 40)]);
    }

    #[test]
    fn a_page_only_read_holds_no_memory_where_frame_numbers_are_readable() {
        let v = vec![0u8; 8 * 4096 + 4096];
        let base = (v.as_ptr() as usize).next_multiple_of(4096) as *mut u8;
        // SAFETY: as above: whole pages of our own buffer, zero anyway.
        unsafe { libc::madvise(base as *mut _, 8 * 4096, libc::MADV_DONTNEED) };
        // SAFETY: inside the buffer, which we own.
        unsafe {
            std::ptr::read_volatile(base.add(2 * 4096));
            base.add(5 * 4096).write_volatile(1);
        }
        let w = populated(base, 8).unwrap();
        if zero_pfn().is_some() {
            assert_eq!(w, vec![1 << 5], "the read page maps the zero page");
        } else {
            // Unprivileged: the read page cannot be told apart.
            assert_eq!(w, vec![(1 << 2) | (1 << 5)]);
        }
    }
}
