//! The thread that serves one device's queues: it waits on the queues'
//! notify eventfds, on its control channel and on the handler's own event
//! fd (a TAP, host sockets), hands each notification or event to the
//! device's [`QueueHandler`] (which takes requests from the avail rings
//! through [`Rings`] and fills the used rings), and raises the interrupt.
//!
//! It owns the live `Queue`s while the device is active; the transport gets
//! their state back when it quiesces or stops the worker. Which host CPUs
//! the thread runs on is the VM's [`PinnedThreads`] set's to say: the
//! transport makes the worker a member of its guest node's group.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{QueueBroken, QueueHandler, Rings, Signals, INT_VRING};
use crate::host::affinity::{Membership, PinnedThreads};
use crate::memory::DeviceMemory;

/// How long the transport waits for its worker to answer a command: the
/// worker finishes the request it serves first, and one request is a few
/// disk I/Os.
const MAX_WORKER_WAIT: Duration = Duration::from_secs(30);

/// The worker did not answer.
#[derive(Debug, thiserror::Error)]
#[error("the worker thread of {device} {what}")]
pub struct WorkerGone {
    /// The device.
    pub device: String,
    /// What happened (`has exited`, `did not answer within 30s`).
    pub what: String,
}

enum Ctl {
    /// Stop taking requests, park, reply with the queues.
    Quiesce(Sender<Vec<QueueState>>),
    /// Run again: serve every queue and raise an interrupt.
    Resume,
    /// Reply with the queues and end.
    Stop(Sender<Vec<QueueState>>),
}

/// The transport's handle on a running worker.
pub(crate) struct Worker {
    device: String,
    ctl: Sender<Ctl>,
    wake: EventFd,
    /// Set before a quiesce or stop is sent: the worker checks it between
    /// requests, so it stops taking new ones at once.
    hold: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The thread's name and kernel tid.
    name: String,
    tid: i32,
    /// Its place among the threads pinned to its guest node's CPUs.
    pinned: Option<Membership>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("device", &self.device)
            .finish()
    }
}

/// What a worker thread is started with.
pub(crate) struct WorkerArgs {
    /// Device name, for the thread and messages.
    pub device: String,
    /// The live queues (their number is the device's).
    pub queues: Vec<Queue>,
    /// Each queue's notify eventfd.
    pub notify: Vec<EventFd>,
    /// Serves requests.
    pub handler: Box<dyn QueueHandler>,
    /// Interrupt status and NEEDS_RESET.
    pub signals: Arc<Signals>,
    /// Guest memory.
    pub memory: DeviceMemory,
    /// Start parked (a restored device, or one activated while quiesced):
    /// it serves nothing until `resume`.
    pub paused: bool,
}

impl Worker {
    /// Starts the thread.
    pub fn spawn(args: WorkerArgs) -> Result<Worker, std::io::Error> {
        let (ctl, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let hold = Arc::new(AtomicBool::new(args.paused));
        let device = args.device.clone();
        let thread_wake = wake.try_clone()?;
        let thread_hold = hold.clone();
        let name: String = format!("vio-{}", args.device.replace("virtio-", ""))
            .chars()
            .take(15)
            .collect();
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _ = tid_tx.send(crate::host::affinity::current_tid());
                let paused = args.paused;
                Loop {
                    device: args.device,
                    queues: args.queues,
                    notify: args.notify,
                    handler: args.handler,
                    signals: args.signals,
                    memory: args.memory,
                    hold: thread_hold,
                    broken: false,
                }
                .run(rx, thread_wake, paused)
            })?;
        // The thread's first act: it cannot fail to answer unless it died.
        let tid = tid_rx.recv().map_err(|_| {
            std::io::Error::other(format!("the worker thread of {device} died as it started"))
        })?;
        Ok(Worker {
            device,
            ctl,
            wake,
            hold,
            thread: Some(thread),
            name,
            tid,
            pinned: None,
        })
    }

    /// Makes the thread follow the CPUs of `guest_node` in `threads` (it is
    /// pinned there now if they are known). A thread that cannot be pinned
    /// still serves, on the CPUs it has; the warning says why.
    pub fn follow(&mut self, threads: &PinnedThreads, guest_node: u32) {
        let (member, pinned) = threads.join(&self.name, &self.device, self.tid, guest_node);
        if let Err(e) = pinned {
            tracing::warn!("{}: cannot pin its worker thread: {e}", self.device);
        }
        self.pinned = Some(member);
    }

    fn send(&self, c: Ctl) -> Result<(), WorkerGone> {
        self.ctl.send(c).map_err(|_| self.gone("has exited"))?;
        // EAGAIN only with the counter full: the worker wakes anyway.
        let _ = self.wake.write(1);
        Ok(())
    }

    fn gone(&self, what: &str) -> WorkerGone {
        WorkerGone {
            device: self.device.clone(),
            what: what.into(),
        }
    }

    fn wait(&self, rx: Receiver<Vec<QueueState>>) -> Result<Vec<QueueState>, WorkerGone> {
        rx.recv_timeout(MAX_WORKER_WAIT).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                self.gone(&format!("did not answer within {MAX_WORKER_WAIT:?}"))
            }
            mpsc::RecvTimeoutError::Disconnected => self.gone("has exited"),
        })
    }

    /// Stops taking requests, lets the one being served complete, and
    /// returns the queues as they are then.
    pub fn quiesce(&self) -> Result<Vec<QueueState>, WorkerGone> {
        self.hold.store(true, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        self.send(Ctl::Quiesce(tx))?;
        self.wait(rx)
    }

    /// Serves again: every queue is kicked and an interrupt raised.
    pub fn resume(&self) -> Result<(), WorkerGone> {
        self.hold.store(false, Ordering::SeqCst);
        self.send(Ctl::Resume)
    }

    /// Ends the thread after the request it serves; returns the queues.
    pub fn stop(mut self) -> Result<Vec<QueueState>, WorkerGone> {
        self.hold.store(true, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        let r = self.send(Ctl::Stop(tx)).and_then(|()| self.wait(rx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        r
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.hold.store(true, Ordering::SeqCst);
            let (tx, _rx) = mpsc::channel();
            if self.send(Ctl::Stop(tx)).is_ok() {
                let _ = t.join();
            }
        }
    }
}

/// The worker thread's own state.
struct Loop {
    device: String,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    handler: Box<dyn QueueHandler>,
    signals: Arc<Signals>,
    memory: DeviceMemory,
    hold: Arc<AtomicBool>,
    /// A queue broke: the device needs a reset and serves nothing more.
    broken: bool,
}

impl Loop {
    fn states(&self) -> Vec<QueueState> {
        self.queues.iter().map(|q| q.state()).collect()
    }

    fn run(mut self, ctl: Receiver<Ctl>, wake: EventFd, mut paused: bool) {
        let epoll = match self.epoll(&wake) {
            Ok(e) => Some(e),
            Err(e) => {
                self.fail(&format!("cannot wait on its notify eventfds: {e}"));
                None
            }
        };
        let n = self.queues.len();
        let mut events = vec![EpollEvent::default(); n + 2];
        loop {
            let Some(epoll) = epoll.as_ref().filter(|_| !paused) else {
                // Parked: wait for a command only; a notification that
                // arrives meanwhile stays in its eventfd, and the resume
                // kicks every queue anyway.
                match ctl.recv() {
                    Ok(Ctl::Resume) => {
                        paused = false;
                        self.kick();
                    }
                    Ok(Ctl::Quiesce(r)) => {
                        let _ = r.send(self.states());
                    }
                    Ok(Ctl::Stop(r)) => {
                        let _ = r.send(self.states());
                        return;
                    }
                    Err(_) => return,
                }
                continue;
            };
            let ready = match epoll.wait(-1, &mut events) {
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(&format!("epoll_wait failed: {e}"));
                    paused = true;
                    continue;
                }
            };
            let mut notified = vec![false; n];
            let mut backend = false;
            for ev in &events[..ready] {
                match ev.data() as usize {
                    q if q < n => {
                        let _ = self.notify[q].read();
                        notified[q] = true;
                    }
                    q if q == n + 1 => backend = true,
                    _ => {
                        let _ = wake.read();
                    }
                }
            }
            // Commands first: a quiesce must not be followed by a request.
            loop {
                match ctl.try_recv() {
                    Ok(Ctl::Quiesce(r)) => {
                        paused = true;
                        let _ = r.send(self.states());
                    }
                    Ok(Ctl::Resume) => {
                        paused = false;
                        self.kick();
                    }
                    Ok(Ctl::Stop(r)) => {
                        let _ = r.send(self.states());
                        return;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if paused {
                continue;
            }
            for (q, _) in notified.iter().enumerate().filter(|(_, &x)| x) {
                self.serve_queue(q);
            }
            if backend {
                self.drive(|h, rings| h.event(rings));
            }
        }
    }

    fn epoll(&self, wake: &EventFd) -> std::io::Result<Epoll> {
        use std::os::fd::AsRawFd;
        let epoll = Epoll::new()?;
        for (i, fd) in self.notify.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, self.notify.len() as u64),
        )?;
        if let Some(fd) = self.handler.event_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, self.notify.len() as u64 + 1),
            )?;
        }
        Ok(epoll)
    }

    fn fail(&mut self, why: &str) {
        self.broken = true;
        self.signals.set_needs_reset(&self.device, why);
    }

    /// Serves every ready queue and raises an interrupt: after a resume or
    /// a restore nothing the guest queued, and no notification it expects,
    /// is left waiting. The handler's own event source is looked at too
    /// (what arrived while the device was parked).
    fn kick(&mut self) {
        for q in 0..self.queues.len() {
            self.serve_queue(q);
        }
        self.drive(|h, rings| h.event(rings));
        if !self.broken && self.queues.iter().any(|q| q.ready()) {
            self.signals.raise(INT_VRING);
        }
    }

    /// Hands queue `qi`'s notification to the handler (by default it takes
    /// every request the queue offers).
    fn serve_queue(&mut self, qi: usize) {
        if !self.queues[qi].ready() {
            return;
        }
        self.drive(|h, rings| h.notified(rings, qi as u16));
    }

    /// Runs `work` on the handler with the live queues, then raises the
    /// interrupt if a queue used buffers and its driver asked for one; a
    /// broken queue sets DEVICE_NEEDS_RESET and the device serves no more.
    fn drive(
        &mut self,
        work: impl FnOnce(&mut dyn QueueHandler, &mut Rings<'_>) -> Result<(), QueueBroken>,
    ) {
        if self.broken {
            return;
        }
        let memory = self.memory.clone();
        let Some(mem) = memory.access() else {
            return;
        };
        let mem = &*mem;
        let mut used = vec![false; self.queues.len()];
        let result = {
            let mut rings = Rings {
                mem,
                queues: &mut self.queues,
                hold: &self.hold,
                used: &mut used,
            };
            work(&mut *self.handler, &mut rings)
        };
        let mut raise = false;
        for (q, _) in used.iter().enumerate().filter(|(_, &u)| u) {
            // A used ring the device cannot read back still got buffers:
            // tell the driver anyway.
            raise |= self.queues[q].needs_notification(mem).unwrap_or(true);
        }
        if raise {
            self.signals.raise(INT_VRING);
        }
        if let Err(QueueBroken(why)) = result {
            self.fail(&why);
        }
    }
}
