//! The builtin guests' machine code, assembled at build time of the VM with
//! iced-x86's code assembler. Every program runs at CPL3 and never uses a
//! stack. The only CPL0 code is the IDT's handlers: each reports its vector,
//! error code and RIP to the test device and parks, so that an exception or
//! a stray interrupt stops the VM with a reason instead of a triple fault.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use super::abi::{
    FAULT_HAS_ERROR, PORT_FAULT, PORT_FAULT_ERROR, PORT_FAULT_RIP_HI, PORT_FAULT_RIP_LO, PORT_PACE,
    PORT_PACE_HELD, PORT_RESET, PORT_RESET_INPUT_HI, PORT_RESET_INPUT_LO, PORT_RESET_INPUT_SIZE,
    PORT_WAIT, RESET_CHECKED,
};
use super::setup::CONTROL_TSC_KHZ;

pub mod disk;

/// Offsets inside a per-vCPU block (see docs/test-device.md).
pub mod block {
    /// Number of ranges in this vCPU's slice.
    pub const NRANGES: u64 = 0;
    /// Guest-physical address of the range table: (gpa, pages) pairs.
    pub const RANGES: u64 = 8;
    /// Pages written so far (the guest increments it).
    pub const PROGRESS: u64 = 16;
    /// The sweep in progress (1, 2, ...).
    pub const SWEEP: u64 = 24;
    /// Pages between two PACE calls (0: never pace).
    pub const PACE_BATCH: u64 = 32;
    /// Test hook: the sweep at whose start the guest jumps to the fault
    /// routine (0: never; see [`super::TestFault`]).
    pub const FAULT_SWEEP: u64 = 40;
    /// TSC when this vCPU last finished a page (or came back from PACE).
    pub const LAST_TSC: u64 = 48;
    /// Longest gap between two consecutive pages, TSC cycles, not counting
    /// the time PACE held the vCPU back on purpose: the longest stall this
    /// vCPU felt. The host may zero it to start a new window.
    pub const MAX_GAP: u64 = 56;
    /// Size of a block.
    pub const SIZE: u64 = 64;
}

/// Offset in each working-set page of the sweep counter.
pub const COUNTER_OFFSET: u64 = 0;
/// Offset in each working-set page of the page's own guest-physical address,
/// written before the counter: a page found at the wrong place is caught.
pub const TAG_OFFSET: u64 = 8;

/// `builtin:dirty`: sweeps its slice forever, writing the page's address and
/// then the sweep number into each page, counting pages in its block, and
/// calling PACE every PACE_BATCH pages when rate-limited. After each page it
/// reads the TSC (allowed at CPL3) and keeps the longest gap since the last
/// page in `block::MAX_GAP`: what a pause, a copy or a page migration cost
/// the guest, measured by the guest.
///
/// Registers: rdi = its block; r8 = sweep; r9 = range index; rsi = page;
/// rcx = pages left in range; r12 = pages since the last PACE; rax, rdx
/// and r10 scratch.
///
/// At the start of sweep `block::FAULT_SWEEP` (a test hook, normally 0 so
/// never) it jumps to `fault_at` with r11 = [`UNMAPPED_ADDR`].
pub fn dirty(base: u64, fault_at: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut sweep_loop = a.create_label();
    let mut range_loop = a.create_label();
    let mut page_loop = a.create_label();
    let mut next_range = a.create_label();
    let mut no_pace = a.create_label();
    let mut no_fault = a.create_label();

    let mut no_max = a.create_label();
    a.mov(r8, qword_ptr(rdi + block::SWEEP))?;
    stamp(&mut a)?;
    a.set_label(&mut sweep_loop)?;
    a.inc(r8)?;
    a.mov(qword_ptr(rdi + block::SWEEP), r8)?;
    a.cmp(r8, qword_ptr(rdi + block::FAULT_SWEEP))?;
    a.jne(no_fault)?;
    a.mov(r11, UNMAPPED_ADDR)?;
    a.mov(rax, fault_at)?;
    a.jmp(rax)?;
    a.set_label(&mut no_fault)?;
    a.xor(r9, r9)?;
    a.set_label(&mut range_loop)?;
    a.cmp(r9, qword_ptr(rdi + block::NRANGES))?;
    a.jae(sweep_loop)?;
    a.mov(r11, r9)?;
    a.shl(r11, 4)?;
    a.add(r11, qword_ptr(rdi + block::RANGES))?;
    a.mov(rsi, qword_ptr(r11))?;
    a.mov(rcx, qword_ptr(r11 + 8))?;
    a.set_label(&mut page_loop)?;
    a.test(rcx, rcx)?;
    a.jz(next_range)?;
    a.mov(qword_ptr(rsi + TAG_OFFSET), rsi)?;
    a.mov(qword_ptr(rsi + COUNTER_OFFSET), r8)?;
    a.inc(qword_ptr(rdi + block::PROGRESS))?;
    // The gap since the last page: the longest one is the stall.
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(rdx, rax)?;
    a.sub(rdx, qword_ptr(rdi + block::LAST_TSC))?;
    a.mov(qword_ptr(rdi + block::LAST_TSC), rax)?;
    // Before the stamp: PACE returned before the hold it reported (a
    // command ended its wait early), so the guest is ahead of its pace
    // and felt no stall. `mov` left the borrow of `sub` in CF.
    a.jb(no_max)?;
    a.cmp(rdx, qword_ptr(rdi + block::MAX_GAP))?;
    a.jbe(no_max)?;
    a.mov(qword_ptr(rdi + block::MAX_GAP), rdx)?;
    a.set_label(&mut no_max)?;
    a.mov(rax, qword_ptr(rdi + block::PACE_BATCH))?;
    a.test(rax, rax)?;
    a.jz(no_pace)?;
    a.inc(r12)?;
    a.cmp(r12, rax)?;
    a.jb(no_pace)?;
    a.mov(eax, r12d)?;
    a.mov(dx, PORT_PACE as u32)?;
    a.out(dx, eax)?;
    a.xor(r12, r12)?;
    // The hold PACE meant is the rate asked for, not a stall: move the
    // last stamp forward by it (µs × kHz / 1000 cycles). What a pause or
    // a busy host added to the PACE stays in the next gap.
    a.mov(dx, PORT_PACE_HELD as u32)?;
    a.in_(eax, dx)?;
    a.mul(qword_ptr(CONTROL_TSC_KHZ))?;
    a.mov(r10, 1000u64)?;
    a.div(r10)?;
    a.add(qword_ptr(rdi + block::LAST_TSC), rax)?;
    a.set_label(&mut no_pace)?;
    a.add(rsi, 4096)?;
    a.dec(rcx)?;
    a.jmp(page_loop)?;
    a.set_label(&mut next_range)?;
    a.inc(r9)?;
    a.jmp(range_loop)?;
    a.assemble(base)
}

/// `block::LAST_TSC = rdtsc` (clobbers rax and rdx).
fn stamp(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(rdi + block::LAST_TSC), rax)?;
    Ok(())
}

/// `builtin:net` (see `guest::net`): programs the card from the register
/// table, then runs `mode`'s loop: `echo` sends frame `n`, polls for its
/// echo and moves on; `tx` keeps the transmit ring full; `rx` takes every
/// frame delivered.
///
/// Registers: rdi = its block; rbx = the state page; r13 = the card's MMIO
/// window; the rest per loop.
pub fn net(base: u64, mode: super::net::NetMode) -> Result<Vec<u8>, IcedError> {
    use super::net::{state, NetMode, NET_ADDR};
    let mut a = CodeAssembler::new(64)?;
    let mut init = a.create_label();
    let mut start = a.create_label();
    a.mov(rbx, NET_ADDR)?;
    a.mov(r13, qword_ptr(rbx + state::MMIO))?;
    a.mov(rsi, qword_ptr(rbx + state::INIT))?;
    a.mov(rcx, qword_ptr(rbx + state::NINIT))?;
    a.set_label(&mut init)?;
    a.test(rcx, rcx)?;
    a.jz(start)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.mov(rdx, qword_ptr(rsi + 8))?;
    a.add(rax, r13)?;
    a.mov(dword_ptr(rax), edx)?;
    a.add(rsi, 16)?;
    a.dec(rcx)?;
    a.jmp(init)?;
    a.set_label(&mut start)?;
    match mode {
        NetMode::Echo => net_echo(&mut a)?,
        NetMode::Tx => net_tx(&mut a)?,
        NetMode::Rx => net_rx(&mut a)?,
    }
    a.assemble(base)
}

/// The longest-gap bookkeeping of a vCPU block after progress: the time
/// since `block::LAST_TSC` becomes the new `block::MAX_GAP` if longer, and
/// now the new stamp (clobbers rax and rdx).
fn gap(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut shorter = a.create_label();
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(rdx, rax)?;
    a.sub(rdx, qword_ptr(rdi + block::LAST_TSC))?;
    a.mov(qword_ptr(rdi + block::LAST_TSC), rax)?;
    a.cmp(rdx, qword_ptr(rdi + block::MAX_GAP))?;
    a.jbe(shorter)?;
    a.mov(qword_ptr(rdi + block::MAX_GAP), rdx)?;
    a.set_label(&mut shorter)?;
    a.nop()?;
    Ok(())
}

/// Notifies queue `queue` of the card at r13 unless the device said it
/// needs no notification (`VRING_USED_F_NO_NOTIFY` in the used ring at
/// `used`: it is serving the queue and will see what was just added).
/// Every notify is a VM exit, so a guest adding buffers while the device
/// works must not pay one each time. The avail index must be visible
/// before the flag is read, as the device re-enables notifications,
/// fences, then reads the index (clobbers rdx).
fn notify_if_asked(a: &mut CodeAssembler, used: u64, queue: u32) -> Result<(), IcedError> {
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    let notify = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as i32;
    let mut skip = a.create_label();
    a.mfence()?;
    a.mov(rdx, used)?;
    a.test(word_ptr(rdx), VRING_USED_F_NO_NOTIFY as i32)?;
    a.jnz(skip)?;
    a.mov(dword_ptr(r13 + notify), queue)?;
    a.set_label(&mut skip)?;
    a.nop()?;
    Ok(())
}

/// `builtin:net,mode=echo`: frame `n` out, its echo back, `n + 1`.
///
/// Registers: r8 = `n`; r12 = polls left before a resend; r14 = 1 once the
/// echo of `n` came; r9–r11, rax, rdx scratch.
fn net_echo(a: &mut CodeAssembler) -> Result<(), IcedError> {
    use super::net::{state, *};
    let notify = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as i32;
    let mask = (QUEUE_SIZE - 1) as u32;
    let (rx_avail, rx_used) = (RXQ_ADDR + 0x1000, RXQ_ADDR + 0x2000);
    let tx_avail = TXQ_ADDR + 0x1000;
    let mut send = a.create_label();
    let mut wait = a.create_label();
    let mut got = a.create_label();
    let mut bad = a.create_label();
    let mut dup = a.create_label();
    let mut foreign = a.create_label();
    let mut matched = a.create_label();
    let mut repost = a.create_label();

    // The receive buffers are posted already.
    a.mov(dword_ptr(r13 + notify), 0)?;
    a.xor(r14, r14)?;
    // Frame n into transmit buffer n % size, on the avail ring.
    a.set_label(&mut send)?;
    a.mov(r8, qword_ptr(rbx + state::SEQ))?;
    a.mov(rax, r8)?;
    a.and(eax, mask)?;
    a.mov(r9, rax)?;
    a.shl(r9, 12)?;
    a.mov(r11, TXBUF_ADDR)?;
    a.add(r9, r11)?;
    a.mov(qword_ptr(r9 + SEQ_AT), r8)?;
    a.mov(r10, qword_ptr(rbx + state::TX_AVAIL))?;
    a.mov(r11, r10)?;
    a.and(r11d, mask)?;
    a.mov(rdx, tx_avail + 4)?;
    a.mov(word_ptr(rdx + r11 * 2), ax)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbx + state::TX_AVAIL), r10)?;
    // x86 keeps stores in order: the ring entry is visible before the index.
    a.mov(rdx, tx_avail + 2)?;
    a.mov(word_ptr(rdx), r10w)?;
    notify_if_asked(a, TXQ_ADDR + 0x2000, 1)?;
    a.mov(r12, SPIN)?;

    a.set_label(&mut wait)?;
    a.mov(rdx, rx_used + 2)?;
    a.movzx(eax, word_ptr(rdx))?;
    a.mov(r10, qword_ptr(rbx + state::RX_SEEN))?;
    a.cmp(ax, r10w)?;
    a.jne(got)?;
    a.dec(r12)?;
    a.jnz(wait)?;
    a.inc(qword_ptr(rbx + state::RETRIES))?;
    a.jmp(send)?;

    // A used receive buffer: its id, then its frame.
    a.set_label(&mut got)?;
    a.mov(r11, r10)?;
    a.and(r11d, mask)?;
    a.mov(rdx, rx_used + 4)?;
    a.mov(eax, dword_ptr(rdx + r11 * 8))?;
    a.and(eax, mask)?;
    a.mov(r9, rax)?;
    a.shl(r9, 12)?;
    a.mov(r11, RXBUF_ADDR)?;
    a.add(r9, r11)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbx + state::RX_SEEN), r10)?;
    a.movzx(edx, word_ptr(r9 + TYPE_AT))?;
    a.cmp(edx, ETHERTYPE.swap_bytes() as i32)?;
    a.jne(foreign)?;
    a.mov(rdx, MAGIC)?;
    a.cmp(qword_ptr(r9 + MAGIC_AT), rdx)?;
    a.jne(bad)?;
    a.mov(rdx, qword_ptr(r9 + SEQ_AT))?;
    a.cmp(rdx, r8)?;
    a.je(matched)?;
    a.jb(dup)?;
    a.set_label(&mut bad)?;
    a.inc(qword_ptr(rbx + state::BAD))?;
    a.jmp(repost)?;
    a.set_label(&mut dup)?;
    a.inc(qword_ptr(rbx + state::DUPS))?;
    a.jmp(repost)?;
    a.set_label(&mut foreign)?;
    a.inc(qword_ptr(rbx + state::FOREIGN))?;
    a.jmp(repost)?;
    a.set_label(&mut matched)?;
    a.inc(r8)?;
    a.mov(qword_ptr(rbx + state::SEQ), r8)?;
    a.inc(qword_ptr(rdi + block::PROGRESS))?;
    a.mov(r14, 1u64)?;

    // The buffer back on the receive avail ring.
    a.set_label(&mut repost)?;
    a.mov(r10, qword_ptr(rbx + state::RX_AVAIL))?;
    a.mov(r11, r10)?;
    a.and(r11d, mask)?;
    a.mov(rdx, rx_avail + 4)?;
    a.mov(word_ptr(rdx + r11 * 2), ax)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbx + state::RX_AVAIL), r10)?;
    a.mov(rdx, rx_avail + 2)?;
    a.mov(word_ptr(rdx), r10w)?;
    notify_if_asked(a, rx_used, 0)?;
    a.test(r14, r14)?;
    a.jz(wait)?;
    a.xor(r14, r14)?;
    a.jmp(send)?;
    Ok(())
}

/// `builtin:net,mode=tx`: reclaims the transmit entries the device used
/// (progress), refills every free one with the next numbered frame,
/// publishes them at once and notifies only if the device asks.
///
/// Registers: r8 = frames put on the ring; r9 = its value before this
/// batch; r10 = used entries consumed; r11, rax, rcx, rdx scratch.
fn net_tx(a: &mut CodeAssembler) -> Result<(), IcedError> {
    use super::net::{state, *};
    let mask = (QUEUE_SIZE - 1) as u32;
    let (tx_avail, tx_used) = (TXQ_ADDR + 0x1000, TXQ_ADDR + 0x2000);
    let mut top = a.create_label();
    let mut fill = a.create_label();
    let mut fill_one = a.create_label();
    let mut filled = a.create_label();

    stamp(a)?;
    a.set_label(&mut top)?;
    // Entries the device used since the last look (16-bit ring index).
    a.mov(rdx, tx_used + 2)?;
    a.movzx(eax, word_ptr(rdx))?;
    a.mov(r10, qword_ptr(rbx + state::TX_SEEN))?;
    a.mov(ecx, eax)?;
    a.sub(ecx, r10d)?;
    a.and(ecx, 0xffff)?;
    a.jz(fill)?;
    a.add(r10, rcx)?;
    a.mov(qword_ptr(rbx + state::TX_SEEN), r10)?;
    a.add(qword_ptr(rbx + state::SEQ), rcx)?;
    a.add(qword_ptr(rdi + block::PROGRESS), rcx)?;
    gap(a)?;

    a.set_label(&mut fill)?;
    a.mov(r8, qword_ptr(rbx + state::TX_AVAIL))?;
    a.mov(r9, r8)?;
    a.set_label(&mut fill_one)?;
    a.mov(rax, r8)?;
    a.sub(rax, qword_ptr(rbx + state::TX_SEEN))?;
    a.cmp(rax, QUEUE_SIZE as i32)?;
    a.jae(filled)?;
    // Frame r8 into transmit buffer r8 % size; its descriptor on the ring.
    a.mov(rax, r8)?;
    a.and(eax, mask)?;
    a.mov(r11, rax)?;
    a.shl(r11, 12)?;
    a.mov(rdx, TXBUF_ADDR)?;
    a.add(r11, rdx)?;
    a.mov(qword_ptr(r11 + SEQ_AT), r8)?;
    a.mov(rdx, tx_avail + 4)?;
    a.mov(word_ptr(rdx + rax * 2), ax)?;
    a.inc(r8)?;
    a.jmp(fill_one)?;
    a.set_label(&mut filled)?;
    a.cmp(r8, r9)?;
    a.je(top)?;
    a.mov(qword_ptr(rbx + state::TX_AVAIL), r8)?;
    // x86 keeps stores in order: the entries are visible before the index.
    a.mov(rdx, tx_avail + 2)?;
    a.mov(word_ptr(rdx), r8w)?;
    notify_if_asked(a, tx_used, 1)?;
    a.jmp(top)?;
    Ok(())
}

/// `builtin:net,mode=rx`: takes every receive entry the device used,
/// counts the frames of its type (progress; a damaged magic is bad,
/// another type foreign), gives each buffer back, publishes the batch at
/// once and notifies only if the device asks.
///
/// Registers: r10 = used entries consumed; r12 = the used index seen;
/// r14 = entries put back on the avail ring; r15 = frames counted in the
/// batch; r9, r11, rax, rdx scratch.
fn net_rx(a: &mut CodeAssembler) -> Result<(), IcedError> {
    use super::net::{state, *};
    let notify = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as i32;
    let mask = (QUEUE_SIZE - 1) as u32;
    let (rx_avail, rx_used) = (RXQ_ADDR + 0x1000, RXQ_ADDR + 0x2000);
    let mut top = a.create_label();
    let mut one = a.create_label();
    let mut foreign = a.create_label();
    let mut bad = a.create_label();
    let mut repost = a.create_label();
    let mut no_stamp = a.create_label();

    // The receive buffers are posted already.
    a.mov(dword_ptr(r13 + notify), 0)?;
    stamp(a)?;
    a.set_label(&mut top)?;
    a.mov(rdx, rx_used + 2)?;
    a.movzx(eax, word_ptr(rdx))?;
    a.mov(r10, qword_ptr(rbx + state::RX_SEEN))?;
    a.cmp(ax, r10w)?;
    a.je(top)?;
    a.mov(r12, rax)?;
    a.mov(r14, qword_ptr(rbx + state::RX_AVAIL))?;
    a.xor(r15, r15)?;

    // One used entry: its buffer, its frame.
    a.set_label(&mut one)?;
    a.mov(r11, r10)?;
    a.and(r11d, mask)?;
    a.mov(rdx, rx_used + 4)?;
    a.mov(eax, dword_ptr(rdx + r11 * 8))?;
    a.and(eax, mask)?;
    a.mov(r9, rax)?;
    a.shl(r9, 12)?;
    a.mov(r11, RXBUF_ADDR)?;
    a.add(r9, r11)?;
    a.inc(r10)?;
    a.movzx(edx, word_ptr(r9 + TYPE_AT))?;
    a.cmp(edx, ETHERTYPE.swap_bytes() as i32)?;
    a.jne(foreign)?;
    a.mov(rdx, MAGIC)?;
    a.cmp(qword_ptr(r9 + MAGIC_AT), rdx)?;
    a.jne(bad)?;
    a.inc(r15)?;
    a.jmp(repost)?;
    a.set_label(&mut foreign)?;
    a.inc(qword_ptr(rbx + state::FOREIGN))?;
    a.jmp(repost)?;
    a.set_label(&mut bad)?;
    a.inc(qword_ptr(rbx + state::BAD))?;
    // The buffer back on the avail ring (published after the batch).
    a.set_label(&mut repost)?;
    a.mov(r11, r14)?;
    a.and(r11d, mask)?;
    a.mov(rdx, rx_avail + 4)?;
    a.mov(word_ptr(rdx + r11 * 2), ax)?;
    a.inc(r14)?;
    a.cmp(r10w, r12w)?;
    a.jne(one)?;

    a.mov(qword_ptr(rbx + state::RX_SEEN), r10)?;
    a.mov(qword_ptr(rbx + state::RX_AVAIL), r14)?;
    a.mov(rdx, rx_avail + 2)?;
    a.mov(word_ptr(rdx), r14w)?;
    a.add(qword_ptr(rbx + state::SEQ), r15)?;
    a.add(qword_ptr(rdi + block::PROGRESS), r15)?;
    a.test(r15, r15)?;
    a.jz(no_stamp)?;
    gap(a)?;
    a.set_label(&mut no_stamp)?;
    notify_if_asked(a, rx_used, 0)?;
    a.jmp(top)?;
    Ok(())
}

/// `builtin:vsock` (see `guest::vsock`): programs the device from the
/// register table, then polls the event and receive used rings: an event
/// is counted and its buffer reposted; a packet is answered (RESPONSE to a
/// REQUEST, the same bytes back to RW, RST to SHUTDOWN, CREDIT_UPDATE to
/// CREDIT_REQUEST) from the next free transmit buffer, and its buffer
/// reposted.
///
/// Registers: rdi = its block; rbx = the state page; r13 = the device's
/// MMIO window; r9 = the received packet; r12 = the reply; r14 = the
/// connection's `fwd_cnt` slot; r15 = the receive buffer's id; r8 = bytes
/// echoed; rax, rcx, rdx, rsi, r10, r11 scratch.
pub fn vsock(base: u64) -> Result<Vec<u8>, IcedError> {
    use super::vsock::{state, *};
    let notify = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as i32;
    let mask = (QUEUE_SIZE - 1) as u32;
    let (rx_avail, rx_used) = (RXQ_ADDR + AVAIL_AT, RXQ_ADDR + USED_AT);
    let (tx_avail, tx_used) = (TXQ_ADDR + AVAIL_AT, TXQ_ADDR + USED_AT);
    let (ev_avail, ev_used) = (EVQ_ADDR + AVAIL_AT, EVQ_ADDR + USED_AT);
    let hdr = HDR as i32;
    let mut a = CodeAssembler::new(64)?;
    let mut init = a.create_label();
    let mut start = a.create_label();
    let mut top = a.create_label();
    let mut rx_check = a.create_label();
    let mut wait_tx = a.create_label();
    let mut request = a.create_label();
    let mut shutdown = a.create_label();
    let mut credit = a.create_label();
    let mut rw = a.create_label();
    let mut send = a.create_label();
    let mut repost = a.create_label();

    a.cld()?;
    a.mov(rbx, VSOCK_ADDR)?;
    a.mov(r13, qword_ptr(rbx + state::MMIO))?;
    a.mov(rsi, qword_ptr(rbx + state::INIT))?;
    a.mov(rcx, qword_ptr(rbx + state::NINIT))?;
    a.set_label(&mut init)?;
    a.test(rcx, rcx)?;
    a.jz(start)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.mov(rdx, qword_ptr(rsi + 8))?;
    a.add(rax, r13)?;
    a.mov(dword_ptr(rax), edx)?;
    a.add(rsi, 16)?;
    a.dec(rcx)?;
    a.jmp(init)?;
    a.set_label(&mut start)?;
    // The receive and event buffers are posted already.
    a.mov(dword_ptr(r13 + notify), 0)?;
    a.mov(dword_ptr(r13 + notify), 2)?;

    // An event: counted, its buffer (descriptor 0) back.
    a.set_label(&mut top)?;
    a.mov(rdx, ev_used + 2)?;
    a.movzx(eax, word_ptr(rdx))?;
    a.mov(r10, qword_ptr(rbx + state::EV_SEEN))?;
    a.cmp(ax, r10w)?;
    a.je(rx_check)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbx + state::EV_SEEN), r10)?;
    a.inc(qword_ptr(rbx + state::RESETS))?;
    a.mov(r10, qword_ptr(rbx + state::EV_AVAIL))?;
    a.mov(r11, r10)?;
    a.and(r11d, mask)?;
    a.mov(rdx, ev_avail + 4)?;
    a.mov(word_ptr(rdx + r11 * 2), 0)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbx + state::EV_AVAIL), r10)?;
    a.mov(rdx, ev_avail + 2)?;
    a.mov(word_ptr(rdx), r10w)?;
    a.mov(dword_ptr(r13 + notify), 2)?;

    // A received packet: r9 its buffer, r15 its id.
    a.set_label(&mut rx_check)?;
    a.mov(rdx, rx_used + 2)?;
    a.movzx(eax, word_ptr(rdx))?;
    a.mov(r10, qword_ptr(rbx + state::RX_SEEN))?;
    a.cmp(ax, r10w)?;
    a.je(top)?;
    a.mov(r11, r10)?;
    a.and(r11d, mask)?;
    a.mov(rdx, rx_used + 4)?;
    a.mov(eax, dword_ptr(rdx + r11 * 8))?;
    a.and(eax, mask)?;
    a.mov(r15, rax)?;
    a.mov(r9, rax)?;
    a.shl(r9, 12)?;
    a.mov(r11, RXBUF_ADDR)?;
    a.add(r9, r11)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbx + state::RX_SEEN), r10)?;

    // A free transmit buffer: fewer than QUEUE_SIZE posted and not used.
    a.set_label(&mut wait_tx)?;
    a.mov(rdx, tx_used + 2)?;
    a.movzx(eax, word_ptr(rdx))?;
    a.mov(rcx, qword_ptr(rbx + state::TX_AVAIL))?;
    a.sub(ecx, eax)?;
    a.and(ecx, 0xffff)?;
    a.cmp(ecx, QUEUE_SIZE as i32)?;
    a.jae(wait_tx)?;
    a.mov(r12, qword_ptr(rbx + state::TX_AVAIL))?;
    a.and(r12d, mask)?;
    a.shl(r12, 12)?;
    a.mov(r11, TXBUF_ADDR)?;
    a.add(r12, r11)?;
    // The connection's slot, by the host port's low bits.
    a.mov(r14d, dword_ptr(r9 + 16))?;
    a.and(r14d, (CONNS - 1) as u32)?;
    a.shl(r14, 3)?;
    a.mov(r11, CONN_ADDR)?;
    a.add(r14, r11)?;
    // The reply's header: addresses and ports swapped.
    a.mov(rax, qword_ptr(r9 + 8))?;
    a.mov(qword_ptr(r12), rax)?;
    a.mov(rax, qword_ptr(r9))?;
    a.mov(qword_ptr(r12 + 8), rax)?;
    a.mov(eax, dword_ptr(r9 + 20))?;
    a.mov(dword_ptr(r12 + 16), eax)?;
    a.mov(eax, dword_ptr(r9 + 16))?;
    a.mov(dword_ptr(r12 + 20), eax)?;
    a.mov(dword_ptr(r12 + 24), 0)?;
    a.mov(word_ptr(r12 + 28), 1)?;
    a.mov(dword_ptr(r12 + 32), 0)?;
    a.mov(dword_ptr(r12 + 36), BUF_ALLOC as i32)?;
    a.xor(r8, r8)?;
    a.movzx(eax, word_ptr(r9 + 30))?;
    a.cmp(eax, 1)?;
    a.je(request)?;
    a.cmp(eax, 5)?;
    a.je(rw)?;
    a.cmp(eax, 4)?;
    a.je(shutdown)?;
    a.cmp(eax, 7)?;
    a.je(credit)?;
    a.jmp(repost)?;
    a.set_label(&mut request)?;
    a.mov(qword_ptr(r14), 0)?;
    a.inc(qword_ptr(rbx + state::ACCEPTED))?;
    a.mov(word_ptr(r12 + 30), 2)?;
    a.jmp(send)?;
    a.set_label(&mut shutdown)?;
    a.mov(word_ptr(r12 + 30), 3)?;
    a.jmp(send)?;
    a.set_label(&mut credit)?;
    a.mov(word_ptr(r12 + 30), 6)?;
    a.jmp(send)?;
    a.set_label(&mut rw)?;
    a.mov(ecx, dword_ptr(r9 + 24))?;
    a.cmp(ecx, 4096 - hdr)?;
    a.ja(repost)?;
    a.add(qword_ptr(r14), rcx)?;
    a.mov(r8, rcx)?;
    a.mov(dword_ptr(r12 + 24), ecx)?;
    a.mov(word_ptr(r12 + 30), 5)?;
    a.lea(rsi, ptr(r9 + hdr))?;
    a.mov(rax, rdi)?;
    a.lea(rdi, ptr(r12 + hdr))?;
    a.rep().movsb()?;
    a.mov(rdi, rax)?;
    a.add(qword_ptr(rbx + state::ECHOED), r8)?;
    a.inc(qword_ptr(rdi + block::PROGRESS))?;

    // The reply on the transmit ring: descriptor i = buffer i.
    a.set_label(&mut send)?;
    a.mov(eax, dword_ptr(r14))?;
    a.mov(dword_ptr(r12 + 40), eax)?;
    a.mov(r10, qword_ptr(rbx + state::TX_AVAIL))?;
    a.mov(r11, r10)?;
    a.and(r11d, mask)?;
    a.lea(rax, ptr(r8 + hdr))?;
    a.mov(rcx, r11)?;
    a.shl(rcx, 4)?;
    a.mov(rdx, TXQ_ADDR + 8)?;
    a.add(rcx, rdx)?;
    a.mov(dword_ptr(rcx), eax)?;
    a.mov(rdx, tx_avail + 4)?;
    a.mov(word_ptr(rdx + r11 * 2), r11w)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbx + state::TX_AVAIL), r10)?;
    a.mov(rdx, tx_avail + 2)?;
    a.mov(word_ptr(rdx), r10w)?;
    a.mov(dword_ptr(r13 + notify), 1)?;

    // The receive buffer back.
    a.set_label(&mut repost)?;
    a.mov(r10, qword_ptr(rbx + state::RX_AVAIL))?;
    a.mov(r11, r10)?;
    a.and(r11d, mask)?;
    a.mov(rdx, rx_avail + 4)?;
    a.mov(word_ptr(rdx + r11 * 2), r15w)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rbx + state::RX_AVAIL), r10)?;
    a.mov(rdx, rx_avail + 2)?;
    a.mov(word_ptr(rdx), r10w)?;
    a.mov(dword_ptr(r13 + notify), 0)?;
    a.jmp(top)?;
    a.assemble(base)
}

/// Offsets in `builtin:reset`'s state page (host-written before it starts).
pub mod reset_state {
    /// First page of the working set.
    pub const WS_BASE: u64 = 0;
    /// Pages in the working set.
    pub const WS_PAGES: u64 = 8;
    /// Pages dirtied per iteration.
    pub const PAGES: u64 = 16;
    /// 1: poke the reset device without waiting to be armed.
    pub const POKE_ALWAYS: u64 = 24;
}

/// What `builtin:reset` seeds its page picker with for iteration `seq`.
const RESET_SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// The pages (guest-physical addresses) `builtin:reset` dirties in the
/// iteration that read sequence number `seq`: the host's copy of the
/// guest's picker, for `verify`.
pub fn reset_pages(seq: u64, n: u64, ws_base: u64, ws_pages: u64) -> Vec<u64> {
    let mut x = ((seq << 1) | 1).wrapping_mul(RESET_SEED_MIX);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ws_base + (x % ws_pages.max(1)) * 4096
        })
        .collect()
}

/// `r10 = (2·r10 + 1) · RESET_SEED_MIX` (clobbers rax): the picker's
/// seed, odd (never 0, which xorshift cannot leave) and different for every
/// sequence number (an odd factor is invertible).
fn reset_seed(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.shl(r10, 1)?;
    a.or(r10, 1)?;
    a.mov(rax, RESET_SEED_MIX)?;
    a.imul_2(r10, rax)?;
    Ok(())
}

/// The picker's next page: xorshift64 on r10, then r11 = the working-set
/// page it picks (rbx = the state page; clobbers rax and rdx).
fn reset_next_page(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, r10)?;
    a.shl(rax, 13)?;
    a.xor(r10, rax)?;
    a.mov(rax, r10)?;
    a.shr(rax, 7)?;
    a.xor(r10, rax)?;
    a.mov(rax, r10)?;
    a.shl(rax, 17)?;
    a.xor(r10, rax)?;
    a.mov(rax, r10)?;
    a.xor(edx, edx)?;
    a.div(qword_ptr(rbx + reset_state::WS_PAGES))?;
    a.shl(rdx, 12)?;
    a.add(rdx, qword_ptr(rbx + reset_state::WS_BASE))?;
    a.mov(r11, rdx)?;
    Ok(())
}

/// `builtin:reset`: vCPU 0 (block `vcpu0_block`) registers its input
/// buffer (`input`, `input_size` bytes) with the reset device, waits until
/// a reset base is armed (`in` from RESET), then loops:
///
/// 1. reads the sequence number vmhop wrote at the buffer's start (0
///    before any reset);
/// 2. unless it is 0, checks the pages iteration `seq - 1` dirtied (the
///    picker seeded with it): each must hold 0 and its own address as a
///    pristine page does, as at the checkpoint;
/// 3. dirties the pages of iteration `seq`, writing `seq + 1` into each;
/// 4. pokes RESET with the check's result. A reset puts it back at the
///    checkpoint (waiting to be armed, step 1 next); if the poke returns
///    instead (not armed, or not reset in time) its pages stay dirty, so
///    it dirties them again and pokes again, without checking.
///
/// The other vCPUs idle. Registers: rbx = state page; r8 = seq; r9 = the
/// mark; r10 = the picker; r11 = page; r13 = wrong pages; r14 = the
/// checked bit; rcx = count; rax, rdx scratch.
pub fn reset_loop(
    base: u64,
    state: u64,
    input: u64,
    input_size: u32,
    vcpu0_block: u64,
) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut idle = a.create_label();
    let mut wait_armed = a.create_label();
    let mut iter = a.create_label();
    let mut check_loop = a.create_label();
    let mut bad = a.create_label();
    let mut good = a.create_label();
    let mut dirty = a.create_label();
    let mut dirty_loop = a.create_label();

    a.mov(rax, vcpu0_block)?;
    a.cmp(rdi, rax)?;
    a.jne(idle)?;
    a.mov(dx, PORT_RESET_INPUT_LO as u32)?;
    a.mov(eax, input as u32)?;
    a.out(dx, eax)?;
    a.mov(dx, PORT_RESET_INPUT_HI as u32)?;
    a.mov(eax, (input >> 32) as u32)?;
    a.out(dx, eax)?;
    a.mov(dx, PORT_RESET_INPUT_SIZE as u32)?;
    a.mov(eax, input_size)?;
    a.out(dx, eax)?;
    a.mov(rbx, state)?;

    a.set_label(&mut wait_armed)?;
    a.cmp(qword_ptr(rbx + reset_state::POKE_ALWAYS), 0)?;
    a.jne(iter)?;
    a.mov(dx, PORT_RESET as u32)?;
    a.in_(eax, dx)?;
    a.test(eax, eax)?;
    a.jz(wait_armed)?;

    a.set_label(&mut iter)?;
    a.mov(rax, input)?;
    a.mov(r8, qword_ptr(rax))?;
    a.xor(r13d, r13d)?;
    a.xor(r14d, r14d)?;
    a.test(r8, r8)?;
    a.jz(dirty)?;
    a.mov(r14d, RESET_CHECKED)?;
    a.lea(r10, qword_ptr(r8 - 1))?;
    reset_seed(&mut a)?;
    a.mov(rcx, qword_ptr(rbx + reset_state::PAGES))?;
    a.set_label(&mut check_loop)?;
    reset_next_page(&mut a)?;
    a.cmp(qword_ptr(r11 + COUNTER_OFFSET), 0)?;
    a.jne(bad)?;
    a.cmp(qword_ptr(r11 + TAG_OFFSET), r11)?;
    a.je(good)?;
    a.set_label(&mut bad)?;
    a.inc(r13d)?;
    a.set_label(&mut good)?;
    a.dec(rcx)?;
    a.jnz(check_loop)?;

    a.set_label(&mut dirty)?;
    a.mov(r10, r8)?;
    reset_seed(&mut a)?;
    a.lea(r9, qword_ptr(r8 + 1))?;
    a.mov(rcx, qword_ptr(rbx + reset_state::PAGES))?;
    a.set_label(&mut dirty_loop)?;
    reset_next_page(&mut a)?;
    a.mov(qword_ptr(r11 + COUNTER_OFFSET), r9)?;
    a.inc(qword_ptr(rdi + block::PROGRESS))?;
    a.dec(rcx)?;
    a.jnz(dirty_loop)?;
    a.mov(eax, r13d)?;
    a.or(eax, r14d)?;
    a.mov(dx, PORT_RESET as u32)?;
    a.out(dx, eax)?;
    // Not reset: the pages are still dirty; no check until a reset.
    a.xor(r13d, r13d)?;
    a.xor(r14d, r14d)?;
    a.jmp(dirty)?;

    a.set_label(&mut idle)?;
    a.mov(dx, PORT_WAIT as u32)?;
    a.out(dx, eax)?;
    a.jmp(idle)?;
    a.assemble(base)
}

/// `builtin:idle`: asks the test device to park the vCPU, forever.
pub fn idle(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    a.mov(dx, PORT_WAIT as u32)?;
    a.out(dx, eax)?;
    a.jmp(top)?;
    a.assemble(base)
}

/// A guest-virtual address no builtin guest maps (above the most memory
/// its page tables cover), for the `pf` test fault.
pub const UNMAPPED_ADDR: u64 = 0x7f_0000_0000;

/// Test hook (`--test-hook guest-fault=K`): an exception the dirty guest
/// raises on purpose at the start of its second sweep, to check that the
/// IDT reports it. Never used in normal runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    /// `hlt` at CPL3: #GP(0) at the routine's first byte.
    Gp,
    /// `ud2`: #UD at the routine's first byte.
    Ud,
    /// A write to [`UNMAPPED_ADDR`]: #PF, error code 0x6 (user write, not
    /// present), at the routine's first byte.
    Pf,
    /// `int N` through a DPL3 gate: vector N, RIP after the 2-byte `int`.
    Int(u8),
}

impl TestFault {
    /// Parses `gp`, `ud`, `pf` or `int=N`.
    pub fn parse(s: &str) -> Option<TestFault> {
        match s {
            "gp" => Some(TestFault::Gp),
            "ud" => Some(TestFault::Ud),
            "pf" => Some(TestFault::Pf),
            _ => s.strip_prefix("int=")?.parse().ok().map(TestFault::Int),
        }
    }
}

/// The routine the dirty guest jumps to for a [`TestFault`] (r11 =
/// [`UNMAPPED_ADDR`]); if the fault ever returns, it loops on itself.
pub fn test_fault(base: u64, fault: TestFault) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    match fault {
        TestFault::Gp => a.hlt()?,
        TestFault::Ud => a.ud2()?,
        TestFault::Pf => a.mov(qword_ptr(r11), rax)?,
        TestFault::Int(n) => a.int(n as u32)?,
    }
    a.jmp(top)?;
    a.assemble(base)
}

/// Bytes from an exception stack's top (a page boundary) down to the
/// handler's stack pointer after its stub and the common entry pushed their
/// words, without and with a CPU-pushed error code: the interrupt frame (5
/// words), the error code (1), the vector (1), rax and rdx (2).
const FRAME_NO_ERROR: u32 = 0x1000 - 8 * (5 + 1 + 2);
const FRAME_WITH_ERROR: u32 = FRAME_NO_ERROR - 8;

/// The IDT handlers at `base`: one stub per vector, which pushes its
/// vector and jumps to a common body that reports vector, error code and
/// RIP to the test device and then parks (`hlt` in a loop: the device has
/// already stopped the VM). Returns the code and each vector's entry.
///
/// Every gate uses IST1, a fresh page-aligned stack per vCPU, so the stack
/// depth tells whether the CPU pushed an error code. That is more robust
/// than a per-vector table: `int 13` from software pushes none where a real
/// #GP does.
pub fn handlers(base: u64) -> Result<(Vec<u8>, Vec<u64>), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut common = a.create_label();
    let mut with_error = a.create_label();
    let mut report = a.create_label();
    let mut park = a.create_label();
    let mut stubs = Vec::with_capacity(256);
    for vector in 0..256u32 {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.push(vector as i32)?;
        a.jmp(common)?;
        stubs.push(l);
    }
    a.set_label(&mut common)?;
    a.push(rax)?;
    a.push(rdx)?;
    a.mov(eax, esp)?;
    a.and(eax, 0xfff)?;
    a.cmp(eax, FRAME_WITH_ERROR)?;
    a.je(with_error)?;
    // [rsp+16] vector, [rsp+24] rip.
    a.mov(rax, qword_ptr(rsp + 24))?;
    a.mov(dx, PORT_FAULT_RIP_LO as u32)?;
    a.out(dx, eax)?;
    a.shr(rax, 32)?;
    a.mov(dx, PORT_FAULT_RIP_HI as u32)?;
    a.out(dx, eax)?;
    a.mov(eax, dword_ptr(rsp + 16))?;
    a.jmp(report)?;
    // [rsp+16] vector, [rsp+24] error code, [rsp+32] rip.
    a.set_label(&mut with_error)?;
    a.mov(rax, qword_ptr(rsp + 32))?;
    a.mov(dx, PORT_FAULT_RIP_LO as u32)?;
    a.out(dx, eax)?;
    a.shr(rax, 32)?;
    a.mov(dx, PORT_FAULT_RIP_HI as u32)?;
    a.out(dx, eax)?;
    a.mov(eax, dword_ptr(rsp + 24))?;
    a.mov(dx, PORT_FAULT_ERROR as u32)?;
    a.out(dx, eax)?;
    a.mov(eax, dword_ptr(rsp + 16))?;
    a.or(eax, FAULT_HAS_ERROR as i32)?;
    a.set_label(&mut report)?;
    a.mov(dx, PORT_FAULT as u32)?;
    a.out(dx, eax)?;
    a.set_label(&mut park)?;
    a.hlt()?;
    a.jmp(park)?;
    let r = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let entries = stubs
        .iter()
        .map(|l| r.label_ip(l))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((r.inner.code_buffer, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_assemble() {
        assert!(dirty(0x10000, 0x11000).unwrap().len() > 40);
        assert!(disk::program(0x18000, 0x3100).unwrap().len() > 200);
        assert!(idle(0x10000).unwrap().len() >= 5);
        for (mode, _) in crate::vmm::config::NetMode::ALL {
            assert!(net(0x10000, mode).unwrap().len() > 100);
        }
        assert!(vsock(0x10000).unwrap().len() > 100);
        for f in ["gp", "ud", "pf", "int=64"] {
            let f = TestFault::parse(f).unwrap();
            assert!(!test_fault(0x11000, f).unwrap().is_empty());
        }
        assert_eq!(TestFault::parse("int=300"), None);
    }

    #[test]
    fn every_vector_has_its_own_handler_entry() {
        let (code, entries) = handlers(0x12000).unwrap();
        assert_eq!(entries.len(), 256);
        assert!(entries.windows(2).all(|w| w[0] < w[1]));
        assert!(entries
            .iter()
            .all(|&e| e >= 0x12000 && e < 0x12000 + code.len() as u64));
    }
}
