//! Issue #14's control-plane hardening, attacked end to end against a real `berth serve`:
//! revoked keys end their streams, webhook replays are refused, `/metrics` needs an admin key,
//! artifacts carry no link out of themselves, quotas hold under concurrency, and more.

mod common;

use common::{tenant_key, Api, Server};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn small_box(api: &Api, extra: Value) -> String {
    let mut spec = json!({"resources": {"memory_mib": 256, "disk_mib": 64, "pids": 64}});
    if let (Some(o), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    let r = api.post("/v1/boxes", spec).await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

fn echo_agent() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c", "while read -r l; do echo \"echo: $l\"; done"]})
}

/// Deleting a key ends the SSE stream and the WebSocket it opened within a second; another
/// tenant's stream on the same server carries on.
#[tokio::test]
async fn revoking_a_key_ends_its_streams_within_a_second() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let admin = srv.client();
    let (key_id, mallory) = tenant_key(&admin, "mallory").await;
    let (_, bob) = tenant_key(&admin, "bob").await;
    let mut sids = vec![];
    for api in [&mallory, &bob] {
        let bx = small_box(api, json!({})).await;
        let r = api
            .post(
                "/v1/sessions",
                json!({"box": bx, "agent": echo_agent(), "prompt": "hello"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.json);
        sids.push(r.json["id"].as_str().expect("sid").to_string());
    }
    let sse = |api: &Api, sid: &str| {
        api.http
            .get(format!("{}/v1/sessions/{sid}/events", api.url))
            .bearer_auth(&api.token)
            .send()
    };
    let m_sse = sse(&mallory, &sids[0]).await.expect("sse");
    assert_eq!(m_sse.status(), 200);
    let mut m_sse = m_sse.bytes_stream();
    let b_sse = sse(&bob, &sids[1]).await.expect("sse");
    let mut b_sse = b_sse.bytes_stream();
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "{}/v1/sessions/{}/ws",
            mallory.url.replace("http://", "ws://"),
            sids[0]
        ))
        .expect("req");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", mallory.token).parse().expect("hdr"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    // Both streams are live: the first event arrives on each.
    let first = tokio::time::timeout(Duration::from_secs(20), m_sse.next())
        .await
        .expect("sse event in time");
    assert!(first.is_some());
    let first = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("ws event in time");
    assert!(matches!(first, Some(Ok(_))));

    let t = Instant::now();
    assert_eq!(
        admin.delete(&format!("/v1/keys/{key_id}")).await.status,
        204
    );
    let sse_end = async { while let Some(Ok(_)) = m_sse.next().await {} };
    let ws_end = async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                    return f.map(|f| f.reason.to_string())
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    };
    let (_, closed) = tokio::time::timeout(Duration::from_secs(1), async {
        tokio::join!(sse_end, ws_end)
    })
    .await
    .expect("both streams ended within a second of the revocation");
    assert_eq!(closed.as_deref(), Some("API key revoked"));
    assert!(t.elapsed() < Duration::from_secs(1));
    // The key is refused from now on; bob's stream and the server carry on.
    assert_eq!(mallory.get("/v1/boxes").await.status, 401);
    let r = bob
        .post(
            &format!("/v1/sessions/{}/messages", sids[1]),
            json!({"content": "still here"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while !seen.contains("echo: still here") {
        let chunk = tokio::time::timeout_at(deadline, b_sse.next())
            .await
            .expect("bob's events keep coming")
            .expect("bob's stream open")
            .expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    srv.stop().await;
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn sign(secret: &str, ts: &str, body: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{ts}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A captured signed webhook cannot be sent again, nor sent late; a signature without the
/// timestamp (the old format) is refused. None of the refused calls starts a session, and a
/// call refused for the rate limit may be retried.
#[tokio::test]
async fn signed_webhooks_refuse_replays_and_stale_timestamps() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_HOOK_RATE_PER_MINUTE", "2")]).await;
    let api = srv.client();
    let bx = small_box(&api, json!({})).await;
    let r = api
        .post(
            "/v1/triggers",
            json!({"box": bx, "agent": echo_agent(), "prompt": "got {{n}}"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let path = r.json["webhook_path"].as_str().expect("path").to_string();
    let secret = r.json["secret"].as_str().expect("secret").to_string();
    let post = |ts: Option<String>, sig: String, body: &'static str| {
        let mut rb = api
            .http
            .post(format!("{}{path}", api.url))
            .header("x-berth-signature-256", sig)
            .body(body);
        if let Some(ts) = ts {
            rb = rb.header("x-berth-timestamp", ts);
        }
        api.raw(rb)
    };
    let sessions = || async {
        api.get("/v1/sessions").await.json["items"]
            .as_array()
            .map(Vec::len)
    };
    let body = r#"{"n": 1}"#;
    let ts = now_s().to_string();
    let sig = sign(&secret, &ts, body);
    let ok = post(Some(ts.clone()), sig.clone(), body).await;
    assert_eq!(ok.status, 202, "{}", ok.json);
    assert_eq!(sessions().await, Some(1));

    let replay = post(Some(ts.clone()), sig.clone(), body).await;
    assert_eq!(replay.status, 401, "{}", replay.json);
    assert!(
        replay.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("replay")),
        "{}",
        replay.json
    );
    let stale_ts = (now_s() - 600).to_string();
    let stale = post(Some(stale_ts.clone()), sign(&secret, &stale_ts, body), body).await;
    assert_eq!(stale.status, 401, "{}", stale.json);
    assert!(
        stale.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("window")),
        "{}",
        stale.json
    );
    let future_ts = (now_s() + 600).to_string();
    let future = post(
        Some(future_ts.clone()),
        sign(&secret, &future_ts, body),
        body,
    )
    .await;
    assert_eq!(future.status, 401, "{}", future.json);
    // The old format (body only, no timestamp) is refused.
    let old = {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("k");
        mac.update(body.as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    assert_eq!(post(None, old.clone(), body).await.status, 401);
    // Nor can the captured signature be moved to a fresh timestamp.
    assert_eq!(post(Some(now_s().to_string()), sig, body).await.status, 401);
    assert_eq!(
        sessions().await,
        Some(1),
        "no refused call started a session"
    );
    // A new, freshly signed call is accepted.
    let body2 = r#"{"n": 2}"#;
    let ts2 = now_s().to_string();
    let r = post(Some(ts2.clone()), sign(&secret, &ts2, body2), body2).await;
    assert_eq!(r.status, 202, "{}", r.json);
    // Over the rate (2 a minute): 429, and the same call retried is still judged on the rate,
    // not refused as a replay (a refused call is not remembered).
    let body3 = r#"{"n": 3}"#;
    let ts3 = now_s().to_string();
    let sig3 = sign(&secret, &ts3, body3);
    for _ in 0..2 {
        let r = post(Some(ts3.clone()), sig3.clone(), body3).await;
        assert_eq!(r.status, 429, "{}", r.json);
    }
    assert_eq!(sessions().await, Some(2));
    srv.stop().await;
}

/// `/metrics` names tenants and their spend: no key gets 401, a tenant key 403, an admin key
/// the text.
#[tokio::test]
async fn metrics_need_an_admin_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let admin = srv.client();
    let (_, tenant) = tenant_key(&admin, "acme").await;
    let anon = admin
        .raw(admin.http.get(format!("{}/metrics", admin.url)))
        .await;
    assert_eq!(anon.status, 401, "{}", anon.json);
    let t = tenant.get("/metrics").await;
    assert_eq!(t.status, 403, "{}", t.json);
    assert!(!String::from_utf8_lossy(&t.bytes).contains("berth_"));
    let a = admin.get("/metrics").await;
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(&a.bytes).contains("berth_boxes"));
    srv.stop().await;
}

/// A box plants links out of its workspace before its `keep_workspace` archive is made: the
/// artifact leaves them out (and says so in the box's events); its own files and inner links
/// are kept, and unpacking it writes nothing outside the target directory.
#[tokio::test]
async fn artifacts_carry_no_link_leading_outside() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let bx = small_box(&api, json!({"keep_workspace": true})).await;
    let out = exec(
        &api,
        &bx,
        "cd /workspace && echo mine > f && ln -s f ok && ln -s /etc/passwd x && ln -s ../../.. y \
         && mkdir d && ln -s ../f d/up && ln -s . here && mkfifo p && echo done",
    )
    .await;
    assert_eq!(out["stdout"], "done\n", "{out}");
    assert_eq!(api.delete(&format!("/v1/boxes/{bx}")).await.status, 200);
    let tar = api.get(&format!("/v1/boxes/{bx}/artifact")).await;
    assert_eq!(tar.status, 200, "{}", tar.json);
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("a.tar");
    std::fs::write(&file, &tar.bytes).expect("write");
    let listing = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(&file)
        .output()
        .expect("tar");
    assert!(listing.status.success());
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for kept in [
        "workspace/f",
        "workspace/ok -> f",
        "workspace/d/up -> ../f",
        "workspace/here -> .",
    ] {
        assert!(listing.contains(kept), "{kept} kept: {listing}");
    }
    for gone in ["workspace/x", "workspace/y", "/etc/passwd", "workspace/p"] {
        assert!(!listing.contains(gone), "{gone} left out: {listing}");
    }
    let evs = api.get(&format!("/v1/boxes/{bx}/events")).await.json;
    let dropped = evs["items"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["type"] == "artifact_entries_dropped"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(dropped["data"]["count"], 3, "{evs}");
    srv.stop().await;
}

/// Read from `s` until the server closes it (EOF or reset); how long that took.
async fn until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Duration {
    use tokio::io::AsyncReadExt;
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return t.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept the connection open past {limit:?}"),
        }
    }
}

fn addr(srv: &Server) -> String {
    srv.url.trim_start_matches("http://").to_string()
}

/// A client that connects and says nothing, one that dribbles its headers a byte at a time,
/// and an idle keep-alive are all closed once the header timeout passes; other clients are
/// served meanwhile.
#[tokio::test]
async fn slow_and_silent_clients_are_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_HEADER_READ_TIMEOUT_S", "2")]).await;
    let api = srv.client();
    let a = addr(&srv);
    let mut silent = tokio::net::TcpStream::connect(&a).await.expect("connect");
    let mut dribbler = tokio::net::TcpStream::connect(&a).await.expect("connect");
    dribbler
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let drip = tokio::spawn(async move {
        let t = Instant::now();
        // One header byte every 200 ms: never a whole head, never silent for long.
        while t.elapsed() < Duration::from_secs(10) {
            if dribbler.write_all(b"X").await.is_err() {
                return (dribbler, t.elapsed(), true);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (dribbler, t.elapsed(), false)
    });
    // A keep-alive connection that served one request and then goes quiet.
    let mut idle = tokio::net::TcpStream::connect(&a).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    // Meanwhile others are served, many times.
    for _ in 0..20 {
        assert_eq!(api.get("/healthz").await.status, 200);
    }
    let waited = until_closed(&mut silent, Duration::from_secs(6)).await;
    assert!(waited < Duration::from_secs(5), "silent: {waited:?}");
    let waited = until_closed(&mut idle, Duration::from_secs(6)).await;
    assert!(
        waited < Duration::from_secs(5),
        "idle keep-alive: {waited:?}"
    );
    let (mut dribbler, _, write_failed) = drip.await.expect("drip");
    if !write_failed {
        // Writes may still be buffered by the kernel; the read side shows the close.
        until_closed(&mut dribbler, Duration::from_secs(1)).await;
    }
    assert_eq!(api.get("/healthz").await.status, 200);
    srv.stop().await;
}

/// One address holding its share of connections gets no more; others at once when it lets go.
#[tokio::test]
async fn one_peer_cannot_take_every_connection() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_MAX_CONNECTIONS_PER_PEER", "4"),
            ("BERTH_HEADER_READ_TIMEOUT_S", "30"),
        ],
    )
    .await;
    let a = addr(&srv);
    let mut held = vec![];
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(&a).await.expect("connect"));
    }
    // The fifth is closed at accept, long before the header timeout.
    let mut fifth = tokio::net::TcpStream::connect(&a).await.expect("connect");
    let waited = until_closed(&mut fifth, Duration::from_secs(5)).await;
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    drop(held);
    let api = srv.client();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = api.http.get(format!("{}/healthz", api.url)).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "served again once the peer let go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

/// The operator's ceiling on one box and a tenant's total are 400 and 429 naming the limit;
/// another tenant is unaffected, and freeing a box makes room again.
#[tokio::test]
async fn box_ceilings_and_tenant_totals_name_the_limit() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_MAX_BOX_MEMORY_MIB", "512"),
            ("BERTH_TENANT_MAX_MEMORY_MIB", "600"),
        ],
    )
    .await;
    let admin = srv.client();
    let (_, acme) = tenant_key(&admin, "acme").await;
    let (_, other) = tenant_key(&admin, "other").await;
    let spec = |mem: u64, pids: u64| json!({"resources": {"memory_mib": mem, "disk_mib": 64, "pids": pids}});
    let r = acme.post("/v1/boxes", spec(1024, 64)).await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_box.memory_mib = 512")),
        "{}",
        r.json
    );
    let r = acme.post("/v1/boxes", spec(256, 5000)).await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_box.pids = 4096")),
        "{}",
        r.json
    );
    let r = acme
        .post(
            "/v1/boxes",
            json!({"resources": {"cpus": 1000.0, "memory_mib": 256, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_box.cpus")),
        "{}",
        r.json
    );
    let first = acme.post("/v1/boxes", spec(300, 64)).await;
    assert_eq!(first.status, 201, "{}", first.json);
    let r = acme.post("/v1/boxes", spec(301, 64)).await;
    assert_eq!(r.status, 429, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tenant_max.memory_mib = 600")),
        "{}",
        r.json
    );
    let r = other.post("/v1/boxes", spec(300, 64)).await;
    assert_eq!(
        r.status, 201,
        "another tenant has its own total: {}",
        r.json
    );
    assert_eq!(
        acme.post("/v1/boxes", spec(300, 64)).await.status,
        201,
        "300 + 300 fits"
    );
    let id = first.json["id"].as_str().expect("id");
    assert_eq!(acme.delete(&format!("/v1/boxes/{id}")).await.status, 200);
    assert_eq!(
        acme.post("/v1/boxes", spec(300, 64)).await.status,
        201,
        "room again"
    );
    srv.stop().await;
}

/// N creates at once against a quota of N-2: exactly N-2 boxes are made.
#[tokio::test]
async fn concurrent_creates_cannot_pass_the_box_quota() {
    const N: usize = 6;
    let dir = tempfile::tempdir().expect("tmp");
    let quota = (N - 2).to_string();
    let srv = Server::start_with(dir.path(), &[("BERTH_MAX_BOXES_PER_TENANT", &quota)]).await;
    let api = srv.client();
    let creates = (0..N).map(|_| {
        let api = api.clone();
        async move {
            api.post(
                "/v1/boxes",
                json!({"resources": {"memory_mib": 128, "disk_mib": 32, "pids": 32}}),
            )
            .await
            .status
        }
    });
    let mut statuses = futures::future::join_all(creates).await;
    statuses.sort();
    assert_eq!(statuses, [201, 201, 201, 201, 429, 429], "{statuses:?}");
    let alive = api.get("/v1/boxes").await.json["items"]
        .as_array()
        .map(|a| a.iter().filter(|b| b["state"] == "running").count());
    assert_eq!(alive, Some(N - 2));
    srv.stop().await;
}

/// A model request metered moments before a clean stop is in the ledger after the restart.
#[tokio::test]
async fn usage_metered_just_before_a_clean_stop_survives_it() {
    let mock = berth_mock_model::Mock::new(
        berth_mock_model::scenario::Scenario::default(),
        Duration::ZERO,
    );
    let mock_url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let env = [
        ("BERTH_UPSTREAM_URL", mock_url.as_str()),
        ("ANTHROPIC_API_KEY", "sk-real"),
    ];
    let srv = Server::start_with(dir.path(), &env).await;
    let api = srv.client();
    let bx = small_box(&api, json!({})).await;
    let ask = "curl -s -o /dev/null -w 'code=%{http_code}\\n' -X POST \
        -H \"x-api-key: $BERTH_SESSION_TOKEN\" -H 'content-type: application/json' \
        -H 'anthropic-version: 2023-06-01' http://127.0.0.1:47100/v1/messages \
        -d '{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'; \
        sleep 600";
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": {"kind": "command", "argv": ["/bin/sh", "-c", ask]}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("sid").to_string();
    let evs = api.until(&sid, "stdout", 1).await;
    assert!(
        evs.iter().any(|e| e["data"]["text"] == "code=200"),
        "{evs:?}"
    );
    // Stop at once: the ledger writer's batch window has not passed.
    assert!(srv.stop().await.success());
    let srv = Server::start_with(dir.path(), &env).await;
    let u = srv.client().get(&format!("/v1/sessions/{sid}/usage")).await;
    assert_eq!(u.status, 200, "{}", u.json);
    let metered: u64 = mock
        .recorded()
        .iter()
        .filter(|r| r.path.starts_with("/v1/messages"))
        .map(|r| r.usage["input_tokens"].as_u64().unwrap_or(0))
        .sum();
    assert!(metered > 0);
    assert_eq!(u.json["total"]["input_tokens"], metered, "{}", u.json);
    srv.stop().await;
}

/// An agent floods its stdout: the session stores at most the burst plus the sustained rate,
/// the rest is counted in `events_dropped` summaries (stored + dropped = every line written),
/// the agent's end is recorded, and the server answers others meanwhile.
#[tokio::test]
async fn a_stdout_flood_is_capped_and_counted() {
    const BYTES: u64 = 20_000_000; // `yes` lines are 2 bytes: 10 million lines
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_EVENTS_PER_SECOND", "50"),
            ("BERTH_EVENTS_BURST", "200"),
        ],
    )
    .await;
    let api = srv.client();
    let bx = small_box(&api, json!({})).await;
    let t = Instant::now();
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": {"kind": "command",
                   "argv": ["sh", "-c", format!("yes | head -c {BYTES}")]}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("sid").to_string();
    // Responsive while the flood is processed.
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let h = Instant::now();
        assert_eq!(api.get("/healthz").await.status, 200);
        slowest = slowest.max(h.elapsed());
        let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
        if s["state"] == "stopped" || s["state"] == "failed" {
            assert_eq!(s["state"], "stopped", "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flood did not end in time: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = t.elapsed();
    assert!(
        slowest < Duration::from_secs(2),
        "healthz took {slowest:?} during the flood"
    );
    let evs = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, usize::MAX)
        .await;
    let stdout = evs.iter().filter(|e| e["type"] == "stdout").count() as u64;
    let summaries: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == "events_dropped")
        .collect();
    let dropped: u64 = summaries
        .iter()
        .map(|e| e["data"]["count"].as_u64().expect("count"))
        .sum();
    assert!(!summaries.is_empty());
    assert_eq!(stdout + dropped, BYTES / 2, "every line stored or counted");
    let bound = 200 + 50 * elapsed.as_secs() + 50;
    assert!(
        stdout <= bound,
        "{stdout} stored in {elapsed:?}, bound {bound}"
    );
    assert!(
        evs.iter()
            .any(|e| e["type"] == "result" && e["data"]["exit_code"] == 0),
        "the agent's end is recorded"
    );
    srv.stop().await;
}

/// The server's peak resident memory (VmHWM) and current (VmRSS), in KiB.
fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("field")
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Parking and restoring a box with 300 MiB of incompressible workspace streams the archive
/// through the server: its peak memory grows by tens of MiB at most, and the file comes back
/// intact.
#[tokio::test]
async fn a_large_park_and_restore_stream_through_the_server() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let bx = small_box(
        &api,
        json!({"lifecycle": "hybrid", "resources": {"memory_mib": 512, "disk_mib": 1024, "pids": 64}}),
    )
    .await;
    let out = exec(
        &api,
        &bx,
        "head -c 300M /dev/urandom > /workspace/big && sha256sum /workspace/big | cut -d' ' -f1",
    )
    .await;
    let sum = out["stdout"].as_str().expect("sum").trim().to_string();
    assert_eq!(sum.len(), 64, "{out}");
    let (hwm_before, rss_before) = memory_kib(srv.pid());
    let t = Instant::now();
    let r = api.post(&format!("/v1/boxes/{bx}/park"), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let b = api
        .wait_for(&format!("/v1/boxes/{bx}"), 300, |b| b["state"] == "parked")
        .await;
    let stored = b["snapshot"]["bytes"].as_u64().expect("bytes");
    assert!(stored > 300 << 20, "incompressible: {stored}");
    let parked_in = t.elapsed();
    // The next use restores it; the file is whole.
    let out = exec(&api, &bx, "sha256sum /workspace/big | cut -d' ' -f1").await;
    assert_eq!(out["stdout"].as_str().map(str::trim), Some(sum.as_str()));
    let (hwm_after, rss_after) = memory_kib(srv.pid());
    let grew = hwm_after.saturating_sub(hwm_before);
    eprintln!(
        "park of {} MiB in {parked_in:?}; server VmHWM {} -> {} MiB (+{} MiB), VmRSS {} -> {} MiB",
        stored >> 20,
        hwm_before >> 10,
        hwm_after >> 10,
        grew >> 10,
        rss_before >> 10,
        rss_after >> 10
    );
    assert!(
        grew < 64 << 10,
        "the server's peak memory grew by {} MiB",
        grew >> 10
    );
    srv.stop().await;
}

/// A parked box holds nothing, so the tenant's room can be used meanwhile; bringing it back
/// past the tenant's total is refused with the same 429, and works once there is room.
#[tokio::test]
async fn restoring_a_parked_box_counts_against_the_tenant_total() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_TENANT_MAX_MEMORY_MIB", "600")]).await;
    let api = srv.client();
    let spec = |extra: Value| {
        let mut s = json!({"resources": {"memory_mib": 300, "disk_mib": 64, "pids": 64}});
        if let (Some(o), Some(e)) = (s.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        s
    };
    let r = api
        .post("/v1/boxes", spec(json!({"lifecycle": "hybrid"})))
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let parked = r.json["id"].as_str().expect("id").to_string();
    assert_eq!(
        api.post(&format!("/v1/boxes/{parked}/park"), json!({}))
            .await
            .status,
        200
    );
    api.wait_for(&format!("/v1/boxes/{parked}"), 60, |b| {
        b["state"] == "parked"
    })
    .await;
    let mut others = vec![];
    for _ in 0..2 {
        let r = api.post("/v1/boxes", spec(json!({}))).await;
        assert_eq!(r.status, 201, "the parked box holds nothing: {}", r.json);
        others.push(r.json["id"].as_str().expect("id").to_string());
    }
    let r = api
        .post(
            &format!("/v1/boxes/{parked}/exec"),
            json!({"argv": ["true"]}),
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tenant_max.memory_mib")),
        "{}",
        r.json
    );
    assert_eq!(
        api.get(&format!("/v1/boxes/{parked}")).await.json["state"],
        "parked"
    );
    assert_eq!(
        api.delete(&format!("/v1/boxes/{}", others[0])).await.status,
        200
    );
    let r = api
        .post(
            &format!("/v1/boxes/{parked}/exec"),
            json!({"argv": ["true"]}),
        )
        .await;
    assert_eq!(r.status, 200, "room again: {}", r.json);
    assert_eq!(
        api.get(&format!("/v1/boxes/{parked}")).await.json["state"],
        "running"
    );
    srv.stop().await;
}

/// A server in the box that streams forever: a chunked answer, or raw bytes after a protocol
/// switch when asked to upgrade.
const TICKER: &str = r#"
import socket, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8766))
s.listen(8)
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        d = c.recv(4096)
        if not d:
            return
        req += d
    upgrade = b"upgrade: raw" in req.lower()
    if upgrade:
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n")
    else:
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        while True:
            c.sendall(b"tick\n" if upgrade else b"5\r\ntick\n\r\n")
            time.sleep(0.1)
    except OSError:
        pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Deleting a key also cuts what it opened through a box's port: a streamed answer and an
/// upgraded connection both end within a second.
#[tokio::test]
async fn revoking_a_key_cuts_its_port_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let admin = srv.client();
    let (key_id, t) = tenant_key(&admin, "mallory").await;
    let bx = small_box(&t, json!({})).await;
    let put = t
        .raw(
            t.http
                .put(format!("{}/v1/boxes/{bx}/files/ticker.py", t.url))
                .bearer_auth(&t.token)
                .body(TICKER),
        )
        .await;
    assert_eq!(put.status, 204);
    let s = t
        .post("/v1/sessions", json!({"box": bx, "agent": {"kind": "command", "argv": ["/usr/bin/python3", "/workspace/ticker.py"]}}))
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let path = format!("/v1/boxes/{bx}/ports/8766/");
    // The streamed answer (retried until the ticker listens).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut body = loop {
        let r = t
            .http
            .get(format!("{}{path}", t.url))
            .bearer_auth(&t.token)
            .send()
            .await
            .expect("get");
        if r.status() == 200 {
            break r.bytes_stream();
        }
        assert!(Instant::now() < deadline, "the ticker never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("a tick");
    assert!(matches!(first, Some(Ok(_))));
    // The upgraded connection.
    let mut raw = tokio::net::TcpStream::connect(addr(&srv))
        .await
        .expect("connect");
    raw.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n",
            t.token
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("tick") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
            .await
            .expect("switched in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 101"));

    let t0 = Instant::now();
    assert_eq!(
        admin.delete(&format!("/v1/keys/{key_id}")).await.status,
        204
    );
    let body_end = async { while let Some(Ok(_)) = body.next().await {} };
    let raw_end = until_closed(&mut raw, Duration::from_secs(5));
    let (_, waited) = tokio::time::timeout(Duration::from_secs(1), async {
        tokio::join!(body_end, raw_end)
    })
    .await
    .expect("both port connections cut within a second of the revocation");
    assert!(waited < Duration::from_secs(1) && t0.elapsed() < Duration::from_secs(1));
    assert_eq!(admin.get("/healthz").await.status, 200);
    srv.stop().await;
}

/// A flood that stops while the agent lives on is still summarised (within about a second),
/// not only when the agent ends.
#[tokio::test]
async fn a_flood_is_summarised_while_the_agent_lives_on() {
    // Two floods half a second apart: the first is summarised at once, the second falls
    // inside the summary interval and only the owner's timer reports it.
    const LINES: u64 = 200_000;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_EVENTS_PER_SECOND", "50"),
            ("BERTH_EVENTS_BURST", "200"),
        ],
    )
    .await;
    let api = srv.client();
    let bx = small_box(&api, json!({})).await;
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": {"kind": "command",
                   "argv": ["sh", "-c", format!("yes | head -c {0}; sleep 0.5; yes | head -c {0}; sleep 600", LINES)]}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("sid").to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut n = 1;
    loop {
        let evs = api.until(&sid, "events_dropped", n).await;
        let stdout = evs.iter().filter(|e| e["type"] == "stdout").count() as u64;
        let dropped: u64 = evs
            .iter()
            .filter(|e| e["type"] == "events_dropped")
            .map(|e| e["data"]["count"].as_u64().expect("count"))
            .sum();
        if stdout + dropped == LINES {
            break;
        }
        assert!(stdout + dropped < LINES, "{stdout} + {dropped}");
        assert!(Instant::now() < deadline, "not all lines accounted for");
        n += 1;
    }
    let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(s["state"], "running", "the agent still runs: {s}");
    srv.stop().await;
}

/// With every connection slot held by silent clients, a new client waits (in the backlog, not
/// refused) until the header timeout frees a slot, then is served.
#[tokio::test]
async fn connections_over_the_cap_wait_for_a_slot() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_MAX_CONNECTIONS", "2"),
            ("BERTH_HEADER_READ_TIMEOUT_S", "2"),
        ],
    )
    .await;
    let a = addr(&srv);
    let _held = [
        tokio::net::TcpStream::connect(&a).await.expect("connect"),
        tokio::net::TcpStream::connect(&a).await.expect("connect"),
    ];
    let api = srv.client();
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), api.get("/healthz"))
        .await
        .expect("served once a slot is free");
    assert_eq!(r.status, 200);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "waited {waited:?} for a slot"
    );
    srv.stop().await;
}

async fn exec(api: &Api, bx: &str, script: &str) -> Value {
    common::exec_sh(api, bx, script, 600).await
}
