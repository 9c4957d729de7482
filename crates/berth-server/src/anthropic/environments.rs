//! Environments: one document each (a compare-and-swap on update), names unique; `config`
//! checked against what berth can give a box (anything it cannot is a 400 that says so).

use super::resources::{
    latest_of_each, list_latest, metadata, put_latest, put_new, room_for, str_field,
};
use super::{new_id, now, AError, AResult, Body, Params, St, Tenant};
use crate::engine::Engine;
use axum::extract::{Path, State};
use serde_json::{json, Value};

pub const ENVIRONMENT: &str = "environment";

/// Registries `allow_package_managers` opens (the egress allowlist's domain patterns).
const PACKAGE_HOSTS: [&str; 8] = [
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    "proxy.golang.org",
    "rubygems.org",
];

fn valid_host(h: &str) -> bool {
    let bare = h.strip_prefix("*.").unwrap_or(h);
    !bare.is_empty()
        && bare.len() <= 253
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !bare.starts_with('.')
        && !bare.ends_with('.')
}

/// An environment's config with defaults filled in, or a 400 naming what berth cannot serve.
fn env_config(v: Option<&Value>) -> AResult<Value> {
    let v = v.filter(|v| !v.is_null()).cloned().unwrap_or(json!({}));
    match v.get("type").and_then(Value::as_str).unwrap_or("cloud") {
        "cloud" => {}
        "self_hosted" => return Err(AError::invalid(
            "berth runs every session in its own boxes: self_hosted environments are not served",
        )),
        other => {
            return Err(AError::invalid(format!(
                "unknown environment type {other:?}"
            )))
        }
    }
    let net = v.get("networking").filter(|n| !n.is_null());
    let networking = match net.and_then(|n| n.get("type")).and_then(Value::as_str) {
        None => json!({"type": "limited", "allowed_hosts": [], "allow_mcp_servers": false, "allow_package_managers": false}),
        Some("limited") => {
            let n = net.cloned().unwrap_or_default();
            let hosts: Vec<String> = match n.get("allowed_hosts") {
                None | Some(Value::Null) => Vec::new(),
                Some(h) => serde_json::from_value(h.clone())
                    .map_err(|_| AError::invalid("allowed_hosts must be an array of host names"))?,
            };
            if let Some(bad) = hosts.iter().find(|h| !valid_host(h)) {
                return Err(AError::invalid(format!(
                    "allowed_hosts: {bad:?} is not a host name or *.suffix pattern"
                )));
            }
            json!({
                "type": "limited",
                "allowed_hosts": hosts,
                "allow_mcp_servers": n.get("allow_mcp_servers").and_then(Value::as_bool).unwrap_or(false),
                "allow_package_managers": n.get("allow_package_managers").and_then(Value::as_bool).unwrap_or(false),
            })
        }
        Some("unrestricted") => {
            return Err(AError::invalid(
                "berth boxes reach the network only through an allowlist: use networking {\"type\":\"limited\",\"allowed_hosts\":[…]}",
            ))
        }
        Some(other) => return Err(AError::invalid(format!("unknown networking type {other:?}"))),
    };
    let packages = super::packages::check(v.get("packages"))?;
    let mut config = json!({
        "type": "cloud",
        "networking": networking,
        "packages": packages,
    });
    // berth's own: where in a cluster the environment's sessions run (a box's placement).
    if let Some(p) = v.get("placement").filter(|p| !p.is_null()) {
        let p: berth_api::Placement = serde_json::from_value(p.clone())
            .map_err(|e| AError::invalid(format!("placement: {e}")))?;
        config["placement"] = serde_json::to_value(p).unwrap_or_default();
    }
    Ok(config)
}

/// The egress allowlist a box of this environment gets.
pub fn allowlist(env: &Value) -> Vec<String> {
    let n = &env["config"]["networking"];
    let mut hosts: Vec<String> = n["allowed_hosts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if n["allow_package_managers"] == true {
        hosts.extend(PACKAGE_HOSTS.iter().map(|h| h.to_string()));
    }
    hosts
}

pub async fn environment(e: &Engine, tenant: &str, id: &str) -> AResult<Value> {
    e.documents(ENVIRONMENT, tenant, Some(id))
        .await?
        .pop()
        .map(|d| d.body)
        .ok_or_else(|| AError::not_found(format!("environment {id} not found")))
}

async fn name_taken(e: &Engine, tenant: &str, name: &str, except: &str) -> AResult<bool> {
    Ok(latest_of_each(e, ENVIRONMENT, tenant)
        .await?
        .iter()
        .any(|v| v["name"] == name && v["id"] != except && v["archived_at"].is_null()))
}

pub async fn create_environment(
    State(st): St,
    Tenant(t, _): Tenant,
    Body(body): Body<Value>,
) -> AResult<axum::Json<Value>> {
    let name = str_field(&body, "name")?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| AError::invalid("name is required"))?
        .to_string();
    if name_taken(&st.engine, &t, &name, "").await? {
        return Err(AError::conflict(format!("an environment named {name:?} exists")).no_retry());
    }
    let ts = now();
    let doc = json!({
        "type": "environment",
        "id": new_id("env"),
        "name": name,
        "description": str_field(&body, "description")?.unwrap_or(""),
        "metadata": metadata(None, body.get("metadata"))?,
        "scope": body.get("scope").cloned().unwrap_or(Value::Null),
        "config": env_config(body.get("config"))?,
        "created_at": ts, "updated_at": ts, "archived_at": null,
    });
    room_for(&st.engine, ENVIRONMENT, &t).await?;
    put_new(&st.engine, ENVIRONMENT, &t, &doc).await?;
    Ok(axum::Json(doc))
}

pub async fn get_environment(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
) -> AResult<axum::Json<Value>> {
    Ok(axum::Json(environment(&st.engine, &t, &id).await?))
}

pub async fn update_environment(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
    Body(body): Body<Value>,
) -> AResult<axum::Json<Value>> {
    environment(&st.engine, &t, &id).await?;
    let name = str_field(&body, "name")?;
    if let Some(name) = name {
        if name.is_empty() {
            return Err(AError::invalid("name must not be empty"));
        }
        if name_taken(&st.engine, &t, name, &id).await? {
            return Err(
                AError::conflict(format!("an environment named {name:?} exists")).no_retry(),
            );
        }
    }
    let description = str_field(&body, "description")?;
    let config = match body.get("config") {
        Some(c) if !c.is_null() => Some(env_config(Some(c))?),
        _ => None,
    };
    let doc = put_latest(&st.engine, ENVIRONMENT, &t, &id, |doc| {
        if let Some(name) = name {
            doc["name"] = json!(name);
        }
        if let Some(d) = description {
            doc["description"] = json!(d);
        }
        if let Some(c) = &config {
            doc["config"] = c.clone();
        }
        doc["metadata"] = metadata(doc.get("metadata"), body.get("metadata"))?;
        doc["updated_at"] = json!(now());
        Ok(true)
    })
    .await?;
    Ok(axum::Json(doc))
}

pub async fn archive_environment(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
) -> AResult<axum::Json<Value>> {
    let doc = put_latest(&st.engine, ENVIRONMENT, &t, &id, |doc| {
        if !doc["archived_at"].is_null() {
            return Ok(false);
        }
        let ts = now();
        doc["archived_at"] = json!(ts);
        doc["updated_at"] = json!(ts);
        Ok(true)
    })
    .await?;
    Ok(axum::Json(doc))
}

pub async fn delete_environment(
    State(st): St,
    Tenant(t, _): Tenant,
    Path(id): Path<String>,
) -> AResult<axum::Json<Value>> {
    if !st.engine.delete_document(ENVIRONMENT, &t, &id).await? {
        return Err(AError::not_found(format!("environment {id} not found")));
    }
    Ok(axum::Json(json!({"id": id, "type": "environment_deleted"})))
}

pub async fn list_environments(
    State(st): St,
    Tenant(t, _): Tenant,
    p: Params,
) -> AResult<axum::Json<Value>> {
    Ok(axum::Json(
        list_latest(&st.engine, ENVIRONMENT, &t, &p).await?,
    ))
}
