//! API keys (admin only).

use super::{Json, Path};
use crate::auth::{hash_key, new_id, new_key, now, valid_tenant, Caller};
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use berth_api::{KeyCreate, KeyObject, List, TenantObject, TenantUpdate};

fn admin(c: &Caller) -> Result<(), ApiError> {
    if c.admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden("only admin keys manage keys".into()))
    }
}

/// Create an API key for a tenant (the tenant is created if new). The key is shown only here.
#[utoipa::path(post, path = "/v1/keys", security(("bearer" = [])), request_body = KeyCreate,
    responses((status = 201, body = KeyObject), (status = 400, body = berth_api::ErrorBody), (status = 403, body = berth_api::ErrorBody)))]
pub async fn create_key(
    State(st): State<AppState>,
    c: Caller,
    Json(req): Json<KeyCreate>,
) -> Result<(StatusCode, Json<KeyObject>), ApiError> {
    admin(&c)?;
    if !valid_tenant(&req.tenant) {
        return Err(ApiError::Invalid(
            "tenant must be 1-64 characters of [A-Za-z0-9._-]".into(),
        ));
    }
    let key = new_key();
    let obj = KeyObject {
        id: new_id("key"),
        key: None,
        tenant: req.tenant,
        admin: req.admin,
        created_at: now(),
    };
    st.engine.insert_key(&obj, &hash_key(&key)).await?;
    Ok((
        StatusCode::CREATED,
        Json(KeyObject {
            key: Some(key),
            ..obj
        }),
    ))
}

/// List keys (without their secrets).
#[utoipa::path(get, path = "/v1/keys", security(("bearer" = [])), responses((status = 200, body = List<KeyObject>), (status = 403, body = berth_api::ErrorBody)))]
pub async fn list_keys(
    State(st): State<AppState>,
    c: Caller,
) -> Result<Json<List<KeyObject>>, ApiError> {
    admin(&c)?;
    Ok(Json(List {
        items: st.engine.list_keys().await?,
    }))
}

/// Revoke a key: its requests are refused from now on, and the event streams, WebSockets and
/// proxied connections it opened are closed.
#[utoipa::path(delete, path = "/v1/keys/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = berth_api::ErrorBody)))]
pub async fn delete_key(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin(&c)?;
    if id == c.key_id {
        return Err(ApiError::Conflict("a key cannot revoke itself".into()));
    }
    if st.engine.delete_key(&id).await? {
        st.engine.revoke_key(&id);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("key", &id))
    }
}

/// A tenant's budget and this month's spend (admins, or the tenant's own keys).
#[utoipa::path(get, path = "/v1/tenants/{name}", security(("bearer" = [])), params(("name" = String, Path)),
    responses((status = 200, body = TenantObject), (status = 404, body = berth_api::ErrorBody)))]
pub async fn get_tenant(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Json<TenantObject>, ApiError> {
    if !c.admin && c.tenant != name {
        return Err(ApiError::not_found("tenant", &name));
    }
    Ok(Json(st.engine.tenant(&name).await?))
}

/// Set or clear a tenant's monthly budget (admin only).
#[utoipa::path(put, path = "/v1/tenants/{name}", security(("bearer" = [])), params(("name" = String, Path)), request_body = TenantUpdate,
    responses((status = 200, body = TenantObject), (status = 400, body = berth_api::ErrorBody), (status = 403, body = berth_api::ErrorBody)))]
pub async fn put_tenant(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    Json(u): Json<TenantUpdate>,
) -> Result<Json<TenantObject>, ApiError> {
    admin(&c)?;
    if !valid_tenant(&name) {
        return Err(ApiError::Invalid(
            "tenant must be 1-64 characters of [A-Za-z0-9._-]".into(),
        ));
    }
    Ok(Json(
        st.engine
            .set_tenant_budget(&name, u.budget_usd_month)
            .await?,
    ))
}
