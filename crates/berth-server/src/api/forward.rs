//! The cluster at the API edge: any node answers any request.
//!
//! - A request on a box or session another node holds (`/v1/boxes/{id}/…`: exec, files,
//!   ports, WebSocket and other upgrades, PTY, park, delete; `/v1/sessions/{id}/…`: messages,
//!   interrupts, permission answers, restarts, the WebSocket and SDK sockets) is passed on raw
//!   to the holder's `advertise_url`, upgrades included (the two upgraded streams are spliced).
//!   Reads of records, events (SSE) and usage are served here from the shared store.
//! - `POST /v1/boxes` and `POST /v1/sessions` with a new box are placed
//!   ([`crate::engine::nodes::Cluster::place`]) and passed on when another node is chosen; a
//!   session in an existing box goes to that box's node.
//!
//! Trust: the client's own credentials travel unchanged and the receiving node checks them
//! against the shared store, as for any request. The forwarding node adds `x-berth-forwarded-*`
//! headers: its name, a timestamp and an HMAC-SHA256 with `cluster_secret` over node,
//! timestamp, method and path. A request carrying them is served where it lands and never
//! forwarded again (no loops); one whose signature does not verify (wrong secret, more than
//! a minute off, altered path) is refused with 401. The headers grant nothing else: a client
//! cannot use them to reach what its key cannot.

use crate::engine::nodes::{wall_ms, Cluster, Placed};
use crate::error::ApiError;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::{Arc, OnceLock};

pub const H_NODE: &str = "x-berth-forwarded-by";
pub const H_TS: &str = "x-berth-forwarded-at";
pub const H_SIG: &str = "x-berth-forwarded-sig";

/// How far a forwarded request's timestamp may be from this node's clock.
const WINDOW_MS: i64 = 60_000;

/// Largest create body read here to place it (the API's own limit applies where it is served).
const PLACE_BODY_MAX: usize = 1 << 20;

/// The signature of a forwarded request.
pub fn sign(secret: &str, node: &str, ts_ms: i64, method: &str, target: &str) -> String {
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(format!("{node}\n{ts_ms}\n{method}\n{target}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Whether a request claiming to be forwarded was signed with `secret`.
pub fn verify(
    secret: Option<&str>,
    headers: &HeaderMap,
    method: &str,
    target: &str,
    now_ms: i64,
) -> Result<(), &'static str> {
    let secret = secret.ok_or("this node has no cluster_secret")?;
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let (Some(node), Some(ts), Some(sig)) = (get(H_NODE), get(H_TS), get(H_SIG)) else {
        return Err("incomplete node signature");
    };
    let ts: i64 = ts.parse().map_err(|_| "bad node timestamp")?;
    if (now_ms - ts).abs() > WINDOW_MS {
        return Err("node timestamp out of window");
    }
    let want = sign(secret, node, ts, method, target);
    let given = hex::decode(sig).map_err(|_| "bad node signature")?;
    let want = hex::decode(want).map_err(|_| "bad node signature")?;
    if berth_api::secret::digest_eq(&given, &want) {
        Ok(())
    } else {
        Err("bad node signature")
    }
}

/// What a request is, for the cluster.
#[derive(Debug, PartialEq, Eq)]
enum Kind<'a> {
    /// Served here.
    Local,
    /// Served by the node holding this box.
    Box(&'a str),
    /// Served by the node holding this session's box.
    Session(&'a str),
    /// A new box (`POST /v1/boxes`): placed.
    CreateBox,
    /// A new session (`POST /v1/sessions`): placed, or sent to its existing box's node.
    CreateSession,
}

fn classify<'a>(method: &axum::http::Method, path: &'a str) -> Kind<'a> {
    let get = method == axum::http::Method::GET;
    if method == axum::http::Method::POST && path == "/v1/boxes" {
        return Kind::CreateBox;
    }
    if method == axum::http::Method::POST && path == "/v1/sessions" {
        return Kind::CreateSession;
    }
    let (kind, rest) = if let Some(r) = path.strip_prefix("/v1/boxes/") {
        ("box", r)
    } else if let Some(r) = path.strip_prefix("/v1/sessions/") {
        ("session", r)
    } else {
        return Kind::Local;
    };
    let (id, sub) = match rest.split_once('/') {
        Some((id, sub)) => (id, sub),
        None => (rest, ""),
    };
    if id.is_empty() {
        return Kind::Local;
    }
    // Reads of records, logs and usage come from the shared store, wherever asked.
    let read = get
        && match kind {
            "box" => matches!(sub, "" | "events" | "artifact"),
            _ => matches!(sub, "" | "events" | "usage"),
        };
    match (read, kind) {
        (true, _) => Kind::Local,
        (false, "box") => Kind::Box(id),
        (false, _) => Kind::Session(id),
    }
}

/// The middleware: serve here, or pass on to the node that must serve.
pub async fn edge(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cluster) = st.engine.cluster().cloned() else {
        return next.run(req).await;
    };
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let claims_forwarded = [H_NODE, H_TS, H_SIG]
        .iter()
        .any(|h| req.headers().contains_key(*h));
    if claims_forwarded {
        return match verify(
            cluster.cfg.secret.as_deref(),
            req.headers(),
            req.method().as_str(),
            &target,
            wall_ms(),
        ) {
            Ok(()) => next.run(req).await,
            Err(why) => {
                metrics::counter!("berth_forwards_refused_total").increment(1);
                ApiError::Rejected(StatusCode::UNAUTHORIZED, why.into()).into_response()
            }
        };
    }
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/anthropic/v1/sessions") {
        return managed(&st, &cluster, req, next, rest).await;
    }
    let owner = match classify(req.method(), &path) {
        Kind::Local => return next.run(req).await,
        Kind::Box(id) => st.engine.box_owner_url(id).await,
        Kind::Session(id) => st.engine.session_owner_url(id).await,
        Kind::CreateBox | Kind::CreateSession => {
            return place(&st, &cluster, req, next, &path).await;
        }
    };
    match owner {
        Ok(None) => next.run(req).await,
        Ok(Some(url)) => forward(&cluster, &url, req).await,
        Err(why) => ApiError::Unavailable(why).into_response(),
    }
}

/// Place a create: read its (small) body, choose the node, serve or pass on.
async fn place(
    st: &AppState,
    cluster: &Arc<Cluster>,
    req: Request,
    next: Next,
    path: &str,
) -> Response {
    if cluster.cfg.secret.is_none() {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, PLACE_BODY_MAX).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::Rejected(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a create's body is at most {PLACE_BODY_MAX} bytes"),
            )
            .into_response()
        }
    };
    let started = std::time::Instant::now();
    // A body that does not parse is answered here (the handler's own 400).
    let spec: Option<berth_api::BoxSpec> = if path == "/v1/boxes" {
        serde_json::from_slice::<berth_api::BoxSpec>(&bytes).ok()
    } else {
        match serde_json::from_slice::<berth_api::SessionSpec>(&bytes) {
            Ok(s) if s.pool.is_some() => None,
            Ok(s) => match s.box_ref {
                berth_api::BoxRef::Id(id) => {
                    let req = Request::from_parts(parts, Body::from(bytes));
                    return match st.engine.box_owner_url(&id).await {
                        Ok(None) => next.run(req).await,
                        Ok(Some(url)) => forward(cluster, &url, req).await,
                        Err(why) => ApiError::Unavailable(why).into_response(),
                    };
                }
                berth_api::BoxRef::Spec(spec) => Some(*spec),
            },
            Err(_) => None,
        }
    };
    let chosen = match &spec {
        None => Ok(Placed::here()),
        Some(spec) => {
            let mark = cluster.placement_mark();
            let (tenant, tenant_boxes) =
                match spec.placement.as_ref().and_then(|p| p.spread_by.as_ref()) {
                    Some(_) => tenant_boxes(st, &mut parts).await,
                    None => Default::default(),
                };
            cluster.place(
                tenant.as_deref(),
                crate::engine::placement::Ask {
                    backend: spec.backend.as_deref(),
                    want: &spec.resources,
                    placement: spec.placement.as_ref(),
                },
                &tenant_boxes,
                mark,
            )
        }
    };
    metrics::histogram!("berth_placement_seconds").record(started.elapsed().as_secs_f64());
    if let Err(why) = &chosen {
        // Said to a caller the handler would serve; anyone else gets the handler's 401.
        use axum::extract::FromRequestParts;
        if crate::auth::Caller::from_request_parts(&mut parts, st)
            .await
            .is_ok()
        {
            return ApiError::Conflict(why.to_string()).into_response();
        }
    }
    let req = Request::from_parts(parts, Body::from(bytes));
    match chosen {
        // The placement stays in flight until the create answered (`placed` dropped after).
        Ok(placed) => match placed.url.as_deref() {
            Some(url) => forward(cluster, url, req).await,
            None => next.run(req).await,
        },
        Err(_) => next.run(req).await,
    }
}

/// The Managed Agents API's sessions (`/anthropic/v1/sessions…`; `rest` is what follows): a
/// new one is placed like a box (its environment's `config.placement`, the box the handler
/// makes: default resources); a write to one (events, update, archive, delete) goes to its
/// box's node; reads are served here from the shared store. The tenant comes from the key
/// (`x-api-key` or bearer); without a known key the handler answers, here.
async fn managed(
    st: &AppState,
    cluster: &Arc<Cluster>,
    req: Request,
    next: Next,
    rest: &str,
) -> Response {
    let (post, get) = (
        req.method() == axum::http::Method::POST,
        req.method() == axum::http::Method::GET,
    );
    let id = rest
        .strip_prefix('/')
        .map(|r| r.split('/').next().unwrap_or_default().to_string());
    if cluster.cfg.secret.is_none() || get || (id.is_none() && !post) {
        return next.run(req).await;
    }
    let from = crate::auth::KeySources {
        x_api_key: true,
        ..Default::default()
    };
    let tenant = match crate::auth::key_from_headers(&st.engine, req.headers(), from).await {
        Ok(Some(k)) => k.tenant,
        _ => return next.run(req).await,
    };
    let owner = match id {
        Some(id) if !id.is_empty() => {
            let doc = st
                .engine
                .documents("session", &tenant, Some(&id))
                .await
                .ok()
                .and_then(|mut d| d.pop());
            match doc
                .as_ref()
                .and_then(|d| d.body["berth"]["box_id"].as_str())
            {
                Some(box_id) => st.engine.box_owner_url(box_id).await,
                None => Ok(None),
            }
        }
        Some(_) => Ok(None),
        None => {
            let (parts, body) = req.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, PLACE_BODY_MAX).await else {
                return ApiError::Rejected(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a create's body is at most {PLACE_BODY_MAX} bytes"),
                )
                .into_response();
            };
            let started = std::time::Instant::now();
            let placement = managed_placement(st, &tenant, &bytes).await;
            let mark = cluster.placement_mark();
            let counts = match placement.as_ref().and_then(|p| p.spread_by.as_ref()) {
                Some(_) => st.engine.tenant_boxes_per_node(&tenant).await,
                None => Default::default(),
            };
            let want = berth_api::Resources::default();
            let chosen = cluster.place(
                Some(&tenant),
                crate::engine::placement::Ask {
                    backend: None,
                    want: &want,
                    placement: placement.as_ref(),
                },
                &counts,
                mark,
            );
            metrics::histogram!("berth_placement_seconds").record(started.elapsed().as_secs_f64());
            let req = Request::from_parts(parts, Body::from(bytes));
            return match chosen {
                // In flight until the create answered, as in `place`.
                Ok(placed) => match placed.url.as_deref() {
                    Some(url) => forward(cluster, url, req).await,
                    None => next.run(req).await,
                },
                // No node matches: the handler here refuses it (its box's placement check),
                // in the Managed Agents API's own error shape.
                Err(_) => next.run(req).await,
            };
        }
    };
    match owner {
        Ok(None) => next.run(req).await,
        Ok(Some(url)) => forward(cluster, &url, req).await,
        Err(why) => ApiError::Unavailable(why).into_response(),
    }
}

/// The `config.placement` of the environment a Managed Agents session create names.
async fn managed_placement(
    st: &AppState,
    tenant: &str,
    body: &[u8],
) -> Option<berth_api::Placement> {
    let body: serde_json::Value = serde_json::from_slice(body).ok()?;
    let env_id = body["environment_id"].as_str()?;
    let env = st
        .engine
        .documents("environment", tenant, Some(env_id))
        .await
        .ok()?
        .pop()?;
    serde_json::from_value(env.body["config"]["placement"].clone()).ok()
}

/// The caller's tenant and its live boxes per node, for `spread_by` (the caller is
/// authenticated as the handler would; an unknown key counts nothing, and the handler then
/// answers 401).
async fn tenant_boxes(
    st: &AppState,
    parts: &mut axum::http::request::Parts,
) -> (Option<String>, std::collections::HashMap<String, u64>) {
    use axum::extract::FromRequestParts;
    match crate::auth::Caller::from_request_parts(parts, st).await {
        Ok(caller) => {
            let counts = st.engine.tenant_boxes_per_node(&caller.tenant).await;
            (Some(caller.tenant), counts)
        }
        Err(_) => Default::default(),
    }
}

/// A node-to-node call of this node's own (not a client's request passed on): `POST` of a
/// JSON `body` to `path` on the node at `base`, signed; its status and body (at most 1 MiB).
pub(crate) async fn call_node(
    cluster: &Cluster,
    base: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, bytes::Bytes), String> {
    let secret = cluster
        .cfg
        .secret
        .as_deref()
        .ok_or("this node has no cluster_secret")?;
    let ts = wall_ms();
    let sig = sign(secret, cluster.name(), ts, "POST", path);
    let req = axum::http::Request::builder()
        .method("POST")
        .uri(format!("{base}{path}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(H_NODE, cluster.name())
        .header(H_TS, ts.to_string())
        .header(H_SIG, sig)
        .body(Body::from(body))
        .map_err(|e| format!("a call to node {base}: {e}"))?;
    metrics::counter!("berth_forwarded_requests_total").increment(1);
    let resp = client()
        .request(req)
        .await
        .map_err(|e| format!("node {base} did not answer: {e}"))?;
    let status = resp.status();
    let bytes = axum::body::to_bytes(Body::new(resp.into_body()), PLACE_BODY_MAX)
        .await
        .map_err(|e| format!("reading node {base}'s answer: {e}"))?;
    Ok((status, bytes))
}

fn client() -> &'static Client<HttpConnector, Body> {
    static C: OnceLock<Client<HttpConnector, Body>> = OnceLock::new();
    C.get_or_init(|| {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(std::time::Duration::from_secs(3)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build(conn)
    })
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
        && h.contains_key(header::UPGRADE)
}

/// Headers that describe one hop, not the request (an upgrade keeps its two).
fn strip_hop(h: &mut HeaderMap, upgrade: bool) {
    for name in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(name);
    }
    if !upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// Pass `req` on to the node at `base`, signed, and its answer back; an upgrade is spliced.
pub(crate) async fn forward(cluster: &Cluster, base: &str, mut req: Request) -> Response {
    let upgrade = is_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = match format!("{base}{target}").parse::<Uri>() {
        Ok(u) => u,
        Err(_) => {
            return ApiError::Internal(format!("node URL {base:?} is not a URL")).into_response()
        }
    };
    parts.version = axum::http::Version::HTTP_11;
    parts.extensions = Default::default();
    strip_hop(&mut parts.headers, upgrade);
    let Some(secret) = cluster.cfg.secret.as_deref() else {
        return ApiError::Unavailable("this node has no cluster_secret".into()).into_response();
    };
    let ts = wall_ms();
    let sig = sign(secret, cluster.name(), ts, parts.method.as_str(), &target);
    for (h, v) in [
        (H_NODE, cluster.name().to_string()),
        (H_TS, ts.to_string()),
        (H_SIG, sig),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.insert(h, v);
        }
    }
    metrics::counter!("berth_forwarded_requests_total").increment(1);
    let mut resp = match client().request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(node_url = %base, error = %e, "forwarding a request");
            return ApiError::Unavailable(format!(
                "the node holding this resource did not answer ({base})"
            ))
            .into_response();
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_side {
            let node_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(a), Ok(b)) = tokio::join!(client_side, node_side) else {
                    return;
                };
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
            });
        }
    }
    let (mut parts, body) = resp.into_parts();
    let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop(&mut parts.headers, upgraded);
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn reads_are_local_the_rest_goes_to_the_holder() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(classify(&get, "/v1/boxes/b1"), Kind::Local);
        assert_eq!(classify(&get, "/v1/boxes/b1/events"), Kind::Local);
        assert_eq!(classify(&get, "/v1/sessions/s1/events"), Kind::Local);
        assert_eq!(classify(&get, "/v1/sessions/s1/usage"), Kind::Local);
        assert_eq!(classify(&get, "/v1/boxes"), Kind::Local);
        assert_eq!(classify(&get, "/v1/nodes"), Kind::Local);
        assert_eq!(classify(&post, "/v1/boxes/b1/exec"), Kind::Box("b1"));
        assert_eq!(classify(&get, "/v1/boxes/b1/files/a/b"), Kind::Box("b1"));
        assert_eq!(classify(&get, "/v1/boxes/b1/ports/80/x"), Kind::Box("b1"));
        assert_eq!(classify(&Method::DELETE, "/v1/boxes/b1"), Kind::Box("b1"));
        assert_eq!(classify(&get, "/v1/sessions/s1/ws"), Kind::Session("s1"));
        assert_eq!(
            classify(&post, "/v1/sessions/s1/messages"),
            Kind::Session("s1")
        );
        assert_eq!(classify(&post, "/v1/boxes"), Kind::CreateBox);
        assert_eq!(classify(&post, "/v1/sessions"), Kind::CreateSession);
    }

    #[test]
    fn only_the_secret_signs_and_the_signature_covers_path_and_time() {
        let now = 1_000_000;
        let mut h = HeaderMap::new();
        let sig = sign("s3cret", "n1", now, "POST", "/v1/boxes/b/exec");
        h.insert(H_NODE, HeaderValue::from_static("n1"));
        h.insert(H_TS, HeaderValue::from_str(&now.to_string()).expect("ts"));
        h.insert(H_SIG, HeaderValue::from_str(&sig).expect("sig"));
        assert!(verify(Some("s3cret"), &h, "POST", "/v1/boxes/b/exec", now).is_ok());
        assert!(verify(Some("other"), &h, "POST", "/v1/boxes/b/exec", now).is_err());
        assert!(verify(Some("s3cret"), &h, "POST", "/v1/boxes/c/exec", now).is_err());
        assert!(verify(Some("s3cret"), &h, "GET", "/v1/boxes/b/exec", now).is_err());
        assert!(verify(
            Some("s3cret"),
            &h,
            "POST",
            "/v1/boxes/b/exec",
            now + 120_000
        )
        .is_err());
        assert!(verify(None, &h, "POST", "/v1/boxes/b/exec", now).is_err());
        h.remove(H_SIG);
        assert!(verify(Some("s3cret"), &h, "POST", "/v1/boxes/b/exec", now).is_err());
    }
}
