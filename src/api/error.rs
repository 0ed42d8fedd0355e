//! The one table from error kinds to HTTP statuses and CLI exit codes.
//!
//! Every operation's error enum says which [`ErrorKind`] each of its
//! variants is ([`Classify`]); the service answers with the kind's status,
//! and the CLI exits with the code the status maps back to. Whose fault it
//! was decides the kind:
//!
//! - the request must change (bad usage, a value out of range, a path or
//!   name the user gave that does not exist or cannot be used): 4xx, exit 2;
//! - it conflicts with the VM's state or a running operation: 409, exit 1;
//! - the VM or the host failed: 5xx, exit 1.
//!
//! Host resources the user names (a node, a checkpoint directory, a key
//! file, an image) are the request's: missing is [`ErrorKind::NotFound`],
//! present but unusable (damaged, foreign, full, not permitted) is
//! [`ErrorKind::Unusable`] or [`ErrorKind::Forbidden`]. A resource another
//! process holds (a locked image, a socket already served) is a
//! [`ErrorKind::Conflict`]: the request is right, the moment is not.
//! docs/api.md prints this table.

use serde::{Deserialize, Serialize};

/// Exit code of a command that succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit code: the operation failed or conflicts with the VM's state.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the request itself must change.
pub const EXIT_USAGE: u8 = 2;

/// Whose fault an error is, and so its HTTP status and exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request is malformed or a value is out of range.
    BadRequest,
    /// The user may not use what they named (EPERM, EACCES).
    Forbidden,
    /// What the user named does not exist: a path, a node, an endpoint.
    NotFound,
    /// The endpoint exists, not with this method.
    MethodNotAllowed,
    /// The request body is larger than the API takes.
    TooLarge,
    /// What the user named exists but cannot be used: a damaged or
    /// foreign checkpoint, a node without room, a configuration that does
    /// not fit.
    Unusable,
    /// The VM's state or another operation is in the way.
    Conflict,
    /// The VM or the host failed.
    Failed,
    /// The VM is not there yet (starting, or waiting for a migration).
    Unavailable,
}

/// Every kind, for the table's tests and docs.
pub const ALL_KINDS: [ErrorKind; 9] = [
    ErrorKind::BadRequest,
    ErrorKind::Forbidden,
    ErrorKind::NotFound,
    ErrorKind::MethodNotAllowed,
    ErrorKind::TooLarge,
    ErrorKind::Unusable,
    ErrorKind::Conflict,
    ErrorKind::Failed,
    ErrorKind::Unavailable,
];

impl ErrorKind {
    /// The HTTP status the API answers with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unusable => 422,
            ErrorKind::Conflict => 409,
            ErrorKind::Failed => 500,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The kind an HTTP status stands for (a status vmhop does not use
    /// counts by its class: other 4xx as a bad request, other 5xx as a
    /// failure).
    pub fn from_status(status: u16) -> ErrorKind {
        ALL_KINDS
            .iter()
            .copied()
            .find(|k| k.status() == status)
            .unwrap_or(if (400..500).contains(&status) {
                ErrorKind::BadRequest
            } else {
                ErrorKind::Failed
            })
    }

    /// The exit code of a CLI command that met this error.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Conflict | ErrorKind::Failed | ErrorKind::Unavailable => EXIT_FAILED,
            _ => EXIT_USAGE,
        }
    }

    /// The kind of an OS error on something the user named: missing is
    /// theirs to fix, not permitted too; anything else is the host's.
    pub fn of_io(e: &std::io::Error) -> ErrorKind {
        match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::Forbidden,
            _ => ErrorKind::Failed,
        }
    }
}

/// An error that knows whose fault it is.
pub trait Classify: std::fmt::Display {
    /// Its kind.
    fn kind(&self) -> ErrorKind;
}

/// An error as the API carries it: its kind and its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Whose fault.
    pub kind: ErrorKind,
    /// One line for the user.
    pub message: String,
}

impl ApiError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl std::fmt::Display) -> ApiError {
        ApiError {
            kind,
            message: message.to_string(),
        }
    }

    /// A malformed request or a value out of range.
    pub fn bad_request(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(ErrorKind::BadRequest, message)
    }

    /// The VM's state or another operation is in the way.
    pub fn conflict(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(ErrorKind::Conflict, message)
    }

    /// The VM or the host failed.
    pub fn failed(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(ErrorKind::Failed, message)
    }

    /// The error's HTTP status.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }
}

impl Classify for ApiError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl<E: Classify> From<&E> for ApiError {
    fn from(e: &E) -> ApiError {
        ApiError::new(e.kind(), e)
    }
}

/// The JSON body of an error answer: `{"error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The message.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_one_status_and_back() {
        for k in ALL_KINDS {
            assert_eq!(ErrorKind::from_status(k.status()), k, "{k:?}");
        }
        let mut statuses: Vec<u16> = ALL_KINDS.iter().map(|k| k.status()).collect();
        statuses.sort_unstable();
        statuses.dedup();
        assert_eq!(statuses.len(), ALL_KINDS.len(), "two kinds share a status");
    }

    #[test]
    fn the_request_s_fault_exits_2_and_the_rest_exit_1() {
        for k in ALL_KINDS {
            let s = k.status();
            let want = if (400..500).contains(&s) && s != 409 {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            };
            assert_eq!(k.exit_code(), want, "{k:?} ({s})");
        }
        assert_eq!(ErrorKind::from_status(418), ErrorKind::BadRequest);
        assert_eq!(ErrorKind::from_status(502), ErrorKind::Failed);
    }

    #[test]
    fn os_errors_on_named_things_are_the_user_s_when_missing_or_forbidden() {
        let e = |k| std::io::Error::from(k);
        assert_eq!(
            ErrorKind::of_io(&e(std::io::ErrorKind::NotFound)),
            ErrorKind::NotFound
        );
        assert_eq!(
            ErrorKind::of_io(&e(std::io::ErrorKind::PermissionDenied)),
            ErrorKind::Forbidden
        );
        assert_eq!(
            ErrorKind::of_io(&std::io::Error::from_raw_os_error(libc::EIO)),
            ErrorKind::Failed
        );
    }
}
