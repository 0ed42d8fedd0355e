//! The demo's text: step headers, one compact line or two per report, and
//! the closing summary. With `--json` it prints nothing as it goes; the
//! one JSON object is `report`'s.
//!
//! Owns every string the user reads on stdout during a demo (both
//! demos'), and nothing else: it formats reports, it does not ask for them.

use std::collections::BTreeMap;

use super::checks::Watch;
use crate::api::checkpoint::CheckpointReport;
use crate::api::migration::{MigrateReport, ReceiveReport};
use crate::api::numa::{Mode, NumaMigrateReport, NumaStatReport, VcpuStat};
use crate::api::vm::VerifyReport;
use crate::util::format_size;

/// Width the summary is wrapped at.
const SUMMARY_WIDTH: usize = 78;

/// Text output, silent with `--json` (whose one object is printed at the end).
pub(super) struct Out {
    json: bool,
}

impl Out {
    /// Text unless `json`.
    pub(super) fn new(json: bool) -> Out {
        Out { json }
    }

    /// Whether the demo prints one JSON object instead of text.
    pub(super) fn json(&self) -> bool {
        self.json
    }

    /// Prints text as it is. A reader that went away (`vmhop demo | head`)
    /// must not stop the demo half way: it still has VMs to stop.
    pub(super) fn raw(&self, s: &str) {
        if !self.json {
            let _ = super::super::output::out_line(s);
        }
    }

    /// The header of step `n` of `total`.
    pub(super) fn step(&self, n: u32, total: u32, title: &str) {
        self.raw(&format!("\n[{n}/{total}] {title}"));
    }

    /// Prints each line of `s` indented under the current step.
    pub(super) fn line(&self, s: impl AsRef<str>) {
        for l in s.as_ref().lines() {
            self.raw(&format!("      {l}"));
        }
    }
}

/// 1234567 → "1,234,567".
pub(super) fn group(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::with_capacity(d.len() + d.len() / 3);
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "1 round", "2 rounds".
pub(super) fn plural(n: u64, what: &str) -> String {
    format!("{} {what}{}", group(n), if n == 1 { "" } else { "s" })
}

/// Wraps text at `width` columns on spaces.
fn wrap(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut col = 0;
    for w in s.split_whitespace() {
        let len = w.chars().count();
        if col > 0 && col + 1 + len > width {
            out.push('\n');
            col = 0;
        } else if col > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(w);
        col += len;
    }
    out
}

/// "progress 1,000 → 9,000 pages written in 0.50 s".
pub(super) fn watch_text(w: &Watch) -> String {
    format!(
        "progress {} → {} pages written in {:.2} s",
        group(w.before),
        group(w.after),
        w.secs
    )
}

/// A verify that passed.
pub(super) fn verify_text(v: &VerifyReport) -> String {
    format!(
        "verify ok: {} pages checked, no violation",
        group(v.pages_checked)
    )
}

/// " (waited 0.25 s for the background page load to finish)", or "".
pub(super) fn waited_text(waited_s: f64) -> String {
    if waited_s <= 0.0 {
        return String::new();
    }
    format!(" (waited {waited_s:.2} s for the background page load to finish)")
}

/// Column titles over `checkpoint_line`s.
pub(super) const CHECKPOINT_HEADER: &str =
    "kind          id  parent     pages       size      paused      total  rounds";

/// One checkpoint report as a row under `CHECKPOINT_HEADER`.
pub(super) fn checkpoint_line(r: &CheckpointReport) -> String {
    format!(
        "{:<11}  {:>3}  {:>6}  {:>8}  {:>9}  {:>7} µs  {:>6} ms  {:>6}",
        r.kind.to_string(),
        r.id,
        r.parent.map_or_else(|| "-".to_string(), |p| p.to_string()),
        group(r.pages_written),
        format_size(r.bytes_written),
        group(r.downtime_us),
        group(r.total_ms.round() as u64),
        r.rounds
    )
}

/// As `--mode` takes it.
pub(super) fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Live => "live",
        Mode::StopCopy => "stop-copy",
        Mode::Kernel => "kernel",
    }
}

/// One NUMA move on two lines: what it did, then where the pages were and
/// are (and, if some stayed behind, how many).
pub(super) fn move_text(r: &NumaMigrateReport, from: u32, to: u32) -> String {
    let mut what = format!("{} pages in {:.0} ms", group(r.pages_moved), r.total_ms);
    if r.rounds > 0 {
        what += &format!(", {}", plural(u64::from(r.rounds), "round"));
    }
    what += &match r.pauses {
        0 => "; no pause".to_string(),
        1 => format!("; 1 pause of {} µs", group(r.downtime_us)),
        n => format!(
            "; {n} pauses, longest {} µs ({} µs in all)",
            group(r.downtime_us),
            group(r.paused_total_us)
        ),
    };
    if let Some(b) = &r.batches {
        what += &format!(
            "; {} move_pages calls, median {} µs",
            b.count,
            group(b.median_us)
        );
    }
    if r.fallback_chunks > 0 {
        what += &format!(
            "; did not converge: {} finished by stop-copy",
            plural(u64::from(r.fallback_chunks), "chunk")
        );
    }
    if r.pauses_over_budget > 0 {
        what += &format!(
            "; {} over the {} µs budget",
            plural(u64::from(r.pauses_over_budget), "pause"),
            group(r.max_downtime_us)
        );
    }
    let to_key = to.to_string();
    let stray: u64 = r
        .placement_after
        .iter()
        .filter(|(n, _)| **n != to_key)
        .map(|(_, c)| c)
        .sum();
    let stray = if stray > 0 {
        format!(" ({} page(s) still on other nodes)", group(stray))
    } else {
        String::new()
    };
    format!(
        "{:<9}  node {from} → {to}: {what}\n           placement {} → {}{stray}",
        mode_name(r.mode),
        fmt_placement(&r.placement_before),
        fmt_placement(&r.placement_after),
    )
}

/// "node 0: 131,072 pages, node 1: 5 pages".
fn fmt_placement(p: &BTreeMap<String, u64>) -> String {
    if p.is_empty() {
        return "no pages present".into();
    }
    p.iter()
        .map(|(n, c)| format!("node {n}: {} pages", group(*c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A `numa-stat` report on one line.
pub(super) fn stat_text(r: &NumaStatReport) -> String {
    let mut parts: Vec<String> = r
        .guest_nodes
        .iter()
        .map(|g| {
            let np = if g.not_present > 0 {
                format!(", {} not present", group(g.not_present))
            } else {
                String::new()
            };
            format!(
                "guest node {} ({}, policy {}): {}{np}",
                g.guest_node,
                format_size(g.size_bytes),
                g.policy,
                fmt_placement(&g.host_nodes)
            )
        })
        .collect();
    parts.push(fmt_vcpus(&r.vcpus));
    parts.join("; ")
}

/// vCPUs grouped by the CPUs they may run on: "vCPUs 0, 1 on CPUs 0-1".
fn fmt_vcpus(v: &[VcpuStat]) -> String {
    let mut groups: Vec<(&str, Vec<u32>)> = Vec::new();
    for c in v {
        match groups.iter_mut().find(|g| g.0 == c.allowed_cpus) {
            Some(g) => g.1.push(c.id),
            None => groups.push((&c.allowed_cpus, vec![c.id])),
        }
    }
    groups
        .iter()
        .map(|(cpus, ids)| {
            let list = ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "{} {list} on CPUs {cpus}",
                if ids.len() == 1 { "vCPU" } else { "vCPUs" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A host migration on two lines: its downtime and cost, then the link
/// and how the pre-copy went.
pub(super) fn migrate_text(r: &MigrateReport) -> String {
    let mut how = format!(
        "{}, link {:.0} MiB/s",
        plural(u64::from(r.rounds), "round"),
        r.link_mib_s
    );
    if !r.converged {
        how += "; the dirty rate did not converge: the last round was a bounded stop-copy";
    }
    if r.throttle_max_percent > 0 {
        how += &format!(
            "; the guest was throttled up to {} %",
            r.throttle_max_percent
        );
    }
    format!(
        "downtime {} µs, {:.0} ms in all: {} pages ({} zero), {} on the wire\n{how}",
        group(r.downtime_us),
        r.total_ms,
        group(r.pages_sent),
        group(r.zero_pages),
        format_size(r.bytes_sent),
    )
}

/// What the destination said when the VM arrived.
pub(super) fn arrival_text(name: &str, r: &ReceiveReport) -> String {
    format!(
        "VM '{name}' arrived ({} pages, {} received) and ran {:.1} ms after the last round",
        group(r.pages_received),
        format_size(r.bytes_received),
        r.start_ms
    )
}

/// What the summary paragraph is made of: the figures of each part of the
/// builtin demo that ran (a part that did not run is None or empty).
#[derive(Debug, Default)]
pub(super) struct Summary {
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Verifies that passed.
    pub verifies: usize,
    /// How long stopping every vCPU took, µs.
    pub pause_us: u64,
    /// The full and the incremental checkpoint.
    pub checkpoints: Option<(CheckpointReport, CheckpointReport)>,
    /// Until the restored VM's vCPUs ran, ms.
    pub restore_ms: Option<f64>,
    /// The host has a single NUMA node.
    pub one_node: bool,
    /// Each NUMA move's mode and longest pause (µs).
    pub moves: Vec<(Mode, u64)>,
    /// The host migration.
    pub migration: Option<MigrateReport>,
}

impl Summary {
    /// The closing paragraph, wrapped.
    pub(super) fn text(&self, total_s: f64) -> String {
        let mut s = format!(
            "Summary: vmhop ran a {} builtin:dirty guest on {} vCPU(s) and checked its memory from the host \
             {} times, always consistent. Pausing stopped every vCPU in {} µs.",
            format_size(self.memory_bytes),
            self.vcpus,
            self.verifies,
            group(self.pause_us)
        );
        if let Some((full, inc)) = &self.checkpoints {
            s += &format!(
                " While it ran, a full checkpoint ({}, guest paused {} µs) and an incremental one ({} of pages \
                 dirtied since, paused {} µs) were written",
                format_size(full.bytes_written),
                group(full.downtime_us),
                format_size(inc.bytes_written),
                group(inc.downtime_us),
            );
            s += &match self.restore_ms {
                Some(ms) => format!(
                    "; restoring the incremental one lazily as a new VM had its vCPUs running again after \
                     {ms:.1} ms, carrying on from the checkpoint's progress."
                ),
                None => ".".into(),
            };
        }
        if !self.moves.is_empty() {
            s += &self.moves_text();
        }
        if let Some(m) = &self.migration {
            s += &format!(
                " Finally it migrated live to a second vmhop process on this host in {} ({} on the wire \
                 at {:.0} MiB/s), the guest stopped for {} µs; the source exited 0 and the guest ran on \
                 there, its memory intact.",
                plural(u64::from(m.rounds), "round"),
                format_size(m.bytes_sent),
                m.link_mib_s,
                group(m.downtime_us),
            );
        }
        s += &format!(" Total {total_s:.1} s.");
        wrap(&s, SUMMARY_WIDTH)
    }

    /// The NUMA moves: where to, and each mode's longest pause.
    fn moves_text(&self) -> String {
        let mut by_mode: Vec<(Mode, u64)> = Vec::new();
        for &(mode, us) in &self.moves {
            match by_mode.iter_mut().find(|x| x.0 == mode) {
                Some(x) => x.1 = x.1.max(us),
                None => by_mode.push((mode, us)),
            }
        }
        let pauses = by_mode
            .iter()
            .map(|(m, us)| {
                if *us == 0 {
                    format!("{} not at all", mode_name(*m))
                } else {
                    format!("{} at most {} µs", mode_name(*m), group(*us))
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let where_ = if self.one_node {
            "in place on this one-node host"
        } else {
            "to another host node and back"
        };
        format!(
            " Its memory was then re-homed {where_} with each mode ({}); the moves paused the guest: {pauses}.",
            plural(self.moves.len() as u64, "move")
        )
    }
}

/// What the demo says about Linux guests on this host: where the same
/// steps run with a stock kernel.
pub(super) fn linux_note(cannot: Option<crate::api::ApiError>) -> String {
    if let Some(why) = cannot {
        format!(
            "Linux guests: {why}\n\
             The same steps with a stock Debian kernel (boot on two NUMA nodes, checkpoint, lazy\n\
             restore, NUMA moves, poweroff, reboot) run inside the NUMA box, a two-node host with\n\
             KVM inside QEMU:\n\
             \x20   tests/numabox/linux/run-step.sh checkpoint   (or boot, numa-moves, poweroff,\n\
             \x20   reboot; see docs/linux-guests.md)"
        )
    } else {
        "Linux guests: vmhop run --kernel /boot/vmlinuz-$(uname -r) --initrd INITRD \\\n\
         \x20   --cmdline \"console=ttyS0 reboot=k\" (see docs/linux-guests.md); the scripted steps\n\
         \x20   with a stock kernel: tests/numabox/linux/run-step.sh checkpoint"
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_inserts_thousands_separators() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(131_072), "131,072");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn fmt_placement_lists_nodes_with_grouped_counts() {
        let mut p = BTreeMap::new();
        assert_eq!(fmt_placement(&p), "no pages present");
        p.insert("0".to_string(), 131_072);
        p.insert("1".to_string(), 5);
        assert_eq!(fmt_placement(&p), "node 0: 131,072 pages, node 1: 5 pages");
    }

    #[test]
    fn fmt_vcpus_groups_vcpus_sharing_cpus() {
        let v = |id, cpus: &str| VcpuStat {
            id,
            guest_node: 0,
            allowed_cpus: cpus.into(),
        };
        assert_eq!(
            fmt_vcpus(&[v(0, "0-1"), v(1, "0-1")]),
            "vCPUs 0, 1 on CPUs 0-1"
        );
        assert_eq!(
            fmt_vcpus(&[v(0, "0"), v(1, "1")]),
            "vCPU 0 on CPUs 0, vCPU 1 on CPUs 1"
        );
    }

    #[test]
    fn wrap_breaks_lines_at_the_width() {
        let w = wrap("aaa bbb ccc ddd", 7);
        assert_eq!(w, "aaa bbb\nccc ddd");
        assert!(wrap(&"word ".repeat(50), 20)
            .lines()
            .all(|l| l.chars().count() <= 20));
    }

    fn migrate_report() -> MigrateReport {
        MigrateReport {
            operation: "migrate".into(),
            to: "unix:/tmp/m.sock".into(),
            downtime_us: 2_345,
            total_ms: 412.0,
            rounds: 3,
            pages_sent: 140_000,
            zero_pages: 9_000,
            bytes_sent: 540 << 20,
            page_bytes: 530 << 20,
            compression: Default::default(),
            compressed_frames: 0,
            pages_in_pause: 120,
            converged: true,
            throttle_max_percent: 0,
            link_mib_s: 1_800.0,
            dirty_per_round: vec![5_000, 300],
            pause_breakdown: Default::default(),
            disk_blocks_sent: 0,
            connections: 1,
        }
    }

    #[test]
    fn migrate_text_leads_with_the_downtime() {
        let t = migrate_text(&migrate_report());
        assert!(
            t.starts_with("downtime 2,345 µs, 412 ms in all: 140,000 pages (9,000 zero)"),
            "{t}"
        );
        assert!(t.contains("3 rounds, link 1800 MiB/s"), "{t}");
        assert!(!t.contains("did not converge"), "{t}");
    }

    #[test]
    fn summary_mentions_each_part_and_pauses_per_mode() {
        let f = Summary {
            memory_bytes: 512 << 20,
            vcpus: 2,
            pause_us: 78,
            verifies: 5,
            one_node: true,
            moves: vec![(Mode::Live, 8546), (Mode::Live, 10), (Mode::Kernel, 0)],
            migration: Some(migrate_report()),
            ..Summary::default()
        };
        let s = f.text(9.5).replace('\n', " ");
        assert!(s.contains("512.0 MiB") || s.contains("512 MiB"), "{s}");
        assert!(
            s.contains("5 times")
                && s.contains("78 µs")
                && s.contains("live at most 8,546 µs")
                && s.contains("kernel not at all"),
            "{s}"
        );
        assert!(
            s.contains("in place on this one-node host")
                && s.contains("(3 moves)")
                && s.contains("Total 9.5 s"),
            "{s}"
        );
        assert!(
            s.contains("migrated live to a second vmhop process")
                && s.contains("stopped for 2,345 µs")
                && s.contains("in 3 rounds")
                && s.contains("source exited 0"),
            "{s}"
        );
        assert!(
            f.text(1.0)
                .lines()
                .all(|l| l.chars().count() <= SUMMARY_WIDTH),
            "{s}"
        );
    }
}
