//! Triggers (webhook and cron) and the inbound webhook endpoint.

use super::{Json, Path};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use berth_api::{HookAccepted, List, TriggerObject, TriggerSpec};

/// Largest webhook body accepted (1 MiB).
pub const HOOK_MAX_BODY: usize = 1 << 20;

/// Time a webhook's whole body has to arrive, once its headers have.
pub const HOOK_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Create a trigger. The answer holds the webhook's secret, shown only here.
#[utoipa::path(post, path = "/v1/triggers", security(("bearer" = [])), request_body = TriggerSpec,
    responses((status = 201, body = TriggerObject), (status = 400, body = berth_api::ErrorBody), (status = 404, body = berth_api::ErrorBody), (status = 409, body = berth_api::ErrorBody)))]
pub async fn create_trigger(
    State(st): State<AppState>,
    c: Caller,
    Json(spec): Json<TriggerSpec>,
) -> Result<(StatusCode, Json<TriggerObject>), ApiError> {
    let t = st.engine.create_trigger(&c.tenant, spec).await?;
    Ok((StatusCode::CREATED, Json(t)))
}

#[utoipa::path(get, path = "/v1/triggers", security(("bearer" = [])),
    responses((status = 200, body = List<TriggerObject>)))]
pub async fn list_triggers(
    State(st): State<AppState>,
    c: Caller,
) -> Result<Json<List<TriggerObject>>, ApiError> {
    Ok(Json(List {
        items: st.engine.list_triggers(&c.tenant).await?,
    }))
}

#[utoipa::path(get, path = "/v1/triggers/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = TriggerObject), (status = 404, body = berth_api::ErrorBody)))]
pub async fn get_trigger(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<TriggerObject>, ApiError> {
    Ok(Json(st.engine.get_trigger(&c.tenant, &id).await?))
}

#[utoipa::path(delete, path = "/v1/triggers/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = berth_api::ErrorBody)))]
pub async fn delete_trigger(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.engine.delete_trigger(&c.tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An inbound webhook: no API key; `<timestamp>.<raw body>` signed with the trigger's secret
/// (`X-Berth-Timestamp: <unix seconds>`, `X-Berth-Signature-256: sha256=<hex HMAC-SHA256>`;
/// within 5 minutes of the server's clock, each signature accepted once), or the secret as a
/// bearer token. The
/// body (JSON; other text becomes `{"body": …}`) fills the trigger's prompt.
#[utoipa::path(post, path = "/v1/hooks/{id}", params(("id" = String, Path)), request_body(content = String, content_type = "application/json"),
    responses((status = 202, body = HookAccepted), (status = 401, body = berth_api::ErrorBody), (status = 404, body = berth_api::ErrorBody), (status = 408, body = berth_api::ErrorBody), (status = 413, body = berth_api::ErrorBody), (status = 429, body = berth_api::ErrorBody)))]
pub async fn hook(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<HookAccepted>), ApiError> {
    // Anyone may call this route: an unknown trigger is answered before a byte of the body is
    // read, and a body must arrive whole within HOOK_BODY_DEADLINE (a client trickling a
    // large body cannot hold the connection).
    st.engine.hook_target(&id).await?;
    let body = match tokio::time::timeout(
        HOOK_BODY_DEADLINE,
        axum::body::to_bytes(body, HOOK_MAX_BODY),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return Err(if too_large {
                ApiError::Rejected(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "webhook body too large".into(),
                )
            } else {
                ApiError::Rejected(
                    StatusCode::BAD_REQUEST,
                    "reading the webhook body failed".into(),
                )
            });
        }
        Err(_) => {
            return Err(ApiError::Rejected(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the webhook body did not arrive within {} s",
                    HOOK_BODY_DEADLINE.as_secs()
                ),
            ))
        }
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("authorization").and_then(|v| v.strip_prefix("Bearer "));
    let signature = header(crate::engine::triggers::SIGNATURE_HEADER);
    let timestamp = header(crate::engine::triggers::TIMESTAMP_HEADER);
    let accepted = st
        .engine
        .hook(&id, &body, signature, timestamp, bearer)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// `POST /v1/triggers/{id}/fire-here` (node-to-node, not in the OpenAPI document): the node
/// that fired trigger `id` placed its session's box here; start the session with the JSON
/// body as the payload. Only a node-signed request is taken (the edge checked the signature);
/// any other caller is refused (403).
pub async fn fire_here(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<berth_api::SessionObject>, ApiError> {
    if !headers.contains_key(super::forward::H_NODE) || st.engine.cluster().is_none() {
        return Err(ApiError::Forbidden(
            "only another node of the cluster may ask this".into(),
        ));
    }
    let t = st.engine.trigger_by_id(&id).await?;
    let payload: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Invalid(format!("a trigger's payload: {e}")))?;
    Ok(Json(st.engine.fire_trigger_here(&t, &payload).await?))
}
