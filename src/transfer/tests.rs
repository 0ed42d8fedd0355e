//! The engine driven by a fake VM that dirties pages on a script, and a
//! sink that records the last version of every page it receives.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;
use crate::memory::{Backing, Mapping};

/// Pages per fake slot.
const PAGES: u64 = 4096;
/// The fake sink's pause rate: a million pages a second, so a 1 ms budget
/// holds ~700 pages after the fixed costs.
const RATE: f64 = 1e6 * PAGE_SIZE as f64;

/// Which pages the guest writes when it runs between two fetches.
type Script = Box<dyn Fn(u32) -> Vec<u64> + Send>;

#[derive(Default)]
struct FakeState {
    paused: bool,
    logging: bool,
    dirty: BTreeMap<u32, DirtyBitmap>,
    /// Ticks the guest ran (one per fetch of slot 0 while running).
    ticks: u32,
    /// Version written into the next page (a page holds its version at
    /// offset 0).
    version: u64,
    pauses: u32,
    throttle: u32,
}

/// A VM of two slots whose guest writes pages when the engine fetches logs.
struct FakeVm {
    slots: Vec<(u32, Mapping)>,
    state: Mutex<FakeState>,
    script: Script,
    /// Also write the first page of every run right after the sink read it
    /// (a write racing the copy).
    racy: bool,
    fail_pause: bool,
    /// Mirrors the throttle for the script to read.
    throttle_cell: Option<std::sync::Arc<std::sync::atomic::AtomicU32>>,
}

impl FakeVm {
    fn new(script: Script) -> Self {
        let slots = [3, 7]
            .into_iter()
            .map(|s| {
                let m = Mapping::new((PAGES * PAGE_SIZE) as usize, Backing::Anonymous).unwrap();
                (s, m)
            })
            .collect();
        FakeVm {
            slots,
            state: Mutex::new(FakeState::default()),
            script,
            racy: false,
            fail_pause: false,
            throttle_cell: None,
        }
    }

    fn mapping(&self, slot: u32) -> &Mapping {
        &self.slots.iter().find(|s| s.0 == slot).unwrap().1
    }

    fn write(&self, st: &mut FakeState, slot: u32, page: u64) {
        st.version += 1;
        let m = self.mapping(slot);
        m.volatile((page * PAGE_SIZE) as usize, 8)
            .unwrap()
            .copy_from(&st.version.to_le_bytes());
        if st.logging {
            st.dirty
                .entry(slot)
                .or_insert_with(|| DirtyBitmap::new(PAGES))
                .set(page);
        }
    }

    /// Every page's version now.
    fn snapshot(&self) -> BTreeMap<(u32, u64), u64> {
        let mut out = BTreeMap::new();
        for (slot, m) in &self.slots {
            for p in 0..PAGES {
                out.insert(
                    (*slot, p),
                    version_of(&m.volatile((p * PAGE_SIZE) as usize, 8).unwrap()),
                );
            }
        }
        out
    }

    fn is_paused(&self) -> bool {
        self.state.lock().unwrap().paused
    }
}

fn version_of(s: &VolatileSlice<'_>) -> u64 {
    let mut b = [0u8; 8];
    s.subslice(0, 8).unwrap().copy_to(&mut b[..]);
    u64::from_le_bytes(b)
}

struct FakePause(Instant);

impl Source for FakeVm {
    type Pause = FakePause;
    type Saved = u32;
    type State = u32;
    type Cow = crate::memory::cow::CopyOnWrite;

    fn slot_pages(&self, slot: u32) -> Option<u64> {
        self.slots.iter().any(|s| s.0 == slot).then_some(PAGES)
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        self.state.lock().unwrap().logging = true;
        Ok(())
    }

    fn dirty_logging(&self) -> bool {
        self.state.lock().unwrap().logging
    }

    fn fetch_dirty(&self, slots: &[u32]) -> Result<BTreeMap<u32, DirtyBitmap>, VmError> {
        let mut st = self.state.lock().unwrap();
        if !st.paused && slots.contains(&self.slots[0].0) {
            let tick = st.ticks;
            st.ticks += 1;
            for page in (self.script)(tick) {
                let s = self.slots[(page / PAGES) as usize % 2].0;
                self.write(&mut st, s, page % PAGES);
            }
        }
        Ok(slots
            .iter()
            .map(|&slot| {
                let b = st.dirty.remove(&slot);
                (slot, b.unwrap_or_else(|| DirtyBitmap::new(PAGES)))
            })
            .collect())
    }

    fn present_pages(&self, slot: u32) -> Result<DirtyBitmap, VmError> {
        // Even pages hold memory, odd ones were never touched.
        let _ = slot;
        let mut b = DirtyBitmap::new(PAGES);
        (0..PAGES).step_by(2).for_each(|p| b.set(p));
        Ok(b)
    }

    fn set_throttle(&self, percent: u32) {
        self.state.lock().unwrap().throttle = percent;
        if let Some(c) = &self.throttle_cell {
            c.store(percent, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn pause_saving(&self) -> Result<(FakePause, u32), VmError> {
        if self.fail_pause {
            return Err(VmError::State(
                crate::vmm::vm::RunState::Running,
                "the fake refuses to pause",
            ));
        }
        let mut st = self.state.lock().unwrap();
        assert!(!st.paused, "paused twice");
        st.paused = true;
        st.pauses += 1;
        Ok((FakePause(Instant::now()), st.ticks))
    }

    fn paused_since(&self, pause: &FakePause) -> Instant {
        pause.0
    }

    fn save_state(&self, _pause: &FakePause, saved: u32) -> Result<u32, VmError> {
        Ok(saved)
    }

    fn resume(&self, pause: FakePause) -> Result<Duration, VmError> {
        let mut st = self.state.lock().unwrap();
        assert!(st.paused, "resumed while running");
        st.paused = false;
        Ok(pause.0.elapsed())
    }

    fn arm_cow(&self, slots: &[u32]) -> Result<Self::Cow, VmError> {
        let ranges: Vec<_> = slots
            .iter()
            .map(|&s| (self.mapping(s).as_ptr() as usize, self.mapping(s).len()))
            .collect();
        Ok(Self::Cow::arm(&ranges)?)
    }

    fn protect(&self, cow: &Self::Cow, slot: u32, pages: &DirtyBitmap) -> Result<u64, VmError> {
        let host = self.mapping(slot).as_ptr() as usize;
        cow.protect(slot, host, 0, pages).map_err(VmError::from)
    }

    fn drain(
        &self,
        cow: &Self::Cow,
        each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        cow.drain(&mut |r| {
            let (slot, first) = (r.slot, r.first);
            each(PageRun {
                slot,
                first,
                gpa: r.gpa,
                data: r.data,
            })?;
            // The guest runs again: it writes protected pages the drain has
            // not reached yet (the last page of the slot) and one it has.
            let mut st = self.state.lock().unwrap();
            if self.racy && !st.paused {
                self.write(&mut st, slot, PAGES - 1 - first % 64);
                self.write(&mut st, slot, first);
            }
            Ok(())
        })
    }

    fn cow_faults(&self, cow: &Self::Cow) -> u64 {
        cow.faults()
    }

    fn read_pages(
        &self,
        slot: u32,
        pages: &DirtyBitmap,
        each: &mut dyn FnMut(PageRun<'_>) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        let m = self.mapping(slot);
        for (first, n) in pages.runs() {
            let data = m
                .volatile((first * PAGE_SIZE) as usize, (n * PAGE_SIZE) as usize)
                .unwrap();
            each(PageRun {
                slot,
                first,
                gpa: first * PAGE_SIZE,
                data,
            })?;
            let mut st = self.state.lock().unwrap();
            if self.racy && !st.paused {
                self.write(&mut st, slot, first);
            }
        }
        Ok(())
    }
}

/// Where a failure is injected into the recording sink.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum FailAt {
    #[default]
    Nowhere,
    RunningPages,
    PausedPages,
    Commit,
    Complete,
}

#[derive(Default)]
struct RecordingSink {
    got: BTreeMap<(u32, u64), u64>,
    /// The guest's memory at the commit, to compare with `got`.
    at_commit: Option<BTreeMap<(u32, u64), u64>>,
    paused_pages: u64,
    stay_paused: bool,
    /// Takes the pause's pages after the resume (copy-on-write).
    late: bool,
    fail: FailAt,
    aborted: bool,
    completed: bool,
}

fn fail(what: &str) -> SinkError {
    SinkError {
        sink: "recording",
        message: format!("injected failure in {what}"),
    }
}

impl Sink<FakeVm> for RecordingSink {
    fn name(&self) -> &'static str {
        "recording"
    }

    fn begin(&mut self, _vm: &FakeVm, _slots: &[u32]) -> Result<(), SinkError> {
        Ok(())
    }

    fn pages(&mut self, run: PageRun<'_>, paused: bool) -> Result<u64, SinkError> {
        match (self.fail, paused) {
            (FailAt::RunningPages, false) => return Err(fail("pages")),
            (FailAt::PausedPages, true) => return Err(fail("paused pages")),
            _ => {}
        }
        if paused {
            self.paused_pages += run.pages();
        }
        for i in 0..run.pages() {
            let page = run
                .data
                .subslice((i * PAGE_SIZE) as usize, PAGE_SIZE as usize)
                .unwrap();
            self.got
                .insert((run.slot, run.first + i), version_of(&page));
        }
        Ok(run.data.len() as u64)
    }

    fn paused_rate(&self) -> f64 {
        RATE
    }

    fn takes_late_pages(&self) -> bool {
        self.late
    }

    fn commit(&mut self, vm: &FakeVm, _p: &FakePause, _s: u32) -> Result<AfterCommit, SinkError> {
        assert!(vm.is_paused(), "commit runs in the pause");
        if self.fail == FailAt::Commit {
            return Err(fail("commit"));
        }
        self.at_commit = Some(vm.snapshot());
        Ok(if self.stay_paused {
            AfterCommit::StayPaused
        } else {
            AfterCommit::Resume
        })
    }

    fn complete(&mut self, _vm: &FakeVm) -> Result<(), SinkError> {
        if self.fail == FailAt::Complete {
            return Err(fail("complete"));
        }
        self.completed = true;
        Ok(())
    }

    fn abort(&mut self, _vm: &FakeVm) {
        self.aborted = true;
    }
}

fn plan(live: bool) -> Plan {
    Plan::new(vec![3, 7], FirstPass::All, live, Duration::from_millis(1))
}

/// Every page the guest ever held reached the sink in its version at the
/// pause.
fn assert_last_versions(sink: &RecordingSink) {
    let want = sink.at_commit.as_ref().expect("the sink committed");
    for (k, v) in want {
        assert_eq!(sink.got.get(k), Some(v), "slot {} page {}", k.0, k.1);
    }
}

#[test]
fn an_idle_guest_converges_after_one_pass() {
    let vm = FakeVm::new(Box::new(|_| vec![]));
    let mut sink = RecordingSink::default();
    let r = transfer(&vm, &mut sink, &plan(true)).unwrap();
    assert!(r.converged);
    assert_eq!(r.rounds, 2, "the first pass and an empty paused round");
    assert_eq!(r.pages_sent, 2 * PAGES);
    assert_eq!(r.pages_in_pause, 0);
    assert!(sink.completed && !sink.aborted && !vm.is_paused());
    assert_last_versions(&sink);
}

#[test]
fn a_shrinking_dirty_set_converges_and_every_page_arrives_in_its_last_version() {
    // 3000, 2000, 1000, then 100 pages a round, over both slots.
    let vm = FakeVm::new(Box::new(|t| {
        let n = 3000u64.saturating_sub(1000 * t as u64).max(100);
        (0..n).map(|i| (i * 3 + t as u64) % (2 * PAGES)).collect()
    }));
    let mut sink = RecordingSink::default();
    let r = transfer(&vm, &mut sink, &plan(true)).unwrap();
    assert!(r.converged, "{r:?}");
    assert!(r.rounds >= 3, "{r:?}");
    assert!(r.pages_in_pause <= 700, "{r:?}");
    assert_eq!(vm.state.lock().unwrap().pauses, 1);
    assert_last_versions(&sink);
}

#[test]
fn a_guest_that_outruns_the_budget_ends_in_a_bounded_stop_copy() {
    let vm = FakeVm::new(Box::new(|t| {
        (0..2000)
            .map(|i| (i + t as u64 * 7) % (2 * PAGES))
            .collect()
    }));
    let mut sink = RecordingSink::default();
    let r = transfer(&vm, &mut sink, &plan(true)).unwrap();
    assert!(!r.converged, "{r:?}");
    assert!(r.rounds <= MAX_ROUNDS + 1, "{r:?}");
    assert!(r.pages_in_pause >= 2000, "{r:?}");
    assert_last_versions(&sink);
}

#[test]
fn writes_racing_the_copy_are_sent_again() {
    let mut vm = FakeVm::new(Box::new(|_| vec![]));
    vm.racy = true;
    let mut sink = RecordingSink::default();
    let r = transfer(&vm, &mut sink, &plan(true)).unwrap();
    assert!(
        r.pages_sent > 2 * PAGES,
        "the raced pages went twice: {r:?}"
    );
    assert_last_versions(&sink);
}

#[test]
fn stop_copy_pauses_once_and_sends_everything_in_the_pause() {
    let vm = FakeVm::new(Box::new(|t| vec![t as u64]));
    let mut sink = RecordingSink::default();
    let r = transfer(&vm, &mut sink, &plan(false)).unwrap();
    assert_eq!((r.rounds, r.pages_in_pause), (1, 2 * PAGES));
    assert_eq!(sink.paused_pages, 2 * PAGES);
    assert_last_versions(&sink);
}

#[test]
fn a_present_first_pass_leaves_untouched_pages_out() {
    let vm = FakeVm::new(Box::new(|_| vec![]));
    let mut sink = RecordingSink::default();
    let mut p = plan(false);
    p.first_pass = FirstPass::Present;
    let r = transfer(&vm, &mut sink, &p).unwrap();
    assert_eq!(r.pages_sent, PAGES, "only the even pages of both slots");
    assert!(sink.got.keys().all(|(_, page)| page % 2 == 0));
}

#[test]
fn failures_abort_the_sink_and_leave_the_guest_running() {
    for at in [
        FailAt::RunningPages,
        FailAt::PausedPages,
        FailAt::Commit,
        FailAt::Complete,
    ] {
        let vm = FakeVm::new(Box::new(|t| vec![t as u64]));
        let mut sink = RecordingSink {
            fail: at,
            stay_paused: at == FailAt::Complete,
            ..Default::default()
        };
        let e = transfer(&vm, &mut sink, &plan(true)).unwrap_err();
        assert!(e.to_string().contains("injected failure"), "{e}");
        assert!(sink.aborted, "aborted");
        assert!(!vm.is_paused(), "the guest runs after a failure");
    }
}

#[test]
fn a_vm_that_cannot_pause_fails_the_transfer_cleanly() {
    let mut vm = FakeVm::new(Box::new(|_| vec![]));
    vm.fail_pause = true;
    let mut sink = RecordingSink::default();
    let e = transfer(&vm, &mut sink, &plan(true)).unwrap_err();
    assert!(e.to_string().contains("refuses to pause"), "{e}");
    assert!(sink.aborted && !vm.is_paused());
}

#[test]
fn a_sink_that_stays_paused_leaves_the_guest_paused() {
    let vm = FakeVm::new(Box::new(|_| vec![]));
    let mut sink = RecordingSink {
        stay_paused: true,
        ..Default::default()
    };
    let r = transfer(&vm, &mut sink, &plan(true)).unwrap();
    assert!(vm.is_paused() && sink.completed);
    assert!(r.downtime_us < 10_000_000);
}

#[test]
fn auto_converge_throttles_a_guest_that_slows_down_when_throttled_and_resets_the_throttle() {
    // The guest dirties 2000 pages a round, a tenth of that once throttled
    // to at least 50 % (the first step that high is 60 %); the fake reads
    // its throttle through a shared cell.
    let throttle = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = throttle.clone();
    let mut vm = FakeVm::new(Box::new(move |t| {
        let n = if seen.load(std::sync::atomic::Ordering::Relaxed) >= 50 {
            200
        } else {
            2000
        };
        (0..n).map(|i| (i + t as u64 * 7) % (2 * PAGES)).collect()
    }));
    vm.throttle_cell = Some(throttle);
    let mut sink = RecordingSink::default();
    let mut p = plan(true);
    p.auto_converge = true;
    let r = transfer(&vm, &mut sink, &p).unwrap();
    assert!(r.converged, "{r:?}");
    assert_eq!(r.throttle_max_percent, 60, "{r:?}");
    assert_eq!(
        vm.state.lock().unwrap().throttle,
        0,
        "throttle lifted after"
    );
    assert_last_versions(&sink);
}

#[test]
fn a_cancel_ends_the_transfer_with_the_guest_running() {
    let vm = FakeVm::new(Box::new(|t| {
        (0..2000).map(|i| (i + t as u64) % (2 * PAGES)).collect()
    }));
    let cancel = std::sync::Arc::new(Cancel::default());
    cancel.cancel("asked by a test");
    let mut sink = RecordingSink::default();
    let mut p = plan(true);
    p.cancel = Some(cancel);
    let e = transfer(&vm, &mut sink, &p).unwrap_err();
    assert!(
        matches!(e, TransferError::Cancelled(ref r) if r == "asked by a test"),
        "{e}"
    );
    assert!(sink.aborted && !vm.is_paused());
}

#[test]
fn pages_protected_in_the_pause_arrive_as_they_were_though_the_guest_writes_them_after() {
    // A guest that never converges: 2000 pages a round, forever.
    let mut vm = FakeVm::new(Box::new(|t| {
        (0..2000)
            .map(|i| (i * 5 + t as u64 * 3) % (2 * PAGES))
            .collect()
    }));
    vm.racy = true;
    let mut sink = RecordingSink {
        late: true,
        ..Default::default()
    };
    let r = transfer(&vm, &mut sink, &plan(true)).unwrap();
    assert!(r.pages_protected >= 2000, "{r:?}");
    assert_eq!(r.pages_in_pause, r.pages_protected, "{r:?}");
    assert_eq!(sink.paused_pages, 0, "nothing copied in the pause: {r:?}");
    assert!(r.cow_faults > 0, "the guest wrote protected pages: {r:?}");
    assert!(sink.completed && !vm.is_paused());
    // Every page as it was at the pause, none as the guest wrote it after.
    assert_last_versions(&sink);
}

#[test]
fn without_late_pages_the_pause_copies() {
    let vm = FakeVm::new(Box::new(|t| (0..500).map(|i| i + t as u64).collect()));
    let mut sink = RecordingSink::default();
    let r = transfer(&vm, &mut sink, &plan(true)).unwrap();
    assert_eq!(r.pages_protected, 0, "{r:?}");
    assert_eq!(sink.paused_pages, r.pages_in_pause, "{r:?}");
    assert_last_versions(&sink);
}
