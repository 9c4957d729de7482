//! Port links: a URL a browser can open for one port of one box, without the API key.
//!
//! `POST /v1/boxes/{id}/port-links` (with the key, as any call) answers a path
//! `/v1/port-links/<token>/` valid for [`LINK_TTL`]. The token is the box, the port, the
//! caller's tenant and key id and the expiry, signed with HMAC-SHA256: it opens that port of
//! that box and nothing else, ends with its expiry and with the key's deletion (checked in the
//! store on each use, so a key deleted on any node; and at once for streams open here). The
//! signing key is derived from `cluster_secret` (HMAC(cluster_secret, "berth port-link signing
//! key v1")) when there is one, so a link works through any node (a link's request reaches
//! the box's node as any forwarded request does) and outlives a restart; without one it is
//! drawn by this process at start (a restart ends every link). The API key itself is never in
//! a URL.
//!
//! The proxied pages are served from the console's own origin, so every answer through a link
//! carries `Content-Security-Policy: sandbox` without `allow-same-origin`: a box's page runs
//! in an opaque origin and cannot read the console's storage (the key in `sessionStorage`),
//! call the API with it, or frame the console. Cookies are not passed either way (one origin
//! serves every box: a cookie one box set would reach the others, or the console) nor is
//! `Clear-Site-Data` (a box could sign the console out). Answers get
//! `Access-Control-Allow-Origin: *` (the opaque origin's own requests need it; the token in
//! the URL, not the origin, is the credential), and `Referrer-Policy: no-referrer`.

use super::{Json, Path};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use berth_api::ErrorBody;
use futures::FutureExt;
use hmac::Mac;
use std::sync::OnceLock;
use std::time::Duration;

/// How long a link opens its port.
pub const LINK_TTL: Duration = Duration::from_secs(15 * 60);

/// Where links are served.
pub const LINK_PREFIX: &str = "/v1/port-links/";

/// The policy of every answer through a link: scripts and forms may run, in an opaque origin.
pub const LINK_CSP: &str = "sandbox allow-scripts allow-forms allow-popups \
allow-popups-to-escape-sandbox allow-modals allow-downloads";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Without a cluster secret: drawn once per process, so a restart ends every link.
fn process_secret() -> &'static [u8; 32] {
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    SECRET.get_or_init(|| {
        let mut s = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut s);
        s
    })
}

/// The key links are signed with: every node of a cluster derives the same one from the
/// cluster secret (its own purpose string: a link tag is never a valid node signature).
fn link_key(st: &AppState) -> Vec<u8> {
    match st.engine.cluster().and_then(|c| c.cfg.secret.as_deref()) {
        Some(cluster_secret) => {
            let mut m = HmacSha256::new_from_slice(cluster_secret.as_bytes())
                .expect("HMAC takes any key length");
            m.update(b"berth port-link signing key v1");
            m.finalize().into_bytes().to_vec()
        }
        None => process_secret().to_vec(),
    }
}

/// What a link grants.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Grant {
    #[serde(rename = "b")]
    box_id: String,
    #[serde(rename = "p")]
    port: u16,
    #[serde(rename = "t")]
    tenant: String,
    #[serde(rename = "k")]
    key_id: String,
    /// Expiry, unix seconds.
    #[serde(rename = "e")]
    expires: i64,
}

fn mac(key: &[u8], payload: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(payload);
    m
}

fn sign(key: &[u8], g: &Grant) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = b64.encode(serde_json::to_vec(g).unwrap_or_default());
    let tag = b64.encode(mac(key, payload.as_bytes()).finalize().into_bytes());
    format!("{payload}.{tag}")
}

/// The grant of a token whose signature is ours and which has not expired at `now`.
fn verify(key: &[u8], token: &str, now: i64) -> Option<Grant> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (payload, tag) = token.split_once('.')?;
    let tag = b64.decode(tag).ok()?;
    // Constant time (the `hmac` crate's verify).
    mac(key, payload.as_bytes()).verify_slice(&tag).ok()?;
    let g: Grant = serde_json::from_slice(&b64.decode(payload).ok()?).ok()?;
    (now < g.expires).then_some(g)
}

/// What to open.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub struct PortLinkRequest {
    /// The port a process in the box listens on (1–65535).
    pub port: u16,
}

/// A link to a box's port.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PortLink {
    /// Path on this server (`/v1/port-links/<token>/`): open it in a browser, no key needed.
    pub url: String,
    pub expires_at: berth_api::Timestamp,
}

/// A short-lived link to one port of a box, for browsers.
///
/// The answer's `url` (a path on this server) serves the port like
/// `/v1/boxes/{id}/ports/{port}/` without an API key, for 15 minutes or until the key is
/// deleted; in a cluster through any node (without `cluster_secret`: until the server restarts,
/// only on the server that issued it). Pages through it run sandboxed
/// (an opaque origin: `Content-Security-Policy: sandbox`), cookies are not passed.
#[utoipa::path(post, path = "/v1/boxes/{id}/port-links", security(("bearer" = [])), params(("id" = String, Path)),
    request_body = PortLinkRequest,
    responses((status = 201, body = PortLink), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_port_link(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Json(req): Json<PortLinkRequest>,
) -> Result<(StatusCode, Json<PortLink>), ApiError> {
    if req.port == 0 {
        return Err(ApiError::Invalid("port must be between 1 and 65535".into()));
    }
    // Another tenant's box is not found, as for every box call.
    st.engine.get_box(&c.tenant, &id).await?;
    let expires = chrono::Utc::now() + LINK_TTL;
    let token = sign(
        &link_key(&st),
        &Grant {
            box_id: id,
            port: req.port,
            tenant: c.tenant,
            key_id: c.key_id,
            expires: expires.timestamp(),
        },
    );
    Ok((
        StatusCode::CREATED,
        Json(PortLink {
            url: format!("{LINK_PREFIX}{token}/"),
            expires_at: expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }),
    ))
}

/// `/v1/port-links/{token}/{*path}`: the port the token names.
pub async fn serve(
    State(st): State<AppState>,
    axum::extract::Path((token, rest)): axum::extract::Path<(String, String)>,
    req: axum::extract::Request,
) -> Response {
    through(st, token, rest, req).await
}

/// The same, for the port's root.
pub async fn serve_root(
    State(st): State<AppState>,
    axum::extract::Path(token): axum::extract::Path<String>,
    req: axum::extract::Request,
) -> Response {
    through(st, token, String::new(), req).await
}

async fn through(
    st: AppState,
    token: String,
    rest: String,
    mut req: axum::extract::Request,
) -> Response {
    use axum::response::IntoResponse;
    let grant = verify(&link_key(&st), &token, chrono::Utc::now().timestamp())
        // A key deleted during this run ends its links at once.
        .filter(|g| st.engine.key_revoked(&g.key_id).now_or_never().is_none());
    // A key deleted anywhere (another node of the cluster) ends them at its next use.
    let grant = match grant {
        Some(g) => st
            .engine
            .key_exists(&g.tenant, &g.key_id)
            .await
            .unwrap_or(false)
            .then_some(g),
        None => None,
    };
    let Some(g) = grant else {
        let mut r = ApiError::Rejected(
            StatusCode::UNAUTHORIZED,
            "this port link is invalid or has expired: ask for a new one".into(),
        )
        .into_response();
        sandbox(&mut r);
        return r;
    };
    for h in [header::COOKIE, header::REFERER, header::AUTHORIZATION] {
        req.headers_mut().remove(h);
    }
    // The box on another node: the link's request goes there as it came (the link is its
    // credential there too); one that was forwarded here is served here.
    if !req.headers().contains_key(super::forward::H_NODE) {
        match st.engine.box_owner_url(&g.box_id).await {
            Ok(None) => {}
            Ok(Some(url)) => {
                if let Some(c) = st.engine.cluster().cloned() {
                    let mut r = super::forward::forward(&c, &url, req).await;
                    sandbox(&mut r);
                    return r;
                }
            }
            Err(why) => {
                let mut r = ApiError::Unavailable(why).into_response();
                sandbox(&mut r);
                return r;
            }
        }
    }
    let caller = Caller {
        tenant: g.tenant,
        admin: false,
        key_id: g.key_id,
    };
    let mut r = match super::boxes::proxy_port(st, caller, g.box_id, g.port, rest, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    sandbox(&mut r);
    r
}

fn sandbox(r: &mut Response) {
    let h = r.headers_mut();
    h.remove(header::SET_COOKIE);
    h.remove("clear-site-data");
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(LINK_CSP),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &[u8] = b"a link key";

    fn grant(expires: i64) -> Grant {
        Grant {
            box_id: "box-1".into(),
            port: 8000,
            tenant: "acme".into(),
            key_id: "key-1".into(),
            expires,
        }
    }

    #[test]
    fn a_link_opens_what_it_names_until_it_expires() {
        let t = sign(K, &grant(1000));
        assert_eq!(verify(K, &t, 999), Some(grant(1000)));
        assert_eq!(verify(K, &t, 1000), None, "expired");
        assert_eq!(verify(b"another node's key", &t, 999), None, "another key");
    }

    #[test]
    fn a_changed_or_foreign_token_opens_nothing() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let t = sign(K, &grant(1000));
        let (_, tag) = t.split_once('.').expect("two parts");
        // Another box, port or tenant under the same signature.
        for other in [
            Grant {
                box_id: "box-2".into(),
                ..grant(1000)
            },
            Grant {
                port: 22,
                ..grant(1000)
            },
            Grant {
                tenant: "globex".into(),
                ..grant(1000)
            },
            grant(2000),
        ] {
            let payload = b64.encode(serde_json::to_vec(&other).expect("json"));
            assert_eq!(verify(K, &format!("{payload}.{tag}"), 0), None);
        }
        // A signature under another secret, and junk.
        let mut m = HmacSha256::new_from_slice(b"another server").expect("key");
        let payload = t.split_once('.').expect("two parts").0;
        m.update(payload.as_bytes());
        let forged = b64.encode(m.finalize().into_bytes());
        assert_eq!(verify(K, &format!("{payload}.{forged}"), 0), None);
        for junk in ["", ".", "x.y", "plain", &format!("{payload}.")] {
            assert_eq!(verify(K, junk, 0), None, "{junk}");
        }
    }
}
