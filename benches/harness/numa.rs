//! Scenarios that move a running VM's memory between host NUMA nodes with
//! `numa_migrate`, in its three modes, against plain host code doing the
//! nearest equivalent on as many bytes: a memcpy between two populated
//! buffers (stop-copy), a bare pause + resume (live), move_pages in the
//! same batches on populated anonymous memory (kernel).
//!
//! These machines have one NUMA node, so every move targets the node the
//! memory is on: the copy modes still copy every page into new memory bound
//! to it and switch the slots (the full cost of a move, minus the remote
//! bandwidth), while kernel mode is the kernel's walk of pages it finds
//! already in place — the same for vmhop and its baseline. Each run boots
//! fresh VMs and shuts them down before it returns.

use std::time::{Duration, Instant};

use vmhop::host::policy::{bind, move_pages_to};
use vmhop::memory::{Backing, Mapping, PAGE_SIZE};
use vmhop::numa::{
    numa_migrate, placement_of, Mode, NumaMigrateReport, NumaMigrateRequest, KERNEL_BATCH_PAGES,
};

use super::fixture::{
    boot, check_alive, dirty_guest, failed, fill_working_set, flag, ms, pause_baseline, timed, us,
    vm_bytes, warm_up, wss_bytes, BenchVm, PACED_RATE,
};
use super::{median, BenchError, RunCtx, Sample, Scenario, Stalls, YES_1};

/// Longest quiet window the guest-stall baseline waits through (the move's
/// own length, up to this).
const MAX_QUIET_WINDOW: Duration = Duration::from_secs(10);

/// What the host did around one move: its stall rate just before it (a
/// spinning thread per CPU, as the header's probe), and the guest's
/// longest stall over a window as long as the move right after it, with
/// nothing moving: the floor the host itself sets, which no design of the
/// move goes below.
struct Surroundings {
    host: Stalls,
    quiet_stall_us: Option<u64>,
}

/// Probes the host (before the move).
fn probe_host(ctx: &RunCtx) -> Stalls {
    Stalls::probe(ctx.window(super::STALL_PROBE))
}

/// The guest's longest stall over `len` (at most [`MAX_QUIET_WINDOW`])
/// with nothing moving.
fn quiet_stall(vm: &BenchVm, len: Duration) -> Option<u64> {
    vmhop::guest::reset_longest_stall(vm);
    std::thread::sleep(len.min(MAX_QUIET_WINDOW));
    vmhop::guest::longest_stall_us(vm)
}

/// The scenarios of this module, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        stop_copy(),
        live(
            "numa-live-idle",
            "numa_migrate live (chunk by chunk) of a 1 GiB VM running builtin:idle (900 MiB filled with random bytes from the host): longest real pause µs (baseline: bare vm.pause()+vm.resume()), whether it was within the 1 ms budget (and how many pauses were not), all pauses, total ms, convergence, peak extra memory, longest pause's phases",
            Guest::Idle,
        ),
        live(
            "numa-live-10k",
            "numa_migrate live of a 1 GiB VM running builtin:dirty wss=900M random-filled at 10000 pages/s: as numa-live-idle",
            Guest::Paced,
        ),
        live(
            "numa-live-fast",
            "numa_migrate live of a 1 GiB VM running builtin:dirty wss=900M random-filled, unthrottled: as numa-live-idle",
            Guest::Fast,
        ),
        kernel(),
    ]
}

/// Which guest a live scenario runs.
#[derive(Clone, Copy)]
enum Guest {
    /// builtin:idle, working set filled from the host.
    Idle,
    /// builtin:dirty at [`PACED_RATE`].
    Paced,
    /// builtin:dirty unthrottled (warmed up first).
    Fast,
}

/// Boots the VM of a scenario.
fn boot_for(ctx: &RunCtx, guest: Guest) -> Result<BenchVm, BenchError> {
    let wss = wss_bytes(ctx);
    match guest {
        Guest::Idle => {
            let vm = boot(ctx, "bench-numa", vmhop::guest::GuestSpec::Idle)?;
            fill_working_set(&vm, wss)?;
            Ok(vm)
        }
        Guest::Paced => boot(ctx, "bench-numa", dirty_guest(wss, Some(PACED_RATE))),
        Guest::Fast => {
            let vm = boot(ctx, "bench-numa", dirty_guest(wss, None))?;
            warm_up(&vm)?;
            Ok(vm)
        }
    }
}

/// Moves guest node 0 of `vm` to the host node it is on, in `mode`.
fn migrate(vm: &BenchVm, mode: Mode) -> Result<NumaMigrateReport, BenchError> {
    let to_node = vm.host_nodes().first().copied().unwrap_or(0);
    let req = NumaMigrateRequest {
        to_node,
        guest_node: Some(0),
        mode,
        max_downtime_ms: None,
    };
    // The guest's own stall over the move, as the service measures it.
    vmhop::guest::reset_longest_stall(vm);
    let mut r = numa_migrate(vm, &req, &Default::default()).map_err(failed(format!(
        "numa_migrate {mode:?} of guest node 0 to host node {to_node}"
    )))?;
    r.guest_stall_us = vmhop::guest::longest_stall_us(vm);
    check_alive(vm)?;
    Ok(r)
}

/// A populated anonymous mapping of `len` bytes bound to host node `node`,
/// as guest memory is.
fn populated(len: u64, node: u32) -> Result<Mapping, BenchError> {
    let m = Mapping::new(len as usize, Backing::Anonymous)
        .map_err(failed(format!("mapping {} MiB", len >> 20)))?;
    bind(m.as_ptr(), m.len(), node, false).map_err(failed(format!(
        "binding the baseline buffer to node {node}"
    )))?;
    m.populate()
        .map_err(failed(format!("populating {} MiB", len >> 20)))?;
    Ok(m)
}

/// The baseline of stop-copy: one plain single-threaded memcpy of `len`
/// bytes between two buffers allocated and faulted in before timing.
fn memcpy_baseline(len: u64, node: u32) -> Result<Duration, BenchError> {
    let src = populated(len, node)?;
    let dst = populated(len, node)?;
    // SAFETY: both mappings are live for `len` bytes until the end of this
    // function, distinct (so the slices do not overlap), and only this
    // thread uses them.
    let (s, d) = unsafe {
        (
            std::slice::from_raw_parts(src.as_ptr(), src.len()),
            std::slice::from_raw_parts_mut(dst.as_ptr(), dst.len()),
        )
    };
    let ((), t) = timed(|| d.copy_from_slice(s));
    std::hint::black_box(&d[..PAGE_SIZE as usize]);
    Ok(t)
}

/// `numa-stop-copy`.
fn stop_copy() -> Scenario {
    Scenario::new(
        "numa-stop-copy",
        "numa_migrate stop-copy of a 1 GiB VM (builtin:dirty wss=900M random-filled, 10000 pages/s): downtime µs and its copy phase against a plain single-threaded memcpy of 1 GiB between two populated buffers; total ms; pause phases",
        |ctx: &RunCtx| {
            let len = vm_bytes(ctx);
            let node = vmhop::host::topology::current_node();
            let base_first = ctx.run.is_multiple_of(2);
            let before = if base_first { Some(memcpy_baseline(len, node)?) } else { None };
            let r = {
                let vm = boot_for(ctx, Guest::Paced)?;
                migrate(&vm, Mode::StopCopy)?
            };
            let host = probe_host(ctx);
            let base = match before {
                Some(b) => b,
                None => memcpy_baseline(len, node)?,
            };
            let mut out = vec![
                Sample::new("downtime", "µs", r.downtime_us as f64).vs(us(base)),
                Sample::new("pause: copy", "µs", r.longest_pause.copy_us as f64).vs(us(base)),
                Sample::new("total", "ms", r.total_ms),
                Sample::new("pages moved", "pages", r.pages_moved as f64),
            ];
            out.extend(guest_stall(&r, &Surroundings { host, quiet_stall_us: None }));
            out.extend(
                super::fixture::pause_phases("pause: ", &r.longest_pause)
                    .into_iter()
                    .filter(|s| s.metric != "pause: copy"),
            );
            Ok(out)
        },
    )
}

/// `numa-live-*`.
fn live(name: &'static str, about: &'static str, guest: Guest) -> Scenario {
    Scenario::new(name, about, move |ctx: &RunCtx| {
        let vm = boot_for(ctx, guest)?;
        let rtt = pause_baseline(ctx, &vm)?;
        let host = probe_host(ctx);
        let r = migrate(&vm, Mode::Live)?;
        let quiet_stall_us = quiet_stall(&vm, Duration::from_secs_f64(r.total_ms / 1e3));
        drop(vm);
        let mut out = guest_stall(
            &r,
            &Surroundings {
                host,
                quiet_stall_us,
            },
        );
        out.extend([
            Sample::new("longest pause", "µs", r.downtime_us as f64).vs(rtt),
            Sample::new("all pauses", "µs", r.paused_total_us as f64),
            Sample::new("pauses", "pauses", r.pauses as f64),
            Sample::new("total", "ms", r.total_ms),
            Sample::new("rounds", "rounds", r.rounds as f64),
            Sample::new(
                "longest pause within budget",
                YES_1,
                flag(r.pauses_over_budget == 0),
            ),
            Sample::new("pauses over budget", "pauses", r.pauses_over_budget as f64),
            Sample::new("converged", YES_1, flag(r.converged)),
            Sample::new("fallback chunks", "chunks", r.fallback_chunks as f64),
            Sample::new(
                "peak extra memory",
                "MiB",
                r.peak_extra_bytes as f64 / (1u64 << 20) as f64,
            ),
        ]);
        out.extend(super::fixture::pause_phases(
            "longest pause: ",
            &r.longest_pause,
        ));
        Ok(out)
    })
}

/// The guest's longest stall during a move (builtin:dirty guests only),
/// against the quiet window's where there is one, and whether it was
/// within 1 ms: the figure that compares the modes; then the host's stall
/// rate around it. All listed run by run under the table.
fn guest_stall(r: &NumaMigrateReport, around: &Surroundings) -> Vec<Sample> {
    let mut out = Vec::new();
    if let Some(s) = r.guest_stall_us {
        let felt = Sample::new("guest's longest stall", "µs", s as f64).per_run();
        out.push(match around.quiet_stall_us {
            Some(q) => felt.vs(q as f64),
            None => felt,
        });
        out.push(Sample::new("guest's stall within 1 ms", YES_1, flag(s <= 1000)).per_run());
    }
    if let Some(q) = around.quiet_stall_us {
        out.push(Sample::new("quiet window's stall within 1 ms", YES_1, flag(q <= 1000)).per_run());
    }
    out.push(
        Sample::new(
            "host stalls over 1 ms",
            "/s per CPU",
            around.host.over_1ms_per_s,
        )
        .per_run(),
    );
    out.push(Sample::new("host's longest stall", "µs", around.host.longest_us).per_run());
    out
}

/// What the move_pages baseline measured.
struct KernelBaseline {
    total: Duration,
    median_batch_us: f64,
    max_batch_us: f64,
}

/// move_pages of `len` bytes of populated anonymous memory to `node`, in
/// batches of [`KERNEL_BATCH_PAGES`] as kernel mode does.
fn move_pages_baseline(len: u64, node: u32) -> Result<KernelBaseline, BenchError> {
    let m = populated(len, node)?;
    let total_pages = m.len() / PAGE_SIZE as usize;
    let mut batch: Vec<*mut u8> = Vec::with_capacity(KERNEL_BATCH_PAGES);
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while i < total_pages {
        let k = KERNEL_BATCH_PAGES.min(total_pages - i);
        batch.clear();
        batch.extend((i..i + k).map(|p| m.as_ptr().wrapping_add(p * PAGE_SIZE as usize)));
        let t = Instant::now();
        move_pages_to(&batch, node).map_err(failed("baseline move_pages"))?;
        lat.push(us(t.elapsed()));
        i += k;
    }
    let total = start.elapsed();
    Ok(KernelBaseline {
        total,
        median_batch_us: median(&lat),
        max_batch_us: lat.iter().copied().fold(0.0, f64::max),
    })
}

/// `numa-kernel`.
fn kernel() -> Scenario {
    Scenario::new(
        "numa-kernel",
        "numa_migrate kernel (move_pages in batches of 2048 pages while the guest runs) of a 1 GiB VM (builtin:dirty wss=900M random-filled, 10000 pages/s): total ms, and total less two placement queries (numa_migrate's before/after), slowest and median batch µs; baseline: move_pages of 1 GiB of populated anonymous memory in the same batches, no VM",
        |ctx: &RunCtx| {
            let len = vm_bytes(ctx);
            let node = vmhop::host::topology::current_node();
            let base_first = ctx.run.is_multiple_of(2);
            let before = if base_first { Some(move_pages_baseline(len, node)?) } else { None };
            let (r, query, around) = {
                let vm = boot_for(ctx, Guest::Paced)?;
                let host = probe_host(ctx);
                let r = migrate(&vm, Mode::Kernel)?;
                let quiet_stall_us =
                    quiet_stall(&vm, Duration::from_secs_f64(r.total_ms / 1e3));
                // numa_migrate queries placement before and after; time one
                // such query to separate the move from the bookkeeping.
                let (q, d) = timed(|| placement_of(&vm, &[0], 1));
                q.map_err(|e| BenchError::Failed(format!("placement query: {e}")))?;
                (r, d, Surroundings { host, quiet_stall_us })
            };
            let base = match before {
                Some(b) => b,
                None => move_pages_baseline(len, node)?,
            };
            let b = r.batches.clone().ok_or_else(|| {
                BenchError::Failed("kernel-mode numa_migrate reported no batches".into())
            })?;
            let mut out = guest_stall(&r, &around);
            out.extend([
                Sample::new("total", "ms", r.total_ms).vs(ms(base.total)),
                Sample::new("total less 2 placement queries", "ms", r.total_ms - 2.0 * ms(query))
                    .vs(ms(base.total)),
                Sample::new("placement query", "ms", ms(query)),
                Sample::new("slowest batch", "µs", b.max_us as f64).vs(base.max_batch_us),
                Sample::new("median batch", "µs", b.median_us as f64).vs(base.median_batch_us),
                Sample::new("batches", "calls", b.count as f64),
                Sample::new("pauses", "pauses", r.pauses as f64),
            ]);
            Ok(out)
        },
    )
}
