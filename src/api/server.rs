//! The API server: HTTP/1.1 + JSON on a Unix socket.
//!
//! This module owns the transport only: creating the socket safely (private
//! directory, mode 0600 from the first instant, refusing to steal a live
//! socket, replacing a stale one, unlinking it when stopped), the HTTP
//! server (hyper's HTTP/1.1 connections on a small tokio runtime of their
//! own, the handlers on that runtime's blocking threads), and the rules
//! every response follows (JSON body, bounded request size, malformed JSON
//! rejected before the handler sees it, a handler panic answered with a 500
//! rather than a dropped connection), with the limits hyper leaves to its
//! user: how long a request's head and body may take to arrive, how large
//! a body may be, how many connections are served at once.
//!
//! It does not know any route or any VM: every request that passes the
//! transport checks goes to an [`ApiHandler`], which the VMM implements and
//! which answers unknown routes with 404 itself.

use std::convert::Infallible;
use std::fmt;
use std::fs;
use std::future::{poll_fn, Future};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::Poll;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::sync::{watch, Semaphore};

/// Largest request body the server accepts; larger ones get 413. Every vmhop
/// request is a few hundred bytes, so this only stops accidents (a file sent
/// with `curl -d @...`) from being buffered in the VMM.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Threads running handlers at once. More than one so that `status` or
/// `pause` is answered while a long operation (checkpoint, migration) holds
/// a thread; few, because the socket is private to one user and requests
/// are rare. Calls beyond this wait for a thread.
const HANDLER_THREADS: usize = 8;

/// Connections served at once. Each may hold a body of up to
/// [`MAX_BODY_BYTES`] until its timeouts end it; more connections wait in
/// the socket's backlog until one closes.
const MAX_CONNECTIONS: usize = 64;

/// How long a request's head (request line and headers) may take to
/// arrive, counted from when the server starts waiting for it, an idle
/// keep-alive connection included. A local client sends its head at once;
/// a connection that has not is closed, without an answer since there is
/// no request to answer.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request's body may take to arrive once its head has. A
/// local client sends its body at once; one that has not after this long
/// gets 408 and its connection is closed. Meanwhile it holds only its own
/// connection: other requests are answered.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a refused (413) body is still read and thrown away, so that
/// a client that sends its whole request before reading the answer is not
/// cut off mid-send and gets to read why. A body declared larger than this
/// is not waited for: the connection is closed after the answer.
const REFUSED_BODY_DRAIN: u64 = 16 << 20;

/// How long stopping the server waits for answers still being sent once
/// every handler call has returned: long enough for any answer a client is
/// reading (the reply to `vm.stop` is sent while the process ends), bounded
/// for one that stalls (a body never finished, an answer never read).
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Pause after `accept()` fails (out of file descriptors, say) before
/// trying again, so that a persistent failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Pending connections the kernel queues before `connect()` would block.
const LISTEN_BACKLOG: libc::c_int = 16;

/// Mode of the API socket: only its owner may connect (connecting to a Unix
/// socket needs write permission on it).
const SOCKET_MODE: u32 = 0o600;

/// Mode of a socket directory vmhop creates.
const SOCKET_DIR_MODE: u32 = 0o700;

/// The transport's limits; [`Limits::default`] is what the API serves
/// with, tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_read: Duration,
    body_read: Duration,
    max_connections: usize,
    handler_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read: HEADER_READ_TIMEOUT,
            body_read: BODY_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            handler_threads: HANDLER_THREADS,
        }
    }
}

/// Work in progress that stopping waits for (handler calls, connections),
/// counted from any thread and waited for from a plain thread.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    done: Condvar,
}

impl InFlight {
    fn begin(self: &Arc<Self>) -> InFlightGuard {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        InFlightGuard(Arc::clone(self))
    }

    /// Waits until nothing is in flight, at most `limit` (`None`: no
    /// limit); true if nothing is.
    fn wait_idle(&self, limit: Option<Duration>) -> bool {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let count = match limit {
            Some(limit) => {
                self.done
                    .wait_timeout_while(count, limit, |n| *n > 0)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => self
                .done
                .wait_while(count, |n| *n > 0)
                .unwrap_or_else(|e| e.into_inner()),
        };
        *count == 0
    }
}

/// One piece of work in flight; counted down when dropped (also on a panic,
/// and when the runtime drops a task it never finished).
struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.done.notify_all();
        }
    }
}

/// What the server calls for each request. Implemented by the VMM.
pub trait ApiHandler: Send + Sync + 'static {
    /// Answers one request.
    ///
    /// `method` is the HTTP method (`"GET"`, `"PUT"`, ...), `path` the request
    /// target without its query string (`"/api/v1/vm.status"`), `body` the raw
    /// request body (at most [`MAX_BODY_BYTES`]; on PUT/POST/PATCH it is
    /// either blank or valid JSON, the server has checked). Returns the HTTP
    /// status and the JSON body; errors should use [`error_body`].
    ///
    /// Called on a thread of its own, so it may block (a checkpoint, a
    /// migration) while other requests are answered.
    fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value);
}

/// A handler that can be replaced while the server runs: a destination
/// answers `status` while it waits for its VM, then hands the socket to the
/// VM's routes without closing it.
pub struct Switch {
    inner: std::sync::RwLock<std::sync::Arc<dyn ApiHandler>>,
}

impl Switch {
    /// A switch answering with `first`.
    pub fn new(first: std::sync::Arc<dyn ApiHandler>) -> std::sync::Arc<Switch> {
        std::sync::Arc::new(Switch {
            inner: std::sync::RwLock::new(first),
        })
    }

    /// Answers every later request with `next`.
    pub fn set(&self, next: std::sync::Arc<dyn ApiHandler>) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = next;
    }
}

impl ApiHandler for Switch {
    fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let h = self.inner.read().unwrap_or_else(|e| e.into_inner()).clone();
        h.handle(method, path, body)
    }
}

/// The JSON body of every error response: `{"error": "<msg>"}`.
pub fn error_body(msg: impl fmt::Display) -> Value {
    serde_json::json!({ "error": msg.to_string() })
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A live server (another vmhop, most likely) accepts connections there.
    #[error("another vmhop is already serving {}", path.display())]
    InUse {
        /// The socket path asked for.
        path: PathBuf,
    },
    /// Something other than a socket exists at the path; vmhop will not delete it.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The socket path asked for.
        path: PathBuf,
    },
    /// The directory that should hold the socket could not be created.
    #[error("cannot create API socket directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An existing file at the path could not be examined or probed.
    #[error("cannot tell whether {} is in use: {source}", path.display())]
    Probe {
        /// The socket path asked for.
        path: PathBuf,
        /// The OS error from `lstat()` or `connect()`.
        source: io::Error,
    },
    /// A stale socket (nobody listening) could not be removed.
    #[error("cannot remove stale API socket {}: {source}", path.display())]
    RemoveStale {
        /// The socket path asked for.
        path: PathBuf,
        /// The OS error from `unlink()`.
        source: io::Error,
    },
    /// The path does not fit in a `sockaddr_un`.
    #[error(
        "API socket path {} is {len} bytes long; Unix socket paths are limited to {max} bytes",
        path.display()
    )]
    PathTooLong {
        /// The socket path asked for.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest path the kernel accepts.
        max: usize,
    },
    /// Creating, binding or listening on the socket failed.
    #[error("cannot bind API socket {}: {syscall}() failed: {source}", path.display())]
    Bind {
        /// The socket path asked for.
        path: PathBuf,
        /// The system call that failed.
        syscall: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The socket's mode could not be restricted to 0600.
    #[error("cannot set mode 0600 on API socket {}: {source}", path.display())]
    Permissions {
        /// The socket path asked for.
        path: PathBuf,
        /// The OS error from `fchmod()` or `chmod()`.
        source: io::Error,
    },
    /// The HTTP server's runtime could not be built on the bound socket.
    #[error("cannot start the HTTP server on {}: {source}", path.display())]
    Start {
        /// The socket path asked for.
        path: PathBuf,
        /// The OS error (creating the runtime's epoll or timer, or making
        /// the socket non-blocking).
        source: io::Error,
    },
    /// The server's thread could not be spawned.
    #[error("cannot spawn the API server thread for {}: {source}", path.display())]
    Spawn {
        /// The socket path asked for.
        path: PathBuf,
        /// The OS error from `clone()`.
        source: io::Error,
    },
}

/// A running API server. Dropping it stops it like [`ApiServer::shutdown`].
pub struct ApiServer {
    path: PathBuf,
    /// `None` once stopped.
    running: Option<Running>,
    /// Identity (device, inode) of the socket file we bound, so that stopping
    /// never unlinks a socket some later process created at the same path.
    socket_id: (u64, u64),
}

/// What a running server is made of, and what stopping it waits for.
struct Running {
    /// Tells the server's thread how far stopping has come.
    phase: watch::Sender<Phase>,
    /// Runs the tokio runtime that serves the socket.
    thread: JoinHandle<()>,
    /// Handler calls begun and not yet returned.
    handlers: Arc<InFlight>,
    /// Connections open.
    connections: Arc<InFlight>,
}

/// How far stopping has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting connections and requests.
    Serving,
    /// No new connections; each open one ends after the request it is in.
    Stopping,
    /// Stop driving what is left: the runtime is dropped.
    Finished,
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl ApiServer {
    /// Binds the socket at `path` and starts answering requests with `handler`.
    ///
    /// Creates the parent directory (mode 0700) if it is missing. If a socket
    /// already exists there and something accepts connections on it, fails
    /// with [`ServerError::InUse`]; if nothing does (a crashed vmhop left it),
    /// replaces it. The socket has mode 0600 from the moment it exists.
    pub fn start(path: &Path, handler: Arc<dyn ApiHandler>) -> Result<ApiServer, ServerError> {
        Self::start_with(path, handler, Limits::default())
    }

    fn start_with(
        path: &Path,
        handler: Arc<dyn ApiHandler>,
        limits: Limits,
    ) -> Result<ApiServer, ServerError> {
        create_parent_dir(path)?;
        clear_stale_socket(path)?;
        let listener = bind_private(path)?;
        // Unlinks the socket if anything below fails, so a failed start leaves
        // no file behind that the next start would have to probe.
        let mut cleanup = UnlinkOnDrop(Some(path.to_path_buf()));

        // fchmod before bind already gave the right mode on Linux; chmod again
        // by path so the guarantee does not rest on that kernel behaviour.
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE)).map_err(|source| {
            ServerError::Permissions {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let meta = fs::symlink_metadata(path).map_err(|source| ServerError::Probe {
            path: path.to_path_buf(),
            source,
        })?;
        let socket_id = (meta.dev(), meta.ino());

        let start_err = |source| ServerError::Start {
            path: path.to_path_buf(),
            source,
        };
        // One thread drives every connection (they only move bytes); the
        // handlers, which block, run on the runtime's blocking threads.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(limits.handler_threads)
            .thread_name("vmhop-api-handler")
            .build()
            .map_err(start_err)?;
        listener.set_nonblocking(true).map_err(start_err)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::UnixListener::from_std(listener).map_err(start_err)?
        };

        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read)
            // A client may close its sending side once its request is out
            // and still read the answer (`curl`, `socat`, the tests).
            .half_close(true);
        let shared = Arc::new(Shared {
            handler,
            http,
            limits,
            handlers: Arc::default(),
            connections: Arc::default(),
        });
        let (phase, phase_rx) = watch::channel(Phase::Serving);
        let serving = Arc::clone(&shared);
        let socket = path.to_path_buf();
        let thread = thread::Builder::new()
            .name("vmhop-api".into())
            .spawn(move || {
                runtime.block_on(serve(listener, serving, phase_rx, &socket));
                // What is still running was given its ANSWER_WAIT: a stalled
                // connection is dropped, a handler thread left to finish alone.
                runtime.shutdown_background();
            })
            .map_err(|source| ServerError::Spawn {
                path: path.to_path_buf(),
                source,
            })?;
        // From here on stopping the server unlinks the socket.
        cleanup.disarm();
        tracing::info!(socket = %path.display(), "API server listening");
        Ok(ApiServer {
            path: path.to_path_buf(),
            running: Some(Running {
                phase,
                thread,
                handlers: Arc::clone(&shared.handlers),
                connections: Arc::clone(&shared.connections),
            }),
            socket_id,
        })
    }

    /// The socket path the server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and removes the socket file (also done on drop).
    ///
    /// Requests already received are answered first, so this waits for any
    /// handler call in progress to return, then (at most [`ANSWER_WAIT`])
    /// for the answers to be sent. For the same reason it must not be
    /// called from inside [`ApiHandler::handle`] (a handler would wait for
    /// itself): a handler that ends the VM should signal the thread that
    /// owns the server instead.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.phase.send_replace(Phase::Stopping);
        running.handlers.wait_idle(None);
        if !running.connections.wait_idle(Some(ANSWER_WAIT)) {
            tracing::warn!(socket = %self.path.display(),
                "stopping with a request still open (a client not sending its body or not reading its answer?)");
        }
        running.phase.send_replace(Phase::Finished);
        if running.thread.join().is_err() {
            tracing::warn!(socket = %self.path.display(), "the API server thread panicked");
        }
        // Unlink the file only if it is still the socket we bound.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.socket_id {
                let _ = fs::remove_file(&self.path);
            }
        }
        tracing::info!(socket = %self.path.display(), "API server stopped");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes a path when dropped, unless disarmed.
struct UnlinkOnDrop(Option<PathBuf>);

impl UnlinkOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

fn create_parent_dir(path: &Path) -> Result<(), ServerError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    if parent.is_dir() {
        // An existing directory is the user's choice; its mode is left alone.
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(SOCKET_DIR_MODE)
        .create(parent)
        .map_err(|source| ServerError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })
}

/// Leaves `path` free for binding: absent, or a stale socket now removed.
fn clear_stale_socket(path: &Path) -> Result<(), ServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    if socket_is_live(path)? {
        return Err(ServerError::InUse {
            path: path.to_path_buf(),
        });
    }
    tracing::info!(socket = %path.display(), "removing stale API socket");
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServerError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Whether something accepts connections on the socket at `path`.
fn socket_is_live(path: &Path) -> Result<bool, ServerError> {
    match UnixStream::connect(path) {
        Ok(_) => Ok(true),
        // ECONNREFUSED: the file exists but no process listens on it.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        // EAGAIN: a listener exists whose backlog is full; it is alive.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(source) => Err(ServerError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates a listening Unix socket at `path` whose file has mode 0600 from
/// the moment `bind()` creates it.
///
/// `std`'s `UnixListener::bind` would create the file with the process umask
/// and leave a window before a `chmod`. Linux gives the file the mode of the
/// socket inode, so `fchmod()` before `bind()` closes that window.
fn bind_private(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |syscall: &'static str, source: io::Error| ServerError::Bind {
        path: path.to_path_buf(),
        syscall,
        source,
    };
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is a plain C struct for which all-zero bytes is a
    // valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    // sun_path must keep a terminating NUL.
    let max = addr.sun_path.len() - 1;
    if bytes.len() > max {
        return Err(ServerError::PathTooLong {
            path: path.to_path_buf(),
            len: bytes.len(),
            max,
        });
    }
    if bytes.contains(&0) {
        let e = io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte");
        return Err(bind_err("bind", e));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }

    // SAFETY: socket() takes no pointers; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(bind_err("socket", io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a socket we just created and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // SAFETY: fchmod on a descriptor we own; no memory is passed.
    if unsafe { libc::fchmod(fd.as_raw_fd(), SOCKET_MODE as libc::mode_t) } != 0 {
        return Err(ServerError::Permissions {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }

    // SAFETY: `addr` is a fully initialised sockaddr_un that outlives the
    // call, and the length passed is its exact size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let source = io::Error::last_os_error();
        // Another process bound the path between our probe and bind().
        if source.kind() == io::ErrorKind::AddrInUse && socket_is_live(path).unwrap_or(false) {
            return Err(ServerError::InUse {
                path: path.to_path_buf(),
            });
        }
        return Err(bind_err("bind", source));
    }

    // SAFETY: listen() on a bound socket we own; no memory is passed.
    if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        let source = io::Error::last_os_error();
        let _ = fs::remove_file(path);
        return Err(bind_err("listen", source));
    }
    Ok(UnixListener::from(fd))
}

/// What every connection of a server shares.
struct Shared {
    handler: Arc<dyn ApiHandler>,
    /// hyper's HTTP/1.1 settings (timer, header timeout, half-close).
    http: http1::Builder,
    limits: Limits,
    handlers: Arc<InFlight>,
    connections: Arc<InFlight>,
}

/// Runs `work` until it completes (`Some` of its output) or the server
/// starts stopping (`None`; `work` is left where it was).
async fn unless_stopping<F: Future>(
    phase: &mut watch::Receiver<Phase>,
    work: F,
) -> Option<F::Output> {
    let mut work = pin!(work);
    let mut stopping = pin!(phase.wait_for(|p| *p != Phase::Serving));
    poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        // Err: the server is gone, which is stopping too.
        if stopping.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Accepts connections until the server stops, then drives the open ones
/// until stopping has waited for them.
async fn serve(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    socket: &Path,
) {
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    loop {
        let next = unless_stopping(&mut phase, async {
            // The semaphore is never closed, so acquiring only waits.
            let slot = Arc::clone(&slots).acquire_owned().await.ok();
            (slot, listener.accept().await)
        })
        .await;
        let Some((slot, accepted)) = next else {
            break;
        };
        match accepted {
            Ok((stream, _)) => {
                let open = shared.connections.begin();
                let conn = connection(stream, Arc::clone(&shared), phase.clone());
                tokio::spawn(async move {
                    conn.await;
                    drop((slot, open));
                });
            }
            Err(e) => {
                tracing::warn!(socket = %socket.display(), error = %e,
                    "cannot accept an API connection; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
    // Closes the listening socket: connect() is refused from here on.
    drop(listener);
    let _ = phase.wait_for(|p| *p == Phase::Finished).await;
}

/// Serves one connection until the client closes it, a timeout ends it, or
/// the server stops (then it ends after the request it is in).
async fn connection(
    stream: tokio::net::UnixStream,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    let service = service_fn(|request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(answer(request, &shared).await) }
    });
    let mut conn = pin!(shared.http.serve_connection(TokioIo::new(stream), service));
    let ended = match unless_stopping(&mut phase, conn.as_mut()).await {
        Some(ended) => ended,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        // A client gone, a head that never came, input that is not HTTP:
        // the client's problem, answered by hyper where it can be.
        tracing::debug!(error = %e, "API connection ended with an error");
    }
}

/// Why a request body was not read.
#[derive(Debug)]
enum BodyError {
    /// Over [`MAX_BODY_BYTES`], declared or sent.
    TooLarge,
    /// Not all there within the body timeout.
    Timeout,
    /// The connection failed or ended before the body did, or the body's
    /// framing (chunked encoding) is broken.
    Read(hyper::Error),
}

/// Reads `body` into `buf`, at most `limit` bytes; more is [`BodyError::TooLarge`].
async fn read_body(body: &mut Incoming, buf: &mut Vec<u8>, limit: usize) -> Result<(), BodyError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        // Trailers (after a chunked body) carry nothing vmhop uses.
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(())
}

/// Reads and drops what is left of a refused body, at most `limit` more
/// bytes within `wait`, so that the client can finish sending and read its
/// answer; hyper closes the connection if the body did not end.
async fn drain(mut body: Incoming, limit: u64, wait: Duration) {
    let drained = tokio::time::timeout(wait, async {
        let mut left = limit;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            match left.checked_sub(n) {
                Some(l) => left = l,
                None => return,
            }
        }
    });
    let _ = drained.await;
}

/// The answer to one request: the transport's checks, then the handler on a
/// blocking thread.
async fn answer(request: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let method = request.method().as_str().to_owned();
    // Routes never use the query string; `path()` leaves it out, so `?x`
    // cannot break routing.
    let path = request.uri().path().to_owned();
    let continue_expected = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut body = request.into_body();
    let declared = body.size_hint().exact();

    let mut buf = Vec::new();
    let read = if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        // Refused before a byte of it is read (and before hyper answers
        // `Expect: 100-continue`, so such a client need not send it).
        Err(BodyError::TooLarge)
    } else {
        let limit = shared.limits.body_read;
        tokio::time::timeout(limit, read_body(&mut body, &mut buf, MAX_BODY_BYTES))
            .await
            .unwrap_or(Err(BodyError::Timeout))
    };
    let (status, value) = match read {
        Ok(()) => run_handler(shared, method.clone(), path.clone(), buf).await,
        Err(e) => {
            let refused = body_refusal(&e, buf.len(), declared, shared.limits.body_read);
            tracing::debug!(method, path, status = refused.0, "API request body refused");
            let drainable = declared.is_none_or(|len| len <= REFUSED_BODY_DRAIN);
            if matches!(e, BodyError::TooLarge) && drainable && !continue_expected {
                tokio::spawn(drain(body, REFUSED_BODY_DRAIN, shared.limits.body_read));
            }
            return json_response(refused.0, &refused.1, true);
        }
    };
    tracing::debug!(method, path, status, "API request");
    json_response(status, &value, false)
}

/// The answer to a body that could not be read: 413, 408 or 400.
fn body_refusal(e: &BodyError, got: usize, declared: Option<u64>, wait: Duration) -> (u16, Value) {
    let of = declared.map_or(String::new(), |len| format!(" of the {len} bytes declared"));
    match e {
        BodyError::TooLarge => (
            413,
            error_body(format!(
                "request body exceeds the limit of {MAX_BODY_BYTES} bytes"
            )),
        ),
        BodyError::Timeout => (
            408,
            error_body(format!(
                "the request body did not arrive within {} s: got {got}{of}",
                wait.as_secs_f64()
            )),
        ),
        BodyError::Read(e) if ended_early(e) => (
            400,
            error_body(format!(
                "cannot read request body: the connection was closed after {got}{of}"
            )),
        ),
        BodyError::Read(e) => (
            400,
            error_body(format!(
                "cannot read request body after {got} bytes: {}",
                with_causes(e)
            )),
        ),
    }
}

/// Whether a body read failed because the client closed the connection
/// before the body's end (hyper reports it as an early EOF).
fn ended_early(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::UnexpectedEof)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// An error and its causes, `outer: inner: ...`.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Runs the handler on a blocking thread: it may take minutes (a
/// checkpoint, a migration), and the runtime's one thread keeps answering
/// other requests meanwhile.
async fn run_handler(shared: &Shared, method: String, path: String, body: Vec<u8>) -> (u16, Value) {
    let handler = Arc::clone(&shared.handler);
    // Counted from now, so that stopping also waits for a call queued for
    // a thread.
    let call = shared.handlers.begin();
    let (m, p) = (method.clone(), path.clone());
    let ran = tokio::task::spawn_blocking(move || {
        let _call = call;
        dispatch(handler.as_ref(), &m, &p, &body)
    })
    .await;
    ran.unwrap_or_else(|e| {
        // dispatch catches panics, so this is the runtime ending.
        tracing::error!(method, path, error = %e, "API handler did not run to its end");
        (
            500,
            error_body(format!(
                "internal error: the request handler did not finish: {e}"
            )),
        )
    })
}

/// A JSON response with a `Content-Length` (never chunked: simpler for
/// every client). `close`: the request was not read to its end, so the
/// connection cannot carry another.
fn json_response(status: u16, value: &Value, close: bool) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|e| {
        error_body(format!("internal error: cannot encode response: {e}"))
            .to_string()
            .into_bytes()
    });
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    // dispatch() has checked handler statuses; ours are constants.
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Methods whose body, when present, must be JSON.
fn body_must_be_json(method: &str) -> bool {
    matches!(method, "PUT" | "POST" | "PATCH")
}

/// The server's answer to one request, before the handler's status is trusted.
fn dispatch(handler: &dyn ApiHandler, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    if body_must_be_json(method) && !blank {
        if let Err(e) = serde_json::from_slice::<Value>(body) {
            return (400, error_body(format!("invalid JSON body: {e}")));
        }
    }
    // AssertUnwindSafe: the handler is shared between threads, so any state it
    // mutates is already behind its own locks; a panic poisons those rather
    // than leaving torn state visible.
    let result = panic::catch_unwind(AssertUnwindSafe(|| handler.handle(method, path, body)));
    match result {
        Ok((status, value)) if (200..=599).contains(&status) => (status, value),
        Ok((status, _)) => {
            tracing::error!(
                method,
                path,
                status,
                "API handler returned an invalid status"
            );
            let msg = format!("internal error: handler returned invalid HTTP status {status}");
            (500, error_body(msg))
        }
        Err(payload) => {
            let what = panic_message(payload.as_ref());
            tracing::error!(method, path, panic = %what, "API handler panicked");
            let msg = format!("internal error: the request handler panicked: {what}");
            (500, error_body(msg))
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::super::client::{self, ClientError};
    use super::*;
    use serde_json::json;
    use std::io::{Read, Write};
    use std::process::Command;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const TIMEOUT: Option<Duration> = Some(Duration::from_secs(10));

    /// A handler with a few routes exercising the transport.
    struct TestHandler;

    impl ApiHandler for TestHandler {
        fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
            match (method, path) {
                ("GET", "/api/v1/vm.status") => (200, json!({"name": "t", "state": "running"})),
                ("PUT", "/api/v1/echo") => (
                    200,
                    json!({"method": method, "body": String::from_utf8_lossy(body)}),
                ),
                (_, "/api/v1/panic") => panic!("test handler panic"),
                (_, "/api/v1/slow") => {
                    thread::sleep(Duration::from_millis(1500));
                    (200, json!({"slow": true}))
                }
                (_, "/api/v1/bad-status") => (42, json!({})),
                ("GET", "/api/v1/big") => (200, json!({"data": "x".repeat(100_000)})),
                // More than a socket buffer: sent only as the client reads.
                ("GET", "/api/v1/huge") => (200, json!({"data": "x".repeat(8 << 20)})),
                _ => (404, error_body(format!("unknown route {method} {path}"))),
            }
        }
    }

    fn start_in(dir: &Path) -> ApiServer {
        start_in_with(dir, Arc::new(TestHandler))
    }

    fn start_in_with(dir: &Path, handler: Arc<dyn ApiHandler>) -> ApiServer {
        ApiServer::start(&dir.join("vm.sock"), handler).expect("server starts")
    }

    /// A server with `limits` in place of the defaults.
    fn start_limited(dir: &Path, handler: Arc<dyn ApiHandler>, limits: Limits) -> ApiServer {
        ApiServer::start_with(&dir.join("vm.sock"), handler, limits).expect("server starts")
    }

    /// Everything the server sends until it closes the connection (a read
    /// timeout fails the test: the server held the connection open).
    fn read_until_closed(s: &mut UnixStream) -> String {
        s.set_read_timeout(TIMEOUT).unwrap();
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the server did not close the connection: {e}"),
            }
        }
        String::from_utf8(out).expect("utf-8 response")
    }

    /// Routes `/api/v1/hold` to calls that block until released (a
    /// checkpoint or a migration, for the transport), the rest to
    /// [`TestHandler`].
    struct Holding {
        entered: mpsc::Sender<()>,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl ApiHandler for Holding {
        fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
            if path != "/api/v1/hold" {
                return TestHandler.handle(method, path, body);
            }
            self.entered.send(()).unwrap();
            // One release per call; the lock only hands them out in turn.
            let released = self.release.lock().unwrap().recv();
            (200, json!({"held": released.is_ok()}))
        }
    }

    /// A [`Holding`] handler, a way to see its calls begin, and one to
    /// release them.
    fn holding() -> (Arc<Holding>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered, entered_rx) = mpsc::channel();
        let (release_tx, release) = mpsc::channel();
        let handler = Holding {
            entered,
            release: Mutex::new(release),
        };
        (Arc::new(handler), entered_rx, release_tx)
    }

    /// Sends raw bytes and returns the whole raw response (the server closes
    /// the connection because of `Connection: close`).
    fn raw_exchange(socket: &Path, request: &[u8]) -> String {
        let peer_gone = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            )
        };
        let mut stream = UnixStream::connect(socket).expect("connect");
        stream.set_read_timeout(TIMEOUT).unwrap();
        // A server refusing a body may answer and close before reading all of
        // it; its answer is still there to read.
        if let Err(e) = stream.write_all(request) {
            assert!(peer_gone(&e), "write request: {e}");
        }
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if peer_gone(&e) => break,
                Err(e) => panic!("read response: {e}"),
            }
        }
        String::from_utf8(out).expect("utf-8 response")
    }

    fn response_body(raw: &str) -> Value {
        let (_, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
        serde_json::from_str(body).expect("JSON body")
    }

    #[test]
    fn get_and_put_round_trip_through_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap(), json!({"name": "t", "state": "running"}));

        let body = json!({"dir": "/tmp/ck", "full": true});
        let echoed = client::call(server.path(), "PUT", "/api/v1/echo", Some(&body), TIMEOUT);
        let echoed = echoed.unwrap();
        assert_eq!(echoed["method"], "PUT");
        let sent: Value = serde_json::from_str(echoed["body"].as_str().unwrap()).unwrap();
        assert_eq!(sent, body);
    }

    #[test]
    fn query_string_is_not_part_of_the_route() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let got = client::call(server.path(), "GET", "/api/v1/vm.status?x=1", None, TIMEOUT);
        assert_eq!(got.unwrap()["state"], "running");
    }

    #[test]
    fn unknown_route_gives_the_handlers_404_as_api_error() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let err = client::call(server.path(), "GET", "/api/v1/nope", None, TIMEOUT).unwrap_err();
        match err {
            ClientError::Api { status, message } => {
                assert_eq!(status, 404);
                assert_eq!(message, "unknown route GET /api/v1/nope");
            }
            other => panic!("expected Api error, got {other:?}"),
        }
    }

    #[test]
    fn every_response_is_json_with_content_length() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        for path in ["/api/v1/vm.status", "/api/v1/nope", "/api/v1/big"] {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let raw = raw_exchange(server.path(), req.as_bytes());
            let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
            assert!(head.contains("content-type: application/json"), "{head}");
            assert!(head.contains("content-length:"), "{head}");
            assert!(!head.contains("transfer-encoding"), "{head}");
            response_body(&raw);
        }
    }

    #[test]
    fn invalid_json_body_is_rejected_with_400_before_the_handler() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let body = "{\"dir\": ";
        let req = format!(
            "PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let raw = raw_exchange(server.path(), req.as_bytes());
        assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
        let error = response_body(&raw)["error"].as_str().unwrap().to_owned();
        assert!(error.starts_with("invalid JSON body: "), "{error}");
    }

    #[test]
    fn blank_put_body_reaches_the_handler() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let req = "PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                   Content-Length: 2\r\n\r\n \n";
        let raw = raw_exchange(server.path(), req.as_bytes());
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        assert_eq!(response_body(&raw)["body"], " \n");
    }

    #[test]
    fn oversize_body_is_refused_with_413() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let body = json!({"pad": "a".repeat(MAX_BODY_BYTES)});
        let err = client::call(server.path(), "PUT", "/api/v1/echo", Some(&body), TIMEOUT);
        match err.unwrap_err() {
            ClientError::Api { status, message } => {
                assert_eq!(status, 413);
                assert!(message.contains("exceeds the limit"), "{message}");
            }
            other => panic!("expected Api error, got {other:?}"),
        }
        // The server is still serving.
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert!(status.is_ok());
    }

    #[test]
    fn oversize_chunked_body_is_refused_with_413() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let chunk = vec![b' '; 64 * 1024];
        let mut req = b"PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                        Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
        for _ in 0..(MAX_BODY_BYTES / chunk.len() + 1) {
            req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            req.extend_from_slice(&chunk);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let raw = raw_exchange(server.path(), &req);
        assert!(
            raw.starts_with("HTTP/1.1 413"),
            "{}",
            &raw[..raw.len().min(200)]
        );
    }

    #[test]
    fn clients_that_never_finish_their_bodies_do_not_stop_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        // More stalled requests than handler threads, each with a head
        // declaring a body and only part of it sent.
        let head = "PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                    Content-Length: 5000\r\n\r\n{\"a\": ";
        let mut stalled: Vec<UnixStream> = (0..HANDLER_THREADS + 2)
            .map(|_| {
                let mut s = UnixStream::connect(server.path()).unwrap();
                s.write_all(head.as_bytes()).unwrap();
                s
            })
            .collect();
        thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap()["state"], "running");
        // Not after the stalled bodies' timeout: answered beside them.
        assert!(
            started.elapsed() < BODY_READ_TIMEOUT / 2,
            "{:?}",
            started.elapsed()
        );
        // A stalled request that finishes its body late is still answered.
        let rest = format!("\"{}\"}}", "b".repeat(5000 - 6 - 3));
        let mut late = stalled.remove(0);
        late.set_read_timeout(TIMEOUT).unwrap();
        late.write_all(rest.as_bytes()).unwrap();
        let mut raw = String::new();
        late.read_to_string(&mut raw).unwrap();
        assert!(
            raw.starts_with("HTTP/1.1 200"),
            "{}",
            &raw[..raw.len().min(200)]
        );
        assert_eq!(response_body(&raw)["method"], "PUT");
    }

    #[test]
    fn a_huge_declared_body_is_refused_and_the_server_lives_on() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        // tiny_http 0.12.0, vmhop's earlier server, allocated the whole
        // declared length to drain the unread body, and the allocation
        // failure aborted the process.
        for len in [200_000_000_000_000u64, u64::MAX >> 1] {
            let mut s = UnixStream::connect(server.path()).unwrap();
            s.set_read_timeout(TIMEOUT).unwrap();
            let head = format!(
                "PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Content-Length: {len}\r\n\r\n{{\"a\": 1"
            );
            s.write_all(head.as_bytes()).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut raw = String::new();
            s.read_to_string(&mut raw).unwrap();
            assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
        }
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap()["state"], "running");
    }

    #[test]
    fn clients_that_never_send_a_refused_body_do_not_stop_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        // Refused at once (413), then drained: the drain waits for a body
        // the clients never send.
        let head = format!(
            "PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            2 * MAX_BODY_BYTES
        );
        let stalled: Vec<UnixStream> = (0..HANDLER_THREADS + 2)
            .map(|_| {
                let mut s = UnixStream::connect(server.path()).unwrap();
                s.write_all(head.as_bytes()).unwrap();
                s
            })
            .collect();
        thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap()["state"], "running");
        assert!(
            started.elapsed() < BODY_READ_TIMEOUT / 2,
            "{:?}",
            started.elapsed()
        );
        drop(stalled);
    }

    #[test]
    fn stopping_waits_for_an_answer_still_being_sent() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let socket = server.path().to_path_buf();
        // A client slow to read an answer larger than the socket buffer: the
        // handler has returned long before the answer is all sent, as when
        // `vm.stop` ends the process.
        let client = thread::spawn(move || {
            let mut s = UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(TIMEOUT).unwrap();
            s.write_all(b"GET /api/v1/huge HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            thread::sleep(Duration::from_millis(600));
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).unwrap();
            (Instant::now(), raw.len())
        });
        thread::sleep(Duration::from_millis(300));
        server.shutdown();
        let stopped = Instant::now();
        let (read_all, len) = client.join().unwrap();
        assert!(len > 8 << 20, "the whole answer arrived: {len} bytes");
        assert!(
            stopped >= read_all - Duration::from_millis(50),
            "shutdown returned {:?} before the answer was read",
            read_all - stopped
        );
    }

    #[test]
    fn a_body_cut_short_by_the_client_is_refused_with_400() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let mut s = UnixStream::connect(server.path()).unwrap();
        s.set_read_timeout(TIMEOUT).unwrap();
        s.write_all(
            b"PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
              Content-Length: 5000\r\n\r\n{}",
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
        let error = response_body(&raw)["error"].as_str().unwrap().to_owned();
        assert!(error.contains("after 2 of the 5000 bytes"), "{error}");
    }

    #[test]
    fn handler_panic_gives_500_json_and_the_server_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        // More panics than handler threads: no thread may be lost to one.
        for _ in 0..HANDLER_THREADS + 2 {
            let err = client::call(server.path(), "PUT", "/api/v1/panic", None, TIMEOUT);
            match err.unwrap_err() {
                ClientError::Api { status, message } => {
                    assert_eq!(status, 500);
                    assert!(message.contains("test handler panic"), "{message}");
                }
                other => panic!("expected Api error, got {other:?}"),
            }
        }
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap()["state"], "running");
    }

    #[test]
    fn invalid_handler_status_becomes_500() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let err = client::call(server.path(), "GET", "/api/v1/bad-status", None, TIMEOUT);
        assert!(
            matches!(err, Err(ClientError::Api { status: 500, .. })),
            "{err:?}"
        );
    }

    #[test]
    fn slow_request_does_not_block_others() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let socket = server.path().to_path_buf();
        let slow =
            thread::spawn(move || client::call(&socket, "PUT", "/api/v1/slow", None, TIMEOUT));
        thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert!(status.is_ok());
        // Well under the slow handler's 1.5 s, with room for a loaded machine.
        assert!(started.elapsed() < Duration::from_millis(1000));
        assert_eq!(slow.join().unwrap().unwrap()["slow"], true);
    }

    #[test]
    fn bound_socket_is_private_before_any_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.sock");
        let listener = bind_private(&path).unwrap();
        // With the usual umask (022) a plain bind() would give 0755.
        let mode = fs::symlink_metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(listener);
    }

    #[test]
    fn socket_has_mode_0600_and_created_dir_0700() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/vmhop/vm.sock");
        let server = ApiServer::start(&path, Arc::new(TestHandler)).unwrap();
        let meta = fs::symlink_metadata(server.path()).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let parent = fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(parent.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn second_start_on_a_live_socket_is_in_use_and_leaves_the_first_serving() {
        let dir = tempfile::tempdir().unwrap();
        let first = start_in(dir.path());
        let second = ApiServer::start(first.path(), Arc::new(TestHandler));
        let err = second.unwrap_err();
        assert!(matches!(err, ServerError::InUse { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "another vmhop is already serving {}",
                first.path().display()
            )
        );
        let status = client::call(first.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert!(status.is_ok());
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        // A listener dropped without unlinking leaves a socket nobody serves.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = ApiServer::start(&path, Arc::new(TestHandler)).unwrap();
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert!(status.is_ok());
    }

    #[test]
    fn regular_file_at_the_socket_path_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        fs::write(&path, b"precious").unwrap();
        let err = ApiServer::start(&path, Arc::new(TestHandler)).unwrap_err();
        assert!(matches!(err, ServerError::NotASocket { .. }), "{err:?}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn too_long_path_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s".repeat(120));
        let err = ApiServer::start(&path, Arc::new(TestHandler)).unwrap_err();
        assert!(
            matches!(err, ServerError::PathTooLong { max: 107, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn shutdown_and_drop_remove_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let path = server.path().to_path_buf();
        server.shutdown();
        assert!(!path.exists());
        let err = client::call(&path, "GET", "/api/v1/vm.status", None, TIMEOUT).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");

        let server = start_in(dir.path());
        drop(server);
        assert!(!path.exists());
        // The path is immediately reusable.
        let again = start_in(dir.path());
        assert!(client::call(again.path(), "GET", "/api/v1/vm.status", None, TIMEOUT).is_ok());
    }

    #[test]
    fn curl_can_talk_to_the_api() {
        let Ok(out) = Command::new("curl").arg("--version").output() else {
            eprintln!("curl not installed; skipping");
            return;
        };
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let socket = server.path().to_str().unwrap();
        let curl = |args: &[&str]| {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "10", "--unix-socket", socket])
                .args(args)
                .output()
                .expect("run curl");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).expect("curl printed JSON")
        };
        let status = curl(&["http://localhost/api/v1/vm.status"]);
        assert_eq!(status["state"], "running");
        let echoed = curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"to_node": 1}"#,
            "http://localhost/api/v1/echo",
        ]);
        assert_eq!(echoed["body"], r#"{"to_node": 1}"#);
        let bad = curl(&["-X", "PUT", "-d", "nope", "http://localhost/api/v1/echo"]);
        assert!(bad["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body"));
    }

    #[test]
    fn a_head_that_never_ends_is_closed_after_the_header_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            header_read: Duration::from_millis(200),
            ..Limits::default()
        };
        let server = start_limited(dir.path(), Arc::new(TestHandler), limits);
        // Half a head, and a connection that sends nothing at all.
        let mut partial = UnixStream::connect(server.path()).unwrap();
        partial
            .write_all(b"GET /api/v1/vm.status HTTP/1.1\r\nHost:")
            .unwrap();
        let mut idle = UnixStream::connect(server.path()).unwrap();
        // No request, so no answer: the connection is closed.
        assert_eq!(read_until_closed(&mut partial), "");
        assert_eq!(read_until_closed(&mut idle), "");
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap()["state"], "running");
    }

    #[test]
    fn a_body_that_never_ends_gets_408_after_the_body_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            body_read: Duration::from_millis(300),
            ..Limits::default()
        };
        let server = start_limited(dir.path(), Arc::new(TestHandler), limits);
        let mut s = UnixStream::connect(server.path()).unwrap();
        s.write_all(
            b"PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\n\
              Content-Length: 100\r\n\r\n{\"a\": 1,",
        )
        .unwrap();
        // Keep-alive was not refused by the client: the server closes the
        // connection itself, the rest of the body being unread.
        let raw = read_until_closed(&mut s);
        assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
        let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(head.contains("content-type: application/json"), "{head}");
        let error = response_body(&raw)["error"].as_str().unwrap().to_owned();
        assert_eq!(
            error,
            "the request body did not arrive within 0.3 s: got 8 of the 100 bytes declared"
        );
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap()["state"], "running");
    }

    #[test]
    fn connections_beyond_the_cap_wait_for_a_free_one() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let server = start_limited(dir.path(), Arc::new(TestHandler), limits);
        let mut held: Vec<UnixStream> = (0..2)
            .map(|_| UnixStream::connect(server.path()).unwrap())
            .collect();
        // Queued in the backlog, never read: no answer.
        let quick = Some(Duration::from_millis(300));
        let err = client::call(server.path(), "GET", "/api/v1/vm.status", None, quick);
        assert!(matches!(err, Err(ClientError::Timeout { .. })), "{err:?}");
        drop(held.pop());
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap()["state"], "running");
    }

    #[test]
    fn a_refused_body_sent_whole_is_read_and_its_413_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let body = vec![b' '; 2 * MAX_BODY_BYTES];
        let mut s = UnixStream::connect(server.path()).unwrap();
        s.set_write_timeout(TIMEOUT).unwrap();
        let head = format!(
            "PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        // A client that sends its whole request before reading is not cut
        // off mid-send (EPIPE): the server reads what it refused.
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let raw = read_until_closed(&mut s);
        assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    }

    #[test]
    fn a_body_declared_beyond_what_is_drained_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        // A body timeout longer than the read timeout: only closing the
        // connection at once ends the read.
        let limits = Limits {
            body_read: Duration::from_secs(60),
            ..Limits::default()
        };
        let server = start_limited(dir.path(), Arc::new(TestHandler), limits);
        let mut s = UnixStream::connect(server.path()).unwrap();
        let head = format!(
            "PUT /api/v1/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{{",
            REFUSED_BODY_DRAIN + 1
        );
        s.write_all(head.as_bytes()).unwrap();
        let raw = read_until_closed(&mut s);
        assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    }

    #[test]
    fn a_long_handler_call_leaves_the_api_answering() {
        let dir = tempfile::tempdir().unwrap();
        let (handler, entered, release) = holding();
        let server = start_in_with(dir.path(), handler);
        // Every handler thread but one held, as by minutes-long operations.
        let held: Vec<_> = (0..HANDLER_THREADS - 1)
            .map(|_| {
                let socket = server.path().to_path_buf();
                thread::spawn(move || client::call(&socket, "PUT", "/api/v1/hold", None, TIMEOUT))
            })
            .collect();
        for _ in &held {
            entered.recv_timeout(TIMEOUT.unwrap()).unwrap();
        }
        let status = client::call(server.path(), "GET", "/api/v1/vm.status", None, TIMEOUT);
        assert_eq!(status.unwrap()["state"], "running");
        for _ in &held {
            release.send(()).unwrap();
        }
        for call in held {
            assert_eq!(call.join().unwrap().unwrap()["held"], true);
        }
    }

    #[test]
    fn stopping_answers_a_handler_call_in_progress_first() {
        let dir = tempfile::tempdir().unwrap();
        let (handler, entered, release) = holding();
        let server = start_in_with(dir.path(), handler);
        let socket = server.path().to_path_buf();
        let call =
            thread::spawn(move || client::call(&socket, "PUT", "/api/v1/hold", None, TIMEOUT));
        entered.recv_timeout(TIMEOUT.unwrap()).unwrap();
        let (stopped_tx, stopped) = mpsc::channel();
        let stopping = thread::spawn(move || {
            server.shutdown();
            stopped_tx.send(()).unwrap();
        });
        // Stopping waits for the call, however long it takes.
        assert!(stopped.recv_timeout(Duration::from_millis(300)).is_err());
        release.send(()).unwrap();
        stopping.join().unwrap();
        assert_eq!(call.join().unwrap().unwrap()["held"], true);
    }

    #[test]
    fn stopping_closes_idle_connections_without_waiting_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let server = start_in(dir.path());
        let path = server.path().to_path_buf();
        let mut idle = UnixStream::connect(&path).unwrap();
        // Kept alive after an answer, then idle.
        idle.write_all(b"GET /api/v1/vm.status HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 12];
        idle.set_read_timeout(TIMEOUT).unwrap();
        idle.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        let started = Instant::now();
        server.shutdown();
        // Not held for ANSWER_WAIT by connections with no request in them.
        assert!(started.elapsed() < ANSWER_WAIT, "{:?}", started.elapsed());
        assert!(!path.exists());
        read_until_closed(&mut idle);
    }
}
