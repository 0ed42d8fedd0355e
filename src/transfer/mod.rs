//! The dirty-page transfer engine: the one pre-copy loop behind every move
//! of guest memory (NUMA moves, checkpoints, migration).
//!
//! It turns on KVM dirty logging, sends a first pass while the guest runs,
//! then rounds of what the guest dirtied meanwhile, and decides when to stop
//! the vCPUs for the last round: when the remaining dirty set fits the
//! downtime budget at the rate the sink takes pages in a pause — or, if the
//! dirty rate does not converge, after a bounded number of rounds (the
//! report then says `converged: false`). In the pause it sends the last
//! pages, captures the vCPU state, lets the sink commit, and resumes.
//!
//! Where the pages go is the sink's business ([`Sink`]): new memory on
//! another node, a checkpoint file. Any failure before the commit leaves
//! the VM running as it was.


use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::memory::{Chunk, DirtyBitmap, PAGE_SIZE};
use crate::vmm::{Pause, Vm, VmError, VmState};

/// Most rounds before giving up on convergence.
pub const MAX_ROUNDS: u32 = 30;
/// Rounds without the dirty set shrinking before giving up on convergence.
const STALL_ROUNDS: u32 = 4;
/// Fixed cost of a pause besides copying: stopping and restarting vCPUs,
/// fetching the last dirty logs, saving vCPU state (measured ~100-200 µs here).
const PAUSE_OVERHEAD: Duration = Duration::from_micros(250);

/// A page sink failed.
#[derive(Debug, thiserror::Error)]
#[error("{sink}: {message}")]
pub struct SinkError {
    /// Which sink.
    pub sink: &'static str,
    /// What failed, naming the file, node or address.
    pub message: String,
}

/// A transfer failed; the VM was left running (or as it was).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The sink failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The VM failed (dirty log, pause, vCPU state).
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// Whether the VM runs on after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCommit {
    /// Resume the vCPUs.
    Resume,
    /// Leave the VM paused (the caller stops it: `--stop-after`, migration).
    StayPaused,
}

/// Where pages go. The engine calls, in order: `begin`, `pages` any number
/// of times (guest running or paused), `commit` (paused), `complete`
/// (after the resume); or `abort` after a failure at any point.
pub trait Sink {
    /// Short name for errors.
    fn name(&self) -> &'static str;
    /// Prepares for these chunks (allocates, opens files). Runs before any
    /// pause, so failures here cost the guest nothing.
    fn begin(&mut self, vm: &Vm, chunks: &[&Chunk]) -> Result<(), SinkError>;
    /// Takes `pages` pages of `chunk` starting at page `first`; `data` is the
    /// guest memory they occupy. `paused` says whether the guest is stopped:
    /// a sink with slow output should only stage data then. Returns bytes
    /// that went out (0 for pages skipped, e.g. zero pages).
    fn pages(
        &mut self,
        chunk: &Chunk,
        first: u64,
        data: &[u8],
        paused: bool,
    ) -> Result<u64, SinkError>;
    /// Bytes per second the sink takes pages at while the guest is paused.
    fn paused_rate(&self) -> f64;
    /// Called just before the pause with the number of pages the pause is
    /// expected to send, so a staging sink can prepare room outside it.
    fn before_pause(&mut self, _expected_pages: u64) -> Result<(), SinkError> {
        Ok(())
    }
    /// What `commit` itself will cost in the pause (switching slots, say).
    fn commit_cost(&self) -> Duration {
        Duration::ZERO
    }
    /// In the pause, after the last pages: records the state, switches memory.
    fn commit(&mut self, vm: &Vm, pause: &Pause, state: &VmState)
        -> Result<AfterCommit, SinkError>;
    /// After the resume: the slow rest (write out, fsync, free old memory).
    fn complete(&mut self, vm: &Vm) -> Result<(), SinkError>;
    /// Undo what can be undone after a failure.
    fn abort(&mut self, vm: &Vm);
}

/// Which pages the first pass sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstPass {
    /// Every page of the plan's chunks.
    All,
    /// The pages dirtied since the VM's last checkpoint, taken after dirty
    /// logging is armed, so nothing dirtied in between is missed.
    SinceCheckpoint,
}

/// How to move.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The chunks (by slot) to transfer.
    pub slots: Vec<u32>,
    /// Pages to send in the first pass.
    pub first_pass: FirstPass,
    /// Pre-copy while running (true) or pause first and copy everything (false).
    pub live: bool,
    /// Downtime budget for the last round.
    pub max_downtime: Duration,
}

/// What one transfer did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TransferReport {
    /// Copy rounds, the final paused one included.
    pub rounds: u32,
    /// Pages handed to the sink (a page sent twice counts twice).
    pub pages_sent: u64,
    /// Bytes the sink reported writing.
    pub bytes_sent: u64,
    /// Pages sent in the pause.
    pub pages_in_pause: u64,
    /// Microseconds no vCPU ran.
    pub downtime_us: u64,
    /// Whole transfer, milliseconds.
    pub total_ms: f64,
    /// Whether the dirty set converged to the budget (false: bounded stop-copy).
    pub converged: bool,
    /// Dirty pages seen in each pre-copy round after the first.
    pub dirty_per_round: Vec<u64>,
    /// Where the pause went, µs.
    pub pause_breakdown: PauseBreakdown,
}

/// The phases of the pause, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PauseBreakdown {
    /// Stopping every vCPU, each saving its registers as it stops.
    pub stop_us: u64,
    /// Fetching the last dirty logs.
    pub fetch_us: u64,
    /// Sending the last pages to the sink.
    pub copy_us: u64,
    /// Assembling the VM state from the saved vCPU registers.
    pub state_us: u64,
    /// The sink's commit (switching slots, recording state).
    pub commit_us: u64,
    /// Restarting every vCPU.
    pub resume_us: u64,
}

fn us(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

struct Run<'a> {
    vm: &'a Vm,
    sink: &'a mut dyn Sink,
    report: TransferReport,
}

impl Run<'_> {
    /// Sends every page set in `sets` (per slot) to the sink.
    fn send(
        &mut self,
        sets: &BTreeMap<u32, DirtyBitmap>,
        paused: bool,
    ) -> Result<u64, TransferError> {
        let mem = self.vm.memory();
        let mut pages = 0;
        for (slot, bits) in sets {
            let Some(chunk) = mem.chunks().find(|c| c.slot == *slot) else {
                continue;
            };
            // SAFETY: the chunk's mapping is live while we hold the memory
            // read lock; the guest may write it concurrently, which the
            // dirty log makes up for in the next round.
            let all = unsafe { chunk.mapping.as_slice() };
            for (first, n) in bits.runs() {
                let from = (first * PAGE_SIZE) as usize;
                let to = from + (n * PAGE_SIZE) as usize;
                self.report.bytes_sent += self.sink.pages(chunk, first, &all[from..to], paused)?;
                pages += n;
            }
        }
        self.report.pages_sent += pages;
        Ok(pages)
    }

    /// Fetches (and clears) the dirty logs of the plan's slots.
    fn fetch(&self, slots: &[u32]) -> Result<BTreeMap<u32, DirtyBitmap>, TransferError> {
        let mem = self.vm.memory();
        let mut out = BTreeMap::new();
        for c in mem.chunks().filter(|c| slots.contains(&c.slot)) {
            out.insert(c.slot, self.vm.fetch_dirty(c)?);
        }
        Ok(out)
    }
}

fn count(sets: &BTreeMap<u32, DirtyBitmap>) -> u64 {
    sets.values().map(|b| b.count()).sum()
}

/// Moves the plan's pages to `sink`; on success the sink has committed and
/// the VM runs (or stays paused if the sink said so). On failure the sink
/// is aborted and the VM runs on as before.
///
/// Dirty logging stays on afterwards: an operation made of several
/// transfers (a NUMA move chunk by chunk) turns it off once, at its end,
/// with `Vm::stop_dirty_log`.
pub fn transfer(
    vm: &Vm,
    sink: &mut dyn Sink,
    plan: &Plan,
) -> Result<TransferReport, TransferError> {
    let start = Instant::now();
    let mut run = Run {
        vm,
        sink,
        report: TransferReport::default(),
    };
    let mut pause: Option<Pause> = None;
    let r = precopy(&mut run, plan, &mut pause);
    let result = match r {
        Ok(after) => {
            let downtime = match (after, &pause) {
                (AfterCommit::Resume, Some(_)) => {
                    let t = Instant::now();
                    let d = vm.resume(pause.take().expect("matched Some"))?;
                    run.report.pause_breakdown.resume_us = us(t);
                    d
                }
                // The VM stays paused for the caller to stop it; the pause
                // is kept until `complete` succeeds, so that a failure there
                // resumes the VM below instead of leaving it paused.
                (AfterCommit::StayPaused, Some(p)) => p.since.elapsed(),
                (_, None) => Duration::ZERO,
            };
            run.report.downtime_us = downtime.as_micros() as u64;
            let done = run.sink.complete(vm).map_err(TransferError::from);
            if done.is_ok() {
                // Staying paused on purpose: the token is no longer needed.
                pause = None;
            }
            done
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        run.sink.abort(vm);
        if let Some(p) = pause.take() {
            vm.resume(p)?;
        }
        return Err(e);
    }
    run.report.total_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(run.report)
}

fn precopy(
    run: &mut Run<'_>,
    plan: &Plan,
    pause: &mut Option<Pause>,
) -> Result<AfterCommit, TransferError> {
    let vm = run.vm;
    // vCPU state, captured as the vCPUs stop.
    let saved;
    {
        let mem = vm.memory();
        let chunks: Vec<&Chunk> = mem
            .chunks()
            .filter(|c| plan.slots.contains(&c.slot))
            .collect();
        run.sink.begin(vm, &chunks)?;
    }
    // Read only after dirty logging is armed and the logs cleared, so no
    // page dirtied in between is missed.
    let first_pass = || -> BTreeMap<u32, DirtyBitmap> {
        if plan.first_pass == FirstPass::SinceCheckpoint {
            return vm.checkpoint_dirty(&plan.slots);
        }
        let mem = vm.memory();
        mem.chunks()
            .filter(|c| plan.slots.contains(&c.slot))
            .map(|c| (c.slot, DirtyBitmap::full(c.pages())))
            .collect()
    };
    run.report.converged = true;
    let mut last_pass;
    if plan.live {
        vm.start_dirty_log()?;
        // Clear the logs now: the first pass copies everything after this.
        run.fetch(&plan.slots)?;
        let first = first_pass();
        run.send(&first, false)?;
        run.report.rounds = 1;
        let rate = run.sink.paused_rate().max(1.0);
        let mut best = u64::MAX;
        let mut stalled = 0;
        loop {
            let t = Instant::now();
            let dirty = run.fetch(&plan.slots)?;
            let fetch_cost = t.elapsed();
            let n = count(&dirty);
            run.report.dirty_per_round.push(n);
            let pause_cost = PAUSE_OVERHEAD
                + run.sink.commit_cost()
                + fetch_cost
                + Duration::from_secs_f64((n * PAGE_SIZE) as f64 / rate);
            if pause_cost <= plan.max_downtime {
                last_pass = dirty;
                break;
            }
            if n < best {
                best = n;
                stalled = 0;
            } else {
                stalled += 1;
            }
            if run.report.rounds >= MAX_ROUNDS || stalled >= STALL_ROUNDS {
                run.report.converged = false;
                last_pass = dirty;
                break;
            }
            run.send(&dirty, false)?;
            run.report.rounds += 1;
        }
        // The pause sends the last dirty set plus what the guest dirties
        // until it stops: allow a quarter more.
        let expected = count(&last_pass);
        run.sink.before_pause(expected + expected / 4 + 256)?;
        let t = Instant::now();
        let (p, states) = vm.pause_saving()?;
        *pause = Some(p);
        saved = states;
        run.report.pause_breakdown.stop_us = us(t);
        // What was dirtied since the last fetch, plus what that fetch found.
        let t = Instant::now();
        let more = run.fetch(&plan.slots)?;
        run.report.pause_breakdown.fetch_us = us(t);
        for (slot, b) in more {
            last_pass
                .entry(slot)
                .or_insert_with(|| DirtyBitmap::new(b.pages()))
                .merge(&b);
        }
    } else {
        let t = Instant::now();
        let (p, states) = vm.pause_saving()?;
        *pause = Some(p);
        saved = states;
        run.report.pause_breakdown.stop_us = us(t);
        if vm.dirty_logging() {
            // Keep any checkpoint's record of what changed up to date.
            run.fetch(&plan.slots)?;
        }
        last_pass = first_pass();
    }
    let p = pause.as_ref().expect("paused above");
    let t = Instant::now();
    run.report.pages_in_pause = run.send(&last_pass, true)?;
    run.report.pause_breakdown.copy_us = us(t);
    run.report.rounds += 1;
    let t = Instant::now();
    let state = vm.save_state(p, saved)?;
    run.report.pause_breakdown.state_us = us(t);
    let t = Instant::now();
    let after = run.sink.commit(vm, p, &state)?;
    run.report.pause_breakdown.commit_us = us(t);
    Ok(after)
}
