//! The kernel's NUMA memory-policy syscalls on ranges of this process's address
//! space: `mbind`, `get_mempolicy` and `move_pages`.
//!
//! Owns: binding a range to a node (optionally migrating what is already
//! there), removing that binding, reading a range's policy, and moving or
//! locating individual pages. Everything goes through `libc::syscall` so that
//! no libnuma is needed. Does not own: which ranges exist or what they hold
//! (the caller's mappings), batching of page lists (the caller's business; see
//! [`super::placement`] for a batched query).

use std::io;

use super::affinity::format_cpu_list;
use crate::memory::PAGE_SIZE;

// Memory policy modes (include/uapi/linux/mempolicy.h).
const MPOL_DEFAULT: i32 = 0;
const MPOL_PREFERRED: i32 = 1;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;
const MPOL_LOCAL: i32 = 4;
const MPOL_PREFERRED_MANY: i32 = 5;
const MPOL_WEIGHTED_INTERLEAVE: i32 = 6;
/// Mode flags the kernel may OR into the mode returned by get_mempolicy
/// (MPOL_F_STATIC_NODES, MPOL_F_RELATIVE_NODES, MPOL_F_NUMA_BALANCING).
const MPOL_MODE_FLAGS: i32 = (1 << 15) | (1 << 14) | (1 << 13);

/// get_mempolicy: look up the policy of the VMA at `addr`.
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;

// mbind / move_pages flags.
const MPOL_MF_STRICT: libc::c_uint = 1 << 0;
const MPOL_MF_MOVE: libc::c_uint = 1 << 1;

/// Bits of the node mask handed to get_mempolicy. The kernel refuses a mask
/// shorter than its `nr_node_ids`, which is at most 1024 on x86-64 (NODES_SHIFT
/// 10); 4096 leaves room and is still only 512 bytes.
const GET_POLICY_MASK_BITS: usize = 4096;

/// Bits in one word of a kernel node mask (`unsigned long`).
const MASK_WORD_BITS: usize = u64::BITS as usize;

/// Failure of a memory-policy syscall; each names the syscall, the range or
/// pages, the node and the errno.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The range does not start on a page boundary (or is otherwise malformed).
    #[error("{syscall} of {addr:#x}+{len:#x}: {problem}")]
    BadRange {
        /// The syscall that was about to be made.
        syscall: &'static str,
        /// Start of the range.
        addr: usize,
        /// Length of the range in bytes.
        len: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// `mbind(MPOL_BIND)` failed.
    #[error("mbind(MPOL_BIND{flags}) of {addr:#x}+{len:#x} to node {node} failed{hint}: {source}")]
    Bind {
        /// Start of the range.
        addr: usize,
        /// Length of the range in bytes.
        len: usize,
        /// The target node.
        node: u32,
        /// The flags, as text ("" or ", MPOL_MF_MOVE|MPOL_MF_STRICT").
        flags: &'static str,
        /// What the errno means here ("" if nothing specific).
        hint: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
    /// `mbind(MPOL_DEFAULT)` failed.
    #[error("mbind(MPOL_DEFAULT) of {addr:#x}+{len:#x} failed{hint}: {source}")]
    Unbind {
        /// Start of the range.
        addr: usize,
        /// Length of the range in bytes.
        len: usize,
        /// What the errno means here ("" if nothing specific).
        hint: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
    /// `get_mempolicy(MPOL_F_ADDR)` failed.
    #[error("get_mempolicy(MPOL_F_ADDR) of {addr:#x} failed{hint}: {source}")]
    GetPolicy {
        /// The address asked about.
        addr: usize,
        /// What the errno means here ("" if nothing specific).
        hint: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
    /// `move_pages` to a node failed as a whole (per-page failures are in the
    /// returned status array instead).
    #[error("move_pages of {count} pages from {first:#x} to node {node} failed{hint}: {source}")]
    MovePages {
        /// How many pages were passed.
        count: usize,
        /// The first page address.
        first: usize,
        /// The target node.
        node: u32,
        /// What the errno means here ("" if nothing specific).
        hint: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
    /// `move_pages` as a status query failed as a whole.
    #[error("move_pages (status query) of {count} pages from {first:#x} failed{hint}: {source}")]
    QueryPages {
        /// How many pages were passed.
        count: usize,
        /// The first page address.
        first: usize,
        /// What the errno means here ("" if nothing specific).
        hint: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
    /// Part of a range that was queried is not mapped at all.
    /// (move_pages reports such pages as -EFAULT, like zero pages; mincore's
    /// ENOMEM is what tells them apart.)
    #[error("{syscall} of {addr:#x}+{len:#x}: part of the range is not mapped")]
    Unmapped {
        /// The syscall whose answer was being checked.
        syscall: &'static str,
        /// Start of the (sub)range found to contain a hole.
        addr: usize,
        /// Length of that (sub)range in bytes.
        len: usize,
    },
}

/// Sets the policy of [addr, addr+len) to MPOL_BIND on `node`: pages faulted
/// from now on come from `node` only (and fail with ENOMEM/SIGBUS rather than
/// spill to another node).
///
/// With `move_existing`, passes MPOL_MF_MOVE|MPOL_MF_STRICT so pages already
/// faulted in elsewhere are migrated to `node` now, and the call fails with EIO
/// if any of them cannot be (pinned, shared with another process, or busy).
/// `addr` must be page-aligned; `len` is rounded up to whole pages by the kernel.
// The addresses are only handed to the kernel, which validates them (an
// unmapped one is EFAULT, not undefined behaviour) and never writes through
// them: these calls change policy or physical placement, not contents.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn bind(addr: *mut u8, len: usize, node: u32, move_existing: bool) -> Result<(), PolicyError> {
    check_aligned("mbind", addr as usize, len)?;
    let (mask, maxnode) = single_node_mask(node);
    let (flags, flags_text) = if move_existing {
        (
            MPOL_MF_MOVE | MPOL_MF_STRICT,
            ", MPOL_MF_MOVE|MPOL_MF_STRICT",
        )
    } else {
        (0, "")
    };
    // SAFETY: mbind only changes the memory policy (and with MPOL_MF_MOVE the
    // physical placement, never the contents) of pages in the range; it cannot
    // invalidate any Rust reference. `mask` is a live buffer of at least
    // `maxnode - 1` bits that the kernel only reads.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            MPOL_BIND,
            mask.as_ptr(),
            maxnode,
            flags,
        )
    };
    if ret < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::EINVAL) => " (node not online, without memory or not allowed by the cpuset)",
            Some(libc::EIO) => {
                " (some pages could not be moved: pinned, shared with another process or busy)"
            }
            Some(libc::EFAULT) => " (part of the range is not mapped)",
            Some(libc::ENOMEM) => " (not enough free memory on the node, or kernel memory)",
            Some(libc::EPERM) => " (not permitted)",
            _ => "",
        };
        return Err(PolicyError::Bind {
            addr: addr as usize,
            len,
            node,
            flags: flags_text,
            hint,
            source,
        });
    }
    Ok(())
}

/// Removes the policy of [addr, addr+len) (MPOL_DEFAULT): new pages then follow
/// the thread's policy, normally "the node of the faulting CPU". Pages already
/// placed stay where they are.
// The addresses are only handed to the kernel, which validates them (an
// unmapped one is EFAULT, not undefined behaviour) and never writes through
// them: these calls change policy or physical placement, not contents.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn unbind(addr: *mut u8, len: usize) -> Result<(), PolicyError> {
    check_aligned("mbind", addr as usize, len)?;
    // SAFETY: mbind(MPOL_DEFAULT) with no node mask only drops the range's
    // policy; it reads no user memory and moves no pages.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            MPOL_DEFAULT,
            std::ptr::null::<u64>(),
            0 as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::EFAULT) => " (part of the range is not mapped)",
            _ => "",
        };
        return Err(PolicyError::Unbind {
            addr: addr as usize,
            len,
            hint,
            source,
        });
    }
    Ok(())
}

/// The policy of the mapping containing `addr`, as a short string for reports:
/// "default", "bind:1", "preferred:0", "local", "interleave:0-1",
/// "preferred-many:0-1", "weighted-interleave:0-1" (node sets in cpu-list
/// syntax). A mapping with no policy of its own reports "default" even if the
/// thread has one, as get_mempolicy(MPOL_F_ADDR) does.
// The addresses are only handed to the kernel, which validates them (an
// unmapped one is EFAULT, not undefined behaviour) and never writes through
// them: these calls change policy or physical placement, not contents.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn policy_of(addr: *mut u8) -> Result<String, PolicyError> {
    let mut mode: libc::c_int = 0;
    let mut mask = vec![0u64; GET_POLICY_MASK_BITS / MASK_WORD_BITS];
    // The kernel takes maxnode as "bits + 1" (it decrements it first).
    let maxnode = (GET_POLICY_MASK_BITS + 1) as libc::c_ulong;
    // SAFETY: `mode` is a live c_int and `mask` a live, writable buffer of
    // GET_POLICY_MASK_BITS bits; the kernel writes only within them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            maxnode,
            addr,
            MPOL_F_ADDR,
        )
    };
    if ret < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::EFAULT) => " (address not mapped)",
            _ => "",
        };
        return Err(PolicyError::GetPolicy {
            addr: addr as usize,
            hint,
            source,
        });
    }
    let nodes = mask_to_list(&mask);
    Ok(format_policy(mode, &nodes))
}

/// Moves the pages containing each address in `pages` to `node`
/// (`move_pages(0, ..., MPOL_MF_MOVE)`), and returns the per-page status: the
/// node the page is on afterwards, or -errno for that page (-ENOENT: not
/// present, -EFAULT: unmapped or the shared zero page, -EBUSY, -EACCES: shared
/// with another process, -ENOMEM: no room on `node`, ...). A page that could
/// not be moved does not make the call fail; look at the statuses.
///
/// When migration fails for some pages of a group the kernel queued
/// together (busy, or racing a fault), move_pages returns how many were not
/// moved and stores *no* status for that group: those pages read -EAGAIN
/// here (the buffer's initial value), never a node they are not on.
pub fn move_pages_to(pages: &[*mut u8], node: u32) -> Result<Vec<i32>, PolicyError> {
    let mut status = vec![-libc::EAGAIN; pages.len()];
    if pages.is_empty() {
        return Ok(status);
    }
    let nodes = vec![node as libc::c_int; pages.len()];
    // SAFETY: `pages`, `nodes` and `status` are live buffers of `pages.len()`
    // entries each; the kernel reads the first two and writes only `status`.
    // Migration changes where pages are, never their contents, so no Rust
    // reference into them is invalidated.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::pid_t,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            nodes.as_ptr(),
            status.as_mut_ptr(),
            MPOL_MF_MOVE as libc::c_int,
        )
    };
    if ret < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::ENODEV) => " (node not online or without memory)",
            Some(libc::EACCES) => " (node not allowed by the cpuset)",
            Some(libc::E2BIG) => " (too many pages in one call)",
            Some(libc::ENOMEM) => " (not enough kernel memory)",
            _ => "",
        };
        return Err(PolicyError::MovePages {
            count: pages.len(),
            first: pages[0] as usize,
            node,
            hint,
            source,
        });
    }
    Ok(status)
}

/// Where the pages containing each address in `pages` are
/// (`move_pages(0, ..., nodes=NULL)`): per page, the node, or -errno:
/// -ENOENT = mapped but not faulted in; -EFAULT = not mapped at all, *or*
/// mapped to the shared zero page (read but never written), which the kernel
/// does not tell apart.
pub fn query_pages(pages: &[*mut u8]) -> Result<Vec<i32>, PolicyError> {
    let mut status = vec![0i32; pages.len()];
    query_pages_into(pages, &mut status)?;
    Ok(status)
}

/// [`query_pages`] into a caller-owned status buffer of the same length, so a
/// batched caller can reuse one allocation.
pub(crate) fn query_pages_into(pages: &[*mut u8], status: &mut [i32]) -> Result<(), PolicyError> {
    assert_eq!(pages.len(), status.len(), "one status per page");
    if pages.is_empty() {
        return Ok(());
    }
    // SAFETY: `pages` and `status` are live buffers of `pages.len()` entries;
    // with a NULL node array the kernel only reads `pages` and writes `status`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::pid_t,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    if ret < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::E2BIG) => " (too many pages in one call)",
            Some(libc::ENOMEM) => " (not enough kernel memory)",
            _ => "",
        };
        return Err(PolicyError::QueryPages {
            count: pages.len(),
            first: pages[0] as usize,
            hint,
            source,
        });
    }
    Ok(())
}

/// Refuses a range the kernel would reject with a bare EINVAL.
fn check_aligned(syscall: &'static str, addr: usize, len: usize) -> Result<(), PolicyError> {
    if !addr.is_multiple_of(PAGE_SIZE as usize) {
        return Err(PolicyError::BadRange {
            syscall,
            addr,
            len,
            problem: "start is not page-aligned",
        });
    }
    if addr.checked_add(len).is_none() {
        return Err(PolicyError::BadRange {
            syscall,
            addr,
            len,
            problem: "range wraps around the address space",
        });
    }
    Ok(())
}

/// A node mask with only `node` set, and the `maxnode` argument that goes with
/// it. The kernel treats maxnode as "bits + 1" (a historical off-by-one that
/// libnuma also compensates for), so it is the mask's bit count plus one.
fn single_node_mask(node: u32) -> (Vec<u64>, libc::c_ulong) {
    let node = node as usize;
    let mut mask = vec![0u64; node / MASK_WORD_BITS + 1];
    mask[node / MASK_WORD_BITS] |= 1u64 << (node % MASK_WORD_BITS);
    let maxnode = (mask.len() * MASK_WORD_BITS + 1) as libc::c_ulong;
    (mask, maxnode)
}

/// The node ids set in a kernel node mask.
fn mask_to_list(mask: &[u64]) -> Vec<usize> {
    let mut nodes = Vec::new();
    for (w, word) in mask.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let b = bits.trailing_zeros() as usize;
            nodes.push(w * MASK_WORD_BITS + b);
            bits &= bits - 1;
        }
    }
    nodes
}

/// The report string for a get_mempolicy mode and node set.
fn format_policy(mode_with_flags: i32, nodes: &[usize]) -> String {
    let list = format_cpu_list(nodes);
    match mode_with_flags & !MPOL_MODE_FLAGS {
        MPOL_DEFAULT => "default".to_string(),
        // "preferred" with an empty node set is how older kernels spell "local".
        MPOL_PREFERRED if nodes.is_empty() => "local".to_string(),
        MPOL_PREFERRED => format!("preferred:{list}"),
        MPOL_BIND => format!("bind:{list}"),
        MPOL_INTERLEAVE => format!("interleave:{list}"),
        MPOL_LOCAL => "local".to_string(),
        MPOL_PREFERRED_MANY => format!("preferred-many:{list}"),
        MPOL_WEIGHTED_INTERLEAVE => format!("weighted-interleave:{list}"),
        other => format!("mode{other}:{list}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An anonymous private mapping, unmapped on drop.
    pub(crate) struct Mapping {
        pub(crate) addr: *mut u8,
        pub(crate) len: usize,
    }

    impl Mapping {
        pub(crate) fn new(pages: usize) -> Mapping {
            let len = pages * PAGE_SIZE as usize;
            // SAFETY: a fresh anonymous mapping at a kernel-chosen address
            // aliases nothing.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED, "mmap of {len} bytes");
            Mapping {
                addr: addr as *mut u8,
                len,
            }
        }

        /// Writes one byte into each page so every page is faulted in.
        pub(crate) fn touch(&self) {
            for off in (0..self.len).step_by(PAGE_SIZE as usize) {
                // SAFETY: `off` is inside the live writable mapping.
                unsafe { self.addr.add(off).write_volatile(1) };
            }
        }

        pub(crate) fn page(&self, i: usize) -> *mut u8 {
            assert!(i * (PAGE_SIZE as usize) < self.len);
            // SAFETY: the offset stays inside the mapping (asserted above).
            unsafe { self.addr.add(i * PAGE_SIZE as usize) }
        }

        pub(crate) fn pages(&self) -> Vec<*mut u8> {
            (0..self.len / PAGE_SIZE as usize)
                .map(|i| self.page(i))
                .collect()
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: this mapping was created by `new` and nothing refers to
            // it any more.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    /// An address nothing maps: the kernel hands out addresses top-down and
    /// never this low unless asked with MAP_FIXED (and `vm.mmap_min_addr`
    /// often forbids even that). A freshly unmapped address would not do: a
    /// test running in parallel could be given it by its own mmap.
    pub(crate) const UNMAPPED_PAGE: *mut u8 = 0x1000 as *mut u8;

    /// A node the host surely does not have.
    const MISSING_NODE: u32 = 7;

    #[test]
    fn bind_with_move_keeps_touched_pages_on_node_0() {
        let m = Mapping::new(64);
        m.touch();
        bind(m.addr, m.len, 0, true).unwrap();
        let status = query_pages(&m.pages()).unwrap();
        assert_eq!(status, vec![0; 64]);
        assert_eq!(policy_of(m.addr).unwrap(), "bind:0");
        // Every page of the range carries the policy, not only the first.
        assert_eq!(policy_of(m.page(63)).unwrap(), "bind:0");
    }

    #[test]
    fn unbind_restores_default_policy() {
        let m = Mapping::new(4);
        assert_eq!(policy_of(m.addr).unwrap(), "default");
        bind(m.addr, m.len, 0, false).unwrap();
        assert_eq!(policy_of(m.addr).unwrap(), "bind:0");
        unbind(m.addr, m.len).unwrap();
        assert_eq!(policy_of(m.addr).unwrap(), "default");
    }

    #[test]
    fn bind_to_missing_node_fails_naming_mbind_and_node() {
        let m = Mapping::new(4);
        m.touch();
        for move_existing in [false, true] {
            let err = bind(m.addr, m.len, MISSING_NODE, move_existing).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("mbind"), "{msg}");
            assert!(msg.contains("node 7"), "{msg}");
            assert!(msg.contains(&format!("{:#x}", m.addr as usize)), "{msg}");
            assert!(msg.contains("os error"), "{msg}");
        }
        // A node id past any kernel's MAX_NUMNODES is refused the same way.
        assert!(bind(m.addr, m.len, 100_000, false).is_err());
    }

    #[test]
    fn bind_of_unaligned_start_is_refused_before_the_syscall() {
        let m = Mapping::new(2);
        // SAFETY: one byte into a two-page mapping.
        let inside = unsafe { m.addr.add(1) };
        let err = bind(inside, PAGE_SIZE as usize, 0, false).unwrap_err();
        assert!(matches!(err, PolicyError::BadRange { .. }), "{err}");
        assert!(err.to_string().contains("page-aligned"), "{err}");
    }

    #[test]
    fn policy_of_unmapped_address_names_get_mempolicy() {
        let msg = policy_of(UNMAPPED_PAGE).unwrap_err().to_string();
        assert!(msg.contains("get_mempolicy"), "{msg}");
        assert!(msg.contains("not mapped"), "{msg}");
    }

    #[test]
    fn move_pages_to_node_0_reports_node_0() {
        let m = Mapping::new(16);
        m.touch();
        let status = move_pages_to(&m.pages(), 0).unwrap();
        assert_eq!(status, vec![0; 16]);
        assert!(move_pages_to(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn move_pages_to_missing_node_fails_naming_node() {
        let m = Mapping::new(2);
        m.touch();
        let msg = move_pages_to(&m.pages(), MISSING_NODE)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("move_pages"), "{msg}");
        assert!(msg.contains("node 7"), "{msg}");
    }

    #[test]
    fn query_tells_present_untouched_and_unmapped_pages_apart() {
        let m = Mapping::new(3);
        // SAFETY: first page of the live mapping.
        unsafe { m.addr.write_volatile(1) };
        let status = query_pages(&[m.page(0), m.page(1), UNMAPPED_PAGE]).unwrap();
        assert_eq!(status, vec![0, -libc::ENOENT, -libc::EFAULT]);
    }

    #[test]
    fn policy_strings_cover_every_mode() {
        assert_eq!(format_policy(MPOL_DEFAULT, &[]), "default");
        assert_eq!(format_policy(MPOL_BIND, &[1]), "bind:1");
        assert_eq!(format_policy(MPOL_PREFERRED, &[0]), "preferred:0");
        assert_eq!(format_policy(MPOL_PREFERRED, &[]), "local");
        assert_eq!(format_policy(MPOL_LOCAL, &[]), "local");
        assert_eq!(format_policy(MPOL_INTERLEAVE, &[0, 1]), "interleave:0-1");
        assert_eq!(
            format_policy(MPOL_BIND | (1 << 15), &[0, 2, 3]),
            "bind:0,2-3"
        );
        assert_eq!(
            format_policy(MPOL_PREFERRED_MANY, &[0, 1]),
            "preferred-many:0-1"
        );
        assert_eq!(
            format_policy(MPOL_WEIGHTED_INTERLEAVE, &[1]),
            "weighted-interleave:1"
        );
        assert_eq!(format_policy(42, &[1]), "mode42:1");
    }

    #[test]
    fn node_masks_set_exactly_the_right_bit() {
        let (mask, maxnode) = single_node_mask(0);
        assert_eq!((mask, maxnode), (vec![1], 65));
        let (mask, maxnode) = single_node_mask(65);
        assert_eq!((mask, maxnode), (vec![0, 2], 129));
        assert_eq!(mask_to_list(&[0b101, 1]), vec![0, 2, 64]);
    }
}
