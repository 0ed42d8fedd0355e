//! The dirty-page transfer engine: the one pre-copy loop behind every move
//! of guest memory (NUMA moves, checkpoints, migration).
//!
//! It turns on dirty logging, sends a first pass while the guest runs, then
//! rounds of what the guest dirtied meanwhile, and stops the vCPUs for the
//! last round when [`convergence`] says so. In the pause it sends the last
//! pages, captures the VM state, lets the sink commit, and resumes.
//!
//! The engine knows the VM only through [`Source`] (implemented for the
//! real VM in [`vm`], and by a scripted fake in the unit tests) and where
//! pages go only through [`Sink`]: new memory on another node
//! (`numa::sink`), a checkpoint file (`checkpoint::sink`), a stream. The
//! operations own their sinks; this module imports none of them. Any
//! failure before the commit leaves the VM running as it was.

pub mod convergence;
pub mod vm;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::memory::{DirtyAccumulator, DirtyBitmap, VolatileSlice, PAGE_SIZE};
use crate::vmm::VmError;
use convergence::{Convergence, Decision, RoundFacts};

pub use convergence::MAX_ROUNDS;

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
    /// Copy-on-write of the pause's last pages failed.
    #[error(transparent)]
    Cow(#[from] crate::memory::cow::CowError),
    /// Someone cancelled the transfer (a cancel request, a timeout).
    #[error("cancelled: {0}")]
    Cancelled(String),
}

/// Ends a transfer early from another thread (a cancel request, a timeout).
/// The engine looks at it between rounds and before the pause; actions
/// registered with `on_cancel` (shutting a connection) wake a sink blocked
/// in I/O.
#[derive(Default)]
pub struct Cancel {
    reason: Mutex<Option<String>>,
    actions: Mutex<Vec<Box<dyn Fn() + Send>>>,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("reason", &self.reason())
            .finish()
    }
}

impl Cancel {
    /// Cancels, once: the first reason wins.
    pub fn cancel(&self, why: impl Into<String>) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_some() {
                return;
            }
            *r = Some(why.into());
        }
        for a in self
            .actions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            a();
        }
    }

    /// Why it was cancelled, if it was.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs `action` on cancel (now, if already cancelled).
    pub fn on_cancel(&self, action: impl Fn() + Send + 'static) {
        if self.reason().is_some() {
            action();
        }
        self.actions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(action));
    }

    fn check(&self) -> Result<(), TransferError> {
        match self.reason() {
            Some(r) => Err(TransferError::Cancelled(r)),
            None => Ok(()),
        }
    }
}

/// Whether the VM runs on after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCommit {
    /// Resume the vCPUs.
    Resume,
    /// Leave the VM paused (the caller stops it: `--stop-after`, migration).
    StayPaused,
}

/// A run of consecutive guest pages handed to a sink.
#[derive(Debug, Clone, Copy)]
pub struct PageRun<'a> {
    /// The memory slot (chunk) the pages belong to.
    pub slot: u32,
    /// Index of the first page within its slot.
    pub first: u64,
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// The pages, as volatile memory: the guest may be writing them.
    pub data: VolatileSlice<'a>,
}

impl PageRun<'_> {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.data.len() as u64 / PAGE_SIZE
    }
}

/// The VM as the engine sees it: its memory slots, dirty logs, pause and
/// state. Small on purpose, so the engine can be driven by a fake.
pub trait Source {
    /// Proof that the vCPUs are paused, handed back to `resume`.
    type Pause;
    /// What the vCPUs saved as they stopped.
    type Saved;
    /// The VM state a sink records at its commit.
    type State;
    /// Copy-on-write armed over the VM's memory (`memory::cow`); dropping
    /// it lifts every protection left.
    type Cow;

    /// Pages in memory slot `slot` (None: no such slot).
    fn slot_pages(&self, slot: u32) -> Option<u64>;
    /// The pages a full copy of `slot` sends: all of a memory slot; of a
    /// disk over a base image, the blocks that differ from the base.
    fn all_pages(&self, slot: u32) -> Option<DirtyBitmap> {
        self.slot_pages(slot).map(DirtyBitmap::full)
    }
    /// Turns dirty logging on (idempotent).
    fn start_dirty_log(&self) -> Result<(), VmError>;
    /// Whether dirty logging is on.
    fn dirty_logging(&self) -> bool;
    /// Fetches and clears the dirty logs of these slots: the pages each
    /// had dirtied since its last fetch.
    fn fetch_dirty(&self, slots: &[u32]) -> Result<BTreeMap<u32, DirtyBitmap>, VmError>;
    /// Pages of `slot` that hold memory now (faulted in or loaded); the
    /// rest reads as zero and need not be sent to a sink that starts empty.
    fn present_pages(&self, slot: u32) -> Result<DirtyBitmap, VmError>;
    /// Throttles the vCPUs to sleep `percent` % of the time (0: full speed).
    fn set_throttle(&self, percent: u32);
    /// Stops every vCPU, each saving its state.
    fn pause_saving(&self) -> Result<(Self::Pause, Self::Saved), VmError>;
    /// Stops every vCPU without saving their state, for a sink that does
    /// not read it (`Saved` then holds no vCPU); saving by default.
    fn pause_only(&self) -> Result<(Self::Pause, Self::Saved), VmError> {
        self.pause_saving()
    }
    /// When the pause began.
    fn paused_since(&self, pause: &Self::Pause) -> Instant;
    /// Assembles the VM state from what the vCPUs saved.
    fn save_state(&self, pause: &Self::Pause, saved: Self::Saved) -> Result<Self::State, VmError>;
    /// Restarts the vCPUs; returns how long the pause really was: from the
    /// first vCPU stopping to the last one running again.
    fn resume(&self, pause: Self::Pause) -> Result<Duration, VmError>;
    /// Arms copy-on-write over these slots, before a pause, so that the
    /// pause can write-protect its last pages instead of copying them.
    fn arm_cow(&self, slots: &[u32]) -> Result<Self::Cow, VmError>;
    /// In the pause: write-protects `pages` of `slot`, which keep their
    /// contents from now until `drain` reads them; returns how many.
    fn protect(&self, cow: &Self::Cow, slot: u32, pages: &DirtyBitmap) -> Result<u64, VmError>;
    /// After the pause: hands every protected page to `each` as it was when
    /// protected, lifting its protection; stops at the first error.
    fn drain(
        &self,
        cow: &Self::Cow,
        each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
    ) -> Result<(), TransferError>;
    /// Pages the guest wrote before the drain reached them (each one cost
    /// the writing vCPU a fault and a copy).
    fn cow_faults(&self, cow: &Self::Cow) -> u64;
    /// Hands every run of set pages in `pages` (of slot `slot`) to `each`,
    /// while the memory cannot be replaced under it; stops at the first error.
    fn read_pages(
        &self,
        slot: u32,
        pages: &DirtyBitmap,
        each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
    ) -> Result<(), TransferError>;
}

/// Where pages go. The engine calls, in order: `begin`, `pages` any number
/// of times (guest running or paused), `commit` (paused), `complete`
/// (after the resume); or `abort` after a failure at any point.
pub trait Sink<S: Source + ?Sized> {
    /// Short name for errors.
    fn name(&self) -> &'static str;
    /// Prepares for these slots (allocates, opens files). Runs before any
    /// pause, so failures here cost the guest nothing.
    fn begin(&mut self, vm: &S, slots: &[u32]) -> Result<(), SinkError>;
    /// Takes a run of pages. `paused` says whether the guest is stopped: a
    /// sink with slow output should only stage data then. Returns bytes
    /// that went out (0 for pages skipped, e.g. zero pages).
    fn pages(&mut self, run: PageRun<'_>, paused: bool) -> Result<u64, SinkError>;
    /// Bytes per second the sink takes pages at while the guest is paused.
    fn paused_rate(&self) -> f64;
    /// Whether the pause's last pages may reach the sink after its commit
    /// and the resume (as `pages(run, false)` before `complete`), read
    /// through copy-on-write: yes for a checkpoint file; no for new memory
    /// the commit switches to, or a stream whose far end starts the VM.
    fn takes_late_pages(&self) -> bool {
        false
    }
    /// A pre-copy round's pages were all handed over: a sink whose far end
    /// lags (a stream) waits for it here, so its rate is measured end to
    /// end and no backlog is left for the pause.
    fn end_of_round(&mut self, _round: u32) -> Result<(), SinkError> {
        Ok(())
    }
    /// Called just before the pause with the number of pages the pause is
    /// expected to send (0 when it only write-protects them), so a staging
    /// sink can prepare room outside it and finish pending work.
    fn before_pause(&mut self, _expected_pages: u64) -> Result<(), SinkError> {
        Ok(())
    }
    /// Whether `commit` reads the vCPUs' state; a sink that only switches
    /// memory says no, and its pause does not save them.
    fn needs_vcpu_state(&self) -> bool {
        true
    }
    /// What `commit` itself will cost in the pause (switching slots, say).
    fn commit_cost(&self) -> Duration {
        Duration::ZERO
    }
    /// In the pause, after the last pages: records the state, switches memory.
    fn commit(
        &mut self,
        vm: &S,
        pause: &S::Pause,
        state: S::State,
    ) -> Result<AfterCommit, SinkError>;
    /// After the resume: the slow rest (write out, fsync, free old memory).
    fn complete(&mut self, vm: &S) -> Result<(), SinkError>;
    /// Undo what can be undone after a failure.
    fn abort(&mut self, vm: &S);
}

/// Which pages the first pass sends.
#[derive(Debug, Clone)]
pub enum FirstPass {
    /// Every page of the plan's slots.
    All,
    /// The pages that hold memory now, for a sink that starts out empty
    /// (zero): untouched pages stay untouched.
    Present,
    /// The pages an accumulator the VM feeds holds (a checkpoint chain's:
    /// the pages written since its last checkpoint), read after dirty
    /// logging is armed and the logs fetched into it, so nothing dirtied
    /// in between is missed.
    Accumulated(Arc<DirtyAccumulator>),
}

/// How to move.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The slots to transfer.
    pub slots: Vec<u32>,
    /// Pages to send in the first pass.
    pub first_pass: FirstPass,
    /// Pre-copy while running (true) or pause first and copy everything (false).
    pub live: bool,
    /// Downtime budget for the last round.
    pub max_downtime: Duration,
    /// Throttle the vCPUs step by step when the dirty set stops shrinking.
    pub auto_converge: bool,
    /// Lets another thread end the transfer early.
    pub cancel: Option<Arc<Cancel>>,
    /// Write-protect the pause's last pages and send them after the resume
    /// (copy-on-write), when the sink takes late pages; else copy them in
    /// the pause.
    pub protect_in_pause: bool,
}

impl Plan {
    /// A plan with no auto-converge and no cancel.
    pub fn new(slots: Vec<u32>, first_pass: FirstPass, live: bool, max_downtime: Duration) -> Self {
        Plan {
            slots,
            first_pass,
            live,
            max_downtime,
            auto_converge: false,
            cancel: None,
            protect_in_pause: true,
        }
    }

    fn check_cancel(&self) -> Result<(), TransferError> {
        self.cancel.as_ref().map_or(Ok(()), |c| c.check())
    }
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
    /// Pages the pause dealt with: copied to the sink, or write-protected.
    pub pages_in_pause: u64,
    /// Of those, pages write-protected in the pause and sent after it.
    pub pages_protected: u64,
    /// Protected pages the guest wrote before they were sent (each cost
    /// the writing vCPU a fault and a page copy).
    pub cow_faults: u64,
    /// Microseconds no vCPU ran.
    pub downtime_us: u64,
    /// Whole transfer, milliseconds.
    pub total_ms: f64,
    /// Whether the dirty set converged to the budget (false: bounded stop-copy).
    pub converged: bool,
    /// Dirty pages seen in each pre-copy round after the first.
    pub dirty_per_round: Vec<u64>,
    /// The highest vCPU throttle auto-converge used, percent.
    pub throttle_max_percent: u32,
    /// Where the pause went, µs.
    pub pause_breakdown: PauseBreakdown,
    /// Where the whole transfer went, ms.
    pub phases: Phases,
}

pub use crate::api::transfer::{PauseBreakdown, Phases};

fn us(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

/// Dirty sets of several slots.
type Sets = BTreeMap<u32, DirtyBitmap>;

fn count(sets: &Sets) -> u64 {
    sets.values().map(|b| b.count()).sum()
}

struct Run<'a, S: Source + ?Sized> {
    vm: &'a S,
    sink: &'a mut dyn Sink<S>,
    plan: &'a Plan,
    report: TransferReport,
    start: Instant,
    /// When the vCPUs were asked to stop.
    paused_at: Option<Instant>,
}

impl<S: Source + ?Sized> Run<'_, S> {
    /// Sends every page set in `sets` to the sink.
    fn send(&mut self, sets: &Sets, paused: bool) -> Result<u64, TransferError> {
        let mut pages = 0;
        let mut bytes = 0;
        for (slot, bits) in sets {
            let sink = &mut *self.sink;
            self.vm.read_pages(*slot, bits, &mut |run| {
                pages += run.pages();
                bytes += sink.pages(run, paused)?;
                Ok(())
            })?;
        }
        self.report.pages_sent += pages;
        self.report.bytes_sent += bytes;
        Ok(pages)
    }

    /// Sends the pages protected in the pause, as they were then.
    fn drain(&mut self, cow: &S::Cow) -> Result<(), TransferError> {
        let (mut pages, mut bytes) = (0, 0);
        let sink = &mut *self.sink;
        self.vm.drain(cow, &mut |run| {
            pages += run.pages();
            bytes += sink.pages(run, false)?;
            Ok(())
        })?;
        self.report.pages_sent += pages;
        self.report.bytes_sent += bytes;
        Ok(())
    }

    /// Fetches (and clears) the dirty logs of the plan's slots.
    fn fetch(&self) -> Result<Sets, TransferError> {
        Ok(self.vm.fetch_dirty(&self.plan.slots)?)
    }

    /// The first pass's pages. Read only after dirty logging is armed and
    /// the logs cleared, so no page dirtied in between is missed.
    fn first_pass(&self) -> Result<Sets, TransferError> {
        let slots = &self.plan.slots;
        Ok(match &self.plan.first_pass {
            FirstPass::Accumulated(acc) => slots
                .iter()
                .filter_map(|&s| Some((s, acc.get(s, self.vm.slot_pages(s)?))))
                .collect(),
            FirstPass::Present => slots
                .iter()
                .map(|&s| Ok((s, self.vm.present_pages(s)?)))
                .collect::<Result<_, VmError>>()?,
            FirstPass::All => slots
                .iter()
                .filter_map(|&s| Some((s, self.vm.all_pages(s)?)))
                .collect(),
        })
    }
}

/// Moves the plan's pages to `sink`; on success the sink has committed and
/// the VM runs (or stays paused if the sink said so). On failure the sink
/// is aborted and the VM runs on as before.
///
/// Dirty logging stays on afterwards: an operation made of several
/// transfers (a NUMA move chunk by chunk) turns it off once, at its end.
pub fn transfer<S: Source + ?Sized>(
    vm: &S,
    sink: &mut dyn Sink<S>,
    plan: &Plan,
) -> Result<TransferReport, TransferError> {
    let start = Instant::now();
    let mut run = Run {
        vm,
        sink,
        plan,
        report: TransferReport::default(),
        start,
        paused_at: None,
    };
    let mut pause: Option<S::Pause> = None;
    let mut cow: Option<S::Cow> = None;
    let precopied = precopy(&mut run, &mut pause, &mut cow);
    if run.report.throttle_max_percent > 0 {
        vm.set_throttle(0);
    }
    let result = precopied.and_then(|after| {
        let downtime = match (after, pause.as_ref()) {
            (AfterCommit::Resume, Some(_)) => {
                let t = Instant::now();
                let d = vm.resume(pause.take().expect("matched Some"))?;
                run.report.pause_breakdown.resume_us = us(t);
                d
            }
            // The VM stays paused for the caller to stop it; the pause is
            // kept until `complete` succeeds, so that a failure there
            // resumes the VM below instead of leaving it paused.
            (AfterCommit::StayPaused, Some(p)) => vm.paused_since(p).elapsed(),
            (_, None) => Duration::ZERO,
        };
        run.report.downtime_us = downtime.as_micros() as u64;
        let resumed = Instant::now();
        run.report.phases.pause_ms = ms_between(run.paused_at.unwrap_or(resumed), resumed);
        if let Some(c) = cow.take() {
            let drained = run.drain(&c);
            run.report.cow_faults = vm.cow_faults(&c);
            // Lifts whatever protection a failed drain left.
            drop(c);
            drained?;
        }
        let completing = Instant::now();
        run.report.phases.drain_ms = ms_between(resumed, completing);
        run.sink.complete(vm)?;
        run.report.phases.complete_ms = ms_between(completing, Instant::now());
        // Staying paused on purpose: the token is no longer needed.
        pause = None;
        Ok(())
    });
    if let Err(e) = result {
        drop(cow);
        run.sink.abort(vm);
        if let Some(p) = pause.take() {
            vm.resume(p)?;
        }
        return Err(e);
    }
    run.report.total_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(run.report)
}

/// Stops the vCPUs, saving their state only if the sink reads it.
fn stop_vcpus<S: Source + ?Sized>(
    vm: &S,
    sink: &dyn Sink<S>,
) -> Result<(S::Pause, S::Saved), VmError> {
    if sink.needs_vcpu_state() {
        vm.pause_saving()
    } else {
        vm.pause_only()
    }
}

fn precopy<S: Source + ?Sized>(
    run: &mut Run<'_, S>,
    pause: &mut Option<S::Pause>,
    cow: &mut Option<S::Cow>,
) -> Result<AfterCommit, TransferError> {
    let (vm, plan) = (run.vm, run.plan);
    plan.check_cancel()?;
    run.sink.begin(vm, &plan.slots)?;
    if plan.live && plan.protect_in_pause && run.sink.takes_late_pages() {
        // Without it (no write protection here, memory registered by a
        // lazy restore still loading) the pause copies, as any sink.
        *cow = vm
            .arm_cow(&plan.slots)
            .map_err(|e| tracing::debug!("copy-on-write unavailable, copying in the pause: {e}"))
            .ok();
    }
    let paused_rate = if cow.is_some() {
        convergence::PROTECT_RATE
    } else {
        run.sink.paused_rate()
    };
    run.report.converged = true;
    let mut last_pass;
    let saved;
    if plan.live {
        vm.start_dirty_log()?;
        // Clear the logs now: the first pass copies everything after this.
        run.fetch()?;
        let first = run.first_pass()?;
        run.send(&first, false)?;
        run.report.rounds = 1;
        run.sink.end_of_round(1)?;
        let mut decide = if plan.auto_converge {
            Convergence::with_auto_converge(plan.max_downtime)
        } else {
            Convergence::new(plan.max_downtime)
        };
        loop {
            plan.check_cancel()?;
            let t = Instant::now();
            let dirty = run.fetch()?;
            let facts = RoundFacts {
                rounds_sent: run.report.rounds,
                dirty_pages: count(&dirty),
                fetch_cost: t.elapsed(),
                paused_rate,
                commit_cost: run.sink.commit_cost(),
            };
            run.report.dirty_per_round.push(facts.dirty_pages);
            match decide.decide(&facts) {
                Decision::Stop { converged } => {
                    run.report.converged = converged;
                    last_pass = dirty;
                    break;
                }
                Decision::Continue => {
                    run.send(&dirty, false)?;
                    run.report.rounds += 1;
                    run.sink.end_of_round(run.report.rounds)?;
                }
                Decision::Throttle(p) => {
                    vm.set_throttle(p);
                    run.report.throttle_max_percent = p;
                    run.send(&dirty, false)?;
                    run.report.rounds += 1;
                    run.sink.end_of_round(run.report.rounds)?;
                }
            }
        }
        // The pause sends the last dirty set plus what the guest dirties
        // until it stops: allow a quarter more. With copy-on-write it only
        // protects them.
        let expected = count(&last_pass);
        run.sink.before_pause(if cow.is_some() {
            0
        } else {
            expected + expected / 4 + 256
        })?;
        plan.check_cancel()?;
        if run.report.throttle_max_percent > 0 {
            // Lifted before the pause: the vCPUs it wakes restart at full
            // speed, and the kicker is gone before anything is timed.
            vm.set_throttle(0);
        }
        let t = Instant::now();
        run.paused_at = Some(t);
        run.report.phases.precopy_ms = ms_between(run.start, t);
        let (p, states) = stop_vcpus(vm, &*run.sink)?;
        *pause = Some(p);
        saved = states;
        run.report.pause_breakdown.stop_us = us(t);
        // What was dirtied since the last fetch, plus what that fetch found.
        let t = Instant::now();
        let more = run.fetch()?;
        run.report.pause_breakdown.fetch_us = us(t);
        for (slot, b) in more {
            last_pass
                .entry(slot)
                .or_insert_with(|| DirtyBitmap::new(b.pages()))
                .merge(&b);
        }
    } else {
        let t = Instant::now();
        run.paused_at = Some(t);
        run.report.phases.precopy_ms = ms_between(run.start, t);
        let (p, states) = stop_vcpus(vm, &*run.sink)?;
        *pause = Some(p);
        saved = states;
        run.report.pause_breakdown.stop_us = us(t);
        if vm.dirty_logging() {
            // Keep any checkpoint's record of what changed up to date.
            run.fetch()?;
        }
        last_pass = run.first_pass()?;
    }
    let p = pause.as_ref().expect("paused above");
    let t = Instant::now();
    run.report.pages_in_pause = match cow.as_ref() {
        Some(c) => {
            let mut n = 0;
            for (&slot, bits) in &last_pass {
                n += vm.protect(c, slot, bits)?;
            }
            run.report.pages_protected = n;
            n
        }
        None => run.send(&last_pass, true)?,
    };
    run.report.pause_breakdown.copy_us = us(t);
    run.report.rounds += 1;
    let t = Instant::now();
    let state = vm.save_state(p, saved)?;
    run.report.pause_breakdown.state_us = us(t);
    let t = Instant::now();
    let after = run.sink.commit(vm, p, state)?;
    run.report.pause_breakdown.commit_us = us(t);
    Ok(after)
}

#[cfg(test)]
mod tests;
