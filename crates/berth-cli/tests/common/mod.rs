//! A real `berth serve` process on a free loopback port, with its own data dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

pub struct Server {
    pub url: String,
    pub admin: String,
    pub data: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Server {
    pub async fn start(data: &Path) -> Server {
        Self::start_with(data, &[]).await
    }

    pub async fn start_with(data: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_bin(Path::new(env!("CARGO_BIN_EXE_berth")), data, env).await
    }

    /// Start a given `berth` binary (e.g. a copy without the helper beside it).
    pub async fn start_bin(bin: &Path, data: &Path, env: &[(&str, &str)]) -> Server {
        Self::launch(tokio::process::Command::new(bin), data, env).await
    }

    /// Start `berth serve` with its open-file limit (soft and hard) set to `nofile` (through
    /// `prlimit`, which execs the server: `pid` is the server's).
    pub async fn start_nofile(data: &Path, env: &[(&str, &str)], nofile: u32) -> Server {
        let mut cmd = tokio::process::Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg(env!("CARGO_BIN_EXE_berth"));
        Self::launch(cmd, data, env).await
    }

    async fn launch(mut cmd: tokio::process::Command, data: &Path, env: &[(&str, &str)]) -> Server {
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env("BERTH_LOG", "warn")
            .env_remove("BERTH_URL")
            .env_remove("BERTH_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if !env.iter().any(|(k, _)| *k == "BERTH_DATABASE_URL") {
            if let Some(url) = test_database(data).await {
                cmd.env("BERTH_DATABASE_URL", url);
            }
        }
        let mut child = cmd.spawn().expect("spawn berth serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("server start timed out")
            .expect("read")
            .expect("server exited before listening");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("url in the ready line")
            .to_string();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let admin = std::fs::read_to_string(data.join("admin.key"))
            .expect("admin key")
            .trim()
            .to_string();
        Server {
            url,
            admin,
            data: data.to_path_buf(),
            child: Some(child),
        }
    }

    pub fn client(&self) -> Api {
        Api::new(&self.url, &self.admin)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).expect("pid") as i32
    }

    /// SIGKILL, as a crash would.
    pub async fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().expect("kill");
            c.wait().await.expect("wait");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("child");
        // SAFETY: signalling the server this test started.
        unsafe { libc::kill(c.id().expect("pid") as i32, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(30), c.wait())
            .await
            .expect("graceful stop in time")
            .expect("wait")
    }
}

/// With `BERTH_TEST_STORE=postgres` (`scripts/test`'s second run) a server keeps its state on
/// the PostgreSQL server `BERTH_TEST_DATABASE_URL` names, in a database of its own named after
/// its data dir (a restart on the same data dir finds the same state); else SQLite in the data
/// dir.
pub async fn test_database(data: &Path) -> Option<String> {
    use sha2::Digest;
    if std::env::var("BERTH_TEST_STORE").ok()? != "postgres" {
        return None;
    }
    let admin = std::env::var("BERTH_TEST_DATABASE_URL").expect("BERTH_TEST_DATABASE_URL");
    let digest = sha2::Sha256::digest(data.as_os_str().as_encoded_bytes());
    let name = format!("berth_{}", &hex::encode(digest)[..20]);
    Some(
        berth_store::postgres::ensure_database(&admin, &name)
            .await
            .expect("test database"),
    )
}

#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: String,
    pub http: reqwest::Client,
}

pub struct Resp {
    pub status: u16,
    pub json: serde_json::Value,
    pub bytes: Vec<u8>,
}

impl Api {
    pub fn new(url: &str, token: &str) -> Api {
        Api {
            url: url.to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Resp {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .http
            .request(m, format!("{}{}", self.url, path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        Self::finish(rb).await
    }

    pub async fn raw(&self, rb: reqwest::RequestBuilder) -> Resp {
        Self::finish(rb).await
    }

    async fn finish(rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let bytes = r.bytes().await.expect("body").to_vec();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Resp {
            status,
            json,
            bytes,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None).await
    }
    pub async fn post(&self, path: &str, body: serde_json::Value) -> Resp {
        self.call("POST", path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Resp {
        self.call("DELETE", path, None).await
    }

    /// A session's events until (and including) the `n`-th event of `kind`.
    pub async fn until(&self, sid: &str, kind: &str, n: usize) -> Vec<serde_json::Value> {
        let mut evs: Vec<serde_json::Value> = Vec::new();
        while evs.iter().filter(|e| e["type"] == kind).count() < n {
            let after = evs
                .last()
                .map(|e| e["seq"].as_i64().expect("seq"))
                .unwrap_or(0);
            let more = self
                .sse(&format!("/v1/sessions/{sid}/events?after={after}"), None, 1)
                .await;
            assert!(
                !more.is_empty(),
                "stream ended before {n} {kind} events: {evs:?}"
            );
            evs.extend(more);
        }
        evs
    }

    /// The same server and key as a `berth-client` client.
    pub fn typed(&self) -> berth_client::Client {
        berth_client::Client::new(&self.url, &self.token)
    }

    /// Read SSE events from `path` until `n` events arrived or the stream ended: one
    /// connection (no resume, so that a server that breaks a stream fails the test), frames
    /// parsed by `berth-client`.
    pub async fn sse(
        &self,
        path: &str,
        last_event_id: Option<i64>,
        n: usize,
    ) -> Vec<serde_json::Value> {
        use futures::StreamExt;
        let frames = match self.typed().sse(path, last_event_id).await {
            Ok(f) => f,
            Err(e) => panic!("sse {path}: {e}"),
        };
        let mut frames = std::pin::pin!(frames);
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while out.len() < n {
            let frame = match tokio::time::timeout_at(deadline, frames.next()).await {
                Ok(Some(f)) => f.expect("frame"),
                Ok(None) => break,
                Err(_) => panic!("timed out waiting for events; got {out:?}"),
            };
            if frame.data.is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&frame.data).expect("event json");
            assert_eq!(
                Some(v["seq"].as_i64().expect("seq")),
                frame.id.as_deref().and_then(|id| id.trim().parse().ok()),
                "SSE id matches seq"
            );
            out.push(v);
        }
        out
    }

    /// Poll a JSON resource until `pred` holds (bounded; used for state changes the server
    /// makes on its own, such as idle timeouts).
    pub async fn wait_for(
        &self,
        path: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.get(path).await;
            if pred(&r.json) {
                return r.json;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached on {path}: {}",
                r.json
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The pinned Claude Code CLI the tests drive (`BERTH_CLAUDE_BIN`, else where `scripts/setup`
/// installs it).
pub fn claude_bin() -> String {
    std::env::var("BERTH_CLAUDE_BIN")
        .unwrap_or_else(|_| "/opt/berth/claude-code-2.1.328/node_modules/.bin/claude".into())
}

/// A new key for `tenant` (an admin call); returns (key id, a client holding the key).
pub async fn tenant_key(admin: &Api, tenant: &str) -> (String, Api) {
    let r = admin
        .post("/v1/keys", serde_json::json!({"tenant": tenant}))
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    (
        r.json["id"].as_str().expect("id").to_string(),
        Api::new(&admin.url, r.json["key"].as_str().expect("key")),
    )
}

/// Run `script` with `sh -c` in a box (at most `timeout_s`); the exec's JSON answer.
pub async fn exec_sh(api: &Api, bx: &str, script: &str, timeout_s: u64) -> serde_json::Value {
    let r = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            serde_json::json!({"argv": ["/bin/sh", "-c", script], "timeout_s": timeout_s}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json
}

/// A client-driven (sdk) session's relay socket.
pub type SdkWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open an sdk session's relay (`GET /v1/sessions/{id}/sdk`) from `offset` bytes of its
/// output, with the key as a bearer header; within 10 s.
pub async fn sdk_connect(api: &Api, sid: &str, offset: u64) -> SdkWs {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/v1/sessions/{sid}/sdk?stdout_offset={offset}",
        api.url.replacen("http", "ws", 1)
    );
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.token).parse().expect("header"),
    );
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    ws
}

/// The test venv's Python (`scripts/test` installs the pinned SDKs into it).
pub fn venv_python() -> String {
    let venv = std::env::var("BERTH_TEST_VENV").unwrap_or_else(|_| "/opt/berth/test-venv".into());
    format!("{venv}/bin/python")
}

/// Run an official-SDK script against the server's Managed Agents API (`BERTH_ANTHROPIC_URL`,
/// `BERTH_KEY`, no ambient Anthropic variables), within 300 s; it must succeed, and its last
/// stdout line is its JSON result.
pub async fn run_sdk_script(
    mut cmd: tokio::process::Command,
    srv: &Server,
    key: &str,
) -> serde_json::Value {
    let run = cmd
        .env("BERTH_ANTHROPIC_URL", format!("{}/anthropic", srv.url))
        .env("BERTH_KEY", key)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the SDK script finished in time")
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("json line")
}

/// A TLS acceptor for `name` with a certificate from a fresh test CA, and the CA's PEM file
/// (written into `dir`) for the client side to trust.
pub fn tls_acceptor(dir: &Path, name: &str) -> (tokio_rustls::TlsAcceptor, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "berth test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec![name.to_string()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write ca");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("cert");
    (tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), ca_file)
}

/// A TLS terminator on loopback in front of `backend` (host:port): its port, the CA's PEM
/// file, and how many TLS handshakes it completed.
pub async fn tls_front(dir: &Path, backend: String) -> (u16, PathBuf, Arc<AtomicUsize>) {
    let (acceptor, ca_file) = tls_acceptor(dir, "127.0.0.1");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, backend, counted) = (acceptor.clone(), backend.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, ca_file, handshakes)
}
