//! The VM's configuration: plain serde types, parsed from the command line
//! and validated once, here, before anything is created. The same struct
//! travels in checkpoints and migration streams.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::memory::PAGE_SIZE;
use crate::util::parse_size;

/// Largest vCPU count (the builtin guests' control page holds 64 blocks,
/// and their tables a TSS and a stack each).
pub const MAX_VCPUS: u32 = 64;

/// Smallest VM a builtin guest runs in: its 2 MiB of code and tables plus
/// 2 MiB of work (`crate::guest` lays them out).
pub const MIN_BUILTIN_MEMORY: u64 = 4 << 20;

/// One guest NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Guest node id.
    pub guest_node: u32,
    /// Memory size in bytes.
    pub size: u64,
    /// Host node to bind it to; None = the node vmhop starts on.
    pub host_node: Option<u32>,
    /// vCPU ids that belong to this guest node (None: distributed round-robin).
    pub vcpus: Option<Vec<u32>>,
}

/// A whole VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// VM name.
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest nodes (at least one).
    pub nodes: Vec<NodeConfig>,
    /// What runs inside.
    pub guest: GuestSpec,
    /// Back memory with transparent huge pages.
    pub hugepages: bool,
    /// Chunk size (bytes) of guest memory: the unit of NUMA moves and dirty logs.
    pub chunk_size: u64,
    /// The disks, in the order the guest sees them.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The network cards (virtio-net on a TAP), in the order the guest
    /// sees them, after the disks.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// The host–guest socket device (virtio-vsock), after the network cards.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

impl crate::api::Classify for ConfigError {
    fn kind(&self) -> crate::api::ErrorKind {
        crate::api::ErrorKind::BadRequest
    }
}

/// A configuration the user gave is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Free-text reason naming the bad option and value.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(s.into())
}

impl VmConfig {
    /// Guest memory in bytes: the sum of its nodes.
    pub fn memory_bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.size).sum()
    }
}

impl NodeConfig {
    /// Parses `guest-node=G,size=SIZE,host-node=H[,cpus=LIST]`; `cpus` lists
    /// vCPU ids (`0-1:4` or `0-1;4`), since a comma already separates keys.
    pub fn parse(s: &str) -> Result<NodeConfig, ConfigError> {
        let mut g = None;
        let mut size = None;
        let mut host = None;
        let mut cpus = None;
        for kv in s.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| invalid(format!("--numa: expected key=value, got '{kv}'")))?;
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| invalid(format!("--numa: {k}={v} is not a number")))
            };
            match k {
                "guest-node" => g = Some(num(v)?),
                "size" => size = Some(parse_size(v).map_err(|e| invalid(format!("--numa: {e}")))?),
                "host-node" => host = Some(num(v)?),
                "cpus" => cpus = Some(parse_id_list(v)?),
                _ => {
                    return Err(invalid(format!(
                        "--numa: unknown key '{k}' (expected guest-node, size, host-node, cpus)"
                    )))
                }
            }
        }
        Ok(NodeConfig {
            guest_node: g.ok_or_else(|| invalid("--numa: guest-node= is required"))?,
            size: size.ok_or_else(|| invalid("--numa: size= is required"))?,
            host_node: host,
            vcpus: cpus,
        })
    }
}

fn parse_id_list(v: &str) -> Result<Vec<u32>, ConfigError> {
    let mut out = Vec::new();
    for part in v.split([':', ';']).filter(|p| !p.is_empty()) {
        let bad = || invalid(format!("--numa: cpus={v} is not a list like 0-1:4"));
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    Ok(out)
}

impl VmConfig {
    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(format!(
                "--vcpus {} is out of range (1..={MAX_VCPUS})",
                self.vcpus
            )));
        }
        if self.nodes.is_empty() {
            return Err(invalid("no guest memory: give --memory or --numa"));
        }
        let align = if self.hugepages { 2 << 20 } else { PAGE_SIZE };
        for (i, n) in self.nodes.iter().enumerate() {
            if n.guest_node as usize != i {
                return Err(invalid(format!(
                    "guest nodes must be numbered 0, 1, 2... in order; got guest-node={} in position {i}",
                    n.guest_node
                )));
            }
            if n.size == 0 {
                return Err(invalid(format!(
                    "guest node {}: memory size is 0",
                    n.guest_node
                )));
            }
            if n.size % align != 0 {
                return Err(invalid(format!(
                    "guest node {}: memory size {} is not a multiple of {} bytes{}",
                    n.guest_node,
                    n.size,
                    align,
                    if self.hugepages {
                        " (huge pages)"
                    } else {
                        " (the page size)"
                    }
                )));
            }
            if let Some(v) = &n.vcpus {
                if let Some(bad) = v.iter().find(|&&c| c >= self.vcpus) {
                    return Err(invalid(format!(
                        "guest node {}: cpus lists vCPU {bad} but the VM has {} vCPUs",
                        n.guest_node, self.vcpus
                    )));
                }
            }
        }
        let total: u64 = self.nodes.iter().map(|n| n.size).sum();
        if total < MIN_BUILTIN_MEMORY {
            return Err(invalid(format!(
                "memory {} is too small: builtin guests need at least {} bytes",
                total, MIN_BUILTIN_MEMORY
            )));
        }
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(2 << 20) {
            return Err(invalid("chunk size must be a non-zero multiple of 2 MiB"));
        }
        let mut ids = std::collections::BTreeSet::new();
        for d in &self.disks {
            if !ids.insert(d.id.as_str()) {
                return Err(invalid(format!(
                    "--disk: two disks have the id '{}'; give each its own id=NAME",
                    d.id
                )));
            }
            d.serial_bytes().map_err(|e| invalid(e.to_string()))?;
        }
        if matches!(self.guest, GuestSpec::Disk { .. }) && self.disks.is_empty() {
            return Err(invalid(
                "--guest builtin:disk drives a virtio-blk disk: give it one with --disk path=FILE",
            ));
        }
        let (mut ids, mut taps) = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        for n in &self.nets {
            if !ids.insert(n.id.as_str()) {
                return Err(invalid(format!(
                    "--net: two network cards have the id '{}'; give each its own id=NAME",
                    n.id
                )));
            }
            if !taps.insert(n.tap.as_str()) {
                return Err(invalid(format!(
                    "--net: two network cards use TAP '{}'; give each its own",
                    n.tap
                )));
            }
            n.check().map_err(|e| invalid(e.to_string()))?;
        }
        if matches!(self.guest, GuestSpec::Net { .. }) {
            if self.nets.is_empty() {
                return Err(invalid(
                    "--guest builtin:net sends its frames through a network card: give --net tap=NAME",
                ));
            }
            if self.vcpus != 1 {
                return Err(invalid(format!(
                    "--guest builtin:net runs on one vCPU (got --vcpus {})",
                    self.vcpus
                )));
            }
        }
        if let Some(v) = &self.vsock {
            v.check().map_err(|e| invalid(e.to_string()))?;
        }
        if matches!(self.guest, GuestSpec::Vsock { .. }) {
            if self.vsock.is_none() {
                return Err(invalid(
                    "--guest builtin:vsock serves the vsock device: give --vsock cid=N,socket=PATH",
                ));
            }
            if self.vcpus != 1 {
                return Err(invalid(format!(
                    "--guest builtin:vsock runs on one vCPU (got --vcpus {})",
                    self.vcpus
                )));
            }
        }
        Ok(())
    }

    /// How many virtio devices the guest sees: disks, then network cards,
    /// then the vsock device (the order of their windows and interrupts).
    pub fn virtio_devices(&self) -> usize {
        self.disks.len() + self.nets.len() + self.vsock.is_some() as usize
    }

    /// The guest node of each vCPU.
    pub fn vcpu_nodes(&self) -> Vec<u32> {
        let mut out: Vec<Option<u32>> = vec![None; self.vcpus as usize];
        for n in &self.nodes {
            for &c in n.vcpus.iter().flatten() {
                out[c as usize] = Some(n.guest_node);
            }
        }
        let k = self.nodes.len() as u32;
        out.iter()
            .enumerate()
            .map(|(i, n)| n.unwrap_or(i as u32 % k))
            .collect()
    }
}

/// Most bytes of a disk's serial (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_BYTES: usize = 20;

/// How the image is cached on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// `O_DIRECT`: the host page cache is bypassed.
    None,
    /// Through the host page cache; FLUSH makes it durable.
    #[default]
    Writeback,
}

/// One disk as the user configured it (`--disk path=FILE[,readonly]
/// [,id=NAME][,serial=S][,cache=none|writeback]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// The guest may not write it (opened read-only, shared lock).
    pub readonly: bool,
    /// The device's id: the key of its saved state.
    pub id: String,
    /// The serial GET_ID returns (at most 20 bytes; default: the id).
    pub serial: Option<String>,
    /// Host caching.
    pub cache: CacheMode,
}

/// Where `--disk id=NAME,path=FILE` puts disk NAME when the rest of its
/// configuration comes from elsewhere: a restore's new top, a migration
/// destination's image (shared storage) or copy (`--copy-storage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlacement {
    /// The disk's id.
    pub id: String,
    /// The file, made absolute.
    pub path: PathBuf,
}

impl DiskPlacement {
    /// Parses `id=NAME,path=FILE`; `None` if it is not that (each caller
    /// says why the rest of the configuration is not wanted there).
    pub fn parse(s: &str) -> Option<DiskPlacement> {
        let (mut id, mut path) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                _ => return None,
            }
        }
        let (id, path) = (id?, path?);
        Some(DiskPlacement {
            id,
            path: std::path::absolute(&path).unwrap_or(path),
        })
    }
}

/// A disk configuration that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskConfigError {
    /// Free-text reason naming the option.
    #[error("--disk: {0}")]
    Invalid(String),
}

impl DiskConfig {
    /// Parses `path=FILE[,readonly][,id=NAME][,serial=S][,cache=none|writeback]`;
    /// `default_id` names a disk given no id (`disk0`, `disk1` ...).
    pub fn parse(s: &str, default_id: &str) -> Result<DiskConfig, DiskConfigError> {
        let bad = |m: String| DiskConfigError::Invalid(m);
        let (mut path, mut readonly, mut id, mut serial, mut cache) =
            (None, false, None, None, CacheMode::Writeback);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
                Some(("serial", v)) => serial = Some(v.to_string()),
                Some(("cache", "none")) => cache = CacheMode::None,
                Some(("cache", "writeback")) => cache = CacheMode::Writeback,
                Some(("cache", v)) => {
                    return Err(bad(format!("cache={v}: expected none or writeback")))
                }
                None if kv == "readonly" => readonly = true,
                _ => return Err(bad(format!(
                    "unknown option '{kv}' (expected path=FILE, readonly, id=NAME, serial=S, cache=none|writeback)"
                ))),
            }
        }
        let c = DiskConfig {
            path: path.ok_or_else(|| bad(format!("'{s}' names no path=FILE")))?,
            readonly,
            id: id.unwrap_or_else(|| default_id.to_string()),
            serial,
            cache,
        };
        c.serial_bytes()?;
        Ok(c)
    }

    /// The serial as GET_ID returns it: zero-padded to 20 bytes.
    pub fn serial_bytes(&self) -> Result<[u8; SERIAL_BYTES], DiskConfigError> {
        let s = self.serial.as_deref().unwrap_or(&self.id);
        if s.len() > SERIAL_BYTES || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(DiskConfigError::Invalid(format!(
                "serial '{s}' must be at most {SERIAL_BYTES} printable ASCII characters"
            )));
        }
        let mut out = [0u8; SERIAL_BYTES];
        out[..s.len()].copy_from_slice(s.as_bytes());
        Ok(out)
    }
}

/// Most blocks `builtin:disk` uses: its block → tag table (8 bytes a
/// block, 2 MiB) must fit in guest memory beside its work.
pub const MAX_DISK_GUEST_BLOCKS: u64 = 1 << 18;

/// Bytes of one of `builtin:disk`'s blocks.
const DISK_GUEST_BLOCK: u64 = 4096;

fn parse_rate(v: &str) -> Result<u64, ConfigError> {
    let r: u64 = v.parse().map_err(|_| {
        ConfigError::Invalid(format!(
            "--guest: rate={v} is not a number of pages per second"
        ))
    })?;
    if r == 0 {
        return Err(ConfigError::Invalid(
            "--guest: rate must be at least 1 page per second".into(),
        ));
    }
    Ok(r)
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address (the first octet's
    /// bit 1 set, bit 0 clear), as a card given no `mac=` gets.
    pub fn random() -> MacAddr {
        let mut b = [0u8; 6];
        // Without randomness every card would get the same address; the
        // process id and the time still differ between VMs.
        if getrandom::fill(&mut b).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let x = t ^ (std::process::id() as u64) << 32;
            b.copy_from_slice(&x.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & !1) | 2;
        MacAddr(b)
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = NetConfigError;

    /// Six hexadecimal octets separated by colons, a unicast address that
    /// is not all zeros.
    fn from_str(s: &str) -> Result<MacAddr, NetConfigError> {
        let bad = |why: &str| NetConfigError::Invalid(format!("mac={s}: {why}"));
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad(
                "expected six hexadecimal octets like 52:54:00:12:34:56",
            ));
        }
        let mut b = [0u8; 6];
        for (o, p) in b.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad(
                    "expected six hexadecimal octets like 52:54:00:12:34:56",
                ));
            }
            *o = u8::from_str_radix(p, 16)
                .map_err(|_| bad("expected six hexadecimal octets like 52:54:00:12:34:56"))?;
        }
        if b[0] & 1 != 0 {
            return Err(bad("is a multicast address; a card needs a unicast one"));
        }
        if b == [0; 6] {
            return Err(bad("is all zeros"));
        }
        Ok(MacAddr(b))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest network interface name (IFNAMSIZ less its NUL).
pub const MAX_IFNAME: usize = 15;

/// One network card as the user configured it (`--net tap=NAME[,mac=MAC]
/// [,id=ID]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The TAP device: opened if it exists, created if not.
    pub tap: String,
    /// The card's address (guest-visible; a random local one when not
    /// given, chosen once so that it travels with checkpoints).
    pub mac: MacAddr,
    /// The device's id: the key of its saved state.
    pub id: String,
}

/// A network card configuration that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    /// Free-text reason naming the option.
    #[error("--net: {0}")]
    Invalid(String),
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC][,id=ID]`; `default_id` names a card given
    /// no id (`net0`, `net1` ...).
    pub fn parse(s: &str, default_id: &str) -> Result<NetConfig, NetConfigError> {
        let bad = |m: String| NetConfigError::Invalid(m);
        let (mut tap, mut mac, mut id) = (None, None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("tap", v)) => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(v.parse::<MacAddr>()?),
                Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
                _ => {
                    return Err(bad(format!(
                        "unknown option '{kv}' (expected tap=NAME, mac=MAC, id=ID)"
                    )))
                }
            }
        }
        let c = NetConfig {
            tap: tap.ok_or_else(|| bad(format!("'{s}' names no tap=NAME")))?,
            mac: mac.unwrap_or_else(MacAddr::random),
            id: id.unwrap_or_else(|| default_id.to_string()),
        };
        c.check()?;
        Ok(c)
    }

    /// The saved cards `saved` (of a checkpoint or a migration's source)
    /// attached as `specs` (`--net` on `restore` or `run --incoming`) say:
    /// each spec names a saved card by its id (`net<i>` when it gives
    /// none) and gives the TAP it uses here. The MAC travels with the
    /// card: a spec may repeat it, not change it. Cards no spec names keep
    /// their saved TAP.
    pub fn rebind(saved: &[NetConfig], specs: &[String]) -> Result<Vec<NetConfig>, NetConfigError> {
        let mut out = saved.to_vec();
        for (i, spec) in specs.iter().enumerate() {
            let given = NetConfig::parse(spec, &format!("net{i}"))?;
            let mac_given = spec.split(',').any(|kv| kv.starts_with("mac="));
            let ids: Vec<&str> = saved.iter().map(|n| n.id.as_str()).collect();
            let Some(card) = out.iter_mut().find(|n| n.id == given.id) else {
                return Err(NetConfigError::Invalid(format!(
                    "'{spec}': the saved VM has no network card '{}' (it has: {})",
                    given.id,
                    match ids.is_empty() {
                        true => "none".to_string(),
                        false => ids.join(", "),
                    }
                )));
            };
            if mac_given && given.mac != card.mac {
                return Err(NetConfigError::Invalid(format!(
                    "'{spec}': card '{}' has MAC {} in the saved VM; its MAC travels with it and cannot change",
                    card.id, card.mac
                )));
            }
            card.tap = given.tap;
        }
        let mut taps = std::collections::BTreeSet::new();
        for n in &out {
            if !taps.insert(n.tap.as_str()) {
                return Err(NetConfigError::Invalid(format!(
                    "two network cards would use TAP '{}'; give each its own with --net tap=NAME,id=ID",
                    n.tap
                )));
            }
        }
        Ok(out)
    }

    /// The TAP's name is one the kernel takes (`dev_valid_name`).
    pub fn check(&self) -> Result<(), NetConfigError> {
        let t = &self.tap;
        if t.is_empty()
            || t.len() > MAX_IFNAME
            || t == "."
            || t == ".."
            || t.bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(NetConfigError::Invalid(format!(
                "tap={t}: not an interface name (1 to {MAX_IFNAME} bytes, no '/', ':' or spaces)"
            )));
        }
        Ok(())
    }
}

/// Longest path a Unix socket address holds (`sun_path` less its NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// The longest suffix a guest-initiated connection adds to the socket path
/// (`_4294967295`).
pub const VSOCK_PORT_SUFFIX: usize = 11;

/// The host–guest socket device as the user configured it (`--vsock
/// cid=N,socket=PATH`): Firecracker's host side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (guest-visible; 3 to 2^32-2).
    pub cid: u64,
    /// The Unix socket host processes connect to; a guest connecting to
    /// host port P reaches a listener at `PATH_P`.
    pub socket: PathBuf,
}

/// A vsock configuration that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockConfigError {
    /// Free-text reason naming the option.
    #[error("--vsock: {0}")]
    Invalid(String),
}

impl VsockConfig {
    /// Parses `cid=N,socket=PATH`.
    pub fn parse(s: &str) -> Result<VsockConfig, VsockConfigError> {
        let bad = |m: String| VsockConfigError::Invalid(m);
        let (mut cid, mut socket) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(
                        v.parse::<u64>()
                            .map_err(|_| bad(format!("cid={v} is not a number")))?,
                    )
                }
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => {
                    return Err(bad(format!(
                        "unknown option '{kv}' (expected cid=N, socket=PATH)"
                    )))
                }
            }
        }
        let c = VsockConfig {
            cid: cid.ok_or_else(|| bad(format!("'{s}' names no cid=N")))?,
            socket: socket.ok_or_else(|| bad(format!("'{s}' names no socket=PATH")))?,
        };
        c.check()?;
        Ok(c)
    }

    /// The saved VM's device (`saved`) on the socket `spec` names (`--vsock
    /// socket=PATH` on a restore or an arrival; a `cid=N` there must be the
    /// saved one, which is the guest's address and travels with it).
    pub fn rebind(
        saved: Option<&VsockConfig>,
        spec: &str,
    ) -> Result<VsockConfig, VsockConfigError> {
        let bad = |m: String| VsockConfigError::Invalid(m);
        let Some(saved) = saved else {
            return Err(bad(format!("'{spec}': the saved VM has no vsock device")));
        };
        let (mut cid, mut socket) = (None, None);
        for kv in spec.split(',') {
            match kv.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(
                        v.parse::<u64>()
                            .map_err(|_| bad(format!("cid={v} is not a number")))?,
                    )
                }
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => {
                    return Err(bad(format!(
                        "unknown option '{kv}' (expected socket=PATH, cid=N)"
                    )))
                }
            }
        }
        if let Some(c) = cid.filter(|&c| c != saved.cid) {
            return Err(bad(format!(
                "cid={c}: the saved VM's guest has cid {}; its cid travels with it and cannot change",
                saved.cid
            )));
        }
        let socket = socket.ok_or_else(|| bad(format!("'{spec}' names no socket=PATH")))?;
        let c = VsockConfig {
            cid: saved.cid,
            socket: std::path::absolute(&socket).unwrap_or(socket),
        };
        c.check()?;
        Ok(c)
    }

    /// The context id is a guest's (0, 1 and 2 are the hypervisor's, the
    /// loopback's and the host's; 2^32-1 is "any"), and `PATH_<port>` fits
    /// in a Unix socket address for every port.
    pub fn check(&self) -> Result<(), VsockConfigError> {
        if !(3..u32::MAX as u64).contains(&self.cid) {
            return Err(VsockConfigError::Invalid(format!(
                "cid={} is not a guest's context id (3 to {})",
                self.cid,
                u32::MAX - 1
            )));
        }
        let len = self.socket.as_os_str().len();
        if len + VSOCK_PORT_SUFFIX > MAX_UNIX_PATH {
            return Err(VsockConfigError::Invalid(format!(
                "socket={}: {len} bytes; with a port's suffix (_4294967295) it must fit in a Unix socket address ({MAX_UNIX_PATH} bytes), so at most {} bytes",
                self.socket.display(),
                MAX_UNIX_PATH - VSOCK_PORT_SUFFIX
            )));
        }
        Ok(())
    }
}

/// The request pattern of `builtin:disk` (`mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskMode {
    /// `mixed`: 4 KiB at random blocks, three writes to one read-back, one
    /// request in flight.
    #[default]
    Mixed,
    /// `rand-read-qd32`: 4 KiB reads at random blocks, 32 in flight.
    RandReadQd32,
    /// `seq-write`: 1 MiB writes from block 0 up, wrapping, one in flight.
    SeqWrite,
    /// `seq-read`: 1 MiB reads likewise.
    SeqRead,
}

impl DiskMode {
    /// Every mode, with its `mode=` name.
    pub const ALL: [(DiskMode, &'static str); 4] = [
        (DiskMode::Mixed, "mixed"),
        (DiskMode::RandReadQd32, "rand-read-qd32"),
        (DiskMode::SeqWrite, "seq-write"),
        (DiskMode::SeqRead, "seq-read"),
    ];

    /// Its `mode=` name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("mixed", |(_, n)| n)
    }
}

/// What `builtin:net` does with its card (`mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetMode {
    /// `echo`: one numbered frame out, wait for its echo, the next.
    #[default]
    Echo,
    /// `tx`: keeps the transmit ring full of numbered frames, as fast as
    /// the device takes them; reads nothing.
    Tx,
    /// `rx`: takes every frame the device delivers and gives its buffer
    /// back at once; sends nothing.
    Rx,
}

impl NetMode {
    /// Every mode, with its `mode=` name.
    pub const ALL: [(NetMode, &'static str); 3] = [
        (NetMode::Echo, "echo"),
        (NetMode::Tx, "tx"),
        (NetMode::Rx, "rx"),
    ];

    /// Its `mode=` name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("echo", |(_, n)| n)
    }
}

/// Pages `builtin:reset` dirties per iteration unless told.
pub const DEFAULT_RESET_GUEST_PAGES: u64 = 64;
/// Most pages `builtin:reset` dirties per iteration.
pub const MAX_RESET_GUEST_PAGES: u64 = 1 << 20;

/// Which guest runs, with its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum GuestSpec {
    /// `builtin:idle`.
    Idle,
    /// A Linux kernel booted directly (`--kernel`).
    Linux(crate::arch::x86_64::linux::LinuxSpec),
    /// `builtin:dirty[,wss=SIZE][,rate=PAGES_PER_S][,fill=random]`.
    Dirty {
        /// Working-set bytes (None: all memory outside the reserved area).
        wss: Option<u64>,
        /// Pages per second over all vCPUs (None: as fast as it can).
        rate: Option<u64>,
        /// Fill the working set with random bytes before start, so that
        /// zero-page skipping does not flatter benchmarks.
        fill_random: bool,
    },
    /// `builtin:disk[,size=SIZE|blocks=N][,rate=PER_S][,mode=MODE]`: vCPU 0
    /// drives the first disk (by default tagged 4 KiB writes and
    /// read-backs, one at a time; `mode=` picks a benchmark pattern), the
    /// others sweep memory as `builtin:dirty` does.
    Disk {
        /// Blocks of the disk it uses, from block 0 (None: the whole
        /// disk, up to the most its table holds).
        blocks: Option<u64>,
        /// Requests (vCPU 0) and pages (the others) per second over all
        /// vCPUs (None: as fast as they can).
        rate: Option<u64>,
        /// The request pattern.
        #[serde(default)]
        mode: DiskMode,
    },
    /// `builtin:reset[,pages=N][,poke=armed|always]`: vCPU 0 loops
    /// through the reset device, the loop a fuzzer runs: it checks that
    /// the pages it dirtied before the last reset are back as at the
    /// checkpoint, dirties `pages` pages picked at random, and asks for a
    /// reset (docs/reset.md). The other vCPUs idle.
    Reset {
        /// Pages dirtied per iteration.
        pages: u64,
        /// Poke the reset device even with no reset base armed (ignored
        /// pokes, for tests), instead of waiting to be armed.
        #[serde(default)]
        poke_always: bool,
    },
    /// `builtin:net[,mode=echo|tx|rx]`: sends numbered frames through the
    /// first network card and checks each echo, or only sends, or only
    /// receives (see `guest::net`).
    Net {
        /// The card's MMIO window (filled in when the VM boots).
        #[serde(default)]
        mmio: u64,
        /// The card's MAC, the frames' source (filled in likewise).
        #[serde(default)]
        mac: [u8; 6],
        /// What it does with the card.
        #[serde(default)]
        mode: NetMode,
    },
    /// `builtin:vsock`: accepts every connection on the vsock device and
    /// echoes what it receives (see `guest::vsock`).
    Vsock {
        /// The device's MMIO window (filled in when the VM boots).
        #[serde(default)]
        mmio: u64,
    },
}

impl GuestSpec {
    /// Parses `builtin:NAME[,key=value...]`.
    pub fn parse(s: &str) -> Result<GuestSpec, ConfigError> {
        let rest = s.strip_prefix("builtin:").ok_or_else(|| {
            ConfigError::Invalid(format!(
                "--guest {s}: expected builtin:idle, builtin:dirty[,wss=SIZE][,rate=N] or builtin:disk[,size=SIZE][,blocks=N][,rate=N][,mode=MODE]"
            ))
        })?;
        let mut parts = rest.split(',');
        let name = parts.next().unwrap_or_default();
        match name {
            "idle" => {
                if let Some(p) = parts.next() {
                    return Err(ConfigError::Invalid(format!(
                        "--guest builtin:idle takes no options (got '{p}')"
                    )));
                }
                Ok(GuestSpec::Idle)
            }
            "dirty" => {
                let (mut wss, mut rate, mut fill_random) = (None, None, false);
                for kv in parts {
                    match kv.split_once('=') {
                        Some(("wss", v)) => wss = Some(parse_size(v).map_err(|e| ConfigError::Invalid(format!("--guest: wss: {e}")))?),
                        Some(("rate", v)) => rate = Some(parse_rate(v)?),
                        Some(("fill", "random")) => fill_random = true,
                        Some(("fill", "zero")) => fill_random = false,
                        _ => return Err(ConfigError::Invalid(format!("--guest: unknown option '{kv}' for builtin:dirty (expected wss=SIZE, rate=N, fill=random|zero)"))),
                    }
                }
                if wss == Some(0) {
                    return Err(ConfigError::Invalid("--guest: wss must not be 0".into()));
                }
                Ok(GuestSpec::Dirty {
                    wss,
                    rate,
                    fill_random,
                })
            }
            "disk" => {
                let (mut blocks, mut rate, mut mode) = (None, None, DiskMode::Mixed);
                for kv in parts {
                    match kv.split_once('=') {
                        Some(("blocks", v)) => {
                            let n: u64 = v.parse().map_err(|_| {
                                ConfigError::Invalid(format!(
                                    "--guest: blocks={v} is not a number of 4 KiB blocks"
                                ))
                            })?;
                            if n == 0 || n > MAX_DISK_GUEST_BLOCKS {
                                return Err(ConfigError::Invalid(format!(
                                    "--guest: blocks={v} is out of range (1..={MAX_DISK_GUEST_BLOCKS})"
                                )));
                            }
                            blocks = Some(n)
                        }
                        // The same as blocks=, in bytes: the part of the
                        // disk the guest uses.
                        Some(("size", v)) => {
                            let bytes = parse_size(v).map_err(|e| {
                                ConfigError::Invalid(format!("--guest: size: {e}"))
                            })?;
                            let n = bytes / DISK_GUEST_BLOCK;
                            if bytes % DISK_GUEST_BLOCK != 0 || n == 0 || n > MAX_DISK_GUEST_BLOCKS {
                                return Err(ConfigError::Invalid(format!(
                                    "--guest: size={v} is not a multiple of 4 KiB from 4K to {}",
                                    crate::util::format_size(MAX_DISK_GUEST_BLOCKS * DISK_GUEST_BLOCK)
                                )));
                            }
                            blocks = Some(n)
                        }
                        Some(("rate", v)) => rate = Some(parse_rate(v)?),
                        Some(("mode", v)) => {
                            mode = DiskMode::ALL
                                .iter()
                                .find(|(_, n)| *n == v)
                                .map(|(m, _)| *m)
                                .ok_or_else(|| {
                                    ConfigError::Invalid(format!(
                                        "--guest: mode={v} is not a builtin:disk mode (expected mixed, rand-read-qd32, seq-write or seq-read)"
                                    ))
                                })?
                        }
                        _ => return Err(ConfigError::Invalid(format!(
                            "--guest: unknown option '{kv}' for builtin:disk (expected size=SIZE, blocks=N, rate=N, mode=MODE)"
                        ))),
                    }
                }
                Ok(GuestSpec::Disk { blocks, rate, mode })
            }
            "reset" => {
                let (mut pages, mut poke_always) = (DEFAULT_RESET_GUEST_PAGES, false);
                for kv in parts {
                    match kv.split_once('=') {
                        Some(("pages", v)) => {
                            pages = v.parse().ok().filter(|n| (1..=MAX_RESET_GUEST_PAGES).contains(n)).ok_or_else(|| {
                                ConfigError::Invalid(format!(
                                    "--guest: pages={v} is not a number of pages from 1 to {MAX_RESET_GUEST_PAGES}"
                                ))
                            })?
                        }
                        Some(("poke", "armed")) => poke_always = false,
                        Some(("poke", "always")) => poke_always = true,
                        _ => return Err(ConfigError::Invalid(format!(
                            "--guest: unknown option '{kv}' for builtin:reset (expected pages=N, poke=armed|always)"
                        ))),
                    }
                }
                Ok(GuestSpec::Reset { pages, poke_always })
            }
            "net" => {
                let mut mode = NetMode::Echo;
                for kv in parts {
                    mode = match kv.split_once('=') {
                        Some(("mode", v)) => NetMode::ALL
                            .iter()
                            .find(|(_, n)| *n == v)
                            .map(|(m, _)| *m)
                            .ok_or_else(|| {
                                ConfigError::Invalid(format!(
                                    "--guest: mode={v} is not a builtin:net mode (expected echo, tx or rx)"
                                ))
                            })?,
                        _ => {
                            return Err(ConfigError::Invalid(format!(
                                "--guest: unknown option '{kv}' for builtin:net (expected mode=echo|tx|rx)"
                            )))
                        }
                    };
                }
                Ok(GuestSpec::Net {
                    mmio: 0,
                    mac: [0; 6],
                    mode,
                })
            }
            "vsock" => {
                if let Some(p) = parts.next() {
                    return Err(ConfigError::Invalid(format!(
                        "--guest builtin:vsock takes no options (got '{p}')"
                    )));
                }
                Ok(GuestSpec::Vsock { mmio: 0 })
            }
            other => Err(ConfigError::Invalid(format!(
                "--guest: unknown builtin guest '{other}' (expected idle, dirty, disk, net, vsock or reset)"
            ))),
        }
    }

    /// Short name for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestSpec::Idle => "builtin:idle",
            GuestSpec::Dirty { .. } => "builtin:dirty",
            GuestSpec::Disk { .. } => "builtin:disk",
            GuestSpec::Net { .. } => "builtin:net",
            GuestSpec::Vsock { .. } => "builtin:vsock",
            GuestSpec::Reset { .. } => "builtin:reset",
            GuestSpec::Linux(_) => "linux",
        }
    }

    /// Pages (or, for the disk guest's vCPU 0, requests) per second the
    /// builtin guest's vCPUs share (None: as fast as they can, or a guest
    /// with no rate).
    pub fn rate(&self) -> Option<u64> {
        match self {
            GuestSpec::Dirty { rate, .. } | GuestSpec::Disk { rate, .. } => *rate,
            _ => None,
        }
    }

    /// Whether this is one of the builtin CPL3 guests (which run without
    /// an interrupt controller and talk to the test device).
    pub fn is_builtin(&self) -> bool {
        !matches!(self, GuestSpec::Linux(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_option_parses_all_keys() {
        let n = NodeConfig::parse("guest-node=1,size=512M,host-node=0,cpus=0-1:3").unwrap();
        assert_eq!(n.guest_node, 1);
        assert_eq!(n.size, 512 << 20);
        assert_eq!(n.host_node, Some(0));
        assert_eq!(n.vcpus, Some(vec![0, 1, 3]));
    }

    #[test]
    fn numa_option_rejects_unknown_keys_and_missing_size() {
        assert!(NodeConfig::parse("guest-node=0,colour=red").is_err());
        assert!(NodeConfig::parse("guest-node=0").is_err());
    }

    fn cfg(size: u64) -> VmConfig {
        VmConfig {
            name: "t".into(),
            vcpus: 1,
            nodes: vec![NodeConfig {
                guest_node: 0,
                size,
                host_node: None,
                vcpus: None,
            }],
            guest: GuestSpec::Idle,
            hugepages: false,
            chunk_size: 32 << 20,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        }
    }

    #[test]
    fn the_disk_guest_needs_a_disk() {
        let mut c = cfg(64 << 20);
        c.guest = GuestSpec::Disk {
            blocks: None,
            rate: None,
            mode: DiskMode::Mixed,
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--disk"), "{e}");
        c.disks
            .push(DiskConfig::parse("path=/tmp/x.img", "disk0").unwrap());
        c.validate().unwrap();
    }

    #[test]
    fn zero_and_unaligned_sizes_are_refused() {
        assert!(cfg(0).validate().unwrap_err().to_string().contains("is 0"));
        assert!(cfg((64 << 20) + 1)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        assert!(cfg(64 << 20).validate().is_ok());
    }

    #[test]
    fn guest_options_parse() {
        assert_eq!(GuestSpec::parse("builtin:idle").unwrap(), GuestSpec::Idle);
        assert_eq!(
            GuestSpec::parse("builtin:dirty,wss=64M,rate=1000").unwrap(),
            GuestSpec::Dirty {
                wss: Some(64 << 20),
                rate: Some(1000),
                fill_random: false
            }
        );
        assert!(GuestSpec::parse("builtin:dirty,speed=3").is_err());
        assert_eq!(
            GuestSpec::parse("builtin:reset").unwrap(),
            GuestSpec::Reset {
                pages: DEFAULT_RESET_GUEST_PAGES,
                poke_always: false
            }
        );
        assert_eq!(
            GuestSpec::parse("builtin:reset,pages=2621,poke=always").unwrap(),
            GuestSpec::Reset {
                pages: 2621,
                poke_always: true
            }
        );
        for bad in ["pages=0", "pages=x", "poke=never", "rate=5"] {
            let e = GuestSpec::parse(&format!("builtin:reset,{bad}")).unwrap_err();
            assert!(
                e.to_string().contains("builtin:reset") || e.to_string().contains("pages"),
                "{e}"
            );
        }
        assert_eq!(
            GuestSpec::parse("builtin:disk,blocks=64,rate=500").unwrap(),
            GuestSpec::Disk {
                blocks: Some(64),
                rate: Some(500),
                mode: DiskMode::Mixed,
            }
        );
        assert_eq!(
            GuestSpec::parse("builtin:disk").unwrap(),
            GuestSpec::Disk {
                blocks: None,
                rate: None,
                mode: DiskMode::Mixed,
            }
        );
        assert_eq!(
            GuestSpec::parse("builtin:disk,mode=seq-write").unwrap(),
            GuestSpec::Disk {
                blocks: None,
                rate: None,
                mode: DiskMode::SeqWrite,
            }
        );
        assert!(GuestSpec::parse("builtin:disk,mode=fast").is_err());
        assert_eq!(
            GuestSpec::parse("builtin:disk,size=1M").unwrap(),
            GuestSpec::Disk {
                blocks: Some(256),
                rate: None,
                mode: DiskMode::Mixed,
            }
        );
        for bad in [
            "blocks=0",
            "blocks=262145",
            "blocks=x",
            "rate=0",
            "wss=1M",
            "size=0",
            "size=6K",
            "size=2G",
            "size=x",
        ] {
            assert!(
                GuestSpec::parse(&format!("builtin:disk,{bad}")).is_err(),
                "{bad}"
            );
        }
        assert!(GuestSpec::parse("linux").is_err());
        assert!(GuestSpec::parse("builtin:nope").is_err());
    }
}
