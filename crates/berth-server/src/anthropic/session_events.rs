//! A session's events: listed (`events.list`), sent (`events.send`: messages, interrupts,
//! confirmations, custom tool results) and streamed (`events.stream`), all mapped from the berth
//! session's one log (`events::Mapper`).

use super::events::{parse_id, Mapper, TYPES};
use super::previews::Previews;
use super::sessions::{berth_id, budget_usd, cents, doc, parked};
use super::tools::Policy;
use super::{in_range, now, paginate, AError, AResult, Body, Params, St, Tenant};
use crate::engine::sessions::previews::Preview;
use crate::engine::Engine;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError};

/// Events read from the store per round.
const PAGE: i64 = 1000;
/// How often a stream of a parked session looks for its return.
const PARKED_POLL: Duration = Duration::from_millis(250);

/// Every mapped event of the session after its start, oldest first.
async fn all_events(e: &Engine, tenant: &str, d: &Value) -> AResult<Vec<Value>> {
    let mut m = Mapper::new(Policy::of(&d["agent"]));
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
    let mut m = Mapper::new(Policy::of(&d["agent"]));
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
pub(super) fn check_events(events: &[Value]) -> AResult<Vec<Value>> {
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
            Some("user.custom_tool_result") => {
                let id = ev["custom_tool_use_id"]
                    .as_str()
                    .filter(|i| parse_id(i).is_some());
                let Some(id) = id else {
                    return Err(AError::invalid(
                        "custom_tool_use_id must be the id of an agent.custom_tool_use event",
                    ));
                };
                let content = match &ev["content"] {
                    Value::Null => json!([]),
                    Value::String(s) => json!([{"type": "text", "text": s}]),
                    Value::Array(a) => Value::Array(a.clone()),
                    _ => return Err(AError::invalid("content must be an array of blocks")),
                };
                let is_error = match &ev["is_error"] {
                    Value::Null => false,
                    Value::Bool(b) => *b,
                    _ => return Err(AError::invalid("is_error must be a boolean")),
                };
                out.push(json!({"type": "user.custom_tool_result", "custom_tool_use_id": id, "content": content, "is_error": is_error}));
            }
            Some(ty @ ("user.tool_result" | "user.define_outcome")) => {
                return Err(AError::invalid(format!(
                    "berth does not support {ty} events yet (no self-hosted workers or outcomes)"
                )))
            }
            _ => return Err(AError::invalid("unknown event type")),
        }
    }
    Ok(out)
}

/// Hand checked events to the agent in order; the echo of each.
pub(super) async fn deliver(
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
            Some("user.custom_tool_result") => answer_custom(e, tenant, sid, &ev).await,
            _ => e.interrupt(tenant, sid).await,
        };
        r.map_err(|err| AError::from(err).no_retry())?;
        ev["id"] = json!(format!(
            "sevt_receipt_{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        // A tool's result is processed as it arrives; messages queue.
        ev["processed_at"] = match ev["type"] == "user.custom_tool_result" {
            true => json!(now()),
            false => Value::Null,
        };
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

/// Hand the client's result of an `agent.custom_tool_use` to the CLI's waiting tool call.
async fn answer_custom(
    e: &Engine,
    tenant: &str,
    sid: &str,
    ev: &Value,
) -> Result<(), crate::engine::error::EngineError> {
    use crate::engine::custom_tools::TOOL_PREFIX;
    use crate::engine::error::EngineError;
    let id = ev["custom_tool_use_id"].as_str().unwrap_or("");
    let not_custom = || EngineError::Invalid(format!("{id} is not an agent.custom_tool_use event"));
    let (seq, _) = parse_id(id).ok_or_else(not_custom)?;
    let before = seq.checked_sub(1).ok_or_else(not_custom)?;
    let used = e.session_events_after(tenant, sid, before, 1).await?;
    let tool_use = used
        .first()
        .filter(|u| u.seq == seq && u.kind == berth_api::EventKind::ToolUse)
        .filter(|u| {
            u.data["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(TOOL_PREFIX))
        })
        .and_then(|u| u.data["id"].as_str())
        .ok_or_else(not_custom)?
        .to_string();
    let answer = json!({"content": mcp_content(&ev["content"]), "isError": ev["is_error"]});
    e.answer_custom_tool(tenant, sid, &tool_use, answer).await
}

/// Content blocks of the Messages API as MCP content: text as text, base64 images as images,
/// anything else as its JSON text.
fn mcp_content(blocks: &Value) -> Value {
    let one = |b: &Value| match b["type"].as_str() {
        Some("text") => json!({"type": "text", "text": b["text"].as_str().unwrap_or("")}),
        Some("image") if b["source"]["type"] == "base64" => json!({
            "type": "image",
            "data": b["source"]["data"],
            "mimeType": b["source"]["media_type"],
        }),
        _ => json!({"type": "text", "text": b.to_string()}),
    };
    Value::Array(
        blocks
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(one)
            .collect(),
    )
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
    let allowed = Policy::of(&d["agent"]);
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
    let mut previews = Previews::new(&deltas);
    let mut prx = match previews {
        Some(_) => e.subscribe_previews(&sid),
        None => None,
    };
    let now_seq = e.get_session(&t, &sid).await?.last_seq;
    // Events up to here are only read to set up the mapping; those after the `Last-Event-ID`
    // are sent, or without one what the log holds after `now_seq`. (By berth seq, not by the
    // mapped id: an answer's blocks may take their ids from the event before them.)
    let revoked = e.key_revoked(&key_id);
    let frames = async_stream::stream! {
        let mut m = Mapper::new(allowed);
        let mut last = start_seq;
        let mut ended = false;
        // The session's state as last polled while there was no live feed.
        let mut polled: Option<Result<berth_api::SessionObject, crate::engine::error::EngineError>> = None;
        let send = |v: Value, berth_seq: i64| -> Option<SseEvent> {
            let id = parse_id(v["id"].as_str().unwrap_or(""))?;
            let new = match resume {
                Some(r) => id > r,
                None => berth_seq > now_seq,
            };
            if !new {
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
                        if let Some(f) = send(v, ev.seq) { yield f; }
                    }
                    if let Some(p) = previews.as_mut() {
                        for f in p.after(last, &m) { yield preview_frame(f); }
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
                    if previews.is_some() {
                        prx = e.subscribe_previews(&sid);
                    }
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
                // Previews first: each is sent before the events it precedes, and is held
                // until the event before it has gone by.
                let next = tokio::select! {
                    biased;
                    p = next_preview(&mut prx) => Next::Preview(p),
                    r = rx.recv() => Next::Event(r),
                };
                let r = match next {
                    Next::Preview(None) => { prx = None; continue; }
                    Next::Preview(Some(p)) => {
                        if let Some(ps) = previews.as_mut() {
                            for f in ps.arrived(p, last, &m) { yield preview_frame(f); }
                        }
                        continue;
                    }
                    Next::Event(r) => r,
                };
                match r {
                    Ok(ev) if ev.event.seq <= last => continue,
                    Ok(ev) if ev.event.seq == last + 1 => {
                        last = ev.event.seq;
                        for v in m.map(&ev.event) {
                            if let Some(f) = send(v, ev.event.seq) { yield f; }
                        }
                        if let Some(p) = previews.as_mut() {
                            for f in p.after(last, &m) { yield preview_frame(f); }
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

enum Next {
    Preview(Option<Arc<Preview>>),
    Event(Result<Arc<crate::engine::sessions::LiveEvent>, RecvError>),
}

/// The session's next preview; pending forever without a feed, None when the feed ends.
async fn next_preview(rx: &mut Option<broadcast::Receiver<Arc<Preview>>>) -> Option<Arc<Preview>> {
    let Some(rx) = rx.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(p) => return Some(p),
            // Best-effort: what was missed stays missed (the stored event is whole).
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return None,
        }
    }
}

fn preview_frame(v: Value) -> SseEvent {
    SseEvent::default()
        .event(v["type"].as_str().unwrap_or("event_delta"))
        .data(v.to_string())
}

fn error_frame(err: AError) -> SseEvent {
    SseEvent::default().event("error").data(
        json!({"type": "error", "error": {"type": err.kind, "message": err.message}}).to_string(),
    )
}
