//! The builtin guests: small x86-64 programs shipped inside vmhop that run
//! their work loop at CPL3 (long mode, paging on), with an IDT whose CPL0
//! handlers report any exception or interrupt to the test device, and the
//! host-side `verify` of their memory invariant.
//!
//! This module writes the guest's tables and code into guest memory and
//! describes the vCPUs' boot state; it does not run vCPUs (see `vmm`).
//!
//! Guest-physical map of the reserved first 2 MiB (see docs/test-device.md):
//!
//! | address    | what                                                  |
//! |------------|-------------------------------------------------------|
//! | 0x1000     | GDT (fixed entries, then one TSS descriptor per vCPU) |
//! | 0x2000     | IDT: 256 gates                                        |
//! | 0x3000     | control page: magic, kind, vCPU count                 |
//! | 0x4000     | per-vCPU blocks, 64 bytes each                        |
//! | 0x5000     | per-vCPU TSSes, 128 bytes apart                       |
//! | 0x7000     | the I/O permission bitmap they share (to 0x9001)      |
//! | 0x10000    | code                                                  |
//! | 0x11000    | test-fault routine (test hook only)                   |
//! | 0x12000    | IDT handlers (CPL0)                                   |
//! | 0x20000    | per-vCPU range tables, one page each                  |
//! | 0x60000    | per-vCPU exception stacks, one page each              |
//! | 0x100000   | page tables (PML4, PDPT, one PD per GiB)              |
//! | 0x200000 … | the working set                                       |

pub mod abi;
pub mod program;
pub mod setup;
pub mod verify;

use serde::{Deserialize, Serialize};

use crate::util::parse_size;
use crate::vmm::ConfigError;

/// Pages the builtin guest has written so far: the sum of its vCPUs'
/// progress counters in guest memory (0 for a guest that is not builtin,
/// whose memory vmhop does not interpret).
pub fn progress(vm: &crate::vmm::Vm) -> u64 {
    let c = vm.config();
    if !c.guest.is_builtin() {
        return 0;
    }
    let m = vm.memory();
    (0..c.vcpus as u64)
        .filter_map(|v| {
            m.read_u64(setup::BLOCKS_ADDR + v * program::block::SIZE + program::block::PROGRESS)
        })
        .sum()
}

/// Guest memory the builtin guests keep for their code and tables.
pub const RESERVED_BYTES: u64 = 2 << 20;
/// Smallest VM a builtin guest runs in: the reserved area plus 2 MiB of work.
pub const MIN_MEMORY: u64 = 4 << 20;

/// Most vCPUs the builtin guests have tables (blocks, TSSs, stacks) for;
/// the VMM allows no more (`vmm::config::MAX_VCPUS` is this).
pub const MAX_VCPUS: u32 = 64;

/// Which guest runs, with its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum GuestSpec {
    /// `builtin:idle`.
    Idle,
    /// A Linux kernel booted directly (`--kernel`).
    Linux(crate::arch::x86_64::linux::LinuxSpec),
    /// `builtin:dirty[,wss=SIZE][,rate=PAGES_PER_S][,fill=random]`.
    Dirty {
        /// Working-set bytes (None: all memory outside the reserved area).
        wss: Option<u64>,
        /// Pages per second over all vCPUs (None: as fast as it can).
        rate: Option<u64>,
        /// Fill the working set with random bytes before start, so that
        /// zero-page skipping does not flatter benchmarks.
        fill_random: bool,
    },
}

impl GuestSpec {
    /// Parses `builtin:NAME[,key=value...]`.
    pub fn parse(s: &str) -> Result<GuestSpec, ConfigError> {
        let rest = s.strip_prefix("builtin:").ok_or_else(|| {
            ConfigError::Invalid(format!(
                "--guest {s}: expected builtin:idle or builtin:dirty[,wss=SIZE][,rate=N]"
            ))
        })?;
        let mut parts = rest.split(',');
        let name = parts.next().unwrap_or_default();
        match name {
            "idle" => {
                if let Some(p) = parts.next() {
                    return Err(ConfigError::Invalid(format!(
                        "--guest builtin:idle takes no options (got '{p}')"
                    )));
                }
                Ok(GuestSpec::Idle)
            }
            "dirty" => {
                let (mut wss, mut rate, mut fill_random) = (None, None, false);
                for kv in parts {
                    match kv.split_once('=') {
                        Some(("wss", v)) => wss = Some(parse_size(v).map_err(|e| ConfigError::Invalid(format!("--guest: wss: {e}")))?),
                        Some(("rate", v)) => {
                            let r: u64 = v.parse().map_err(|_| ConfigError::Invalid(format!("--guest: rate={v} is not a number of pages per second")))?;
                            if r == 0 {
                                return Err(ConfigError::Invalid("--guest: rate must be at least 1 page per second".into()));
                            }
                            rate = Some(r)
                        }
                        Some(("fill", "random")) => fill_random = true,
                        Some(("fill", "zero")) => fill_random = false,
                        _ => return Err(ConfigError::Invalid(format!("--guest: unknown option '{kv}' for builtin:dirty (expected wss=SIZE, rate=N, fill=random|zero)"))),
                    }
                }
                if wss == Some(0) {
                    return Err(ConfigError::Invalid("--guest: wss must not be 0".into()));
                }
                Ok(GuestSpec::Dirty {
                    wss,
                    rate,
                    fill_random,
                })
            }
            other => Err(ConfigError::Invalid(format!(
                "--guest: unknown builtin guest '{other}' (expected idle or dirty)"
            ))),
        }
    }

    /// Short name for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestSpec::Idle => "builtin:idle",
            GuestSpec::Dirty { .. } => "builtin:dirty",
            GuestSpec::Linux(_) => "linux",
        }
    }

    /// Pages per second the builtin dirtying guest is held to (None: as
    /// fast as it can, or a guest with no rate).
    pub fn rate(&self) -> Option<u64> {
        match self {
            GuestSpec::Dirty { rate, .. } => *rate,
            _ => None,
        }
    }

    /// Whether this is one of the builtin CPL3 guests (which run without
    /// an interrupt controller and talk to the test device).
    pub fn is_builtin(&self) -> bool {
        !matches!(self, GuestSpec::Linux(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_options_parse() {
        assert_eq!(GuestSpec::parse("builtin:idle").unwrap(), GuestSpec::Idle);
        assert_eq!(
            GuestSpec::parse("builtin:dirty,wss=64M,rate=1000").unwrap(),
            GuestSpec::Dirty {
                wss: Some(64 << 20),
                rate: Some(1000),
                fill_random: false
            }
        );
        assert!(GuestSpec::parse("builtin:dirty,speed=3").is_err());
        assert!(GuestSpec::parse("linux").is_err());
        assert!(GuestSpec::parse("builtin:nope").is_err());
    }
}
