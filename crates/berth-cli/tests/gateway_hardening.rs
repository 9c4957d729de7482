//! The host services a box reaches (model gateway, egress proxy, box-side API), attacked from
//! inside real native boxes: routes off the gateway's list, Host swaps and pipelined or
//! smuggled requests through the proxy, and a connection flood, while another tenant's execs
//! stay fast.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{claude_bin, Api, Server};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REAL_KEY: &str = "sk-ant-real-secret-for-hardening-0123456789";

async fn boxed(api: &Api, body: Value) -> String {
    let r = api.post("/v1/boxes", body).await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

/// Run a shell script in a box; (exit code, stdout, stderr).
async fn sh(api: &Api, bx: &str, script: &str, timeout_s: u64) -> (i64, String, String) {
    run(api, bx, &["/bin/sh", "-c", script], timeout_s).await
}

/// Run a program in a box; (exit code, stdout, stderr).
async fn run(api: &Api, bx: &str, argv: &[&str], timeout_s: u64) -> (i64, String, String) {
    let r = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": argv, "timeout_s": timeout_s}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    (
        r.json["exit_code"].as_i64().unwrap_or(-1),
        r.json["stdout"].as_str().unwrap_or("").to_string(),
        r.json["stderr"].as_str().unwrap_or("").to_string(),
    )
}

/// A plain HTTP server standing in for an allowed service; records (Host, path, the secret
/// header) of every request it serves.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

async fn web() -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let s = s.clone();
        async move {
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string()
            };
            let row = (h("host"), req.uri().path().to_string(), h("x-api-token"));
            if let Ok(mut v) = s.lock() {
                v.push(row.clone());
            }
            format!("served {} token={}", row.1, row.2)
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (port, seen)
}

/// A raw TCP server for `raw.test`: answers the first request head with `served <path>`,
/// half-closes, and records every byte the proxy sent on the connection (so a request the
/// proxy passed on after the first one shows, whatever an HTTP server would do with it).
async fn raw_web() -> (u16, Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let got: Arc<Mutex<Vec<u8>>> = Arc::default();
    let g = got.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                let mut answered = false;
                while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                    // Recorded as it arrives: the test reads it as soon as its client is done.
                    if let Ok(mut v) = g.lock() {
                        v.extend_from_slice(&buf[..n]);
                    }
                    if !answered && all.windows(4).any(|w| w == b"\r\n\r\n") {
                        answered = true;
                        let text = String::from_utf8_lossy(&all).into_owned();
                        let path = text.split_whitespace().nth(1).unwrap_or("?").to_string();
                        let body = format!("served {path}");
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                }
            });
        }
    });
    (port, got)
}

fn paths(seen: &Seen) -> Vec<String> {
    seen.lock()
        .map(|v| v.iter().map(|r| r.1.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn egress_decides_every_request_and_sends_a_secret_only_to_its_host() {
    let (port, seen) = web().await;
    let dir = tempfile::tempdir().expect("tmp");
    let (raw, raw_got) = raw_web().await;
    let overrides = format!(
        "secret.test=127.0.0.1:{port},other.test=127.0.0.1:{port},raw.test=127.0.0.1:{raw}"
    );
    let srv = Server::start_with(dir.path(), &[("BERTH_EGRESS_OVERRIDES", &overrides)]).await;
    let api = srv.client();
    let value = "plain-secret-0xfeedface";
    let bx = boxed(
        &api,
        json!({"resources": {"memory_mib": 256, "disk_mib": 64},
               "network": {"allow": ["secret.test", "raw.test"]},
               "secrets": [{"host": "secret.test", "header": "x-api-token", "value": value, "tls": false}]}),
    )
    .await;

    // The secret goes with a request to its own host.
    let (_, out, _) = sh(
        &api,
        &bx,
        &format!("curl -s http://secret.test:{port}/ok"),
        30,
    )
    .await;
    assert_eq!(out, format!("served /ok token={value}"));

    // A Host header naming another host: refused, and the secret goes nowhere.
    let (_, out, _) = sh(
        &api,
        &bx,
        &format!(
            "curl -s -w ' %{{http_code}}' -H 'Host: other.test' http://secret.test:{port}/hostswap"
        ),
        30,
    )
    .await;
    assert!(out.ends_with(" 400") && out.contains("Host"), "{out}");
    assert!(!paths(&seen).contains(&"/hostswap".to_string()));

    // Two requests in one write on one connection: the first is served, the second (for a
    // host off the list) never leaves the proxy, and the connection closes after the answer.
    let pipelined = format!(
        r#"
import socket
s = socket.create_connection(("127.0.0.1", 47101), timeout=10)
s.sendall(b"GET http://raw.test:{raw}/first HTTP/1.1\r\nHost: raw.test:{raw}\r\n\r\n"
          b"GET http://other.test:{raw}/second HTTP/1.1\r\nHost: other.test:{raw}\r\n\r\n")
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
print(out.count(b"HTTP/1.1 "), out.count(b"served /first"))
"#
    );
    let (_, out, err) = run(&api, &bx, &["python3", "-c", &pipelined], 30).await;
    assert_eq!(out.trim(), "1 1", "{out}{err}");
    // A request hidden in a chunked body after its last chunk, and one on a kept-alive
    // connection after the first answer.
    let smuggle = format!(
        r#"
import socket
s = socket.create_connection(("127.0.0.1", 47101), timeout=10)
s.sendall(b"POST http://raw.test:{raw}/chunked HTTP/1.1\r\nHost: raw.test:{raw}\r\nTransfer-Encoding: chunked\r\n\r\n"
          b"3\r\nabc\r\n0\r\n\r\nGET http://other.test:{raw}/smuggled HTTP/1.1\r\nHost: other.test:{raw}\r\n\r\n")
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
s2 = socket.create_connection(("127.0.0.1", 47101), timeout=10)
s2.sendall(b"GET http://raw.test:{raw}/keepalive HTTP/1.1\r\nHost: raw.test:{raw}\r\nConnection: keep-alive\r\n\r\n")
first = s2.recv(65536)
try:
    s2.sendall(b"GET http://other.test:{raw}/second-on-keepalive HTTP/1.1\r\nHost: other.test:{raw}\r\n\r\n")
    rest = s2.recv(65536)
except OSError:
    rest = b""
print(out.count(b"HTTP/1.1 "), b"served /keepalive" in first, len(rest))
"#
    );
    let (_, out, err) = run(&api, &bx, &["python3", "-c", &smuggle], 30).await;
    assert_eq!(out.trim(), "1 True 0", "{out}{err}");
    let p = paths(&seen);
    let raw_bytes = String::from_utf8_lossy(&raw_got.lock().expect("raw").clone()).into_owned();
    for never in ["/second", "/smuggled", "/second-on-keepalive", "/hostswap"] {
        assert!(
            !p.contains(&never.to_string()) && !raw_bytes.contains(never),
            "{never} got through: {p:?} {raw_bytes:?}"
        );
    }
    for sent in ["/first", "/chunked", "/keepalive"] {
        assert!(
            raw_bytes.contains(sent),
            "{sent} never arrived: {raw_bytes:?}"
        );
    }

    // Address literals in any form, including IPv6 forms that embed a loopback IPv4 address.
    for target in [
        "127.0.0.1",
        "[::ffff:127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::1]",
        "[::127.0.0.1]",
        "[fec0::1]",
    ] {
        // Forced through the proxy: as a plain request, and as a CONNECT.
        let (_, out, _) = sh(
            &api,
            &bx,
            &format!("curl -s -o /dev/null -w '%{{http_code}}' --noproxy '' http://{target}:{port}/; echo; curl -s -o /dev/null -w '%{{http_connect}}' --noproxy '' --proxytunnel http://{target}:{port}/"),
            30,
        )
        .await;
        assert_eq!(out, "403\n403", "{target}");
    }
    // The server still answers its operator.
    assert_eq!(api.get(&format!("/v1/boxes/{bx}")).await.status, 200);
    srv.stop().await;
}

#[tokio::test]
async fn the_gateway_refuses_routes_off_its_list_from_inside_a_box() {
    let mut sc = Scenario::demo();
    let rule: berth_mock_model::scenario::Rule = serde_json::from_value(json!({
        "match": "keep your token",
        "steps": [
            {"tool_use": [{"name": "Bash", "input": {"command": "printenv ANTHROPIC_API_KEY > /workspace/tok.txt", "description": "save"}}]},
            {"text": "kept"}
        ]
    }))
    .expect("rule");
    sc.rules.insert(0, rule);
    let mock = Mock::new(sc, Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let bin = claude_bin();
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_UPSTREAM_URL", &mock_url),
            ("ANTHROPIC_API_KEY", REAL_KEY),
            ("BERTH_CLAUDE_BIN", &bin),
        ],
    )
    .await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"resources": {"memory_mib": 1024, "disk_mib": 256}},
                   "agent": {"kind": "claude"}, "prompt": "keep your token", "keep_open": true}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    let bx = r.json["box_id"].as_str().expect("box").to_string();
    api.until(&sid, "result", 1).await;
    let before = mock.recorded().len();
    assert!(before >= 2, "the agent's own turns went through");

    let curl = |method: &str, path: &str, extra: &str| {
        format!(
            "curl -s -o /tmp/body -w '%{{http_code}}' --noproxy '*' -X {method} -H \"x-api-key: $(cat /workspace/tok.txt)\" {extra} 'http://127.0.0.1:47100{path}'; echo; cat /tmp/body"
        )
    };
    for (method, path) in [
        ("GET", "/_mock/requests"),
        ("DELETE", "/_mock/requests"),
        ("POST", "/v1/messages/batches"),
        ("GET", "/v1/files"),
        ("POST", "/v1/complete"),
        ("POST", "/v1/messages/cache_touch"),
        ("POST", "/v1/messages/../files"),
    ] {
        let extra = format!(
            "--path-as-is -H '{}: {}' -H 'content-type: application/json' -d '{{}}'",
            berth_mock_model::INSPECT_HEADER,
            mock.inspect_token()
        );
        let (_, out, _) = sh(&api, &bx, &curl(method, path, &extra), 30).await;
        let (code, body) = out.split_once('\n').unwrap_or((&out, ""));
        assert_eq!(code, "403", "{method} {path}: {out}");
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        assert_eq!(
            v["error"]["type"], "permission_error",
            "{method} {path}: {out}"
        );
    }
    // The same token still works for the Messages API (the refusals were not about it).
    let (_, out, _) = sh(
        &api,
        &bx,
        &curl(
            "POST",
            "/v1/messages",
            r#"-H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' -d '{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'"#,
        ),
        30,
    )
    .await;
    assert!(out.starts_with("200\n"), "{out}");
    let seen = mock.recorded();
    assert_eq!(
        seen.len(),
        before + 1,
        "only the allowed call reached the model"
    );
    assert!(seen.iter().all(|r| r.api_key_is(REAL_KEY)));
    assert!(
        !serde_json::to_string(&seen)
            .unwrap_or_default()
            .contains(REAL_KEY),
        "the mock's record holds no key"
    );
    srv.stop().await;
}

/// p99 (with 20 samples: the largest but one) of `/bin/true` exec round trips in `bx`.
async fn exec_p99(api: &Api, bx: &str) -> Duration {
    let mut t = Vec::new();
    for _ in 0..60 {
        let t0 = Instant::now();
        let r = api
            .post(
                &format!("/v1/boxes/{bx}/exec"),
                json!({"argv": ["/bin/true"], "timeout_s": 30}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
        t.push(t0.elapsed());
    }
    t.sort();
    t[t.len() - 2]
}

/// Opens N silent connections to each bridged port in turn, then waits (bounded) until every
/// one was answered or closed: one over the cap gets a 503 at once, an accepted one is closed by
/// the header timeout. (The box's own supervisor spends two threads per bridged connection, so
/// a box cannot hold thousands at once; a few hundred per port is what it can.)
const FLOOD: &str = r#"
import json, resource, selectors, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
N = int(sys.argv[1])
out = {}
for i, port in enumerate((47100, 47101, 47102)):
    socks, failed = [], 0
    t0 = time.time()
    for _ in range(N):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            socks.append(s)
        except OSError:
            failed += 1
    r = {"opened": len(socks), "failed": failed, "refused": 0, "closed_silent": 0,
         "open_secs": round(time.time() - t0, 2)}
    if i == 0:
        open("/workspace/flood-open", "w").close()
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    pending = len(socks)
    deadline = time.time() + float(sys.argv[2])
    while pending and time.time() < deadline:
        for key, _ in sel.select(timeout=0.5):
            try:
                b = key.fileobj.recv(4096)
            except OSError:
                b = b""
            r["refused" if b.startswith(b"HTTP/1.1 503") else "closed_silent"] += 1
            sel.unregister(key.fileobj)
            key.fileobj.close()
            pending -= 1
    r["open_at_end"] = pending
    for s in socks:
        s.close()
    out[port] = r
print(json.dumps(out))
"#;

#[tokio::test]
async fn a_connection_flood_is_capped_and_other_tenants_stay_fast() {
    let dir = tempfile::tempdir().expect("tmp");
    let cap = 32;
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_BOX_MAX_CONNECTIONS", "32"),
            ("BERTH_BOX_HEADER_TIMEOUT_SECS", "3"),
        ],
    )
    .await;
    let admin = srv.client();
    let other = {
        let r = admin.post("/v1/keys", json!({"tenant": "bystander"})).await;
        assert_eq!(r.status, 201, "{}", r.json);
        Api::new(&admin.url, r.json["key"].as_str().expect("key"))
    };
    let res = json!({"resources": {"memory_mib": 256, "disk_mib": 64}});
    let flooder = boxed(&admin, res.clone()).await;
    let quiet = boxed(&other, res).await;
    // A client that opens a connection and says nothing is closed after the header timeout.
    let silent = "import socket, time\ns = socket.create_connection((\"127.0.0.1\", 47100), timeout=20)\nt = time.time()\nb = s.recv(1)\nprint(len(b), round(time.time() - t, 1))";
    let (_, out, err) = run(&admin, &flooder, &["python3", "-c", silent], 30).await;
    let mut it = out.split_whitespace();
    assert_eq!(it.next(), Some("0"), "{out}{err}");
    let secs: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(-1.0);
    assert!(
        (2.5..8.0).contains(&secs),
        "closed after {secs} s: {out}{err}"
    );

    let idle_before = exec_p99(&other, &quiet).await;
    let per_port = 150;
    let flood = {
        let admin = admin.clone();
        let flooder = flooder.clone();
        tokio::spawn(async move {
            let n = per_port.to_string();
            run(&admin, &flooder, &["python3", "-c", FLOOD, &n, "15"], 90).await
        })
    };
    // Measure while the flood's connections are open.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Through the files API: an exec in the flooding box would compete with the flood.
        let r = admin
            .get(&format!("/v1/boxes/{flooder}/files/flood-open"))
            .await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flood never opened its connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = exec_p99(&other, &quiet).await;
    let (_, out, err) = flood.await.expect("flood task");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("{out}{err}"));
    // The idle figure is taken before and after the flood (the larger counts): the machine's
    // own load drifts, and the flood must not be blamed for that.
    let idle_after = exec_p99(&other, &quiet).await;
    let idle = idle_before.max(idle_after);
    eprintln!(
        "flood: {v}; bystander exec p99 idle {idle_before:?} / {idle_after:?}, during the flood {during:?}"
    );
    for port in ["47100", "47101", "47102"] {
        let p = &v[port];
        let opened = p["opened"].as_u64().unwrap_or(0);
        let refused = p["refused"].as_u64().unwrap_or(0);
        let silent = p["closed_silent"].as_u64().unwrap_or(0);
        assert_eq!(opened, per_port, "{port}: the box's bridge failed: {p}");
        assert!(
            p["open_secs"].as_f64().unwrap_or(99.0) < 2.5,
            "{port}: opening took longer than the header timeout, the count says nothing: {p}"
        );
        assert!(
            refused >= opened.saturating_sub(cap),
            "{port}: over the cap and not refused: {p}"
        );
        assert!(silent <= cap, "{port}: more than {cap} accepted: {p}");
        assert_eq!(p["open_at_end"], 0, "{port}: connections left open: {p}");
    }
    // 2x, plus one scheduler slice: on a 2-core host the flood's own processes and the other
    // tests of this binary share the CPU with the bystander, and a 7 ms figure doubles with one
    // preemption (seen under CI load: 7.2 -> 14.4 ms). The bench's `flood` row gives the figure.
    assert!(
        during < idle * 2 + Duration::from_millis(10),
        "the bystander's exec p99 went from {idle:?} to {during:?} during the flood"
    );
    assert_eq!(admin.get(&format!("/v1/boxes/{flooder}")).await.status, 200);
    srv.stop().await;
}
