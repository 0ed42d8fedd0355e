//! The port-I/O test device the builtin guests call (documented in
//! docs/test-device.md). Its calls only decide what the vCPU thread does
//! next; the thread (in `vmm::vcpu`) carries it out, so a parked vCPU still
//! answers pause and stop at once.
//!
//! It also carries the reset device (docs/reset.md): a guest asks for a
//! reset with an `out`, and the device only hands the request over
//! ([`ResetLine`]) and parks the vCPU; the service's reset worker does the
//! reset, as an API reset does, and fills the input buffer the guest
//! registered here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::persist::Persist;
use super::DeviceError;
use crate::vmm::bus::{GuestFault, IoAction, PioDevice};

pub use crate::guest::abi::*;

/// If a vCPU falls this far behind its pace (it was paused, say), it
/// restarts its pace from now instead of racing to catch up.
const MAX_PACE_LAG: Duration = Duration::from_millis(100);

/// First port of the device and how many it serves.
pub const PORTS: (u16, u16) = (PORT_WAIT, 12);

/// How long a vCPU that asked for a reset waits for it before it goes on
/// by itself (after the `out`, not reset): the reset worker was held up (a
/// long operation held the VM) or refused the reset.
pub const MAX_RESET_WAIT: Duration = Duration::from_secs(1);

/// A guest's request for a reset, waiting for the reset worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetRequest {
    /// When the guest's `out` reached the device.
    pub at: Instant,
    /// The vCPU that asked.
    pub vcpu: u32,
}

/// Where the guest registered its input buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputBuffer {
    /// Bits 0–31 of the address being written.
    pub lo: u32,
    /// Bits 32–63 of it.
    pub hi: u32,
    /// The registered buffer: guest-physical address and size (None: none).
    pub registered: Option<(u64, u32)>,
}

/// What the reset device and the service's reset worker share: whether a
/// reset base is armed, the request waiting, the guest's input buffer, and
/// the counters only the host keeps (a reset puts guest memory back, so
/// the guest cannot count its own resets).
#[derive(Debug, Default)]
pub struct ResetLine {
    armed: AtomicBool,
    pending: Mutex<Option<ResetRequest>>,
    ring: Condvar,
    input: Mutex<InputBuffer>,
    /// Pokes with no base armed.
    ignored: AtomicU64,
    /// Pokes that reported a check, and the pages the checks found wrong.
    checks: AtomicU64,
    check_failures: AtomicU64,
    /// Pokes that reported a check that found a wrong page.
    failed_checks: AtomicU64,
}

impl ResetLine {
    /// A line with nothing armed.
    pub fn new() -> ResetLine {
        ResetLine::default()
    }

    /// Says whether a reset base is armed (the service calls it).
    pub fn set_armed(&self, armed: bool) {
        self.armed.store(armed, Ordering::Release);
    }

    /// Whether a reset base is armed.
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Waits up to `limit` for a guest's request; returns it, left pending
    /// (the reset that serves it takes it, in its pause).
    pub fn wait_request(&self, limit: Duration) -> Option<ResetRequest> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (p, _) = self
            .ring
            .wait_timeout_while(p, limit, |p| p.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *p
    }

    /// [`ResetLine::wait_request`], polling (yielding the CPU) for the
    /// first `spin` before it sleeps: in a guest's reset loop the next
    /// request comes within a fraction of a millisecond of the last reset,
    /// and a worker still on its CPU takes it without a scheduler wakeup.
    pub fn wait_request_spinning(&self, spin: Duration, limit: Duration) -> Option<ResetRequest> {
        let start = Instant::now();
        while start.elapsed() < spin.min(limit) {
            if let Some(r) = *self.pending.lock().unwrap_or_else(|e| e.into_inner()) {
                return Some(r);
            }
            std::thread::yield_now();
        }
        self.wait_request(limit.saturating_sub(start.elapsed()))
    }

    /// Takes the waiting request, if any: the reset in progress serves it.
    pub fn take_request(&self) -> Option<ResetRequest> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The registered input buffer: guest-physical address and size.
    pub fn input_buffer(&self) -> Option<(u64, u32)> {
        self.input
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .registered
    }

    /// The counters: (ignored pokes, checks reported, checks that found a
    /// wrong page, wrong pages found).
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        (
            self.ignored.load(Ordering::Relaxed),
            self.checks.load(Ordering::Relaxed),
            self.failed_checks.load(Ordering::Relaxed),
            self.check_failures.load(Ordering::Relaxed),
        )
    }

    /// A guest's `out` to [`PORT_RESET`] with `value`.
    fn poke(&self, vcpu: u32, value: u32) -> IoAction {
        if value & RESET_CHECKED != 0 {
            let wrong = u64::from(value & !RESET_CHECKED);
            self.checks.fetch_add(1, Ordering::Relaxed);
            if wrong > 0 {
                self.failed_checks.fetch_add(1, Ordering::Relaxed);
                self.check_failures.fetch_add(wrong, Ordering::Relaxed);
            }
        }
        if !self.armed() {
            self.ignored.fetch_add(1, Ordering::Relaxed);
            return IoAction::Continue;
        }
        let at = Instant::now();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(ResetRequest { at, vcpu });
        self.ring.notify_one();
        IoAction::Handoff(at + MAX_RESET_WAIT)
    }

    /// A guest's `out` to one of the input buffer's ports.
    fn register(&self, port: u16, value: u32) {
        let mut b = self.input.lock().unwrap_or_else(|e| e.into_inner());
        match port {
            PORT_RESET_INPUT_LO => b.lo = value,
            PORT_RESET_INPUT_HI => b.hi = value,
            _ => {
                b.registered =
                    (value > 0).then(|| ((u64::from(b.hi) << 32) | u64::from(b.lo), value))
            }
        }
    }
}

/// What a vCPU has written so far about the fault it is reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    rip_lo: u32,
    rip_hi: u32,
    error_code: u32,
}

/// The test device of one VM.
#[derive(Debug)]
pub struct TestDevice {
    /// Pages per second per vCPU, if rate-limited.
    rate_per_vcpu: Option<f64>,
    /// Per vCPU: when its next page is due.
    due: Mutex<Vec<Option<Instant>>>,
    /// Per vCPU: how long its last PACE meant to hold it, µs.
    held_us: Mutex<Vec<u32>>,
    /// Per vCPU: the fault report being written.
    faults: Mutex<Vec<FaultRecord>>,
    /// The reset device's side shared with the service.
    reset: std::sync::Arc<ResetLine>,
}

/// What a checkpoint keeps of the device: each vCPU's fault report in
/// progress (a pause may fall between its writes). Pacing starts afresh:
/// its deadlines are instants of this process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestDeviceState {
    /// Per vCPU, the fault report being written.
    pub faults: Vec<FaultRecord>,
    /// The reset device's input buffer, as the guest registered it.
    #[serde(default)]
    pub reset_input: InputBuffer,
}

impl Persist for TestDevice {
    const TYPE: &'static str = "test-device";
    type State = TestDeviceState;
    /// vCPUs, the pages per second they share (None: no pacing), and the
    /// reset line the service listens on.
    type Args = (u32, Option<u64>, std::sync::Arc<ResetLine>);

    fn save(&self) -> Result<TestDeviceState, DeviceError> {
        Ok(TestDeviceState {
            faults: self
                .faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            reset_input: *self.reset.input.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    fn restore(
        (vcpus, rate, reset): Self::Args,
        state: Option<&TestDeviceState>,
    ) -> Result<TestDevice, DeviceError> {
        let mut faults = vec![FaultRecord::default(); vcpus as usize];
        if let Some(s) = state {
            if s.faults.len() != faults.len() {
                return Err(DeviceError::State {
                    device: Self::TYPE.into(),
                    reason: format!(
                        "it holds {} vCPUs' fault reports, the VM has {vcpus} vCPUs",
                        s.faults.len()
                    ),
                });
            }
            faults.clone_from(&s.faults);
            *reset.input.lock().unwrap_or_else(|e| e.into_inner()) = s.reset_input;
        }
        Ok(TestDevice {
            rate_per_vcpu: rate.map(|r| r as f64 / vcpus as f64),
            due: Mutex::new(vec![None; vcpus as usize]),
            held_us: Mutex::new(vec![0; vcpus as usize]),
            faults: Mutex::new(faults),
            reset,
        })
    }

    const LOADS_IN_PLACE: bool = true;

    fn load(&self, state: &TestDeviceState) -> Result<(), DeviceError> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        if state.faults.len() != faults.len() {
            return Err(DeviceError::State {
                device: Self::TYPE.into(),
                reason: format!(
                    "it holds {} vCPUs' fault reports, the VM has {} vCPUs",
                    state.faults.len(),
                    faults.len()
                ),
            });
        }
        faults.clone_from(&state.faults);
        *self.reset.input.lock().unwrap_or_else(|e| e.into_inner()) = state.reset_input;
        // As after a restore, pacing starts afresh.
        for d in self
            .due
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            *d = None;
        }
        Ok(())
    }
}

impl TestDevice {
    /// A device for `vcpus` vCPUs sharing `rate` pages per second.
    pub fn new(vcpus: u32, rate: Option<u64>) -> Self {
        TestDevice {
            rate_per_vcpu: rate.map(|r| r as f64 / vcpus as f64),
            due: Mutex::new(vec![None; vcpus as usize]),
            held_us: Mutex::new(vec![0; vcpus as usize]),
            faults: Mutex::new(vec![FaultRecord::default(); vcpus as usize]),
            reset: Default::default(),
        }
    }

    /// Pages a vCPU writes between PACE calls: about one call per
    /// millisecond, so pacing is smooth but exits stay cheap.
    pub fn pace_batch(&self) -> u64 {
        crate::guest::abi::pace_batch(self.rate_per_vcpu)
    }

    /// Handles an `out` by vCPU `vcpu`.
    fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) -> IoAction {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(b);
        match port {
            PORT_FAULT_RIP_LO | PORT_FAULT_RIP_HI | PORT_FAULT_ERROR | PORT_FAULT => {
                let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
                let Some(r) = faults.get_mut(vcpu as usize) else {
                    return IoAction::Continue;
                };
                match port {
                    PORT_FAULT_RIP_LO => r.rip_lo = value,
                    PORT_FAULT_RIP_HI => r.rip_hi = value,
                    PORT_FAULT_ERROR => r.error_code = value,
                    _ => {
                        return IoAction::Fault(GuestFault {
                            vector: value as u8,
                            error_code: (value & FAULT_HAS_ERROR != 0).then_some(r.error_code),
                            rip: (r.rip_hi as u64) << 32 | r.rip_lo as u64,
                        })
                    }
                }
                IoAction::Continue
            }
            PORT_WAIT => IoAction::Wait(None),
            PORT_RESET => self.reset.poke(vcpu, value),
            PORT_RESET_INPUT_LO | PORT_RESET_INPUT_HI | PORT_RESET_INPUT_SIZE => {
                self.reset.register(port, value);
                IoAction::Continue
            }
            PORT_PACE => {
                let Some(rate) = self.rate_per_vcpu else {
                    return IoAction::Continue;
                };
                let pages = value.max(1) as f64;
                let now = Instant::now();
                let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
                let slot = &mut due[vcpu as usize];
                let start = match *slot {
                    Some(t) if t + MAX_PACE_LAG > now => t,
                    _ => now,
                };
                let next = start + Duration::from_secs_f64(pages / rate);
                *slot = Some(next);
                let held = next.saturating_duration_since(now).as_micros();
                if let Some(h) = self
                    .held_us
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(vcpu as usize)
                {
                    *h = u32::try_from(held).unwrap_or(u32::MAX);
                }
                if next > now {
                    IoAction::Wait(Some(next))
                } else {
                    IoAction::Continue
                }
            }
            _ => IoAction::Continue,
        }
    }

    /// Handles an `in` by a vCPU, filling `data`.
    fn io_in(&self, vcpu: u32, port: u16, data: &mut [u8]) -> IoAction {
        match port {
            PORT_PACE_HELD => {
                let held = self
                    .held_us
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(vcpu as usize)
                    .copied()
                    .unwrap_or(0)
                    .to_le_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = held.get(i).copied().unwrap_or(0);
                }
                IoAction::Continue
            }
            PORT_RESET => {
                let armed = self.reset.armed();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = u32::from(armed).to_le_bytes().get(i).copied().unwrap_or(0);
                }
                if armed {
                    IoAction::Continue
                } else {
                    IoAction::Wait(Some(
                        Instant::now() + Duration::from_millis(RESET_ARM_POLL_MS),
                    ))
                }
            }
            PORT_ID => {
                let m = DEVICE_MAGIC.to_le_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = m.get(i).copied().unwrap_or(0);
                }
                IoAction::Continue
            }
            _ => {
                data.fill(0xff);
                IoAction::Continue
            }
        }
    }
}

impl PioDevice for TestDevice {
    fn name(&self) -> &'static str {
        "test-device"
    }
    fn read(&self, vcpu: u32, port: u16, data: &mut [u8]) -> IoAction {
        self.io_in(vcpu, port, data)
    }
    fn write(&self, vcpu: u32, port: u16, data: &[u8]) -> IoAction {
        self.io_out(vcpu, port, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_holds_a_vcpu_to_its_rate() {
        let d = TestDevice::new(2, Some(2000));
        assert_eq!(d.pace_batch(), 1);
        // 1000 pages/s per vCPU: after 10 pages the next is due ~10 ms on.
        let a = d.io_out(0, PORT_PACE, &10u32.to_le_bytes());
        match a {
            IoAction::Wait(Some(t)) => {
                let ms = t.duration_since(Instant::now()).as_millis();
                assert!((5..=10).contains(&ms), "{ms}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fault_report_stops_the_vm_with_its_vector_error_code_and_rip() {
        let d = TestDevice::new(2, None);
        let out = |port, v: u32| d.io_out(1, port, &v.to_le_bytes());
        assert_eq!(out(PORT_FAULT_RIP_LO, 0x0001_0023), IoAction::Continue);
        assert_eq!(out(PORT_FAULT_RIP_HI, 0x1), IoAction::Continue);
        assert_eq!(out(PORT_FAULT_ERROR, 0x18), IoAction::Continue);
        assert_eq!(
            out(PORT_FAULT, 13 | FAULT_HAS_ERROR),
            IoAction::Fault(GuestFault {
                vector: 13,
                error_code: Some(0x18),
                rip: 0x1_0001_0023,
            })
        );
        let IoAction::Fault(f) = out(PORT_FAULT, 6) else {
            panic!("PORT_FAULT must stop the VM");
        };
        assert_eq!(f.error_code, None, "bit 8 clear: no error code");
        // Another vCPU's report is its own.
        let IoAction::Fault(f) = d.io_out(0, PORT_FAULT, &32u32.to_le_bytes()) else {
            panic!("PORT_FAULT must stop the VM");
        };
        assert_eq!(f.rip, 0);
    }

    #[test]
    fn reset_pokes_are_ignored_until_armed_then_handed_off_once() {
        let d = TestDevice::new(2, None);
        let line = d.reset.clone();
        let poke = |vcpu, v: u32| d.io_out(vcpu, PORT_RESET, &v.to_le_bytes());
        assert_eq!(poke(0, 0), IoAction::Continue, "not armed: ignored");
        assert_eq!(line.counters(), (1, 0, 0, 0));
        assert!(
            line.take_request().is_none(),
            "an ignored poke asks nothing"
        );
        // Unarmed, `in` reads 0 after a short wait; armed, 1 at once.
        let mut b = [0xffu8; 4];
        assert!(matches!(
            d.io_in(0, PORT_RESET, &mut b),
            IoAction::Wait(Some(_))
        ));
        assert_eq!(u32::from_le_bytes(b), 0);
        line.set_armed(true);
        assert_eq!(d.io_in(0, PORT_RESET, &mut b), IoAction::Continue);
        assert_eq!(u32::from_le_bytes(b), 1);
        // Armed: handed off, and a second vCPU's poke joins the request.
        assert!(matches!(poke(0, RESET_CHECKED | 3), IoAction::Handoff(_)));
        assert!(matches!(poke(1, RESET_CHECKED), IoAction::Handoff(_)));
        let r = line.wait_request(Duration::ZERO).expect("a request waits");
        assert_eq!(r.vcpu, 0, "the first poke's request is the one served");
        assert_eq!(line.take_request(), Some(r));
        assert!(line.take_request().is_none());
        // Checks reported: two, one of which found 3 wrong pages.
        assert_eq!(line.counters(), (1, 2, 1, 3));
    }

    #[test]
    fn the_input_buffer_registers_and_travels_with_the_state() {
        let d = TestDevice::new(1, None);
        let out = |port, v: u32| d.io_out(0, port, &v.to_le_bytes());
        assert_eq!(d.reset.input_buffer(), None);
        out(PORT_RESET_INPUT_LO, 0xa1000);
        out(PORT_RESET_INPUT_HI, 1);
        out(PORT_RESET_INPUT_SIZE, 4096);
        assert_eq!(d.reset.input_buffer(), Some((0x1_000a_1000, 4096)));
        let saved = d.save().unwrap();
        out(PORT_RESET_INPUT_SIZE, 0);
        assert_eq!(d.reset.input_buffer(), None, "size 0 unregisters");
        d.load(&saved).unwrap();
        assert_eq!(d.reset.input_buffer(), Some((0x1_000a_1000, 4096)));
        let line = std::sync::Arc::new(ResetLine::new());
        let restored = TestDevice::restore((1, None, line.clone()), Some(&saved)).unwrap();
        assert_eq!(restored.reset.input_buffer(), Some((0x1_000a_1000, 4096)));
    }

    #[test]
    fn unlimited_guest_never_waits_and_wait_port_parks() {
        let d = TestDevice::new(1, None);
        assert_eq!(d.pace_batch(), 0);
        assert_eq!(d.io_out(0, PORT_PACE, &[1, 0, 0, 0]), IoAction::Continue);
        assert_eq!(d.io_out(0, PORT_WAIT, &[0]), IoAction::Wait(None));
        let mut b = [0u8; 4];
        d.io_in(0, PORT_ID, &mut b);
        assert_eq!(u32::from_le_bytes(b), DEVICE_MAGIC);
    }
}
