//! The HTTP API: routes, extractors and the OpenAPI document. Handlers are thin: they check
//! the caller, call the engine, and map errors to JSON.

pub mod boxes;
mod doc_links;
pub mod forward;
pub mod keys;
pub mod nodes;
pub mod pools;
pub mod port_links;
pub mod pty;
pub mod sdk;
pub mod sessions;
pub mod system;
pub mod triggers;
pub mod usage;

use crate::error::ApiError;
use crate::AppState;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post, MethodRouter};
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

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

/// What the handlers' annotations do not carry: the document's title, the schemas no
/// operation names (event frames, WebSocket messages) and the security scheme. The operations
/// come from [`routes`].
#[derive(OpenApi)]
#[openapi(
    info(title = "berth", description = "Self-hosted sandboxes for AI agents: boxes, sessions, events."),
    components(schemas(
        berth_api::BoxSpec, berth_api::BoxObject, berth_api::SnapshotInfo, berth_api::BoxState, berth_api::Lifecycle, berth_api::Resources,
        berth_api::NetworkSpec, berth_api::ExecRequest, berth_api::ExecResponse, berth_api::BoxStats,
        berth_api::DirListing, berth_api::DirEntry, berth_api::SessionSpec, berth_api::SessionObject,
        berth_api::SessionState, berth_api::AgentSpec, berth_api::ClaudeAgent, berth_api::CommandAgent,
        berth_api::BoxRef, berth_api::Event, berth_api::BoxEvent, berth_api::SseFrame, berth_api::MessageRequest, berth_api::PermissionAnswer,
        berth_api::Accepted, berth_api::WsClientMessage, berth_api::PermissionRule, berth_api::PermissionModeRequest, berth_api::KeyCreate, berth_api::KeyObject,
        berth_api::BackendInfo, berth_api::TenantObject, berth_api::TenantUpdate, berth_api::SessionUsage, berth_api::ModelUsage, berth_api::UsageReport, berth_api::UsageGroup, berth_api::UsageTotals, berth_api::UsageGroupBy, berth_api::ErrorBody, berth_api::ErrorDetail,
        berth_api::TriggerSpec, berth_api::TriggerObject, berth_api::HookAccepted,
        berth_api::NodeObject, berth_api::NodeCapacity, berth_api::NodeState, berth_api::Placement,
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

/// Handlers of one path with their annotations, as `routes!` collects them.
type Documented = UtoipaMethodRouter<AppState>;

/// Put every operation under `tag`, the handler's module: the document groups operations so
/// (the derive did it from the module path; `routes!` does not).
fn tagged(tag: &str, (schemas, mut paths, router): Documented) -> Documented {
    for item in paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            op.tags = Some(vec![tag.to_string()]);
        }
    }
    (schemas, paths, router)
}

/// Register operations whose documented path ends in `{param}`, with that last parameter
/// matching the rest of the path (`/` included): OpenAPI has no such parameter, axum spells
/// it `{*param}`.
fn with_rest(
    mut api: OpenApiRouter<AppState>,
    param: &str,
    (schemas, paths, router): Documented,
) -> OpenApiRouter<AppState> {
    let last = format!("{{{param}}}");
    for (path, item) in paths.paths {
        let served = match path.strip_suffix(&last) {
            Some(prefix) => format!("{prefix}{{*{param}}}"),
            None => path.clone(),
        };
        api = api.route(&served, router.clone());
        let doc = api.get_openapi_mut();
        match doc.paths.paths.get_mut(&path) {
            Some(it) => it.merge_operations(item),
            None => {
                doc.paths.paths.insert(path, item);
            }
        }
        doc.components
            .get_or_insert_with(Default::default)
            .schemas
            .extend(schemas.clone());
    }
    api
}

/// A route the handlers' annotations do not declare, and why.
pub struct Undocumented {
    /// The path as axum matches it.
    pub path: &'static str,
    /// `None`: every method (a proxy).
    pub methods: Option<&'static [&'static str]>,
    pub why: &'static str,
    route: fn() -> MethodRouter<AppState>,
}

/// Every route outside the annotations. The router serves exactly the annotated operations
/// and these (the `routes` test holds both to that).
pub const UNDOCUMENTED: &[Undocumented] = &[
    Undocumented {
        path: "/v1/boxes/{id}/files",
        methods: Some(&["GET"]),
        why: "the workspace root's listing, `files/{path}` with an empty path",
        route: || get(boxes::get_root),
    },
    Undocumented {
        path: "/v1/boxes/{id}/files/",
        methods: Some(&["GET"]),
        why: "the workspace root's listing, `files/{path}` with an empty path",
        route: || get(boxes::get_root),
    },
    Undocumented {
        path: "/v1/boxes/{id}/ports/{port}",
        methods: None,
        why: "the port proxy passes any method on; doc_links documents the usual ones",
        route: || any(boxes::ports_root),
    },
    Undocumented {
        path: "/v1/boxes/{id}/ports/{port}/",
        methods: None,
        why: "the port proxy passes any method on; doc_links documents the usual ones",
        route: || any(boxes::ports_root),
    },
    Undocumented {
        path: "/v1/boxes/{id}/ports/{port}/{*path}",
        methods: None,
        why: "the port proxy passes any method on; doc_links documents the usual ones",
        route: || any(boxes::ports),
    },
    Undocumented {
        path: "/v1/port-links/{token}",
        methods: None,
        why: "a port link (port_links.rs): the port proxy under a signed token, for browsers",
        route: || any(port_links::serve_root),
    },
    Undocumented {
        path: "/v1/port-links/{token}/",
        methods: None,
        why: "a port link (port_links.rs): the port proxy under a signed token, for browsers",
        route: || any(port_links::serve_root),
    },
    Undocumented {
        path: "/v1/port-links/{token}/{*path}",
        methods: None,
        why: "a port link (port_links.rs): the port proxy under a signed token, for browsers",
        route: || any(port_links::serve),
    },
    Undocumented {
        path: "/v1/triggers/{id}/fire-here",
        methods: Some(&["POST"]),
        why: "node-to-node (engine/placement.rs): the node firing a trigger has the node it placed the box on start the session; node-signed callers only",
        route: || post(triggers::fire_here),
    },
    Undocumented {
        path: "/openapi.json",
        methods: Some(&["GET"]),
        why: "the document itself",
        route: || get(system::openapi),
    },
    Undocumented {
        path: "/ui",
        methods: Some(&["GET"]),
        why: "the web console's shell (berth-console), not an API",
        route: || get(berth_console::index),
    },
    Undocumented {
        path: "/ui/",
        methods: Some(&["GET"]),
        why: "the web console's shell (berth-console), not an API",
        route: || get(berth_console::index),
    },
    Undocumented {
        path: "/ui/{*file}",
        methods: Some(&["GET"]),
        why: "the web console's embedded files (berth-console), not an API",
        route: || get(berth_console::file),
    },
];

/// The API, declared once: each annotated handler is both served and documented from its
/// `#[utoipa::path]`, so the router and the document cannot disagree.
pub fn routes() -> OpenApiRouter<AppState> {
    let (hook_schemas, hook_paths, hook) = tagged("triggers", routes!(triggers::hook));
    // Webhooks come from outside, unauthenticated until their signature is checked: a
    // smaller body limit than the API's.
    let hook = hook
        .layer(DefaultBodyLimit::max(triggers::HOOK_MAX_BODY))
        .layer(axum::middleware::from_fn(|req, next| {
            refuse_oversized(req, next, triggers::HOOK_MAX_BODY)
        }));
    let api = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(tagged(
            "boxes",
            routes!(boxes::create_box, boxes::list_boxes),
        ))
        .routes(tagged("boxes", routes!(boxes::get_box, boxes::delete_box)))
        .routes(tagged("boxes", routes!(boxes::exec)))
        .routes(tagged("boxes", routes!(boxes::park_box)))
        .routes(tagged("boxes", routes!(boxes::artifact)))
        .routes(tagged("boxes", routes!(boxes::stats)))
        .routes(tagged("boxes", routes!(boxes::box_events)))
        .routes(tagged("boxes", routes!(pty::pty)))
        .routes(tagged("boxes", routes!(port_links::create_port_link)))
        .routes(tagged(
            "triggers",
            routes!(triggers::create_trigger, triggers::list_triggers),
        ))
        .routes(tagged(
            "triggers",
            routes!(triggers::get_trigger, triggers::delete_trigger),
        ))
        .routes((hook_schemas, hook_paths, hook))
        .routes(tagged(
            "sessions",
            routes!(sessions::create_session, sessions::list_sessions),
        ))
        .routes(tagged(
            "sessions",
            routes!(sessions::get_session, sessions::delete_session),
        ))
        .routes(tagged("sessions", routes!(sessions::post_message)))
        .routes(tagged("sessions", routes!(sessions::interrupt)))
        .routes(tagged("sessions", routes!(sessions::answer_permission)))
        .routes(tagged("sessions", routes!(sessions::events)))
        .routes(tagged("sessions", routes!(sessions::ws)))
        .routes(tagged("sessions", routes!(sdk::sdk_ws)))
        .routes(tagged("sessions", routes!(sessions::usage)))
        .routes(tagged("sessions", routes!(sessions::restart)))
        .routes(tagged("sessions", routes!(sessions::permission_mode)))
        .routes(tagged("usage", routes!(usage::report)))
        .routes(tagged("keys", routes!(keys::create_key, keys::list_keys)))
        .routes(tagged("keys", routes!(keys::delete_key)))
        .routes(tagged("keys", routes!(keys::get_tenant, keys::put_tenant)))
        .routes(tagged("pools", routes!(pools::list_pools)))
        .routes(tagged("nodes", routes!(nodes::list_nodes)))
        .routes(tagged("nodes", routes!(nodes::drain)))
        .routes(tagged("nodes", routes!(nodes::undrain)))
        .routes(tagged("system", routes!(system::backends)))
        .routes(tagged("system", routes!(system::healthz)))
        .routes(tagged("system", routes!(system::readyz)))
        .routes(tagged("system", routes!(system::metrics_text)));
    let api = with_rest(
        api,
        "path",
        tagged(
            "boxes",
            routes!(boxes::get_file, boxes::put_file, boxes::delete_file),
        ),
    );
    UNDOCUMENTED
        .iter()
        .fold(api, |api, u| api.route(u.path, (u.route)()))
}

pub fn openapi_json() -> String {
    let mut doc = serde_json::to_value(routes().into_openapi()).unwrap_or_default();
    doc_links::augment(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
}

pub fn router(state: AppState, max_body: usize) -> Router {
    let (router, _doc) = routes().split_for_parts();
    router
        // Anthropic's Managed Agents API: Anthropic's paths and envelope, documented by Anthropic
        // and tested with its SDKs (tests/managed_agents.rs), so not in berth's own document.
        .nest("/anthropic", crate::anthropic::router())
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        // A cluster: requests for another node's box or session go there (see `forward`).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward::edge,
        ))
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
