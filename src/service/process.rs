//! The VMM process: one `vmhop run` (or `restore`, or `run --incoming`)
//! from its first check to its exit.
//!
//! It owns the API socket and who answers on it (a placeholder while a VM
//! is built, the waiting destination's status, then the VM's [`Vmm`]),
//! SIGTERM and SIGINT (blocked in every thread and taken by one), the loop
//! that waits for the end (a stop, a signal, the guest powering off or
//! dying, the VM leaving for another host), and the switch from waiting
//! for a migration to running the VM that arrived. What it has to say goes
//! to the caller as [`RunEvent`]s; the CLI renders them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::build::{self, BuildError, Machine};
use super::hooks::{HookError, TestHooks};
use super::vmm::{error_value, Ending, Vmm};
use crate::api::run::{Arrival, RunEnd, RunEvent, RunSpec, StartSpec, Started};
use crate::api::server::{ApiHandler, ApiServer, ServerError, Switch};
use crate::api::vm::{IncomingStatusReport, VmState};
use crate::api::{ApiError, Classify, Endpoint, ErrorKind};
use crate::checkpoint::restore::LoadMode;
use crate::checkpoint::ChainPosition;
use crate::devices::Console;
use crate::migration::destination::{self, IncomingOptions, IncomingStatus, ReceiveError};
use crate::migration::{check_policy, Address, Listener};

/// How long a Linux guest may stay silent on its console before vmhop says
/// that this host's KVM may be too slow to boot it.
const SILENT_BOOT_WARNING: Duration = Duration::from_secs(20);
/// How often the serve loop looks for a guest that ended the VM by itself.
const EXIT_POLL: Duration = Duration::from_millis(100);
/// How often a waiting destination looks for a stop or an arrival.
const ARRIVAL_POLL: Duration = Duration::from_millis(50);

/// The VMM process could not start or its VM could not run on.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A `--test-hook` does not parse.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// The API socket cannot be served.
    #[error(transparent)]
    Socket(#[from] ServerError),
    /// Another process serves the socket already.
    #[error("another vmhop is already serving {0}")]
    SocketInUse(std::path::PathBuf),
    /// The incoming address or its security is wrong.
    #[error("{0}")]
    Incoming(ApiError),
    /// Listening for a migration failed.
    #[error("cannot listen on {address}: {reason}")]
    Listen {
        /// The address.
        address: String,
        /// What failed.
        reason: String,
    },
    /// No source delivered a VM (with `--once`).
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    /// A thread the process needs could not start.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `--reset-base` names a checkpoint resets cannot go back to.
    #[error("--reset-base: {0}")]
    ResetBase(ApiError),
    /// The VM stopped and cannot run on.
    #[error("VM '{name}' stopped and cannot run on: {why}")]
    Died {
        /// The VM.
        name: String,
        /// Why.
        why: String,
    },
}

impl Classify for ProcessError {
    fn kind(&self) -> ErrorKind {
        match self {
            ProcessError::Build(e) => e.kind(),
            ProcessError::Hook(e) => e.kind(),
            ProcessError::Socket(_) => ErrorKind::Failed,
            ProcessError::SocketInUse(_) => ErrorKind::Conflict,
            ProcessError::Incoming(e) | ProcessError::ResetBase(e) => e.kind,
            ProcessError::Listen { .. } => ErrorKind::Unusable,
            ProcessError::Receive(_) | ProcessError::Thread { .. } | ProcessError::Died { .. } => {
                ErrorKind::Failed
            }
        }
    }
}

/// Answers while a VM is being created: nothing to say yet.
struct Starting;

impl ApiHandler for Starting {
    fn handle(&self, _: &str, _: &str, _: &[u8]) -> (u16, Value) {
        let e = ApiError::new(ErrorKind::Unavailable, "the VM is starting");
        (e.status(), error_value(&e.message))
    }
}

/// A process's API socket and end channel, which come up before its VM
/// exists (an incoming migration answers `status` while it waits).
struct Frontend {
    server: ApiServer,
    switch: Arc<Switch>,
    tx: Sender<Ending>,
    rx: Receiver<Ending>,
}

impl Frontend {
    /// Serves `spec`'s socket and turns SIGTERM/SIGINT (blocked in `set`)
    /// into a stop; a placeholder answers until a VM's API takes over.
    fn start(socket: &std::path::Path, set: libc::sigset_t) -> Result<Frontend, ProcessError> {
        let (tx, rx) = mpsc::channel();
        let switch = Switch::new(Arc::new(Starting));
        let server = ApiServer::start(socket, switch.clone())?;
        let signals = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig = 0;
                // SAFETY: `set` is an initialised signal set and `sig` a
                // valid out-pointer; sigwait only blocks this thread.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    let _ = signals.send(Ending::Stop);
                    return;
                }
            })
            .map_err(|source| ProcessError::Thread {
                what: "signal",
                source,
            })?;
        Ok(Frontend {
            server,
            switch,
            tx,
            rx,
        })
    }

    /// Waits up to `d` for an end (stop, SIGTERM, SIGINT); the end if one came.
    fn ended_within(&self, d: Duration) -> Option<Ending> {
        match self.rx.recv_timeout(d) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Ending::Stop),
        }
    }
}

/// Runs a VMM as `spec` says until it ends; `events` hears what happens.
pub fn run(spec: RunSpec, events: &mut dyn FnMut(RunEvent)) -> Result<RunEnd, ProcessError> {
    let hooks = TestHooks::parse(&spec.test_hooks)?;
    let socket = spec.api_socket.clone();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(ProcessError::SocketInUse(socket));
    }
    let console: Console = spec.console.clone();
    match &spec.start {
        StartSpec::Boot => {
            let config = build::config_of(&spec)?;
            let set = crate::util::block_stop_signals();
            let machine = build::boot(config, &console, spec.paused, &hooks)?;
            let fe = Frontend::start(&socket, set)?;
            let loading = Arc::new(AtomicBool::new(false));
            let vmm = Vmm::new(
                machine.vm.clone(),
                ChainPosition::default(),
                loading,
                hooks,
                fe.tx.clone(),
            )
            .with_disks(machine.devices.disks.clone())
            .with_reset_device(machine.devices.reset.clone(), spec.reset_input.clone());
            if let Some(t) = &spec.reset_base {
                vmm.arm_reset(t).map_err(ProcessError::ResetBase)?;
            }
            serve(Arc::new(vmm), machine, fe, &spec, None, events)
        }
        StartSpec::Restore {
            target,
            eager,
            shared,
        } => {
            let set = crate::util::block_stop_signals();
            let name = spec.name_given.then(|| spec.name.clone());
            let r = build::restore(
                target,
                name,
                build::Placement {
                    nets: &spec.nets,
                    disks: &spec.disks,
                    vsock: spec.vsock.as_deref(),
                },
                LoadMode::of(*eager, *shared),
                spec.paused,
                &console,
                &hooks,
            )?;
            let fe = Frontend::start(&socket, set)?;
            let vmm = Vmm::new(
                r.machine.vm.clone(),
                r.position,
                r.loading,
                hooks,
                fe.tx.clone(),
            )
            .with_disks(r.machine.devices.disks.clone())
            .with_reset_device(r.machine.devices.reset.clone(), spec.reset_input.clone());
            if let Some(t) = &spec.reset_base {
                vmm.arm_reset(t).map_err(ProcessError::ResetBase)?;
            }
            let arrival = Some(Arrival::Restored(r.report));
            // A clone holds its image (and its registration beside it)
            // until the VM's process ends.
            let _image = r.image;
            serve(Arc::new(vmm), r.machine, fe, &spec, arrival, events)
        }
        StartSpec::Incoming {
            address,
            once,
            auth,
        } => incoming(&spec, address, *once, auth, hooks, &console, events),
    }
}

/// Rounds of a migrated VM's announce, and the wait before the first (then
/// each wait grows by [`ANNOUNCE_STEP`]): QEMU's defaults.
const ANNOUNCE_ROUNDS: u32 = 5;
/// The wait before the first announce round.
const ANNOUNCE_INITIAL: Duration = Duration::from_millis(50);
/// How much longer each later wait is.
const ANNOUNCE_STEP: Duration = Duration::from_millis(100);

/// Tells the network where a VM that just arrived is, on a thread of its
/// own so that the VM's API serves meanwhile: bridges and switches learn
/// the port its network cards' MACs are behind now.
fn announce(vm: &Arc<crate::vmm::Vm>) {
    let vm = Arc::downgrade(vm);
    let spawned = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let mut wait = ANNOUNCE_INITIAL;
            for _ in 0..ANNOUNCE_ROUNDS {
                std::thread::sleep(wait);
                let Some(vm) = vm.upgrade() else { return };
                vm.announce_devices();
                wait += ANNOUNCE_STEP;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no announce after the migration: cannot start its thread: {e}");
    }
}

/// Serves `vmm`, the API of the VM `machine` holds, until the VM ends.
fn serve(
    vmm: Arc<Vmm>,
    machine: Machine,
    fe: Frontend,
    spec: &RunSpec,
    arrival: Option<Arrival>,
    events: &mut dyn FnMut(RunEvent),
) -> Result<RunEnd, ProcessError> {
    let Machine { vm, devices } = machine;
    if let Some(port) = devices.serial.clone() {
        crate::devices::serial::forward_stdin(port);
    }
    vmm.start_reset_worker()
        .map_err(|source| ProcessError::Thread {
            what: "reset",
            source,
        })?;
    fe.switch.set(vmm.clone());
    let status = vmm.status();
    events(RunEvent::Started(Started {
        name: status.name,
        state: status.state,
        pid: status.pid,
        api_socket: spec.api_socket.clone(),
        vcpus: status.vcpus,
        memory_bytes: status.memory_bytes,
        guest: status.guest.kind,
        restore: arrival,
    }));
    let ended = wait_for_end(&vm, &fe, &devices.console_bytes, events);
    vm.shutdown();
    let Frontend { server, .. } = fe;
    server.shutdown();
    let name = vm.config().name.clone();
    match ended {
        End::Process(Ending::Stop) => Ok(RunEnd::Stopped),
        End::Process(Ending::Handed(what)) => Ok(RunEnd::Handed(what)),
        End::Guest(e) => Ok(RunEnd::GuestEnded(format!(
            "VM '{name}' ended: {}",
            e.describe()
        ))),
        End::Died(why) => Err(ProcessError::Died { name, why }),
    }
}

/// How the serve loop ended.
enum End {
    Process(Ending),
    Guest(crate::vmm::bus::GuestExit),
    Died(String),
}

/// Waits for a stop, a signal, the VM leaving, or the guest ending.
fn wait_for_end(
    vm: &crate::vmm::Vm,
    fe: &Frontend,
    console_bytes: &Arc<AtomicU64>,
    events: &mut dyn FnMut(RunEvent),
) -> End {
    let started = Instant::now();
    let mut warned = false;
    let linux = !vm.config().guest.is_builtin();
    loop {
        if let Some(e) = fe.ended_within(EXIT_POLL) {
            return End::Process(e);
        }
        if let Some(e) = vm.guest_exit() {
            return End::Guest(e);
        }
        // A VM that can no longer run (a triple fault, a vCPU error, a
        // damaged page found by a lazy restore) ends the process with exit
        // 1, so that a supervisor sees it; its API answered meanwhile.
        if let Some(why) = vm.guest_stop_reason() {
            return End::Died(why);
        }
        let silent = console_bytes.load(Ordering::Relaxed) == 0;
        if linux && silent && !warned && started.elapsed() >= SILENT_BOOT_WARNING {
            warned = true;
            events(RunEvent::Notice(silent_guest_warning()));
        }
    }
}

/// What vmhop says about a Linux guest that has printed nothing.
fn silent_guest_warning() -> String {
    format!(
        "the Linux guest has written nothing to its console in {} s. Check that its \
         --cmdline has console=ttyS0; Linux guests also need hardware-assisted KVM (VT-x/AMD-V), \
         which `vmhop demo --kernel` checks.",
        SILENT_BOOT_WARNING.as_secs()
    )
}

/// The API of a destination still waiting for its VM.
struct Waiting {
    name: String,
    listening: String,
    status: Arc<IncomingStatus>,
    ending: Mutex<Sender<Ending>>,
}

impl Waiting {
    fn report(&self) -> IncomingStatusReport {
        let s = &self.status;
        IncomingStatusReport {
            name: self.name.clone(),
            state: VmState::Incoming,
            listening: self.listening.clone(),
            source: s.peer.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            bytes_received: s.bytes.load(Ordering::Relaxed),
            pages_received: s.pages.load(Ordering::Relaxed),
            last_error: s
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            pid: std::process::id(),
        }
    }
}

impl ApiHandler for Waiting {
    fn handle(&self, method: &str, path: &str, _body: &[u8]) -> (u16, Value) {
        let answer = Endpoint::of_request(method, path).and_then(|ep| match ep {
            Endpoint::Status => serde_json::to_value(self.report())
                .map_err(|e| ApiError::failed(format!("cannot encode the reply: {e}"))),
            Endpoint::Stop => {
                let _ = self
                    .ending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(Ending::Stop);
                serde_json::to_value(crate::api::vm::StateReply {
                    state: VmState::Stopped,
                    pause_us: None,
                })
                .map_err(|e| ApiError::failed(e.to_string()))
            }
            _ => Err(ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "no VM here yet: this vmhop waits for an incoming migration on {}",
                    self.listening
                ),
            )),
        });
        match answer {
            Ok(v) => (200, v),
            Err(e) => (e.status(), error_value(&e.message)),
        }
    }
}

/// `--numa guest-node=G,host-node=H` of an incoming VM.
fn rebind(specs: &[String]) -> Result<std::collections::BTreeMap<u32, u32>, ApiError> {
    let mut out = std::collections::BTreeMap::new();
    for s in specs {
        let (mut g, mut h) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("guest-node", v)) => g = v.parse::<u32>().ok(),
                Some(("host-node", v)) => h = v.parse::<u32>().ok(),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "--numa {s}: with --incoming, give guest-node=G,host-node=H (sizes come from the source)"
                    )))
                }
            }
        }
        match (g, h) {
            (Some(g), Some(h)) => {
                out.insert(g, h);
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "--numa {s}: expected guest-node=G,host-node=H with numbers"
                )))
            }
        }
    }
    Ok(out)
}

/// `vmhop run --incoming ADDRESS`: waits for a VM, then runs it.
fn incoming(
    spec: &RunSpec,
    address: &str,
    once: bool,
    auth: &crate::api::migration::AuthFiles,
    hooks: TestHooks,
    console: &Console,
    events: &mut dyn FnMut(RunEvent),
) -> Result<RunEnd, ProcessError> {
    let listen: Address = address
        .parse()
        .map_err(|e| ProcessError::Incoming(ApiError::bad_request(e)))?;
    let security = crate::migration::security_from(auth).map_err(ProcessError::Incoming)?;
    check_policy(&listen, &security, auth.insecure)
        .map_err(|e| ProcessError::Incoming(ApiError::bad_request(e)))?;
    let opts = IncomingOptions {
        rebind: rebind(&spec.numa).map_err(ProcessError::Incoming)?,
        disks: spec
            .disks
            .iter()
            .map(|d| {
                crate::migration::storage::Placement::parse(d).ok_or_else(|| {
                    ProcessError::Incoming(ApiError::bad_request(format!(
                        "--disk {d}: with --incoming, give id=NAME,path=FILE (where disk NAME \
                         lives here, or the new file --copy-storage writes it to)"
                    )))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    // `--net` here puts the arriving VM's cards on this host's TAPs; which
    // cards exist is known only when the VM arrives, but a spec that does
    // not parse is refused now.
    for (i, n) in spec.nets.iter().enumerate() {
        crate::vmm::config::NetConfig::parse(n, &format!("net{i}"))
            .map_err(|e| ProcessError::Incoming(ApiError::bad_request(e.to_string())))?;
    }
    let listener = Listener::bind(&listen).map_err(|e| ProcessError::Listen {
        address: listen.to_string(),
        reason: e.to_string(),
    })?;
    let listening = listener.local_address().to_string();
    let set = crate::util::block_stop_signals();
    let fe = Frontend::start(&spec.api_socket, set)?;
    let status = Arc::new(IncomingStatus::default());
    let waiting: Arc<dyn ApiHandler> = Arc::new(Waiting {
        name: spec.name.clone(),
        listening: listening.clone(),
        status: status.clone(),
        ending: Mutex::new(fe.tx.clone()),
    });
    fe.switch.set(waiting.clone());
    events(RunEvent::Waiting(crate::api::run::Waiting {
        state: VmState::Incoming,
        listening: listening.clone(),
        security: security.describe().to_string(),
        api_socket: spec.api_socket.clone(),
        pid: std::process::id(),
    }));
    let listener = Arc::new(listener);
    let security = Arc::new(security);
    loop {
        // One source at a time, on a thread of its own so that a stop
        // still ends the process while a source sends.
        let (tx, rx) = mpsc::channel();
        {
            let (l, s, o, st) = (
                listener.clone(),
                security.clone(),
                opts.clone(),
                status.clone(),
            );
            std::thread::Builder::new()
                .name("incoming".into())
                .spawn(move || {
                    let _ = tx.send(destination::receive(&l, &s, &o, &st));
                })
                .map_err(|source| ProcessError::Thread {
                    what: "receiver",
                    source,
                })?;
        }
        // Wait on the source, not on the stop channel: the VM that arrives
        // must start at once (its source is paused meanwhile); a stop is
        // seen within one poll.
        let received = loop {
            match rx.recv_timeout(ARRIVAL_POLL) {
                Ok(r) => break r,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ProcessError::Thread {
                        what: "receiver",
                        source: std::io::Error::other("it ended without an answer"),
                    })
                }
            }
            if let Some(e) = fe.ended_within(Duration::ZERO) {
                return Ok(match e {
                    Ending::Stop => RunEnd::Stopped,
                    Ending::Handed(w) => RunEnd::Handed(w),
                });
            }
        };
        let mut arrived = match received {
            Ok(a) => a,
            Err(e) => {
                status.failed(&e);
                if once {
                    return Err(e.into());
                }
                events(RunEvent::Notice(format!(
                    "{e}; nothing runs from it, waiting for another source"
                )));
                continue;
            }
        };
        let t_arrive = Instant::now();
        let built = build::arrive(
            &mut arrived,
            &spec.nets,
            spec.vsock.as_deref(),
            console,
            &hooks,
        )
        .and_then(|m| {
            if hooks.refuse_arrival {
                // Dropped here: its devices close (and unlock) their images.
                drop(m);
                return Err(BuildError::TestHook("incoming-refuse-arrival"));
            }
            Ok(m)
        });
        let machine = match built {
            Ok(m) => m,
            Err(e) => {
                let e = arrived.refuse(format!("the VM does not start here: {e}"));
                status.failed(&e);
                if once {
                    return Err(e.into());
                }
                events(RunEvent::Notice(format!(
                    "{e}; nothing runs from it, waiting for another source"
                )));
                continue;
            }
        };
        // The VM's API answers from the moment it runs here, before the
        // source is told (and its `migrate` returns).
        let vmm = Arc::new(
            Vmm::new(
                machine.vm.clone(),
                ChainPosition::default(),
                Arc::new(AtomicBool::new(false)),
                hooks.clone(),
                fe.tx.clone(),
            )
            .with_disks(machine.devices.disks.clone())
            .with_reset_device(machine.devices.reset.clone(), spec.reset_input.clone()),
        );
        fe.switch.set(vmm.clone());
        tracing::debug!("incoming: VM built in {:?}", t_arrive.elapsed());
        let report = match arrived.confirm() {
            Ok(r) => r,
            Err(e) => {
                // The source did not hear that the VM runs here: it resumes
                // its own, so this one must not run.
                machine.vm.shutdown();
                fe.switch.set(waiting.clone());
                status.failed(&e);
                if once {
                    return Err(e.into());
                }
                events(RunEvent::Notice(format!(
                    "{e}; nothing runs from it, waiting for another source"
                )));
                continue;
            }
        };
        announce(&machine.vm);
        return serve(
            vmm,
            machine,
            fe,
            spec,
            Some(Arrival::Migrated(report)),
            events,
        );
    }
}
