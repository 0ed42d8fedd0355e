//! Host-side check of the builtin guests' invariants.
//!
//! Memory (`builtin:dirty`, and the sweeping vCPUs of `builtin:disk`):
//! walking a vCPU's slice in sweep order, every written page carries its
//! own address, the sweep counter never increases and drops by at most
//! one, and the first page's counter is the sweep in progress or the one
//! before it. A lost, stale, duplicated or misplaced page breaks one of
//! these.
//!
//! Disk (`builtin:disk`, `disk`): every block the guest's table records
//! holds exactly what the guest wrote with that tag (or with the tag of
//! the one write in flight), no block the table records nothing for holds
//! a block of this run, every read slot the guest vouched for still holds
//! the block the device read into it (memory only the device wrote), the
//! guest never read a block back otherwise than it wrote it, and the
//! device answered no request with an error.
//!
//! Callers must make sure no vCPU runs and no device writes during the
//! walk (a paused VM: its devices are quiesced).

use super::program::disk::{self as dp, area, ctl, word, BLOCK_BYTES, BLOCK_MAGIC};
use super::program::{block, COUNTER_OFFSET, TAG_OFFSET};
use super::setup::{kind, BLOCKS_ADDR, CONTROL_ADDR, CONTROL_MAGIC, DISK_CONTROL_ADDR, MAX_RANGES};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// Reads `buf.len()` bytes of disk `disk` (in `--disk` order) at byte
/// `offset`: the service reads them through the device.
pub type ReadDisk<'a> = &'a dyn Fn(usize, u64, &mut [u8]) -> std::io::Result<()>;

/// Blocks read from the disk at a time.
const BLOCKS_PER_READ: u64 = 256;

/// Stop listing violations after this many; the count is still exact.
const MAX_LISTED: usize = 32;

pub use crate::api::vm::{DiskVerifyReport, VerifyReport, Violation};

struct Walk {
    report: VerifyReport,
}

impl Walk {
    fn fail(&mut self, vcpu: Option<u32>, gpa: u64, problem: String) {
        self.report.violation_count += 1;
        if self.report.violations.len() < MAX_LISTED {
            self.report.violations.push(Violation {
                vcpu,
                gpa: format!("{gpa:#x}"),
                problem,
            });
        }
    }
}

/// Checks the invariants: memory over all vCPU slices, and for the disk
/// guest its disk, read through `disk`.
pub fn verify(memory: &GuestMemory, disk: ReadDisk<'_>) -> VerifyReport {
    let mut w = Walk {
        report: VerifyReport {
            ok: true,
            pages_checked: 0,
            violation_count: 0,
            violations: Vec::new(),
            disk: None,
        },
    };
    let rd = |gpa: u64| memory.read_u64(gpa);
    if rd(CONTROL_ADDR) != Some(CONTROL_MAGIC) {
        w.fail(
            None,
            CONTROL_ADDR,
            "control page does not hold the builtin guest's magic".into(),
        );
        w.report.ok = false;
        return w.report;
    }
    let kind = rd(CONTROL_ADDR + 8).unwrap_or(0);
    let vcpus = rd(CONTROL_ADDR + 16).unwrap_or(0);
    if kind == super::net::KIND {
        check_net(memory, &mut w);
        w.report.ok = w.report.violation_count == 0;
        return w.report;
    }
    if kind == kind::RESET {
        check_reset(memory, &mut w);
        w.report.ok = w.report.violation_count == 0;
        return w.report;
    }
    if kind != kind::DIRTY && kind != kind::DISK {
        // The idle guest has no working set: nothing more to check.
        return w.report;
    }
    for v in 0..vcpus.min(super::MAX_VCPUS as u64) {
        check_slice(memory, &mut w, v as u32);
    }
    if kind == kind::DISK {
        check_disk(memory, &mut w, disk);
    }
    w.report.ok = w.report.violation_count == 0;
    w.report
}

/// `builtin:reset`: every working-set page is pristine (0, its own
/// address, zeros) — as at a checkpoint taken before its loop started —
/// except the pages of the iteration in progress (the sequence number in
/// its input buffer), which may hold that iteration's mark instead. A page
/// a reset left dirty, or wrote from the wrong place, breaks this.
fn check_reset(memory: &GuestMemory, w: &mut Walk) {
    use super::program::{reset_pages, reset_state as st};
    use super::setup::{RESET_INPUT_ADDR, RESET_STATE_ADDR};
    let rd = |gpa: u64| memory.read_u64(gpa);
    let (Some(base), Some(n), Some(per), Some(seq)) = (
        rd(RESET_STATE_ADDR + st::WS_BASE),
        rd(RESET_STATE_ADDR + st::WS_PAGES),
        rd(RESET_STATE_ADDR + st::PAGES),
        rd(RESET_INPUT_ADDR),
    ) else {
        w.fail(
            Some(0),
            RESET_STATE_ADDR,
            "the reset guest's state page is not in guest memory".into(),
        );
        return;
    };
    let current: std::collections::HashSet<u64> =
        reset_pages(seq, per, base, n).into_iter().collect();
    let mark = seq.wrapping_add(1);
    for p in 0..n {
        let gpa = base + p * PAGE_SIZE;
        let Some(host) = memory.host_addr(gpa, PAGE_SIZE) else {
            w.fail(Some(0), gpa, "working-set page not in guest memory".into());
            continue;
        };
        // SAFETY: host_addr checked the page lies in a live mapping; the
        // caller keeps vCPUs and devices from writing during the walk.
        let page = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE_SIZE as usize) };
        let word = |i: usize| word_of(page, i);
        w.report.pages_checked += 1;
        let counter = word((COUNTER_OFFSET / 8) as usize);
        let problem = if word((TAG_OFFSET / 8) as usize) != gpa {
            Some(format!("tag {:#x} is not the page's address", word(1)))
        } else if counter != 0 && !(counter == mark && current.contains(&gpa)) {
            Some(format!(
                "holds mark {counter:#x}, not the checkpoint's 0 (iteration {seq} marks its pages {mark:#x})"
            ))
        } else if page[16..].iter().any(|&b| b != 0) {
            Some("bytes past its tag are not zero as at the checkpoint".into())
        } else {
            None
        };
        if let Some(problem) = problem {
            w.fail(Some(0), gpa, problem);
        }
    }
}

/// The name of a virtio-blk status byte.
fn status_name(s: u64) -> String {
    match s {
        1 => "IOERR".into(),
        2 => "UNSUPP".into(),
        s => format!("{s:#x}"),
    }
}

/// A little-endian word of a block.
fn word_of(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// The disk guest's control data, its counters and its disk against its
/// table.
fn check_disk(memory: &GuestMemory, w: &mut Walk, disk: ReadDisk<'_>) {
    let c = |at: u64| memory.read_u64(DISK_CONTROL_ADDR + at);
    let vcpu = Some(0);
    let Some(f) = (|| {
        Some([
            c(ctl::STATE)?,
            c(ctl::FAIL)?,
            c(ctl::TABLE)?,
            c(ctl::TABLE_CAP)?,
            c(ctl::BLOCKS)?,
            c(ctl::RUN)?,
            c(ctl::TAG)?,
            c(ctl::INFLIGHT_BLOCK)?,
            c(ctl::INFLIGHT_TAG)?,
            c(ctl::REQUESTS)?,
            c(ctl::WRITES)?,
            c(ctl::READS)?,
            c(ctl::IOERRS)?,
            c(ctl::ERRORS)?,
        ])
    })() else {
        w.fail(
            vcpu,
            DISK_CONTROL_ADDR,
            "the disk guest's control data is not in guest memory".into(),
        );
        return;
    };
    let [state, fail, table, cap, blocks, run, last_tag, in_block, in_tag, requests, writes, reads, ioerrs, errors] =
        f;
    let mut r = DiskVerifyReport {
        blocks,
        blocks_checked: 0,
        blocks_written: 0,
        requests,
        writes,
        reads,
        flushes: c(ctl::FLUSHES).unwrap_or(0),
        io_errors: ioerrs,
        guest_errors: errors,
        in_flight_block: (in_tag != 0).then_some(in_block),
        slots_checked: 0,
    };
    if state == dp::FAILED {
        let why = dp::Failure::from_code(fail)
            .map(|f| f.describe().to_string())
            .unwrap_or_else(|| format!("failure code {fail}"));
        w.fail(
            vcpu,
            DISK_CONTROL_ADDR + ctl::FAIL,
            format!("the disk guest gave up on disk 0: {why}"),
        );
    }
    if errors > 0 {
        w.fail(
            vcpu,
            DISK_CONTROL_ADDR + ctl::ERRORS,
            format!(
                "the guest read back {errors} block(s) otherwise than it wrote them (first: block {}, its table's tag {}, the block's tag {})",
                c(ctl::ERR_BLOCK).unwrap_or(0),
                c(ctl::ERR_WANT).unwrap_or(0),
                c(ctl::ERR_FOUND).unwrap_or(0),
            ),
        );
    }
    if ioerrs > 0 {
        w.fail(
            vcpu,
            DISK_CONTROL_ADDR + ctl::IOERRS,
            format!(
                "the disk answered {ioerrs} of the guest's requests with an error (the last: a {} of block {}, status {})",
                if c(ctl::IOERR_WRITE) == Some(1) { "write" } else { "read" },
                c(ctl::IOERR_BLOCK).unwrap_or(0),
                status_name(c(ctl::IOERR_STATUS).unwrap_or(0)),
            ),
        );
    }
    if blocks > cap || table != DISK_CONTROL_TABLE || (in_tag != 0 && in_block >= blocks) {
        w.fail(
            vcpu,
            DISK_CONTROL_ADDR,
            format!("the disk guest's control data is corrupt (table at {table:#x} of {cap} entries, {blocks} blocks used, block {in_block} in flight)"),
        );
        w.report.disk = Some(r);
        return;
    }
    // A sequential write has 256 blocks in flight; the mixed mode one
    // (and leaves the count 0).
    let in_count = c(ctl::INFLIGHT_COUNT).unwrap_or(0).max(1);
    let mut buf = vec![0u8; (BLOCKS_PER_READ * BLOCK_BYTES) as usize];
    let mut b0 = 0;
    while b0 < blocks {
        let n = (blocks - b0).min(BLOCKS_PER_READ);
        let bytes = &mut buf[..(n * BLOCK_BYTES) as usize];
        if let Err(e) = disk(0, b0 * BLOCK_BYTES, bytes) {
            w.fail(
                vcpu,
                table + b0 * 8,
                format!(
                    "cannot read disk 0 at byte {} ({n} blocks from block {b0}): {e}",
                    b0 * BLOCK_BYTES
                ),
            );
            break;
        }
        for (i, data) in bytes.chunks_exact(BLOCK_BYTES as usize).enumerate() {
            let b = b0 + i as u64;
            let entry = table + b * 8;
            let Some(want) = memory.read_u64(entry) else {
                w.fail(
                    vcpu,
                    entry,
                    "the disk guest's table is not in guest memory".into(),
                );
                w.report.disk = Some(r);
                return;
            };
            r.blocks_checked += 1;
            if want != 0 {
                r.blocks_written += 1;
            }
            let in_flight =
                (in_tag != 0 && b >= in_block && b - in_block < in_count).then_some((b, in_tag));
            if let Some(problem) = check_block(b, data, want, run, last_tag, in_flight) {
                w.fail(vcpu, entry, format!("disk 0 block {b}: {problem}"));
            }
        }
        b0 += n;
    }
    check_slots(memory, w, &mut r, blocks, run, last_tag);
    w.report.disk = Some(r);
}

/// Each read slot the guest vouched for still holds the block the device
/// read into it.
fn check_slots(
    memory: &GuestMemory,
    w: &mut Walk,
    r: &mut DiskVerifyReport,
    blocks: u64,
    run: u64,
    last_tag: u64,
) {
    for slot in 0..dp::READ_SLOTS {
        let meta = DISK_CONTROL_ADDR + ctl::SLOTS + slot * 16;
        let page = super::setup::DISK_AREA_ADDR + area::READ_BUF + slot * BLOCK_BYTES;
        let (Some(b), Some(tag)) = (memory.read_u64(meta), memory.read_u64(meta + 8)) else {
            w.fail(
                Some(0),
                meta,
                "the disk guest's read slots are not in guest memory".into(),
            );
            return;
        };
        if tag == 0 {
            continue;
        }
        if b >= blocks || tag > last_tag {
            w.fail(
                Some(0),
                meta,
                format!(
                    "read slot {slot} records block {b} tag {tag}, which the guest never wrote"
                ),
            );
            continue;
        }
        let mut data = Vec::with_capacity(BLOCK_BYTES as usize);
        for i in 0..BLOCK_BYTES / 8 {
            match memory.read_u64(page + i * 8) {
                Some(v) => data.extend_from_slice(&v.to_le_bytes()),
                None => {
                    w.fail(Some(0), page, "a read slot is not in guest memory".into());
                    return;
                }
            }
        }
        r.slots_checked += 1;
        let want = dp::block_image(b, tag, run);
        if let Some(at) = want.iter().zip(&data).position(|(x, y)| x != y) {
            w.fail(
                Some(0),
                page + at as u64,
                format!(
                    "read slot {slot} no longer holds block {b} (tag {tag}) as the device read it into memory and the guest checked it, from byte {at} on: a device write to memory was lost"
                ),
            );
        }
    }
}

/// Where the table is: the host put it there and the guest never moves it.
const DISK_CONTROL_TABLE: u64 = super::setup::DISK_AREA_ADDR + area::SIZE;

/// What is wrong with block `b` holding `data`, whose table entry is
/// `want` (0: never written), `run` the boot's nonce, `last_tag` the last
/// tag issued and `in_flight` the write in flight.
fn check_block(
    b: u64,
    data: &[u8],
    want: u64,
    run: u64,
    last_tag: u64,
    in_flight: Option<(u64, u64)>,
) -> Option<String> {
    let ours = word_of(data, word::MAGIC) == BLOCK_MAGIC && word_of(data, word::RUN) == run;
    let tag = word_of(data, word::TAG);
    let in_flight_here = in_flight.is_some_and(|(ib, it)| ib == b && it == tag);
    if want > last_tag {
        return Some(format!(
            "the table records tag {want}, above the last tag the guest issued ({last_tag})"
        ));
    }
    if want == 0 {
        return (ours && !in_flight_here).then(|| {
            format!(
                "holds this run's tag {tag}, but the guest's table records no write to it (memory behind the disk)"
            )
        });
    }
    if !ours {
        return Some(format!(
            "does not hold a block this run wrote (its table says tag {want}): a write lost on the disk"
        ));
    }
    let blk = word_of(data, word::BLOCK);
    if blk != b {
        return Some(format!(
            "holds the data of block {blk} (tag {tag}), not its own (the table says tag {want})"
        ));
    }
    if tag != want && !in_flight_here {
        return Some(if tag < want {
            format!("holds tag {tag}, older than the tag {want} its table records: a write lost on the disk")
        } else {
            format!("holds tag {tag}, newer than the tag {want} its table records: memory behind the disk")
        });
    }
    let image = dp::block_image(b, tag, run);
    if let Some(at) = image.iter().zip(data).position(|(x, y)| x != y) {
        return Some(format!(
            "holds tag {tag}'s header but differs from what it wrote from byte {at} on (a torn or damaged block)"
        ));
    }
    None
}

fn check_slice(memory: &GuestMemory, w: &mut Walk, vcpu: u32) {
    let blk = BLOCKS_ADDR + vcpu as u64 * block::SIZE;
    let rd = |gpa: u64| memory.read_u64(gpa);
    let (Some(n), Some(table), Some(sweep)) = (
        rd(blk + block::NRANGES),
        rd(blk + block::RANGES),
        rd(blk + block::SWEEP),
    ) else {
        w.fail(Some(vcpu), blk, "vCPU block is not in guest memory".into());
        return;
    };
    if n > MAX_RANGES {
        w.fail(Some(vcpu), blk, format!("range count {n} is corrupt"));
        return;
    }
    let mut first: Option<u64> = None;
    let mut prev: Option<u64> = None;
    let mut drops = 0;
    for i in 0..n {
        let (Some(start), Some(pages)) = (rd(table + i * 16), rd(table + i * 16 + 8)) else {
            w.fail(
                Some(vcpu),
                table,
                "range table is not in guest memory".into(),
            );
            return;
        };
        for p in 0..pages {
            let gpa = start + p * PAGE_SIZE;
            let (Some(c), Some(tag)) = (rd(gpa + COUNTER_OFFSET), rd(gpa + TAG_OFFSET)) else {
                w.fail(Some(vcpu), gpa, "page is not backed by guest memory".into());
                return;
            };
            w.report.pages_checked += 1;
            if c > 0 && tag != gpa {
                w.fail(
                    Some(vcpu),
                    gpa,
                    format!("page holds the tag of {tag:#x} (a misplaced or duplicated page)"),
                );
            }
            let f = *first.get_or_insert(c);
            if let Some(pv) = prev {
                if c > pv {
                    w.fail(
                        Some(vcpu),
                        gpa,
                        format!("counter rises from {pv} to {c} (a stale page before it)"),
                    );
                } else if c < pv {
                    drops += 1;
                    if pv - c > 1 || drops > 1 {
                        w.fail(
                            Some(vcpu),
                            gpa,
                            format!("counter drops from {pv} to {c} (a stale page)"),
                        );
                    }
                }
            }
            let _ = f;
            prev = Some(c);
        }
    }
    if let Some(f) = first {
        if f != sweep && f + 1 != sweep && !(f == 0 && sweep == 0) {
            w.fail(
                Some(vcpu),
                blk,
                format!("slice starts at sweep {f} but the guest is in sweep {sweep}"),
            );
        }
    }
}

/// `builtin:net`: no echo of a frame never sent or with a damaged payload,
/// and the frame awaited is the echoes counted.
fn check_net(memory: &GuestMemory, w: &mut Walk) {
    use super::net::{counts, state, NET_ADDR};
    let Some(c) = counts(memory) else {
        w.fail(
            Some(0),
            NET_ADDR,
            "the network guest's state is not in guest memory".into(),
        );
        return;
    };
    let progress = memory
        .read_u64(BLOCKS_ADDR + block::PROGRESS)
        .unwrap_or(u64::MAX);
    w.report.pages_checked = 1;
    if c.bad != 0 {
        w.fail(
            Some(0),
            NET_ADDR + state::BAD,
            format!(
                "{} echoes of a frame never sent or with a damaged payload",
                c.bad
            ),
        );
    }
    if c.seq != progress {
        w.fail(
            Some(0),
            NET_ADDR + state::SEQ,
            format!(
                "awaits the echo of frame {} but counted {progress} echoes",
                c.seq
            ),
        );
    }
}
