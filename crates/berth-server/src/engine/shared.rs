//! Shared boxes: several agent sessions in one box, each as its own user.
//!
//! Layout inside the box: `/workspace/shared` (owned by the box's operator uid 1000, mode
//! 0755: written through the files API, read-only to sessions) and `/workspace/sessions`
//! (mode 1777, sticky), where each session has `<id>/` with mode 0700 owned by its uid. A
//! session's processes run as that uid with Landlock write access to its own directory, `/tmp`
//! and `/dev/shm` only; a different uid and no capabilities mean no signals to, or traces of,
//! its neighbours (ptrace is also refused by the seccomp filter). `HOME` and the Claude CLI's
//! config directory are inside the session's directory.

use super::error::EngineError;
use super::Engine;
use crate::error::ApiError;
use berth_sandbox::{Backend, ExecSpec, Sandbox};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// uid of a shared box's first session; the next ones count up.
pub const FIRST_UID: u32 = 2000;
pub const SESSIONS_DIR: &str = "/workspace/sessions";
pub const SHARED_DIR: &str = "/workspace/shared";

async fn run(backend: &Backend, box_id: &str, spec: ExecSpec) -> Result<(), EngineError> {
    let argv = spec.argv.join(" ");
    let out = backend
        .exec(box_id, spec)
        .await?
        .collect(None, 4096)
        .await?;
    if !out.exit.success() {
        return Err(EngineError::Internal(format!(
            "preparing the shared box ({argv}): {:?} {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Make the box's shared layout (idempotent) and the session's own directory, owned by `uid`;
/// its path.
pub async fn prepare(
    backend: &Backend,
    box_id: &str,
    session_id: &str,
    uid: u32,
) -> Result<String, EngineError> {
    let timeout = Some(Duration::from_secs(30));
    run(
        backend,
        box_id,
        ExecSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "mkdir -p {SESSIONS_DIR} {SHARED_DIR} && chmod 1777 {SESSIONS_DIR} && chmod 755 {SHARED_DIR}"
                ),
            ],
            timeout,
            ..Default::default()
        },
    )
    .await?;
    let dir = format!("{SESSIONS_DIR}/{session_id}");
    run(
        backend,
        box_id,
        ExecSpec {
            argv: vec!["mkdir".into(), "-m".into(), "700".into(), dir.clone()],
            uid: Some(uid),
            writable: Some(vec![SESSIONS_DIR.into()]),
            timeout,
            ..Default::default()
        },
    )
    .await?;
    Ok(dir)
}

/// Run the session's agent as its own uid, writing only beneath its own directory.
pub fn confine(spec: &mut ExecSpec, uid: u32, workdir: &str) {
    spec.uid = Some(uid);
    spec.writable = Some(vec![workdir.into(), "/tmp".into(), "/dev/shm".into()]);
    spec.env.retain(|(k, _)| k != "HOME");
    spec.env.push(("HOME".into(), workdir.into()));
}

/// The box-side berth API, on `127.0.0.1:47102` in every box (a bridged socket like the model
/// gateway's): agents list the box's sessions and post messages to each other's input. The
/// caller is the session whose gateway token it presents (`x-api-key` or a bearer token: the
/// agent already holds it as `ANTHROPIC_API_KEY`); it reaches only sessions of its own box.
pub fn serve_box_api(
    engine: Weak<Engine>,
    gateway: Arc<berth_gateway::Gateway>,
    box_id: &str,
    incoming: berth_gateway::conn::Incoming,
) -> tokio::task::JoinHandle<()> {
    use axum::routing::{get, post};
    let limits = gateway.conn_limits();
    let state = BoxApi {
        engine,
        gateway,
        box_id: box_id.to_string(),
    };
    let app = axum::Router::new()
        .route("/v1/sessions", get(peers))
        .route("/v1/sessions/{id}/messages", post(message))
        .route(
            super::custom_tools::MCP_PATH,
            post(super::custom_tools::handle),
        )
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024));
    let over_cap = berth_gateway::conn::refusal_response(
        "503 Service Unavailable",
        &serde_json::json!({"error": {"code": "too_many_connections",
            "message": "berth: too many connections from this box to the box API"}})
        .to_string(),
    );
    // Capped and timed out like the gateway's socket: the box controls every connection.
    tokio::spawn(berth_gateway::conn::serve_http(
        incoming, app, limits, over_cap,
    ))
}

#[derive(Clone)]
pub(super) struct BoxApi {
    /// Weak: the box's owner task holds this service, and the engine holds the owner task.
    engine: Weak<Engine>,
    gateway: Arc<berth_gateway::Gateway>,
    box_id: String,
}

impl BoxApi {
    /// The engine, unless the server is going away.
    pub(super) fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        self.engine
            .upgrade()
            .ok_or_else(|| ApiError::Unavailable("the server is shutting down".into()))
    }

    /// The calling session (tenant, id), which must belong to this box.
    pub(super) fn caller(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<(String, String), ApiError> {
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let token = header("x-api-key")
            .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")))
            .ok_or(ApiError::Unauthorized)?;
        let owner = self
            .gateway
            .owner_of(token.trim())
            .ok_or(ApiError::Unauthorized)?;
        if owner.box_id != self.box_id {
            return Err(ApiError::Unauthorized);
        }
        Ok((owner.tenant, owner.session_id))
    }
}

#[derive(serde::Serialize)]
struct Peer {
    id: String,
    state: berth_api::SessionState,
    uid: Option<u32>,
    workdir: String,
}

async fn peers(
    axum::extract::State(api): axum::extract::State<BoxApi>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let (tenant, _) = api.caller(&headers)?;
    let items: Vec<Peer> = api
        .engine()?
        .list_sessions(&tenant, Some(&api.box_id))
        .await?
        .into_iter()
        .map(|s| Peer {
            id: s.id,
            state: s.state,
            uid: s.uid,
            workdir: s.workdir,
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "items": items })))
}

async fn message(
    axum::extract::State(api): axum::extract::State<BoxApi>,
    axum::extract::Path(to): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    super::super::api::Json(req): super::super::api::Json<berth_api::MessageRequest>,
) -> Result<axum::http::StatusCode, ApiError> {
    let (tenant, from) = api.caller(&headers)?;
    let target = api.engine()?.get_session(&tenant, &to).await?;
    if target.box_id != api.box_id {
        return Err(ApiError::not_found("session", &to));
    }
    if to == from {
        return Err(ApiError::Invalid("a session cannot message itself".into()));
    }
    let text = match &req.content {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let content = serde_json::Value::String(format!("[message from session {from}]\n{text}"));
    api.engine()?.send_message(&tenant, &to, content).await?;
    Ok(axum::http::StatusCode::ACCEPTED)
}
