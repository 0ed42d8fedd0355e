//! Thread CPU affinity (`sched_setaffinity` / `sched_getaffinity`) and the
//! kernel's cpu-list syntax ("0-3,8,10-11").
//!
//! Owns: pinning a thread (by tid) to a set of host CPUs and reading it back,
//! and parsing/formatting cpu lists as sysfs writes them and users type them.
//! Also owns [`PinnedThreads`]: a set of threads kept pinned to the CPUs of
//! the group (guest node) each belongs to, re-pinned when the group's CPUs
//! change; a thread joins it itself, so none runs a request unpinned.
//! Does not own: which CPUs a vCPU should run on (that is the caller's policy,
//! usually "the CPUs of the node its memory is on", see [`super::topology`]).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Highest CPU number (exclusive) accepted in a cpu list or an affinity mask.
/// The kernel's own limit (NR_CPUS) is at most 8192 on x86-64; anything above
/// this is a typo, and refusing it keeps "0-4000000000" from allocating gigabytes.
pub const MAX_CPUS: usize = 1 << 16;

/// Bits in one word of a kernel cpu mask (`unsigned long`).
const MASK_WORD_BITS: usize = u64::BITS as usize;

/// Size in bits of the first mask tried for `sched_getaffinity`; doubled while
/// the kernel says it is smaller than its `nr_cpu_ids`.
const INITIAL_GET_MASK_BITS: usize = 1024;

/// Failure to set or read a thread's CPU affinity.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// An empty cpu set was asked for; the kernel would refuse it with EINVAL.
    #[error("sched_setaffinity of thread {tid}: the cpu list is empty")]
    EmptyCpuList {
        /// The thread whose affinity was to be set.
        tid: i32,
    },
    /// A CPU number beyond [`MAX_CPUS`].
    #[error("sched_setaffinity of thread {tid}: cpu {cpu} is out of range (limit {MAX_CPUS})")]
    CpuOutOfRange {
        /// The thread whose affinity was to be set.
        tid: i32,
        /// The offending CPU number.
        cpu: usize,
    },
    /// `sched_setaffinity` failed.
    #[error("sched_setaffinity of thread {tid} to cpus {cpus} failed{hint}: {source}")]
    Set {
        /// The thread whose affinity was to be set.
        tid: i32,
        /// The requested cpus, as a cpu list.
        cpus: String,
        /// A hint derived from the errno ("" if none).
        hint: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
    /// `sched_getaffinity` failed.
    #[error("sched_getaffinity of thread {tid} failed{hint}: {source}")]
    Get {
        /// The thread whose affinity was read.
        tid: i32,
        /// A hint derived from the errno ("" if none).
        hint: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
}

/// A cpu list that does not parse; each variant quotes the list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// Two separators with nothing between them.
    #[error("cpu list '{list}' has an empty item")]
    EmptyItem {
        /// The list.
        list: String,
    },
    /// An item that is not a number.
    #[error("cpu list '{list}': '{text}' is not a cpu number")]
    NotANumber {
        /// The list.
        list: String,
        /// The item.
        text: String,
    },
    /// A cpu number at or above [`MAX_CPUS`].
    #[error("cpu list '{list}': cpu {cpu} is out of range (limit {MAX_CPUS})")]
    OutOfRange {
        /// The list.
        list: String,
        /// The number.
        cpu: usize,
    },
    /// A range whose first cpu is above its last.
    #[error("cpu list '{list}': range '{range}' runs backwards")]
    Backwards {
        /// The list.
        list: String,
        /// The range.
        range: String,
    },
}

/// Pins thread `tid` (0 = the calling thread) to exactly `cpus`.
///
/// Uses the raw syscall with a mask sized to the highest cpu asked for, so it
/// is not limited to glibc's fixed 1024-cpu `cpu_set_t`.
pub fn set_thread_affinity(tid: i32, cpus: &[usize]) -> Result<(), AffinityError> {
    if cpus.is_empty() {
        return Err(AffinityError::EmptyCpuList { tid });
    }
    if let Some(&cpu) = cpus.iter().find(|&&c| c >= MAX_CPUS) {
        return Err(AffinityError::CpuOutOfRange { tid, cpu });
    }
    let max = cpus.iter().copied().max().unwrap_or(0);
    let mut mask = vec![0u64; max / MASK_WORD_BITS + 1];
    for &cpu in cpus {
        mask[cpu / MASK_WORD_BITS] |= 1u64 << (cpu % MASK_WORD_BITS);
    }
    let bytes = std::mem::size_of_val(mask.as_slice());
    // SAFETY: `mask` is a live, initialised buffer of exactly `bytes` bytes that
    // the kernel only reads; the call has no other memory effects on this process.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setaffinity, tid, bytes, mask.as_ptr()) };
    if ret < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::EINVAL) => " (none of these cpus is online or allowed by the cpuset)",
            Some(libc::ESRCH) => " (no such thread)",
            Some(libc::EPERM) => " (not permitted for that thread)",
            _ => "",
        };
        return Err(AffinityError::Set {
            tid,
            cpus: format_cpu_list(cpus),
            hint,
            source,
        });
    }
    Ok(())
}

/// The CPUs thread `tid` (0 = the calling thread) may run on, sorted ascending.
pub fn thread_affinity(tid: i32) -> Result<Vec<usize>, AffinityError> {
    let mut bits = INITIAL_GET_MASK_BITS;
    loop {
        let mut mask = vec![0u64; bits / MASK_WORD_BITS];
        let bytes = std::mem::size_of_val(mask.as_slice());
        // SAFETY: `mask` is a live, writable buffer of exactly `bytes` bytes; the
        // kernel writes at most `bytes` bytes into it and touches nothing else.
        let ret =
            unsafe { libc::syscall(libc::SYS_sched_getaffinity, tid, bytes, mask.as_mut_ptr()) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            // EINVAL here means the mask is shorter than the kernel's nr_cpu_ids:
            // grow it (bounded, so a different EINVAL cannot loop forever).
            if source.raw_os_error() == Some(libc::EINVAL) && bits < MAX_CPUS {
                bits *= 2;
                continue;
            }
            let hint = match source.raw_os_error() {
                Some(libc::ESRCH) => " (no such thread)",
                _ => "",
            };
            return Err(AffinityError::Get { tid, hint, source });
        }
        // The raw syscall returns how many bytes of the mask it filled in.
        let filled_words = (ret as usize).div_ceil(std::mem::size_of::<u64>());
        let mut cpus = Vec::new();
        for (w, word) in mask.iter().take(filled_words).enumerate() {
            for b in 0..MASK_WORD_BITS {
                if word & (1u64 << b) != 0 {
                    cpus.push(w * MASK_WORD_BITS + b);
                }
            }
        }
        return Ok(cpus);
    }
}

/// The kernel thread id (`gettid()`) of the calling thread.
pub fn current_tid() -> i32 {
    // SAFETY: gettid takes no arguments, touches no memory and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    tid as i32
}

/// Parses a cpu list: comma- or colon-separated items, each a number `N` or an
/// inclusive range `A-B` ("0-3,8,10-11", "0-1:4").
///
/// ',' is the kernel's separator (sysfs `cpulist`); ':' is accepted as well so a
/// list can sit inside a comma-separated option such as `--numa ...,cpus=0-1:4`.
/// The kernel's stride form ("0-7:2") is therefore *not* supported; sysfs never
/// prints it. Whitespace around items is ignored, and an empty or blank string
/// is the empty list (a memory-only node's `cpulist` is just "\n"). The result
/// is sorted and free of duplicates.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, CpuListError> {
    let mut cpus = Vec::new();
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Ok(cpus);
    }
    for item in trimmed.split([',', ':']) {
        let item = item.trim();
        if item.is_empty() {
            return Err(CpuListError::EmptyItem {
                list: trimmed.to_string(),
            });
        }
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (parse_cpu(a, trimmed)?, parse_cpu(b, trimmed)?),
            None => {
                let cpu = parse_cpu(item, trimmed)?;
                (cpu, cpu)
            }
        };
        if first > last {
            return Err(CpuListError::Backwards {
                list: trimmed.to_string(),
                range: item.to_string(),
            });
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// One cpu number of a cpu list, bounded by [`MAX_CPUS`].
fn parse_cpu(text: &str, list: &str) -> Result<usize, CpuListError> {
    let text = text.trim();
    let cpu: usize = text.parse().map_err(|_| CpuListError::NotANumber {
        list: list.to_string(),
        text: text.to_string(),
    })?;
    if cpu >= MAX_CPUS {
        return Err(CpuListError::OutOfRange {
            list: list.to_string(),
            cpu,
        });
    }
    Ok(cpu)
}

/// One member of a [`PinnedThreads`] set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedThread {
    /// The thread's name (as `/proc/PID/task/TID/comm` shows it).
    pub name: String,
    /// What it works for (a device's name).
    pub owner: String,
    /// Its kernel thread id.
    pub tid: i32,
    /// The group whose CPUs it follows (a guest node).
    pub group: u32,
}

#[derive(Debug, Default)]
struct PinnedInner {
    /// Each group's CPUs; a group without an entry (or an empty list) pins
    /// nothing: its threads keep the CPUs they inherited.
    cpus: BTreeMap<u32, Vec<usize>>,
    threads: Vec<PinnedThread>,
}

/// Threads that follow the CPUs of their group: a thread [`joins`] with
/// its group and is pinned to the group's CPUs at once; [`set_cpus`] pins
/// every member of a group anew and is what later joiners get. Membership
/// ends when the [`Membership`] the thread holds is dropped.
///
/// A VM's device worker threads are its members, grouped by guest node, so
/// that a NUMA move (which sets the new host node's CPUs here, beside its
/// vCPUs) takes them along. Cheap to clone: clones share one set.
///
/// [`joins`]: PinnedThreads::join
/// [`set_cpus`]: PinnedThreads::set_cpus
#[derive(Debug, Clone, Default)]
pub struct PinnedThreads(Arc<Mutex<PinnedInner>>);

/// A thread's place in a [`PinnedThreads`] set; dropping it leaves the set.
#[derive(Debug)]
pub struct Membership {
    set: PinnedThreads,
    tid: i32,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.set.lock().threads.retain(|t| t.tid != self.tid);
    }
}

impl PinnedThreads {
    /// An empty set, no group's CPUs known.
    pub fn new() -> PinnedThreads {
        PinnedThreads::default()
    }

    fn lock(&self) -> MutexGuard<'_, PinnedInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds thread `tid` (`name`, working for `owner`) to `group` and pins
    /// it to the group's CPUs if they are known. It is a member even if
    /// pinning fails (the error says why), so a later [`set_cpus`] retries.
    ///
    /// [`set_cpus`]: PinnedThreads::set_cpus
    pub fn join(
        &self,
        name: &str,
        owner: &str,
        tid: i32,
        group: u32,
    ) -> (Membership, Result<(), AffinityError>) {
        let mut inner = self.lock();
        let pinned = match inner.cpus.get(&group) {
            Some(cpus) if !cpus.is_empty() => set_thread_affinity(tid, cpus),
            _ => Ok(()),
        };
        inner.threads.push(PinnedThread {
            name: name.to_string(),
            owner: owner.to_string(),
            tid,
            group,
        });
        let member = Membership {
            set: self.clone(),
            tid,
        };
        (member, pinned)
    }

    /// Makes `cpus` the CPUs of `group` and pins every member of it there
    /// (an empty list records that the group has no CPUs of its own and
    /// pins nothing). Every member is tried; the first failure is returned.
    pub fn set_cpus(&self, group: u32, cpus: &[usize]) -> Result<(), AffinityError> {
        let mut inner = self.lock();
        inner.cpus.insert(group, cpus.to_vec());
        if cpus.is_empty() {
            return Ok(());
        }
        let mut first_err = None;
        for t in inner.threads.iter().filter(|t| t.group == group) {
            if let Err(e) = set_thread_affinity(t.tid, cpus) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The CPUs `group` was last given (None: never).
    pub fn cpus(&self, group: u32) -> Option<Vec<usize>> {
        self.lock().cpus.get(&group).cloned()
    }

    /// Every member now, in the order they joined.
    pub fn threads(&self) -> Vec<PinnedThread> {
        self.lock().threads.clone()
    }
}

pub use crate::util::format_cpu_list;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_cpu_list_with_ranges_and_singles() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
    }

    #[test]
    fn parses_colon_separated_user_list() {
        assert_eq!(parse_cpu_list("0-1:4").unwrap(), vec![0, 1, 4]);
        assert_eq!(parse_cpu_list("2,0-1:4").unwrap(), vec![0, 1, 2, 4]);
    }

    #[test]
    fn sysfs_newline_and_blank_list_parse() {
        assert_eq!(parse_cpu_list("0-1\n").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpu_list(" 3 , 1 ").unwrap(), vec![1, 3]);
    }

    #[test]
    fn parsed_list_is_sorted_and_deduplicated() {
        assert_eq!(parse_cpu_list("5,1-3,2,5").unwrap(), vec![1, 2, 3, 5]);
    }

    #[test]
    fn malformed_cpu_lists_are_rejected_with_the_offending_text() {
        let err = parse_cpu_list("0-x").unwrap_err();
        assert!(err.to_string().contains("'x'"), "{err}");
        let err = parse_cpu_list("3-1").unwrap_err();
        assert!(err.to_string().contains("backwards"), "{err}");
        let err = parse_cpu_list("1,,2").unwrap_err();
        assert!(err.to_string().contains("empty item"), "{err}");
        let err = parse_cpu_list("0-4000000000").unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        assert!(parse_cpu_list("-1").is_err());
        assert!(parse_cpu_list("1-").is_err());
    }

    #[test]
    fn formats_runs_as_ranges() {
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[4]), "4");
        assert_eq!(format_cpu_list(&[]), "");
        assert_eq!(format_cpu_list(&[3, 1, 2, 2]), "1-3");
    }

    #[test]
    fn format_then_parse_round_trips() {
        let cpus = vec![0, 2, 3, 4, 7, 9, 10, 63, 64, 65];
        assert_eq!(parse_cpu_list(&format_cpu_list(&cpus)).unwrap(), cpus);
    }

    #[test]
    fn current_tid_of_main_test_thread_is_positive_and_matches_in_thread() {
        let tid = current_tid();
        assert!(tid > 0);
        let other = std::thread::spawn(current_tid).join().unwrap();
        assert!(other > 0);
        assert_ne!(tid, other);
    }

    #[test]
    fn affinity_set_then_get_round_trips_on_current_thread() {
        // Run on a thread of our own so the test harness thread keeps its mask.
        std::thread::spawn(|| {
            let tid = current_tid();
            let original = thread_affinity(tid).unwrap();
            assert!(!original.is_empty());
            let first = vec![original[0]];
            set_thread_affinity(tid, &first).unwrap();
            assert_eq!(thread_affinity(tid).unwrap(), first);
            assert_eq!(thread_affinity(0).unwrap(), first);
            set_thread_affinity(tid, &original).unwrap();
            assert_eq!(thread_affinity(tid).unwrap(), original);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn affinity_to_offline_cpu_names_tid_and_cpus() {
        let tid = current_tid();
        let err = set_thread_affinity(tid, &[MAX_CPUS - 1]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sched_setaffinity"), "{msg}");
        assert!(msg.contains(&tid.to_string()), "{msg}");
        assert!(msg.contains(&(MAX_CPUS - 1).to_string()), "{msg}");
    }

    #[test]
    fn affinity_of_empty_list_or_huge_cpu_is_refused_before_the_syscall() {
        assert!(matches!(
            set_thread_affinity(0, &[]),
            Err(AffinityError::EmptyCpuList { tid: 0 })
        ));
        assert!(matches!(
            set_thread_affinity(0, &[MAX_CPUS]),
            Err(AffinityError::CpuOutOfRange { .. })
        ));
    }

    #[test]
    fn pinned_threads_follow_their_group_s_cpus_and_leave_when_dropped() {
        std::thread::spawn(|| {
            let tid = current_tid();
            let all = thread_affinity(tid).unwrap();
            let first = vec![all[0]];
            let set = PinnedThreads::new();
            // No CPUs known yet: the thread keeps its own.
            let (member, r) = set.join("t", "dev", tid, 0);
            r.unwrap();
            assert_eq!(thread_affinity(tid).unwrap(), all);
            set.set_cpus(0, &first).unwrap();
            assert_eq!(thread_affinity(tid).unwrap(), first);
            // Another group's CPUs leave it alone.
            set.set_cpus(1, &all).unwrap();
            assert_eq!(thread_affinity(tid).unwrap(), first);
            set.set_cpus(0, &all).unwrap();
            assert_eq!(thread_affinity(tid).unwrap(), all);
            assert_eq!(set.threads()[0].owner, "dev");
            drop(member);
            assert!(set.threads().is_empty());
            // Known CPUs pin a thread as it joins.
            set.set_cpus(0, &first).unwrap();
            let (_m, r) = set.join("t", "dev", tid, 0);
            r.unwrap();
            assert_eq!(thread_affinity(tid).unwrap(), first);
            assert_eq!(set.cpus(0), Some(first));
            set_thread_affinity(tid, &all).unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn affinity_of_missing_thread_fails_naming_it() {
        // pid_max is at most 2^22, so this tid cannot exist.
        let err = thread_affinity(i32::MAX).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sched_getaffinity"), "{msg}");
        assert!(msg.contains(&i32::MAX.to_string()), "{msg}");
    }
}
