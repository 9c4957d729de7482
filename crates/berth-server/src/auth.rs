//! API keys: random secrets shown once, stored as SHA-256 hashes, each bound to a tenant.
//! Admin keys may manage keys; every other call is confined to the caller's tenant.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "berth_";

#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub admin: bool,
    pub key_id: String,
}

pub fn new_key() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let key = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(ApiError::Unauthorized)?
            .trim();
        if key.is_empty() || key.len() > 256 {
            return Err(ApiError::Unauthorized);
        }
        let rec = state
            .engine
            .find_key(&hash_key(key))
            .await?
            .ok_or(ApiError::Unauthorized)?;
        Ok(Caller {
            tenant: rec.tenant,
            admin: rec.admin,
            key_id: rec.id,
        })
    }
}

/// Random id with a readable prefix, valid as a box id (`[A-Za-z0-9_-]`).
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// `body`, cut off with an error (the connection is reset, not ended cleanly, so the client
/// cannot mistake it for a whole answer) when `revoked` resolves.
pub fn until_revoked(
    body: axum::body::Body,
    revoked: impl std::future::Future<Output = ()> + Send + 'static,
) -> axum::body::Body {
    use futures::StreamExt;
    let mut data = body.into_data_stream();
    axum::body::Body::from_stream(async_stream::stream! {
        let mut revoked = std::pin::pin!(revoked);
        loop {
            tokio::select! {
                () = &mut revoked => {
                    yield Err(std::io::Error::other("API key revoked"));
                    break;
                }
                chunk = data.next() => match chunk {
                    Some(c) => yield c.map_err(std::io::Error::other),
                    None => break,
                },
            }
        }
    })
}
