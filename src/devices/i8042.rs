//! The keyboard controller (vm-superio's i8042) on ports 0x60 and 0x64.
//! vmhop needs it for one thing: a guest's `reboot` pulses the CPU reset
//! line through it (command 0xfe), which ends the VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::{I8042Device, Trigger};

use super::persist::Persist;
use super::DeviceError;
use crate::vmm::bus::{GuestExit, IoAction, PioDevice};

/// The controller's data port.
pub const DATA_PORT: u16 = 0x60;
/// Its command/status port.
pub const COMMAND_PORT: u16 = 0x64;

/// Remembers that the guest pulsed the reset line.
#[derive(Default, Clone)]
pub struct ResetLine(Arc<AtomicBool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The i8042 on the I/O bus. It keeps no state worth saving: vm-superio's
/// model only answers status reads and the reset command.
pub struct Keyboard {
    dev: Mutex<I8042Device<ResetLine>>,
    reset: ResetLine,
}

/// What a checkpoint keeps of the controller: nothing (vm-superio's model
/// holds no state between accesses), saved so that every device is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyboardState {}

impl Persist for Keyboard {
    const TYPE: &'static str = "i8042";
    type State = KeyboardState;
    type Args = ();

    fn save(&self) -> Result<KeyboardState, DeviceError> {
        Ok(KeyboardState {})
    }

    /// A controller with its reset line low.
    fn restore((): (), _: Option<&KeyboardState>) -> Result<Keyboard, DeviceError> {
        let reset = ResetLine::default();
        Ok(Keyboard {
            dev: Mutex::new(I8042Device::new(reset.clone())),
            reset,
        })
    }

    const LOADS_IN_PLACE: bool = true;

    /// As restored: a controller with its reset line low (a reset the
    /// guest pulsed after the checkpoint is undone with the rest).
    fn load(&self, _: &KeyboardState) -> Result<(), DeviceError> {
        self.reset.0.store(false, Ordering::SeqCst);
        *self.dev.lock().unwrap_or_else(|e| e.into_inner()) = I8042Device::new(self.reset.clone());
        Ok(())
    }
}

impl PioDevice for Keyboard {
    fn name(&self) -> &'static str {
        "i8042"
    }

    fn read(&self, _vcpu: u32, port: u16, data: &mut [u8]) -> IoAction {
        let mut d = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = d.read((port - DATA_PORT) as u8);
        }
        IoAction::Continue
    }

    fn write(&self, _vcpu: u32, port: u16, data: &[u8]) -> IoAction {
        let mut d = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&b) = data.first() {
            let _ = d.write((port - DATA_PORT) as u8, b);
        }
        if self.reset.0.swap(false, Ordering::SeqCst) {
            IoAction::Exit(GuestExit::Reboot)
        } else {
            IoAction::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm_as_a_reboot() {
        let k = Keyboard::restore((), None).unwrap();
        assert_eq!(k.write(0, COMMAND_PORT, &[0x20]), IoAction::Continue);
        assert_eq!(
            k.write(0, COMMAND_PORT, &[0xfe]),
            IoAction::Exit(GuestExit::Reboot)
        );
    }
}
