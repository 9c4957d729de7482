//! `berth mock-model`: a stand-in for the Anthropic Messages API, for offline work and tests.
//!
//! It speaks the wire format: `POST /v1/messages` streaming (SSE `message_start`, `ping`,
//! `content_block_start|delta|stop` with `text_delta` and `input_json_delta`, `message_delta`
//! with usage, `message_stop`, and `error`) and non-streaming, `POST /v1/messages/count_tokens`,
//! Anthropic-shaped error bodies. What it answers comes from a [`Scenario`]: rules matched on
//! the conversation's task (the last plain-text user message), each a list of steps taken one
//! per assistant turn (text, tool calls, errors, delays, a broken stream). Every request it sees
//! is recorded (credentials only as a fingerprint, see [`fingerprint`]) and served at
//! `GET /_mock/requests` to whoever presents the mock's inspection token
//! ([`Mock::inspect_token`], header `x-mock-inspect-token`): the operator, never a box (the
//! model gateway does not forward `/_mock/*` either).

pub mod scenario;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use scenario::{Scenario, Step};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Recorded {
    pub path: String,
    /// [`fingerprint`] of the `x-api-key` header (never the value).
    pub api_key: Option<String>,
    /// [`fingerprint`] of the `authorization` header (never the value).
    pub authorization: Option<String>,
    pub anthropic_version: Option<String>,
    pub anthropic_beta: Option<String>,
    pub body: Value,
    /// Usage the mock reported for this request.
    pub usage: Value,
    /// When the request arrived (milliseconds since the Unix epoch).
    pub received_unix_ms: f64,
}

/// What the mock records of a credential: enough to tell which key arrived, not the key
/// (`sha256:` and the first 16 hex digits of its SHA-256).
pub fn fingerprint(secret: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(secret.as_bytes());
    format!("sha256:{}", &hex::encode(d)[..16])
}

impl Recorded {
    /// Whether the request carried `x-api-key: key`.
    pub fn api_key_is(&self, key: &str) -> bool {
        self.api_key.as_deref() == Some(fingerprint(key).as_str())
    }

    /// Whether the request carried `authorization: value`.
    pub fn authorization_is(&self, value: &str) -> bool {
        self.authorization.as_deref() == Some(fingerprint(value).as_str())
    }
}

/// The header that carries the inspection token.
pub const INSPECT_HEADER: &str = "x-mock-inspect-token";

#[derive(Clone)]
pub struct Mock {
    scenario: Arc<Scenario>,
    seen: Arc<Mutex<Vec<Recorded>>>,
    /// Pause between streamed chunks.
    chunk_delay: Duration,
    /// Required to read or clear the record over HTTP.
    inspect_token: Arc<str>,
}

impl Mock {
    pub fn new(scenario: Scenario, chunk_delay: Duration) -> Mock {
        use rand::Rng;
        let t: [u8; 16] = rand::thread_rng().gen();
        Mock {
            scenario: Arc::new(scenario),
            seen: Arc::new(Mutex::new(Vec::new())),
            chunk_delay,
            inspect_token: Arc::from(format!("mock-inspect-{}", hex::encode(t))),
        }
    }

    /// The token that opens `/_mock/*` (send it as `x-mock-inspect-token`).
    pub fn inspect_token(&self) -> &str {
        &self.inspect_token
    }

    pub fn router(&self) -> Router {
        let inspect = Router::new()
            .route("/_mock/requests", get(requests).delete(clear))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                operator_only,
            ));
        Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .merge(inspect)
            .fallback(|| async {
                api_error(
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    "no such endpoint on the mock model",
                )
            })
            .layer(axum::middleware::from_fn(gzip_when_asked))
            .with_state(self.clone())
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Like the real API, answer gzip when the client accepts it (`Accept-Encoding: gzip`); a
/// stream is compressed chunk by chunk with a sync flush after each, so events still arrive
/// as they are produced.
async fn gzip_when_asked(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let wants_gzip = req
        .headers()
        .get_all("accept-encoding")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|c| {
            let mut it = c.split(';');
            let name = it.next().unwrap_or("").trim();
            let refused = it.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case("gzip") && !refused
        });
    let resp = next.run(req).await;
    if !wants_gzip || resp.headers().contains_key("content-encoding") {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove("content-length");
    parts.headers.insert(
        "content-encoding",
        axum::http::HeaderValue::from_static("gzip"),
    );
    parts.headers.append(
        "vary",
        axum::http::HeaderValue::from_static("accept-encoding"),
    );
    let stream = async_stream::stream! {
        use futures::StreamExt;
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut data = body.into_data_stream();
        while let Some(chunk) = data.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    yield Err(std::io::Error::other(e));
                    return;
                }
            };
            if let Err(e) = enc.write_all(&chunk).and_then(|()| enc.flush()) {
                yield Err(e);
                return;
            }
            let out = std::mem::take(enc.get_mut());
            if !out.is_empty() {
                yield Ok(bytes::Bytes::from(out));
            }
        }
        match enc.finish() {
            Ok(rest) => yield Ok(bytes::Bytes::from(rest)),
            Err(e) => yield Err(e),
        }
    };
    Response::from_parts(parts, axum::body::Body::from_stream(stream))
}

fn api_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

/// The inspection routes answer only the holder of the inspection token; anyone else gets
/// the same 404 as for an unknown path.
async fn operator_only(
    State(m): State<Mock>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = req
        .headers()
        .get(INSPECT_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let want = m.inspect_token.as_bytes();
    if !berth_api::secret::secret_eq(given, want) {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "no such endpoint on the mock model",
        );
    }
    next.run(req).await
}

fn header(h: &HeaderMap, k: &str) -> Option<String> {
    h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Deterministic token estimate: a quarter of the characters, at least one.
pub fn estimate_tokens(s: &str) -> u64 {
    (s.chars().count() as u64).div_ceil(4).max(1)
}

fn input_tokens(body: &Value) -> u64 {
    let mut text = String::new();
    if let Some(s) = body.get("system") {
        text.push_str(&s.to_string());
    }
    if let Some(m) = body.get("messages") {
        text.push_str(&m.to_string());
    }
    estimate_tokens(&text)
}

async fn requests(State(m): State<Mock>) -> Json<Vec<Recorded>> {
    Json(m.recorded())
}

async fn clear(State(m): State<Mock>) -> StatusCode {
    if let Ok(mut v) = m.seen.lock() {
        v.clear();
    }
    StatusCode::NO_CONTENT
}

async fn count_tokens(Json(body): Json<Value>) -> Json<Value> {
    Json(json!({"input_tokens": input_tokens(&body)}))
}

fn msg_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("msg_mock{n:016x}")
}

fn tool_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("toolu_mock{n:016x}")
}

/// The content blocks and stop reason of a step.
fn blocks(step: &Step) -> (Vec<Value>, &'static str) {
    let mut out = Vec::new();
    if let Some(t) = &step.text {
        out.push(json!({"type": "text", "text": t}));
    }
    for tu in &step.tool_use {
        out.push(json!({"type": "tool_use", "id": tool_id(), "name": tu.name, "input": tu.input}));
    }
    let stop = if step.tool_use.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    (out, stop)
}

async fn messages(
    State(m): State<Mock>,
    headers: HeaderMap,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body must be JSON",
        );
    };
    if !body.get("messages").is_some_and(Value::is_array) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages: field required",
        );
    }
    if header(&headers, "x-api-key").is_none() && header(&headers, "authorization").is_none() {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        );
    }
    let step = m.scenario.step_for(&body);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-mock")
        .to_string();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (content, stop) = blocks(&step);
    let inp = step
        .usage
        .input_tokens
        .unwrap_or_else(|| input_tokens(&body));
    let out_tokens = step
        .usage
        .output_tokens
        .unwrap_or_else(|| estimate_tokens(&serde_json::to_string(&content).unwrap_or_default()));
    let usage = json!({
        "input_tokens": inp,
        "cache_creation_input_tokens": step.usage.cache_creation_input_tokens.unwrap_or(0),
        "cache_read_input_tokens": step
            .usage
            .final_cache_read_input_tokens
            .or(step.usage.cache_read_input_tokens)
            .unwrap_or(0),
        "cache_creation": {
            "ephemeral_5m_input_tokens": step.usage.cache_creation_input_tokens.unwrap_or(0),
            "ephemeral_1h_input_tokens": 0
        },
        "output_tokens": out_tokens,
    });
    if let Ok(mut seen) = m.seen.lock() {
        seen.push(Recorded {
            path: "/v1/messages".into(),
            api_key: header(&headers, "x-api-key").map(|v| fingerprint(&v)),
            authorization: header(&headers, "authorization").map(|v| fingerprint(&v)),
            anthropic_version: header(&headers, "anthropic-version"),
            anthropic_beta: header(&headers, "anthropic-beta"),
            body: body.clone(),
            usage: if step.error.is_some() {
                Value::Null
            } else {
                usage.clone()
            },
            received_unix_ms: unix_ms(),
        });
    }
    if step.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(step.delay_ms)).await;
    }
    if let Some(e) = &step.error {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return api_error(status, &e.kind, &e.message);
    }
    if !stream {
        return Json(json!({
            "id": msg_id(), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage,
        }))
        .into_response();
    }
    let delay = m.chunk_delay;
    let broken = step.break_stream;
    let events = async_stream::stream! {
        let mut start_usage = usage.clone();
        start_usage["output_tokens"] = json!(1);
        start_usage["cache_read_input_tokens"] = json!(step.usage.cache_read_input_tokens.unwrap_or(0));
        let mut end_usage = json!({"output_tokens": out_tokens});
        if let Some(n) = step.usage.final_cache_read_input_tokens {
            end_usage["cache_read_input_tokens"] = json!(n);
        }
        yield sse("message_start", json!({"type": "message_start", "message": {
            "id": msg_id(), "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": start_usage}}));
        yield sse("ping", json!({"type": "ping"}));
        for (i, b) in content.iter().enumerate() {
            if delay > Duration::ZERO { tokio::time::sleep(delay).await; }
            if b["type"] == "text" {
                yield sse("content_block_start", json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}));
                let text = b["text"].as_str().unwrap_or("");
                for chunk in chunks(text, 24) {
                    if delay > Duration::ZERO { tokio::time::sleep(delay).await; }
                    yield sse("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": chunk}}));
                    if broken { return; }
                }
            } else {
                yield sse("content_block_start", json!({"type": "content_block_start", "index": i,
                    "content_block": {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}}));
                let input = serde_json::to_string(&b["input"]).unwrap_or_else(|_| "{}".into());
                for chunk in chunks(&input, 32) {
                    yield sse("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": chunk}}));
                    if broken { return; }
                }
            }
            yield sse("content_block_stop", json!({"type": "content_block_stop", "index": i}));
        }
        yield sse("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": end_usage}));
        yield sse("message_stop", json!({"type": "message_stop"}));
    };
    let body = axum::body::Body::from_stream(futures::StreamExt::map(
        events,
        Ok::<_, std::convert::Infallible>,
    ));
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn sse(event: &str, data: Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

fn chunks(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

/// Serve on a free loopback port in a background task (until the runtime ends); returns the
/// base URL.
pub async fn spawn_loopback(mock: &Mock) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = mock.router();
    tokio::spawn(async move {
        let _ = axum::serve(nodelay(listener), router).await;
    });
    Ok(url)
}

/// Streamed answers are many small writes: without TCP_NODELAY, Nagle holds them back.
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

/// Serve until `shutdown` resolves; `on_ready` gets the bound address.
pub async fn serve(
    mock: Mock,
    listen: std::net::SocketAddr,
    on_ready: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    on_ready(listener.local_addr()?);
    axum::serve(nodelay(listener), mock.router())
        .with_graceful_shutdown(shutdown)
        .await
}
