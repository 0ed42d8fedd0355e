//! `reset-64`: a reset in place (the API's `vm.reset` path, called in
//! process) of a VM whose memory differs from the checkpoint in exactly 64
//! pages, against an in-run baseline of what a reset cannot avoid: a bare
//! pause + resume round trip of the same VM plus a memcpy of 64 pages.
//!
//! The guest is `builtin:idle`, so that the only pages written since the
//! checkpoint are the 64 this scenario writes, device-style (marked for the
//! dirty log, as a device's DMA is), spread over guest memory. The reset's
//! downtime includes the dirty-log fetch of all memory and loading the
//! vCPU and device state.
//!
//! `reset-loop-64`: the guest-driven loop through the reset device
//! (`builtin:reset,pages=64` served by the service's reset worker, as in
//! `vmhop run`): resets per second, guest faults included, and the latency
//! of each reset from the guest's `out` to its vCPUs running again (p50,
//! p99, max), against an in-run baseline of a port-I/O exit round trip
//! (the same guest poking with no base armed: an exit that does nothing)
//! plus a memcpy of 64 scattered pages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmhop::api::checkpoint::CheckpointTarget;
use vmhop::api::server::ApiHandler;
use vmhop::checkpoint::create::{checkpoint, CheckpointRequest};
use vmhop::checkpoint::reset::{arm, reset};
use vmhop::guest::GuestSpec;
use vmhop::memory::PAGE_SIZE;
use vmhop::service::vmm::Vmm;

use super::fixture::{boot, failed, pause_baseline, scratch_dir, vm_bytes, BenchVm};
use super::{median, quantile, BenchError, RunCtx, Sample, Scenario};

/// Pages dirtied before each reset.
const DIRTIED: u64 = 64;
/// Resets per run (the median is reported).
const RESETS: usize = 50;

/// The scenarios of this module.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new(
            "reset-64",
            "reset in place with 64 pages dirtied (median downtime of 50) vs a bare pause+resume round trip plus a memcpy of 64 pages",
            run,
        ),
        Scenario::new(
            "reset-loop-64",
            "guest-driven resets through the reset device, 64 random pages dirtied per iteration: resets/s (guest faults included) and each reset's latency (p50, p99, max) vs a port-I/O exit round trip plus a memcpy of 64 pages",
            run_loop,
        ),
    ]
}

fn run(ctx: &RunCtx) -> Result<Vec<Sample>, super::BenchError> {
    let b = boot(ctx, "bench-reset", GuestSpec::Idle)?;
    let dir = scratch_dir()?;
    let req = CheckpointRequest {
        dir: dir.path().to_path_buf(),
        full: true,
        stop_after: false,
    };
    let mut chain = b.chain.lock().unwrap_or_else(|e| e.into_inner());
    checkpoint(&b.vm, &mut chain, &req).map_err(failed("checkpoint"))?;
    let target = CheckpointTarget {
        dir: dir.path().to_path_buf(),
        id: Some(1),
    };
    let base = arm(&b.vm, &target).map_err(failed("arming the reset"))?;
    reset(&b.vm, &base, &mut chain, true, &mut || {}).map_err(failed("first reset"))?;
    // 64 pages spread over the top half of memory, away from the guest's
    // code and tables at the bottom.
    let bytes = vm_bytes(ctx);
    let stride = (bytes / 2 / DIRTIED) / PAGE_SIZE * PAGE_SIZE;
    let mut downtimes = Vec::with_capacity(RESETS);
    let (mut fetch, mut copy_us, mut state) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ctx.iterations(RESETS) {
        for k in 0..DIRTIED {
            let gpa = bytes / 2 + k * stride;
            if !b.vm.write_u64_marked(gpa, round as u64 + 1) {
                return Err(super::BenchError::Failed(format!(
                    "guest {gpa:#x} cannot be written"
                )));
            }
        }
        let r = reset(&b.vm, &base, &mut chain, false, &mut || {}).map_err(failed("reset"))?;
        if r.pages_rewritten != DIRTIED {
            return Err(super::BenchError::Failed(format!(
                "the reset rewrote {} pages, not the {DIRTIED} written",
                r.pages_rewritten
            )));
        }
        downtimes.push(r.downtime_us as f64);
        fetch.push(r.pause_breakdown.fetch_us as f64);
        copy_us.push(r.pause_breakdown.copy_us as f64);
        state.push(r.pause_breakdown.state_us as f64);
    }
    drop(chain);
    let round_trip = pause_baseline(ctx, &b.vm)?;
    let copy = memcpy_us(DIRTIED);
    Ok(vec![Sample::new(
        "downtime, 64 pages",
        "µs",
        median(&downtimes),
    )
    .vs(round_trip + copy)])
}

/// Median µs of a memcpy of `pages` scattered, faulted pages.
fn memcpy_us(pages: u64) -> f64 {
    let page = PAGE_SIZE as usize;
    let src = vec![1u8; page * pages as usize * 16];
    let mut dst = vec![0u8; page * pages as usize * 16];
    let mut copies = Vec::new();
    for _ in 0..RESETS {
        let t = Instant::now();
        for k in 0..pages as usize {
            let o = k * 16 * page;
            dst[o..o + page].copy_from_slice(&src[o..o + page]);
        }
        std::hint::black_box(&dst);
        copies.push(t.elapsed().as_secs_f64() * 1e6);
    }
    median(&copies)
}

/// How long the loop is measured (a tenth in smoke mode).
const LOOP_WINDOW: Duration = Duration::from_secs(5);
/// How long the baseline guest pokes with no base armed.
const POKE_WINDOW: Duration = Duration::from_secs(1);
/// How long the loop may take to start after arming.
const LOOP_START: Duration = Duration::from_secs(10);

/// A `builtin:reset` VM served as `vmhop run` serves it: the service's API
/// handler and its reset worker.
struct LoopVm {
    vmm: Arc<Vmm>,
    _end: std::sync::mpsc::Receiver<vmhop::service::vmm::Ending>,
    /// Shuts the VM down when dropped.
    _vm: BenchVm,
}

impl LoopVm {
    fn boot(ctx: &RunCtx, name: &str, poke_always: bool) -> Result<LoopVm, BenchError> {
        let guest = GuestSpec::Reset {
            pages: DIRTIED,
            poke_always,
        };
        let b = boot(ctx, name, guest)?;
        let line = b.reset_line.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let vmm = Vmm::new(
            b.vm.clone(),
            Default::default(),
            Default::default(),
            Default::default(),
            tx,
        )
        .with_reset_device(line, None);
        let vmm = Arc::new(vmm);
        vmm.start_reset_worker()
            .map_err(|e| BenchError::Failed(format!("cannot start the reset worker: {e}")))?;
        Ok(LoopVm {
            vmm,
            _end: rx,
            _vm: b,
        })
    }

    /// An API call, which must answer 200.
    fn call(&self, method: &str, path: &str, body: &str) -> Result<serde_json::Value, BenchError> {
        let (code, v) = self.vmm.handle(method, path, body.as_bytes());
        if code != 200 {
            return Err(BenchError::Failed(format!("{method} {path}: {code} {v}")));
        }
        Ok(v)
    }

    fn reset_counter(&self, name: &str) -> Result<u64, BenchError> {
        let s = self.call("GET", "/api/v1/vm.status", "")?;
        Ok(s["reset"][name].as_u64().unwrap_or(0))
    }
}

fn run_loop(ctx: &RunCtx) -> Result<Vec<Sample>, BenchError> {
    // Baseline: the same guest poking with no base armed, each poke an
    // exit that does nothing (its 64 pages stay mapped: no faults).
    let exit_us = {
        let v = LoopVm::boot(ctx, "bench-reset-poke", true)?;
        let p0 = v.reset_counter("ignored_pokes")?;
        let t = Instant::now();
        std::thread::sleep(ctx.window(POKE_WINDOW));
        let p1 = v.reset_counter("ignored_pokes")?;
        let s = t.elapsed().as_secs_f64();
        if p1 <= p0 {
            return Err(BenchError::Failed("the guest did not poke".into()));
        }
        s * 1e6 / (p1 - p0) as f64
    };
    let copy = memcpy_us(DIRTIED);
    let v = LoopVm::boot(ctx, "bench-reset-loop", false)?;
    let dir = scratch_dir()?;
    let d = dir.path().display().to_string();
    v.call(
        "PUT",
        "/api/v1/vm.checkpoint",
        &format!(r#"{{"dir": "{d}"}}"#),
    )?;
    v.call("PUT", "/api/v1/vm.reset", &format!(r#"{{"to": "{d}@1"}}"#))?;
    let deadline = Instant::now() + LOOP_START;
    while v.reset_counter("guest_resets")? < 10 {
        if Instant::now() > deadline {
            return Err(BenchError::Failed(
                "the guest's reset loop did not start".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    v.vmm.take_reset_latencies_us();
    let r0 = v.reset_counter("guest_resets")?;
    let t = Instant::now();
    std::thread::sleep(ctx.window(LOOP_WINDOW));
    let r1 = v.reset_counter("guest_resets")?;
    let rate = (r1 - r0) as f64 / t.elapsed().as_secs_f64();
    let lat: Vec<f64> = v
        .vmm
        .take_reset_latencies_us()
        .into_iter()
        .map(f64::from)
        .collect();
    let s = v.call("GET", "/api/v1/vm.status", "")?;
    let r = &s["reset"];
    if r["guest_failed_checks"].as_u64() != Some(0) || r["guest_checks"].as_u64().unwrap_or(0) == 0
    {
        return Err(BenchError::Failed(format!(
            "the guest's checks failed or did not run: {r}"
        )));
    }
    let floor = exit_us + copy;
    Ok(vec![
        Sample::new("guest-driven resets/s, 64 pages", "/s", rate).vs(1e6 / floor),
        Sample::new("reset latency p50", "µs", median(&lat)).vs(floor),
        Sample::new("reset latency p99", "µs", quantile(&lat, 0.99)).vs(floor),
        Sample::new("reset latency max", "µs", quantile(&lat, 1.0)).vs(floor),
    ])
}
