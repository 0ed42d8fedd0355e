//! virtio-vsock with Firecracker's host-side model: the device's identity
//! (the guest's context id in configuration space), its host socket (made
//! and checked before the VM starts), its saved state and counters.
//!
//! Queues: 0 receive (device to guest), 1 transmit (guest to device),
//! 2 event. The connections themselves, host sockets and the packets that
//! carry them, live on the device's worker thread (`muxer`), never on a
//! vCPU thread, and never in a saved state: a connection does not survive
//! a restore or a host migration. A restored device sends
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` once the guest's driver gives it an
//! event buffer (the guest then resets its own connections), and a host
//! process connected to the VM it came from sees its socket close when
//! that VM's vmhop ends. Quiescing (a checkpoint, a NUMA move) only parks
//! the worker: connections carry on after the resume.
//!
//! Host side: a host process connects to the Unix socket `PATH` and writes
//! `CONNECT <port>\n`; the device asks the guest's listener on that port
//! and answers `OK <hostport>\n` once it accepts (the connection is closed
//! if it refuses). A guest connecting to host port P reaches the listener
//! at `PATH_P`. `PATH` is made mode 0600 in a directory no other user may
//! write (else anyone could plant a `PATH_<port>` listener and receive the
//! guest's connections), and removed when the device goes.
//!
//! Features offered: VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX; stream
//! sockets only.

mod muxer;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::TransportState;
use super::{features, MmioTransport, QueueHandler, VirtioDevice};
use crate::api::vm::DeviceStatus;
use crate::api::{Classify, ErrorKind};
use crate::devices::persist::Persist;
use crate::devices::DeviceError;
use crate::memory::DeviceMemory;
pub use crate::vmm::config::VsockConfig;

/// virtio device id of a socket device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// Receive queue: packets to the guest.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue: packets from the guest.
pub const TX_QUEUE: u16 = 1;
/// Event queue: transport resets.
pub const EVENT_QUEUE: u16 = 2;
/// Size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Version of [`VsockState`].
pub const VSOCK_STATE_VERSION: u32 = 1;
/// The type a VM's device set saves the socket device under.
pub const STATE_TYPE: &str = "virtio-vsock";
/// The id of the one socket device a VM has.
pub const DEVICE_ID: &str = "vsock";
/// The host's context id (the guest's peer for every connection here).
pub const HOST_CID: u64 = 2;

/// Making the host socket or restoring the device failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Something already exists at the socket path.
    #[error("--vsock socket={path}: the path exists already (a stale socket of an earlier VM, or another VM's): remove it or choose another path")]
    Exists {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket's directory is writable by other users.
    #[error("--vsock socket={path}: its directory {dir} (owner uid {owner}, mode {mode:o}) is writable by other users, who could plant a {path}_<port> listener and receive the guest's connections: use a directory only you can write")]
    UnsafeDirectory {
        /// The socket path.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// The directory's owner.
        owner: u32,
        /// The directory's permission bits.
        mode: u32,
    },
    /// The socket cannot be made (its directory is missing, not ours...).
    #[error("--vsock socket={path}: {what}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What failed (a syscall and its object).
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A saved state of another version.
    #[error(
        "vsock device: saved state version {found}, this vmhop reads version {VSOCK_STATE_VERSION}"
    )]
    Version {
        /// The version found.
        found: u32,
    },
    /// The guest's context id differs from the saved one.
    #[error("vsock device: the saved VM's guest has cid {saved}, this one is given cid {here}: refusing, the guest's address would change under it")]
    Cid {
        /// Saved cid.
        saved: u64,
        /// Cid here.
        here: u64,
    },
}

impl Classify for VsockError {
    fn kind(&self) -> ErrorKind {
        match self {
            VsockError::Exists { .. } => ErrorKind::Conflict,
            VsockError::Socket { source, .. } => ErrorKind::of_io(source),
            VsockError::UnsafeDirectory { .. }
            | VsockError::Version { .. }
            | VsockError::Cid { .. } => ErrorKind::Unusable,
        }
    }
}

/// The device's own saved state (the transport saves the rest). No
/// connection is saved: a restored device resets the guest's transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// [`VSOCK_STATE_VERSION`] when written.
    pub version: u32,
    /// The guest's context id (its configuration space).
    pub cid: u64,
}

/// Connections and bytes through the device.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections ever established.
    pub connections_total: AtomicU64,
    /// Bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Bytes from the guest written to host sockets.
    pub tx_bytes: AtomicU64,
    /// Malformed or misaddressed packets and chains dropped.
    pub dropped: AtomicU64,
    /// TRANSPORT_RESET events delivered to the guest.
    pub transport_resets: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter by name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("connections", &self.connections),
            ("connections_total", &self.connections_total),
            ("rx_bytes", &self.rx_bytes),
            ("tx_bytes", &self.tx_bytes),
            ("dropped", &self.dropped),
            ("transport_resets", &self.transport_resets),
        ]
        .iter()
        .map(|(n, c)| (n.to_string(), c.load(Ordering::Relaxed)))
        .collect()
    }
}

/// What the device and its worker share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) cid: u64,
    /// `PATH`: host processes connect here; `PATH_<port>` is where guest
    /// connections go.
    pub(crate) path: PathBuf,
    pub(crate) listener: UnixListener,
    /// The device was restored: the next handler tells the guest its
    /// transport was reset.
    pub(crate) reset_pending: AtomicBool,
    pub(crate) counters: Counters,
    /// The inode of the socket this device made (removed only if it is
    /// still that one).
    ino: u64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Refuses a socket directory another user could write: owned by someone
/// other than us (or root), or group- or world-writable (a sticky bit does
/// not help: it stops deleting, not creating).
fn check_directory(path: &Path) -> Result<(), VsockError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let m = std::fs::metadata(&dir).map_err(|source| VsockError::Socket {
        path: path.to_path_buf(),
        what: "stat of its directory",
        source,
    })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = m.permissions().mode() & 0o7777;
    if (m.uid() != me && m.uid() != 0) || mode & 0o022 != 0 {
        return Err(VsockError::UnsafeDirectory {
            path: path.to_path_buf(),
            dir,
            owner: m.uid(),
            mode,
        });
    }
    Ok(())
}

/// Makes the host socket at `path`, mode 0600, after the checks above.
fn bind(path: &Path) -> Result<(UnixListener, u64), VsockError> {
    check_directory(path)?;
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(VsockError::Exists {
            path: path.to_path_buf(),
        });
    }
    let err = |what, source| VsockError::Socket {
        path: path.to_path_buf(),
        what,
        source,
    };
    let l = UnixListener::bind(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => VsockError::Exists {
            path: path.to_path_buf(),
        },
        _ => err("bind", e),
    })?;
    // The directory admits only us, so nobody connects before this; the
    // socket's own mode is the second fence.
    let set = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("chmod 0600", e));
    let ino = std::fs::symlink_metadata(path).map(|m| m.ino());
    let ino = match (set, ino) {
        (Ok(()), Ok(i)) => i,
        (Err(e), _) => {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        (_, Err(e)) => {
            let _ = std::fs::remove_file(path);
            return Err(err("stat", e));
        }
    };
    l.set_nonblocking(true)
        .map_err(|e| err("O_NONBLOCK on the listener", e))?;
    Ok((l, ino))
}

/// A virtio-vsock device with its host socket.
#[derive(Debug)]
pub struct Vsock {
    config: VsockConfig,
    shared: Arc<Shared>,
}

impl Vsock {
    /// Makes the host socket (refusing an existing path or an unsafe
    /// directory) and the device.
    pub fn new(config: VsockConfig) -> Result<Vsock, VsockError> {
        let (listener, ino) = bind(&config.socket)?;
        Ok(Vsock::on(config, listener, ino))
    }

    fn on(config: VsockConfig, listener: UnixListener, ino: u64) -> Vsock {
        let shared = Shared {
            name: format!("virtio-vsock cid {}", config.cid),
            cid: config.cid,
            path: config.socket.clone(),
            listener,
            reset_pending: AtomicBool::new(false),
            counters: Counters::default(),
            ino,
        };
        Vsock {
            config,
            shared: Arc::new(shared),
        }
    }

    /// The device for `config` as `state` saved it: the cid must be the
    /// saved one; its guest is told its transport was reset.
    pub fn restore(config: VsockConfig, state: &VsockState) -> Result<Vsock, VsockError> {
        if state.version != VSOCK_STATE_VERSION {
            return Err(VsockError::Version {
                found: state.version,
            });
        }
        if state.cid != config.cid {
            return Err(VsockError::Cid {
                saved: state.cid,
                here: config.cid,
            });
        }
        let v = Vsock::new(config)?;
        v.shared.reset_pending.store(true, Ordering::SeqCst);
        Ok(v)
    }

    /// The device's configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Its counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }
}

impl VirtioDevice for Vsock {
    type State = VsockState;

    fn name(&self) -> String {
        self.shared.name.clone()
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // guest_cid, a le64.
        let c = self.shared.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| c.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn handler(&self, _acked: u64) -> Box<dyn QueueHandler> {
        muxer::handler(self.shared.clone())
    }

    fn reset(&self) {
        // The worker (and with it every connection) is gone already.
    }

    fn save(&self) -> VsockState {
        VsockState {
            version: VSOCK_STATE_VERSION,
            cid: self.shared.cid,
        }
    }
}

impl Persist for MmioTransport<Vsock> {
    const TYPE: &'static str = STATE_TYPE;
    type State = TransportState<VsockState>;
    /// The device's configuration, guest memory as devices see it, and the
    /// interrupt line's eventfd (None without an irqchip).
    type Args = (VsockConfig, DeviceMemory, Option<EventFd>);

    fn save(&self) -> Result<Self::State, DeviceError> {
        self.save_device()
    }

    fn restore(
        (config, memory, irqfd): Self::Args,
        state: Option<&Self::State>,
    ) -> Result<Self, DeviceError> {
        let t = match state {
            None => MmioTransport::new(Vsock::new(config)?, memory, irqfd),
            Some(s) => MmioTransport::restore(Vsock::restore(config, &s.device)?, memory, irqfd, s),
        };
        t.map_err(DeviceError::from)
    }

    fn quiesce(&self) -> Result<(), DeviceError> {
        self.quiesce_device()
    }

    fn resume(&self) -> Result<(), DeviceError> {
        self.resume_device()
    }

    fn status(&self) -> Option<DeviceStatus> {
        let v = self.device();
        Some(DeviceStatus {
            kind: STATE_TYPE.into(),
            id: DEVICE_ID.into(),
            info: BTreeMap::from([
                ("cid".to_string(), v.config.cid.to_string()),
                ("socket".to_string(), v.config.socket.display().to_string()),
            ]),
            counters: v.counters().snapshot(),
        })
    }
}

#[cfg(test)]
mod tests;
