//! `vmhop demo`: the project's main job shown end to end, on a builtin
//! guest or, with `--kernel`, on a Linux guest.
//!
//! Like a user, the demo starts real `vmhop run`/`restore` child processes
//! (this same binary) on private API sockets and drives them through the
//! HTTP API; it does no VM work itself and imports nothing below
//! `crate::api`. A step that fails ends the demo with a message naming the
//! step (exit 1); the VMs are stopped whatever happens.
//!
//! - `script`: the builtin demo's steps, in order (start, pause/verify/
//!   resume, checkpoints, lazy restore, NUMA moves, host migration, stop);
//! - `linux` (with `initramfs`): the Linux demo's steps;
//! - `checks`: what a step asks a VM and what it checks in the answer;
//! - `supervise`: the child processes, their work dir, and the clean-up on
//!   every path (success, failure, Ctrl-C);
//! - `render` and `report`: the text, and the `--json` object.
//!
//! This file holds the options, the errors, and how both demos begin and end.

mod checks;
mod initramfs;
mod linux;
mod render;
mod report;
mod script;
mod supervise;

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::{CliError, CliResult};
use crate::api::client::ClientError;
use crate::api::run::Local;
use render::Out;
use report::Outcome;
use supervise::Supervisor;

/// Options of `vmhop demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Guest memory (K, M, G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Pages per second the guest writes [default: 20000; 5000 in a debug build].
    #[arg(long, value_name = "PAGES_PER_S")]
    pub rate: Option<u64>,
    /// Keep the work directory (checkpoints, VM logs) instead of removing it.
    #[arg(long)]
    pub keep_dir: bool,
    /// Print one JSON object with every report, instead of text.
    #[arg(long)]
    pub json: bool,
    /// Show the job on a Linux guest booted from this kernel instead
    /// (hardware-assisted KVM only; says so on a paravirtualised one).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// With --kernel: the initramfs (default: one the demo packs from the
    /// host's static busybox, whose checker prints a heartbeat).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// With --kernel: the kernel command line.
    #[arg(long, value_name = "STRING", requires = "kernel")]
    pub cmdline: Option<String>,
}

/// Why the demo failed; each message names the step and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The work directory could not be made.
    #[error("cannot create the demo's work directory {}: {source}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The path of this binary is unknown, so no VM can be started.
    #[error("cannot find the vmhop binary to start VMs with: {0}")]
    Exe(std::io::Error),
    /// A child's log file could not be created.
    #[error("cannot create the VM log {}: {source}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A child process could not be started.
    #[error("cannot start `vmhop {what}`: {source}")]
    Spawn {
        /// The subcommand.
        what: String,
        /// The OS error from fork/exec.
        source: std::io::Error,
    },
    /// A child VM did not print a report it should have (its start report
    /// when its API comes up, a destination's when the VM arrives).
    #[error("`vmhop {what}` gave no {step}: {reason}{log}")]
    NotUp {
        /// The subcommand.
        what: String,
        /// The report awaited.
        step: String,
        /// What happened instead.
        reason: String,
        /// The end of its log, if any.
        log: String,
    },
    /// An API call failed.
    #[error("{step}: {source}{log}")]
    Api {
        /// The demo step.
        step: String,
        /// The client's error (the server's message for 4xx/5xx).
        source: ClientError,
        /// Whether the VM died, and the end of its log.
        log: String,
    },
    /// An API call answered something that is not the expected report.
    #[error("{step}: unexpected reply from the VM: {reason}")]
    Reply {
        /// The demo step.
        step: String,
        /// The decoding error.
        reason: String,
    },
    /// A report says the step did not do what it should.
    #[error("{step}: {reason}")]
    Check {
        /// The demo step.
        step: String,
        /// What is wrong.
        reason: String,
    },
    /// A child VM did not exit cleanly when it should have.
    #[error("`vmhop {what}` did not exit cleanly after {after}: {reason}{log}")]
    Exit {
        /// The subcommand.
        what: String,
        /// What should have ended it (stop, the migration).
        after: String,
        /// Its exit status, or that it did not exit.
        reason: String,
        /// The end of its log.
        log: String,
    },
    /// A `vmhop` command the demo runs to its end failed.
    #[error("`vmhop {what}` failed: {reason}")]
    Command {
        /// Its arguments.
        what: String,
        /// Its exit status and stderr, or why its output is unusable.
        reason: String,
    },
}
/// Runs the demo; exit 1 (with the failed step's message) if any step fails.
pub fn demo(local: &dyn Local, a: DemoArgs) -> CliResult {
    let which = match &a.kernel {
        Some(kernel) => {
            if let Err(e) = local.linux_capable() {
                return Err(CliError::failed(format!("demo --kernel: {e}")));
            }
            Which::Linux(linux::LinuxPlan {
                kernel: kernel.clone(),
                initrd: a.initrd.clone(),
                cmdline: a.cmdline.clone(),
            })
        }
        None => Which::Builtin(
            script::Plan::from_args(&a)?,
            render::linux_note(local.linux_capable().err()),
        ),
    };
    let sup = Supervisor::start(a.keep_dir).map_err(CliError::failed)?;
    let cleanup = sup.cleanup();
    let out = Out::new(a.json);
    let r = match which {
        Which::Linux(plan) => linux::run(plan, sup, out),
        Which::Builtin(plan, linux_note) => script::run(plan, sup, out, linux_note),
    };
    cleanup.yield_to_signal();
    r
}

/// Which demo runs.
enum Which {
    /// On a Linux guest (`--kernel`).
    Linux(linux::LinuxPlan),
    /// On the builtin guest, with what to say of Linux guests here.
    Builtin(script::Plan, String),
}

/// How both demos end once every step passed: the work dir removed (and
/// said so), then with `--json` the one object (`found` in an
/// [`Outcome`]), else the `closing` text, given the total seconds.
fn conclude<T: Serialize>(
    sup: &mut Supervisor,
    out: &Out,
    started: Instant,
    guest: Option<&'static str>,
    linux_guests: Option<&str>,
    found: &T,
    closing: impl FnOnce(f64) -> String,
) -> CliResult {
    let removed = sup.remove_dir();
    let dir = sup.dir().display();
    match &removed {
        Ok(true) => out.line(format!("work dir {dir} removed")),
        Ok(false) => out.line(format!("work dir kept: {dir}")),
        Err(e) => out.line(format!("warning: {e}")),
    }
    let total_s = started.elapsed().as_secs_f64();
    if out.json() {
        return super::output::print_json(&Outcome {
            operation: "demo",
            guest,
            ok: true,
            total_ms: total_s * 1e3,
            work_dir: sup.dir(),
            work_dir_kept: !matches!(removed, Ok(true)),
            linux_guests,
            found,
        });
    }
    let text = closing(total_s);
    if !text.is_empty() {
        out.raw(&text);
    }
    Ok(())
}

/// The error a failed demo exits with: the step's message, and where its
/// files are (or how to keep them).
fn failure(e: DemoError, sup: &Supervisor) -> CliError {
    let hint = if sup.keeps_dir() {
        format!(
            "\n  (checkpoints, consoles and VM logs kept in {})",
            sup.dir().display()
        )
    } else {
        "\n  (rerun with --keep-dir to keep the checkpoints, consoles and VM logs)".to_string()
    };
    CliError::failed(format!("demo failed: {e}{hint}"))
}
