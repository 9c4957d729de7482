//! The Claude Managed Agents API (beta `managed-agents-2026-04-01`) under `/anthropic`, so the
//! official Anthropic SDKs and `ant` drive berth unchanged (`ANTHROPIC_BASE_URL=…/anthropic`).
//!
//! A thin translation onto the engine's public calls: agents and environments are versioned
//! JSON documents in the store (`Store::put_document`); a session is one berth session of the
//! real Claude Code CLI in its own hybrid box, made from the agent and the environment; its
//! events are berth's session events mapped to the Managed Agents event types on the way out
//! (`events::map`), so listing and streaming read one log in one order.
//!
//! This module speaks Anthropic's conventions, not berth's: keys in `x-api-key` or
//! `Authorization: Bearer`, errors as `{"type":"error","error":{"type","message"},"request_id"}`
//! with a `request-id` header on every answer, cursor pages (`data`, `next_page`, and on
//! sessions `prev_page`), bracketed query arrays (`statuses[]=`).

mod environments;
mod events;
mod packages;
mod previews;
mod resources;
mod session_events;
mod sessions;
mod tools;

use crate::engine::error::EngineError;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

tokio::task_local! {
    /// The id of the request being answered (set by `request_ids`), for error bodies.
    static REQUEST_ID: String;
}

/// The router nested at `/anthropic`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/agents",
            post(resources::create_agent).get(resources::list_agents),
        )
        .route(
            "/v1/agents/{id}",
            get(resources::get_agent).post(resources::update_agent),
        )
        .route("/v1/agents/{id}/archive", post(resources::archive_agent))
        .route("/v1/agents/{id}/versions", get(resources::agent_versions))
        .route(
            "/v1/environments",
            post(environments::create_environment).get(environments::list_environments),
        )
        .route(
            "/v1/environments/{id}",
            get(environments::get_environment)
                .post(environments::update_environment)
                .delete(environments::delete_environment),
        )
        .route(
            "/v1/environments/{id}/archive",
            post(environments::archive_environment),
        )
        .route(
            "/v1/sessions",
            post(sessions::create_session).get(sessions::list_sessions),
        )
        .route(
            "/v1/sessions/{id}",
            get(sessions::get_session)
                .post(sessions::update_session)
                .delete(sessions::delete_session),
        )
        .route("/v1/sessions/{id}/archive", post(sessions::archive_session))
        .route(
            "/v1/sessions/{id}/events",
            get(session_events::list_events).post(session_events::send_events),
        )
        .route(
            "/v1/sessions/{id}/events/stream",
            get(session_events::stream),
        )
        .fallback(unsupported)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(request_ids))
}

/// Give every answer a `request-id` header (and error bodies the same id).
async fn request_ids(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let id = format!("req_{}", hex::encode(rand::random::<[u8; 12]>()));
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("request-id", v);
    }
    resp
}

async fn unsupported(uri: axum::http::Uri) -> AError {
    // Vaults, memory stores, files, skills, deployments, session threads and resources, the
    // self-hosted work queue: all of the API berth does not serve.
    let path = uri.path();
    if path.starts_with("/v1/") {
        AError::not_found(format!(
            "berth does not implement {path} of the Managed Agents API"
        ))
    } else {
        AError::not_found(format!("no such endpoint: {path}"))
    }
}

async fn method_not_allowed() -> AError {
    AError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed on this endpoint",
    )
}

/// An error in Anthropic's envelope.
#[derive(Debug)]
pub struct AError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// Answer `x-should-retry: false`: a retry would repeat an act that is not idempotent.
    no_retry: bool,
}

impl AError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> AError {
        AError {
            status,
            kind,
            message: message.into(),
            no_retry: false,
        }
    }
    fn invalid(message: impl Into<String>) -> AError {
        AError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    fn not_found(message: impl Into<String>) -> AError {
        AError::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }
    fn conflict(message: impl Into<String>) -> AError {
        AError::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }
    fn no_retry(mut self) -> AError {
        self.no_retry = true;
        self
    }
}

impl From<ApiError> for AError {
    fn from(e: ApiError) -> AError {
        let status = e.status();
        let kind = match status.as_u16() {
            400 | 409 | 413 | 415 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        };
        AError::new(status, kind, e.body().error.message)
    }
}

impl From<EngineError> for AError {
    fn from(e: EngineError) -> AError {
        ApiError::from(e).into()
    }
}

impl IntoResponse for AError {
    fn into_response(self) -> Response {
        let request_id = REQUEST_ID.try_with(Clone::clone).unwrap_or_default();
        let body = json!({
            "type": "error",
            "error": {"type": self.kind, "message": self.message},
            "request_id": request_id,
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.no_retry {
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

type AResult<T> = Result<T, AError>;

/// The caller's tenant and key id, from a berth key in `x-api-key` or `Authorization: Bearer`.
/// `anthropic-version`, `anthropic-beta` and `?beta=true` are accepted and not required.
pub struct Tenant(pub String, pub String);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = AError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, AError> {
        let unauthorized = || {
            AError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            )
        };
        let from = crate::auth::KeySources {
            x_api_key: true,
            ..Default::default()
        };
        let rec = crate::auth::key_from_headers(&st.engine, &parts.headers, from)
            .await?
            .ok_or_else(unauthorized)?;
        Ok(Tenant(rec.tenant, rec.id))
    }
}

/// JSON body whose rejections are Anthropic errors.
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = AError;

    async fn from_request(req: axum::extract::Request, st: &S) -> Result<Self, AError> {
        let bytes = axum::body::Bytes::from_request(req, st)
            .await
            .map_err(|e| AError::invalid(e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| AError::invalid(format!("invalid request body: {e}")))
    }
}

/// The query string as pairs; `name[]` and a repeated `name` both collect into a list.
pub struct Params(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = AError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AError> {
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(v)| Params(v))
            .map_err(|e| AError::invalid(format!("bad query: {}", e.body_text())))
    }
}

impl Params {
    fn one(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn list(&self, name: &str) -> Vec<String> {
        let bracketed = format!("{name}[]");
        self.0
            .iter()
            .filter(|(k, _)| *k == bracketed || k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn flag(&self, name: &str) -> AResult<bool> {
        match self.one(name) {
            None => Ok(false),
            Some("true") | Some("1") => Ok(true),
            Some("false") | Some("0") => Ok(false),
            Some(v) => Err(AError::invalid(format!(
                "{name} must be true or false, not {v:?}"
            ))),
        }
    }
    fn limit(&self, default: usize, max: usize) -> AResult<usize> {
        match self.one("limit") {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(AError::invalid(format!(
                    "limit must be between 1 and {max}"
                ))),
            },
        }
    }
    /// `name[gte]` and the like, as (operator, value).
    fn ranges(&self, name: &str) -> Vec<(String, String)> {
        let prefix = format!("{name}[");
        self.0
            .iter()
            .filter_map(|(k, v)| {
                let op = k.strip_prefix(&prefix)?.strip_suffix(']')?;
                Some((op.to_string(), v.clone()))
            })
            .collect()
    }
}

/// Whether an RFC 3339 time passes every `created_at[op]` bound.
fn in_range(ts: &str, ranges: &[(String, String)]) -> AResult<bool> {
    let parse = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|_| AError::invalid(format!("not an RFC 3339 time: {s:?}")))
    };
    let t = parse(ts)?;
    for (op, v) in ranges {
        let b = parse(v)?;
        let ok = match op.as_str() {
            "gt" => t > b,
            "gte" => t >= b,
            "lt" => t < b,
            "lte" => t <= b,
            _ => return Err(AError::invalid(format!("unknown range operator {op:?}"))),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A cursor: the id of the item a page starts after (`a`) or ends before (`b`), opaque to
/// clients.
fn cursor(dir: char, id: &str) -> String {
    format!(
        "page_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{dir}:{id}"))
    )
}

fn parse_cursor(c: &str) -> AResult<(char, String)> {
    let bad = || AError::invalid("invalid page cursor");
    let raw = c.strip_prefix("page_").ok_or_else(bad)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .map_err(|_| bad())?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    let (dir, id) = s.split_once(':').ok_or_else(bad)?;
    match dir {
        "a" => Ok(('a', id.to_string())),
        "b" => Ok(('b', id.to_string())),
        _ => Err(bad()),
    }
}

/// One page of `items` (already in the listing's order, each with its id) from the `page`
/// cursor: `{data, next_page, prev_page}`. `next_page` is null on the last page, `prev_page`
/// on the first, so an SDK iterating either way stops.
fn paginate(items: Vec<(String, Value)>, page: Option<&str>, limit: usize) -> AResult<Value> {
    let (start, end) = match page {
        None => (0, limit.min(items.len())),
        Some(c) => {
            let (dir, id) = parse_cursor(c)?;
            let pos = items
                .iter()
                .position(|(i, _)| *i == id)
                .ok_or_else(|| AError::invalid("page cursor names an item that is gone"))?;
            if dir == 'a' {
                (pos + 1, (pos + 1 + limit).min(items.len()))
            } else {
                (pos.saturating_sub(limit), pos)
            }
        }
    };
    let next = (end < items.len() && end > start).then(|| cursor('a', &items[end - 1].0));
    let prev = (start > 0 && end > start).then(|| cursor('b', &items[start].0));
    let data: Vec<Value> = items
        .into_iter()
        .skip(start)
        .take(end - start)
        .map(|(_, v)| v)
        .collect();
    Ok(json!({"data": data, "next_page": next, "prev_page": prev}))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn new_id(prefix: &str) -> String {
    // Time first, so ids sort in creation order; random after, so they cannot be guessed.
    let ms = chrono::Utc::now().timestamp_millis();
    format!(
        "{prefix}_{ms:013x}{}",
        hex::encode(rand::random::<[u8; 8]>())
    )
}

/// Axum state for the handlers.
type St = State<AppState>;
