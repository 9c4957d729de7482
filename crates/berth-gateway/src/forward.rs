//! Forwarding: a box's request to the upstream with the real credential, the answer streamed
//! back, and the usage it carried reported once.

use super::policy::presented_token;
use super::*;

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
    /// Report the usage (once); what the observer wants awaited before the answer's end goes on.
    fn report(&mut self) -> Option<futures::future::BoxFuture<'static, ()>> {
        let owner = self.pending.take()?;
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
        let record = UsageRecord {
            owner,
            model,
            usage,
            status: self.status,
            cost_usd,
            duration: self.started.elapsed(),
            crossed,
            message_id: self.parser.message_id(),
        };
        let wait = self.gw.observer.get().and_then(|o| o(&record));
        let _ = self.gw.meter.send(record);
        wait
    }
}

impl Drop for MeterTap {
    fn drop(&mut self) {
        // A cut stream: nothing is left to hold back, so the observer's wait runs on its own.
        if let Some(wait) = self.report() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(tokio::time::timeout(crate::OBSERVER_WAIT, wait));
            }
        }
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

pub(crate) async fn forward(State(ctx): State<BoxCtx>, req: Request) -> Response {
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
        Body::from_stream(resp.bytes_stream().then(move |chunk| {
            if let Ok(b) = &chunk {
                tap.parser.feed(b);
            }
            let wait = if tap.parser.finished() {
                tap.report()
            } else {
                None
            };
            async move {
                // The chunk that ends the answer waits until the observer has it.
                if let Some(wait) = wait {
                    let _ = tokio::time::timeout(crate::OBSERVER_WAIT, wait).await;
                }
                chunk
            }
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
