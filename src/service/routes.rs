//! Maps API requests to VM operations. Each route parses its body, runs the
//! operation and returns its report; errors become `{"error": ...}` with a
//! status that says whose fault it was (4xx: the request or the VM's state;
//! 5xx: the operation failed).

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::server::{error_body, ApiHandler};
use super::{GuestStatus, MemoryMapEntry, NodeStatus, StateReply, StatusReport, PREFIX};
use crate::migration::source::{InFlight, MigrateError, MigrateRequest};
use crate::vmm::{RunState, Vm};

/// The VMM side of the API for one VM.
pub struct Routes {
    vm: Arc<Vm>,
    shutdown: Mutex<Sender<()>>,
    /// The migration in flight, for `migrate-cancel` and its progress.
    migration: Mutex<Option<Arc<InFlight>>>,
}

/// An error with its HTTP status.
pub struct ApiError(pub u16, pub String);

type Reply = Result<Value, ApiError>;

fn json<T: Serialize>(v: T) -> Reply {
    serde_json::to_value(v).map_err(|e| ApiError(500, format!("cannot encode the reply: {e}")))
}

/// Parses a request body (an empty body means `{}`).
pub fn body<T: DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
    let b = if b.iter().all(|c| c.is_ascii_whitespace()) {
        b"{}" as &[u8]
    } else {
        b
    };
    serde_json::from_slice(b).map_err(|e| ApiError(400, format!("bad request body: {e}")))
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
            Err(ApiError(
                400,
                format!("bad request body: expected a JSON object, got {what}"),
            ))
        }
    }
}

impl Routes {
    /// Routes for `vm`; `stop` ends the `run` process.
    pub fn new(vm: Arc<Vm>, shutdown: Sender<()>) -> Routes {
        Routes {
            vm,
            shutdown: Mutex::new(shutdown),
            migration: Mutex::new(None),
        }
    }

    fn end_process(&self) {
        let _ = self
            .shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(());
    }

    fn in_flight(&self) -> Option<Arc<InFlight>> {
        self.migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn migrate(&self, b: &[u8]) -> Reply {
        let req: MigrateRequest = object_body(b)?;
        let vm = &self.vm;
        if vm.is_loading() {
            return Err(ApiError(
                409,
                "guest memory is still being loaded from the checkpoint (lazy restore): a migration must wait until status shows loading: false".into(),
            ));
        }
        let _op = self.operation()?;
        self.running_or_paused()?;
        let flight = Arc::new(InFlight::default());
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(flight.clone());
        let r = crate::migration::source::migrate(vm, &req, &flight);
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match r {
            Ok(r) => {
                // The VM runs at the destination now; this process ends.
                eprintln!(
                    "vmhop: VM '{}' migrated to {} (downtime {} µs); stopping here",
                    vm.config().name,
                    r.to,
                    r.downtime_us
                );
                self.end_process();
                json(r)
            }
            Err(e @ MigrateError::Invalid(_)) => Err(ApiError(400, e.to_string())),
            Err(e) => Err(ApiError(500, e.to_string())),
        }
    }

    /// The status report.
    pub fn status(&self) -> StatusReport {
        let c = self.vm.config();
        let hosts = self.vm.host_nodes();
        // One memory guard at a time: a guard held across `progress` (which
        // takes its own) would deadlock against a waiting writer
        // (`Vm::replace_chunk`), since the lock lets writers go first.
        let memory_bytes = self.vm.memory().size();
        StatusReport {
            name: c.name.clone(),
            state: self.vm.state(),
            stop_reason: self.vm.guest_stop_reason(),
            vcpus: c.vcpus,
            memory_bytes,
            guest: GuestStatus {
                kind: c.guest.kind().into(),
                progress: self.vm.progress(),
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
            loading: self.vm.is_loading(),
        }
    }

    fn route(&self, method: &str, path: &str, b: &[u8]) -> Reply {
        let Some(ep) = path.strip_prefix(PREFIX).and_then(|p| p.strip_prefix('/')) else {
            return Err(ApiError(
                404,
                format!("no such endpoint: {path} (endpoints start with {PREFIX}/)"),
            ));
        };
        let vm = &self.vm;
        match (method, ep) {
            ("GET", "vm.status") => json(self.status()),
            ("PUT", "vm.pause") => {
                let _: Value = body(b)?;
                let _op = self.operation()?;
                let d = vm.pause_user().map_err(|e| ApiError(409, e.to_string()))?;
                json(StateReply {
                    state: vm.state(),
                    pause_us: Some(d.as_micros() as u64),
                })
            }
            ("PUT", "vm.resume") => {
                let _: Value = body(b)?;
                let _op = self.operation()?;
                vm.resume_user().map_err(|e| ApiError(409, e.to_string()))?;
                json(StateReply {
                    state: vm.state(),
                    pause_us: None,
                })
            }
            ("PUT", "vm.migrate") => self.migrate(b),
            ("PUT", "vm.migrate-cancel") => {
                let _: Value = body(b)?;
                let f = self
                    .in_flight()
                    .ok_or_else(|| ApiError(409, "no migration is in progress".into()))?;
                f.cancel.cancel("cancelled by migrate-cancel");
                json(serde_json::json!({"cancelled": true}))
            }
            ("GET", "vm.migration") => {
                let f = self.in_flight();
                json(serde_json::json!({
                    "in_progress": f.is_some(),
                    "pages_sent": f.as_ref().map_or(0, |f| f.pages.load(std::sync::atomic::Ordering::Relaxed)),
                    "page_bytes_sent": f.as_ref().map_or(0, |f| f.page_bytes.load(std::sync::atomic::Ordering::Relaxed)),
                    "memory_bytes": vm.memory().size(),
                }))
            }
            ("PUT", "vm.stop") => {
                let _: Value = body(b)?;
                self.end_process();
                json(StateReply {
                    state: RunState::Stopped,
                    pause_us: None,
                })
            }
            ("PUT", "vm.verify") => {
                let _: Value = body(b)?;
                let _op = self.operation()?;
                let p = vm.pause().map_err(|e| ApiError(409, e.to_string()))?;
                let report = crate::guest::verify::verify(&vm.memory());
                vm.resume(p).map_err(|e| ApiError(500, e.to_string()))?;
                json(report)
            }
            ("PUT", "vm.numa-migrate") => {
                let req: crate::numa::NumaMigrateRequest = object_body(b)?;
                if vm.is_loading() {
                    return Err(ApiError(
                        409,
                        "guest memory is still being loaded from the checkpoint (lazy restore): a NUMA move must wait until status shows loading: false".into(),
                    ));
                }
                let _op = self.operation()?;
                self.running_or_paused()?;
                match crate::numa::numa_migrate(vm, &req) {
                    Ok(r) => json(r),
                    Err(e @ crate::numa::NumaMoveError::Invalid(_)) => {
                        Err(ApiError(400, e.to_string()))
                    }
                    Err(e) => Err(ApiError(500, e.to_string())),
                }
            }
            ("PUT", "vm.checkpoint") => {
                let req: crate::checkpoint::create::CheckpointRequest = object_body(b)?;
                let _op = self.operation()?;
                self.running_or_paused()?;
                let r = crate::checkpoint::create::checkpoint(vm, &req)
                    .map_err(|e| ApiError(500, e.to_string()))?;
                if req.stop_after {
                    self.end_process();
                }
                json(r)
            }
            ("GET", "vm.numa-stat") => {
                json(crate::numa::numa_stat(vm).map_err(|e| ApiError(500, e))?)
            }
            ("GET", "debug.memory-map") => {
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
            (
                _,
                "vm.status" | "vm.pause" | "vm.resume" | "vm.stop" | "vm.verify"
                | "vm.numa-migrate" | "vm.numa-stat" | "vm.checkpoint" | "debug.memory-map"
                | "vm.migrate" | "vm.migrate-cancel" | "vm.migration",
            ) => Err(ApiError(405, format!("{method} is not allowed on {path}"))),
            _ => Err(ApiError(404, format!("no such endpoint: {path}"))),
        }
    }

    /// Fails unless the VM can still run (not stopped).
    fn running_or_paused(&self) -> Result<(), ApiError> {
        match self.vm.state() {
            RunState::Stopped => Err(ApiError(409, "the VM is stopped".into())),
            _ => Ok(()),
        }
    }

    /// Holds the one-operation lock for the duration of a request.
    fn operation(&self) -> Result<std::sync::MutexGuard<'_, ()>, ApiError> {
        self.vm.try_operation().ok_or_else(|| {
            ApiError(
                409,
                "another operation (checkpoint, NUMA move or migration) is in progress".into(),
            )
        })
    }
}

impl ApiHandler for Routes {
    fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        match self.route(method, path, body) {
            Ok(v) => (200, v),
            Err(ApiError(code, msg)) => (code, error_body(msg)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::NumaMigrateRequest;

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
            assert_eq!(e.0, 400);
            assert!(
                e.1.starts_with("bad request body: expected a JSON object, got "),
                "{}",
                e.1
            );
        }
        let Ok(r) = object_body::<NumaMigrateRequest>(br#" {"to_node": 3}"#) else {
            panic!("an object was refused");
        };
        assert_eq!(r.to_node, 3);
        // An action that takes no body ignores any JSON it is given.
        assert!(body::<Value>(b"[0]").is_ok());
    }
}
