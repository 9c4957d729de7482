//! The model gateway.
//!
//! Each box gets its own way in (its door's gateway port: `bridge.sock` in the box's run
//! directory, reachable inside the box as `http://127.0.0.1:<port>` through the supervisor's
//! bridge; [`conn::Door`]), so the gateway always knows which box a request came from. Inside the box `ANTHROPIC_API_KEY` is a per-session
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
mod forward;
mod meter;
mod policy;
pub mod price;

pub use conn::ConnLimits;

use forward::forward;
pub use forward::HOP_BY_HOP;
pub use meter::{Usage, UsageParser};
pub use policy::{route, Route, MAX_REQUEST_BODY, ROUTES};

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
    /// The answer's id (`msg_…`), when the response named one.
    pub message_id: Option<String>,
}

/// Told of each metered answer before its last bytes go on to the box: the future it returns
/// (if any) is awaited first, bounded by [`OBSERVER_WAIT`], so what it records comes before
/// anything the agent does after reading the whole answer.
pub type Observer =
    Arc<dyn Fn(&UsageRecord) -> Option<futures::future::BoxFuture<'static, ()>> + Send + Sync>;

/// Longest an answer's end waits for the [`Observer`].
pub const OBSERVER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
    observer: std::sync::OnceLock<Observer>,
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
                observer: std::sync::OnceLock::new(),
            }),
            rx,
        ))
    }

    /// Set the [`Observer`] of metered answers (once; later calls are ignored).
    pub fn set_observer(&self, o: Observer) {
        let _ = self.observer.set(o);
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

    /// Serve the gateway for one box on `incoming` (its socket or its door's port); the task
    /// ends when aborted or the door closes.
    pub fn serve_box(
        self: &Arc<Self>,
        box_id: &str,
        incoming: conn::Incoming,
    ) -> tokio::task::JoinHandle<()> {
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
        tokio::spawn(conn::serve_http(
            incoming,
            app,
            self.cfg.box_connections,
            over_cap,
        ))
    }

    /// Serve on a TCP listener for a given box (tests and the benchmark).
    pub fn router_for_box(self: &Arc<Self>, box_id: &str) -> Router {
        Router::new().fallback(forward).with_state(BoxCtx {
            gw: self.clone(),
            box_id: box_id.to_string(),
        })
    }
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
}
