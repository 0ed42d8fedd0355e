//! Where a migration stream goes: `tcp://HOST:PORT` or `unix:PATH`, the
//! listener the destination waits on and the connection either side holds.
//!
//! Both transports are handed out as a `Box<dyn Conn>` so that the layers
//! above (authentication, framing) never care which one they run over. A
//! connection can be cut from another thread through a [`ShutdownHandle`],
//! which is how `migrate-cancel` and `--timeout` end a blocked transfer.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Prefix of a TCP address.
const TCP_SCHEME: &str = "tcp://";
/// Prefix of a Unix socket address.
const UNIX_SCHEME: &str = "unix:";

/// The address of a migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `tcp://HOST:PORT`; `HOST` is a name, an IPv4 address or a bracketed
    /// IPv6 address (`tcp://[::1]:4444`).
    Tcp {
        /// Host name or IP literal, without brackets.
        host: String,
        /// TCP port (0 lets the listener pick one; see [`Listener::local_address`]).
        port: u16,
    },
    /// `unix:PATH`, a Unix stream socket.
    Unix(PathBuf),
}

/// Why a string is not a migration address.
#[derive(Debug, thiserror::Error)]
pub enum ParseAddressError {
    /// Neither `tcp://` nor `unix:`.
    #[error("'{0}' is not a migration address: expected tcp://HOST:PORT or unix:PATH")]
    Scheme(String),
    /// `tcp://` without `:PORT`.
    #[error("'{0}' has no port: expected tcp://HOST:PORT")]
    NoPort(String),
    /// The port is not a number in 0..=65535.
    #[error("'{input}': port '{port}' is not a number from 0 to 65535")]
    BadPort {
        /// The whole address as given.
        input: String,
        /// The part after the last ':'.
        port: String,
    },
    /// `tcp://:PORT` or `tcp://[]:PORT`.
    #[error("'{0}' has no host: expected tcp://HOST:PORT")]
    NoHost(String),
    /// A `[` without its `]`, or an unbracketed IPv6 address.
    #[error("'{0}': an IPv6 host must be written in brackets, as in tcp://[::1]:4444")]
    BadIpv6(String),
    /// `unix:` with nothing after it.
    #[error("'{0}' has no path: expected unix:PATH")]
    NoPath(String),
}

impl FromStr for Address {
    type Err = ParseAddressError;

    fn from_str(input: &str) -> Result<Address, ParseAddressError> {
        if let Some(path) = input.strip_prefix(UNIX_SCHEME) {
            if path.is_empty() {
                return Err(ParseAddressError::NoPath(input.to_string()));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let Some(rest) = input.strip_prefix(TCP_SCHEME) else {
            return Err(ParseAddressError::Scheme(input.to_string()));
        };
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(ParseAddressError::NoPort(input.to_string()));
        };
        let host = if let Some(inner) = host.strip_prefix('[') {
            let Some(inner) = inner.strip_suffix(']') else {
                return Err(ParseAddressError::BadIpv6(input.to_string()));
            };
            if inner.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(ParseAddressError::BadIpv6(input.to_string()));
            }
            inner
        } else if host.contains([':', '[', ']']) {
            return Err(ParseAddressError::BadIpv6(input.to_string()));
        } else {
            host
        };
        if host.is_empty() {
            return Err(ParseAddressError::NoHost(input.to_string()));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| ParseAddressError::BadPort {
                input: input.to_string(),
                port: port.to_string(),
            })?;
        Ok(Address::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "{TCP_SCHEME}[{host}]:{port}")
            }
            Address::Tcp { host, port } => write!(f, "{TCP_SCHEME}{host}:{port}"),
            Address::Unix(path) => write!(f, "{UNIX_SCHEME}{}", path.display()),
        }
    }
}

impl Address {
    /// Whether the address cannot leave this host: a Unix socket, a loopback
    /// IP literal (127.0.0.0/8, ::1) or the name `localhost`. Other names are
    /// not resolved here (a name's answer can change between this check and
    /// the connect), so they count as remote.
    pub fn is_local(&self) -> bool {
        match self {
            Address::Unix(_) => true,
            Address::Tcp { host, .. } => {
                host.eq_ignore_ascii_case("localhost")
                    || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        }
    }

    /// The name a TLS client checks in the destination's certificate: the
    /// host of a TCP address, `localhost` for a Unix socket.
    pub fn tls_server_name(&self) -> &str {
        match self {
            Address::Tcp { host, .. } => host,
            Address::Unix(_) => "localhost",
        }
    }

    fn socket_addrs(&self) -> Result<Vec<SocketAddr>, TransportError> {
        let Address::Tcp { host, port } = self else {
            return Ok(Vec::new());
        };
        let addrs: Vec<SocketAddr> = (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|source| TransportError::Resolve {
                addr: self.clone(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(TransportError::Resolve {
                addr: self.clone(),
                source: io::Error::new(io::ErrorKind::NotFound, "the name has no address"),
            });
        }
        Ok(addrs)
    }
}

/// What failed while listening, accepting or connecting.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The host name did not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// The address being resolved.
        addr: Address,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// bind() or listen() failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address being bound.
        addr: Address,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process already listens on this Unix socket.
    #[error("cannot listen on {0}: another process is listening there")]
    InUse(Address),
    /// The Unix socket path exists and is not a socket: never removed.
    #[error("cannot listen on {0}: the path exists and is not a socket")]
    NotASocket(Address),
    /// accept() failed.
    #[error("accepting a connection on {addr} failed: {source}")]
    Accept {
        /// The listening address.
        addr: Address,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// connect() failed (refused, unreachable, timed out).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialed.
        addr: Address,
        /// The OS error of the last address tried.
        #[source]
        source: io::Error,
    },
}

/// A byte stream between source and destination.
///
/// Implemented by plain TCP and Unix streams and by the TLS wrapper of
/// [`crate::migration::auth`].
pub trait Conn: Read + Write + Send {
    /// Bounds how long one `read` blocks (`None`: forever); a read that runs
    /// out of time fails with `WouldBlock` or `TimedOut`.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// Bounds how long one `write` blocks (`None`: forever).
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// Shuts the connection down both ways: blocked reads and writes on it
    /// return at once. Errors (already closed) are ignored.
    fn shutdown(&self);

    /// A handle that shuts this connection down from another thread, while
    /// the owner of the `Box<dyn Conn>` may be blocked in a read or write.
    fn shutdown_handle(&self) -> io::Result<ShutdownHandle>;

    /// What is at the other end, for messages ("127.0.0.1:51234", a Unix
    /// peer is "unix socket").
    fn peer(&self) -> String;
}

/// Cuts a connection from another thread (see [`Conn::shutdown_handle`]).
#[derive(Debug)]
pub struct ShutdownHandle(Socket);

impl ShutdownHandle {
    /// Shuts the connection down both ways; blocked reads and writes on it
    /// return at once. Errors (already closed) are ignored.
    pub fn shutdown(&self) {
        self.0.shutdown();
    }
}

/// The OS socket under a connection.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn shutdown(&self) {
        // Errors mean the socket is already shut down or closed: the aim
        // (no more traffic) holds either way.
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Conn for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }

    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, Shutdown::Both);
    }

    fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(Socket::Tcp(self.try_clone()?)))
    }

    fn peer(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "a TCP peer".to_string())
    }
}

impl Conn for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }

    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, Shutdown::Both);
    }

    fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(Socket::Unix(self.try_clone()?)))
    }

    fn peer(&self) -> String {
        "unix socket".to_string()
    }
}

/// The destination's listening socket.
///
/// A Unix listener removes its socket file when dropped (if the file is
/// still the one it created).
#[derive(Debug)]
pub struct Listener {
    addr: Address,
    inner: ListenerInner,
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket file we bound, so drop removes
        /// only our own file and not one a later listener put there.
        file_id: (u64, u64),
    },
}

impl Listener {
    /// Listens on `addr`. A Unix socket file left by a dead process is
    /// removed first; one with a live listener, or a path that is not a
    /// socket, is refused.
    pub fn bind(addr: &Address) -> Result<Listener, TransportError> {
        let bind_err = |source| TransportError::Bind {
            addr: addr.clone(),
            source,
        };
        let inner = match addr {
            Address::Tcp { .. } => {
                let addrs = addr.socket_addrs()?;
                ListenerInner::Tcp(TcpListener::bind(&addrs[..]).map_err(bind_err)?)
            }
            Address::Unix(path) => {
                remove_stale_socket(addr, path)?;
                let listener = UnixListener::bind(path).map_err(bind_err)?;
                let meta = std::fs::metadata(path).map_err(bind_err)?;
                ListenerInner::Unix {
                    listener,
                    path: path.clone(),
                    file_id: (meta.dev(), meta.ino()),
                }
            }
        };
        Ok(Listener {
            addr: addr.clone(),
            inner,
        })
    }

    /// The address actually listened on: for `tcp://HOST:0`, with the port
    /// the kernel picked.
    pub fn local_address(&self) -> Address {
        match &self.inner {
            ListenerInner::Tcp(l) => match l.local_addr() {
                Ok(sa) => Address::Tcp {
                    host: sa.ip().to_string(),
                    port: sa.port(),
                },
                Err(_) => self.addr.clone(),
            },
            ListenerInner::Unix { .. } => self.addr.clone(),
        }
    }

    /// Waits for one connection. TCP connections get `TCP_NODELAY`: the
    /// stream's small control frames (acks, end of round) must not wait.
    pub fn accept(&self) -> Result<Box<dyn Conn>, TransportError> {
        let accept_err = |source| TransportError::Accept {
            addr: self.addr.clone(),
            source,
        };
        match &self.inner {
            ListenerInner::Tcp(l) => {
                let (stream, _) = l.accept().map_err(accept_err)?;
                stream.set_nodelay(true).map_err(accept_err)?;
                Ok(Box::new(stream))
            }
            ListenerInner::Unix { listener, .. } => {
                let (stream, _) = listener.accept().map_err(accept_err)?;
                Ok(Box::new(stream))
            }
        }
    }
}

impl Listener {
    /// Waits at most `timeout` for one connection: None if none came.
    pub fn accept_within(
        &self,
        timeout: Duration,
    ) -> Result<Option<Box<dyn Conn>>, TransportError> {
        use std::os::fd::AsRawFd;
        let fd = match &self.inner {
            ListenerInner::Tcp(l) => l.as_raw_fd(),
            ListenerInner::Unix { listener, .. } => listener.as_raw_fd(),
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd, valid for the call, on a socket this listener
        // owns.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(TransportError::Accept {
                addr: self.addr.clone(),
                source: e,
            });
        }
        if n == 0 {
            return Ok(None);
        }
        self.accept().map(Some)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix { path, file_id, .. } = &self.inner {
            let ours =
                std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *file_id);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Removes a socket file nobody listens on; refuses a live one or a file
/// that is not a socket.
fn remove_stale_socket(addr: &Address, path: &Path) -> Result<(), TransportError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TransportError::Bind {
                addr: addr.clone(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(TransportError::NotASocket(addr.clone()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(TransportError::InUse(addr.clone())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| TransportError::Bind {
                addr: addr.clone(),
                source,
            }),
        Err(source) => Err(TransportError::Bind {
            addr: addr.clone(),
            source,
        }),
    }
}

/// Connects to `addr`, trying each resolved address in turn for at most
/// `timeout` each. TCP connections get `TCP_NODELAY`.
pub fn connect(addr: &Address, timeout: Duration) -> Result<Box<dyn Conn>, TransportError> {
    let connect_err = |source| TransportError::Connect {
        addr: addr.clone(),
        source,
    };
    match addr {
        Address::Tcp { .. } => {
            let mut last = None;
            for sa in addr.socket_addrs()? {
                match TcpStream::connect_timeout(&sa, timeout) {
                    Ok(stream) => {
                        stream.set_nodelay(true).map_err(connect_err)?;
                        return Ok(Box::new(stream));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(connect_err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no address to try")
            })))
        }
        // A Unix connect does not wait on the network: it succeeds or fails
        // at once, so it needs no timeout.
        Address::Unix(path) => Ok(Box::new(UnixStream::connect(path).map_err(connect_err)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Address {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_and_displays_every_form() {
        for s in [
            "tcp://127.0.0.1:4444",
            "tcp://example.org:1",
            "tcp://[::1]:65535",
            "unix:/run/vmhop/in.sock",
            "unix:relative.sock",
        ] {
            assert_eq!(parse(s).to_string(), s);
        }
        assert_eq!(
            parse("tcp://[::1]:9"),
            Address::Tcp {
                host: "::1".into(),
                port: 9
            }
        );
    }

    #[test]
    fn bad_addresses_are_refused_naming_the_input() {
        for s in [
            "127.0.0.1:4444",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:port",
            "tcp://127.0.0.1:70000",
            "tcp://:4444",
            "tcp://[]:4444",
            "tcp://::1:4444",
            "tcp://[::1:4444",
            "tcp://[nothex]:4444",
            "unix:",
            "",
        ] {
            let err = s.parse::<Address>().expect_err(s).to_string();
            assert!(err.contains(&format!("'{s}'")), "{err}");
        }
    }

    #[test]
    fn only_loopback_and_unix_are_local() {
        for (s, local) in [
            ("tcp://127.0.0.1:1", true),
            ("tcp://127.3.2.1:1", true),
            ("tcp://[::1]:1", true),
            ("tcp://LocalHost:1", true),
            ("unix:/x", true),
            ("tcp://0.0.0.0:1", false),
            ("tcp://10.0.0.1:1", false),
            ("tcp://[::]:1", false),
            ("tcp://example.org:1", false),
        ] {
            assert_eq!(parse(s).is_local(), local, "{s}");
        }
    }

    /// Echoes five bytes back on the first connection that sends them
    /// (a probe that connects and hangs up is skipped).
    fn echo_once(listener: Listener) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || loop {
            let mut conn = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            if conn.read_exact(&mut buf).is_ok() {
                conn.write_all(&buf).unwrap();
                return;
            }
        })
    }

    #[test]
    fn tcp_listener_accepts_and_reports_its_port() {
        let listener = Listener::bind(&parse("tcp://127.0.0.1:0")).unwrap();
        let addr = listener.local_address();
        assert!(matches!(addr, Address::Tcp { port, .. } if port != 0));
        let server = echo_once(listener);
        let mut conn = connect(&addr, Duration::from_secs(5)).unwrap();
        conn.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        server.join().unwrap();
    }

    #[test]
    fn unix_listener_replaces_a_stale_socket_and_removes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.sock");
        // A socket file whose listener is gone.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let addr = Address::Unix(path.clone());
        let listener = Listener::bind(&addr).unwrap();
        let err = Listener::bind(&addr).unwrap_err();
        assert!(matches!(err, TransportError::InUse(_)), "{err}");
        let server = echo_once(listener);
        let mut conn = connect(&addr, Duration::from_secs(5)).unwrap();
        conn.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        server.join().unwrap();
        assert!(!path.exists(), "the listener removes its socket on drop");
    }

    #[test]
    fn unix_listener_never_removes_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        std::fs::write(&path, b"data").unwrap();
        let err = Listener::bind(&Address::Unix(path.clone())).unwrap_err();
        assert!(matches!(err, TransportError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn connect_to_nobody_fails_naming_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let addr = Address::Unix(dir.path().join("none.sock"));
        let err = connect(&addr, Duration::from_secs(1)).err().unwrap();
        assert!(err.to_string().contains("none.sock"), "{err}");
        // A port nobody listens on: bind one, learn it, close it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = parse(&format!("tcp://127.0.0.1:{port}"));
        let err = connect(&addr, Duration::from_secs(1)).err().unwrap();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn shutdown_handle_unblocks_a_reader_in_another_thread() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn: Box<dyn Conn> = Box::new(a);
        let handle = conn.shutdown_handle().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            conn.read(&mut buf)
        });
        std::thread::sleep(Duration::from_millis(50));
        handle.shutdown();
        // A shut-down socket reads as end of stream.
        assert_eq!(reader.join().unwrap().unwrap(), 0);
    }
}
