//! Where the pages of an address range actually are, as the kernel reports it.
//!
//! Owns: the batched (and optionally sampled) `move_pages` status query over a
//! range and the [`Placement`] summary it produces — the numbers behind
//! `numa-stat` and the `placement_before/after` of `numa-migrate`, measured
//! from the kernel rather than taken from vmhop's intent.
//! Does not own: moving pages (see [`super::policy`]) or knowing which range
//! is which guest node (the caller's business).

use std::collections::BTreeMap;
use std::io;

use super::policy::{query_pages_into, PolicyError};
use crate::memory::PAGE_SIZE;

/// Pages asked of the kernel per `move_pages` call: big enough that the
/// syscall cost is amortised, small enough that the page and status arrays
/// (48 KiB together) never grow with the range.
pub const QUERY_BATCH_PAGES: usize = 4096;

/// Pages checked per `mincore` call when a range must be proven mapped.
const MINCORE_CHUNK_PAGES: usize = 4096;

/// Where the pages of a range are: present pages per host node, and pages not
/// backed by any node's memory yet.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Placement {
    /// Present pages per host node.
    pub pages_by_node: BTreeMap<u32, u64>,
    /// Pages not faulted in yet (or only mapped to the shared zero page, which
    /// belongs to no node's share of the range).
    pub not_present: u64,
    /// How many pages were actually asked of the kernel.
    pub pages_queried: u64,
    /// True if only every `stride`-th page was queried: the counts above are
    /// then estimates, each sampled page standing for the `stride` pages from
    /// it on (fewer for the last one), and reports should say so.
    pub sampled: bool,
}

impl Placement {
    /// Adds `other`'s counts to these (e.g. several regions of one guest node).
    pub fn merge(&mut self, other: &Placement) {
        for (&node, &pages) in &other.pages_by_node {
            *self.pages_by_node.entry(node).or_default() += pages;
        }
        self.not_present += other.not_present;
        self.pages_queried += other.pages_queried;
        self.sampled |= other.sampled;
    }

    /// All pages accounted for: present on some node plus not present.
    pub fn total(&self) -> u64 {
        self.pages_by_node.values().sum::<u64>() + self.not_present
    }

    /// The share of all pages (present + not present) that are on `node`, in
    /// 0.0..=1.0; 0.0 for an empty placement.
    pub fn fraction_on(&self, node: u32) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        self.pages_by_node.get(&node).copied().unwrap_or(0) as f64 / total as f64
    }
}

/// Where the pages of [addr, addr+len) are. `addr` must be page-aligned and
/// `len` a multiple of [`PAGE_SIZE`].
///
/// With `stride` 1 every page is queried; with `stride` k only every k-th page
/// is, and each answer is counted for the k pages it stands for (the last
/// sample for the pages that remain), so [`Placement::total`] still equals the
/// range's page count. Queries go [`QUERY_BATCH_PAGES`] at a time, so memory use
/// does not grow with the range. Fails if part of the range is not mapped.
pub fn query(addr: *const u8, len: usize, stride: usize) -> Result<Placement, PolicyError> {
    let bad = |problem| PolicyError::BadRange {
        syscall: "move_pages",
        addr: addr as usize,
        len,
        problem,
    };
    if !(addr as usize).is_multiple_of(PAGE_SIZE as usize) {
        return Err(bad("start is not page-aligned"));
    }
    if !len.is_multiple_of(PAGE_SIZE as usize) {
        return Err(bad("length is not a multiple of the page size"));
    }
    if (addr as usize).checked_add(len).is_none() {
        return Err(bad("range wraps around the address space"));
    }
    if stride == 0 {
        return Err(bad("sampling stride is 0 (1 means every page)"));
    }

    let page_count = len / PAGE_SIZE as usize;
    let samples = page_count.div_ceil(stride);
    let batch = samples.min(QUERY_BATCH_PAGES);
    let mut pages: Vec<*mut u8> = Vec::with_capacity(batch);
    let mut status = vec![0i32; batch];
    let mut placement = Placement {
        sampled: stride > 1 && samples < page_count,
        ..Placement::default()
    };

    let mut next_sample = 0usize;
    while next_sample < samples {
        let in_batch = (samples - next_sample).min(QUERY_BATCH_PAGES);
        pages.clear();
        // The kernel only reads these addresses as page numbers, so handing it
        // *mut pointers derived from a *const range writes nothing.
        pages.extend(
            (next_sample..next_sample + in_batch)
                .map(|s| (addr as usize + s * stride * PAGE_SIZE as usize) as *mut u8),
        );
        let status = &mut status[..in_batch];
        query_pages_into(&pages, status)?;

        let first_page = next_sample * stride;
        let end_page = ((next_sample + in_batch) * stride).min(page_count);
        if status.contains(&-libc::EFAULT) {
            // -EFAULT is both "unmapped" and "shared zero page": tell them apart.
            check_mapped(
                addr as usize + first_page * PAGE_SIZE as usize,
                (end_page - first_page) * PAGE_SIZE as usize,
            )?;
        }
        for (i, &st) in status.iter().enumerate() {
            let page = (next_sample + i) * stride;
            let weight = stride.min(page_count - page) as u64;
            if st >= 0 {
                *placement.pages_by_node.entry(st as u32).or_default() += weight;
            } else {
                // -ENOENT (never faulted), -EFAULT on a mapped range (zero
                // page), or a transient per-page error: no node holds it.
                placement.not_present += weight;
            }
        }
        placement.pages_queried += in_batch as u64;
        next_sample += in_batch;
    }
    Ok(placement)
}

/// Fails with [`PolicyError::Unmapped`] if any part of [addr, addr+len) has no
/// mapping (mincore answers ENOMEM for that).
fn check_mapped(addr: usize, len: usize) -> Result<(), PolicyError> {
    let mut residency = vec![0u8; MINCORE_CHUNK_PAGES.min(len / PAGE_SIZE as usize)];
    let mut offset = 0;
    while offset < len {
        let chunk = (len - offset).min(MINCORE_CHUNK_PAGES * PAGE_SIZE as usize);
        // SAFETY: mincore only writes one byte per page of the chunk into
        // `residency`, which holds at least chunk / PAGE_SIZE bytes; it does
        // not touch the range itself.
        let ret = unsafe {
            libc::mincore(
                (addr + offset) as *mut libc::c_void,
                chunk,
                residency.as_mut_ptr(),
            )
        };
        if ret < 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ENOMEM) {
                return Err(PolicyError::Unmapped {
                    syscall: "move_pages",
                    addr: addr + offset,
                    len: chunk,
                });
            }
            // Any other mincore failure says nothing about the mapping: keep
            // the move_pages answer (zero page) rather than fail the query.
            tracing::debug!(addr = addr + offset, chunk, %source, "mincore check skipped");
        }
        offset += chunk;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::policy::bind;
    use super::super::policy::tests::{Mapping, UNMAPPED_PAGE};
    use super::*;
    use crate::memory::PAGE_SIZE;
    use std::time::Instant;

    fn on_node_0(pages: u64, not_present: u64, queried: u64, sampled: bool) -> Placement {
        let mut pages_by_node = BTreeMap::new();
        if pages > 0 {
            pages_by_node.insert(0, pages);
        }
        Placement {
            pages_by_node,
            not_present,
            pages_queried: queried,
            sampled,
        }
    }

    #[test]
    fn touched_and_bound_range_is_all_on_node_0() {
        let m = Mapping::new(64);
        m.touch();
        bind(m.addr, m.len, 0, true).unwrap();
        let p = query(m.addr, m.len, 1).unwrap();
        assert_eq!(p, on_node_0(64, 0, 64, false));
        assert_eq!(p.fraction_on(0), 1.0);
        assert_eq!(p.fraction_on(1), 0.0);
    }

    #[test]
    fn untouched_range_is_not_present() {
        let m = Mapping::new(64);
        let p = query(m.addr, m.len, 1).unwrap();
        assert_eq!(p, on_node_0(0, 64, 64, false));
        assert_eq!(p.total(), 64);
        assert_eq!(p.fraction_on(0), 0.0);
    }

    #[test]
    fn zero_page_reads_count_as_not_present_not_unmapped() {
        let m = Mapping::new(8);
        for i in 0..8 {
            // SAFETY: reading a page of the live mapping maps the zero page.
            unsafe { m.page(i).read_volatile() };
        }
        // SAFETY: first page of the live mapping.
        unsafe { m.addr.write_volatile(1) };
        let p = query(m.addr, m.len, 1).unwrap();
        assert_eq!(p, on_node_0(1, 7, 8, false));
    }

    #[test]
    fn half_touched_range_splits_present_and_not_present() {
        let m = Mapping::new(64);
        for i in 0..32 {
            // SAFETY: page i of the live mapping.
            unsafe { m.page(i).write_volatile(1) };
        }
        let p = query(m.addr, m.len, 1).unwrap();
        assert_eq!(p, on_node_0(32, 32, 64, false));
        assert_eq!(p.fraction_on(0), 0.5);
    }

    #[test]
    fn sampled_query_scales_counts_to_the_whole_range() {
        // 10_000 pages: more than one batch at stride 1, and not a multiple of
        // the stride, so the last sample stands for fewer pages.
        let m = Mapping::new(10_000);
        for i in 0..5_000 {
            // SAFETY: page i of the live mapping.
            unsafe { m.page(i).write_volatile(1) };
        }
        let exact = query(m.addr, m.len, 1).unwrap();
        assert_eq!(exact, on_node_0(5_000, 5_000, 10_000, false));
        let sampled = query(m.addr, m.len, 16).unwrap();
        // 625 samples: 313 in the touched half (pages 0, 16, ..., 4992).
        assert!(sampled.sampled);
        assert_eq!(sampled.pages_queried, 625);
        assert_eq!(sampled.total(), 10_000);
        assert_eq!(sampled.pages_by_node[&0], 313 * 16);
        let sampled = query(m.addr, m.len, 3).unwrap();
        assert_eq!(sampled.total(), 10_000);
        assert_eq!(sampled.pages_queried, 3_334);
    }

    #[test]
    fn stride_larger_than_range_is_one_unsampled_query_per_page() {
        let m = Mapping::new(1);
        m.touch();
        let p = query(m.addr, m.len, 8).unwrap();
        assert_eq!(p, on_node_0(1, 0, 1, false));
    }

    #[test]
    fn empty_range_is_an_empty_placement() {
        let m = Mapping::new(1);
        assert_eq!(query(m.addr, 0, 1).unwrap(), Placement::default());
    }

    #[test]
    fn query_of_unmapped_range_fails_naming_the_range() {
        let err = query(UNMAPPED_PAGE, 4 * PAGE_SIZE as usize, 1).unwrap_err();
        assert!(matches!(err, PolicyError::Unmapped { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("not mapped"), "{msg}");
        assert!(msg.contains("0x1000+0x4000"), "{msg}");
    }

    #[test]
    fn malformed_ranges_and_zero_stride_are_refused() {
        let m = Mapping::new(2);
        assert!(matches!(
            query(m.addr, PAGE_SIZE as usize + 1, 1),
            Err(PolicyError::BadRange { .. })
        ));
        // SAFETY: one byte into the mapping.
        let inside = unsafe { m.addr.add(1) };
        assert!(query(inside, PAGE_SIZE as usize, 1).is_err());
        let msg = query(m.addr, PAGE_SIZE as usize, 0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("stride"), "{msg}");
    }

    #[test]
    fn merge_adds_counts_and_keeps_sampled() {
        let mut a = on_node_0(10, 2, 12, false);
        let mut b = Placement::default();
        b.pages_by_node.insert(1, 5);
        b.pages_by_node.insert(0, 1);
        b.not_present = 3;
        b.pages_queried = 2;
        b.sampled = true;
        a.merge(&b);
        assert_eq!(a.pages_by_node, BTreeMap::from([(0, 11), (1, 5)]));
        assert_eq!(a.not_present, 5);
        assert_eq!(a.pages_queried, 14);
        assert!(a.sampled);
        assert_eq!(a.total(), 21);
        assert!((a.fraction_on(1) - 5.0 / 21.0).abs() < 1e-12);
        assert_eq!(Placement::default().fraction_on(0), 0.0);
    }

    #[test]
    fn placement_serialises_node_keys_as_json_object() {
        let p = on_node_0(3, 1, 4, false);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["pages_by_node"]["0"], 3);
        assert_eq!(serde_json::from_value::<Placement>(json).unwrap(), p);
    }

    /// Prints how long a full and a sampled query of 1 GiB (262144 pages) take;
    /// run with `--nocapture` to see it. Asserts counts, never time.
    #[test]
    fn query_of_1_gib_reports_all_pages_and_prints_timing() {
        const PAGES: usize = 262_144;
        let m = Mapping::new(PAGES);
        let untouched_start = Instant::now();
        let p = query(m.addr, m.len, 1).unwrap();
        let untouched = untouched_start.elapsed();
        assert_eq!(p.not_present, PAGES as u64);
        m.touch();
        let mut full = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let p = query(m.addr, m.len, 1).unwrap();
            full.push(start.elapsed());
            assert_eq!(p, on_node_0(PAGES as u64, 0, PAGES as u64, false));
        }
        let start = Instant::now();
        let p = query(m.addr, m.len, 64).unwrap();
        let sampled = start.elapsed();
        assert_eq!(p.total(), PAGES as u64);
        full.sort();
        println!(
            "placement::query of 1 GiB (262144 pages): touched stride 1 median {:?} \
             (min {:?}, max {:?}); untouched stride 1 {:?}; touched stride 64 {:?}",
            full[2], full[0], full[4], untouched, sampled
        );
    }
}
