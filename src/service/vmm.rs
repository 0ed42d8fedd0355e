//! One running VM as its API sees it: each endpoint's call mapped to the
//! operation that serves it, one operation at a time, every error answered
//! with the status its kind has (`api::error`).
//!
//! This type owns what belongs to the VM's life in this process but not to
//! the VM itself: the one-operation-at-a-time rule, the checkpoint chain
//! the VM extends, the migration in flight, whether a lazy restore is still
//! loading, the test hooks, and the channel that ends the process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::api::error::ErrorBody;
use crate::api::migration::{MigrateRequest, MigrationProgress};
use crate::api::numa::NumaMigrateRequest;
use crate::api::server::ApiHandler;
use crate::api::vm::{
    Cancelled, GuestStatus, MemoryMapEntry, NodeStatus, ResetRequest, StateReply, StatusReport,
    VmState,
};
use crate::api::{checkpoint::CheckpointRequest, ApiError, Endpoint};
use crate::checkpoint::ChainPosition;
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
    reset_base: Mutex<Option<crate::checkpoint::reset::ResetBase>>,
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
        }
    }

    /// Arms resets to `target` now (`--reset-base`): the first reset to it
    /// then rewrites only what changed since.
    pub fn arm_reset(
        &self,
        target: &crate::api::checkpoint::CheckpointTarget,
    ) -> Result<(), ApiError> {
        let base =
            crate::checkpoint::reset::arm(&self.vm, target).map_err(|e| ApiError::from(&e))?;
        *self.reset_base.lock().unwrap_or_else(|e| e.into_inner()) = Some(base);
        Ok(())
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
            *base = Some(
                crate::checkpoint::reset::arm(&self.vm, &target).map_err(|e| ApiError::from(&e))?,
            );
        }
        let base = base.as_ref().expect("armed above");
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let r = crate::checkpoint::reset::reset(&self.vm, base, &mut chain, armed)
            .map_err(|e| ApiError::from(&e))?;
        json(r)
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

    /// Holds the one-operation lock for the duration of a request.
    fn operation(&self) -> Result<MutexGuard<'_, ()>, ApiError> {
        try_take(&self.operation).ok_or_else(|| {
            ApiError::conflict(
                "another operation (checkpoint, NUMA move, migration or reset) is in progress",
            )
        })
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
        StatusReport {
            name: c.name.clone(),
            state: api_state(self.vm.state()),
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
