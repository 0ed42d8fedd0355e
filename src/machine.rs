//! Puts a fresh VM together: the devices its guest kind needs, the boot
//! step that writes the guest (a builtin program or a Linux kernel), and
//! the VM itself. Restores assemble theirs in `checkpoint::restore`.

use std::sync::Arc;

use crate::arch::x86_64::linux;
use crate::devices::{self, Console, Devices};
use crate::guest::GuestSpec;
use crate::vmm::{Setup, Start, Vm, VmConfig, VmError};

/// Creates and boots a VM of `config`; its vCPUs run unless `paused`.
pub fn boot(
    config: VmConfig,
    console: &Console,
    paused: bool,
) -> Result<(Arc<Vm>, Devices), VmError> {
    let mut devs = devices::build(&config, console, &Default::default())
        .map_err(|e| VmError::Devices(e.to_string()))?;
    let setup = boot_setup(&config);
    let set = std::mem::take(&mut devs.set);
    let vm = Vm::new(config, Start::Boot(setup), paused, set)?;
    Ok((vm, devs))
}

/// The boot step for a fresh guest of `config`.
pub fn boot_setup(config: &VmConfig) -> Setup<'static> {
    match &config.guest {
        GuestSpec::Linux(spec) => {
            let spec = spec.clone();
            let topo = linux_topology(config);
            Box::new(move |mem, fds| linux::boot(&spec, &topo, mem, fds).map_err(|e| e.to_string()))
        }
        g => {
            let spec = g.clone();
            Box::new(move |mem, fds| crate::guest::setup::boot(&spec, mem, fds))
        }
    }
}

/// The NUMA shape a Linux guest's ACPI tables describe: each vCPU's guest
/// node, and distances between guest nodes taken from the host's distances
/// between the host nodes they are bound to.
pub fn linux_topology(config: &VmConfig) -> linux::Topology {
    let here = crate::host::topology::current_node();
    let hosts: Vec<u32> = config
        .nodes
        .iter()
        .map(|n| n.host_node.unwrap_or(here))
        .collect();
    let host = crate::host::topology::Topology::read().ok();
    let distances = hosts
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            hosts
                .iter()
                .enumerate()
                .map(|(j, &b)| {
                    if i == j {
                        return 10;
                    }
                    let d = host.as_ref().and_then(|t| t.distance(a, b));
                    match d {
                        // Two guest nodes on one host node are still two
                        // nodes to the guest: farther than local.
                        Some(d) if a != b => d.clamp(11, 254) as u8,
                        _ => 20,
                    }
                })
                .collect()
        })
        .collect();
    let vcpu_nodes = config.vcpu_nodes();
    linux::Topology {
        apic_ids: crate::arch::x86_64::cpuid::topology(&vcpu_nodes).apic_ids,
        vcpu_nodes,
        distances,
    }
}
