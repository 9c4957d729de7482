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
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    /// Per-box connection cap and timeouts of the proxy socket.
    pub connections: crate::ConnLimits,
    /// Bounds on name lookups (the system resolver blocks a thread per lookup).
    pub dns: DnsLimits,
    /// How names are resolved (the system resolver unless set; tests put a fake here).
    pub resolver: Resolver,
}

/// Bounds on name lookups. A lookup holds a blocking-pool thread until the resolver answers,
/// even after its requester gave up, so its permits are held until then too: one box never
/// holds more than `per_box` threads, and all boxes together no more than `global`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsLimits {
    pub per_box: usize,
    pub global: usize,
    /// Time a lookup has, waiting for a permit included; past it the request gets a 502.
    pub timeout: std::time::Duration,
}

impl Default for DnsLimits {
    fn default() -> Self {
        DnsLimits {
            per_box: 4,
            global: 64,
            timeout: std::time::Duration::from_secs(5),
        }
    }
}

type ResolveFn = dyn Fn(
        String,
        u16,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>,
    > + Send
    + Sync;

/// A name resolver: `(host, port)` to addresses.
#[derive(Clone)]
pub struct Resolver(Arc<ResolveFn>);

impl Resolver {
    pub fn new<F, Fut>(f: F) -> Resolver
    where
        F: Fn(String, u16) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        Resolver(Arc::new(move |h, p| Box::pin(f(h, p))))
    }

    /// The system resolver (`getaddrinfo` on tokio's blocking pool).
    pub fn system() -> Resolver {
        Resolver::new(|host: String, port: u16| async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// Why a lookup gave no addresses.
enum LookupError {
    Failed,
    TimedOut,
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

/// An IPv4 range that is not globally reachable: (first address, prefix length, name).
const V4_SPECIAL: [(u32, u8, &str); 16] = [
    (0x0000_0000, 8, "\"this network\" 0.0.0.0/8"),
    (0x0a00_0000, 8, "private 10.0.0.0/8"),
    (
        0x6440_0000,
        10,
        "shared address space (CGNAT) 100.64.0.0/10",
    ),
    (0x7f00_0000, 8, "loopback 127.0.0.0/8"),
    (
        0xa9fe_0000,
        16,
        "link-local 169.254.0.0/16 (cloud metadata)",
    ),
    (0xac10_0000, 12, "private 172.16.0.0/12"),
    (0xc000_0000, 24, "IETF protocol assignments 192.0.0.0/24"),
    (0xc000_0200, 24, "documentation 192.0.2.0/24"),
    (
        0xc058_6300,
        24,
        "deprecated 6to4 relay anycast 192.88.99.0/24",
    ),
    (0xc0a8_0000, 16, "private 192.168.0.0/16"),
    (0xc612_0000, 15, "benchmarking 198.18.0.0/15"),
    (0xc633_6400, 24, "documentation 198.51.100.0/24"),
    (0xcb00_7100, 24, "documentation 203.0.113.0/24"),
    (0xe000_0000, 4, "multicast 224.0.0.0/4"),
    (0xffff_ffff, 32, "limited broadcast 255.255.255.255/32"),
    (0xf000_0000, 4, "reserved 240.0.0.0/4"),
];

/// How an IPv6 range relates to IPv4.
#[derive(Clone, Copy)]
enum V6Kind {
    /// Not globally reachable, whatever it holds.
    Refused,
    /// Carries an IPv4 address in its low 32 bits: judged as that address.
    EmbedsLow32,
    /// 6to4: the IPv4 address is bits 16..48.
    Embeds6to4,
}

/// IPv6 ranges judged specially: (first address, prefix length, name, kind), most specific
/// first. Everything outside global unicast 2000::/3 is refused after these.
const V6_SPECIAL: [(u128, u8, &str, V6Kind); 16] = [
    (0, 128, "unspecified ::/128", V6Kind::Refused),
    (1, 128, "loopback ::1/128", V6Kind::Refused),
    (
        0xffff_0000_0000,
        96,
        "IPv4-mapped ::ffff:0:0/96",
        V6Kind::EmbedsLow32,
    ),
    (0, 96, "deprecated IPv4-compatible ::/96", V6Kind::Refused),
    (
        0x0064_ff9b << 96,
        96,
        "NAT64 64:ff9b::/96",
        V6Kind::EmbedsLow32,
    ),
    (
        0x0064_ff9b_0001 << 80,
        48,
        "local-use NAT64 64:ff9b:1::/48",
        V6Kind::Refused,
    ),
    (0x0100 << 112, 64, "discard-only 100::/64", V6Kind::Refused),
    (
        0x0100_0000_0000_0001 << 64,
        64,
        "dummy prefix 100:0:0:1::/64",
        V6Kind::Refused,
    ),
    (0x2001_0000 << 96, 32, "Teredo 2001::/32", V6Kind::Refused),
    (
        0x2001 << 112,
        23,
        "IETF protocol assignments 2001::/23",
        V6Kind::Refused,
    ),
    (
        0x2001_0db8 << 96,
        32,
        "documentation 2001:db8::/32",
        V6Kind::Refused,
    ),
    (0x2002 << 112, 16, "6to4 2002::/16", V6Kind::Embeds6to4),
    (
        0x3fff << 112,
        20,
        "documentation 3fff::/20",
        V6Kind::Refused,
    ),
    (0x5f00 << 112, 16, "SRv6 SIDs 5f00::/16", V6Kind::Refused),
    (0xfc00 << 112, 7, "unique local fc00::/7", V6Kind::Refused),
    (
        0xfec0 << 112,
        10,
        "deprecated site-local fec0::/10",
        V6Kind::Refused,
    ),
];

fn in_prefix(addr: u128, first: u128, len: u8, bits: u8) -> bool {
    let shift = u32::from(bits - len);
    if len == 0 {
        return true;
    }
    (addr >> shift) == (first >> shift)
}

/// Why `ip` is not globally reachable (the range it is in), or `None` when it is. IPv6 forms
/// that embed an IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4) are judged by that
/// address; link-local, multicast and everything outside 2000::/3 are refused.
pub fn ip_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let a = u32::from(v4);
            V4_SPECIAL
                .iter()
                .find(|(first, len, _)| in_prefix(u128::from(a), u128::from(*first), *len, 32))
                .map(|(_, _, name)| *name)
        }
        IpAddr::V6(v6) => {
            let a = u128::from(v6);
            for (first, len, name, kind) in V6_SPECIAL {
                if !in_prefix(a, first, len, 128) {
                    continue;
                }
                return match kind {
                    V6Kind::Refused => Some(name),
                    V6Kind::EmbedsLow32 => {
                        ip_class(IpAddr::V4(std::net::Ipv4Addr::from(a as u32))).map(|_| name)
                    }
                    V6Kind::Embeds6to4 => {
                        ip_class(IpAddr::V4(std::net::Ipv4Addr::from((a >> 80) as u32)))
                            .map(|_| name)
                    }
                };
            }
            if (a >> 120) == 0xff {
                return Some("multicast ff00::/8");
            }
            if (a >> 118) == (0xfe80 >> 6) {
                return Some("link-local fe80::/10");
            }
            if (a >> 125) != 1 {
                return Some("outside global unicast 2000::/3");
            }
            None
        }
    }
}

/// Addresses a box may never reach through the proxy.
pub fn forbidden_ip(ip: IpAddr) -> bool {
    ip_class(ip).is_some()
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
        Ok(tokio::spawn(crate::conn::accept_loop(
            listener,
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
        )))
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

    /// Resolve `host` within the lookup bounds. The lookup runs in its own task holding both
    /// permits, so a resolver that never answers keeps its slots (and only its slots) busy
    /// after this call has given up.
    async fn lookup(
        &self,
        dns_box: &Arc<tokio::sync::Semaphore>,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, LookupError> {
        let (global, resolver) = (self.dns_global.clone(), self.cfg.resolver.clone());
        let (dns_box, host) = (dns_box.clone(), host.to_string());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = async move {
            let Ok(_mine) = dns_box.acquire_owned().await else {
                return;
            };
            let Ok(_all) = global.acquire_owned().await else {
                return;
            };
            if tx.is_closed() {
                return;
            }
            let _ = tx.send((resolver.0)(host, port).await);
        };
        // Not awaited past the timeout: a lookup still queued for a permit then finds its
        // requester gone and never starts; one already running finishes, holding its permits.
        drop(tokio::spawn(work));
        match tokio::time::timeout(self.cfg.dns.timeout, rx).await {
            Ok(Ok(Ok(addrs))) => Ok(addrs),
            Ok(_) => Err(LookupError::Failed),
            Err(_) => Err(LookupError::TimedOut),
        }
    }

    async fn handle(
        &self,
        conn: &mut Client,
        box_id: &str,
        allow: &[String],
        secrets: &[Secret],
        dns_box: &Arc<tokio::sync::Semaphore>,
    ) {
        let decision = |host: &str, port: u16, allowed: bool, reason: &str| Decision {
            box_id: box_id.to_string(),
            host: host.to_string(),
            port,
            allowed,
            reason: reason.to_string(),
            bytes_up: 0,
            bytes_down: 0,
        };
        // Read the request head, within the header timeout.
        let mut buf = Vec::with_capacity(4096);
        let head = match tokio::time::timeout(
            self.cfg.connections.header_timeout,
            read_head(conn, &mut buf),
        )
        .await
        {
            Ok(Ok(Some(h))) => h,
            Ok(Err(e)) => {
                return self
                    .refuse(
                        conn,
                        decision("", 0, false, &format!("bad request head: {e}")),
                        "400 Bad Request",
                    )
                    .await
            }
            // Closed, or silent past the deadline.
            Ok(Ok(None)) | Err(_) => return,
        };
        let leftover = buf.split_off(head.len);
        let connect = head.method.eq_ignore_ascii_case("CONNECT");
        let (t, path) = if connect {
            match parse_authority(&head.target, 443) {
                Some(t) => (t, String::new()),
                None => {
                    return self
                        .refuse(
                            conn,
                            decision(&head.target, 0, false, "bad CONNECT target"),
                            "400 Bad Request",
                        )
                        .await
                }
            }
        } else if let Some(rest) = head.target.strip_prefix("http://") {
            let (auth, path) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].to_string()),
                None => (rest, "/".to_string()),
            };
            // A secret with TLS turns `http://host/` into https upstream: port 443 unless given.
            let host_only = parse_authority(auth, 80)
                .and_then(|t| normalize_host(&t.host))
                .unwrap_or_default();
            let tls_secret = secret_for(secrets, &host_only).is_some_and(|s| s.tls);
            let explicit = auth
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                && !auth.ends_with(']');
            let default_port = if tls_secret && !explicit { 443 } else { 80 };
            match parse_authority(auth, default_port) {
                Some(t) if !t.host.is_empty() && !t.host.contains('@') => (t, path),
                _ => {
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
                        &head.target,
                        0,
                        false,
                        "only CONNECT and absolute http:// requests are proxied",
                    ),
                    "400 Bad Request",
                )
                .await;
        };
        // One form of the name from here on (allow list, overrides, secrets, the head out).
        let mut t = t;
        t.host = match normalize_host(&t.host) {
            Some(h) => h,
            None => {
                return self
                    .refuse(
                        conn,
                        decision(&t.host, t.port, false, "bad host name"),
                        "400 Bad Request",
                    )
                    .await
            }
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
        // Plain HTTP: the head must describe one request to the target's own host.
        let framing = if connect {
            Framing::None
        } else {
            if let Err(why) = head.check_host(&t.host) {
                return self
                    .refuse(
                        conn,
                        decision(&t.host, t.port, false, why),
                        "400 Bad Request",
                    )
                    .await;
            }
            match head.framing() {
                Ok(f) => f,
                Err(why) => {
                    return self
                        .refuse(
                            conn,
                            decision(&t.host, t.port, false, why),
                            "400 Bad Request",
                        )
                        .await
                }
            }
        };
        let addrs: Vec<SocketAddr> = match self.cfg.overrides.get(&t.host) {
            Some(a) => vec![*a],
            None => match self.lookup(dns_box, &t.host, t.port).await {
                Ok(all) => {
                    let ok: Vec<SocketAddr> = all
                        .iter()
                        .copied()
                        .filter(|a| !forbidden_ip(a.ip()))
                        .collect();
                    if ok.is_empty() {
                        let why = match all.first().and_then(|a| ip_class(a.ip())) {
                            None => "name does not resolve".to_string(),
                            Some(class) => format!(
                                "name resolves only to addresses that are not globally reachable ({class})"
                            ),
                        };
                        return self
                            .refuse(
                                conn,
                                decision(&t.host, t.port, false, &why),
                                "403 Forbidden",
                            )
                            .await;
                    }
                    ok
                }
                Err(e) => {
                    let why = match e {
                        LookupError::Failed => "name does not resolve".to_string(),
                        LookupError::TimedOut => format!(
                            "name lookup timed out after {} s (this box's lookups are limited to {} at once)",
                            self.cfg.dns.timeout.as_secs_f32(),
                            self.cfg.dns.per_box
                        ),
                    };
                    return self
                        .refuse(
                            conn,
                            decision(&t.host, t.port, false, &why),
                            "502 Bad Gateway",
                        )
                        .await;
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
        if connect {
            if conn
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            // Bytes that arrived after the head belong to the tunnel.
            if !leftover.is_empty() && up.write_all(&leftover).await.is_err() {
                return;
            }
            let (u, d) = tokio::io::copy_bidirectional(conn, &mut up)
                .await
                .unwrap_or((0, 0));
            let mut dec = decision(&t.host, t.port, true, "allowed");
            dec.bytes_up = leftover.len() as u64 + u;
            dec.bytes_down = d;
            let _ = self.decisions.send(dec);
            return;
        }
        let secret = secret_for(secrets, &t.host).cloned();
        let tls = secret.as_ref().is_some_and(|s| s.tls);
        let default_port = if tls { 443 } else { 80 };
        let authority = if t.port == default_port {
            t.host.clone()
        } else {
            format!("{}:{}", t.host, t.port)
        };
        let head_out = head.rebuild(&path, &authority, secret.as_ref());
        let result = if tls {
            match rustls::pki_types::ServerName::try_from(t.host.clone()) {
                Ok(name) => match self.tls.connect(name, up).await {
                    Ok(s) => Ok(exchange(conn, s, &head_out, leftover, framing).await),
                    Err(e) => Err(e),
                },
                Err(e) => Err(std::io::Error::other(e.to_string())),
            }
        } else {
            Ok(exchange(conn, up, &head_out, leftover, framing).await)
        };
        let reason = match (&result, &secret) {
            (Ok(_), Some(_)) => "allowed (secret injected)",
            (Ok(_), None) => "allowed",
            (Err(_), _) => "TLS to the upstream failed",
        };
        let mut dec = decision(&t.host, t.port, result.is_ok(), reason);
        if let Ok((u, d)) = result {
            dec.bytes_up = u;
            dec.bytes_down = d;
        }
        let _ = self.decisions.send(dec);
    }
}

/// The box's side of a proxy connection.
type Client = Tracked<UnixStream>;

/// Read until a complete request head is in `buf` (more may follow it); `None` when the box
/// closed first.
async fn read_head(conn: &mut Client, buf: &mut Vec<u8>) -> Result<Option<RequestHead>, HeadError> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(h) = parse_head(buf)? {
            return Ok(Some(h));
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One request head as the box sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// (name, value) in order; values are what `httparse` accepted (no CR or LF in them).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes the head took in the buffer.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
}

/// Parse a request head from the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                Err(HeadError::TooLarge)
            } else {
                Ok(None)
            }
        }
        Ok(httparse::Status::Complete(len)) => {
            if len > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            Ok(Some(RequestHead {
                method: req.method.unwrap_or_default().to_string(),
                target: req.path.unwrap_or_default().to_string(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                    .collect(),
                len,
            }))
        }
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// How a request's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Headers that describe the hop between the box and the proxy: never passed on (the proxy
/// sets its own `Host` and `Connection`).
const PROXY_DROPS: [&str; 8] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

impl RequestHead {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The `Host` header, if any, must name `host` (its port is not compared: the proxy sends
    /// the target's own authority).
    pub fn check_host(&self, host: &str) -> Result<(), &'static str> {
        let hosts: Vec<&[u8]> = self.values("host").collect();
        match hosts.as_slice() {
            [] => Ok(()),
            [one] => {
                let v = String::from_utf8_lossy(one);
                let named = parse_authority(v.trim(), 80)
                    .map(|t| t.host)
                    .unwrap_or_default();
                let norm = |h: &str| h.trim_end_matches('.').to_ascii_lowercase();
                if norm(&named) == norm(host) {
                    Ok(())
                } else {
                    Err("the Host header names another host than the request target")
                }
            }
            _ => Err("more than one Host header"),
        }
    }

    /// The body's framing; refuses the ambiguous forms a smuggled request hides behind.
    pub fn framing(&self) -> Result<Framing, &'static str> {
        let te: Vec<&[u8]> = self.values("transfer-encoding").collect();
        let cl: Vec<&[u8]> = self.values("content-length").collect();
        match (te.as_slice(), cl.as_slice()) {
            ([], []) => Ok(Framing::None),
            ([t], []) if t.trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
            ([_], []) | ([_, ..], _) => Err("only chunked transfer-encoding is proxied"),
            ([], lens) => {
                let mut n = None;
                for l in lens {
                    let v = std::str::from_utf8(l)
                        .ok()
                        .map(str::trim)
                        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or("bad Content-Length")?;
                    if n.is_some_and(|m| m != v) {
                        return Err("conflicting Content-Length headers");
                    }
                    n = Some(v);
                }
                Ok(n.map(Framing::Length).unwrap_or(Framing::None))
            }
        }
    }

    /// The head sent upstream: origin-form target, the box's end-to-end headers (less any
    /// copy of the secret's header), the target's `Host`, the secret, `Connection: close`.
    pub fn rebuild(&self, path: &str, authority: &str, secret: Option<&Secret>) -> String {
        let mut out = format!("{} {path} HTTP/1.1\r\nHost: {authority}\r\n", self.method);
        for (name, value) in &self.headers {
            if PROXY_DROPS.contains(&name.as_str())
                || secret.is_some_and(|s| s.header.eq_ignore_ascii_case(name))
            {
                continue;
            }
            out.push_str(name);
            out.push_str(": ");
            out.push_str(&String::from_utf8_lossy(value));
            out.push_str("\r\n");
        }
        if let Some(s) = secret {
            out.push_str(&format!("{}: {}\r\n", s.header, s.value));
        }
        out.push_str("Connection: close\r\n\r\n");
        out
    }
}

/// Finds where a chunked body ends, passing its bytes through unchanged.
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd(u8),
    Trailer,
    Done,
}

const MAX_CHUNK_LINE: usize = 4096;

impl ChunkedEnd {
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// How many bytes of `b` belong to the body (all of them unless it ends inside `b`).
    pub fn advance(&mut self, b: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < b.len() {
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(n) => {
                    let take = (b.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd(2)
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd(k) => {
                    let want = if k == 2 { b'\r' } else { b'\n' };
                    if b[i] != want {
                        return Err("bad chunk ending");
                    }
                    i += 1;
                    self.state = if k == 2 {
                        ChunkState::DataEnd(1)
                    } else {
                        ChunkState::Size
                    };
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let c = b[i];
                    i += 1;
                    if c != b'\n' {
                        self.line.push(c);
                        if self.line.len() > MAX_CHUNK_LINE {
                            return Err("chunk line too long");
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = line
                        .strip_suffix(b"\r")
                        .ok_or("bare LF in a chunked body")?;
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                        continue;
                    }
                    let size = line.split(|&c| c == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size.trim_ascii())
                        .ok()
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or("bad chunk size")?;
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
            }
        }
        Ok(i)
    }
}

/// Send one request upstream (head, then exactly its framed body from what the box sent) while
/// the answer streams back, until the upstream closes; (bytes up, bytes down).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Client,
    up: S,
    head: &str,
    leftover: Vec<u8>,
    framing: Framing,
) -> (u64, u64) {
    let (mut up_r, mut up_w) = tokio::io::split(up);
    let (mut c_r, mut c_w) = tokio::io::split(conn);
    let send = async {
        up_w.write_all(head.as_bytes()).await?;
        let mut sent = head.len() as u64;
        let mut chunked = ChunkedEnd::default();
        let mut remaining = match framing {
            Framing::None | Framing::Length(0) => return Ok::<u64, std::io::Error>(sent),
            Framing::Length(n) => n,
            Framing::Chunked => u64::MAX,
        };
        let mut pending = leftover;
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if pending.is_empty() {
                let n = c_r.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::other("the box closed inside the body"));
                }
                pending.extend_from_slice(&chunk[..n]);
            }
            let take = match framing {
                Framing::Chunked => chunked.advance(&pending).map_err(std::io::Error::other)?,
                _ => pending
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX)),
            };
            up_w.write_all(&pending[..take]).await?;
            sent += take as u64;
            // Whatever follows the body (a pipelined request) is never forwarded.
            pending.clear();
            if framing != Framing::Chunked {
                remaining -= take as u64;
            }
            if remaining == 0 || chunked.done() {
                return Ok(sent);
            }
        }
    };
    let mut sent_up = 0u64;
    let down = {
        let answer = tokio::io::copy(&mut up_r, &mut c_w);
        tokio::pin!(send, answer);
        let mut sending = true;
        loop {
            tokio::select! {
                r = &mut send, if sending => {
                    sending = false;
                    match r {
                        Ok(n) => sent_up = n,
                        // The request could not be completed: nothing more to wait for.
                        Err(_) => break 0,
                    }
                }
                r = &mut answer => break r.unwrap_or(0),
            }
        }
    };
    let _ = c_w.shutdown().await;
    (sent_up, down)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> Option<&'static str> {
        ip_class(ip.parse().expect("ip"))
    }

    #[test]
    fn every_special_ipv4_range_is_refused_at_both_ends() {
        for (first, len, name) in V4_SPECIAL {
            let last = first | (u32::MAX >> len.min(31)) & if len == 32 { 0 } else { u32::MAX };
            for a in [first, last] {
                let ip = std::net::Ipv4Addr::from(a);
                assert!(ip_class(IpAddr::V4(ip)).is_some(), "{ip} ({name})");
            }
            // Just below the range is another range or public; just above, likewise: the
            // table's names say which one matched.
            assert_eq!(
                ip_class(IpAddr::V4(std::net::Ipv4Addr::from(first))),
                Some(name)
            );
        }
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private 10."),
            ("172.16.0.1", "private 172.16"),
            ("172.31.255.255", "private 172.16"),
            ("192.168.1.1", "private 192.168"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "CGNAT"),
            ("100.127.255.255", "CGNAT"),
            ("0.0.0.0", "this network"),
            ("192.0.0.8", "IETF"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.1", "documentation"),
            ("203.0.113.1", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("192.88.99.1", "6to4 relay"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.255", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
        ] {
            let got = class(ip).unwrap_or("public");
            assert!(got.contains(want), "{ip}: {got}");
        }
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "160.79.104.10",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "11.0.0.0",
            "126.255.255.255",
            "128.0.0.0",
        ] {
            assert_eq!(class(good), None, "{good}");
        }
    }

    #[test]
    fn every_special_ipv6_range_is_refused_at_both_ends() {
        for (first, len, name, _) in V6_SPECIAL {
            let last = if len == 128 {
                first
            } else {
                first | (u128::MAX >> len)
            };
            for a in [first, last] {
                let ip = std::net::Ipv6Addr::from(a);
                // The ends of an embedding range carry 0.0.0.0 and 255.255.255.255: refused.
                assert!(ip_class(IpAddr::V6(ip)).is_some(), "{ip} ({name})");
            }
        }
    }

    #[test]
    fn ipv6_ranges_and_the_ipv4_they_embed() {
        for (ip, want) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::a00:1", "IPv4-compatible"),
            ("::8.8.8.8", "IPv4-compatible"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("64:ff9b:1:ffff::808:808", "local-use NAT64"),
            ("100::1", "discard-only"),
            ("100:0:0:1::1", "dummy prefix"),
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:2::1", "IETF protocol"),
            ("2001:1ff::1", "IETF protocol"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("3fff:fff::1", "documentation"),
            ("5f00::1", "SRv6"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("feff::1", "site-local"),
            ("ff02::1", "multicast"),
            ("4000::1", "outside global unicast"),
            ("1000::1", "outside global unicast"),
            // IPv4-mapped, NAT64 and 6to4 are judged by the IPv4 address they carry.
            ("::ffff:127.0.0.1", "IPv4-mapped"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
            ("::ffff:169.254.169.254", "IPv4-mapped"),
            ("64:ff9b::127.0.0.1", "NAT64"),
            ("64:ff9b::a9fe:a9fe", "NAT64"),
            ("64:ff9b::192.168.0.1", "NAT64"),
            ("2002:7f00:1::1", "6to4"),
            ("2002:a00:1::", "6to4"),
            ("2002:c0a8:101::1", "6to4"),
            ("2002:a9fe:a9fe::1", "6to4"),
        ] {
            let got = class(ip).unwrap_or("public");
            assert!(got.contains(want), "{ip}: {got}");
        }
        for good in [
            "2606:4700::1111",
            "2a00:1450:4001::200e",
            "2001:200::1",
            "2620:4f:8000::1",
            "3ffe::1",
            "3fff:1000::1",
            // Embedding a public IPv4 address.
            "::ffff:8.8.8.8",
            "::ffff:160.79.104.10",
            "64:ff9b::8.8.8.8",
            "64:ff9b::a04f:680a",
            "2002:808:808::1",
        ] {
            assert_eq!(class(good), None, "{good}");
        }
    }

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

    fn head(text: &str) -> RequestHead {
        parse_head(text.as_bytes())
            .expect("parses")
            .expect("complete")
    }

    #[test]
    fn the_head_is_rebuilt_with_the_secret_and_the_targets_host() {
        let sec = Secret {
            host: "api.x".into(),
            header: "Authorization".into(),
            value: "Bearer real".into(),
            tls: true,
        };
        let h = head("GET http://api.x/v1 HTTP/1.1\r\nHost: API.x\r\nauthorization: Bearer fake\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n");
        assert_eq!(h.check_host("api.x"), Ok(()));
        assert_eq!(
            h.rebuild("/v1", "api.x", Some(&sec)),
            "GET /v1 HTTP/1.1\r\nHost: api.x\r\naccept: */*\r\nAuthorization: Bearer real\r\nConnection: close\r\n\r\n"
        );
        assert!(
            !format!("{sec:?}").contains("real"),
            "Debug never prints the value"
        );
        // A Host naming another host is refused (the secret would go with it).
        let h = head("GET http://api.x/ HTTP/1.1\r\nHost: evil.test\r\n\r\n");
        assert!(h.check_host("api.x").is_err());
        let h = head("GET http://api.x/ HTTP/1.1\r\nHost: api.x\r\nHost: evil.test\r\n\r\n");
        assert!(h.check_host("api.x").is_err());
        let h = head("GET http://api.x/ HTTP/1.1\r\nHost: api.x:8080\r\n\r\n");
        assert_eq!(h.check_host("api.x"), Ok(()), "the port is not compared");
    }

    #[test]
    fn framing_refuses_ambiguous_bodies() {
        let f = |extra: &str| {
            head(&format!(
                "POST http://a/ HTTP/1.1\r\nHost: a\r\n{extra}\r\n"
            ))
            .framing()
        };
        assert_eq!(f(""), Ok(Framing::None));
        assert_eq!(f("Content-Length: 5\r\n"), Ok(Framing::Length(5)));
        assert_eq!(
            f("Content-Length: 5\r\nContent-Length: 5\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(f("Transfer-Encoding: chunked\r\n"), Ok(Framing::Chunked));
        for bad in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert!(f(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_bodies_end_where_they_end_whatever_the_split() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n";
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"GET http://evil/ HTTP/1.1\r\n\r\n");
        for split in 1..with_next.len() {
            let mut c = ChunkedEnd::default();
            let mut used = 0;
            for part in with_next.chunks(split) {
                used += c.advance(part).expect("valid");
                if c.done() {
                    break;
                }
            }
            assert!(c.done(), "split {split}");
            assert_eq!(used, body.len(), "split {split}");
        }
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(ChunkedEnd::default().advance(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn heads_that_are_not_http_are_refused() {
        assert_eq!(
            parse_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n"),
            Ok(None)
        );
        assert!(parse_head(b"GET http://a/ HTTP/1.1\r\nBad Header\r\n\r\n").is_err());
        assert!(parse_head(b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n").is_err());
        let huge = format!("GET http://a/ HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(huge.as_bytes()), Err(HeadError::TooLarge));
    }
}
