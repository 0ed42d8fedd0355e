//! The destination of a host migration: listens, authenticates a source,
//! receives its configuration, memory and state, and only then creates and
//! runs the VM.
//!
//! Memory arrives into mappings of its own, bound to this host's nodes;
//! at `done` the source's VM has [`Arrived`]: the service creates the VM
//! from its state, which adopts those pages (moved under its slots, not
//! copied), then confirms it to the source, or refuses the source if the
//! VM does not start. A stream that fails in any way — garbage, a cut
//! link, an abort, a state that does not load — frees everything and runs
//! nothing; the service then waits for the next source (or gives up).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::compress::{decode_pages, DecodeError};
use super::gather::{gather, read_lane, GatherError, Lanes, StepError};
use super::landing::{ApplyError, Landing, PrefaultThread};
use super::protocol::{AckKind, Frame, FrameStream, ProtocolError, Received};
use super::storage::{relocate, Copies, Placement, StorageError};
use super::{handshake_as_destination, AuthError, Conn, Listener, Security, TransportError};
use crate::memory::{GuestMemory, Mapping, MappingError, PAGE_SIZE};
use crate::vmm::vm::Loader;
use crate::vmm::{ConfigError, Vm, VmConfig, VmError, VmState};

/// How long each read of the handshake may wait.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source may stay silent mid-stream.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a source's other connections may take to arrive after its
/// connection 0.
const GATHER_TIMEOUT: Duration = Duration::from_secs(10);
/// When connection 0 fails, how long the others' readers may take to
/// report a failure of their own (the cause, more often than not).
const LANE_FAILURE_GRACE: Duration = Duration::from_millis(200);

/// What the destination does with a VM it receives.
#[derive(Debug, Clone, Default)]
pub struct IncomingOptions {
    /// Guest node → this host's node, overriding the source's binding.
    pub rebind: BTreeMap<u32, u32>,
    /// `--disk id=NAME,path=FILE`: where each disk lives here (shared
    /// storage at another path), or the new file a disk sent with
    /// `--copy-storage` is written to.
    pub disks: Vec<Placement>,
}

/// Progress of an incoming migration, for `status`.
#[derive(Debug, Default)]
pub struct IncomingStatus {
    /// Where the current source connects from.
    pub peer: Mutex<Option<String>>,
    /// Bytes received from it so far.
    pub bytes: AtomicU64,
    /// Pages written into guest memory so far.
    pub pages: AtomicU64,
    /// Why the last source failed, if one did.
    pub last_error: Mutex<Option<String>>,
}

impl IncomingStatus {
    /// Records that a source failed.
    pub fn failed(&self, e: &ReceiveError) {
        *self.peer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }
}

pub use crate::api::migration::ReceiveReport;

/// One source failed; nothing of it runs here.
#[derive(Debug, thiserror::Error)]
#[error("incoming migration from {peer}: {failure}")]
pub struct ReceiveError {
    /// Where it came from.
    pub peer: String,
    /// What failed.
    #[source]
    pub failure: ReceiveFailure,
}

/// What made a source's VM not arrive (or not start) here.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveFailure {
    /// Accepting a connection failed.
    #[error(transparent)]
    Accept(#[from] TransportError),
    /// The source did not authenticate.
    #[error("authentication failed: {0}")]
    Auth(#[source] AuthError),
    /// The connection's read timeout could not be set.
    #[error("setting the connection's read timeout: {0}")]
    Timeout(#[source] std::io::Error),
    /// The stream broke or carried a bad frame.
    #[error(transparent)]
    Stream(#[from] ProtocolError),
    /// The configuration the source sent cannot run here.
    #[error(transparent)]
    Config(#[from] ConfigRefused),
    /// The first frame was not the configuration.
    #[error("expected config first, got {0}")]
    NotConfigFirst(&'static str),
    /// This host cannot give the VM its memory.
    #[error("cannot hold the VM here: {0}")]
    CannotHold(#[source] VmError),
    /// A run of pages does not fit the VM's memory.
    #[error(transparent)]
    Place(#[from] PlaceError),
    /// A `Pages` frame's data does not decode.
    #[error("pages at {gpa:#x}: {source}")]
    Decode {
        /// Its first page.
        gpa: u64,
        /// The decoder's error.
        #[source]
        source: DecodeError,
    },
    /// Zero pages could not be dropped from the staged memory.
    #[error("zero pages at {gpa:#x}: {source}")]
    Discard {
        /// Their first page.
        gpa: u64,
        /// madvise's error.
        #[source]
        source: MappingError,
    },
    /// The source gave up and said why.
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// A frame the destination does not take mid-stream.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// `done` came before any state.
    #[error("done without a state frame")]
    NoState,
    /// The state does not deserialize.
    #[error("the VM state is unreadable: {0}")]
    State(#[source] serde_json::Error),
    /// The VM arrived but this host did not start it (the service's reason).
    #[error("{0}")]
    NotStarted(String),
    /// The source could not be told that its VM runs here.
    #[error("confirming the VM runs here failed: {0}")]
    Confirm(#[source] ProtocolError),
    /// The disks cannot be placed or written here.
    #[error("--copy-storage: {0}")]
    Storage(#[from] StorageError),
    /// Disk blocks came without a `storage` frame announcing the disks.
    #[error("disk blocks at {0:#x} arrived, but the source announced no disks to copy")]
    UnannouncedStorage(u64),
    /// The migration's connections did not all arrive.
    #[error("the source's connections: {0}")]
    Gather(#[from] GatherError),
    /// Its other connections did not keep step with connection 0.
    #[error(transparent)]
    Connections(#[from] StepError),
    /// A reader thread could not start.
    #[error("starting a receiver thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl From<ApplyError> for ReceiveFailure {
    fn from(e: ApplyError) -> ReceiveFailure {
        match e {
            ApplyError::Place(p) => ReceiveFailure::Place(p),
            ApplyError::Decode { gpa, source } => ReceiveFailure::Decode { gpa, source },
            ApplyError::Discard { gpa, source } => ReceiveFailure::Discard { gpa, source },
        }
    }
}

/// Why the configuration a source sent is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigRefused {
    /// It is not a vmhop configuration.
    #[error("the configuration it sent is not a vmhop VM: {0}")]
    Unreadable(#[source] serde_json::Error),
    /// `--numa` re-binds a guest node the VM does not have.
    #[error("--numa names guest node {node}, but the VM has {count} guest node(s)")]
    NoGuestNode {
        /// The node named.
        node: u32,
        /// The VM's guest nodes.
        count: usize,
    },
    /// It does not validate (with this host's bindings).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

pub use super::landing::PlaceError;

/// Moving the received memory under the new VM's slots failed.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The loader ran twice (a vmhop bug).
    #[error("memory adopted twice")]
    Twice,
    /// A chunk's pages could not be moved.
    #[error("adopting guest memory at {gpa:#x}: {source}")]
    Take {
        /// The chunk's first page.
        gpa: u64,
        /// mremap's error.
        #[source]
        source: MappingError,
    },
}

/// A source's VM that arrived whole: its configuration, its state and its
/// memory, with the stream still open to confirm or refuse it.
pub struct Arrived {
    /// The VM's configuration, with this host's bindings applied.
    pub config: VmConfig,
    state: Option<VmState>,
    staged: Option<Staged>,
    stream: FrameStream<Box<dyn Conn>>,
    peer: String,
    pages: u64,
    done_at: Instant,
    /// The disks sent with `--copy-storage`: removed unless the VM is
    /// confirmed.
    copies: Option<Copies>,
}

impl Arrived {
    /// Where it came from.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The saved state, and the loader that moves the received memory under
    /// the new VM's slots; once.
    pub fn take_start(&mut self) -> (VmState, Loader<'static>) {
        let state = self.state.take().expect("take_start is called once");
        let mut mappings = self.staged.take().map(Staged::into_mappings);
        let load: Loader<'static> = Box::new(move |m: &GuestMemory| {
            let staged = mappings.take().ok_or(AdoptError::Twice)?;
            for (c, s) in m.chunks().zip(staged) {
                c.mapping
                    .take_pages_of(s)
                    .map_err(|source| AdoptError::Take {
                        gpa: c.range.start,
                        source,
                    })?;
            }
            Ok(())
        });
        (state, load)
    }

    /// Before the VM is built: makes the copied disks durable and lets go
    /// of their locks, for the VM's devices to take. They are still
    /// removed if the VM is refused.
    pub fn hand_over_disks(&mut self) -> Result<(), StorageError> {
        self.copies.as_ref().map_or(Ok(()), Copies::hand_over)
    }

    /// Tells the source its VM does not start here (it runs on there).
    pub fn refuse(mut self, why: String) -> ReceiveError {
        let _ = self.stream.write_frame(&Frame::Error(why.clone()));
        let _ = self.stream.flush();
        ReceiveError {
            peer: self.peer,
            failure: ReceiveFailure::NotStarted(why),
        }
    }

    /// Tells the source its VM runs here; the source then stops its own.
    /// If the source cannot be told, it resumes its VM: the caller must then
    /// shut this one down.
    pub fn confirm(mut self) -> Result<ReceiveReport, ReceiveError> {
        let start_ms = self.done_at.elapsed().as_secs_f64() * 1e3;
        self.stream
            .write_frame(&Frame::Ack {
                what: AckKind::Done,
            })
            .and_then(|_| self.stream.flush())
            .map_err(|e| ReceiveError {
                peer: self.peer.clone(),
                failure: ReceiveFailure::Confirm(e),
            })?;
        // The source heard it: its VM (and its writes to its disks) end,
        // and the copies are the disks from now on.
        let copied_disks = match self.copies.as_mut() {
            Some(c) => {
                c.keep();
                c.list()
            }
            None => Vec::new(),
        };
        Ok(ReceiveReport {
            operation: "incoming-migration".into(),
            source: self.peer,
            bytes_received: self.stream.bytes_read(),
            pages_received: self.pages,
            start_ms,
            copied_disks,
        })
    }
}

/// Accepts sources on `listener` until one delivers a whole VM; a source
/// that fails is reported in `status` and the next one is waited for.
/// Errors only when accepting itself fails.
pub fn receive(
    listener: &Listener,
    security: &Security,
    opts: &IncomingOptions,
    status: &IncomingStatus,
) -> Result<Arrived, ReceiveError> {
    let conn = listener.accept().map_err(|e| ReceiveError {
        peer: listener.local_address().to_string(),
        failure: e.into(),
    })?;
    let peer = conn.peer();
    *status.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer.clone());
    status.bytes.store(0, Ordering::Relaxed);
    status.pages.store(0, Ordering::Relaxed);
    receive_one(listener, conn, security, opts, status)
        .map_err(|failure| ReceiveError { peer, failure })
}

/// The configuration a source sent, with this host's bindings applied.
fn accept_config(bytes: &[u8], opts: &IncomingOptions) -> Result<VmConfig, ConfigRefused> {
    let mut config: VmConfig = serde_json::from_slice(bytes).map_err(ConfigRefused::Unreadable)?;
    let count = config.nodes.len();
    for (&g, &h) in &opts.rebind {
        let node = config
            .nodes
            .get_mut(g as usize)
            .ok_or(ConfigRefused::NoGuestNode { node: g, count })?;
        node.host_node = Some(h);
    }
    config.validate()?;
    Ok(config)
}

/// Guest memory being received: one mapping per chunk, bound like the VM's.
struct Staged {
    memory: GuestMemory,
}

impl Staged {
    fn new(config: &VmConfig) -> Result<Staged, VmError> {
        let hosts = Vm::host_nodes_for(config)?;
        let memory = Vm::memory_for(config, &hosts)?;
        Ok(Staged { memory })
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
    listener: &Listener,
    conn: Box<dyn Conn>,
    security: &Security,
    opts: &IncomingOptions,
    status: &IncomingStatus,
) -> Result<Arrived, ReceiveFailure> {
    let peer = conn.peer();
    let auth = handshake_as_destination(conn, security, HANDSHAKE_TIMEOUT)
        .map_err(ReceiveFailure::Auth)?;
    let link = auth.binding.link;
    auth.conn
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(ReceiveFailure::Timeout)?;
    let mut s = auth.into_frames();
    // Tell the source why, then fail: it keeps its VM running.
    let refuse = |s: &mut FrameStream<Box<dyn Conn>>, why: ReceiveFailure| -> ReceiveFailure {
        let _ = s.write_frame(&Frame::Error(why.to_string()));
        let _ = s.flush();
        why
    };
    let others = match gather(listener, security, &link, HANDSHAKE_TIMEOUT, GATHER_TIMEOUT) {
        Ok(o) => o,
        Err(why) => return Err(refuse(&mut s, why.into())),
    };
    let mut config = match s.read_frame()? {
        Frame::Config(bytes) => match accept_config(&bytes, opts) {
            Ok(c) => c,
            Err(why) => return Err(refuse(&mut s, why.into())),
        },
        f => {
            return Err(refuse(
                &mut s,
                ReceiveFailure::NotConfigFirst(f.kind_name()),
            ))
        }
    };
    if let Err(why) = relocate(&mut config, &opts.disks) {
        return Err(refuse(&mut s, why.into()));
    }
    let staged = match Staged::new(&config) {
        Ok(m) => m,
        Err(why) => return Err(refuse(&mut s, ReceiveFailure::CannotHold(why))),
    };
    let mut cut = Vec::new();
    let mut lane_streams = Vec::new();
    for a in others {
        cut.push(a.conn.shutdown_handle().map_err(ReceiveFailure::Timeout)?);
        a.conn
            .set_read_timeout(Some(IDLE_TIMEOUT))
            .map_err(ReceiveFailure::Timeout)?;
        lane_streams.push(a.into_frames());
    }
    s.write_frame(&Frame::Ack {
        what: AckKind::Config,
    })
    .and_then(|_| s.flush())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let lanes = Lanes::new(rx, link.count, cut);
    let counters = Counters::default();
    // SAFETY: the staged memory outlives the helper (dropped at the end of
    // this function, before `staged` moves on).
    let prefault = unsafe { PrefaultThread::start() };
    let received = std::thread::scope(|scope| {
        for (i, lane) in lane_streams.into_iter().enumerate() {
            let index = i as u32 + 1;
            let tx = tx.clone();
            let counters = &counters;
            // SAFETY: no guest runs on the staged memory yet, and within a
            // round the source sends each page once, over one connection.
            let landing =
                unsafe { Landing::new(&staged.memory, prefault.as_ref().and_then(|p| p.handle())) };
            let spawned = std::thread::Builder::new()
                .name(format!("incoming-lane{index}"))
                .spawn_scoped(scope, move || {
                    read_lane(index, lane, landing, &tx, &counters.pages, &counters.bytes)
                });
            if let Err(e) = spawned {
                lanes.cut();
                return Err(ReceiveFailure::Thread(e));
            }
        }
        drop(tx);
        // SAFETY: as for the lanes' landings above.
        let landing =
            unsafe { Landing::new(&staged.memory, prefault.as_ref().and_then(|p| p.handle())) };
        let r = receive_stream(
            &mut s,
            landing,
            &lanes,
            &mut config,
            opts,
            status,
            &counters,
        );
        if r.is_err() {
            // The other connections' readers may be waiting: end them.
            lanes.cut();
        }
        // A failure another connection saw is the one to report: the
        // source's abort, or a cut, on connection 0 follows from it.
        r.map_err(|e| match lanes.failure_within(LANE_FAILURE_GRACE) {
            Some(first) => first.into(),
            None => e,
        })
    });
    drop(prefault);
    let (state, pages, copies) = match received {
        Ok(r) => r,
        Err(why @ (ReceiveFailure::Aborted(_) | ReceiveFailure::Stream(_))) => return Err(why),
        Err(why) => return Err(refuse(&mut s, why)),
    };
    let done_at = Instant::now();
    let Some(state) = state else {
        return Err(refuse(&mut s, ReceiveFailure::NoState));
    };
    let state: VmState = match serde_json::from_slice(&state) {
        Ok(st) => st,
        Err(e) => return Err(refuse(&mut s, ReceiveFailure::State(e))),
    };
    Ok(Arrived {
        config,
        state: Some(state),
        staged: Some(staged),
        stream: s,
        peer,
        pages,
        done_at,
        copies,
    })
}

/// Pages and bytes the other connections received.
#[derive(Default)]
struct Counters {
    pages: AtomicU64,
    bytes: AtomicU64,
}

/// What connection 0 delivered by its `done`: the state, the pages
/// received over every connection, the disks' copies.
type Delivered = (Option<Vec<u8>>, u64, Option<Copies>);

/// Reads connection 0 until `done`: pages into `landing`, disk blocks into
/// their copies, and at each round's end (and at `done`) waits for the
/// other connections to be there too before answering.
fn receive_stream(
    s: &mut FrameStream<Box<dyn Conn>>,
    mut landing: Landing<'_>,
    lanes: &Lanes,
    config: &mut VmConfig,
    opts: &IncomingOptions,
    status: &IncomingStatus,
    counters: &Counters,
) -> Result<Delivered, ReceiveFailure> {
    let mut state = None;
    let mut pages = 0u64;
    let mut copies: Option<Copies> = None;
    let mut decoded = Vec::new();
    let show = |s: &FrameStream<Box<dyn Conn>>, pages: u64| {
        let others = counters.bytes.load(Ordering::Relaxed);
        status
            .bytes
            .store(s.bytes_read() + others, Ordering::Relaxed);
        let others = counters.pages.load(Ordering::Relaxed);
        status.pages.store(pages + others, Ordering::Relaxed);
    };
    loop {
        let frame = match s.read_into(&mut landing)? {
            Received::Placed { count, .. } => {
                pages += u64::from(count);
                show(s, pages);
                continue;
            }
            Received::Frame(f) => f,
        };
        match frame {
            Frame::Pages {
                gpa,
                encoding,
                count,
                data,
            } if Copies::is_disk_address(gpa) => {
                let c = copies
                    .as_mut()
                    .ok_or(ReceiveFailure::UnannouncedStorage(gpa))?;
                let len = (count as u64 * PAGE_SIZE) as usize;
                decoded.resize(len, 0);
                decode_pages(encoding, &data, &mut decoded)
                    .map_err(|source| ReceiveFailure::Decode { gpa, source })?;
                c.write(gpa, &decoded)?;
                pages += count as u64;
            }
            Frame::Pages {
                gpa,
                encoding,
                count,
                data,
            } => {
                landing.decode(gpa, encoding, count, &data)?;
                s.recycle(data);
                pages += count as u64;
            }
            Frame::Zero { gpa, pages: n } if Copies::is_disk_address(gpa) => {
                copies
                    .as_mut()
                    .ok_or(ReceiveFailure::UnannouncedStorage(gpa))?
                    .zero(gpa, n)?;
                pages += n;
            }
            Frame::Zero { gpa, pages: n } => {
                landing.zero(gpa, n)?;
                pages += n;
            }
            Frame::Storage(manifest) if copies.is_none() => {
                copies = Some(Copies::create(&manifest, config, &opts.disks)?);
                s.write_frame(&Frame::Ack {
                    what: AckKind::Storage,
                })
                .and_then(|_| s.flush())?;
            }
            Frame::EndOfRound { round } => {
                // Every connection's pages of the round are in memory
                // before the source hears of it (and sends the next).
                lanes.round_ended(round, IDLE_TIMEOUT)?;
                // Durable before the ack: at `done` only the last round's
                // blocks are left to sync.
                if let Some(c) = &copies {
                    c.sync()?;
                }
                s.write_frame(&Frame::Ack {
                    what: AckKind::Round,
                })
                .and_then(|_| s.flush())?;
            }
            Frame::State(bytes) => state = Some(bytes),
            Frame::Done => {
                let counts = s.done_counts().map(<[u64]>::to_vec).unwrap_or_default();
                lanes.all_done(&counts, IDLE_TIMEOUT)?;
                break;
            }
            Frame::Abort(why) => return Err(ReceiveFailure::Aborted(why)),
            f => return Err(ReceiveFailure::Unexpected(f.kind_name())),
        }
        show(s, pages);
    }
    show(s, pages);
    Ok((
        state,
        pages + counters.pages.load(Ordering::Relaxed),
        copies,
    ))
}
