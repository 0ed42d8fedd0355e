//! The builtin guests' side of the test device: its ports, what each
//! carries, and how often a paced guest calls PACE. The device
//! (`devices::test_device`) implements this; the guest programs emit it.
//! Documented in docs/test-device.md.

/// `out` here: park this vCPU until the VMM wakes it (pause, resume, stop).
/// The idle guest's "wait".
pub const PORT_WAIT: u16 = 0x0e80;
/// `out` here with eax = pages written since the last call: the device
/// holds the vCPU back so that the guest keeps to its configured rate.
pub const PORT_PACE: u16 = 0x0e81;
/// `in` here reads [`DEVICE_MAGIC`]: lets a guest find the device.
pub const PORT_ID: u16 = 0x0e82;
/// What `in` from [`PORT_ID`] returns ("VMHP").
pub const DEVICE_MAGIC: u32 = 0x504d_4856;
/// `out` here (dword): low half of the RIP of the fault about to be
/// reported by [`PORT_FAULT`].
pub const PORT_FAULT_RIP_LO: u16 = 0x0e83;
/// `out` here (dword): high half of that RIP.
pub const PORT_FAULT_RIP_HI: u16 = 0x0e84;
/// `out` here (dword): the error code the CPU pushed for that fault.
pub const PORT_FAULT_ERROR: u16 = 0x0e85;
/// `out` here (dword): the guest took an exception or interrupt it cannot
/// handle; bits 0–7 the vector, bit 8 set when the error code written to
/// [`PORT_FAULT_ERROR`] is valid. The VM stops with the fault as its stop
/// reason. The builtin guests' IDT handlers call it.
pub const PORT_FAULT: u16 = 0x0e86;
/// `in` here (dword): the microseconds this vCPU's last PACE meant to hold
/// it back (0 when it did not), so the guest can tell its pacing from a
/// stall: the time a pause or a busy host added to the PACE is not in it.
pub const PORT_PACE_HELD: u16 = 0x0e87;
/// The reset device (docs/reset.md). `out` here (dword): reset the VM to
/// its armed reset base now. The `out` is retired first and the vCPU
/// parks; vmhop resets the whole VM (memory, vCPUs, devices, the input
/// buffer filled) before any vCPU runs again, so the guest goes on from
/// the checkpoint's state. With no base armed the poke is ignored and
/// counted, and the guest goes on after the `out`. The value reports the
/// guest's own check since its last reset: bit 31 set when it checked,
/// bits 0–30 the pages it found wrong (counted in `status`).
///
/// `in` here (dword): 1 if a reset base is armed; otherwise the vCPU
/// waits up to [`RESET_ARM_POLL_MS`] ms and reads 0 (a guest polls for
/// arming without burning a host CPU).
pub const PORT_RESET: u16 = 0x0e88;
/// `out` here (dword): bits 0–31 of the input buffer's guest-physical
/// address, for [`PORT_RESET_INPUT_SIZE`].
pub const PORT_RESET_INPUT_LO: u16 = 0x0e89;
/// `out` here (dword): bits 32–63 of that address.
pub const PORT_RESET_INPUT_HI: u16 = 0x0e8a;
/// `out` here (dword): registers the input buffer (the address written
/// to the two ports before) with this size in bytes; 0 unregisters it.
/// At every reset vmhop writes at its start a `u64` sequence number (the
/// guest-driven resets so far), a `u64` input length, then the input.
pub const PORT_RESET_INPUT_SIZE: u16 = 0x0e8b;
/// How long an `in` from [`PORT_RESET`] waits for arming, ms.
pub const RESET_ARM_POLL_MS: u64 = 10;
/// Bit of a [`PORT_RESET`] value: the guest checked its memory since its
/// last reset (bits 0–30: the pages it found wrong).
pub const RESET_CHECKED: u32 = 1 << 31;
/// Bytes of the header vmhop writes at the start of the input buffer.
pub const RESET_INPUT_HEADER: u64 = 16;

/// Bit of a [`PORT_FAULT`] value: the vector has an error code.
pub const FAULT_HAS_ERROR: u32 = 1 << 8;

/// Pages a vCPU writes between two PACE calls at `rate_per_vcpu` pages per
/// second (0: unpaced): about one call per millisecond, so pacing is
/// smooth but exits stay cheap.
pub fn pace_batch(rate_per_vcpu: Option<f64>) -> u64 {
    match rate_per_vcpu {
        None => 0,
        Some(r) => ((r / 1000.0) as u64).clamp(1, 256),
    }
}
