//! What the checkpoint, restore and NUMA scenarios share: the VM they boot
//! (1 GiB by default, or the run's `--memory` size; 2 vCPUs; a random-filled
//! dirty guest whose working set is the same share of memory at every
//! size), a guard that shuts it down
//! whatever happens, scratch directories on the disk checkpoints use, the
//! bare pause + resume round trip that downtime figures are compared to,
//! and small timing helpers.
//!
//! It measures nothing by itself and judges nothing; the scenario modules
//! (`checkpoint.rs`, `restore.rs`, `numa.rs`) do.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmhop::devices::Console;
use vmhop::guest::program::block;
use vmhop::guest::setup::BLOCKS_ADDR;
use vmhop::guest::{GuestSpec, RESERVED_BYTES};
use vmhop::memory::layout::DEFAULT_CHUNK_SIZE;
use vmhop::memory::PAGE_SIZE;
use vmhop::vmm::{NodeConfig, Vm, VmConfig};

use super::{median, vm_step, wait_until, BenchError, RunCtx};

/// Guest memory the sizes below are given for: 1 GiB, the default
/// `--memory`. A run's VMs have [`RunCtx::memory`] (an eighth in smoke
/// mode); see [`vm_bytes`].
pub const VM_BYTES: u64 = super::DEFAULT_MEMORY_GIB * super::GIB;
/// Working set of the dirty guest, out of [`VM_BYTES`] (scaled alike to the
/// run's memory: 900/1024 of it).
pub const WSS_BYTES: u64 = 900 << 20;
/// vCPUs of every VM.
pub const VCPUS: u32 = 2;
/// Pages per second (all vCPUs together) of a rate-limited dirty guest.
pub const PACED_RATE: u64 = 10_000;
/// Where checkpoints and the write/read baselines go: a disk-backed file
/// system (not tmpfs), the same for vmhop and its baseline.
pub const BENCH_DIR: &str = "/var/tmp";
/// Bare pause + resume round trips per measurement of the baseline.
const ROUND_TRIPS: usize = 20;
/// Guest run time between two round trips, so that each pause finds the
/// vCPUs running as an operation's pause would.
const ROUND_TRIP_GAP: Duration = Duration::from_micros(500);
/// Longest a guest may take to reach a state the scenario waits for. It
/// only bounds a hang: first touches are slow under shadow paging, and a
/// loaded machine slower still.
pub const GUEST_LIMIT: Duration = Duration::from_secs(60);

/// Guest memory size for this run: its `--memory` size, an eighth of it in
/// smoke mode.
pub fn vm_bytes(ctx: &RunCtx) -> u64 {
    if ctx.quick {
        ctx.memory / 8
    } else {
        ctx.memory
    }
}

/// `num/den` of this run's guest memory, rounded down to whole pages.
pub fn share(ctx: &RunCtx, num: u64, den: u64) -> u64 {
    (vm_bytes(ctx) * num / den) / PAGE_SIZE * PAGE_SIZE
}

/// The dirty guest's working set for this run (900 MiB of 1 GiB, 900/1024
/// of any size).
pub fn wss_bytes(ctx: &RunCtx) -> u64 {
    share(ctx, WSS_BYTES, VM_BYTES)
}

/// A dirty guest over `wss` bytes at `rate` pages/s (None: unlimited), its
/// working set filled with random bytes so that zero-page skipping does not
/// flatter the figures.
pub fn dirty_guest(wss: u64, rate: Option<u64>) -> GuestSpec {
    GuestSpec::Dirty {
        wss: Some(wss),
        rate,
        fill_random: true,
    }
}

/// A booted VM, shut down when dropped (also on every error path), so no
/// vCPU thread outlives its run; with its place in a checkpoint chain, and
/// whether a lazy restore of it still loads.
pub struct BenchVm {
    /// The VM.
    pub vm: Arc<Vm>,
    /// The checkpoint chain it extends.
    pub chain: std::sync::Mutex<vmhop::checkpoint::ChainPosition>,
    /// True while a lazy restore still loads its memory.
    pub loading: Arc<std::sync::atomic::AtomicBool>,
    /// The reset device's line (builtin guests booted here).
    pub reset_line: Option<Arc<vmhop::devices::test_device::ResetLine>>,
}

impl BenchVm {
    /// A fresh VM, in no chain.
    pub fn new(vm: Arc<Vm>) -> BenchVm {
        BenchVm {
            vm,
            chain: Default::default(),
            loading: Default::default(),
            reset_line: None,
        }
    }

    /// Pages its builtin guest has written so far.
    pub fn progress(&self) -> u64 {
        vmhop::guest::progress(&self.vm)
    }

    /// Whether a lazy restore still loads its memory.
    pub fn is_loading(&self) -> bool {
        self.loading.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl std::ops::Deref for BenchVm {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        &self.vm
    }
}

impl Drop for BenchVm {
    fn drop(&mut self) {
        self.vm.shutdown();
    }
}

/// Boots a running VM of this run's size with [`VCPUS`] vCPUs.
pub fn boot(ctx: &RunCtx, name: &str, guest: GuestSpec) -> Result<BenchVm, BenchError> {
    new_vm(ctx, name, guest, false)
}

/// Creates a VM of this run's size with [`VCPUS`] vCPUs, running unless
/// `paused`.
pub fn new_vm(
    ctx: &RunCtx,
    name: &str,
    guest: GuestSpec,
    paused: bool,
) -> Result<BenchVm, BenchError> {
    new_vm_backed(ctx, name, guest, paused, false)
}

/// [`new_vm`], its memory backed by transparent huge pages if `hugepages`.
pub fn new_vm_backed(
    ctx: &RunCtx,
    name: &str,
    guest: GuestSpec,
    paused: bool,
    hugepages: bool,
) -> Result<BenchVm, BenchError> {
    let size = vm_bytes(ctx);
    let what = format!(
        "booting a {} MiB {} VM with {VCPUS} vCPUs",
        size >> 20,
        guest.kind()
    );
    let config = VmConfig {
        name: name.to_string(),
        vcpus: VCPUS,
        nodes: vec![NodeConfig {
            guest_node: 0,
            size,
            host_node: None,
            vcpus: None,
        }],
        guest,
        hugepages,
        chunk_size: DEFAULT_CHUNK_SIZE,
        disks: Vec::new(),
        nets: Vec::new(),
        vsock: None,
    };
    vmhop::service::build::boot(config, &Console::Stdout, paused, &Default::default())
        .map(|m| {
            let mut b = BenchVm::new(m.vm);
            b.reset_line = m.devices.reset.clone();
            b
        })
        .map_err(vm_step(what))
}

/// Fails if the guest stopped by itself (every figure after a triple fault
/// or a failed lazy load would be meaningless).
pub fn check_alive(vm: &Vm) -> Result<(), BenchError> {
    match vm.guest_stop_reason() {
        Some(why) => Err(BenchError::Failed(format!("the guest stopped: {why}"))),
        None => Ok(()),
    }
}

/// Each vCPU's sweep counter (the sweep in progress, from 1).
fn sweeps(vm: &Vm) -> Vec<u64> {
    let m = vm.memory();
    (0..vm.config().vcpus as u64)
        .map(|v| {
            m.read_u64(BLOCKS_ADDR + v * block::SIZE + block::SWEEP)
                .unwrap_or(0)
        })
        .collect()
}

/// Waits until every vCPU's sweep counter reached `at_least(now)`.
fn wait_sweeps(vm: &Vm, at_least: impl Fn(u64) -> u64, what: &str) -> Result<(), BenchError> {
    let goal: Vec<u64> = sweeps(vm).into_iter().map(at_least).collect();
    let reached = || sweeps(vm).iter().zip(&goal).all(|(s, g)| s >= g);
    if !wait_until(GUEST_LIMIT, || {
        reached() || vm.guest_stop_reason().is_some()
    }) {
        return Err(BenchError::Failed(format!(
            "the dirty guest did not {what} within {GUEST_LIMIT:?}"
        )));
    }
    check_alive(vm)
}

/// Waits until every vCPU of a dirty guest began its second sweep: its
/// whole slice has been touched once (shadow page tables exist), so what
/// follows sees steady-state writing.
pub fn warm_up(vm: &Vm) -> Result<(), BenchError> {
    wait_sweeps(vm, |_| 2, "finish its first sweep")
}

/// Waits until every vCPU of a dirty guest wrote its whole slice once more,
/// entirely after this call: every working-set page is then dirty again.
pub fn rewrite_working_set(vm: &Vm) -> Result<(), BenchError> {
    // The sweep under way when called may have begun before; the one after
    // it is complete only once the counter moved on twice.
    wait_sweeps(vm, |s| s + 2, "rewrite its working set")
}

/// Median µs of bare `vm.pause()` + `vm.resume()` round trips on a running
/// VM (what `resume` reports: the real pause, from the first vCPU stopping
/// to the last one back in the guest; near zero when every vCPU sleeps in
/// a wait of its own and is only held), `n` of them, [`ROUND_TRIP_GAP`]
/// apart: the fixed cost inside every downtime, the baseline downtimes
/// compare to.
pub fn pause_round_trip_us(vm: &Vm, n: usize) -> Result<f64, BenchError> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(ROUND_TRIP_GAP);
        let p = vm.pause().map_err(vm_step("pausing the VM"))?;
        let d = vm.resume(p).map_err(vm_step("resuming the VM"))?;
        times.push(us(d));
    }
    check_alive(vm)?;
    Ok(median(&times))
}

/// [`pause_round_trip_us`] with the standard count for this run.
pub fn pause_baseline(ctx: &RunCtx, vm: &Vm) -> Result<f64, BenchError> {
    pause_round_trip_us(vm, ctx.iterations(ROUND_TRIPS))
}

/// A fresh scratch directory under [`BENCH_DIR`], removed when dropped.
pub fn scratch_dir() -> Result<tempfile::TempDir, BenchError> {
    tempfile::Builder::new()
        .prefix("vmhop-bench-")
        .tempdir_in(BENCH_DIR)
        .map_err(failed(format!(
            "creating a scratch directory in {BENCH_DIR}"
        )))
}

/// Removes every file in `dir` (not the directory), so that the next figure
/// of the run does not share the disk with the last one's leftovers.
pub fn empty_dir(dir: &Path) -> Result<(), BenchError> {
    let entries = std::fs::read_dir(dir).map_err(failed(format!("listing {}", dir.display())))?;
    for e in entries {
        let p = e
            .map_err(failed(format!("listing {}", dir.display())))?
            .path();
        if p.is_file() {
            std::fs::remove_file(&p).map_err(failed(format!("removing {}", p.display())))?;
        }
    }
    Ok(())
}

/// Flushes every file system, so that a timed write does not also pay for
/// writeback left over from before it.
pub fn sync_disks() {
    // SAFETY: sync takes no arguments, touches no memory of ours and
    // cannot fail.
    unsafe { libc::sync() };
}

/// `len` pseudo-random bytes (xorshift64): incompressible data for the
/// baselines, made before any timing starts.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Fills `len` bytes of guest memory from the end of the builtin guest's
/// reserved area with random bytes, from the host: gives a guest that does
/// not write memory itself (`builtin:idle`) the same data a random-filled
/// dirty guest has, so that its figures move the same bytes.
pub fn fill_working_set(vm: &Vm, len: u64) -> Result<(), BenchError> {
    let m = vm.memory();
    let block = 1 << 20;
    let data = random_bytes(block, 0x5eed_f00d);
    let mut gpa = RESERVED_BYTES;
    let end = RESERVED_BYTES + len;
    while gpa < end {
        let n = (end - gpa).min(block as u64) as usize;
        m.write_bytes(gpa, &data[..n]).ok_or_else(|| {
            BenchError::Failed(format!(
                "filling guest memory: {gpa:#x}+{n:#x} is not backed by memory"
            ))
        })?;
        gpa += n as u64;
    }
    Ok(())
}

/// Wraps a library or I/O error with the step that produced it.
pub fn failed<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> BenchError {
    let what = what.into();
    move |e| BenchError::Failed(format!("{what}: {e}"))
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A duration in microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs `f` and returns its result with how long it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// Mebibytes per second of `bytes` over `d`.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / d.as_secs_f64()
}

/// 1.0 for true, 0.0 for false: booleans as metrics (their median over
/// runs is then the majority).
pub fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The phases of a pause as samples named `{prefix}PHASE`, in µs.
pub fn pause_phases(prefix: &str, b: &vmhop::transfer::PauseBreakdown) -> Vec<super::Sample> {
    [
        ("stop", b.stop_us),
        ("fetch", b.fetch_us),
        ("copy", b.copy_us),
        ("state", b.state_us),
        ("commit", b.commit_us),
        ("resume", b.resume_us),
    ]
    .into_iter()
    .map(|(name, v)| super::Sample::new(format!("{prefix}{name}"), "µs", v as f64))
    .collect()
}

/// This process's resident memory now, bytes (VmRSS).
pub fn rss_now() -> Result<u64, BenchError> {
    proc_status_kib("VmRSS:").map(|k| k << 10)
}

/// This process's peak resident memory since the last
/// [`reset_rss_peak`], bytes (VmHWM).
pub fn rss_peak() -> Result<u64, BenchError> {
    proc_status_kib("VmHWM:").map(|k| k << 10)
}

/// Restarts the peak-RSS count at the current RSS (`clear_refs` 5).
pub fn reset_rss_peak() -> Result<(), BenchError> {
    std::fs::write("/proc/self/clear_refs", "5")
        .map_err(|e| BenchError::Failed(format!("writing 5 to /proc/self/clear_refs: {e}")))
}

fn proc_status_kib(field: &str) -> Result<u64, BenchError> {
    let s = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| BenchError::Failed(format!("reading /proc/self/status: {e}")))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| BenchError::Failed(format!("/proc/self/status has no {field}")))
}
