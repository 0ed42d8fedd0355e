//! `migrate` and `migrate-cancel`, clients of the source's API (the
//! destination, `run --incoming`, is a `run`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::control::{request, NO_BODY, QUICK_TIMEOUT};
use super::output::render;
use super::{ApiOpts, AuthArgs, CliError, CliResult};
use crate::api::migration::{Compression, MigrateReport, MigrateRequest, MigrationProgress};
use crate::api::vm::Cancelled;
use crate::api::Endpoint;

/// Options of `vmhop migrate`.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// Destination: tcp://HOST:PORT or unix:PATH (a `vmhop run --incoming` there).
    #[arg(long, value_name = "ADDRESS")]
    to: String,
    /// Downtime budget of the last round in milliseconds (default 5).
    #[arg(long, value_name = "MS")]
    max_downtime_ms: Option<f64>,
    /// Cancel the migration after this many seconds (the VM runs on here).
    #[arg(long, value_name = "S")]
    timeout: Option<f64>,
    /// Compression of page data: none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compress: Compression,
    /// Send the disks' blocks too, in the same pre-copy (no shared
    /// storage: the destination gives each disk a new file with
    /// `--disk id=NAME,path=FILE`).
    #[arg(long)]
    copy_storage: bool,
    /// Spread the page stream over N connections (1 to 16), each
    /// authenticated (and, with a key, encrypted) on its own.
    #[arg(long, value_name = "N", default_value_t = 1)]
    connections: u32,
    #[command(flatten)]
    auth: AuthArgs,
}

/// A path the VM's process can open whatever its working directory.
fn absolute(p: &Option<PathBuf>) -> Result<Option<PathBuf>, CliError> {
    p.as_ref()
        .map(|p| {
            std::path::absolute(p).map_err(|e| CliError::usage(format!("{}: {e}", p.display())))
        })
        .transpose()
}

/// Polls the source's progress for the bar, until the migration ends.
fn show_progress(api: &ApiOpts, to: &str) -> Option<std::thread::JoinHandle<()>> {
    use std::io::IsTerminal;
    if api.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let api = api.clone();
    let to = to.to_string();
    std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} migrating to {msg} {bytes}/{total_bytes} sent ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(to);
            let mut seen = false;
            loop {
                let p: Result<MigrationProgress, _> =
                    request(&api, Endpoint::Migration, NO_BODY, Some(QUICK_TIMEOUT));
                let Ok(p) = p else { break };
                if !p.in_progress && seen {
                    break;
                }
                seen |= p.in_progress;
                bar.set_length(p.memory_bytes);
                bar.set_position(p.page_bytes_sent);
                std::thread::sleep(Duration::from_millis(200));
            }
            bar.finish_and_clear();
        })
        .ok()
}

/// `vmhop migrate`.
pub fn migrate(a: &MigrateArgs) -> CliResult {
    let req = MigrateRequest {
        to: a.to.clone(),
        max_downtime_ms: a.max_downtime_ms,
        timeout_s: a.timeout,
        compress: a.compress,
        auth_key_file: absolute(&a.auth.auth_key_file)?,
        tls_cert: absolute(&a.auth.tls_cert)?,
        tls_key: absolute(&a.auth.tls_key)?,
        tls_ca: absolute(&a.auth.tls_ca)?,
        insecure: a.auth.insecure,
        copy_storage: a.copy_storage,
        connections: Some(a.connections),
    };
    let progress = show_progress(&a.api, &a.to);
    let r: Result<MigrateReport, _> = request(&a.api, Endpoint::Migrate, Some(&req), None);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let r = r?;
    render(a.api.json, &r, |r| {
        let mut t = format!(
            "migrated to {}: downtime {} µs, {:.1} ms in all, {} round(s), {} pages ({} zero), {} on the wire at {:.0} MiB/s",
            r.to,
            r.downtime_us,
            r.total_ms,
            r.rounds,
            r.pages_sent,
            r.zero_pages,
            crate::util::format_size(r.bytes_sent),
            r.link_mib_s
        );
        if r.connections > 1 {
            t += &format!(" over {} connections", r.connections);
        }
        if r.disk_blocks_sent > 0 {
            t += &format!(
                "\n  disks: {} blocks of 4 KiB sent with the memory (--copy-storage)",
                r.disk_blocks_sent
            );
        }
        if r.throttle_max_percent > 0 {
            t += &format!(
                "\n  the guest was throttled up to {} %",
                r.throttle_max_percent
            );
        }
        if !r.converged {
            t += "\n  the dirty rate did not converge: the last round was a bounded stop-copy";
        }
        t
    })
}

/// `vmhop migrate-cancel`.
pub fn cancel(o: &ApiOpts) -> CliResult {
    let v: Cancelled = request(o, Endpoint::MigrateCancel, NO_BODY, Some(QUICK_TIMEOUT))?;
    render(o.json, &v, |_| {
        "migration cancelled; the VM runs on here".into()
    })
}
