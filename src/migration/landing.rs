//! Where a destination's received pages land: the guest memory of the VM
//! being received, found by guest-physical address, and faulted in ahead
//! of the data by a helper thread.
//!
//! A raw `pages` frame is read from the connection straight into guest
//! memory ([`PageTarget`]): the bytes are copied once, by the kernel.
//! Memory that was never touched must first be faulted in (a fresh page
//! zeroed, a page table entry set), which costs about as much as the copy
//! itself; the [`Prefaulter`] does that on its own thread, for the frame
//! being read and the range after it, so the receiving thread mostly finds
//! its pages present. It only ever faults in pages the source is sending
//! or very likely to send next (the rest of a run cut at a frame's size):
//! memory the guest never touched stays untouched here too.
//!
//! This module does not read frames (`protocol.rs`) or decide what to do
//! with them (`destination.rs`).

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

use super::compress::{decode_pages, DecodeError, Encoding};
use super::protocol::{PageTarget, MAX_PAGES_PER_FRAME};
use crate::memory::{GuestMemory, Mapping, MappingError, PAGE_SIZE};

/// Ranges waiting for the helper: a few frames' worth. A hint that does
/// not fit is dropped (the receiver faults those pages itself).
const PREFAULT_BACKLOG: usize = 4;
/// The helper faults in this much at a time, so that the receiver, which
/// may overtake it, soon finds pages it left behind instead of waiting on
/// one large call.
const PREFAULT_STEP: usize = 2 << 20;

/// A run of pages the source sent that does not fit the VM's memory.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// Unaligned, or so long its length overflows.
    #[error("a page run at {gpa:#x} of {pages} pages is malformed")]
    Malformed {
        /// Its first page.
        gpa: u64,
        /// Its page count.
        pages: u64,
    },
    /// Not inside one chunk of guest memory.
    #[error("pages at {gpa:#x}+{len:#x} lie outside the VM's guest memory")]
    Outside {
        /// Its first page.
        gpa: u64,
        /// Its length.
        len: u64,
    },
}

/// The mapping and offset of `pages` pages at `gpa` in `memory`, within
/// one chunk.
pub fn place(
    memory: &GuestMemory,
    gpa: u64,
    pages: u64,
) -> Result<(&Mapping, usize, usize), PlaceError> {
    let len = pages
        .checked_mul(PAGE_SIZE)
        .filter(|_| gpa.is_multiple_of(PAGE_SIZE))
        .ok_or(PlaceError::Malformed { gpa, pages })?;
    let c = memory
        .chunk_of(gpa)
        .filter(|c| gpa.checked_add(len).is_some_and(|e| e <= c.range.end()))
        .ok_or(PlaceError::Outside { gpa, len })?;
    Ok((&c.mapping, (gpa - c.range.start) as usize, len as usize))
}

/// A range of a mapping, as plain numbers so it may cross threads.
#[derive(Debug, Clone, Copy)]
struct Range {
    addr: usize,
    len: usize,
}

/// Faults in received memory on a thread of its own, ahead of the
/// receiver. Cloning gives another receiver a way to hint it.
#[derive(Clone)]
pub struct Prefaulter {
    tx: SyncSender<Range>,
}

/// The prefaulter's thread; joined on drop, so that it never touches
/// memory that has gone.
pub struct PrefaultThread {
    thread: Option<JoinHandle<()>>,
    tx: Option<SyncSender<Range>>,
}

impl PrefaultThread {
    /// Starts the helper; None if no thread could start (the receiver then
    /// faults every page itself).
    ///
    /// # Safety
    /// Every mapping whose ranges are hinted must stay mapped until this
    /// value is dropped.
    pub unsafe fn start() -> Option<PrefaultThread> {
        let (tx, rx) = sync_channel::<Range>(PREFAULT_BACKLOG);
        let thread = std::thread::Builder::new()
            .name("incoming-prefault".into())
            .spawn(move || {
                while let Ok(r) = rx.recv() {
                    let mut at = 0;
                    while at < r.len {
                        let n = PREFAULT_STEP.min(r.len - at);
                        // SAFETY: the range lies inside a live mapping (the
                        // caller of `start` keeps it mapped until this
                        // thread is joined); MADV_POPULATE_WRITE only faults
                        // pages in and keeps their contents. A failure
                        // (memory short) only means the receiver faults them.
                        unsafe {
                            libc::madvise(
                                (r.addr + at) as *mut libc::c_void,
                                n,
                                MADV_POPULATE_WRITE,
                            )
                        };
                        at += n;
                    }
                }
            })
            .ok()?;
        Some(PrefaultThread {
            thread: Some(thread),
            tx: Some(tx),
        })
    }

    /// A handle to hint the helper with.
    pub fn handle(&self) -> Option<Prefaulter> {
        self.tx.as_ref().map(|tx| Prefaulter { tx: tx.clone() })
    }
}

impl Drop for PrefaultThread {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// MADV_POPULATE_WRITE (Linux 5.14); libc may lack the constant.
const MADV_POPULATE_WRITE: i32 = 23;

impl Prefaulter {
    /// A frame of `len` bytes lands at `off` in `m`: fault in what the
    /// receiver has not reached yet, and the same length after it if the
    /// frame is full (a run the source cut at the frame size goes on).
    fn hint(&self, m: &Mapping, off: usize, len: usize) {
        let base = m.as_ptr() as usize;
        let full = (MAX_PAGES_PER_FRAME as u64 * PAGE_SIZE) as usize;
        let mut ranges = vec![Range {
            addr: base + off,
            len,
        }];
        if len == full {
            let next = (off + len).min(m.len());
            let n = full.min(m.len() - next);
            if n > 0 {
                ranges.push(Range {
                    addr: base + next,
                    len: n,
                });
            }
        }
        for r in ranges {
            match self.tx.try_send(r) {
                Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

/// A frame's pages that could not be put into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The run does not fit the VM's memory.
    #[error(transparent)]
    Place(#[from] PlaceError),
    /// A `Pages` frame's data does not decode.
    #[error("pages at {gpa:#x}: {source}")]
    Decode {
        /// Its first page.
        gpa: u64,
        /// The decoder's error.
        #[source]
        source: DecodeError,
    },
    /// Zero pages could not be dropped.
    #[error("zero pages at {gpa:#x}: {source}")]
    Discard {
        /// Their first page.
        gpa: u64,
        /// madvise's error.
        #[source]
        source: MappingError,
    },
}

/// Received memory as a [`PageTarget`]: raw pages land at their address.
pub struct Landing<'a> {
    memory: &'a GuestMemory,
    prefault: Option<Prefaulter>,
}

impl<'a> Landing<'a> {
    /// Pages land in `memory`; `prefault` (if any) faults them in ahead.
    ///
    /// # Safety
    /// Nothing else may read or write the memory of a page while a frame
    /// is being read into it: true of memory no vCPU runs on yet, written
    /// by receivers of one stream whose frames within a round never name
    /// one page twice.
    pub unsafe fn new(memory: &'a GuestMemory, prefault: Option<Prefaulter>) -> Landing<'a> {
        Landing { memory, prefault }
    }

    /// The memory pages land in.
    pub fn memory(&self) -> &GuestMemory {
        self.memory
    }

    /// Decodes a compressed (or raw, if the reader did not place it)
    /// `pages` frame into guest memory.
    pub fn decode(
        &mut self,
        gpa: u64,
        encoding: Encoding,
        count: u32,
        data: &[u8],
    ) -> Result<(), ApplyError> {
        let (m, off, len) = place(self.memory, gpa, u64::from(count))?;
        // SAFETY: `place` checked the range lies inside the mapping;
        // `Landing::new`'s caller guarantees nobody else touches it now.
        let dst = unsafe { std::slice::from_raw_parts_mut(m.as_ptr().add(off), len) };
        decode_pages(encoding, data, dst).map_err(|source| ApplyError::Decode { gpa, source })
    }

    /// A `zero` frame: the pages go back to the zero they started as.
    pub fn zero(&mut self, gpa: u64, pages: u64) -> Result<(), ApplyError> {
        let (m, off, len) = place(self.memory, gpa, pages)?;
        m.discard_range(off, len)
            .map_err(|source| ApplyError::Discard { gpa, source })
    }
}

impl PageTarget for Landing<'_> {
    fn place(&mut self, gpa: u64, count: u32) -> Option<&mut [u8]> {
        let (m, off, len) = place(self.memory, gpa, u64::from(count)).ok()?;
        if let Some(p) = &self.prefault {
            p.hint(m, off, len);
        }
        // SAFETY: `place` checked the range lies inside the mapping, which
        // `self.memory` keeps alive for this borrow; `Landing::new`'s
        // caller guarantees nobody else touches these pages meanwhile.
        Some(unsafe { std::slice::from_raw_parts_mut(m.as_ptr().add(off), len) })
    }
}
