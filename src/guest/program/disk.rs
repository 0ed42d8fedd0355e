//! `builtin:disk`'s vCPU 0: a virtio-blk driver at CPL3 that writes tagged
//! 4 KiB blocks to the first disk and reads some back, polling the used
//! ring (builtin guests have no interrupt controller).
//!
//! What it keeps in guest memory, so that the host's `verify` can check the
//! disk against it: its control data (the request in flight, counters, the
//! first mismatch it saw), and a table `block → tag last written`. The
//! layout is documented in docs/test-device.md; this module owns the
//! offsets, the block format and the program; `setup` places the pieces and
//! `verify` reads them.
//!
//! One request is outstanding at a time: descriptors 0 (header), 1 (data),
//! 2 (status byte), so a pause finds at most one write in flight.

use iced_x86::code_asm::*;

use super::block;
use crate::guest::abi::{PORT_PACE, PORT_WAIT};
pub use crate::vmm::config::DiskMode;

/// Offsets in the disk guest's control data (host-written fields are set
/// before the vCPU first runs; the guest writes the rest).
pub mod ctl {
    /// 0 starting, 1 running ([`super::RUNNING`]), 2 failed ([`super::FAILED`]).
    pub const STATE: u64 = 0;
    /// Why it failed (a [`super::Failure`] code).
    pub const FAIL: u64 = 8;
    /// Host: guest-physical address of disk 0's virtio-mmio window.
    pub const MMIO: u64 = 16;
    /// Host: the disk area (queue, header and status, buffers).
    pub const AREA: u64 = 24;
    /// Host: the table, one `u64` tag per block (0: never written).
    pub const TABLE: u64 = 32;
    /// Host: entries the table has room for.
    pub const TABLE_CAP: u64 = 40;
    /// Guest: blocks it uses, from block 0 (the disk's, up to TABLE_CAP).
    pub const BLOCKS: u64 = 48;
    /// Host: this boot's nonce, in every block the guest writes, so that a
    /// block of an earlier run is not taken for one of this run.
    pub const RUN: u64 = 56;
    /// Host: every READ_EVERY-th request reads a block back.
    pub const READ_EVERY: u64 = 64;
    /// Host seeds, guest advances: the block chooser's LCG state.
    pub const RNG: u64 = 72;
    /// The last tag issued (tags count writes from 1).
    pub const TAG: u64 = 80;
    /// The block of the write in flight.
    pub const INFLIGHT_BLOCK: u64 = 88;
    /// The tag of the write in flight (0: none). Set before the request
    /// is submitted, cleared after its completion is recorded.
    pub const INFLIGHT_TAG: u64 = 96;
    /// Requests issued.
    pub const ISSUED: u64 = 104;
    /// Requests completed (whatever their status).
    pub const REQUESTS: u64 = 112;
    /// Writes completed OK.
    pub const WRITES: u64 = 120;
    /// Reads completed OK.
    pub const READS: u64 = 128;
    /// Requests completed with a status other than OK.
    pub const IOERRS: u64 = 136;
    /// The last such request's block.
    pub const IOERR_BLOCK: u64 = 144;
    /// Its status byte.
    pub const IOERR_STATUS: u64 = 152;
    /// Whether it was a write (1) or a read (0).
    pub const IOERR_WRITE: u64 = 160;
    /// Blocks that read back otherwise than the table says.
    pub const ERRORS: u64 = 168;
    /// The first such block.
    pub const ERR_BLOCK: u64 = 176;
    /// The tag the table held for it.
    pub const ERR_WANT: u64 = 184;
    /// The tag the block held.
    pub const ERR_FOUND: u64 = 192;
    /// The disk's capacity in 512-byte sectors, as the guest read it.
    pub const CAPACITY: u64 = 200;
    /// Host: the benchmark modes' region ([`super::bench`]): their queue,
    /// headers, status bytes and data buffers.
    pub const BUF: u64 = 208;
    /// Blocks the write in flight covers from INFLIGHT_BLOCK (0 reads as
    /// 1: the mixed mode writes one block at a time and leaves it 0).
    pub const INFLIGHT_COUNT: u64 = 216;
    /// FLUSH requests completed OK (`seq-write`: one per pass).
    pub const FLUSHES: u64 = 224;
    /// Per read slot (16 bytes each): the block it holds and that block's
    /// tag, once the guest found it as the table says (tag 0: being read,
    /// a block never written, or one that did not match).
    pub const SLOTS: u64 = 0x100;
    /// Bytes of the control data.
    pub const SIZE: u64 = SLOTS + 16 * super::READ_SLOTS;
}

/// Offsets in the disk area (each page-aligned part its own page).
pub mod area {
    /// Descriptor table.
    pub const DESC: u64 = 0x0;
    /// Available ring.
    pub const AVAIL: u64 = 0x100;
    /// Used ring.
    pub const USED: u64 = 0x200;
    /// The request header (16 bytes).
    pub const HEADER: u64 = 0x1000;
    /// The status byte the device writes.
    pub const STATUS: u64 = 0x1010;
    /// The block written.
    pub const WRITE_BUF: u64 = 0x2000;
    /// The read slots, one page each: read-back `i` lands in slot
    /// `i % READ_SLOTS`, and stays there (only the device writes it) until
    /// the slot's next read.
    pub const READ_BUF: u64 = 0x3000;
    /// Bytes before the table, which follows the area.
    pub const SIZE: u64 = READ_BUF + super::READ_SLOTS * super::BLOCK_BYTES;
}

/// Offsets in the benchmark modes' region (at [`ctl::BUF`], after the
/// table): a larger queue than the mixed mode's, so that 32 requests of 3
/// descriptors each fit, one header and status byte per request, and the
/// data buffers.
pub mod bench {
    /// Descriptor table ([`super::BENCH_QUEUE_SIZE`] × 16 bytes).
    pub const DESC: u64 = 0x0;
    /// Available ring.
    pub const AVAIL: u64 = 0x800;
    /// Used ring.
    pub const USED: u64 = 0x1000;
    /// Request headers, 16 bytes each.
    pub const HEADERS: u64 = 0x2000;
    /// Status bytes, one per request.
    pub const STATUS: u64 = 0x2200;
    /// Data: request i's 4 KiB block at `DATA + i * 4096` (random reads),
    /// or the one 1 MiB buffer (sequential modes).
    pub const DATA: u64 = 0x10000;
    /// Bytes of the region.
    pub const SIZE: u64 = DATA + super::SEQ_BLOCKS * super::BLOCK_BYTES;
}

/// Queue size of the benchmark modes.
pub const BENCH_QUEUE_SIZE: u16 = 128;
/// Requests in flight in `rand-read-qd32`.
pub const QUEUE_DEPTH: u32 = 32;
/// Blocks of one sequential request (1 MiB).
pub const SEQ_BLOCKS: u64 = 256;

/// [`ctl::STATE`]: the driver set the device up and runs its loop.
pub const RUNNING: u64 = 1;
/// [`ctl::STATE`]: the driver gave up and parked.
pub const FAILED: u64 = 2;

/// Why the driver gave up ([`ctl::FAIL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Failure {
    /// No virtio-mmio (version 2) block device at the window.
    NoDevice = 1,
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1 = 2,
    /// The device refused FEATURES_OK.
    FeaturesRefused = 3,
    /// Queue 0 is smaller than [`QUEUE_SIZE`].
    QueueTooSmall = 4,
    /// The device needs a reset (or refused DRIVER_OK).
    NeedsReset = 5,
    /// The disk holds not one 4 KiB block.
    TooSmall = 6,
}

impl Failure {
    /// The failure a [`ctl::FAIL`] code stands for.
    pub fn from_code(code: u64) -> Option<Failure> {
        [
            Failure::NoDevice,
            Failure::NoVersion1,
            Failure::FeaturesRefused,
            Failure::QueueTooSmall,
            Failure::NeedsReset,
            Failure::TooSmall,
        ]
        .into_iter()
        .find(|f| *f as u64 == code)
    }

    /// What it means, for `verify`.
    pub fn describe(self) -> &'static str {
        match self {
            Failure::NoDevice => "found no virtio-mmio block device at its window",
            Failure::NoVersion1 => "the device does not offer VIRTIO_F_VERSION_1",
            Failure::FeaturesRefused => "the device refused FEATURES_OK",
            Failure::QueueTooSmall => "the device's queue 0 is too small",
            Failure::NeedsReset => "the device set DEVICE_NEEDS_RESET",
            Failure::TooSmall => "the disk is smaller than one 4 KiB block",
        }
    }
}

/// Size of the one queue the driver sets up.
pub const QUEUE_SIZE: u16 = 8;
/// Bytes of a block.
pub const BLOCK_BYTES: u64 = 4096;
/// Every this many requests, one is a read-back.
pub const READ_EVERY: u64 = 4;
/// Pages the read-backs land in, in turn. What the device read stays in
/// memory that only the device writes, so `verify` can tell a device write
/// a move or checkpoint lost (the guest compares a block right after it
/// lands, before most moves could lose it).
pub const READ_SLOTS: u64 = 16;
/// First word of every block the guest writes ("VMHOPBLK").
pub const BLOCK_MAGIC: u64 = u64::from_le_bytes(*b"VMHOPBLK");
/// Words of a block's header: magic, block number, tag, vCPU, run nonce.
pub const HEADER_WORDS: usize = 5;
/// Offset of each header word.
pub mod word {
    /// [`super::BLOCK_MAGIC`].
    pub const MAGIC: usize = 0;
    /// The block's own number.
    pub const BLOCK: usize = 1;
    /// The tag of the write.
    pub const TAG: usize = 2;
    /// The vCPU that wrote it (0).
    pub const VCPU: usize = 3;
    /// The run nonce.
    pub const RUN: usize = 4;
}
/// Mixed into the fill pattern's seed.
const PATTERN_KEY: u64 = 0x5645_524b_424c_4b21;
/// Step between two words of the fill pattern.
const PATTERN_STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// The first fill word of block `block` written with `tag`; each next word
/// adds [`pattern_step`]. A block torn between two writes, or another
/// block's data, breaks the sequence.
pub fn pattern_seed(block: u64, tag: u64) -> u64 {
    (block << 32) ^ tag ^ PATTERN_KEY
}

/// See [`pattern_seed`].
pub const fn pattern_step() -> u64 {
    PATTERN_STEP
}

/// The whole block `block` holds after the write with `tag` (`run` the
/// boot's nonce): what `verify` compares the disk with.
pub fn block_image(block: u64, tag: u64, run: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES as usize];
    let header = [BLOCK_MAGIC, block, tag, 0, run];
    let mut v = pattern_seed(block, tag);
    for (i, w) in b.chunks_exact_mut(8).enumerate() {
        let x = match header.get(i) {
            Some(h) => *h,
            None => {
                let x = v;
                v = v.wrapping_add(PATTERN_STEP);
                x
            }
        };
        w.copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// virtio-mmio registers the driver uses.
mod reg {
    pub use virtio_bindings::virtio_mmio::*;
}
/// "virt".
const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio device id of a block device.
const BLOCK_DEVICE: u32 = 2;
/// Device status bits.
const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
/// Descriptor flags.
const F_NEXT: u32 = 1;
const F_WRITE: u32 = 2;
/// virtio-blk request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
/// Polls of the used ring between two looks at the Status register
/// (an MMIO exit), so a device that gave up does not leave the guest
/// spinning forever unseen.
const POLLS_PER_STATUS_CHECK: u32 = 1 << 20;
/// Offset of the capacity in the configuration space.
const CONFIG_CAPACITY: u32 = 0x100;

/// The disk driver at `base`, its control data at `ctl_addr` (filled by
/// the host as [`ctl`] says).
///
/// Registers: rdi = its vCPU block; rbp = control data; rbx = the MMIO
/// window; r13 = the area; r14 = the table; r15 = blocks used; r8 = 1 for
/// a write, 0 for a read; r9 = the block; r10 = its tag; rsi = its buffer
/// (kept from before the request to after it); r12 = requests since the
/// last PACE.
pub fn program(base: u64, ctl_addr: u64) -> Result<Vec<u8>, IcedError> {
    program_for(base, ctl_addr, DiskMode::Mixed)
}

/// The driver for `mode`: [`program`]'s set-up, then the mode's loop. The
/// benchmark modes keep their queue and buffers in the region at
/// [`ctl::BUF`] (r13 points there instead of at the area).
pub fn program_for(base: u64, ctl_addr: u64, mode: DiskMode) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut fail = a.create_label();
    let mut fail_codes: Vec<(CodeLabel, Failure)> = Vec::new();
    let mut label_for = |a: &mut CodeAssembler, f: Failure| {
        let l = a.create_label();
        fail_codes.push((l, f));
        l
    };
    let no_device = label_for(&mut a, Failure::NoDevice);
    let no_v1 = label_for(&mut a, Failure::NoVersion1);
    let refused = label_for(&mut a, Failure::FeaturesRefused);
    let small_queue = label_for(&mut a, Failure::QueueTooSmall);
    let needs_reset = label_for(&mut a, Failure::NeedsReset);
    let too_small = label_for(&mut a, Failure::TooSmall);

    let mmio = |r: u32| dword_ptr(rbx + r as i32);
    a.mov(rbp, ctl_addr)?;
    a.mov(rbx, qword_ptr(rbp + ctl::MMIO as i32))?;
    let (queue_size, queue_parts, region) = match mode {
        DiskMode::Mixed => (QUEUE_SIZE, [area::DESC, area::AVAIL, area::USED], ctl::AREA),
        _ => (
            BENCH_QUEUE_SIZE,
            [bench::DESC, bench::AVAIL, bench::USED],
            ctl::BUF,
        ),
    };
    a.mov(r13, qword_ptr(rbp + region as i32))?;
    a.mov(r14, qword_ptr(rbp + ctl::TABLE as i32))?;
    a.xor(r12, r12)?;

    // Find the device.
    a.mov(eax, mmio(reg::VIRTIO_MMIO_MAGIC_VALUE))?;
    a.cmp(eax, MMIO_MAGIC)?;
    a.jne(no_device)?;
    a.mov(eax, mmio(reg::VIRTIO_MMIO_VERSION))?;
    a.cmp(eax, 2)?;
    a.jne(no_device)?;
    a.mov(eax, mmio(reg::VIRTIO_MMIO_DEVICE_ID))?;
    a.cmp(eax, BLOCK_DEVICE)?;
    a.jne(no_device)?;

    // Reset, ACKNOWLEDGE, DRIVER; VERSION_1 (feature bit 32) only.
    a.mov(mmio(reg::VIRTIO_MMIO_STATUS), 0)?;
    a.mov(mmio(reg::VIRTIO_MMIO_STATUS), S_ACK)?;
    a.mov(mmio(reg::VIRTIO_MMIO_STATUS), S_ACK | S_DRIVER)?;
    a.mov(mmio(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL), 1)?;
    a.mov(eax, mmio(reg::VIRTIO_MMIO_DEVICE_FEATURES))?;
    a.test(eax, 1)?;
    a.jz(no_v1)?;
    a.mov(mmio(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 1)?;
    a.mov(mmio(reg::VIRTIO_MMIO_DRIVER_FEATURES), 1)?;
    a.mov(mmio(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 0)?;
    // seq-write takes the write cache (FLUSH): its writes need not be
    // durable one by one, and it flushes after every pass, as `dd
    // conv=fsync` does after each run. The other modes write through.
    let low_features = match mode {
        DiskMode::SeqWrite => 1u32 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH,
        _ => 0,
    };
    a.mov(mmio(reg::VIRTIO_MMIO_DRIVER_FEATURES), low_features)?;
    a.mov(
        mmio(reg::VIRTIO_MMIO_STATUS),
        S_ACK | S_DRIVER | S_FEATURES_OK,
    )?;
    a.mov(eax, mmio(reg::VIRTIO_MMIO_STATUS))?;
    a.test(eax, S_FEATURES_OK)?;
    a.jz(refused)?;

    // Queue 0 in the area.
    a.mov(mmio(reg::VIRTIO_MMIO_QUEUE_SEL), 0)?;
    a.mov(eax, mmio(reg::VIRTIO_MMIO_QUEUE_NUM_MAX))?;
    a.cmp(eax, queue_size as u32)?;
    a.jb(small_queue)?;
    a.mov(mmio(reg::VIRTIO_MMIO_QUEUE_NUM), queue_size as u32)?;
    for (part, (lo, hi)) in queue_parts.into_iter().zip([
        (
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH,
        ),
        (
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
        ),
        (
            reg::VIRTIO_MMIO_QUEUE_USED_LOW,
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH,
        ),
    ]) {
        a.lea(rax, qword_ptr(r13 + part as i32))?;
        a.mov(mmio(lo), eax)?;
        a.shr(rax, 32)?;
        a.mov(mmio(hi), eax)?;
    }
    a.mov(mmio(reg::VIRTIO_MMIO_QUEUE_READY), 1)?;
    a.mov(
        mmio(reg::VIRTIO_MMIO_STATUS),
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    )?;
    a.mov(eax, mmio(reg::VIRTIO_MMIO_STATUS))?;
    a.test(eax, S_NEEDS_RESET)?;
    a.jnz(needs_reset)?;
    a.test(eax, S_DRIVER_OK)?;
    a.jz(needs_reset)?;

    // Blocks used: the disk's, up to the table's room.
    a.mov(rax, qword_ptr(rbx + CONFIG_CAPACITY as i32))?;
    a.mov(qword_ptr(rbp + ctl::CAPACITY as i32), rax)?;
    a.shr(rax, 3)?;
    a.mov(rcx, qword_ptr(rbp + ctl::TABLE_CAP as i32))?;
    a.cmp(rax, rcx)?;
    a.cmova(rax, rcx)?;
    a.test(rax, rax)?;
    a.jz(too_small)?;
    if matches!(mode, DiskMode::SeqWrite | DiskMode::SeqRead) {
        // Whole 1 MiB requests only.
        a.and(rax, -(SEQ_BLOCKS as i32))?;
        a.jz(too_small)?;
    }
    a.mov(r15, rax)?;
    a.mov(qword_ptr(rbp + ctl::BLOCKS as i32), rax)?;
    a.mov(qword_ptr(rbp + ctl::STATE as i32), RUNNING as i32)?;
    let mut park = a.create_label();
    match mode {
        DiskMode::Mixed => mixed_loop(&mut a, needs_reset)?,
        DiskMode::RandReadQd32 => qd_read_loop(&mut a, needs_reset)?,
        DiskMode::SeqWrite => seq_loop(&mut a, needs_reset, true)?,
        DiskMode::SeqRead => seq_loop(&mut a, needs_reset, false)?,
    }

    for (mut l, f) in fail_codes {
        a.set_label(&mut l)?;
        a.mov(eax, f as u32)?;
        a.jmp(fail)?;
    }
    a.set_label(&mut fail)?;
    a.mov(qword_ptr(rbp + ctl::FAIL as i32), rax)?;
    a.mov(qword_ptr(rbp + ctl::STATE as i32), FAILED as i32)?;
    a.set_label(&mut park)?;
    a.mov(dx, PORT_WAIT as u32)?;
    a.out(dx, eax)?;
    a.jmp(park)?;
    a.assemble(base)
}

/// The mixed mode's loop: 4 KiB at random blocks, three writes to one
/// read-back, one request in flight (descriptors 0, 1, 2 in the area).
fn mixed_loop(a: &mut CodeAssembler, needs_reset: CodeLabel) -> Result<(), IcedError> {
    let mmio = |r: u32| dword_ptr(rbx + r as i32);

    let mut top = a.create_label();
    let mut prep_read = a.create_label();
    let mut submit = a.create_label();
    let mut fill = a.create_label();
    let mut poll = a.create_label();
    let mut done = a.create_label();
    let mut bad_status = a.create_label();
    let mut check_read = a.create_label();
    let mut check_fill = a.create_label();
    let mut unwritten = a.create_label();
    let mut mismatch = a.create_label();
    let mut counted = a.create_label();
    let mut complete = a.create_label();

    a.set_label(&mut top)?;
    // Read every READ_EVERY-th request: r8 = 0 then.
    a.mov(rax, qword_ptr(rbp + ctl::ISSUED as i32))?;
    a.inc(rax)?;
    a.mov(qword_ptr(rbp + ctl::ISSUED as i32), rax)?;
    a.xor(edx, edx)?;
    a.div(qword_ptr(rbp + ctl::READ_EVERY as i32))?;
    a.mov(r8, rdx)?;
    // The quotient numbers the read-backs: it picks the read slot.
    a.mov(r11, rax)?;
    // The block: the LCG's high bits modulo the blocks used.
    a.mov(rax, qword_ptr(rbp + ctl::RNG as i32))?;
    a.mov(rcx, 6_364_136_223_846_793_005u64)?;
    a.imul_2(rax, rcx)?;
    a.mov(rcx, 1_442_695_040_888_963_407u64)?;
    a.add(rax, rcx)?;
    a.mov(qword_ptr(rbp + ctl::RNG as i32), rax)?;
    a.shr(rax, 33)?;
    a.xor(edx, edx)?;
    a.div(r15)?;
    a.mov(r9, rdx)?;
    a.test(r8, r8)?;
    a.jz(prep_read)?;
    a.mov(r8d, 1)?;

    // A write: a new tag, recorded as in flight before it goes out.
    a.mov(r10, qword_ptr(rbp + ctl::TAG as i32))?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbp + ctl::TAG as i32), r10)?;
    a.mov(qword_ptr(rbp + ctl::INFLIGHT_BLOCK as i32), r9)?;
    a.mov(qword_ptr(rbp + ctl::INFLIGHT_TAG as i32), r10)?;
    a.lea(rsi, qword_ptr(r13 + area::WRITE_BUF as i32))?;
    a.mov(rax, BLOCK_MAGIC)?;
    a.mov(qword_ptr(rsi + (word::MAGIC * 8) as i32), rax)?;
    a.mov(qword_ptr(rsi + (word::BLOCK * 8) as i32), r9)?;
    a.mov(qword_ptr(rsi + (word::TAG * 8) as i32), r10)?;
    a.mov(qword_ptr(rsi + (word::VCPU * 8) as i32), 0)?;
    a.mov(rax, qword_ptr(rbp + ctl::RUN as i32))?;
    a.mov(qword_ptr(rsi + (word::RUN * 8) as i32), rax)?;
    seed(a)?;
    a.lea(rdx, qword_ptr(rsi + (HEADER_WORDS * 8) as i32))?;
    a.lea(r11, qword_ptr(rsi + BLOCK_BYTES as i32))?;
    a.set_label(&mut fill)?;
    a.mov(qword_ptr(rdx), rax)?;
    a.add(rax, rcx)?;
    a.add(rdx, 8)?;
    a.cmp(rdx, r11)?;
    a.jb(fill)?;
    a.mov(dword_ptr(r13 + area::HEADER as i32), T_OUT)?;
    a.mov(qword_ptr(r13 + (area::DESC + 16) as i32), rsi)?;
    a.mov(word_ptr(r13 + (area::DESC + 16 + 12) as i32), F_NEXT)?;
    a.jmp(submit)?;

    // A read into the next slot: forget what the slot held, then poison
    // its ends, so a read the device never wrote (or whose write to memory
    // was lost) cannot pass for the block.
    a.set_label(&mut prep_read)?;
    a.mov(rax, r11)?;
    a.and(eax, (READ_SLOTS - 1) as u32)?;
    a.shl(eax, 4)?;
    a.mov(qword_ptr(rbp + rax + ctl::SLOTS as i32), r9)?;
    a.mov(qword_ptr(rbp + rax + (ctl::SLOTS + 8) as i32), 0)?;
    a.shl(eax, 8)?;
    a.lea(rsi, qword_ptr(r13 + rax + area::READ_BUF as i32))?;
    a.mov(qword_ptr(rsi), -1)?;
    a.mov(qword_ptr(rsi + (BLOCK_BYTES - 8) as i32), -1)?;
    a.mov(dword_ptr(r13 + area::HEADER as i32), T_IN)?;
    a.mov(qword_ptr(r13 + (area::DESC + 16) as i32), rsi)?;
    a.mov(
        word_ptr(r13 + (area::DESC + 16 + 12) as i32),
        F_NEXT | F_WRITE,
    )?;

    // Header, descriptors 0 → 1 → 2, the avail ring, the notify.
    a.set_label(&mut submit)?;
    a.mov(dword_ptr(r13 + (area::HEADER + 4) as i32), 0)?;
    a.mov(rax, r9)?;
    a.shl(rax, 3)?;
    a.mov(qword_ptr(r13 + (area::HEADER + 8) as i32), rax)?;
    a.lea(rax, qword_ptr(r13 + area::HEADER as i32))?;
    a.mov(qword_ptr(r13 + area::DESC as i32), rax)?;
    a.mov(dword_ptr(r13 + (area::DESC + 8) as i32), 16)?;
    a.mov(word_ptr(r13 + (area::DESC + 12) as i32), F_NEXT)?;
    a.mov(word_ptr(r13 + (area::DESC + 14) as i32), 1)?;
    a.mov(
        dword_ptr(r13 + (area::DESC + 16 + 8) as i32),
        BLOCK_BYTES as u32,
    )?;
    a.mov(word_ptr(r13 + (area::DESC + 16 + 14) as i32), 2)?;
    a.lea(rax, qword_ptr(r13 + area::STATUS as i32))?;
    a.mov(qword_ptr(r13 + (area::DESC + 32) as i32), rax)?;
    a.mov(dword_ptr(r13 + (area::DESC + 32 + 8) as i32), 1)?;
    a.mov(word_ptr(r13 + (area::DESC + 32 + 12) as i32), F_WRITE)?;
    a.mov(word_ptr(r13 + (area::DESC + 32 + 14) as i32), 0)?;
    a.mov(byte_ptr(r13 + area::STATUS as i32), 0xff)?;
    a.movzx(eax, word_ptr(r13 + (area::AVAIL + 2) as i32))?;
    a.mov(ecx, eax)?;
    a.and(ecx, (QUEUE_SIZE - 1) as u32)?;
    a.mov(word_ptr(r13 + rcx * 2 + (area::AVAIL + 4) as i32), 0)?;
    a.inc(eax)?;
    // x86 keeps stores in order: the ring entry and the descriptors are
    // visible before the index that publishes them.
    a.mov(word_ptr(r13 + (area::AVAIL + 2) as i32), ax)?;
    a.mov(mmio(reg::VIRTIO_MMIO_QUEUE_NOTIFY), 0)?;

    // Poll the used ring until it catches up with the avail ring.
    a.xor(ecx, ecx)?;
    a.set_label(&mut poll)?;
    a.movzx(edx, word_ptr(r13 + (area::USED + 2) as i32))?;
    a.cmp(dx, ax)?;
    a.je(done)?;
    a.pause()?;
    a.inc(ecx)?;
    a.test(ecx, POLLS_PER_STATUS_CHECK - 1)?;
    a.jnz(poll)?;
    a.mov(edx, mmio(reg::VIRTIO_MMIO_STATUS))?;
    a.test(edx, S_NEEDS_RESET)?;
    a.jnz(needs_reset)?;
    a.jmp(poll)?;

    a.set_label(&mut done)?;
    a.movzx(eax, byte_ptr(r13 + area::STATUS as i32))?;
    a.test(eax, eax)?;
    a.jnz(bad_status)?;
    a.test(r8, r8)?;
    a.jz(check_read)?;
    // The write is on the disk: the table says so from now on.
    a.mov(qword_ptr(r14 + r9 * 8), r10)?;
    a.inc(qword_ptr(rbp + ctl::WRITES as i32))?;
    a.jmp(complete)?;

    a.set_label(&mut bad_status)?;
    a.inc(qword_ptr(rbp + ctl::IOERRS as i32))?;
    a.mov(qword_ptr(rbp + ctl::IOERR_BLOCK as i32), r9)?;
    a.mov(qword_ptr(rbp + ctl::IOERR_STATUS as i32), rax)?;
    a.mov(qword_ptr(rbp + ctl::IOERR_WRITE as i32), r8)?;
    a.jmp(complete)?;

    // A read: compare with what the table says the block holds.
    a.set_label(&mut check_read)?;
    a.inc(qword_ptr(rbp + ctl::READS as i32))?;
    a.mov(r10, qword_ptr(r14 + r9 * 8))?;
    a.test(r10, r10)?;
    a.jz(unwritten)?;
    a.mov(rax, BLOCK_MAGIC)?;
    a.cmp(qword_ptr(rsi + (word::MAGIC * 8) as i32), rax)?;
    a.jne(mismatch)?;
    a.cmp(qword_ptr(rsi + (word::BLOCK * 8) as i32), r9)?;
    a.jne(mismatch)?;
    a.cmp(qword_ptr(rsi + (word::TAG * 8) as i32), r10)?;
    a.jne(mismatch)?;
    a.cmp(qword_ptr(rsi + (word::VCPU * 8) as i32), 0)?;
    a.jne(mismatch)?;
    a.mov(rax, qword_ptr(rbp + ctl::RUN as i32))?;
    a.cmp(qword_ptr(rsi + (word::RUN * 8) as i32), rax)?;
    a.jne(mismatch)?;
    seed(a)?;
    a.lea(rdx, qword_ptr(rsi + (HEADER_WORDS * 8) as i32))?;
    a.lea(r11, qword_ptr(rsi + BLOCK_BYTES as i32))?;
    a.set_label(&mut check_fill)?;
    a.cmp(qword_ptr(rdx), rax)?;
    a.jne(mismatch)?;
    a.add(rax, rcx)?;
    a.add(rdx, 8)?;
    a.cmp(rdx, r11)?;
    a.jb(check_fill)?;
    // The slot holds block r9 with tag r10, from now until its next read.
    a.mov(rax, rsi)?;
    a.sub(rax, r13)?;
    a.sub(rax, area::READ_BUF as i32)?;
    a.shr(rax, 8)?;
    a.mov(qword_ptr(rbp + rax + (ctl::SLOTS + 8) as i32), r10)?;
    a.jmp(complete)?;
    // Never written in this run: it must not hold a block of this run.
    a.set_label(&mut unwritten)?;
    a.mov(rax, BLOCK_MAGIC)?;
    a.cmp(qword_ptr(rsi + (word::MAGIC * 8) as i32), rax)?;
    a.jne(complete)?;
    a.mov(rax, qword_ptr(rbp + ctl::RUN as i32))?;
    a.cmp(qword_ptr(rsi + (word::RUN * 8) as i32), rax)?;
    a.jne(complete)?;
    a.set_label(&mut mismatch)?;
    a.cmp(qword_ptr(rbp + ctl::ERRORS as i32), 0)?;
    a.jne(counted)?;
    a.mov(qword_ptr(rbp + ctl::ERR_BLOCK as i32), r9)?;
    a.mov(qword_ptr(rbp + ctl::ERR_WANT as i32), r10)?;
    a.mov(rax, qword_ptr(rsi + (word::TAG * 8) as i32))?;
    a.mov(qword_ptr(rbp + ctl::ERR_FOUND as i32), rax)?;
    a.set_label(&mut counted)?;
    a.inc(qword_ptr(rbp + ctl::ERRORS as i32))?;

    // Done with this request: nothing in flight, one more completed.
    a.set_label(&mut complete)?;
    a.mov(qword_ptr(rbp + ctl::INFLIGHT_TAG as i32), 0)?;
    a.inc(qword_ptr(rbp + ctl::REQUESTS as i32))?;
    a.inc(qword_ptr(rdi + block::PROGRESS as i32))?;
    a.mov(rax, qword_ptr(rdi + block::PACE_BATCH as i32))?;
    a.test(rax, rax)?;
    a.jz(top)?;
    a.inc(r12)?;
    a.cmp(r12, rax)?;
    a.jb(top)?;
    a.mov(eax, r12d)?;
    a.mov(dx, PORT_PACE as u32)?;
    a.out(dx, eax)?;
    a.xor(r12, r12)?;
    a.jmp(top)
}

/// rax = a random block below r15 (the LCG in [`ctl::RNG`] advanced);
/// clobbers rcx and rdx, leaves the block in rdx too.
fn random_block(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, qword_ptr(rbp + ctl::RNG as i32))?;
    a.mov(rcx, 6_364_136_223_846_793_005u64)?;
    a.imul_2(rax, rcx)?;
    a.mov(rcx, 1_442_695_040_888_963_407u64)?;
    a.add(rax, rcx)?;
    a.mov(qword_ptr(rbp + ctl::RNG as i32), rax)?;
    a.shr(rax, 33)?;
    a.xor(edx, edx)?;
    a.div(r15)?;
    a.mov(rax, rdx)
}

/// Waits until the used ring's index differs from `dx_reg`'s low 16 bits
/// (`cmp_with`), looking at the Status register now and then (an exit) so
/// that a device that needs a reset is noticed. Leaves the used index in
/// edx; clobbers esi.
fn wait_used(
    a: &mut CodeAssembler,
    needs_reset: CodeLabel,
    until_equal: bool,
    with: AsmRegister16,
) -> Result<(), IcedError> {
    let mmio = |r: u32| dword_ptr(rbx + r as i32);
    let mut poll = a.create_label();
    let mut seen = a.create_label();
    a.xor(esi, esi)?;
    a.set_label(&mut poll)?;
    a.movzx(edx, word_ptr(r13 + (bench::USED + 2) as i32))?;
    a.cmp(dx, with)?;
    if until_equal {
        a.je(seen)?;
    } else {
        a.jne(seen)?;
    }
    a.pause()?;
    a.inc(esi)?;
    a.test(esi, POLLS_PER_STATUS_CHECK - 1)?;
    a.jnz(poll)?;
    a.mov(esi, mmio(reg::VIRTIO_MMIO_STATUS))?;
    a.test(esi, S_NEEDS_RESET)?;
    a.jnz(needs_reset)?;
    a.xor(esi, esi)?;
    a.jmp(poll)?;
    a.set_label(&mut seen)
}

/// Notifies queue 0 unless the device said it does not need it (it is
/// draining the queue: VRING_USED_F_NO_NOTIFY), after the avail index
/// written is visible (mfence: the store before the flag's load).
fn notify(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut skip = a.create_label();
    a.mfence()?;
    a.test(word_ptr(r13 + bench::USED as i32), 1)?;
    a.jnz(skip)?;
    a.mov(dword_ptr(rbx + reg::VIRTIO_MMIO_QUEUE_NOTIFY as i32), 0)?;
    a.set_label(&mut skip)?;
    a.nop()
}

/// After `count` (a register) requests completed: PACE when the host
/// rate-limits the guest (r12 counts requests since the last PACE).
fn pace(a: &mut CodeAssembler, count: AsmRegister64, next: CodeLabel) -> Result<(), IcedError> {
    a.add(r12, count)?;
    a.mov(rax, qword_ptr(rdi + block::PACE_BATCH as i32))?;
    a.test(rax, rax)?;
    a.jz(next)?;
    a.cmp(r12, rax)?;
    a.jb(next)?;
    a.mov(eax, r12d)?;
    a.mov(dx, PORT_PACE as u32)?;
    a.out(dx, eax)?;
    a.xor(r12, r12)?;
    a.jmp(next)
}

/// Counts a request that completed with status al != 0: its block rdx,
/// whether it wrote (`write`).
fn count_ioerr(a: &mut CodeAssembler, write: bool) -> Result<(), IcedError> {
    a.inc(qword_ptr(rbp + ctl::IOERRS as i32))?;
    a.mov(qword_ptr(rbp + ctl::IOERR_BLOCK as i32), rdx)?;
    a.mov(qword_ptr(rbp + ctl::IOERR_STATUS as i32), rax)?;
    a.mov(qword_ptr(rbp + ctl::IOERR_WRITE as i32), write as i32)
}

/// `rand-read-qd32`: 32 reads of 4 KiB at random blocks always in flight.
/// Request i is descriptors 3i → 3i+1 → 3i+2 (its header, its block, its
/// status byte); each completion puts the same request back with a new
/// block, and one notify (if the device wants it) follows every batch of
/// completions the guest finds in the used ring.
fn qd_read_loop(a: &mut CodeAssembler, needs_reset: CodeLabel) -> Result<(), IcedError> {
    let mut setup = a.create_label();
    let mut top = a.create_label();
    let mut drain = a.create_label();
    let mut ok = a.create_label();
    let mut counted = a.create_label();
    // r11 = i; r8 = its descriptors; r9 scratch addresses.
    a.xor(r11d, r11d)?;
    a.set_label(&mut setup)?;
    a.imul_3(r8d, r11d, 48)?;
    a.lea(r8, qword_ptr(r13 + r8 + bench::DESC as i32))?;
    a.mov(eax, r11d)?;
    a.shl(eax, 4)?;
    a.lea(r9, qword_ptr(r13 + rax + bench::HEADERS as i32))?;
    a.mov(dword_ptr(r9), T_IN)?;
    a.mov(dword_ptr(r9 + 4), 0)?;
    a.mov(qword_ptr(r8), r9)?;
    a.mov(dword_ptr(r8 + 8), 16)?;
    a.mov(word_ptr(r8 + 12), F_NEXT)?;
    a.lea(eax, dword_ptr(r11 + r11 * 2 + 1))?;
    a.mov(word_ptr(r8 + 14), ax)?;
    a.mov(eax, r11d)?;
    a.shl(eax, 12)?;
    a.lea(r9, qword_ptr(r13 + rax + bench::DATA as i32))?;
    a.mov(qword_ptr(r8 + 16), r9)?;
    a.mov(dword_ptr(r8 + 24), BLOCK_BYTES as u32)?;
    a.mov(word_ptr(r8 + 28), F_NEXT | F_WRITE)?;
    a.lea(eax, dword_ptr(r11 + r11 * 2 + 2))?;
    a.mov(word_ptr(r8 + 30), ax)?;
    a.lea(r9, qword_ptr(r13 + r11 + bench::STATUS as i32))?;
    a.mov(qword_ptr(r8 + 32), r9)?;
    a.mov(dword_ptr(r8 + 40), 1)?;
    a.mov(word_ptr(r8 + 44), F_WRITE)?;
    a.mov(word_ptr(r8 + 46), 0)?;
    a.mov(byte_ptr(r9), 0xff)?;
    random_block(a)?;
    a.shl(rax, 3)?;
    a.mov(ecx, r11d)?;
    a.shl(ecx, 4)?;
    a.mov(qword_ptr(r13 + rcx + (bench::HEADERS + 8) as i32), rax)?;
    a.lea(eax, dword_ptr(r11 + r11 * 2))?;
    a.mov(word_ptr(r13 + r11 * 2 + (bench::AVAIL + 4) as i32), ax)?;
    a.inc(r11d)?;
    a.cmp(r11d, QUEUE_DEPTH)?;
    a.jb(setup)?;
    a.mov(word_ptr(r13 + (bench::AVAIL + 2) as i32), QUEUE_DEPTH)?;
    // r10w: the used entries seen so far.
    a.xor(r10d, r10d)?;
    notify(a)?;

    a.set_label(&mut top)?;
    wait_used(a, needs_reset, false, r10w)?;
    // r15 is the block range; the batch count goes in r8 (kept apart).
    a.xor(r8d, r8d)?;
    a.set_label(&mut drain)?;
    a.mov(eax, r10d)?;
    a.and(eax, (BENCH_QUEUE_SIZE - 1) as u32)?;
    a.mov(r11d, dword_ptr(r13 + rax * 8 + (bench::USED + 4) as i32))?;
    a.mov(eax, r11d)?;
    a.xor(edx, edx)?;
    a.mov(ecx, 3)?;
    a.div(ecx)?;
    a.mov(r9d, eax)?;
    // Its status, and the block it read (for an error's record).
    a.mov(eax, r9d)?;
    a.shl(eax, 4)?;
    a.mov(rdx, qword_ptr(r13 + rax + (bench::HEADERS + 8) as i32))?;
    a.shr(rdx, 3)?;
    a.movzx(eax, byte_ptr(r13 + r9 + bench::STATUS as i32))?;
    a.test(eax, eax)?;
    a.jz(ok)?;
    count_ioerr(a, false)?;
    a.jmp(counted)?;
    a.set_label(&mut ok)?;
    a.inc(qword_ptr(rbp + ctl::READS as i32))?;
    a.set_label(&mut counted)?;
    a.inc(qword_ptr(rbp + ctl::ISSUED as i32))?;
    a.inc(qword_ptr(rbp + ctl::REQUESTS as i32))?;
    a.inc(qword_ptr(rdi + block::PROGRESS as i32))?;
    // The same request again, at a new block.
    random_block(a)?;
    a.shl(rax, 3)?;
    a.mov(ecx, r9d)?;
    a.shl(ecx, 4)?;
    a.mov(qword_ptr(r13 + rcx + (bench::HEADERS + 8) as i32), rax)?;
    a.mov(byte_ptr(r13 + r9 + bench::STATUS as i32), 0xff)?;
    a.movzx(eax, word_ptr(r13 + (bench::AVAIL + 2) as i32))?;
    a.mov(ecx, eax)?;
    a.and(ecx, (BENCH_QUEUE_SIZE - 1) as u32)?;
    a.mov(word_ptr(r13 + rcx * 2 + (bench::AVAIL + 4) as i32), r11w)?;
    a.inc(eax)?;
    a.mov(word_ptr(r13 + (bench::AVAIL + 2) as i32), ax)?;
    a.inc(r10d)?;
    a.inc(r8d)?;
    a.movzx(edx, word_ptr(r13 + (bench::USED + 2) as i32))?;
    a.cmp(dx, r10w)?;
    a.jne(drain)?;
    notify(a)?;
    pace(a, r8, top)
}

/// `seq-write` / `seq-read`: one 1 MiB request at a time, from block 0 up
/// through the blocks used (a multiple of 256), then again. A write fills
/// each of its 256 blocks as the mixed mode fills one (header and pattern,
/// one tag for the request), is recorded in flight over its 256 blocks
/// before it goes out, and in the table once it completed, so `verify`
/// checks the disk as it does the mixed mode's; after each pass over the
/// blocks a FLUSH (descriptors 3 → 4: its header, its status byte) makes
/// the pass durable. Reads check the status byte only.
fn seq_loop(a: &mut CodeAssembler, needs_reset: CodeLabel, write: bool) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut fill_block = a.create_label();
    let mut fill = a.create_label();
    let mut record = a.create_label();
    let mut bad = a.create_label();
    let mut complete = a.create_label();
    let mut wrapped = a.create_label();
    // The chain never changes: header → 1 MiB → status.
    a.lea(rax, qword_ptr(r13 + bench::HEADERS as i32))?;
    a.mov(qword_ptr(r13 + bench::DESC as i32), rax)?;
    a.mov(dword_ptr(r13 + (bench::DESC + 8) as i32), 16)?;
    a.mov(word_ptr(r13 + (bench::DESC + 12) as i32), F_NEXT)?;
    a.mov(word_ptr(r13 + (bench::DESC + 14) as i32), 1)?;
    a.lea(rax, qword_ptr(r13 + bench::DATA as i32))?;
    a.mov(qword_ptr(r13 + (bench::DESC + 16) as i32), rax)?;
    a.mov(
        dword_ptr(r13 + (bench::DESC + 24) as i32),
        (SEQ_BLOCKS * BLOCK_BYTES) as u32,
    )?;
    a.mov(
        word_ptr(r13 + (bench::DESC + 28) as i32),
        if write { F_NEXT } else { F_NEXT | F_WRITE },
    )?;
    a.mov(word_ptr(r13 + (bench::DESC + 30) as i32), 2)?;
    a.lea(rax, qword_ptr(r13 + bench::STATUS as i32))?;
    a.mov(qword_ptr(r13 + (bench::DESC + 32) as i32), rax)?;
    a.mov(dword_ptr(r13 + (bench::DESC + 40) as i32), 1)?;
    a.mov(word_ptr(r13 + (bench::DESC + 44) as i32), F_WRITE)?;
    a.mov(word_ptr(r13 + (bench::DESC + 46) as i32), 0)?;
    a.mov(
        dword_ptr(r13 + bench::HEADERS as i32),
        if write { T_OUT } else { T_IN },
    )?;
    a.mov(dword_ptr(r13 + (bench::HEADERS + 4) as i32), 0)?;
    if write {
        // The FLUSH after each pass: header 1 → status byte 1.
        a.lea(rax, qword_ptr(r13 + (bench::HEADERS + 16) as i32))?;
        a.mov(qword_ptr(r13 + (bench::DESC + 48) as i32), rax)?;
        a.mov(dword_ptr(r13 + (bench::DESC + 56) as i32), 16)?;
        a.mov(word_ptr(r13 + (bench::DESC + 60) as i32), F_NEXT)?;
        a.mov(word_ptr(r13 + (bench::DESC + 62) as i32), 4)?;
        a.lea(rax, qword_ptr(r13 + (bench::STATUS + 1) as i32))?;
        a.mov(qword_ptr(r13 + (bench::DESC + 64) as i32), rax)?;
        a.mov(dword_ptr(r13 + (bench::DESC + 72) as i32), 1)?;
        a.mov(word_ptr(r13 + (bench::DESC + 76) as i32), F_WRITE)?;
        a.mov(word_ptr(r13 + (bench::DESC + 78) as i32), 0)?;
        a.mov(dword_ptr(r13 + (bench::HEADERS + 16) as i32), T_FLUSH)?;
        a.mov(dword_ptr(r13 + (bench::HEADERS + 20) as i32), 0)?;
        a.mov(qword_ptr(r13 + (bench::HEADERS + 24) as i32), 0)?;
    }
    // r9: the request's first block.
    a.xor(r9d, r9d)?;

    a.set_label(&mut top)?;
    if write {
        a.mov(r10, qword_ptr(rbp + ctl::TAG as i32))?;
        a.inc(r10)?;
        a.mov(qword_ptr(rbp + ctl::TAG as i32), r10)?;
        a.mov(qword_ptr(rbp + ctl::INFLIGHT_BLOCK as i32), r9)?;
        a.mov(
            qword_ptr(rbp + ctl::INFLIGHT_COUNT as i32),
            SEQ_BLOCKS as i32,
        )?;
        a.mov(qword_ptr(rbp + ctl::INFLIGHT_TAG as i32), r10)?;
        // r11: the block being filled; rsi: its buffer.
        a.mov(r11, r9)?;
        a.lea(rsi, qword_ptr(r13 + bench::DATA as i32))?;
        a.set_label(&mut fill_block)?;
        a.mov(rax, BLOCK_MAGIC)?;
        a.mov(qword_ptr(rsi + (word::MAGIC * 8) as i32), rax)?;
        a.mov(qword_ptr(rsi + (word::BLOCK * 8) as i32), r11)?;
        a.mov(qword_ptr(rsi + (word::TAG * 8) as i32), r10)?;
        a.mov(qword_ptr(rsi + (word::VCPU * 8) as i32), 0)?;
        a.mov(rax, qword_ptr(rbp + ctl::RUN as i32))?;
        a.mov(qword_ptr(rsi + (word::RUN * 8) as i32), rax)?;
        a.mov(rax, r11)?;
        a.shl(rax, 32)?;
        a.xor(rax, r10)?;
        a.mov(rcx, PATTERN_KEY)?;
        a.xor(rax, rcx)?;
        a.mov(rcx, PATTERN_STEP)?;
        a.lea(rdx, qword_ptr(rsi + (HEADER_WORDS * 8) as i32))?;
        a.lea(r8, qword_ptr(rsi + BLOCK_BYTES as i32))?;
        a.set_label(&mut fill)?;
        a.mov(qword_ptr(rdx), rax)?;
        a.add(rax, rcx)?;
        a.add(rdx, 8)?;
        a.cmp(rdx, r8)?;
        a.jb(fill)?;
        a.mov(rsi, r8)?;
        a.inc(r11)?;
        a.lea(rax, qword_ptr(r9 + SEQ_BLOCKS as i32))?;
        a.cmp(r11, rax)?;
        a.jb(fill_block)?;
    }
    a.mov(rax, r9)?;
    a.shl(rax, 3)?;
    a.mov(qword_ptr(r13 + (bench::HEADERS + 8) as i32), rax)?;
    a.mov(byte_ptr(r13 + bench::STATUS as i32), 0xff)?;
    a.movzx(eax, word_ptr(r13 + (bench::AVAIL + 2) as i32))?;
    a.mov(ecx, eax)?;
    a.and(ecx, (BENCH_QUEUE_SIZE - 1) as u32)?;
    a.mov(word_ptr(r13 + rcx * 2 + (bench::AVAIL + 4) as i32), 0)?;
    a.inc(eax)?;
    a.mov(word_ptr(r13 + (bench::AVAIL + 2) as i32), ax)?;
    a.mov(r10d, eax)?;
    notify(a)?;
    wait_used(a, needs_reset, true, r10w)?;
    a.mov(rdx, r9)?;
    a.movzx(eax, byte_ptr(r13 + bench::STATUS as i32))?;
    a.test(eax, eax)?;
    a.jnz(bad)?;
    if write {
        // On the disk: the table says so from now on.
        a.mov(r10, qword_ptr(rbp + ctl::INFLIGHT_TAG as i32))?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut record)?;
        a.lea(rax, qword_ptr(r9 + rcx))?;
        a.mov(qword_ptr(r14 + rax * 8), r10)?;
        a.inc(ecx)?;
        a.cmp(ecx, SEQ_BLOCKS as u32)?;
        a.jb(record)?;
        a.inc(qword_ptr(rbp + ctl::WRITES as i32))?;
    } else {
        a.inc(qword_ptr(rbp + ctl::READS as i32))?;
    }
    a.jmp(complete)?;
    a.set_label(&mut bad)?;
    count_ioerr(a, write)?;
    a.set_label(&mut complete)?;
    a.mov(qword_ptr(rbp + ctl::INFLIGHT_TAG as i32), 0)?;
    a.inc(qword_ptr(rbp + ctl::ISSUED as i32))?;
    a.inc(qword_ptr(rbp + ctl::REQUESTS as i32))?;
    a.inc(qword_ptr(rdi + block::PROGRESS as i32))?;
    a.add(r9, SEQ_BLOCKS as i32)?;
    a.cmp(r9, r15)?;
    a.jb(wrapped)?;
    a.xor(r9d, r9d)?;
    if write {
        let mut flushed = a.create_label();
        a.mov(byte_ptr(r13 + (bench::STATUS + 1) as i32), 0xff)?;
        a.movzx(eax, word_ptr(r13 + (bench::AVAIL + 2) as i32))?;
        a.mov(ecx, eax)?;
        a.and(ecx, (BENCH_QUEUE_SIZE - 1) as u32)?;
        a.mov(word_ptr(r13 + rcx * 2 + (bench::AVAIL + 4) as i32), 3)?;
        a.inc(eax)?;
        a.mov(word_ptr(r13 + (bench::AVAIL + 2) as i32), ax)?;
        a.mov(r10d, eax)?;
        notify(a)?;
        wait_used(a, needs_reset, true, r10w)?;
        a.xor(edx, edx)?;
        a.movzx(eax, byte_ptr(r13 + (bench::STATUS + 1) as i32))?;
        a.test(eax, eax)?;
        a.jz(flushed)?;
        count_ioerr(a, true)?;
        a.jmp(wrapped)?;
        a.set_label(&mut flushed)?;
        a.inc(qword_ptr(rbp + ctl::FLUSHES as i32))?;
    }
    a.set_label(&mut wrapped)?;
    a.mov(r8d, 1)?;
    pace(a, r8, top)
}

/// rax = the fill pattern's seed of block r9 with tag r10, rcx = its step.
fn seed(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, r9)?;
    a.shl(rax, 32)?;
    a.xor(rax, r10)?;
    a.mov(rcx, PATTERN_KEY)?;
    a.xor(rax, rcx)?;
    a.mov(rcx, PATTERN_STEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_image_carries_its_header_and_a_pattern_unique_to_block_and_tag() {
        let b = block_image(7, 3, 0xabc);
        let w = |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(w(&b, word::MAGIC), BLOCK_MAGIC);
        assert_eq!(w(&b, word::BLOCK), 7);
        assert_eq!(w(&b, word::TAG), 3);
        assert_eq!(w(&b, word::VCPU), 0);
        assert_eq!(w(&b, word::RUN), 0xabc);
        assert_eq!(w(&b, HEADER_WORDS), pattern_seed(7, 3));
        assert_eq!(
            w(&b, HEADER_WORDS + 1),
            pattern_seed(7, 3).wrapping_add(pattern_step())
        );
        // Another tag, another block: every fill word differs.
        for other in [block_image(7, 4, 0xabc), block_image(8, 3, 0xabc)] {
            assert!((HEADER_WORDS..512).all(|i| w(&b, i) != w(&other, i)));
        }
    }

    #[test]
    fn every_mode_assembles() {
        for (mode, _) in DiskMode::ALL {
            assert!(
                program_for(0x18000, 0x3100, mode).unwrap().len() > 200,
                "{mode:?}"
            );
        }
    }

    #[test]
    fn failure_codes_round_trip() {
        for code in 1..=6 {
            assert_eq!(Failure::from_code(code).unwrap() as u64, code);
        }
        assert_eq!(Failure::from_code(0), None);
        assert_eq!(Failure::from_code(7), None);
    }
}
