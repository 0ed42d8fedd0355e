//! Host migration: the request and report of `migrate`, its progress, and
//! what the destination reports when a VM arrives.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::numa::check_downtime_ms;
use super::transfer::PauseBreakdown;

/// Default downtime budget of a migration, ms.
pub const DEFAULT_MAX_DOWNTIME_MS: f64 = 5.0;
/// Largest `timeout_s`: a day.
pub const MAX_TIMEOUT_S: f64 = 86_400.0;
/// Most connections one migration may open (`--connections`).
pub const MAX_CONNECTIONS: u32 = 16;

/// What the sender tries on page data (`--compress none|lz4|zstd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Pages are sent raw.
    #[default]
    None,
    /// LZ4 block compression: fast, modest ratio.
    Lz4,
    /// zstd at level 1: slower, better ratio for slow links.
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Compression, String> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(format!(
                "'{s}' is not a compression: expected none, lz4 or zstd"
            )),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        })
    }
}

/// How the two ends of a migration authenticate each other: the files
/// each side names (absolute paths: the VM's process reads them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthFiles {
    /// Pre-shared key file (the other side has the same).
    #[serde(default)]
    pub auth_key_file: Option<PathBuf>,
    /// TLS: this side's certificate (PEM).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this side's private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA that signed the other side's certificate (PEM).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Allow an unauthenticated migration over a non-local address.
    #[serde(default)]
    pub insecure: bool,
}

/// Which way of authenticating [`AuthFiles`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthChoice<'a> {
    /// None (local addresses, or `insecure`).
    None,
    /// A pre-shared key in this file.
    Key(&'a PathBuf),
    /// Mutual TLS: certificate, key, CA.
    Tls(&'a PathBuf, &'a PathBuf, &'a PathBuf),
}

impl AuthFiles {
    /// Which method the files ask for, or why they make no sense together.
    pub fn choice(&self) -> Result<AuthChoice<'_>, ApiError> {
        match (
            &self.auth_key_file,
            &self.tls_cert,
            &self.tls_key,
            &self.tls_ca,
        ) {
            (None, None, None, None) => Ok(AuthChoice::None),
            (Some(k), None, None, None) => Ok(AuthChoice::Key(k)),
            (None, Some(c), Some(k), Some(ca)) => Ok(AuthChoice::Tls(c, k, ca)),
            (Some(_), ..) => Err(ApiError::bad_request(
                "give either a pre-shared key (--auth-key-file) or TLS, not both",
            )),
            _ => Err(ApiError::bad_request(
                "TLS needs all three of --tls-cert, --tls-key and --tls-ca (this side's \
                 certificate and key, and the CA that signed the other side's)",
            )),
        }
    }
}

/// Body of `PUT /api/v1/vm.migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination: `tcp://HOST:PORT` or `unix:PATH`.
    pub to: String,
    /// Downtime budget of the last round, ms.
    #[serde(default)]
    pub max_downtime_ms: Option<f64>,
    /// Cancel the migration after this many seconds.
    #[serde(default)]
    pub timeout_s: Option<f64>,
    /// Compression of page data.
    #[serde(default)]
    pub compress: Compression,
    /// Pre-shared key file (the destination has the same).
    #[serde(default)]
    pub auth_key_file: Option<PathBuf>,
    /// TLS: this side's certificate (PEM).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this side's private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA that signed the destination's certificate (PEM).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Allow an unauthenticated migration to a non-local address.
    #[serde(default)]
    pub insecure: bool,
    /// Send the disks' blocks in the same pre-copy (the destination has no
    /// shared storage: it writes them to the files its `--disk` names).
    #[serde(default)]
    pub copy_storage: bool,
    /// Connections to spread the page stream over, 1 to
    /// [`MAX_CONNECTIONS`] (default 1).
    #[serde(default)]
    pub connections: Option<u32>,
}

impl MigrateRequest {
    /// How the destination is to be authenticated. (The fields are the
    /// request's own rather than a flattened [`AuthFiles`], since serde
    /// cannot refuse unknown fields through a flatten.)
    pub fn auth(&self) -> AuthFiles {
        AuthFiles {
            auth_key_file: self.auth_key_file.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_ca: self.tls_ca.clone(),
            insecure: self.insecure,
        }
    }

    /// The downtime budget asked for (or the default), checked.
    pub fn max_downtime(&self) -> Result<Duration, ApiError> {
        let ms = check_downtime_ms(self.max_downtime_ms.unwrap_or(DEFAULT_MAX_DOWNTIME_MS))?;
        Ok(Duration::from_secs_f64(ms / 1e3))
    }

    /// The connections asked for (or 1), checked.
    pub fn connections(&self) -> Result<u32, ApiError> {
        match self.connections {
            None => Ok(1),
            Some(n) if (1..=MAX_CONNECTIONS).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::bad_request(format!(
                "connections must be 1 to {MAX_CONNECTIONS}, got {n}"
            ))),
        }
    }

    /// The timeout asked for, checked.
    pub fn timeout(&self) -> Result<Option<Duration>, ApiError> {
        match self.timeout_s {
            None => Ok(None),
            Some(s) if s > 0.0 && s <= MAX_TIMEOUT_S => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => Err(ApiError::bad_request(format!(
                "timeout_s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}, got {s}"
            ))),
        }
    }
}

/// What a migration did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrateReport {
    /// Always "migrate".
    pub operation: String,
    /// The destination.
    pub to: String,
    /// Microseconds no vCPU ran on either host: from the source's pause
    /// until the destination confirmed its VM runs.
    pub downtime_us: u64,
    /// Whole migration, ms.
    pub total_ms: f64,
    /// Copy rounds, the final one included.
    pub rounds: u32,
    /// Pages handed to the stream (zero pages included; a page sent in two
    /// rounds counts twice).
    pub pages_sent: u64,
    /// Of those, pages sent as zero runs (a few bytes per run).
    pub zero_pages: u64,
    /// Bytes on the wire (frames, headers and checksums included).
    pub bytes_sent: u64,
    /// Bytes of page data before compression (zero pages excluded).
    pub page_bytes: u64,
    /// The compression asked for.
    pub compression: Compression,
    /// Page frames that compression made smaller (the rest went raw).
    pub compressed_frames: u64,
    /// Pages sent in the pause.
    pub pages_in_pause: u64,
    /// Whether the dirty set converged to the budget.
    pub converged: bool,
    /// The highest vCPU throttle auto-converge used, percent.
    pub throttle_max_percent: u32,
    /// Measured link rate, MiB/s of page data.
    pub link_mib_s: f64,
    /// Dirty pages seen in each pre-copy round after the first.
    pub dirty_per_round: Vec<u64>,
    /// Where the pause went.
    pub pause_breakdown: PauseBreakdown,
    /// With `--copy-storage`: disk blocks (4 KiB) sent, zero ones and
    /// blocks sent in two rounds included; 0 on shared storage.
    #[serde(default)]
    pub disk_blocks_sent: u64,
    /// Connections the page stream was spread over.
    #[serde(default = "one")]
    pub connections: u32,
}

fn one() -> u32 {
    1
}

/// `GET /api/v1/vm.migration`: the migration in flight, if any.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationProgress {
    /// Whether one is in flight.
    pub in_progress: bool,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Bytes of page data sent so far.
    pub page_bytes_sent: u64,
    /// Guest memory, bytes (what a progress bar goes up to).
    pub memory_bytes: u64,
}

/// What the destination did when a VM arrived.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReceiveReport {
    /// Always "incoming-migration".
    pub operation: String,
    /// Where the VM came from.
    pub source: String,
    /// Bytes received.
    pub bytes_received: u64,
    /// Pages received (zero runs included).
    pub pages_received: u64,
    /// From `done` until the VM ran here, ms.
    pub start_ms: f64,
    /// With `--copy-storage`: each disk and the new file it was copied
    /// into here.
    #[serde(default)]
    pub copied_disks: Vec<CopiedDisk>,
}

/// A disk a migration with `--copy-storage` copied to the destination.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CopiedDisk {
    /// Its id.
    pub id: String,
    /// The file it is in now.
    pub path: PathBuf,
}
