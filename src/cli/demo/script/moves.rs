//! Steps 5 and 6 of the builtin demo: the guest's memory moved across the
//! host's NUMA nodes with each mode, then the whole VM moved to a second
//! vmhop process on this host; each move verified.

use std::time::Duration;

use super::{Demo, STEPS, WATCH};
use crate::api::numa::{Mode, NumaMigrateRequest, NumaStatReport, TopologyReport};
use crate::api::run::{Arrival, Started, Waiting};
use crate::api::vm::{StatusReport, VmState};
use crate::api::Endpoint;
use crate::cli::demo::checks::{self, check, progress, verify, watch, QUICK};
use crate::cli::demo::render::{self, group};
use crate::cli::demo::report::{MigrationFound, MoveFound, NumaFound};
use crate::cli::demo::supervise::{VmProcess, NO_BODY};
use crate::cli::demo::DemoError;
use crate::util::{format_cpu_list, format_size};

/// The destination's migration socket, in the work dir.
const MIGRATION_SOCKET: &str = "migration.sock";
/// How long the destination may take to say the VM arrived once the
/// source's migrate call has returned (it returns when the VM runs there).
const ARRIVAL_WAIT: Duration = Duration::from_secs(10);
/// What is said when a move cannot change node.
const ONE_NODE_NOTE: &str =
    "this host has one NUMA node: moving node 0 to node 0 still exercises the copy path";

impl Demo {
    /// Step 5: move the guest's memory with each mode, verifying after each.
    pub(super) fn numa(&mut self, vm: &mut VmProcess) -> Result<(), DemoError> {
        self.out.step(5, STEPS, "NUMA moves");
        let topo: TopologyReport = self.sup.json(&["topology", "--json"])?;
        let with_memory = || topo.nodes.iter().filter(|n| n.total_bytes > 0);
        let nodes: Vec<u32> = with_memory().map(|n| n.id).collect();
        self.out.line(format!(
            "host: {} NUMA node(s) with memory: {}",
            nodes.len(),
            with_memory()
                .map(|n| format!(
                    "node {} (CPUs {}, {} free)",
                    n.id,
                    format_cpu_list(&n.cpus),
                    format_size(n.free_bytes)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let status: StatusReport = vm.call("status", Endpoint::Status, NO_BODY, QUICK)?;
        let home = status.numa.first().map_or(0, |n| n.host_node);
        let moves = plan_moves(home, &nodes);
        let one_node = nodes.len() < 2;
        if one_node {
            self.out.line(ONE_NODE_NOTE);
        } else {
            let away = moves.first().map_or(home, |m| m.2);
            self.out.line(format!(
                "moving the guest from host node {home} to node {away} and back, with each mode"
            ));
        }
        let stat_before: NumaStatReport =
            vm.call("numa-stat", Endpoint::NumaStat, NO_BODY, checks::LONG)?;
        self.out.line(format!(
            "numa-stat before: {}",
            render::stat_text(&stat_before)
        ));
        let mut found = Vec::new();
        for (mode, from, to) in moves {
            let step = format!(
                "numa-migrate --mode {} --to-node {to}",
                render::mode_name(mode)
            );
            let req = NumaMigrateRequest {
                to_node: to,
                guest_node: None,
                mode,
                max_downtime_ms: None,
            };
            let report = checks::numa_move(vm, &step, &req)?;
            let (v, _) = verify(vm, &format!("verify after {step}"))?;
            self.out.line(format!(
                "{}; verify ok ({} pages)",
                render::move_text(&report, from, to),
                group(v.pages_checked)
            ));
            found.push(MoveFound {
                from,
                report,
                verify: v,
            });
        }
        let stat_after: NumaStatReport =
            vm.call("numa-stat", Endpoint::NumaStat, NO_BODY, checks::LONG)?;
        self.out.line(format!(
            "numa-stat after:  {}",
            render::stat_text(&stat_after)
        ));
        self.found.numa = Some(NumaFound {
            host_nodes: nodes,
            one_node,
            stat_before,
            moves: found,
            stat_after,
        });
        Ok(())
    }

    /// Step 6: migrate the VM live to a second vmhop process on this host,
    /// and show the guest carries on there, intact.
    pub(super) fn migrate(&mut self, mut src: VmProcess) -> Result<VmProcess, DemoError> {
        let to = format!("unix:{}", self.sup.dir().join(MIGRATION_SOCKET).display());
        self.out.step(
            6,
            STEPS,
            "host migration to a second vmhop process on this host",
        );
        let socket = "migrated.sock";
        let args = [
            "run".into(),
            "--incoming".into(),
            to.clone(),
            "--api-socket".into(),
            self.sup.dir().join(socket).display().to_string(),
            "--json".into(),
        ];
        let mut dst = self
            .sup
            .spawn("run --incoming", &args, socket, "migrated.log")?;
        let waiting: Waiting = dst.start_report()?;
        if waiting.state != VmState::Incoming {
            return Err(check(
                "start the destination",
                format!("it is {} instead of waiting", waiting.state),
            ));
        }
        // The socket is in the private work dir: no authentication needed.
        self.out.line(format!(
            "destination waiting (pid {}): vmhop run --incoming {}",
            dst.pid(),
            waiting.listening,
        ));
        let before = progress(&mut src, "progress before the migration")?;
        let report = checks::migrate(&mut src, "migrate", &to)?;
        self.out.line(format!(
            "migrated from progress {}: {}",
            group(before),
            render::migrate_text(&report)
        ));
        src.exits_cleanly("the migration")?;
        let step = "the migrated VM's start report";
        let arrived: Started = dst.next_report(step, ARRIVAL_WAIT)?;
        let Some(Arrival::Migrated(arrival)) = arrived.restore else {
            return Err(check(
                step,
                format!("it names no arrival: {:?}", arrived.restore),
            ));
        };
        self.out.line(format!(
            "{}; the source process exited 0",
            render::arrival_text(&arrived.name, &arrival)
        ));
        let step = "watch the migrated VM";
        let w = watch(&mut dst, step, WATCH)?;
        w.require_from(step, before, "on the source before the migration")?;
        w.require_growth(step)?;
        self.out.line(format!(
            "{}: it continues from the source's {}",
            render::watch_text(&w),
            group(before)
        ));
        let (v, _) = verify(&mut dst, "verify the migrated VM")?;
        self.out.line(render::verify_text(&v));
        self.found.migration = Some(MigrationFound {
            to,
            report,
            arrival,
            progress_before: before,
            source_exit: 0,
            progress: w,
            verify: v,
        });
        Ok(dst)
    }
}

/// The moves of step 5 as (mode, from, to): with two or more memory nodes,
/// to the first other node and back for each mode; with one, in place.
fn plan_moves(home: u32, memory_nodes: &[u32]) -> Vec<(Mode, u32, u32)> {
    let away = memory_nodes.iter().copied().find(|&n| n != home);
    let mut moves = Vec::new();
    for mode in [Mode::Live, Mode::StopCopy, Mode::Kernel] {
        match away {
            Some(a) => {
                moves.push((mode, home, a));
                moves.push((mode, a, home));
            }
            None => moves.push((mode, home, home)),
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_moves_on_one_node_moves_each_mode_in_place() {
        let m = plan_moves(0, &[0]);
        assert_eq!(
            m,
            vec![
                (Mode::Live, 0, 0),
                (Mode::StopCopy, 0, 0),
                (Mode::Kernel, 0, 0)
            ]
        );
    }

    #[test]
    fn plan_moves_on_two_nodes_goes_away_and_back_with_each_mode() {
        let m = plan_moves(1, &[0, 1]);
        assert_eq!(
            m,
            vec![
                (Mode::Live, 1, 0),
                (Mode::Live, 0, 1),
                (Mode::StopCopy, 1, 0),
                (Mode::StopCopy, 0, 1),
                (Mode::Kernel, 1, 0),
                (Mode::Kernel, 0, 1)
            ]
        );
    }

    #[test]
    fn plan_moves_picks_the_first_other_memory_node() {
        let m = plan_moves(0, &[0, 2, 3]);
        assert_eq!(m[0], (Mode::Live, 0, 2));
    }
}
