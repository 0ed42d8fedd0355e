//! The wire of host-to-host live migration: addresses and connections,
//! authentication, the framed stream and page compression.
//!
//! This module owns everything between two vmhop processes that a byte
//! crosses: how a destination is named and reached ([`address`]), how each
//! side proves who it is ([`auth`]), the versioned, checksummed frames that
//! carry the VM ([`protocol`], layout in `docs/migration-stream.md`) and how
//! runs of pages are compressed ([`compress`]).
//!
//! On top of the wire sit the two ends: [`source`] (the `migrate` operation
//! and its stream sink, which the transfer engine feeds, with [`lanes`],
//! its sender threads) and [`destination`] (the receiver behind `run
//! --incoming`, with [`landing`], where received pages land), and
//! [`storage`], the disks' hand-over with `--copy-storage`. Which pages to
//! send and when to stop the VM belong to the engine; what the config and
//! state payloads contain belongs to the VMM.

pub mod address;
pub mod auth;
pub mod compress;
pub mod destination;
#[cfg(test)]
mod fuzz;
pub mod gather;
pub mod landing;
pub mod lanes;
pub mod noise;
pub mod protocol;
pub mod source;
pub mod storage;

pub use address::{
    connect, Address, Conn, Listener, ParseAddressError, ShutdownHandle, TransportError,
};
pub use auth::{
    check_policy, handshake_as_destination, handshake_as_source, handshake_as_source_on, AuthError,
    Authenticated, PolicyError, Role, Security,
};
pub use compress::{decode_pages, encode_pages, Compression, DecodeError, Encoding};
pub use protocol::{
    AckKind, Binding, Frame, FrameReader, FrameStream, FrameWriter, Integrity, Link, ProtocolError,
    SessionNonce,
};

use crate::api::migration::{AuthChoice, AuthFiles};
use crate::api::{ApiError, Classify};

/// The security `auth` asks for, with its key or certificate files read.
pub fn security_from(auth: &AuthFiles) -> Result<Security, ApiError> {
    match auth.choice()? {
        AuthChoice::None => Ok(Security::Insecure),
        AuthChoice::Key(k) => Security::psk_from_file(k).map_err(|e| ApiError::new(e.kind(), &e)),
        AuthChoice::Tls(c, k, ca) => {
            Security::tls_from_files(c, k, ca).map_err(|e| ApiError::new(e.kind(), &e))
        }
    }
}

impl Classify for AuthError {
    fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        // A file the user named: missing or not permitted is theirs to
        // fix like any path; present but unusable (shared, too short, not
        // PEM) is Unusable.
        let named = |io: Option<&std::io::Error>| match io.map(ErrorKind::of_io) {
            Some(k @ (ErrorKind::NotFound | ErrorKind::Forbidden)) => k,
            _ => ErrorKind::Unusable,
        };
        match self {
            AuthError::KeyFile { problem, .. } => named(problem.io_error()),
            AuthError::TlsFile { problem, .. } => named(problem.io_error()),
            _ => ErrorKind::Failed,
        }
    }
}
