//! Scenarios that run the builtin guests: how fast a guest dirties memory,
//! with and without KVM dirty logging, and what a pause + resume round trip
//! of its vCPUs costs.
//!
//! Each run boots fresh VMs through the library (`vmhop::vmm::Vm`), so runs
//! are independent; the baselines are plain host code measured in the same
//! run: host threads writing the guest's pattern over memory of the same
//! backing, and the vCPUs' command protocol spoken between plain threads.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmhop::devices::Console;
use vmhop::guest::program::{block, COUNTER_OFFSET, TAG_OFFSET};
use vmhop::guest::setup::BLOCKS_ADDR;
use vmhop::guest::GuestSpec;
use vmhop::memory::layout::DEFAULT_CHUNK_SIZE;
use vmhop::memory::{Backing, Mapping, PAGE_SIZE};
use vmhop::vmm::{NodeConfig, Vm, VmConfig};

use super::{median, quantile, vm_step, wait_until, BenchError, Sample, Scenario};

/// Guest memory of every VM these scenarios boot.
const VM_BYTES: u64 = 1 << 30;
/// Working set of the dirty guest in the dirty-rate scenario (and the size
/// of the host baseline's buffer: the same bytes).
const RATE_WSS: u64 = 256 << 20;
/// How long a rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// How often the dirty log is fetched while logging, as a migration would.
const FETCH_INTERVAL: Duration = Duration::from_millis(50);
/// Working set of the dirty guest in the pause scenario: small, so that its
/// first sweep (which faults memory in) is over quickly.
const PAUSE_WSS: u64 = 64 << 20;
/// Pause + resume round trips per run and configuration.
const PAUSE_ITERATIONS: usize = 200;
/// How long the guest runs between two pauses, so that every pause finds
/// the vCPUs inside KVM_RUN as a migration's pause would.
const PAUSE_GAP: Duration = Duration::from_micros(500);
/// Longest a guest may take to finish its first sweep. Generous: the first
/// touch of each page is slow under shadow paging, and a loaded machine
/// slower still; it only bounds a hang.
const WARMUP_LIMIT: Duration = Duration::from_secs(60);
/// vCPU counts measured.
const VCPU_COUNTS: [u32; 2] = [1, 2];

/// The scenarios of this module, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    vec![dirty_rate(), pause_resume()]
}

fn config(vcpus: u32, guest: GuestSpec) -> VmConfig {
    VmConfig {
        name: format!("bench-{vcpus}vcpu"),
        vcpus,
        nodes: vec![NodeConfig {
            guest_node: 0,
            size: VM_BYTES,
            host_node: None,
            vcpus: None,
        }],
        guest,
        hugepages: false,
        chunk_size: DEFAULT_CHUNK_SIZE,
        disks: Vec::new(),
        nets: Vec::new(),
        vsock: None,
    }
}

fn dirty_guest(wss: u64) -> GuestSpec {
    GuestSpec::Dirty {
        wss: Some(wss),
        rate: None,
        fill_random: false,
    }
}

/// Boots a running VM.
fn boot(vcpus: u32, guest: GuestSpec) -> Result<Arc<Vm>, BenchError> {
    let what = format!(
        "booting a {} MiB {} VM with {vcpus} vCPU(s)",
        VM_BYTES >> 20,
        guest.kind()
    );
    vmhop::service::build::boot(
        config(vcpus, guest),
        &Console::Stdout,
        false,
        &Default::default(),
    )
    .map(|m| m.vm)
    .map_err(vm_step(what))
}

/// Fails if the guest stopped by itself (a triple fault would make every
/// figure after it meaningless).
fn check_alive(vm: &Vm) -> Result<(), BenchError> {
    match vm.guest_stop_reason() {
        Some(why) => Err(BenchError::Failed(format!("the guest stopped: {why}"))),
        None => Ok(()),
    }
}

/// Waits until every vCPU of a dirty guest has started its second sweep:
/// its whole slice has then been touched once, so host pages and shadow
/// page tables exist and what follows measures steady-state writing.
fn warm_up(vm: &Vm) -> Result<(), BenchError> {
    let vcpus = vm.config().vcpus as u64;
    let done = || {
        let m = vm.memory();
        (0..vcpus).all(|v| {
            m.read_u64(BLOCKS_ADDR + v * block::SIZE + block::SWEEP)
                .unwrap_or(0)
                >= 2
        })
    };
    if !wait_until(WARMUP_LIMIT, || done() || vm.guest_stop_reason().is_some()) {
        return Err(BenchError::Failed(format!(
            "the dirty guest did not finish its first sweep within {WARMUP_LIMIT:?}"
        )));
    }
    check_alive(vm)
}

/// What a guest did over one measuring window.
struct GuestRate {
    /// Pages written per second per vCPU.
    per_vcpu: f64,
    /// Pages the dirty log reported / pages the guest wrote (logging only).
    logged_per_written: Option<f64>,
    /// Time of each fetch of the whole dirty log (logging only).
    fetches: Vec<Duration>,
}

/// Fetches (and so clears and re-protects) the dirty log of every chunk;
/// returns the number of dirty pages.
fn fetch_all(vm: &Vm) -> Result<u64, BenchError> {
    let chunks: Vec<u32> = vm.memory().chunks().map(|c| c.slot).collect();
    let logs = vm
        .fetch_dirty(&chunks)
        .map_err(vm_step("fetching the dirty logs".to_string()))?;
    Ok(logs.values().map(|b| b.count()).sum())
}

/// Measures the guest's writing over `window`. With `fetch_every`, the
/// dirty log must already be on; it is fetched at that interval, as a
/// migration's pre-copy would, and the fetches are timed.
fn measure_guest(
    vm: &Vm,
    window: Duration,
    fetch_every: Option<Duration>,
) -> Result<GuestRate, BenchError> {
    let vcpus = vm.config().vcpus as f64;
    let Some(every) = fetch_every else {
        let (p0, t0) = (vmhop::guest::progress(vm), Instant::now());
        std::thread::sleep(window);
        let (p1, dt) = (vmhop::guest::progress(vm), t0.elapsed());
        check_alive(vm)?;
        return Ok(GuestRate {
            per_vcpu: (p1 - p0) as f64 / dt.as_secs_f64() / vcpus,
            logged_per_written: None,
            fetches: Vec::new(),
        });
    };
    // Empty the log first so that what it reports next was written inside
    // the window.
    fetch_all(vm)?;
    let (p0, t0) = (vmhop::guest::progress(vm), Instant::now());
    let mut logged = 0;
    let mut fetches = Vec::new();
    let mut next = t0;
    loop {
        next += every;
        let last = next >= t0 + window;
        if last {
            next = t0 + window;
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let t = Instant::now();
        logged += fetch_all(vm)?;
        fetches.push(t.elapsed());
        if last {
            break;
        }
    }
    let (p1, dt) = (vmhop::guest::progress(vm), t0.elapsed());
    check_alive(vm)?;
    let written = (p1 - p0) as f64;
    Ok(GuestRate {
        per_vcpu: written / dt.as_secs_f64() / vcpus,
        logged_per_written: Some(logged as f64 / written.max(1.0)),
        fetches,
    })
}

/// The baseline of the dirty rate: `threads` host threads writing the
/// dirty guest's pattern (the page's address at TAG_OFFSET, then the sweep
/// number at COUNTER_OFFSET, then a progress count), each over its own
/// slice of `bytes` of already-faulted anonymous 4 KiB-page memory (the
/// guest's own backing), as the guest's vCPUs split their working set.
/// Pages per second per thread.
fn host_write_rate(bytes: u64, threads: u32, window: Duration) -> Result<f64, BenchError> {
    let m = Mapping::new(bytes as usize, Backing::Anonymous)
        .map_err(|e| BenchError::Failed(format!("host baseline buffer: {e}")))?;
    m.populate()
        .map_err(|e| BenchError::Failed(format!("host baseline buffer: {e}")))?;
    let slice_pages = bytes / PAGE_SIZE / threads as u64;
    // Raw pointers are not Send; the address is, and the mapping outlives
    // the scope.
    let base = m.as_ptr() as usize;
    let t0 = Instant::now();
    let written: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads as u64)
            .map(|i| {
                s.spawn(move || {
                    write_pattern(
                        base + (i * slice_pages * PAGE_SIZE) as usize,
                        slice_pages,
                        t0 + window,
                    )
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    Ok(written as f64 / t0.elapsed().as_secs_f64() / threads as f64)
}

/// Sweeps `pages` pages at address `base` with the dirty guest's pattern
/// until `deadline`; returns the pages written.
fn write_pattern(base: usize, pages: u64, deadline: Instant) -> u64 {
    let mut progress = 0u64;
    let mut sweep = 0u64;
    let mut page = 0;
    loop {
        if page == 0 {
            sweep += 1;
        }
        // Check the clock every 4096 pages only: reading it per page would
        // cost as much as the writes measured.
        let end = (page + 4096).min(pages);
        for p in page..end {
            let addr = base + (p * PAGE_SIZE) as usize;
            // SAFETY: p < pages, and the caller's `pages` pages at `base`
            // lie inside a live mapping that only this thread writes; both
            // offsets are below 16. Volatile, so the compiler keeps one
            // store per word as the guest's `mov`s do.
            unsafe {
                std::ptr::write_volatile((addr + TAG_OFFSET as usize) as *mut u64, addr as u64);
                std::ptr::write_volatile((addr + COUNTER_OFFSET as usize) as *mut u64, sweep);
                std::ptr::write_volatile(&mut progress, std::ptr::read_volatile(&progress) + 1);
            }
        }
        page = if end == pages { 0 } else { end };
        if Instant::now() >= deadline {
            return progress;
        }
    }
}

/// `guest-dirty-rate`: pages/s per vCPU of an unthrottled dirty guest,
/// plain and under dirty logging, against as many host threads writing the
/// same pattern over the same amount of faulted memory.
pub fn dirty_rate() -> Scenario {
    Scenario::new(
        "guest-dirty-rate",
        "builtin:dirty (1 GiB VM, wss 256 MiB) pages/s per vCPU, plain and with the dirty log fetched every 50 ms; baseline: as many host threads writing the same pattern over 256 MiB of faulted memory, pages/s per thread",
        |ctx| {
            let window = ctx.window(RATE_WINDOW);
            // Alternate the baseline before and after the guests across
            // runs, so that drift over a run favours neither side.
            let host_first = ctx.run % 2 == 0;
            let host_rates = || VCPU_COUNTS.iter().map(|&n| host_write_rate(RATE_WSS, n, window)).collect::<Result<Vec<f64>, _>>();
            let host_before = if host_first { Some(host_rates()?) } else { None };
            let mut guests = Vec::new();
            for n in VCPU_COUNTS {
                let vm = boot(n, dirty_guest(RATE_WSS))?;
                warm_up(&vm)?;
                let plain = measure_guest(&vm, window, None)?;
                vm.start_dirty_log().map_err(vm_step("starting the dirty log"))?;
                let logged = measure_guest(&vm, window, Some(FETCH_INTERVAL))?;
                guests.push((n, plain, logged));
            }
            let host = match host_before {
                Some(h) => h,
                None => host_rates()?,
            };
            let mut out = Vec::new();
            for ((n, plain, logged), host) in guests.into_iter().zip(host) {
                let fetch_ms: Vec<f64> = logged.fetches.iter().map(|d| d.as_secs_f64() * 1e3).collect();
                out.push(Sample::new(format!("{n} vCPU plain, per vCPU"), "pages/s", plain.per_vcpu).vs(host));
                out.push(Sample::new(format!("{n} vCPU dirty log, per vCPU"), "pages/s", logged.per_vcpu).vs(host));
                out.push(Sample::new(format!("{n} vCPU dirty log: logged/written"), "fraction", logged.logged_per_written.unwrap_or(f64::NAN)));
                out.push(Sample::new(format!("{n} vCPU dirty log: fetch 1 GiB"), "ms", median(&fetch_ms)));
            }
            Ok(out)
        },
    )
}

/// A message of the baseline protocol (stands for VcpuCmd / VcpuReply).
#[derive(Clone, Copy)]
enum Msg {
    Pause,
    Resume,
}

/// The baseline of a pause round trip: the vCPUs' protocol without KVM.
/// `n` plain threads take commands on a channel and acknowledge on a reply
/// channel; while "running" a thread is `busy` (spins polling its channel,
/// as a vCPU in the guest keeps its CPU) or blocked on the channel (as a
/// parked idle vCPU). One round trip sends "pause" to all, waits for all
/// acks, then does the same for "resume", `PAUSE_GAP` after the previous
/// one. Returns µs per round trip and per pause half, as
/// [`pause_round_trips`] does.
fn channel_round_trips(
    n: u32,
    busy: bool,
    iterations: usize,
) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    let mut links = Vec::new();
    let mut threads = Vec::new();
    for _ in 0..n {
        let (cmd_tx, cmd_rx) = mpsc::channel::<Msg>();
        let (ack_tx, ack_rx) = mpsc::channel::<Msg>();
        threads.push(std::thread::spawn(move || {
            let mut spinning = busy;
            loop {
                let m = if spinning {
                    match cmd_rx.try_recv() {
                        Ok(m) => m,
                        Err(mpsc::TryRecvError::Empty) => continue,
                        Err(mpsc::TryRecvError::Disconnected) => break,
                    }
                } else {
                    match cmd_rx.recv() {
                        Ok(m) => m,
                        Err(_) => break,
                    }
                };
                spinning = busy && matches!(m, Msg::Resume);
                if ack_tx.send(m).is_err() {
                    break;
                }
            }
        }));
        links.push((cmd_tx, ack_rx));
    }
    let gone = || BenchError::Failed("a baseline thread ended early".into());
    let mut total = Vec::with_capacity(iterations);
    let mut pause = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        std::thread::sleep(PAUSE_GAP);
        let t = Instant::now();
        for msg in [Msg::Pause, Msg::Resume] {
            for (tx, _) in &links {
                tx.send(msg).map_err(|_| gone())?;
            }
            for (_, rx) in &links {
                rx.recv().map_err(|_| gone())?;
            }
            if let Msg::Pause = msg {
                pause.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        total.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // Closing the channels ends the threads, spinning or not.
    drop(links);
    for t in threads {
        let _ = t.join();
    }
    Ok((total, pause))
}

/// Times `iterations` pause + resume round trips of a running VM: µs of
/// each whole round trip and of its pause half (until `vm.pause()` returns,
/// i.e. every vCPU has left KVM_RUN and acknowledged).
fn pause_round_trips(vm: &Vm, iterations: usize) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    let mut total = Vec::with_capacity(iterations);
    let mut pause = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        std::thread::sleep(PAUSE_GAP);
        let t = Instant::now();
        let p = vm.pause().map_err(vm_step("pausing"))?;
        pause.push(t.elapsed().as_secs_f64() * 1e6);
        vm.resume(p).map_err(vm_step("resuming"))?;
        total.push(t.elapsed().as_secs_f64() * 1e6);
    }
    check_alive(vm)?;
    Ok((total, pause))
}

/// `pause-resume`: µs per `vm.pause()` + `vm.resume()` of a running dirty
/// guest and of an idle (parked) guest, against the same command protocol
/// between plain threads that spin (for the dirty guest) or block (for the
/// idle one) while "running".
pub fn pause_resume() -> Scenario {
    Scenario::new(
        "pause-resume",
        "vm.pause()+vm.resume() round trip, µs (median and p95 of 200 per run; and the pause half alone), dirty and idle guests, 1 and 2 vCPUs; baseline: the same pause/ack/resume/ack messages to as many plain threads, spinning (dirty) or blocked (idle) while running",
        |ctx| {
            let iterations = ctx.iterations(PAUSE_ITERATIONS);
            let mut out = Vec::new();
            for n in VCPU_COUNTS {
                for (name, spec) in [("dirty", dirty_guest(PAUSE_WSS)), ("idle", GuestSpec::Idle)] {
                    let busy = matches!(spec, GuestSpec::Dirty { .. });
                    let (base, base_pauses) = channel_round_trips(n, busy, iterations)?;
                    let vm = boot(n, spec)?;
                    if busy {
                        warm_up(&vm)?;
                    }
                    let (times, pauses) = pause_round_trips(&vm, iterations)?;
                    out.push(Sample::new(format!("{name}, {n} vCPU, median"), "µs", median(&times)).vs(median(&base)));
                    out.push(Sample::new(format!("{name}, {n} vCPU, p95"), "µs", quantile(&times, 0.95)).vs(quantile(&base, 0.95)));
                    out.push(Sample::new(format!("{name}, {n} vCPU, pause half, median"), "µs", median(&pauses)).vs(median(&base_pauses)));
                }
            }
            Ok(out)
        },
    )
}
