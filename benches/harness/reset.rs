//! `reset-64`: a reset in place (the API's `vm.reset` path, called in
//! process) of a VM whose memory differs from the checkpoint in exactly 64
//! pages, against an in-run baseline of what a reset cannot avoid: a bare
//! pause + resume round trip of the same VM plus a memcpy of 64 pages.
//!
//! The guest is `builtin:idle`, so that the only pages written since the
//! checkpoint are the 64 this scenario writes, device-style (marked for the
//! dirty log, as a device's DMA is), spread over guest memory. The reset's
//! downtime includes the dirty-log fetch of all memory and loading the
//! vCPU and device state; the guest-driven reset device (no API round trip,
//! a port-I/O exit instead) does not exist yet.

use vmhop::api::checkpoint::CheckpointTarget;
use vmhop::checkpoint::create::{checkpoint, CheckpointRequest};
use vmhop::checkpoint::reset::{arm, reset};
use vmhop::guest::GuestSpec;
use vmhop::memory::PAGE_SIZE;

use super::fixture::{boot, failed, pause_baseline, scratch_dir, vm_bytes};
use super::{median, RunCtx, Sample, Scenario};

/// Pages dirtied before each reset.
const DIRTIED: u64 = 64;
/// Resets per run (the median is reported).
const RESETS: usize = 50;

/// The scenarios of this module.
pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new(
        "reset-64",
        "reset in place with 64 pages dirtied (median downtime of 50) vs a bare pause+resume round trip plus a memcpy of 64 pages",
        run,
    )]
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
    reset(&b.vm, &base, &mut chain, true).map_err(failed("first reset"))?;
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
        let r = reset(&b.vm, &base, &mut chain, false).map_err(failed("reset"))?;
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
    // memcpy of 64 scattered, faulted pages.
    let page = PAGE_SIZE as usize;
    let src = vec![1u8; page * DIRTIED as usize * 16];
    let mut dst = vec![0u8; page * DIRTIED as usize * 16];
    let mut copies = Vec::new();
    for _ in 0..RESETS {
        let t = std::time::Instant::now();
        for k in 0..DIRTIED as usize {
            let o = k * 16 * page;
            dst[o..o + page].copy_from_slice(&src[o..o + page]);
        }
        std::hint::black_box(&dst);
        copies.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let copy = median(&copies);
    Ok(vec![Sample::new(
        "downtime, 64 pages",
        "µs",
        median(&downtimes),
    )
    .vs(round_trip + copy)])
}
