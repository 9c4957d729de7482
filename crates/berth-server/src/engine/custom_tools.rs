//! Custom tools of Managed Agents sessions (`crate::anthropic`): the client runs them, the
//! Claude Code CLI in the box calls them.
//!
//! The CLI gets one extra MCP server, `berth` (Streamable HTTP, `MCP_PATH` on the box-side API
//! at `127.0.0.1:47102`, the session's token as its bearer), so a custom tool `x` is the CLI's
//! tool `mcp__berth__x`. Its definitions and its answers live in one store document per berth
//! session (kind `custom_tools`, id the berth session's): `{"tools": […], "results": {toolu_id:
//! {"content", "isError"} | {"taken": true}}}`.
//!
//! - A `tools/call` from the box is bound to the caller's token: it waits on its own session's
//!   document only, for the answer to the tool use the CLI names (`_meta."claudecode/toolUseId"`),
//!   polling the store, so an answer given through any server of a shared database reaches it.
//!   It answers as an SSE stream with keep-alives, and gives up when the session ends.
//! - Only the client writes answers (`Engine::answer_custom_tool`, from the public API with a
//!   tenant key): the box has no call that writes one. Each tool use is answered once (a
//!   compare-and-swap on the document's version); a taken answer leaves only its mark behind.
//! - Bounded: definitions are checked by the API, an answer is at most `MAX_ANSWER` bytes, a
//!   session holds at most `MAX_ANSWERS` answers; a session has at most `MAX_WAITING_SESSION`
//!   calls waiting (each reads the store every `POLL`: the box cannot turn its connections into
//!   a flood of store reads), a server at most `MAX_WAITING`.

use super::error::EngineError;
use super::Engine;
use berth_store::Document;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The CLI's name of the MCP server: custom tool `x` is the CLI's `mcp__berth__x`.
pub const SERVER: &str = "berth";
pub const TOOL_PREFIX: &str = "mcp__berth__";
/// Where the box-side API serves it.
pub const MCP_PATH: &str = "/v1/custom_tools/mcp";
const KIND: &str = "custom_tools";
/// Bytes of one answer's content (as JSON).
pub const MAX_ANSWER: usize = 256 * 1024;
/// Answers one session may hold (taken ones count: their marks stop a second answer).
const MAX_ANSWERS: usize = 10_000;
/// Calls waiting at once on one server, over all sessions.
const MAX_WAITING: usize = 4096;
/// Calls (for definitions or an answer) one session may have waiting at once.
const MAX_WAITING_SESSION: usize = 8;
/// How often a waiting call reads its session's document.
const POLL: Duration = Duration::from_millis(100);
/// How long a call waits for the definitions (written as the session is created).
const DEFINITIONS_WAIT: Duration = Duration::from_secs(20);
/// How long a call waits for its answer (the CLI gives up earlier on its own).
const ANSWER_WAIT: Duration = Duration::from_secs(24 * 3600);
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Waiting calls per berth session.
static WAITING: std::sync::LazyLock<std::sync::Mutex<HashMap<String, usize>>> =
    std::sync::LazyLock::new(Default::default);

/// The MCP server entry of the CLI's `--mcp-config` for a session with custom tools. The token
/// is the session's, in the CLI's environment as `BERTH_SESSION_TOKEN` (the CLI hides its
/// `ANTHROPIC_API_KEY` from expansion), which the CLI expands in the header: it never appears in
/// an argument list.
pub fn mcp_server_config() -> Value {
    json!({
        "type": "http",
        "url": format!("http://127.0.0.1:{}{MCP_PATH}", super::BOX_API_PORT),
        "headers": {"Authorization": "Bearer ${BERTH_SESSION_TOKEN}"},
        // The client may take its time: the CLI caps this at its own maximum.
        "timeout": 3_600_000,
        // The client defined them for the model: always in the request, never deferred.
        "alwaysLoad": true,
    })
}

impl Engine {
    /// Record the custom tools of a berth session (before its agent can ask for them).
    pub async fn register_custom_tools(
        &self,
        tenant: &str,
        session: &str,
        tools: Vec<Value>,
    ) -> Result<(), EngineError> {
        let doc = Document {
            kind: KIND.into(),
            tenant: tenant.into(),
            id: session.into(),
            version: 1,
            body: json!({"tools": tools, "results": {}}),
        };
        Ok(self.store.put_document(&doc, false).await?)
    }

    /// The client's answer to the custom tool use `tool_use_id` (the CLI's `toolu_` id) of a
    /// berth session: `{"content": [MCP content], "isError": bool}`. Refused when the session has
    /// no custom tools, the use was answered already, or the answer is too large.
    pub async fn answer_custom_tool(
        &self,
        tenant: &str,
        session: &str,
        tool_use_id: &str,
        answer: Value,
    ) -> Result<(), EngineError> {
        if answer.to_string().len() > MAX_ANSWER {
            return Err(EngineError::Invalid(format!(
                "a custom tool result is at most {MAX_ANSWER} bytes"
            )));
        }
        for _ in 0..16 {
            let Some(mut d) = self.custom_tools_doc(tenant, session).await? else {
                return Err(EngineError::Invalid(
                    "the session's agent has no custom tools".into(),
                ));
            };
            let results = &mut d.body["results"];
            if results.get(tool_use_id).is_some() {
                return Err(EngineError::Conflict(format!(
                    "custom tool use {tool_use_id} was answered already"
                )));
            }
            if results.as_object().map_or(0, |r| r.len()) >= MAX_ANSWERS {
                return Err(EngineError::Invalid(format!(
                    "a session answers at most {MAX_ANSWERS} custom tool uses"
                )));
            }
            results[tool_use_id] = answer.clone();
            let from = d.version;
            d.version += 1;
            if self.store.advance_document(&d, from).await? {
                return Ok(());
            }
        }
        Err(EngineError::Conflict(
            "the session's custom tools are being changed by others, try again".into(),
        ))
    }

    /// Drop a berth session's custom tools and answers (the session is gone).
    pub async fn forget_custom_tools(
        &self,
        tenant: &str,
        session: &str,
    ) -> Result<(), EngineError> {
        self.store.delete_document(KIND, tenant, session).await?;
        Ok(())
    }

    async fn custom_tools_doc(
        &self,
        tenant: &str,
        session: &str,
    ) -> Result<Option<Document>, EngineError> {
        Ok(self
            .store
            .documents(KIND, tenant, Some(session))
            .await?
            .into_iter()
            .max_by_key(|d| d.version))
    }

    /// Take the answer to `tool_use_id` if there is one (its mark stays).
    async fn take_answer(
        &self,
        tenant: &str,
        session: &str,
        tool_use_id: &str,
    ) -> Result<Option<Value>, EngineError> {
        for _ in 0..16 {
            let Some(mut d) = self.custom_tools_doc(tenant, session).await? else {
                return Err(EngineError::NotFound("the session's custom tools".into()));
            };
            let answer = match d.body["results"].get(tool_use_id) {
                None => return Ok(None),
                Some(a) if a.get("taken").is_some() => {
                    return Err(EngineError::Conflict(format!(
                        "the answer to {tool_use_id} was taken already"
                    )))
                }
                Some(a) => a.clone(),
            };
            d.body["results"][tool_use_id] = json!({"taken": true});
            let from = d.version;
            d.version += 1;
            if self.store.advance_document(&d, from).await? {
                return Ok(Some(answer));
            }
        }
        Err(EngineError::Conflict("too many concurrent answers".into()))
    }
}

/// A waiting call, counted (per session and in all) while it lives.
struct Waiting(String);

impl Waiting {
    fn new(session: &str) -> Option<Waiting> {
        let mut w = WAITING.lock().ok()?;
        let total: usize = w.values().sum();
        let mine = w.get(session).copied().unwrap_or(0);
        if total >= MAX_WAITING || mine >= MAX_WAITING_SESSION {
            return None;
        }
        w.insert(session.to_string(), mine + 1);
        Some(Waiting(session.to_string()))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut w) = WAITING.lock() {
            match w.get_mut(&self.0) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    w.remove(&self.0);
                }
            }
        }
    }
}

fn rpc_result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn json_answer(v: Value) -> axum::response::Response {
    use axum::response::IntoResponse;
    axum::Json(v).into_response()
}

/// `POST MCP_PATH` on the box-side API: the caller is the session whose token it presents.
pub(super) async fn handle(
    axum::extract::State(api): axum::extract::State<super::shared::BoxApi>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, crate::error::ApiError> {
    let (tenant, session) = api.caller(&headers)?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| crate::error::ApiError::Invalid(format!("not JSON-RPC: {e}")))?;
    Ok(mcp(api.engine()?, tenant, session, body).await)
}

/// The MCP endpoint (Streamable HTTP: one JSON-RPC message per POST) for the calling session.
async fn mcp(
    engine: Arc<Engine>,
    tenant: String,
    session: String,
    body: Value,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = body.get("method").and_then(Value::as_str) else {
        // A response or a batch: nothing this server asked for.
        return StatusCode::ACCEPTED.into_response();
    };
    if body.get("id").is_none() {
        // Notifications (`notifications/initialized`, cancellations) need no answer.
        return StatusCode::ACCEPTED.into_response();
    }
    match method {
        "initialize" => {
            let version = body
                .pointer("/params/protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or("2025-06-18");
            json_answer(rpc_result(
                &id,
                json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": SERVER, "version": env!("CARGO_PKG_VERSION")},
                }),
            ))
        }
        "ping" => json_answer(rpc_result(&id, json!({}))),
        "tools/list" => {
            let Some(_guard) = Waiting::new(&session) else {
                return json_answer(rpc_error(&id, -32603, "too many calls waiting"));
            };
            match definitions(&engine, &tenant, &session).await {
                Ok(tools) => json_answer(rpc_result(&id, json!({"tools": tools}))),
                Err(e) => json_answer(rpc_error(&id, -32603, &e.to_string())),
            }
        }
        "tools/call" => call(engine, tenant, session, id, body).await,
        _ => json_answer(rpc_error(&id, -32601, "method not found")),
    }
}

/// The session's tools as MCP lists them; waits (bounded) for the session's creation to record
/// them.
async fn definitions(e: &Engine, tenant: &str, session: &str) -> Result<Vec<Value>, EngineError> {
    let deadline = tokio::time::Instant::now() + DEFINITIONS_WAIT;
    loop {
        if let Some(d) = e.custom_tools_doc(tenant, session).await? {
            let tools = d.body["tools"].as_array().cloned().unwrap_or_default();
            return Ok(tools
                .iter()
                .map(|t| {
                    json!({
                        "name": t["name"],
                        "description": t["description"].as_str().unwrap_or(""),
                        "inputSchema": t["input_schema"],
                    })
                })
                .collect());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(EngineError::NotFound("the session's custom tools".into()));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A `tools/call`: wait for the client's answer to the tool use the CLI names, as an SSE
/// stream (keep-alives hold the connection while the client thinks).
async fn call(
    engine: Arc<Engine>,
    tenant: String,
    session: String,
    id: Value,
    body: Value,
) -> axum::response::Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use axum::response::IntoResponse;
    let tool_use = body
        .pointer("/params/_meta/claudecode~1toolUseId")
        .and_then(Value::as_str)
        .filter(|t| {
            !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .map(str::to_string);
    let Some(tool_use) = tool_use else {
        return json_answer(rpc_error(
            &id,
            -32602,
            "berth needs the tool use's id (_meta.claudecode/toolUseId)",
        ));
    };
    let name = body
        .pointer("/params/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(guard) = Waiting::new(&session) else {
        return json_answer(rpc_error(&id, -32603, "too many custom tool calls waiting"));
    };
    match definitions(&engine, &tenant, &session).await {
        Ok(tools) if tools.iter().any(|t| t["name"] == name) => {}
        Ok(_) => return json_answer(rpc_error(&id, -32602, "no such custom tool")),
        Err(e) => return json_answer(rpc_error(&id, -32603, &e.to_string())),
    }
    let frames = async_stream::stream! {
        let _guard = guard;
        let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
        let reply = loop {
            match engine.take_answer(&tenant, &session, &tool_use).await {
                Ok(Some(a)) => {
                    let content = a["content"].clone();
                    let is_error = a["isError"].as_bool().unwrap_or(false);
                    break rpc_result(&id, json!({"content": content, "isError": is_error}));
                }
                Ok(None) => {}
                Err(e) => break rpc_error(&id, -32603, &e.to_string()),
            }
            // An ended session's call has nobody to answer it.
            match engine.get_session(&tenant, &session).await {
                Ok(s) if !s.state.is_terminal() => {}
                _ => break rpc_error(&id, -32603, "the session ended"),
            }
            if tokio::time::Instant::now() > deadline {
                break rpc_error(&id, -32603, "no answer in time");
            }
            tokio::time::sleep(POLL).await;
        };
        yield Ok::<_, std::convert::Infallible>(Event::default().event("message").data(reply.to_string()));
    };
    Sse::new(frames)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_has_a_few_calls_waiting_at_most() {
        let held: Vec<Waiting> = (0..MAX_WAITING_SESSION)
            .map(|_| Waiting::new("ses-cap-a").expect("room"))
            .collect();
        assert!(Waiting::new("ses-cap-a").is_none(), "one more than the cap");
        let other = Waiting::new("ses-cap-b").expect("another session has room");
        drop(held);
        assert!(
            Waiting::new("ses-cap-a").is_some(),
            "room again once they end"
        );
        drop(other);
        let w = WAITING.lock().expect("lock");
        assert!(!w.contains_key("ses-cap-a") && !w.contains_key("ses-cap-b"));
    }
}
