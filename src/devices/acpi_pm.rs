//! The HW-reduced ACPI power-management registers the FADT announces
//! (`crate::arch::x86_64::acpi`): the sleep control register, whose S5
//! write is the guest's `poweroff`, and the reset register, whose write is
//! its `reboot`. Both end the VM.

use serde::{Deserialize, Serialize};

use super::persist::Persist;
use super::DeviceError;
use crate::arch::x86_64::acpi::{
    RESET_PORT, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
use crate::vmm::bus::{GuestExit, IoAction, PioDevice};

/// SLP_EN: the write carries out the sleep.
const SLEEP_ENABLE: u8 = 1 << 5;

/// The power-management device (stateless).
#[derive(Default)]
pub struct AcpiPm;

/// What a checkpoint keeps of it: nothing, saved so that every device is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {}

impl Persist for AcpiPm {
    const TYPE: &'static str = "acpi-pm";
    type State = AcpiPmState;
    type Args = ();

    fn save(&self) -> Result<AcpiPmState, DeviceError> {
        Ok(AcpiPmState {})
    }

    fn restore((): (), _: Option<&AcpiPmState>) -> Result<AcpiPm, DeviceError> {
        Ok(AcpiPm)
    }

    const LOADS_IN_PLACE: bool = true;

    /// Nothing to load: the device keeps no state.
    fn load(&self, _: &AcpiPmState) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl AcpiPm {
    /// The ports it serves: (first, count) per register.
    pub fn ports() -> [(u16, u16); 3] {
        [
            (SLEEP_CONTROL_PORT, 1),
            (SLEEP_STATUS_PORT, 1),
            (RESET_PORT, 1),
        ]
    }
}

impl PioDevice for AcpiPm {
    fn name(&self) -> &'static str {
        "acpi-pm"
    }

    fn read(&self, _vcpu: u32, _port: u16, data: &mut [u8]) -> IoAction {
        // Nothing is ever pending: no wake status, no sleep in progress.
        data.fill(0);
        IoAction::Continue
    }

    fn write(&self, _vcpu: u32, port: u16, data: &[u8]) -> IoAction {
        let v = data.first().copied().unwrap_or(0);
        match port {
            SLEEP_CONTROL_PORT if v & SLEEP_ENABLE != 0 && (v >> 2) & 7 == S5_SLEEP_TYPE => {
                IoAction::Exit(GuestExit::PowerOff)
            }
            RESET_PORT if v == RESET_VALUE => IoAction::Exit(GuestExit::Reboot),
            _ => IoAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_write_powers_off_and_reset_value_reboots() {
        let pm = AcpiPm;
        let s5 = (S5_SLEEP_TYPE << 2) | SLEEP_ENABLE;
        assert_eq!(
            pm.write(0, SLEEP_CONTROL_PORT, &[s5]),
            IoAction::Exit(GuestExit::PowerOff)
        );
        assert_eq!(
            pm.write(0, SLEEP_CONTROL_PORT, &[S5_SLEEP_TYPE << 2]),
            IoAction::Continue,
            "without SLP_EN nothing happens"
        );
        assert_eq!(
            pm.write(0, RESET_PORT, &[RESET_VALUE]),
            IoAction::Exit(GuestExit::Reboot)
        );
    }
}
