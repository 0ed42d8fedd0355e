//! One KVM VM: creation (memory, slots, vCPUs), pause/resume, dirty logs,
//! vCPU state, slot replacement and teardown.
//!
//! What is not the VM's lives elsewhere: which operation may run and the
//! checkpoint chain (`crate::service`, `crate::checkpoint`), the builtin
//! guest's counters (`crate::guest`), the devices (`crate::devices`, seen
//! here only through the buses and `DeviceControl`).
//!
//! ## Locks
//!
//! A thread that holds one of these takes only those below it, never one
//! above:
//!
//! 1. `throttler`: the thread that kicks throttled vCPUs;
//! 2. `vcpus`: the vCPU handles (every pause, resume and state save);
//! 3. `dirty`: dirty logging, the logs fetched but not yet asked for, and
//!    the accumulators every fetch feeds;
//! 4. `memory`: read by everyone who reads guest memory, written only by
//!    `replace_chunk` (a NUMA move's commit) and `set_host_node`;
//! 5. `host_nodes`, `state`, `guest_stop`, `guest_exit`: leaves, held for a
//!    load or a store.
//!
//! `memory` is a `std` RwLock, which lets a waiting writer go first: a
//! thread that takes a second read guard while holding one can wait behind
//! `replace_chunk`, which waits for the first. Every method here takes at
//! most one guard at a time; a caller must drop the guard [`Vm::memory`]
//! gives before calling anything that may take another (the service's
//! `status` reads the memory size from the configuration for that reason).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::bus::{DeviceControl, DeviceSet, GuestExit, IoBus, MmioBus};
use super::config::VmConfig;
use super::state::{MachineState, VmState, STATE_VERSION};
use super::vcpu::{
    self, GuestStop, SavedWith, VcpuCmd, VcpuError, VcpuHandle, VcpuReply, VcpuState,
};
use crate::arch::x86_64::cpuid;
use crate::host::topology::{self, Topology};
use crate::memory::{
    layout, Backing, Chunk, DirtyAccumulator, DirtyBitmap, GuestMemory, Mapping, MappingError,
    NodeMemory, PAGE_SIZE,
};

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped and can resume.
    Paused,
    /// The guest stopped for good (it shut down, or the VM is being torn down).
    Stopped,
}

/// What a boot or load step reports when it fails: the error of the
/// module that wrote the guest or loaded its memory, kept whole.
pub type StepError = Box<dyn std::error::Error + Send + Sync>;

/// Creating or driving the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm missing or not permitted.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{ioctl} failed: {source}")]
    Kvm {
        /// The ioctl.
        ioctl: String,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration is not valid.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// The host's NUMA topology could not be read.
    #[error(transparent)]
    Topology(#[from] crate::host::topology::TopologyError),
    /// A guest node names a host node this host lacks.
    #[error(
        "guest node {guest_node}: host node {host_node} does not exist (this host has node {have})"
    )]
    NoHostNode {
        /// The guest node.
        guest_node: u32,
        /// The host node it names.
        host_node: u32,
        /// The host's nodes.
        have: String,
    },
    /// The VM's memory does not fit where it must go.
    #[error("{what} needs {} of memory but {where_} has {}", crate::util::format_size(*.need), crate::util::format_size(*.room))]
    NoRoom {
        /// What needs it (a guest node, the VM).
        what: String,
        /// Bytes it needs.
        need: u64,
        /// Where it must fit (a host node, the host).
        where_: String,
        /// Bytes there.
        room: u64,
    },
    /// Guest memory could not be created.
    #[error("guest node {node}: {source}")]
    Memory {
        /// Guest node.
        node: u32,
        /// What failed.
        #[source]
        source: MappingError,
    },
    /// Binding memory to its host node failed.
    #[error("guest node {node}: {source}")]
    Policy {
        /// Guest node.
        node: u32,
        /// What failed.
        #[source]
        source: crate::host::policy::PolicyError,
    },
    /// The signal that kicks vCPUs out of KVM_RUN could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The devices' states could not be saved.
    #[error("devices: {0}")]
    Devices(#[from] super::bus::DeviceError),
    /// The devices' view of guest memory could not be made.
    #[error("devices: {0}")]
    DeviceMemory(#[source] crate::memory::device::DeviceMemoryError),
    /// Writing the guest into memory or setting up its boot vCPU failed.
    #[error("{0}")]
    Boot(#[source] StepError),
    /// Loading memory for a restore failed.
    #[error("{0}")]
    Load(#[source] StepError),
    /// Saved state does not fit this VM.
    #[error(transparent)]
    Mismatch(#[from] StateMismatch),
    /// No memory chunk has this number.
    #[error("no memory chunk {0}")]
    NoChunk(u32),
    /// Reading a disk's blocks for a transfer failed.
    #[error("disk {disk}: {what}: {source}")]
    Store {
        /// The disk's id.
        disk: String,
        /// What was read (`blocks 10+256`).
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading which pages of a chunk are present failed.
    #[error("chunk {slot} at guest {gpa:#x}: reading /proc/self/pagemap: {source}")]
    Pagemap {
        /// The chunk.
        slot: u32,
        /// Its first guest-physical address.
        gpa: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Copy-on-write over guest memory failed.
    #[error(transparent)]
    Cow(#[from] crate::memory::cow::CowError),
    /// A page range does not lie in its chunk.
    #[error("pages {first}+{count} do not lie in chunk {slot} of {pages} pages")]
    Range {
        /// The chunk.
        slot: u32,
        /// First page.
        first: u64,
        /// Pages.
        count: u64,
        /// The chunk's pages.
        pages: u64,
    },
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The operation needs another state.
    #[error("the VM is {0:?}; {1}")]
    State(RunState, &'static str),
}

/// How a saved state does not fit the VM being built from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateMismatch {
    /// A vCPU count other than the configuration's.
    #[error("the saved state has {saved} vCPUs, the configuration {configured}")]
    VcpuCount {
        /// vCPUs in the state.
        saved: usize,
        /// vCPUs in the configuration.
        configured: usize,
    },
    /// Interrupt controller and clock state for a guest kind without them.
    #[error("the saved state has an interrupt controller this guest kind does not use")]
    UnexpectedMachine,
    /// A Linux guest's state without its interrupt controller and clock.
    #[error("the saved state lacks the interrupt controller and clock state of a Linux guest")]
    MissingMachine,
}

impl crate::api::Classify for VmError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            VmError::Config(_) => ErrorKind::BadRequest,
            VmError::NoHostNode { .. } => ErrorKind::NotFound,
            VmError::NoRoom { .. } | VmError::Mismatch(_) => ErrorKind::Unusable,
            VmError::NoKvm(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
                ErrorKind::Forbidden
            }
            VmError::State(..) => ErrorKind::Conflict,
            // A kernel or initrd that does not fit is the request's.
            VmError::Boot(e) => e
                .downcast_ref::<crate::arch::x86_64::linux::LinuxError>()
                .map_or(ErrorKind::Failed, |l| l.kind()),
            _ => ErrorKind::Failed,
        }
    }
}

/// Fills guest memory for a restore, before any vCPU runs.
pub type Loader<'a> = Box<dyn FnOnce(&GuestMemory) -> Result<(), StepError> + 'a>;

/// Writes a fresh guest into memory and sets up its vCPUs (in id order)
/// before any of them runs.
pub type Setup<'a> = Box<dyn FnOnce(&GuestMemory, &[VcpuFd]) -> Result<(), StepError> + 'a>;

/// How the VM's vCPUs and memory start.
pub enum Start<'a> {
    /// A fresh guest, written by the setup.
    Boot(Setup<'a>),
    /// Restored state: `load` fills guest memory before the vCPUs get `vcpus`.
    Restore {
        /// Saved vCPU states, by id.
        vcpus: Vec<VcpuState>,
        /// The saved interrupt controllers, timer and clock, if the VM has them.
        machine: Option<Box<MachineState>>,
        /// Fills guest memory (or arranges that first touches fill it),
        /// before the machine and vCPU state are restored.
        load: Loader<'a>,
        /// Register the memory slots with dirty logging on from the start,
        /// as [`Vm::start_dirty_log`] would, without registering every
        /// slot a second time.
        dirty_log: bool,
    },
}

/// Proof that the vCPUs are paused, and since when; `Vm::resume` consumes it.
#[must_use = "a pause must be ended with Vm::resume"]
#[derive(Debug)]
pub struct Pause {
    /// When the first vCPU was asked to stop.
    pub since: Instant,
    /// When the first vCPU stopped: its thread took the pause command
    /// (right after KVM_RUN returned), or the VM held it asleep.
    pub stopped: Instant,
    /// Whether the VM was already paused before (then resume leaves it so).
    was_paused: bool,
    /// The pausing thread's real-time priority, for as long as the pause.
    _boost: Option<Boost>,
}

/// Runs the thread that made it at real-time priority (SCHED_FIFO 1)
/// until dropped: the work inside a pause (stopping vCPUs, copying the
/// last pages, mremap) is a few hundred microseconds of CPU, and on a
/// loaded host an ordinary thread was preempted in the middle of it for
/// milliseconds, all of it downtime. Threads it spawns meanwhile (parallel
/// copies) start ordinary (SCHED_RESET_ON_FORK). Where the process may not
/// (no CAP_SYS_NICE) or the thread has a policy of its own already, nothing
/// changes.
#[derive(Debug)]
struct Boost {
    tid: libc::pid_t,
}

impl Boost {
    fn new() -> Option<Boost> {
        // SAFETY: queries the calling thread's own policy; no memory passed.
        if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
            return None;
        }
        let p = libc::sched_param { sched_priority: 1 };
        // SAFETY: `p` is a valid sched_param for the call; 0 is this thread.
        let r = unsafe {
            libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &p)
        };
        (r == 0).then(|| Boost {
            // SAFETY: gettid takes no arguments, touches no memory and
            // cannot fail.
            tid: unsafe { libc::gettid() },
        })
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        let p = libc::sched_param { sched_priority: 0 };
        // SAFETY: `p` is a valid sched_param; `tid` is the thread that
        // boosted itself, in this process (the token is dropped by it or
        // after it, at the end of the pause).
        unsafe { libc::sched_setscheduler(self.tid, libc::SCHED_OTHER, &p) };
    }
}

/// Per-VM dirty logging state.
#[derive(Debug, Default)]
struct DirtyState {
    /// Slots have KVM_MEM_LOG_DIRTY_PAGES.
    logging: bool,
    /// Accumulators fed with every fetch (a checkpoint chain keeps one):
    /// while there is one, dirty logging stays on.
    keepers: Vec<Arc<DirtyAccumulator>>,
    /// Pages KVM reported dirty for chunks nobody asked about yet: a KVM
    /// slot's log is fetched (and cleared) whole, so the share of the
    /// chunks not asked for waits here for their next fetch.
    pending: BTreeMap<u32, DirtyBitmap>,
}

/// One KVM memory slot: a run of chunks of one guest node that follow each
/// other in guest-physical and in host memory (guest memory is mapped one
/// piece per node and side of the MMIO hole). Registering a slot waits for
/// an SRCU grace period, so one per run instead of one per chunk is what
/// keeps VM creation short; chunks stay the unit of dirty logs and moves.
#[derive(Debug)]
struct KvmSlot {
    /// KVM slot number.
    id: u32,
    /// First guest-physical address.
    gpa: u64,
    /// Length in bytes.
    len: u64,
    /// Host address of its first byte; stays mapped as long as the VM
    /// (re-homing a chunk moves pages under the same address).
    host: u64,
    /// Its chunks: (chunk slot, first page within this KVM slot, pages).
    chunks: Vec<(u32, u64, u64)>,
}

/// Largest KVM slot. A pause fetches the whole log of each KVM slot that
/// holds a chunk it moves: 1 GiB of log took ~25 µs of a live NUMA move's
/// pause here (32 MiB: 3 µs), so larger guests get one slot per GiB.
const MAX_KVM_SLOT: u64 = 1 << 30;

impl KvmSlot {
    /// The KVM slots over `memory`'s chunks, in guest-physical order, each
    /// at most `max` bytes (or one chunk).
    fn over(memory: &GuestMemory, max: u64) -> Vec<KvmSlot> {
        memory
            .contiguous_runs(max)
            .iter()
            .enumerate()
            .map(|(id, run)| {
                let mut k = KvmSlot {
                    id: id as u32,
                    gpa: run[0].range.start,
                    len: 0,
                    host: run[0].mapping.as_ptr() as u64,
                    chunks: Vec::with_capacity(run.len()),
                };
                for c in run.iter() {
                    k.chunks.push((c.slot, k.len / PAGE_SIZE, c.pages()));
                    k.len += c.range.len;
                }
                k
            })
            .collect()
    }
}

/// A running VM.
pub struct Vm {
    config: VmConfig,
    _kvm: Kvm,
    fd: VmFd,
    memory: RwLock<GuestMemory>,
    kvm_slots: Vec<KvmSlot>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    state: Mutex<RunState>,
    guest_stop: Arc<Mutex<Option<String>>>,
    guest_exit: Arc<Mutex<Option<GuestExit>>>,
    bus: Arc<IoBus>,
    devices: Option<Box<dyn DeviceControl>>,
    mmio: Arc<MmioBus>,
    /// Guest memory as devices see it (attached in `new`, detached in
    /// `shutdown`, before the memory can go).
    device_memory: crate::memory::DeviceMemory,
    irqchip: bool,
    dirty: Mutex<DirtyState>,
    host_nodes: Mutex<Vec<u32>>,
    /// The devices' worker threads, each following its guest node's CPUs.
    device_threads: crate::host::affinity::PinnedThreads,
    /// vCPU throttle, percent of each period asleep (auto-converge).
    throttle: Arc<AtomicU32>,
    /// The thread that kicks vCPUs while throttled.
    throttler: Mutex<Option<Throttler>>,
    /// The guest's TSC rate, kHz (KVM_GET_TSC_KHZ; 0 when KVM did not say).
    tsc_khz: AtomicU32,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.config.name)
            .finish()
    }
}

/// Keeps the earlier of `slot` and `at`.
fn earliest(slot: &mut Option<Instant>, at: Instant) {
    *slot = Some(slot.map_or(at, |s| s.min(at)));
}

fn unexpected(id: u32, r: VcpuReply, what: &str) -> VmError {
    VmError::Vcpu(VcpuError::Gone {
        id,
        why: format!("unexpected reply {r:?} to {what}"),
    })
}

fn kvm_err(ioctl: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let ioctl = ioctl.into();
    move |source| VmError::Kvm { ioctl, source }
}

/// The thread that kicks throttled vCPUs once a period, and the sender
/// whose drop stops it at once.
struct Throttler {
    thread: std::thread::JoinHandle<()>,
    stop: std::sync::mpsc::Sender<()>,
}

impl Vm {
    /// Creates the VM, its memory, devices and vCPUs; starts them unless
    /// `paused`. Guests other than the builtin ones get an in-kernel irqchip
    /// (PIC, IOAPIC, local APICs) and PIT.
    pub fn new(
        config: VmConfig,
        start: Start<'_>,
        paused: bool,
        devices: DeviceSet,
    ) -> Result<Arc<Vm>, VmError> {
        config.validate()?;
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let topo = Topology::read()?;
        let host_nodes = Self::check_host(&config, &topo)?;
        vcpu::install_kick_handler().map_err(VmError::Signal)?;

        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(layout::MMIO_HOLE_END as usize - 0x4000 * 2)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;

        let irqchip = !config.guest.is_builtin();
        if irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
            for (evt, gsi) in &devices.irq_lines {
                fd.register_irqfd(evt, *gsi)
                    .map_err(kvm_err(format!("KVM_IRQFD (GSI {gsi})")))?;
            }
        }

        let t = Instant::now();
        let memory = Self::create_memory(&config, &host_nodes)?;
        tracing::debug!("vm: memory mapped in {:?}", t.elapsed());
        let guest_stop = Arc::new(Mutex::new(None));
        let vm = Vm {
            config: config.clone(),
            _kvm: kvm,
            fd,
            kvm_slots: KvmSlot::over(&memory, MAX_KVM_SLOT),
            memory: RwLock::new(memory),
            vcpus: Mutex::new(Vec::new()),
            state: Mutex::new(RunState::Paused),
            guest_stop,
            guest_exit: Arc::new(Mutex::new(None)),
            bus: Arc::new(devices.bus),
            devices: devices.control,
            mmio: Arc::new(devices.mmio),
            device_memory: devices.memory,
            irqchip,
            dirty: Mutex::new(DirtyState::default()),
            host_nodes: Mutex::new(host_nodes.clone()),
            device_threads: devices.threads.clone(),
            throttle: Arc::new(AtomicU32::new(0)),
            throttler: Mutex::new(None),
            tsc_khz: AtomicU32::new(0),
        };
        let dirty_log = matches!(
            start,
            Start::Restore {
                dirty_log: true,
                ..
            }
        );
        for k in &vm.kvm_slots {
            vm.set_slot(k, dirty_log)?;
        }
        // With or without an irqchip: a guest's notify write signals its
        // device's thread without an exit (checked on PVM too). After the
        // memory slots: registered before them, an MMIO ioeventfd made the
        // first KVM_SET_USER_MEMORY_REGION take ~7 ms here (a restore's
        // vCPUs waited for it); after them, it costs what it did alone.
        for e in &devices.ioevents {
            e.register(&vm.fd)
                .map_err(kvm_err(format!("KVM_IOEVENTFD (MMIO {:#x})", e.addr)))?;
        }
        // SAFETY: the chunks' host addresses stay mapped as long as the VM
        // (a NUMA move swaps pages under them), and `shutdown`, which `Drop`
        // calls before the memory goes, detaches the view.
        unsafe { vm.device_memory.attach(&vm.memory()) }.map_err(VmError::DeviceMemory)?;
        vm.dirty.lock().unwrap_or_else(|e| e.into_inner()).logging = dirty_log;

        let supported = vm
            ._kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cpu_topo = cpuid::topology(&config.vcpu_nodes());
        let mut fds: Vec<VcpuFd> = Vec::new();
        for id in 0..config.vcpus {
            // The KVM vCPU id is the initial APIC id.
            let apic = cpu_topo.apic_ids[id as usize];
            let v = vm
                .fd
                .create_vcpu(apic as u64)
                .map_err(kvm_err(format!("KVM_CREATE_VCPU {id} (APIC id {apic})")))?;
            v.set_cpuid2(&cpuid::for_vcpu(&supported, &cpu_topo, id as usize))
                .map_err(kvm_err(format!("KVM_SET_CPUID2 (vCPU {id})")))?;
            fds.push(v);
        }
        if let Some(khz) = fds.first().and_then(|v| v.get_tsc_khz().ok()) {
            vm.tsc_khz.store(khz, Ordering::Relaxed);
        }
        let saved_with = SavedWith {
            msrs: Arc::new(if irqchip {
                let listed = vm
                    ._kvm
                    .get_msr_index_list()
                    .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
                // Keep the ones this KVM can read, once: a refused MSR costs
                // every later save (inside a checkpoint's pause) an extra ioctl.
                vcpu::readable_msrs(&fds[0], listed.as_slice())
            } else {
                vcpu::BUILTIN_MSRS.to_vec()
            }),
            irqchip,
        };
        match start {
            Start::Boot(setup) => setup(&vm.memory(), &fds).map_err(VmError::Boot)?,
            Start::Restore {
                vcpus,
                machine,
                load,
                dirty_log: _,
            } => {
                if vcpus.len() != fds.len() {
                    return Err(StateMismatch::VcpuCount {
                        saved: vcpus.len(),
                        configured: fds.len(),
                    }
                    .into());
                }
                // Memory first: restoring some vCPU and clock state makes
                // KVM write into guest memory (the kvmclock pages), which
                // must land on the guest's own pages, not on fresh ones a
                // loader could no longer fill.
                load(&vm.memory()).map_err(VmError::Load)?;
                match (&machine, irqchip) {
                    (Some(m), true) => vm.restore_machine(m)?,
                    (None, false) => {}
                    (Some(_), false) => return Err(StateMismatch::UnexpectedMachine.into()),
                    (None, true) => return Err(StateMismatch::MissingMachine.into()),
                }
                for (v, s) in fds.iter().zip(&vcpus) {
                    vcpu::restore_state(v, s)?;
                }
            }
        }

        tracing::debug!("vm: memory and vCPU state loaded at {:?}", t.elapsed());
        let vcpu_nodes = config.vcpu_nodes();
        let mut handles = Vec::new();
        for (id, v) in fds.into_iter().enumerate() {
            let host = host_nodes[vcpu_nodes[id] as usize];
            let cpus = topo.node(host).map(|n| n.cpus.clone()).unwrap_or_default();
            let stop = vm.guest_stop.clone();
            let exit = vm.guest_exit.clone();
            let on_stop: vcpu::OnGuestStop = Arc::new(move |id, why: GuestStop| {
                let msg = match why {
                    GuestStop::Shutdown(s) | GuestStop::Error(s) => format!("vCPU {id}: {s}"),
                    GuestStop::Fault(f) => format!("vCPU {id}: {f}"),
                    GuestStop::Exit(e) => {
                        exit.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        e.describe().to_string()
                    }
                };
                tracing::warn!("{msg}");
                stop.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(msg);
            });
            handles.push(VcpuHandle::spawn(
                id as u32,
                v,
                vm.bus.clone(),
                vm.mmio.clone(),
                cpus,
                saved_with.clone(),
                on_stop,
                vm.throttle.clone(),
            )?);
        }
        *vm.vcpus.lock().unwrap_or_else(|e| e.into_inner()) = handles;
        // The device workers go where their guest node's vCPUs went (the
        // ones a restore started are pinned now, later ones as they start).
        for (g, &host) in host_nodes.iter().enumerate() {
            let cpus = topo.node(host).map(|n| n.cpus.clone()).unwrap_or_default();
            if let Err(e) = vm.device_threads.set_cpus(g as u32, &cpus) {
                tracing::warn!("guest node {g}: cannot pin its device threads: {e}");
            }
        }
        let vm = Arc::new(vm);
        tracing::debug!("vm: vCPU threads started at {:?}", t.elapsed());
        if paused {
            // Restored devices come back parked; fresh ones have nothing to
            // do yet. Either way none serves until the vCPUs run.
            vm.quiesce_devices()?;
        } else {
            vm.restart_all()?;
            *vm.lock_state() = RunState::Running;
            vm.resume_devices()?;
        }
        Ok(vm)
    }

    /// Each guest node's host node for `config` on this host, checking the
    /// host can hold it.
    pub fn host_nodes_for(config: &VmConfig) -> Result<Vec<u32>, VmError> {
        let topo = Topology::read()?;
        Self::check_host(config, &topo)
    }

    /// Resolves each guest node's host node and checks the host can hold it.
    fn check_host(config: &VmConfig, topo: &Topology) -> Result<Vec<u32>, VmError> {
        let here = topology::current_node();
        let mut out = Vec::new();
        for n in &config.nodes {
            let h = n.host_node.unwrap_or(here);
            let Some(node) = topo.node(h) else {
                let have: Vec<String> = topo.nodes.iter().map(|n| n.id.to_string()).collect();
                return Err(VmError::NoHostNode {
                    guest_node: n.guest_node,
                    host_node: h,
                    have: have.join(", "),
                });
            };
            if n.size > node.total_bytes {
                return Err(VmError::NoRoom {
                    what: format!("guest node {}", n.guest_node),
                    need: n.size,
                    where_: format!("host node {h}, in all,"),
                    room: node.total_bytes,
                });
            }
            out.push(h);
        }
        let total: u64 = config.nodes.iter().map(|n| n.size).sum();
        if let Some(avail) = crate::host::topology::available_memory() {
            if total > avail {
                return Err(VmError::NoRoom {
                    what: "the VM".into(),
                    need: total,
                    where_: "the host (MemAvailable)".into(),
                    room: avail,
                });
            }
        }
        Ok(out)
    }

    /// Guest memory laid out and bound as a VM of `config` has it, not yet
    /// any VM's: an incoming migration receives into it.
    pub fn memory_for(config: &VmConfig, host_nodes: &[u32]) -> Result<GuestMemory, VmError> {
        Self::create_memory(config, host_nodes)
    }

    fn create_memory(config: &VmConfig, host_nodes: &[u32]) -> Result<GuestMemory, VmError> {
        let sizes: Vec<u64> = config.nodes.iter().map(|n| n.size).collect();
        let ranges = layout::layout(&sizes, config.chunk_size);
        let backing = if config.hugepages {
            Backing::TransparentHuge
        } else {
            Backing::Anonymous
        };
        let mut slot = 0;
        let mut nodes = Vec::new();
        for (i, rs) in ranges.into_iter().enumerate() {
            let host = host_nodes[i];
            let mut chunks = Vec::new();
            // One mapping (one mmap, one mbind) per run of chunks that
            // follow each other in guest memory, cut into the chunks' own:
            // contiguous in host memory too, a run is one KVM slot.
            let mut k = 0;
            while k < rs.len() {
                let mut end = k + 1;
                while end < rs.len() && rs[end].start == rs[end - 1].end() {
                    end += 1;
                }
                let len = rs[k..end].iter().map(|r| r.len).sum();
                let mut rest = Some(Self::node_mapping(i as u32, len, backing, host)?);
                for range in &rs[k..end] {
                    let mut mapping = rest.take().expect("a part for every chunk of the run");
                    if (range.len as usize) < mapping.len() {
                        rest = Some(mapping.split_off(range.len as usize));
                    }
                    chunks.push(Chunk {
                        range: *range,
                        slot,
                        mapping,
                    });
                    slot += 1;
                }
                k = end;
            }
            nodes.push(NodeMemory {
                guest_node: i as u32,
                host_node: Some(host),
                size: sizes[i],
                backing,
                chunks,
            });
        }
        Ok(GuestMemory { nodes })
    }

    /// Maps memory for chunks of guest node `node`, bound to `host`.
    pub fn node_mapping(
        node: u32,
        len: u64,
        backing: Backing,
        host: u32,
    ) -> Result<Mapping, VmError> {
        let m = Mapping::new(len as usize, backing)
            .map_err(|source| VmError::Memory { node, source })?;
        crate::host::policy::bind(m.as_ptr(), m.len(), host, false)
            .map_err(|source| VmError::Policy { node, source })?;
        Ok(m)
    }

    /// Registers (or re-registers) a KVM slot.
    fn set_slot(&self, k: &KvmSlot, log_dirty: bool) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: k.id,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: k.gpa,
            memory_size: k.len,
            userspace_addr: k.host,
        };
        // SAFETY: [host, host + len) is the mappings of the slot's chunks,
        // which live in self.memory for as long as the VM: re-homing a chunk
        // moves other pages under the same address and never leaves it
        // unmapped (replace_chunk), and chunks are only dropped with the VM.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err(format!(
            "KVM_SET_USER_MEMORY_REGION (slot {}, guest {:#x}+{:#x})",
            k.id, k.gpa, k.len
        )))
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory (shared).
    pub fn memory(&self) -> RwLockReadGuard<'_, GuestMemory> {
        self.memory.read().unwrap_or_else(|e| e.into_inner())
    }

    fn memory_mut(&self) -> RwLockWriteGuard<'_, GuestMemory> {
        self.memory.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_state(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current run state (Stopped if the guest died on its own).
    pub fn state(&self) -> RunState {
        if self
            .guest_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return RunState::Stopped;
        }
        *self.lock_state()
    }

    /// How the guest ended the VM on purpose (power-off, reboot), if it did.
    pub fn guest_exit(&self) -> Option<GuestExit> {
        *self.guest_exit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `value` at `gpa` as a device would: the page is marked for
    /// the dirty logs, so a checkpoint or move in progress does not miss a
    /// write KVM never saw. False when the address is not guest memory or
    /// the memory is gone.
    pub fn write_u64_marked(&self, gpa: u64, value: u64) -> bool {
        use vm_memory::Bytes;
        self.device_memory
            .access()
            .is_some_and(|m| m.write_obj(value, vm_memory::GuestAddress(gpa)).is_ok())
    }

    /// Writes `bytes` at `gpa` as a device would (every page marked for the
    /// dirty logs). False when the range is not all guest memory or the
    /// memory is gone; nothing is written then.
    pub fn write_marked(&self, gpa: u64, bytes: &[u8]) -> bool {
        use vm_memory::{Bytes, GuestMemoryBackend};
        let Some(m) = self.device_memory.access() else {
            return false;
        };
        let at = vm_memory::GuestAddress(gpa);
        m.check_range(at, bytes.len()) && m.write_slice(bytes, at).is_ok()
    }

    /// The guest's TSC rate in kHz, when KVM told it.
    pub fn tsc_khz(&self) -> Option<u32> {
        match self.tsc_khz.load(Ordering::Relaxed) {
            0 => None,
            khz => Some(khz),
        }
    }

    /// Whether the VM has an in-kernel irqchip (a Linux guest).
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Reads the interrupt controllers, PIT and kvmclock (VM paused).
    fn save_machine(&self) -> Result<Option<MachineState>, VmError> {
        if !self.irqchip {
            return Ok(None);
        }
        let chip = |id| {
            let mut c = kvm_bindings::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err(format!("KVM_GET_IRQCHIP (chip {id})")))?;
            Ok::<_, VmError>(c)
        };
        let mut clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        // Restored, the guest's clock goes on from this value: no jump by
        // the time the checkpoint spent on disk.
        clock.flags = 0;
        Ok(Some(MachineState {
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock,
        }))
    }

    fn restore_machine(&self, m: &MachineState) -> Result<(), VmError> {
        for (name, c) in [
            ("PIC master", &m.pic_master),
            ("PIC slave", &m.pic_slave),
            ("IOAPIC", &m.ioapic),
        ] {
            self.fd
                .set_irqchip(c)
                .map_err(kvm_err(format!("KVM_SET_IRQCHIP ({name})")))?;
        }
        self.fd.set_pit2(&m.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        self.fd
            .set_clock(&m.clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// Everything besides memory that a checkpoint or migration carries,
    /// from `vcpus` (saved as the vCPUs stopped) and what the VM and its
    /// devices hold. The VM must be paused.
    pub fn save_state(&self, _pause: &Pause, vcpus: Vec<VcpuState>) -> Result<VmState, VmError> {
        let devices = match &self.devices {
            Some(d) => d.save()?,
            None => Default::default(),
        };
        Ok(VmState {
            version: STATE_VERSION,
            host_nodes: self.host_nodes(),
            vcpus,
            machine: self.save_machine()?,
            devices,
        })
    }

    /// Fails unless `state` can be loaded into this VM in place (a reset):
    /// its vCPUs, its interrupt controller and clock (or their absence)
    /// and every device's state fit. Changes nothing.
    pub fn check_load(&self, state: &VmState) -> Result<(), VmError> {
        if state.vcpus.len() != self.config.vcpus as usize {
            return Err(StateMismatch::VcpuCount {
                saved: state.vcpus.len(),
                configured: self.config.vcpus as usize,
            }
            .into());
        }
        match (&state.machine, self.irqchip) {
            (Some(_), false) => return Err(StateMismatch::UnexpectedMachine.into()),
            (None, true) => return Err(StateMismatch::MissingMachine.into()),
            _ => {}
        }
        if let Some(d) = &self.devices {
            d.check_load(&state.devices)?;
        }
        Ok(())
    }

    /// Loads `state` into the paused VM in place (a reset): the interrupt
    /// controllers, timer and clock, every device, then every vCPU, each on
    /// its own thread. Guest memory must already hold the state's pages
    /// (KVM writes the kvmclock pages as the MSRs load). Checked by
    /// [`Vm::check_load`] first; a failure here leaves the VM half loaded.
    pub fn load_state(&self, _pause: &Pause, state: &VmState) -> Result<(), VmError> {
        self.check_load(state)?;
        if let Some(m) = &state.machine {
            self.restore_machine(m)?;
        }
        if let Some(d) = &self.devices {
            d.load(&state.devices)?;
        }
        let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        for (v, s) in vcpus.iter().zip(&state.vcpus) {
            v.send(VcpuCmd::Load(Box::new(s.clone())))?;
        }
        for v in vcpus.iter() {
            match v.recv("load")? {
                VcpuReply::Loaded(r) => r?,
                r => return Err(unexpected(v.id, r, "load")),
            }
        }
        Ok(())
    }

    /// Every memory chunk's number, in guest-physical order.
    pub fn chunk_slots(&self) -> Vec<u32> {
        self.memory().chunks().map(|c| c.slot).collect()
    }

    /// Why the guest stopped by itself, if it did.
    pub fn guest_stop_reason(&self) -> Option<String> {
        self.guest_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The host node each guest node is bound to now.
    pub fn host_nodes(&self) -> Vec<u32> {
        self.host_nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The devices' worker threads and the CPUs each guest node's group
    /// follows (a NUMA move re-pins them with the vCPUs).
    pub fn device_threads(&self) -> &crate::host::affinity::PinnedThreads {
        &self.device_threads
    }

    /// Records a guest node's new host node after a move.
    pub fn set_host_node(&self, guest_node: u32, host: u32) {
        self.host_nodes.lock().unwrap_or_else(|e| e.into_inner())[guest_node as usize] = host;
        if let Some(n) = self.memory_mut().nodes.get_mut(guest_node as usize) {
            n.host_node = Some(host);
        }
    }

    /// Stops the guest because something it depends on failed (a corrupt
    /// page in a lazy restore): vCPUs are paused and status says why.
    pub fn fail(&self, why: String) {
        tracing::error!("{why}");
        self.guest_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        if let Ok(p) = self.pause() {
            drop(p);
        }
    }

    fn send_all_with(
        &self,
        mut cmd: impl FnMut(u32) -> VcpuCmd,
        what: &'static str,
        ok: fn(&VcpuReply) -> bool,
    ) -> Result<Vec<VcpuReply>, VmError> {
        let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        for v in vcpus.iter() {
            v.send(cmd(v.id))?;
            v.kick();
        }
        let mut out = Vec::new();
        for v in vcpus.iter() {
            let r = v.recv(what)?;
            if !ok(&r) {
                return Err(VmError::Vcpu(VcpuError::Gone {
                    id: v.id,
                    why: format!("unexpected reply {r:?} to {what}"),
                }));
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Stops every vCPU; returns the pause to hand to `resume`. A vCPU
    /// asleep in a wait of its own is held there without being woken; the
    /// others are kicked out of KVM_RUN.
    pub fn pause(&self) -> Result<Pause, VmError> {
        let was = *self.lock_state();
        if was == RunState::Stopped {
            return Err(VmError::State(was, "it cannot be paused"));
        }
        if was == RunState::Running {
            self.quiesce_devices()?;
        }
        let since = Instant::now();
        let boost = Boost::new();
        let mut stopped: Option<Instant> = None;
        {
            let mut vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
            let mut asked = Vec::new();
            for (i, v) in vcpus.iter_mut().enumerate() {
                if v.is_held() {
                    continue;
                }
                if v.hold() {
                    stopped.get_or_insert_with(Instant::now);
                    continue;
                }
                v.send(VcpuCmd::Pause)?;
                v.kick();
                asked.push(i);
            }
            for i in asked {
                let v = &vcpus[i];
                match v.recv("pause")? {
                    VcpuReply::Paused { at } => earliest(&mut stopped, at),
                    r => return Err(unexpected(v.id, r, "pause")),
                }
            }
        }
        *self.lock_state() = RunState::Paused;
        Ok(Pause {
            since,
            stopped: stopped.unwrap_or(since),
            was_paused: was == RunState::Paused,
            _boost: boost,
        })
    }

    /// Stops every vCPU and returns each one's state, captured by the vCPU
    /// thread as it stopped (one round trip instead of two).
    pub fn pause_saving(&self) -> Result<(Pause, Vec<VcpuState>), VmError> {
        let was = *self.lock_state();
        if was == RunState::Stopped {
            return Err(VmError::State(was, "it cannot be paused"));
        }
        if was == RunState::Running {
            self.quiesce_devices()?;
        }
        let since = Instant::now();
        let boost = Boost::new();
        let replies = self.send_all_with(
            |_| VcpuCmd::PauseAndSave,
            "pause",
            |r| matches!(r, VcpuReply::State { .. }),
        );
        // Even if a reply was bad, every vCPU that answered is stopped now.
        *self.lock_state() = RunState::Paused;
        let mut stopped: Option<Instant> = None;
        let states = replies.and_then(|rs| {
            rs.into_iter()
                .map(|r| match r {
                    VcpuReply::State { at, state } => {
                        earliest(&mut stopped, at);
                        state.map(|b| *b).map_err(VmError::Vcpu)
                    }
                    _ => unreachable!("filtered by send_all_with"),
                })
                .collect::<Result<Vec<_>, _>>()
        });
        let pause = Pause {
            since,
            stopped: stopped.unwrap_or(since),
            was_paused: was == RunState::Paused,
            _boost: boost,
        };
        match states {
            Ok(v) => Ok((pause, v)),
            Err(e) => {
                let _ = self.resume(pause);
                Err(e)
            }
        }
    }

    /// Restarts every vCPU: a held one that still sleeps is let go without
    /// a wakeup, the others get `Resume`. Returns when the last one went
    /// back to the guest (entered KVM_RUN, or its own wait).
    fn restart_all(&self) -> Result<Instant, VmError> {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        let mut last: Option<Instant> = None;
        let mut asked = Vec::new();
        for (i, v) in vcpus.iter_mut().enumerate() {
            if v.release() {
                last = Some(Instant::now());
                continue;
            }
            v.send(VcpuCmd::Resume)?;
            asked.push(i);
        }
        for i in asked {
            let v = &vcpus[i];
            match v.recv("resume")? {
                VcpuReply::Resumed { at } => last = last.max(Some(at)),
                r => return Err(unexpected(v.id, r, "resume")),
            }
        }
        Ok(last.unwrap_or_else(Instant::now))
    }

    /// Restarts the vCPUs (unless they were paused before the pause began);
    /// returns how long the pause really was: from the first vCPU stopping
    /// to the last one going back to the guest, as the vCPU threads saw it
    /// (not the caller's own latency of asking and hearing back).
    pub fn resume(&self, p: Pause) -> Result<Duration, VmError> {
        if p.was_paused {
            return Ok(p.since.elapsed());
        }
        let last = self.restart_all()?;
        *self.lock_state() = RunState::Running;
        self.resume_devices()?;
        Ok(last.saturating_duration_since(p.stopped))
    }

    /// Quiesces the devices before the vCPUs stop (the guest still runs, its
    /// I/O waits): from then on no device writes guest memory, so the
    /// pause's last dirty fetch sees everything and their states hold.
    fn quiesce_devices(&self) -> Result<(), VmError> {
        match &self.devices {
            Some(d) => Ok(d.quiesce()?),
            None => Ok(()),
        }
    }

    /// What the devices report for `status` (network counters ...).
    pub fn device_status(&self) -> Vec<crate::api::vm::DeviceStatus> {
        self.devices
            .as_ref()
            .map(|d| d.status())
            .unwrap_or_default()
    }

    /// One round of the devices' announce after a host migration (RARP
    /// frames for every network card's MAC, GUEST_ANNOUNCE for drivers
    /// that take it).
    pub fn announce_devices(&self) {
        if let Some(d) = &self.devices {
            d.announce();
        }
    }

    /// Lets the devices serve again once the vCPUs run.
    fn resume_devices(&self) -> Result<(), VmError> {
        match &self.devices {
            Some(d) => Ok(d.resume()?),
            None => Ok(()),
        }
    }

    /// The user's `pause`: the VM stays paused until `resume_user`.
    pub fn pause_user(&self) -> Result<Duration, VmError> {
        let p = self.pause()?;
        Ok(p.since.elapsed())
    }

    /// The user's `resume`.
    pub fn resume_user(&self) -> Result<(), VmError> {
        match self.state() {
            RunState::Stopped => {
                return Err(VmError::State(RunState::Stopped, "it cannot be resumed"))
            }
            RunState::Running => return Ok(()),
            RunState::Paused => {}
        }
        self.restart_all()?;
        *self.lock_state() = RunState::Running;
        self.resume_devices()
    }

    /// How many vCPUs the VM holds asleep (paused without a command).
    #[cfg(test)]
    fn held_vcpus(&self) -> usize {
        let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        vcpus.iter().filter(|v| v.is_held()).count()
    }

    /// Each vCPU thread's tid.
    pub fn vcpu_tids(&self) -> Vec<(u32, i32)> {
        self.vcpus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|v| (v.id, v.tid()))
            .collect()
    }

    /// Turns KVM dirty logging on for every slot (idempotent). Pages dirtied
    /// from now on show in `fetch_dirty`.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if d.logging {
            return Ok(());
        }
        for k in &self.kvm_slots {
            self.set_slot(k, true)?;
        }
        d.logging = true;
        Ok(())
    }

    /// Whether KVM dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner()).logging
    }

    /// Turns dirty logging off unless an accumulator still needs it.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if !d.logging || !d.keepers.is_empty() {
            return Ok(());
        }
        for k in &self.kvm_slots {
            self.set_slot(k, false)?;
        }
        d.logging = false;
        d.pending.clear();
        Ok(())
    }

    /// The pages of these chunks dirtied since their last fetch, by chunk
    /// slot; also recorded in every accumulator the VM keeps.
    ///
    /// Each KVM slot holding one of them has its log fetched and cleared
    /// once, whole; what it says of its other chunks waits for their turn.
    pub fn fetch_dirty(&self, chunks: &[u32]) -> Result<BTreeMap<u32, DirtyBitmap>, VmError> {
        let (stores, chunks): (Vec<u32>, Vec<u32>) = chunks
            .iter()
            .partition(|&&s| crate::vmm::store::is_store_slot(s));
        let all_stores = self.stores();
        let store_of = |slot: u32| {
            all_stores
                .get((slot - crate::vmm::store::STORE_SLOTS) as usize)
                .ok_or(VmError::NoChunk(slot))
        };
        for &s in &stores {
            store_of(s)?;
        }
        let mut out = self.fetch_memory_dirty(&chunks)?;
        // A disk's written blocks are its dirty log: taken as they are
        // fetched, and kept for a checkpoint chain as memory's are.
        let d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        for s in stores {
            let fresh = store_of(s)?.take_written();
            for keeper in &d.keepers {
                keeper.record(s, &fresh);
            }
            out.insert(s, fresh);
        }
        Ok(out)
    }

    /// The VM's disks, as the engine moves them, in the configuration's
    /// order: store `i` is slot `STORE_SLOTS + i`.
    pub fn stores(&self) -> Vec<Arc<dyn crate::vmm::store::BlockStore>> {
        self.devices
            .as_ref()
            .map(|d| d.stores())
            .unwrap_or_default()
    }

    /// The slot numbers of the VM's disks.
    pub fn store_slots(&self) -> Vec<u32> {
        (0..self.stores().len() as u32)
            .map(|i| crate::vmm::store::STORE_SLOTS + i)
            .collect()
    }

    fn fetch_memory_dirty(&self, chunks: &[u32]) -> Result<BTreeMap<u32, DirtyBitmap>, VmError> {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let d = &mut *d;
        let wanted: std::collections::BTreeSet<u32> = chunks.iter().copied().collect();
        // Every chunk is looked up before any log is fetched (and cleared).
        let mut kvm_slots = std::collections::BTreeSet::new();
        for &want in &wanted {
            let k = self
                .kvm_slots
                .iter()
                .position(|k| k.chunks.iter().any(|c| c.0 == want))
                .ok_or(VmError::NoChunk(want))?;
            kvm_slots.insert(k);
        }
        let mut out = BTreeMap::new();
        for k in kvm_slots {
            let k = &self.kvm_slots[k];
            let log = match self.fd.get_dirty_log(k.id, k.len as usize) {
                Ok(log) => log,
                Err(e) => {
                    // What other KVM slots gave already stays for the next
                    // fetch: their logs are cleared.
                    for (chunk, b) in out {
                        d.pending.insert(chunk, b);
                    }
                    return Err(kvm_err(format!("KVM_GET_DIRTY_LOG (slot {})", k.id))(e));
                }
            };
            for &(chunk, first, pages) in &k.chunks {
                let mut fresh = DirtyBitmap::new(pages);
                fresh.merge_bits(&log, first);
                // What devices wrote (disk reads, used rings) KVM never
                // sees: vm-memory marked it as they wrote.
                let gpa = k.gpa + first * PAGE_SIZE;
                match self.device_memory.take_dirty(gpa, pages) {
                    Ok(written) => fresh.merge(&written),
                    Err(e) => {
                        // KVM's log is cleared: keep its share for the next fetch.
                        d.pending.insert(chunk, fresh);
                        for (chunk, b) in out {
                            d.pending.insert(chunk, b);
                        }
                        return Err(VmError::DeviceMemory(e));
                    }
                }
                for keeper in &d.keepers {
                    keeper.record(chunk, &fresh);
                }
                let b = match d.pending.remove(&chunk) {
                    Some(mut earlier) => {
                        earlier.merge(&fresh);
                        earlier
                    }
                    None => fresh,
                };
                if wanted.contains(&chunk) {
                    out.insert(chunk, b);
                } else if b.count() > 0 {
                    d.pending.insert(chunk, b);
                }
            }
        }
        Ok(out)
    }

    /// Feeds every later fetch into `keeper` too, and keeps dirty logging
    /// on from now on (a checkpoint chain needs every page written since
    /// its last checkpoint); once per accumulator.
    pub fn keep_dirty(&self, keeper: Arc<DirtyAccumulator>) -> Result<(), VmError> {
        self.start_dirty_log()?;
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if !d.keepers.iter().any(|k| Arc::ptr_eq(k, &keeper)) {
            d.keepers.push(keeper);
        }
        Ok(())
    }

    /// Re-homes chunk `slot`: `mapping`'s pages (which must hold the
    /// chunk's current contents) move under the chunk's host address, and
    /// the chunk's old pages are returned in a mapping of their own for the
    /// caller to free after the guest runs again. The VM must be paused.
    ///
    /// The KVM slot itself is left alone: its address now holds the new
    /// pages, and KVM drops its stale translations for that range through
    /// its MMU notifier. Deleting and re-adding the slot would do the same
    /// but, with shadow paging, throws away far more than this range.
    ///
    /// Holds the memory write lock for the swap, so no reader of guest
    /// memory (status's progress counters, verify, numa-stat, the engine)
    /// sees the range half swapped. The calling thread must hold no
    /// [`Vm::memory`] guard, or this deadlocks.
    pub fn replace_chunk(
        &self,
        _pause: &Pause,
        slot: u32,
        mapping: Mapping,
    ) -> Result<Mapping, VmError> {
        let mem = self.memory_mut();
        let (node, chunk) = mem
            .nodes
            .iter()
            .find_map(|n| {
                n.chunks
                    .iter()
                    .find(|c| c.slot == slot)
                    .map(|c| (n.guest_node, c))
            })
            .ok_or(VmError::NoChunk(slot))?;
        chunk
            .mapping
            .take_pages_of(mapping)
            .map_err(|source| VmError::Memory { node, source })
    }

    /// Throttles every vCPU to run only `(100 - percent) %` of the time
    /// (0: full speed; at most 99), so that a guest dirtying memory faster
    /// than a transfer carries it slows down. A thread kicks the vCPUs out
    /// of KVM_RUN once per [`vcpu::THROTTLE_PERIOD`]; each then sleeps its
    /// share of the period.
    pub fn set_throttle(&self, percent: u32) {
        let percent = percent.min(99);
        self.throttle.store(percent, Ordering::Relaxed);
        let mut t = self.throttler.lock().unwrap_or_else(|e| e.into_inner());
        if percent == 0 {
            if let Some(k) = t.take() {
                // Dropping the sender wakes the kicker from its period at
                // once: lifting the throttle in a pause must not wait for it.
                drop(k.stop);
                let _ = k.thread.join();
            }
            return;
        }
        if t.is_some() {
            return;
        }
        let targets: Vec<libc::pthread_t> = self
            .vcpus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|v| v.pthread())
            .collect();
        let throttle = self.throttle.clone();
        let kick = vcpu::kick_signal();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        *t = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while throttle.load(Ordering::Relaxed) > 0 {
                    if !matches!(
                        stopped.recv_timeout(vcpu::THROTTLE_PERIOD),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    ) {
                        break;
                    }
                    for &th in &targets {
                        // SAFETY: the vCPU threads outlive this thread:
                        // `set_throttle(0)` (also called by `shutdown`
                        // before the vCPUs finish) joins it first. The
                        // signal's handler only sets immediate_exit.
                        unsafe { libc::pthread_kill(th, kick) };
                    }
                }
            })
            .ok()
            .map(|thread| Throttler { thread, stop });
    }

    /// The current vCPU throttle, percent.
    pub fn throttle(&self) -> u32 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// Stops the vCPU threads for good.
    pub fn shutdown(&self) {
        self.set_throttle(0);
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        for v in vcpus.iter_mut() {
            v.finish();
        }
        vcpus.clear();
        self.device_memory.detach();
        *self.lock_state() = RunState::Stopped;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_vm(guest: crate::guest::GuestSpec) -> Arc<Vm> {
        test_vm_in_chunks(guest, 32 << 20)
    }

    fn test_vm_in_chunks(guest: crate::guest::GuestSpec, chunk_size: u64) -> Arc<Vm> {
        use crate::vmm::NodeConfig;
        let config = VmConfig {
            name: "pause-test".into(),
            vcpus: 2,
            nodes: vec![NodeConfig {
                guest_node: 0,
                size: 64 << 20,
                host_node: None,
                vcpus: None,
            }],
            guest,
            hugepages: false,
            chunk_size,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        };
        crate::service::build::boot(
            config,
            &crate::devices::Console::Stderr,
            false,
            &Default::default(),
        )
        .expect("this test needs /dev/kvm")
        .vm
    }

    #[test]
    fn an_idle_guest_is_paused_without_waking_its_vcpus() {
        let vm = test_vm(crate::guest::GuestSpec::Idle);
        // The vCPUs park in the test device's wait soon after they start.
        let mut held = 0;
        for _ in 0..1000 {
            let t0 = Instant::now();
            let p = vm.pause().expect("pause");
            held = vm.held_vcpus();
            let d = vm.resume(p).expect("resume");
            assert!(d <= t0.elapsed(), "the real pause lies inside the call");
            if held == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(held, 2, "both parked vCPUs are held, not woken");
        // Held again and again, then stopped: the threads still answer.
        for _ in 0..50 {
            let p = vm.pause().expect("pause");
            vm.resume(p).expect("resume");
        }
        vm.pause_user().expect("user pause");
        vm.resume_user().expect("user resume");
        vm.shutdown();
    }

    #[test]
    fn a_paced_guest_held_while_its_vcpus_wake_makes_no_progress_and_verifies() {
        let vm = test_vm(crate::guest::GuestSpec::Dirty {
            wss: Some(16 << 20),
            rate: Some(2000),
            fill_random: false,
        });
        while crate::guest::progress(&vm) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut held = 0;
        for i in 0..200 {
            let t0 = Instant::now();
            let p = vm.pause().expect("pause");
            held += vm.held_vcpus();
            let a = crate::guest::progress(&vm);
            // Longer than the guest's pace step (~1 ms at 1000 pages/s
            // per vCPU) now and then: held vCPUs wake, spin and park.
            std::thread::sleep(Duration::from_micros(if i % 4 == 0 { 5000 } else { 200 }));
            assert_eq!(
                crate::guest::progress(&vm),
                a,
                "a vCPU ran while the VM was paused"
            );
            let d = vm.resume(p).expect("resume");
            assert!(d <= t0.elapsed(), "the real pause lies inside the call");
            std::thread::sleep(Duration::from_micros(300));
        }
        assert!(held > 0, "a paced guest's sleeping vCPUs are held");
        let p = crate::guest::progress(&vm);
        while crate::guest::progress(&vm) == p {
            std::thread::sleep(Duration::from_millis(1));
        }
        let pause = vm.pause().expect("pause");
        let r = crate::guest::verify::verify(&vm.memory(), &|_, _, _| {
            Err(std::io::Error::other("no disk"))
        });
        assert!(r.ok, "{r:?}");
        vm.resume(pause).expect("resume");
        vm.shutdown();
    }

    #[test]
    fn kvm_slots_join_chunks_that_follow_each_other_up_to_the_largest_slot() {
        use crate::memory::{GuestRange, NodeMemory};
        // Node 0: three chunks in one mapping; node 1: two, right after it
        // in guest memory but in a mapping of its own.
        let node = |guest_node: u32, at: u64, n: u64, slot0: u32| {
            let mut rest = Some(Mapping::new((n << 20) as usize, Backing::Anonymous).unwrap());
            let chunks = (0..n)
                .map(|i| {
                    let mut mapping = rest.take().unwrap();
                    if i + 1 < n {
                        rest = Some(mapping.split_off(1 << 20));
                    }
                    Chunk {
                        range: GuestRange {
                            start: at + (i << 20),
                            len: 1 << 20,
                        },
                        slot: slot0 + i as u32,
                        mapping,
                    }
                })
                .collect();
            NodeMemory {
                guest_node,
                host_node: None,
                size: n << 20,
                backing: Backing::Anonymous,
                chunks,
            }
        };
        let memory = GuestMemory {
            nodes: vec![node(0, 0, 3, 0), node(1, 3 << 20, 2, 3)],
        };
        let got = |max: u64| -> Vec<(u32, u64, u64, Vec<u32>)> {
            KvmSlot::over(&memory, max)
                .iter()
                .map(|k| (k.id, k.gpa, k.len, k.chunks.iter().map(|c| c.0).collect()))
                .collect()
        };
        assert_eq!(
            got(1 << 30),
            vec![
                (0, 0, 3 << 20, vec![0, 1, 2]),
                (1, 3 << 20, 2 << 20, vec![3, 4])
            ]
        );
        assert_eq!(
            got(2 << 20),
            vec![
                (0, 0, 2 << 20, vec![0, 1]),
                (1, 2 << 20, 1 << 20, vec![2]),
                (2, 3 << 20, 2 << 20, vec![3, 4])
            ]
        );
        let k = &KvmSlot::over(&memory, 1 << 30)[0];
        assert_eq!(k.chunks[2], (2, 512, 256), "chunk 2 starts at page 512");
    }

    #[test]
    fn one_kvm_slot_spans_a_node_and_each_chunk_gets_its_share_of_its_log() {
        let vm = test_vm_in_chunks(
            crate::guest::GuestSpec::Dirty {
                wss: None,
                rate: None,
                fill_random: false,
            },
            16 << 20,
        );
        assert_eq!(vm.kvm_slots.len(), 1, "{:?}", vm.kvm_slots);
        let k = &vm.kvm_slots[0];
        assert_eq!((k.gpa, k.len, k.chunks.len()), (0, 64 << 20, 4));
        {
            let mem = vm.memory();
            for (i, c) in mem.chunks().enumerate() {
                let off = c.mapping.as_ptr() as u64 - k.host;
                assert_eq!((off, c.range.start), (i as u64 * (16 << 20), off));
            }
        }
        vm.start_dirty_log().expect("dirty logging on");
        let all = [0, 1, 2, 3];
        let p = vm.pause().expect("pause");
        vm.fetch_dirty(&all).expect("clear the logs");
        vm.resume(p).expect("resume");
        while crate::guest::progress(&vm) < 100_000 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let p = vm.pause().expect("pause");
        // The first fetch takes the KVM slot's whole log; the other chunks'
        // shares must come out at their own fetch, once.
        let first = vm.fetch_dirty(&[0]).expect("fetch chunk 0");
        let rest = vm.fetch_dirty(&[1, 2, 3]).expect("fetch the others");
        let again = vm.fetch_dirty(&all).expect("fetch all again");
        vm.resume(p).expect("resume");
        vm.shutdown();
        assert_eq!(first.keys().copied().collect::<Vec<_>>(), vec![0]);
        assert_eq!(rest.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        let waited: u64 = rest.values().map(|b| b.count()).sum();
        assert!(waited > 0, "the second vCPU wrote chunks 2 and 3: {rest:?}");
        assert!(
            again.values().all(|b| b.count() == 0),
            "a paused guest dirties nothing, and nothing comes out twice"
        );
    }
}
