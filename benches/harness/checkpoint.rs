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

use vmhop::checkpoint::create::{
    checkpoint_tuned, CheckpointReport, CheckpointRequest, PauseTuning,
};
use vmhop::checkpoint::format::{CheckpointWriter, FormatError, Header, Kind};
use vmhop::memory::PAGE_SIZE;

use super::fixture::{
    boot, check_alive, dirty_guest, empty_dir, failed, flag, mib_per_s, ms, new_vm_backed,
    pause_baseline, random_bytes, reset_rss_peak, rewrite_working_set, rss_now, rss_peak,
    scratch_dir, share, sync_disks, timed, warm_up, wss_bytes, BenchVm, PACED_RATE,
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
        candidates(),
    ]
}

/// Writes `bytes` bytes of `data` (repeated) into a new file `path`, then
/// fsyncs it; returns the time from the create to the end of the fsync.
pub(super) fn plain_write(path: &Path, bytes: u64, data: &[u8]) -> Result<Duration, BenchError> {
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
    take_tuned(vm, dir, full, PauseTuning::default())
}

/// [`take`] with a chosen way of bounding the pause.
fn take_tuned(
    vm: &BenchVm,
    dir: &Path,
    full: bool,
    tuning: PauseTuning,
) -> Result<CheckpointReport, BenchError> {
    let want = if full { Kind::Full } else { Kind::Incremental };
    let req = CheckpointRequest {
        dir: dir.to_path_buf(),
        full,
        stop_after: false,
    };
    let mut chain = vm.chain.lock().unwrap_or_else(|e| e.into_inner());
    let r = checkpoint_tuned(vm, &mut chain, &req, tuning).map_err(failed(format!(
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
            reset_rss_peak()?;
            let rss_before = rss_now()?;
            let r = take(&vm, dir.path(), true)?;
            let extra = rss_peak()?.saturating_sub(rss_before);
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
                Sample::new("phase: pre-copy", "ms", r.phases.precopy_ms),
                Sample::new("phase: pause", "ms", r.phases.pause_ms),
                Sample::new("phase: write protected pages", "ms", r.phases.drain_ms),
                Sample::new("phase: complete (staged pages, fsync)", "ms", r.phases.complete_ms),
                Sample::new("peak extra memory (RSS)", "MiB", extra as f64 / (1u64 << 20) as f64),
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

/// How an incremental measurement's guest runs and is checkpointed.
#[derive(Clone, Copy)]
struct Setup {
    /// Guest pages/s (None: unthrottled, "hot").
    rate: Option<u64>,
    hugepages: bool,
    tuning: PauseTuning,
}

/// What one incremental measurement gives.
struct Incremental {
    report: CheckpointReport,
    /// Bare pause + resume round trip of the same VM, µs.
    rtt: f64,
    /// Guest pages/s over a window just before the incremental.
    speed_before: f64,
    /// Guest pages/s while the incremental ran, from its start until it
    /// returned (written out and fsynced).
    speed_during: f64,
    /// Peak resident memory the incremental added to the process, MiB.
    extra_mib: f64,
}

/// Guest pages written per second over [`SPEED_WINDOW`].
fn guest_speed(vm: &BenchVm) -> f64 {
    let (p0, t0) = (vm.progress(), std::time::Instant::now());
    std::thread::sleep(SPEED_WINDOW);
    vm.progress().saturating_sub(p0) as f64 / t0.elapsed().as_secs_f64()
}

/// Window over which the guest's speed before a checkpoint is measured.
const SPEED_WINDOW: Duration = Duration::from_millis(200);

/// One incremental measurement: boot a guest over `wss` bytes, take a full
/// checkpoint, wait until the guest rewrote its whole working set, measure
/// its speed, take an incremental one.
fn one_incremental(ctx: &RunCtx, wss: u64, setup: Setup) -> Result<Incremental, BenchError> {
    let dir = scratch_dir()?;
    let vm = new_vm_backed(
        ctx,
        "bench-incremental",
        dirty_guest(wss, setup.rate),
        false,
        setup.hugepages,
    )?;
    if setup.rate.is_none() {
        warm_up(&vm)?;
    }
    let rtt = pause_baseline(ctx, &vm)?;
    let first = take_tuned(&vm, dir.path(), true, setup.tuning)?;
    rewrite_working_set(&vm)?;
    sync_disks();
    let speed_before = guest_speed(&vm);
    reset_rss_peak()?;
    let rss_before = rss_now()?;
    let (p0, t0) = (vm.progress(), std::time::Instant::now());
    let report = take_tuned(&vm, dir.path(), false, setup.tuning)?;
    let extra_mib = rss_peak()?.saturating_sub(rss_before) as f64 / (1u64 << 20) as f64;
    let speed_during = vm.progress().saturating_sub(p0) as f64 / t0.elapsed().as_secs_f64();
    if report.parent != Some(first.id) {
        return Err(BenchError::Failed(format!(
            "the incremental checkpoint {} has parent {:?}, not the full one {}",
            report.id, report.parent, first.id
        )));
    }
    drop(vm);
    drop(dir);
    Ok(Incremental {
        report,
        rtt,
        speed_before,
        speed_during,
        extra_mib,
    })
}

/// The metrics of one incremental, names prefixed with `label`.
fn incremental_samples(label: &str, m: &Incremental) -> Vec<Sample> {
    let r = &m.report;
    let mut out = vec![
        Sample::new(format!("{label}: pause"), "µs", r.downtime_us as f64).vs(m.rtt),
        Sample::new(format!("{label}: total"), "ms", r.total_ms),
        Sample::new(
            format!("{label}: peak extra memory (RSS)"),
            "MiB",
            m.extra_mib,
        ),
        Sample::new(
            format!("{label}: guest speed during, vs before"),
            "pages/s",
            m.speed_during,
        )
        .vs(m.speed_before),
        Sample::new(
            format!("{label}: throttle max"),
            "%",
            r.throttle_max_percent as f64,
        ),
        Sample::new(
            format!("{label}: pages written"),
            "pages",
            r.pages_written as f64,
        ),
        Sample::new(
            format!("{label}: pages in pause"),
            "pages",
            r.pages_in_pause as f64,
        ),
        Sample::new(
            format!("{label}: pages protected"),
            "pages",
            r.pages_protected as f64,
        ),
        Sample::new(
            format!("{label}: copy-on-write faults"),
            "pages",
            r.cow_faults as f64,
        ),
        Sample::new(format!("{label}: rounds"), "rounds", r.rounds as f64),
        Sample::new(format!("{label}: converged"), "yes=1", flag(r.converged)),
    ];
    out.extend(super::fixture::pause_phases(
        &format!("{label}: pause: "),
        &r.pause_breakdown,
    ));
    out
}

/// `checkpoint-incremental-{pct}pct`: see [`one_incremental`]; a hot guest
/// (unthrottled: it keeps rewriting its working set during the checkpoint)
/// and a paced one (rewrites it [`PACED_SWEEPS_PER_S`] times a second).
pub fn incremental(name: &'static str, about: &'static str, pct: u64) -> Scenario {
    Scenario::new(name, about, move |ctx: &RunCtx| {
        let wss = share(ctx, pct, 100);
        let paced_rate = (wss / PAGE_SIZE * PACED_SWEEPS_PER_S).max(1);
        let tuning = PauseTuning::default();
        let mut out = Vec::new();
        for (label, rate, hugepages) in [
            ("hot", None, false),
            ("hot, huge pages", None, true),
            ("paced", Some(paced_rate), false),
        ] {
            let setup = Setup {
                rate,
                hugepages,
                tuning,
            };
            out.extend(incremental_samples(
                label,
                &one_incremental(ctx, wss, setup)?,
            ));
        }
        Ok(out)
    })
}

/// `checkpoint-pause-candidates`: the ways of bounding the pause of an
/// incremental checkpoint of a hot guest, side by side.
pub fn candidates() -> Scenario {
    Scenario::new(
        "checkpoint-pause-candidates",
        "incremental checkpoint of a hot guest (wss 1% and 10% of 1 GiB, unthrottled, 2 vCPUs), 4 KiB pages and huge pages, bounding the pause by: copying the dirty set in the pause (copy), throttling the vCPUs (throttle), write-protecting it (protect, copy-on-write after the resume), or both (protect+throttle, the default): pause µs (baseline: bare pause+resume), guest speed during the checkpoint vs just before",
        |ctx: &RunCtx| {
            let mut out = Vec::new();
            for pct in [1, 10] {
                let wss = share(ctx, pct, 100);
                for (name, protect, throttle, huge) in [
                    ("copy", false, false, false),
                    ("throttle", false, true, false),
                    ("protect", true, false, false),
                    ("protect+throttle", true, true, false),
                    ("huge: copy", false, false, true),
                    ("huge: protect", true, false, true),
                    ("huge: protect+throttle", true, true, true),
                ] {
                    let setup = Setup {
                        rate: None,
                        hugepages: huge,
                        tuning: PauseTuning {
                            protect_in_pause: protect,
                            auto_converge: throttle,
                        },
                    };
                    let m = one_incremental(ctx, wss, setup)?;
                    let label = format!("{pct}%, {name}");
                    let all = incremental_samples(&label, &m);
                    // The figures that tell the candidates apart.
                    out.extend(all.into_iter().filter(|s| {
                        s.metric.ends_with(": pause")
                            || [
                                "guest speed",
                                "throttle max",
                                "pages in pause",
                                "peak extra memory",
                                "copy-on-write faults",
                                "pause: copy",
                                "pause: fetch",
                            ]
                            .iter()
                            .any(|k| s.metric.contains(k))
                    }));
                }
            }
            Ok(out)
        },
    )
}
