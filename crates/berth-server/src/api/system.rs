//! Health, readiness, metrics, backends, the OpenAPI document and fallbacks.

use super::Json;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use berth_api::{BackendInfo, List};
use berth_sandbox::Sandbox;

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
pub async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// The store answers and a backend is enabled.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, description = "not ready", body = berth_api::ErrorBody)))]
pub async fn readyz(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    st.engine
        .store
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(format!("store: {e}")))?;
    if st.engine.backends.is_empty() {
        return Err(ApiError::Unavailable("no sandbox backend enabled".into()));
    }
    Ok(axum::Json(
        serde_json::json!({"status": "ready", "store": "ok", "backends": st.engine.backends.len()}),
    ))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics_text(State(st): State<AppState>) -> impl IntoResponse {
    let (boxes, sessions) = st.engine.live_counts();
    metrics::gauge!("berth_boxes_live").set(boxes as f64);
    metrics::gauge!("berth_sessions_live").set(sessions as f64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(),
    )
}

/// Enabled sandbox backends and what each guarantees.
#[utoipa::path(get, path = "/v1/backends", security(("bearer" = [])), responses((status = 200, body = List<BackendInfo>)))]
pub async fn backends(State(st): State<AppState>, _c: Caller) -> Json<List<BackendInfo>> {
    let mut items: Vec<BackendInfo> = st
        .engine
        .backends
        .iter()
        .map(|(name, b)| BackendInfo {
            name: name.clone(),
            default: *name == st.engine.config.default_backend,
            capabilities: serde_json::to_value(b.capabilities()).unwrap_or_default(),
        })
        .collect();
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Json(List { items })
}

pub async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::Rejected(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route".into(),
    )
}
