//! The guest's COM1: a 16550A UART (vm-superio) on ports 0x3f8–0x3ff and
//! IRQ 4, whose output is the guest console (`--console FILE`, or vmhop's
//! stdout) and whose input is vmhop's stdin when that is a terminal.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::persist::Persist;
use super::DeviceError;
use crate::vmm::bus::{IoAction, PioDevice};

/// First I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Ports a 16550 decodes.
pub const COM1_LEN: u16 = 8;
/// The ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the serial port's interrupt line through an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), std::io::Error> {
        self.0.write(1)
    }
}

/// Where the console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

type Uart = Serial<IrqLine, NoEvents, ConsoleOut>;

/// The UART's registers and unread input, as checkpoints keep them
/// (vm-superio's `SerialState` is not serialisable).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedSerial {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl From<SerialState> for SavedSerial {
    fn from(s: SerialState) -> Self {
        SavedSerial {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SavedSerial> for SerialState {
    fn from(s: &SavedSerial) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1 on the I/O bus.
pub struct SerialPort {
    uart: Mutex<Uart>,
}

impl Persist for SerialPort {
    const TYPE: &'static str = "serial";
    type State = SavedSerial;
    /// The interrupt line it raises and where its output goes.
    type Args = (EventFd, ConsoleOut);

    fn save(&self) -> Result<SavedSerial, DeviceError> {
        let u = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        Ok(SavedSerial::from(u.state()))
    }

    fn restore((irq, out): Self::Args, saved: Option<&SavedSerial>) -> Result<Self, DeviceError> {
        let uart = match saved {
            None => Serial::new(IrqLine(irq), out),
            Some(s) => Serial::from_state(&s.into(), IrqLine(irq), NoEvents, out).map_err(|e| {
                DeviceError::State {
                    device: Self::TYPE.into(),
                    reason: format!("the saved serial port state does not load: {e:?}"),
                }
            })?,
        };
        Ok(SerialPort {
            uart: Mutex::new(uart),
        })
    }

    const LOADS_IN_PLACE: bool = true;

    /// The registers and unread input of `saved`, on the same interrupt
    /// line and console: output the guest wrote since stays written.
    fn load(&self, saved: &SavedSerial) -> Result<(), DeviceError> {
        let bad = |e: String| DeviceError::State {
            device: Self::TYPE.into(),
            reason: format!("the saved serial port state does not load: {e}"),
        };
        let state = SerialState::from(saved);
        let mut u = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let irq = u
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| bad(format!("cannot share its interrupt eventfd: {e}")))?;
        // Checked on a throwaway port first, so that a state that does not
        // load leaves this one as it was.
        let spare = || -> Result<IrqLine, DeviceError> {
            EventFd::new(libc::EFD_NONBLOCK)
                .map(IrqLine)
                .map_err(|e| bad(format!("eventfd: {e}")))
        };
        Serial::from_state(
            &state,
            spare()?,
            NoEvents,
            Box::new(std::io::sink()) as ConsoleOut,
        )
        .map_err(|e| bad(format!("{e:?}")))?;
        let old = std::mem::replace(
            &mut *u,
            Serial::new(spare()?, Box::new(std::io::sink()) as ConsoleOut),
        );
        let out = old.into_writer();
        *u = Serial::from_state(&state, IrqLine(irq), NoEvents, out)
            .map_err(|e| bad(format!("{e:?}")))?;
        Ok(())
    }
}

impl SerialPort {
    /// Feeds bytes typed by the user to the guest; returns how many fitted.
    pub fn input(&self, bytes: &[u8]) -> usize {
        let mut u = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        u.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl PioDevice for SerialPort {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn read(&self, _vcpu: u32, port: u16, data: &mut [u8]) -> IoAction {
        let mut u = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = u.read((port - COM1_PORT) as u8);
        }
        IoAction::Continue
    }

    fn write(&self, _vcpu: u32, port: u16, data: &[u8]) -> IoAction {
        let mut u = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&b) = data.first() {
            // A console that cannot be written (a closed pipe, a full disk)
            // must not stop the guest: its output is lost, nothing else.
            let _ = u.write((port - COM1_PORT) as u8, b);
            if (port - COM1_PORT) == 0 {
                let _ = u.writer_mut().flush();
            }
        }
        IoAction::Continue
    }
}

/// Copies what the user types on a terminal into the guest's serial input
/// (nothing is read when stdin is not a terminal: a script's stdin belongs
/// to the script).
pub fn forward_stdin(port: Arc<SerialPort>) {
    // SAFETY: isatty, tcgetpgrp and getpgrp only inspect the descriptor and
    // this process.
    let foreground = unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() };
    if !foreground {
        return;
    }
    // A job put in the background later must not be stopped by SIGTTIN when
    // this thread reads the terminal: the read fails with EIO instead, and
    // the thread waits until the job is back in the foreground.
    // SAFETY: ignoring a signal has no preconditions.
    unsafe { libc::signal(libc::SIGTTIN, libc::SIG_IGN) };
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: reading into a live stack buffer of its length.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    match std::io::Error::last_os_error().raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::EIO) => {
                            std::thread::sleep(std::time::Duration::from_millis(500));
                            continue;
                        }
                        _ => return,
                    }
                }
                if n == 0 {
                    return;
                }
                let mut left = &buf[..n as usize];
                while !left.is_empty() {
                    let done = port.input(left);
                    left = &left[done..];
                    if done == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_the_data_port_reach_the_console_and_state_round_trips() {
        let out = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let p =
            SerialPort::restore((evt.try_clone().unwrap(), Box::new(out.clone())), None).unwrap();
        p.write(0, COM1_PORT + 3, &[0x03]); // 8N1
        p.write(0, COM1_PORT + 1, &[0x01]); // receive interrupts on
        for b in b"hi" {
            p.write(0, COM1_PORT, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert_eq!(p.input(b"x"), 1);
        assert_eq!(evt.read().unwrap(), 1, "input raised the interrupt line");
        let saved: SavedSerial =
            serde_json::from_value(serde_json::to_value(p.save().unwrap()).unwrap()).unwrap();
        let q = SerialPort::restore((evt, Box::new(Sink::default())), Some(&saved)).unwrap();
        let mut b = [0u8];
        q.read(0, COM1_PORT + 3, &mut b);
        assert_eq!(b[0], 0x03, "line control survived");
        q.read(0, COM1_PORT, &mut b);
        assert_eq!(b[0], b'x', "unread input survived");
    }
}
