//! `checkpoint`, `checkpoints` and `merge` (`restore` is `run`'s).

use std::path::PathBuf;

use clap::Args;

use super::control::request;
use super::output::{render, JsonOpt};
use super::{ApiOpts, CliError, CliResult};
use crate::api::checkpoint::{CheckpointReport, CheckpointRequest, CheckpointTarget, DropReport};
use crate::api::run::Local;
use crate::api::vm::{DirtySource, ResetReport, ResetRequest};
use crate::api::Endpoint;
use crate::util::format_size;

/// Options of `vmhop checkpoint`.
#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// Checkpoint directory (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Start a new chain with a full checkpoint.
    #[arg(long)]
    full: bool,
    /// Stop the VM once the checkpoint is safely on disk.
    #[arg(long)]
    stop_after: bool,
}

/// `vmhop checkpoint`.
pub fn checkpoint(a: &CheckpointArgs) -> CliResult {
    let dir = std::path::absolute(&a.dir)
        .map_err(|e| CliError::usage(format!("--dir {}: {e}", a.dir.display())))?;
    let req = CheckpointRequest {
        dir,
        full: a.full,
        stop_after: a.stop_after,
    };
    let spinner = super::progress::spinner(a.api.json, "writing checkpoint".into());
    let r: Result<CheckpointReport, _> = request(&a.api, Endpoint::Checkpoint, Some(&req), None);
    spinner.finish_and_clear();
    let r = r?;
    render(a.api.json, &r, |r| {
        format!(
            "checkpoint {} ({}{}) in {}: {} pages{}, {} written in {:.1} ms; guest paused {} µs{}{}",
            r.id,
            r.kind,
            r.parent.map(|p| format!(" on {p}")).unwrap_or_default(),
            r.dir.display(),
            r.pages_written,
            disk_blocks(r),
            format_size(r.bytes_written),
            r.total_ms,
            r.downtime_us,
            pause_cost(r),
            if r.stopped { "; VM stopped" } else { "" }
        )
    })
}

/// The disk blocks a checkpoint stored, when it stored any.
fn disk_blocks(r: &CheckpointReport) -> String {
    match (r.disk_blocks, r.disk_zero_blocks) {
        (0, 0) => String::new(),
        (d, 0) => format!(" (disk: {d} blocks)"),
        (d, z) => format!(" (disk: {d} blocks, {z} zeroed)"),
    }
}

/// What bounding the pause cost the guest, when it cost anything.
fn pause_cost(r: &CheckpointReport) -> String {
    let mut out = String::new();
    if r.pages_protected > 0 {
        out += &format!(
            " ({} pages write-protected, {} copied on write)",
            r.pages_protected, r.cow_faults
        );
    }
    if r.throttle_max_percent > 0 {
        out += &format!("; vCPUs throttled up to {} %", r.throttle_max_percent);
    }
    out
}

/// Options of `vmhop checkpoints`.
#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// Checkpoint directory.
    dir: PathBuf,
    /// Remove the clone images (on tmpfs) of DIR's checkpoints instead of
    /// listing; refused while clones of them run.
    #[arg(long)]
    drop_images: bool,
    #[command(flatten)]
    json: JsonOpt,
}

/// What a delete or drop removed, as a line.
fn dropped(r: &DropReport) -> String {
    let images = match r.images.len() {
        0 => "no clone image".to_string(),
        n => format!("{n} clone image(s), {}", format_size(r.image_bytes)),
    };
    match &r.file {
        Some(f) => format!("deleted {} and {images}", f.display()),
        None => format!("removed {images}"),
    }
}

/// Options of `vmhop delete`.
#[derive(Args, Debug, Clone)]
pub struct DeleteArgs {
    /// DIR@ID: the checkpoint to delete (with its clone image).
    target: String,
    #[command(flatten)]
    json: JsonOpt,
}

/// `vmhop delete DIR@ID`.
pub fn delete(local: &dyn Local, a: &DeleteArgs) -> CliResult {
    let target: CheckpointTarget = a.target.parse()?;
    let r = local.delete(&target)?;
    render(a.json.json, &r, dropped)
}

/// `vmhop checkpoints DIR`.
pub fn list(local: &dyn Local, a: &ListArgs) -> CliResult {
    if a.drop_images {
        let r = local.drop_images(&a.dir)?;
        return render(a.json.json, &r, dropped);
    }
    let listing = local.checkpoints(&a.dir)?;
    let (entries, damaged) = (&listing.checkpoints, &listing.damaged);
    render(a.json.json, &listing, |_| {
        let mut bad = String::new();
        for d in damaged {
            bad += &format!("\n{:>6}  {:>6}  {:<11}  {}", d.id, "-", "DAMAGED", d.reason);
        }
        if entries.is_empty() {
            return format!("no usable checkpoints in {}{bad}", a.dir.display());
        }
        let mut t = format!(
            "{:>6}  {:>6}  {:<11}  {:>10}  {:>10}  {}",
            "id", "parent", "kind", "size", "disk", "time"
        );
        for e in entries {
            let secs = (e.created_unix_ms / 1000) as i64;
            t += &format!(
                "\n{:>6}  {:>6}  {:<11}  {:>10}  {:>10}  {}",
                e.id,
                e.parent
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                e.kind.to_string(),
                format_size(e.size_bytes),
                format_size(e.disk_bytes),
                format_time(secs)
            );
        }
        t + &bad
    })
}

fn format_time(unix: i64) -> String {
    let s = unix.rem_euclid(86400);
    let (y, m, d) = crate::util::civil_from_days(unix.div_euclid(86400));
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Options of `vmhop merge`.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// DIR or DIR@ID: the chain up to ID (default: the latest) becomes one new full checkpoint.
    target: String,
    #[command(flatten)]
    json: JsonOpt,
}

/// `vmhop merge DIR[@ID]`.
pub fn merge(local: &dyn Local, a: &MergeArgs) -> CliResult {
    let target: CheckpointTarget = a.target.parse()?;
    let w = local.merge(&target)?;
    render(a.json.json, &w, |w| {
        format!(
            "merged into full checkpoint {} ({}, {} pages, {} of them disk blocks)",
            w.id,
            format_size(w.bytes_written),
            w.pages_written,
            w.disk_blocks
        )
    })
}

/// Options of `vmhop reset`.
#[derive(Args, Debug, Clone)]
pub struct ResetArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// The checkpoint to go back to: DIR@ID.
    #[arg(long, value_name = "DIR@ID")]
    to: String,
}

/// `vmhop reset`.
pub fn reset(a: &ResetArgs) -> CliResult {
    let target: CheckpointTarget = a.to.parse().map_err(CliError::from)?;
    let dir = std::path::absolute(&target.dir)
        .map_err(|e| CliError::usage(format!("--to {}: {e}", a.to)))?;
    let to = match target.id {
        Some(id) => format!("{}@{id}", dir.display()),
        None => dir.display().to_string(),
    };
    let req = ResetRequest { to };
    let r: ResetReport = request(&a.api, Endpoint::Reset, Some(&req), None)?;
    render(a.api.json, &r, |r| {
        format!(
            "reset to checkpoint {} of {}: {} of {} pages rewritten ({}), guest paused {} µs{}",
            r.id,
            r.dir.display(),
            r.pages_rewritten,
            r.pages_total,
            match r.dirty_source {
                DirtySource::DirtyLog => "dirty log",
                DirtySource::Compare => "compared with the checkpoint",
            },
            r.downtime_us,
            if r.armed {
                format!("; armed in {:.1} ms", r.arm_ms)
            } else {
                String::new()
            }
        )
    })
}
