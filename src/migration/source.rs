//! The source of a host migration: the `migrate` operation and its stream
//! sink, which hands the transfer engine's pages to a destination.
//!
//! The sink connects and authenticates in `begin` (so nobody listening, a
//! refused config or a destination without room fails before the guest
//! notices), sends page runs as `pages` and `zero` frames while the guest
//! runs, and in the pause sends the last pages, the state and `done`, then
//! waits for the destination's `ack{done}`. Only then is the source VM
//! left paused for good (the `run` process then exits); any failure before
//! that resumes it, unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::compress::Compression;
use super::lanes::{send_run, Round, Scratch, SendStats, Stream};
use super::protocol::{AckKind, Frame, Link};
use super::storage::{Copies, Manifest};
use super::{check_policy, connect, handshake_as_source_on, Address, Security, ShutdownHandle};
use crate::api::{ApiError, Classify, ErrorKind};
use crate::devices::Disks;
use crate::transfer::{
    transfer, AfterCommit, Cancel, FirstPass, PageRun, Plan, Sink, SinkError, TransferError,
};
use crate::vmm::{Pause, Vm, VmState};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each read of the handshake may wait.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to set up memory for the config.
const CONFIG_ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination may take, after `done`, to start the VM.
const DONE_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a write may block before the link counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Link rate assumed before one was measured, bytes/s.
const DEFAULT_LINK_RATE: f64 = 100.0 * (1u64 << 20) as f64;
/// Page data sent before the measured link rate is trusted.
const RATE_MIN_BYTES: u64 = 4 << 20;

pub use crate::api::migration::{MigrateReport, MigrateRequest};

/// A migration failed; the source VM runs on, unchanged.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The request is wrong (address, numbers, key files, policy).
    #[error("{0}")]
    Invalid(ApiError),
    /// It was cancelled or timed out.
    #[error("migration to {to} cancelled: {reason}; the VM runs on here")]
    Cancelled {
        /// Destination.
        to: String,
        /// Why.
        reason: String,
    },
    /// It failed on the way.
    #[error("migration to {to} failed: {reason}; the VM runs on here")]
    Failed {
        /// Destination.
        to: String,
        /// What failed.
        reason: String,
    },
}

/// A migration in flight, for `migrate-cancel` and progress.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Ends it early.
    pub cancel: Arc<Cancel>,
    /// Bytes of page data sent so far.
    pub page_bytes: AtomicU64,
    /// Pages sent so far.
    pub pages: AtomicU64,
}

impl Classify for MigrateError {
    fn kind(&self) -> ErrorKind {
        match self {
            MigrateError::Invalid(e) => e.kind,
            MigrateError::Cancelled { .. } | MigrateError::Failed { .. } => ErrorKind::Failed,
        }
    }
}

/// Checks a request at the edge, once: the address, every number within
/// its stated bound, the key files (read here, in the VM's process) and
/// the policy on unauthenticated links.
pub fn validate(
    req: &MigrateRequest,
) -> Result<(Address, Duration, Option<Duration>, Security), ApiError> {
    let to: Address = req.to.parse().map_err(ApiError::bad_request)?;
    let budget = req.max_downtime()?;
    let timeout = req.timeout()?;
    req.connections()?;
    let auth = req.auth();
    let security = super::security_from(&auth)?;
    check_policy(&to, &security, auth.insecure).map_err(ApiError::bad_request)?;
    Ok((to, budget, timeout, security))
}

/// Cancels `cancel` when `timeout` passes, unless `done` is signalled first.
fn watchdog(cancel: Arc<Cancel>, timeout: Duration, done: Arc<(Mutex<bool>, Condvar)>) {
    let _ = std::thread::Builder::new()
        .name("migrate-timeout".into())
        .spawn(move || {
            let (m, cv) = &*done;
            let g = m.lock().unwrap_or_else(|e| e.into_inner());
            let (g, r) = cv
                .wait_timeout_while(g, timeout, |finished| !*finished)
                .unwrap_or_else(|e| e.into_inner());
            if r.timed_out() && !*g {
                cancel.cancel(format!(
                    "the migration took longer than its timeout of {} s",
                    timeout.as_secs_f64()
                ));
            }
        });
}

/// Migrates `vm` as `req` says. On success the destination runs the VM and
/// this one stays paused, for the caller to stop; on failure it runs on.
///
/// With `copy_storage` the disks' blocks go in the same pre-copy and the
/// images stay here. Otherwise disks stay where they are (shared storage:
/// the destination opens the same images): at the switch, with the VM paused and its devices
/// quiesced, `disks` are flushed and their locks released just before the
/// state goes, for the destination to take; if the destination does not
/// confirm, the locks are taken back before the VM runs on here.
pub fn migrate(
    vm: &Vm,
    req: &MigrateRequest,
    flight: &Arc<InFlight>,
    disks: &Disks,
) -> Result<MigrateReport, MigrateError> {
    let (to, budget, timeout, security) = validate(req).map_err(MigrateError::Invalid)?;
    let connections = req.connections().map_err(MigrateError::Invalid)?;
    if !req.copy_storage {
        if let Some((id, shape)) = disks.first_layered() {
            return Err(MigrateError::Invalid(ApiError::conflict(format!(
                "disk {id} is layered now ({shape}: checkpointed, or restored and filling); a \
                 migration on shared storage hands over flat images only: migrate with \
                 --copy-storage to send its blocks"
            ))));
        }
    }
    let config =
        serde_json::to_vec(vm.config()).map_err(|e| MigrateError::Invalid(ApiError::failed(e)))?;
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    if let Some(t) = timeout {
        watchdog(flight.cancel.clone(), t, done.clone());
    }
    let mut sink = StreamSink {
        to: to.clone(),
        security,
        compression: req.compress,
        connections,
        config,
        streams: Vec::new(),
        round: None,
        cut: Arc::new(Vec::new()),
        flight: flight.clone(),
        scratch: Scratch::default(),
        stats: SendStats::default(),
        sent_running: 0,
        send_time: Duration::ZERO,
        round_start: None,
        round_bytes: 0,
        failure: None,
        disks: disks.clone(),
        storage: req.copy_storage.then(|| Manifest::of(vm)),
        disk_blocks: 0,
    };
    let mut slots: Vec<u32> = vm.memory().chunks().map(|c| c.slot).collect();
    if req.copy_storage {
        // The disks are slots of the same plan: every block in the first
        // round (the destination's files start empty), the blocks written
        // since in each later one.
        slots.extend(vm.store_slots());
    }
    // The destination's memory starts out zero: pages that hold nothing
    // here need not cross.
    let mut plan = Plan::new(slots, FirstPass::Present, true, budget);
    plan.auto_converge = true;
    plan.cancel = Some(flight.cancel.clone());
    let r = transfer(vm, &mut sink, &plan);
    {
        let (m, cv) = &*done;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
    let to_s = to.to_string();
    let r = r.map_err(|e| match (flight.cancel.reason(), e) {
        (Some(reason), _) | (None, TransferError::Cancelled(reason)) => MigrateError::Cancelled {
            to: to_s.clone(),
            reason,
        },
        (None, e) => MigrateError::Failed {
            to: to_s.clone(),
            reason: e.to_string(),
        },
    })?;
    let bytes_sent = sink.bytes_written();
    Ok(MigrateReport {
        operation: "migrate".into(),
        to: to_s,
        downtime_us: r.downtime_us,
        total_ms: r.total_ms,
        rounds: r.rounds,
        pages_sent: r.pages_sent,
        zero_pages: sink.stats.zero_pages,
        bytes_sent,
        page_bytes: sink.stats.page_bytes,
        compression: req.compress,
        compressed_frames: sink.stats.compressed_frames,
        pages_in_pause: r.pages_in_pause,
        converged: r.converged,
        throttle_max_percent: r.throttle_max_percent,
        link_mib_s: sink.link_rate() / (1u64 << 20) as f64,
        dirty_per_round: r.dirty_per_round,
        pause_breakdown: r.pause_breakdown,
        disk_blocks_sent: sink.disk_blocks,
        connections,
    })
}

/// Sends pages to a destination over one or more authenticated
/// connections: connection 0 carries the configuration, the state and the
/// acks; a pre-copy round's pages go over all of them (`lanes.rs`).
struct StreamSink {
    to: Address,
    security: Security,
    compression: Compression,
    /// Connections to open.
    connections: u32,
    /// The VM's disks, handed over at the switch (on shared storage).
    disks: Disks,
    /// With `--copy-storage`: the disks announced after the config; their
    /// blocks are sent, the images stay here.
    storage: Option<Manifest>,
    /// Disk blocks handed to the stream.
    disk_blocks: u64,
    /// The VM's configuration, JSON: the first frame.
    config: Vec<u8>,
    /// Every connection's stream, in index order; empty while a round's
    /// lanes hold them.
    streams: Vec<Stream>,
    /// The lanes of the pre-copy round being sent.
    round: Option<Round>,
    /// Cuts every connection (a cancel, a lane that failed).
    cut: Arc<Vec<ShutdownHandle>>,
    flight: Arc<InFlight>,
    /// Buffers of the pages this thread sends itself (in the pause).
    scratch: Scratch,
    stats: SendStats,
    /// Page data sent while the guest ran, and the time it took: the link rate.
    sent_running: u64,
    send_time: Duration,
    /// When the pre-copy round being sent began, and its page data so far.
    round_start: Option<Instant>,
    round_bytes: u64,
    /// What failed first, for the `abort` frame that tells the destination.
    failure: Option<String>,
}

impl StreamSink {
    fn err(&mut self, message: impl std::fmt::Display) -> SinkError {
        let message = match self.flight.cancel.reason() {
            Some(r) => format!("{r} ({message})"),
            None => message.to_string(),
        };
        self.failure.get_or_insert_with(|| message.clone());
        SinkError {
            sink: "migration stream",
            message,
        }
    }

    /// The streams, once no round's lanes hold them.
    fn streams(&mut self) -> Result<&mut [Stream], SinkError> {
        self.end_round()?;
        if self.streams.is_empty() {
            return Err(SinkError {
                sink: "migration stream",
                message: "not connected".into(),
            });
        }
        Ok(&mut self.streams)
    }

    /// Connection 0's stream.
    fn main(&mut self) -> Result<&mut Stream, SinkError> {
        Ok(&mut self.streams()?[0])
    }

    /// Ends the round's lanes, if any: what they hold goes out and the
    /// connections come back.
    fn end_round(&mut self) -> Result<(), SinkError> {
        if let Some(round) = self.round.take() {
            let (streams, stats) = round
                .finish()
                .map_err(|e| self.err(format!("sending to {}: {e}", self.to)))?;
            self.streams = streams;
            self.stats.zero_pages += stats.zero_pages;
            self.stats.page_bytes += stats.page_bytes;
            self.stats.compressed_frames += stats.compressed_frames;
        }
        Ok(())
    }

    /// Bytes written on every connection so far.
    fn bytes_written(&self) -> u64 {
        self.streams.iter().map(|s| s.bytes_written()).sum()
    }

    /// Page data per second the link carried.
    fn link_rate(&self) -> f64 {
        if self.sent_running < RATE_MIN_BYTES || self.send_time.is_zero() {
            DEFAULT_LINK_RATE
        } else {
            self.sent_running as f64 / self.send_time.as_secs_f64()
        }
    }

    /// Waits for the destination's answer (on connection 0) to what was sent.
    fn expect_ack(&mut self, what: AckKind, timeout: Duration) -> Result<(), SinkError> {
        let to = self.to.clone();
        let s = self.main()?;
        s.get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| SinkError {
                sink: "migration stream",
                message: format!("setting a read timeout: {e}"),
            })?;
        let answer = s.read_frame();
        match answer {
            Ok(Frame::Ack { what: w }) if w == what => Ok(()),
            Ok(Frame::Error(m)) | Ok(Frame::Abort(m)) => {
                Err(self.err(format!("the destination {to} refused: {m}")))
            }
            Ok(f) => Err(self.err(format!(
                "the destination {to} answered {} instead of ack{{{what:?}}}",
                f.kind_name()
            ))),
            Err(e) => Err(self.err(format!("no ack{{{what:?}}} from the destination {to}: {e}"))),
        }
    }

    /// The state and `done` (on every connection, naming how many frames
    /// each carried), then the destination's `ack{done}`.
    fn send_state_and_done(&mut self, st: Vec<u8>) -> Result<(), SinkError> {
        let streams = self.streams()?;
        let mut counts: Vec<u64> = streams.iter().map(|s| s.frames_written()).collect();
        // Connection 0 carries the state before its `done`.
        counts[0] += 1;
        let (main, others) = streams.split_first_mut().expect("connected");
        let mut sent = Ok(());
        for s in others {
            sent = sent
                .and_then(|()| s.write_done(&counts))
                .and_then(|()| s.flush());
        }
        let sent = sent
            .and_then(|()| main.write_frame(&Frame::State(st)))
            .and_then(|()| main.write_done(&counts));
        sent.map_err(|e| self.err(format!("sending the VM state: {e}")))?;
        self.expect_ack(AckKind::Done, DONE_ACK_TIMEOUT)
    }

    /// Opens and authenticates every connection: 0 first, then the others,
    /// all naming one fresh migration id.
    fn connect_all(&mut self) -> Result<(), SinkError> {
        let mut migration = [0u8; 16];
        getrandom::fill(&mut migration)
            .map_err(|e| self.err(format!("drawing a random migration id: {e}")))?;
        let mut cut = Vec::new();
        for index in 0..self.connections {
            let link = Link {
                migration,
                index,
                count: self.connections,
            };
            let conn = connect(&self.to, CONNECT_TIMEOUT).map_err(|e| self.err(e))?;
            let auth =
                handshake_as_source_on(conn, &self.security, &self.to, link, HANDSHAKE_TIMEOUT)
                    .map_err(|e| {
                        self.err(format!(
                            "authenticating connection {index} with {}: {e}",
                            self.to
                        ))
                    })?;
            cut.push(
                auth.conn
                    .shutdown_handle()
                    .map_err(|e| self.err(format!("connection to {}: {e}", self.to)))?,
            );
            auth.conn
                .set_write_timeout(Some(WRITE_TIMEOUT))
                .map_err(|e| self.err(format!("connection to {}: {e}", self.to)))?;
            self.streams.push(auth.into_frames());
        }
        let cut = Arc::new(cut);
        self.cut = cut.clone();
        // A cancel (or the timeout) cuts the connections: a write blocked
        // on a slow link returns at once.
        self.flight.cancel.on_cancel(move || {
            for c in cut.iter() {
                c.shutdown();
            }
        });
        Ok(())
    }
}

impl Sink<Vm> for StreamSink {
    fn name(&self) -> &'static str {
        "migration stream"
    }

    fn begin(&mut self, _vm: &Vm, _slots: &[u32]) -> Result<(), SinkError> {
        self.connect_all()?;
        let config = std::mem::take(&mut self.config);
        self.main()?
            .write_frame(&Frame::Config(config))
            .map_err(|e| self.err(format!("sending the configuration: {e}")))?;
        self.expect_ack(AckKind::Config, CONFIG_ACK_TIMEOUT)?;
        if let Some(m) = &self.storage {
            let manifest = serde_json::to_vec(m).map_err(|e| self.err(e))?;
            let main = self.main()?;
            main.write_frame(&Frame::Storage(manifest))
                .and_then(|()| main.flush())
                .map_err(|e| self.err(format!("sending the disk manifest: {e}")))?;
            self.expect_ack(AckKind::Storage, CONFIG_ACK_TIMEOUT)?;
        }
        Ok(())
    }

    fn pages(&mut self, run: PageRun<'_>, paused: bool) -> Result<u64, SinkError> {
        let len = run.data.len() as u64;
        let disk = Copies::is_disk_address(run.gpa);
        if paused || disk {
            // This thread sends them itself: in the pause at its own
            // (real-time) priority, and a disk's blocks sit in a buffer
            // that is only valid now. Disk blocks go on connection 0, whose
            // receiver writes the disks.
            self.end_round()?;
            let compression = self.compression;
            let mut scratch = std::mem::take(&mut self.scratch);
            let mut stats = SendStats::default();
            let sent = send_run(
                self.main()?,
                run.gpa,
                &run.data,
                compression,
                &mut scratch,
                &mut stats,
            );
            self.scratch = scratch;
            self.stats.zero_pages += stats.zero_pages;
            self.stats.page_bytes += stats.page_bytes;
            self.stats.compressed_frames += stats.compressed_frames;
            sent.map_err(|e| self.err(format!("sending to {}: {e}", self.to)))?;
        } else {
            if self.round.is_none() {
                let streams = std::mem::take(&mut self.streams);
                let round = Round::start(streams, self.compression).map_err(|(e, streams)| {
                    self.streams = streams;
                    e
                });
                let round = round.map_err(|e| self.err(format!("sending to {}: {e}", self.to)))?;
                self.round = Some(round);
            }
            self.round_start.get_or_insert_with(Instant::now);
            let round = self.round.as_ref().expect("started above");
            // SAFETY: `run.data` is the VM's guest memory, mapped as long
            // as the VM, which outlives this sink; and the round is
            // finished (its lanes joined) before the migration returns.
            unsafe { round.push(run.gpa, &run.data) }
                .map_err(|e| self.err(format!("sending to {}: {e}", self.to)))?;
            self.round_bytes += len;
        }
        self.flight.page_bytes.fetch_add(len, Ordering::Relaxed);
        self.flight.pages.fetch_add(run.pages(), Ordering::Relaxed);
        if disk {
            self.disk_blocks += run.pages();
        }
        Ok(len)
    }

    fn paused_rate(&self) -> f64 {
        self.link_rate()
    }

    fn end_of_round(&mut self, round: u32) -> Result<(), SinkError> {
        let streams = self.streams()?;
        let (main, others) = streams.split_first_mut().expect("connected");
        let mut sent = Ok(());
        for s in others {
            sent = sent
                .and_then(|()| s.write_frame(&Frame::EndOfRound { round }))
                .and_then(|()| s.flush());
        }
        sent.and_then(|()| main.write_frame(&Frame::EndOfRound { round }))
            .map_err(|e| self.err(format!("sending to {}: {e}", self.to)))?;
        self.expect_ack(AckKind::Round, WRITE_TIMEOUT)?;
        // The link's rate is measured end to end: from the round's first
        // pages to the destination's word that they are all in memory.
        if let Some(t) = self.round_start.take() {
            self.send_time += t.elapsed();
            self.sent_running += std::mem::take(&mut self.round_bytes);
        }
        Ok(())
    }

    fn commit(
        &mut self,
        vm: &Vm,
        _pause: &Pause,
        state: VmState,
    ) -> Result<AfterCommit, SinkError> {
        let st = serde_json::to_vec(&state).map_err(|e| self.err(e))?;
        if self.storage.is_some() {
            // The disks went with the pages: the images stay here, locked,
            // for this VM should the destination refuse.
            self.send_state_and_done(st)?;
            return Ok(AfterCommit::StayPaused);
        }
        // The destination opens the same images when it builds the VM: let
        // go of them now, durable, and take them back if it refuses.
        self.disks.release().map_err(|e| self.err(e))?;
        let handed = self.send_state_and_done(st);
        if let Err(e) = handed {
            if let Err(lock) = self.disks.retake() {
                // Another process holds an image now: running on here
                // would write it under that one. Stop the guest instead.
                vm.fail(format!(
                    "the migration failed after the disks were handed over ({e}) and {lock}; \
                     the VM stays stopped here so that two VMs never write one disk"
                ));
            }
            return Err(e);
        }
        // The VM runs on the destination now: this one must not run again.
        Ok(AfterCommit::StayPaused)
    }

    fn complete(&mut self, _vm: &Vm) -> Result<(), SinkError> {
        Ok(())
    }

    fn abort(&mut self, _vm: &Vm) {
        // Lanes still sending stop where they are (a failed round's
        // connections are cut already).
        if let Some(round) = self.round.take() {
            match round.finish() {
                Ok((streams, _)) => self.streams = streams,
                Err(_) => self.streams.clear(),
            }
        }
        let why = self
            .flight
            .cancel
            .reason()
            .or_else(|| self.failure.take())
            .unwrap_or_else(|| "the source gave up".into());
        if let Some(s) = self.streams.first_mut() {
            let _ = s.get_ref().set_write_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_frame(&Frame::Abort(why));
            let _ = s.flush();
        }
        for s in self.streams.drain(..) {
            s.get_ref().shutdown();
        }
    }
}
