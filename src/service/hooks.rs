//! Test hooks: ways for the test suite to make a guest or an operation
//! misbehave on purpose (a guest exception, a NUMA move failing at a given
//! step), so that what vmhop does then can be tested.
//!
//! They come in through the configuration the tests control — the hidden
//! `--test-hook NAME=VALUE` option of `vmhop run` — never from the
//! environment, and reach only the code they name, as plain values passed
//! down (`guest::setup::GuestHooks`, `numa::NumaHooks`). The binary users
//! get is the one the tests run. docs/test-device.md lists them.

use std::time::Duration;

use crate::api::{Classify, ErrorKind};
use crate::guest::setup::{GuestHooks, TestFault};
use crate::numa::{FinishStep, NumaHooks};

/// Every hook of one VMM process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestHooks {
    /// What the builtin guest's boot step does differently.
    pub guest: GuestHooks,
    /// Where NUMA moves fail or wait.
    pub numa: NumaHooks,
    /// Start a Linux guest even where the probe says this KVM runs kernel
    /// code far too slowly: the suite's tiny fake kernels run a few dozen
    /// instructions, which even an emulating KVM does at once.
    pub any_kvm: bool,
    /// A migration destination builds the arriving VM (its disks opened
    /// and locked) and then refuses it, as a destination that fails at the
    /// last step would: the source must get its disks back.
    pub refuse_arrival: bool,
}

/// A `--test-hook` that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--test-hook {given}: {reason}")]
pub struct HookError {
    /// The option as given.
    pub given: String,
    /// What is wrong.
    pub reason: String,
}

impl Classify for HookError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadRequest
    }
}

impl TestHooks {
    /// Parses `NAME=VALUE` options:
    /// `guest-fault=gp|ud|pf|int=N`, `guest-kvmclock`, `linux-any-kvm`,
    /// `numa-finish-delay-ms=N`, `numa-fail-finish=policy|repin|placement`,
    /// `numa-fail-chunk=K`.
    pub fn parse(options: &[String]) -> Result<TestHooks, HookError> {
        let mut h = TestHooks::default();
        for given in options {
            let err = |reason: &str| HookError {
                given: given.clone(),
                reason: reason.to_string(),
            };
            let (name, value) = match given.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (given.as_str(), None),
            };
            match (name, value) {
                ("guest-fault", Some(v)) => {
                    h.guest.fault = Some(
                        TestFault::parse(v)
                            .ok_or_else(|| err("expected gp, ud, pf or int=N (N 0..=255)"))?,
                    )
                }
                ("guest-kvmclock", None) => h.guest.kvmclock = true,
                ("linux-any-kvm", None) => h.any_kvm = true,
                ("incoming-refuse-arrival", None) => h.refuse_arrival = true,
                ("numa-finish-delay-ms", Some(v)) => {
                    let ms: u64 = v.parse().map_err(|_| err("expected milliseconds"))?;
                    h.numa.finish_delay = Some(Duration::from_millis(ms));
                }
                ("numa-fail-finish", Some(v)) => {
                    h.numa.fail_finish = Some(match v {
                        "policy" => FinishStep::Policy,
                        "repin" => FinishStep::Repin,
                        "placement" => FinishStep::Placement,
                        _ => return Err(err("expected policy, repin or placement")),
                    })
                }
                ("numa-fail-chunk", Some(v)) => {
                    h.numa.fail_chunk = Some(v.parse().map_err(|_| err("expected a chunk index"))?)
                }
                _ => {
                    return Err(err(
                        "unknown hook (guest-fault=K, guest-kvmclock, linux-any-kvm, \
                         incoming-refuse-arrival, numa-finish-delay-ms=N, \
                         numa-fail-finish=STEP, numa-fail-chunk=K)",
                    ))
                }
            }
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_parse_and_unknown_ones_are_refused() {
        let h = TestHooks::parse(&[
            "guest-fault=gp".into(),
            "guest-kvmclock".into(),
            "linux-any-kvm".into(),
            "incoming-refuse-arrival".into(),
            "numa-finish-delay-ms=250".into(),
            "numa-fail-finish=repin".into(),
            "numa-fail-chunk=3".into(),
        ])
        .unwrap();
        assert_eq!(h.guest.fault, TestFault::parse("gp"));
        assert!(h.guest.kvmclock && h.any_kvm && h.refuse_arrival);
        assert_eq!(h.numa.finish_delay, Some(Duration::from_millis(250)));
        assert_eq!(h.numa.fail_finish, Some(FinishStep::Repin));
        assert_eq!(h.numa.fail_chunk, Some(3));
        assert_eq!(TestHooks::parse(&[]).unwrap(), TestHooks::default());
        for bad in [
            "nope",
            "guest-fault=xx",
            "numa-fail-finish=later",
            "guest-kvmclock=1",
        ] {
            assert!(TestHooks::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
