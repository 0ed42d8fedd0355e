//! When to stop pre-copying: a pure function of what the rounds measured,
//! so it is tested without a VM.

use std::time::Duration;

use crate::memory::PAGE_SIZE;

/// Most rounds before giving up on convergence.
pub const MAX_ROUNDS: u32 = 30;
/// Rounds without the dirty set shrinking before giving up on convergence.
pub const STALL_ROUNDS: u32 = 4;
/// Auto-converge: the throttles tried in turn, percent of the time the
/// vCPUs sleep. Coarse first, fine near the top, where each step halves
/// what the guest can still dirty.
pub const THROTTLE_STEPS: [u32; 7] = [20, 40, 60, 80, 90, 95, 99];
/// The harshest throttle.
pub const THROTTLE_MAX: u32 = 99;
/// Rounds without the dirty set shrinking before auto-converge throttles
/// (or throttles harder).
pub const THROTTLE_AFTER: u32 = 1;
/// What write-protecting a page in the pause costs, as bytes per second:
/// measured on a quiet host, 180–260 ns a 4 KiB page (UFFDIO_WRITEPROTECT
/// over runs, most of it KVM dropping its shadow mappings of the pages)
/// and 80–100 ns on huge pages, against 300–420 ns for a staging copy;
/// taken as 250 ns.
pub const PROTECT_RATE: f64 = PAGE_SIZE as f64 / 250e-9;
/// Fixed cost of a pause besides copying: stopping and restarting vCPUs,
/// fetching the last dirty logs, saving vCPU state (measured ~100-200 µs here).
pub const PAUSE_OVERHEAD: Duration = Duration::from_micros(250);

/// What one round measured, after fetching its dirty set.
#[derive(Debug, Clone, Copy)]
pub struct RoundFacts {
    /// Copy rounds sent so far (the first pass is round 1).
    pub rounds_sent: u32,
    /// Pages dirtied since the last round.
    pub dirty_pages: u64,
    /// What fetching the dirty logs cost: the pause fetches them once more.
    pub fetch_cost: Duration,
    /// Bytes per second the sink takes pages at in a pause.
    pub paused_rate: f64,
    /// What the sink's commit costs in the pause.
    pub commit_cost: Duration,
}

/// The next step of the pre-copy loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send this round's dirty pages while the guest runs, then ask again.
    Continue,
    /// Throttle the vCPUs to this percent asleep, then as `Continue`.
    Throttle(u32),
    /// Pause now and send the rest: `converged` says whether the estimated
    /// pause fits the budget (false: a bounded stop-copy after giving up).
    Stop {
        /// Whether the pause is expected to fit the budget.
        converged: bool,
    },
}

/// The pause a round's dirty set would cost.
pub fn pause_estimate(f: &RoundFacts) -> Duration {
    let copy = (f.dirty_pages * PAGE_SIZE) as f64 / f.paused_rate.max(1.0);
    PAUSE_OVERHEAD + f.commit_cost + f.fetch_cost + Duration::from_secs_f64(copy)
}

/// The stop decision, round after round, for one downtime budget.
#[derive(Debug, Clone)]
pub struct Convergence {
    budget: Duration,
    best: u64,
    stalled: u32,
    /// The throttle now, when auto-converge is on.
    throttle: Option<u32>,
}

impl Convergence {
    /// A decision maker for a pause of at most `budget`.
    pub fn new(budget: Duration) -> Self {
        Convergence {
            budget,
            best: u64::MAX,
            stalled: 0,
            throttle: None,
        }
    }

    /// The same, throttling the vCPUs step by step (auto-converge) when
    /// the dirty set stops shrinking, before it gives up.
    pub fn with_auto_converge(budget: Duration) -> Self {
        Convergence {
            throttle: Some(0),
            ..Self::new(budget)
        }
    }

    /// Stops when the dirty set fits the budget; gives up (a bounded
    /// stop-copy) after [`MAX_ROUNDS`], or after [`STALL_ROUNDS`] rounds in
    /// a row that did not shrink the dirty set below its best. With
    /// auto-converge, [`THROTTLE_AFTER`] such rounds throttle the vCPUs one
    /// step harder instead, until [`THROTTLE_MAX`].
    pub fn decide(&mut self, f: &RoundFacts) -> Decision {
        if pause_estimate(f) <= self.budget {
            return Decision::Stop { converged: true };
        }
        if f.dirty_pages < self.best {
            self.best = f.dirty_pages;
            self.stalled = 0;
        } else {
            self.stalled += 1;
        }
        if let Some(t) = self.throttle {
            if self.stalled >= THROTTLE_AFTER && t < THROTTLE_MAX && f.rounds_sent < MAX_ROUNDS {
                let next = THROTTLE_STEPS
                    .iter()
                    .copied()
                    .find(|&s| s > t)
                    .unwrap_or(THROTTLE_MAX);
                self.throttle = Some(next);
                // A slower guest is a new race: judge it afresh.
                self.stalled = 0;
                self.best = u64::MAX;
                return Decision::Throttle(next);
            }
        }
        if f.rounds_sent >= MAX_ROUNDS || self.stalled >= STALL_ROUNDS {
            return Decision::Stop { converged: false };
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB_S: f64 = (1u64 << 30) as f64;

    fn facts(rounds_sent: u32, dirty_pages: u64) -> RoundFacts {
        RoundFacts {
            rounds_sent,
            dirty_pages,
            fetch_cost: Duration::from_micros(50),
            paused_rate: 4.0 * GIB_S,
            commit_cost: Duration::ZERO,
        }
    }

    #[test]
    fn a_dirty_set_that_fits_the_budget_stops_converged() {
        let mut c = Convergence::new(Duration::from_millis(1));
        // 100 pages at 4 GiB/s: ~0.1 ms of copy + 0.3 ms fixed.
        assert_eq!(c.decide(&facts(1, 100)), Decision::Stop { converged: true });
    }

    #[test]
    fn a_shrinking_dirty_set_continues_until_it_fits() {
        let mut c = Convergence::new(Duration::from_millis(1));
        let mut rounds = 1;
        for n in [100_000, 40_000, 10_000, 2_000] {
            assert_eq!(c.decide(&facts(rounds, n)), Decision::Continue, "{n}");
            rounds += 1;
        }
        assert_eq!(
            c.decide(&facts(rounds, 200)),
            Decision::Stop { converged: true }
        );
    }

    #[test]
    fn the_budget_counts_fixed_costs_and_the_commit() {
        let mut f = facts(1, 0);
        f.commit_cost = Duration::from_millis(2);
        assert!(pause_estimate(&f) > Duration::from_millis(2));
        let mut c = Convergence::new(Duration::from_millis(1));
        assert_eq!(c.decide(&f), Decision::Continue);
        assert_eq!(
            Convergence::new(Duration::from_millis(3)).decide(&f),
            Decision::Stop { converged: true }
        );
    }

    #[test]
    fn a_dirty_set_that_stops_shrinking_gives_up_after_the_stall_rounds() {
        let mut c = Convergence::new(Duration::from_millis(1));
        assert_eq!(c.decide(&facts(1, 50_000)), Decision::Continue);
        for k in 1..STALL_ROUNDS {
            assert_eq!(c.decide(&facts(1 + k, 60_000)), Decision::Continue);
        }
        assert_eq!(
            c.decide(&facts(1 + STALL_ROUNDS, 60_000)),
            Decision::Stop { converged: false }
        );
    }

    #[test]
    fn a_slowly_shrinking_dirty_set_gives_up_at_the_round_limit() {
        let mut c = Convergence::new(Duration::from_millis(1));
        let mut n = 1_000_000;
        for r in 1..MAX_ROUNDS {
            assert_eq!(c.decide(&facts(r, n)), Decision::Continue, "round {r}");
            n -= 1;
        }
        assert_eq!(
            c.decide(&facts(MAX_ROUNDS, n)),
            Decision::Stop { converged: false }
        );
    }

    #[test]
    fn auto_converge_throttles_step_by_step_before_giving_up() {
        let mut c = Convergence::with_auto_converge(Duration::from_millis(1));
        let mut steps = Vec::new();
        let mut r = 1;
        let converged = loop {
            match c.decide(&facts(r, 60_000)) {
                Decision::Throttle(p) => steps.push(p),
                Decision::Continue => {}
                Decision::Stop { converged } => break converged,
            }
            r += 1;
        };
        assert!(!converged);
        assert_eq!(steps, THROTTLE_STEPS.to_vec());
        assert!(r <= MAX_ROUNDS, "gave up within the round limit ({r})");
    }

    #[test]
    fn auto_converge_stops_throttling_harder_once_the_dirty_set_fits() {
        let mut c = Convergence::with_auto_converge(Duration::from_millis(1));
        assert_eq!(c.decide(&facts(1, 60_000)), Decision::Continue);
        assert_eq!(c.decide(&facts(2, 60_000)), Decision::Throttle(20));
        assert_eq!(c.decide(&facts(3, 50_000)), Decision::Continue);
        assert_eq!(c.decide(&facts(4, 100)), Decision::Stop { converged: true });
    }

    #[test]
    fn a_slower_sink_needs_a_smaller_dirty_set() {
        let mut slow = facts(1, 2_000);
        slow.paused_rate = 0.1 * GIB_S;
        assert_eq!(
            Convergence::new(Duration::from_millis(1)).decide(&slow),
            Decision::Continue
        );
        assert_eq!(
            Convergence::new(Duration::from_millis(1)).decide(&facts(1, 2_000)),
            Decision::Continue
        );
        assert_eq!(
            Convergence::new(Duration::from_millis(5)).decide(&facts(1, 2_000)),
            Decision::Stop { converged: true }
        );
    }
}
