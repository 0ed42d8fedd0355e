//! A read-only CMOS real-time clock on ports 0x70/0x71 that tells the time
//! of the host (UTC). Linux reads it once at boot for the wall clock; with
//! no device there every register reads 0xff, the "update in progress" bit
//! never clears and the guest's clock starts in an invalid year.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

use super::persist::Persist;
use super::DeviceError;
use crate::vmm::bus::{IoAction, PioDevice};

/// The index port.
pub const INDEX_PORT: u16 = 0x70;
/// The data port.
pub const DATA_PORT: u16 = 0x71;

/// The clock: only its index register is state.
#[derive(Default)]
pub struct Cmos {
    index: AtomicU8,
}

/// What a checkpoint keeps of the clock: the register the guest selected
/// (the time itself is the host's when read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The index register.
    pub index: u8,
}

impl Persist for Cmos {
    const TYPE: &'static str = "cmos";
    type State = CmosState;
    type Args = ();

    fn save(&self) -> Result<CmosState, DeviceError> {
        Ok(CmosState {
            index: self.index.load(Ordering::Relaxed),
        })
    }

    fn restore((): (), state: Option<&CmosState>) -> Result<Cmos, DeviceError> {
        Ok(Cmos {
            index: AtomicU8::new(state.map_or(0, |s| s.index)),
        })
    }

    const LOADS_IN_PLACE: bool = true;

    fn load(&self, state: &CmosState) -> Result<(), DeviceError> {
        self.index.store(state.index, Ordering::Relaxed);
        Ok(())
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// The value of CMOS register `reg` at `now` (seconds since the epoch).
fn register(reg: u8, now: u64) -> u8 {
    let (y, mo, d) = crate::util::civil_from_days((now / 86_400) as i64);
    let secs = now % 86_400;
    match reg {
        0x00 => bcd(secs % 60),
        0x02 => bcd(secs / 60 % 60),
        0x04 => bcd(secs / 3600),
        0x06 => bcd((now / 86_400 + 4) % 7 + 1),
        0x07 => bcd(d.into()),
        0x08 => bcd(mo.into()),
        0x09 => bcd(y as u64 % 100),
        0x32 => bcd(y as u64 / 100),
        // Register A: no update in progress, 32 kHz base.
        0x0a => 0x26,
        // Register B: 24-hour mode, BCD.
        0x0b => 0x02,
        // Register D: the battery is fine.
        0x0d => 0x80,
        _ => 0,
    }
}

impl PioDevice for Cmos {
    fn name(&self) -> &'static str {
        "cmos"
    }

    fn read(&self, _vcpu: u32, port: u16, data: &mut [u8]) -> IoAction {
        data.fill(0);
        if port == DATA_PORT {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if let Some(b) = data.first_mut() {
                *b = register(self.index.load(Ordering::Relaxed) & 0x7f, now);
            }
        }
        IoAction::Continue
    }

    fn write(&self, _vcpu: u32, port: u16, data: &[u8]) -> IoAction {
        if port == INDEX_PORT {
            if let Some(&b) = data.first() {
                self.index.store(b, Ordering::Relaxed);
            }
        }
        IoAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_tell_a_known_date_in_bcd() {
        // 2026-12-02 00:29:42 UTC, a Wednesday.
        let t = 1_796_171_382;
        assert_eq!(register(0x09, t), 0x26);
        assert_eq!(register(0x32, t), 0x20);
        assert_eq!(register(0x08, t), 0x12);
        assert_eq!(register(0x07, t), 0x02);
        assert_eq!(register(0x04, t), 0x00);
        assert_eq!(register(0x02, t), 0x29);
        assert_eq!(register(0x00, t), 0x42);
        assert_eq!(register(0x06, t), 0x04);
        assert_eq!(register(0x0a, t) & 0x80, 0, "no update in progress");
    }
}
