//! Scenarios of `builtin:disk`: how many requests per second the CPL3
//! virtio-blk driver gets through vmhop's device, against one host thread
//! doing the same requests on a file of its own.
//!
//! The guest keeps one request in flight and polls the used ring: 4 KiB at a
//! random block, three writes to one read-back, no FLUSH (docs/test-device.md).
//! So does the baseline: a host thread doing `pwrite`/`pread` of 4 KiB at
//! random blocks in the same 3:1 mix, queue depth 1, with the same caching
//! (`O_DIRECT` against `cache=none`, the page cache against
//! `cache=writeback`), on a second image of the same size and allocation.
//! Both write through: the guest does not negotiate FLUSH, so the device
//! completes a write only once it is durable (`RWF_DSYNC`), as the virtio
//! spec wants of a device the driver cannot flush; the baseline opens its
//! image `O_DSYNC`.
//! The guest cannot yet be set to the patterns (sequential 1 MiB
//! writes, 4 KiB random reads at queue depth 32): these figures are its
//! queue-depth-1 cost per request, every notify an exit to vmhop.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use vmhop::devices::Console;
use vmhop::guest::program::disk::{ctl, BLOCK_BYTES, READ_EVERY};
use vmhop::guest::setup::DISK_CONTROL_ADDR;
use vmhop::guest::GuestSpec;
use vmhop::memory::layout::DEFAULT_CHUNK_SIZE;
use vmhop::vmm::config::DiskConfig;
use vmhop::vmm::{NodeConfig, VmConfig};

use super::fixture::{failed, scratch_dir, BenchVm, GUEST_LIMIT};
use super::{vm_step, wait_until, BenchError, Sample, Scenario};

/// Each image: 64 MiB, every block of it written before the run, so that
/// neither side pays for allocating blocks.
const IMAGE_BYTES: u64 = 64 << 20;
/// Guest memory: the disk area and its table (16384 blocks: 128 KiB) fit
/// many times over.
const VM_BYTES: u64 = 64 << 20;
/// How long each side is measured.
const WINDOW: Duration = Duration::from_secs(2);
/// Requests the guest completes before the window opens (its set-up done,
/// the worker thread and the image's pages warm).
const WARM_REQUESTS: u64 = 200;

/// The scenarios of this module, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    vec![disk_qd1()]
}

/// A file of `IMAGE_BYTES` with every block written (data, not a hole or
/// an unwritten extent), flushed.
fn image(dir: &Path, name: &str) -> Result<std::path::PathBuf, BenchError> {
    let p = dir.join(name);
    let block = vec![0x5au8; 1 << 20];
    let f = File::create(&p).map_err(failed(format!("creating {}", p.display())))?;
    for i in 0..IMAGE_BYTES / block.len() as u64 {
        f.write_all_at(&block, i * block.len() as u64)
            .map_err(failed(format!("filling {}", p.display())))?;
    }
    f.sync_all()
        .map_err(failed(format!("fsync of {}", p.display())))?;
    Ok(p)
}

/// Requests per second of `builtin:disk` (1 vCPU: only the disk works) on
/// `image` with `cache`.
fn guest_rate(image: &Path, cache: &str, window: Duration) -> Result<f64, BenchError> {
    let disk = DiskConfig::parse(&format!("path={},cache={cache}", image.display()), "disk0")
        .map_err(failed("the bench's --disk"))?;
    let config = VmConfig {
        name: "bench-disk".into(),
        vcpus: 1,
        nodes: vec![NodeConfig {
            guest_node: 0,
            size: VM_BYTES,
            host_node: None,
            vcpus: None,
        }],
        guest: GuestSpec::Disk {
            blocks: Some(IMAGE_BYTES / BLOCK_BYTES),
            rate: None,
        },
        hugepages: false,
        chunk_size: DEFAULT_CHUNK_SIZE,
        disks: vec![disk],
        nets: Vec::new(),
        vsock: None,
    };
    let vm = vmhop::service::build::boot(config, &Console::Stdout, false, &Default::default())
        .map(|m| BenchVm::new(m.vm))
        .map_err(vm_step(format!("booting builtin:disk with cache={cache}")))?;
    let requests = || {
        vm.memory()
            .read_u64(DISK_CONTROL_ADDR + ctl::REQUESTS)
            .unwrap_or(0)
    };
    if !wait_until(GUEST_LIMIT, || {
        requests() >= WARM_REQUESTS || vm.guest_stop_reason().is_some()
    }) {
        return Err(BenchError::Failed(format!(
            "builtin:disk did not complete {WARM_REQUESTS} requests within {GUEST_LIMIT:?}"
        )));
    }
    super::fixture::check_alive(&vm)?;
    let (n0, t0) = (requests(), Instant::now());
    std::thread::sleep(window);
    let (n1, t1) = (requests(), Instant::now());
    super::fixture::check_alive(&vm)?;
    let errors = vm
        .memory()
        .read_u64(DISK_CONTROL_ADDR + ctl::IOERRS)
        .unwrap_or(0)
        + vm.memory()
            .read_u64(DISK_CONTROL_ADDR + ctl::ERRORS)
            .unwrap_or(0);
    if errors != 0 {
        return Err(BenchError::Failed(format!(
            "builtin:disk saw {errors} failed or bad requests"
        )));
    }
    Ok((n1 - n0) as f64 / (t1 - t0).as_secs_f64())
}

/// Requests per second of one host thread doing the guest's mix on
/// `image`: 4 KiB at random blocks, every `READ_EVERY`-th a `pread`, the
/// others `pwrite`, each write durable when it returns (`O_DSYNC`, as the
/// device's), through `O_DIRECT` if `direct`.
fn host_rate(image: &Path, direct: bool, window: Duration) -> Result<f64, BenchError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true);
    opts.custom_flags(libc::O_DSYNC | if direct { libc::O_DIRECT } else { 0 });
    let f = opts
        .open(image)
        .map_err(failed(format!("opening {}", image.display())))?;
    // O_DIRECT wants the buffer aligned to the block: take the aligned
    // page inside a larger allocation.
    let mut raw = vec![0xa5u8; 2 * BLOCK_BYTES as usize];
    let at = raw.as_ptr().align_offset(BLOCK_BYTES as usize);
    let buf = &mut raw[at..at + BLOCK_BYTES as usize];
    let blocks = IMAGE_BYTES / BLOCK_BYTES;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let (mut n, t0) = (0u64, Instant::now());
    let deadline = t0 + window;
    while Instant::now() < deadline {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % blocks) * BLOCK_BYTES;
        let r = if n % READ_EVERY == 0 {
            f.read_exact_at(buf, off)
        } else {
            buf[..8].copy_from_slice(&n.to_le_bytes());
            f.write_all_at(buf, off)
        };
        r.map_err(failed(format!("4 KiB I/O at {off} in {}", image.display())))?;
        n += 1;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// `disk-qd1`: requests/s of `builtin:disk` (4 KiB, 3 writes : 1 read-back,
/// queue depth 1, polling) with `cache=none` and `cache=writeback`, each
/// against one host thread doing the same mix with the same caching.
pub fn disk_qd1() -> Scenario {
    Scenario::new(
        "disk-qd1",
        "builtin:disk requests/s (4 KiB at random blocks of a 64 MiB preallocated image, 3 writes : 1 read-back, queue depth 1; no FLUSH negotiated, so the device writes through), cache=none and cache=writeback; baseline: one host thread doing the same pwrite/pread mix on a second such image, O_DSYNC, with O_DIRECT and buffered",
        |ctx| {
            let window = ctx.window(WINDOW);
            let dir = scratch_dir()?;
            let guest_img = image(dir.path(), "guest.img")?;
            let host_img = image(dir.path(), "host.img")?;
            // Alternate which side goes first across runs, so that drift
            // over a run favours neither.
            let host_first = ctx.run % 2 == 0;
            let mut out = Vec::new();
            for (cache, direct) in [("none", true), ("writeback", false)] {
                let (guest, host) = if host_first {
                    let h = host_rate(&host_img, direct, window)?;
                    (guest_rate(&guest_img, cache, window)?, h)
                } else {
                    let g = guest_rate(&guest_img, cache, window)?;
                    (g, host_rate(&host_img, direct, window)?)
                };
                out.push(Sample::new(format!("cache={cache}"), "requests/s", guest).vs(host));
            }
            Ok(out)
        },
    )
}
