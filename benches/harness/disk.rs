//! Scenarios of `builtin:disk`: how fast the CPL3 virtio-blk driver gets
//! through vmhop's device, against host processes doing the same I/O on a
//! file of their own, on the same file system, in the same run.
//!
//! - `disk-qd1`: the guest's default (mixed) mode keeps one request in
//!   flight and polls the used ring: 4 KiB at a random block, three writes
//!   to one read-back, no FLUSH (docs/test-device.md). So does the baseline:
//!   a host thread doing `pwrite`/`pread` of 4 KiB at random blocks in the
//!   same 3:1 mix, queue depth 1, with the same caching (`O_DIRECT` against
//!   `cache=none`, the page cache against `cache=writeback`). Both write
//!   through: the guest does not negotiate FLUSH, so the device completes a
//!   write only once it is durable (`RWF_DSYNC`), as the virtio spec wants
//!   of a device the driver cannot flush; the baseline opens its image
//!   `O_DSYNC`.
//! - `disk-seq-1m`: `mode=seq-write` and `mode=seq-read` (1 MiB requests,
//!   one in flight, from block 0 up) with `cache=none`, against `dd bs=1M
//!   oflag=direct conv=fsync,notrunc` and `dd bs=1M iflag=direct` over a
//!   second image of the same size. The writing guest negotiates FLUSH
//!   and flushes after every pass over its 64 MiB, as dd fsyncs after
//!   each run of 64 MiB: the same durability on both sides (the run fails
//!   if the guest flushed nothing).
//! - `disk-qd32`: `mode=rand-read-qd32` (4 KiB reads at random blocks, 32
//!   in flight, one notify per batch of completions) with `cache=none`,
//!   against 32 host threads doing `pread` at random blocks with O_DIRECT
//!   (the same queue depth) and against one such thread (the issue's
//!   baseline).
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use vmhop::devices::Console;
use vmhop::guest::program::disk::{ctl, DiskMode, BLOCK_BYTES, READ_EVERY};
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
    vec![disk_qd1(), disk_seq_1m(), disk_qd32()]
}

/// A file of `IMAGE_BYTES` with every block written (data, not a hole or
/// an unwritten extent), flushed.
fn image(dir: &Path, name: &str) -> Result<std::path::PathBuf, BenchError> {
    image_of(dir, name, IMAGE_BYTES)
}

/// A file of `bytes` (a multiple of 1 MiB) with every block written,
/// flushed.
pub fn image_of(dir: &Path, name: &str, bytes: u64) -> Result<std::path::PathBuf, BenchError> {
    let p = dir.join(name);
    let block = vec![0x5au8; 1 << 20];
    let f = File::create(&p).map_err(failed(format!("creating {}", p.display())))?;
    for i in 0..bytes / block.len() as u64 {
        f.write_all_at(&block, i * block.len() as u64)
            .map_err(failed(format!("filling {}", p.display())))?;
    }
    f.sync_all()
        .map_err(failed(format!("fsync of {}", p.display())))?;
    Ok(p)
}

/// Boots `builtin:disk` in `mode` with 1 vCPU (only the disk works) and
/// `memory` bytes, its disk `image` with `cache`, using `blocks` blocks of
/// it; waits until it completed [`WARM_REQUESTS`] requests.
pub fn disk_vm(
    name: &str,
    image: &Path,
    cache: &str,
    mode: DiskMode,
    blocks: u64,
    memory: u64,
) -> Result<BenchVm, BenchError> {
    let disk = DiskConfig::parse(&format!("path={},cache={cache}", image.display()), "disk0")
        .map_err(failed("the bench's --disk"))?;
    let config = VmConfig {
        name: name.into(),
        vcpus: 1,
        nodes: vec![NodeConfig {
            guest_node: 0,
            size: memory,
            host_node: None,
            vcpus: None,
        }],
        guest: GuestSpec::Disk {
            blocks: Some(blocks),
            rate: None,
            mode,
        },
        hugepages: false,
        chunk_size: DEFAULT_CHUNK_SIZE,
        disks: vec![disk],
        nets: Vec::new(),
        vsock: None,
    };
    let vm = vmhop::service::build::boot(config, &Console::Stdout, false, &Default::default())
        .map(|m| BenchVm::new(m.vm))
        .map_err(vm_step(format!(
            "booting builtin:disk,mode={} with cache={cache}",
            mode.name()
        )))?;
    if !wait_until(GUEST_LIMIT, || {
        requests(&vm) >= WARM_REQUESTS || vm.guest_stop_reason().is_some()
    }) {
        return Err(BenchError::Failed(format!(
            "builtin:disk did not complete {WARM_REQUESTS} requests within {GUEST_LIMIT:?}"
        )));
    }
    super::fixture::check_alive(&vm)?;
    Ok(vm)
}

/// Requests `builtin:disk` completed so far.
pub fn requests(vm: &BenchVm) -> u64 {
    vm.memory()
        .read_u64(DISK_CONTROL_ADDR + ctl::REQUESTS)
        .unwrap_or(0)
}

/// Fails if `builtin:disk` counted a failed request or a block that read
/// back wrong.
pub fn check_disk_guest(vm: &BenchVm) -> Result<(), BenchError> {
    let m = vm.memory();
    let errors = m.read_u64(DISK_CONTROL_ADDR + ctl::IOERRS).unwrap_or(0)
        + m.read_u64(DISK_CONTROL_ADDR + ctl::ERRORS).unwrap_or(0);
    if errors != 0 {
        return Err(BenchError::Failed(format!(
            "builtin:disk saw {errors} failed or bad requests"
        )));
    }
    super::fixture::check_alive(vm)
}

/// Requests per second of `builtin:disk` (1 vCPU: only the disk works) on
/// `image` with `cache`, in `mode`.
fn guest_rate(
    image: &Path,
    cache: &str,
    mode: DiskMode,
    window: Duration,
) -> Result<f64, BenchError> {
    let vm = disk_vm(
        "bench-disk",
        image,
        cache,
        mode,
        IMAGE_BYTES / BLOCK_BYTES,
        VM_BYTES,
    )?;
    let requests = || requests(&vm);
    super::fixture::check_alive(&vm)?;
    let (n0, t0) = (requests(), Instant::now());
    std::thread::sleep(window);
    let (n1, t1) = (requests(), Instant::now());
    check_disk_guest(&vm)?;
    let flushes = vm
        .memory()
        .read_u64(DISK_CONTROL_ADDR + ctl::FLUSHES)
        .unwrap_or(0);
    if mode == DiskMode::SeqWrite && flushes == 0 {
        return Err(BenchError::Failed(
            "builtin:disk,mode=seq-write flushed nothing: its writes were never made durable"
                .into(),
        ));
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
                    (guest_rate(&guest_img, cache, DiskMode::Mixed, window)?, h)
                } else {
                    let g = guest_rate(&guest_img, cache, DiskMode::Mixed, window)?;
                    (g, host_rate(&host_img, direct, window)?)
                };
                out.push(Sample::new(format!("cache={cache}"), "requests/s", guest).vs(host));
            }
            Ok(out)
        },
    )
}

/// Bytes per second of `dd` copying `IMAGE_BYTES` in 1 MiB blocks, run
/// again and again for `window`: `write` from /dev/zero into `image`
/// (O_DIRECT, fsync at the end, not truncating), else from `image` to
/// /dev/null (O_DIRECT).
fn dd_rate(image: &Path, write: bool, window: Duration) -> Result<f64, BenchError> {
    let count = format!("count={}", IMAGE_BYTES >> 20);
    let (inp, out) = if write {
        (
            "if=/dev/zero".to_string(),
            format!("of={}", image.display()),
        )
    } else {
        (
            format!("if={}", image.display()),
            "of=/dev/null".to_string(),
        )
    };
    let flags: &[&str] = if write {
        &["oflag=direct", "conv=fsync,notrunc"]
    } else {
        &["iflag=direct"]
    };
    let (mut bytes, t0) = (0u64, Instant::now());
    while t0.elapsed() < window {
        let st = std::process::Command::new("dd")
            .args([
                inp.as_str(),
                out.as_str(),
                "bs=1M",
                count.as_str(),
                "status=none",
            ])
            .args(flags)
            .status()
            .map_err(failed("running dd"))?;
        if !st.success() {
            return Err(BenchError::Failed(format!(
                "dd {inp} {out} {flags:?}: {st}"
            )));
        }
        bytes += IMAGE_BYTES;
    }
    Ok(bytes as f64 / t0.elapsed().as_secs_f64())
}

/// `disk-seq-1m`: MiB/s of `builtin:disk,mode=seq-write` and `seq-read`
/// (1 MiB requests, cache=none) against dd doing the same on a second
/// image.
pub fn disk_seq_1m() -> Scenario {
    Scenario::new(
        "disk-seq-1m",
        "builtin:disk sequential 1 MiB writes (mode=seq-write; each written through, no FLUSH negotiated) and reads (mode=seq-read), one in flight, over a 64 MiB preallocated image, cache=none; baseline: dd bs=1M oflag=direct conv=fsync,notrunc / iflag=direct over a second such image",
        |ctx| {
            let window = ctx.window(WINDOW);
            let dir = scratch_dir()?;
            let guest_img = image(dir.path(), "guest.img")?;
            let host_img = image(dir.path(), "host.img")?;
            let host_first = ctx.run % 2 == 0;
            let mib = (1u64 << 20) as f64;
            let mut out = Vec::new();
            for (mode, write, name) in [
                (DiskMode::SeqWrite, true, "write"),
                (DiskMode::SeqRead, false, "read"),
            ] {
                let (guest, host) = if host_first {
                    let h = dd_rate(&host_img, write, window)?;
                    (guest_rate(&guest_img, "none", mode, window)?, h)
                } else {
                    let g = guest_rate(&guest_img, "none", mode, window)?;
                    (g, dd_rate(&host_img, write, window)?)
                };
                let guest_bytes = guest * (SEQ_REQUEST_BYTES as f64);
                out.push(Sample::new(format!("1 MiB {name}"), "MiB/s", guest_bytes / mib).vs(host / mib));
            }
            Ok(out)
        },
    )
}

/// Bytes of one sequential request.
const SEQ_REQUEST_BYTES: u64 = vmhop::guest::program::disk::SEQ_BLOCKS * BLOCK_BYTES;

/// Reads per second of `threads` host threads, each doing `pread` of 4 KiB
/// at random blocks of `image` with O_DIRECT for `window`.
fn host_read_rate(image: &Path, threads: usize, window: Duration) -> Result<f64, BenchError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(image)
        .map_err(failed(format!("opening {}", image.display())))?;
    let blocks = IMAGE_BYTES / BLOCK_BYTES;
    let t0 = Instant::now();
    let deadline = t0 + window;
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || -> std::io::Result<u64> {
                    let mut raw = vec![0u8; 2 * BLOCK_BYTES as usize];
                    let at = raw.as_ptr().align_offset(BLOCK_BYTES as usize);
                    let buf = &mut raw[at..at + BLOCK_BYTES as usize];
                    let mut x = 0x9e37_79b9_7f4a_7c15u64
                        ^ (t as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        f.read_exact_at(buf, (x % blocks) * BLOCK_BYTES)?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a reader panicked")))
            })
            .collect::<std::io::Result<Vec<u64>>>()
    })
    .map_err(failed(format!(
        "4 KiB O_DIRECT reads of {}",
        image.display()
    )))?;
    Ok(counts.iter().sum::<u64>() as f64 / t0.elapsed().as_secs_f64())
}

/// `disk-qd32`: reads/s of `builtin:disk,mode=rand-read-qd32` (cache=none)
/// against 32 host threads doing O_DIRECT `pread`, and against one.
pub fn disk_qd32() -> Scenario {
    Scenario::new(
        "disk-qd32",
        "builtin:disk 4 KiB reads at random blocks of a 64 MiB preallocated image, 32 in flight (mode=rand-read-qd32), cache=none; baselines: 32 host threads, and one, doing O_DIRECT pread of 4 KiB at random blocks of a second such image",
        |ctx| {
            let window = ctx.window(WINDOW);
            let dir = scratch_dir()?;
            let guest_img = image(dir.path(), "guest.img")?;
            let host_img = image(dir.path(), "host.img")?;
            let host_first = ctx.run % 2 == 0;
            let (guest, qd32, qd1) = if host_first {
                let h32 = host_read_rate(&host_img, QD32_THREADS, window)?;
                let h1 = host_read_rate(&host_img, 1, window)?;
                let g = guest_rate(&guest_img, "none", DiskMode::RandReadQd32, window)?;
                (g, h32, h1)
            } else {
                let g = guest_rate(&guest_img, "none", DiskMode::RandReadQd32, window)?;
                let h32 = host_read_rate(&host_img, QD32_THREADS, window)?;
                (g, h32, host_read_rate(&host_img, 1, window)?)
            };
            Ok(vec![
                Sample::new("vs 32 host threads", "reads/s", guest).vs(qd32),
                Sample::new("vs 1 host thread", "reads/s", guest).vs(qd1),
            ])
        },
    )
}

/// Host threads of the QD32 baseline: one per request in flight.
const QD32_THREADS: usize = 32;
