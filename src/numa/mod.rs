//! NUMA moves: re-home a running guest's memory (one guest node or all) to
//! another host node, and its vCPUs with it.
//!
//! - `stop-copy`: one pause; the engine copies every page into memory bound
//!   to the target and switches the slots.
//! - `live`: the engine pre-copies one chunk at a time with the dirty log and
//!   pauses only for each chunk's last pages, so the extra memory needed at
//!   any moment is one chunk, not a second copy of the guest.
//! - `kernel`: move_pages in bounded batches while the guest runs; KVM
//!   follows through its MMU notifiers; no pause at all.
//!
//! Every mode then sets the memory policy to the target (later faults land
//! there too) and re-pins the node's vCPU threads, and its device workers,
//! to the target's CPUs.
//! Placement before and after is measured from the kernel.
//!
//! This module owns the NUMA operations (`numa-migrate`, `numa-stat`) and
//! the sink of the copy modes ([`sink`]); the pre-copy loop is the transfer
//! engine's, the syscalls are `host`'s.

pub mod sink;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::host::affinity::{self, AffinityError};
use crate::host::placement::{self, Placement};
use crate::host::policy::{self, PolicyError};
use crate::host::topology::Topology;
use crate::memory::PAGE_SIZE;
use crate::transfer::{transfer, FirstPass, Plan, TransferError};
use crate::vmm::{Vm, VmError};
use sink::LocalSink;

/// Pages per move_pages call in kernel mode: small enough that one call
/// holds the guest's pages briefly, large enough to amortise the syscall.
pub const KERNEL_BATCH_PAGES: usize = 2048;

pub use crate::api::numa::{
    BatchStats, DeviceThreadStat, GuestNodeStat, Mode, NumaMigrateReport, NumaMigrateRequest,
    NumaStatReport, VcpuStat,
};

/// The step after the memory moved at which a test makes a move fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishStep {
    /// After the first chunk's policy was rebound.
    Policy,
    /// After the first vCPU was re-pinned.
    Repin,
    /// Before placement is measured.
    Placement,
}

impl std::fmt::Display for FinishStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FinishStep::Policy => "policy",
            FinishStep::Repin => "repin",
            FinishStep::Placement => "placement",
        })
    }
}

/// Where the test suite makes NUMA moves fail or wait (`--test-hook`, see
/// `crate::service::hooks`); the default is what users get.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NumaHooks {
    /// Wait this long after the memory moved and before the move finishes
    /// (policy, vCPUs, placement), so a test can check where pages the
    /// guest touches first in that time land.
    pub finish_delay: Option<Duration>,
    /// Fail at this step after the memory moved, so a test can check the
    /// move is undone.
    pub fail_finish: Option<FinishStep>,
    /// Fail a live move before moving chunk k (from 0), so a test can check
    /// the chunks already moved go back.
    pub fail_chunk: Option<usize>,
}

/// What failed in a NUMA move, before anything was undone.
#[derive(Debug, thiserror::Error)]
pub enum MoveStepError {
    /// A memory-policy syscall (a placement query, mbind, move_pages)
    /// failed; the error names the syscall, the range and the errno.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Binding one chunk's memory policy failed.
    #[error("slot {slot}: {source}")]
    Bind {
        /// The chunk.
        slot: u32,
        /// mbind's error.
        #[source]
        source: PolicyError,
    },
    /// Reading or setting a vCPU thread's CPUs failed.
    #[error(transparent)]
    Affinity(#[from] AffinityError),
    /// The transfer engine failed to copy memory to the target.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// Pausing or resuming the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// move_pages answered ENOMEM for a page: the target is full.
    #[error(
        "the kernel could not move page {gpa:#x} of guest node {guest_node}: host node {node} is out of memory"
    )]
    OutOfMemory {
        /// The page's guest-physical address.
        gpa: u64,
        /// Its guest node.
        guest_node: u32,
        /// The target.
        node: u32,
    },
    /// A kernel move left pages behind whatever it tried.
    #[error(
        "{pages} present page(s) stayed off host node {node} after every retry, a paused \
         move_pages and a stop-copy of their chunks"
    )]
    PagesLeft {
        /// How many.
        pages: u64,
        /// The target.
        node: u32,
    },
    /// The test hook `numa-fail-finish` failed the move at this step.
    #[error("injected failure in the {0} step (test hook numa-fail-finish)")]
    InjectedFinish(FinishStep),
    /// The test hook `numa-fail-chunk` failed a live move at this chunk.
    #[error("injected failure at chunk {0} (test hook numa-fail-chunk)")]
    InjectedChunk(usize),
}

/// One thing undoing a move could not put back.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    /// A chunk could not be copied back to its old node.
    #[error("slot {slot}: {source}")]
    Chunk {
        /// The chunk.
        slot: u32,
        /// The engine's error.
        #[source]
        source: TransferError,
    },
    /// A chunk's old policy could not be bound, or its pages not moved back.
    #[error("slot {slot}: {source}")]
    Pages {
        /// The chunk.
        slot: u32,
        /// mbind's or move_pages' error.
        #[source]
        source: PolicyError,
    },
    /// A vCPU thread could not get its old CPUs back.
    #[error("vCPU thread {tid}: {source}")]
    Vcpu {
        /// The thread.
        tid: i32,
        /// sched_setaffinity's error.
        #[source]
        source: AffinityError,
    },
    /// A guest node's device workers could not get their old CPUs back.
    #[error("device threads of guest node {guest_node}: {source}")]
    Workers {
        /// The guest node.
        guest_node: u32,
        /// sched_setaffinity's error.
        #[source]
        source: AffinityError,
    },
}

/// What undoing a failed move did: where the VM runs now. Its text follows
/// the failure's, from "; ".
#[derive(Debug)]
pub enum Rollback {
    /// Nothing had changed yet.
    Nothing,
    /// Kernel mode: the policy bound to the target went back before any page
    /// moved.
    PolicyRebound,
    /// Kernel mode: rebinding the old policy failed as well.
    PolicyNotRebound(Box<MoveStepError>),
    /// Live mode: this many chunks had moved and were moved back.
    ChunksMovedBack(usize),
    /// Live mode: moving the chunks already moved back failed.
    ChunksNotMovedBack(Vec<UndoError>),
    /// Kernel mode: the batches already moved went back.
    PagesMovedBack,
    /// Kernel mode: moving the batches already moved back failed.
    PagesNotMovedBack(Box<MoveStepError>),
    /// The memory had moved; memory, policy and CPUs went back.
    Undone,
    /// The memory had moved; undoing that failed.
    NotUndone(Vec<UndoError>),
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let joined = |v: &[UndoError]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        match self {
            Rollback::Nothing => Ok(()),
            Rollback::PolicyRebound => f.write_str("; the VM runs on its old memory and policy"),
            Rollback::PolicyNotRebound(e) => write!(
                f,
                "; rebinding the old policy failed too ({e}): check with numa-stat"
            ),
            Rollback::ChunksMovedBack(k) => write!(
                f,
                "; the {k} chunk(s) already moved were moved back, the VM runs on its old memory"
            ),
            Rollback::ChunksNotMovedBack(v) => write!(
                f,
                "; moving the chunks already moved back failed too: {}",
                joined(v)
            ),
            Rollback::PagesMovedBack => f.write_str(
                "; the pages already moved were moved back, the VM runs on its old memory \
                 and policy",
            ),
            Rollback::PagesNotMovedBack(e) => {
                write!(f, "; moving the pages already moved back failed too: {e}")
            }
            Rollback::Undone => {
                f.write_str("; the move was undone: the VM runs on its old memory, policy and CPUs")
            }
            Rollback::NotUndone(v) => write!(
                f,
                "; undoing the move failed too ({}): check with numa-stat",
                joined(v)
            ),
        }
    }
}

/// A step that failed, and what undoing the move did.
#[derive(Debug)]
struct Failure {
    cause: MoveStepError,
    rollback: Rollback,
}

impl<E: Into<MoveStepError>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure {
            cause: e.into(),
            rollback: Rollback::Nothing,
        }
    }
}

/// A NUMA move failed; the VM runs on its old memory, policy and CPUs
/// (unless the message says that undoing the move failed too).
#[derive(Debug, thiserror::Error)]
pub enum NumaMoveError {
    /// The host's topology could not be read.
    #[error(transparent)]
    Topology(#[from] crate::host::topology::TopologyError),
    /// The host node asked for does not exist.
    #[error("host node {node} does not exist (this host has node {have})")]
    NoHostNode {
        /// The node asked for.
        node: u32,
        /// The host's nodes.
        have: String,
    },
    /// The guest node asked for does not exist.
    #[error("guest node {node} does not exist (the VM has {count} guest nodes)")]
    NoGuestNode {
        /// The node asked for.
        node: u32,
        /// How many the VM has.
        count: usize,
    },
    /// The target has no room for the pages.
    #[error("host node {node} has {} free but the move needs {}", crate::util::format_size(*.free), crate::util::format_size(*.need))]
    NoRoom {
        /// The target.
        node: u32,
        /// Its free bytes.
        free: u64,
        /// Bytes the move brings.
        need: u64,
    },
    /// The request is malformed (a budget out of range).
    #[error(transparent)]
    Request(#[from] crate::api::ApiError),
    /// Something failed during the move.
    #[error("NUMA move to host node {node} failed: {cause}{rollback}")]
    Failed {
        /// Target node.
        node: u32,
        /// What failed.
        #[source]
        cause: MoveStepError,
        /// What undoing the move did.
        rollback: Rollback,
    },
}

impl crate::api::Classify for NumaMoveError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            NumaMoveError::NoHostNode { .. } | NumaMoveError::NoGuestNode { .. } => {
                ErrorKind::NotFound
            }
            NumaMoveError::NoRoom { .. } => ErrorKind::Unusable,
            NumaMoveError::Request(e) => e.kind,
            // The kernel found no room on the node the user named.
            NumaMoveError::Failed {
                cause: MoveStepError::OutOfMemory { .. },
                ..
            } => ErrorKind::Unusable,
            NumaMoveError::Topology(_) | NumaMoveError::Failed { .. } => ErrorKind::Failed,
        }
    }
}

/// Pages of the given guest nodes per host node, from the kernel.
pub fn placement_of(vm: &Vm, nodes: &[u32], stride: usize) -> Result<Placement, PolicyError> {
    let mem = vm.memory();
    let mut p = Placement::default();
    for n in mem.nodes.iter().filter(|n| nodes.contains(&n.guest_node)) {
        for c in &n.chunks {
            let q = placement::query(c.mapping.as_ptr(), c.mapping.len(), stride)?;
            p.merge(&q);
        }
    }
    Ok(p)
}

fn by_node(p: &Placement) -> BTreeMap<String, u64> {
    p.pages_by_node
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

/// Moves guest memory as `req` says; `hooks` are the tests' (default:
/// none).
pub fn numa_migrate(
    vm: &Vm,
    req: &NumaMigrateRequest,
    hooks: &NumaHooks,
) -> Result<NumaMigrateReport, NumaMoveError> {
    let start = Instant::now();
    let max_downtime = req.max_downtime_ms()?;
    let topo = Topology::read()?;
    let target = req.to_node;
    let Some(tnode) = topo.node(target) else {
        let have: Vec<String> = topo.nodes.iter().map(|n| n.id.to_string()).collect();
        return Err(NumaMoveError::NoHostNode {
            node: target,
            have: have.join(", "),
        });
    };
    let count = vm.config().nodes.len();
    let guest_nodes: Vec<u32> = match req.guest_node {
        Some(g) if (g as usize) < count => vec![g],
        Some(g) => return Err(NumaMoveError::NoGuestNode { node: g, count }),
        None => (0..count as u32).collect(),
    };
    let failed = |f: Failure| NumaMoveError::Failed {
        node: target,
        cause: f.cause,
        rollback: f.rollback,
    };
    let before = placement_of(vm, &guest_nodes, 1).map_err(|e| failed(e.into()))?;
    // The target must hold every page that is not there yet; the copy modes
    // also need one chunk (live) or the whole node (stop-copy) of headroom
    // while old and new memory coexist — that is the same amount here,
    // since old memory is freed after each switch.
    let to_bring =
        (before.total() - before.pages_by_node.get(&target).copied().unwrap_or(0)) * PAGE_SIZE;
    if to_bring > tnode.free_bytes {
        return Err(NumaMoveError::NoRoom {
            node: target,
            free: tnode.free_bytes,
            need: to_bring,
        });
    }

    let mut report = NumaMigrateReport {
        operation: "numa-migrate".into(),
        mode: req.mode,
        to_node: target,
        guest_nodes: guest_nodes.clone(),
        downtime_us: 0,
        guest_stall_us: None,
        paused_total_us: 0,
        pauses: 0,
        total_ms: 0.0,
        rounds: 0,
        pages_moved: 0,
        converged: true,
        fallback_chunks: 0,
        pauses_over_budget: 0,
        max_downtime_us: (max_downtime * 1e3) as u64,
        peak_extra_bytes: 0,
        batches: None,
        placement_before: by_node(&before),
        placement_after: BTreeMap::new(),
        not_present_after: 0,
        vcpu_cpus: BTreeMap::new(),
        longest_pause: Default::default(),
    };
    let chunks: Vec<(u32, u64, u32)> = {
        let mem = vm.memory();
        mem.nodes
            .iter()
            .filter(|n| guest_nodes.contains(&n.guest_node))
            .flat_map(|n| n.chunks.iter().map(|c| (c.slot, c.range.len, n.guest_node)))
            .collect()
    };
    let backing = vm.memory().nodes[guest_nodes[0] as usize].backing;
    let budget = Duration::from_secs_f64(max_downtime / 1e3);
    let homes = vm.host_nodes();
    let cpus_before = threads_cpus(vm, &guest_nodes).map_err(|e| failed(e.into()))?;
    match req.mode {
        Mode::StopCopy => {
            let mut sink = LocalSink::new(target, backing);
            let slots = chunks.iter().map(|c| c.0).collect();
            let plan = Plan::new(slots, FirstPass::Present, false, budget);
            let r = transfer(vm, &mut sink, &plan).map_err(|e| failed(e.into()))?;
            report.downtime_us = r.downtime_us;
            report.longest_pause = r.pause_breakdown.clone();
            report.paused_total_us = r.downtime_us;
            report.pauses = 1;
            report.rounds = r.rounds;
            report.pages_moved = r.pages_sent;
            report.peak_extra_bytes = chunks.iter().map(|c| c.1).sum();
        }
        Mode::Live => {
            let r = live_chunks(
                vm,
                target,
                backing,
                &chunks,
                &homes,
                budget,
                hooks.fail_chunk,
                &mut report,
            );
            let _ = vm.stop_dirty_log();
            r.map_err(failed)?;
        }
        Mode::Kernel => {
            // The policy goes first: a page the guest touches for the first
            // time after its batch went by, or after the last placement
            // check, is then taken on the target instead of staying behind.
            if let Err(e) = bind_guest_nodes(vm, &guest_nodes, |_| target, |_| Ok(())) {
                let rebind = bind_guest_nodes(vm, &guest_nodes, |g| homes[g as usize], |_| Ok(()));
                return Err(failed(Failure {
                    cause: e,
                    rollback: match rebind {
                        Ok(()) => Rollback::PolicyRebound,
                        Err(e2) => Rollback::PolicyNotRebound(Box::new(e2)),
                    },
                }));
            }
            kernel_move(vm, target, &guest_nodes, &homes, &mut report).map_err(failed)?;
            // move_pages leaves pages behind without failing (busy ones,
            // groups whose migration failed): a move ends with every
            // present page on the target, or it is undone.
            if let Err(e) = kernel_complete(vm, target, backing, &chunks, budget, &mut report) {
                let undo = move_back(vm, req.mode, backing, &chunks, &homes, &cpus_before, budget);
                return Err(failed(undone(e, undo)));
            }
        }
    }
    if let Some(d) = hooks.finish_delay {
        std::thread::sleep(d);
    }
    // The memory is on the target now. What is left (policy, vCPUs, the
    // measurement) either all succeeds or the move is undone, so a failed
    // request always leaves the VM as it was.
    if let Err(e) = finish(vm, target, &guest_nodes, &tnode.cpus, hooks, &mut report) {
        let undo = move_back(vm, req.mode, backing, &chunks, &homes, &cpus_before, budget);
        return Err(failed(undone(e, undo)));
    }
    for &g in &guest_nodes {
        vm.set_host_node(g, target);
    }
    report.total_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// A move that failed after its memory moved, with what undoing it did.
fn undone(cause: MoveStepError, undo: Result<(), Vec<UndoError>>) -> Failure {
    Failure {
        cause,
        rollback: match undo {
            Ok(()) => Rollback::Undone,
            Err(v) => Rollback::NotUndone(v),
        },
    }
}

/// Binds every chunk of `guest_nodes` to the host node `node_of(guest
/// node)`, without moving pages. `before_each` is asked first with the
/// number of chunks bound so far (the test hook's way in).
fn bind_guest_nodes(
    vm: &Vm,
    guest_nodes: &[u32],
    node_of: impl Fn(u32) -> u32,
    mut before_each: impl FnMut(usize) -> Result<(), MoveStepError>,
) -> Result<(), MoveStepError> {
    let mem = vm.memory();
    let mut bound = 0;
    for n in mem
        .nodes
        .iter()
        .filter(|n| guest_nodes.contains(&n.guest_node))
    {
        for c in &n.chunks {
            before_each(bound)?;
            bound += 1;
            policy::bind(
                c.mapping.as_ptr(),
                c.mapping.len(),
                node_of(n.guest_node),
                false,
            )
            .map_err(|source| MoveStepError::Bind {
                slot: c.slot,
                source,
            })?;
        }
    }
    Ok(())
}

/// The failure a test asked for at `step`, once `done` of its items (chunks
/// bound, vCPUs re-pinned) are done.
fn injected_finish_failure(
    hooks: &NumaHooks,
    step: FinishStep,
    done: usize,
) -> Result<(), MoveStepError> {
    match hooks.fail_finish {
        Some(s) if s == step && done >= 1 => Err(MoveStepError::InjectedFinish(step)),
        _ => Ok(()),
    }
}

/// After the memory moved: binds the policy to the target (later faults
/// and the kernel's own reclaim follow it), re-pins the vCPUs and measures
/// placement.
fn finish(
    vm: &Vm,
    target: u32,
    guest_nodes: &[u32],
    cpus: &[usize],
    hooks: &NumaHooks,
    report: &mut NumaMigrateReport,
) -> Result<(), MoveStepError> {
    bind_guest_nodes(
        vm,
        guest_nodes,
        |_| target,
        |bound| injected_finish_failure(hooks, FinishStep::Policy, bound),
    )?;
    repin_vcpus(vm, guest_nodes, cpus, hooks, report)?;
    injected_finish_failure(hooks, FinishStep::Placement, 1)?;
    let after = placement_of(vm, guest_nodes, 1)?;
    report.placement_after = by_node(&after);
    report.not_present_after = after.not_present;
    Ok(())
}

/// Where the threads of the moved guest nodes ran before the move, for
/// undoing it.
struct CpusBefore {
    /// Each vCPU of the nodes: (thread id, allowed CPUs).
    vcpus: Vec<(i32, Vec<usize>)>,
    /// Each node's device-worker CPUs (None: never set).
    workers: Vec<(u32, Option<Vec<usize>>)>,
}

/// The CPUs the threads of `guest_nodes` may run on now.
fn threads_cpus(vm: &Vm, guest_nodes: &[u32]) -> Result<CpusBefore, AffinityError> {
    let vcpu_nodes = vm.config().vcpu_nodes();
    let vcpus = vm
        .vcpu_tids()
        .into_iter()
        .filter(|(id, _)| guest_nodes.contains(&vcpu_nodes[*id as usize]))
        .map(|(_, tid)| Ok((tid, affinity::thread_affinity(tid)?)))
        .collect::<Result<_, AffinityError>>()?;
    let workers = guest_nodes
        .iter()
        .map(|&g| (g, vm.device_threads().cpus(g)))
        .collect();
    Ok(CpusBefore { vcpus, workers })
}

/// Undoes a move whose memory already went to the target: every chunk goes
/// back to its guest node's old host node (`homes`) the way it came (copy
/// modes: one live transfer per chunk, which also brings the old policy
/// back with the new memory; kernel: policy rebound, then move_pages), and
/// the vCPUs get their old CPUs back.
fn move_back(
    vm: &Vm,
    mode: Mode,
    backing: crate::memory::Backing,
    chunks: &[(u32, u64, u32)],
    homes: &[u32],
    cpus_before: &CpusBefore,
    budget: Duration,
) -> Result<(), Vec<UndoError>> {
    let mut errors = Vec::new();
    match mode {
        Mode::Live | Mode::StopCopy => {
            for &(slot, _, g) in chunks {
                let mut sink = LocalSink::new(homes[g as usize], backing);
                let plan = Plan::new(vec![slot], FirstPass::Present, true, budget);
                if let Err(source) = transfer(vm, &mut sink, &plan) {
                    errors.push(UndoError::Chunk { slot, source });
                }
            }
            let _ = vm.stop_dirty_log();
        }
        Mode::Kernel => {
            let mem = vm.memory();
            let mut pages: Vec<*mut u8> = Vec::with_capacity(KERNEL_BATCH_PAGES);
            for c in mem
                .chunks()
                .filter(|c| chunks.iter().any(|k| k.0 == c.slot))
            {
                let g = chunks.iter().find(|k| k.0 == c.slot).map_or(0, |k| k.2);
                let home = homes[g as usize];
                let base = c.mapping.as_ptr();
                if let Err(source) = policy::bind(base, c.mapping.len(), home, false) {
                    errors.push(UndoError::Pages {
                        slot: c.slot,
                        source,
                    });
                }
                let total = c.mapping.len() / PAGE_SIZE as usize;
                for first in (0..total).step_by(KERNEL_BATCH_PAGES) {
                    let k = KERNEL_BATCH_PAGES.min(total - first);
                    pages.clear();
                    pages.extend(
                        (first..first + k).map(|p| base.wrapping_add(p * PAGE_SIZE as usize)),
                    );
                    if let Err(source) = policy::move_pages_to(&pages, home) {
                        errors.push(UndoError::Pages {
                            slot: c.slot,
                            source,
                        });
                        break;
                    }
                }
            }
        }
    }
    for (tid, cpus) in &cpus_before.vcpus {
        if let Err(source) = affinity::set_thread_affinity(*tid, cpus) {
            errors.push(UndoError::Vcpu { tid: *tid, source });
        }
    }
    for (g, cpus) in &cpus_before.workers {
        let cpus = cpus.as_deref().unwrap_or_default();
        if let Err(source) = vm.device_threads().set_cpus(*g, cpus) {
            errors.push(UndoError::Workers {
                guest_node: *g,
                source,
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Moves chunks one at a time. If one fails, the chunks already moved go
/// back to their guest node's old host node (`homes`), the same way, so the
/// VM ends up on its old memory as a whole.
#[allow(clippy::too_many_arguments)]
fn live_chunks(
    vm: &Vm,
    target: u32,
    backing: crate::memory::Backing,
    chunks: &[(u32, u64, u32)],
    homes: &[u32],
    budget: Duration,
    fail_at: Option<usize>,
    report: &mut NumaMigrateReport,
) -> Result<(), Failure> {
    let move_one = |slot: u32, to: u32| {
        let mut sink = LocalSink::new(to, backing);
        let plan = Plan::new(vec![slot], FirstPass::Present, true, budget);
        transfer(vm, &mut sink, &plan)
    };
    for (k, &(slot, len, _)) in chunks.iter().enumerate() {
        let attempt = if fail_at == Some(k) {
            Err(MoveStepError::InjectedChunk(k))
        } else {
            move_one(slot, target).map_err(MoveStepError::from)
        };
        let r = match attempt {
            Ok(r) => r,
            Err(cause) => {
                let mut back = Vec::new();
                for &(s, _, g) in chunks[..k].iter().rev() {
                    if let Err(source) = move_one(s, homes[g as usize]) {
                        back.push(UndoError::Chunk { slot: s, source });
                    }
                }
                return Err(Failure {
                    cause,
                    rollback: if back.is_empty() {
                        Rollback::ChunksMovedBack(k)
                    } else {
                        Rollback::ChunksNotMovedBack(back)
                    },
                });
            }
        };
        if r.downtime_us >= report.downtime_us {
            report.downtime_us = r.downtime_us;
            report.longest_pause = r.pause_breakdown.clone();
        }
        report.paused_total_us += r.downtime_us;
        report.pauses += 1;
        report.rounds += r.rounds;
        report.pages_moved += r.pages_sent;
        report.peak_extra_bytes = report.peak_extra_bytes.max(len);
        // The engine's `converged` is its estimate before the pause;
        // the move is judged on the pause that really happened.
        if !r.converged {
            report.converged = false;
            report.fallback_chunks += 1;
        }
        if r.downtime_us > report.max_downtime_us {
            report.converged = false;
            report.pauses_over_budget += 1;
        }
    }
    Ok(())
}

/// Moves pages in place with move_pages, in batches; the policy is already
/// bound to `target`. If the kernel refuses pages (the target is full), the
/// policy goes back to each guest node's old host node (`homes`) and the
/// batches already moved follow it.
fn kernel_move(
    vm: &Vm,
    target: u32,
    guest_nodes: &[u32],
    homes: &[u32],
    report: &mut NumaMigrateReport,
) -> Result<(), Failure> {
    let r = kernel_batches(vm, target, guest_nodes, report);
    if let Err((e, done)) = r {
        // Rebind first, so that pages the guest touches from now on are
        // taken on the old nodes too.
        let mut failed_back =
            bind_guest_nodes(vm, guest_nodes, |g| homes[g as usize], |_| Ok(())).err();
        let mut pages: Vec<*mut u8> = Vec::with_capacity(KERNEL_BATCH_PAGES);
        for (base, first, k, g) in done {
            pages.clear();
            pages.extend((first..first + k).map(|p| base.wrapping_add(p * PAGE_SIZE as usize)));
            if let Err(e2) = policy::move_pages_to(&pages, homes[g as usize]) {
                failed_back.get_or_insert(e2.into());
            }
        }
        return Err(Failure {
            cause: e,
            rollback: match failed_back {
                None => Rollback::PagesMovedBack,
                Some(e2) => Rollback::PagesNotMovedBack(Box::new(e2)),
            },
        });
    }
    Ok(())
}

/// A batch done: (chunk base, first page, pages, guest node).
type Batch = (*mut u8, usize, usize, u32);

fn kernel_batches(
    vm: &Vm,
    target: u32,
    guest_nodes: &[u32],
    report: &mut NumaMigrateReport,
) -> Result<(), (MoveStepError, Vec<Batch>)> {
    let mem = vm.memory();
    let mut done: Vec<Batch> = Vec::new();
    let mut lat: Vec<u64> = Vec::new();
    let mut moved = 0u64;
    let mut pages: Vec<*mut u8> = Vec::with_capacity(KERNEL_BATCH_PAGES);
    for n in mem
        .nodes
        .iter()
        .filter(|n| guest_nodes.contains(&n.guest_node))
    {
        for c in &n.chunks {
            let base = c.mapping.as_ptr();
            let total = c.mapping.len() / PAGE_SIZE as usize;
            let mut i = 0;
            while i < total {
                let k = KERNEL_BATCH_PAGES.min(total - i);
                pages.clear();
                pages.extend((i..i + k).map(|p| base.wrapping_add(p * PAGE_SIZE as usize)));
                let t = Instant::now();
                let status = match policy::move_pages_to(&pages, target) {
                    Ok(s) => s,
                    Err(e) => return Err((e.into(), done)),
                };
                done.push((base, i, k, n.guest_node));
                // Pages the kernel could not take this time (busy: the
                // guest or KVM held them) get one more try.
                let busy: Vec<*mut u8> = status
                    .iter()
                    .zip(&pages)
                    .filter(|(st, _)| **st == -libc::EBUSY || **st == -libc::EAGAIN)
                    .map(|(_, p)| *p)
                    .collect();
                let retried = if busy.is_empty() {
                    Vec::new()
                } else {
                    policy::move_pages_to(&busy, target).unwrap_or_default()
                };
                moved += retried.iter().filter(|st| **st == target as i32).count() as u64;
                lat.push(t.elapsed().as_micros() as u64);
                for (j, s) in status.iter().enumerate() {
                    if *s == target as i32 {
                        moved += 1;
                    } else if *s == -libc::ENOMEM {
                        let e = MoveStepError::OutOfMemory {
                            gpa: c.range.start + (i + j) as u64 * PAGE_SIZE,
                            guest_node: n.guest_node,
                            node: target,
                        };
                        return Err((e, done));
                    }
                }
                i += k;
            }
        }
    }
    report.pages_moved = moved;
    let count = lat.len() as u64;
    let max_us = lat.iter().copied().max().unwrap_or(0);
    lat.sort_unstable();
    report.batches = Some(BatchStats {
        count,
        pages_per_batch: KERNEL_BATCH_PAGES as u64,
        median_us: lat.get(lat.len() / 2).copied().unwrap_or(0),
        max_us,
        ..BatchStats::default()
    });
    Ok(())
}

/// How many more move_pages passes over the pages still off the target a
/// kernel move makes while the guest runs, before it pauses the guest.
const KERNEL_RETRY_PASSES: usize = 3;
/// Wait between those passes: long enough for a fault or a KVM access that
/// held a page to finish.
const KERNEL_RETRY_WAIT: Duration = Duration::from_millis(2);

/// The present pages of `chunks` that are not on `target`: (slot, page
/// addresses).
fn off_target(
    vm: &Vm,
    target: u32,
    chunks: &[(u32, u64, u32)],
) -> Result<Vec<(u32, Vec<*mut u8>)>, PolicyError> {
    let mem = vm.memory();
    let mut out = Vec::new();
    let mut pages: Vec<*mut u8> = Vec::with_capacity(placement::QUERY_BATCH_PAGES);
    for c in mem
        .chunks()
        .filter(|c| chunks.iter().any(|k| k.0 == c.slot))
    {
        let base = c.mapping.as_ptr();
        let total = c.mapping.len() / PAGE_SIZE as usize;
        let mut off = Vec::new();
        for first in (0..total).step_by(placement::QUERY_BATCH_PAGES) {
            let k = placement::QUERY_BATCH_PAGES.min(total - first);
            pages.clear();
            pages.extend((first..first + k).map(|p| base.wrapping_add(p * PAGE_SIZE as usize)));
            let status = policy::query_pages(&pages)?;
            off.extend(
                status
                    .iter()
                    .zip(&pages)
                    .filter(|(st, _)| **st >= 0 && **st != target as i32)
                    .map(|(_, p)| *p),
            );
        }
        if !off.is_empty() {
            out.push((c.slot, off));
        }
    }
    Ok(out)
}

fn page_count(left: &[(u32, Vec<*mut u8>)]) -> u64 {
    left.iter().map(|(_, p)| p.len() as u64).sum()
}

/// Moves the pages `left` to `target` with move_pages; returns how many
/// the kernel says it moved.
fn move_left(left: &[(u32, Vec<*mut u8>)], target: u32) -> Result<u64, PolicyError> {
    let mut moved = 0;
    for (_, pages) in left {
        for batch in pages.chunks(KERNEL_BATCH_PAGES) {
            let status = policy::move_pages_to(batch, target)?;
            moved += status.iter().filter(|st| **st == target as i32).count() as u64;
        }
    }
    Ok(moved)
}

/// Makes sure a kernel move left no present page behind. move_pages skips
/// pages it cannot isolate or migrate at that moment and, when migrating a
/// group fails, says so only in its return value; so placement is checked
/// page by page, and what is still elsewhere is moved again: a few passes
/// while the guest runs, one with the guest paused (nothing but the kernel
/// itself holds a page then), and for pages the kernel will not migrate at
/// all, a stop-copy of the chunks holding them through the engine and the
/// local sink. Fails, saying how many pages stayed, if some still did.
fn kernel_complete(
    vm: &Vm,
    target: u32,
    backing: crate::memory::Backing,
    chunks: &[(u32, u64, u32)],
    budget: Duration,
    report: &mut NumaMigrateReport,
) -> Result<(), MoveStepError> {
    let mut stats = report.batches.clone().unwrap_or_default();
    let mut left = off_target(vm, target, chunks)?;
    if !left.is_empty() {
        tracing::info!(
            "kernel move: {} present page(s) still off node {target} after the batches",
            page_count(&left)
        );
    }
    for _ in 0..KERNEL_RETRY_PASSES {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(KERNEL_RETRY_WAIT);
        stats.retried_pages += move_left(&left, target)?;
        left = off_target(vm, target, chunks)?;
    }
    if !left.is_empty() {
        let p = vm.pause()?;
        let moved = move_left(&left, target);
        let d = vm.resume(p)?;
        stats.paused_pages += moved?;
        let d = d.as_micros() as u64;
        report.pauses += 1;
        report.paused_total_us += d;
        report.downtime_us = report.downtime_us.max(d);
        left = off_target(vm, target, chunks)?;
    }
    if !left.is_empty() {
        tracing::info!(
            "kernel move: the kernel would not move {} page(s); copying their chunks",
            page_count(&left)
        );
        let mut sink = LocalSink::new(target, backing);
        let slots = left.iter().map(|(s, _)| *s).collect();
        let plan = Plan::new(slots, FirstPass::Present, false, budget);
        let r = transfer(vm, &mut sink, &plan)?;
        stats.copied_pages += r.pages_sent;
        report.pauses += 1;
        report.paused_total_us += r.downtime_us;
        if r.downtime_us >= report.downtime_us {
            report.downtime_us = r.downtime_us;
            report.longest_pause = r.pause_breakdown.clone();
        }
        let extra: u64 = chunks
            .iter()
            .filter(|c| left.iter().any(|(s, _)| *s == c.0))
            .map(|c| c.1)
            .sum();
        report.peak_extra_bytes = report.peak_extra_bytes.max(extra);
        left = off_target(vm, target, chunks)?;
    }
    report.pages_moved += stats.retried_pages + stats.paused_pages + stats.copied_pages;
    report.batches = Some(stats);
    if !left.is_empty() {
        return Err(MoveStepError::PagesLeft {
            pages: page_count(&left),
            node: target,
        });
    }
    Ok(())
}

/// Pins the threads that serve `guest_nodes` to the target's `cpus`: each
/// node's vCPUs, then its device workers (and the workers it starts later).
fn repin_vcpus(
    vm: &Vm,
    guest_nodes: &[u32],
    cpus: &[usize],
    hooks: &NumaHooks,
    report: &mut NumaMigrateReport,
) -> Result<(), MoveStepError> {
    let vcpu_nodes = vm.config().vcpu_nodes();
    for (id, tid) in vm.vcpu_tids() {
        if !guest_nodes.contains(&vcpu_nodes[id as usize]) {
            continue;
        }
        injected_finish_failure(hooks, FinishStep::Repin, report.vcpu_cpus.len())?;
        if !cpus.is_empty() {
            affinity::set_thread_affinity(tid, cpus)?;
        }
        let now = affinity::thread_affinity(tid)?;
        report
            .vcpu_cpus
            .insert(id.to_string(), affinity::format_cpu_list(&now));
    }
    for &g in guest_nodes {
        vm.device_threads().set_cpus(g, cpus)?;
    }
    Ok(())
}

/// Most pages numa-stat asks the kernel about per guest node; above that it
/// samples every k-th page (a full query costs ~50 ms per GiB here).
pub const STAT_MAX_QUERIED_PAGES: u64 = 1 << 18;

/// Reading where the pages or the vCPUs are failed.
#[derive(Debug, thiserror::Error)]
pub enum StatError {
    /// A placement or policy query failed.
    #[error("numa-stat: {0}")]
    Policy(#[from] PolicyError),
    /// Reading a vCPU thread's CPUs failed.
    #[error("numa-stat: {0}")]
    Affinity(#[from] AffinityError),
}

impl crate::api::Classify for StatError {
    fn kind(&self) -> crate::api::ErrorKind {
        crate::api::ErrorKind::Failed
    }
}

/// Measures placement of every guest node and the vCPUs' affinity.
pub fn numa_stat(vm: &Vm) -> Result<NumaStatReport, StatError> {
    let t = Instant::now();
    let mut guest_nodes = Vec::new();
    let n = vm.config().nodes.len() as u32;
    for g in 0..n {
        let (size, pol) = {
            let mem = vm.memory();
            let node = &mem.nodes[g as usize];
            let pol = node
                .chunks
                .first()
                .map(|c| policy::policy_of(c.mapping.as_ptr()))
                .transpose()?;
            (node.size, pol.unwrap_or_default())
        };
        let pages = size / PAGE_SIZE;
        let stride = pages.div_ceil(STAT_MAX_QUERIED_PAGES).max(1) as usize;
        let p = placement_of(vm, &[g], stride)?;
        guest_nodes.push(GuestNodeStat {
            guest_node: g,
            size_bytes: size,
            policy: pol,
            host_nodes: by_node(&p),
            not_present: p.not_present,
            sampled: p.sampled,
        });
    }
    let vcpu_nodes = vm.config().vcpu_nodes();
    let mut vcpus = Vec::new();
    for (id, tid) in vm.vcpu_tids() {
        let cpus = affinity::thread_affinity(tid)?;
        vcpus.push(VcpuStat {
            id,
            guest_node: vcpu_nodes[id as usize],
            allowed_cpus: affinity::format_cpu_list(&cpus),
        });
    }
    let mut device_threads = Vec::new();
    for t in vm.device_threads().threads() {
        let cpus = match affinity::thread_affinity(t.tid) {
            Ok(c) => c,
            // It ended since it was listed (a driver reset its device).
            Err(AffinityError::Get { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        device_threads.push(DeviceThreadStat {
            name: t.name,
            device: t.owner,
            tid: t.tid,
            guest_node: t.group,
            allowed_cpus: affinity::format_cpu_list(&cpus),
        });
    }
    Ok(NumaStatReport {
        guest_nodes,
        vcpus,
        device_threads,
        query_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(cause: MoveStepError, rollback: Rollback) -> String {
        NumaMoveError::Failed {
            node: 1,
            cause,
            rollback,
        }
        .to_string()
    }

    #[test]
    fn a_failed_move_says_what_failed_then_what_undoing_it_did() {
        assert_eq!(
            failed(
                MoveStepError::InjectedChunk(3),
                Rollback::ChunksMovedBack(3)
            ),
            "NUMA move to host node 1 failed: injected failure at chunk 3 (test hook \
             numa-fail-chunk); the 3 chunk(s) already moved were moved back, the VM runs on \
             its old memory"
        );
        assert_eq!(
            failed(
                MoveStepError::InjectedFinish(FinishStep::Repin),
                Rollback::Undone
            ),
            "NUMA move to host node 1 failed: injected failure in the repin step (test hook \
             numa-fail-finish); the move was undone: the VM runs on its old memory, policy and \
             CPUs"
        );
        let vcpu = |tid| UndoError::Vcpu {
            tid,
            source: AffinityError::EmptyCpuList { tid },
        };
        assert_eq!(
            failed(
                MoveStepError::PagesLeft { pages: 5, node: 1 },
                Rollback::NotUndone(vec![vcpu(7), vcpu(8)])
            ),
            "NUMA move to host node 1 failed: 5 present page(s) stayed off host node 1 after \
             every retry, a paused move_pages and a stop-copy of their chunks; undoing the move \
             failed too (vCPU thread 7: sched_setaffinity of thread 7: the cpu list is empty; \
             vCPU thread 8: sched_setaffinity of thread 8: the cpu list is empty): check with \
             numa-stat"
        );
        assert_eq!(
            failed(MoveStepError::InjectedChunk(0), Rollback::Nothing),
            "NUMA move to host node 1 failed: injected failure at chunk 0 (test hook \
             numa-fail-chunk)"
        );
    }

    #[test]
    fn a_target_out_of_memory_is_the_request_s_and_other_failures_the_host_s() {
        use crate::api::{Classify, ErrorKind};
        let oom = NumaMoveError::Failed {
            node: 1,
            cause: MoveStepError::OutOfMemory {
                gpa: 0x1000,
                guest_node: 0,
                node: 1,
            },
            rollback: Rollback::PagesMovedBack,
        };
        assert_eq!(oom.kind(), ErrorKind::Unusable, "{oom}");
        let hook = NumaMoveError::Failed {
            node: 1,
            cause: MoveStepError::InjectedChunk(0),
            rollback: Rollback::Nothing,
        };
        assert_eq!(hook.kind(), ErrorKind::Failed, "{hook}");
    }
}
