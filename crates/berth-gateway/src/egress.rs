//! The egress proxy: a box's only way to anything but the model.
//!
//! Inside the box `HTTP_PROXY`/`HTTPS_PROXY` point at a loopback port bridged to this proxy's
//! per-box Unix socket, so the proxy knows which box asks. It accepts `CONNECT host:port` and
//! absolute-form plain HTTP requests, and only for host names that match the box's
//! `network.allow` patterns (exact, or `*.suffix`). It resolves names itself and refuses
//! loopback, private, link-local (cloud metadata), CGNAT, multicast and unspecified addresses
//! after resolution, and IP literals outright, so neither DNS rebinding nor a literal address
//! gets around the list. Operator-configured resolver overrides (`name → addr:port`) are trusted
//! as given: that is how tests and air-gapped sites map names to local servers.
//! Every decision is reported through the decisions channel.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

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

/// Addresses a box may never reach through the proxy.
pub fn forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_ip(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
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
        Ok((
            Arc::new(Egress {
                cfg,
                tls,
                decisions: tx,
            }),
            rx,
        ))
    }

    /// Serve the proxy for one box on a Unix socket; the task ends when aborted.
    pub fn serve_box(
        self: &Arc<Self>,
        box_id: &str,
        allow: Vec<String>,
        secrets: Vec<Secret>,
        socket: &Path,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = crate::bind_box_socket(socket)?;
        let me = self.clone();
        let box_id = box_id.to_string();
        let allow = Arc::new(allow);
        let secrets = Arc::new(secrets);
        Ok(tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (me, box_id, allow, secrets) =
                    (me.clone(), box_id.clone(), allow.clone(), secrets.clone());
                tokio::spawn(async move { me.handle(conn, &box_id, &allow, &secrets).await });
            }
        }))
    }

    async fn refuse(&self, mut conn: UnixStream, d: Decision, status: &str) {
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

    async fn handle(
        &self,
        mut conn: UnixStream,
        box_id: &str,
        allow: &[String],
        secrets: &[Secret],
    ) {
        // Read the request head.
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 4096];
        let end = loop {
            let n = match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            head.extend_from_slice(&buf[..n]);
            if let Some(pos) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            if head.len() > MAX_HEAD {
                return;
            }
        };
        let text = String::from_utf8_lossy(&head[..end]).into_owned();
        let mut first = text.lines().next().unwrap_or("").split_whitespace();
        let (method, target, version) = (
            first.next().unwrap_or(""),
            first.next().unwrap_or(""),
            first.next().unwrap_or("HTTP/1.1"),
        );
        let decision = |host: &str, port: u16, allowed: bool, reason: &str| Decision {
            box_id: box_id.to_string(),
            host: host.to_string(),
            port,
            allowed,
            reason: reason.to_string(),
            bytes_up: 0,
            bytes_down: 0,
        };
        let (t, connect, path) = if method.eq_ignore_ascii_case("CONNECT") {
            match parse_authority(target, 443) {
                Some(t) => (t, true, String::new()),
                None => {
                    return self
                        .refuse(
                            conn,
                            decision(target, 0, false, "bad CONNECT target"),
                            "400 Bad Request",
                        )
                        .await
                }
            }
        } else if let Some(rest) = target.strip_prefix("http://") {
            let (auth, path) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].to_string()),
                None => (rest, "/".to_string()),
            };
            // A secret with TLS turns `http://host/` into https upstream: port 443 unless given.
            let host_only = parse_authority(auth, 80)
                .map(|t| t.host)
                .unwrap_or_default();
            let tls_secret = secrets
                .iter()
                .any(|s| s.tls && s.host.eq_ignore_ascii_case(&host_only));
            let explicit = auth
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                && !auth.ends_with(']');
            let default_port = if tls_secret && !explicit { 443 } else { 80 };
            match parse_authority(auth, default_port) {
                Some(t) => (t, false, path),
                None => {
                    return self
                        .refuse(
                            conn,
                            decision(auth, 0, false, "bad request target"),
                            "400 Bad Request",
                        )
                        .await
                }
            }
        } else {
            return self
                .refuse(
                    conn,
                    decision(
                        target,
                        0,
                        false,
                        "only CONNECT and absolute http:// requests are proxied",
                    ),
                    "400 Bad Request",
                )
                .await;
        };
        if t.host.parse::<IpAddr>().is_ok() {
            return self
                .refuse(
                    conn,
                    decision(
                        &t.host,
                        t.port,
                        false,
                        "IP literals are refused; use a host name on the allow list",
                    ),
                    "403 Forbidden",
                )
                .await;
        }
        if !allowed(allow, &t.host) {
            return self
                .refuse(
                    conn,
                    decision(
                        &t.host,
                        t.port,
                        false,
                        "host is not on the box's network.allow list",
                    ),
                    "403 Forbidden",
                )
                .await;
        }
        let addrs: Vec<SocketAddr> = match self.cfg.overrides.get(&t.host.to_ascii_lowercase()) {
            Some(a) => vec![*a],
            None => match tokio::net::lookup_host((t.host.as_str(), t.port)).await {
                Ok(it) => {
                    let all: Vec<SocketAddr> = it.collect();
                    let ok: Vec<SocketAddr> = all
                        .iter()
                        .copied()
                        .filter(|a| !forbidden_ip(a.ip()))
                        .collect();
                    if ok.is_empty() {
                        let why = if all.is_empty() {
                            "name does not resolve"
                        } else {
                            "name resolves only to private or local addresses"
                        };
                        return self
                            .refuse(conn, decision(&t.host, t.port, false, why), "403 Forbidden")
                            .await;
                    }
                    ok
                }
                Err(_) => {
                    return self
                        .refuse(
                            conn,
                            decision(&t.host, t.port, false, "name does not resolve"),
                            "502 Bad Gateway",
                        )
                        .await
                }
            },
        };
        let mut upstream = None;
        for a in &addrs {
            if let Ok(Ok(s)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), TcpStream::connect(a))
                    .await
            {
                upstream = Some(s);
                break;
            }
        }
        let Some(mut up) = upstream else {
            return self
                .refuse(
                    conn,
                    decision(&t.host, t.port, false, "upstream unreachable"),
                    "502 Bad Gateway",
                )
                .await;
        };
        let secret = if connect {
            None
        } else {
            secrets
                .iter()
                .find(|s| s.host.eq_ignore_ascii_case(&t.host))
                .cloned()
        };
        if let Some(secret) = secret {
            let head_out = with_secret(&text, method, &path, version, &secret);
            let body_start = head[end..].to_vec();
            let d = self
                .forward_with_secret(conn, up, &t.host, head_out, body_start, secret.tls)
                .await;
            let mut dec = decision(
                &t.host,
                t.port,
                d.is_ok(),
                if d.is_ok() {
                    "allowed (secret injected)"
                } else {
                    "TLS to the upstream failed"
                },
            );
            if let Ok((u, dn)) = d {
                dec.bytes_up = u;
                dec.bytes_down = dn;
            }
            let _ = self.decisions.send(dec);
            return;
        }
        let mut sent_up = 0u64;
        if connect {
            if conn
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
        } else {
            // Rewrite the request line to origin form; pass the rest of the head through.
            let rest_of_head = &text[text.find("\r\n").unwrap_or(0)..];
            let line = format!("{method} {path} {version}{rest_of_head}");
            if up.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            sent_up += line.len() as u64;
        }
        // Bytes that arrived after the head belong to the stream.
        if end < head.len() {
            if up.write_all(&head[end..]).await.is_err() {
                return;
            }
            sent_up += (head.len() - end) as u64;
        }
        let (up_bytes, down_bytes) = tokio::io::copy_bidirectional(&mut conn, &mut up)
            .await
            .unwrap_or((0, 0));
        let mut d = decision(&t.host, t.port, true, "allowed");
        d.bytes_up = sent_up + up_bytes;
        d.bytes_down = down_bytes;
        let _ = self.decisions.send(d);
    }
}

/// Send the rewritten head and what the box already sent of the body, then splice.
async fn send_and_splice<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    conn: &mut UnixStream,
    mut s: S,
    head: &str,
    body_start: &[u8],
) -> std::io::Result<(u64, u64)> {
    s.write_all(head.as_bytes()).await?;
    s.write_all(body_start).await?;
    let (u, d) = tokio::io::copy_bidirectional(conn, &mut s)
        .await
        .unwrap_or((0, 0));
    Ok(((head.len() + body_start.len()) as u64 + u, d))
}

/// The request head with origin-form target, hop-by-hop proxy headers and any copy of the
/// secret's header removed, and the secret added.
fn with_secret(text: &str, method: &str, path: &str, version: &str, secret: &Secret) -> String {
    let mut out = format!("{method} {path} {version}\r\n");
    for line in text.split("\r\n").skip(1) {
        if line.is_empty() {
            continue;
        }
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case(&secret.header)
            || name.eq_ignore_ascii_case("proxy-connection")
            || name.eq_ignore_ascii_case("proxy-authorization")
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!("{}: {}\r\n\r\n", secret.header, secret.value));
    out
}

impl Egress {
    async fn forward_with_secret(
        &self,
        mut conn: UnixStream,
        up: TcpStream,
        host: &str,
        head: String,
        body_start: Vec<u8>,
        tls: bool,
    ) -> std::io::Result<(u64, u64)> {
        if tls {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let s = self.tls.connect(name, up).await?;
            send_and_splice(&mut conn, s, &head, &body_start).await
        } else {
            send_and_splice(&mut conn, up, &head, &body_start).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_replace_what_the_box_sent() {
        let sec = Secret {
            host: "api.x".into(),
            header: "Authorization".into(),
            value: "Bearer real".into(),
            tls: true,
        };
        let head = "GET http://api.x/v1 HTTP/1.1\r\nHost: api.x\r\nauthorization: Bearer fake\r\nProxy-Connection: keep-alive\r\n\r\n";
        let out = with_secret(head, "GET", "/v1", "HTTP/1.1", &sec);
        assert_eq!(
            out,
            "GET /v1 HTTP/1.1\r\nHost: api.x\r\nAuthorization: Bearer real\r\n\r\n"
        );
        assert!(
            !format!("{sec:?}").contains("real"),
            "Debug never prints the value"
        );
    }

    #[test]
    fn patterns_and_addresses() {
        let p = vec!["api.anthropic.com".to_string(), "*.example.com".to_string()];
        assert!(allowed(&p, "api.anthropic.com") && allowed(&p, "API.Anthropic.com."));
        assert!(allowed(&p, "a.example.com") && allowed(&p, "a.b.example.com"));
        assert!(
            !allowed(&p, "example.com")
                && !allowed(&p, "evilexample.com")
                && !allowed(&p, "anthropic.com")
        );
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(forbidden_ip(bad.parse().expect("ip")), "{bad}");
        }
        for good in ["1.1.1.1", "2606:4700::1111", "160.79.104.10"] {
            assert!(!forbidden_ip(good.parse().expect("ip")), "{good}");
        }
    }
}
