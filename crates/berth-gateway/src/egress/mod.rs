//! The egress proxy: a box's only way to anything but the model.
//!
//! Inside the box `HTTP_PROXY`/`HTTPS_PROXY` point at a loopback port bridged to this proxy's
//! per-box Unix socket, so the proxy knows which box asks. It accepts `CONNECT host:port` and
//! absolute-form plain HTTP requests, and only for host names that match the box's
//! `network.allow` patterns (exact, or `*.suffix`). It resolves names itself and refuses every
//! address that is not globally reachable ([`ip_class`]: the IANA special-purpose registries,
//! and IPv6 forms that embed an IPv4 address judged by that address) after resolution, and IP
//! literals outright, so neither DNS rebinding nor a literal address gets around the list.
//! Operator-configured resolver overrides (`name → addr:port`) are trusted as given: that is how
//! tests and air-gapped sites map names to local servers.
//!
//! Plain HTTP is decided per request: the head is parsed ([`parse_head`]), its `Host` must name
//! the request target's host (so a secret goes only with the host it names), the head is
//! rebuilt (never passed through raw) with `Connection: close`, exactly one framed body
//! follows, and the connection closes after the answer: a second request on the same
//! connection never reaches the upstream unchecked. Every decision is reported through the
//! decisions channel.

use crate::conn::{until_idle, Activity, Tracked};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

mod classify;
mod dns;
mod http;
mod proxy;

pub use classify::{forbidden_ip, ip_class};
pub use dns::{DnsLimits, Resolver};
pub use http::{parse_head, ChunkedEnd, Framing, HeadError, RequestHead};
use proxy::Client;

const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub box_id: String,
    pub host: String,
    pub port: u16,
    pub allowed: bool,
    pub reason: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Debug, Clone, Default)]
pub struct EgressConfig {
    /// `name` → address, trusted as given (tests, air-gapped mirrors).
    pub overrides: HashMap<String, SocketAddr>,
    /// Extra trusted root certificates (PEM) for TLS the proxy originates.
    pub extra_roots_pem: Vec<String>,
    /// Per-box connection cap and timeouts of the proxy socket.
    pub connections: crate::ConnLimits,
    /// Bounds on name lookups (the system resolver blocks a thread per lookup).
    pub dns: DnsLimits,
    /// How names are resolved (the system resolver unless set; tests put a fake here).
    pub resolver: Resolver,
}

/// A request's host as the proxy uses it everywhere (allow list, overrides, secrets, the
/// rebuilt head, TLS name): lowercase, one trailing dot (the root) removed. `None` for a name
/// that is empty or still ends with a dot.
pub fn normalize_host(host: &str) -> Option<String> {
    let h = host.to_ascii_lowercase();
    let h = h.strip_suffix('.').unwrap_or(&h);
    (!h.is_empty() && !h.ends_with('.')).then(|| h.to_string())
}

/// The secret configured for `host` (already normalised), if any.
fn secret_for<'a>(secrets: &'a [Secret], host: &str) -> Option<&'a Secret> {
    secrets
        .iter()
        .find(|s| normalize_host(&s.host).as_deref() == Some(host))
}

/// A credential the proxy adds to a box's requests for one host, so the box never holds it.
/// The box asks for `http://host/…`; the proxy sends the request with `header: value` added,
/// over TLS to port 443 (or the URL's port) when `tls` is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub host: String,
    pub header: String,
    pub value: String,
    pub tls: bool,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("host", &self.host)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

pub struct Egress {
    cfg: EgressConfig,
    /// Lookups in flight for all boxes (see [`DnsLimits`]).
    dns_global: Arc<tokio::sync::Semaphore>,
    tls: tokio_rustls::TlsConnector,
    decisions: mpsc::UnboundedSender<Decision>,
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("extra root certificate: {0}")]
    BadRoot(String),
}

/// Does `host` match one of the patterns (`name` or `*.suffix`)?
pub fn allowed(patterns: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        match p.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() && host.ends_with(&format!(".{suffix}")),
            None => host == p,
        }
    })
}

struct Target {
    host: String,
    port: u16,
}

fn parse_authority(a: &str, default_port: u16) -> Option<Target> {
    if a.starts_with('[') {
        let end = a.find(']')?;
        let host = a[1..end].to_string();
        let port = a[end + 1..]
            .strip_prefix(':')
            .map(|p| p.parse().ok())
            .unwrap_or(Some(default_port))?;
        return Some(Target { host, port });
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some(Target {
            host: h.to_string(),
            port: p.parse().ok()?,
        }),
        None => Some(Target {
            host: a.to_string(),
            port: default_port,
        }),
    }
}

impl Egress {
    pub fn new(
        cfg: EgressConfig,
    ) -> Result<(Arc<Egress>, mpsc::UnboundedReceiver<Decision>), EgressError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for pem in &cfg.extra_roots_pem {
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
                let cert: rustls::pki_types::CertificateDer<'static> =
                    cert.map_err(|e| EgressError::BadRoot(format!("{e:?}")))?;
                roots
                    .add(cert)
                    .map_err(|e| EgressError::BadRoot(e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| EgressError::BadRoot(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (tx, rx) = mpsc::unbounded_channel();
        let mut cfg = cfg;
        // Overrides are looked up by the normalised name.
        cfg.overrides = cfg
            .overrides
            .into_iter()
            .filter_map(|(k, v)| Some((normalize_host(&k)?, v)))
            .collect();
        Ok((
            Arc::new(Egress {
                dns_global: Arc::new(tokio::sync::Semaphore::new(cfg.dns.global.max(1))),
                cfg,
                tls,
                decisions: tx,
            }),
            rx,
        ))
    }

    /// Serve the proxy for one box on `incoming` (its socket or its door's port); the task
    /// ends when aborted or the door closes.
    pub fn serve_box(
        self: &Arc<Self>,
        box_id: &str,
        allow: Vec<String>,
        secrets: Vec<Secret>,
        incoming: crate::conn::Incoming,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let box_id: Arc<str> = Arc::from(box_id);
        let allow = Arc::new(allow);
        let secrets = Arc::new(secrets);
        let dns_box = Arc::new(tokio::sync::Semaphore::new(self.cfg.dns.per_box.max(1)));
        let limits = self.cfg.connections;
        let over_cap = crate::conn::refusal_response(
            "503 Service Unavailable",
            &serde_json::json!({"error": {"code": "too_many_connections",
                "message": "berth: too many connections from this box to the egress proxy"}})
            .to_string(),
        );
        tokio::spawn(crate::conn::accept_loop(
            incoming,
            limits,
            over_cap,
            move |conn| {
                let (me, box_id, allow, secrets, dns_box) = (
                    me.clone(),
                    box_id.clone(),
                    allow.clone(),
                    secrets.clone(),
                    dns_box.clone(),
                );
                async move {
                    let activity = Activity::new();
                    let mut conn = Tracked::new(conn, activity.clone());
                    let _ = until_idle(
                        &activity,
                        limits.idle_timeout,
                        me.handle(&mut conn, &box_id, &allow, &secrets, &dns_box),
                    )
                    .await;
                }
            },
        ))
    }

    async fn refuse(&self, conn: &mut Client, d: Decision, status: &str) {
        let body = serde_json::json!({"error": {"code": "egress_denied", "message": d.reason}})
            .to_string();
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(resp.as_bytes()).await;
        let _ = conn.shutdown().await;
        let _ = self.decisions.send(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_normalised_once() {
        assert_eq!(
            normalize_host("Api.Example.COM.").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(normalize_host("a.b").as_deref(), Some("a.b"));
        assert_eq!(normalize_host("a.b.."), None);
        assert_eq!(normalize_host("."), None);
        assert_eq!(normalize_host(""), None);
        let secret = |host: &str| Secret {
            host: host.into(),
            header: "x-k".into(),
            value: "v".into(),
            tls: true,
        };
        let secrets = [secret("API.example.com.")];
        for asked in ["api.example.com.", "API.EXAMPLE.COM", "api.example.com"] {
            let h = normalize_host(asked).expect("name");
            assert!(secret_for(&secrets, &h).is_some(), "{asked}");
            assert!(allowed(&["api.example.com".into()], &h), "{asked}");
        }
        assert!(secret_for(&secrets, "other.example.com").is_none());
    }

    #[test]
    fn patterns() {
        let p = vec!["api.anthropic.com".to_string(), "*.example.com".to_string()];
        assert!(allowed(&p, "api.anthropic.com") && allowed(&p, "API.Anthropic.com."));
        assert!(allowed(&p, "a.example.com") && allowed(&p, "a.b.example.com"));
        assert!(
            !allowed(&p, "example.com")
                && !allowed(&p, "evilexample.com")
                && !allowed(&p, "anthropic.com")
        );
    }
}
