//! Scenarios that restore a VM lazily (vCPUs start at once, pages load on
//! first touch and in the background) and eagerly (every page is loaded
//! before any vCPU runs), from one full checkpoint and from a chain of three
//! files (full + 2 incrementals), against plain sequential reads of the
//! checkpoint's files, page cache warm for all.
//!
//! The one-file scenarios restore the checkpoint of `checkpoint-full` (1 GiB
//! VM, 900 MiB random working set); the chain scenarios a full checkpoint
//! of the same guest followed by two incrementals a second apart. Each is
//! taken once, by whichever of its two scenarios runs first, into a scratch
//! directory under `/var/tmp`. The directory lives until both scenarios are
//! done (it is removed when the last of them is dropped, in `run_all`), so
//! that the runs do not each spend seconds rewriting it; every restored VM
//! is shut down inside its run, after its background load finished.

use std::cell::RefCell;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use vmhop::checkpoint::create::{checkpoint, CheckpointRequest};
use vmhop::checkpoint::restore::{open, RestorePhases};
use vmhop::guest::GuestSpec;
use vmhop::memory::{Backing, Mapping, PAGE_SIZE};
use vmhop::service::build::restore;
use vmhop::vmm::Vm;

use super::fixture::{
    boot, check_alive, dirty_guest, failed, ms, new_vm, scratch_dir, timed, wss_bytes, BenchVm,
    GUEST_LIMIT, PACED_RATE,
};
use super::{wait_until, BenchError, RunCtx, Sample, Scenario};

/// Read size of the baseline.
const READ_BLOCK: usize = 4 << 20;

/// Time between the checkpoints of the chain: the paced guest rewrites
/// ~10 000 pages (~40 MiB) in it.
const INCREMENTAL_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// The checkpoint both scenarios of a pair restore.
struct Saved {
    /// The guest memory it was taken at (`RunCtx::memory`).
    memory: u64,
    /// Its directory (removed on drop).
    dir: tempfile::TempDir,
    /// The files in it.
    files: Vec<PathBuf>,
}

/// Shared between the two scenarios; created on first use.
type Shared = Rc<RefCell<Option<Saved>>>;

/// The scenarios of this module, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    let one: Shared = Rc::new(RefCell::new(None));
    let three: Shared = Rc::new(RefCell::new(None));
    vec![
        scenario(
            "restore-lazy",
            "lazy restore of the checkpoint-full checkpoint (1 GiB, 900 MiB random): ms until the vCPUs run (RestoreReport.resume_ms and its phases, and the restore() call timed from outside), until the background load is done, and until a host thread has read every guest page (vs an eager restore's same figure in the same run); baseline: a plain sequential read of the checkpoint files (page cache warm for both)",
            one.clone(),
            false,
            0,
        ),
        scenario(
            "restore-eager",
            "eager restore of the same checkpoint: ms until the vCPUs run (resume_ms and its phases, and the restore() call from outside), and until a host thread has read every guest page; baselines: a plain sequential read of the checkpoint files into a reused buffer, and into fresh 4 KiB-page memory (page cache warm for all)",
            one,
            true,
            0,
        ),
        scenario(
            "restore-lazy-chain3",
            "restore-lazy from a chain of three files: a full checkpoint of the same guest and two incrementals taken a second apart (the paced guest rewrites ~40 MiB between them)",
            three.clone(),
            false,
            2,
        ),
        scenario(
            "restore-eager-chain3",
            "restore-eager from the same chain of three files",
            three,
            true,
            2,
        ),
    ]
}

/// Boots the checkpoint-full VM, checkpoints it into a scratch directory
/// (a full checkpoint, then `incrementals` incrementals [`INCREMENTAL_GAP`]
/// apart) and shuts it down.
fn make_checkpoint(ctx: &RunCtx, incrementals: usize) -> Result<Saved, BenchError> {
    let dir = scratch_dir()?;
    {
        let vm: BenchVm = boot(
            ctx,
            "bench-restore",
            dirty_guest(wss_bytes(ctx), Some(PACED_RATE)),
        )?;
        let req = CheckpointRequest {
            dir: dir.path().to_path_buf(),
            full: true,
            stop_after: false,
        };
        checkpoint(&vm, &mut vm.chain.lock().unwrap(), &req).map_err(failed(format!(
            "full checkpoint into {}",
            dir.path().display()
        )))?;
        for i in 0..incrementals {
            std::thread::sleep(INCREMENTAL_GAP);
            let req = CheckpointRequest {
                full: false,
                ..req.clone()
            };
            checkpoint(&vm, &mut vm.chain.lock().unwrap(), &req).map_err(failed(format!(
                "incremental checkpoint {} into {}",
                i + 1,
                dir.path().display()
            )))?;
        }
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir.path())
        .map_err(failed(format!("listing {}", dir.path().display())))?;
    for e in entries {
        let p = e
            .map_err(failed(format!("listing {}", dir.path().display())))?
            .path();
        if p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(Saved {
        memory: ctx.memory,
        dir,
        files,
    })
}

/// Reads every byte of `files` in order; returns the bytes read.
fn read_all(files: &[PathBuf], buf: &mut [u8]) -> Result<u64, BenchError> {
    let mut total = 0;
    for p in files {
        let mut f = std::fs::File::open(p).map_err(failed(format!("opening {}", p.display())))?;
        loop {
            let n = f
                .read(buf)
                .map_err(failed(format!("reading {}", p.display())))?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

/// Timed plain read of all `files`, ms.
fn read_baseline(files: &[PathBuf], buf: &mut [u8]) -> Result<f64, BenchError> {
    let (r, d) = timed(|| read_all(files, buf));
    r?;
    Ok(ms(d))
}

/// The floor of an eager load: reads all `files` into fresh (never
/// touched) anonymous 4 KiB-page memory, as a restore fills new guest
/// memory; ms.
fn read_into_fresh_pages(files: &[PathBuf], bytes: u64) -> Result<f64, BenchError> {
    let len = bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let m = Mapping::new(len as usize, Backing::Anonymous)
        .map_err(failed(format!("mapping {} MiB", len >> 20)))?;
    // SAFETY: the mapping is live for `len` bytes until the end of this
    // function and only this thread uses it.
    let dst = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) };
    let (r, d) = timed(|| -> Result<(), BenchError> {
        let mut at = 0;
        for p in files {
            let mut f =
                std::fs::File::open(p).map_err(failed(format!("opening {}", p.display())))?;
            loop {
                let end = (at + READ_BLOCK).min(dst.len());
                let n = f
                    .read(&mut dst[at..end])
                    .map_err(failed(format!("reading {}", p.display())))?;
                if n == 0 {
                    break;
                }
                at += n;
            }
        }
        Ok(())
    });
    r?;
    Ok(ms(d))
}

/// The parts of a restore that come before any page is loaded, timed on
/// their own: opening and checking the chain (`restore::open`), and
/// creating a VM of the same size (a paused idle one, nothing loaded).
fn fixed_costs(ctx: &RunCtx, dir: &Path) -> Result<(f64, f64), BenchError> {
    let (o, open_time) = timed(|| open(dir, None));
    drop(o.map_err(failed(format!("opening checkpoint {}", dir.display())))?);
    let (vm, new_time) = timed(|| new_vm(ctx, "bench-blank", GuestSpec::Idle, true));
    drop(vm?);
    Ok((ms(open_time), ms(new_time)))
}

/// What one restore measured.
pub(super) struct Restored {
    /// RestoreReport.resume_ms.
    pub(super) resume_ms: f64,
    /// Where it went.
    pub(super) phases: RestorePhases,
    /// The restore() call, from outside.
    pub(super) call_ms: f64,
    /// From the call until a host thread, started right after it returned,
    /// had read a byte of every page of guest memory.
    pub(super) touched_ms: f64,
    /// From the call until the background load finished (lazy only).
    pub(super) loaded_ms: Option<f64>,
    /// Files in the chain restored.
    pub(super) files: usize,
}

/// Reads one byte of every page of `vm`'s memory in guest-physical order
/// (a lazily restored page not loaded yet is a userfaultfd fault served
/// by the restore's handler, as a guest's first touch would be); returns a
/// sum so that no read is optimised away.
fn touch_all(vm: &Vm) -> u64 {
    let m = vm.memory();
    let mut sum = 0u64;
    for c in m.chunks() {
        let base = c.mapping.as_ptr();
        for off in (0..c.mapping.len()).step_by(PAGE_SIZE as usize) {
            // SAFETY: off < the chunk mapping's length, which stays mapped
            // while the memory guard is held; a volatile read of one byte.
            sum = sum.wrapping_add(u64::from(unsafe { std::ptr::read_volatile(base.add(off)) }));
        }
    }
    sum
}

/// Restores checkpoint `dir` (its disks, if any, where a restore puts them
/// by default: under `dir`), touches all guest memory from the host, lets
/// a lazy load finish, checks the guest is alive, shuts the VM down.
pub(super) fn restore_once(dir: &Path, eager: bool) -> Result<Restored, BenchError> {
    let what = format!(
        "{} restore of {}",
        if eager { "eager" } else { "lazy" },
        dir.display()
    );
    let start = std::time::Instant::now();
    let target = vmhop::api::checkpoint::CheckpointTarget {
        dir: dir.to_path_buf(),
        id: None,
    };
    let r = restore(
        &target,
        Some("bench-restored".into()),
        Default::default(),
        vmhop::checkpoint::restore::LoadMode::of(eager, false),
        false,
        &vmhop::devices::Console::Stdout,
        &Default::default(),
    )
    .map_err(failed(what.clone()))?;
    let call = start.elapsed();
    let report = r.report;
    let vm = BenchVm {
        vm: r.machine.vm,
        chain: std::sync::Mutex::new(r.position),
        loading: r.loading,
        reset_line: r.machine.devices.reset.clone(),
    };
    std::hint::black_box(touch_all(&vm));
    let touched = start.elapsed();
    let loaded_ms = if eager {
        None
    } else {
        if !wait_until(GUEST_LIMIT, || {
            !vm.is_loading() || vm.guest_stop_reason().is_some()
        }) {
            return Err(BenchError::Failed(format!(
                "{what}: the background load did not finish within {GUEST_LIMIT:?}"
            )));
        }
        Some(ms(start.elapsed()))
    };
    check_alive(&vm)?;
    drop(vm);
    Ok(Restored {
        resume_ms: report.resume_ms,
        phases: report.phases,
        call_ms: ms(call),
        touched_ms: ms(touched),
        loaded_ms,
        files: report.chain_files,
    })
}

/// The phases of a restore as samples.
fn phase_samples(p: &RestorePhases, eager: bool) -> Vec<Sample> {
    let mut out = vec![
        Sample::new(
            "phase: meta (list, links, top config+state)",
            "ms",
            p.meta_ms,
        ),
        Sample::new(
            "phase: validate (own thread, beside the VM)",
            "ms",
            p.validate_ms,
        ),
        Sample::new(
            "phase: new paused VM (devices, KVM, memory, vCPUs)",
            "ms",
            p.vm_ms,
        ),
    ];
    if !eager {
        out.push(Sample::new("phase: userfaultfd register", "ms", p.uffd_ms));
    }
    out.push(Sample::new("phase: wait for validation", "ms", p.wait_ms));
    if eager {
        out.push(Sample::new("phase: load every page", "ms", p.load_ms));
    }
    out.push(Sample::new("phase: start vCPUs", "ms", p.start_ms));
    out
}

/// `restore-lazy` / `restore-eager` and their `-chain3` variants.
fn scenario(
    name: &'static str,
    about: &'static str,
    saved: Shared,
    eager: bool,
    incrementals: usize,
) -> Scenario {
    Scenario::new(name, about, move |ctx: &RunCtx| {
        if saved
            .borrow()
            .as_ref()
            .is_none_or(|s| s.memory != ctx.memory)
        {
            // First use, or a new `--memory` size: remove the last size's
            // checkpoint before writing this one.
            *saved.borrow_mut() = None;
            *saved.borrow_mut() = Some(make_checkpoint(ctx, incrementals)?);
        }
        let guard = saved.borrow();
        let s = guard.as_ref().expect("made above");
        let mut buf = vec![0u8; READ_BLOCK];
        // Warm the page cache for both sides.
        let bytes = read_all(&s.files, &mut buf)?;
        // Alternate the order across runs so that drift favours neither.
        let base_first = ctx.run.is_multiple_of(2);
        let before = if base_first {
            Some(read_baseline(&s.files, &mut buf)?)
        } else {
            None
        };
        let r = restore_once(s.dir.path(), eager)?;
        let base = match before {
            Some(b) => b,
            None => read_baseline(&s.files, &mut buf)?,
        };
        if r.files != incrementals + 1 {
            return Err(BenchError::Failed(format!(
                "{name}: restored a chain of {} files, expected {}",
                r.files,
                incrementals + 1
            )));
        }
        let fresh = read_into_fresh_pages(&s.files, bytes)?;
        // A lazy restore's time to touch everything is judged against an
        // eager restore's, of the same files in the same run.
        let eager_touch = if eager {
            None
        } else {
            Some(restore_once(s.dir.path(), true)?.touched_ms)
        };
        let (open_ms, new_ms) = fixed_costs(ctx, s.dir.path())?;
        let mut out = vec![
            Sample::new("vCPUs run (resume_ms)", "ms", r.resume_ms).vs(base),
            Sample::new("restore() call", "ms", r.call_ms).vs(base),
        ];
        match r.loaded_ms {
            Some(l) => {
                out.push(Sample::new("background load done", "ms", l).vs(base));
                out.push(
                    Sample::new("background load done, vs read into fresh pages", "ms", l)
                        .vs(fresh),
                );
            }
            None => out.push(
                Sample::new("vCPUs run, vs read into fresh pages", "ms", r.resume_ms).vs(fresh),
            ),
        }
        match eager_touch {
            Some(e) => out.push(
                Sample::new(
                    "all memory touched, vs an eager restore's",
                    "ms",
                    r.touched_ms,
                )
                .vs(e),
            ),
            None => out.push(Sample::new("all memory touched", "ms", r.touched_ms).vs(fresh)),
        }
        out.extend(phase_samples(&r.phases, eager));
        out.push(Sample::new(
            "part: restore::open (chain checks)",
            "ms",
            open_ms,
        ));
        out.push(Sample::new(
            "part: new VM, same size, nothing loaded",
            "ms",
            new_ms,
        ));
        out.push(Sample::new(
            "checkpoint files",
            "MiB",
            bytes as f64 / (1u64 << 20) as f64,
        ));
        Ok(out)
    })
}
