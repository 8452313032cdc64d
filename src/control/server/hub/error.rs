//! The hub's one error type: what went wrong, as a code a program can act
//! on, and a message that tells the user what to do.

use crate::control::wire::proto::ErrorCode;

/// A refused login, registration or admin request. Node-facing errors
/// travel to the node as `ServerMsg::Error { code, message }`; admin errors
/// are answered on the admin socket.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HubError {
    /// What kind of failure, for programs.
    pub code: ErrorCode,
    /// What happened and what to do about it, for people.
    pub message: String,
}

impl HubError {
    /// An error with an explicit code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> HubError {
        HubError { code, message: message.into() }
    }

    /// An admin request that cannot be done as asked (bad name, taken name,
    /// policy refused, ...).
    pub fn invalid(message: impl Into<String>) -> HubError {
        HubError::new(ErrorCode::Invalid, message)
    }

    /// An admin request naming a user, node or key that does not exist.
    pub fn not_found(message: impl Into<String>) -> HubError {
        HubError::new(ErrorCode::NotFound, message)
    }

    /// The store failed: logged here (with the cause) since the caller only
    /// forwards the message.
    pub fn store(e: anyhow::Error) -> HubError {
        tracing::error!("control store: {e:#}");
        HubError::new(ErrorCode::Internal, format!("control server error: {e:#}"))
    }
}
