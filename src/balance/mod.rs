//! `vmhop balance`'s planner: given the host's nodes and every VM's
//! placement, which guest nodes to move where, and why. A pure function —
//! state in, plan out — so every rule is unit-tested on synthetic
//! topologies; finding the VMs, running the moves and watching belong to
//! the CLI (`cli::balance`).
//!
//! Two rules, in this order:
//!
//! 1. **Pressure**: a host node whose free memory is below the watermark
//!    gives up guest nodes (largest first) until it is above it again,
//!    each to the nearest node (SLIT distance; then the one with the most
//!    room) that keeps twice the watermark free after taking it. The
//!    guest node's vCPUs go with it (a NUMA move re-pins them), so rule 2
//!    is satisfied afterwards and does not move it back.
//! 2. **Affinity**: a guest node whose vCPUs may run only on one host
//!    node's CPUs, but whose memory is less than [`AFFINITY_SHARE_PCT`] on
//!    that node, moves there — if that node keeps twice the watermark free
//!    after taking it.
//!
//! Hysteresis: a node is short below the watermark but a target must stay
//! above twice the watermark; a guest node moved recently (the caller's
//! `recent` set) is not moved again; a move that would not change where
//! most of its pages are is not planned.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::api::numa::{HostNodeReport, NumaStatReport};

/// Bytes per page in numa-stat's counts.
const PAGE_BYTES: u64 = 4096;

/// A guest node counts as at home when at least this share of its present
/// pages is on the node its vCPUs run on.
pub const AFFINITY_SHARE_PCT: u64 = 90;

/// One VM as `balance` saw it.
#[derive(Debug, Clone)]
pub struct VmView {
    /// Its name (the API socket's stem).
    pub name: String,
    /// Its numa-stat.
    pub stat: NumaStatReport,
}

/// What the planner decides from.
#[derive(Debug, Clone)]
pub struct HostView {
    /// The host's nodes (`vmhop topology`).
    pub nodes: Vec<HostNodeReport>,
    /// Every VM that answered.
    pub vms: Vec<VmView>,
}

/// The planner's knobs.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A node with less free memory than this share of its total is short.
    pub watermark_pct: u64,
}

/// Why a move is planned.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum Reason {
    /// Its vCPUs run on `to_node`'s CPUs; `share_pct` of its pages were there.
    Affinity {
        /// The CPUs its vCPUs may run on.
        vcpu_cpus: String,
        /// Share of its present pages already on the target.
        share_pct: u64,
    },
    /// `node` was short of free memory.
    Pressure {
        /// The short node.
        node: u32,
        /// Its free bytes.
        free_bytes: u64,
        /// The watermark it was under, bytes.
        watermark_bytes: u64,
        /// Distance from the short node to the target (SLIT).
        distance: u32,
    },
}

/// One planned move: guest node `guest_node` of VM `vm` to host node `to_node`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedMove {
    /// The VM's name.
    pub vm: String,
    /// Its guest node.
    pub guest_node: u32,
    /// Present pages per host node now.
    pub from: BTreeMap<String, u64>,
    /// Target host node.
    pub to_node: u32,
    /// Bytes the target must take (present pages elsewhere, and pages not
    /// faulted in yet, which the new binding will put there).
    pub bytes: u64,
    /// Why.
    pub reason: Reason,
}

/// Something the planner would have liked to do but did not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    /// The VM.
    pub vm: String,
    /// Its guest node, when the reason concerns one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_node: Option<u32>,
    /// Why it was left alone.
    pub why: String,
}

/// The planner's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    /// The moves, in the order to run them.
    pub moves: Vec<PlannedMove>,
    /// What was left alone, with why.
    pub skipped: Vec<Skipped>,
}

/// Parses a kernel CPU list ("0-3,8,10-11").
pub fn parse_cpu_list(s: &str) -> Option<BTreeSet<usize>> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().ok()?);
            }
        }
    }
    Some(out)
}

/// The one host node whose CPUs hold every CPU in `cpus`, if there is one.
fn home_node(nodes: &[HostNodeReport], cpus: &BTreeSet<usize>) -> Option<u32> {
    if cpus.is_empty() {
        return None;
    }
    nodes
        .iter()
        .find(|n| !n.cpus.is_empty() && cpus.iter().all(|c| n.cpus.contains(c)))
        .map(|n| n.id)
}

/// One guest node, with what the rules need.
struct Candidate<'a> {
    vm: &'a str,
    guest_node: u32,
    pages: &'a BTreeMap<String, u64>,
    not_present: u64,
    vcpu_cpus: Option<String>,
    home: Option<u32>,
}

impl Candidate<'_> {
    fn present(&self) -> u64 {
        self.pages.values().sum()
    }
    fn on(&self, node: u32) -> u64 {
        self.pages.get(&node.to_string()).copied().unwrap_or(0)
    }
    /// Bytes node `to` must take for this guest node to live there.
    fn bytes_to(&self, to: u32) -> u64 {
        (self.present() - self.on(to) + self.not_present) * PAGE_BYTES
    }
    /// The node holding most of its pages.
    fn main_node(&self) -> Option<u32> {
        self.pages
            .iter()
            .filter(|(_, &n)| n > 0)
            .max_by_key(|(_, &n)| n)
            .and_then(|(k, _)| k.parse().ok())
    }
}

/// Plans moves for `view` under `policy`, leaving out the guest nodes in
/// `recent` (VM name, guest node) that moved lately.
pub fn plan(view: &HostView, policy: Policy, recent: &BTreeSet<(String, u32)>) -> Plan {
    let mut out = Plan::default();
    // Free bytes per node as the plan goes: each planned move takes from
    // its target and gives back to where its pages were.
    let mut free: BTreeMap<u32, u64> = view.nodes.iter().map(|n| (n.id, n.free_bytes)).collect();
    let watermark = |id: u32| -> u64 {
        view.nodes
            .iter()
            .find(|n| n.id == id)
            .map_or(0, |n| n.total_bytes / 100 * policy.watermark_pct)
    };
    let mut candidates = Vec::new();
    for vm in &view.vms {
        for g in &vm.stat.guest_nodes {
            // Distinct CPU lists of its vCPUs (usually one).
            let cpus: Vec<&str> = vm
                .stat
                .vcpus
                .iter()
                .filter(|v| v.guest_node == g.guest_node)
                .map(|v| v.allowed_cpus.as_str())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut all = BTreeSet::new();
            let mut parsed = !cpus.is_empty();
            for c in &cpus {
                match parse_cpu_list(c) {
                    Some(set) => all.extend(set),
                    None => parsed = false,
                }
            }
            let home = if parsed {
                home_node(&view.nodes, &all)
            } else {
                None
            };
            candidates.push(Candidate {
                vm: &vm.name,
                guest_node: g.guest_node,
                pages: &g.host_nodes,
                not_present: g.not_present,
                vcpu_cpus: (!cpus.is_empty()).then(|| cpus.join(";")),
                home,
            });
        }
    }
    let mut planned: BTreeSet<(String, u32)> = BTreeSet::new();
    let fits = |free: &BTreeMap<u32, u64>, to: u32, bytes: u64| {
        free.get(&to)
            .is_some_and(|&f| f >= bytes.saturating_add(2 * watermark(to)))
    };
    let commit = |free: &mut BTreeMap<u32, u64>, c: &Candidate<'_>, to: u32, bytes: u64| {
        if let Some(f) = free.get_mut(&to) {
            *f -= bytes;
        }
        for (k, &n) in c.pages {
            if let Ok(id) = k.parse::<u32>() {
                if id != to {
                    *free.entry(id).or_default() += n * PAGE_BYTES;
                }
            }
        }
    };

    // Rule 1: pressure.
    for node in &view.nodes {
        let mark = watermark(node.id);
        if free[&node.id] >= mark {
            continue;
        }
        let short_free = free[&node.id];
        // The guest nodes mostly on it, largest share first.
        let mut on_it: Vec<&Candidate<'_>> = candidates
            .iter()
            .filter(|c| c.main_node() == Some(node.id))
            .collect();
        on_it.sort_by_key(|c| std::cmp::Reverse(c.on(node.id)));
        for c in on_it {
            if free[&node.id] >= mark {
                break;
            }
            let key = (c.vm.to_string(), c.guest_node);
            if recent.contains(&key) {
                out.skipped.push(Skipped {
                    vm: c.vm.into(),
                    guest_node: Some(c.guest_node),
                    why: format!(
                        "node {} is short, but this guest node moved recently",
                        node.id
                    ),
                });
                continue;
            }
            // Nearest node with room; then the most room.
            let mut targets: Vec<&HostNodeReport> =
                view.nodes.iter().filter(|t| t.id != node.id).collect();
            targets.sort_by_key(|t| {
                (
                    distance(node, t.id),
                    std::cmp::Reverse(free.get(&t.id).copied().unwrap_or(0)),
                )
            });
            let target = targets
                .into_iter()
                .find(|t| fits(&free, t.id, c.bytes_to(t.id)));
            match target {
                Some(t) => {
                    let bytes = c.bytes_to(t.id);
                    commit(&mut free, c, t.id, bytes);
                    planned.insert(key);
                    out.moves.push(PlannedMove {
                        vm: c.vm.into(),
                        guest_node: c.guest_node,
                        from: c.pages.clone(),
                        to_node: t.id,
                        bytes,
                        reason: Reason::Pressure {
                            node: node.id,
                            free_bytes: short_free,
                            watermark_bytes: mark,
                            distance: distance(node, t.id),
                        },
                    });
                }
                None => out.skipped.push(Skipped {
                    vm: c.vm.into(),
                    guest_node: Some(c.guest_node),
                    why: format!(
                        "node {} is short of free memory, but no other node has room for \
                         this guest node's {} MiB and twice the watermark",
                        node.id,
                        ((c.present() + c.not_present) * PAGE_BYTES) >> 20
                    ),
                }),
            }
        }
    }

    // Rule 2: affinity.
    for c in &candidates {
        let key = (c.vm.to_string(), c.guest_node);
        if planned.contains(&key) {
            continue;
        }
        let Some(home) = c.home else {
            if let Some(cpus) = &c.vcpu_cpus {
                if c.present() > 0 {
                    out.skipped.push(Skipped {
                        vm: c.vm.into(),
                        guest_node: Some(c.guest_node),
                        why: format!("its vCPUs may run on CPUs {cpus}, not within one node"),
                    });
                }
            }
            continue;
        };
        let present = c.present();
        if present == 0 {
            continue;
        }
        let share = c.on(home) * 100 / present;
        if share >= AFFINITY_SHARE_PCT {
            continue;
        }
        if recent.contains(&key) {
            out.skipped.push(Skipped {
                vm: c.vm.into(),
                guest_node: Some(c.guest_node),
                why: format!(
                    "its vCPUs run on node {home} with {share}% of its pages there, \
                     but it moved recently"
                ),
            });
            continue;
        }
        let bytes = c.bytes_to(home);
        if !fits(&free, home, bytes) {
            out.skipped.push(Skipped {
                vm: c.vm.into(),
                guest_node: Some(c.guest_node),
                why: format!(
                    "its vCPUs run on node {home}, but node {home} has not {} MiB free \
                     beyond twice the watermark",
                    bytes >> 20
                ),
            });
            continue;
        }
        commit(&mut free, c, home, bytes);
        planned.insert(key);
        out.moves.push(PlannedMove {
            vm: c.vm.into(),
            guest_node: c.guest_node,
            from: c.pages.clone(),
            to_node: home,
            bytes,
            reason: Reason::Affinity {
                vcpu_cpus: c.vcpu_cpus.clone().unwrap_or_default(),
                share_pct: share,
            },
        });
    }
    out
}

/// SLIT distance from `from` to node `to` (unknown: far).
fn distance(from: &HostNodeReport, to: u32) -> u32 {
    match from.distances.get(to as usize) {
        Some(&d) if d > 0 => d,
        _ => u32::MAX,
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Affinity {
                vcpu_cpus,
                share_pct,
            } => write!(
                f,
                "its vCPUs run on CPUs {vcpu_cpus}, but only {share_pct}% of its pages are \
                 on that node"
            ),
            Reason::Pressure {
                node,
                free_bytes,
                watermark_bytes,
                distance,
            } => write!(
                f,
                "node {node} has {} MiB free, under its {} MiB watermark; the target is the \
                 nearest with room (distance {distance})",
                free_bytes >> 20,
                watermark_bytes >> 20
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::numa::{GuestNodeStat, VcpuStat};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn node(id: u32, cpus: &[usize], free: u64, distances: &[u32]) -> HostNodeReport {
        HostNodeReport {
            id,
            cpus: cpus.to_vec(),
            total_bytes: 4 * GIB,
            free_bytes: free,
            distances: distances.to_vec(),
        }
    }

    /// A VM with one guest node per entry: (pages per host node, its vCPU's CPUs).
    fn vm(name: &str, nodes: &[(&[(u32, u64)], &str)]) -> VmView {
        let mut guest_nodes = Vec::new();
        let mut vcpus = Vec::new();
        for (g, (pages, cpus)) in nodes.iter().enumerate() {
            let present: u64 = pages.iter().map(|p| p.1).sum();
            guest_nodes.push(GuestNodeStat {
                guest_node: g as u32,
                size_bytes: present * PAGE_BYTES,
                policy: "bind:0".into(),
                host_nodes: pages.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
                not_present: 0,
                sampled: false,
            });
            vcpus.push(VcpuStat {
                id: g as u32,
                guest_node: g as u32,
                allowed_cpus: cpus.to_string(),
            });
        }
        VmView {
            name: name.into(),
            stat: NumaStatReport {
                guest_nodes,
                vcpus,
                device_threads: Vec::new(),
                query_ms: 0.0,
            },
        }
    }

    const POLICY: Policy = Policy { watermark_pct: 5 };
    const PAGES_256M: u64 = 256 * MIB / PAGE_BYTES;

    fn two_nodes(free0: u64, free1: u64) -> Vec<HostNodeReport> {
        vec![
            node(0, &[0, 1], free0, &[10, 20]),
            node(1, &[2, 3], free1, &[20, 10]),
        ]
    }

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        assert_eq!(
            parse_cpu_list("0-2,5"),
            Some([0, 1, 2, 5].into_iter().collect())
        );
        assert_eq!(parse_cpu_list("7"), Some([7].into_iter().collect()));
        assert_eq!(parse_cpu_list(""), Some(BTreeSet::new()));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }

    #[test]
    fn memory_follows_vcpus_pinned_to_another_node() {
        let view = HostView {
            nodes: two_nodes(3 * GIB, 3 * GIB),
            vms: vec![vm("a", &[(&[(0, PAGES_256M)], "2-3")])],
        };
        let p = plan(&view, POLICY, &BTreeSet::new());
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert_eq!(p.moves[0].to_node, 1);
        assert_eq!(p.moves[0].bytes, 256 * MIB);
        assert!(matches!(
            p.moves[0].reason,
            Reason::Affinity { share_pct: 0, .. }
        ));
    }

    #[test]
    fn a_guest_node_at_home_or_on_unpinned_vcpus_stays() {
        let view = HostView {
            nodes: two_nodes(3 * GIB, 3 * GIB),
            vms: vec![
                vm("home", &[(&[(0, PAGES_256M)], "0-1")]),
                vm("mostly", &[(&[(0, 95), (1, 5)], "0")]),
                vm("free", &[(&[(1, PAGES_256M)], "0-3")]),
            ],
        };
        let p = plan(&view, POLICY, &BTreeSet::new());
        assert!(p.moves.is_empty(), "{p:?}");
        assert_eq!(p.skipped.len(), 1, "{p:?}");
        assert_eq!(p.skipped[0].vm, "free");
    }

    #[test]
    fn affinity_waits_when_the_home_node_has_no_room() {
        let view = HostView {
            nodes: two_nodes(3 * GIB, 300 * MIB),
            vms: vec![vm("a", &[(&[(0, PAGES_256M)], "2")])],
        };
        let p = plan(&view, POLICY, &BTreeSet::new());
        assert!(p.moves.is_empty(), "{p:?}");
        assert!(p.skipped[0].why.contains("node 1 has not 256 MiB"), "{p:?}");
    }

    #[test]
    fn a_short_node_sheds_its_largest_guest_node_to_the_nearest_node_with_room() {
        // Node 0 short; node 1 near but full; nodes 2 and 3 have room, 2 nearer.
        let nodes = vec![
            node(0, &[0], 100 * MIB, &[10, 12, 16, 30]),
            node(1, &[1], 200 * MIB, &[12, 10, 20, 20]),
            node(2, &[2], 3 * GIB, &[16, 20, 10, 20]),
            node(3, &[3], 3500 * MIB, &[30, 20, 20, 10]),
        ];
        let view = HostView {
            nodes,
            vms: vec![
                vm("small", &[(&[(0, PAGES_256M / 4)], "0")]),
                vm("big", &[(&[(0, PAGES_256M)], "0")]),
            ],
        };
        let p = plan(&view, POLICY, &BTreeSet::new());
        assert_eq!(p.moves.len(), 1, "{p:?}");
        let m = &p.moves[0];
        assert_eq!((m.vm.as_str(), m.to_node), ("big", 2));
        assert!(matches!(
            m.reason,
            Reason::Pressure {
                node: 0,
                distance: 16,
                ..
            }
        ));
    }

    #[test]
    fn moved_guest_nodes_are_not_moved_again_while_recent() {
        let view = HostView {
            nodes: two_nodes(3 * GIB, 3 * GIB),
            vms: vec![vm("a", &[(&[(0, PAGES_256M)], "2-3")])],
        };
        let recent = [("a".to_string(), 0)].into_iter().collect();
        let p = plan(&view, POLICY, &recent);
        assert!(p.moves.is_empty(), "{p:?}");
        assert!(p.skipped[0].why.contains("moved recently"));
    }

    #[test]
    fn a_pressure_move_is_not_undone_by_affinity() {
        // After the move the vCPUs went along: the next plan is empty.
        let before = HostView {
            nodes: two_nodes(50 * MIB, 3 * GIB),
            vms: vec![vm("a", &[(&[(0, PAGES_256M)], "0-1")])],
        };
        let p = plan(&before, POLICY, &BTreeSet::new());
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].to_node, 1);
        let after = HostView {
            nodes: two_nodes(306 * MIB, 2816 * MIB),
            vms: vec![vm("a", &[(&[(1, PAGES_256M)], "2-3")])],
        };
        assert!(plan(&after, POLICY, &BTreeSet::new()).moves.is_empty());
    }

    #[test]
    fn planned_moves_use_up_the_room_they_take() {
        // Two guest nodes want node 1, which has room for one.
        let view = HostView {
            nodes: two_nodes(3 * GIB, 256 * MIB + 2 * (4 * GIB / 100 * 5) + MIB),
            vms: vec![
                vm("a", &[(&[(0, PAGES_256M)], "2")]),
                vm("b", &[(&[(0, PAGES_256M)], "3")]),
            ],
        };
        let p = plan(&view, POLICY, &BTreeSet::new());
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert_eq!(p.skipped.len(), 1, "{p:?}");
    }
}
