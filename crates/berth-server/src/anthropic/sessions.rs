//! Sessions and their events: one berth session of the Claude Code CLI in its own hybrid box per
//! Managed Agents session (parked when idle, resumed with `--resume` by the next message).

use super::events::{parse_id, Mapper, TYPES};
use super::resources::{agent_at, allowlist, environment, TOOLS};
use super::{in_range, new_id, now, paginate, AError, AResult, Body, Params, St, Tenant};
use crate::engine::Engine;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use berth_api::{
    AgentSpec, BoxRef, BoxSpec, ClaudeAgent, Lifecycle, NetworkSpec, PermissionRule, SessionSpec,
    SessionState,
};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

const SESSION: &str = "session";
/// Events read from the store per round.
const PAGE: i64 = 1000;
/// How often a stream of a parked session looks for its return.
const PARKED_POLL: Duration = Duration::from_millis(250);
/// How long a new session's box and agent may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The stored session document (what the API shows, plus `berth`: the berth session behind it).
async fn doc(e: &Engine, tenant: &str, id: &str) -> AResult<Value> {
    e.documents(SESSION, tenant, Some(id))
        .await?
        .pop()
        .map(|d| d.body)
        .ok_or_else(|| AError::not_found(format!("session {id} not found")))
}

fn berth_id(d: &Value) -> &str {
    d["berth"]["session_id"].as_str().unwrap_or("")
}

/// Stopped by its box's parking: idle, back with the next message.
fn parked(s: &berth_api::SessionObject) -> bool {
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

/// The session's status: from its berth session, and a turn held by a permission request
/// waits on the client (idle, requires_action).
async fn status_of(
    e: &Engine,
    tenant: &str,
    d: &Value,
    s: Option<&berth_api::SessionObject>,
) -> AResult<&'static str> {
    let st = status(d, s);
    if let (Some(s), "running") = (s, st) {
        let last = e
            .session_events_after(tenant, &s.id, s.last_seq.saturating_sub(1), 1)
            .await?;
        if last
            .first()
            .is_some_and(|l| l.kind == berth_api::EventKind::PermissionRequest)
        {
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

/// What an agent lets its built-in tools do: (CLI name, enabled, asks first).
fn tool_policies(agent: &Value) -> Vec<(&'static str, bool, bool)> {
    let mut out: Vec<(&'static str, bool, bool)> =
        TOOLS.iter().map(|(_, cli)| (*cli, false, false)).collect();
    for t in agent["tools"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let on = t["default_config"]["enabled"].as_bool().unwrap_or(true);
        let ask = t["default_config"]["permission_policy"]["type"] == "always_ask";
        for (i, (name, _)) in TOOLS.iter().enumerate() {
            let cfg = t["configs"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == *name));
            out[i].1 |= cfg.and_then(|c| c["enabled"].as_bool()).unwrap_or(on);
            out[i].2 = cfg
                .map(|c| c["permission_policy"]["type"] == "always_ask")
                .unwrap_or(ask);
        }
    }
    out
}

/// The tools a session's agent uses without asking; None: every tool (nothing asks).
pub(super) fn allowed_without_asking(agent: &Value) -> Option<Vec<String>> {
    let p = tool_policies(agent);
    if !p.iter().any(|(_, on, ask)| *on && *ask) {
        return None;
    }
    Some(
        p.iter()
            .filter(|(_, on, ask)| *on && !ask)
            .map(|(cli, _, _)| cli.to_string())
            .collect(),
    )
}

/// The Claude Code CLI's settings for an agent: model, system prompt, its tools. A tool that
/// asks first has no rule, so the CLI's permission request reaches the client.
fn claude(agent: &Value) -> ClaudeAgent {
    let disallowed = tool_policies(agent)
        .into_iter()
        .filter(|(_, on, _)| !on)
        .map(|(cli, _, _)| cli.to_string())
        .collect();
    let allow = |tool: &str| PermissionRule {
        tool: tool.into(),
        pattern: None,
        allow: true,
    };
    // The CLI asks only outside its bypass mode.
    let (permission_mode, permission_rules) = match allowed_without_asking(agent) {
        None => (None, vec![allow("*")]),
        Some(tools) => (
            Some("default".to_string()),
            tools.iter().map(|t| allow(t)).collect(),
        ),
    };
    ClaudeAgent {
        model: agent["model"]["id"].as_str().map(str::to_string),
        system_prompt: agent["system"].as_str().map(str::to_string),
        disallowed_tools: disallowed,
        permission_rules,
        permission_mode,
        ..Default::default()
    }
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
fn budget_usd(v: Option<&Value>) -> AResult<Option<f64>> {
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

fn cents(usd: f64) -> String {
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
                allow: allowlist(&env),
            },
            ..Default::default()
        })),
        agent: AgentSpec::Claude(ClaudeAgent {
            max_budget_usd: budget,
            ..claude(&agent)
        }),
        workdir: None,
        prompt: None,
        keep_open: true,
        pool: None,
    };
    let s = e.create_session(&t, spec).await?;
    let s = match started(e, &t, &s.id).await {
        Ok(s) => s,
        Err(err) => {
            // Nothing refers to the box: it goes with the failure.
            let _ = e.delete_session(&t, &s.id).await;
            let _ = e.delete_box(&t, &s.box_id).await;
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
    // Filter on the documents first; the store is asked only for a status filter (one or two
    // reads a session) and for the page's own items (rendered with their usage).
    let mut items = Vec::new();
    for d in super::resources::latest_of_each(e, SESSION, &t).await? {
        if !archived && !d["archived_at"].is_null() {
            continue;
        }
        if agent_id.is_some_and(|a| d["agent"]["id"] != a)
            || agent_version.is_some_and(|v| d["agent"]["version"] != v)
            || !in_range(d["created_at"].as_str().unwrap_or(""), &ranges)?
        {
            continue;
        }
        if !statuses.is_empty() {
            let st = current_status(e, &t, &d).await?;
            if !statuses.iter().any(|s| s == st) {
                continue;
            }
        }
        items.push((d["id"].as_str().unwrap_or("").to_string(), d));
    }
    match p.one("order").unwrap_or("desc") {
        "desc" => {}
        "asc" => items.reverse(),
        o => {
            return Err(AError::invalid(format!(
                "order must be asc or desc, not {o:?}"
            )))
        }
    }
    let mut page = paginate(items, p.one("page"), p.limit(20, 100)?)?;
    if let Some(data) = page["data"].as_array_mut() {
        for d in data.iter_mut() {
            *d = render(e, &t, d).await?;
        }
    }
    Ok(axum::Json(page))
}

/// Every mapped event of the session after its start, oldest first.
async fn all_events(e: &Engine, tenant: &str, d: &Value) -> AResult<Vec<Value>> {
    let mut m = Mapper::new(allowed_without_asking(&d["agent"]));
    let mut last = d["berth"]["start_seq"].as_i64().unwrap_or(0);
    let mut out = Vec::new();
    loop {
        let page = e
            .session_events_after(tenant, berth_id(d), last, PAGE)
            .await?;
        let n = page.len() as i64;
        for ev in &page {
            last = ev.seq;
            out.extend(m.map(ev));
        }
        if n < PAGE {
            return Ok(out);
        }
    }
}

pub async fn list_events(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
    p: Params,
) -> AResult<axum::Json<Value>> {
    let d = doc(&st.engine, &t, &id).await?;
    let types = p.list("types");
    if let Some(bad) = types.iter().find(|ty| !TYPES.contains(&ty.as_str())) {
        return Err(AError::invalid(format!("unknown event type {bad:?}")));
    }
    let ranges = p.ranges("created_at");
    let keep = |v: &Value| -> AResult<bool> {
        Ok(
            (types.is_empty() || types.iter().any(|ty| v["type"] == ty.as_str()))
                && in_range(v["processed_at"].as_str().unwrap_or(""), &ranges)?,
        )
    };
    let limit = p.limit(1000, 1000)?;
    let order = p.one("order").unwrap_or("asc");
    if order != "asc" && order != "desc" {
        return Err(AError::invalid(format!(
            "order must be asc or desc, not {order:?}"
        )));
    }
    let cursor = p.one("page").map(super::parse_cursor).transpose()?;
    if order == "asc" && cursor.as_ref().is_none_or(|(dir, _)| *dir == 'a') {
        // Oldest first: the log is read only up to the page's end.
        let after = cursor.map(|(_, id)| id);
        let (data, more) = events_page(&st.engine, &t, &d, keep, after.as_deref(), limit).await?;
        let next = more
            .then(|| data.last().and_then(|v| v["id"].as_str()))
            .flatten()
            .map(|id| super::cursor('a', id));
        return Ok(axum::Json(json!({"data": data, "next_page": next})));
    }
    let mut items = Vec::new();
    for v in all_events(&st.engine, &t, &d).await? {
        if keep(&v)? {
            items.push((v["id"].as_str().unwrap_or("").to_string(), v));
        }
    }
    if order == "desc" {
        items.reverse();
    }
    let mut page = paginate(items, p.one("page"), limit)?;
    if let Some(o) = page.as_object_mut() {
        o.remove("prev_page");
    }
    Ok(axum::Json(page))
}

/// Up to `limit` mapped events that pass `keep`, oldest first, after the one with id `after`
/// (from the start when None); whether more follow. Reads the log only as far as it needs.
async fn events_page(
    e: &Engine,
    tenant: &str,
    d: &Value,
    mut keep: impl FnMut(&Value) -> AResult<bool>,
    after: Option<&str>,
    limit: usize,
) -> AResult<(Vec<Value>, bool)> {
    let mut m = Mapper::new(allowed_without_asking(&d["agent"]));
    let mut last = d["berth"]["start_seq"].as_i64().unwrap_or(0);
    let mut found = after.is_none();
    let mut out = Vec::new();
    loop {
        let page = e
            .session_events_after(tenant, berth_id(d), last, PAGE)
            .await?;
        let n = page.len() as i64;
        for ev in &page {
            last = ev.seq;
            for v in m.map(ev) {
                if !found {
                    found = v["id"].as_str() == after;
                    continue;
                }
                if keep(&v)? {
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                    out.push(v);
                }
            }
        }
        if n < PAGE {
            if !found {
                return Err(AError::invalid("page cursor names an item that is gone"));
            }
            return Ok((out, false));
        }
    }
}

/// What a client may send: `user.message` and `user.interrupt` (anything else is refused before
/// any is acted on).
fn check_events(events: &[Value]) -> AResult<Vec<Value>> {
    let mut out = Vec::new();
    for ev in events {
        match ev["type"].as_str() {
            Some("user.message") => {
                let c = &ev["content"];
                let non_empty = c.as_array().is_some_and(|a| !a.is_empty());
                if !(non_empty || c.is_string()) {
                    return Err(AError::invalid("user.message needs content"));
                }
                out.push(json!({"type": "user.message", "content": c}));
            }
            Some("user.interrupt") => out.push(json!({"type": "user.interrupt"})),
            Some("user.tool_confirmation") => {
                let id = ev["tool_use_id"].as_str().filter(|i| parse_id(i).is_some());
                let Some(id) = id else {
                    return Err(AError::invalid(
                        "tool_use_id must be the id of an agent.tool_use event",
                    ));
                };
                let result = ev["result"].as_str().unwrap_or("");
                if result != "allow" && result != "deny" {
                    return Err(AError::invalid("result must be allow or deny"));
                }
                let deny_message = match &ev["deny_message"] {
                    Value::Null => Value::Null,
                    Value::String(m) => json!(m),
                    _ => return Err(AError::invalid("deny_message must be a string")),
                };
                out.push(json!({"type": "user.tool_confirmation", "tool_use_id": id, "result": result, "deny_message": deny_message}));
            }
            Some(ty @ ("user.custom_tool_result" | "user.tool_result" | "user.define_outcome")) => {
                return Err(AError::invalid(format!(
                    "berth does not support {ty} events yet (no custom tools or outcomes)"
                )))
            }
            _ => return Err(AError::invalid("unknown event type")),
        }
    }
    Ok(out)
}

/// Hand checked events to the agent in order; the echo of each.
async fn deliver(
    e: &std::sync::Arc<Engine>,
    tenant: &str,
    d: &Value,
    events: Vec<Value>,
) -> AResult<Vec<Value>> {
    if !d["archived_at"].is_null() {
        return Err(AError::invalid("the session is archived").no_retry());
    }
    let sid = berth_id(d);
    if let Some(max) = budget_usd(d.get("budget"))? {
        let spent = e.session_usage(tenant, sid).await?.total.cost_usd;
        if spent >= max && events.iter().any(|ev| ev["type"] == "user.message") {
            return Err(AError::invalid(format!(
                "the session's budget is spent ({} of {} cents)",
                cents(spent),
                cents(max)
            ))
            .no_retry());
        }
    }
    let mut out = Vec::new();
    for mut ev in events {
        let r = match ev["type"].as_str() {
            Some("user.message") => e.send_message(tenant, sid, ev["content"].clone()).await,
            Some("user.tool_confirmation") => confirm(e, tenant, sid, &ev).await,
            _ => e.interrupt(tenant, sid).await,
        };
        r.map_err(|err| AError::from(err).no_retry())?;
        ev["id"] = json!(format!(
            "sevt_receipt_{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        ev["processed_at"] = Value::Null;
        out.push(ev);
    }
    Ok(out)
}

/// Answer the CLI's permission request behind an `agent.tool_use` that asked.
async fn confirm(
    e: &Engine,
    tenant: &str,
    sid: &str,
    ev: &Value,
) -> Result<(), crate::engine::error::EngineError> {
    use crate::engine::error::EngineError;
    let id = ev["tool_use_id"].as_str().unwrap_or("");
    let not_asked =
        || EngineError::Invalid(format!("{id} is not a tool use awaiting confirmation"));
    let (seq, _) = parse_id(id).ok_or_else(not_asked)?;
    let before = seq.checked_sub(1).ok_or_else(not_asked)?;
    let asked = e.session_events_after(tenant, sid, before, 1).await?;
    let request_id = asked
        .first()
        .filter(|a| a.seq == seq && a.kind == berth_api::EventKind::PermissionRequest)
        .and_then(|a| a.data["request_id"].as_str())
        .ok_or_else(not_asked)?
        .to_string();
    let answer = berth_api::PermissionAnswer {
        allow: ev["result"] == "allow",
        message: ev["deny_message"].as_str().map(str::to_string),
    };
    e.answer_permission(tenant, sid, &request_id, answer).await
}

pub async fn send_events(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
    Body(body): Body<Value>,
) -> AResult<axum::Json<Value>> {
    let e = &st.engine;
    let d = doc(e, &t, &id).await?;
    let events: Vec<Value> = serde_json::from_value(body["events"].clone())
        .map_err(|_| AError::invalid("events must be an array").no_retry())?;
    if events.is_empty() {
        return Err(AError::invalid("events must not be empty").no_retry());
    }
    let events = check_events(&events).map_err(AError::no_retry)?;
    let data = deliver(e, &t, &d, events).await?;
    Ok(axum::Json(json!({"data": data})))
}

/// The session's events as SSE: those after the connection (or after `Last-Event-ID`, a
/// berth extra), `event:` on every frame, `event: ping` every 15 s. Ends when the agent does.
pub async fn stream(
    State(st): St,
    Tenant(t, key_id): Tenant,
    Path(id): Path<String>,
    p: Params,
    headers: HeaderMap,
) -> AResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let deltas = p.list("event_deltas");
    if deltas.len() > 100
        || deltas
            .iter()
            .any(|d| d != "agent.message" && d != "agent.thinking")
    {
        return Err(AError::invalid(
            "event_deltas takes agent.message and agent.thinking",
        ));
    }
    let e = st.engine.clone();
    let d = doc(&e, &t, &id).await?;
    let sid = berth_id(&d).to_string();
    let start_seq = d["berth"]["start_seq"].as_i64().unwrap_or(0);
    let allowed = allowed_without_asking(&d["agent"]);
    let resume = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(v) => Some(
            parse_id(v.trim())
                .ok_or_else(|| AError::invalid("Last-Event-ID is not an event id"))?,
        ),
        None => None,
    };
    // Subscribe first: nothing committed after this point is missed. On a shared store the
    // session may run in another server process: its commits are relayed.
    let mut live = e.subscribe_any(&sid).await;
    let now_seq = e.get_session(&t, &sid).await?.last_seq;
    // Events up to here are only read to set up the mapping; those after `from` are sent.
    let from = resume.unwrap_or((now_seq, usize::MAX));
    let revoked = e.key_revoked(&key_id);
    let frames = async_stream::stream! {
        let mut m = Mapper::new(allowed);
        let mut last = start_seq;
        let mut ended = false;
        // The session's state as last polled while there was no live feed.
        let mut polled: Option<Result<berth_api::SessionObject, crate::engine::error::EngineError>> = None;
        let send = |v: Value, from: (i64, usize)| -> Option<SseEvent> {
            let (seq, n) = parse_id(v["id"].as_str().unwrap_or(""))?;
            if (seq, n) <= from {
                return None;
            }
            Some(SseEvent::default()
                .id(v["id"].as_str().unwrap_or(""))
                .event(v["type"].as_str().unwrap_or("message"))
                .data(v.to_string()))
        };
        'outer: loop {
            loop {
                let page = match e.session_events_after(&t, &sid, last, PAGE).await {
                    Ok(p) => p,
                    Err(err) => { yield error_frame(err.into()); break 'outer; }
                };
                let n = page.len() as i64;
                for ev in &page {
                    last = ev.seq;
                    for v in m.map(ev) {
                        if let Some(f) = send(v, from) { yield f; }
                    }
                }
                if n < PAGE { break; }
            }
            if ended || live.is_none() {
                // No live feed: the agent's task has ended, or another process runs it on a
                // store without relays. A session its box's parking stopped comes back (under
                // the same id) with the next message: poll, and read the store after each
                // poll, until a feed is there again; anything else is the end, after the read
                // that follows the poll that saw it.
                if let Some(rx) = e.subscribe_any(&sid).await {
                    live = Some(rx);
                    ended = false;
                    polled = None;
                    continue 'outer;
                }
                match polled.take() {
                    None => {}
                    Some(Ok(s)) if !s.state.is_terminal() || parked(&s) => {
                        tokio::time::sleep(PARKED_POLL).await
                    }
                    Some(_) => break 'outer,
                }
                polled = Some(e.get_session(&t, &sid).await);
                continue 'outer;
            }
            let Some(rx) = live.as_mut() else { break };
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.event.seq <= last => continue,
                    Ok(ev) if ev.event.seq == last + 1 => {
                        last = ev.event.seq;
                        for v in m.map(&ev.event) {
                            if let Some(f) = send(v, from) { yield f; }
                        }
                    }
                    // Lagged or a gap: catch up from the store, then follow again.
                    Ok(_) | Err(RecvError::Lagged(_)) => continue 'outer,
                    Err(RecvError::Closed) => { ended = true; continue 'outer; }
                }
            }
        }
    };
    // The stream ends when the caller's key is revoked.
    let frames = frames.take_until(revoked).map(Ok::<_, Infallible>);
    Ok(Sse::new(frames).keep_alive(
        KeepAlive::new().interval(Duration::from_secs(15)).event(
            SseEvent::default()
                .event("ping")
                .data("{\"type\":\"ping\"}"),
        ),
    ))
}

fn error_frame(err: AError) -> SseEvent {
    SseEvent::default().event("error").data(
        json!({"type": "error", "error": {"type": err.kind, "message": err.message}}).to_string(),
    )
}
