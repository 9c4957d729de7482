//! What the gateway lets through: the routes an agent may use, and per request the token's
//! session, its rate and budgets (admission) and what a metered answer spends.

use super::*;

/// Why the gateway refused a request; answered in the Anthropic error format.
pub(crate) enum Refusal {
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

pub(crate) fn presented_token(h: &HeaderMap) -> Option<String> {
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

impl Gateway {
    pub(crate) fn tenant_spent(&self, tenant: &str) -> Option<(f64, f64)> {
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
    pub(crate) fn admit(&self, token: &str, box_id: &str) -> Result<TokenOwner, Refusal> {
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
    pub(crate) fn spend(&self, owner: &TokenOwner, cost: f64) -> Crossed {
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
}

#[cfg(test)]
mod tests {
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
}
