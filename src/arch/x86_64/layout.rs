//! Where the machine puts its virtio-mmio devices: a 4 KiB window each in
//! the MMIO hole below 4 GiB, and an IOAPIC line each above the ISA ones.
//! The devices are placed (`crate::devices`) and described to Linux (the
//! DSDT, `super::acpi`) from this one list, so the two cannot disagree.

use crate::memory::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// First virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Bytes of one window (the virtio-mmio register file and its
/// configuration space).
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// The GSI of the first device: the IOAPIC's lines 16–23 are free (0–15
/// are ISA's, identity-mapped).
pub const VIRTIO_GSI_BASE: u32 = 16;
/// Most virtio devices: one per free IOAPIC line.
pub const MAX_VIRTIO_DEVICES: usize = 8;

const _: () = assert!(
    VIRTIO_MMIO_BASE >= MMIO_HOLE_START
        && VIRTIO_MMIO_BASE + MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_WINDOW <= MMIO_HOLE_END
);

/// One virtio device's place in the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Its window's first guest-physical address.
    pub base: u64,
    /// Its window's length.
    pub len: u64,
    /// Its interrupt line (a GSI of the IOAPIC).
    pub gsi: u32,
}

/// The places of `count` virtio devices, in order; None if there are more
/// than the machine has room for.
pub fn virtio_slots(count: usize) -> Option<Vec<VirtioSlot>> {
    (count <= MAX_VIRTIO_DEVICES).then(|| {
        (0..count)
            .map(|i| VirtioSlot {
                base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_WINDOW,
                len: VIRTIO_MMIO_WINDOW,
                gsi: VIRTIO_GSI_BASE + i as u32,
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_do_not_overlap_and_stop_at_the_machine_s_room() {
        let s = virtio_slots(MAX_VIRTIO_DEVICES).unwrap();
        for w in s.windows(2) {
            assert_eq!(w[0].base + w[0].len, w[1].base);
            assert_eq!(w[0].gsi + 1, w[1].gsi);
        }
        assert!(s.last().unwrap().gsi < 24, "the IOAPIC has 24 lines");
        assert!(virtio_slots(MAX_VIRTIO_DEVICES + 1).is_none());
        assert_eq!(virtio_slots(0), Some(vec![]));
    }
}
