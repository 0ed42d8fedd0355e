//! A checkpoint file's page index: for each page the file holds, where its
//! record is and its crc, or that the page became zero.
//!
//! On disk (format version 2, `docs/checkpoint-format.md`) the index is a
//! list of **runs**, pages contiguous in guest memory whose records follow
//! each other in the file, then one crc per page with data. A checkpoint of
//! a guest that wrote its memory in long stretches needs a few runs and
//! 4 bytes a page: ~0.9 MB for a GiB of data, where version 1's 24-byte
//! entries took 5.5 MB. Reading and checking that index is most of what a
//! lazy restore does before its vCPUs may run, so its size is start-up time.
//!
//! This module owns the index's encoding, its checks and its lookups. The
//! section's place in the file and its checksum are `format.rs`'s, which
//! imports this module (never the other way round).

use crate::api::checkpoint::CheckpointKind as Kind;
use crate::memory::PAGE_SIZE;

/// Bytes of one run on disk.
pub const RUN_LEN: usize = 16;
/// Bytes of one page's crc on disk.
pub const CRC_LEN: usize = 4;
/// Run flag: the run's pages are all zeros and have no records.
pub const RUN_FLAG_ZERO: u16 = 1;
/// Page records a file may hold: the index numbers them with 32 bits.
pub const MAX_RECORDS: u64 = 1 << 32;
/// Pages in one run at most (its count is 16 bits); a writer cuts longer
/// stretches into several runs.
pub const MAX_RUN_PAGES: u64 = u16::MAX as u64;

/// Where a section lies in the file. The file's layout is `format.rs`'s;
/// the index needs the pages section's place to check and locate records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Section {
    /// File offset of its first byte.
    pub(crate) offset: u64,
    /// Its length in bytes.
    pub(crate) len: u64,
}

impl Section {
    pub(crate) fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// An index section whose checksum holds but whose runs are impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// The section is not whole runs followed by whole crcs.
    #[error("the index does not end on a whole run and crc")]
    Partial,
    /// One run is wrong.
    #[error("index run {run} (gpa {gpa:#x}, {pages} pages): {problem}")]
    Run {
        /// Its position in the index.
        run: usize,
        /// Its first page.
        gpa: u64,
        /// Its page count.
        pages: u64,
        /// What is wrong with it.
        problem: RunProblem,
    },
    /// The crcs do not match the pages with data.
    #[error("the index holds {crcs} page crcs for {pages} pages with data")]
    Crcs {
        /// Crcs in the section.
        crcs: usize,
        /// Pages with data the runs describe.
        pages: usize,
    },
}

/// What is wrong with one run of the index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunProblem {
    /// A flag this version does not know.
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u16),
    /// A run of no pages.
    #[error("a run of no pages")]
    Empty,
    /// Its gpa is not page-aligned.
    #[error("gpa is not page-aligned")]
    Unaligned,
    /// It ends beyond the largest address.
    #[error("ends beyond the largest address")]
    Overflow,
    /// It does not start after the previous run.
    #[error("does not start after the previous run, which ends at {0:#x}")]
    Overlaps(u64),
    /// A zero run in a full checkpoint, which has none.
    #[error("zero run in a full checkpoint")]
    ZeroInFull,
    /// A zero run that names a record.
    #[error("zero run with a record number {0}")]
    ZeroWithRecord(u32),
    /// Its records are not all in the pages section.
    #[error("records {first}..{end} are not all in the {records} of the pages section")]
    OutsidePages {
        /// Its first record.
        first: u32,
        /// One past its last record.
        end: u64,
        /// Records in the pages section.
        records: u64,
    },
}

/// One page's entry in the index: a page of the file seen on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Guest-physical address of the page (page-aligned).
    pub gpa: u64,
    /// Offset of the page's record in the file; 0 for a zero page.
    pub offset: u64,
    /// crc32c of the page's 4096 bytes; 0 for a zero page.
    pub crc: u32,
    /// The page's latest version is all zeros and has no data in the file.
    pub zero: bool,
}

/// A run as held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    gpa: u64,
    pages: u64,
    /// File offset of the first page's record; 0 for a zero run.
    offset: u64,
    /// Position of the first page's crc among the crcs; unused for a zero
    /// run.
    crc_at: usize,
    zero: bool,
}

impl Run {
    fn end(&self) -> u64 {
        self.gpa + self.pages * PAGE_SIZE
    }

    fn entry(&self, k: u64, crcs: &[u8]) -> IndexEntry {
        if self.zero {
            return IndexEntry {
                gpa: self.gpa + k * PAGE_SIZE,
                offset: 0,
                crc: 0,
                zero: true,
            };
        }
        let at = (self.crc_at + k as usize) * CRC_LEN;
        IndexEntry {
            gpa: self.gpa + k * PAGE_SIZE,
            offset: self.offset + k * PAGE_SIZE,
            crc: u32::from_le_bytes([crcs[at], crcs[at + 1], crcs[at + 2], crcs[at + 3]]),
            zero: false,
        }
    }
}

/// A file's index, checked: runs sorted by gpa and not overlapping, every
/// data record inside the pages section, one crc per data page.
#[derive(Debug)]
pub struct Index {
    runs: Vec<Run>,
    /// The crcs as stored (little-endian), read straight into place.
    crcs: Vec<u8>,
    pages: usize,
}

impl Index {
    /// Builds the index from its on-disk parts: `runs` (`RUN_LEN` bytes
    /// each) and `crcs` (`CRC_LEN` bytes per data page), checking every
    /// run against the pages section `section` (the records a run may
    /// point at). The error says which run is wrong and why.
    pub(crate) fn decode(
        runs: &[u8],
        crcs: Vec<u8>,
        kind: Kind,
        section: Section,
    ) -> Result<Index, IndexError> {
        if !runs.len().is_multiple_of(RUN_LEN) || !crcs.len().is_multiple_of(CRC_LEN) {
            return Err(IndexError::Partial);
        }
        let records = section.len / PAGE_SIZE;
        let mut out = Vec::with_capacity(runs.len() / RUN_LEN);
        let mut prev_end = 0u64;
        let mut crc_at = 0usize;
        let mut pages = 0usize;
        for (i, b) in runs.chunks_exact(RUN_LEN).enumerate() {
            let gpa = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
            let record = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
            let count = u16::from_le_bytes([b[12], b[13]]) as u64;
            let flags = u16::from_le_bytes([b[14], b[15]]);
            let bad = |problem| IndexError::Run {
                run: i,
                gpa,
                pages: count,
                problem,
            };
            if flags & !RUN_FLAG_ZERO != 0 {
                return Err(bad(RunProblem::UnknownFlags(flags)));
            }
            if count == 0 {
                return Err(bad(RunProblem::Empty));
            }
            if !gpa.is_multiple_of(PAGE_SIZE) {
                return Err(bad(RunProblem::Unaligned));
            }
            let end = gpa
                .checked_add(count * PAGE_SIZE)
                .ok_or_else(|| bad(RunProblem::Overflow))?;
            if i > 0 && gpa < prev_end {
                return Err(bad(RunProblem::Overlaps(prev_end)));
            }
            let zero = flags & RUN_FLAG_ZERO != 0;
            let offset = if zero {
                // Disks' zero extents hide their base image's blocks, so
                // full checkpoints have them too; memory's never.
                if kind == Kind::Full && gpa >> crate::vmm::store::SPACE_SHIFT == 0 {
                    return Err(bad(RunProblem::ZeroInFull));
                }
                if record != 0 {
                    return Err(bad(RunProblem::ZeroWithRecord(record)));
                }
                0
            } else {
                if record as u64 + count > records {
                    return Err(bad(RunProblem::OutsidePages {
                        first: record,
                        end: record as u64 + count,
                        records,
                    }));
                }
                section.offset + record as u64 * PAGE_SIZE
            };
            out.push(Run {
                gpa,
                pages: count,
                offset,
                crc_at,
                zero,
            });
            if !zero {
                crc_at += count as usize;
            }
            pages += count as usize;
            prev_end = end;
        }
        if crc_at * CRC_LEN != crcs.len() {
            return Err(IndexError::Crcs {
                crcs: crcs.len() / CRC_LEN,
                pages: crc_at,
            });
        }
        Ok(Index {
            runs: out,
            crcs,
            pages,
        })
    }

    /// Encodes `entries` (sorted by gpa, one per gpa) as the index section:
    /// runs, then crcs. Returns the bytes and the number of runs.
    pub(crate) fn encode(entries: &[IndexEntry], pages_offset: u64) -> (Vec<u8>, u64) {
        let mut runs: Vec<(IndexEntry, u64)> = Vec::new();
        for e in entries {
            match runs.last_mut() {
                Some((first, n))
                    if first.zero == e.zero
                        && *n < MAX_RUN_PAGES
                        && first.gpa + *n * PAGE_SIZE == e.gpa
                        && (e.zero || first.offset + *n * PAGE_SIZE == e.offset) =>
                {
                    *n += 1
                }
                _ => runs.push((*e, 1)),
            }
        }
        let data = entries.iter().filter(|e| !e.zero).count();
        let mut out = Vec::with_capacity(runs.len() * RUN_LEN + data * CRC_LEN);
        for (first, n) in &runs {
            let record = if first.zero {
                0
            } else {
                (first.offset - pages_offset) / PAGE_SIZE
            };
            let flags = if first.zero { RUN_FLAG_ZERO } else { 0 };
            out.extend_from_slice(&first.gpa.to_le_bytes());
            out.extend_from_slice(&(record as u32).to_le_bytes());
            out.extend_from_slice(&(*n as u16).to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
        }
        for e in entries.iter().filter(|e| !e.zero) {
            out.extend_from_slice(&e.crc.to_le_bytes());
        }
        (out, runs.len() as u64)
    }

    /// Pages in the index (zero pages included).
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Whether the index holds no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Pages with data (not zero pages).
    pub fn data_pages(&self) -> u64 {
        (self.crcs.len() / CRC_LEN) as u64
    }

    /// Every page's entry, sorted by gpa.
    pub fn iter(&self) -> impl Iterator<Item = IndexEntry> + '_ {
        self.runs
            .iter()
            .flat_map(move |r| (0..r.pages).map(move |k| r.entry(k, &self.crcs)))
    }

    /// The run holding `gpa`, or the first one after it.
    fn run_from(&self, gpa: u64) -> Option<&Run> {
        let i = self.runs.partition_point(|r| r.end() <= gpa);
        self.runs.get(i)
    }

    /// The entry of the page at `gpa`, if the index has one.
    pub fn get(&self, gpa: u64) -> Option<IndexEntry> {
        let r = self.run_from(gpa).filter(|r| r.gpa <= gpa)?;
        let k = (gpa - r.gpa) / PAGE_SIZE;
        Some(r.entry(k, &self.crcs)).filter(|e| e.gpa == gpa)
    }

    /// Each run's address range (start, end), in order.
    pub fn spans(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|r| (r.gpa, r.end()))
    }

    /// Pages with data at or above address `from`.
    pub fn spans_data_blocks(&self, from: u64) -> u64 {
        self.runs
            .iter()
            .filter(|r| !r.zero && r.gpa >= from)
            .map(|r| r.pages)
            .sum()
    }

    /// The lowest gpa in the index at or above `gpa`.
    pub fn first_at_or_after(&self, gpa: u64) -> Option<u64> {
        let gpa = gpa.checked_next_multiple_of(PAGE_SIZE)?;
        self.run_from(gpa).map(|r| r.gpa.max(gpa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: Section = Section {
        offset: 4096,
        len: 1 << 30,
    };

    fn data(gpa: u64, record: u64) -> IndexEntry {
        IndexEntry {
            gpa,
            offset: PAGES.offset + record * PAGE_SIZE,
            crc: (gpa as u32) ^ 0x5a5a_5a5a,
            zero: false,
        }
    }

    fn zero(gpa: u64) -> IndexEntry {
        IndexEntry {
            gpa,
            offset: 0,
            crc: 0,
            zero: true,
        }
    }

    fn round_trip(entries: &[IndexEntry], kind: Kind) -> (Index, u64) {
        let (bytes, runs) = Index::encode(entries, PAGES.offset);
        let split = runs as usize * RUN_LEN;
        let index = Index::decode(&bytes[..split], bytes[split..].to_vec(), kind, PAGES).unwrap();
        (index, runs)
    }

    #[test]
    fn pages_contiguous_in_memory_and_file_make_one_run() {
        let p = PAGE_SIZE;
        // Records 0..4 for gpas 0..4, then a gap in memory, then a page whose
        // record is not the next one, then zeros.
        let mut entries: Vec<IndexEntry> = (0..4).map(|i| data(i * p, i)).collect();
        entries.push(data(10 * p, 4));
        entries.push(data(11 * p, 9));
        entries.push(zero(12 * p));
        entries.push(zero(13 * p));
        entries.push(data(14 * p, 10));
        let (index, runs) = round_trip(&entries, Kind::Incremental);
        assert_eq!(runs, 5);
        assert_eq!(index.len(), entries.len());
        assert_eq!(index.data_pages(), 7);
        assert_eq!(index.iter().collect::<Vec<_>>(), entries);
        for e in &entries {
            assert_eq!(index.get(e.gpa), Some(*e));
        }
        assert_eq!(index.get(5 * p), None);
        assert_eq!(index.get(100 * p), None);
        assert_eq!(index.first_at_or_after(0), Some(0));
        assert_eq!(index.first_at_or_after(2 * p), Some(2 * p));
        assert_eq!(index.first_at_or_after(4 * p), Some(10 * p));
        assert_eq!(index.first_at_or_after(3 * p + 1), Some(10 * p));
        assert_eq!(index.first_at_or_after(p + 1), Some(2 * p));
        assert_eq!(index.first_at_or_after(15 * p), None);
    }

    #[test]
    fn a_run_longer_than_its_count_allows_is_cut() {
        let n = MAX_RUN_PAGES + 10;
        let entries: Vec<IndexEntry> = (0..n).map(|i| data(i * PAGE_SIZE, i)).collect();
        let (index, runs) = round_trip(&entries, Kind::Full);
        assert_eq!(runs, 2);
        assert!(index.iter().eq(entries.iter().copied()));
    }

    #[test]
    fn impossible_runs_are_refused_with_the_reason() {
        let p = PAGE_SIZE;
        let run = |gpa: u64, record: u32, count: u16, flags: u16| {
            let mut b = gpa.to_le_bytes().to_vec();
            b.extend_from_slice(&record.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b
        };
        let crcs = |n: usize| vec![0u8; n * CRC_LEN];
        let small = Section {
            offset: 4096,
            len: 8 * p,
        };
        let cases: Vec<(Vec<u8>, Vec<u8>, Kind, &str)> = vec![
            (run(0, 0, 1, 2), crcs(1), Kind::Full, "unknown flags"),
            (run(0, 0, 0, 0), crcs(0), Kind::Full, "no pages"),
            (run(5, 0, 1, 0), crcs(1), Kind::Full, "page-aligned"),
            (
                run(u64::MAX - p + 1, 0, 2, 0),
                crcs(2),
                Kind::Full,
                "beyond",
            ),
            (
                [run(4 * p, 0, 2, 0), run(5 * p, 2, 1, 0)].concat(),
                crcs(3),
                Kind::Full,
                "after the previous run",
            ),
            (run(0, 0, 1, 1), crcs(0), Kind::Full, "zero run in a full"),
            (run(0, 3, 1, 1), crcs(0), Kind::Incremental, "record number"),
            (run(0, 7, 2, 0), crcs(2), Kind::Full, "not all in the 8"),
            (run(0, 0, 2, 0), crcs(1), Kind::Full, "1 page crcs for 2"),
            (
                run(0, 0, 1, 0)[..15].to_vec(),
                crcs(1),
                Kind::Full,
                "whole run",
            ),
        ];
        for (runs, crcs, kind, why) in cases {
            let err = Index::decode(&runs, crcs, kind, small).unwrap_err();
            assert!(err.to_string().contains(why), "expected {why:?}: {err}");
        }
    }
}
