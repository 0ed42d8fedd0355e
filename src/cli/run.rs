//! `vmhop run` (and `restore`, and `run --incoming`): the command line of a
//! VMM process, handed to the service as a [`RunSpec`], and what the
//! process says while it runs.

use std::path::PathBuf;

use clap::Args;

use super::output::{out_line, print_json};
use super::{default_socket, CliError, CliResult};
use crate::api::checkpoint::CheckpointTarget;
use crate::api::migration::AuthFiles;
use crate::api::run::{Arrival, ConsoleTarget, Local, RunEnd, RunEvent, RunSpec, StartSpec};
use crate::api::vm::VmState;
use crate::util::format_size;

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
    /// The guest: builtin:idle (default), builtin:dirty[,wss=SIZE][,rate=PAGES_PER_S][,fill=random], builtin:disk[,size=SIZE][,blocks=N][,rate=PER_S] (needs --disk), builtin:net[,mode=echo|tx|rx] (needs --net), builtin:vsock (needs --vsock) or builtin:reset[,pages=N][,poke=armed|always] (a guest-driven reset loop, docs/reset.md).
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
    /// A disk: path=FILE[,readonly][,id=NAME][,serial=S][,cache=none|writeback]
    /// (a raw image, virtio-blk); repeat for more. On a restore, and with
    /// --incoming: id=NAME,path=FILE, the file disk NAME lands in (or, on
    /// shared storage with --incoming, where it lives here).
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// A network card on a TAP device (opened, or created if missing):
    /// tap=NAME[,mac=MAC][,id=ID] (virtio-net); repeat for more.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,
    /// Host–guest sockets (virtio-vsock, Firecracker's host side):
    /// cid=N,socket=PATH. Host processes connect to PATH and write
    /// "CONNECT <port>\n"; guest connections to host port P reach PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,
    /// Size of a memory chunk (the unit of NUMA moves).
    #[arg(long, value_name = "SIZE", hide = true)]
    pub chunk_size: Option<String>,
    /// Restore from a checkpoint (DIR or DIR@ID) instead of booting.
    #[arg(long, value_name = "DIR[@ID]")]
    pub restore: Option<String>,
    /// With --restore: load all memory before the vCPUs run (default: lazily, on first touch).
    #[arg(long)]
    pub eager: bool,
    /// With --restore: start a clone whose memory maps one shared image of
    /// the checkpoint copy-on-write (built on tmpfs by the first clone), so
    /// that many clones hold one copy of it (docs/clones.md).
    #[arg(long)]
    pub shared: bool,
    /// Start with the vCPUs stopped until `resume`.
    #[arg(long)]
    pub paused: bool,
    /// Arm resets to this checkpoint at start (validate it and keep its
    /// pages), so that the first `vmhop reset` to it is as fast as the next.
    #[arg(long, value_name = "DIR@ID", conflicts_with = "incoming")]
    pub reset_base: Option<String>,
    /// A file each reset copies into the input buffer the guest registered
    /// with the reset device, read again at every reset (docs/reset.md).
    #[arg(long, value_name = "FILE", conflicts_with = "incoming")]
    pub reset_input: Option<std::path::PathBuf>,
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
    /// A test hook, NAME[=VALUE] (docs/test-device.md); for vmhop's tests.
    #[arg(long, value_name = "HOOK", hide = true)]
    pub test_hook: Vec<String>,
}

impl RunArgs {
    /// A restore takes its configuration from the checkpoint: options that
    /// would change it are refused rather than silently ignored.
    fn reject_config_for_restore(&self) -> Result<(), CliError> {
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
    fn reject_config_for_incoming(&self) -> Result<(), CliError> {
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
            (self.shared, "--shared"),
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

    /// Where a Linux guest's console goes.
    fn console_target(&self) -> ConsoleTarget {
        match (&self.console, self.json) {
            (Some(f), _) => ConsoleTarget::File(f.clone()),
            (None, true) => ConsoleTarget::Stderr,
            (None, false) => ConsoleTarget::Stdout,
        }
    }

    /// The run these options describe; `restore` is the `DIR[@ID]` of a
    /// restore.
    fn spec(&self, restore: Option<&str>) -> Result<RunSpec, CliError> {
        let absolute = |p: &Option<PathBuf>| -> Result<Option<PathBuf>, CliError> {
            p.as_ref()
                .map(|p| {
                    std::path::absolute(p)
                        .map_err(|e| CliError::usage(format!("{}: {e}", p.display())))
                })
                .transpose()
        };
        let auth = &self.auth;
        let given_auth = auth.auth_key_file.is_some() || auth.tls_cert.is_some() || auth.insecure;
        let start = match (restore, &self.incoming) {
            (Some(_), Some(_)) => {
                return Err(CliError::usage("--incoming cannot be used with a restore"))
            }
            (Some(target), None) => {
                self.reject_config_for_restore()?;
                let target: CheckpointTarget = target.parse()?;
                if self.shared && self.eager {
                    return Err(CliError::usage(
                        "--eager cannot be used with --shared: a clone maps all of its memory from the checkpoint's image at once (neither lazy nor copied)",
                    ));
                }
                StartSpec::Restore {
                    target,
                    eager: self.eager,
                    shared: self.shared,
                }
            }
            (None, Some(address)) => {
                self.reject_config_for_incoming()?;
                StartSpec::Incoming {
                    address: address.clone(),
                    once: self.once,
                    auth: AuthFiles {
                        auth_key_file: absolute(&auth.auth_key_file)?,
                        tls_cert: absolute(&auth.tls_cert)?,
                        tls_key: absolute(&auth.tls_key)?,
                        tls_ca: absolute(&auth.tls_ca)?,
                        insecure: auth.insecure,
                    },
                }
            }
            (None, None) => {
                if given_auth {
                    return Err(CliError::usage(
                        "--auth-key-file, --tls-* and --insecure apply with --incoming",
                    ));
                }
                if self.eager {
                    return Err(CliError::usage("--eager only applies with --restore"));
                }
                if self.shared {
                    return Err(CliError::usage("--shared only applies with --restore"));
                }
                StartSpec::Boot
            }
        };
        Ok(RunSpec {
            name: self.name.clone(),
            name_given: self.name != DEFAULT_NAME,
            api_socket: self.socket(),
            vcpus: Some(self.vcpus),
            memory: self.memory.clone(),
            numa: self.numa.clone(),
            guest: self.guest.clone(),
            kernel: absolute(&self.kernel)?,
            initrd: absolute(&self.initrd)?,
            cmdline: self.cmdline.clone(),
            console: self.console_target(),
            hugepages: self.hugepages,
            disks: self.disk.clone(),
            nets: self.net.clone(),
            vsock: self.vsock.clone(),
            chunk_size: self.chunk_size.clone(),
            paused: self.paused,
            start,
            test_hooks: self.test_hook.clone(),
            reset_input: match &self.reset_input {
                None => None,
                Some(p) => {
                    Some(std::path::absolute(p).map_err(|e| {
                        CliError::usage(format!("--reset-input {}: {e}", p.display()))
                    })?)
                }
            },
            reset_base: match &self.reset_base {
                None => None,
                Some(t) => {
                    let mut t: crate::api::checkpoint::CheckpointTarget =
                        t.parse().map_err(CliError::from)?;
                    t.dir = std::path::absolute(&t.dir).map_err(|e| {
                        CliError::usage(format!("--reset-base {}: {e}", t.dir.display()))
                    })?;
                    Some(t)
                }
            },
        })
    }
}

/// Renders what a running VMM process says.
fn render(json: bool, event: RunEvent) -> Result<(), CliError> {
    match event {
        RunEvent::Waiting(w) => {
            if json {
                print_json(&w)
            } else {
                out_line(&format!(
                    "vmhop: waiting for an incoming migration on {} ({}), API socket {}",
                    w.listening,
                    w.security,
                    w.api_socket.display()
                ))
            }
        }
        RunEvent::Started(s) => {
            if json {
                return print_json(&s);
            }
            match &s.restore {
                Some(Arrival::Restored(r)) => out_line(&format!(
                    "vmhop: restored checkpoint {} ({}, {} file(s), {} pages, {}) in {:.1} ms",
                    r.id,
                    r.kind,
                    r.chain_files,
                    r.pages,
                    if r.lazy { "loading lazily" } else { "loaded" },
                    r.resume_ms
                ))
                .and_then(|()| {
                    r.disks.iter().try_for_each(|d| {
                        out_line(&format!(
                            "vmhop: disk {} restored into {}",
                            d.id,
                            d.path.display()
                        ))
                    })
                })?,
                Some(Arrival::Migrated(r)) => out_line(&format!(
                    "vmhop: VM '{}' arrived from {} ({} pages, {}), running after {:.1} ms",
                    s.name,
                    r.source,
                    r.pages_received,
                    format_size(r.bytes_received),
                    r.start_ms
                ))
                .and_then(|()| {
                    r.copied_disks.iter().try_for_each(|d| {
                        out_line(&format!(
                            "vmhop: disk {} copied into {}",
                            d.id,
                            d.path.display()
                        ))
                    })
                })?,
                None => {}
            }
            out_line(&format!(
                "vmhop: VM '{}' {} ({} vCPUs, {}, {}), API socket {}",
                s.name,
                if s.state == VmState::Paused {
                    "started paused"
                } else {
                    "running"
                },
                s.vcpus,
                format_size(s.memory_bytes),
                s.guest,
                s.api_socket.display()
            ))
        }
        RunEvent::Notice(n) => {
            eprintln!("vmhop: {n}");
            Ok(())
        }
    }
}

/// `vmhop run`, `vmhop restore DIR[@ID]` (`restore`), `run --incoming`:
/// runs the VMM until it ends.
pub fn run(local: &dyn Local, args: &RunArgs, restore: Option<&str>) -> CliResult {
    let spec = args.spec(restore)?;
    let json = args.json;
    let mut rendered = Ok(());
    let end = local.run(spec, &mut |e| {
        if rendered.is_ok() {
            rendered = render(json, e);
        }
    })?;
    rendered?;
    match end {
        RunEnd::Stopped => {}
        RunEnd::GuestEnded(what) | RunEnd::Handed(what) => eprintln!("vmhop: {what}"),
    }
    Ok(())
}
