//! Step 5 of the builtin demo: the guest's memory moved across the host's
//! NUMA nodes with each mode, each move verified.

use super::{Demo, STEPS};
use crate::api::numa::{Mode, NumaMigrateRequest, NumaStatReport, TopologyReport};
use crate::api::vm::StatusReport;
use crate::api::Endpoint;
use crate::cli::demo::checks::{self, verify, QUICK};
use crate::cli::demo::render::{self, group};
use crate::cli::demo::report::{MoveFound, NumaFound};
use crate::cli::demo::supervise::{VmProcess, NO_BODY};
use crate::cli::demo::DemoError;
use crate::util::{format_cpu_list, format_size};

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
