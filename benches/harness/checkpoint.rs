//! Scenarios that take checkpoints of a running VM: a full checkpoint of a
//! 1 GiB guest against a plain write + fsync of the same number of bytes to
//! the same disk, and incremental checkpoints after the guest rewrote 1% or
//! 10% of its memory, whose pause is compared to a bare pause + resume.
//!
//! Each run boots fresh VMs and writes into a fresh directory under
//! `/var/tmp` that is removed before the run ends; the VMs are shut down
//! before the run returns (see `fixture::BenchVm`).

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use vmhop::checkpoint::create::{checkpoint, CheckpointReport, CheckpointRequest};
use vmhop::checkpoint::format::{CheckpointWriter, FormatError, Header, Kind};
use vmhop::memory::PAGE_SIZE;

use super::fixture::{
    boot, check_alive, dirty_guest, empty_dir, failed, flag, mib_per_s, ms, pause_baseline,
    random_bytes, rewrite_working_set, scratch_dir, share, sync_disks, timed, warm_up, wss_bytes,
    BenchVm, PACED_RATE,
};
use super::{BenchError, RunCtx, Sample, Scenario};

/// Block the write baseline writes at a time.
const WRITE_BLOCK: usize = 4 << 20;
/// A paced incremental guest rewrites its working set this often, so that
/// the wait for "the whole working set is dirty again" stays short while
/// the guest is still far slower than an unthrottled one.
const PACED_SWEEPS_PER_S: u64 = 4;

/// The scenarios of this module, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        full(),
        incremental(
            "checkpoint-incremental-1pct",
            "incremental checkpoint after the guest rewrote 1% of its 1 GiB (wss = 1%, random-filled, 2 vCPUs), with the guest unthrottled (hot) and paced to 4 rewrites/s: pause µs, total ms, pause phases; baseline of the pause: a bare vm.pause()+vm.resume() of the same VM",
            1,
        ),
        incremental(
            "checkpoint-incremental-10pct",
            "incremental checkpoint after the guest rewrote 10% of its 1 GiB (wss = 10%), hot and paced as for 1%: pause µs, total ms, pause phases; baseline of the pause: a bare vm.pause()+vm.resume() of the same VM",
            10,
        ),
    ]
}

/// Writes `bytes` bytes of `data` (repeated) into a new file `path`, then
/// fsyncs it; returns the time from the create to the end of the fsync.
fn plain_write(path: &Path, bytes: u64, data: &[u8]) -> Result<Duration, BenchError> {
    let what = format!(
        "baseline write of {} MiB to {}",
        bytes >> 20,
        path.display()
    );
    sync_disks();
    let (r, d) = timed(|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(data.len() as u64) as usize;
            f.write_all(&data[..n])?;
            left -= n as u64;
        }
        f.sync_all()
    });
    r.map_err(failed(what))?;
    Ok(d)
}

/// The file format's share of a full checkpoint: vmhop's checkpoint writer
/// alone, no VM, writing `pages` pages of `data` (repeated) at successive
/// guest addresses into `dir`, through `finish` (fsync, rename, directory
/// fsync); returns the time from `create` to the end of `finish`.
fn writer_alone(dir: &Path, pages: u64, data: &[u8]) -> Result<Duration, BenchError> {
    let what = format!("checkpoint writer alone into {}", dir.display());
    sync_disks();
    let (r, d) = timed(|| -> Result<(), FormatError> {
        let mut w = CheckpointWriter::create(dir, Header::full(1))?;
        let block_pages = data.len() as u64 / PAGE_SIZE;
        let mut page = 0;
        while page < pages {
            let n = (pages - page).min(block_pages);
            w.add_pages(page * PAGE_SIZE, &data[..(n * PAGE_SIZE) as usize])?;
            page += n;
        }
        w.finish().map(|_| ())
    });
    r.map_err(failed(what))?;
    Ok(d)
}

/// Takes a checkpoint of `vm` into `dir`; fails unless it is of `kind`.
fn take(vm: &BenchVm, dir: &Path, full: bool) -> Result<CheckpointReport, BenchError> {
    let want = if full { Kind::Full } else { Kind::Incremental };
    let req = CheckpointRequest {
        dir: dir.to_path_buf(),
        full,
        stop_after: false,
    };
    let r = checkpoint(vm, &req).map_err(failed(format!(
        "{want:?} checkpoint into {}",
        dir.display()
    )))?;
    if r.kind != want {
        return Err(BenchError::Failed(format!(
            "asked for a {want:?} checkpoint, got a {:?} one (id {}, parent {:?})",
            r.kind, r.id, r.parent
        )));
    }
    check_alive(vm)?;
    Ok(r)
}

/// `checkpoint-full`: a full checkpoint of a 1 GiB VM whose guest keeps
/// writing at 10 000 pages/s, against a plain write + fsync of as many
/// bytes into a fresh file of the same directory.
pub fn full() -> Scenario {
    Scenario::new(
        "checkpoint-full",
        "full checkpoint of a 1 GiB VM (2 vCPUs, builtin:dirty wss=900M random-filled, 10000 pages/s) into a fresh dir in /var/tmp: pause µs (baseline: bare vm.pause()+vm.resume()), total ms and MiB/s (baseline: plain buffered write + fsync of the same byte count of random data into a fresh file of the same dir), vmhop's checkpoint writer alone on as many random pages (same baseline), pause phases",
        |ctx: &RunCtx| {
            let dir = scratch_dir()?;
            let vm = boot(ctx, "bench-checkpoint", dirty_guest(wss_bytes(ctx), Some(PACED_RATE)))?;
            let rtt = pause_baseline(ctx, &vm)?;
            sync_disks();
            let r = take(&vm, dir.path(), true)?;
            drop(vm);
            // Free the disk and the page cache of the checkpoint before the
            // baseline writes the same amount next to it.
            empty_dir(dir.path())?;
            let data = random_bytes(WRITE_BLOCK, 0xc0ff_ee00 + ctx.run as u64);
            let plain_first = ctx.run.is_multiple_of(2);
            let mut plain = Duration::ZERO;
            let mut alone = Duration::ZERO;
            for step in 0..2 {
                if (step == 0) == plain_first {
                    plain = plain_write(&dir.path().join("plain-write"), r.bytes_written, &data)?;
                } else {
                    alone = writer_alone(dir.path(), r.pages_written, &data)?;
                }
                empty_dir(dir.path())?;
            }
            let total = Duration::from_secs_f64(r.total_ms / 1e3);
            let mut out = vec![
                Sample::new("pause", "µs", r.downtime_us as f64).vs(rtt),
                Sample::new("total", "ms", r.total_ms).vs(ms(plain)),
                Sample::new("write rate", "MiB/s", mib_per_s(r.bytes_written, total))
                    .vs(mib_per_s(r.bytes_written, plain)),
                Sample::new("part: checkpoint writer alone, no VM", "ms", ms(alone)).vs(ms(plain)),
                Sample::new("file size", "MiB", r.bytes_written as f64 / (1u64 << 20) as f64),
                Sample::new("pages in pause", "pages", r.pages_in_pause as f64),
                Sample::new("rounds", "rounds", r.rounds as f64),
                Sample::new("converged", "yes=1", flag(r.converged)),
            ];
            out.extend(super::fixture::pause_phases("pause: ", &r.pause_breakdown));
            Ok(out)
        },
    )
}

/// One incremental measurement: boot a guest over `wss` bytes at `rate`,
/// take a full checkpoint, wait until the guest rewrote its whole working
/// set, take an incremental one. Returns the incremental's report and the
/// bare pause + resume round trip of the same VM, µs.
fn one_incremental(
    ctx: &RunCtx,
    wss: u64,
    rate: Option<u64>,
) -> Result<(CheckpointReport, f64), BenchError> {
    let dir = scratch_dir()?;
    let vm = boot(ctx, "bench-incremental", dirty_guest(wss, rate))?;
    if rate.is_none() {
        warm_up(&vm)?;
    }
    let rtt = pause_baseline(ctx, &vm)?;
    let first = take(&vm, dir.path(), true)?;
    rewrite_working_set(&vm)?;
    sync_disks();
    let r = take(&vm, dir.path(), false)?;
    if r.parent != Some(first.id) {
        return Err(BenchError::Failed(format!(
            "the incremental checkpoint {} has parent {:?}, not the full one {}",
            r.id, r.parent, first.id
        )));
    }
    drop(vm);
    drop(dir);
    Ok((r, rtt))
}

/// `checkpoint-incremental-{pct}pct`: see [`one_incremental`]; a hot guest
/// (unthrottled: it keeps rewriting its working set during the checkpoint)
/// and a paced one (rewrites it [`PACED_SWEEPS_PER_S`] times a second).
pub fn incremental(name: &'static str, about: &'static str, pct: u64) -> Scenario {
    Scenario::new(name, about, move |ctx: &RunCtx| {
        let wss = share(ctx, pct, 100);
        let paced_rate = (wss / PAGE_SIZE * PACED_SWEEPS_PER_S).max(1);
        let mut out = Vec::new();
        for (label, rate) in [("hot", None), ("paced", Some(paced_rate))] {
            let (r, rtt) = one_incremental(ctx, wss, rate)?;
            out.push(Sample::new(format!("{label}: pause"), "µs", r.downtime_us as f64).vs(rtt));
            out.push(Sample::new(format!("{label}: total"), "ms", r.total_ms));
            out.push(Sample::new(
                format!("{label}: pages written"),
                "pages",
                r.pages_written as f64,
            ));
            out.push(Sample::new(
                format!("{label}: pages in pause"),
                "pages",
                r.pages_in_pause as f64,
            ));
            out.push(Sample::new(
                format!("{label}: rounds"),
                "rounds",
                r.rounds as f64,
            ));
            out.push(Sample::new(
                format!("{label}: converged"),
                "yes=1",
                flag(r.converged),
            ));
            out.extend(super::fixture::pause_phases(
                &format!("{label}: pause: "),
                &r.pause_breakdown,
            ));
        }
        Ok(out)
    })
}
