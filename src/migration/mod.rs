//! The wire of host-to-host live migration: addresses and connections,
//! authentication, the framed stream and page compression.
//!
//! This module owns everything between two vmhop processes that a byte
//! crosses: how a destination is named and reached ([`address`]), how each
//! side proves who it is ([`auth`]), the versioned, checksummed frames that
//! carry the VM ([`protocol`], layout in `docs/migration-stream.md`) and how
//! runs of pages are compressed ([`compress`]).
//!
//! It does not own the migration itself: which pages to send and when to
//! stop the VM belong to the transfer engine, what the config and state
//! payloads contain belongs to the VMM, and the source's stream sink and
//! the destination's receiver are built on top of this API.

pub mod address;
pub mod auth;
pub mod compress;
pub mod protocol;

pub use address::{
    connect, Address, Conn, Listener, ParseAddressError, ShutdownHandle, TransportError,
};
pub use auth::{
    check_policy, handshake_as_destination, handshake_as_source, AuthError, Authenticated,
    PolicyError, Role, Security,
};
pub use compress::{
    decode_pages, encode_pages, is_zero_page, Compression, DecodeError, Encoding,
    ParseCompressionError,
};
pub use protocol::{
    AckKind, Frame, FrameReader, FrameStream, FrameWriter, ProtocolError, SessionNonce,
};
