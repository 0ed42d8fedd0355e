//! Scenarios that restore a VM from a full checkpoint, lazily (vCPUs start
//! at once, pages load on first touch and in the background) and eagerly
//! (every page is loaded before any vCPU runs), against a plain sequential
//! read of the checkpoint's files, page cache warm for both.
//!
//! Both scenarios restore the same checkpoint: the one of `checkpoint-full`
//! (1 GiB VM, 900 MiB random working set), taken once, by whichever of them
//! runs first, into a scratch directory under `/var/tmp`. The directory
//! lives until both scenarios are done (it is removed when the last of them
//! is dropped, in `run_all`), so that the runs do not each spend seconds
//! rewriting it; every restored VM is shut down inside its run, after its
//! background load finished.

use std::cell::RefCell;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use vmhop::checkpoint::create::{checkpoint, CheckpointRequest};
use vmhop::checkpoint::restore::{open, restore};
use vmhop::guest::GuestSpec;
use vmhop::memory::{Backing, Mapping, PAGE_SIZE};

use super::fixture::{
    boot, check_alive, dirty_guest, failed, ms, new_vm, scratch_dir, timed, wss_bytes, BenchVm,
    GUEST_LIMIT, PACED_RATE,
};
use super::{wait_until, BenchError, RunCtx, Sample, Scenario};

/// Read size of the baseline.
const READ_BLOCK: usize = 4 << 20;

/// The checkpoint both scenarios restore.
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
    let saved: Shared = Rc::new(RefCell::new(None));
    vec![
        scenario(
            "restore-lazy",
            "lazy restore of the checkpoint-full checkpoint (1 GiB, 900 MiB random): ms until the vCPUs run (RestoreReport.resume_ms, and the restore() call timed from outside), and until the background load is done; baseline: a plain sequential read of the checkpoint files (page cache warm for both)",
            saved.clone(),
            false,
        ),
        scenario(
            "restore-eager",
            "eager restore of the same checkpoint: ms until the vCPUs run (resume_ms, and the restore() call from outside); baseline: a plain sequential read of the checkpoint files (page cache warm for both)",
            saved,
            true,
        ),
    ]
}

/// Boots the checkpoint-full VM, checkpoints it into a scratch directory
/// and shuts it down.
fn make_checkpoint(ctx: &RunCtx) -> Result<Saved, BenchError> {
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
        checkpoint(&vm, &req).map_err(failed(format!(
            "full checkpoint into {}",
            dir.path().display()
        )))?;
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
struct Restored {
    /// RestoreReport.resume_ms.
    resume_ms: f64,
    /// The restore() call, from outside.
    call_ms: f64,
    /// From the call until the background load finished (lazy only).
    loaded_ms: Option<f64>,
}

/// Restores checkpoint `dir`, lets a lazy load finish, checks the guest is
/// alive, shuts the VM down.
fn restore_once(dir: &Path, eager: bool) -> Result<Restored, BenchError> {
    let what = format!(
        "{} restore of {}",
        if eager { "eager" } else { "lazy" },
        dir.display()
    );
    let start = std::time::Instant::now();
    let (vm, report, _) = restore(
        dir,
        None,
        Some("bench-restored".into()),
        false,
        eager,
        &vmhop::devices::Console::Stdout,
    )
    .map_err(failed(what.clone()))?;
    let call = start.elapsed();
    let vm = BenchVm(vm);
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
        call_ms: ms(call),
        loaded_ms,
    })
}

/// `restore-lazy` / `restore-eager`.
fn scenario(name: &'static str, about: &'static str, saved: Shared, eager: bool) -> Scenario {
    Scenario::new(name, about, move |ctx: &RunCtx| {
        if saved
            .borrow()
            .as_ref()
            .is_none_or(|s| s.memory != ctx.memory)
        {
            // First use, or a new `--memory` size: remove the last size's
            // checkpoint before writing this one.
            *saved.borrow_mut() = None;
            *saved.borrow_mut() = Some(make_checkpoint(ctx)?);
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
        let fresh = read_into_fresh_pages(&s.files, bytes)?;
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
