//! Which pages of a range of this process hold memory, from
//! `/proc/self/pagemap` (present in RAM, or swapped out). Unprivileged
//! readers get the flags, not the frame numbers, which is all we need.

use std::io;
use std::os::unix::fs::FileExt;

/// Bit 63 of a pagemap entry: the page is present in RAM.
const PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out (it holds data too).
const SWAPPED: u64 = 1 << 62;
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
    let mut done = 0u64;
    while done < pages {
        let n = (BATCH as u64).min(pages - done) as usize;
        let want = &mut buf[..n * ENTRY as usize];
        f.read_exact_at(want, (first + done) * ENTRY)
            .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/self/pagemap: {e}")))?;
        for (i, e) in want.chunks_exact(ENTRY as usize).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8-byte chunks"));
            if e & (PRESENT | SWAPPED) != 0 {
                let p = done + i as u64;
                words[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        done += n as u64;
    }
    Ok(words)
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
}
