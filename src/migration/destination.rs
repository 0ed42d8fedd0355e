//! The destination of a host migration: listens, authenticates a source,
//! receives its configuration, memory and state, and only then creates and
//! runs the VM.
//!
//! Memory arrives into mappings of its own, bound to this host's nodes;
//! the VM is created from the state at `done` and adopts those pages
//! (moved under its slots, not copied). A stream that fails in any way —
//! garbage, a cut link, an abort, a state that does not load — frees
//! everything and runs nothing; the listener then waits for the next
//! source (or, with `once`, gives up).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::compress::decode_pages;
use super::protocol::{AckKind, Frame, FrameStream};
use super::{handshake_as_destination, Conn, Listener, Security};
use crate::devices::{Console, Devices};
use crate::memory::{GuestMemory, Mapping, PAGE_SIZE};
use crate::vmm::state::STATE_VERSION;
use crate::vmm::{Start, Vm, VmConfig, VmState};

/// How long each read of the handshake may wait.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source may stay silent mid-stream.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the destination does with a VM it receives.
#[derive(Debug, Clone, Default)]
pub struct IncomingOptions {
    /// Guest node → this host's node, overriding the source's binding.
    pub rebind: BTreeMap<u32, u32>,
    /// Give up after the first failed source instead of waiting for another.
    pub once: bool,
}

/// Called with the VM once it runs here, before the source hears so, and
/// with `None` if the source then could not be told (the VM is shut down).
pub type OnArrival = Box<dyn Fn(Option<&Arc<Vm>>) + Send + Sync>;

/// Progress of an incoming migration, for `status`.
#[derive(Default)]
pub struct IncomingStatus {
    /// Where the current source connects from.
    pub peer: Mutex<Option<String>>,
    /// Bytes received from it so far.
    pub bytes: AtomicU64,
    /// Pages written into guest memory so far.
    pub pages: AtomicU64,
    /// Why the last source failed, if one did.
    pub last_error: Mutex<Option<String>>,
    /// Hands the API over to the VM before the source is told it runs here,
    /// so that its `migrate` never returns before this side answers as the
    /// VM.
    pub on_arrival: Mutex<Option<OnArrival>>,
}

impl std::fmt::Debug for IncomingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingStatus")
            .field("peer", &self.peer)
            .field("bytes", &self.bytes)
            .field("pages", &self.pages)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

impl IncomingStatus {
    fn arrived(&self, vm: Option<&Arc<Vm>>) {
        if let Some(f) = &*self.on_arrival.lock().unwrap_or_else(|e| e.into_inner()) {
            f(vm);
        }
    }
}

/// The `status` of a destination still waiting for its VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IncomingReport {
    /// The VM name it will have (its configuration comes with the stream).
    pub name: String,
    /// Always "incoming".
    pub state: String,
    /// Where it listens.
    pub listening: String,
    /// The source sending now, if any.
    pub source: Option<String>,
    /// Bytes received from it.
    pub bytes_received: u64,
    /// Pages received from it.
    pub pages_received: u64,
    /// Why the last source failed.
    pub last_error: Option<String>,
    /// vmhop's process id.
    pub pid: u32,
}

/// What the destination did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReceiveReport {
    /// Always "incoming-migration".
    pub operation: String,
    /// Where the VM came from.
    pub source: String,
    /// Bytes received.
    pub bytes_received: u64,
    /// Pages received (zero runs included).
    pub pages_received: u64,
    /// From `done` until the VM ran here, ms.
    pub start_ms: f64,
}

/// One source failed; nothing of it runs here.
#[derive(Debug, thiserror::Error)]
#[error("incoming migration from {peer}: {reason}")]
pub struct ReceiveError {
    /// Where it came from.
    pub peer: String,
    /// What failed.
    pub reason: String,
}

/// Accepts sources on `listener` until one delivers a VM, which then runs
/// here. A failed source is reported on stderr and in `status`, and the
/// next is awaited, unless `opts.once`.
pub fn receive(
    listener: &Listener,
    security: &Security,
    opts: &IncomingOptions,
    status: &IncomingStatus,
    console: &Console,
) -> Result<(Arc<Vm>, Devices, ReceiveReport), ReceiveError> {
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                let err = ReceiveError {
                    peer: listener.local_address().to_string(),
                    reason: e.to_string(),
                };
                if opts.once {
                    return Err(err);
                }
                eprintln!("vmhop: {err}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = conn.peer();
        *status.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer.clone());
        status.bytes.store(0, Ordering::Relaxed);
        status.pages.store(0, Ordering::Relaxed);
        match receive_one(conn, security, opts, status, console) {
            Ok(r) => return Ok(r),
            Err(reason) => {
                let err = ReceiveError { peer, reason };
                *status.peer.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *status.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(err.to_string());
                if opts.once {
                    return Err(err);
                }
                eprintln!("vmhop: {err}; nothing runs from it, waiting for another source");
            }
        }
    }
}

/// The configuration a source sent, with this host's bindings applied.
fn accept_config(bytes: &[u8], opts: &IncomingOptions) -> Result<VmConfig, String> {
    let mut config: VmConfig = serde_json::from_slice(bytes)
        .map_err(|e| format!("the configuration it sent is not a vmhop VM: {e}"))?;
    let count = config.nodes.len();
    for (&g, &h) in &opts.rebind {
        let node = config.nodes.get_mut(g as usize).ok_or_else(|| {
            format!("--numa names guest node {g}, but the VM has {count} guest node(s)")
        })?;
        node.host_node = Some(h);
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// Guest memory being received: one mapping per chunk, bound like the VM's.
struct Staged {
    memory: GuestMemory,
}

impl Staged {
    fn new(config: &VmConfig) -> Result<Staged, String> {
        let hosts = Vm::host_nodes_for(config).map_err(|e| e.to_string())?;
        let memory = Vm::memory_for(config, &hosts).map_err(|e| e.to_string())?;
        Ok(Staged { memory })
    }

    /// The mapping and offset of `pages` pages at `gpa`, within one chunk.
    fn place(&self, gpa: u64, pages: u64) -> Result<(&Mapping, usize, usize), String> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .filter(|_| gpa.is_multiple_of(PAGE_SIZE))
            .ok_or_else(|| format!("a page run at {gpa:#x} of {pages} pages is malformed"))?;
        let c = self
            .memory
            .chunk_of(gpa)
            .filter(|c| gpa.checked_add(len).is_some_and(|e| e <= c.range.end()))
            .ok_or_else(|| {
                format!("pages at {gpa:#x}+{len:#x} lie outside the VM's guest memory")
            })?;
        Ok((&c.mapping, (gpa - c.range.start) as usize, len as usize))
    }

    /// The mappings in guest-physical order, for the VM to adopt.
    fn into_mappings(self) -> Vec<Mapping> {
        self.memory
            .nodes
            .into_iter()
            .flat_map(|n| n.chunks.into_iter().map(|c| c.mapping))
            .collect()
    }
}

fn receive_one(
    conn: Box<dyn Conn>,
    security: &Security,
    opts: &IncomingOptions,
    status: &IncomingStatus,
    console: &Console,
) -> Result<(Arc<Vm>, Devices, ReceiveReport), String> {
    let peer = conn.peer();
    let auth = handshake_as_destination(conn, security, HANDSHAKE_TIMEOUT)
        .map_err(|e| format!("authentication failed: {e}"))?;
    auth.conn
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut s = auth.into_frames();
    // Tell the source why, then fail: it keeps its VM running.
    let refuse = |s: &mut FrameStream<Box<dyn Conn>>, why: String| -> String {
        let _ = s.write_frame(&Frame::Error(why.clone()));
        let _ = s.flush();
        why
    };
    let config = match s.read_frame() {
        Ok(Frame::Config(bytes)) => match accept_config(&bytes, opts) {
            Ok(c) => c,
            Err(why) => return Err(refuse(&mut s, why)),
        },
        Ok(f) => {
            return Err(refuse(
                &mut s,
                format!("expected config first, got {}", f.kind_name()),
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    let staged = match Staged::new(&config) {
        Ok(m) => m,
        Err(why) => return Err(refuse(&mut s, format!("cannot hold the VM here: {why}"))),
    };
    s.write_frame(&Frame::Ack {
        what: AckKind::Config,
    })
    .and_then(|_| s.flush())
    .map_err(|e| e.to_string())?;
    let mut state = None;
    let mut pages = 0u64;
    loop {
        let frame = s.read_frame().map_err(|e| e.to_string())?;
        status.bytes.store(s.bytes_read(), Ordering::Relaxed);
        match frame {
            Frame::Pages {
                gpa,
                encoding,
                count,
                data,
            } => {
                let (m, off, len) = staged.place(gpa, count as u64)?;
                // SAFETY: `place` checked the range lies inside the mapping.
                // Only this thread knows the staged memory's address and no
                // guest runs on it yet, so nothing else reads or writes it
                // while this slice lives.
                let dst = unsafe { std::slice::from_raw_parts_mut(m.as_ptr().add(off), len) };
                decode_pages(encoding, &data, dst)
                    .map_err(|e| format!("pages at {gpa:#x}: {e}"))?;
                pages += count as u64;
            }
            Frame::Zero { gpa, pages: n } => {
                let (m, off, len) = staged.place(gpa, n)?;
                m.discard_range(off, len).map_err(|e| e.to_string())?;
                pages += n;
            }
            Frame::EndOfRound { .. } => {
                s.write_frame(&Frame::Ack {
                    what: AckKind::Round,
                })
                .and_then(|_| s.flush())
                .map_err(|e| e.to_string())?;
            }
            Frame::State(bytes) => state = Some(bytes),
            Frame::Done => break,
            Frame::Abort(why) => return Err(format!("the source aborted: {why}")),
            f => {
                return Err(refuse(
                    &mut s,
                    format!("unexpected {} frame", f.kind_name()),
                ))
            }
        }
        status.pages.store(pages, Ordering::Relaxed);
    }
    let t = Instant::now();
    let Some(state) = state else {
        return Err(refuse(&mut s, "done without a state frame".into()));
    };
    let mut state: VmState = match serde_json::from_slice(&state) {
        Ok(st) => st,
        Err(e) => return Err(refuse(&mut s, format!("the VM state is unreadable: {e}"))),
    };
    if state.version > STATE_VERSION {
        return Err(refuse(
            &mut s,
            format!(
                "the VM state is version {}, this vmhop reads up to version {STATE_VERSION}",
                state.version
            ),
        ));
    }
    let vm = match start(config, &mut state, staged, console) {
        Ok(v) => v,
        Err(why) => return Err(refuse(&mut s, format!("the VM does not start here: {why}"))),
    };
    status.arrived(Some(&vm.0));
    let acked = s
        .write_frame(&Frame::Ack {
            what: AckKind::Done,
        })
        .and_then(|_| s.flush());
    if let Err(e) = acked {
        // The source did not hear that the VM runs here: it resumes its
        // own, so this one must not run.
        status.arrived(None);
        vm.0.shutdown();
        return Err(format!("confirming the VM runs here failed: {e}"));
    }
    Ok((
        vm.0,
        vm.1,
        ReceiveReport {
            operation: "incoming-migration".into(),
            source: peer,
            bytes_received: s.bytes_read(),
            pages_received: pages,
            start_ms: t.elapsed().as_secs_f64() * 1e3,
        },
    ))
}

/// Creates the VM from its state, adopting the received memory, and runs it.
fn start(
    config: VmConfig,
    state: &mut VmState,
    staged: Staged,
    console: &Console,
) -> Result<(Arc<Vm>, Devices), String> {
    let mut devs =
        crate::devices::build(&config, console, &state.devices).map_err(|e| e.to_string())?;
    let set = std::mem::take(&mut devs.set);
    let mut mappings = Some(staged.into_mappings());
    let load: crate::vmm::vm::Loader<'_> = Box::new(move |m: &GuestMemory| {
        let staged = mappings.take().ok_or("memory adopted twice")?;
        for (c, s) in m.chunks().zip(staged) {
            c.mapping
                .take_pages_of(s)
                .map_err(|e| format!("adopting guest memory at {:#x}: {e}", c.range.start))?;
        }
        Ok(())
    });
    let vm = Vm::new(
        config,
        Start::Restore {
            vcpus: std::mem::take(&mut state.vcpus),
            machine: state.machine.take().map(Box::new),
            load,
            dirty_log: false,
        },
        false,
        set,
    )
    .map_err(|e| e.to_string())?;
    Ok((vm, devs))
}
