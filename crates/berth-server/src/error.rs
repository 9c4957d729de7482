//! API errors: every failure a handler can meet becomes `{error: {code, message}}` with a
//! fitting status. Internal details are logged, not leaked, for 5xx.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_api::{ErrorBody, ErrorDetail};
use berth_sandbox::{FsError, SandboxError};
use berth_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{1}")]
    Rejected(StatusCode, String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Rejected(s, _) => *s,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::Invalid(_) => "invalid_request",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Rejected(s, _) if *s == StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            ApiError::Rejected(s, _) if *s == StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                "unsupported_media_type"
            }
            ApiError::Rejected(s, _) if *s == StatusCode::TOO_MANY_REQUESTS => "quota_exceeded",
            ApiError::Rejected(s, _) if *s == StatusCode::BAD_GATEWAY => "bad_gateway",
            ApiError::Rejected(s, _) if *s == StatusCode::INSUFFICIENT_STORAGE => "no_space",
            ApiError::Rejected(_, _) => "invalid_request",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        let message = match self {
            ApiError::Internal(_) => "internal error; see the server log".to_string(),
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message,
            },
        }
    }

    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::NotFound(format!("{what} {id} not found"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(m) = &self {
            tracing::error!(error = %m, "internal error");
        }
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Db(sqlx_err) => {
                ApiError::Unavailable(format!("store unavailable: {sqlx_err}"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<FsError> for ApiError {
    fn from(e: FsError) -> Self {
        match e {
            FsError::Outside(_) | FsError::Invalid(_) => ApiError::Invalid(e.to_string()),
            FsError::NotFound(_) => ApiError::NotFound(e.to_string()),
            FsError::TooLarge(_) => {
                ApiError::Rejected(axum::http::StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            FsError::NoSpace => {
                ApiError::Rejected(axum::http::StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
            FsError::Busy(m) => ApiError::Unavailable(m),
            FsError::Io(io) => match io.kind() {
                std::io::ErrorKind::NotADirectory => {
                    ApiError::Invalid("a path component is not a directory".into())
                }
                std::io::ErrorKind::IsADirectory => ApiError::Invalid("path is a directory".into()),
                _ => ApiError::Internal(io.to_string()),
            },
        }
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::NotFound(id) => ApiError::not_found("box", &id),
            SandboxError::Exists(m) => ApiError::Conflict(format!("box {m} already exists")),
            SandboxError::InvalidSpec(m) => ApiError::Invalid(m),
            SandboxError::NotRunning(id) => ApiError::Conflict(format!("box {id} is not running")),
            SandboxError::Unsupported(m) => ApiError::Invalid(m),
            SandboxError::Start(m) => ApiError::Unavailable(format!("box failed: {m}")),
            SandboxError::Unreachable(m) => ApiError::Rejected(StatusCode::BAD_GATEWAY, m),
            SandboxError::Fs(f) => f.into(),
            SandboxError::Io(io) => ApiError::Internal(io.to_string()),
        }
    }
}

macro_rules! rejection {
    ($t:ty) => {
        impl From<$t> for ApiError {
            fn from(r: $t) -> Self {
                ApiError::Rejected(r.status(), r.body_text())
            }
        }
    };
}
rejection!(axum::extract::rejection::JsonRejection);
rejection!(axum::extract::rejection::QueryRejection);
rejection!(axum::extract::rejection::PathRejection);
rejection!(axum::extract::rejection::BytesRejection);
