//! The HTTP API: routes, extractors and the OpenAPI document. Handlers are thin: they check
//! the caller, call the engine, and map errors to JSON.

pub mod boxes;
mod doc_links;
pub mod keys;
pub mod sdk;
pub mod sessions;
pub mod system;
pub mod triggers;
pub mod usage;

use crate::error::ApiError;
use crate::AppState;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use axum::Router;
use utoipa::OpenApi;

/// JSON body extractor whose rejections are API errors.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

#[derive(OpenApi)]
#[openapi(
    info(title = "berth", description = "Self-hosted sandboxes for AI agents: boxes, sessions, events."),
    paths(
        boxes::create_box, boxes::list_boxes, boxes::get_box, boxes::delete_box, boxes::park_box, boxes::artifact, boxes::exec,
        boxes::get_file, boxes::put_file, boxes::delete_file, boxes::stats, boxes::box_events,
        sessions::create_session, sessions::list_sessions, sessions::get_session, sessions::delete_session,
        sessions::post_message, sessions::interrupt, sessions::answer_permission, sessions::events, sessions::ws, sessions::usage, sessions::restart, sessions::permission_mode, sdk::sdk_ws,
        keys::create_key, keys::list_keys, keys::delete_key, keys::get_tenant, keys::put_tenant,
        triggers::create_trigger, triggers::list_triggers, triggers::get_trigger, triggers::delete_trigger, triggers::hook,
        usage::report, system::backends, system::healthz, system::readyz, system::metrics_text,
    ),
    components(schemas(
        berth_api::BoxSpec, berth_api::BoxObject, berth_api::SnapshotInfo, berth_api::BoxState, berth_api::Lifecycle, berth_api::Resources,
        berth_api::NetworkSpec, berth_api::ExecRequest, berth_api::ExecResponse, berth_api::BoxStats,
        berth_api::DirListing, berth_api::DirEntry, berth_api::SessionSpec, berth_api::SessionObject,
        berth_api::SessionState, berth_api::AgentSpec, berth_api::ClaudeAgent, berth_api::CommandAgent,
        berth_api::BoxRef, berth_api::Event, berth_api::BoxEvent, berth_api::SseFrame, berth_api::MessageRequest, berth_api::PermissionAnswer,
        berth_api::Accepted, berth_api::WsClientMessage, berth_api::PermissionRule, berth_api::PermissionModeRequest, berth_api::KeyCreate, berth_api::KeyObject,
        berth_api::BackendInfo, berth_api::TenantObject, berth_api::TenantUpdate, berth_api::SessionUsage, berth_api::ModelUsage, berth_api::UsageReport, berth_api::UsageGroup, berth_api::UsageTotals, berth_api::UsageGroupBy, berth_api::ErrorBody, berth_api::ErrorDetail,
        berth_api::TriggerSpec, berth_api::TriggerObject, berth_api::HookAccepted,
    )),
    modifiers(&SecurityAddon),
)]
pub struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn openapi_json() -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    doc_links::augment(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
}

pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/boxes", post(boxes::create_box).get(boxes::list_boxes))
        .route(
            "/v1/boxes/{id}",
            get(boxes::get_box).delete(boxes::delete_box),
        )
        .route("/v1/boxes/{id}/exec", post(boxes::exec))
        .route("/v1/boxes/{id}/park", post(boxes::park_box))
        .route("/v1/boxes/{id}/artifact", get(boxes::artifact))
        .route(
            "/v1/triggers",
            post(triggers::create_trigger).get(triggers::list_triggers),
        )
        .route(
            "/v1/triggers/{id}",
            get(triggers::get_trigger).delete(triggers::delete_trigger),
        )
        // Webhooks come from outside, unauthenticated until their signature is checked: a
        // smaller body limit than the API's.
        .route(
            "/v1/hooks/{id}",
            post(triggers::hook)
                .layer(DefaultBodyLimit::max(triggers::HOOK_MAX_BODY))
                .layer(axum::middleware::from_fn(|req, next| {
                    refuse_oversized(req, next, triggers::HOOK_MAX_BODY)
                })),
        )
        .route("/v1/boxes/{id}/stats", get(boxes::stats))
        .route("/v1/boxes/{id}/events", get(boxes::box_events))
        .route("/v1/boxes/{id}/files", get(boxes::get_root))
        .route("/v1/boxes/{id}/files/", get(boxes::get_root))
        .route(
            "/v1/boxes/{id}/files/{*path}",
            get(boxes::get_file)
                .put(boxes::put_file)
                .delete(boxes::delete_file),
        )
        .route("/v1/boxes/{id}/ports/{port}", any(boxes::ports_root))
        .route("/v1/boxes/{id}/ports/{port}/", any(boxes::ports_root))
        .route("/v1/boxes/{id}/ports/{port}/{*rest}", any(boxes::ports))
        .route(
            "/v1/sessions",
            post(sessions::create_session).get(sessions::list_sessions),
        )
        .route(
            "/v1/sessions/{id}",
            get(sessions::get_session).delete(sessions::delete_session),
        )
        .route("/v1/sessions/{id}/messages", post(sessions::post_message))
        .route("/v1/sessions/{id}/interrupt", post(sessions::interrupt))
        .route(
            "/v1/sessions/{id}/permissions/{request_id}",
            post(sessions::answer_permission),
        )
        .route("/v1/sessions/{id}/events", get(sessions::events))
        .route("/v1/sessions/{id}/ws", get(sessions::ws))
        .route("/v1/sessions/{id}/sdk", get(sdk::sdk_ws))
        .route("/v1/sessions/{id}/usage", get(sessions::usage))
        .route("/v1/usage", get(usage::report))
        .route("/v1/sessions/{id}/restart", post(sessions::restart))
        .route(
            "/v1/sessions/{id}/permission-mode",
            post(sessions::permission_mode),
        )
        .route("/v1/keys", post(keys::create_key).get(keys::list_keys))
        .route("/v1/keys/{id}", axum::routing::delete(keys::delete_key))
        .route(
            "/v1/tenants/{name}",
            get(keys::get_tenant).put(keys::put_tenant),
        )
        .route("/v1/backends", get(system::backends))
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics_text))
        .route("/openapi.json", get(system::openapi))
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(move |req, next| {
            refuse_oversized(req, next, max_body)
        }))
        .with_state(state)
}

/// How much of a refused body is read (and dropped) before the refusal is sent: a client
/// still writing its body would otherwise have its connection reset under it (unread data at
/// close) and never see the 413. Larger bodies may still be cut off.
const DRAIN_REFUSED_BYTES: usize = 16 << 20;

/// Refuse a body whose declared length is over the limit without keeping any of it (the body
/// extractors enforce the same limit on bodies without a length).
async fn refuse_oversized(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    max: usize,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        if declared.is_some_and(|n| n <= DRAIN_REFUSED_BYTES as u64) {
            use futures::StreamExt;
            let mut body = req.into_body().into_data_stream();
            let drain = async { while let Some(Ok(_)) = body.next().await {} };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
        }
        return ApiError::Rejected(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {max} bytes"),
        )
        .into_response();
    }
    next.run(req).await
}
