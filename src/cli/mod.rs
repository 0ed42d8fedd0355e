//! The command line: one file per subcommand group; every subcommand other
//! than `run`/`restore` is a client of the VM's API. This module parses,
//! dispatches and renders reports; it does no VM work itself.

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

/// Exit code: the operation failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage.
pub const EXIT_USAGE: u8 = 2;

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

impl From<crate::api::client::ClientError> for CliError {
    fn from(e: crate::api::client::ClientError) -> Self {
        CliError::failed(e)
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
    /// Run the demo: a builtin guest driven through its API.
    Demo(demo::DemoArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMHOP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => match (&a.restore, &a.incoming) {
            (Some(target), _) => checkpoint::restore(target, &a),
            (None, Some(addr)) => migrate::incoming(addr, &a),
            (None, None) => run::run(a),
        },
        Cmd::Status(o) => control::status(&o),
        Cmd::Pause(o) => control::pause(&o),
        Cmd::Resume(o) => control::resume(&o),
        Cmd::Stop(o) => control::stop(&o),
        Cmd::Verify(o) => control::verify(&o),
        Cmd::Checkpoint(a) => checkpoint::checkpoint(&a),
        Cmd::Checkpoints(a) => checkpoint::list(&a),
        Cmd::Merge(a) => checkpoint::merge(&a),
        Cmd::Restore(a) => checkpoint::restore(&a.target, &a.run),
        Cmd::NumaMigrate(a) => numa::numa_migrate(&a),
        Cmd::NumaStat(o) => numa::numa_stat(&o),
        Cmd::Migrate(a) => migrate::migrate(&a),
        Cmd::MigrateCancel(o) => migrate::cancel(&o),
        Cmd::Topology(o) => control::topology(&o),
        Cmd::Demo(a) => demo::demo(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmhop: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
