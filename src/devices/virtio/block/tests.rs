//! virtio-blk driven through the transport's registers and a
//! `MockSplitQueue` over guest memory, against real image files.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use virtio_bindings::virtio_blk as blk;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::mmio::regs::*;
use crate::devices::virtio::mmio::{RestoreError, TransportState};
use crate::devices::virtio::testing::{Driver, DriverQueue, TestMemory};
use crate::devices::virtio::{status, MmioTransport, INT_CONFIG, INT_VRING};
use crate::vmm::bus::MmioDevice;

const MEMORY: u64 = 16 << 20;
const QUEUE: u64 = 0x10000;
const HEADERS: u64 = 0x100000;
const STATUS: u64 = 0x200000;
const DATA: u64 = 0x300000;
const DISK: u64 = 1 << 20;
/// Every feature the device may offer.
const ALL: u64 = u64::MAX;

/// An image of `DISK` bytes whose byte i is `i % 251`, in a directory
/// O_DIRECT works in.
fn image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let bytes: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
    f.write_all(&bytes).unwrap();
    f.flush().unwrap();
    f
}

fn config(path: &std::path::Path, cache: CacheMode, readonly: bool) -> BlockConfig {
    BlockConfig {
        path: path.into(),
        readonly,
        id: "disk0".into(),
        serial: Some("VMHOP-SERIAL-1".into()),
        cache,
    }
}

fn file_bytes(path: &std::path::Path, at: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

fn pattern(at: u64, len: usize) -> Vec<u8> {
    (at..at + len as u64).map(|i| (i % 251) as u8).collect()
}

/// Writes request `n`'s header; returns its address.
fn header(view: &vm_memory::GuestMemoryMmap, n: u64, kind: u32, sector: u64) -> u64 {
    let at = HEADERS + n * 0x100;
    view.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
    view.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    view.write_obj(sector.to_le(), GuestAddress(at + 8))
        .unwrap();
    at
}

/// A request `n` of `kind` at `sector` with data buffers `data`, the
/// status byte at STATUS + n.
fn request(
    q: &mut DriverQueue<'_>,
    view: &vm_memory::GuestMemoryMmap,
    n: u64,
    kind: u32,
    sector: u64,
    data: &[(u64, u32, bool)],
) -> u64 {
    let h = header(view, n, kind, sector);
    view.write_obj(0xffu8, GuestAddress(STATUS + n)).unwrap();
    let mut bufs = vec![(h, 16, false)];
    bufs.extend_from_slice(data);
    bufs.push((STATUS + n, 1, true));
    q.push(&bufs);
    STATUS + n
}

fn block(path: &std::path::Path, cache: CacheMode, readonly: bool) -> Block {
    Block::new(config(path, cache, readonly)).unwrap()
}

#[test]
fn every_request_type_is_served_against_the_image() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut q = DriverQueue::new(&view, QUEUE, 256);
    let dev = MmioTransport::new(
        block(img.path(), CacheMode::Writeback, false),
        vm.dm.clone(),
        None,
    )
    .unwrap();
    let d = Driver { t: &dev };
    assert_eq!(d.r(VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
    let acked = d.activate(&q, ALL);
    for f in [
        blk::VIRTIO_BLK_F_FLUSH,
        blk::VIRTIO_BLK_F_DISCARD,
        blk::VIRTIO_BLK_F_WRITE_ZEROES,
        blk::VIRTIO_BLK_F_BLK_SIZE,
        blk::VIRTIO_BLK_F_SEG_MAX,
        blk::VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert!(acked & 1 << f != 0, "feature {f} offered");
    }
    assert_eq!(acked & 1 << blk::VIRTIO_BLK_F_RO, 0);
    // Capacity and block size in the configuration space.
    let mut cap = [0u8; 8];
    dev.read(0, 0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK / 512);
    let mut bs = [0u8; 4];
    dev.read(0, 0x100 + 20, &mut bs);
    assert_eq!(u32::from_le_bytes(bs), 4096);

    // IN: two sectors from sector 3, into two buffers.
    let s0 = request(
        &mut q,
        &view,
        0,
        blk::VIRTIO_BLK_T_IN,
        3,
        &[(DATA, 512, true), (DATA + 0x1000, 512, true)],
    );
    // OUT: 4 KiB at sector 16.
    view.write_slice(&[0x5a; 4096], GuestAddress(DATA + 0x10000))
        .unwrap();
    let s1 = request(
        &mut q,
        &view,
        1,
        blk::VIRTIO_BLK_T_OUT,
        16,
        &[(DATA + 0x10000, 4096, false)],
    );
    let s2 = request(&mut q, &view, 2, blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
    let s3 = request(
        &mut q,
        &view,
        3,
        blk::VIRTIO_BLK_T_GET_ID,
        0,
        &[(DATA + 0x20000, 20, true)],
    );
    d.notify(0);
    let used = q.wait_used(4);
    assert_eq!(used[0].1, 1024 + 1, "IN: data and status written");
    assert_eq!(used[3].1, 20 + 1);
    for s in [s0, s1, s2, s3] {
        assert_eq!(q.byte(s), blk::VIRTIO_BLK_S_OK as u8, "status at {s:#x}");
    }
    let mut got = vec![0u8; 512];
    view.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(3 * 512, 512));
    view.read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, pattern(4 * 512, 512));
    assert_eq!(file_bytes(img.path(), 16 * 512, 4096), vec![0x5a; 4096]);
    let mut id = [0u8; 20];
    view.read_slice(&mut id, GuestAddress(DATA + 0x20000))
        .unwrap();
    assert_eq!(&id, b"VMHOP-SERIAL-1\0\0\0\0\0\0");

    // DISCARD 8 sectors at 64 and WRITE_ZEROES 16 at 128, one segment each;
    // then an unknown request type.
    let seg = |at: u64, sector: u64, n: u32, flags: u32| {
        view.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
        view.write_obj(n.to_le(), GuestAddress(at + 8)).unwrap();
        view.write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
        (at, 16u32, false)
    };
    let s4 = request(
        &mut q,
        &view,
        4,
        blk::VIRTIO_BLK_T_DISCARD,
        0,
        &[seg(DATA + 0x30000, 64, 8, 0)],
    );
    let s5 = request(
        &mut q,
        &view,
        5,
        blk::VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[seg(
            DATA + 0x30100,
            128,
            16,
            blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        )],
    );
    let s6 = request(&mut q, &view, 6, 0x77, 0, &[]);
    // DISCARD with the (reserved for it) unmap flag: unsupported.
    let s7 = request(
        &mut q,
        &view,
        7,
        blk::VIRTIO_BLK_T_DISCARD,
        0,
        &[seg(DATA + 0x30200, 64, 8, 1)],
    );
    d.notify(0);
    q.wait_used(4);
    assert_eq!(q.byte(s4), blk::VIRTIO_BLK_S_OK as u8);
    assert_eq!(q.byte(s5), blk::VIRTIO_BLK_S_OK as u8);
    assert_eq!(q.byte(s6), blk::VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(q.byte(s7), blk::VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(file_bytes(img.path(), 64 * 512, 4096), vec![0; 4096]);
    assert_eq!(file_bytes(img.path(), 128 * 512, 8192), vec![0; 8192]);
    assert_eq!(
        file_bytes(img.path(), 144 * 512, 512),
        pattern(144 * 512, 512),
        "nothing past the zeroed range"
    );
    assert_eq!(
        std::fs::metadata(img.path()).unwrap().len(),
        DISK,
        "the image keeps its size"
    );

    // The written-blocks set: the OUT's block, and two zero extents.
    let w = dev.device().written().take();
    assert_eq!(w.granularity, 4096);
    assert_eq!(w.data.runs(), vec![(2, 1)]);
    assert_eq!(w.zero.runs(), vec![(8, 1), (16, 2)]);
    assert!(dev.device().written().take().is_empty());
}

#[test]
fn o_direct_serves_unaligned_segments_through_the_bounce_buffer() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut q = DriverQueue::new(&view, QUEUE, 256);
    let dev = MmioTransport::new(
        block(img.path(), CacheMode::None, false),
        vm.dm.clone(),
        None,
    )
    .unwrap();
    assert!(dev.device().image().is_direct());
    let d = Driver { t: &dev };
    d.activate(&q, ALL);
    // Aligned: one page-aligned 8 KiB buffer at a 4 KiB-aligned sector.
    let s0 = request(
        &mut q,
        &view,
        0,
        blk::VIRTIO_BLK_T_IN,
        8,
        &[(DATA, 8192, true)],
    );
    // Unaligned buffers (odd addresses, 1.5 KiB + 2.5 KiB) and an
    // unaligned sector (3): read, then written back shifted.
    let s1 = request(
        &mut q,
        &view,
        1,
        blk::VIRTIO_BLK_T_IN,
        3,
        &[(DATA + 0x10003, 1536, true), (DATA + 0x20007, 2560, true)],
    );
    d.notify(0);
    q.wait_used(2);
    assert_eq!(q.byte(s0), 0);
    assert_eq!(q.byte(s1), 0);
    let mut got = vec![0u8; 8192];
    view.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(8 * 512, 8192));
    let mut a = vec![0u8; 1536];
    let mut b = vec![0u8; 2560];
    view.read_slice(&mut a, GuestAddress(DATA + 0x10003))
        .unwrap();
    view.read_slice(&mut b, GuestAddress(DATA + 0x20007))
        .unwrap();
    a.extend(b);
    assert_eq!(a, pattern(3 * 512, 4096));

    view.write_slice(&[0xc3; 1536], GuestAddress(DATA + 0x10003))
        .unwrap();
    view.write_slice(&[0x3c; 2560], GuestAddress(DATA + 0x20007))
        .unwrap();
    let s2 = request(
        &mut q,
        &view,
        2,
        blk::VIRTIO_BLK_T_OUT,
        101,
        &[(DATA + 0x10003, 1536, false), (DATA + 0x20007, 2560, false)],
    );
    d.notify(0);
    q.wait_used(1);
    assert_eq!(q.byte(s2), 0);
    assert_eq!(
        file_bytes(img.path(), 100 * 512, 512),
        pattern(100 * 512, 512),
        "the sector before keeps its bytes (read-modify-write)"
    );
    assert_eq!(file_bytes(img.path(), 101 * 512, 1536), vec![0xc3; 1536]);
    assert_eq!(file_bytes(img.path(), 104 * 512, 2560), vec![0x3c; 2560]);
    assert_eq!(
        file_bytes(img.path(), 109 * 512, 1536),
        pattern(109 * 512, 1536)
    );
    let w = dev.device().written().take();
    assert_eq!(w.data.runs(), vec![(12, 2)], "sectors 101..109");
}

#[test]
fn a_read_request_marks_exactly_the_guest_pages_the_device_wrote() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let dev = MmioTransport::new(block(img.path(), cache, false), vm.dm.clone(), None).unwrap();
        let d = Driver { t: &dev };
        let mut q = DriverQueue::new(&view, QUEUE, 256);
        d.activate(&q, ALL);
        let _ = vm.device_dirty();
        // 8 KiB into two pages, the header and status elsewhere; the
        // driver's own writes (through its view) are not the device's.
        let s = request(
            &mut q,
            &view,
            0,
            blk::VIRTIO_BLK_T_IN,
            0,
            &[(DATA + 0x5000, 8192, true)],
        );
        d.notify(0);
        q.wait_used(1);
        assert_eq!(q.byte(s), 0);
        let used_page = q.mock.used_addr().0 / 4096;
        let mut want = vec![
            (used_page, 1),
            ((DATA + 0x5000) / 4096, 2),
            (STATUS / 4096, 1),
        ];
        want.sort();
        assert_eq!(vm.device_dirty(), want, "cache={cache:?}");
        assert_eq!(vm.device_dirty(), vec![], "a take clears");
        d.w(VIRTIO_MMIO_STATUS, 0);
    }
}

#[test]
fn a_read_only_disk_refuses_writes_with_ioerr_and_serves_on() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut q = DriverQueue::new(&view, QUEUE, 256);
    let dev = MmioTransport::new(
        block(img.path(), CacheMode::Writeback, true),
        vm.dm.clone(),
        None,
    )
    .unwrap();
    let d = Driver { t: &dev };
    let acked = d.activate(&q, ALL);
    assert_ne!(acked & 1 << blk::VIRTIO_BLK_F_RO, 0);
    assert_eq!(acked & 1 << blk::VIRTIO_BLK_F_DISCARD, 0);
    let s0 = request(
        &mut q,
        &view,
        0,
        blk::VIRTIO_BLK_T_OUT,
        0,
        &[(DATA, 512, false)],
    );
    let s1 = request(
        &mut q,
        &view,
        1,
        blk::VIRTIO_BLK_T_DISCARD,
        0,
        &[(DATA, 16, false)],
    );
    let s2 = request(
        &mut q,
        &view,
        2,
        blk::VIRTIO_BLK_T_IN,
        1,
        &[(DATA, 512, true)],
    );
    d.notify(0);
    q.wait_used(3);
    assert_eq!(q.byte(s0), blk::VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(q.byte(s1), blk::VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(q.byte(s2), blk::VIRTIO_BLK_S_OK as u8);
    assert_eq!(file_bytes(img.path(), 0, 512), pattern(0, 512));
    assert!(dev.device().written().take().is_empty());
    assert_eq!(d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET, 0);
}

#[test]
fn malformed_chains_get_an_error_status_or_needs_reset_and_never_touch_memory_outside() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut q = DriverQueue::new(&view, QUEUE, 256);
    let dev = MmioTransport::new(
        block(img.path(), CacheMode::Writeback, false),
        vm.dm.clone(),
        None,
    )
    .unwrap();
    let d = Driver { t: &dev };
    d.activate(&q, ALL);
    let ok = blk::VIRTIO_BLK_S_OK as u8;
    let ioerr = blk::VIRTIO_BLK_S_IOERR as u8;
    // Wrong direction: the header device-writable (no readable header).
    view.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let h = header(&view, 0, blk::VIRTIO_BLK_T_IN, 0);
    q.push(&[(h, 16, true), (STATUS, 1, true)]);
    // A data buffer far outside guest memory.
    let s1 = request(
        &mut q,
        &view,
        1,
        blk::VIRTIO_BLK_T_IN,
        0,
        &[(0x7f00_0000_0000, 512, true)],
    );
    // A data buffer running off the end of guest memory.
    let s2 = request(
        &mut q,
        &view,
        2,
        blk::VIRTIO_BLK_T_OUT,
        0,
        &[(MEMORY - 256, 512, false)],
    );
    // Past the disk's end, and not whole sectors.
    let s3 = request(
        &mut q,
        &view,
        3,
        blk::VIRTIO_BLK_T_IN,
        DISK / 512,
        &[(DATA, 512, true)],
    );
    let s4 = request(
        &mut q,
        &view,
        4,
        blk::VIRTIO_BLK_T_IN,
        0,
        &[(DATA, 100, true)],
    );
    // A loop: the status descriptor points back at the header.
    view.write_obj(0xffu8, GuestAddress(STATUS + 5)).unwrap();
    let h5 = header(&view, 5, blk::VIRTIO_BLK_T_IN, 0);
    let head = q.next_head();
    q.push_raw(
        &[(h5, 16, false), (DATA, 512, true), (STATUS + 5, 1, true)],
        Some(head),
    );
    d.notify(0);
    q.wait_used(6);
    assert_eq!(q.byte(STATUS), ioerr, "header device-writable");
    for s in [s1, s2, s3, s4, STATUS + 5] {
        assert_eq!(q.byte(s), ioerr, "status at {s:#x}");
    }
    assert_eq!(file_bytes(img.path(), 0, 512), pattern(0, 512));

    // SEG_MAX: 254 data segments are served, 255 refused (indirect tables).
    let segs = |n: u64, write: bool| -> Vec<(u64, u32, bool)> {
        (0..n).map(|i| (DATA + i * 512, 512, write)).collect()
    };
    for (n, table, want) in [(254u64, 0xa00000, ok), (255, 0xa10000, ioerr)] {
        let h = header(&view, 6, blk::VIRTIO_BLK_T_IN, 0);
        view.write_obj(0xffu8, GuestAddress(STATUS + 6)).unwrap();
        let mut bufs = vec![(h, 16, false)];
        bufs.extend(segs(n, true));
        bufs.push((STATUS + 6, 1, true));
        q.push_indirect(table, &bufs);
        d.notify(0);
        q.wait_used(1);
        assert_eq!(q.byte(STATUS + 6), want, "{n} segments");
    }
    assert_eq!(d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET, 0);

    // No status byte at all: nothing to report through, the device needs
    // a reset (and says so with a configuration interrupt).
    let h = header(&view, 7, blk::VIRTIO_BLK_T_FLUSH, 0);
    q.push(&[(h, 16, false)]);
    d.notify(0);
    let until = std::time::Instant::now() + crate::devices::virtio::testing::MAX_WAIT;
    while d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET == 0 {
        assert!(std::time::Instant::now() < until, "NEEDS_RESET never set");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_ne!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG, 0);
    // A reset brings it back.
    let mut q = DriverQueue::new(&view, QUEUE + 0x10000, 256);
    d.activate(&q, ALL);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET, 0);
    let s = request(&mut q, &view, 8, blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
    d.notify(0);
    q.wait_used(1);
    assert_eq!(q.byte(s), ok);

    // A head index past the queue: the queue is broken.
    q.publish(999);
    d.notify(0);
    let until = std::time::Instant::now() + crate::devices::virtio::testing::MAX_WAIT;
    while d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET == 0 {
        assert!(std::time::Instant::now() < until, "NEEDS_RESET never set");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn queues_the_guest_never_set_up_are_left_alone() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let dev = MmioTransport::new(
        block(img.path(), CacheMode::Writeback, false),
        vm.dm.clone(),
        None,
    )
    .unwrap();
    let d = Driver { t: &dev };
    // Notifications before any set-up, and for queues that do not exist.
    d.notify(0);
    d.notify(7);
    // Queue registers out of range read as zero.
    d.w(VIRTIO_MMIO_QUEUE_SEL, 3);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    // DRIVER_OK with queue 0 never made ready: nothing to serve.
    d.w(VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    d.w(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    d.w(VIRTIO_MMIO_STATUS, s);
    d.w(VIRTIO_MMIO_STATUS, s | status::DRIVER_OK);
    d.notify(0);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), s | status::DRIVER_OK);
    dev.quiesce().unwrap();
    let state = dev.save().unwrap();
    assert!(!state.queues[0].ready);
    assert_eq!(state.queues[0].next_avail, 0);
    dev.resume().unwrap();
    // A queue whose rings lie outside guest memory: the device needs a
    // reset instead of serving it.
    d.w(VIRTIO_MMIO_STATUS, 0);
    d.w(VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    d.w(VIRTIO_MMIO_DRIVER_FEATURES, 1);
    d.w(VIRTIO_MMIO_STATUS, s);
    let q = DriverQueue::new(&view, QUEUE, 256);
    d.queue(0, &q);
    d.w(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x7f00);
    d.w(VIRTIO_MMIO_STATUS, s | status::DRIVER_OK);
    assert_ne!(d.r(VIRTIO_MMIO_STATUS) & status::NEEDS_RESET, 0);
    // Without VERSION_1 FEATURES_OK is refused.
    d.w(VIRTIO_MMIO_STATUS, 0);
    d.w(VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w(VIRTIO_MMIO_STATUS, s);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS) & status::FEATURES_OK, 0);
}

#[test]
fn state_saved_mid_stream_restores_positions_and_interrupt_status_and_kicks_the_queue() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    for event_idx in [true, false] {
        let want = if event_idx {
            ALL
        } else {
            !crate::devices::virtio::features::RING_EVENT_IDX
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut q = DriverQueue::new(&view, QUEUE, 256);
        let dev = MmioTransport::new(
            block(img.path(), CacheMode::Writeback, false),
            vm.dm.clone(),
            Some(irq.try_clone().unwrap()),
        )
        .unwrap();
        let d = Driver { t: &dev };
        d.activate(&q, want);
        dev.write(0, 0x100 + 32, &[0]); // the driver turns the write cache off
        let mut cfg = [0u8; 1];
        dev.read(0, 0x100 + 32, &mut cfg);
        assert_eq!(cfg[0], 0);
        for n in 0..2 {
            request(&mut q, &view, n, blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
        }
        d.notify(0);
        q.wait_used(2);
        assert!(irq.read().is_ok(), "the irqfd pulsed");
        // The guest has not acknowledged the interrupt yet. Quiesce, then
        // a request arrives: it is not served, and stays in the ring.
        dev.quiesce().unwrap();
        let s2 = request(&mut q, &view, 2, blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
        d.notify(0);
        let state = dev.save().unwrap();
        assert_eq!(state.interrupt_status, INT_VRING);
        assert_eq!(
            (state.queues[0].next_avail, state.queues[0].next_used),
            (2, 2)
        );
        assert_eq!(state.queues[0].event_idx, event_idx);
        assert!(!state.device.writeback);
        assert_eq!(q.byte(s2), 0xff, "not served while quiesced");
        // Through JSON, as a checkpoint carries it.
        let json = serde_json::to_string(&state).unwrap();
        drop(dev); // releases the image's lock
                   // A stale avail_event in guest memory (Firecracker #5969): the
                   // guest would not notify for request 2; the resume's kick must not
                   // depend on it, and must write it afresh.
        let avail_event = GuestAddress(q.mock.used_addr().0 + 4 + 8 * 256);
        view.write_obj(0u16, avail_event).unwrap();
        let state: TransportState<BlockState> = serde_json::from_str(&json).unwrap();
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = Block::restore(
            config(img.path(), CacheMode::Writeback, false),
            &state.device,
        )
        .unwrap();
        let dev = MmioTransport::restore(b, vm.dm.clone(), Some(irq2.try_clone().unwrap()), &state)
            .unwrap();
        let d = Driver { t: &dev };
        assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
        assert_eq!(
            d.r(VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
        );
        dev.read(0, 0x100 + 32, &mut cfg);
        assert_eq!(cfg[0], 0, "the write-cache choice survives");
        assert_eq!(dev.save().unwrap(), state, "parked until resumed");
        assert_eq!(q.byte(s2), 0xff);
        dev.resume().unwrap();
        q.wait_used(1);
        assert_eq!(q.byte(s2), 0);
        if event_idx {
            assert_eq!(
                view.read_obj::<u16>(avail_event).unwrap(),
                3,
                "avail_event names the next request the device will take"
            );
        }
        let until = std::time::Instant::now() + crate::devices::virtio::testing::MAX_WAIT;
        while irq2.read().is_err() {
            assert!(
                std::time::Instant::now() < until,
                "no interrupt after the resume"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        d.w(VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
        assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // More requests after the restore: served from where it left off.
        let s3 = request(&mut q, &view, 3, blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
        d.notify(0);
        q.wait_used(1);
        assert_eq!(q.byte(s3), 0);
        dev.quiesce().unwrap();
        assert_eq!(dev.save().unwrap().queues[0].next_used, 4);
    }
}

#[test]
fn a_device_never_activated_saves_and_restores() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let dev = MmioTransport::new(
        block(img.path(), CacheMode::Writeback, false),
        vm.dm.clone(),
        None,
    )
    .unwrap();
    let state = dev.save().expect("a fresh device needs no quiesce");
    assert_eq!(state.status, 0);
    drop(dev);
    let b = Block::restore(
        config(img.path(), CacheMode::Writeback, false),
        &state.device,
    )
    .unwrap();
    let dev = MmioTransport::restore(b, vm.dm.clone(), None, &state).unwrap();
    dev.resume().unwrap();
    assert_eq!(dev.save().unwrap(), state);
}

#[test]
fn a_restore_whose_disk_or_device_differs_is_refused() {
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let dev = MmioTransport::new(
        block(img.path(), CacheMode::Writeback, false),
        vm.dm.clone(),
        None,
    )
    .unwrap();
    let state = dev.save().unwrap();
    drop(dev);
    // Another serial.
    let mut c = config(img.path(), CacheMode::Writeback, false);
    c.serial = Some("OTHER".into());
    let e = Block::restore(c, &state.device).unwrap_err();
    assert!(e.to_string().contains("serial is VMHOP-SERIAL-1"), "{e}");
    // Another capacity.
    let small = tempfile::NamedTempFile::new().unwrap();
    small.as_file().set_len(DISK / 2).unwrap();
    let e = Block::restore(
        config(small.path(), CacheMode::Writeback, false),
        &state.device,
    )
    .unwrap_err();
    assert!(e.to_string().contains("capacity is 2048 sectors"), "{e}");
    assert!(
        e.to_string().contains(&small.path().display().to_string()),
        "{e}"
    );
    // Read-only now: other features too.
    let b = Block::new(config(img.path(), CacheMode::Writeback, true)).unwrap();
    let e = MmioTransport::restore(b, vm.dm.clone(), None, &state).unwrap_err();
    assert!(
        matches!(
            e,
            RestoreError::Mismatch {
                what: "feature set",
                ..
            }
        ),
        "{e}"
    );
    // A later state version.
    let mut later = state.clone();
    later.version += 1;
    let b = block(img.path(), CacheMode::Writeback, false);
    assert!(matches!(
        MmioTransport::restore(b, vm.dm.clone(), None, &later),
        Err(RestoreError::Version { .. })
    ));
}

#[test]
fn a_second_writer_is_refused_with_a_message_naming_the_file() {
    let img = image();
    let first = block(img.path(), CacheMode::Writeback, false);
    assert_eq!(first.image().lock_mode(), LockMode::Exclusive);
    let e = Block::new(config(img.path(), CacheMode::None, false)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&img.path().display().to_string()), "{msg}");
    assert!(msg.contains("locked"), "{msg}");
    // Nor may a reader open it beside the writer.
    assert!(Block::new(config(img.path(), CacheMode::Writeback, true)).is_err());
    // A migration destination opens it unlocked, and locks once the
    // source let go.
    let dest = Block::new_unlocked(config(img.path(), CacheMode::Writeback, false)).unwrap();
    assert!(dest.image().lock().is_err());
    first.image().unlock().unwrap();
    dest.image().lock().unwrap();
    drop(first);
    drop(dest);
    // Readers share.
    let r1 = block(img.path(), CacheMode::Writeback, true);
    let r2 = block(img.path(), CacheMode::Writeback, true);
    assert_eq!(r2.image().lock_mode(), LockMode::Shared);
    assert!(Block::new(config(img.path(), CacheMode::Writeback, false)).is_err());
    drop((r1, r2));
    block(img.path(), CacheMode::Writeback, false);
}

#[test]
fn bad_disk_configurations_are_refused_with_the_reason() {
    let c = BlockConfig::parse("path=/x.img,readonly,id=d1,serial=S1,cache=none", "disk0").unwrap();
    assert_eq!(
        c,
        BlockConfig {
            path: "/x.img".into(),
            readonly: true,
            id: "d1".into(),
            serial: Some("S1".into()),
            cache: CacheMode::None
        }
    );
    assert_eq!(BlockConfig::parse("path=/y", "disk3").unwrap().id, "disk3");
    for (bad, says) in [
        ("readonly", "no path"),
        ("path=/x,cache=fast", "cache=fast"),
        ("path=/x,serial=012345678901234567890", "at most 20"),
        ("path=/x,size=1G", "unknown option 'size=1G'"),
    ] {
        let e = BlockConfig::parse(bad, "disk0").unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
    let missing = Block::new(config(
        "/nonexistent/vmhop.img".as_ref(),
        CacheMode::Writeback,
        false,
    ))
    .unwrap_err()
    .to_string();
    assert!(missing.contains("/nonexistent/vmhop.img"), "{missing}");
    let odd = tempfile::NamedTempFile::new().unwrap();
    odd.as_file().set_len(1000).unwrap();
    let e = Block::new(config(odd.path(), CacheMode::Writeback, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a positive multiple"), "{e}");
}

#[test]
fn a_vcpu_thread_never_serves_a_request() {
    // The notify write returns at once; the request is served on the
    // device's own thread.
    let img = image();
    let vm = TestMemory::new(MEMORY);
    let view = vm.mem.vm_memory_view().unwrap();
    let mut q = DriverQueue::new(&view, QUEUE, 256);
    let dev = Arc::new(
        MmioTransport::new(
            block(img.path(), CacheMode::Writeback, false),
            vm.dm.clone(),
            None,
        )
        .unwrap(),
    );
    let d = Driver { t: &dev };
    d.activate(&q, ALL);
    dev.quiesce().unwrap();
    let s = request(&mut q, &view, 0, blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
    d.notify(0);
    assert_eq!(q.byte(s), 0xff, "the notify itself served nothing");
    dev.resume().unwrap();
    q.wait_used(1);
    assert_eq!(q.byte(s), 0);
}

/// The whole path on this host's KVM: a CPL3 guest reads the device's
/// magic through an MMIO exit routed by the VM's MMIO bus, and notifies
/// the queue with a 4-byte write that KVM turns into an ioeventfd signal
/// (or, built without the ioeventfds, that exits and the transport
/// forwards); either way the worker serves the request in the VM's memory,
/// attached by `Vm::new`.
#[test]
fn a_cpl3_guest_notifies_the_disk_through_kvm_and_the_worker_serves_it() {
    use crate::guest::{abi, setup, GuestSpec};
    use crate::vmm::{NodeConfig, Setup, Start, Vm, VmConfig};
    use iced_x86::code_asm::*;

    const BASE: u64 = 0xd000_0000;
    const GQUEUE: u64 = 0x30_0000;
    const GSTATUS: u64 = 0x50_0000;
    const GDATA: u64 = 0x60_0000;
    const MAGIC_AT: u64 = setup::CONTROL_ADDR + 0x100;
    let img = image();
    for with_ioevents in [true, false] {
        let config = VmConfig {
            name: "virtio-blk-test".into(),
            vcpus: 1,
            nodes: vec![NodeConfig {
                guest_node: 0,
                size: 64 << 20,
                host_node: None,
                vcpus: None,
            }],
            guest: GuestSpec::Idle,
            hugepages: false,
            chunk_size: 32 << 20,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        };
        let mut devs = crate::devices::build(
            &config,
            &crate::devices::Console::Stderr,
            &Default::default(),
            Default::default(),
        )
        .unwrap();
        let set = &mut devs.set;
        let irq = crate::devices::virtio::mmio::irq_line(set, "disk0", None).unwrap();
        let dev = Arc::new(
            MmioTransport::new(
                block(img.path(), CacheMode::Writeback, false),
                set.memory.clone(),
                irq,
            )
            .unwrap(),
        );
        crate::devices::virtio::mmio::plug(set, BASE, dev.clone()).unwrap();
        if !with_ioevents {
            set.ioevents.clear();
        }
        let setup: Setup<'static> = Box::new(|mem, fds| {
            setup::boot(&GuestSpec::Idle, mem, fds, &Default::default())?;
            crate::arch::x86_64::regs::write_identity_map(mem, setup::PML4_ADDR, 4, true)?;
            let mut a = CodeAssembler::new(64).map_err(|e| e.to_string())?;
            let mut park = a.create_label();
            (|| -> Result<(), IcedError> {
                a.mov(rbx, BASE)?;
                a.mov(eax, dword_ptr(rbx + VIRTIO_MMIO_MAGIC_VALUE))?;
                a.mov(rcx, MAGIC_AT)?;
                a.mov(dword_ptr(rcx), eax)?;
                a.mov(dword_ptr(rbx + VIRTIO_MMIO_QUEUE_NOTIFY), 0)?;
                a.set_label(&mut park)?;
                a.mov(dx, abi::PORT_WAIT as u32)?;
                a.out(dx, eax)?;
                a.jmp(park)
            })()
            .map_err(|e| e.to_string())?;
            let code = a.assemble(setup::CODE_ADDR).map_err(|e| e.to_string())?;
            mem.write_bytes(setup::CODE_ADDR, &code)
                .ok_or("code does not fit")?;
            Ok(())
        });
        let set = std::mem::take(&mut devs.set);
        let vm = Vm::new(config, Start::Boot(setup), true, set).expect("this test needs /dev/kvm");
        let s;
        {
            let mem = vm.memory();
            let view = mem.vm_memory_view().unwrap();
            let mut q = DriverQueue::new(&view, GQUEUE, 256);
            Driver { t: &dev }.activate(&q, ALL);
            let h = GSTATUS - 0x1000;
            view.write_obj(blk::VIRTIO_BLK_T_IN.to_le(), GuestAddress(h))
                .unwrap();
            view.write_obj(5u64.to_le(), GuestAddress(h + 8)).unwrap();
            view.write_obj(0xffu8, GuestAddress(GSTATUS)).unwrap();
            q.push(&[(h, 16, false), (GDATA, 512, true), (GSTATUS, 1, true)]);
            s = q.used_idx();
        }
        assert_eq!(s, 0);
        vm.resume_user().unwrap();
        let until = std::time::Instant::now() + crate::devices::virtio::testing::MAX_WAIT;
        loop {
            let done = {
                let mem = vm.memory();
                let view = mem.vm_memory_view().unwrap();
                view.read_obj::<u8>(GuestAddress(GSTATUS)).unwrap() != 0xff
            };
            if done {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "the guest's notify never reached the worker (ioevents: {with_ioevents})"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mem = vm.memory();
        assert_eq!(mem.read_u64(MAGIC_AT).map(|v| v as u32), Some(0x7472_6976));
        let view = mem.vm_memory_view().unwrap();
        assert_eq!(view.read_obj::<u8>(GuestAddress(GSTATUS)).unwrap(), 0);
        let mut got = vec![0u8; 512];
        view.read_slice(&mut got, GuestAddress(GDATA)).unwrap();
        assert_eq!(got, pattern(5 * 512, 512));
        drop(view);
        drop(mem);
        vm.shutdown();
    }
}
