//! Sessions: one berth session of the Claude Code CLI in its own hybrid box per Managed Agents
//! session (parked when idle, resumed with `--resume` by the next message). Their events are in
//! `session_events`.

use super::environments::{allowlist, environment};
use super::resources::agent_at;
use super::session_events::{check_events, deliver};
use super::tools::{claude, custom_tools, mcp_hosts};
use super::{in_range, new_id, now, AError, AResult, Body, Params, St, Tenant};
use crate::engine::Engine;
use axum::extract::{Path, State};
use berth_api::{
    AgentSpec, BoxRef, BoxSpec, ClaudeAgent, Lifecycle, NetworkSpec, SessionSpec, SessionState,
};
use serde_json::{json, Value};
use std::time::Duration;

const SESSION: &str = "session";
/// How long a new session's box and agent may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The stored session document (what the API shows, plus `berth`: the berth session behind it).
pub(super) async fn doc(e: &Engine, tenant: &str, id: &str) -> AResult<Value> {
    e.documents(SESSION, tenant, Some(id))
        .await?
        .pop()
        .map(|d| d.body)
        .ok_or_else(|| AError::not_found(format!("session {id} not found")))
}

pub(super) fn berth_id(d: &Value) -> &str {
    d["berth"]["session_id"].as_str().unwrap_or("")
}

/// Stopped by its box's parking: idle, back with the next message.
pub(super) fn parked(s: &berth_api::SessionObject) -> bool {
    s.state == SessionState::Stopped && s.state_reason.as_deref() == Some("box parked")
}

fn status(d: &Value, s: Option<&berth_api::SessionObject>) -> &'static str {
    if !d["archived_at"].is_null() {
        return "terminated";
    }
    match s {
        Some(s) if s.state == SessionState::Running => "running",
        Some(s) if matches!(s.state, SessionState::Idle | SessionState::Starting) || parked(s) => {
            "idle"
        }
        _ => "terminated",
    }
}

/// The session's status: from its berth session, and a turn held by a permission request or a
/// custom tool use waits on the client (idle, requires_action).
async fn status_of(
    e: &Engine,
    tenant: &str,
    d: &Value,
    s: Option<&berth_api::SessionObject>,
) -> AResult<&'static str> {
    let st = status(d, s);
    if let (Some(s), "running") = (s, st) {
        let mut last = e
            .session_events_after(tenant, &s.id, s.last_seq.saturating_sub(2), 2)
            .await?;
        // The answer's metered usage may follow the tool use that ended it.
        if last.len() == 2
            && last[1].kind.as_str() == crate::engine::sessions::previews::MODEL_USAGE
        {
            last.pop();
        }
        if last.last().is_some_and(|l| {
            l.kind == berth_api::EventKind::PermissionRequest
                || (l.kind == berth_api::EventKind::ToolUse
                    && l.data["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(crate::engine::custom_tools::TOOL_PREFIX)))
        }) {
            return Ok("idle");
        }
    }
    Ok(st)
}

async fn current_status(e: &Engine, tenant: &str, d: &Value) -> AResult<&'static str> {
    let s = e.get_session(tenant, berth_id(d)).await.ok();
    status_of(e, tenant, d, s.as_ref()).await
}

/// The session as the API shows it: status from the berth session, usage from the ledger.
async fn render(e: &Engine, tenant: &str, d: &Value) -> AResult<Value> {
    let s = e.get_session(tenant, berth_id(d)).await.ok();
    let u = e.session_usage(tenant, berth_id(d)).await?;
    let t = &u.total;
    let created = chrono::DateTime::parse_from_rfc3339(d["created_at"].as_str().unwrap_or(""))
        .map(|c| (chrono::Utc::now() - c.with_timezone(&chrono::Utc)).num_milliseconds())
        .unwrap_or(0);
    let active = u.container_hours * 3600.0;
    let mut out = d.clone();
    if let Some(o) = out.as_object_mut() {
        o.remove("berth");
    }
    out["status"] = json!(status_of(e, tenant, d, s.as_ref()).await?);
    out["usage"] = json!({
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "cache_read_input_tokens": t.cache_read_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": t.cache_creation_5m_tokens, "ephemeral_1h_input_tokens": t.cache_creation_1h_tokens},
        "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        "list_cost": {"amount": cents(t.cost_usd), "currency": "USD"},
        "active_seconds": active,
    });
    out["stats"] = json!({"active_seconds": active, "duration_seconds": created as f64 / 1000.0});
    Ok(out)
}

/// The agent a session runs: its id (latest), `{type:"agent",id,version}` or
/// `{type:"agent_with_overrides",…}`.
async fn resolve_agent(e: &Engine, tenant: &str, v: &Value) -> AResult<Value> {
    let (id, version, overrides) = match v {
        Value::String(id) => (id.clone(), None, None),
        Value::Object(o) => {
            let id = o
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| AError::invalid("agent.id is required"))?
                .to_string();
            let version = o.get("version").and_then(Value::as_i64);
            match o.get("type").and_then(Value::as_str) {
                Some("agent") => (id, version, None),
                Some("agent_with_overrides") => {
                    let mut ov = v.clone();
                    for k in ["type", "id", "version"] {
                        ov.as_object_mut().map(|m| m.remove(k));
                    }
                    (id, version, Some(ov))
                }
                _ => {
                    return Err(AError::invalid(
                        "agent.type must be agent or agent_with_overrides",
                    ))
                }
            }
        }
        _ => return Err(AError::invalid("agent must be an agent id or an object")),
    };
    let mut a = agent_at(e, tenant, &id, version).await?;
    if !a["archived_at"].is_null() {
        return Err(AError::invalid(format!("agent {id} is archived")));
    }
    if let Some(ov) = overrides {
        let merged = super::resources::apply_overrides(&a, &ov)?;
        a = merged;
    }
    for k in ["created_at", "updated_at", "archived_at", "metadata"] {
        a.as_object_mut().map(|m| m.remove(k));
    }
    Ok(a)
}

fn refuse(body: &Value, field: &str, what: &str) -> AResult<()> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        _ => Err(AError::invalid(format!(
            "berth does not support {what} yet"
        ))),
    }
}

/// A session `budget` (`{type:"limit", max_list_cost:{amount:"<cents>", currency:"USD"}}`) in
/// USD, which berth's gateway enforces as the session's `max_budget_usd`.
pub(super) fn budget_usd(v: Option<&Value>) -> AResult<Option<f64>> {
    let Some(b) = v.filter(|b| !b.is_null()) else {
        return Ok(None);
    };
    let bad = || {
        AError::invalid(
            "budget must be {\"type\":\"limit\",\"max_list_cost\":{\"amount\":\"<cents>\",\"currency\":\"USD\"}}",
        )
    };
    if b["type"] != "limit" || b["max_list_cost"]["currency"] != "USD" {
        return Err(bad());
    }
    let cents = match &b["max_list_cost"]["amount"] {
        Value::String(s) => s.parse::<f64>().map_err(|_| bad())?,
        Value::Number(n) => n.as_f64().ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if !(cents.is_finite() && cents > 0.0) {
        return Err(bad());
    }
    Ok(Some(cents / 100.0))
}

pub(super) fn cents(usd: f64) -> String {
    format!("{:.4}", usd * 100.0)
}

/// Wait (bounded) until the berth session has left `starting`.
async fn started(e: &Engine, tenant: &str, id: &str) -> AResult<berth_api::SessionObject> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let s = e.get_session(tenant, id).await?;
        if s.state != SessionState::Starting {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(AError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "the session's agent did not start in time",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The box's egress allowlist: the environment's, its package registries' when it has packages,
/// and the agent's MCP servers' hosts when the environment allows MCP servers.
fn session_allowlist(env: &Value, agent: &Value) -> AResult<Vec<String>> {
    let mut hosts = allowlist(env);
    let mut extra = super::packages::hosts(env)?;
    if env["config"]["networking"]["allow_mcp_servers"] == true {
        extra.extend(mcp_hosts(agent));
    }
    for h in extra {
        if !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    Ok(hosts)
}

pub async fn create_session(
    State(st): St,
    Tenant(t, _): Tenant,
    Body(body): Body<Value>,
) -> AResult<axum::Json<Value>> {
    let e = &st.engine;
    refuse(&body, "vault_ids", "vaults")?;
    refuse(&body, "resources", "session resources")?;
    let budget = budget_usd(body.get("budget"))?;
    let agent = resolve_agent(e, &t, body.get("agent").unwrap_or(&Value::Null)).await?;
    let env_id = body["environment_id"]
        .as_str()
        .ok_or_else(|| AError::invalid("environment_id is required"))?;
    let env = environment(e, &t, env_id).await?;
    if !env["archived_at"].is_null() {
        return Err(AError::invalid(format!("environment {env_id} is archived")));
    }
    let initial: Vec<Value> = match body.get("initial_events") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| AError::invalid("initial_events must be an array"))?,
    };
    if initial.len() > 50 {
        return Err(AError::invalid("at most 50 initial_events"));
    }
    let initial = check_events(&initial)?;
    super::resources::room_for(e, SESSION, &t).await?;
    let spec = SessionSpec {
        box_ref: BoxRef::Spec(Box::new(BoxSpec {
            lifecycle: Some(Lifecycle::Hybrid),
            network: NetworkSpec {
                allow: session_allowlist(&env, &agent)?,
            },
            placement: serde_json::from_value(env["config"]["placement"].clone()).unwrap_or(None),
            ..Default::default()
        })),
        agent: AgentSpec::Claude(ClaudeAgent {
            max_budget_usd: budget,
            // For `event_deltas` previews on its streams.
            managed_agents: true,
            ..claude(&agent)
        }),
        workdir: None,
        prompt: None,
        keep_open: true,
        pool: None,
    };
    let made = e.create_session(&t, spec).await?;
    let custom = custom_tools(&agent);
    let ready = async {
        if !custom.is_empty() {
            // Before the agent can ask for them (its MCP client waits for them, bounded).
            e.register_custom_tools(&t, &made.id, custom).await?;
        }
        let s = started(e, &t, &made.id).await?;
        super::packages::install(e, &t, &made.box_id, &env).await?;
        Ok::<_, AError>(s)
    };
    let s = match ready.await {
        Ok(s) => s,
        Err(err) => {
            // Nothing refers to the box: it goes with the failure.
            let _ = e.delete_session(&t, &made.id).await;
            let _ = e.delete_box(&t, &made.box_id).await;
            let _ = e.forget_custom_tools(&t, &made.id).await;
            return Err(err);
        }
    };
    let ts = now();
    let d = json!({
        "type": "session",
        "id": new_id("sesn"),
        "agent": agent,
        "environment_id": env_id,
        "title": body.get("title").cloned().unwrap_or(Value::Null),
        "metadata": super::resources::metadata_of(body.get("metadata"))?,
        "resources": [], "vault_ids": [], "outcome_evaluations": [],
        "budget": budget.map(|usd| json!({"type": "limit", "max_list_cost": {"amount": cents(usd), "currency": "USD"}})),
        "created_at": ts, "updated_at": ts, "archived_at": null,
        // Events up to `start_seq` are the agent starting up, not part of the conversation.
        "berth": {"session_id": s.id, "box_id": s.box_id, "start_seq": s.last_seq},
    });
    super::resources::put_new(e, SESSION, &t, &d).await?;
    deliver(e, &t, &d, initial).await?;
    Ok(axum::Json(render(e, &t, &d).await?))
}

pub async fn get_session(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
) -> AResult<axum::Json<Value>> {
    let d = doc(&st.engine, &t, &id).await?;
    Ok(axum::Json(render(&st.engine, &t, &d).await?))
}

pub async fn update_session(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
    Body(body): Body<Value>,
) -> AResult<axum::Json<Value>> {
    doc(&st.engine, &t, &id).await?;
    refuse(&body, "vault_ids", "vault_ids on update")?;
    refuse(&body, "agent", "changing a session's agent")?;
    refuse(&body, "budget", "session budgets")?;
    let title = body.get("title");
    if title.is_some_and(|t| !(t.is_string() || t.is_null())) {
        return Err(AError::invalid("title must be a string"));
    }
    let d = super::resources::put_latest(&st.engine, SESSION, &t, &id, |d| {
        if let Some(title) = title {
            d["title"] = title.clone();
        }
        d["metadata"] = super::resources::metadata_patch(d.get("metadata"), body.get("metadata"))?;
        d["updated_at"] = json!(now());
        Ok(true)
    })
    .await?;
    Ok(axum::Json(render(&st.engine, &t, &d).await?))
}

/// Stop the agent and destroy the box (both gone already is fine).
async fn end(e: &Engine, tenant: &str, d: &Value) -> AResult<()> {
    e.delete_session(tenant, berth_id(d)).await?;
    e.forget_custom_tools(tenant, berth_id(d)).await?;
    let bx = d["berth"]["box_id"].as_str().unwrap_or("");
    match e.delete_box(tenant, bx).await {
        Ok(_) | Err(crate::engine::error::EngineError::NotFound(_)) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

pub async fn archive_session(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
) -> AResult<axum::Json<Value>> {
    let d = doc(&st.engine, &t, &id).await?;
    if d["archived_at"].is_null() {
        end(&st.engine, &t, &d).await?;
    }
    let d = super::resources::put_latest(&st.engine, SESSION, &t, &id, |d| {
        if !d["archived_at"].is_null() {
            return Ok(false);
        }
        let ts = now();
        d["archived_at"] = json!(ts);
        d["updated_at"] = json!(ts);
        Ok(true)
    })
    .await?;
    Ok(axum::Json(render(&st.engine, &t, &d).await?))
}

pub async fn delete_session(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
) -> AResult<axum::Json<Value>> {
    let d = doc(&st.engine, &t, &id).await?;
    end(&st.engine, &t, &d).await?;
    st.engine.delete_document(SESSION, &t, &id).await?;
    Ok(axum::Json(json!({"id": id, "type": "session_deleted"})))
}

pub async fn list_sessions(
    State(st): St,
    Tenant(t, _): Tenant,
    p: Params,
) -> AResult<axum::Json<Value>> {
    let e = &st.engine;
    let statuses = p.list("statuses");
    for s in &statuses {
        if !["rescheduling", "running", "idle", "terminated"].contains(&s.as_str()) {
            return Err(AError::invalid(format!("unknown status {s:?}")));
        }
    }
    let archived = p.flag("include_archived")?;
    let ranges = p.ranges("created_at");
    let agent_id = p.one("agent_id");
    let agent_version = p
        .one("agent_version")
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| AError::invalid("agent_version must be an integer"))
        })
        .transpose()?;
    let asc = match p.one("order").unwrap_or("desc") {
        "desc" => false,
        "asc" => true,
        o => {
            return Err(AError::invalid(format!(
                "order must be asc or desc, not {o:?}"
            )))
        }
    };
    // Filter on the documents first; the store is asked only for a status filter (one or two
    // reads a session) and for the page's own items (rendered with their usage).
    let (t, ranges, statuses) = (&t, &ranges, &statuses);
    let mut page = super::resources::page_latest(
        e,
        SESSION,
        t,
        p.one("page"),
        p.limit(20, 100)?,
        asc,
        move |d| async move {
            if !archived && !d["archived_at"].is_null() {
                return Ok(None);
            }
            if agent_id.is_some_and(|a| d["agent"]["id"] != a)
                || agent_version.is_some_and(|v| d["agent"]["version"] != v)
                || !in_range(d["created_at"].as_str().unwrap_or(""), ranges)?
            {
                return Ok(None);
            }
            if !statuses.is_empty() {
                let st = current_status(e, t, &d).await?;
                if !statuses.iter().any(|s| s == st) {
                    return Ok(None);
                }
            }
            Ok(Some(d))
        },
    )
    .await?;
    if let Some(data) = page["data"].as_array_mut() {
        for d in data.iter_mut() {
            *d = render(e, t, d).await?;
        }
    }
    Ok(axum::Json(page))
}
