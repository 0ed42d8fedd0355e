//! `numa-migrate` and `numa-stat`.

use clap::Args;

use super::control::{request, NO_BODY};
use super::output::render;
use super::{ApiOpts, CliResult};
use crate::api::numa::{Mode, NumaMigrateReport, NumaMigrateRequest, NumaStatReport};
use crate::api::Endpoint;

/// Options of `vmhop numa-migrate`.
#[derive(Args, Debug, Clone)]
pub struct NumaMigrateArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// Target host node.
    #[arg(long, value_name = "H")]
    to_node: u32,
    /// Guest node to move (default: all).
    #[arg(long, value_name = "G")]
    guest_node: Option<u32>,
    /// live, stop-copy or kernel.
    #[arg(long, default_value = "live")]
    mode: Mode,
    /// Downtime budget per pause in milliseconds (default 1).
    #[arg(long, value_name = "MS")]
    max_downtime_ms: Option<f64>,
}

fn fmt_placement(p: &std::collections::BTreeMap<String, u64>) -> String {
    if p.is_empty() {
        return "no pages present".into();
    }
    p.iter()
        .map(|(n, c)| format!("node {n}: {c} pages"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `vmhop numa-migrate`.
pub fn numa_migrate(a: &NumaMigrateArgs) -> CliResult {
    let req = NumaMigrateRequest {
        to_node: a.to_node,
        guest_node: a.guest_node,
        mode: a.mode,
        max_downtime_ms: a.max_downtime_ms,
    };
    let spinner = super::progress::spinner(
        a.api.json,
        format!("moving guest memory to host node {}", a.to_node),
    );
    let r: Result<NumaMigrateReport, _> = request(&a.api, Endpoint::NumaMigrate, Some(&req), None);
    spinner.finish_and_clear();
    let r = r?;
    render(a.api.json, &r, |r| {
        let mode = r.mode;
        let mut t = format!(
            "moved guest node(s) {:?} to host node {} ({mode}): {} pages in {:.1} ms, {} round(s), {} pause(s), longest pause {} µs, paused {} µs in all",
            r.guest_nodes, r.to_node, r.pages_moved, r.total_ms, r.rounds, r.pauses, r.downtime_us, r.paused_total_us
        );
        if r.fallback_chunks > 0 {
            t += &format!("\n  the dirty rate did not converge: {} chunk(s) finished with a bounded stop-copy", r.fallback_chunks);
        }
        if r.pauses_over_budget > 0 {
            t += &format!(
                "\n  {} pause(s) took longer than the {} µs budget (the longest {} µs)",
                r.pauses_over_budget, r.max_downtime_us, r.downtime_us
            );
        }
        if let Some(b) = &r.batches {
            t += &format!(
                "\n  kernel: {} move_pages batches of {} pages, median {} µs, max {} µs",
                b.count, b.pages_per_batch, b.median_us, b.max_us
            );
        }
        t += &format!(
            "\n  before: {}\n  after:  {}",
            fmt_placement(&r.placement_before),
            fmt_placement(&r.placement_after)
        );
        t
    })
}

/// `vmhop numa-stat`.
pub fn numa_stat(o: &ApiOpts) -> CliResult {
    let r: NumaStatReport = request(
        o,
        Endpoint::NumaStat,
        NO_BODY,
        Some(super::control::QUICK_TIMEOUT),
    )?;
    render(o.json, &r, |r| {
        let mut t = String::new();
        for g in &r.guest_nodes {
            t += &format!(
                "guest node {}: {} policy {}; {}{}{}\n",
                g.guest_node,
                crate::util::format_size(g.size_bytes),
                g.policy,
                fmt_placement(&g.host_nodes),
                if g.not_present > 0 {
                    format!(", {} not present", g.not_present)
                } else {
                    String::new()
                },
                if g.sampled { " (sampled)" } else { "" }
            );
        }
        for v in &r.vcpus {
            t += &format!(
                "vCPU {} (guest node {}): CPUs {}\n",
                v.id, v.guest_node, v.allowed_cpus
            );
        }
        for d in &r.device_threads {
            t += &format!(
                "device thread {} of {} (tid {}, guest node {}): CPUs {}\n",
                d.name, d.device, d.tid, d.guest_node, d.allowed_cpus
            );
        }
        t.trim_end().to_string()
    })
}
