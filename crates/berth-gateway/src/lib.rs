//! The model gateway.
//!
//! Each box gets its own Unix socket (`model.sock` in the box's run directory, reachable inside
//! the box as `http://127.0.0.1:<port>` through the supervisor's bridge), so the gateway always
//! knows which box a request came from. Inside the box `ANTHROPIC_API_KEY` is a per-session
//! token; the gateway accepts only a live token of a session in *that* box, replaces it with
//! the real credential, and forwards the request to the upstream, streaming both ways without
//! buffering. Usage is read from the response as it passes (`message_start` and
//! `message_delta` in a stream, `usage` in a JSON body) and reported once per request through
//! the [`Meter`] channel: the authoritative count, whatever the agent reports.
//!
//! Only the routes an agent needs are forwarded ([`route`]): everything else (batches, files,
//! legacy completions, the mock's inspection routes) is refused with a 403 in the Anthropic
//! error format. Upstream redirects are never followed (the key would go to the redirect's
//! target); a 3xx is passed back to the box as is.
//!
//! Contract: a request either reaches the upstream with the real key, or is refused with an
//! Anthropic-format error (`{"type":"error","error":{...}}`); the session token never leaves
//! the host, and the real key never enters a box.

pub mod conn;
pub mod egress;
mod meter;
pub mod price;

pub use conn::ConnLimits;

pub use meter::{Usage, UsageParser};

/// Listen on a host service's socket for one box (gateway, egress, box-side API), replacing
/// a stale one; world-connectable, since the box's supervisor may connect as an unprivileged
/// host uid (the box cannot reach the path itself: only its bridge does).
pub fn bind_box_socket(socket: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Who a session token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOwner {
    pub session_id: String,
    pub box_id: String,
    pub tenant: String,
}

/// Limits the gateway enforces per session.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SessionLimits {
    /// Refuse requests once this much has been spent (at most one request overspends).
    pub budget_usd: Option<f64>,
    /// Requests per rolling minute.
    pub requests_per_minute: Option<u32>,
}

/// One metered upstream request.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub owner: TokenOwner,
    pub model: String,
    pub usage: Usage,
    pub status: u16,
    /// Priced with the gateway's table.
    pub cost_usd: f64,
    /// From the request reaching the gateway to the end of the response.
    pub duration: std::time::Duration,
    /// Budget thresholds this request crossed.
    pub crossed: Crossed,
}

/// Budget thresholds one request's cost crossed (each is reported once, by the request that
/// crosses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Crossed {
    /// The session's spend reached `warn_fraction` of its budget.
    pub session_warning: bool,
    /// The session's spend reached its budget: further requests are refused.
    pub session_exhausted: bool,
    pub tenant_warning: bool,
    pub tenant_exhausted: bool,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Base URL of the Messages API (no trailing slash needed).
    pub upstream: String,
    /// The real credential, sent as `x-api-key` (or as a bearer token with `bearer`).
    pub api_key: Option<String>,
    /// Send the credential as `Authorization: Bearer …` (OAuth tokens, some proxies).
    pub bearer: bool,
    pub prices: price::PriceTable,
    /// Fraction of a budget at which a warning is reported (e.g. 0.8).
    pub warn_fraction: f64,
    /// Parse usage from responses and report it. Off, the gateway only forwards: no ledger,
    /// no budgets (for measuring what metering costs).
    pub meter: bool,
    /// Connection cap and timeouts of each box's gateway socket (and, through
    /// [`Gateway::conn_limits`], of the other box-side sockets).
    pub box_connections: ConnLimits,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            upstream: "https://api.anthropic.com".into(),
            api_key: None,
            bearer: false,
            prices: Default::default(),
            warn_fraction: 0.8,
            meter: true,
            box_connections: ConnLimits::default(),
        }
    }
}

struct SessionState {
    owner: TokenOwner,
    limits: SessionLimits,
    spent_usd: f64,
    recent: std::collections::VecDeque<std::time::Instant>,
}

type TokenKey = [u8; 32];

fn token_key(token: &str) -> TokenKey {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A tenant's monthly budget and what it spent in the current calendar month (UTC).
struct TenantBudget {
    budget_usd: f64,
    spent_usd: f64,
    month: (i32, u8),
}

fn this_month() -> (i32, u8) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    month_of(now)
}

/// (year, month) in UTC of a Unix time: the period of tenants' budgets, shared with the
/// ledger that sums their spending.
pub use berth_api::calendar::month_of;

pub struct Gateway {
    cfg: GatewayConfig,
    tenants: std::sync::Mutex<HashMap<String, TenantBudget>>,
    http: reqwest::Client,
    /// Live sessions by the SHA-256 of their token: a lookup compares digests, never the
    /// presented token itself, so timing says nothing about how much of a token was right.
    tokens: std::sync::Mutex<HashMap<TokenKey, SessionState>>,
    meter: mpsc::UnboundedSender<UsageRecord>,
    /// Records sent on `meter` so far (lets readers wait until the ledger has them all).
    metered: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("binding {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("http client: {0}")]
    Client(String),
}

/// Logging on a path a box can trigger at will: at most one line per second, with the count
/// of lines suppressed since the last one.
pub struct RateLimitedLog {
    last_sec: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl RateLimitedLog {
    pub const fn new() -> RateLimitedLog {
        RateLimitedLog {
            last_sec: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed before this one)` when this line may be logged.
    pub fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_sec.load(SeqCst);
        if now > last
            && self
                .last_sec
                .compare_exchange(last, now, SeqCst, SeqCst)
                .is_ok()
        {
            Some(self.suppressed.swap(0, SeqCst))
        } else {
            self.suppressed.fetch_add(1, SeqCst);
            None
        }
    }
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

static UPSTREAM_WARN: RateLimitedLog = RateLimitedLog::new();

/// Headers that describe one hop (RFC 9110 §7.6.1), never passed on by a proxy; the gateway
/// and the port proxy share this list.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Not forwarded by the gateway: the hop-by-hop headers and `host` (the upstream's own is set
/// by the client library).
fn gateway_drops(name: &str) -> bool {
    HOP_BY_HOP.contains(&name) || name == "host"
}

/// Whether a response's body is plain bytes (no `Content-Encoding`, or only `identity`).
fn identity_encoded(h: &reqwest::header::HeaderMap) -> bool {
    h.get_all(reqwest::header::CONTENT_ENCODING)
        .iter()
        .all(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .map(str::trim)
                    .all(|c| c.is_empty() || c.eq_ignore_ascii_case("identity"))
            })
        })
}

pub fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(
            serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}),
        ),
    )
        .into_response()
}

pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut b);
    format!("berth-session-{}", hex::encode(b))
}

#[derive(Clone)]
struct BoxCtx {
    gw: Arc<Gateway>,
    box_id: String,
}

impl Gateway {
    pub fn new(
        cfg: GatewayConfig,
    ) -> Result<(Arc<Gateway>, mpsc::UnboundedReceiver<UsageRecord>), GatewayError> {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            // A redirect would carry the real key to wherever the upstream points.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| GatewayError::Client(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((
            Arc::new(Gateway {
                cfg,
                http,
                tokens: std::sync::Mutex::new(HashMap::new()),
                tenants: std::sync::Mutex::new(HashMap::new()),
                meter: tx,
                metered: std::sync::atomic::AtomicU64::new(0),
            }),
            rx,
        ))
    }

    /// How many usage records have been sent to the meter channel so far.
    pub fn metered_count(&self) -> u64 {
        self.metered.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn prices(&self) -> &price::PriceTable {
        &self.cfg.prices
    }

    /// The connection cap and timeouts for sockets a box can reach.
    pub fn conn_limits(&self) -> ConnLimits {
        self.cfg.box_connections
    }

    /// Readiness: a TCP connection to the upstream opens within `timeout` (nothing is sent).
    pub async fn probe_upstream(&self, timeout: std::time::Duration) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.cfg.upstream).map_err(|e| e.to_string())?;
        let host = url
            .host_str()
            .ok_or("upstream URL has no host")?
            .to_string();
        let port = url
            .port_or_known_default()
            .ok_or("upstream URL has no port")?;
        match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{host}:{port}: {e}")),
            Err(_) => Err(format!("{host}:{port}: no answer within {timeout:?}")),
        }
    }

    /// Accept `token` for a session; `spent_usd` carries what it spent before (a restart).
    pub fn register(&self, token: &str, owner: TokenOwner, limits: SessionLimits, spent_usd: f64) {
        if let Ok(mut m) = self.tokens.lock() {
            m.insert(
                token_key(token),
                SessionState {
                    owner,
                    limits,
                    spent_usd,
                    recent: Default::default(),
                },
            );
        }
    }

    /// Who holds a live session token (for box-side services other than the model gateway).
    pub fn owner_of(&self, token: &str) -> Option<TokenOwner> {
        self.tokens
            .lock()
            .ok()?
            .get(&token_key(token))
            .map(|s| s.owner.clone())
    }

    pub fn revoke(&self, token: &str) {
        if let Ok(mut m) = self.tokens.lock() {
            m.remove(&token_key(token));
        }
    }

    /// Set (or clear, with None) a tenant's monthly budget; `spent_usd` is what it has spent
    /// this calendar month so far.
    pub fn set_tenant_budget(&self, tenant: &str, budget_usd: Option<f64>, spent_usd: f64) {
        if let Ok(mut m) = self.tenants.lock() {
            match budget_usd {
                Some(b) => {
                    m.insert(
                        tenant.to_string(),
                        TenantBudget {
                            budget_usd: b,
                            spent_usd,
                            month: this_month(),
                        },
                    );
                }
                None => {
                    m.remove(tenant);
                }
            }
        }
    }

    fn tenant_spent(&self, tenant: &str) -> Option<(f64, f64)> {
        let mut m = self.tenants.lock().ok()?;
        let t = m.get_mut(tenant)?;
        let month = this_month();
        if t.month != month {
            t.month = month;
            t.spent_usd = 0.0;
        }
        Some((t.budget_usd, t.spent_usd))
    }

    /// Check a request against the session's limits and count it.
    fn admit(&self, token: &str, box_id: &str) -> Result<TokenOwner, Refusal> {
        let mut m = self
            .tokens
            .lock()
            .map_err(|_| Refusal::Unauthorized("invalid session token"))?;
        let st = m
            .get_mut(&token_key(token))
            .ok_or(Refusal::Unauthorized("invalid session token"))?;
        if st.owner.box_id != box_id {
            return Err(Refusal::Unauthorized("token not valid for this box"));
        }
        if let Some(b) = st.limits.budget_usd {
            if st.spent_usd >= b {
                return Err(Refusal::Budget(format!(
                    "berth: this session's budget of ${b:.4} is spent (${:.4})",
                    st.spent_usd
                )));
            }
        }
        if let Some((b, spent)) = self.tenant_spent(&st.owner.tenant) {
            if spent >= b {
                return Err(Refusal::Budget(format!(
                    "berth: tenant {}'s monthly budget of ${b:.2} is spent (${spent:.4})",
                    st.owner.tenant
                )));
            }
        }
        if let Some(rpm) = st.limits.requests_per_minute {
            // A sliding log, not a rate-limiter crate's GCRA: at most `rpm` requests in any
            // minute (a GCRA with a burst of `rpm` lets up to twice that through in one), and
            // Retry-After says when the oldest leaves it.
            let now = std::time::Instant::now();
            let minute = std::time::Duration::from_secs(60);
            while st
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= minute)
            {
                st.recent.pop_front();
            }
            if st.recent.len() >= rpm as usize {
                let retry_after = st
                    .recent
                    .front()
                    .map(|t| 60u64.saturating_sub(now.duration_since(*t).as_secs()))
                    .unwrap_or(60)
                    .max(1);
                return Err(Refusal::Rate { rpm, retry_after });
            }
            st.recent.push_back(now);
        }
        Ok(st.owner.clone())
    }

    /// Add a metered request's cost and report the budget thresholds it crossed.
    fn spend(&self, owner: &TokenOwner, cost: f64) -> Crossed {
        let w = self.cfg.warn_fraction;
        let crossed = |before: f64, after: f64, limit: f64| before < limit && after >= limit;
        let mut c = Crossed::default();
        if let Ok(mut m) = self.tokens.lock() {
            for st in m
                .values_mut()
                .filter(|s| s.owner.session_id == owner.session_id)
            {
                let before = st.spent_usd;
                st.spent_usd += cost;
                if let Some(b) = st.limits.budget_usd {
                    c.session_warning |= crossed(before, st.spent_usd, b * w);
                    c.session_exhausted |= crossed(before, st.spent_usd, b);
                }
            }
        }
        if self.tenant_spent(&owner.tenant).is_some() {
            if let Ok(mut m) = self.tenants.lock() {
                if let Some(t) = m.get_mut(&owner.tenant) {
                    let before = t.spent_usd;
                    t.spent_usd += cost;
                    c.tenant_warning = crossed(before, t.spent_usd, t.budget_usd * w);
                    c.tenant_exhausted = crossed(before, t.spent_usd, t.budget_usd);
                }
            }
        }
        c
    }

    /// Serve the gateway for one box on a Unix socket; the task ends when aborted.
    pub fn serve_box(
        self: &Arc<Self>,
        box_id: &str,
        socket: &Path,
    ) -> Result<tokio::task::JoinHandle<()>, GatewayError> {
        let listener = bind_box_socket(socket)
            .map_err(|e| GatewayError::Bind(socket.display().to_string(), e))?;
        let ctx = BoxCtx {
            gw: self.clone(),
            box_id: box_id.to_string(),
        };
        let app = Router::new().fallback(forward).with_state(ctx);
        let over_cap = conn::refusal_response(
            "503 Service Unavailable",
            &serde_json::json!({"type": "error", "error": {"type": "overloaded_error",
                "message": "berth: too many connections from this box to the model gateway"}})
            .to_string(),
        );
        Ok(tokio::spawn(conn::serve_http(
            listener,
            app,
            self.cfg.box_connections,
            over_cap,
        )))
    }

    /// Serve on a TCP listener for a given box (tests and the benchmark).
    pub fn router_for_box(self: &Arc<Self>, box_id: &str) -> Router {
        Router::new().fallback(forward).with_state(BoxCtx {
            gw: self.clone(),
            box_id: box_id.to_string(),
        })
    }
}

/// Reports a request's usage once: when the response is complete, or, if the stream breaks or
/// the client goes away first, with whatever usage was seen (a cut stream still cost tokens).
struct MeterTap {
    parser: UsageParser,
    pending: Option<TokenOwner>,
    /// The model named in the request body (used when the response names none).
    request_model: Arc<std::sync::Mutex<ModelSniffer>>,
    gw: Arc<Gateway>,
    status: u16,
    started: std::time::Instant,
}

impl MeterTap {
    fn report(&mut self) {
        if let Some(owner) = self.pending.take() {
            let model = self.parser.model().unwrap_or_else(|| {
                self.request_model
                    .lock()
                    .map(|m| m.model())
                    .unwrap_or_default()
            });
            let usage = self.parser.usage();
            let cost_usd = self.gw.cfg.prices.cost_usd(&model, &usage);
            let crossed = self.gw.spend(&owner, cost_usd);
            self.gw
                .metered
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = self.gw.meter.send(UsageRecord {
                owner,
                model,
                usage,
                status: self.status,
                cost_usd,
                duration: self.started.elapsed(),
                crossed,
            });
        }
    }
}

impl Drop for MeterTap {
    fn drop(&mut self) {
        self.report();
    }
}

/// A request the upstream did not answer usably: reported as a 502 with no tokens (so the
/// failure shows in the ledger and the error metrics), answered 502 `api_error`.
fn upstream_failed(
    gw: &Arc<Gateway>,
    pending: Option<TokenOwner>,
    request_model: Arc<std::sync::Mutex<ModelSniffer>>,
    started: std::time::Instant,
    message: &str,
) -> Response {
    drop(MeterTap {
        parser: UsageParser::new(false),
        pending,
        request_model,
        gw: gw.clone(),
        status: StatusCode::BAD_GATEWAY.as_u16(),
        started,
    });
    anthropic_error(StatusCode::BAD_GATEWAY, "api_error", message)
}

/// Why the gateway refused a request; answered in the Anthropic error format.
enum Refusal {
    Unauthorized(&'static str),
    Budget(String),
    Rate { rpm: u32, retry_after: u64 },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized(m) => {
                anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", m)
            }
            Refusal::Budget(m) => {
                anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &m)
            }
            Refusal::Rate { rpm, retry_after } => {
                let mut r = anthropic_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    &format!("berth: this session is limited to {rpm} requests per minute"),
                );
                if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                    r.headers_mut().insert("retry-after", v);
                }
                r
            }
        }
    }
}

fn presented_token(h: &HeaderMap) -> Option<String> {
    if let Some(v) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string())
}

/// A route the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The real credential is added (the reachability probe needs none).
    pub credential: bool,
    /// Usage is read from the response and reported.
    pub metered: bool,
}

/// What an agent may ask of the upstream, as (method, path): the Messages API and its token
/// counter (metered), the model list and one model (Claude Code reads them to check a model
/// name), and `HEAD /api/hello` (Claude Code's reachability probe, sent without the key).
/// Claude Code 2.1.328 also knows batches, files, `/v1/complete` and
/// `/v1/messages/cache_touch`; none is forwarded (unmetered, or organisation-wide).
pub const ROUTES: [(&str, &str); 5] = [
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{id}"),
    ("HEAD", "/api/hello"),
];

/// Largest request body forwarded (streamed, counted as it passes).
pub const MAX_REQUEST_BODY: u64 = 32 << 20;

/// Decide whether `method path?query` is forwarded. The path is matched exactly (no dot
/// segments, no percent-encoding, no empty segments: the upstream URL is built from it, and a
/// URL parser would normalise `/v1/messages/../files`), the query may hold only plain
/// `key=value` pairs.
pub fn route(method: &str, path: &str, query: Option<&str>) -> Option<Route> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if let Some(q) = query {
        if !q.chars().all(|c| plain(c) || c == '=' || c == '&') {
            return None;
        }
    }
    let metered = Route {
        credential: true,
        metered: true,
    };
    let read = Route {
        credential: true,
        metered: false,
    };
    match (method, path) {
        ("POST", "/v1/messages") | ("POST", "/v1/messages/count_tokens") => Some(metered),
        ("GET", "/v1/models") => Some(read),
        ("GET", p) => {
            let id = p.strip_prefix("/v1/models/")?;
            let ok = !id.is_empty() && id.chars().all(plain) && !id.chars().all(|c| c == '.');
            ok.then_some(read)
        }
        ("HEAD", "/api/hello") => Some(Route {
            credential: false,
            metered: false,
        }),
        _ => None,
    }
}

/// Reads the `model` of a request body as it streams past, from its first 64 KiB.
#[derive(Default)]
struct ModelSniffer {
    head: Vec<u8>,
}

const SNIFF_BYTES: usize = 64 << 10;

impl ModelSniffer {
    fn feed(&mut self, b: &[u8]) {
        let room = SNIFF_BYTES.saturating_sub(self.head.len());
        self.head.extend_from_slice(&b[..b.len().min(room)]);
    }

    fn model(&self) -> String {
        #[derive(serde::Deserialize)]
        struct M {
            model: Option<String>,
        }
        if let Ok(m) = serde_json::from_slice::<M>(&self.head) {
            return m.model.unwrap_or_default();
        }
        // A body longer than what was kept: the first `"model": "…"` member.
        let text = String::from_utf8_lossy(&self.head);
        let Some(i) = text.find("\"model\"") else {
            return String::new();
        };
        let rest = text[i + 7..].trim_start();
        let Some(rest) = rest.strip_prefix(':') else {
            return String::new();
        };
        let Some(rest) = rest.trim_start().strip_prefix('"') else {
            return String::new();
        };
        rest.split('"')
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect()
    }
}

async fn forward(State(ctx): State<BoxCtx>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let gw = &ctx.gw;
    let Some(route) = route(req.method().as_str(), req.uri().path(), req.uri().query()) else {
        let path: String = req.uri().path().chars().take(120).collect();
        return anthropic_error(
            StatusCode::FORBIDDEN,
            "permission_error",
            &format!(
                "berth: the model gateway does not forward {} {path} (it forwards {})",
                req.method(),
                ROUTES
                    .iter()
                    .map(|(m, p)| format!("{m} {p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    };
    let Some(token) = presented_token(req.headers()) else {
        return anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid session token",
        );
    };
    let owner = match gw.admit(&token, &ctx.box_id) {
        Ok(o) => o,
        Err(refusal) => return refusal.into_response(),
    };
    let (parts, body) = req.into_parts();
    let path_q = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{}", gw.cfg.upstream.trim_end_matches('/'), path_q);
    let method = match reqwest::Method::from_bytes(parts.method.as_str().as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            return anthropic_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "bad method",
            )
        }
    };
    let declared_len = parts
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > MAX_REQUEST_BODY) {
        return anthropic_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            "request body too large",
        );
    }
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in parts.headers.iter() {
        let name = k.as_str();
        // The box's Accept-Encoding never goes up: the meter reads usage from the plain bytes.
        if gateway_drops(name)
            || name == "x-api-key"
            || name == "authorization"
            || name == "accept-encoding"
        {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(k.as_str().as_bytes()),
            reqwest::header::HeaderValue::from_bytes(v.as_bytes()),
        ) {
            headers.append(n, v);
        }
    }
    headers.insert(
        reqwest::header::ACCEPT_ENCODING,
        reqwest::header::HeaderValue::from_static("identity"),
    );
    if let (Some(key), true) = (&gw.cfg.api_key, route.credential) {
        let (name, value) = if gw.cfg.bearer {
            ("authorization", format!("Bearer {key}"))
        } else {
            ("x-api-key", key.clone())
        };
        if let Ok(v) = reqwest::header::HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    // The request body streams through (counted, and its head read for the model name).
    let sniffer = Arc::new(std::sync::Mutex::new(ModelSniffer::default()));
    let sniff = sniffer.clone();
    let mut seen = 0u64;
    let body_stream = body.into_data_stream().map(move |chunk| {
        let b = chunk.map_err(std::io::Error::other)?;
        seen += b.len() as u64;
        if seen > MAX_REQUEST_BODY {
            return Err(std::io::Error::other("request body too large"));
        }
        if let Ok(mut s) = sniff.lock() {
            s.feed(&b);
        }
        Ok::<_, std::io::Error>(b)
    });
    let metered = gw.cfg.meter && route.metered;
    let upstream = gw
        .http
        .request(method, &url)
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body_stream))
        .send()
        .await;
    let resp = match upstream {
        Ok(r) => r,
        Err(e) => {
            // A box can make this happen at will: log at most once a second.
            if let Some(suppressed) = UPSTREAM_WARN.admit() {
                tracing::warn!(error = %e, suppressed, "upstream unreachable");
            }
            return upstream_failed(
                gw,
                metered.then_some(owner),
                sniffer,
                started,
                "the model upstream is unreachable",
            );
        }
    };
    let status = resp.status().as_u16();
    if metered && !identity_encoded(resp.headers()) {
        // Compressed bytes hide the usage: such an answer would cost nothing. Refused (and
        // reported as a failure), never passed on unmetered.
        if let Some(suppressed) = UPSTREAM_WARN.admit() {
            tracing::warn!(
                suppressed,
                "upstream answered with a content-encoding despite identity"
            );
        }
        return upstream_failed(
            gw,
            Some(owner),
            sniffer,
            started,
            "berth: the model upstream answered with a compressed body the gateway cannot meter",
        );
    }
    let mut out = Response::builder().status(status);
    let is_sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if let Some(h) = out.headers_mut() {
        for (k, v) in resp.headers().iter() {
            if gateway_drops(k.as_str()) || k.as_str() == "content-length" {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(k.as_str().as_bytes()),
                HeaderValue::from_bytes(v.as_bytes()),
            ) {
                h.append(n, v);
            }
        }
    }
    let body = if metered {
        let mut tap = MeterTap {
            parser: UsageParser::new(is_sse),
            pending: Some(owner),
            request_model: sniffer,
            gw: gw.clone(),
            status,
            started,
        };
        Body::from_stream(resp.bytes_stream().map(move |chunk| {
            if let Ok(b) = &chunk {
                tap.parser.feed(b);
            }
            if tap.parser.finished() {
                tap.report();
            }
            chunk
        }))
    } else {
        Body::from_stream(resp.bytes_stream())
    };
    out.body(body).unwrap_or_else(|_| {
        anthropic_error(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "bad upstream response",
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rate_limited_log_admits_one_line_a_second() {
        let l = super::RateLimitedLog::new();
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        assert_eq!(l.suppressed.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn only_the_listed_routes_are_forwarded() {
        use super::route;
        let msg = route("POST", "/v1/messages", None).expect("messages");
        assert!(msg.credential && msg.metered);
        assert!(route("POST", "/v1/messages", Some("beta=true")).is_some());
        assert!(route("POST", "/v1/messages/count_tokens", Some("beta=true")).is_some());
        assert!(route("GET", "/v1/models", None).is_some_and(|r| !r.metered));
        assert!(route("GET", "/v1/models/claude-sonnet-4-5", None).is_some());
        let hello = route("HEAD", "/api/hello", None).expect("hello");
        assert!(!hello.credential, "the probe never carries the key");
        for (m, p, q) in [
            ("GET", "/v1/messages", None),
            ("POST", "/v1/messages/batches", None),
            ("GET", "/v1/messages/batches", None),
            ("POST", "/v1/files", None),
            ("GET", "/v1/files", None),
            ("POST", "/v1/complete", None),
            ("POST", "/v1/messages/cache_touch", None),
            ("GET", "/_mock/requests", None),
            ("POST", "/v1/messages/../files", None),
            ("POST", "/v1/messages/", None),
            ("POST", "//v1/messages", None),
            ("POST", "/v1/%6dessages", None),
            ("GET", "/v1/models/..", None),
            ("GET", "/v1/models/.", None),
            ("GET", "/v1/models/", None),
            ("GET", "/v1/models/a/b", None),
            ("GET", "/v1/models/%2e%2e", None),
            ("POST", "/v1/messages", Some("x=/../files")),
            ("POST", "/v1/messages", Some("a=%41")),
            ("DELETE", "/v1/messages", None),
            ("GET", "/api/hello", None),
        ] {
            assert!(route(m, p, q).is_none(), "{m} {p} {q:?}");
        }
    }

    #[test]
    fn the_request_model_is_read_from_a_short_or_a_long_body() {
        let mut s = super::ModelSniffer::default();
        s.feed(br#"{"model":"claude-sonnet-4-5","messages":[]}"#);
        assert_eq!(s.model(), "claude-sonnet-4-5");
        let mut s = super::ModelSniffer::default();
        s.feed(br#"{"model" : "claude-haiku-4-5", "messages": [""#);
        s.feed(&vec![b'x'; 100 << 10]);
        assert_eq!(s.model(), "claude-haiku-4-5");
        assert_eq!(super::ModelSniffer::default().model(), "");
    }
}
