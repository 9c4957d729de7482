//! Cluster nodes (admin only): list them, drain and undrain one.

use super::{Json, Path};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use berth_api::{List, NodeObject};

fn admin(c: &Caller) -> Result<(), ApiError> {
    if c.admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden("only admin keys manage nodes".into()))
    }
}

/// The cluster's nodes (a server on SQLite is a one-node cluster): state, lease, backends,
/// capacity and load.
#[utoipa::path(get, path = "/v1/nodes", security(("bearer" = [])), responses((status = 200, body = List<NodeObject>), (status = 403, body = berth_api::ErrorBody)))]
pub async fn list_nodes(
    State(st): State<AppState>,
    c: Caller,
) -> Result<Json<List<NodeObject>>, ApiError> {
    admin(&c)?;
    Ok(Json(List {
        items: st.engine.list_nodes().await?,
    }))
}

/// Drain a node: no new boxes are placed on it and it parks its hybrid boxes (restored on
/// their next use, wherever that is served); its other boxes run until they end.
#[utoipa::path(post, path = "/v1/nodes/{name}/drain", security(("bearer" = [])), params(("name" = String, Path)),
    responses((status = 200, body = NodeObject), (status = 403, body = berth_api::ErrorBody), (status = 404, body = berth_api::ErrorBody)))]
pub async fn drain(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeObject>, ApiError> {
    admin(&c)?;
    Ok(Json(st.engine.set_node_draining(&name, true).await?))
}

/// Undo a drain: boxes are placed on the node again.
#[utoipa::path(post, path = "/v1/nodes/{name}/undrain", security(("bearer" = [])), params(("name" = String, Path)),
    responses((status = 200, body = NodeObject), (status = 403, body = berth_api::ErrorBody), (status = 404, body = berth_api::ErrorBody)))]
pub async fn undrain(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeObject>, ApiError> {
    admin(&c)?;
    Ok(Json(st.engine.set_node_draining(&name, false).await?))
}
