//! One running VM as its API sees it: each endpoint's call mapped to the
//! operation that serves it, one operation at a time, every error answered
//! with the status its kind has (`api::error`).
//!
//! This type owns what belongs to the VM's life in this process but not to
//! the VM itself: the one-operation-at-a-time rule, the checkpoint chain
//! the VM extends, the migration in flight, whether a lazy restore is still
//! loading, the test hooks, and the channel that ends the process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::api::error::ErrorBody;
use crate::api::migration::{MigrateRequest, MigrationProgress};
use crate::api::numa::NumaMigrateRequest;
use crate::api::server::ApiHandler;
use crate::api::vm::{
    Cancelled, GuestStatus, MemoryMapEntry, NodeStatus, ResetReport, ResetRequest, ResetStatus,
    StateReply, StatusReport, VmState,
};
use crate::api::{checkpoint::CheckpointRequest, ApiError, Endpoint};
use crate::checkpoint::reset::ResetBase;
use crate::checkpoint::ChainPosition;
use crate::devices::test_device::{ResetLine, ResetRequest as GuestRequest};
use crate::guest::abi::RESET_INPUT_HEADER;
use crate::migration::source::InFlight;
use crate::service::hooks::TestHooks;
use crate::vmm::{RunState, Vm};

/// Why the serving process ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// `stop`, SIGTERM, SIGINT.
    Stop,
    /// The VM left this process (migrated, or checkpointed with
    /// stop-after); what happened, for the user.
    Handed(String),
}

/// The VM's side of the API.
pub struct Vmm {
    vm: Arc<Vm>,
    ending: Mutex<Sender<Ending>>,
    /// Held by the operation that runs (checkpoint, NUMA move, migration,
    /// reset, verify, pause, resume).
    operation: Mutex<()>,
    /// The migration in flight, for `migrate-cancel` and its progress.
    migration: Mutex<Option<Arc<InFlight>>>,
    /// The checkpoint chain the VM's state extends.
    chain: Mutex<ChainPosition>,
    /// A lazy restore is still loading memory in the background.
    loading: Arc<AtomicBool>,
    hooks: TestHooks,
    /// The longest stall the guest felt before the current stall window
    /// (operations restart the guest's own window), µs.
    stall_floor: AtomicU64,
    /// The VM's disks, which `verify` reads.
    disks: crate::devices::Disks,
    /// The checkpoint resets go back to, once the first reset (or
    /// `--reset-base`) armed it.
    reset_base: Mutex<Option<ResetBase>>,
    /// The reset device's line (builtin guests), where guests ask for resets.
    reset_line: Option<Arc<ResetLine>>,
    /// `--reset-input`: the file each reset copies into the guest's input
    /// buffer.
    reset_input: Option<PathBuf>,
    /// Reset counters for `status`.
    reset_stats: Mutex<ResetStats>,
    /// A guest-driven reset waits for, or holds, the operation lock: an
    /// API call then waits for it instead of answering 409 (it lasts
    /// microseconds, and a guest resetting in a loop would otherwise lock
    /// the API out).
    guest_resetting: AtomicBool,
    /// A guest-driven reset of a running VM is in its pause: `status` says
    /// `running` meanwhile (the guest asked for it; the user did not pause).
    reset_pausing: AtomicBool,
}

/// How long the reset worker sleeps between looks at whether its VM is
/// still there (a guest's request wakes it at once).
const RESET_WORKER_POLL: Duration = Duration::from_millis(200);
/// How long the reset worker polls for the guest's next request after a
/// reset before it sleeps: about one iteration of a guest's reset loop.
const RESET_WORKER_SPIN: Duration = Duration::from_millis(2);
/// How often an API call waiting for a guest-driven reset looks again.
const GUEST_RESET_POLL: Duration = Duration::from_micros(50);
/// The window `resets_per_s` is counted over.
const RESET_RATE_WINDOW: Duration = Duration::from_secs(1);

/// What `status` says of resets, kept by the service.
#[derive(Debug, Default)]
struct ResetStats {
    /// The armed base, `DIR@ID` (kept here so that `status` never waits
    /// for an arming or a reset in progress).
    armed: Option<String>,
    resets: u64,
    guest_resets: u64,
    last_us: u64,
    max_us: u64,
    /// The current rate window: when it began and the resets in it.
    window: Option<(Instant, u64)>,
    /// The rate over the last full window, and when it ended.
    rate: Option<(f64, Instant)>,
    input_bytes: u64,
    input_errors: u64,
    input_error: Option<String>,
    /// The latest guest-driven resets' latencies, µs (at most
    /// [`MAX_LATENCIES`], oldest first once wrapped at `next`).
    latencies: Vec<u32>,
    next: usize,
}

/// Guest-driven reset latencies kept for [`Vmm::reset_latencies_us`].
const MAX_LATENCIES: usize = 1 << 17;

impl ResetStats {
    fn count(&mut self, us: u64, guest: bool) {
        self.resets += 1;
        self.last_us = us;
        if guest {
            self.guest_resets += 1;
            self.max_us = self.max_us.max(us);
            let v = u32::try_from(us).unwrap_or(u32::MAX);
            if self.latencies.len() < MAX_LATENCIES {
                self.latencies.push(v);
            } else {
                self.latencies[self.next] = v;
                self.next = (self.next + 1) % MAX_LATENCIES;
            }
        }
        let now = Instant::now();
        let (start, n) = self.window.get_or_insert((now, 0));
        *n += 1;
        let elapsed = now.duration_since(*start);
        if elapsed >= RESET_RATE_WINDOW {
            self.rate = Some((*n as f64 / elapsed.as_secs_f64(), now));
            self.window = Some((now, 0));
        }
    }

    /// Resets per second: over the last full window if it ended lately,
    /// else over the window in progress.
    fn per_s(&self) -> f64 {
        let now = Instant::now();
        match (self.rate, self.window) {
            (Some((r, at)), _) if now.duration_since(at) < 2 * RESET_RATE_WINDOW => r,
            (None, Some((start, n))) if n > 0 => {
                let e = now.duration_since(start).as_secs_f64();
                if e > 0.0 && e < 2.0 * RESET_RATE_WINDOW.as_secs_f64() {
                    n as f64 / e.max(1e-3)
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }
}

/// The JSON body of a reply.
fn json<T: Serialize>(v: T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::failed(format!("cannot encode the reply: {e}")))
}

/// Parses a request body (an empty body means `{}`).
pub fn body<T: DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
    let b = if b.iter().all(|c| c.is_ascii_whitespace()) {
        b"{}" as &[u8]
    } else {
        b
    };
    serde_json::from_slice(b).map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))
}

/// Parses the body of an action that takes one: a JSON object (an empty
/// body means `{}`). serde would also read a struct from an array of its
/// fields in order (`[0]` as `{"to_node": 0}`); the API takes objects only.
pub fn object_body<T: DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
    match b.iter().find(|c| !c.is_ascii_whitespace()) {
        None | Some(b'{') => body(b),
        Some(_) => {
            let what = match serde_json::from_slice::<Value>(b) {
                Ok(Value::Array(_)) => "an array",
                Ok(Value::String(_)) => "a string",
                Ok(Value::Number(_)) => "a number",
                Ok(Value::Bool(_)) => "a boolean",
                Ok(Value::Null) => "null",
                _ => "not JSON",
            };
            Err(ApiError::bad_request(format!(
                "bad request body: expected a JSON object, got {what}"
            )))
        }
    }
}

/// The API's word for a VM's run state.
pub fn api_state(s: RunState) -> VmState {
    match s {
        RunState::Running => VmState::Running,
        RunState::Paused => VmState::Paused,
        RunState::Stopped => VmState::Stopped,
    }
}

/// Takes an operation lock unless another operation holds it. An operation
/// that panicked (the API server turns that into a 500) poisons the lock
/// but holds it no longer: the lock guards no data, so the next operation
/// may go ahead instead of every later request answering "busy".
fn try_take(lock: &Mutex<()>) -> Option<MutexGuard<'_, ()>> {
    match lock.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

impl Vmm {
    /// The API of `vm`, extending `chain`; `ending` ends the process.
    pub fn new(
        vm: Arc<Vm>,
        chain: ChainPosition,
        loading: Arc<AtomicBool>,
        hooks: TestHooks,
        ending: Sender<Ending>,
    ) -> Vmm {
        Vmm {
            vm,
            ending: Mutex::new(ending),
            operation: Mutex::new(()),
            migration: Mutex::new(None),
            chain: Mutex::new(chain),
            loading,
            hooks,
            stall_floor: AtomicU64::new(0),
            disks: Default::default(),
            reset_base: Mutex::new(None),
            reset_line: None,
            reset_input: None,
            reset_stats: Mutex::new(ResetStats::default()),
            guest_resetting: AtomicBool::new(false),
            reset_pausing: AtomicBool::new(false),
        }
    }

    /// The same, with the reset device's line (None: the guest has no reset
    /// device) and the file resets copy into the guest's input buffer.
    pub fn with_reset_device(
        mut self,
        line: Option<Arc<ResetLine>>,
        input: Option<PathBuf>,
    ) -> Vmm {
        self.reset_line = line;
        self.reset_input = input;
        self
    }

    /// Starts the thread that serves the guest's reset requests (none if
    /// the guest has no reset device). It holds the service only while it
    /// resets, and ends once the service is gone.
    pub fn start_reset_worker(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(line) = self.reset_line.clone() else {
            return Ok(());
        };
        let vmm = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("reset".into())
            .spawn(move || {
                let mut spin = Duration::ZERO;
                loop {
                    let req = line.wait_request_spinning(spin, RESET_WORKER_POLL);
                    let Some(vmm) = vmm.upgrade() else { return };
                    // Right after a reset the guest's next request is
                    // likely soon: poll for it a while.
                    spin = Duration::ZERO;
                    if let Some(req) = req {
                        vmm.guest_reset(req);
                        spin = RESET_WORKER_SPIN;
                    }
                }
            })
            .map(|_| ())
    }

    /// Arms resets to `target` now (`--reset-base`): the first reset to it
    /// then rewrites only what changed since.
    pub fn arm_reset(
        &self,
        target: &crate::api::checkpoint::CheckpointTarget,
    ) -> Result<(), ApiError> {
        let base =
            crate::checkpoint::reset::arm(&self.vm, target).map_err(|e| ApiError::from(&e))?;
        let mut held = self.reset_base.lock().unwrap_or_else(|e| e.into_inner());
        self.armed(&base);
        *held = Some(base);
        Ok(())
    }

    /// Records that resets go back to `base` now, for `status` and the
    /// reset device.
    fn armed(&self, base: &ResetBase) {
        let t = base.target();
        self.reset_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .armed = Some(format!("{}@{}", t.dir.display(), t.id));
        if let Some(l) = &self.reset_line {
            l.set_armed(true);
        }
    }

    /// `vm.reset`: arms the checkpoint unless it is armed, then resets.
    fn reset(&self, b: &[u8]) -> Result<Value, ApiError> {
        let req: ResetRequest = object_body(b)?;
        let target: crate::api::checkpoint::CheckpointTarget = req.to.parse()?;
        self.not_loading("a reset")?;
        let _op = self.operation()?;
        self.running_or_paused()?;
        let mut base = self.reset_base.lock().unwrap_or_else(|e| e.into_inner());
        let armed = !base.as_ref().is_some_and(|b| b.holds(&target));
        if armed {
            // Validated in full before anything is touched; the base armed
            // before stays if this one is refused.
            let armed =
                crate::checkpoint::reset::arm(&self.vm, &target).map_err(|e| ApiError::from(&e))?;
            self.armed(&armed);
            *base = Some(armed);
        }
        let base = base.as_ref().expect("armed above");
        let r = self.reset_to(base, armed, None)?;
        json(r)
    }

    /// Serves a guest's request from the reset device: waits for the
    /// operation in progress, then resets to the armed base unless another
    /// reset served the request meanwhile. A request that cannot be served
    /// is dropped (the vCPU goes on by itself after its wait).
    fn guest_reset(&self, req: GuestRequest) {
        let Some(line) = &self.reset_line else { return };
        self.guest_resetting.store(true, Ordering::Release);
        let _op = self.operation.lock().unwrap_or_else(|e| e.into_inner());
        let base = self.reset_base.lock().unwrap_or_else(|e| e.into_inner());
        let served = match base.as_ref() {
            _ if line.wait_request(Duration::ZERO) != Some(req) => Ok(()),
            Some(base)
                if !self.loading.load(Ordering::Acquire)
                    && self.vm.state() != RunState::Stopped =>
            {
                // The operation lock is held: nobody pauses or resumes
                // the VM meanwhile.
                let running = self.vm.state() == RunState::Running;
                self.reset_pausing.store(running, Ordering::Release);
                let r = self.reset_to(base, false, Some(req)).map(|_| ());
                self.reset_pausing.store(false, Ordering::Release);
                r
            }
            _ => Err(ApiError::conflict(
                "no reset base is armed, a lazy restore is loading, or the VM is stopped",
            )),
        };
        if let Err(e) = served {
            line.take_request();
            tracing::warn!("the guest's reset request was not served: {}", e.message);
        }
        self.guest_resetting.store(false, Ordering::Release);
    }

    /// Reads `--reset-input` (None: not given).
    fn read_input(&self) -> Option<Result<Vec<u8>, String>> {
        let path = self.reset_input.as_ref()?;
        Some(
            std::fs::read(path)
                .map_err(|e| format!("cannot read the reset input {}: {e}", path.display())),
        )
    }

    /// Writes the header (`seq`, length) and `input` into the guest's
    /// registered buffer, as a device writes; the input bytes written.
    fn fill_input(&self, seq: u64, input: Option<&[u8]>) -> Result<u64, String> {
        let Some((gpa, size)) = self.reset_line.as_ref().and_then(|l| l.input_buffer()) else {
            return match input {
                Some(_) => Err("the guest registered no input buffer".into()),
                None => Ok(0),
            };
        };
        let size = u64::from(size);
        if size < RESET_INPUT_HEADER {
            return Err(format!(
                "the guest's input buffer at {gpa:#x} has {size} bytes, fewer than its \
                 {RESET_INPUT_HEADER}-byte header"
            ));
        }
        let input = input.unwrap_or_default();
        let n = input.len().min((size - RESET_INPUT_HEADER) as usize);
        let mut buf = Vec::with_capacity(RESET_INPUT_HEADER as usize + n);
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(n as u64).to_le_bytes());
        buf.extend_from_slice(&input[..n]);
        if !self.vm.write_marked(gpa, &buf) {
            return Err(format!(
                "the guest's input buffer {gpa:#x}+{size:#x} is not all guest memory"
            ));
        }
        Ok(n as u64)
    }

    /// Resets to `base` (the operation lock held): the guest's request
    /// waiting, if any, is served by it, and its input buffer is filled
    /// before the vCPUs run again. `guest` is the request this reset was
    /// made for (its latency is counted from it).
    fn reset_to(
        &self,
        base: &ResetBase,
        armed: bool,
        guest: Option<GuestRequest>,
    ) -> Result<ResetReport, ApiError> {
        // Read before the pause: the file's time is not the guest's.
        let input = self.read_input();
        let seq = self
            .reset_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resets
            + 1;
        let mut filled = None;
        let mut in_pause = || {
            if let Some(l) = &self.reset_line {
                l.take_request();
            }
            filled = Some(match &input {
                // The header still goes in (an empty input): the guest
                // learns that it was reset.
                Some(Err(e)) => self.fill_input(seq, None).and(Err(e.clone())),
                Some(Ok(b)) => self.fill_input(seq, Some(b)),
                None => self.fill_input(seq, None),
            });
        };
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let r = crate::checkpoint::reset::reset(&self.vm, base, &mut chain, armed, &mut in_pause)
            .map_err(|e| ApiError::from(&e))?;
        let mut st = self.reset_stats.lock().unwrap_or_else(|e| e.into_inner());
        let us = match guest {
            Some(g) => g.at.elapsed().as_micros() as u64,
            None => r.downtime_us,
        };
        st.count(us, guest.is_some());
        match filled {
            Some(Ok(n)) => st.input_bytes = n,
            Some(Err(e)) => {
                st.input_bytes = 0;
                st.input_errors += 1;
                st.input_error = Some(e);
            }
            None => {}
        }
        Ok(r)
    }

    /// The latencies of the latest guest-driven resets (up to 131072),
    /// µs from the guest's request to its vCPUs running again, and forgets
    /// them: for benchmarks, which want the distribution, not only
    /// `status`'s last and longest.
    pub fn take_reset_latencies_us(&self) -> Vec<u32> {
        let mut st = self.reset_stats.lock().unwrap_or_else(|e| e.into_inner());
        st.next = 0;
        std::mem::take(&mut st.latencies)
    }

    /// The reset part of `status`.
    fn reset_status(&self) -> Option<Box<ResetStatus>> {
        let st = self.reset_stats.lock().unwrap_or_else(|e| e.into_inner());
        let armed = st.armed.clone();
        let (ignored, checks, failed, wrong) = self
            .reset_line
            .as_ref()
            .map(|l| l.counters())
            .unwrap_or_default();
        if armed.is_none() && st.resets == 0 && ignored == 0 && checks == 0 {
            return None;
        }
        Some(Box::new(ResetStatus {
            armed,
            resets: st.resets,
            guest_resets: st.guest_resets,
            resets_per_s: st.per_s(),
            last_reset_us: st.last_us,
            max_reset_us: st.max_us,
            ignored_pokes: ignored,
            guest_checks: checks,
            guest_failed_checks: failed,
            guest_wrong_pages: wrong,
            input_bytes: st.input_bytes,
            input_errors: st.input_errors,
            input_error: st.input_error.clone(),
        }))
    }

    /// The same, with handles on the VM's disks (for `verify`).
    pub fn with_disks(mut self, disks: crate::devices::Disks) -> Vmm {
        self.disks = disks;
        self
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    fn end_process(&self, how: Ending) {
        let _ = self
            .ending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(how);
    }

    fn in_flight(&self) -> Option<Arc<InFlight>> {
        self.migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fails while a lazy restore still loads memory: `what` must wait.
    fn not_loading(&self, what: &str) -> Result<(), ApiError> {
        if self.loading.load(Ordering::Acquire) {
            return Err(ApiError::conflict(format!(
                "guest memory is still being loaded from the checkpoint (lazy restore): {what} \
                 must wait until status shows loading: false"
            )));
        }
        Ok(())
    }

    /// Holds the one-operation lock for the duration of a request. A
    /// guest-driven reset is waited for: it is short, and a guest that
    /// resets in a loop would otherwise keep the API out.
    fn operation(&self) -> Result<MutexGuard<'_, ()>, ApiError> {
        loop {
            if let Some(g) = try_take(&self.operation) {
                return Ok(g);
            }
            if !self.guest_resetting.load(Ordering::Acquire) {
                return Err(ApiError::conflict(
                    "another operation (checkpoint, NUMA move, migration or reset) is in progress",
                ));
            }
            std::thread::sleep(GUEST_RESET_POLL);
        }
    }

    /// Fails unless the VM can still run (not stopped).
    fn running_or_paused(&self) -> Result<(), ApiError> {
        match self.vm.state() {
            RunState::Stopped => Err(ApiError::conflict("the VM is stopped")),
            _ => Ok(()),
        }
    }

    /// The status report.
    pub fn status(&self) -> StatusReport {
        let c = self.vm.config();
        let hosts = self.vm.host_nodes();
        let state = match self.vm.state() {
            RunState::Paused if self.reset_pausing.load(Ordering::Acquire) => RunState::Running,
            s => s,
        };
        StatusReport {
            name: c.name.clone(),
            state: api_state(state),
            stop_reason: self.vm.guest_stop_reason(),
            vcpus: c.vcpus,
            memory_bytes: c.memory_bytes(),
            guest: GuestStatus {
                kind: c.guest.kind().into(),
                progress: crate::guest::progress(&self.vm),
                longest_stall_us: crate::guest::longest_stall_us(&self.vm)
                    .map(|now| now.max(self.stall_floor.load(Ordering::Acquire))),
            },
            numa: c
                .nodes
                .iter()
                .map(|n| NodeStatus {
                    guest_node: n.guest_node,
                    size_bytes: n.size,
                    host_node: hosts[n.guest_node as usize],
                })
                .collect(),
            pid: std::process::id(),
            loading: self.loading.load(Ordering::Acquire),
            devices: Some(self.vm.device_status()).filter(|d| !d.is_empty()),
            disks: crate::checkpoint::disks::disk_status(&self.vm),
            reset: self.reset_status(),
        }
    }

    fn migrate(&self, b: &[u8]) -> Result<Value, ApiError> {
        let req: MigrateRequest = object_body(b)?;
        self.not_loading("a migration")?;
        let _op = self.operation()?;
        self.running_or_paused()?;
        let flight = Arc::new(InFlight::default());
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(flight.clone());
        let r = crate::migration::source::migrate(&self.vm, &req, &flight, &self.disks);
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let r = r.map_err(|e| ApiError::from(&e))?;
        // The VM runs at the destination now; this process ends.
        self.end_process(Ending::Handed(format!(
            "VM '{}' migrated to {} (downtime {} µs); stopping here",
            self.vm.config().name,
            r.to,
            r.downtime_us
        )));
        json(r)
    }

    fn route(&self, ep: Endpoint, b: &[u8]) -> Result<Value, ApiError> {
        let vm = &self.vm;
        match ep {
            Endpoint::Status => json(self.status()),
            Endpoint::Pause => {
                let _: Value = body(b)?;
                let _op = self.operation()?;
                let d = vm.pause_user().map_err(|e| ApiError::from(&e))?;
                json(StateReply {
                    state: api_state(vm.state()),
                    pause_us: Some(d.as_micros() as u64),
                })
            }
            Endpoint::Resume => {
                let _: Value = body(b)?;
                let _op = self.operation()?;
                vm.resume_user().map_err(|e| ApiError::from(&e))?;
                json(StateReply {
                    state: api_state(vm.state()),
                    pause_us: None,
                })
            }
            Endpoint::Stop => {
                let _: Value = body(b)?;
                self.end_process(Ending::Stop);
                json(StateReply {
                    state: VmState::Stopped,
                    pause_us: None,
                })
            }
            Endpoint::Verify => {
                let _: Value = body(b)?;
                let _op = self.operation()?;
                let p = vm.pause().map_err(|e| ApiError::from(&e))?;
                // Paused, the devices are quiesced: the disks hold still.
                let read =
                    |disk: usize, offset: u64, buf: &mut [u8]| self.disks.read(disk, offset, buf);
                let report = crate::guest::verify::verify(&vm.memory(), &read);
                vm.resume(p).map_err(|e| ApiError::from(&e))?;
                json(report)
            }
            Endpoint::Checkpoint => {
                let req: CheckpointRequest = object_body(b)?;
                req.validate()?;
                let _op = self.operation()?;
                self.running_or_paused()?;
                let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
                let stall = StallWindow::open(vm, &self.stall_floor);
                let mut r = crate::checkpoint::create::checkpoint(vm, &mut chain, &req)
                    .map_err(|e| ApiError::from(&e))?;
                r.guest_stall_us = stall.close();
                if req.stop_after {
                    self.end_process(Ending::Handed(format!(
                        "VM '{}' checkpointed to {} and stopped",
                        vm.config().name,
                        r.path.display()
                    )));
                }
                json(r)
            }
            Endpoint::NumaMigrate => {
                let req: NumaMigrateRequest = object_body(b)?;
                req.max_downtime_ms()?;
                self.not_loading("a NUMA move")?;
                let _op = self.operation()?;
                self.running_or_paused()?;
                let stall = StallWindow::open(vm, &self.stall_floor);
                let mut r = crate::numa::numa_migrate(vm, &req, &self.hooks.numa)
                    .map_err(|e| ApiError::from(&e))?;
                r.guest_stall_us = stall.close();
                json(r)
            }
            Endpoint::NumaStat => json(crate::numa::numa_stat(vm).map_err(|e| ApiError::from(&e))?),
            Endpoint::Migrate => self.migrate(b),
            Endpoint::Reset => self.reset(b),
            Endpoint::MigrateCancel => {
                let _: Value = body(b)?;
                let f = self
                    .in_flight()
                    .ok_or_else(|| ApiError::conflict("no migration is in progress"))?;
                f.cancel.cancel("cancelled by migrate-cancel");
                json(Cancelled { cancelled: true })
            }
            Endpoint::Migration => {
                let f = self.in_flight();
                json(MigrationProgress {
                    in_progress: f.is_some(),
                    pages_sent: f.as_ref().map_or(0, |f| f.pages.load(Ordering::Relaxed)),
                    page_bytes_sent: f
                        .as_ref()
                        .map_or(0, |f| f.page_bytes.load(Ordering::Relaxed)),
                    memory_bytes: vm.config().memory_bytes(),
                })
            }
            Endpoint::MemoryMap => {
                let m = vm.memory();
                json(
                    m.nodes
                        .iter()
                        .flat_map(|n| {
                            n.chunks.iter().map(|c| MemoryMapEntry {
                                guest_node: n.guest_node,
                                slot: c.slot,
                                gpa: c.range.start,
                                len: c.range.len,
                                host_addr: c.mapping.as_ptr() as u64,
                            })
                        })
                        .collect::<Vec<_>>(),
                )
            }
        }
    }
}

impl ApiHandler for Vmm {
    fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        match Endpoint::of_request(method, path).and_then(|ep| self.route(ep, body)) {
            Ok(v) => (200, v),
            Err(e) => (e.status(), error_value(&e.message)),
        }
    }
}

/// `{"error": msg}`.
pub fn error_value(msg: &str) -> Value {
    serde_json::to_value(ErrorBody {
        error: msg.to_string(),
    })
    .unwrap_or(Value::Null)
}

/// The guest's longest stall over one operation: the builtin guest's
/// window is restarted when the operation starts and read when it ends.
/// What the guest had felt before goes into `floor`, which `status` adds
/// back, so that its figure keeps meaning "since the guest started".
struct StallWindow<'a> {
    vm: &'a Vm,
    floor: &'a AtomicU64,
}

impl<'a> StallWindow<'a> {
    fn open(vm: &'a Vm, floor: &'a AtomicU64) -> Self {
        if let Some(before) = crate::guest::longest_stall_us(vm) {
            floor.fetch_max(before, Ordering::AcqRel);
        }
        crate::guest::reset_longest_stall(vm);
        StallWindow { vm, floor }
    }

    /// The longest stall during the window, µs.
    fn close(self) -> Option<u64> {
        let during = crate::guest::longest_stall_us(self.vm);
        if let Some(d) = during {
            self.floor.fetch_max(d, Ordering::AcqRel);
        }
        during
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_bodies_are_refused_where_an_object_is_expected() {
        for b in [
            &b"[0]"[..],
            b" [0, null, \"kernel\"]",
            b"0",
            b"\"x\"",
            b"null",
            b"true",
        ] {
            let Err(e) = object_body::<NumaMigrateRequest>(b) else {
                panic!("{} was taken for an object", String::from_utf8_lossy(b));
            };
            assert_eq!(e.status(), 400);
            assert!(
                e.message
                    .starts_with("bad request body: expected a JSON object, got "),
                "{}",
                e.message
            );
        }
        let Ok(r) = object_body::<NumaMigrateRequest>(br#" {"to_node": 3}"#) else {
            panic!("an object was refused");
        };
        assert_eq!(r.to_node, 3);
        // An action that takes no body ignores any JSON it is given.
        assert!(body::<Value>(b"[0]").is_ok());
    }

    #[test]
    fn an_operation_that_panicked_does_not_lock_out_the_next() {
        let lock = Mutex::new(());
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let _g = lock.lock().unwrap();
                panic!("an operation panics while holding the lock");
            })
            .join()
        });
        assert!(lock.is_poisoned());
        let g = try_take(&lock).expect("a poisoned, free lock is taken");
        assert!(try_take(&lock).is_none(), "a held lock is not taken twice");
        drop(g);
        assert!(try_take(&lock).is_some());
    }
}
