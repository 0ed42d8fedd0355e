//! The command line: one file per subcommand group. It parses, asks, and
//! renders what it hears back; it does no VM work itself.
//!
//! It speaks only the API (`crate::api`): a VM's own process over its
//! socket (every subcommand but `run`/`restore`), and this process's
//! [`Local`] half (`run`, `restore`, `topology`, `checkpoints`, `merge`),
//! which `main` hands in, and `balance`'s planner (a pure function over
//! API types). It imports nothing below the API.

pub mod balance;
pub mod checkpoint;
pub mod control;
pub mod demo;
pub mod migrate;
pub mod numa;
pub mod output;
pub mod progress;
pub mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::api::client::ClientError;
use crate::api::error::ErrorKind;
pub use crate::api::error::{EXIT_FAILED, EXIT_USAGE};
use crate::api::run::Local;
use crate::api::ApiError;

/// A failed command: its message and exit code.
#[derive(Debug)]
pub struct CliError {
    /// 1 (failed) or 2 (usage).
    pub code: u8,
    /// One line for stderr.
    pub message: String,
}

impl CliError {
    /// The operation failed.
    pub fn failed(m: impl std::fmt::Display) -> Self {
        CliError {
            code: EXIT_FAILED,
            message: m.to_string(),
        }
    }
    /// The user asked for something that cannot be.
    pub fn usage(m: impl std::fmt::Display) -> Self {
        CliError {
            code: EXIT_USAGE,
            message: m.to_string(),
        }
    }
}

impl From<ClientError> for CliError {
    /// An error answer exits as its kind says (api::error's table); not
    /// reaching the VM at all is a failure.
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Api { status, .. } => ErrorKind::from_status(*status).exit_code(),
            _ => EXIT_FAILED,
        };
        CliError {
            code,
            message: e.to_string(),
        }
    }
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        CliError {
            code: e.kind.exit_code(),
            message: e.message,
        }
    }
}

/// Result of a subcommand.
pub type CliResult = Result<(), CliError>;

#[derive(Parser, Debug)]
#[command(
    name = "vmhop",
    version,
    about = "A KVM VMM that moves a running VM's memory across NUMA nodes, through time and across hosts"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every API client takes.
#[derive(Args, Debug, Clone)]
pub struct ApiOpts {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// The VM's name (the socket is then the default one for that name).
    #[arg(long, value_name = "NAME", conflicts_with = "api_socket")]
    pub name: Option<String>,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

impl ApiOpts {
    /// The socket to talk to.
    pub fn socket(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| default_socket(self.name.as_deref().unwrap_or(run::DEFAULT_NAME)))
    }
}

/// How the two ends of a migration authenticate each other.
#[derive(Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// Pre-shared key file (at least 16 bytes, mode 0600); both ends give the same.
    #[arg(long, value_name = "FILE")]
    pub auth_key_file: Option<PathBuf>,
    /// TLS: this end's certificate (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this end's private key (PEM, mode 0600).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA that signed the other end's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Allow an unauthenticated migration over a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
}

/// The default API socket of a VM called `name`.
pub fn default_socket(name: &str) -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vmhop"),
        _ if nix_is_root() => PathBuf::from("/run/vmhop"),
        _ => std::env::temp_dir().join(format!("vmhop-{}", users_uid())),
    };
    dir.join(format!("{name}.sock"))
}

fn users_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

fn nix_is_root() -> bool {
    users_uid() == 0
}

/// Options of `vmhop restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// DIR or DIR@ID (default: the latest checkpoint in DIR).
    target: String,
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a VM and serve its API until it is stopped.
    Run(run::RunArgs),
    /// Show a VM's state and its guest's progress.
    Status(ApiOpts),
    /// Stop every vCPU (memory stays).
    Pause(ApiOpts),
    /// Run the vCPUs again.
    Resume(ApiOpts),
    /// Stop the VM and end its vmhop process.
    Stop(ApiOpts),
    /// Check a builtin guest's memory invariant from the host (pauses it meanwhile).
    Verify(ApiOpts),
    /// Checkpoint a running VM (full, or incremental on its last checkpoint in DIR).
    Checkpoint(checkpoint::CheckpointArgs),
    /// List the checkpoints in DIR: id, parent, kind, size, time.
    Checkpoints(checkpoint::ListArgs),
    /// Fold a chain (up to DIR@ID) into one new full checkpoint.
    Merge(checkpoint::MergeArgs),
    /// Delete checkpoint DIR@ID and its clone image (refused while clones of it run).
    Delete(checkpoint::DeleteArgs),
    /// Put a running VM back to checkpoint DIR@ID in place, rewriting only what changed.
    Reset(checkpoint::ResetArgs),
    /// Restore a VM from DIR[@ID] and serve its API (same as run --restore).
    Restore(RestoreArgs),
    /// Re-home guest memory (and its vCPUs) to another host NUMA node while the VM runs.
    NumaMigrate(numa::NumaMigrateArgs),
    /// Show where every guest node's pages live now, and the vCPUs' CPUs.
    NumaStat(ApiOpts),
    /// Live-migrate the VM to another host's `vmhop run --incoming`; this process ends once it runs there.
    Migrate(migrate::MigrateArgs),
    /// Cancel a migration in flight (the VM runs on here).
    MigrateCancel(ApiOpts),
    /// Show the host's NUMA nodes, their CPUs and memory.
    Topology(output::JsonOpt),
    /// Move every VM's guest nodes to where their vCPUs run and memory is free.
    Balance(balance::BalanceArgs),
    /// Run the demo: a builtin guest checkpointed, restored, moved across NUMA
    /// nodes and migrated to a second vmhop process, driven through its API.
    Demo(demo::DemoArgs),
}

/// Entry point of the binary; `local` is the in-process half of vmhop.
pub fn main(local: &dyn Local) -> ExitCode {
    crate::util::process_start();
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMHOP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run::run(local, &a, a.restore.as_deref()),
        Cmd::Status(o) => control::status(&o),
        Cmd::Pause(o) => control::pause(&o),
        Cmd::Resume(o) => control::resume(&o),
        Cmd::Stop(o) => control::stop(&o),
        Cmd::Verify(o) => control::verify(&o),
        Cmd::Checkpoint(a) => checkpoint::checkpoint(&a),
        Cmd::Checkpoints(a) => checkpoint::list(local, &a),
        Cmd::Merge(a) => checkpoint::merge(local, &a),
        Cmd::Delete(a) => checkpoint::delete(local, &a),
        Cmd::Reset(a) => checkpoint::reset(&a),
        Cmd::Restore(a) => run::run(local, &a.run, Some(&a.target)),
        Cmd::NumaMigrate(a) => numa::numa_migrate(&a),
        Cmd::NumaStat(o) => numa::numa_stat(&o),
        Cmd::Migrate(a) => migrate::migrate(&a),
        Cmd::MigrateCancel(o) => migrate::cancel(&o),
        Cmd::Topology(o) => control::topology(local, &o),
        Cmd::Balance(a) => balance::balance(local, &a),
        Cmd::Demo(a) => demo::demo(local, a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmhop: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
