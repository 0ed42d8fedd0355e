//! The source's page stream over its connections: how a run of guest
//! pages becomes frames, and the sender threads ("lanes", one per
//! connection) that turn a pre-copy round's runs into frames in parallel.
//!
//! A round's runs go into one queue that every lane takes from, so a lane
//! on a slower connection simply takes fewer (Cloud Hypervisor's and
//! QEMU's multifd channels work alike). A lane reads guest memory straight
//! into its connection's write buffer (`FrameWriter::write_guest_pages`):
//! the page crosses user memory once, and is checksummed or sealed while
//! it is in cache. Lanes live for one round only: at the round's end
//! ([`Round::finish`]) each writes out what it holds and hands its
//! connection back, so that the round's `end-of-round` frames, the pause
//! (whose few pages the pausing thread sends itself, at its own priority)
//! and the acks run on one thread, in order.
//!
//! This module owns that division of work and the zero-page test on guest
//! memory. It does not know what a round is for (the engine), nor how a
//! connection was opened or authenticated (`source.rs`, `auth.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::address::Conn;
use super::compress::{encode_pages, Compression, Encoding};
use super::protocol::{Frame, FrameStream, ProtocolError, MAX_PAGES_PER_FRAME};
use crate::memory::{VolatileSlice, PAGE_SIZE};

/// One connection's frame stream.
pub type Stream = FrameStream<Box<dyn Conn>>;

/// Bytes in one guest page.
const PAGE_LEN: usize = PAGE_SIZE as usize;
/// Pages one work item holds (one full `Pages` frame): big enough that a
/// lane's overhead per item vanishes, small enough that the lanes share a
/// round's last runs evenly.
const ITEM_PAGES: u64 = MAX_PAGES_PER_FRAME as u64;
/// Work items queued per lane before the producer waits: enough that no
/// lane runs dry while the producer walks the dirty bitmap.
const QUEUED_PER_LANE: usize = 2;
/// The zero-page test reads guest memory in blocks of this size into a
/// buffer of its own (guest memory is never borrowed as a slice): a page
/// holding data is almost always told apart by its first block.
const ZERO_PROBE_LEN: usize = 256;

/// What sending pages did, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct SendStats {
    /// Pages sent as zero runs.
    pub zero_pages: u64,
    /// Bytes of page data sent (before compression; zero pages excluded).
    pub page_bytes: u64,
    /// `Pages` frames that compression made smaller.
    pub compressed_frames: u64,
}

impl SendStats {
    fn add(&mut self, o: &SendStats) {
        self.zero_pages += o.zero_pages;
        self.page_bytes += o.page_bytes;
        self.compressed_frames += o.compressed_frames;
    }
}

/// Buffers a sender reuses from run to run (compression only: raw pages go
/// from guest memory to the connection's own buffer).
#[derive(Default)]
pub struct Scratch {
    /// A stable copy of pages to compress (and to send raw if compression
    /// does not pay).
    bounce: Vec<u8>,
    /// The compressed pages.
    packed: Vec<u8>,
}

/// Whether a page of guest memory (which the guest may be writing) holds
/// only zero bytes. A torn answer is harmless: a page written meanwhile is
/// dirty and goes again in the next round.
fn page_is_zero(page: &VolatileSlice<'_>) -> bool {
    let mut probe = [0u8; ZERO_PROBE_LEN];
    let mut at = 0;
    while at < page.len() {
        let n = ZERO_PROBE_LEN.min(page.len() - at);
        let Ok(part) = page.subslice(at, n) else {
            return false;
        };
        part.copy_to(&mut probe[..n]);
        if !crate::memory::is_zero_page(&probe[..n]) {
            return false;
        }
        at += n;
    }
    true
}

/// Sends a run of guest pages on `s`: zero pages as `zero` frames, the
/// rest as `pages` frames of at most [`MAX_PAGES_PER_FRAME`] pages,
/// compressed when `compression` pays off. The run's bytes are read from
/// guest memory as they are sent.
pub fn send_run(
    s: &mut Stream,
    gpa: u64,
    data: &VolatileSlice<'_>,
    compression: Compression,
    scratch: &mut Scratch,
    stats: &mut SendStats,
) -> Result<(), ProtocolError> {
    let pages = data.len() / PAGE_LEN;
    let page = |i: usize| {
        data.subslice(i * PAGE_LEN, PAGE_LEN)
            .expect("a page inside the run")
    };
    let mut at = 0;
    while at < pages {
        let zero = page_is_zero(&page(at));
        let limit = if zero {
            pages
        } else {
            pages.min(at + MAX_PAGES_PER_FRAME as usize)
        };
        let mut end = at + 1;
        while end < limit && page_is_zero(&page(end)) == zero {
            end += 1;
        }
        let count = (end - at) as u64;
        let run_gpa = gpa + (at * PAGE_LEN) as u64;
        if zero {
            stats.zero_pages += count;
            s.write_frame(&Frame::Zero {
                gpa: run_gpa,
                pages: count,
            })?;
        } else {
            let len = (end - at) * PAGE_LEN;
            let part = data
                .subslice(at * PAGE_LEN, len)
                .expect("a part inside the run");
            stats.page_bytes += len as u64;
            send_data(s, run_gpa, count as u32, &part, compression, scratch, stats)?;
        }
        at = end;
    }
    Ok(())
}

/// Sends `count` pages of data (none of them known to be zero) as one
/// `pages` frame.
fn send_data(
    s: &mut Stream,
    gpa: u64,
    count: u32,
    data: &VolatileSlice<'_>,
    compression: Compression,
    scratch: &mut Scratch,
    stats: &mut SendStats,
) -> Result<(), ProtocolError> {
    if compression == Compression::None {
        return s.write_guest_pages(gpa, count, data);
    }
    // The compressor reads its input more than once: it needs a copy that
    // the guest cannot change under it.
    scratch.bounce.resize(data.len(), 0);
    data.copy_to(&mut scratch.bounce[..]);
    let enc = encode_pages(&scratch.bounce, compression, &mut scratch.packed);
    if enc == Encoding::Raw {
        return s.write_pages(gpa, enc, count, &scratch.bounce);
    }
    stats.compressed_frames += 1;
    s.write_pages(gpa, enc, count, &scratch.packed)
}

/// A run of guest pages queued for a lane: its address in this process
/// (guest memory stays mapped as long as the VM; see [`Round::push`]).
#[derive(Debug, Clone, Copy)]
struct Item {
    gpa: u64,
    addr: usize,
    len: usize,
}

/// What the lanes and the producer share.
struct Queue {
    state: Mutex<QueueState>,
    /// Wakes lanes: work queued, or the round ends.
    work: Condvar,
    /// Wakes the producer: room in the queue, or a lane failed.
    room: Condvar,
}

struct QueueState {
    items: VecDeque<Item>,
    /// No more items come: lanes drain the queue and stop.
    closing: bool,
    /// The first lane that failed, and why; every lane stops.
    failed: Option<(u32, ProtocolError)>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a lane hands back at the end of its round.
struct LaneEnd {
    stream: Stream,
    stats: SendStats,
}

/// Why a round of sending failed.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// A connection's stream failed (or was cut).
    #[error("connection {index}: {source}")]
    Stream {
        /// Which connection.
        index: u32,
        /// The stream's error.
        #[source]
        source: ProtocolError,
    },
    /// A sender thread could not start or died.
    #[error("the sender thread of connection {index}: {reason}")]
    Thread {
        /// Which connection.
        index: u32,
        /// What happened.
        reason: String,
    },
}

/// The lanes of one pre-copy round: one sender thread per connection,
/// each owning its connection until [`Round::finish`].
pub struct Round {
    queue: Arc<Queue>,
    lanes: Vec<(u32, JoinHandle<LaneEnd>)>,
}

impl Round {
    /// Starts a lane on each of `streams` (connection `i` at index `i`).
    pub fn start(
        streams: Vec<Stream>,
        compression: Compression,
    ) -> Result<Round, (LaneError, Vec<Stream>)> {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                closing: false,
                failed: None,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
        });
        let mut round = Round {
            queue: queue.clone(),
            lanes: Vec::new(),
        };
        let mut streams = streams.into_iter().enumerate();
        while let Some((i, stream)) = streams.next() {
            let index = i as u32;
            let q = queue.clone();
            // The stream comes back through this slot if the thread does
            // not start (spawn drops the closure, and with it the stream).
            let slot = Arc::new(Mutex::new(Some(stream)));
            let mine = slot.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("migrate-lane{index}"))
                .spawn(move || {
                    let stream = mine
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take()
                        .expect("the stream is handed over once");
                    lane(index, stream, compression, &q)
                });
            match spawned {
                Ok(h) => round.lanes.push((index, h)),
                Err(e) => {
                    let error = LaneError::Thread {
                        index,
                        reason: e.to_string(),
                    };
                    let mut back: Vec<Stream> = Vec::new();
                    if let Ok(ends) = round.finish_inner() {
                        back.extend(ends.into_iter().map(|e| e.stream));
                    }
                    back.extend(slot.lock().unwrap_or_else(|e| e.into_inner()).take());
                    back.extend(streams.map(|(_, s)| s));
                    return Err((error, back));
                }
            }
        }
        Ok(round)
    }

    /// Queues a run of guest memory (any length; it is cut into frames
    /// here) for the lanes; waits while the queue is full. Fails, without
    /// queueing, once a lane has failed.
    ///
    /// # Safety
    /// `data` must stay mapped until [`Round::finish`] returns: true of a
    /// VM's guest memory, which is only unmapped with the VM (moving a
    /// chunk between nodes swaps pages under the same addresses), and the
    /// VM outlives the migration that sends it.
    pub unsafe fn push(&self, gpa: u64, data: &VolatileSlice<'_>) -> Result<(), LaneError> {
        let addr = data.ptr_guard().as_ptr() as usize;
        let item_len = (ITEM_PAGES * PAGE_SIZE) as usize;
        let limit = QUEUED_PER_LANE * self.lanes.len().max(1);
        let mut at = 0;
        while at < data.len() {
            let len = item_len.min(data.len() - at);
            let mut q = self.queue.lock();
            while q.items.len() >= limit && q.failed.is_none() {
                q = self.queue.room.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if let Some((index, e)) = &q.failed {
                return Err(LaneError::Stream {
                    index: *index,
                    source: copy_error(e),
                });
            }
            q.items.push_back(Item {
                gpa: gpa + at as u64,
                addr: addr + at,
                len,
            });
            drop(q);
            self.queue.work.notify_one();
            at += len;
        }
        Ok(())
    }

    /// Ends the round: every lane sends what is queued and hands its
    /// connection back (in index order), with what it sent. On a failure
    /// the connections are gone (cut).
    pub fn finish(self) -> Result<(Vec<Stream>, SendStats), LaneError> {
        let ends = self.finish_inner()?;
        let mut stats = SendStats::default();
        let streams = ends
            .into_iter()
            .map(|e| {
                stats.add(&e.stats);
                e.stream
            })
            .collect();
        Ok((streams, stats))
    }

    fn finish_inner(mut self) -> Result<Vec<LaneEnd>, LaneError> {
        self.queue.lock().closing = true;
        self.queue.work.notify_all();
        let mut ends = Vec::new();
        let mut died = None;
        for (index, h) in std::mem::take(&mut self.lanes) {
            match h.join() {
                Ok(end) => ends.push(end),
                Err(_) => {
                    died.get_or_insert(LaneError::Thread {
                        index,
                        reason: "it panicked".into(),
                    });
                }
            }
        }
        if let Some((index, e)) = self.queue.lock().failed.take() {
            return Err(LaneError::Stream { index, source: e });
        }
        match died {
            Some(e) => Err(e),
            None => Ok(ends),
        }
    }
}

impl Drop for Round {
    fn drop(&mut self) {
        // Not finished (the engine failed elsewhere): stop the lanes
        // without sending what is queued.
        if !self.lanes.is_empty() {
            {
                let mut q = self.queue.lock();
                q.items.clear();
                q.closing = true;
            }
            self.queue.work.notify_all();
            for (_, h) in self.lanes.drain(..) {
                let _ = h.join();
            }
        }
    }
}

/// A `ProtocolError` for the producer, whose lane keeps the original.
fn copy_error(e: &ProtocolError) -> ProtocolError {
    ProtocolError::Io {
        op: "sending",
        frame: 0,
        offset: 0,
        source: std::io::Error::other(e.to_string()),
    }
}

/// One lane: takes runs from the queue until it is closed and empty, and
/// sends them on its connection.
fn lane(index: u32, mut stream: Stream, compression: Compression, q: &Queue) -> LaneEnd {
    let mut stats = SendStats::default();
    let mut scratch = Scratch::default();
    loop {
        let item = {
            let mut st = q.lock();
            loop {
                if st.failed.is_some() {
                    break None;
                }
                if let Some(i) = st.items.pop_front() {
                    break Some(i);
                }
                if st.closing {
                    break None;
                }
                st = q.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        q.room.notify_one();
        let Some(item) = item else { break };
        // SAFETY: `Round::push`'s caller keeps the memory mapped until the
        // round is finished, which joins this thread first.
        let data = unsafe { VolatileSlice::new(item.addr as *mut u8, item.len) };
        let sent = send_run(
            &mut stream,
            item.gpa,
            &data,
            compression,
            &mut scratch,
            &mut stats,
        );
        if let Err(e) = sent {
            // The others finish the run they are writing (their
            // connections are fine) and take no more; connection 0 then
            // tells the destination why the source gives up.
            q.lock().failed.get_or_insert((index, e));
            q.room.notify_all();
            q.work.notify_all();
            break;
        }
    }
    // What is buffered goes out now, so the round's frames are all on the
    // wire before anything that follows them on another thread.
    if let Err(e) = stream.flush() {
        let mut st = q.lock();
        st.failed.get_or_insert((index, e));
        q.room.notify_all();
    }
    LaneEnd { stream, stats }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::{Binding, FrameReader, SessionNonce};
    use std::os::unix::net::UnixStream;

    #[test]
    fn zero_pages_are_found_in_guest_memory() {
        let mut mem = vec![0u8; 3 * PAGE_LEN];
        mem[PAGE_LEN + 4000] = 1;
        mem[2 * PAGE_LEN] = 9;
        let v = VolatileSlice::from(&mut mem[..]);
        let page = |i: usize| v.subslice(i * PAGE_LEN, PAGE_LEN).unwrap();
        assert!(page_is_zero(&page(0)));
        assert!(!page_is_zero(&page(1)));
        assert!(!page_is_zero(&page(2)));
    }

    /// Sends `mem` from `gpa` over `lanes` connections in one round and
    /// reads every connection back: the pages each frame carried.
    fn round_trip(mem: &mut [u8], lanes: usize) -> (Vec<u8>, SendStats) {
        let session = SessionNonce([3; 32]);
        let mut streams = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..lanes {
            let (a, b) = UnixStream::pair().unwrap();
            let a: Box<dyn Conn> = Box::new(a);
            streams.push(FrameStream::bound(a, &Binding::checksummed(&session)));
            readers.push(std::thread::spawn(move || {
                let mut r = FrameReader::new(b, &session);
                let mut got = Vec::new();
                loop {
                    match r.read_frame() {
                        Ok(f) => got.push(f),
                        Err(ProtocolError::Closed { .. }) => return got,
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
        let round = Round::start(streams, Compression::None)
            .map_err(|(e, _)| e)
            .unwrap();
        let v = VolatileSlice::from(&mut mem[..]);
        // SAFETY: `mem` outlives the round, finished below.
        unsafe { round.push(0x10_0000, &v) }.unwrap();
        let (streams, stats) = round.finish().unwrap();
        drop(streams);
        let mut out = vec![0xEEu8; mem.len()];
        for r in readers {
            for f in r.join().unwrap() {
                match f {
                    Frame::Pages { gpa, data, .. } => {
                        let at = (gpa - 0x10_0000) as usize;
                        out[at..at + data.len()].copy_from_slice(&data);
                    }
                    Frame::Zero { gpa, pages } => {
                        let at = (gpa - 0x10_0000) as usize;
                        out[at..at + pages as usize * PAGE_LEN].fill(0);
                    }
                    f => panic!("unexpected {f:?}"),
                }
            }
        }
        (out, stats)
    }

    #[test]
    fn a_round_over_several_connections_carries_every_page_once() {
        let pages = 3 * ITEM_PAGES as usize + 5;
        let mut mem: Vec<u8> = (0..pages * PAGE_LEN)
            .map(|i| ((i / PAGE_LEN) % 7) as u8 * (i % 251) as u8)
            .collect();
        let zero = mem
            .chunks(PAGE_LEN)
            .filter(|p| p.iter().all(|&b| b == 0))
            .count() as u64;
        for lanes in [1, 3] {
            let (out, stats) = round_trip(&mut mem, lanes);
            assert!(out == mem, "{lanes} lane(s)");
            assert_eq!(stats.zero_pages, zero);
            assert_eq!(
                stats.page_bytes,
                (pages as u64 - zero) * PAGE_SIZE,
                "{lanes} lane(s)"
            );
        }
    }
}
