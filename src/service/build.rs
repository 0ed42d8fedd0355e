//! Building a VM, in one place for its three ways of coming to be: a boot,
//! a restore from a checkpoint, an arrival from a migration source.
//!
//! Each entry point gets a configuration and a way to fill memory and
//! vCPUs ([`Start`]) from its own module (a guest's boot step,
//! `checkpoint::restore`, `migration::destination`), and hands them to
//! [`assemble`], which checks saved state once, builds the devices (fresh
//! or from their saved states) and creates the VM. What happens around it
//! (the validation thread of a restore, the source's acknowledgement of an
//! arrival) stays with the operation that owns it.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::api::checkpoint::{CheckpointTarget, RestoreReport};
use crate::api::run::RunSpec;
use crate::api::{Classify, ErrorKind};
use crate::arch::x86_64::linux::{self, LinuxSpec};
use crate::checkpoint::restore::{DiskPlacement, LoadMode, RestoreError, Restoring};
use crate::checkpoint::ChainPosition;
use crate::devices::{self, Console, DeviceError, Devices};
use crate::guest::GuestSpec;
use crate::memory::layout::DEFAULT_CHUNK_SIZE;
use crate::migration::destination::Arrived;
use crate::service::hooks::TestHooks;
use crate::util::parse_size;
use crate::vmm::config::{DiskConfig, NetConfig, VsockConfig};
use crate::vmm::state::StateError;
use crate::vmm::vm::Loader;
use crate::vmm::{ConfigError, NodeConfig, Setup, Start, Vm, VmConfig, VmError, VmState};

/// The builtin guest run when neither `--guest` nor `--kernel` is given.
const DEFAULT_GUEST: &str = "builtin:idle";
/// Guest memory when neither `--memory` nor `--numa` says.
const DEFAULT_MEMORY: u64 = 256 << 20;

/// Building a VM failed; nothing of it runs.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration asked for does not make sense.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A kernel or initrd the user named cannot be used.
    #[error(transparent)]
    Kernel(#[from] linux::LinuxError),
    /// Saved state (of a checkpoint or a source) does not fit.
    #[error("{origin}: {source}")]
    State {
        /// Where the state came from.
        origin: String,
        /// What is wrong.
        #[source]
        source: StateError,
    },
    /// The devices could not be built.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// Creating the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The checkpoint cannot be restored.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// This host's KVM cannot run a Linux guest.
    #[error(transparent)]
    NoLinux(#[from] crate::vmm::probe::ProbeError),
    /// A `--test-hook` made it fail on purpose.
    #[error("refused by the test hook {0}")]
    TestHook(&'static str),
}

impl Classify for BuildError {
    fn kind(&self) -> ErrorKind {
        match self {
            BuildError::Config(_) => ErrorKind::BadRequest,
            BuildError::Kernel(e) => e.kind(),
            BuildError::State { .. } => ErrorKind::Unusable,
            BuildError::Devices(e) => e.kind(),
            BuildError::Vm(e) => e.kind(),
            BuildError::Restore(e) => e.kind(),
            BuildError::NoLinux(e) => e.kind(),
            BuildError::TestHook(_) => ErrorKind::Failed,
        }
    }
}

/// A VM and the handles on its devices that the process itself uses.
pub struct Machine {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its devices' handles (console input, console byte count).
    pub devices: Devices,
}

/// The configuration `spec` asks for (a boot: restores and arrivals bring
/// their own).
pub fn config_of(spec: &RunSpec) -> Result<VmConfig, BuildError> {
    let invalid = |m: String| BuildError::Config(ConfigError::Invalid(m));
    let size = |flag: &str, v: &Option<String>| -> Result<Option<u64>, BuildError> {
        v.as_deref()
            .map(|s| parse_size(s).map_err(|e| invalid(format!("{flag}: {e}"))))
            .transpose()
    };
    let memory = size("--memory", &spec.memory)?;
    let chunk_size = size("--chunk-size", &spec.chunk_size)?;
    let guest = match (&spec.kernel, &spec.guest) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "give either --kernel (a Linux guest) or --guest (a builtin guest), not both"
                    .into(),
            ))
        }
        (Some(kernel), None) => GuestSpec::Linux(LinuxSpec {
            kernel: kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec
                .cmdline
                .clone()
                .unwrap_or_else(|| linux::DEFAULT_CMDLINE.to_string()),
        }),
        (None, g) => {
            if spec.initrd.is_some() || spec.cmdline.is_some() {
                return Err(invalid("--initrd and --cmdline need --kernel".into()));
            }
            GuestSpec::parse(g.as_deref().unwrap_or(DEFAULT_GUEST))?
        }
    };
    let nodes = if spec.numa.is_empty() {
        vec![NodeConfig {
            guest_node: 0,
            size: memory.unwrap_or(DEFAULT_MEMORY),
            host_node: None,
            vcpus: None,
        }]
    } else {
        let nodes: Vec<NodeConfig> = spec
            .numa
            .iter()
            .map(|s| NodeConfig::parse(s))
            .collect::<Result<_, _>>()?;
        // QEMU users give both; they must say the same thing.
        if let (Some(memory), Some(given)) = (memory, &spec.memory) {
            let total: u64 = nodes.iter().map(|n| n.size).sum();
            if memory != total {
                return Err(invalid(format!(
                    "--memory {given} ({}) does not match the --numa sizes, which add up to {}",
                    crate::util::format_size(memory),
                    crate::util::format_size(total)
                )));
            }
        }
        nodes
    };
    let config = VmConfig {
        name: spec.name.clone(),
        vcpus: spec.vcpus.unwrap_or(1),
        nodes,
        guest,
        hugepages: spec.hugepages,
        chunk_size: chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
        disks: spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                DiskConfig::parse(d, &format!("disk{i}"))
                    .map_err(|e| invalid(e.to_string()))
                    .map(|mut d| {
                        // The VM's process may change its working directory;
                        // the image it opens must not.
                        if let Ok(p) = std::path::absolute(&d.path) {
                            d.path = p;
                        }
                        d
                    })
            })
            .collect::<Result<_, _>>()?,
        nets: spec
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                NetConfig::parse(n, &format!("net{i}")).map_err(|e| invalid(e.to_string()))
            })
            .collect::<Result<_, _>>()?,
        vsock: spec
            .vsock
            .as_deref()
            .map(|v| {
                VsockConfig::parse(v)
                    .map_err(|e| invalid(e.to_string()))
                    .map(|mut v| {
                        // As for disks: the process may change its working
                        // directory, and PATH_<port> is derived from it.
                        if let Ok(p) = std::path::absolute(&v.socket) {
                            v.socket = p;
                        }
                        v
                    })
            })
            .transpose()?,
    };
    config.validate()?;
    if let GuestSpec::Linux(l) = &config.guest {
        linux::inspect(&l.kernel)?;
        if let Some(i) = &l.initrd {
            std::fs::metadata(i).map_err(|source| linux::LinuxError::Read {
                what: "initrd",
                path: i.clone(),
                source,
            })?;
        }
    }
    Ok(config)
}

/// How an assembled VM's memory and vCPUs are filled.
enum Fill<'a> {
    /// A fresh guest, written by its boot step.
    Boot(Setup<'a>),
    /// Saved state (a checkpoint's, a source's) and memory from `load`.
    Saved {
        /// The saved VM state.
        state: Box<VmState>,
        /// Where it came from, for messages.
        origin: String,
        /// Fills guest memory before the vCPU state goes in.
        load: Loader<'a>,
        /// Register the slots with dirty logging on from the start.
        dirty_log: bool,
    },
}

/// The one assembly: checks saved state once against `config`, builds the
/// devices (from their saved states, if any), and creates the VM, which
/// fills its memory and vCPUs as `fill` says.
fn assemble(
    config: VmConfig,
    fill: Fill<'_>,
    paused: bool,
    console: &Console,
    hooks: &TestHooks,
    stacks: std::collections::BTreeMap<String, crate::devices::virtio::block::Stack>,
) -> Result<Machine, BuildError> {
    // A kernel this KVM would run a million instructions a second never
    // boots: say so now, not with a guest silent for hours.
    if !config.guest.is_builtin() && !hooks.any_kvm {
        crate::vmm::probe::linux_capable()?;
    }
    let (saved_devices, start) = match fill {
        Fill::Boot(setup) => (Default::default(), Start::Boot(setup)),
        Fill::Saved {
            mut state,
            origin,
            load,
            dirty_log,
        } => {
            state
                .check(&config)
                .map_err(|source| BuildError::State { origin, source })?;
            (
                std::mem::take(&mut state.devices),
                Start::Restore {
                    vcpus: std::mem::take(&mut state.vcpus),
                    machine: state.machine.take().map(Box::new),
                    load,
                    dirty_log,
                },
            )
        }
    };
    let mut devices = devices::build(&config, console, &saved_devices, stacks)?;
    let set = std::mem::take(&mut devices.set);
    let vm = Vm::new(config, start, paused, set)?;
    Ok(Machine { vm, devices })
}

/// Boots a fresh VM of `config`; its vCPUs run unless `paused`.
pub fn boot(
    config: VmConfig,
    console: &Console,
    paused: bool,
    hooks: &TestHooks,
) -> Result<Machine, BuildError> {
    let setup = boot_setup(&config, hooks);
    assemble(
        config,
        Fill::Boot(setup),
        paused,
        console,
        hooks,
        Default::default(),
    )
}

/// The boot step for a fresh guest of `config`.
fn boot_setup(config: &VmConfig, hooks: &TestHooks) -> Setup<'static> {
    match &config.guest {
        GuestSpec::Linux(spec) => {
            let spec = spec.clone();
            let topo = linux_topology(config);
            Box::new(move |mem, fds| Ok(linux::boot(&spec, &topo, mem, fds)?))
        }
        g => {
            let mut spec = g.clone();
            if let (GuestSpec::Net { mmio, mac, .. }, Some(card)) = (&mut spec, config.nets.first())
            {
                // The first card's window follows the disks'.
                *mmio = crate::arch::x86_64::layout::VIRTIO_MMIO_BASE
                    + config.disks.len() as u64 * crate::arch::x86_64::layout::VIRTIO_MMIO_WINDOW;
                *mac = card.mac.0;
            }
            if let GuestSpec::Vsock { mmio } = &mut spec {
                // The vsock window follows the disks' and the cards'.
                *mmio = crate::arch::x86_64::layout::VIRTIO_MMIO_BASE
                    + (config.disks.len() + config.nets.len()) as u64
                        * crate::arch::x86_64::layout::VIRTIO_MMIO_WINDOW;
            }
            let guest_hooks = hooks.guest.clone();
            Box::new(move |mem, fds| Ok(crate::guest::setup::boot(&spec, mem, fds, &guest_hooks)?))
        }
    }
}

/// A VM restored from a checkpoint, and what the restore left behind.
pub struct Restored {
    /// The VM.
    pub machine: Machine,
    /// What the restore did.
    pub report: RestoreReport,
    /// The checkpoint the VM's state now extends.
    pub position: ChainPosition,
    /// True while a lazy restore still loads memory in the background.
    pub loading: Arc<AtomicBool>,
    /// A clone's hold on the image its memory maps: keep it as long as
    /// the VM runs.
    pub image: Option<crate::checkpoint::image::CloneImage>,
}

/// Where a restored VM's devices live on this host: the options of a
/// restore that place them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement<'a> {
    /// `--net`: the TAP each saved network card goes on.
    pub nets: &'a [String],
    /// `--disk id=NAME,path=FILE`: where each restored disk lands
    /// (default: `DIR/restored/<vm>-<id>-<disk>.img`).
    pub disks: &'a [String],
    /// `--vsock socket=PATH`: where the vsock device's host socket goes
    /// (default: the saved path).
    pub vsock: Option<&'a str>,
}

/// Restores `target` (as a VM called `name`, else the saved name), its
/// devices where `place` says, its memory loaded as `mode` says; the vCPUs run unless
/// `paused`.
pub fn restore(
    target: &CheckpointTarget,
    name: Option<String>,
    place: Placement<'_>,
    mode: LoadMode,
    paused: bool,
    console: &Console,
    hooks: &TestHooks,
) -> Result<Restored, BuildError> {
    let Placement { nets, disks, vsock } = place;
    let placements = disks
        .iter()
        .map(|d| {
            DiskPlacement::parse(d).ok_or_else(|| RestoreError::DiskOption { given: d.clone() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut r = Restoring::begin(target, mode, name, &placements)?;
    match rebind_nets(&r.config.nets, nets) {
        Ok(n) => r.config.nets = n,
        Err(e) => {
            r.abandon();
            return Err(e);
        }
    }
    if let Some(v) = vsock {
        match rebind_vsock(r.config.vsock.as_ref(), v) {
            Ok(v) => r.config.vsock = Some(v),
            Err(e) => {
                r.abandon();
                return Err(e);
            }
        }
    }
    let stacks = r.take_disks();
    let tv = Instant::now();
    let (state, load) = r.take_start();
    let fill = Fill::Saved {
        state: Box::new(state),
        origin: r.file().display().to_string(),
        load,
        // Before any vCPU runs, so that no guest write escapes the next
        // incremental checkpoint.
        dirty_log: true,
    };
    // Created paused: the restore starts the vCPUs once memory is in.
    let built = assemble(r.config.clone(), fill, true, console, hooks, stacks);
    let machine = match built {
        Ok(m) => m,
        Err(e) => return Err(r.abandon().map(BuildError::from).unwrap_or(e)),
    };
    let f = r.finish(&machine.vm, paused, tv)?;
    Ok(Restored {
        machine,
        report: f.report,
        position: f.position,
        loading: f.loading,
        image: f.image,
    })
}

/// Creates the VM that `arrived` carries, running, its network cards on
/// the TAPs `nets` (`--net` here) name; the caller confirms it to the
/// source (or refuses the source if this fails: a TAP here that cannot
/// take the offloads the guest negotiated refuses it before the switch).
pub fn arrive(
    arrived: &mut Arrived,
    nets: &[String],
    vsock: Option<&str>,
    console: &Console,
    hooks: &TestHooks,
) -> Result<Machine, BuildError> {
    arrived.config.nets = rebind_nets(&arrived.config.nets, nets)?;
    if let Some(v) = vsock {
        arrived.config.vsock = Some(rebind_vsock(arrived.config.vsock.as_ref(), v)?);
    }
    arrived
        .hand_over_disks()
        .map_err(|e| BuildError::Config(ConfigError::Invalid(e.to_string())))?;
    let (state, load) = arrived.take_start();
    let fill = Fill::Saved {
        state: Box::new(state),
        origin: format!("the state sent by {}", arrived.peer()),
        load,
        dirty_log: false,
    };
    assemble(
        arrived.config.clone(),
        fill,
        false,
        console,
        hooks,
        Default::default(),
    )
}

/// Saved network cards on the TAPs `specs` (`--net` on a restore or an
/// arrival) name.
fn rebind_nets(saved: &[NetConfig], specs: &[String]) -> Result<Vec<NetConfig>, BuildError> {
    NetConfig::rebind(saved, specs)
        .map_err(|e| BuildError::Config(ConfigError::Invalid(e.to_string())))
}

/// The saved vsock device on the socket `spec` (`--vsock` on a restore or
/// an arrival) names.
fn rebind_vsock(saved: Option<&VsockConfig>, spec: &str) -> Result<VsockConfig, BuildError> {
    VsockConfig::rebind(saved, spec)
        .map_err(|e| BuildError::Config(ConfigError::Invalid(e.to_string())))
}

/// The NUMA shape a Linux guest's ACPI tables describe: each vCPU's guest
/// node, and distances between guest nodes taken from the host's distances
/// between the host nodes they are bound to.
fn linux_topology(config: &VmConfig) -> linux::Topology {
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
        // Too many devices fail earlier, when the devices are built.
        virtio: crate::arch::x86_64::layout::virtio_slots(config.virtio_devices())
            .unwrap_or_default(),
    }
}
