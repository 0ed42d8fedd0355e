//! The host's NUMA topology, read from sysfs (`/sys/devices/system/node`).
//!
//! Owns: which host nodes exist, their CPUs, total and free memory, and the
//! distance table, plus "which node am I running on" (`getcpu`).
//! Does not own: choosing a node for anything, or binding memory to it (see
//! [`super::policy`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::affinity::{parse_cpu_list, CpuListError};

/// Where the kernel describes NUMA nodes.
pub const SYSFS_NODE_ROOT: &str = "/sys/devices/system/node";

/// Used when the kernel has no NUMA support (no node directory): the whole
/// machine is then one node, node 0.
const PROC_MEMINFO: &str = "/proc/meminfo";
/// The online CPUs, for the single-node fallback.
const SYSFS_CPU_ONLINE: &str = "/sys/devices/system/cpu/online";

/// The distance the kernel reports from a node to itself; the fallback
/// single-node topology uses it.
const LOCAL_DISTANCE: u32 = 10;

/// One host NUMA node.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct HostNode {
    /// The kernel's node id (the N of `nodeN`).
    pub id: u32,
    /// The CPUs of this node, sorted (empty for a memory-only node).
    pub cpus: Vec<usize>,
    /// `MemTotal` of the node, in bytes.
    pub total_bytes: u64,
    /// `MemFree` of the node, in bytes, when the topology was read.
    pub free_bytes: u64,
    /// Distance from this node to node `j`, indexed by node id `j` (the
    /// kernel's SLIT-style numbers: 10 = local). Ids that are not online have
    /// 0 ("unknown") here; use [`Topology::distance`] to get `None` for those.
    pub distances: Vec<u32>,
}

/// The host's NUMA nodes that can hold memory or run threads, sorted by id.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Topology {
    /// The nodes, ascending by id.
    pub nodes: Vec<HostNode>,
}

impl crate::api::Classify for TopologyError {
    fn kind(&self) -> crate::api::ErrorKind {
        crate::api::ErrorKind::Failed
    }
}

/// Failure to read the topology; every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A sysfs (or procfs) file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is not what the kernel writes.
    #[error("cannot parse {}: {problem}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A cpu list file does not parse.
    #[error("cannot parse {}: {source}", path.display())]
    CpuList {
        /// The file.
        path: PathBuf,
        /// What is wrong with the list.
        #[source]
        source: CpuListError,
    },
    /// No online node has memory or CPUs.
    #[error("no usable NUMA node under {}: none of the online nodes has memory or cpus", root.display())]
    NoNodes {
        /// The node directory that was read.
        root: PathBuf,
    },
}

impl Topology {
    /// Reads the host's topology from [`SYSFS_NODE_ROOT`].
    ///
    /// On a kernel built without NUMA (no such directory) the host is reported
    /// as one node 0 holding all online CPUs and all memory from `/proc/meminfo`,
    /// as `numactl --hardware` does.
    pub fn read() -> Result<Topology, TopologyError> {
        let root = Path::new(SYSFS_NODE_ROOT);
        if !root.exists() {
            return Self::read_without_numa();
        }
        Self::read_from(root)
    }

    /// Reads a topology from a sysfs node directory laid out like
    /// `/sys/devices/system/node` (used by unit tests with a fake tree).
    ///
    /// Takes the nodes listed in `online` (or every `nodeN` directory if that
    /// file is absent) and keeps those with memory (`has_memory`, or a non-zero
    /// `MemTotal` if that file is absent) or with CPUs. For each node reads
    /// `nodeN/cpulist`, `nodeN/meminfo` and `nodeN/distance`.
    pub fn read_from(root: &Path) -> Result<Topology, TopologyError> {
        let online = match read_optional(&root.join("online"))? {
            Some(text) => parse_node_list(&root.join("online"), &text)?,
            None => node_dirs(root)?,
        };
        let has_memory = match read_optional(&root.join("has_memory"))? {
            Some(text) => Some(parse_node_list(&root.join("has_memory"), &text)?),
            None => None,
        };
        // The kernel writes each node's `distance` row over the online nodes in
        // ascending id order; this maps a column back to its node id.
        let online_ids: Vec<u32> = online.iter().copied().collect();
        let width = online_ids.last().map_or(0, |&max| max as usize + 1);

        let mut nodes = Vec::new();
        for &id in &online_ids {
            let dir = root.join(format!("node{id}"));
            let cpulist_path = dir.join("cpulist");
            let cpus = parse_cpu_list(&read_file(&cpulist_path)?).map_err(|source| {
                TopologyError::CpuList {
                    path: cpulist_path.clone(),
                    source,
                }
            })?;
            let meminfo_path = dir.join("meminfo");
            let (total_bytes, free_bytes) =
                parse_node_meminfo(&meminfo_path, &read_file(&meminfo_path)?)?;
            let with_memory = match &has_memory {
                Some(set) => set.contains(&id),
                None => total_bytes > 0,
            };
            if !with_memory && cpus.is_empty() {
                continue;
            }
            let distance_path = dir.join("distance");
            let row = parse_distance_row(&distance_path, &read_file(&distance_path)?)?;
            if row.len() != online_ids.len() {
                return Err(TopologyError::Parse {
                    path: distance_path,
                    problem: format!(
                        "{} distances for {} online nodes",
                        row.len(),
                        online_ids.len()
                    ),
                });
            }
            let mut distances = vec![0u32; width];
            for (&to, &d) in online_ids.iter().zip(&row) {
                distances[to as usize] = d;
            }
            nodes.push(HostNode {
                id,
                cpus,
                total_bytes,
                free_bytes,
                distances,
            });
        }
        if nodes.is_empty() {
            return Err(TopologyError::NoNodes {
                root: root.to_path_buf(),
            });
        }
        Ok(Topology { nodes })
    }

    /// The node with kernel id `id`, if it is in this topology.
    pub fn node(&self, id: u32) -> Option<&HostNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The distance from node `from` to node `to`, if both are known.
    pub fn distance(&self, from: u32, to: u32) -> Option<u32> {
        let d = *self.node(from)?.distances.get(to as usize)?;
        (d != 0).then_some(d)
    }

    /// The one-node topology of a kernel without NUMA support.
    fn read_without_numa() -> Result<Topology, TopologyError> {
        let cpu_path = Path::new(SYSFS_CPU_ONLINE);
        let cpus =
            parse_cpu_list(&read_file(cpu_path)?).map_err(|source| TopologyError::CpuList {
                path: cpu_path.to_path_buf(),
                source,
            })?;
        let meminfo_path = Path::new(PROC_MEMINFO);
        let text = read_file(meminfo_path)?;
        let total_bytes = meminfo_field(meminfo_path, &text, "MemTotal:")?;
        let free_bytes = meminfo_field(meminfo_path, &text, "MemFree:")?;
        Ok(Topology {
            nodes: vec![HostNode {
                id: 0,
                cpus,
                total_bytes,
                free_bytes,
                distances: vec![LOCAL_DISTANCE],
            }],
        })
    }
}

/// The host node the calling thread's CPU belongs to (`getcpu`), 0 if unknown.
///
/// The answer can be stale as soon as it is returned if the thread is not
/// Memory the host can give a new process (MemAvailable), in bytes; None
/// if /proc/meminfo does not say.
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// pinned to one node's CPUs.
pub fn current_node() -> u32 {
    let mut cpu: libc::c_uint = 0;
    let mut node: libc::c_uint = 0;
    // SAFETY: both out-pointers point to live, writable c_uints on this stack
    // frame; the third (cache) argument is unused by the kernel and may be NULL.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_getcpu,
            &mut cpu as *mut libc::c_uint,
            &mut node as *mut libc::c_uint,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if ret < 0 {
        0
    } else {
        node
    }
}

/// Reads a whole text file, naming it on failure.
fn read_file(path: &Path) -> Result<String, TopologyError> {
    std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file that older kernels (or fake trees) may lack.
fn read_optional(path: &Path) -> Result<Option<String>, TopologyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TopologyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A node list ("0-1,3") as the set of node ids it names.
fn parse_node_list(path: &Path, text: &str) -> Result<BTreeSet<u32>, TopologyError> {
    // Node lists use the same syntax as cpu lists.
    let ids = parse_cpu_list(text).map_err(|source| TopologyError::CpuList {
        path: path.to_path_buf(),
        source,
    })?;
    ids.into_iter()
        .map(|id| {
            u32::try_from(id).map_err(|_| TopologyError::Parse {
                path: path.to_path_buf(),
                problem: format!("node id {id} is out of range"),
            })
        })
        .collect()
}

/// The ids of the `nodeN` directories under `root`.
fn node_dirs(root: &Path) -> Result<BTreeSet<u32>, TopologyError> {
    let entries = std::fs::read_dir(root).map_err(|source| TopologyError::Read {
        path: root.to_path_buf(),
        source,
    })?;
    let mut ids = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| TopologyError::Read {
            path: root.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        if let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// `(MemTotal, MemFree)` in bytes from a node's meminfo, whose lines read
/// "Node 0 MemTotal:        5204172 kB".
fn parse_node_meminfo(path: &Path, text: &str) -> Result<(u64, u64), TopologyError> {
    Ok((
        meminfo_field(path, text, "MemTotal:")?,
        meminfo_field(path, text, "MemFree:")?,
    ))
}

/// The value in bytes of a "... KEY: N kB" line (node or /proc meminfo).
fn meminfo_field(path: &Path, text: &str, key: &str) -> Result<u64, TopologyError> {
    let parse_err = |problem: String| TopologyError::Parse {
        path: path.to_path_buf(),
        problem,
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        // Node meminfo lines start with "Node N", /proc/meminfo lines do not.
        if !words.any(|w| w == key) {
            continue;
        }
        let value = words
            .next()
            .ok_or_else(|| parse_err(format!("line '{line}' has no value")))?;
        let kib: u64 = value
            .parse()
            .map_err(|_| parse_err(format!("line '{line}': '{value}' is not a number")))?;
        let unit = words.next().unwrap_or("kB");
        if unit != "kB" {
            return Err(parse_err(format!("line '{line}': unknown unit '{unit}'")));
        }
        return kib
            .checked_mul(1024)
            .ok_or_else(|| parse_err(format!("line '{line}': value overflows")));
    }
    Err(parse_err(format!("no {key} line")))
}

/// A node's `distance` file: one line of space-separated numbers.
fn parse_distance_row(path: &Path, text: &str) -> Result<Vec<u32>, TopologyError> {
    text.split_whitespace()
        .map(|w| {
            w.parse::<u32>().map_err(|_| TopologyError::Parse {
                path: path.to_path_buf(),
                problem: format!("'{w}' is not a distance"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Writes `node{id}` with the given cpulist, meminfo sizes (kB) and distances.
    fn write_node(root: &Path, id: u32, cpulist: &str, total_kb: u64, free_kb: u64, dist: &str) {
        let dir = root.join(format!("node{id}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cpulist"), format!("{cpulist}\n")).unwrap();
        fs::write(
            dir.join("meminfo"),
            format!(
                "Node {id} MemTotal:       {total_kb} kB\n\
                 Node {id} MemFree:        {free_kb} kB\n\
                 Node {id} MemUsed:        {} kB\n\
                 Node {id} HugePages_Total:     0\n",
                total_kb - free_kb
            ),
        )
        .unwrap();
        fs::write(dir.join("distance"), format!("{dist}\n")).unwrap();
    }

    fn two_node_tree() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(root.join("online"), "0-1\n").unwrap();
        fs::write(root.join("possible"), "0-3\n").unwrap();
        fs::write(root.join("has_memory"), "0-1\n").unwrap();
        fs::write(root.join("has_cpu"), "0-1\n").unwrap();
        write_node(root, 0, "0-1", 12345, 10000, "10 21");
        write_node(root, 1, "2-3,6", 20000, 512, "21 10");
        tmp
    }

    #[test]
    fn reads_two_node_fake_sysfs() {
        let tmp = two_node_tree();
        let topo = Topology::read_from(tmp.path()).unwrap();
        assert_eq!(
            topo,
            Topology {
                nodes: vec![
                    HostNode {
                        id: 0,
                        cpus: vec![0, 1],
                        total_bytes: 12345 * 1024,
                        free_bytes: 10000 * 1024,
                        distances: vec![10, 21],
                    },
                    HostNode {
                        id: 1,
                        cpus: vec![2, 3, 6],
                        total_bytes: 20000 * 1024,
                        free_bytes: 512 * 1024,
                        distances: vec![21, 10],
                    },
                ]
            }
        );
        assert_eq!(topo.node(1).unwrap().cpus, vec![2, 3, 6]);
        assert!(topo.node(2).is_none());
        assert_eq!(topo.distance(0, 1), Some(21));
        assert_eq!(topo.distance(1, 1), Some(10));
        assert_eq!(topo.distance(0, 5), None);
    }

    #[test]
    fn offline_and_empty_nodes_are_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // Node 1 is online but has neither memory nor cpus; node 3 is online
        // with memory only; node 2 exists in the tree but is not online.
        fs::write(root.join("online"), "0-1,3\n").unwrap();
        fs::write(root.join("has_memory"), "0,3\n").unwrap();
        write_node(root, 0, "0-1", 4096, 1024, "10 20 30");
        write_node(root, 1, "", 0, 0, "20 10 30");
        write_node(root, 2, "4", 4096, 4096, "10");
        write_node(root, 3, "", 8192, 8192, "30 30 10");
        let topo = Topology::read_from(root).unwrap();
        let ids: Vec<u32> = topo.nodes.iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![0, 3]);
        // Distances are indexed by node id even with a gap in the online ids.
        assert_eq!(topo.node(3).unwrap().distances, vec![30, 30, 0, 10]);
        assert_eq!(topo.distance(0, 3), Some(30));
        assert_eq!(topo.distance(0, 2), None);
        assert!(topo.node(3).unwrap().cpus.is_empty());
    }

    #[test]
    fn without_online_file_node_dirs_are_used() {
        let tmp = tempfile::tempdir().unwrap();
        write_node(tmp.path(), 0, "0", 2048, 1024, "10");
        let topo = Topology::read_from(tmp.path()).unwrap();
        assert_eq!(topo.nodes.len(), 1);
        assert_eq!(topo.nodes[0].total_bytes, 2048 * 1024);
    }

    #[test]
    fn missing_meminfo_line_names_the_file() {
        let tmp = two_node_tree();
        let path = tmp.path().join("node1/meminfo");
        fs::write(&path, "Node 1 MemUsed: 5 kB\n").unwrap();
        let msg = Topology::read_from(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("node1/meminfo"), "{msg}");
        assert!(msg.contains("MemTotal"), "{msg}");
    }

    #[test]
    fn garbage_in_distance_file_names_the_file() {
        let tmp = two_node_tree();
        fs::write(tmp.path().join("node0/distance"), "10 abc\n").unwrap();
        let msg = Topology::read_from(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("node0/distance"), "{msg}");
        assert!(msg.contains("abc"), "{msg}");
    }

    #[test]
    fn short_distance_row_is_an_error() {
        let tmp = two_node_tree();
        fs::write(tmp.path().join("node1/distance"), "10\n").unwrap();
        let msg = Topology::read_from(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("node1/distance"), "{msg}");
        assert!(msg.contains("1 distances for 2 online nodes"), "{msg}");
    }

    #[test]
    fn missing_cpulist_names_the_file() {
        let tmp = two_node_tree();
        fs::remove_file(tmp.path().join("node0/cpulist")).unwrap();
        let err = Topology::read_from(tmp.path()).unwrap_err();
        assert!(matches!(err, TopologyError::Read { .. }));
        assert!(err.to_string().contains("node0/cpulist"), "{err}");
    }

    #[test]
    fn tree_with_only_empty_nodes_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("online"), "0\n").unwrap();
        fs::write(tmp.path().join("has_memory"), "\n").unwrap();
        write_node(tmp.path(), 0, "", 0, 0, "10");
        assert!(matches!(
            Topology::read_from(tmp.path()),
            Err(TopologyError::NoNodes { .. })
        ));
    }

    #[test]
    fn topology_round_trips_through_json() {
        let topo = Topology::read_from(two_node_tree().path()).unwrap();
        let json = serde_json::to_string(&topo).unwrap();
        assert_eq!(serde_json::from_str::<Topology>(&json).unwrap(), topo);
    }

    #[test]
    fn real_host_has_a_node_with_cpus_and_memory() {
        let topo = Topology::read().unwrap();
        assert!(!topo.nodes.is_empty());
        let here = current_node();
        let node = topo.node(here).expect("current node is in the topology");
        assert!(node.total_bytes > 0);
        assert!(node.free_bytes <= node.total_bytes);
        assert_eq!(topo.distance(here, here), Some(10));
        let all_cpus: Vec<usize> = topo.nodes.iter().flat_map(|n| n.cpus.clone()).collect();
        assert!(!all_cpus.is_empty());
    }
}
