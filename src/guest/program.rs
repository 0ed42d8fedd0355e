//! The builtin guests' machine code, assembled at build time of the VM with
//! iced-x86's code assembler. Both programs run at CPL3 and never use a
//! stack, so they need no IDT and no kernel.

use iced_x86::code_asm::*;

use crate::devices::test_device::{PORT_PACE, PORT_WAIT};

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
/// calling PACE every PACE_BATCH pages when rate-limited.
///
/// Registers: rdi = its block; r8 = sweep; r9 = range index; rsi = page;
/// rcx = pages left in range; r12 = pages since the last PACE.
pub fn dirty(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut sweep_loop = a.create_label();
    let mut range_loop = a.create_label();
    let mut page_loop = a.create_label();
    let mut next_range = a.create_label();
    let mut no_pace = a.create_label();

    a.mov(r8, qword_ptr(rdi + block::SWEEP))?;
    a.set_label(&mut sweep_loop)?;
    a.inc(r8)?;
    a.mov(qword_ptr(rdi + block::SWEEP), r8)?;
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
    a.set_label(&mut no_pace)?;
    a.add(rsi, 4096)?;
    a.dec(rcx)?;
    a.jmp(page_loop)?;
    a.set_label(&mut next_range)?;
    a.inc(r9)?;
    a.jmp(range_loop)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_assemble() {
        assert!(dirty(0x10000).unwrap().len() > 40);
        assert!(idle(0x10000).unwrap().len() >= 5);
    }
}
