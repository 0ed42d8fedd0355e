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

use super::compress::{encode_pages, Compression};
use super::protocol::{AckKind, Frame, FrameStream, MAX_PAGES_PER_FRAME};
use super::storage::{Copies, Manifest};
use super::{check_policy, connect, handshake_as_source, Address, Conn, Security};
use crate::api::{ApiError, Classify, ErrorKind};
use crate::devices::Disks;
use crate::memory::{is_zero_page, PAGE_SIZE};
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
        config,
        stream: None,
        flight: flight.clone(),
        bounce: Vec::new(),
        packed: Vec::new(),
        zero_pages: 0,
        page_bytes: 0,
        compressed_frames: 0,
        sent_running: 0,
        send_time: Duration::ZERO,
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
    let bytes_sent = sink.stream.as_ref().map_or(0, |s| s.bytes_written());
    Ok(MigrateReport {
        operation: "migrate".into(),
        to: to_s,
        downtime_us: r.downtime_us,
        total_ms: r.total_ms,
        rounds: r.rounds,
        pages_sent: r.pages_sent,
        zero_pages: sink.zero_pages,
        bytes_sent,
        page_bytes: sink.page_bytes,
        compression: req.compress,
        compressed_frames: sink.compressed_frames,
        pages_in_pause: r.pages_in_pause,
        converged: r.converged,
        throttle_max_percent: r.throttle_max_percent,
        link_mib_s: sink.link_rate() / (1u64 << 20) as f64,
        dirty_per_round: r.dirty_per_round,
        pause_breakdown: r.pause_breakdown,
        disk_blocks_sent: sink.disk_blocks,
    })
}

/// Sends pages to a destination over one authenticated stream.
struct StreamSink {
    to: Address,
    security: Security,
    compression: Compression,
    /// The VM's disks, handed over at the switch (on shared storage).
    disks: Disks,
    /// With `--copy-storage`: the disks announced after the config; their
    /// blocks are sent, the images stay here.
    storage: Option<Manifest>,
    /// Disk blocks handed to the stream.
    disk_blocks: u64,
    /// The VM's configuration, JSON: the first frame.
    config: Vec<u8>,
    stream: Option<FrameStream<Box<dyn Conn>>>,
    flight: Arc<InFlight>,
    /// A stable copy of the pages being sent: a frame's checksum must
    /// cover exactly the bytes sent, while the guest may be writing.
    bounce: Vec<u8>,
    /// Compressed pages.
    packed: Vec<u8>,
    zero_pages: u64,
    page_bytes: u64,
    compressed_frames: u64,
    /// Page data sent while the guest ran, and the time it took: the link rate.
    sent_running: u64,
    send_time: Duration,
}

impl StreamSink {
    fn err(&self, message: impl std::fmt::Display) -> SinkError {
        let message = match self.flight.cancel.reason() {
            Some(r) => format!("{r} ({message})"),
            None => message.to_string(),
        };
        SinkError {
            sink: "migration stream",
            message,
        }
    }

    fn stream(&mut self) -> Result<&mut FrameStream<Box<dyn Conn>>, SinkError> {
        match self.stream.as_mut() {
            Some(s) => Ok(s),
            None => Err(SinkError {
                sink: "migration stream",
                message: "not connected".into(),
            }),
        }
    }

    /// Page data per second the link carried.
    fn link_rate(&self) -> f64 {
        if self.sent_running < RATE_MIN_BYTES || self.send_time.is_zero() {
            DEFAULT_LINK_RATE
        } else {
            self.sent_running as f64 / self.send_time.as_secs_f64()
        }
    }

    /// Waits for the destination's answer to what was sent.
    fn expect_ack(&mut self, what: AckKind, timeout: Duration) -> Result<(), SinkError> {
        let to = self.to.clone();
        let s = self.stream()?;
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

    /// Sends one run of pages (at most a frame's worth), already copied
    /// into `bounce`, as zero runs and page frames.
    /// The state and `done`, then the destination's `ack{done}`.
    fn send_state_and_done(&mut self, st: Vec<u8>) -> Result<(), SinkError> {
        let s = self.stream()?;
        let sent = s
            .write_frame(&Frame::State(st))
            .and_then(|_| s.write_frame(&Frame::Done));
        sent.map_err(|e| self.err(format!("sending the VM state: {e}")))?;
        self.expect_ack(AckKind::Done, DONE_ACK_TIMEOUT)
    }

    fn send_bounced(&mut self, gpa: u64, len: usize) -> Result<(), SinkError> {
        let page = PAGE_SIZE as usize;
        let mut at = 0;
        while at < len {
            let zero = is_zero_page(&self.bounce[at..at + page]);
            let mut end = at + page;
            while end < len && is_zero_page(&self.bounce[end..end + page]) == zero {
                end += page;
            }
            let count = ((end - at) / page) as u64;
            let run_gpa = gpa + at as u64;
            let compression = self.compression;
            let mut packed = std::mem::take(&mut self.packed);
            let r = if zero {
                self.zero_pages += count;
                self.stream()?.write_frame(&Frame::Zero {
                    gpa: run_gpa,
                    pages: count,
                })
            } else {
                self.page_bytes += (end - at) as u64;
                let enc = encode_pages(&self.bounce[at..end], compression, &mut packed);
                if enc != super::Encoding::Raw {
                    self.compressed_frames += 1;
                }
                let data = if enc == super::Encoding::Raw {
                    &self.bounce[at..end]
                } else {
                    &packed[..]
                };
                let s = self.stream.as_mut().expect("checked by stream() above");
                s.write_pages(run_gpa, enc, count as u32, data)
            };
            self.packed = packed;
            r.map_err(|e| self.err(format!("sending to {}: {e}", self.to)))?;
            at = end;
        }
        Ok(())
    }
}

impl Sink<Vm> for StreamSink {
    fn name(&self) -> &'static str {
        "migration stream"
    }

    fn begin(&mut self, _vm: &Vm, _slots: &[u32]) -> Result<(), SinkError> {
        let conn = connect(&self.to, CONNECT_TIMEOUT).map_err(|e| self.err(e))?;
        let auth = handshake_as_source(conn, &self.security, &self.to, HANDSHAKE_TIMEOUT)
            .map_err(|e| self.err(format!("authenticating with {}: {e}", self.to)))?;
        let handle = auth
            .conn
            .shutdown_handle()
            .map_err(|e| self.err(format!("connection to {}: {e}", self.to)))?;
        // A cancel (or the timeout) cuts the connection: a write blocked on
        // a slow link returns at once.
        self.flight.cancel.on_cancel(move || handle.shutdown());
        auth.conn
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| self.err(format!("connection to {}: {e}", self.to)))?;
        let mut s = auth.into_frames();
        s.write_frame(&Frame::Config(std::mem::take(&mut self.config)))
            .map_err(|e| self.err(format!("sending the configuration: {e}")))?;
        self.stream = Some(s);
        self.expect_ack(AckKind::Config, CONFIG_ACK_TIMEOUT)?;
        if let Some(m) = &self.storage {
            let manifest = serde_json::to_vec(m).map_err(|e| self.err(e))?;
            self.stream()?
                .write_frame(&Frame::Storage(manifest))
                .and_then(|()| self.stream.as_mut().expect("connected above").flush())
                .map_err(|e| self.err(format!("sending the disk manifest: {e}")))?;
            self.expect_ack(AckKind::Storage, CONFIG_ACK_TIMEOUT)?;
        }
        Ok(())
    }

    fn pages(&mut self, run: PageRun<'_>, paused: bool) -> Result<u64, SinkError> {
        let before = self.stream()?.bytes_written();
        let t = Instant::now();
        let frame = MAX_PAGES_PER_FRAME as usize * PAGE_SIZE as usize;
        let len = run.data.len();
        let mut bounce = std::mem::take(&mut self.bounce);
        bounce.resize(frame.min(len).max(bounce.len()), 0);
        self.bounce = bounce;
        let mut at = 0;
        while at < len {
            let n = frame.min(len - at);
            let part = run
                .data
                .subslice(at, n)
                .map_err(|e| self.err(format!("guest memory at {:#x}: {e}", run.gpa)))?;
            part.copy_to(&mut self.bounce[..n]);
            self.send_bounced(run.gpa + at as u64, n)?;
            at += n;
        }
        if !paused {
            self.sent_running += len as u64;
            self.send_time += t.elapsed();
        }
        self.flight
            .page_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.flight.pages.fetch_add(run.pages(), Ordering::Relaxed);
        if Copies::is_disk_address(run.gpa) {
            self.disk_blocks += run.pages();
        }
        Ok(self.stream()?.bytes_written() - before)
    }

    fn paused_rate(&self) -> f64 {
        self.link_rate()
    }

    fn end_of_round(&mut self, round: u32) -> Result<(), SinkError> {
        let t = Instant::now();
        self.stream()?
            .write_frame(&Frame::EndOfRound { round })
            .map_err(|e| self.err(format!("sending to {}: {e}", self.to)))?;
        self.expect_ack(AckKind::Round, WRITE_TIMEOUT)?;
        // The wait is part of what the link (and the far end) costs.
        self.send_time += t.elapsed();
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
        if let Some(mut s) = self.stream.take() {
            let _ = s.get_ref().set_write_timeout(Some(Duration::from_secs(1)));
            let why = self
                .flight
                .cancel
                .reason()
                .unwrap_or_else(|| "the source gave up".into());
            let _ = s.write_frame(&Frame::Abort(why));
            let _ = s.flush();
            s.get_ref().shutdown();
        }
    }
}
