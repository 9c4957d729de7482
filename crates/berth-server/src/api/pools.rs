//! Warm pools (admin only): what each holds and how it has served.

use super::Json;
use crate::auth::Caller;
use crate::engine::pools::PoolStatus;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use berth_api::List;

/// The configured warm pools: ready boxes, takes, misses and recycled boxes.
#[utoipa::path(get, path = "/v1/pools", security(("bearer" = [])), responses((status = 200, body = List<PoolStatus>), (status = 403, body = berth_api::ErrorBody)))]
pub async fn list_pools(
    State(st): State<AppState>,
    c: Caller,
) -> Result<Json<List<PoolStatus>>, ApiError> {
    if !c.admin {
        return Err(ApiError::Forbidden("only admin keys see pools".into()));
    }
    Ok(Json(List {
        items: st.engine.pool_status(),
    }))
}
