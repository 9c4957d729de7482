//! The proxy itself: one box connection, a `CONNECT` tunnel or one plain-HTTP exchange.

use super::dns::LookupError;
use super::*;

impl Egress {
    pub(super) async fn handle(
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
pub(super) type Client = Tracked<UnixStream>;

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
