//! `checkpoint`, `checkpoints`, `merge` and `restore`.

use std::path::PathBuf;

use clap::Args;

use super::control::request;
use super::output::{render, JsonOpt};
use super::run::RunArgs;
use super::{ApiOpts, CliError, CliResult};
use crate::checkpoint::chain::{self, Chain};
use crate::checkpoint::create::{CheckpointReport, CheckpointRequest};
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
    let body = serde_json::to_value(&req).map_err(CliError::failed)?;
    let spinner = super::progress::spinner(a.api.json, "writing checkpoint".into());
    let r: Result<CheckpointReport, _> = request(&a.api, "PUT", "vm.checkpoint", Some(body), None);
    spinner.finish_and_clear();
    let r = r?;
    render(a.api.json, &r, |r| {
        format!(
            "checkpoint {} ({}{}) in {}: {} pages, {} written in {:.1} ms; guest paused {} µs{}{}",
            r.id,
            r.kind,
            r.parent.map(|p| format!(" on {p}")).unwrap_or_default(),
            r.dir.display(),
            r.pages_written,
            format_size(r.bytes_written),
            r.total_ms,
            r.downtime_us,
            pause_cost(r),
            if r.stopped { "; VM stopped" } else { "" }
        )
    })
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
    #[command(flatten)]
    json: JsonOpt,
}

/// `vmhop checkpoints DIR`.
pub fn list(a: &ListArgs) -> CliResult {
    let chain = Chain::open(&a.dir).map_err(CliError::failed)?;
    let entries = chain.entries().to_vec();
    let damaged = chain.damaged().to_vec();
    render(
        a.json.json,
        &serde_json::json!({ "dir": a.dir, "checkpoints": entries, "damaged": damaged }),
        |_| {
            let mut bad = String::new();
            for d in &damaged {
                bad += &format!("\n{:>6}  {:>6}  {:<11}  {}", d.id, "-", "DAMAGED", d.reason);
            }
            if entries.is_empty() {
                return format!("no usable checkpoints in {}{bad}", a.dir.display());
            }
            let mut t = format!(
                "{:>6}  {:>6}  {:<11}  {:>10}  {}",
                "id", "parent", "kind", "size", "time"
            );
            for e in &entries {
                let secs = (e.created_unix_ms / 1000) as i64;
                t += &format!(
                    "\n{:>6}  {:>6}  {:<11}  {:>10}  {}",
                    e.id,
                    e.parent
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                    e.kind.to_string(),
                    format_size(e.size_bytes),
                    format_time(secs)
                );
            }
            t + &bad
        },
    )
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
pub fn merge(a: &MergeArgs) -> CliResult {
    let (dir, id) = crate::checkpoint::restore::parse_target(&a.target).map_err(CliError::usage)?;
    let w = chain::merge(&dir, id).map_err(CliError::failed)?;
    let v = serde_json::json!({"operation": "merge", "id": w.id, "path": w.path, "bytes_written": w.bytes_written, "pages_written": w.pages_written});
    render(a.json.json, &v, |_| {
        format!(
            "merged into full checkpoint {} ({}, {} pages)",
            w.id,
            format_size(w.bytes_written),
            w.pages_written
        )
    })
}

/// `vmhop restore DIR[@ID]` (and `run --restore`).
pub fn restore(target: &str, args: &RunArgs) -> CliResult {
    args.reject_config_for_restore()?;
    let (dir, id) = crate::checkpoint::restore::parse_target(target).map_err(CliError::usage)?;
    let socket = args.socket();
    super::run::check_socket_free(&socket)?;
    let set = super::run::block_stop_signals();
    let name = (args.name != super::run::DEFAULT_NAME).then(|| args.name.clone());
    let (vm, report, devs) = crate::checkpoint::restore::restore(
        &dir,
        id,
        name,
        args.paused,
        args.eager,
        &args.console_target(),
    )
    .map_err(CliError::failed)?;
    if let Some(port) = devs.serial {
        crate::devices::serial::forward_stdin(port);
    }
    if !args.json {
        super::output::out_line(&format!(
            "vmhop: restored checkpoint {} ({}, {} file(s), {} pages, {}) in {:.1} ms",
            report.id,
            report.kind,
            report.chain_files,
            report.pages,
            if report.lazy {
                "loading lazily"
            } else {
                "loaded"
            },
            report.resume_ms
        ))?;
    }
    super::run::serve(
        vm,
        &socket,
        args.json,
        set,
        Some(serde_json::to_value(&report).map_err(CliError::failed)?),
        Some(devs.console_bytes),
    )
}
