//! virtio-net over a TAP device: the device's features (those the TAP
//! allows), its configuration space (MAC, link status, the announce bit),
//! its saved state, its counters, and the announce a host migration makes
//! after the switch.
//!
//! Queues: 0 receive, 1 transmit, 2 control. Both data directions are
//! served on the device's worker thread (`rxtx`), never on a vCPU thread:
//! frames the TAP delivers go into the guest's receive buffers through the
//! dirty-tracked view of guest memory; frames the guest posts go to the
//! TAP with their net header as it wrote it (offload fields passed
//! through). The TAP itself (opening, creating, offloads) is `tap`.
//!
//! Features offered: VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX, MAC,
//! STATUS (link up), MRG_RXBUF, CTRL_VQ and GUEST_ANNOUNCE, and for each
//! offload family the TAP accepts both directions: CSUM/GUEST_CSUM,
//! HOST_TSO4/GUEST_TSO4, HOST_TSO6/GUEST_TSO6, HOST_ECN/GUEST_ECN,
//! HOST_UFO/GUEST_UFO, HOST_USO/GUEST_USO4/GUEST_USO6. The offloads the
//! driver accepts for receiving are turned on at the TAP
//! (`TUNSETOFFLOAD`) when it sets DRIVER_OK, and off again at a reset.

mod rxtx;
pub mod tap;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net as vn;
use vmm_sys_util::eventfd::EventFd;

pub use tap::{Tap, TapError, VNET_HDR_LEN};

use super::mmio::TransportState;
use super::{features, MmioTransport, QueueHandler, VirtioDevice};
use crate::api::vm::DeviceStatus;
use crate::api::{Classify, ErrorKind};
use crate::devices::persist::Persist;
use crate::devices::DeviceError;
use crate::memory::DeviceMemory;
pub use crate::vmm::config::{MacAddr, NetConfig};

/// virtio device id of a network card.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Receive queue.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Control queue.
pub const CTRL_QUEUE: u16 = 2;
/// Size of the receive and transmit queues.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// Version of [`NetState`].
pub const NET_STATE_VERSION: u32 = 1;
/// The type a VM's device set saves a network card under.
pub const STATE_TYPE: &str = "virtio-net";

/// Feature bit `b` of virtio-net.
const fn f(b: u32) -> u64 {
    1 << b
}

/// The offload feature pairs: (guest receives, guest sends, TAP flags).
/// Receiving needs the TAP to hand such frames over (`TUNSETOFFLOAD`);
/// sending needs it to take them, which this kernel's TAP does for the
/// same families it hands over.
const OFFLOADS: [(u64, u64, u32); 6] = [
    (
        f(vn::VIRTIO_NET_F_GUEST_CSUM),
        f(vn::VIRTIO_NET_F_CSUM),
        tap::offload::CSUM,
    ),
    (
        f(vn::VIRTIO_NET_F_GUEST_TSO4),
        f(vn::VIRTIO_NET_F_HOST_TSO4),
        tap::offload::TSO4,
    ),
    (
        f(vn::VIRTIO_NET_F_GUEST_TSO6),
        f(vn::VIRTIO_NET_F_HOST_TSO6),
        tap::offload::TSO6,
    ),
    (
        f(vn::VIRTIO_NET_F_GUEST_ECN),
        f(vn::VIRTIO_NET_F_HOST_ECN),
        tap::offload::TSO_ECN,
    ),
    (
        f(vn::VIRTIO_NET_F_GUEST_UFO),
        f(vn::VIRTIO_NET_F_HOST_UFO),
        tap::offload::UFO,
    ),
    (
        f(vn::VIRTIO_NET_F_GUEST_USO4) | f(vn::VIRTIO_NET_F_GUEST_USO6),
        f(vn::VIRTIO_NET_F_HOST_USO),
        tap::offload::USO4 | tap::offload::USO6,
    ),
];

/// The features a card on a TAP accepting `tap_offloads` offers.
pub fn offered_features(tap_offloads: u32) -> u64 {
    let mut out = features::VERSION_1
        | features::RING_INDIRECT_DESC
        | features::RING_EVENT_IDX
        | f(vn::VIRTIO_NET_F_MAC)
        | f(vn::VIRTIO_NET_F_STATUS)
        | f(vn::VIRTIO_NET_F_MRG_RXBUF)
        | f(vn::VIRTIO_NET_F_CTRL_VQ)
        | f(vn::VIRTIO_NET_F_GUEST_ANNOUNCE);
    for (guest, host, flags) in OFFLOADS {
        if tap_offloads & flags == flags {
            out |= guest | host;
        }
    }
    out
}

/// The `TUNSETOFFLOAD` flags for a driver that accepted `acked`: the
/// offloads it can receive (each family needs GUEST_CSUM too, as the spec
/// and the TAP both do), among those the TAP takes.
pub fn tap_offloads_for(acked: u64, tap_offloads: u32) -> u32 {
    if acked & f(vn::VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    let mut flags = 0;
    for (guest, _, tf) in OFFLOADS {
        if acked & guest == guest {
            flags |= tf;
        }
    }
    let flags = flags & tap_offloads;
    // ECN rides on TSO.
    if flags & (tap::offload::TSO4 | tap::offload::TSO6) == 0 {
        flags & !tap::offload::TSO_ECN
    } else {
        flags
    }
}

/// The offload families a TAP flag set names, for messages.
fn offload_names(flags: u32) -> String {
    use tap::offload::*;
    let names: Vec<&str> = [
        (CSUM, "csum"),
        (TSO4, "tso4"),
        (TSO6, "tso6"),
        (TSO_ECN, "ecn"),
        (UFO, "ufo"),
        (USO4 | USO6, "uso"),
    ]
    .iter()
    .filter(|(f, _)| flags & f == *f)
    .map(|(_, n)| *n)
    .collect();
    match names.is_empty() {
        true => "none".into(),
        false => names.join(","),
    }
}

/// Building or restoring a network card failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP cannot be opened or set up.
    #[error("--net {id}: {source}")]
    Tap {
        /// The card.
        id: String,
        /// What failed.
        #[source]
        source: TapError,
    },
    /// The TAP here cannot take offloads the guest's driver negotiated.
    #[error("--net {id}: TAP {tap} accepts offloads {here}, the guest's driver uses {needed}: refusing, the guest would send or expect frames this TAP cannot carry")]
    Offloads {
        /// The card.
        id: String,
        /// The TAP here.
        tap: String,
        /// What the driver negotiated.
        needed: String,
        /// What the TAP takes.
        here: String,
    },
    /// A saved state of another version.
    #[error("network card {id}: saved state version {found}, this vmhop reads version {NET_STATE_VERSION}")]
    Version {
        /// The card.
        id: String,
        /// The version found.
        found: u32,
    },
    /// The card here differs, as the guest would see it, from the saved one.
    #[error("network card {id}: the saved {what} is {saved}, this VM's card has {here}: refusing to restore, the guest would see its card change")]
    Mismatch {
        /// The card.
        id: String,
        /// What differs.
        what: &'static str,
        /// Saved value.
        saved: String,
        /// Value here.
        here: String,
    },
}

impl Classify for NetError {
    fn kind(&self) -> ErrorKind {
        match self {
            NetError::Tap { source, .. } => match (source, source.os_error().raw_os_error()) {
                (TapError::Attach { .. }, Some(libc::EBUSY)) => ErrorKind::Conflict,
                (TapError::Attach { .. }, Some(libc::EINVAL)) => ErrorKind::Unusable,
                (TapError::Ioctl { .. }, _) => ErrorKind::Failed,
                (_, _) => ErrorKind::of_io(source.os_error()),
            },
            NetError::Offloads { .. } | NetError::Version { .. } | NetError::Mismatch { .. } => {
                ErrorKind::Unusable
            }
        }
    }
}

/// The card's own saved state (the transport saves the rest: features,
/// queues, interrupt status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// [`NET_STATE_VERSION`] when written.
    pub version: u32,
    /// The card's id.
    pub id: String,
    /// Its MAC (guest-visible: must match on restore).
    pub mac: MacAddr,
    /// The configuration space's status (link up, announce pending).
    pub status: u16,
    /// The `TUNSETOFFLOAD` flags the driver's features turned on: the
    /// TAP a restore opens must accept them.
    pub guest_offloads: u32,
}

/// Frames and bytes through one card.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Their bytes (without the net header).
    pub rx_bytes: AtomicU64,
    /// Frames from the TAP the guest had no room for (or too short).
    pub rx_dropped: AtomicU64,
    /// Frames sent to the TAP.
    pub tx_packets: AtomicU64,
    /// Their bytes (without the net header).
    pub tx_bytes: AtomicU64,
    /// Frames from the guest dropped: malformed, oversized, or refused by
    /// the TAP.
    pub tx_dropped: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter by name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("rx_packets", &self.rx_packets),
            ("rx_bytes", &self.rx_bytes),
            ("rx_dropped", &self.rx_dropped),
            ("tx_packets", &self.tx_packets),
            ("tx_bytes", &self.tx_bytes),
            ("tx_dropped", &self.tx_dropped),
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
    pub(crate) mac: MacAddr,
    pub(crate) tap: Tap,
    /// The configuration space's status word.
    pub(crate) status: AtomicU16,
    /// Features the driver accepted (0 before DRIVER_OK and after a reset).
    pub(crate) acked: AtomicU64,
    /// The `TUNSETOFFLOAD` flags turned on for the driver.
    pub(crate) guest_offloads: AtomicU64,
    pub(crate) counters: Counters,
}

/// A virtio-net card over a TAP.
#[derive(Debug)]
pub struct Net {
    config: NetConfig,
    shared: Arc<Shared>,
    /// The offloads the TAP accepts.
    tap_offloads: u32,
    features: u64,
}

impl Net {
    /// Opens (or creates) the card's TAP and finds the offloads it takes.
    pub fn new(config: NetConfig) -> Result<Net, NetError> {
        let tap = Tap::open(&config.tap).map_err(|source| NetError::Tap {
            id: config.id.clone(),
            source,
        })?;
        Ok(Net::on(config, tap))
    }

    /// A card for `config` on `tap` (opened already).
    fn on(config: NetConfig, tap: Tap) -> Net {
        let tap_offloads = tap.probe_offloads();
        let shared = Shared {
            name: format!("virtio-net {}", config.id),
            mac: config.mac,
            tap,
            status: AtomicU16::new(vn::VIRTIO_NET_S_LINK_UP as u16),
            acked: AtomicU64::new(0),
            guest_offloads: AtomicU64::new(0),
            counters: Counters::default(),
        };
        Net {
            config,
            shared: Arc::new(shared),
            features: offered_features(tap_offloads),
            tap_offloads,
        }
    }

    /// A card for `config` as `state` saved it: the MAC must be the saved
    /// one, and the TAP here must accept the offloads the guest's driver
    /// negotiated; the card then offers the saved feature set (what the
    /// guest saw), whatever more this TAP could do.
    pub fn restore(config: NetConfig, state: &TransportState<NetState>) -> Result<Net, NetError> {
        Net::new(config)?.restored(state)
    }

    /// This card (on its TAP, not yet used) as `state` saved it.
    fn restored(mut self, state: &TransportState<NetState>) -> Result<Net, NetError> {
        let n = &mut self;
        let s = &state.device;
        let id = n.config.id.clone();
        if s.version != NET_STATE_VERSION {
            return Err(NetError::Version {
                id,
                found: s.version,
            });
        }
        if s.mac != n.config.mac {
            return Err(NetError::Mismatch {
                id,
                what: "MAC",
                saved: s.mac.to_string(),
                here: n.config.mac.to_string(),
            });
        }
        // What the driver sends needs the TAP to take it; what it receives
        // is only what the TAP is told to hand over (never more than both
        // allow), so the families the driver accepted in either direction
        // must all be this TAP's.
        let mut needed = 0;
        for (guest, host, flags) in OFFLOADS {
            if state.acked & (guest | host) != 0 {
                needed |= flags;
            }
        }
        needed |= s.guest_offloads;
        if needed & !n.tap_offloads != 0 {
            return Err(NetError::Offloads {
                id,
                tap: n.config.tap.clone(),
                needed: offload_names(needed),
                here: offload_names(n.tap_offloads),
            });
        }
        n.features = state.offered;
        n.shared.status.store(s.status, Ordering::Relaxed);
        Ok(self)
    }

    /// The card's configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The `TUNSETOFFLOAD` flags this card's TAP accepts.
    pub fn tap_offloads(&self) -> u32 {
        self.tap_offloads
    }

    /// Its counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Sets VIRTIO_NET_S_ANNOUNCE when the driver negotiated
    /// GUEST_ANNOUNCE; true if it did (the transport then raises a
    /// configuration interrupt).
    fn request_guest_announce(&self) -> bool {
        let acked = self.shared.acked.load(Ordering::SeqCst);
        if acked & f(vn::VIRTIO_NET_F_GUEST_ANNOUNCE) == 0 {
            return false;
        }
        self.shared
            .status
            .fetch_or(vn::VIRTIO_NET_S_ANNOUNCE as u16, Ordering::SeqCst);
        true
    }

    /// Writes one RARP announcement for the card's MAC to the TAP.
    pub fn send_rarp(&self) -> std::io::Result<()> {
        let mut frame = [0u8; VNET_HDR_LEN + tap::RARP_LEN];
        frame[VNET_HDR_LEN..].copy_from_slice(&tap::rarp_frame(self.shared.mac.0));
        self.shared.tap.write_frame(&frame).map(|_| ())
    }

    fn config_space(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0..6].copy_from_slice(&self.shared.mac.0);
        c[6..8].copy_from_slice(&self.shared.status.load(Ordering::SeqCst).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }
}

impl VirtioDevice for Net {
    type State = NetState;

    fn name(&self) -> String {
        self.shared.name.clone()
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| c.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only for a virtio 1.x driver; nothing else is
        // the driver's to write.
    }

    fn handler(&self, acked: u64) -> Box<dyn QueueHandler> {
        self.shared.acked.store(acked, Ordering::SeqCst);
        let flags = tap_offloads_for(acked, self.tap_offloads);
        if let Err(e) = self.shared.tap.set_offload(flags) {
            // The TAP then hands over plain frames only, which every
            // driver takes.
            tracing::warn!(
                "{}: TUNSETOFFLOAD {} on TAP {}: {e}",
                self.shared.name,
                offload_names(flags),
                self.config.tap
            );
            let _ = self.shared.tap.set_offload(0);
        } else {
            self.shared
                .guest_offloads
                .store(flags as u64, Ordering::SeqCst);
        }
        rxtx::handler(self.shared.clone(), acked)
    }

    fn reset(&self) {
        self.shared.acked.store(0, Ordering::SeqCst);
        self.shared.guest_offloads.store(0, Ordering::SeqCst);
        let _ = self.shared.tap.set_offload(0);
        self.shared
            .status
            .store(vn::VIRTIO_NET_S_LINK_UP as u16, Ordering::SeqCst);
    }

    fn save(&self) -> NetState {
        NetState {
            version: NET_STATE_VERSION,
            id: self.config.id.clone(),
            mac: self.shared.mac,
            status: self.shared.status.load(Ordering::SeqCst),
            guest_offloads: self.shared.guest_offloads.load(Ordering::SeqCst) as u32,
        }
    }
}

impl MmioTransport<Net> {
    /// Announces the guest's location after a host migration, as QEMU's
    /// announce does: one RARP frame for the card's MAC on the TAP, and,
    /// for a driver that negotiated GUEST_ANNOUNCE, VIRTIO_NET_S_ANNOUNCE
    /// with a configuration interrupt (the guest then sends gratuitous ARP
    /// and neighbour advertisements for its own addresses, and acknowledges
    /// on the control queue). Call it once the VM runs at the destination,
    /// a few times over a second or so (QEMU: 5 rounds, 50 ms apart and
    /// 100 ms more each time); the RARP frames are what bridges learn from
    /// when the guest does not take part.
    pub fn announce(&self) -> std::io::Result<()> {
        if self.device().request_guest_announce() {
            self.config_changed();
        }
        self.device().send_rarp()
    }
}

impl Persist for MmioTransport<Net> {
    const TYPE: &'static str = STATE_TYPE;
    type State = TransportState<NetState>;
    /// The card, guest memory as devices see it, and the interrupt line's
    /// eventfd (None without an irqchip).
    type Args = (NetConfig, DeviceMemory, Option<EventFd>);

    fn save(&self) -> Result<Self::State, DeviceError> {
        self.save_device()
    }

    fn restore(
        (config, memory, irqfd): Self::Args,
        state: Option<&Self::State>,
    ) -> Result<Self, DeviceError> {
        let t = match state {
            None => MmioTransport::new(Net::new(config)?, memory, irqfd),
            Some(s) => MmioTransport::restore(Net::restore(config, s)?, memory, irqfd, s),
        };
        t.map_err(DeviceError::from)
    }

    fn quiesce(&self) -> Result<(), DeviceError> {
        self.quiesce_device()
    }

    fn resume(&self) -> Result<(), DeviceError> {
        self.resume_device()
    }

    fn announce(&self) {
        if let Err(e) = MmioTransport::announce(self) {
            tracing::warn!(
                "{}: announcing MAC {} on TAP {}: {e}",
                self.device_name(),
                self.device().config.mac,
                self.device().config.tap
            );
        }
    }

    fn status(&self) -> Option<DeviceStatus> {
        let n = self.device();
        Some(DeviceStatus {
            kind: STATE_TYPE.into(),
            id: n.config.id.clone(),
            info: BTreeMap::from([
                ("tap".to_string(), n.config.tap.clone()),
                ("mac".to_string(), n.config.mac.to_string()),
                (
                    "offloads".to_string(),
                    offload_names(n.shared.guest_offloads.load(Ordering::SeqCst) as u32),
                ),
            ]),
            counters: n.counters().snapshot(),
        })
    }
}

#[cfg(test)]
mod tests;
