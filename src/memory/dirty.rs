//! Dirty-page bitmaps: one bit per 4 KiB page of a chunk, in KVM's layout
//! (bit i of word i/64 is page i), so a KVM dirty log can be OR-ed in as is.

/// A bitmap of dirty pages over `pages` pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// All clean.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// All dirty.
    pub fn full(pages: u64) -> Self {
        let mut b = Self::new(pages);
        b.set_all();
        b
    }

    /// A bitmap over `pages` pages from words in KVM's layout (a dirty
    /// log, or vm-memory's `AtomicBitmap::get_and_reset`); missing words
    /// read as clean, bits past `pages` are dropped.
    pub fn from_words(mut words: Vec<u64>, pages: u64) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        let tail = pages % 64;
        if tail != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        DirtyBitmap { words, pages }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks every page dirty.
    pub fn set_all(&mut self) {
        for w in &mut self.words {
            *w = u64::MAX;
        }
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last = (1u64 << tail) - 1;
            }
        }
    }

    /// Marks page `i` dirty.
    pub fn set(&mut self, i: u64) {
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Marks page `i` clean.
    pub fn unset(&mut self, i: u64) {
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }

    /// Whether page `i` is dirty.
    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// ORs a KVM dirty log (same layout) into this bitmap.
    pub fn merge_words(&mut self, log: &[u64]) {
        for (w, l) in self.words.iter_mut().zip(log) {
            *w |= *l;
        }
    }

    /// ORs pages `first .. first + self.pages()` of a larger log (same
    /// layout) into this bitmap: one chunk's share of a KVM slot's log that
    /// spans several chunks. Bits past the log's end read as clean.
    pub fn merge_bits(&mut self, log: &[u64], first: u64) {
        let word = |i: usize| log.get(i).copied().unwrap_or(0);
        let (skip, shift) = ((first / 64) as usize, (first % 64) as u32);
        for (i, w) in self.words.iter_mut().enumerate() {
            let lo = word(skip + i);
            *w |= if shift == 0 {
                lo
            } else {
                (lo >> shift) | (word(skip + i + 1) << (64 - shift))
            };
        }
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// ORs another bitmap into this one.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        self.merge_words(&other.words);
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        for w in &mut self.words {
            *w = 0;
        }
    }

    /// Takes the current bits, leaving the bitmap clean.
    pub fn take(&mut self) -> DirtyBitmap {
        let out = self.clone();
        self.clear();
        out
    }

    /// Runs of consecutive dirty pages as (first page, count), in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut start: Option<u64> = None;
        for (wi, &w) in self.words.iter().enumerate() {
            if w == 0 && start.is_none() {
                continue;
            }
            if w == u64::MAX && start.is_some() {
                continue;
            }
            for b in 0..64 {
                let i = wi as u64 * 64 + b;
                if i >= self.pages {
                    break;
                }
                let d = w & (1 << b) != 0;
                match (d, start) {
                    (true, None) => start = Some(i),
                    (false, Some(s)) => {
                        out.push((s, i - s));
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(s) = start {
            out.push((s, self.pages - s));
        }
        out
    }
}

/// Dirty pages kept across fetches, per chunk, for someone who needs
/// every page dirtied since a moment of their choosing (a checkpoint
/// chain: the pages written since the last checkpoint), while other
/// operations fetch and clear the VM's dirty logs meanwhile. The VM feeds
/// every fetch into each accumulator it keeps; the owner takes what
/// accumulated and starts afresh.
#[derive(Debug, Default)]
pub struct DirtyAccumulator {
    sets: std::sync::Mutex<std::collections::BTreeMap<u32, DirtyBitmap>>,
}

impl DirtyAccumulator {
    /// An empty accumulator.
    pub fn new() -> DirtyAccumulator {
        DirtyAccumulator::default()
    }

    fn sets(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u32, DirtyBitmap>> {
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the pages `fresh` says chunk `chunk` dirtied.
    pub fn record(&self, chunk: u32, fresh: &DirtyBitmap) {
        let mut s = self.sets();
        match s.get_mut(&chunk) {
            Some(b) => b.merge(fresh),
            None => {
                s.insert(chunk, fresh.clone());
            }
        }
    }

    /// What accumulated for `chunk` (a chunk of `pages` pages), or none.
    pub fn get(&self, chunk: u32, pages: u64) -> DirtyBitmap {
        self.sets()
            .get(&chunk)
            .cloned()
            .unwrap_or_else(|| DirtyBitmap::new(pages))
    }

    /// Takes everything accumulated and starts afresh.
    pub fn take(&self) -> std::collections::BTreeMap<u32, DirtyBitmap> {
        std::mem::take(&mut *self.sets())
    }

    /// Gives back what [`DirtyAccumulator::take`] took, when its taker
    /// failed (a checkpoint that will not exist: its pages belong to the next).
    pub fn give_back(&self, taken: std::collections::BTreeMap<u32, DirtyBitmap>) {
        for (chunk, b) in taken {
            self.record(chunk, &b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_of_a_larger_log_holds_exactly_its_pages() {
        let pages = 500u64;
        let mut log = DirtyBitmap::new(pages);
        for i in (0..pages).filter(|i| (i * 7919) % 5 < 2 || *i == 63 || *i == 64) {
            log.set(i);
        }
        for (first, n) in [
            (0, 500),
            (0, 64),
            (64, 128),
            (3, 61),
            (63, 2),
            (100, 300),
            (450, 50),
            (1, 1),
        ] {
            let mut b = DirtyBitmap::new(n);
            b.set(0); // bits already there stay
            b.merge_bits(&log.words, first);
            for i in 0..n {
                assert_eq!(
                    b.get(i),
                    i == 0 || log.get(first + i),
                    "page {i} of {first}+{n}"
                );
            }
            let past = b.words.last().unwrap() >> (n % 64);
            assert!(
                n % 64 == 0 || past == 0,
                "no bit past page {n} of {first}+{n}"
            );
        }
    }

    #[test]
    fn runs_group_consecutive_pages() {
        let mut b = DirtyBitmap::new(200);
        for i in [0, 1, 2, 63, 64, 65, 130, 199] {
            b.set(i);
        }
        assert_eq!(b.runs(), vec![(0, 3), (63, 3), (130, 1), (199, 1)]);
        assert_eq!(b.count(), 8);
    }

    #[test]
    fn full_bitmap_has_one_run_and_no_bits_past_the_end() {
        let b = DirtyBitmap::full(100);
        assert_eq!(b.count(), 100);
        assert_eq!(b.runs(), vec![(0, 100)]);
    }

    #[test]
    fn take_leaves_clean() {
        let mut b = DirtyBitmap::new(10);
        b.set(3);
        let t = b.take();
        assert!(t.get(3));
        assert_eq!(b.count(), 0);
    }
}
