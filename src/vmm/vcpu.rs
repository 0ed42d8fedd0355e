//! vCPU threads: each runs KVM_RUN in a loop and obeys commands from the VM
//! (pause, resume, save or restore its state, finish) sent on a channel.
//! A running vCPU is kicked out of KVM_RUN with a real-time signal whose
//! handler sets `immediate_exit`, so a kick is never lost whether it lands
//! inside KVM_RUN or just before it.
//!
//! A vCPU thread asleep in a device wait is outside KVM_RUN already: the
//! VM pauses it without waking it,
//! by taking its [`Park`] word from `IDLE` to `HELD`, and resumes it by
//! putting the word back, again without a wakeup, if the thread is still
//! asleep. A thread that wakes while held does not enter KVM_RUN: it spins
//! a little for the release, then parks and waits for a `Resume` command.
//! Waking a sleeping thread costs a scheduler wakeup (an IPI to an idle
//! CPU, or a wait for a busy one), which dominated short pauses. A throttle
//! sleep is not held that way: the throttle is lifted in the pause, and a
//! held thread would sleep out its share after the resume.
//!
//! Every reply that starts or ends a pause carries the instant the thread
//! stopped (took the command, right after KVM_RUN returned) or is about to
//! enter KVM_RUN again, so a pause is measured from the vCPUs' side.
//!
//! This module owns the thread state machine and the register state; the
//! devices on the VM's buses decide what port-I/O and MMIO exits mean
//! (`super::bus`).

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::bus::{GuestExit, GuestFault, IoAction, IoBus, MmioBus};

/// How long the VM waits for a vCPU to acknowledge a command.
pub const MAX_ACK_WAIT: Duration = Duration::from_secs(5);

/// MSRs saved with a builtin guest's vCPU: the architectural ones a 64-bit
/// guest depends on, and kvmclock's (0 unless a test hook sets them).
/// A Linux guest's vCPUs save every MSR KVM lists.
pub const BUILTIN_MSRS: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_KVM_SYSTEM_TIME_NEW,
];

use crate::arch::x86_64::regs::{MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW};

/// Period of the vCPU throttle: while throttled at p %, every vCPU is
/// kicked once per period and then sleeps p % of it.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// How long a paused vCPU thread (stopped by command, or woken while
/// held) polls for its release before it sleeps: most pauses of a NUMA
/// move end within this, and a polling thread restarts without a
/// scheduler wakeup. It yields the CPU as it polls, so the thread doing
/// the pause's work runs first where CPUs are short.
pub const HELD_SPIN: Duration = Duration::from_micros(300);

/// The kick signal's offset from SIGRTMIN.
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// This thread's kvm_run page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by
            // the vCPU thread before any kick can target it and valid until
            // the thread exits; a byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
        }
    });
}

/// MSRs per KVM_SET_MSRS call: the kernel refuses `nmsrs >= MAX_IO_MSRS`
/// (256) with E2BIG, one fewer than the bindings' `KVM_MAX_MSR_ENTRIES`.
const MSRS_PER_CALL: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES - 1;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick signal handler (idempotent).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)
}

/// FPU state in a serialisable form (kvm-bindings has no serde for kvm_fpu).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FpuState {
    fpr: Vec<Vec<u8>>,
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: Vec<Vec<u8>>,
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.iter().map(|r| r.to_vec()).collect(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.iter().map(|r| r.to_vec()).collect(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            let n = d.len().min(s.len());
            d[..n].copy_from_slice(&s[..n]);
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            let n = d.len().min(s.len());
            d[..n].copy_from_slice(&s[..n]);
        }
        f
    }
}

/// Everything KVM holds for one vCPU that a checkpoint or migration carries.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU id.
    pub id: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// Full XSAVE area, where KVM gives it.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Pending events.
    pub events: Option<kvm_vcpu_events>,
    /// Multiprocessing state.
    pub mp_state: Option<kvm_mp_state>,
    /// (index, value) of the MSRs that could be read.
    pub msrs: Vec<(u32, u64)>,
    /// The in-kernel local APIC's registers (guests with an irqchip).
    #[serde(default)]
    pub lapic: Option<kvm_lapic_state>,
    /// Debug registers.
    #[serde(default)]
    pub debugregs: Option<kvm_debugregs>,
}

impl Clone for VcpuState {
    /// By hand: `kvm_xsave` ends in a flexible array (empty in what
    /// KVM_GET_XSAVE fills) and does not derive `Clone`; its fixed region
    /// is all the state.
    fn clone(&self) -> Self {
        VcpuState {
            id: self.id,
            regs: self.regs,
            sregs: self.sregs,
            fpu: self.fpu.clone(),
            xsave: self.xsave.as_ref().map(|x| kvm_xsave {
                region: x.region,
                ..Default::default()
            }),
            xcrs: self.xcrs,
            events: self.events,
            mp_state: self.mp_state,
            msrs: self.msrs.clone(),
            lapic: self.lapic,
            debugregs: self.debugregs,
        }
    }
}

/// A vCPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("vCPU {id}: {ioctl} failed: {source}")]
    Kvm {
        /// vCPU id.
        id: u32,
        /// The ioctl.
        ioctl: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread did not answer in time.
    #[error("vCPU {id} did not acknowledge {what} within {MAX_ACK_WAIT:?}")]
    Timeout {
        /// vCPU id.
        id: u32,
        /// The command.
        what: &'static str,
    },
    /// The vCPU thread is gone.
    #[error("vCPU {id} thread has exited ({why})")]
    Gone {
        /// vCPU id.
        id: u32,
        /// Why, if known.
        why: String,
    },
    /// Saved state that this KVM cannot load.
    #[error("vCPU {id}: {why}")]
    State {
        /// vCPU id.
        id: u32,
        /// What does not load.
        why: String,
    },
    /// Spawning the thread failed.
    #[error("cannot start vCPU {id} thread: {source}")]
    Spawn {
        /// vCPU id.
        id: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads a vCPU's state (call only while it is not running): the MSRs of
/// `msr_list`, and the local APIC when `irqchip`.
pub fn save_state(
    id: u32,
    fd: &VcpuFd,
    msr_list: &[u32],
    irqchip: bool,
) -> Result<VcpuState, VcpuError> {
    let kvm = |ioctl| move |source| VcpuError::Kvm { id, ioctl, source };
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?);
    let msrs = read_msrs(fd, msr_list);
    let (lapic, debugregs) = if irqchip {
        (
            Some(fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?),
            Some(fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?),
        )
    } else {
        (None, None)
    };
    Ok(VcpuState {
        id,
        regs,
        sregs,
        fpu,
        xsave: Some(fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?),
        xcrs: Some(fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?),
        events: Some(fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?),
        mp_state: Some(fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?),
        msrs,
        lapic,
        debugregs,
    })
}

/// The MSRs of `list` that KVM lets this vCPU read.
pub fn readable_msrs(fd: &VcpuFd, list: &[u32]) -> Vec<u32> {
    read_msrs(fd, list).into_iter().map(|(i, _)| i).collect()
}

/// Reads `list` with as few KVM_GET_MSRS as fit (each ioctl costs several
/// µs here); KVM stops at the first MSR it cannot read, and reading goes on
/// after it, so a single unsupported MSR loses nothing else.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Vec<(u32, u64)> {
    let entries: Vec<_> = list
        .iter()
        .map(|&index| kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut out = Vec::new();
    let mut rest: &[kvm_bindings::kvm_msr_entry] = &entries;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSRS_PER_CALL)];
        let Ok(mut m) = Msrs::from_entries(batch) else {
            break;
        };
        let n = fd.get_msrs(&mut m).unwrap_or(0);
        out.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Skip the MSR KVM refused, if any.
        let skip = if n < batch.len() { n + 1 } else { n };
        rest = &rest[skip.min(rest.len())..];
    }
    out
}

/// Writes a vCPU's state (call only while it is not running).
pub fn restore_state(fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuError> {
    let id = s.id;
    let kvm = |ioctl| move |source| VcpuError::Kvm { id, ioctl, source };
    fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // After the sregs (their APIC base resets the local APIC) and before
    // the MSRs (the TSC deadline lives in the local APIC).
    if let Some(l) = &s.lapic {
        fd.set_lapic(l).map_err(kvm("KVM_SET_LAPIC"))?;
    }
    if let Some(d) = &s.debugregs {
        fd.set_debug_regs(d).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
    }
    match &s.xsave {
        // SAFETY: the xsave area came from KVM_GET_XSAVE of a vCPU of the
        // same kind (a checkpoint or stream of this VM's configuration); KVM
        // validates its header and rejects what it cannot load.
        Some(x) => unsafe { fd.set_xsave(x) }.map_err(kvm("KVM_SET_XSAVE"))?,
        None => fd.set_fpu(&s.fpu.to_kvm()).map_err(kvm("KVM_SET_FPU"))?,
    }
    fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    let entries: Vec<_> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    for batch in entries.chunks(MSRS_PER_CALL) {
        let m = Msrs::from_entries(batch).map_err(|e| VcpuError::State {
            id,
            why: format!("{} saved MSRs do not fit KVM_SET_MSRS: {e:?}", batch.len()),
        })?;
        let n = fd.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
        if n < batch.len() {
            return Err(VcpuError::State {
                id,
                why: format!(
                    "this KVM does not load saved MSR {:#x} (value {:#x})",
                    batch[n].index, batch[n].data
                ),
            });
        }
    }
    if let Some(e) = &s.events {
        fd.set_vcpu_events(e).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    }
    if let Some(m) = s.mp_state {
        fd.set_mp_state(m).map_err(kvm("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

/// Commands to a vCPU thread.
#[derive(Debug)]
pub enum VcpuCmd {
    /// Leave KVM_RUN and wait.
    Pause,
    /// Leave KVM_RUN, wait, and reply with the state right away: saves the
    /// pause a second round trip to every vCPU thread.
    PauseAndSave,
    /// Load this state into the paused vCPU (a reset in place): the I/O
    /// the last exit left pending is completed first, so that KVM does not
    /// complete it on the loaded state when the vCPU runs again.
    Load(Box<VcpuState>),
    /// Run again.
    Resume,
    /// Exit the thread.
    Finish,
}

/// Replies from a vCPU thread.
#[derive(Debug)]
pub enum VcpuReply {
    /// It is paused: out of KVM_RUN since `at`.
    Paused {
        /// When the thread took the command.
        at: Instant,
    },
    /// It is running again: it entered KVM_RUN (or its own wait) right
    /// after `at`.
    Resumed {
        /// When the thread went back to the guest.
        at: Instant,
    },
    /// The state of a `Load` is in (or why not).
    Loaded(Result<(), VcpuError>),
    /// Its state, saved as it stopped at `at`.
    State {
        /// When the thread took the command.
        at: Instant,
        /// The state.
        state: Result<Box<VcpuState>, VcpuError>,
    },
}

/// The word a vCPU thread and the VM share for pausing a thread that is
/// asleep in a wait of its own without waking it.
#[derive(Debug, Default)]
struct Park(AtomicU8);

/// The thread runs: in KVM_RUN, handling an exit, or paused by command.
const RUN: u8 = 0;
/// The thread sleeps in a wait of its own and checks the word before it
/// enters KVM_RUN again: the VM may hold it.
const IDLE: u8 = 1;
/// The VM holds the thread: it must not enter KVM_RUN until the VM puts
/// the word back to `IDLE`.
const HELD: u8 = 2;
/// The thread woke while held and now waits for a `Resume` command.
const PARKED: u8 = 3;

impl Park {
    /// Holds the thread if it sleeps in a wait of its own; false if it
    /// runs (then it must be paused by command).
    fn hold(&self) -> bool {
        self.0
            .compare_exchange(IDLE, HELD, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Releases a held thread; false if it parked meanwhile (then it needs
    /// a `Resume` command, and answers it).
    fn release(&self) -> bool {
        self.0
            .compare_exchange(HELD, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Release);
    }

    /// The thread leaves its wait: true if it may run, false if it parked
    /// (held past `spin`, or the wait ended with a command while held).
    fn leave_wait(&self, spin: Duration) -> bool {
        let start = Instant::now();
        loop {
            match self
                .0
                .compare_exchange(IDLE, RUN, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                // Yield rather than spin hard: on a machine with no spare
                // CPU the VM's thread, working in the pause, runs first.
                Err(HELD) if start.elapsed() < spin => std::thread::yield_now(),
                Err(_) => {
                    if self
                        .0
                        .compare_exchange(HELD, PARKED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return false;
                    }
                    // Released between the two exchanges: try again.
                }
            }
        }
    }
}

/// Why a vCPU thread stopped on its own.
#[derive(Debug, Clone)]
pub enum GuestStop {
    /// The guest triple-faulted or halted for good.
    Shutdown(String),
    /// KVM_RUN failed.
    Error(String),
    /// The guest powered off or rebooted.
    Exit(GuestExit),
    /// The guest reported an exception or interrupt it could not handle.
    Fault(GuestFault),
}

/// The VM's handle on one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    /// vCPU id.
    pub id: u32,
    tx: Sender<VcpuCmd>,
    rx: Receiver<VcpuReply>,
    thread: Option<JoinHandle<()>>,
    tid: Arc<AtomicI32>,
    park: Arc<Park>,
    /// The VM holds the thread through `park` (paused without a command).
    held: bool,
}

/// Called by a vCPU thread when its guest stops by itself.
pub type OnGuestStop = Arc<dyn Fn(u32, GuestStop) + Send + Sync>;

impl VcpuHandle {
    /// Starts the thread for `fd`, paused: it runs on the first `Resume`.
    // Each argument is a separate thing the thread owns or shares.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        id: u32,
        fd: VcpuFd,
        bus: Arc<IoBus>,
        mmio: Arc<MmioBus>,
        cpus: Vec<usize>,
        saved: SavedWith,
        on_stop: OnGuestStop,
        throttle: Arc<AtomicU32>,
    ) -> Result<VcpuHandle, VcpuError> {
        let (tx, cmd_rx) = mpsc::channel();
        let (reply_tx, rx) = mpsc::channel();
        let tid = Arc::new(AtomicI32::new(0));
        let tid2 = tid.clone();
        let park = Arc::new(Park::default());
        let park2 = park.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                tid2.store(crate::host::affinity::current_tid(), Ordering::SeqCst);
                if !cpus.is_empty() {
                    if let Err(e) = crate::host::affinity::set_thread_affinity(0, &cpus) {
                        tracing::warn!("vCPU {id}: cannot pin to CPUs {cpus:?}: {e}");
                    }
                }
                VcpuThread {
                    id,
                    fd,
                    bus,
                    mmio,
                    saved,
                    cmds: cmd_rx,
                    replies: reply_tx,
                    on_stop,
                    throttle,
                    park: park2,
                }
                .run();
            })
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            tx,
            rx,
            thread: Some(thread),
            tid,
            park,
            held: false,
        })
    }

    /// Pauses the thread without a command if it sleeps in a wait of its
    /// own (or is held already); false if it runs and needs `Pause`.
    pub fn hold(&mut self) -> bool {
        if !self.held {
            self.held = self.park.hold();
        }
        self.held
    }

    /// Whether the VM holds the thread (see [`VcpuHandle::hold`]).
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Ends a hold: true if the thread was released without a command
    /// (still asleep, or spinning, it runs on its own); false if it was not
    /// held or parked meanwhile, so that it needs `Resume` and answers it.
    pub fn release(&mut self) -> bool {
        std::mem::take(&mut self.held) && self.park.release()
    }

    /// The thread's kernel tid (for affinity queries).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::SeqCst)
    }

    /// Sends a command without waiting.
    pub fn send(&self, cmd: VcpuCmd) -> Result<(), VcpuError> {
        self.tx.send(cmd).map_err(|_| VcpuError::Gone {
            id: self.id,
            why: "channel closed".into(),
        })
    }

    /// The thread's pthread handle, for a kicker outside the VM (the
    /// throttle); None once finished.
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.thread.as_ref().map(|t| t.as_pthread_t())
    }

    /// Kicks the thread out of KVM_RUN.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            let _ = t.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
        }
    }

    /// Waits for the next reply.
    pub fn recv(&self, what: &'static str) -> Result<VcpuReply, VcpuError> {
        self.rx.recv_timeout(MAX_ACK_WAIT).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout { id: self.id, what },
            RecvTimeoutError::Disconnected => VcpuError::Gone {
                id: self.id,
                why: "thread ended".into(),
            },
        })
    }

    /// Asks the thread to finish and joins it.
    pub fn finish(&mut self) {
        let _ = self.tx.send(VcpuCmd::Finish);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.finish();
    }
}

enum Flow {
    Run,
    Pause,
    Exit,
}

/// What a vCPU saves besides its registers: which MSRs, and whether it has
/// an in-kernel local APIC.
#[derive(Debug, Clone)]
pub struct SavedWith {
    /// MSR indices.
    pub msrs: Arc<Vec<u32>>,
    /// The VM has an in-kernel irqchip.
    pub irqchip: bool,
}

struct VcpuThread {
    id: u32,
    fd: VcpuFd,
    bus: Arc<IoBus>,
    mmio: Arc<MmioBus>,
    saved: SavedWith,
    cmds: Receiver<VcpuCmd>,
    replies: Sender<VcpuReply>,
    on_stop: OnGuestStop,
    /// Percentage of each throttle period to sleep after a kick (0: none).
    throttle: Arc<AtomicU32>,
    /// Shared with the VM: whether it holds this thread while it sleeps.
    park: Arc<Park>,
}

impl VcpuThread {
    fn run(mut self) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut _));
        let mut flow = Flow::Pause;
        loop {
            flow = match flow {
                Flow::Pause => self.paused(),
                Flow::Run => self.running(),
                Flow::Exit => break,
            };
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    fn reply(&self, r: VcpuReply) {
        let _ = self.replies.send(r);
    }

    /// Handles one command; returns the next flow if it changes it.
    fn command(&mut self, cmd: VcpuCmd) -> Option<Flow> {
        match cmd {
            VcpuCmd::Pause => {
                self.reply(VcpuReply::Paused { at: Instant::now() });
                Some(Flow::Pause)
            }
            VcpuCmd::PauseAndSave => {
                let at = Instant::now();
                let state = save_state(self.id, &self.fd, &self.saved.msrs, self.saved.irqchip)
                    .map(Box::new);
                self.reply(VcpuReply::State { at, state });
                Some(Flow::Pause)
            }
            VcpuCmd::Load(state) => {
                // KVM finishes an exit's port or MMIO access (the value of
                // an `in`, skipping the instruction) on the next KVM_RUN,
                // before it looks at immediate_exit: this one returns EINTR
                // at once with nothing left pending. Otherwise the access
                // would complete on the loaded registers if their rip
                // happened to match.
                self.fd.set_kvm_immediate_exit(1);
                let _ = self.fd.run();
                self.reply(VcpuReply::Loaded(restore_state(&self.fd, &state)));
                None
            }
            VcpuCmd::Resume => {
                self.fd.set_kvm_immediate_exit(0);
                self.park.set(RUN);
                self.reply(VcpuReply::Resumed { at: Instant::now() });
                Some(Flow::Run)
            }
            VcpuCmd::Finish => Some(Flow::Exit),
        }
    }

    /// Serves commands until one makes the thread run or exit. For the
    /// first [`HELD_SPIN`] it polls (yielding the CPU) instead of sleeping:
    /// most pauses end within it, and a thread still on its CPU restarts
    /// without a scheduler wakeup.
    fn paused(&mut self) -> Flow {
        let start = Instant::now();
        loop {
            let cmd = if start.elapsed() < HELD_SPIN {
                match self.cmds.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => {
                        std::thread::yield_now();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => return Flow::Exit,
                }
            } else {
                match self.cmds.recv() {
                    Ok(c) => c,
                    Err(_) => return Flow::Exit,
                }
            };
            match self.command(cmd) {
                Some(Flow::Pause) | None => continue,
                Some(f) => return f,
            }
        }
    }

    /// Sleeps the throttled share of a period, serving commands. Unlike a
    /// device wait it cannot be held: a pause must end it with a command,
    /// or the thread would sleep on after the resume (the throttle is
    /// lifted in the pause) and the guest's pause would grow by up to a
    /// period.
    fn throttle_sleep(&mut self, until: Instant) -> Option<Flow> {
        match self
            .cmds
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            Ok(c) => self.command(c),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Flow::Exit),
        }
    }

    /// Sleeps until `until` (None: until a command), serving commands.
    /// Meanwhile the VM may hold the thread (see [`Park`]); it then leaves
    /// the wait paused.
    fn wait(&mut self, until: Option<Instant>) -> Option<Flow> {
        self.wait_spinning(until, Duration::ZERO)
    }

    /// [`VcpuThread::wait`], polling for a command (yielding the CPU) for
    /// the first `spin` before it sleeps: a handoff's answer (the reset
    /// that loads this vCPU) usually comes within it, and a thread still
    /// on its CPU takes it without a scheduler wakeup.
    fn wait_spinning(&mut self, until: Option<Instant>, spin: Duration) -> Option<Flow> {
        self.park.set(IDLE);
        let start = Instant::now();
        let mut polled = None;
        while start.elapsed() < spin && until.is_none_or(|t| Instant::now() < t) {
            match self.cmds.try_recv() {
                Ok(c) => {
                    polled = Some(Ok(c));
                    break;
                }
                Err(TryRecvError::Empty) => std::thread::yield_now(),
                Err(TryRecvError::Disconnected) => {
                    polled = Some(Err(RecvTimeoutError::Disconnected));
                    break;
                }
            }
        }
        let cmd = match (polled, until) {
            (Some(c), _) => c,
            (None, None) => self.cmds.recv().map_err(|_| RecvTimeoutError::Disconnected),
            (None, Some(t)) => self
                .cmds
                .recv_timeout(t.saturating_duration_since(Instant::now())),
        };
        // A command while held ends the wait at once, without spinning.
        let spin = if cmd.is_ok() {
            Duration::ZERO
        } else {
            HELD_SPIN
        };
        let free = self.park.leave_wait(spin);
        match cmd {
            Ok(c) => match self.command(c) {
                // Held, and the command leaves it paused: it stays so.
                None if !free => Some(Flow::Pause),
                f => f,
            },
            Err(RecvTimeoutError::Timeout) if free => None,
            // Held past the spin: wait for the Resume command.
            Err(RecvTimeoutError::Timeout) => Some(Flow::Pause),
            Err(RecvTimeoutError::Disconnected) => Some(Flow::Exit),
        }
    }

    /// What KVM says of an internal error: its suberror and the guest's rip.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, `internal` is the
        // member of the exit union that KVM filled in.
        let i = unsafe { run.__bindgen_anon_1.internal };
        let what = match i.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
                "KVM_INTERNAL_ERROR_EMULATION: KVM could not emulate an instruction"
            }
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => {
                "KVM_INTERNAL_ERROR_SIMUL_EX: an exception while delivering one"
            }
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => {
                "KVM_INTERNAL_ERROR_DELIVERY_EV: an event could not be delivered"
            }
            kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => {
                "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON"
            }
            _ => "an unknown suberror",
        };
        let data = &i.data[..(i.ndata as usize).min(i.data.len())];
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|e| format!("unknown ({e})"));
        format!(
            "KVM internal error, suberror {} ({what}) at guest rip {rip}, data {data:x?}",
            i.suberror
        )
    }

    fn running(&mut self) -> Flow {
        loop {
            while let Ok(cmd) = self.cmds.try_recv() {
                if let Some(f) = self.command(cmd) {
                    return f;
                }
            }
            let action = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => self.bus.write(self.id, port, data),
                Ok(VcpuExit::IoIn(port, data)) => self.bus.read(self.id, port, data),
                Ok(VcpuExit::Shutdown) => {
                    // On AMD, KVM puts the vCPU through INIT before it
                    // reports the shutdown (the VMCB is undefined after
                    // one): reset-state registers say nothing of the fault.
                    let reset = self
                        .fd
                        .get_sregs()
                        .is_ok_and(|s| s.cs.base == 0xffff_0000 && s.cs.selector == 0xf000);
                    let at = self
                        .fd
                        .get_regs()
                        .map(|r| {
                            if reset && r.rip == 0xfff0 {
                                " (KVM reset the vCPU before reporting it, as it does on AMD: where it faulted is lost)".to_string()
                            } else {
                                format!(" at rip {:#x}, rflags {:#x}", r.rip, r.rflags)
                            }
                        })
                        .unwrap_or_default();
                    return self.stopped(GuestStop::Shutdown(format!(
                        "the guest shut down (triple fault){at}"
                    )));
                }
                Ok(VcpuExit::Hlt) => {
                    return self.stopped(GuestStop::Shutdown("the guest halted".into()))
                }
                Ok(VcpuExit::Intr) => IoAction::Continue,
                Ok(VcpuExit::MmioRead(addr, data)) => self.mmio.read(self.id, addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => self.mmio.write(self.id, addr, data),
                Ok(VcpuExit::InternalError) => {
                    let msg = self.internal_error();
                    return self.stopped(GuestStop::Error(msg));
                }
                Ok(other) => {
                    let msg = format!("unexpected exit {other:?}");
                    return self.stopped(GuestStop::Error(msg));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    // A throttle kick: sleep the throttled share of the
                    // period, still obeying commands.
                    match self.throttle.load(Ordering::Relaxed).min(99) {
                        0 => IoAction::Continue,
                        p => {
                            let until = Instant::now() + THROTTLE_PERIOD * p / 100;
                            if let Some(f) = self.throttle_sleep(until) {
                                return f;
                            }
                            IoAction::Continue
                        }
                    }
                }
                Err(e) => return self.stopped(GuestStop::Error(format!("KVM_RUN failed: {e}"))),
            };
            match action {
                IoAction::Continue => {}
                IoAction::Wait(until) => {
                    if let Some(f) = self.wait(until) {
                        return f;
                    }
                }
                IoAction::Handoff(until) => {
                    // Retire the access: KVM completes it before it looks
                    // at immediate_exit, and returns EINTR at once.
                    self.fd.set_kvm_immediate_exit(1);
                    let _ = self.fd.run();
                    self.fd.set_kvm_immediate_exit(0);
                    if let Some(f) = self.wait_spinning(Some(until), HELD_SPIN) {
                        return f;
                    }
                }
                IoAction::Exit(e) => return self.stopped(GuestStop::Exit(e)),
                IoAction::Fault(f) => return self.stopped(GuestStop::Fault(f)),
            }
        }
    }

    /// The guest stopped by itself: tell the VM, then behave as paused so
    /// that state can still be saved and the thread finished.
    fn stopped(&mut self, why: GuestStop) -> Flow {
        (self.on_stop)(self.id, why);
        Flow::Pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saved state whose MSR list is longer than one KVM_SET_MSRS call
    /// holds (a damaged or foreign checkpoint, say) restores in batches or
    /// fails with a message; it never panics.
    #[test]
    fn a_state_with_more_msrs_than_one_call_holds_restores_without_panicking() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let mut s = save_state(0, &fd, BUILTIN_MSRS, false).expect("save");
        let tsc = s
            .msrs
            .iter()
            .find(|m| m.0 == 0x10)
            .copied()
            .unwrap_or((0x10, 0));
        s.msrs = vec![tsc; 3 * kvm_bindings::KVM_MAX_MSR_ENTRIES + 7];
        restore_state(&fd, &s).expect("restored in batches");
        // An MSR KVM refuses is an error naming it, not a panic.
        s.msrs.push((0xdead_beef, 1));
        let e = restore_state(&fd, &s).expect_err("an unknown MSR is refused");
        assert!(e.to_string().contains("0xdeadbeef"), "{e}");
    }
}
