//! Test rig for virtio devices: guest memory the device sees through
//! [`DeviceMemory`] (dirty-tracked) and the driver side sees through its own
//! vm-memory view (as a vCPU would: untracked), a driver that programs the
//! transport through its registers, and a queue built with virtio-queue's
//! `MockSplitQueue`.

use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::mmio::regs::*;
use super::{status, MmioTransport, VirtioDevice};
use crate::memory::{DeviceMemory, GuestMemory, PAGE_SIZE};
use crate::vmm::bus::MmioDevice;

/// How long a test waits for the worker to use a request before it fails
/// (a bound on a hang, not a timing assertion).
pub const MAX_WAIT: Duration = Duration::from_secs(20);

/// Guest memory from address 0, attached as the devices' view.
pub struct TestMemory {
    /// The memory.
    pub mem: GuestMemory,
    /// The devices' view of it.
    pub dm: DeviceMemory,
}

impl TestMemory {
    /// `bytes` of guest memory in one chunk.
    pub fn new(bytes: u64) -> Self {
        use crate::memory::{Backing, Chunk, GuestRange, Mapping, NodeMemory};
        let mem = GuestMemory {
            nodes: vec![NodeMemory {
                guest_node: 0,
                host_node: None,
                size: bytes,
                backing: Backing::Anonymous,
                chunks: vec![Chunk {
                    range: GuestRange {
                        start: 0,
                        len: bytes,
                    },
                    slot: 0,
                    mapping: Mapping::new(bytes as usize, Backing::Anonymous).unwrap(),
                }],
            }],
        };
        let dm = DeviceMemory::new();
        // SAFETY: `mem` lives in the same struct and `Drop` detaches the
        // view before the mapping goes.
        unsafe { dm.attach(&mem) }.unwrap();
        TestMemory { mem, dm }
    }

    /// Pages devices wrote since the last call, as (first page, pages).
    pub fn device_dirty(&self) -> Vec<(u64, u64)> {
        let pages = self.mem.size() / PAGE_SIZE;
        self.dm.take_dirty(0, pages).unwrap().runs()
    }
}

impl Drop for TestMemory {
    fn drop(&mut self) {
        self.dm.detach();
    }
}

/// The driver's side of one split queue.
pub struct DriverQueue<'m> {
    /// The queue in guest memory.
    pub mock: MockSplitQueue<'m, vm_memory::GuestMemoryMmap>,
    mem: &'m vm_memory::GuestMemoryMmap,
    size: u16,
    next_desc: u16,
    /// Used entries seen so far.
    pub used_seen: u16,
}

impl<'m> DriverQueue<'m> {
    /// A queue of `size` entries at `addr`.
    pub fn new(mem: &'m vm_memory::GuestMemoryMmap, addr: u64, size: u16) -> Self {
        DriverQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(addr), size),
            mem,
            size,
            next_desc: 0,
            used_seen: 0,
        }
    }

    /// Posts a chain of (address, length, device-writable) buffers;
    /// returns its head index.
    pub fn push(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        self.push_raw(bufs, None)
    }

    /// As [`DriverQueue::push`]; `last_next` makes the last descriptor
    /// point (NEXT) at that index instead of ending the chain.
    pub fn push_raw(&mut self, bufs: &[(u64, u32, bool)], last_next: Option<u16>) -> u16 {
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let idx = (head + i as u16) % self.size;
                let last = i + 1 == bufs.len();
                let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
                let next = match (last, last_next) {
                    (false, _) => (idx + 1) % self.size,
                    (true, Some(n)) => n,
                    (true, None) => 0,
                };
                if !last || last_next.is_some() {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
            })
            .collect();
        for (i, d) in descs.iter().enumerate() {
            self.mock
                .desc_table()
                .store((head + i as u16) % self.size, *d)
                .unwrap();
        }
        self.publish(head);
        self.next_desc = (head + bufs.len() as u16) % self.size;
        head
    }

    /// The head index the next [`DriverQueue::push`] will use.
    pub fn next_head(&self) -> u16 {
        self.next_desc
    }

    /// Writes `bufs` as an indirect table at `table` and posts one ring
    /// descriptor pointing at it.
    pub fn push_indirect(&mut self, table: u64, bufs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if write { VRING_DESC_F_WRITE } else { 0 }
                | if last { 0 } else { VRING_DESC_F_NEXT };
            let d =
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, i as u16 + 1));
            self.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc;
        let d = SplitDescriptor::new(
            table,
            16 * bufs.len() as u32,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.mock
            .desc_table()
            .store(head, RawDescriptor::from(d))
            .unwrap();
        self.publish(head);
        self.next_desc = (head + 1) % self.size;
    }

    /// Puts `head` on the avail ring.
    pub fn publish(&mut self, head: u16) {
        let idx = self.mock.avail().idx().load();
        self.mock
            .avail()
            .ring()
            .ref_at((idx % self.size) as usize)
            .unwrap()
            .store(head.to_le());
        self.mock.avail().idx().store(idx.wrapping_add(1));
    }

    /// The used ring's index as the device left it.
    pub fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// Waits until the device used `n` more entries; returns them as
    /// (head, length).
    pub fn wait_used(&mut self, n: u16) -> Vec<(u32, u32)> {
        let until = Instant::now() + MAX_WAIT;
        let want = self.used_seen.wrapping_add(n);
        while self.used_idx() != want {
            assert!(
                Instant::now() < until,
                "the device used {} of {n} requests",
                self.used_idx().wrapping_sub(self.used_seen)
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let out = (0..n)
            .map(|i| {
                let e = self
                    .mock
                    .used()
                    .ring()
                    .ref_at((self.used_seen.wrapping_add(i) % self.size) as usize)
                    .unwrap()
                    .load();
                (e.id(), e.len())
            })
            .collect();
        self.used_seen = want;
        out
    }

    /// A byte of guest memory.
    pub fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

const VRING_DESC_F_NEXT: u32 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
const VRING_DESC_F_WRITE: u32 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

/// A driver programming a transport through its registers.
pub struct Driver<'t, D: VirtioDevice> {
    /// The transport.
    pub t: &'t MmioTransport<D>,
}

impl<'t, D: VirtioDevice> Driver<'t, D> {
    /// Reads a 32-bit register.
    pub fn r(&self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(0, off as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn w(&self, off: u32, v: u32) {
        self.t.write(0, off as u64, &v.to_le_bytes());
    }

    /// The driver's side of device initialisation (virtio 1.x, 3.1.1):
    /// accepts the offered features in `want`, sets queue 0 up on `q`, and
    /// sets DRIVER_OK. Returns the accepted features.
    pub fn activate(&self, q: &DriverQueue<'_>, want: u64) -> u64 {
        self.activate_queues(&[q], want)
    }

    /// As [`Driver::activate`], with queue i set up on `qs[i]`.
    pub fn activate_queues(&self, qs: &[&DriverQueue<'_>], want: u64) -> u64 {
        assert_eq!(self.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.r(VIRTIO_MMIO_VERSION), 2);
        self.w(VIRTIO_MMIO_STATUS, 0);
        self.w(VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        self.w(VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            offered |= (self.r(VIRTIO_MMIO_DEVICE_FEATURES) as u64) << (32 * sel);
        }
        let acked = offered & want;
        for sel in 0..2 {
            self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES, (acked >> (32 * sel)) as u32);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.w(VIRTIO_MMIO_STATUS, s);
        assert_eq!(
            self.r(VIRTIO_MMIO_STATUS) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        for (i, q) in qs.iter().enumerate() {
            self.queue(i as u32, q);
        }
        self.w(VIRTIO_MMIO_STATUS, s | status::DRIVER_OK);
        acked
    }

    /// Sets queue `index` up on `q` and marks it ready.
    pub fn queue(&self, index: u32, q: &DriverQueue<'_>) {
        self.w(VIRTIO_MMIO_QUEUE_SEL, index);
        assert_eq!(self.r(VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(self.r(VIRTIO_MMIO_QUEUE_NUM_MAX) >= q.size as u32);
        self.w(VIRTIO_MMIO_QUEUE_NUM, q.size as u32);
        let set = |lo, hi, a: GuestAddress| {
            self.w(lo, a.0 as u32);
            self.w(hi, (a.0 >> 32) as u32);
        };
        set(
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            q.mock.desc_table_addr(),
        );
        set(
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            q.mock.avail_addr(),
        );
        set(
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            q.mock.used_addr(),
        );
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// QueueNotify, as an exit would deliver it.
    pub fn notify(&self, queue: u32) {
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, queue);
    }
}
