//! `vmhop balance`: finds every VM on this host through its API socket,
//! asks the planner (`crate::balance`) where their guest nodes belong, and
//! runs the moves one at a time through each VM's own API. The planner
//! decides; this file gathers its inputs, runs its plan, and reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::control::{request, NO_BODY, QUICK_TIMEOUT};
use super::{ApiOpts, CliError, CliResult};
use crate::api::numa::{
    HostNodeReport, Mode, NumaMigrateReport, NumaMigrateRequest, NumaStatReport,
};
use crate::api::run::Local;
use crate::api::Endpoint;
use crate::balance::{plan, HostView, Plan, PlannedMove, Policy, Skipped, VmView};

/// Options of `vmhop balance`.
#[derive(Args, Debug, Clone)]
pub struct BalanceArgs {
    /// Print the plan and its reasons; move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep balancing, every INTERVAL seconds (until interrupted).
    #[arg(long, value_name = "SECONDS", value_parser = parse_interval)]
    watch: Option<f64>,
    /// A node with less free memory than PCT% of its total is short (1..50).
    #[arg(long, value_name = "PCT", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    watermark: u64,
    /// Host-wide limit on the moves' copy rate, MiB/s, averaged over each move.
    #[arg(long, value_name = "N", value_parser = parse_rate)]
    max_mib_s: Option<f64>,
    /// How each move runs (live, stop-copy or kernel).
    #[arg(long, default_value = "live")]
    mode: Mode,
    /// Where the VMs' API sockets are (default: where `run` puts them).
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,
    /// Print one JSON object per round on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not an interval between 0.1 and 86400 seconds"
        )),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a rate above 0 MiB/s")),
    }
}

/// One VM whose API did not answer, or answered that it has no placement.
#[derive(Debug, Serialize)]
struct Unreachable {
    socket: PathBuf,
    why: String,
}

/// What happened to one planned move.
#[derive(Debug, Serialize)]
struct Outcome {
    vm: String,
    guest_node: u32,
    to_node: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<NumaMigrateReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One round: the inputs, the plan and what ran.
#[derive(Debug, Serialize)]
struct Round {
    operation: &'static str,
    dry_run: bool,
    nodes: Vec<HostNodeReport>,
    vms: Vec<String>,
    unreachable: Vec<Unreachable>,
    plan: Plan,
    outcomes: Vec<Outcome>,
}

/// `vmhop balance`.
pub fn balance(local: &dyn Local, a: &BalanceArgs) -> CliResult {
    let dir = a.socket_dir.clone().unwrap_or_else(|| {
        super::default_socket("x")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    });
    let _lock = lock(&dir)?;
    let policy = Policy {
        watermark_pct: a.watermark,
    };
    // Guest nodes moved lately, and when: hysteresis for --watch.
    let mut moved: BTreeMap<(String, u32), Instant> = BTreeMap::new();
    let cooldown = Duration::from_secs_f64(a.watch.unwrap_or(0.0) * 3.0);
    loop {
        moved.retain(|_, at| at.elapsed() < cooldown);
        let recent: BTreeSet<(String, u32)> = moved.keys().cloned().collect();
        let round = one_round(local, a, &dir, policy, &recent)?;
        for o in &round.outcomes {
            if o.report.is_some() {
                moved.insert((o.vm.clone(), o.guest_node), Instant::now());
            }
        }
        print_round(a, &round)?;
        let failed = round.outcomes.iter().any(|o| o.error.is_some());
        match a.watch {
            Some(secs) => std::thread::sleep(Duration::from_secs_f64(secs)),
            None if failed => {
                return Err(CliError::failed(
                    "some moves failed (their VMs run on as they were); see above",
                ))
            }
            None => return Ok(()),
        }
    }
}

/// Holds `DIR/.balance.lock` for this process's life: one balancer a host.
fn lock(dir: &Path) -> Result<File, CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::failed(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(".balance.lock");
    let f = File::create(&path)
        .map_err(|e| CliError::failed(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(CliError::failed(format!(
            "another vmhop balance runs on this host: {} is locked ({e})",
            path.display()
        )));
    }
    Ok(f)
}

/// The VMs' sockets in `dir`, sorted by name.
fn sockets(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(CliError::failed(format!(
                "cannot list {}: {e}",
                dir.display()
            )))
        }
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    out.sort();
    Ok(out)
}

fn api(socket: &Path) -> ApiOpts {
    ApiOpts {
        api_socket: Some(socket.to_path_buf()),
        name: None,
        json: true,
    }
}

fn one_round(
    local: &dyn Local,
    a: &BalanceArgs,
    dir: &Path,
    policy: Policy,
    recent: &BTreeSet<(String, u32)>,
) -> Result<Round, CliError> {
    let nodes = local.topology()?.nodes;
    let mut vms = Vec::new();
    let mut unreachable = Vec::new();
    let mut socket_of = BTreeMap::new();
    for socket in sockets(dir)? {
        let name = socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match request::<NumaStatReport>(
            &api(&socket),
            Endpoint::NumaStat,
            NO_BODY,
            Some(QUICK_TIMEOUT),
        ) {
            Ok(stat) => {
                socket_of.insert(name.clone(), socket);
                vms.push(VmView { name, stat });
            }
            Err(e) => unreachable.push(Unreachable {
                socket,
                why: e.message,
            }),
        }
    }
    let view = HostView {
        nodes: nodes.clone(),
        vms,
    };
    let plan = plan(&view, policy, recent);
    let mut outcomes = Vec::new();
    if !a.dry_run {
        for m in &plan.moves {
            outcomes.push(run_move(a, &socket_of[&m.vm], m));
        }
    }
    Ok(Round {
        operation: "balance",
        dry_run: a.dry_run,
        nodes,
        vms: view.vms.iter().map(|v| v.name.clone()).collect(),
        unreachable,
        plan,
        outcomes,
    })
}

/// Runs one move and then waits, if need be, so that the moves' average
/// rate stays within `--max-mib-s`.
fn run_move(a: &BalanceArgs, socket: &Path, m: &PlannedMove) -> Outcome {
    let started = Instant::now();
    let req = NumaMigrateRequest {
        to_node: m.to_node,
        guest_node: Some(m.guest_node),
        mode: a.mode,
        max_downtime_ms: None,
    };
    let r: Result<NumaMigrateReport, CliError> =
        request(&api(socket), Endpoint::NumaMigrate, Some(&req), None);
    if let Some(limit) = a.max_mib_s {
        let due = Duration::from_secs_f64(m.bytes as f64 / (limit * 1_048_576.0));
        if let Some(rest) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let (report, error) = match r {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e.message)),
    };
    Outcome {
        vm: m.vm.clone(),
        guest_node: m.guest_node,
        to_node: m.to_node,
        report,
        error,
    }
}

fn print_round(a: &BalanceArgs, r: &Round) -> CliResult {
    if a.json {
        let line = serde_json::to_string(r)
            .map_err(|e| CliError::failed(format!("cannot encode the round: {e}")))?;
        println!("{line}");
        return Ok(());
    }
    let free: Vec<String> = r
        .nodes
        .iter()
        .map(|n| {
            format!(
                "node {}: {} MiB free of {} MiB",
                n.id,
                n.free_bytes >> 20,
                n.total_bytes >> 20
            )
        })
        .collect();
    println!(
        "balance: {} VM(s) ({}); {}",
        r.vms.len(),
        r.vms.join(", "),
        free.join("; ")
    );
    for u in &r.unreachable {
        println!("  skipped {}: {}", u.socket.display(), u.why);
    }
    for Skipped {
        vm,
        guest_node,
        why,
    } in &r.plan.skipped
    {
        match guest_node {
            Some(g) => println!("  left {vm} guest node {g}: {why}"),
            None => println!("  left {vm}: {why}"),
        }
    }
    if r.plan.moves.is_empty() {
        println!("  nothing to move");
    }
    for m in &r.plan.moves {
        let verb = if r.dry_run { "would move" } else { "move" };
        println!(
            "  {verb} {} guest node {} to host node {} ({} MiB): {}",
            m.vm,
            m.guest_node,
            m.to_node,
            m.bytes >> 20,
            m.reason
        );
    }
    for o in &r.outcomes {
        match (&o.report, &o.error) {
            (Some(rep), _) => println!(
                "  moved {} guest node {} to host node {} ({}): {} pages in {:.1} ms, longest pause {} µs",
                o.vm, o.guest_node, o.to_node, rep.mode, rep.pages_moved, rep.total_ms, rep.downtime_us
            ),
            (None, Some(e)) => println!(
                "  FAILED {} guest node {} to host node {}: {e} (the VM runs on as it was)",
                o.vm, o.guest_node, o.to_node
            ),
            (None, None) => {}
        }
    }
    Ok(())
}
