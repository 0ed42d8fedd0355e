//! Copy-on-write of guest pages through userfaultfd write protection.
//!
//! A checkpoint must save each page as it was at the pause. Copying the
//! pages still dirty at the pause costs the pause ~1 µs per page (a memcpy
//! into staging memory); write-protecting them costs ~0.1 µs per page.
//! So in the pause the engine only write-protects those pages and lets the
//! guest run; afterwards [`CopyOnWrite::drain`] reads each page — still as
//! it was, since nothing could write it — and lifts its protection. A page
//! the guest writes before the drain reaches it faults: the handler thread
//! copies it aside first, then lets the write through (~50 µs for the
//! faulting vCPU here). KVM's own writes to guest memory fault the same way.
//!
//! This module owns the userfaultfd, the fault handler and the pages it
//! preserved. It knows nothing of slots' meaning or of KVM: the VM hands it
//! host ranges, and the transfer engine decides when to protect and drain.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use userfaultfd::{Event, FaultKind, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use super::{DirtyBitmap, VolatileSlice, PAGE_SIZE};

/// Pages read per hold of the lock during a drain: a vCPU faulting on a
/// protected page meanwhile waits at most for this many pages' copy.
const DRAIN_BATCH_PAGES: u64 = 64;

/// How often the handler looks at its stop flag while no fault comes.
const HANDLER_POLL: Duration = Duration::from_millis(20);

/// Copy-on-write could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// A userfaultfd call failed.
    #[error("userfaultfd {what} of host range {addr:#x}+{len:#x}: {source}")]
    Uffd {
        /// The call.
        what: &'static str,
        /// Start of the host range.
        addr: usize,
        /// Its length.
        len: usize,
        /// The error, with its errno.
        source: userfaultfd::Error,
    },
    /// The userfaultfd could not be created.
    #[error("userfaultfd with write protection: {0}")]
    Create(userfaultfd::Error),
    /// The fault handler failed; the pages it should have preserved are lost.
    #[error("copy-on-write fault handler: {0}")]
    Handler(String),
}

/// A run of protected pages as they were when protected.
pub struct CowRun<'a> {
    /// The slot the pages belong to (as given to `protect`).
    pub slot: u32,
    /// Index of the first page within the slot.
    pub first: u64,
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// The pages' contents (a private copy).
    pub data: VolatileSlice<'a>,
}

/// Pages of one slot protected in the pause.
struct Region {
    slot: u32,
    /// Host address of the slot's page 0.
    host: usize,
    /// Guest-physical address of the slot's page 0.
    gpa: u64,
    /// Pages protected in the pause, whether or not drained since.
    protected: DirtyBitmap,
    /// Pages still protected and not yet read (by the drain or the handler).
    pending: DirtyBitmap,
}

#[derive(Default)]
struct State {
    regions: Vec<Region>,
    /// Pages the handler copied aside before letting a write through, by
    /// host address.
    preserved: HashMap<usize, Box<[u8]>>,
    failure: Option<String>,
}

struct Inner {
    uffd: Uffd,
    state: Mutex<State>,
    stop: AtomicBool,
    faults: AtomicU64,
    /// The host ranges registered with the userfaultfd.
    registered: Vec<(usize, usize)>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unprotect(&self, addr: usize, len: usize) -> Result<(), CowError> {
        self.uffd
            .remove_write_protection(addr as *mut _, len, true)
            .map_err(|source| CowError::Uffd {
                what: "write-unprotect",
                addr,
                len,
                source,
            })
    }

    /// A write fault on `page`: preserve it if it is still pending, then
    /// let the write through.
    fn fault(&self, page: usize) {
        let mut st = self.lock();
        let hit = st.regions.iter_mut().find_map(|r| {
            let i = (page.checked_sub(r.host)? as u64) / PAGE_SIZE;
            (i < r.pending.pages() && r.pending.get(i)).then_some((r, i))
        });
        if let Some((r, i)) = hit {
            r.pending.unset(i);
            let mut copy = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
            // SAFETY: `page` lies in a registered guest range that lives
            // until this CopyOnWrite is dropped (the VM keeps its memory in
            // place while an operation holds it), and it is write-protected,
            // so nothing changes it during the read.
            unsafe { VolatileSlice::new(page as *mut u8, PAGE_SIZE as usize) }
                .copy_to(&mut copy[..]);
            st.preserved.insert(page, copy);
            self.faults.fetch_add(1, Ordering::Relaxed);
        }
        // Unprotect even a page no longer pending (the drain lifted its
        // protection as this fault was queued): it also wakes the writer.
        if let Err(e) = self.unprotect(page, PAGE_SIZE as usize) {
            tracing::error!("{e}");
            st.failure.get_or_insert_with(|| e.to_string());
            let _ = self.uffd.wake(page as *mut _, PAGE_SIZE as usize);
        }
    }

    fn handle_faults(&self) {
        let fd = self.uffd.as_raw_fd();
        while !self.stop.load(Ordering::Acquire) {
            if !crate::util::wait_readable(fd, HANDLER_POLL) {
                continue;
            }
            loop {
                match self.uffd.read_event() {
                    Ok(Some(Event::Pagefault { addr, kind, .. })) => {
                        let page = addr as usize & !(PAGE_SIZE as usize - 1);
                        if kind == FaultKind::WriteProtected {
                            self.fault(page);
                        } else {
                            // Registered for write protection only; wake
                            // anything else rather than leave it waiting.
                            let _ = self.uffd.wake(page as *mut _, PAGE_SIZE as usize);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        // A faulting thread left unserved waits until the
                        // drop lifts every protection; the drain reports it.
                        self.lock()
                            .failure
                            .get_or_insert_with(|| format!("reading an event: {e}"));
                        break;
                    }
                }
            }
        }
    }
}

/// Write protection armed over some host ranges of guest memory, with its
/// fault handler thread. Dropping it lifts every protection left.
pub struct CopyOnWrite {
    inner: Arc<Inner>,
    handler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CopyOnWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOnWrite")
            .field("registered", &self.inner.registered.len())
            .finish()
    }
}

impl CopyOnWrite {
    /// Registers `ranges` (host address, length) for write protection and
    /// starts the fault handler. Nothing is protected yet. Fails if the
    /// kernel lacks write protection or a range is registered elsewhere
    /// (a lazy restore still loading it).
    pub fn arm(ranges: &[(usize, usize)]) -> Result<Self, CowError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::PAGEFAULT_FLAG_WP)
            .create()
            .map_err(CowError::Create)?;
        let mut registered = Vec::new();
        for &(addr, len) in ranges {
            if let Err(source) =
                uffd.register_with_mode(addr as *mut _, len, RegisterMode::WRITE_PROTECT)
            {
                for &(a, l) in &registered {
                    let _ = uffd.unregister(a as *mut _, l);
                }
                return Err(CowError::Uffd {
                    what: "register",
                    addr,
                    len,
                    source,
                });
            }
            registered.push((addr, len));
        }
        let inner = Arc::new(Inner {
            uffd,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            registered,
        });
        let h = inner.clone();
        let handler = std::thread::Builder::new()
            .name("cow-faults".into())
            .spawn(move || h.handle_faults())
            .map_err(|e| CowError::Handler(format!("spawning its thread: {e}")))?;
        Ok(CopyOnWrite {
            inner,
            handler: Some(handler),
        })
    }

    /// Write-protects the set pages of `pages` in a slot whose page 0 is at
    /// host address `host` and guest-physical `gpa`. The range must lie in
    /// the ranges armed. Returns the pages protected.
    pub fn protect(
        &self,
        slot: u32,
        host: usize,
        gpa: u64,
        pages: &DirtyBitmap,
    ) -> Result<u64, CowError> {
        let mut st = self.inner.lock();
        let mut region = Region {
            slot,
            host,
            gpa,
            protected: DirtyBitmap::new(pages.pages()),
            pending: DirtyBitmap::new(pages.pages()),
        };
        let mut n = 0;
        let mut result = Ok(());
        for (first, count) in pages.runs() {
            let (addr, len) = (
                host + (first * PAGE_SIZE) as usize,
                (count * PAGE_SIZE) as usize,
            );
            if let Err(source) = self.inner.uffd.write_protect(addr as *mut _, len) {
                result = Err(CowError::Uffd {
                    what: "write-protect",
                    addr,
                    len,
                    source,
                });
                // The run may be partly protected: count it all, so that
                // the drop lifts whatever was set.
            }
            for i in first..first + count {
                region.protected.set(i);
                region.pending.set(i);
            }
            n += count;
            if result.is_err() {
                break;
            }
        }
        st.regions.push(region);
        result.map(|()| n)
    }

    /// Pages the guest wrote before the drain reached them (each was
    /// copied aside by the handler first).
    pub fn faults(&self) -> u64 {
        self.inner.faults.load(Ordering::Relaxed)
    }

    /// Hands every protected page to `each`, in runs, as it was when it
    /// was protected, and lifts its protection. Stops at the first error;
    /// the drop lifts what is left.
    pub fn drain<E: From<CowError>>(
        &self,
        each: &mut dyn FnMut(CowRun<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let slots = self.inner.lock().regions.len();
        let mut bounce = vec![0u8; (DRAIN_BATCH_PAGES * PAGE_SIZE) as usize];
        for r in 0..slots {
            let (slot, gpa0, runs) = {
                let st = self.inner.lock();
                let reg = &st.regions[r];
                (reg.slot, reg.gpa, reg.protected.runs())
            };
            for (first, count) in runs {
                let mut at = first;
                while at < first + count {
                    let n = DRAIN_BATCH_PAGES.min(first + count - at);
                    self.take_batch(r, at, n, &mut bounce)?;
                    let len = (n * PAGE_SIZE) as usize;
                    each(CowRun {
                        slot,
                        first: at,
                        gpa: gpa0 + at * PAGE_SIZE,
                        data: VolatileSlice::from(&mut bounce[..len]),
                    })?;
                    at += n;
                }
            }
        }
        match self.inner.lock().failure.clone() {
            Some(f) => Err(CowError::Handler(f).into()),
            None => Ok(()),
        }
    }

    /// Reads pages `at..at + n` of region `r` into `out` (from guest memory
    /// while still protected, or from the handler's copies) and lifts their
    /// protection.
    fn take_batch(&self, r: usize, at: u64, n: u64, out: &mut [u8]) -> Result<(), CowError> {
        let mut st = self.inner.lock();
        let host = st.regions[r].host;
        let mut i = at;
        while i < at + n {
            let dst = ((i - at) * PAGE_SIZE) as usize;
            let addr = host + (i * PAGE_SIZE) as usize;
            if !st.regions[r].pending.get(i) {
                let page = st.preserved.remove(&addr).ok_or_else(|| {
                    CowError::Handler(format!("no preserved copy of the page at {addr:#x}"))
                })?;
                out[dst..dst + PAGE_SIZE as usize].copy_from_slice(&page);
                i += 1;
                continue;
            }
            // A run of pages still protected: copy, then unprotect at once.
            let mut end = i;
            while end < at + n && st.regions[r].pending.get(end) {
                st.regions[r].pending.unset(end);
                end += 1;
            }
            let len = ((end - i) * PAGE_SIZE) as usize;
            // SAFETY: the pages lie in a registered guest range that stays
            // mapped while this CopyOnWrite lives, and they are still
            // write-protected, so nothing changes them while read.
            unsafe { VolatileSlice::new(addr as *mut u8, len) }.copy_to(&mut out[dst..dst + len]);
            self.inner.unprotect(addr, len)?;
            i = end;
        }
        Ok(())
    }
}

impl Drop for CopyOnWrite {
    fn drop(&mut self) {
        {
            let mut st = self.inner.lock();
            let mut lifted = Vec::new();
            for reg in &mut st.regions {
                for (first, count) in reg.pending.runs() {
                    lifted.push((
                        reg.host + (first * PAGE_SIZE) as usize,
                        (count * PAGE_SIZE) as usize,
                    ));
                }
                reg.pending.clear();
            }
            for (addr, len) in lifted {
                if let Err(e) = self.inner.unprotect(addr, len) {
                    tracing::error!("{e}");
                }
            }
            st.preserved.clear();
        }
        self.inner.stop.store(true, Ordering::Release);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        for &(addr, len) in &self.inner.registered {
            if let Err(e) = self.inner.uffd.unregister(addr as *mut _, len) {
                tracing::error!("userfaultfd unregister of {addr:#x}+{len:#x}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, Mapping};
    use vm_memory::Bytes;

    fn filled(pages: u64, backing: Backing) -> Mapping {
        let m = Mapping::new((pages * PAGE_SIZE) as usize, backing).unwrap();
        for p in 0..pages {
            let v = m.volatile((p * PAGE_SIZE) as usize, 8).unwrap();
            v.write_obj(p, 0).unwrap();
        }
        m
    }

    fn first_word(s: &VolatileSlice<'_>, page: u64) -> u64 {
        s.read_obj((page * PAGE_SIZE) as usize).unwrap()
    }

    /// A thread writes every protected page while the drain runs; the
    /// drain still sees each page as it was when protected, and every
    /// write lands.
    fn writes_racing_the_drain_are_seen_after_it(backing: Backing) {
        let pages = 2048;
        let m = filled(pages, backing);
        let host = m.as_ptr() as usize;
        let cow = CopyOnWrite::arm(&[(host, m.len())]).unwrap();
        let mut set = DirtyBitmap::new(pages);
        for p in (0..pages).filter(|p| p % 3 != 0) {
            set.set(p);
        }
        assert_eq!(cow.protect(7, host, 1 << 30, &set).unwrap(), set.count());
        let write = move |pages_to_write: std::ops::Range<u64>| {
            let addr = host;
            std::thread::spawn(move || {
                for p in pages_to_write.rev() {
                    // SAFETY: the mapping outlives the thread (joined below).
                    let v = unsafe {
                        VolatileSlice::new(addr as *mut u8, (pages * PAGE_SIZE) as usize)
                    };
                    v.write_obj(1_000_000 + p, (p * PAGE_SIZE) as usize)
                        .unwrap();
                }
            })
        };
        // Writes before the drain: each faults and is preserved first.
        write(pages - 100..pages).join().unwrap();
        let before = (pages - 100..pages).filter(|&p| set.get(p)).count() as u64;
        assert_eq!(cow.faults(), before);
        // Writes racing the drain.
        let writer = write(0..pages - 100);
        let mut seen = DirtyBitmap::new(pages);
        cow.drain::<CowError>(&mut |run| {
            assert_eq!(run.slot, 7);
            assert_eq!(run.gpa, (1 << 30) + run.first * PAGE_SIZE);
            for k in 0..run.data.len() as u64 / PAGE_SIZE {
                let p = run.first + k;
                assert_eq!(first_word(&run.data, k), p, "page {p} drained changed");
                assert!(!seen.get(p));
                seen.set(p);
            }
            Ok(())
        })
        .unwrap();
        writer.join().unwrap();
        assert_eq!(seen, set);
        let all = m.volatile(0, m.len()).unwrap();
        for p in 0..pages {
            assert_eq!(first_word(&all, p), 1_000_000 + p, "write to page {p} lost");
        }
    }

    #[test]
    fn drain_sees_pages_as_protected_4k() {
        writes_racing_the_drain_are_seen_after_it(Backing::Anonymous);
    }

    #[test]
    fn drain_sees_pages_as_protected_huge() {
        writes_racing_the_drain_are_seen_after_it(Backing::TransparentHuge);
    }

    #[test]
    fn dropping_without_a_drain_lets_blocked_writers_go() {
        let pages = 64;
        let m = filled(pages, Backing::Anonymous);
        let host = m.as_ptr() as usize;
        let cow = CopyOnWrite::arm(&[(host, m.len())]).unwrap();
        cow.protect(0, host, 0, &DirtyBitmap::full(pages)).unwrap();
        let writer = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below).
            let v = unsafe { VolatileSlice::new(host as *mut u8, (pages * PAGE_SIZE) as usize) };
            for p in 0..pages {
                v.write_obj(42u64, (p * PAGE_SIZE) as usize).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        drop(cow);
        writer.join().unwrap();
        let all = m.volatile(0, m.len()).unwrap();
        assert!((0..pages).all(|p| first_word(&all, p) == 42));
    }
}
