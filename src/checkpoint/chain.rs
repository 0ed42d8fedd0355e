//! Chains of checkpoint files in a directory: listing them, resolving the
//! files a restore of one id needs, working out which file holds each
//! page's latest version, and folding a chain into one full checkpoint.
//!
//! This module owns the chain rules (one full checkpoint, then incrementals
//! each naming its parent, all sharing the full one's chain id). It does not
//! own the file format (`format.rs`) nor restoring pages into guest memory
//! (the restore code, which consumes [`ResolvedChain::page_map`]).

use std::path::{Path, PathBuf};

use super::format::{
    checkpoint_file_name, new_chain_id, now_unix_ms, parse_checkpoint_file_name, read_header,
    CheckpointReader, CheckpointWriter, FormatError, Header, Kind, WrittenCheckpoint,
};
use super::index::IndexEntry;
use crate::memory::PAGE_SIZE;

/// Pages copied per batch when merging: large enough for sequential I/O.
const MERGE_BATCH_PAGES: usize = 256;

/// One complete checkpoint file of a directory, as its header describes it.
pub use crate::api::checkpoint::CheckpointEntry as ChainEntry;
/// A checkpoint file whose header cannot be used.
pub use crate::api::checkpoint::DamagedFile;

/// The header a listed file was listed with.
pub fn header_of(e: &ChainEntry) -> Header {
    Header {
        chain_id: e.chain_id,
        id: e.id,
        parent: e.parent,
        kind: e.kind,
        created_unix_ms: e.created_unix_ms,
        disk_blocks: e.disk_bytes / PAGE_SIZE,
    }
}

impl crate::api::Classify for ChainError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            ChainError::Empty { .. } | ChainError::NoSuchId { .. } => ErrorKind::NotFound,
            ChainError::MissingParent { .. }
            | ChainError::ForeignChain { .. }
            | ChainError::Inconsistent { .. } => ErrorKind::Unusable,
            ChainError::Format(e) => e.kind(),
            ChainError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }
}

/// Everything that can go wrong with a chain. Every variant names the
/// directory or the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The directory holds no complete checkpoint.
    #[error("{dir}: no checkpoints in this directory")]
    Empty {
        /// The directory.
        dir: PathBuf,
    },
    /// The requested id is not in the directory.
    #[error("{dir}: no checkpoint with id {id}")]
    NoSuchId {
        /// The directory.
        dir: PathBuf,
        /// The requested id.
        id: u32,
    },
    /// An incremental checkpoint's parent file is missing.
    #[error("{file}: its parent checkpoint {parent} is missing (expected {expected})")]
    MissingParent {
        /// The incremental checkpoint.
        file: PathBuf,
        /// The parent id it names.
        parent: u32,
        /// Where the parent should be.
        expected: PathBuf,
    },
    /// A file names as parent a checkpoint of another chain.
    #[error("{file}: belongs to chain {chain_id:#018x} but its parent {parent_file} belongs to chain {parent_chain_id:#018x}")]
    ForeignChain {
        /// The file whose parent link is wrong.
        file: PathBuf,
        /// The file's chain id.
        chain_id: u64,
        /// The parent file.
        parent_file: PathBuf,
        /// The parent's chain id.
        parent_chain_id: u64,
    },
    /// A file disagrees with its name or changed while being used.
    #[error("{file}: {reason}")]
    Inconsistent {
        /// The file.
        file: PathBuf,
        /// What is inconsistent.
        reason: String,
    },
    /// A checkpoint file is unreadable or damaged.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Listing the directory failed.
    #[error("listing {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The complete checkpoints of one directory, ordered by id.
#[derive(Debug, Clone)]
pub struct Chain {
    dir: PathBuf,
    entries: Vec<ChainEntry>,
    damaged: Vec<DamagedFile>,
}

impl Chain {
    /// Lists the complete checkpoints of `dir` from their headers, ordered
    /// by id. Temp files of unfinished checkpoints and other files are
    /// ignored (not deleted: the writer may still be running). A file with a
    /// damaged header (or one that disagrees with its name) is set apart in
    /// [`Chain::damaged`]: restoring it, or anything built on it, is an error
    /// naming it, but the other checkpoints stay usable.
    pub fn open(dir: &Path) -> Result<Chain, ChainError> {
        let io = |source| ChainError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut entries = Vec::new();
        let mut damaged = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io)? {
            let item = item.map_err(io)?;
            let Some(id) = parse_checkpoint_file_name(&item.file_name()) else {
                continue;
            };
            let path = item.path();
            let checked = read_header(&path)
                .map_err(|e| e.to_string())
                .and_then(|header| {
                    if header.id != id {
                        return Err(format!(
                            "the file is named for id {id} but its header says {}",
                            header.id
                        ));
                    }
                    let size = std::fs::metadata(&path)
                        .map_err(|e| format!("reading metadata of {}: {e}", path.display()))?
                        .len();
                    Ok((header, size))
                });
            let (header, size_bytes) = match checked {
                Ok(h) => h,
                Err(reason) => {
                    damaged.push(DamagedFile { id, path, reason });
                    continue;
                }
            };
            entries.push(ChainEntry {
                id,
                parent: header.parent,
                kind: header.kind,
                size_bytes,
                disk_bytes: header.disk_blocks * PAGE_SIZE,
                created_unix_ms: header.created_unix_ms,
                chain_id: header.chain_id,
                path,
            });
        }
        entries.sort_by_key(|e| e.id);
        damaged.sort_by_key(|d| d.id);
        Ok(Chain {
            dir: dir.to_path_buf(),
            entries,
            damaged,
        })
    }

    /// The files set apart as damaged, ordered by id.
    pub fn damaged(&self) -> &[DamagedFile] {
        &self.damaged
    }

    /// The error for using damaged checkpoint `id`, if it is one.
    fn damaged_error(&self, id: u32) -> Option<ChainError> {
        self.damaged
            .iter()
            .find(|d| d.id == id)
            .map(|d| ChainError::Inconsistent {
                file: d.path.clone(),
                reason: format!("damaged: {}", d.reason),
            })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All complete checkpoints, ordered by id.
    pub fn entries(&self) -> &[ChainEntry] {
        &self.entries
    }

    /// The checkpoint with the highest id: the parent of the next
    /// incremental.
    pub fn latest(&self) -> Option<&ChainEntry> {
        self.entries.last()
    }

    /// The id the next checkpoint in this directory gets.
    pub fn next_id(&self) -> u32 {
        // Past damaged files too: a new checkpoint never takes their name.
        let damaged = self.damaged.last().map_or(0, |d| d.id);
        self.latest().map_or(0, |e| e.id).max(damaged) + 1
    }

    /// The header for the next checkpoint of this directory: a full one
    /// starting a new chain when `full` is set or the directory is empty,
    /// otherwise an incremental whose parent is the latest checkpoint. The
    /// caller must only ask for an incremental when the pages it will store
    /// are exactly those changed since that latest checkpoint.
    pub fn next_header(&self, full: bool) -> Header {
        match self.latest() {
            Some(latest) if !full => {
                Header::incremental(latest.chain_id, self.next_id(), latest.id)
            }
            _ => Header::full(self.next_id()),
        }
    }

    /// The entry with this id.
    pub fn get(&self, id: u32) -> Option<&ChainEntry> {
        self.entries
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The entries from the full checkpoint (first) down to `id` (`None`:
    /// the latest), with parent links and chain ids checked against the
    /// headers listed; no file is opened.
    pub fn links(&self, id: Option<u32>) -> Result<Vec<ChainEntry>, ChainError> {
        let top = match id {
            Some(id) => match self.get(id) {
                Some(e) => e,
                None => {
                    return Err(self.damaged_error(id).unwrap_or(ChainError::NoSuchId {
                        dir: self.dir.clone(),
                        id,
                    }))
                }
            },
            None => self.latest().ok_or(ChainError::Empty {
                dir: self.dir.clone(),
            })?,
        };
        let mut links = vec![top.clone()];
        let mut cur = top;
        while let Some(parent_id) = cur.parent {
            // The header check guarantees parent < id, so this walk ends.
            let parent = match self.get(parent_id) {
                Some(p) => p,
                None => {
                    return Err(self.damaged_error(parent_id).unwrap_or_else(|| {
                        ChainError::MissingParent {
                            file: cur.path.clone(),
                            parent: parent_id,
                            expected: self.dir.join(checkpoint_file_name(parent_id)),
                        }
                    }))
                }
            };
            if parent.chain_id != cur.chain_id {
                return Err(ChainError::ForeignChain {
                    file: cur.path.clone(),
                    chain_id: cur.chain_id,
                    parent_file: parent.path.clone(),
                    parent_chain_id: parent.chain_id,
                });
            }
            links.push(parent.clone());
            cur = parent;
        }
        links.reverse();
        Ok(links)
    }

    /// Opens the files from the full checkpoint down to `id` (`None`: the
    /// latest), checking parent links and chain ids, and validating each
    /// file with [`CheckpointReader::open`].
    pub fn resolve(&self, id: Option<u32>) -> Result<ResolvedChain, ChainError> {
        ResolvedChain::open(&self.links(id)?)
    }
}

/// The validated files a restore of one checkpoint needs.
#[derive(Debug)]
pub struct ResolvedChain {
    /// Readers from the full checkpoint (first) to the requested one (last).
    pub readers: Vec<CheckpointReader>,
}

impl ResolvedChain {
    /// Opens and validates the files of `links` (from [`Chain::links`]),
    /// checking that each still has the header it was listed with.
    pub fn open(links: &[ChainEntry]) -> Result<ResolvedChain, ChainError> {
        let mut readers = Vec::with_capacity(links.len());
        for entry in links {
            let reader = CheckpointReader::open(&entry.path)?;
            if *reader.header() != header_of(entry) {
                return Err(ChainError::Inconsistent {
                    file: entry.path.clone(),
                    reason: "the file changed since the directory was listed".into(),
                });
            }
            readers.push(reader);
        }
        Ok(ResolvedChain { readers })
    }

    /// The requested checkpoint: its config and state are the VM's at that
    /// id.
    pub fn top(&self) -> &CheckpointReader {
        self.readers
            .last()
            .expect("a resolved chain holds at least its full checkpoint")
    }

    /// For every page with any version in the chain, the reader (index into
    /// `readers`) holding its latest version and that version's index entry
    /// (`zero` when the page became zero), sorted by gpa. Built from the
    /// indexes alone, so a restore reads each page once.
    pub fn page_map(&self) -> Vec<(u64, usize, IndexEntry)> {
        self.latest(|_| true)
    }

    /// [`page_map`](Self::page_map) without the pages whose latest version
    /// is zero: the pages a restore must read.
    pub fn data_pages(&self) -> Vec<(u64, usize, IndexEntry)> {
        self.latest(|e| !e.zero)
    }

    /// What a full checkpoint of the chain's state must store: memory's
    /// pages with data, and every disk block the chain holds (zero extents
    /// too, since a block left out would be the base image's).
    pub fn stored_pages(&self) -> Vec<(u64, usize, IndexEntry)> {
        self.latest(|e| !e.zero || super::format::space_of(e.gpa) > 0)
    }

    /// Guest memory's pages with data, without the disks' blocks.
    pub fn memory_pages(&self) -> Vec<(u64, usize, IndexEntry)> {
        let mut m = self.data_pages();
        m.truncate(m.partition_point(|p| super::format::space_of(p.0) == 0));
        m
    }

    /// Merges every index at once, the newest file winning a gpa, keeping
    /// the winners `keep` accepts. One pass and one output buffer: a 1 GiB
    /// checkpoint has ~230 000 entries, and a merge per file (or a copy
    /// before filtering) cost a lazy restore's loader tens of milliseconds
    /// of fresh heap before it could load a page.
    fn latest(&self, keep: impl Fn(&IndexEntry) -> bool) -> Vec<(u64, usize, IndexEntry)> {
        let mut indexes: Vec<_> = self
            .readers
            .iter()
            .map(|r| r.index().iter().peekable())
            .collect();
        // Unfilled capacity costs no memory: pages are faulted in as written.
        let mut map = Vec::with_capacity(self.readers.iter().map(|r| r.index().len()).sum());
        while let Some(gpa) = indexes
            .iter_mut()
            .filter_map(|idx| idx.peek().map(|e| e.gpa))
            .min()
        {
            let mut newest = None;
            for (r, idx) in indexes.iter_mut().enumerate() {
                if let Some(e) = idx.next_if(|e| e.gpa == gpa) {
                    newest = Some((r, e));
                }
            }
            if let Some((r, e)) = newest.filter(|(_, e)| keep(e)) {
                map.push((gpa, r, e));
            }
        }
        map
    }
}

/// Folds the chain up to `id` (`None`: the latest) of `dir` into one new
/// full checkpoint with a new chain id and the next free id, and returns
/// it. The older files stay; the caller may delete them.
pub fn merge(dir: &Path, id: Option<u32>) -> Result<WrittenCheckpoint, ChainError> {
    let chain = Chain::open(dir)?;
    let resolved = chain.resolve(id)?;
    let header = Header {
        chain_id: new_chain_id(),
        id: chain.next_id(),
        parent: None,
        kind: Kind::Full,
        created_unix_ms: now_unix_ms(),
        disk_blocks: 0,
    };
    let mut writer = CheckpointWriter::create(dir, header)?;
    writer.set_config(resolved.top().config());
    writer.set_state(resolved.top().state());
    writer.set_disks(resolved.top().disks().to_vec());
    // Disks' zero extents are kept: they hide the base image's blocks.
    let map = resolved.stored_pages();
    let mut buf = vec![0u8; MERGE_BATCH_PAGES * PAGE_SIZE as usize];
    let mut i = 0;
    while i < map.len() {
        // A batch of pages contiguous in guest memory, read file by file.
        let mut j = i + 1;
        while j < map.len() && j - i < MERGE_BATCH_PAGES && map[j].0 == map[j - 1].0 + PAGE_SIZE {
            j += 1;
        }
        let batch = &map[i..j];
        let mut k = 0;
        while k < batch.len() {
            let reader_idx = batch[k].1;
            let run_end = k + batch[k..].iter().take_while(|p| p.1 == reader_idx).count();
            let entries: Vec<IndexEntry> = batch[k..run_end].iter().map(|p| p.2).collect();
            resolved.readers[reader_idx].read_pages(
                &entries,
                &mut buf[k * PAGE_SIZE as usize..run_end * PAGE_SIZE as usize],
            )?;
            k = run_end;
        }
        writer.add_pages(batch[0].0, &buf[..batch.len() * PAGE_SIZE as usize])?;
        i = j;
    }
    Ok(writer.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::format::{temp_file_name, CheckpointWriter};

    fn page(seed: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE as usize];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (seed as usize * 31 + i * 7 + 1) as u8 | 1;
        }
        p
    }

    fn write(
        dir: &Path,
        header: Header,
        pages: &[(u64, Option<u64>)],
        state: &[u8],
    ) -> WrittenCheckpoint {
        let mut w = CheckpointWriter::create(dir, header).unwrap();
        w.set_config(b"cfg");
        w.set_state(state);
        for &(gpa, seed) in pages {
            match seed {
                Some(s) => w.add_page(gpa, &page(s)).unwrap(),
                None => w.add_page(gpa, &[0u8; PAGE_SIZE as usize]).unwrap(),
            };
        }
        w.finish().unwrap()
    }

    /// A three-level chain: full 1, incremental 2 on 1, incremental 3 on 2.
    fn three_levels(dir: &Path) -> u64 {
        let h1 = Header::full(1);
        let cid = h1.chain_id;
        write(
            dir,
            h1,
            &[
                (0, Some(1)),
                (0x1000, Some(2)),
                (0x2000, Some(3)),
                (0x3000, Some(4)),
            ],
            b"s1",
        );
        write(
            dir,
            Header::incremental(cid, 2, 1),
            &[(0x1000, Some(20)), (0x2000, None), (0x5000, Some(50))],
            b"s2",
        );
        write(
            dir,
            Header::incremental(cid, 3, 2),
            &[(0x1000, Some(30)), (0x2000, Some(31)), (0x3000, None)],
            b"s3",
        );
        cid
    }

    /// The memory image a chain restores to: gpa → contents.
    fn image(resolved: &ResolvedChain) -> Vec<(u64, Vec<u8>)> {
        resolved
            .page_map()
            .into_iter()
            .filter(|p| !p.2.zero)
            .map(|(gpa, r, e)| {
                let mut buf = vec![0u8; PAGE_SIZE as usize];
                resolved.readers[r].read_page(&e, &mut buf).unwrap();
                (gpa, buf)
            })
            .collect()
    }

    #[test]
    fn next_header_continues_the_latest_chain_unless_full_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::open(dir.path()).unwrap();
        let h = chain.next_header(false);
        assert_eq!((h.id, h.kind, h.parent), (1, Kind::Full, None));
        let cid = three_levels(dir.path());
        let chain = Chain::open(dir.path()).unwrap();
        let h = chain.next_header(false);
        assert_eq!(
            (h.id, h.kind, h.parent, h.chain_id),
            (4, Kind::Incremental, Some(3), cid)
        );
        let h = chain.next_header(true);
        assert_eq!((h.id, h.kind, h.parent), (4, Kind::Full, None));
        assert_ne!(h.chain_id, cid);
    }

    #[test]
    fn empty_directory_has_no_chain() {
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::open(dir.path()).unwrap();
        assert!(chain.entries().is_empty());
        assert!(chain.latest().is_none());
        assert_eq!(chain.next_id(), 1);
        assert!(matches!(chain.resolve(None), Err(ChainError::Empty { .. })));
        assert!(matches!(
            chain.resolve(Some(4)),
            Err(ChainError::NoSuchId { id: 4, .. })
        ));
    }

    #[test]
    fn missing_directory_error_names_it() {
        let err = Chain::open(Path::new("/nonexistent/vmhop-ckpts")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/vmhop-ckpts"),
            "{err}"
        );
    }

    #[test]
    fn listing_orders_by_id_and_ignores_temps_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let cid = three_levels(dir.path());
        std::fs::write(dir.path().join(temp_file_name(4)), b"half-written").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
        std::fs::write(dir.path().join("ckpt-4.vmhop"), b"not canonical").unwrap();
        // An unfinished writer's temp file is invisible too.
        let pending = CheckpointWriter::create(dir.path(), Header::incremental(cid, 5, 3)).unwrap();
        let chain = Chain::open(dir.path()).unwrap();
        let ids: Vec<u32> = chain.entries().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(chain.next_id(), 4);
        let e = &chain.entries()[1];
        assert_eq!(
            (e.parent, e.kind, e.chain_id),
            (Some(1), Kind::Incremental, cid)
        );
        assert_eq!(e.size_bytes, std::fs::metadata(&e.path).unwrap().len());
        assert_eq!(chain.entries()[0].kind, Kind::Full);
        let json = serde_json::to_value(&chain.entries()[0]).unwrap();
        assert_eq!(json["kind"], "full");
        assert!(json["parent"].is_null());
        pending.abort();
    }

    #[test]
    fn page_map_takes_each_page_from_its_newest_file() {
        let dir = tempfile::tempdir().unwrap();
        three_levels(dir.path());
        let chain = Chain::open(dir.path()).unwrap();
        let resolved = chain.resolve(None).unwrap();
        assert_eq!(resolved.readers.len(), 3);
        assert_eq!(resolved.top().header().id, 3);
        assert_eq!(resolved.top().state(), b"s3");
        let map: Vec<(u64, usize, bool)> = resolved
            .page_map()
            .iter()
            .map(|(g, r, e)| (*g, *r, e.zero))
            .collect();
        assert_eq!(
            map,
            vec![
                (0, 0, false),
                (0x1000, 2, false),
                (0x2000, 2, false),
                (0x3000, 2, true),
                (0x5000, 1, false),
            ]
        );
        let data: Vec<(u64, usize)> = resolved.data_pages().iter().map(|p| (p.0, p.1)).collect();
        assert_eq!(data, vec![(0, 0), (0x1000, 2), (0x2000, 2), (0x5000, 1)]);
        let img = image(&resolved);
        assert_eq!(
            img,
            vec![
                (0, page(1)),
                (0x1000, page(30)),
                (0x2000, page(31)),
                (0x5000, page(50))
            ]
        );
    }

    #[test]
    fn resolving_a_middle_id_restores_that_state() {
        let dir = tempfile::tempdir().unwrap();
        three_levels(dir.path());
        let resolved = Chain::open(dir.path()).unwrap().resolve(Some(2)).unwrap();
        assert_eq!(resolved.readers.len(), 2);
        assert_eq!(resolved.top().state(), b"s2");
        let zero: Vec<u64> = resolved
            .page_map()
            .iter()
            .filter(|p| p.2.zero)
            .map(|p| p.0)
            .collect();
        assert_eq!(zero, vec![0x2000]);
        assert_eq!(
            image(&resolved),
            vec![
                (0, page(1)),
                (0x1000, page(20)),
                (0x3000, page(4)),
                (0x5000, page(50))
            ]
        );
        let full = Chain::open(dir.path()).unwrap().resolve(Some(1)).unwrap();
        assert_eq!(full.readers.len(), 1);
    }

    #[test]
    fn merge_produces_a_full_checkpoint_equal_to_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let cid = three_levels(dir.path());
        let before = Chain::open(dir.path()).unwrap().resolve(None).unwrap();
        let merged = merge(dir.path(), None).unwrap();
        assert_eq!(merged.id, 4);
        assert_eq!(merged.pages_written, 4);
        let chain = Chain::open(dir.path()).unwrap();
        let m = chain.get(4).unwrap();
        assert_eq!((m.kind, m.parent), (Kind::Full, None));
        assert_ne!(m.chain_id, cid);
        let after = chain.resolve(Some(4)).unwrap();
        assert_eq!(after.readers.len(), 1);
        assert_eq!(image(&after), image(&before));
        assert_eq!(after.top().state(), b"s3");
        assert_eq!(after.top().config(), b"cfg");

        // Merging a middle id, and a chain whose pages span several batches.
        let merged2 = merge(dir.path(), Some(2)).unwrap();
        let r2 = Chain::open(dir.path())
            .unwrap()
            .resolve(Some(merged2.id))
            .unwrap();
        let mid = Chain::open(dir.path()).unwrap().resolve(Some(2)).unwrap();
        assert_eq!(image(&r2), image(&mid));
    }

    #[test]
    fn merge_of_many_contiguous_pages_matches() {
        let dir = tempfile::tempdir().unwrap();
        let h = Header::full(1);
        let cid = h.chain_id;
        let n = MERGE_BATCH_PAGES as u64 * 2 + 5;
        let pages: Vec<_> = (0..n).map(|i| (i * 0x1000, Some(i))).collect();
        write(dir.path(), h, &pages, b"a");
        let pages: Vec<_> = (0..n)
            .step_by(3)
            .map(|i| (i * 0x1000, Some(i + 1000)))
            .collect();
        write(dir.path(), Header::incremental(cid, 2, 1), &pages, b"b");
        let before = image(&Chain::open(dir.path()).unwrap().resolve(None).unwrap());
        let out = merge(dir.path(), None).unwrap();
        let after = image(
            &Chain::open(dir.path())
                .unwrap()
                .resolve(Some(out.id))
                .unwrap(),
        );
        assert_eq!(after, before);
    }

    #[test]
    fn new_full_checkpoint_starts_a_second_chain_in_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = three_levels(dir.path());
        let h4 = Header::full(4);
        let second = h4.chain_id;
        write(dir.path(), h4, &[(0, Some(99))], b"s4");
        write(
            dir.path(),
            Header::incremental(second, 5, 4),
            &[(0x1000, Some(98))],
            b"s5",
        );
        let chain = Chain::open(dir.path()).unwrap();
        assert_ne!(first, second);
        let r = chain.resolve(None).unwrap();
        let ids: Vec<u32> = r.readers.iter().map(|r| r.header().id).collect();
        assert_eq!(ids, vec![4, 5]);
        assert_eq!(image(&r), vec![(0, page(99)), (0x1000, page(98))]);
        let r3 = chain.resolve(Some(3)).unwrap();
        assert_eq!(r3.readers.len(), 3);
    }

    #[test]
    fn missing_parent_names_the_orphan_and_the_expected_file() {
        let dir = tempfile::tempdir().unwrap();
        three_levels(dir.path());
        std::fs::remove_file(dir.path().join("ckpt-000002.vmhop")).unwrap();
        let chain = Chain::open(dir.path()).unwrap();
        let err = chain.resolve(None).unwrap_err();
        assert!(
            matches!(err, ChainError::MissingParent { parent: 2, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("ckpt-000003.vmhop") && msg.contains("ckpt-000002.vmhop"),
            "{msg}"
        );
        // The full checkpoint alone still resolves.
        chain.resolve(Some(1)).unwrap();
    }

    #[test]
    fn file_from_another_chain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        three_levels(dir.path());
        // Checkpoint 4 claims parent 3 but carries a different chain id.
        write(
            dir.path(),
            Header::incremental(0xdead_beef, 4, 3),
            &[(0, Some(7))],
            b"x",
        );
        let err = Chain::open(dir.path()).unwrap().resolve(None).unwrap_err();
        match &err {
            ChainError::ForeignChain {
                file,
                chain_id,
                parent_chain_id,
                ..
            } => {
                assert!(file.ends_with("ckpt-000004.vmhop"));
                assert_eq!(*chain_id, 0xdead_beef);
                assert_ne!(*parent_chain_id, 0xdead_beef);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("ckpt-000004.vmhop"));
    }

    #[test]
    fn file_renamed_to_another_id_is_set_apart_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        three_levels(dir.path());
        std::fs::rename(
            dir.path().join("ckpt-000003.vmhop"),
            dir.path().join("ckpt-000007.vmhop"),
        )
        .unwrap();
        let chain = Chain::open(dir.path()).unwrap();
        assert_eq!(chain.damaged().len(), 1);
        assert_eq!(chain.next_id(), 8, "a new checkpoint never takes its name");
        let err = chain.resolve(Some(7)).unwrap_err();
        assert!(matches!(err, ChainError::Inconsistent { .. }), "{err}");
        assert!(err.to_string().contains("ckpt-000007.vmhop"), "{err}");
        assert!(err.to_string().contains("header says 3"), "{err}");
        chain
            .resolve(Some(2))
            .expect("the rest of the chain resolves");
    }

    #[test]
    fn damaged_file_in_the_chain_fails_resolve_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        three_levels(dir.path());
        let path = dir.path().join("ckpt-000002.vmhop");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 130] ^= 0xff; // inside the index
        std::fs::write(&path, &bytes).unwrap();
        let chain = Chain::open(dir.path()).unwrap();
        let err = chain.resolve(None).unwrap_err();
        assert!(
            matches!(err, ChainError::Format(FormatError::Checksum { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("ckpt-000002.vmhop"), "{err}");
        // Truncated to nothing: listed as damaged; what depends on it fails
        // naming it, what does not still resolves.
        std::fs::write(&path, b"").unwrap();
        let chain = Chain::open(dir.path()).unwrap();
        assert_eq!(chain.damaged()[0].id, 2);
        let err = chain.resolve(Some(3)).unwrap_err();
        assert!(err.to_string().contains("ckpt-000002.vmhop"), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        chain
            .resolve(Some(1))
            .expect("checkpoint 1 does not depend on 2");
    }
}
