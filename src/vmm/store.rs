//! What the VM knows of its disks: block stores that a device keeps for
//! the guest beside its memory, dirty-tracked like memory, so that the
//! transfer engine moves them as slots of its plan (a checkpoint stores a
//! disk's written blocks as it stores dirty pages; a migration with
//! `--copy-storage` sends them in the same pre-copy).
//!
//! A store's blocks are `PAGE_SIZE` bytes. Its slot number is
//! [`STORE_SLOTS`] plus its place among the VM's disks, and the address
//! the engine hands a sink for block `b` of store `i` is
//! [`store_address`]`(i, b * PAGE_SIZE)`: a space of its own above any
//! guest-physical address. The device behind it (virtio-blk) is the
//! devices' business; the VM only forwards.

use crate::memory::{DirtyBitmap, PAGE_SIZE};

/// Slot number of the VM's first disk; memory chunks are numbered below.
pub const STORE_SLOTS: u32 = 0x8000_0000;
/// Bit where a store's address space starts: guest-physical addresses
/// stay below it, store `i`'s blocks are in space `i + 1`.
pub const SPACE_SHIFT: u32 = 56;

/// The address of byte `offset` of store `index`.
pub fn store_address(index: usize, offset: u64) -> u64 {
    ((index as u64 + 1) << SPACE_SHIFT) | offset
}

/// The store (index) and offset of an address, None for guest memory.
pub fn split_address(addr: u64) -> Option<(usize, u64)> {
    let space = addr >> SPACE_SHIFT;
    (space > 0).then(|| ((space - 1) as usize, addr & ((1u64 << SPACE_SHIFT) - 1)))
}

/// Whether a slot number names a store.
pub fn is_store_slot(slot: u32) -> bool {
    slot >= STORE_SLOTS
}

/// A disk as the engine moves it.
pub trait BlockStore: Send + Sync {
    /// The disk's id (`disk0`).
    fn id(&self) -> String;
    /// Blocks of `PAGE_SIZE` bytes (the last one may be partly past the
    /// disk's end, which reads as zeros).
    fn blocks(&self) -> u64;
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Whether the guest may not write it.
    fn readonly(&self) -> bool;
    /// Takes the blocks written (or zeroed) since the last take.
    fn take_written(&self) -> DirtyBitmap;
    /// The blocks a copy that starts from the disk's lower layer must
    /// send: those its top holds (every block of a flat disk).
    fn held_blocks(&self) -> DirtyBitmap;
    /// Reads blocks `first ..` into `buf` (whole blocks, `PAGE_SIZE`
    /// aligned) as the disk holds them now.
    fn read_blocks(&self, first: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// In a pause: protects `blocks` (copy-before-write) until `drain`;
    /// returns how many.
    fn protect(&self, blocks: &DirtyBitmap) -> u64;
    /// Hands each protected block over as it was when protected, in runs
    /// (first block, bytes), lifting the protection.
    fn drain(&self, each: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>)
        -> std::io::Result<()>;
    /// Lifts every protection left (a failed transfer).
    fn unprotect(&self);
    /// Protected blocks the guest wrote before the drain reached them.
    fn saved_blocks(&self) -> u64;
    /// The device, for the operations that know it (a checkpoint's
    /// switch to an overlay, a restore's filler).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Bytes of one store block.
pub const STORE_BLOCK: u64 = PAGE_SIZE;
