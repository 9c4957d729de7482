//! Plain-HTTP request heads as the proxy reads and rebuilds them, and body framing.

use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;

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
