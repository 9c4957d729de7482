//! API errors: every failure a handler can meet becomes `{error: {code, message}}` with a
//! fitting status. Internal details are logged, not leaked, for 5xx.

use crate::engine::error::EngineError;
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

/// The engine's errors at the API edge: the only place they become HTTP.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotFound(m) => ApiError::NotFound(m),
            EngineError::Conflict(m) => ApiError::Conflict(m),
            EngineError::Invalid(m) => ApiError::Invalid(m),
            EngineError::Quota(m) => ApiError::Rejected(StatusCode::TOO_MANY_REQUESTS, m),
            EngineError::Unauthenticated(m) => ApiError::Rejected(StatusCode::UNAUTHORIZED, m),
            EngineError::TooLarge(m) => ApiError::Rejected(StatusCode::PAYLOAD_TOO_LARGE, m),
            EngineError::NoSpace(m) => ApiError::Rejected(StatusCode::INSUFFICIENT_STORAGE, m),
            EngineError::Unreachable(m) => ApiError::Rejected(StatusCode::BAD_GATEWAY, m),
            EngineError::Unavailable(m) => ApiError::Unavailable(m),
            EngineError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        EngineError::from(e).into()
    }
}

impl From<FsError> for ApiError {
    fn from(e: FsError) -> Self {
        EngineError::from(e).into()
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        EngineError::from(e).into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_status_and_code_at_the_edge() {
        let cases = [
            (EngineError::NotFound("m".into()), 404, "not_found"),
            (EngineError::Conflict("m".into()), 409, "conflict"),
            (EngineError::Invalid("m".into()), 400, "invalid_request"),
            (EngineError::Quota("m".into()), 429, "quota_exceeded"),
            (
                EngineError::Unauthenticated("m".into()),
                401,
                "invalid_request",
            ),
            (EngineError::TooLarge("m".into()), 413, "payload_too_large"),
            (EngineError::NoSpace("m".into()), 507, "no_space"),
            (EngineError::Unreachable("m".into()), 502, "bad_gateway"),
            (EngineError::Unavailable("m".into()), 503, "unavailable"),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status().as_u16(), status, "{a:?}");
            assert_eq!(a.code(), code, "{a:?}");
            assert_eq!(a.body().error.message, "m");
        }
    }

    #[test]
    fn internal_engine_errors_are_not_shown_to_clients() {
        let a = ApiError::from(EngineError::Internal("db path /secret".into()));
        assert_eq!(a.status().as_u16(), 500);
        assert_eq!(a.code(), "internal");
        assert!(!a.body().error.message.contains("/secret"));
    }

    #[test]
    fn library_errors_map_through_the_engine_kinds() {
        let a = ApiError::from(SandboxError::NotFound("b1".into()));
        assert_eq!(
            (a.status().as_u16(), a.to_string()),
            (404, "box b1 not found".into())
        );
        let a = ApiError::from(FsError::NoSpace);
        assert_eq!(a.code(), "no_space");
        let a = ApiError::from(SandboxError::Unreachable("port 80".into()));
        assert_eq!(a.code(), "bad_gateway");
    }
}
