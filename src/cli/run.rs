//! `vmhop run`: builds the VM from the command line, serves its API, and
//! waits for `stop`, SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::{default_socket, CliError, CliResult};
use crate::api::routes::Routes;
use crate::api::server::{error_body, ApiHandler, ApiServer, Switch};
use crate::arch::x86_64::linux::{self, LinuxSpec};
use crate::devices::{self, Console};

use crate::guest::GuestSpec;
use crate::memory::layout::DEFAULT_CHUNK_SIZE;
use crate::util::parse_size;
use crate::vmm::{NodeConfig, Vm, VmConfig};

/// The builtin guest run when neither --guest nor --kernel is given.
const DEFAULT_GUEST: &str = "builtin:idle";
/// How long a Linux guest may stay silent on its console before vmhop says
/// that this host's KVM may be too slow to boot it.
const SILENT_BOOT_WARNING: Duration = Duration::from_secs(20);
/// How often `serve` looks for a guest that ended the VM by itself.
const EXIT_POLL: Duration = Duration::from_millis(100);

/// Name of a VM started without `--name`.
pub const DEFAULT_NAME: &str = "vm";

/// Options of `vmhop run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// VM name (also names the default API socket).
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
    /// API socket path (default: $XDG_RUNTIME_DIR/vmhop/NAME.sock, /run/vmhop/NAME.sock as root).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory (K, M, G suffixes) when no --numa is given.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// A guest NUMA node: guest-node=G,size=SIZE,host-node=H[,cpus=LIST]; repeat for more.
    #[arg(long, value_name = "SPEC")]
    pub numa: Vec<String>,
    /// The guest: builtin:idle (default) or builtin:dirty[,wss=SIZE][,rate=PAGES_PER_S][,fill=random].
    #[arg(long)]
    pub guest: Option<String>,
    /// Linux kernel to boot: a bzImage (vmlinuz) or an ELF vmlinux.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// With --kernel: initial ramdisk.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// With --kernel: kernel command line.
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Write the guest's serial console (ttyS0) to FILE instead of stdout
    /// (stderr with --json).
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// Back guest memory with transparent huge pages.
    #[arg(long)]
    pub hugepages: bool,
    /// Size of a memory chunk (the unit of NUMA moves).
    #[arg(long, value_name = "SIZE", hide = true)]
    pub chunk_size: Option<String>,
    /// Restore from a checkpoint (DIR or DIR@ID) instead of booting.
    #[arg(long, value_name = "DIR[@ID]")]
    pub restore: Option<String>,
    /// With --restore: load all memory before the vCPUs run (default: lazily, on first touch).
    #[arg(long)]
    pub eager: bool,
    /// Start with the vCPUs stopped until `resume`.
    #[arg(long)]
    pub paused: bool,
    /// Wait for a VM migrated from another vmhop (tcp://ADDR:PORT or
    /// unix:PATH) and run it; --numa guest-node=G,host-node=H re-binds its nodes here.
    #[arg(long, value_name = "ADDRESS", conflicts_with = "restore")]
    pub incoming: Option<String>,
    /// With --incoming: exit 1 after the first failed source instead of
    /// waiting for another.
    #[arg(long, requires = "incoming")]
    pub once: bool,
    #[command(flatten)]
    pub auth: super::AuthArgs,
    /// Print one JSON object when the VM is up.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The VM configuration these options describe.
    pub fn config(&self) -> Result<VmConfig, CliError> {
        let guest = match (&self.kernel, &self.guest) {
            (Some(_), Some(_)) => {
                return Err(CliError::usage(
                    "give either --kernel (a Linux guest) or --guest (a builtin guest), not both",
                ))
            }
            (Some(kernel), None) => GuestSpec::Linux(LinuxSpec {
                kernel: kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline: self
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| linux::DEFAULT_CMDLINE.to_string()),
            }),
            (None, g) => {
                if self.initrd.is_some() || self.cmdline.is_some() {
                    return Err(CliError::usage("--initrd and --cmdline need --kernel"));
                }
                GuestSpec::parse(g.as_deref().unwrap_or(DEFAULT_GUEST)).map_err(CliError::usage)?
            }
        };
        let nodes = if self.numa.is_empty() {
            let size = parse_size(self.memory.as_deref().unwrap_or("256M"))
                .map_err(|e| CliError::usage(format!("--memory: {e}")))?;
            vec![NodeConfig {
                guest_node: 0,
                size,
                host_node: None,
                vcpus: None,
            }]
        } else {
            let nodes: Vec<NodeConfig> = self
                .numa
                .iter()
                .map(|s| NodeConfig::parse(s).map_err(CliError::usage))
                .collect::<Result<_, _>>()?;
            // QEMU users give both; they must say the same thing.
            if let Some(m) = &self.memory {
                let memory =
                    parse_size(m).map_err(|e| CliError::usage(format!("--memory: {e}")))?;
                let total: u64 = nodes.iter().map(|n| n.size).sum();
                if memory != total {
                    return Err(CliError::usage(format!(
                        "--memory {m} ({}) does not match the --numa sizes, which add up to {}",
                        crate::util::format_size(memory),
                        crate::util::format_size(total)
                    )));
                }
            }
            nodes
        };
        let chunk_size = match &self.chunk_size {
            Some(s) => parse_size(s).map_err(|e| CliError::usage(format!("--chunk-size: {e}")))?,
            None => DEFAULT_CHUNK_SIZE,
        };
        let c = VmConfig {
            name: self.name.clone(),
            vcpus: self.vcpus,
            nodes,
            guest,
            hugepages: self.hugepages,
            chunk_size,
        };
        c.validate().map_err(CliError::usage)?;
        Ok(c)
    }

    /// A restore takes its configuration from the checkpoint: options that
    /// would change it are refused rather than silently ignored.
    pub fn reject_config_for_restore(&self) -> Result<(), CliError> {
        let given = [
            (self.vcpus != 1, "--vcpus"),
            (self.memory.is_some(), "--memory"),
            (!self.numa.is_empty(), "--numa"),
            (self.guest.is_some(), "--guest"),
            (self.kernel.is_some(), "--kernel"),
            (self.initrd.is_some(), "--initrd"),
            (self.cmdline.is_some(), "--cmdline"),
            (self.hugepages, "--hugepages"),
            (self.chunk_size.is_some(), "--chunk-size"),
        ];
        if let Some((_, flag)) = given.iter().find(|g| g.0) {
            return Err(CliError::usage(format!(
                "{flag} cannot be used with a restore: the configuration comes from the checkpoint"
            )));
        }
        Ok(())
    }

    /// An incoming VM brings its configuration: options that would change
    /// it are refused (only --numa, to re-bind nodes, is taken).
    pub fn reject_config_for_incoming(&self) -> Result<(), CliError> {
        let given = [
            (self.vcpus != 1, "--vcpus"),
            (self.memory.is_some(), "--memory"),
            (self.guest.is_some(), "--guest"),
            (self.kernel.is_some(), "--kernel"),
            (self.initrd.is_some(), "--initrd"),
            (self.cmdline.is_some(), "--cmdline"),
            (self.hugepages, "--hugepages"),
            (self.chunk_size.is_some(), "--chunk-size"),
            (self.eager, "--eager"),
            (self.paused, "--paused"),
        ];
        if let Some((_, flag)) = given.iter().find(|g| g.0) {
            return Err(CliError::usage(format!(
                "{flag} cannot be used with --incoming: the configuration comes from the source"
            )));
        }
        Ok(())
    }

    /// The API socket path.
    pub fn socket(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| default_socket(&self.name))
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread it
/// spawns later); `wait_for_signal` then takes them synchronously.
pub fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Fails early, before any VM exists, if another vmhop serves `socket`.
pub fn check_socket_free(socket: &std::path::Path) -> Result<(), CliError> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(CliError::failed(format!(
            "another vmhop is already serving {}",
            socket.display()
        )));
    }
    Ok(())
}

/// Runs a VM until it is stopped.
pub fn run(args: RunArgs) -> CliResult {
    if args.auth.auth_key_file.is_some() || args.auth.tls_cert.is_some() || args.auth.insecure {
        return Err(CliError::usage(
            "--auth-key-file, --tls-* and --insecure apply with --incoming",
        ));
    }
    if args.eager {
        return Err(CliError::usage("--eager only applies with --restore"));
    }
    let config = args.config()?;
    if let GuestSpec::Linux(spec) = &config.guest {
        linux::inspect(&spec.kernel).map_err(CliError::failed)?;
        if let Some(i) = &spec.initrd {
            std::fs::metadata(i).map_err(|e| {
                CliError::failed(format!("cannot read initrd {}: {e}", i.display()))
            })?;
        }
    }
    let socket = args.socket();
    check_socket_free(&socket)?;
    let set = block_stop_signals();
    let (vm, devs) = crate::machine::boot(config, &args.console_target(), args.paused)
        .map_err(CliError::failed)?;
    if let Some(port) = devs.serial {
        devices::serial::forward_stdin(port);
    }
    serve(vm, &socket, args.json, set, None, Some(devs.console_bytes))
}

impl RunArgs {
    /// Where a Linux guest's console goes.
    pub fn console_target(&self) -> Console {
        match (&self.console, self.json) {
            (Some(f), _) => Console::File(f.clone()),
            (None, true) => Console::Stderr,
            (None, false) => Console::Stdout,
        }
    }
}

/// A run process's API socket and stop channel, which may come up before
/// its VM exists (an incoming migration answers `status` while it waits).
pub struct Frontend {
    server: ApiServer,
    switch: Arc<Switch>,
    tx: mpsc::Sender<()>,
    rx: mpsc::Receiver<()>,
}

/// Answers while a VM is being created: nothing to say yet.
struct Starting;

impl ApiHandler for Starting {
    fn handle(&self, _: &str, _: &str, _: &[u8]) -> (u16, serde_json::Value) {
        (503, error_body("the VM is starting"))
    }
}

impl Frontend {
    /// Serves `socket` and turns SIGTERM/SIGINT (blocked in `set`) into a
    /// stop. `first` answers until a VM's routes take over.
    pub fn start(
        socket: &std::path::Path,
        set: libc::sigset_t,
        first: impl FnOnce(mpsc::Sender<()>) -> Arc<dyn ApiHandler>,
    ) -> Result<Frontend, CliError> {
        let (tx, rx) = mpsc::channel();
        let switch = Switch::new(first(tx.clone()));
        let server = ApiServer::start(socket, switch.clone()).map_err(CliError::failed)?;
        let signals = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig = 0;
                // SAFETY: `set` is an initialised signal set and `sig` a
                // valid out-pointer; sigwait only blocks this thread.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    let _ = signals.send(());
                    return;
                }
            })
            .map_err(|e| CliError::failed(format!("cannot start the signal thread: {e}")))?;
        Ok(Frontend {
            server,
            switch,
            tx,
            rx,
        })
    }

    /// What hands the socket to a VM's routes from another thread: the
    /// handler switch and the stop channel the routes' `stop` uses.
    pub fn handoff(&self) -> (Arc<Switch>, mpsc::Sender<()>) {
        (self.switch.clone(), self.tx.clone())
    }

    /// Waits up to `d` for a stop (API `stop`, SIGTERM, SIGINT); true if one came.
    pub fn stopped_within(&self, d: Duration) -> bool {
        !matches!(
            self.rx.recv_timeout(d),
            Err(mpsc::RecvTimeoutError::Timeout)
        )
    }
}

/// Serves the API of a created VM until stop, SIGTERM or SIGINT.
pub fn serve(
    vm: Arc<Vm>,
    socket: &std::path::Path,
    json: bool,
    set: libc::sigset_t,
    restored: Option<serde_json::Value>,
    console_bytes: Option<Arc<AtomicU64>>,
) -> CliResult {
    let fe = Frontend::start(socket, set, |_| Arc::new(Starting))?;
    serve_on(vm, fe, socket, json, restored, console_bytes)
}

/// Serves the API of `vm` on an already started frontend until stop,
/// SIGTERM, SIGINT or the guest's end.
pub fn serve_on(
    vm: Arc<Vm>,
    fe: Frontend,
    socket: &std::path::Path,
    json: bool,
    restored: Option<serde_json::Value>,
    console_bytes: Option<Arc<AtomicU64>>,
) -> CliResult {
    let routes = Arc::new(Routes::new(vm.clone(), fe.tx.clone()));
    fe.switch.set(routes.clone());
    let Frontend { server, rx, .. } = fe;
    let status = routes.status();
    if json {
        super::output::print_json(&serde_json::json!({
            "name": status.name, "state": status.state, "pid": status.pid, "api_socket": socket,
            "vcpus": status.vcpus, "memory_bytes": status.memory_bytes, "guest": status.guest.kind,
            "restore": restored,
        }))?;
    } else {
        super::output::out_line(&format!(
            "vmhop: VM '{}' {} ({} vCPUs, {}, {}), API socket {}",
            status.name,
            if status.state == crate::vmm::RunState::Paused {
                "started paused"
            } else {
                "running"
            },
            status.vcpus,
            crate::util::format_size(status.memory_bytes),
            status.guest.kind,
            socket.display()
        ))?;
    }
    let started = Instant::now();
    let mut warned = false;
    let linux = !vm.config().guest.is_builtin();
    let ended = loop {
        match rx.recv_timeout(EXIT_POLL) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(e) = vm.guest_exit() {
            break Some(Ok(e));
        }
        // A VM that can no longer run (a triple fault, a vCPU error, a
        // damaged page found by a lazy restore) ends the process with exit
        // 1, so that a supervisor sees it; its API answered meanwhile.
        if let Some(why) = vm.guest_stop_reason() {
            break Some(Err(why));
        }
        let silent = console_bytes
            .as_ref()
            .is_some_and(|b| b.load(Ordering::Relaxed) == 0);
        if linux && silent && !warned && started.elapsed() >= SILENT_BOOT_WARNING {
            warned = true;
            eprintln!("{}", silent_guest_warning());
        }
    };
    vm.shutdown();
    server.shutdown();
    match ended {
        Some(Ok(e)) => {
            eprintln!("vmhop: VM '{}' ended: {}", vm.config().name, e.describe());
            Ok(())
        }
        Some(Err(why)) => Err(CliError::failed(format!(
            "VM '{}' stopped and cannot run on: {why}",
            vm.config().name
        ))),
        None => Ok(()),
    }
}

/// What vmhop says about a Linux guest that has printed nothing.
fn silent_guest_warning() -> String {
    let pvm = crate::vmm::kvm_is_paravirtualised();
    format!(
        "vmhop: the Linux guest has written nothing to its console in {} s.{} \
         Linux guests need hardware-assisted KVM (VT-x/AMD-V); on this kind of host, run them \
         inside the NUMA box (see README, \"Linux guests\").",
        SILENT_BOOT_WARNING.as_secs(),
        if pvm {
            " This host's KVM is paravirtualised (kvm_pvm): it emulates guest kernel code at \
             about a million instructions per second, far too slowly to boot Linux."
        } else {
            " Check its --cmdline has console=ttyS0."
        }
    )
}
