//! Who may send a VM here, and to whom a VM may be sent: the handshake at
//! the start of every migration connection, before any frame.
//!
//! Three methods, chosen by [`Security`] and never negotiated (each side
//! insists on its own, so nobody on the path can talk them down):
//!
//! - `Insecure`: no authentication, for loopback and Unix sockets or with
//!   `--insecure` ([`check_policy`] enforces that).
//! - `Psk`: a key file present on both hosts. After the hellos, the two
//!   sides run the Noise handshake `Noise_NNpsk0_25519_AESGCM_SHA256`
//!   (`noise.rs`) with a key derived from the file, its prologue binding
//!   both hellos (so both fresh nonces, and the migration, connection
//!   index and count the source names). Each side's message only verifies
//!   for a peer that has the key and saw the same hellos: a wrong key fails
//!   on both sides, and a recorded handshake is useless later. The stream
//!   then runs inside the Noise channel: encrypted and authenticated.
//! - `Tls`: mutual TLS 1.3 (rustls, ring): the destination requires a
//!   client certificate signed by its CA file, the source verifies the
//!   destination's certificate and name against its CA file. The stream
//!   then runs inside TLS.
//!
//! Every method yields a [`Binding`] for the frame layer: a [`SessionNonce`]
//! that both sides agree on and that differs for every connection (the
//! checksummed modes fold it into each frame's crc32c, so frames of another
//! session are refused), whether the connection is sealed, and the
//! [`Link`] the source named.
//!
//! This module does not decide what the CLI flags are called beyond naming
//! them in messages, nor what happens after the handshake.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use rustls::{ClientConnection, RootCertStore, ServerConnection, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::address::{Address, Conn, ShutdownHandle};
use super::noise::{Handshake, HandshakeError, HANDSHAKE_MESSAGE_LEN, PSK_LEN};
use super::protocol::{
    Binding, FrameStream, Integrity, Link, SessionNonce, LINK_LEN, SESSION_NONCE_LEN,
};

type HmacSha256 = hmac::Hmac<Sha256>;

/// First eight bytes each side sends on a new connection.
pub const AUTH_MAGIC: [u8; 8] = *b"VMHOPAUT";
/// The handshake version this code speaks (2: the source's hello names its
/// link, and a key runs the Noise handshake and seals the stream).
pub const AUTH_VERSION: u32 = 2;
/// Shortest pre-shared key accepted, in bytes: 128 bits.
pub const MIN_PSK_LEN: usize = 16;

/// magic, version u32, method u8, role u8, reserved u16.
const PREAMBLE_LEN: usize = 16;
/// Each side's fresh random value (insecure and key mode).
const NONCE_LEN: usize = 32;
/// The longest hello: preamble, nonce, link.
const MAX_HELLO_LEN: usize = PREAMBLE_LEN + NONCE_LEN + LINK_LEN;
/// The length before each Noise handshake message (as before each record).
const RECORD_HEADER_LEN: usize = 2;
/// Domain separation: these keys, prologues and hashes mean nothing
/// anywhere else.
const NOISE_PSK_LABEL: &[u8] = b"vmhop migration noise psk v2";
const NOISE_PROLOGUE_LABEL: &[u8] = b"vmhop migration noise prologue v2";
const INSECURE_SESSION_LABEL: &[u8] = b"vmhop migration insecure session v2";
const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-vmhop-migration-session-v2";
/// Private key and pre-shared key files may be readable by their owner only:
/// any group or other permission bit is refused.
const PRIVATE_MODE_MASK: u32 = 0o077;

const METHOD_INSECURE: u8 = 0;
const METHOD_PSK: u8 = 1;
const METHOD_TLS: u8 = 2;

/// Which end of a migration this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends the VM (`vmhop migrate`); the TLS client.
    Source,
    /// Receives it (`vmhop run --incoming`); the TLS server.
    Destination,
}

impl Role {
    fn to_byte(self) -> u8 {
        match self {
            Role::Source => 1,
            Role::Destination => 2,
        }
    }

    fn peer(self) -> Role {
        match self {
            Role::Source => Role::Destination,
            Role::Destination => Role::Source,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
        })
    }
}

/// How this side authenticates its peer (and itself).
pub enum Security {
    /// No authentication.
    Insecure,
    /// A pre-shared key (see [`Security::psk_from_file`]).
    Psk(PskKey),
    /// Mutual TLS (see [`Security::tls_from_files`]).
    Tls(Box<TlsIdentity>),
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A pre-shared key, wiped from memory when dropped.
pub struct PskKey(Zeroizing<Vec<u8>>);

impl PskKey {
    /// The 32-byte key Noise takes, derived from the file's bytes (which
    /// may be of any length from 16).
    fn noise_psk(&self) -> Zeroizing<[u8; PSK_LEN]> {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        mac.update(NOISE_PSK_LABEL);
        Zeroizing::new(mac.finalize().into_bytes().into())
    }
}

/// This host's TLS certificate and key and the CA that signs its peers'.
pub struct TlsIdentity {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl Security {
    /// Reads a pre-shared key file. The key is the file's bytes without
    /// trailing newlines (so `openssl rand -hex 32 > F` and a raw 32-byte
    /// file both work); it must be at least 16 bytes and the file must not
    /// be accessible to group or others.
    pub fn psk_from_file(path: &Path) -> Result<Security, AuthError> {
        let bad = |problem: KeyFileProblem| AuthError::KeyFile {
            path: path.to_path_buf(),
            problem,
        };
        check_private(path).map_err(|e| bad(e.into()))?;
        let mut key =
            Zeroizing::new(std::fs::read(path).map_err(|e| bad(KeyFileProblem::Read(e)))?);
        while matches!(key.last(), Some(b'\n' | b'\r')) {
            key.pop();
        }
        if key.len() < MIN_PSK_LEN {
            return Err(bad(KeyFileProblem::TooShort {
                len: key.len(),
                path: path.to_path_buf(),
            }));
        }
        Ok(Security::Psk(PskKey(key)))
    }

    /// Reads this host's certificate chain and private key (PEM) and the CA
    /// certificate(s) (PEM) that sign the peers' certificates, and builds
    /// both TLS configurations now, so a bad file fails before any
    /// connection. The certificate serves as the server certificate when
    /// this host is a destination and as the client certificate when it
    /// is a source, so it needs both serverAuth and clientAuth usages if it
    /// restricts usages. The key file must not be accessible to group or
    /// others.
    pub fn tls_from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Security, AuthError> {
        let file_err = |path: &Path, problem: TlsFileProblem| AuthError::TlsFile {
            path: path.to_path_buf(),
            problem,
        };
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| file_err(cert, TlsFileProblem::Certificates(e)))?;
        if certs.is_empty() {
            return Err(file_err(cert, TlsFileProblem::NoCertificate));
        }
        check_private(key).map_err(|e| file_err(key, e.into()))?;
        let private_key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, TlsFileProblem::Key(e)))?;
        let ca_certs = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| file_err(ca, TlsFileProblem::Certificates(e)))?;
        let mut roots = RootCertStore::empty();
        for c in ca_certs {
            roots
                .add(c)
                .map_err(|e| file_err(ca, TlsFileProblem::Ca(e)))?;
        }
        if roots.is_empty() {
            return Err(file_err(ca, TlsFileProblem::NoCertificate));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config_err = |source| AuthError::TlsConfig { source };

        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), private_key.clone_key())
            .map_err(config_err)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| file_err(ca, TlsFileProblem::Verifier(e)))?;
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, private_key)
            .map_err(config_err)?;
        Ok(Security::Tls(Box::new(TlsIdentity {
            client: Arc::new(client),
            server: Arc::new(server),
        })))
    }

    /// The method in words, with the flags that select it.
    pub fn describe(&self) -> &'static str {
        method_name(self.method())
    }

    fn method(&self) -> u8 {
        match self {
            Security::Insecure => METHOD_INSECURE,
            Security::Psk(_) => METHOD_PSK,
            Security::Tls(_) => METHOD_TLS,
        }
    }
}

fn method_name(method: u8) -> &'static str {
    match method {
        METHOD_INSECURE => "no authentication (--insecure)",
        METHOD_PSK => "a pre-shared key (--auth-key-file)",
        METHOD_TLS => "TLS (--tls-cert, --tls-key, --tls-ca)",
        _ => "an unknown method",
    }
}

/// Refuses a secret file that group or others may access.
fn check_private(path: &Path) -> Result<(), PrivateFileError> {
    let meta = std::fs::metadata(path).map_err(PrivateFileError::Metadata)?;
    let mode = meta.permissions().mode();
    if mode & PRIVATE_MODE_MASK != 0 {
        return Err(PrivateFileError::Shared {
            mode: mode & 0o777,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// A secret file that is missing, unreadable, or readable by others.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    /// Its metadata could not be read (missing, not permitted).
    #[error(transparent)]
    Metadata(io::Error),
    /// Group or others may read it.
    #[error("mode {mode:o} lets group or others read it; run: chmod 600 {}", path.display())]
    Shared {
        /// Its permission bits.
        mode: u32,
        /// The file.
        path: PathBuf,
    },
}

/// Why a pre-shared key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileProblem {
    /// It is missing, unreadable or not private.
    #[error(transparent)]
    Private(#[from] PrivateFileError),
    /// Reading it failed.
    #[error(transparent)]
    Read(io::Error),
    /// The key is too short to be a secret.
    #[error(
        "the key is {len} bytes; at least {MIN_PSK_LEN} are needed \
         (make one with: head -c 32 /dev/urandom > {})",
        path.display()
    )]
    TooShort {
        /// Its length, trailing newlines dropped.
        len: usize,
        /// The file.
        path: PathBuf,
    },
}

/// Why a certificate, key or CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileProblem {
    /// Its PEM certificates do not read.
    #[error("cannot read certificates: {0}")]
    Certificates(#[source] rustls_pki_types::pem::Error),
    /// It holds no certificate.
    #[error("no PEM certificate in the file")]
    NoCertificate,
    /// The key file is missing, unreadable or not private.
    #[error(transparent)]
    Private(#[from] PrivateFileError),
    /// Its private key does not read.
    #[error("cannot read a private key: {0}")]
    Key(#[source] rustls_pki_types::pem::Error),
    /// A CA certificate rustls refuses.
    #[error("not a usable CA certificate: {0}")]
    Ca(#[source] rustls::Error),
    /// The CA certificates cannot verify client certificates.
    #[error("cannot verify clients with it: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

impl KeyFileProblem {
    /// The OS error, if the file could not be read at all.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            KeyFileProblem::Private(PrivateFileError::Metadata(e)) | KeyFileProblem::Read(e) => {
                Some(e)
            }
            _ => None,
        }
    }
}

impl TlsFileProblem {
    /// The OS error, if the file could not be read at all.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            TlsFileProblem::Private(PrivateFileError::Metadata(e))
            | TlsFileProblem::Certificates(rustls_pki_types::pem::Error::Io(e))
            | TlsFileProblem::Key(rustls_pki_types::pem::Error::Io(e)) => Some(e),
            _ => None,
        }
    }
}

/// Why a connection to a peer was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A pre-shared key file that cannot be used.
    #[error("pre-shared key file {}: {problem}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: KeyFileProblem,
    },
    /// A certificate, key or CA file that cannot be used.
    #[error("TLS file {}: {problem}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: TlsFileProblem,
    },
    /// The certificate and key do not make a TLS configuration.
    #[error("cannot set up TLS: {source}")]
    TlsConfig {
        /// rustls's reason (a key that does not match the certificate...).
        #[source]
        source: rustls::Error,
    },
    /// The peer did not start with the handshake magic.
    #[error("the peer is not a vmhop migration endpoint: it sent {got:?}")]
    NotVmhop {
        /// The first eight bytes received.
        got: [u8; 8],
    },
    /// The peer speaks another handshake version.
    #[error("the peer speaks migration handshake version {theirs}; this vmhop speaks {ours}")]
    Version {
        /// This side's version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
    /// The two sides were configured with different methods.
    #[error("the {peer_role} uses {theirs} but this side uses {ours}: give both hosts the same kind of credentials")]
    MethodMismatch {
        /// The peer's role.
        peer_role: Role,
        /// This side's method.
        ours: &'static str,
        /// The peer's method.
        theirs: &'static str,
    },
    /// Two sources or two destinations.
    #[error("the peer is also a {0}")]
    SameRole(Role),
    /// The peer sent this side's own nonce back.
    #[error("the peer sent back this side's own challenge: refusing a reflected handshake")]
    Reflected,
    /// The peer's proof of the pre-shared key is wrong.
    #[error("the {peer_role} does not know the pre-shared key: its proof is wrong (the key files differ, or the handshake was replayed)")]
    WrongKey {
        /// The peer's role.
        peer_role: Role,
    },
    /// The peer refused this side's proof of the pre-shared key.
    #[error(
        "the {peer_role} refused this side's proof of the pre-shared key: the key files differ"
    )]
    KeyRefused {
        /// The peer's role.
        peer_role: Role,
    },
    /// A key exchange message of the wrong size.
    #[error("the {peer_role} sent a {len}-byte key exchange message; the handshake's are {HANDSHAKE_MESSAGE_LEN} bytes")]
    BadKeyExchange {
        /// The peer's role.
        peer_role: Role,
        /// The declared length.
        len: usize,
    },
    /// The source named an impossible connection.
    #[error("the source's hello is malformed: {0}")]
    BadLink(#[source] super::protocol::LinkError),
    /// The Noise library refused to run the handshake.
    #[error("the key exchange failed: {0}")]
    Noise(String),
    /// The TLS handshake failed (certificate not signed by the CA, wrong
    /// name, no client certificate...).
    #[error("TLS handshake with the {peer_role} failed: {source}")]
    Tls {
        /// The peer's role.
        peer_role: Role,
        /// rustls's reason, as an I/O error.
        #[source]
        source: io::Error,
    },
    /// The peer said nothing in time.
    #[error("the {peer_role} sent nothing for {timeout:?} while authenticating ({step})")]
    Timeout {
        /// The peer's role.
        peer_role: Role,
        /// What this side was waiting for.
        step: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The peer hung up mid-handshake.
    #[error("the {peer_role} closed the connection while authenticating ({step}); it may have refused this side's credentials: see its log")]
    Closed {
        /// The peer's role.
        peer_role: Role,
        /// What this side was waiting for.
        step: &'static str,
    },
    /// Reading or writing the connection failed.
    #[error("authenticating with the {peer_role} failed ({step}): {source}")]
    Io {
        /// The peer's role.
        peer_role: Role,
        /// What this side was doing.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A connection whose peer is authenticated.
pub struct Authenticated {
    /// The connection to run the frame stream on (inside TLS for `Tls`,
    /// inside the Noise channel for `Psk`).
    pub conn: Box<dyn Conn>,
    /// What both sides feed to the frame layer.
    pub binding: Binding,
    /// How the peer was authenticated, for logs and reports.
    pub method: &'static str,
}

impl Authenticated {
    /// The frame stream over this connection, bound as the handshake said.
    pub fn into_frames(self) -> FrameStream<Box<dyn Conn>> {
        FrameStream::bound(self.conn, &self.binding)
    }
}

impl fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticated")
            .field("binding", &self.binding)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

/// The source's handshake with the destination at `to` (whose host name
/// the destination's TLS certificate must carry; `localhost` for a Unix
/// socket). Each read waits at most `timeout`. On success the connection
/// has no read or write timeout.
pub fn handshake_as_source(
    conn: Box<dyn Conn>,
    security: &Security,
    to: &Address,
    timeout: Duration,
) -> Result<Authenticated, AuthError> {
    let mut migration = [0u8; 16];
    getrandom::fill(&mut migration).map_err(|e| AuthError::Io {
        peer_role: Role::Destination,
        step: "drawing a random migration id",
        source: io::Error::other(e.to_string()),
    })?;
    handshake_as_source_on(conn, security, to, Link::single(migration), timeout)
}

/// As [`handshake_as_source`], for connection `link.index` of the
/// `link.count` connections of migration `link.migration`.
pub fn handshake_as_source_on(
    conn: Box<dyn Conn>,
    security: &Security,
    to: &Address,
    link: Link,
    timeout: Duration,
) -> Result<Authenticated, AuthError> {
    handshake(
        conn,
        security,
        Role::Source,
        Some(link),
        to.tls_server_name(),
        timeout,
    )
}

/// The destination's handshake with a source that just connected. Each
/// read waits at most `timeout`. On success the connection has no read or
/// write timeout.
pub fn handshake_as_destination(
    conn: Box<dyn Conn>,
    security: &Security,
    timeout: Duration,
) -> Result<Authenticated, AuthError> {
    handshake(conn, security, Role::Destination, None, "", timeout)
}

/// Refuses to listen on or connect to an address that leaves this host
/// without authentication, unless the user said `--insecure`.
pub fn check_policy(
    addr: &Address,
    security: &Security,
    insecure: bool,
) -> Result<(), PolicyError> {
    if insecure || addr.is_local() || !matches!(security, Security::Insecure) {
        return Ok(());
    }
    Err(PolicyError { addr: addr.clone() })
}

/// An unauthenticated migration over the network, refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing an unauthenticated migration over {addr}, which is not a loopback or Unix address: \
     give both hosts --auth-key-file F (the same key file), or TLS (--tls-cert F --tls-key F on \
     the destination and --tls-ca F on the source, and the reverse for mutual authentication), \
     or --insecure to send the VM unauthenticated anyway"
)]
pub struct PolicyError {
    /// The address refused.
    pub addr: Address,
}

/// The handshake steps, for messages.
const STEP_PREAMBLE: &str = "waiting for the peer's hello";
const STEP_KEY: &str = "waiting for the peer's key exchange";
const STEP_TLS: &str = "TLS handshake";

/// `link` is the source's (None on the destination, which learns it from
/// the source's hello).
fn handshake(
    conn: Box<dyn Conn>,
    security: &Security,
    role: Role,
    link: Option<Link>,
    server_name: &str,
    timeout: Duration,
) -> Result<Authenticated, AuthError> {
    let peer_role = role.peer();
    let io_err =
        |step: &'static str| move |source: io::Error| classify(peer_role, step, timeout, source);
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .map_err(io_err("setting timeouts"))?;
    let mut conn = conn;

    // Hello: both sides send theirs before reading the peer's, so neither
    // waits on the other. Insecure and PSK add a fresh nonce; the source
    // names its link.
    let with_nonce = !matches!(security, Security::Tls(_));
    let mut hello = Vec::with_capacity(MAX_HELLO_LEN);
    hello.extend_from_slice(&AUTH_MAGIC);
    hello.extend_from_slice(&AUTH_VERSION.to_le_bytes());
    hello.push(security.method());
    hello.push(role.to_byte());
    hello.extend_from_slice(&[0, 0]);
    let mut nonce = [0u8; NONCE_LEN];
    if with_nonce {
        getrandom::fill(&mut nonce)
            .map_err(|e| io_err("drawing a random nonce")(io::Error::other(e.to_string())))?;
        hello.extend_from_slice(&nonce);
    }
    if let Some(link) = &link {
        hello.extend_from_slice(&link.to_bytes());
    }
    conn.write_all(&hello)
        .and_then(|()| conn.flush())
        .map_err(io_err("sending hello"))?;

    let mut peer_hello = [0u8; MAX_HELLO_LEN];
    conn.read_exact(&mut peer_hello[..PREAMBLE_LEN])
        .map_err(io_err(STEP_PREAMBLE))?;
    let preamble = &peer_hello[..PREAMBLE_LEN];
    if preamble[..8] != AUTH_MAGIC {
        return Err(AuthError::NotVmhop {
            got: preamble[..8].try_into().expect("8 bytes"),
        });
    }
    let theirs = u32::from_le_bytes(preamble[8..12].try_into().expect("4 bytes"));
    if theirs != AUTH_VERSION {
        return Err(AuthError::Version {
            ours: AUTH_VERSION,
            theirs,
        });
    }
    if preamble[12] != security.method() {
        return Err(AuthError::MethodMismatch {
            peer_role,
            ours: security.describe(),
            theirs: method_name(preamble[12]),
        });
    }
    if preamble[13] != peer_role.to_byte() {
        return Err(AuthError::SameRole(role));
    }
    let nonce_len = if with_nonce { NONCE_LEN } else { 0 };
    let link_len = if peer_role == Role::Source {
        LINK_LEN
    } else {
        0
    };
    let peer_len = PREAMBLE_LEN + nonce_len + link_len;
    conn.read_exact(&mut peer_hello[PREAMBLE_LEN..peer_len])
        .map_err(io_err(STEP_PREAMBLE))?;
    let peer_hello = &peer_hello[..peer_len];
    if with_nonce && peer_hello[PREAMBLE_LEN..PREAMBLE_LEN + NONCE_LEN] == nonce {
        return Err(AuthError::Reflected);
    }
    let link = match link {
        Some(link) => link,
        None => {
            let bytes: &[u8; LINK_LEN] = peer_hello[peer_len - LINK_LEN..]
                .try_into()
                .expect("LINK_LEN bytes");
            Link::from_bytes(bytes).map_err(AuthError::BadLink)?
        }
    };
    let (source_hello, dest_hello) = match role {
        Role::Source => (&hello[..], peer_hello),
        Role::Destination => (peer_hello, &hello[..]),
    };

    let (conn, session, integrity) = match security {
        Security::Insecure => {
            let mut h = Sha256::new();
            h.update(INSECURE_SESSION_LABEL);
            h.update(source_hello);
            h.update(dest_hello);
            (conn, SessionNonce(h.finalize().into()), Integrity::Checksum)
        }
        Security::Psk(key) => {
            let mut prologue = Vec::with_capacity(NOISE_PROLOGUE_LABEL.len() + 2 * MAX_HELLO_LEN);
            prologue.extend_from_slice(NOISE_PROLOGUE_LABEL);
            prologue.extend_from_slice(source_hello);
            prologue.extend_from_slice(dest_hello);
            let hs = noise_exchange(&mut conn, key, role, &prologue, &io_err)?;
            let session = SessionNonce(hs.hash());
            let sealed = hs
                .into_sealed(conn)
                .map_err(|e| AuthError::Noise(e.to_string()))?;
            let conn: Box<dyn Conn> = Box::new(sealed);
            (conn, session, Integrity::Sealed)
        }
        Security::Tls(identity) => {
            let (conn, session) = tls_exchange(conn, identity, role, server_name, &link, &io_err)?;
            (conn, session, Integrity::Checksum)
        }
    };
    conn.set_read_timeout(None)
        .and_then(|()| conn.set_write_timeout(None))
        .map_err(io_err("clearing timeouts"))?;
    Ok(Authenticated {
        conn,
        binding: Binding {
            session,
            integrity,
            link,
        },
        method: security.describe(),
    })
}

/// Turns an I/O error of the handshake into the error the user should see.
fn classify(
    peer_role: Role,
    step: &'static str,
    timeout: Duration,
    source: io::Error,
) -> AuthError {
    match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AuthError::Timeout {
            peer_role,
            step,
            timeout,
        },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => AuthError::Closed { peer_role, step },
        _ if step == STEP_TLS => AuthError::Tls { peer_role, source },
        _ => AuthError::Io {
            peer_role,
            step,
            source,
        },
    }
}

/// The Noise handshake of key mode: the source (initiator) sends its
/// message, the destination checks it and answers with its own, which the
/// source checks. Each message is a record (a 2-byte big-endian length,
/// then the message); a destination that finds the source's message wrong
/// answers with an empty record instead, so the source can tell a refused
/// key from a cut link.
fn noise_exchange<F>(
    conn: &mut Box<dyn Conn>,
    key: &PskKey,
    role: Role,
    prologue: &[u8],
    io_err: &impl Fn(&'static str) -> F,
) -> Result<Handshake, AuthError>
where
    F: FnOnce(io::Error) -> AuthError,
{
    let peer_role = role.peer();
    let noise = |e: HandshakeError| match e {
        HandshakeError::Unauthentic => AuthError::WrongKey { peer_role },
        HandshakeError::Noise(reason) => AuthError::Noise(reason),
    };
    let mut hs = Handshake::new(&key.noise_psk(), prologue, role == Role::Source).map_err(noise)?;
    let send = |conn: &mut Box<dyn Conn>, msg: &[u8]| {
        let mut record = [0u8; RECORD_HEADER_LEN + HANDSHAKE_MESSAGE_LEN];
        record[..RECORD_HEADER_LEN].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        record[RECORD_HEADER_LEN..RECORD_HEADER_LEN + msg.len()].copy_from_slice(msg);
        conn.write_all(&record[..RECORD_HEADER_LEN + msg.len()])
            .and_then(|()| conn.flush())
            .map_err(io_err("sending the key exchange"))
    };
    // The peer's message; None for a refusal.
    let receive = |conn: &mut Box<dyn Conn>| {
        let mut len = [0u8; RECORD_HEADER_LEN];
        conn.read_exact(&mut len).map_err(io_err(STEP_KEY))?;
        let len = u16::from_be_bytes(len) as usize;
        if len == 0 {
            return Ok(None);
        }
        if len != HANDSHAKE_MESSAGE_LEN {
            return Err(AuthError::BadKeyExchange { peer_role, len });
        }
        let mut msg = [0u8; HANDSHAKE_MESSAGE_LEN];
        conn.read_exact(&mut msg).map_err(io_err(STEP_KEY))?;
        Ok(Some(msg))
    };
    match role {
        Role::Source => {
            send(conn, &hs.write().map_err(noise)?)?;
            match receive(conn)? {
                None => return Err(AuthError::KeyRefused { peer_role }),
                Some(msg) => hs.read(&msg).map_err(noise)?,
            }
        }
        Role::Destination => {
            // A source never refuses: an empty record from it is malformed.
            let msg = receive(conn)?.ok_or(AuthError::BadKeyExchange { peer_role, len: 0 })?;
            if let Err(e) = hs.read(&msg) {
                if matches!(e, HandshakeError::Unauthentic) {
                    // Best effort: the source then says its key was refused.
                    let _ = send(conn, &[]);
                }
                return Err(noise(e));
            }
            send(conn, &hs.write().map_err(noise)?)?;
        }
    }
    Ok(hs)
}

/// The TLS handshake; the session nonce is exported with the link as
/// context, so a link changed on the path gives the two sides different
/// nonces and the first frame fails its checksum.
fn tls_exchange<F>(
    conn: Box<dyn Conn>,
    identity: &TlsIdentity,
    role: Role,
    server_name: &str,
    link: &Link,
    io_err: &impl Fn(&'static str) -> F,
) -> Result<(Box<dyn Conn>, SessionNonce), AuthError>
where
    F: FnOnce(io::Error) -> AuthError,
{
    let peer_role = role.peer();
    let mut session = [0u8; SESSION_NONCE_LEN];
    let tls = match role {
        Role::Source => {
            let name =
                ServerName::try_from(server_name.to_string()).map_err(|e| AuthError::Tls {
                    peer_role,
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("'{server_name}' is not a valid TLS server name: {e}"),
                    ),
                })?;
            let client = ClientConnection::new(identity.client.clone(), name)
                .map_err(|e| AuthError::TlsConfig { source: e })?;
            let mut stream = StreamOwned::new(client, conn);
            while stream.conn.is_handshaking() {
                stream
                    .conn
                    .complete_io(&mut stream.sock)
                    .map_err(io_err(STEP_TLS))?;
            }
            stream
                .conn
                .export_keying_material(&mut session, TLS_EXPORTER_LABEL, Some(&link.to_bytes()))
                .map_err(|e| AuthError::TlsConfig { source: e })?;
            TlsConn::Client(stream)
        }
        Role::Destination => {
            let server = ServerConnection::new(identity.server.clone())
                .map_err(|e| AuthError::TlsConfig { source: e })?;
            let mut stream = StreamOwned::new(server, conn);
            while stream.conn.is_handshaking() {
                stream
                    .conn
                    .complete_io(&mut stream.sock)
                    .map_err(io_err(STEP_TLS))?;
            }
            stream
                .conn
                .export_keying_material(&mut session, TLS_EXPORTER_LABEL, Some(&link.to_bytes()))
                .map_err(|e| AuthError::TlsConfig { source: e })?;
            TlsConn::Server(stream)
        }
    };
    Ok((Box::new(tls), SessionNonce(session)))
}

/// A connection inside TLS.
enum TlsConn {
    Client(StreamOwned<ClientConnection, Box<dyn Conn>>),
    Server(StreamOwned<ServerConnection, Box<dyn Conn>>),
}

impl TlsConn {
    fn sock(&self) -> &dyn Conn {
        match self {
            TlsConn::Client(s) => &*s.sock,
            TlsConn::Server(s) => &*s.sock,
        }
    }
}

impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TlsConn::Client(s) => s.read(buf),
            TlsConn::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            TlsConn::Client(s) => s.write(buf),
            TlsConn::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            TlsConn::Client(s) => s.flush(),
            TlsConn::Server(s) => s.flush(),
        }
    }
}

impl Conn for TlsConn {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock().set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock().set_write_timeout(timeout)
    }

    fn shutdown(&self) {
        self.sock().shutdown();
    }

    fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        self.sock().shutdown_handle()
    }

    fn peer(&self) -> String {
        self.sock().peer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::MAX_CONNECTIONS;
    use std::os::unix::net::UnixStream;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn pair() -> (Box<dyn Conn>, Box<dyn Conn>) {
        let (a, b) = UnixStream::pair().unwrap();
        (Box::new(a), Box::new(b))
    }

    fn write_secret(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// Runs the destination's handshake in a thread and the source's here.
    fn both(
        source: &Security,
        dest: Security,
        to: &Address,
    ) -> (
        Result<Authenticated, AuthError>,
        Result<Authenticated, AuthError>,
    ) {
        let (a, b) = pair();
        let d = std::thread::spawn(move || handshake_as_destination(b, &dest, TIMEOUT));
        let s = handshake_as_source(a, source, to, TIMEOUT);
        // A failed side drops its connection, which ends the other's wait.
        (s, d.join().unwrap())
    }

    fn unix_addr() -> Address {
        Address::Unix("/nonexistent".into())
    }

    fn psk(dir: &Path, name: &str, key: &[u8]) -> Security {
        Security::psk_from_file(&write_secret(dir, name, key)).unwrap()
    }

    fn exchange_a_frame(mut a: Authenticated, mut b: Authenticated) {
        use crate::migration::protocol::{Frame, FrameReader, FrameWriter};
        assert_eq!(a.binding, b.binding);
        let binding = a.binding;
        let writer = std::thread::spawn(move || {
            let mut w = FrameWriter::bound(&mut a.conn, &binding);
            w.write_frame(&Frame::Config(b"{}".to_vec())).unwrap();
            w.flush().unwrap();
            drop(w);
            a
        });
        let mut r = FrameReader::bound(&mut b.conn, &binding);
        assert_eq!(r.read_frame().unwrap(), Frame::Config(b"{}".to_vec()));
        writer.join().unwrap();
    }

    #[test]
    fn insecure_handshake_agrees_on_a_fresh_session() {
        let (s, d) = both(&Security::Insecure, Security::Insecure, &unix_addr());
        let (s, d) = (s.unwrap(), d.unwrap());
        let first = s.binding.session;
        assert_eq!(s.binding.integrity, Integrity::Checksum);
        exchange_a_frame(s, d);
        let (s2, _) = both(&Security::Insecure, Security::Insecure, &unix_addr());
        assert_ne!(
            s2.unwrap().binding.session,
            first,
            "every connection is its own session"
        );
    }

    #[test]
    fn psk_with_the_same_key_authenticates_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let key = b"0123456789abcdef0123456789abcdef\n";
        let (s, d) = both(
            &psk(dir.path(), "a", key),
            psk(dir.path(), "b", &key[..32]),
            &unix_addr(),
        );
        let (s, d) = (s.unwrap(), d.unwrap());
        assert_eq!(s.binding.integrity, Integrity::Sealed);
        assert_eq!(s.binding.link.count, 1);
        exchange_a_frame(s, d);
    }

    #[test]
    fn psk_with_a_wrong_key_is_refused_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let (s, d) = both(
            &psk(dir.path(), "a", b"0123456789abcdef0123"),
            psk(dir.path(), "b", b"0123456789abcdef0124"),
            &unix_addr(),
        );
        let (s, d) = (s.unwrap_err(), d.unwrap_err());
        assert!(
            matches!(
                d,
                AuthError::WrongKey {
                    peer_role: Role::Source
                }
            ),
            "{d}"
        );
        assert!(
            matches!(
                s,
                AuthError::KeyRefused {
                    peer_role: Role::Destination
                }
            ),
            "{s}"
        );
        assert!(s.to_string().contains("key files differ"), "{s}");
    }

    /// The source's bytes of a real key-mode handshake: its hello, then its
    /// Noise message (a record).
    const SOURCE_HELLO_LEN: usize = PREAMBLE_LEN + NONCE_LEN + LINK_LEN;
    const DEST_HELLO_LEN: usize = PREAMBLE_LEN + NONCE_LEN;
    const KEY_RECORD_LEN: usize = RECORD_HEADER_LEN + HANDSHAKE_MESSAGE_LEN;

    #[test]
    fn a_replayed_psk_handshake_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = b"0123456789abcdef0123456789abcdef";
        // Record what a real source sends to a real destination.
        let (src, mut tap) = UnixStream::pair().unwrap();
        let (relay, dst) = pair();
        let dest_sec = psk(dir.path(), "d", key);
        let dest = std::thread::spawn(move || handshake_as_destination(dst, &dest_sec, TIMEOUT));
        let source_sec = psk(dir.path(), "s", key);
        let source = std::thread::spawn(move || {
            let conn: Box<dyn Conn> = Box::new(src.try_clone().unwrap());
            let r = handshake_as_source(conn, &source_sec, &unix_addr(), TIMEOUT);
            src.shutdown(std::net::Shutdown::Both).ok();
            r
        });
        // A transparent relay that records the source's bytes.
        let mut relay = relay;
        let mut recorded = vec![0u8; SOURCE_HELLO_LEN + KEY_RECORD_LEN];
        tap.read_exact(&mut recorded[..SOURCE_HELLO_LEN]).unwrap();
        relay.write_all(&recorded[..SOURCE_HELLO_LEN]).unwrap();
        let mut back = vec![0u8; DEST_HELLO_LEN];
        relay.read_exact(&mut back).unwrap();
        tap.write_all(&back).unwrap();
        tap.read_exact(&mut recorded[SOURCE_HELLO_LEN..]).unwrap();
        relay.write_all(&recorded[SOURCE_HELLO_LEN..]).unwrap();
        let mut answer = [0u8; KEY_RECORD_LEN];
        relay.read_exact(&mut answer).unwrap();
        tap.write_all(&answer).unwrap();
        assert!(source.join().unwrap().is_ok());
        assert!(dest.join().unwrap().is_ok());

        // Replay the recording to a fresh destination: its own nonce is in
        // the prologue, so the old message does not verify.
        let (mut attacker, dst) = pair();
        let dest_sec = psk(dir.path(), "d2", key);
        let dest = std::thread::spawn(move || handshake_as_destination(dst, &dest_sec, TIMEOUT));
        attacker.write_all(&recorded).unwrap();
        let err = dest.join().unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                AuthError::WrongKey {
                    peer_role: Role::Source
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_link_changed_on_the_path_fails_the_key_exchange() {
        let dir = tempfile::tempdir().unwrap();
        let key = b"0123456789abcdef0123456789abcdef";
        let (src, mut tap) = UnixStream::pair().unwrap();
        let (mut relay, dst) = pair();
        let dest_sec = psk(dir.path(), "d", key);
        let dest = std::thread::spawn(move || handshake_as_destination(dst, &dest_sec, TIMEOUT));
        let source_sec = psk(dir.path(), "s", key);
        let source = std::thread::spawn(move || {
            let conn: Box<dyn Conn> = Box::new(src.try_clone().unwrap());
            let r = handshake_as_source(conn, &source_sec, &unix_addr(), TIMEOUT);
            src.shutdown(std::net::Shutdown::Both).ok();
            r
        });
        let mut hello = vec![0u8; SOURCE_HELLO_LEN];
        tap.read_exact(&mut hello).unwrap();
        // Connection 0 of 1 becomes connection 1 of 2.
        let at = PREAMBLE_LEN + NONCE_LEN + 16;
        hello[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        hello[at + 4..at + 8].copy_from_slice(&2u32.to_le_bytes());
        relay.write_all(&hello).unwrap();
        let mut back = vec![0u8; DEST_HELLO_LEN];
        relay.read_exact(&mut back).unwrap();
        tap.write_all(&back).unwrap();
        let mut msg = vec![0u8; KEY_RECORD_LEN];
        tap.read_exact(&mut msg).unwrap();
        relay.write_all(&msg).unwrap();
        let mut answer = [0u8; RECORD_HEADER_LEN];
        relay.read_exact(&mut answer).unwrap();
        tap.write_all(&answer).unwrap();
        drop(tap);
        let d = dest.join().unwrap().unwrap_err();
        assert!(matches!(d, AuthError::WrongKey { .. }), "{d}");
        let s = source.join().unwrap().unwrap_err();
        assert!(matches!(s, AuthError::KeyRefused { .. }), "{s}");
    }

    #[test]
    fn a_reflected_psk_hello_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sec = psk(dir.path(), "k", b"0123456789abcdef");
        let (mut mirror, dst) = pair();
        let dest = std::thread::spawn(move || handshake_as_destination(dst, &sec, TIMEOUT));
        let mut hello = [0u8; DEST_HELLO_LEN];
        mirror.read_exact(&mut hello).unwrap();
        hello[13] = Role::Source.to_byte();
        mirror.write_all(&hello).unwrap();
        mirror.write_all(&Link::single([1; 16]).to_bytes()).unwrap();
        let err = dest.join().unwrap().unwrap_err();
        assert!(matches!(err, AuthError::Reflected), "{err}");
    }

    #[test]
    fn an_impossible_link_is_refused() {
        for (index, count) in [(0u32, 0u32), (1, 1), (0, MAX_CONNECTIONS + 1)] {
            let (mut fake, dst) = pair();
            let dest = std::thread::spawn(move || {
                handshake_as_destination(dst, &Security::Insecure, TIMEOUT)
            });
            let mut hello = Vec::new();
            hello.extend_from_slice(&AUTH_MAGIC);
            hello.extend_from_slice(&AUTH_VERSION.to_le_bytes());
            hello.extend_from_slice(&[METHOD_INSECURE, Role::Source.to_byte(), 0, 0]);
            hello.extend_from_slice(&[9; NONCE_LEN]);
            hello.extend_from_slice(&[1; 16]);
            hello.extend_from_slice(&index.to_le_bytes());
            hello.extend_from_slice(&count.to_le_bytes());
            fake.write_all(&hello).unwrap();
            let err = dest.join().unwrap().unwrap_err();
            assert!(
                matches!(err, AuthError::BadLink(_)) && err.to_string().contains("connection"),
                "{index}/{count}: {err}"
            );
        }
    }

    #[test]
    fn a_silent_peer_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _silent) = pair();
        let err = handshake_as_source(
            a,
            &psk(dir.path(), "k", b"0123456789abcdef"),
            &unix_addr(),
            Duration::from_millis(50),
        )
        .unwrap_err();
        assert!(matches!(err, AuthError::Timeout { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("the destination sent nothing for 50ms"),
            "{err}"
        );
    }

    #[test]
    fn mismatched_methods_and_foreign_peers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = both(
            &Security::Insecure,
            psk(dir.path(), "k", b"0123456789abcdef"),
            &unix_addr(),
        );
        let err = s.unwrap_err();
        assert!(
            err.to_string()
                .contains("uses a pre-shared key (--auth-key-file)"),
            "{err}"
        );
        let (mut a, b) = pair();
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let err = handshake_as_destination(b, &Security::Insecure, TIMEOUT).unwrap_err();
        assert!(matches!(err, AuthError::NotVmhop { .. }), "{err}");
        // Two sources.
        let (a, b) = pair();
        let other = std::thread::spawn(move || {
            handshake_as_source(b, &Security::Insecure, &unix_addr(), TIMEOUT)
        });
        let err = handshake_as_source(a, &Security::Insecure, &unix_addr(), TIMEOUT).unwrap_err();
        assert!(matches!(err, AuthError::SameRole(Role::Source)), "{err}");
        let _ = other.join();
    }

    #[test]
    fn unusable_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Security::psk_from_file(&write_secret(dir.path(), "empty", b"")).unwrap_err();
        assert!(err.to_string().contains("the key is 0 bytes"), "{err}");
        let err =
            Security::psk_from_file(&write_secret(dir.path(), "short", b"short\n")).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        let open = write_secret(dir.path(), "open", b"0123456789abcdef");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Security::psk_from_file(&open).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let err = Security::psk_from_file(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn policy_refuses_unauthenticated_remote_addresses_only() {
        let remote: Address = "tcp://192.0.2.1:4444".parse().unwrap();
        let local: Address = "tcp://127.0.0.1:4444".parse().unwrap();
        let err = check_policy(&remote, &Security::Insecure, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("tcp://192.0.2.1:4444")
                && msg.contains("--auth-key-file")
                && msg.contains("--tls-cert")
                && msg.contains("--insecure"),
            "{msg}"
        );
        assert!(check_policy(&remote, &Security::Insecure, true).is_ok());
        assert!(check_policy(&local, &Security::Insecure, false).is_ok());
        assert!(check_policy(&unix_addr(), &Security::Insecure, false).is_ok());
        let dir = tempfile::tempdir().unwrap();
        assert!(check_policy(&remote, &psk(dir.path(), "k", b"0123456789abcdef"), false).is_ok());
    }

    /// A CA and a host certificate it signs, as PEM files in `dir`.
    struct Pki {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    }

    fn make_ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "vmhop test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (rcgen::Issuer::new(params, key), cert.pem())
    }

    fn make_host(
        dir: &Path,
        name: &str,
        ca: &(rcgen::Issuer<'static, rcgen::KeyPair>, String),
    ) -> Pki {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.0).unwrap();
        Pki {
            cert: write_secret(dir, &format!("{name}.crt"), cert.pem().as_bytes()),
            key: write_secret(dir, &format!("{name}.key"), key.serialize_pem().as_bytes()),
            ca: write_secret(dir, &format!("{name}-ca.crt"), ca.1.as_bytes()),
        }
    }

    fn tls(p: &Pki) -> Security {
        Security::tls_from_files(&p.cert, &p.key, &p.ca).unwrap()
    }

    #[test]
    fn tls_with_certificates_from_the_same_ca_authenticates_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca();
        let src = make_host(dir.path(), "src", &ca);
        let dst = make_host(dir.path(), "dst", &ca);
        let (s, d) = both(&tls(&src), tls(&dst), &"tcp://127.0.0.1:1".parse().unwrap());
        let (s, d) = (s.unwrap(), d.unwrap());
        assert!(s.method.starts_with("TLS"));
        exchange_a_frame(s, d);
    }

    #[test]
    fn tls_with_a_destination_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca();
        let rogue_ca = make_ca();
        let src = make_host(dir.path(), "src", &ca);
        let rogue = make_host(dir.path(), "rogue", &rogue_ca);
        // The rogue destination trusts the source's CA, but its own
        // certificate is signed by another CA.
        let rogue = Pki {
            ca: src.ca.clone(),
            ..rogue
        };
        let (s, d) = both(&tls(&src), tls(&rogue), &unix_addr());
        let s = s.unwrap_err();
        assert!(matches!(s, AuthError::Tls { .. }), "{s}");
        assert!(s.to_string().contains("invalid peer certificate"), "{s}");
        assert!(d.is_err());
    }

    #[test]
    fn tls_with_a_source_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca();
        let rogue_ca = make_ca();
        let dst = make_host(dir.path(), "dst", &ca);
        let rogue = make_host(dir.path(), "rogue", &rogue_ca);
        let rogue = Pki {
            ca: dst.ca.clone(),
            ..rogue
        };
        let (s, d) = both(&tls(&rogue), tls(&dst), &unix_addr());
        let d = d.unwrap_err();
        assert!(matches!(d, AuthError::Tls { .. }), "{d}");
        // The source may finish its side of the handshake before the
        // destination refuses; it then fails at its first read or write.
        drop(s);
    }

    /// The whole path the sink and the receiver will take: listen, connect,
    /// authenticate, then frames both ways inside TLS over TCP.
    #[test]
    fn frames_travel_both_ways_inside_tls_over_tcp() {
        use crate::migration::address::{connect, Listener};
        use crate::migration::protocol::{AckKind, Frame};
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca();
        let src = tls(&make_host(dir.path(), "src", &ca));
        let dst = tls(&make_host(dir.path(), "dst", &ca));
        let listener = Listener::bind(&"tcp://127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_address();
        let receiver = std::thread::spawn(move || {
            let conn = listener.accept().unwrap();
            let auth = handshake_as_destination(conn, &dst, TIMEOUT).unwrap();
            let mut stream = auth.into_frames();
            assert_eq!(stream.read_frame().unwrap(), Frame::Config(b"{}".to_vec()));
            stream
                .write_frame(&Frame::Ack {
                    what: AckKind::Config,
                })
                .unwrap();
            let mut pages = 0;
            loop {
                match stream.read_frame().unwrap() {
                    Frame::Pages { count, .. } => pages += count,
                    Frame::Done => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            stream
                .write_frame(&Frame::Ack {
                    what: AckKind::Done,
                })
                .unwrap();
            stream.flush().unwrap();
            pages
        });
        let conn = connect(&addr, TIMEOUT).unwrap();
        let auth = handshake_as_source(conn, &src, &addr, TIMEOUT).unwrap();
        let mut stream = auth.into_frames();
        stream.write_frame(&Frame::Config(b"{}".to_vec())).unwrap();
        assert_eq!(
            stream.read_frame().unwrap(),
            Frame::Ack {
                what: AckKind::Config
            }
        );
        let data = vec![0x5Au8; 256 * 4096];
        for i in 0..8u64 {
            stream
                .write_pages(i << 20, crate::migration::Encoding::Raw, 256, &data)
                .unwrap();
        }
        stream.write_frame(&Frame::Done).unwrap();
        assert_eq!(
            stream.read_frame().unwrap(),
            Frame::Ack {
                what: AckKind::Done
            }
        );
        assert_eq!(receiver.join().unwrap(), 8 * 256);
    }

    #[test]
    fn tls_binds_the_link_so_a_link_changed_on_the_path_fails_the_first_frame() {
        use crate::migration::protocol::{Frame, FrameReader, FrameWriter, ProtocolError};
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca();
        let src = tls(&make_host(dir.path(), "src", &ca));
        let dst = tls(&make_host(dir.path(), "dst", &ca));
        let (s_end, mut tap) = UnixStream::pair().unwrap();
        let (relay, d_end) = UnixStream::pair().unwrap();
        let dest = std::thread::spawn(move || {
            let conn: Box<dyn Conn> = Box::new(d_end);
            handshake_as_destination(conn, &dst, TIMEOUT)
        });
        // The relay renumbers the source's link (hello: 16 bytes of
        // preamble, no nonce with TLS, then the link), then passes
        // everything through both ways.
        let mut hello = [0u8; PREAMBLE_LEN + LINK_LEN];
        let mut relay_w = relay.try_clone().unwrap();
        let mut tap_r = tap.try_clone().unwrap();
        let forward = std::thread::spawn(move || {
            tap_r.read_exact(&mut hello).unwrap();
            hello[PREAMBLE_LEN + 16..PREAMBLE_LEN + 20].copy_from_slice(&1u32.to_le_bytes());
            hello[PREAMBLE_LEN + 20..].copy_from_slice(&2u32.to_le_bytes());
            relay_w.write_all(&hello).unwrap();
            let _ = std::io::copy(&mut tap_r, &mut relay_w);
        });
        let mut relay_r = relay;
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut relay_r, &mut tap);
        });
        let link = Link::single([7; 16]);
        let conn: Box<dyn Conn> = Box::new(s_end);
        let mut s = handshake_as_source_on(conn, &src, &unix_addr(), link, TIMEOUT).unwrap();
        let mut d = dest.join().unwrap().unwrap();
        assert_eq!(
            d.binding.link.count, 2,
            "the destination saw the changed link"
        );
        assert_ne!(s.binding.session, d.binding.session);
        let mut w = FrameWriter::bound(&mut s.conn, &s.binding);
        w.write_frame(&Frame::Config(b"{}".to_vec())).unwrap();
        w.flush().unwrap();
        let err = FrameReader::bound(&mut d.conn, &d.binding)
            .read_frame()
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::Checksum { frame: 0, .. }),
            "{err}"
        );
        drop(w);
        s.conn.shutdown();
        d.conn.shutdown();
        let _ = forward.join();
    }

    #[test]
    fn tls_checks_the_destination_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca();
        let src = make_host(dir.path(), "src", &ca);
        let dst = make_host(dir.path(), "dst", &ca);
        let (s, _) = both(&tls(&src), tls(&dst), &"tcp://127.0.0.2:1".parse().unwrap());
        let s = s.unwrap_err();
        assert!(s.to_string().contains("not valid for name"), "{s}");
    }

    #[test]
    fn unusable_tls_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca();
        let p = make_host(dir.path(), "h", &ca);
        let garbage = write_secret(dir.path(), "garbage.pem", b"not pem");
        for (cert, key, ca) in [
            (&garbage, &p.key, &p.ca),
            (&p.cert, &garbage, &p.ca),
            (&p.cert, &p.key, &garbage),
        ] {
            let err = Security::tls_from_files(cert, key, ca).unwrap_err();
            assert!(err.to_string().contains("garbage.pem"), "{err}");
        }
        std::fs::set_permissions(&p.key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Security::tls_from_files(&p.cert, &p.key, &p.ca).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
