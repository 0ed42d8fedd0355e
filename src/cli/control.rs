//! Client subcommands that query or drive a running VM: status, pause,
//! resume, stop, verify; and topology, which reads the host.

use std::time::Duration;

use super::output::{render, JsonOpt};
use super::{ApiOpts, CliError, CliResult};
use crate::api::client::call;
use crate::api::run::Local;
use crate::api::vm::{AnyStatus, StateReply, VerifyReport};
use crate::api::Endpoint;
use crate::util::format_size;

/// How long a quick request may take before the client gives up.
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls an endpoint with `body` and decodes its report.
pub fn request<T: serde::de::DeserializeOwned>(
    o: &ApiOpts,
    ep: Endpoint,
    body: Option<&impl serde::Serialize>,
    timeout: Option<Duration>,
) -> Result<T, CliError> {
    let body = body
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| CliError::failed(format!("cannot encode the request: {e}")))?;
    let v = call(
        &o.socket(),
        ep.method().as_str(),
        &ep.path(),
        body.as_ref(),
        timeout,
    )?;
    serde_json::from_value(v).map_err(|e| {
        CliError::failed(format!(
            "unexpected reply from {}: {e}",
            o.socket().display()
        ))
    })
}

/// No request body.
pub const NO_BODY: Option<&()> = None;

/// `vmhop status`.
pub fn status(o: &ApiOpts) -> CliResult {
    let s: AnyStatus = request(o, Endpoint::Status, NO_BODY, Some(QUICK_TIMEOUT))?;
    let s = match s {
        AnyStatus::Incoming(r) => {
            return render(o.json, &r, |r| {
                let mut t = format!("waiting for an incoming migration on {}", r.listening);
                if let Some(s) = &r.source {
                    t += &format!(
                        "\n  receiving from {s}: {} pages, {}",
                        r.pages_received,
                        format_size(r.bytes_received)
                    );
                }
                if let Some(e) = &r.last_error {
                    t += &format!("\n  last source failed: {e}");
                }
                t
            })
        }
        AnyStatus::Vm(s) => s,
    };
    render(o.json, &s, |s| {
        let mut t = format!(
            "VM '{}' is {} — {} vCPUs, {}, guest {} (progress {})",
            s.name,
            s.state,
            s.vcpus,
            format_size(s.memory_bytes),
            s.guest.kind,
            s.guest.progress
        );
        if let Some(r) = &s.stop_reason {
            t += &format!("\n  stopped: {r}");
        }
        for n in &s.numa {
            t += &format!(
                "\n  guest node {}: {} on host node {}",
                n.guest_node,
                format_size(n.size_bytes),
                n.host_node
            );
        }
        for d in &s.disks {
            t += &format!("\n  disk {}: {}", d.id, d.path.display());
            match (&d.over, d.filled_percent) {
                (Some(o), Some(p)) => t += &format!(" (filling from {o}: {p}%)"),
                (Some(o), None) => t += &format!(" over {o} (read-only)"),
                _ => {}
            }
        }
        t
    })
}

fn state_cmd(o: &ApiOpts, ep: Endpoint, verb: &str) -> CliResult {
    let r: StateReply = request(o, ep, NO_BODY, Some(QUICK_TIMEOUT))?;
    render(o.json, &r, |r| match r.pause_us {
        Some(us) => format!("{verb} (all vCPUs stopped in {us} µs)"),
        None => verb.to_string(),
    })
}

/// `vmhop pause`.
pub fn pause(o: &ApiOpts) -> CliResult {
    state_cmd(o, Endpoint::Pause, "paused")
}

/// `vmhop resume`.
pub fn resume(o: &ApiOpts) -> CliResult {
    state_cmd(o, Endpoint::Resume, "resumed")
}

/// `vmhop stop`.
pub fn stop(o: &ApiOpts) -> CliResult {
    state_cmd(o, Endpoint::Stop, "stopped")
}

/// `vmhop verify`; fails (exit 1) if the invariant is broken.
pub fn verify(o: &ApiOpts) -> CliResult {
    let r: VerifyReport = request(o, Endpoint::Verify, NO_BODY, Some(QUICK_TIMEOUT))?;
    render(o.json, &r, |r| {
        let mut t = if r.ok {
            format!(
                "ok: {} pages checked, memory {}consistent",
                r.pages_checked,
                if r.disk.is_some() { "and disk " } else { "" }
            )
        } else {
            format!(
                "FAILED: {} violations in {} pages checked",
                r.violation_count, r.pages_checked
            )
        };
        if let Some(d) = &r.disk {
            t += &format!(
                "\n  disk 0: {} blocks checked ({} written by the guest), {} read slots checked; the guest completed {} requests ({} writes, {} read-backs), {} I/O errors, {} bad read-backs",
                d.blocks_checked, d.blocks_written, d.slots_checked, d.requests, d.writes, d.reads, d.io_errors, d.guest_errors
            );
        }
        for v in &r.violations {
            t += &format!(
                "\n  {} {}: {}",
                v.vcpu
                    .map(|c| format!("vCPU {c}"))
                    .unwrap_or_else(|| "control".into()),
                v.gpa,
                v.problem
            );
        }
        t
    })?;
    if r.ok {
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "verify found {} violations",
            r.violation_count
        )))
    }
}

/// `vmhop topology`.
pub fn topology(local: &dyn Local, o: &JsonOpt) -> CliResult {
    let t = local.topology()?;
    render(o.json, &t, |t| {
        let mut s = format!("{} NUMA node(s)", t.nodes.len());
        for n in &t.nodes {
            s += &format!(
                "\n  node {}: CPUs {}, {} total, {} free, distances {:?}",
                n.id,
                crate::util::format_cpu_list(&n.cpus),
                format_size(n.total_bytes),
                format_size(n.free_bytes),
                n.distances
            );
        }
        s
    })
}
