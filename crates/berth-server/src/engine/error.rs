//! What can go wrong in the engine, in its own terms: no HTTP here. The API edge
//! (`crate::error::ApiError`) maps each kind to a status and an error code.

use berth_sandbox::{FsError, SandboxError};
use berth_store::StoreError;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No such object (for this tenant).
    #[error("{0}")]
    NotFound(String),
    /// The object's state does not allow it (or it already exists).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A quota, limit or rate is used up.
    #[error("{0}")]
    Quota(String),
    /// A caller's proof (a webhook's signature or secret) is missing, wrong or replayed.
    #[error("{0}")]
    Unauthenticated(String),
    /// More data than the operation takes.
    #[error("{0}")]
    TooLarge(String),
    /// The box's disk is full.
    #[error("{0}")]
    NoSpace(String),
    /// A service inside the box did not answer.
    #[error("{0}")]
    Unreachable(String),
    /// Something the engine needs (the store, a backend) is down or busy; try again.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (logged, not shown to clients).
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    pub fn not_found(what: &str, id: &str) -> EngineError {
        EngineError::NotFound(format!("{what} {id} not found"))
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => EngineError::Conflict(m),
            StoreError::Db(sqlx_err) => {
                EngineError::Unavailable(format!("store unavailable: {sqlx_err}"))
            }
            other => EngineError::Internal(other.to_string()),
        }
    }
}

impl From<FsError> for EngineError {
    fn from(e: FsError) -> Self {
        match e {
            FsError::Outside(_) | FsError::Invalid(_) => EngineError::Invalid(e.to_string()),
            FsError::NotFound(_) => EngineError::NotFound(e.to_string()),
            FsError::TooLarge(_) => EngineError::TooLarge(e.to_string()),
            FsError::NoSpace => EngineError::NoSpace(e.to_string()),
            FsError::Busy(m) => EngineError::Unavailable(m),
            FsError::Io(io) => match io.kind() {
                std::io::ErrorKind::NotADirectory => {
                    EngineError::Invalid("a path component is not a directory".into())
                }
                std::io::ErrorKind::IsADirectory => {
                    EngineError::Invalid("path is a directory".into())
                }
                // ENAMETOOLONG: a client's path, not a server fault.
                _ if io.raw_os_error() == Some(36) => {
                    EngineError::Invalid("a path component is too long".into())
                }
                _ => EngineError::Internal(io.to_string()),
            },
        }
    }
}

impl From<SandboxError> for EngineError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::NotFound(id) => EngineError::not_found("box", &id),
            SandboxError::Exists(m) => EngineError::Conflict(format!("box {m} already exists")),
            SandboxError::InvalidSpec(m) => EngineError::Invalid(m),
            SandboxError::NotRunning(id) => {
                EngineError::Conflict(format!("box {id} is not running"))
            }
            SandboxError::Unsupported(m) => EngineError::Invalid(m),
            SandboxError::Start(m) => EngineError::Unavailable(format!("box failed: {m}")),
            SandboxError::Unreachable(m) => EngineError::Unreachable(m),
            SandboxError::Fs(f) => f.into(),
            SandboxError::Io(io) => EngineError::Internal(io.to_string()),
        }
    }
}
