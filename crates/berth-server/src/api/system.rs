//! Health, readiness, metrics, backends, the OpenAPI document and fallbacks.

use super::Json;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use berth_api::{BackendInfo, List};

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
pub async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready to serve: the store takes a write, every enabled backend can create boxes, and the
/// model upstream accepts connections. Each check has 2 s.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, description = "not ready: the message names the failed checks", body = berth_api::ErrorBody)))]
pub async fn readyz(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let limit = std::time::Duration::from_secs(2);
    // The stores' own errors name users, hosts, buckets and request URLs: they go to the log,
    // and this unauthenticated answer says only which check failed.
    let timed =
        |what: &'static str, r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(check = what, error = %e, "readiness check failed");
                Err(format!("{what}: failed (the server log has the cause)"))
            }
            Err(_) => Err(format!("{what}: no answer within {limit:?}")),
        };
    let engine = &st.engine;
    let store = async {
        timed(
            "store",
            tokio::time::timeout(limit, engine.check_store()).await,
        )
    };
    // The snapshot store answers too (a directory, or S3 off the machine).
    let snapshots = async {
        timed(
            "snapshot store",
            tokio::time::timeout(limit, engine.snapshots_ping()).await,
        )
    };
    let backends = async {
        let mut failed = engine.check_backends(limit).await;
        if engine.backend_infos().is_empty() {
            failed.push("no sandbox backend enabled".into());
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    };
    let upstream = async {
        engine
            .check_upstream(limit)
            .await
            .map_err(|e| format!("upstream: {e}"))
    };
    let (a, b, c, d) = tokio::join!(store, backends, upstream, snapshots);
    let failed: Vec<String> = [a, b, c, d].into_iter().filter_map(Result::err).collect();
    if !failed.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "not ready: {}",
            failed.join("; ")
        )));
    }
    Ok(axum::Json(serde_json::json!({
        "status": "ready",
        "checks": {"store": "ok", "snapshots": "ok", "backends": engine.backend_infos().len(), "upstream": "ok"}
    })))
}

/// Prometheus metrics, for admin keys only: they name tenants and their spend.
#[utoipa::path(get, path = "/metrics", security(("bearer" = [])), responses((status = 200, description = "Prometheus text format", content_type = "text/plain"),
    (status = 401, body = berth_api::ErrorBody), (status = 403, body = berth_api::ErrorBody)))]
pub async fn metrics_text(
    State(st): State<AppState>,
    c: Caller,
) -> Result<impl IntoResponse, ApiError> {
    if !c.admin {
        return Err(ApiError::Forbidden(
            "metrics name every tenant: an admin key reads them".into(),
        ));
    }
    crate::observe::state_gauges(&st.engine);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(),
    ))
}

/// Enabled sandbox backends and what each guarantees.
#[utoipa::path(get, path = "/v1/backends", security(("bearer" = [])), responses((status = 200, body = List<BackendInfo>)))]
pub async fn backends(State(st): State<AppState>, _c: Caller) -> Json<List<BackendInfo>> {
    let items = st.engine.backend_infos();
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
