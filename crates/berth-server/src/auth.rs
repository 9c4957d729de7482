//! API keys: random secrets shown once, stored as SHA-256 hashes, each bound to a tenant.
//! Admin keys may manage keys; every other call is confined to the caller's tenant.

use crate::api::pty::KEY_PROTOCOL_PREFIX;
use crate::engine::error::EngineError;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use base64::Engine as _;
use berth_store::KeyRecord;
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

/// Where a request may carry its API key besides `Authorization: Bearer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeySources {
    /// An `x-api-key` header (Anthropic's convention); it goes first.
    pub x_api_key: bool,
    /// A `berth.key.<key>` WebSocket subprotocol (browsers cannot set headers on a
    /// WebSocket); after the bearer header.
    pub subprotocol: bool,
}

/// The raw API key a request carries (see [`KeySources`]); None when there is none, or it is
/// empty or longer than any key.
fn key_in(headers: &HeaderMap, from: KeySources) -> Option<&str> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let x_api_key = from
        .x_api_key
        .then(|| text(axum::http::header::HeaderName::from_static("x-api-key")))
        .flatten();
    let bearer = || {
        text(header::AUTHORIZATION).and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
    };
    let subprotocol = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(KEY_PROTOCOL_PREFIX))
    };
    let key = match x_api_key {
        Some(k) => k,
        None if headers.contains_key(header::AUTHORIZATION) || !from.subprotocol => bearer()?,
        None => subprotocol()?,
    }
    .trim();
    (!key.is_empty() && key.len() <= 256).then_some(key)
}

/// The key record behind the API key a request carries (None: no usable key, or an unknown
/// one). The one lookup behind every way of authenticating.
pub async fn key_from_headers(
    engine: &Engine,
    headers: &HeaderMap,
    from: KeySources,
) -> Result<Option<KeyRecord>, EngineError> {
    match key_in(headers, from) {
        Some(key) => engine.find_key(&hash_key(key)).await,
        None => Ok(None),
    }
}

impl From<KeyRecord> for Caller {
    fn from(rec: KeyRecord) -> Caller {
        Caller {
            tenant: rec.tenant,
            admin: rec.admin,
            key_id: rec.id,
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        key_from_headers(&state.engine, &parts.headers, KeySources::default())
            .await?
            .map(Caller::from)
            .ok_or(ApiError::Unauthorized)
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
