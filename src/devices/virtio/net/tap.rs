//! A TAP device as virtio-net's backend: opening an existing TAP or
//! creating one (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), the
//! 12-byte virtio 1.x net header on every frame (`TUNSETVNETHDRSZ`), the
//! offloads the kernel's TAP accepts (`TUNSETOFFLOAD`), and frames in and
//! out. The device model above decides which offloads to turn on.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::vmm::config::MAX_IFNAME;

/// The clone device every TAP is opened through.
pub const TUN_PATH: &str = "/dev/net/tun";

/// Bytes of the net header in front of every frame (virtio 1.x: the
/// header with `num_buffers`, whether MRG_RXBUF is negotiated or not).
pub const VNET_HDR_LEN: usize = 12;

/// `TUNSETOFFLOAD` flags, each probed on its own (TSO, ECN, UFO and USO
/// need checksum offload with them; USO needs both families at once).
pub mod offload {
    /// The TAP may hand over frames with a partial checksum.
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCP segmentation offload, IPv4.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCP segmentation offload, IPv6.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// TSO frames with ECN (CWR) set.
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    /// UDP fragmentation offload.
    pub const UFO: u32 = libc::TUN_F_UFO;
    /// UDP segmentation offload, IPv4 (kernel 6.2 and later).
    pub const USO4: u32 = libc::TUN_F_USO4;
    /// UDP segmentation offload, IPv6 (kernel 6.2 and later).
    pub const USO6: u32 = libc::TUN_F_USO6;
}

/// Opening or configuring a TAP failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` cannot be opened.
    #[error("TAP {tap}: cannot open {TUN_PATH}: {source}{}", tun_hint(source))]
    Tun {
        /// The TAP.
        tap: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `TUNSETIFF` refused the TAP.
    #[error("TAP {tap}: {} (TUNSETIFF: {source})", attach_reason(source))]
    Attach {
        /// The TAP.
        tap: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another TAP ioctl failed.
    #[error("TAP {tap}: {ioctl} failed: {source}")]
    Ioctl {
        /// The TAP.
        tap: String,
        /// Which ioctl.
        ioctl: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn tun_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => " (is the tun module loaded?)",
        _ => "",
    }
}

fn attach_reason(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EBUSY) => "busy: another process has it open",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "not permitted: creating a TAP needs CAP_NET_ADMIN, and an existing one must belong to this user or group"
        }
        Some(libc::EINVAL) => {
            "exists but is not a single-queue TAP (a TUN, a multi-queue TAP, or another kind of interface)"
        }
        _ => "cannot be opened",
    }
}

impl TapError {
    /// The OS error behind it.
    pub fn os_error(&self) -> &std::io::Error {
        match self {
            TapError::Tun { source, .. }
            | TapError::Attach { source, .. }
            | TapError::Ioctl { source, .. } => source,
        }
    }
}

/// An open TAP queue (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `ifreq` with `name` and `flags` set.
fn ifreq(name: &str, flags: i32) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of
    // integers, addresses and pointers): all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(MAX_IFNAME)) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    ifr
}

impl Tap {
    /// Opens TAP `name`, creating it if it does not exist (a TAP vmhop
    /// creates is not persistent: it goes when vmhop closes it), with the
    /// 12-byte net header and no offloads on yet.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::Tun {
                tap: name.into(),
                source,
            })?;
        let mut ifr = ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is and
        // which outlives the call; `file` is an open /dev/net/tun.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            return Err(TapError::Attach {
                tap: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is.
        let r = unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0).map_err(|source| TapError::Ioctl {
            tap: name.into(),
            ioctl: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    fn ioctl_error(&self, ioctl: &'static str) -> TapError {
        TapError::Ioctl {
            tap: self.name.clone(),
            ioctl,
            source: std::io::Error::last_os_error(),
        }
    }

    /// The TAP's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TAP's file descriptor.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Another handle on the same queue (the worker's).
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Lets the kernel hand over frames with the `TUNSETOFFLOAD` features
    /// `flags` (what the guest's driver can take).
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        match r {
            0.. => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// The offloads this kernel's TAP accepts, tried one family at a time;
    /// they are off again afterwards.
    pub fn probe_offloads(&self) -> u32 {
        use offload::*;
        let mut ok = 0;
        if self.set_offload(CSUM).is_ok() {
            ok |= CSUM;
            for f in [TSO4, TSO6, TSO4 | TSO6 | TSO_ECN, UFO, USO4 | USO6] {
                if self.set_offload(CSUM | f).is_ok() {
                    ok |= f;
                }
            }
        }
        let _ = self.set_offload(0);
        ok
    }

    /// Reads one frame (net header first) into `buf`; `WouldBlock` when
    /// the TAP has none.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (net header first).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

/// Bytes of a RARP announcement, padded to Ethernet's minimum.
pub const RARP_LEN: usize = 60;

/// The frame QEMU's announce sends for a guest's MAC after it moved: a
/// broadcast RARP "request reverse" naming the MAC as sender and target,
/// so that bridges and switches learn the port the MAC is behind now
/// (vmhop knows no guest IP address to send gratuitous ARP for).
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_LEN] {
    let mut f = [0u8; RARP_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // ETH_P_RARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // RARP request reverse
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[32..38].copy_from_slice(&mac); // target hardware address
    f
}

#[cfg(test)]
impl Tap {
    /// A backend that is not a TAP (one end of a socket pair) standing in
    /// for one in device tests: frames keep their boundaries, and every
    /// TAP ioctl fails as on a file that is no TAP.
    pub(crate) fn fake(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.into(),
        }
    }
}
