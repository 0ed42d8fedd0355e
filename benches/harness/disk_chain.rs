//! Scenarios of a disk in the checkpoint chain (issue 20's benchmarks):
//! what a disk costs a checkpoint's pause, how fast a checkpoint writes
//! the blocks the guest wrote, and whether a lazy restore stays lazy with
//! a large disk.
//!
//! - `checkpoint-disk-busy`: incremental checkpoints of `builtin:disk` in
//!   `mode=seq-write` (1 MiB writes, one in flight, `cache=none`: as fast
//!   as the device goes), each after the guest wrote for a while; their
//!   pause against a bare pause + resume of the same VM.
//! - `checkpoint-disk-blocks`: the same guest, paused through the API
//!   after it rewrote its disk, so that the incremental checkpoint taken
//!   then writes exactly the blocks (and the few pages) written since its
//!   parent; MiB/s against a plain write + fsync of the same byte count
//!   into a fresh file of the same directory.
//! - `restore-lazy-disk-1g`: a lazy restore of `builtin:disk` (mixed mode,
//!   4 KiB at random blocks) over a 1 GiB disk, from a full and an
//!   incremental checkpoint that both hold disk blocks; ms until the vCPUs
//!   run against the same restore of a VM of the same memory without a
//!   disk (`builtin:dirty`, paced), in the same run.
//!
//! Each run boots fresh VMs in a scratch directory under `/var/tmp`,
//! removed before the run ends.

use std::path::Path;
use std::time::Duration;

use vmhop::api::checkpoint::CheckpointReport;
use vmhop::checkpoint::create::{checkpoint, CheckpointRequest};
use vmhop::guest::program::disk::{DiskMode, BLOCK_BYTES};

use super::checkpoint::plain_write;
use super::disk::{check_disk_guest, disk_vm, image_of, requests};
use super::fixture::{
    boot, dirty_guest, failed, mib_per_s, pause_baseline, random_bytes, scratch_dir, sync_disks,
    vm_bytes, BenchVm, GUEST_LIMIT, PACED_RATE,
};
use super::restore::restore_once;
use super::{median, wait_until, BenchError, RunCtx, Sample, Scenario};

/// The busy and blocks scenarios' image: every block written beforehand.
const BUSY_IMAGE_BYTES: u64 = 256 << 20;
/// Their guest's memory: its disk area and table fit many times over.
const BUSY_VM_BYTES: u64 = 128 << 20;
/// Incremental checkpoints per run of `checkpoint-disk-busy`.
const BUSY_CHECKPOINTS: usize = 5;
/// How long the guest writes before each of them.
const BUSY_GAP: Duration = Duration::from_millis(300);
/// The restore scenario's disk: 1 GiB, sparse until the guest writes.
const LARGE_DISK_BYTES: u64 = 1 << 30;
/// How long the restore scenario's guests run before each checkpoint.
const RESTORE_GAP: Duration = Duration::from_secs(1);
/// Block the baseline write writes at a time.
const WRITE_BLOCK: usize = 4 << 20;

/// The scenarios of this module, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    vec![busy(), blocks(), restore_large_disk()]
}

/// A checkpoint of `vm` into `dir`, full or incremental as asked.
fn take(vm: &BenchVm, dir: &Path, full: bool) -> Result<CheckpointReport, BenchError> {
    let req = CheckpointRequest {
        dir: dir.to_path_buf(),
        full,
        stop_after: false,
    };
    let mut chain = vm.chain.lock().unwrap_or_else(|e| e.into_inner());
    let r = checkpoint(vm, &mut chain, &req).map_err(failed(format!(
        "{} checkpoint into {}",
        if full { "full" } else { "incremental" },
        dir.display()
    )))?;
    if r.parent.is_none() != full {
        return Err(BenchError::Failed(format!(
            "asked for a {} checkpoint, got id {} with parent {:?}",
            if full { "full" } else { "incremental" },
            r.id,
            r.parent
        )));
    }
    Ok(r)
}

/// Waits until `builtin:disk` completed `n` more requests.
fn wait_requests(vm: &BenchVm, n: u64) -> Result<(), BenchError> {
    let goal = requests(vm) + n;
    if !wait_until(GUEST_LIMIT, || {
        requests(vm) >= goal || vm.guest_stop_reason().is_some()
    }) {
        return Err(BenchError::Failed(format!(
            "builtin:disk did not complete {n} more requests within {GUEST_LIMIT:?}"
        )));
    }
    check_disk_guest(vm)
}

/// The seq-write guest of the busy and blocks scenarios, on a fresh
/// preallocated image in `dir`, with its first (full) checkpoint taken:
/// from then on its disk writes go to the overlay, and count.
fn seq_writer(dir: &Path) -> Result<BenchVm, BenchError> {
    let img = image_of(dir, "disk.img", BUSY_IMAGE_BYTES)?;
    let vm = disk_vm(
        "bench-disk-chain",
        &img,
        "none",
        DiskMode::SeqWrite,
        BUSY_IMAGE_BYTES / BLOCK_BYTES,
        BUSY_VM_BYTES,
    )?;
    take(&vm, &dir.join("ck"), true)?;
    Ok(vm)
}

/// `checkpoint-disk-busy`: the pause of incremental checkpoints while the
/// guest writes its disk as fast as it can.
fn busy() -> Scenario {
    Scenario::new(
        "checkpoint-disk-busy",
        "incremental checkpoints of builtin:disk,mode=seq-write (1 MiB writes, one in flight, cache=none, 256 MiB preallocated image, 128 MiB VM, 1 vCPU) taken 300 ms apart while it writes as fast as it can: pause µs (median and max of 5 per run), disk blocks and total ms per checkpoint; baseline of the pause: a bare vm.pause()+vm.resume() of the same VM",
        |ctx: &RunCtx| {
            let dir = scratch_dir()?;
            let vm = seq_writer(dir.path())?;
            let rtt = pause_baseline(ctx, &vm)?;
            let (mut pauses, mut blocks, mut totals) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ctx.iterations(BUSY_CHECKPOINTS) {
                std::thread::sleep(BUSY_GAP);
                let r = take(&vm, &dir.path().join("ck"), false)?;
                check_disk_guest(&vm)?;
                pauses.push(r.downtime_us as f64);
                blocks.push(r.disk_blocks as f64);
                totals.push(r.total_ms);
            }
            let max = pauses.iter().copied().fold(0.0, f64::max);
            Ok(vec![
                Sample::new("pause (median of the run's checkpoints)", "µs", median(&pauses))
                    .vs(rtt),
                Sample::new("pause (longest of the run's checkpoints)", "µs", max).vs(rtt),
                Sample::new("disk blocks per checkpoint", "blocks", median(&blocks)),
                Sample::new("checkpoint total", "ms", median(&totals)),
            ])
        },
    )
}

/// `checkpoint-disk-blocks`: how fast an incremental checkpoint writes the
/// disk blocks written since its parent.
fn blocks() -> Scenario {
    Scenario::new(
        "checkpoint-disk-blocks",
        "incremental checkpoint of builtin:disk,mode=seq-write (as checkpoint-disk-busy) paused through the API after it rewrote its whole 256 MiB disk since the full checkpoint: MiB/s of the checkpoint's bytes over its total time; baseline: a plain buffered write + fsync of the same byte count of random data into a fresh file of the same directory",
        |_ctx: &RunCtx| {
            let dir = scratch_dir()?;
            let vm = seq_writer(dir.path())?;
            // Every block of the disk once more, then nothing moves.
            wait_requests(&vm, BUSY_IMAGE_BYTES >> 20)?;
            vm.pause_user()
                .map_err(failed("pausing the VM through the API"))?;
            sync_disks();
            let r = take(&vm, &dir.path().join("ck"), false);
            vm.resume_user()
                .map_err(failed("resuming the VM through the API"))?;
            let r = r?;
            check_disk_guest(&vm)?;
            drop(vm);
            let data = random_bytes(WRITE_BLOCK, 7);
            let base = plain_write(&dir.path().join("plain.bin"), r.bytes_written, &data)?;
            let ours = Duration::from_secs_f64(r.total_ms / 1000.0);
            Ok(vec![
                Sample::new(
                    "checkpoint write rate",
                    "MiB/s",
                    mib_per_s(r.bytes_written, ours),
                )
                .vs(mib_per_s(r.bytes_written, base)),
                Sample::new("disk blocks", "blocks", r.disk_blocks as f64),
                Sample::new("bytes written", "MiB", r.bytes_written as f64 / (1 << 20) as f64),
            ])
        },
    )
}

/// A full checkpoint of `vm` into `dir`, [`RESTORE_GAP`], an incremental
/// one; the VM is shut down.
fn two_checkpoints(vm: BenchVm, dir: &Path) -> Result<(), BenchError> {
    std::thread::sleep(RESTORE_GAP);
    take(&vm, dir, true)?;
    std::thread::sleep(RESTORE_GAP);
    take(&vm, dir, false)?;
    super::fixture::check_alive(&vm)
}

/// `restore-lazy-disk-1g`: a lazy restore with a 1 GiB disk against one
/// without a disk.
fn restore_large_disk() -> Scenario {
    Scenario::new(
        "restore-lazy-disk-1g",
        "lazy restore of builtin:disk (mixed: 4 KiB at random blocks, 1 vCPU) over a 1 GiB disk (sparse image; the guest writes for 1 s before a full checkpoint and 1 s more before an incremental one), VM of the run's memory size: ms until the vCPUs run (RestoreReport.resume_ms) and the restore() call from outside; baseline: the same two checkpoints and lazy restore of builtin:dirty (paced) of the same memory size, no disk, in the same run",
        |ctx: &RunCtx| {
            let dir = scratch_dir()?;
            let img = dir.path().join("large.img");
            std::fs::File::create(&img)
                .and_then(|f| f.set_len(LARGE_DISK_BYTES))
                .map_err(failed(format!("creating {}", img.display())))?;
            let with_disk = dir.path().join("with-disk");
            let without = dir.path().join("without");
            let vm = disk_vm(
                "bench-large-disk",
                &img,
                "none",
                DiskMode::Mixed,
                LARGE_DISK_BYTES / BLOCK_BYTES,
                vm_bytes(ctx),
            )?;
            two_checkpoints(vm, &with_disk)?;
            let vm = boot(ctx, "bench-no-disk", dirty_guest(64 << 20, Some(PACED_RATE)))?;
            two_checkpoints(vm, &without)?;
            // Alternate which goes first across runs.
            let (d, n) = if ctx.run.is_multiple_of(2) {
                let d = restore_once(&with_disk, false)?;
                (d, restore_once(&without, false)?)
            } else {
                let n = restore_once(&without, false)?;
                (restore_once(&with_disk, false)?, n)
            };
            Ok(vec![
                Sample::new("until the vCPUs run (resume_ms)", "ms", d.resume_ms).vs(n.resume_ms),
                Sample::new("restore() call from outside", "ms", d.call_ms).vs(n.call_ms),
                Sample::new("files in the chain", "files", d.files as f64),
                Sample::new("restore, until every page touched", "ms", d.touched_ms)
                    .vs(n.touched_ms),
                Sample::new(
                    "with disk, phase: meta",
                    "ms",
                    d.phases.meta_ms,
                ),
                Sample::new("with disk, phase: new paused VM", "ms", d.phases.vm_ms),
                Sample::new("with disk, phase: wait for validation", "ms", d.phases.wait_ms),
                Sample::new("restore total, with disk (bg load done)", "ms", d.loaded_ms.map_or(0.0, |x| x)),
            ])
        },
    )
}
