//! `vmhop run`: builds the VM from the command line, serves its API, and
//! waits for `stop`, SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use clap::Args;

use super::{default_socket, CliError, CliResult};
use crate::api::routes::Routes;
use crate::api::server::ApiServer;
use crate::guest::GuestSpec;
use crate::memory::layout::DEFAULT_CHUNK_SIZE;
use crate::util::parse_size;
use crate::vmm::{NodeConfig, Start, Vm, VmConfig};

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
    /// The guest: builtin:idle or builtin:dirty[,wss=SIZE][,rate=PAGES_PER_S][,fill=random].
    #[arg(long, default_value = "builtin:idle")]
    pub guest: String,
    /// Linux kernel to boot (not supported yet).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Back guest memory with transparent huge pages.
    #[arg(long)]
    pub hugepages: bool,
    /// Size of a memory chunk (one KVM slot; the unit of NUMA moves).
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
    /// Print one JSON object when the VM is up.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The VM configuration these options describe.
    pub fn config(&self) -> Result<VmConfig, CliError> {
        if self.kernel.is_some() {
            return Err(CliError::usage(
                "--kernel: Linux guests are not supported yet; use --guest builtin:NAME",
            ));
        }
        let guest = GuestSpec::parse(&self.guest).map_err(CliError::usage)?;
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
            if self.memory.is_some() {
                return Err(CliError::usage(
                    "give either --memory or --numa, not both (--numa sizes add up to the memory)",
                ));
            }
            self.numa
                .iter()
                .map(|s| NodeConfig::parse(s).map_err(CliError::usage))
                .collect::<Result<_, _>>()?
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
            (self.guest != "builtin:idle", "--guest"),
            (self.kernel.is_some(), "--kernel"),
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
    if let Some(target) = &args.restore {
        return super::checkpoint::restore(target, &args);
    }
    if args.eager {
        return Err(CliError::usage("--eager only applies with --restore"));
    }
    let config = args.config()?;
    let socket = args.socket();
    check_socket_free(&socket)?;
    let set = block_stop_signals();
    let vm = Vm::new(config, Start::Boot, args.paused).map_err(CliError::failed)?;
    serve(vm, &socket, args.json, set, None)
}

/// Serves the API of a created VM until stop, SIGTERM or SIGINT.
pub fn serve(
    vm: Arc<Vm>,
    socket: &std::path::Path,
    json: bool,
    set: libc::sigset_t,
    restored: Option<serde_json::Value>,
) -> CliResult {
    let (tx, rx) = mpsc::channel();
    let routes = Arc::new(Routes::new(vm.clone(), tx.clone()));
    let server = ApiServer::start(socket, routes.clone()).map_err(CliError::failed)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is an initialised signal set and `sig` a valid
            // out-pointer; sigwait only blocks this thread.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = tx.send(());
                return;
            }
        })
        .map_err(|e| CliError::failed(format!("cannot start the signal thread: {e}")))?;
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
    let _ = rx.recv();
    vm.shutdown();
    server.shutdown();
    Ok(())
}
