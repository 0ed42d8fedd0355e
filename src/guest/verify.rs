//! Host-side check of the builtin dirty guest's memory invariant: walking a
//! vCPU's slice in sweep order, every written page carries its own address,
//! the sweep counter never increases and drops by at most one, and the
//! first page's counter is the sweep in progress or the one before it.
//! A lost, stale, duplicated or misplaced page breaks one of these.
//!
//! Callers must make sure no vCPU runs during the walk.

use super::program::{block, COUNTER_OFFSET, TAG_OFFSET};
use super::setup::{BLOCKS_ADDR, CONTROL_ADDR, CONTROL_MAGIC, MAX_RANGES};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// Stop listing violations after this many; the count is still exact.
const MAX_LISTED: usize = 32;

pub use crate::api::vm::{VerifyReport, Violation};

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

/// Checks the invariant over all vCPU slices.
pub fn verify(memory: &GuestMemory) -> VerifyReport {
    let mut w = Walk {
        report: VerifyReport {
            ok: true,
            pages_checked: 0,
            violation_count: 0,
            violations: Vec::new(),
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
    if kind != 2 {
        // The idle guest has no working set: nothing more to check.
        return w.report;
    }
    for v in 0..vcpus.min(super::MAX_VCPUS as u64) {
        check_slice(memory, &mut w, v as u32);
    }
    w.report.ok = w.report.violation_count == 0;
    w.report
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
