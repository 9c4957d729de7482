//! Agents (versioned, optimistic concurrency), and the store helpers agents, environments and
//! sessions share: documents in the store, checked here against what berth can run (anything
//! it cannot is a 400 that says so).

use super::{
    cursor, in_range, new_id, now, paginate, parse_cursor, AError, AResult, Body, Params, St,
    Tenant,
};
use crate::engine::Engine;
use axum::extract::Path;
use berth_store::Document;
use serde_json::{json, Map, Value};

pub const AGENT: &str = "agent";

pub(super) fn str_field<'a>(v: &'a Value, name: &str) -> AResult<Option<&'a str>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AError::invalid(format!("{name} must be a string"))),
    }
}

/// `metadata` of a create (whole) or an update (a patch: `null` deletes a key).
pub(super) fn metadata(old: Option<&Value>, given: Option<&Value>) -> AResult<Value> {
    let mut m: Map<String, Value> = old.and_then(Value::as_object).cloned().unwrap_or_default();
    match given {
        None | Some(Value::Null) => {}
        Some(Value::Object(patch)) => {
            for (k, v) in patch {
                match v {
                    Value::Null => {
                        m.remove(k);
                    }
                    Value::String(s) if k.len() <= 64 && s.len() <= 512 => {
                        m.insert(k.clone(), v.clone());
                    }
                    Value::String(_) => {
                        return Err(AError::invalid(
                            "metadata keys are at most 64 characters and values at most 512",
                        ))
                    }
                    _ => return Err(AError::invalid("metadata values must be strings")),
                }
            }
        }
        Some(_) => return Err(AError::invalid("metadata must be an object")),
    }
    if m.len() > 16 {
        return Err(AError::invalid("metadata holds at most 16 pairs"));
    }
    Ok(Value::Object(m))
}

fn model(v: &Value) -> AResult<Value> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(json!({"id": s})),
        Value::Object(o)
            if o.get("id")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()) =>
        {
            Ok(v.clone())
        }
        _ => Err(AError::invalid(
            "model must be a model id or an object with an id",
        )),
    }
}

fn refuse_nonempty(body: &Value, field: &str, what: &str) -> AResult<()> {
    let empty = match body.get(field) {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        _ => false,
    };
    if empty {
        Ok(())
    } else {
        Err(AError::invalid(format!(
            "berth does not support {what} yet"
        )))
    }
}

/// The agent `body` describes, on top of `old` (an update) or from scratch.
fn agent_doc(body: &Value, old: Option<&Value>) -> AResult<Value> {
    if !body.is_object() {
        return Err(AError::invalid("the body must be an object"));
    }
    refuse_nonempty(body, "skills", "skills")?;
    if body.get("multiagent").is_some_and(|m| !m.is_null()) {
        return Err(AError::invalid("berth does not support multiagent yet"));
    }
    let field = |name: &str| body.get(name).or_else(|| old.and_then(|o| o.get(name)));
    let name = match body.get("name") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
        Some(_) => return Err(AError::invalid("name must be a non-empty string")),
        None => old
            .and_then(|o| o["name"].as_str())
            .map(str::to_string)
            .ok_or_else(|| AError::invalid("name is required"))?,
    };
    let model = match body.get("model") {
        Some(m) => model(m)?,
        None => old
            .map(|o| o["model"].clone())
            .ok_or_else(|| AError::invalid("model is required"))?,
    };
    let text = |n: &str| -> AResult<Value> {
        match field(n) {
            None | Some(Value::Null) => Ok(Value::Null),
            Some(Value::String(s)) => Ok(json!(s)),
            Some(_) => Err(AError::invalid(format!("{n} must be a string"))),
        }
    };
    let tools = match body.get("tools") {
        Some(t) => super::tools::tools(Some(t))?,
        None => old.map(|o| o["tools"].clone()).unwrap_or(json!([])),
    };
    let mcp_servers = match body.get("mcp_servers") {
        Some(m) => super::tools::mcp_servers(Some(m))?,
        None => old.map(|o| o["mcp_servers"].clone()).unwrap_or(json!([])),
    };
    super::tools::check_toolsets(&tools, &mcp_servers)?;
    Ok(json!({
        "type": "agent",
        "name": name,
        "description": text("description")?,
        "system": text("system")?,
        "model": model,
        "tools": tools,
        "mcp_servers": mcp_servers,
        "skills": [],
        "multiagent": null,
        "execution_identity": {"type": "service_account"},
        "metadata": metadata(old.and_then(|o| o.get("metadata")), body.get("metadata"))?,
    }))
}

/// An agent with a session's `agent_with_overrides` applied (same id and version).
pub(super) fn apply_overrides(agent: &Value, overrides: &Value) -> AResult<Value> {
    let mut a = agent_doc(overrides, Some(agent))?;
    for k in ["id", "version", "created_at", "updated_at", "archived_at"] {
        a[k] = agent[k].clone();
    }
    Ok(a)
}

pub(super) fn metadata_of(given: Option<&Value>) -> AResult<Value> {
    metadata(None, given)
}

pub(super) fn metadata_patch(old: Option<&Value>, given: Option<&Value>) -> AResult<Value> {
    metadata(old, given)
}

/// Every version of one agent, oldest first (404 when there is none).
async fn agent_versions_of(e: &Engine, tenant: &str, id: &str) -> AResult<Vec<Document>> {
    let v = e.documents(AGENT, tenant, Some(id)).await?;
    if v.is_empty() {
        return Err(AError::not_found(format!("agent {id} not found")));
    }
    Ok(v)
}

/// The agent at `version` (latest when None).
pub async fn agent_at(e: &Engine, tenant: &str, id: &str, version: Option<i64>) -> AResult<Value> {
    let all = agent_versions_of(e, tenant, id).await?;
    let d = match version {
        None => all.iter().max_by_key(|d| d.version),
        Some(v) => all.iter().find(|d| d.version == v),
    }
    .ok_or_else(|| AError::not_found(format!("agent {id} has no version {version:?}")))?;
    Ok(d.body.clone())
}

pub async fn create_agent(
    State(st): St,
    Tenant(t, _): Tenant,
    Body(body): Body<Value>,
) -> AResult<axum::Json<Value>> {
    let mut doc = agent_doc(&body, None)?;
    let id = new_id("agent");
    let ts = now();
    doc["id"] = json!(id);
    doc["version"] = json!(1);
    doc["created_at"] = json!(ts);
    doc["updated_at"] = json!(ts);
    doc["archived_at"] = Value::Null;
    room_for(&st.engine, AGENT, &t).await?;
    st.engine
        .put_document(
            &Document {
                kind: AGENT.into(),
                tenant: t,
                id,
                version: 1,
                body: doc.clone(),
            },
            false,
        )
        .await?;
    Ok(axum::Json(doc))
}

fn version_param(p: &Params) -> AResult<Option<i64>> {
    p.one("version")
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| AError::invalid("version must be an integer"))
        })
        .transpose()
}

pub async fn get_agent(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
    p: Params,
) -> AResult<axum::Json<Value>> {
    Ok(axum::Json(
        agent_at(&st.engine, &t, &id, version_param(&p)?).await?,
    ))
}

pub async fn update_agent(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
    Body(body): Body<Value>,
) -> AResult<axum::Json<Value>> {
    let cur = agent_at(&st.engine, &t, &id, None).await?;
    let cur_v = cur["version"].as_i64().unwrap_or(1);
    if let Some(v) = body.get("version").filter(|v| !v.is_null()) {
        if v.as_i64() != Some(cur_v) {
            return Err(
                AError::conflict(format!("agent {id} is at version {cur_v}, not {v}")).no_retry(),
            );
        }
    }
    if !cur["archived_at"].is_null() {
        return Err(AError::invalid(format!("agent {id} is archived")));
    }
    let mut doc = agent_doc(&body, Some(&cur))?;
    if agent_versions_of(&st.engine, &t, &id).await?.len() >= MAX_AGENT_VERSIONS {
        return Err(AError::invalid(format!(
            "agent {id} has {MAX_AGENT_VERSIONS} versions, the most berth keeps: create a new agent"
        ))
        .no_retry());
    }
    room_for(&st.engine, AGENT, &t).await?;
    let next = cur_v + 1;
    doc["id"] = json!(id);
    doc["version"] = json!(next);
    doc["created_at"] = cur["created_at"].clone();
    doc["updated_at"] = json!(now());
    doc["archived_at"] = Value::Null;
    let put = st
        .engine
        .put_document(
            &Document {
                kind: AGENT.into(),
                tenant: t,
                id: id.clone(),
                version: next,
                body: doc.clone(),
            },
            false,
        )
        .await;
    match put {
        Err(crate::engine::error::EngineError::Conflict(_)) => Err(AError::conflict(format!(
            "agent {id} was updated concurrently; read it again"
        ))
        .no_retry()),
        r => {
            r?;
            Ok(axum::Json(doc))
        }
    }
}

pub async fn archive_agent(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
) -> AResult<axum::Json<Value>> {
    let mut doc = agent_at(&st.engine, &t, &id, None).await?;
    if doc["archived_at"].is_null() {
        let ts = now();
        doc["archived_at"] = json!(ts);
        doc["updated_at"] = json!(ts);
        let version = doc["version"].as_i64().unwrap_or(1);
        st.engine
            .put_document(
                &Document {
                    kind: AGENT.into(),
                    tenant: t,
                    id,
                    version,
                    body: doc.clone(),
                },
                true,
            )
            .await?;
    }
    Ok(axum::Json(doc))
}

/// Stored documents of one kind (every version counts) a tenant may hold: bounds what each
/// list and each name check reads.
pub(super) const MAX_DOCUMENTS: usize = 10_000;
/// Versions one agent may have: each update adds one, and every list reads them all.
pub(super) const MAX_AGENT_VERSIONS: usize = 100;

/// Refuse (400) a new document of `kind` when the tenant holds the most berth keeps.
pub(super) async fn room_for(e: &Engine, kind: &str, tenant: &str) -> AResult<()> {
    // A count in the store: the check runs on every create, and reading up to the cap's
    // bodies to count them would cost what the cap bounds.
    if e.count_documents(kind, tenant).await? >= MAX_DOCUMENTS as i64 {
        return Err(AError::invalid(format!(
            "at most {MAX_DOCUMENTS} {kind} documents (versions included) per tenant: delete some first"
        ))
        .no_retry());
    }
    Ok(())
}

/// How often a read-modify-write of a single-version document starts again after another
/// writer changed it first.
const UPDATE_TRIES: usize = 16;

/// Write a new single-version document (environments, sessions) at version 1.
pub(super) async fn put_new(e: &Engine, kind: &str, tenant: &str, body: &Value) -> AResult<()> {
    let doc = Document {
        kind: kind.into(),
        tenant: tenant.into(),
        id: body["id"].as_str().unwrap_or("").to_string(),
        version: 1,
        body: body.clone(),
    };
    e.put_document(&doc, false).await?;
    Ok(())
}

/// Read-modify-write of a single-version document without losing a concurrent update:
/// `change` edits the stored body (`Ok(false)`: nothing to write), and the result replaces only
/// the version it was read at (a compare-and-swap on the version). When another writer got
/// there first, the new body is read and changed again (bounded, then a 409). The body
/// written, or the one read when nothing changed.
pub(super) async fn put_latest(
    e: &Engine,
    kind: &str,
    tenant: &str,
    id: &str,
    mut change: impl FnMut(&mut Value) -> AResult<bool>,
) -> AResult<Value> {
    for _ in 0..UPDATE_TRIES {
        let Some(mut d) = e
            .documents(kind, tenant, Some(id))
            .await?
            .into_iter()
            .max_by_key(|d| d.version)
        else {
            return Err(AError::not_found(format!("{kind} {id} not found")));
        };
        if !change(&mut d.body)? {
            return Ok(d.body);
        }
        let from = d.version;
        d.version += 1;
        if e.advance_document(&d, from).await? {
            return Ok(d.body);
        }
    }
    Err(AError::conflict(format!(
        "{kind} {id} is being changed by others, try again"
    )))
}

/// The latest version of each document of `kind`, newest first.
pub(super) async fn latest_of_each(e: &Engine, kind: &str, tenant: &str) -> AResult<Vec<Value>> {
    let mut latest: Vec<Document> = Vec::new();
    for d in e.documents(kind, tenant, None).await? {
        match latest.iter_mut().find(|l| l.id == d.id) {
            Some(l) if l.version < d.version => *l = d,
            Some(_) => {}
            None => latest.push(d),
        }
    }
    // Ids start with their creation time, so they sort by it.
    latest.sort_by(|a, b| b.id.cmp(&a.id));
    Ok(latest.into_iter().map(|d| d.body).collect())
}

pub(super) async fn list_latest(
    e: &Engine,
    kind: &str,
    tenant: &str,
    p: &Params,
) -> AResult<Value> {
    let archived = p.flag("include_archived")?;
    let ranges = p.ranges("created_at");
    let ranges = &ranges;
    page_latest(
        e,
        kind,
        tenant,
        p.one("page"),
        p.limit(20, 100)?,
        false,
        move |v| async move {
            let keep = (archived || v["archived_at"].is_null())
                && in_range(v["created_at"].as_str().unwrap_or(""), ranges)?;
            Ok(keep.then_some(v))
        },
    )
    .await
}

/// One page (`{data, next_page, prev_page}`) of the latest version of each document of `kind`,
/// newest first (oldest with `asc`), that `keep` passes (and may rewrite), from the `page`
/// cursor. Read from the store in keyset batches of the page's size from the cursor on, so a
/// page costs the documents it skips and shows, not all the tenant's. `next_page` is null on
/// the last page and `prev_page` on the first, so an SDK iterating either way stops.
pub(super) async fn page_latest<F, Fut>(
    e: &Engine,
    kind: &str,
    tenant: &str,
    page: Option<&str>,
    limit: usize,
    asc: bool,
    keep: F,
) -> AResult<Value>
where
    F: Fn(Value) -> Fut,
    Fut: std::future::Future<Output = AResult<Option<Value>>>,
{
    let (forward, mut after) = match page {
        None => (true, None),
        Some(c) => {
            let (dir, id) = parse_cursor(c)?;
            (dir == 'a', Some(id))
        }
    };
    // Backwards (a `prev_page` cursor) reads the other way and turns the page round.
    let desc = forward != asc;
    let mut items: Vec<(String, Value)> = Vec::new();
    let batch = limit + 1;
    'read: loop {
        let docs = e
            .latest_documents(kind, tenant, after.as_deref(), desc, batch as i64)
            .await?;
        let n = docs.len();
        for d in docs {
            after = Some(d.id.clone());
            if let Some(v) = keep(d.body).await? {
                items.push((d.id, v));
                if items.len() > limit {
                    break 'read;
                }
            }
        }
        if n < batch {
            break;
        }
    }
    let more = items.len() > limit;
    items.truncate(limit);
    if !forward {
        items.reverse();
    }
    let first = items.first().map(|(i, _)| i.clone());
    let last = items.last().map(|(i, _)| i.clone());
    let (next, prev) = if forward {
        (
            last.filter(|_| more).map(|i| cursor('a', &i)),
            first.filter(|_| page.is_some()).map(|i| cursor('b', &i)),
        )
    } else {
        (
            last.map(|i| cursor('a', &i)),
            first.filter(|_| more).map(|i| cursor('b', &i)),
        )
    };
    let data: Vec<Value> = items.into_iter().map(|(_, v)| v).collect();
    Ok(json!({"data": data, "next_page": next, "prev_page": prev}))
}

pub async fn list_agents(
    State(st): St,
    Tenant(t, _): Tenant,
    p: Params,
) -> AResult<axum::Json<Value>> {
    Ok(axum::Json(list_latest(&st.engine, AGENT, &t, &p).await?))
}

pub async fn agent_versions(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
    p: Params,
) -> AResult<axum::Json<Value>> {
    let mut all = agent_versions_of(&st.engine, &t, &id).await?;
    all.sort_by_key(|d| std::cmp::Reverse(d.version));
    let items = all
        .into_iter()
        .map(|d| (d.version.to_string(), d.body))
        .collect();
    Ok(axum::Json(paginate(
        items,
        p.one("page"),
        p.limit(20, 100)?,
    )?))
}

use axum::extract::State;
