//! The API: the contract between the CLI and a VMM process, and its
//! transport (HTTP/1.1 + JSON on a Unix socket, see docs/api.md).
//!
//! This module owns what both sides must agree on: every endpoint
//! ([`Endpoint`]), every request, report and progress message (one serde
//! struct each, in the submodule of its area), the error kinds and the one
//! table that maps them to HTTP statuses and exit codes ([`error`]), and
//! what the CLI asks of its own process ([`run::Local`]). `server` and
//! `client` are the transport. It knows no VM and no operation: the service
//! implements the server's handler and [`run::Local`], and every layer that
//! reports speaks these types, so the client and the server cannot disagree
//! on a field name.

pub mod checkpoint;
pub mod client;
pub mod error;
pub mod migration;
pub mod numa;
pub mod run;
pub mod server;
pub mod transfer;
pub mod vm;

pub use error::{ApiError, Classify, ErrorKind};

/// Path prefix of every endpoint.
pub const PREFIX: &str = "/api/v1";

/// An HTTP method the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Reads, changes nothing.
    Get,
    /// Acts on the VM.
    Put,
}

impl Method {
    /// As on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// Every endpoint of a VMM's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET vm.status`: [`vm::StatusReport`] (or [`vm::IncomingStatusReport`]).
    Status,
    /// `PUT vm.pause`: [`vm::StateReply`].
    Pause,
    /// `PUT vm.resume`: [`vm::StateReply`].
    Resume,
    /// `PUT vm.stop`: [`vm::StateReply`]; the process ends.
    Stop,
    /// `PUT vm.verify`: [`vm::VerifyReport`].
    Verify,
    /// `PUT vm.checkpoint` with [`checkpoint::CheckpointRequest`]:
    /// [`checkpoint::CheckpointReport`].
    Checkpoint,
    /// `PUT vm.numa-migrate` with [`numa::NumaMigrateRequest`]:
    /// [`numa::NumaMigrateReport`].
    NumaMigrate,
    /// `GET vm.numa-stat`: [`numa::NumaStatReport`].
    NumaStat,
    /// `PUT vm.migrate` with [`migration::MigrateRequest`]:
    /// [`migration::MigrateReport`]; the process ends.
    Migrate,
    /// `PUT vm.migrate-cancel`: [`vm::Cancelled`].
    MigrateCancel,
    /// `GET vm.migration`: [`migration::MigrationProgress`].
    Migration,
    /// `GET debug.memory-map`: a list of [`vm::MemoryMapEntry`].
    MemoryMap,
    /// `PUT vm.reset` with [`vm::ResetRequest`]: [`vm::ResetReport`].
    Reset,
}

/// Every endpoint with its method and name (the path after [`PREFIX`]).
pub const ENDPOINTS: [(Endpoint, Method, &str); 13] = [
    (Endpoint::Status, Method::Get, "vm.status"),
    (Endpoint::Pause, Method::Put, "vm.pause"),
    (Endpoint::Resume, Method::Put, "vm.resume"),
    (Endpoint::Stop, Method::Put, "vm.stop"),
    (Endpoint::Verify, Method::Put, "vm.verify"),
    (Endpoint::Checkpoint, Method::Put, "vm.checkpoint"),
    (Endpoint::NumaMigrate, Method::Put, "vm.numa-migrate"),
    (Endpoint::NumaStat, Method::Get, "vm.numa-stat"),
    (Endpoint::Migrate, Method::Put, "vm.migrate"),
    (Endpoint::MigrateCancel, Method::Put, "vm.migrate-cancel"),
    (Endpoint::Migration, Method::Get, "vm.migration"),
    (Endpoint::MemoryMap, Method::Get, "debug.memory-map"),
    (Endpoint::Reset, Method::Put, "vm.reset"),
];

impl Endpoint {
    fn entry(self) -> (Endpoint, Method, &'static str) {
        ENDPOINTS
            .iter()
            .copied()
            .find(|e| e.0 == self)
            .expect("every endpoint is listed in ENDPOINTS")
    }

    /// Its method.
    pub fn method(self) -> Method {
        self.entry().1
    }

    /// Its name, e.g. `vm.status`.
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Its path, e.g. `/api/v1/vm.status`.
    pub fn path(self) -> String {
        format!("{PREFIX}/{}", self.name())
    }

    /// The endpoint a request names, or the error to answer: 404 for a
    /// path that names none, 405 for a method it does not take.
    pub fn of_request(method: &str, path: &str) -> Result<Endpoint, ApiError> {
        let Some(name) = path.strip_prefix(PREFIX).and_then(|p| p.strip_prefix('/')) else {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("no such endpoint: {path} (endpoints start with {PREFIX}/)"),
            ));
        };
        let Some(&(ep, m, _)) = ENDPOINTS.iter().find(|e| e.2 == name) else {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("no such endpoint: {path}"),
            ));
        };
        if m.as_str() != method {
            return Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!("{method} is not allowed on {path}"),
            ));
        }
        Ok(ep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_found_by_its_own_method_and_path_only() {
        for (ep, m, name) in ENDPOINTS {
            assert_eq!(ep.name(), name);
            assert_eq!(Endpoint::of_request(m.as_str(), &ep.path()), Ok(ep));
            let other = if m == Method::Get { "PUT" } else { "GET" };
            let e = Endpoint::of_request(other, &ep.path()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::MethodNotAllowed, "{name}");
        }
        let e = Endpoint::of_request("GET", "/api/v1/vm.nope").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e = Endpoint::of_request("GET", "/vm.status").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("/api/v1/"), "{e}");
    }
}
