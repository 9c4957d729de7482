//! The API end to end against a real `berth serve` (real boxes, real HTTP/SSE/WebSocket).

mod common;

use common::{Api, Server};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};

async fn small_box(api: &Api, extra: Value) -> String {
    let mut spec = json!({"resources": {"memory_mib": 256, "disk_mib": 64, "pids": 64}});
    if let (Some(o), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    let r = api.post("/v1/boxes", spec).await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["state"], "running");
    r.json["id"].as_str().expect("id").to_string()
}

async fn oversized_put(api: &Api, path: &str, len: usize) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = api.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        api.token
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(&[b'x'; 4096]).await.expect("write some body");
    // Read until the response's JSON body is complete (the server need not close first).
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    let text = loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        resp.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&resp).into_owned();
        if n == 0
            || text
                .split("\r\n\r\n")
                .nth(1)
                .is_some_and(|b| b.contains("}}"))
        {
            break text;
        }
    };
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    // The body may be chunked; take the JSON object inside.
    let json = body
        .find('{')
        .and_then(|i| body.rfind('}').map(|j| &body[i..=j]))
        .unwrap_or("null");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

fn echo_agent() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c", "while read -r l; do echo \"echo: $l\"; done"]})
}

#[tokio::test]
async fn boxes_exec_files_and_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let id = small_box(&api, json!({"labels": {"team": "a"}})).await;
    let b = api.get(&format!("/v1/boxes/{id}")).await;
    assert_eq!(b.json["backend"], "native");
    assert_eq!(b.json["lifecycle"], "persistent");
    assert_eq!(b.json["resources"]["cpus"], 1.0);
    assert_eq!(b.json["labels"]["team"], "a");
    assert_eq!(b.json["network"]["allow"], json!(["api.anthropic.com"]));

    let r = api.post(&format!("/v1/boxes/{id}/exec"), json!({"argv": ["sh", "-c", "cat; echo $X; pwd; exit 3"], "stdin": "in\n", "env": {"X": "y"}, "cwd": "/tmp"})).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["stdout"], "in\ny\n/tmp\n");
    assert_eq!(r.json["exit_code"], 3);

    // Files: put, get, list, delete; hostile paths refused with 400.
    let put = api
        .raw(
            api.http
                .put(format!(
                    "{}/v1/boxes/{id}/files/src/main.txt?mode=600",
                    api.url
                ))
                .bearer_auth(&api.token)
                .body("hello box"),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
    let got = api.get(&format!("/v1/boxes/{id}/files/src/main.txt")).await;
    assert_eq!(got.bytes, b"hello box");
    let ls = api.get(&format!("/v1/boxes/{id}/files/src")).await;
    assert_eq!(ls.json["entries"][0]["name"], "main.txt");
    assert_eq!(ls.json["entries"][0]["mode"], 0o600);
    let root = api.get(&format!("/v1/boxes/{id}/files")).await;
    assert_eq!(root.json["entries"][0]["name"], "src");
    let r = api
        .post(
            &format!("/v1/boxes/{id}/exec"),
            json!({"argv": ["sh", "-c", "ln -s /etc /workspace/etc; ln -s .. /workspace/up"]}),
        )
        .await;
    assert_eq!(r.json["exit_code"], 0);
    for p in [
        "..%2F..%2Fetc%2Fpasswd",
        "etc/passwd",
        "up/x",
        "%2Fetc%2Fpasswd",
    ] {
        let r = api.get(&format!("/v1/boxes/{id}/files/{p}")).await;
        assert_eq!(r.status, 400, "{p}: {}", r.json);
        assert_eq!(r.json["error"]["code"], "invalid_request");
    }
    let r = api
        .raw(
            api.http
                .put(format!("{}/v1/boxes/{id}/files/up/evil", api.url))
                .bearer_auth(&api.token)
                .body("x"),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        api.delete(&format!("/v1/boxes/{id}/files/src"))
            .await
            .status,
        204
    );
    assert_eq!(
        api.get(&format!("/v1/boxes/{id}/files/src/main.txt"))
            .await
            .status,
        404
    );

    let st = api.get(&format!("/v1/boxes/{id}/stats")).await;
    assert_eq!(st.status, 200);
    assert_eq!(st.json["memory_limit_bytes"], 256 * 1024 * 1024);
    assert!(st.json["pids"].as_u64().expect("pids") >= 1);

    // Errors are JSON with a code, never a panic.
    let r = api
        .raw(
            api.http
                .post(format!("{}/v1/boxes", api.url))
                .bearer_auth(&api.token)
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let r = api
        .post("/v1/boxes", json!({"resources": {"memory_mib": 1}}))
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    let r = api.post("/v1/boxes", json!({"unknown_field": 1})).await;
    assert_eq!(r.status, 422, "{}", r.json);
    let r = api
        .post("/v1/boxes", json!({"image": "ubuntu:24.04"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(api.get("/v1/boxes/box-nope").await.status, 404);
    assert_eq!(
        api.get("/v1/boxes/box-nope").await.json["error"]["code"],
        "not_found"
    );
    assert_eq!(
        api.post("/v1/boxes/box-nope/exec", json!({"argv": ["true"]}))
            .await
            .status,
        404
    );
    assert_eq!(
        api.post(&format!("/v1/boxes/{id}/exec"), json!({"argv": []}))
            .await
            .status,
        400
    );
    // An oversized upload is refused from its Content-Length, before the body is read.
    let (status, body) = oversized_put(&api, &format!("/v1/boxes/{id}/files/big"), 65 << 20).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    let r = api.raw(api.http.get(format!("{}/v1/boxes", api.url))).await;
    assert_eq!(
        (r.status, r.json["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let r = api
        .raw(
            api.http
                .get(format!("{}/v1/boxes", api.url))
                .bearer_auth("berth_wrong"),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        api.get("/v1/nothing-here").await.json["error"]["code"],
        "not_found"
    );
    let r = api.call("PATCH", "/v1/boxes", None).await;
    assert_eq!(r.status, 405);
    assert_eq!(api.get("/healthz").await.status, 200);
    // This server's upstream is the default api.anthropic.com, which an offline machine
    // cannot reach; only that may keep it from being ready (tests/cost.rs checks readiness
    // against upstreams it controls).
    let ready = api.get("/readyz").await;
    let why = ready.json["error"]["message"].as_str().unwrap_or("");
    assert!(
        ready.status == 200
            || (ready.status == 503 && why.contains("upstream") && !why.contains("store")),
        "{} {why}",
        ready.status
    );
    assert_eq!(
        api.get("/v1/backends").await.json["items"][0]["name"],
        "native"
    );
    assert!(String::from_utf8_lossy(&api.get("/metrics").await.bytes)
        .contains("berth_boxes_created_total"));

    let d = api.delete(&format!("/v1/boxes/{id}")).await;
    assert_eq!(d.json["state"], "destroyed");
    assert_eq!(
        api.delete(&format!("/v1/boxes/{id}")).await.json["state"],
        "destroyed"
    );
    assert_eq!(
        api.post(&format!("/v1/boxes/{id}/exec"), json!({"argv": ["true"]}))
            .await
            .status,
        409
    );
    srv.stop().await;
}

#[tokio::test]
async fn sessions_stream_over_sse_and_websocket_with_replay() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let bx = small_box(&api, json!({})).await;
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": echo_agent(), "prompt": "first"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    assert_eq!(r.json["box_id"], bx.as_str());
    for m in ["two", "three"] {
        let r = api
            .post(
                &format!("/v1/sessions/{sid}/messages"),
                json!({"content": m}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.json);
    }
    // Read until the three echoes are there, over SSE.
    let mut events = Vec::new();
    while events
        .iter()
        .filter(|e: &&Value| e["type"] == "stdout")
        .count()
        < 3
    {
        let after = events
            .last()
            .map(|e: &Value| e["seq"].as_i64().expect("seq"))
            .unwrap_or(0);
        events.extend(
            api.sse(&format!("/v1/sessions/{sid}/events?after={after}"), None, 1)
                .await,
        );
    }
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "gapless, ordered"
    );
    let texts: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    assert_eq!(texts, vec!["echo: first", "echo: two", "echo: three"]);
    assert!(events
        .iter()
        .all(|e| e["session_id"] == sid.as_str() && e["ts"].is_string()));

    // Reconnect with Last-Event-ID: exactly the missed events, in order.
    let mid = seqs[seqs.len() / 2];
    let replay = api
        .sse(
            &format!("/v1/sessions/{sid}/events"),
            Some(mid),
            seqs.len() - mid as usize,
        )
        .await;
    assert_eq!(replay, events[mid as usize..].to_vec());

    // WebSocket: the same stream, and messages accepted over it.
    let ws_url = format!(
        "{}/v1/sessions/{sid}/ws?after={}",
        api.url.replace("http://", "ws://"),
        seqs.len()
    );
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url)
            .expect("req");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.token).parse().expect("hdr"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"type": "message", "content": "over ws"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "{garbage".into(),
    ))
    .await
    .expect("send");
    let mut acks = 0;
    let mut errors = 0;
    let mut echoed = false;
    while !(echoed && acks == 1 && errors == 1) {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next())
            .await
            .expect("ws in time")
            .expect("open")
            .expect("msg");
        let v: Value = serde_json::from_str(msg.to_text().expect("text")).expect("json");
        match v["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") if v.get("seq").is_none() => errors += 1,
            Some("stdout") => {
                assert!(v["seq"].as_i64().expect("seq") > seqs.len() as i64);
                assert_eq!(v["data"]["text"], "echo: over ws");
                echoed = true;
            }
            _ => {}
        }
    }

    // Interrupt (SIGINT) ends the shell loop; the session fails with the signal recorded.
    assert_eq!(
        api.post(&format!("/v1/sessions/{sid}/interrupt"), json!({}))
            .await
            .status,
        202
    );
    let s = api
        .wait_for(&format!("/v1/sessions/{sid}"), 20, |s| {
            s["state"] == "failed" || s["state"] == "stopped"
        })
        .await;
    assert!(
        s["state_reason"]
            .as_str()
            .expect("reason")
            .contains("signal 2"),
        "{s}"
    );
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "late"}),
        )
        .await;
    assert_eq!(r.status, 409);
    // The ended session's stream replays everything and then ends.
    let all = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, usize::MAX)
        .await;
    assert_eq!(all.last().map(|e| e["type"].clone()), Some(json!("status")));
    assert!(all.iter().any(|e| e["type"] == "result"));
    // The persistent box outlives the session.
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}")).await.json["state"],
        "running"
    );
    srv.stop().await;
}

#[tokio::test]
async fn tenants_cannot_see_each_other() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let admin = srv.client();
    let mk = |t: &str| {
        let admin = admin.clone();
        let t = t.to_string();
        async move {
            let r = admin.post("/v1/keys", json!({"tenant": t})).await;
            assert_eq!(r.status, 201, "{}", r.json);
            Api::new(&admin.url, r.json["key"].as_str().expect("key"))
        }
    };
    let acme = mk("acme").await;
    let globex = mk("globex").await;
    let a_box = small_box(&acme, json!({})).await;
    let a_ses = acme
        .post("/v1/sessions", json!({"box": a_box, "agent": echo_agent()}))
        .await
        .json["id"]
        .as_str()
        .expect("id")
        .to_string();
    for path in [
        format!("/v1/boxes/{a_box}"),
        format!("/v1/sessions/{a_ses}"),
        format!("/v1/sessions/{a_ses}/events"),
        format!("/v1/boxes/{a_box}/files/x"),
        format!("/v1/boxes/{a_box}/stats"),
    ] {
        let r = globex.get(&path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.json);
    }
    assert_eq!(
        globex
            .post(
                &format!("/v1/boxes/{a_box}/exec"),
                json!({"argv": ["true"]})
            )
            .await
            .status,
        404
    );
    assert_eq!(
        globex
            .post(
                &format!("/v1/sessions/{a_ses}/messages"),
                json!({"content": "x"})
            )
            .await
            .status,
        404
    );
    assert_eq!(
        globex.delete(&format!("/v1/boxes/{a_box}")).await.status,
        404
    );
    assert_eq!(
        globex
            .post("/v1/sessions", json!({"box": a_box, "agent": echo_agent()}))
            .await
            .status,
        404
    );
    assert_eq!(globex.get("/v1/boxes").await.json["items"], json!([]));
    assert_eq!(globex.get("/v1/sessions").await.json["items"], json!([]));
    assert_eq!(
        acme.get("/v1/boxes").await.json["items"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        acme.post("/v1/keys", json!({"tenant": "acme"}))
            .await
            .status,
        403,
        "tenant keys cannot mint keys"
    );
    assert_eq!(
        admin
            .post("/v1/keys", json!({"tenant": "bad tenant!"}))
            .await
            .status,
        400
    );
    // Tenant budgets: admins set them, tenants read their own.
    let r = admin
        .call(
            "PUT",
            "/v1/tenants/acme",
            Some(json!({"budget_usd_month": 12.5})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["budget_usd_month"], 12.5);
    assert_eq!(r.json["spent_usd_month"], 0.0);
    assert_eq!(
        acme.get("/v1/tenants/acme").await.json["budget_usd_month"],
        12.5
    );
    assert_eq!(globex.get("/v1/tenants/acme").await.status, 404);
    assert_eq!(
        acme.call(
            "PUT",
            "/v1/tenants/acme",
            Some(json!({"budget_usd_month": 1000}))
        )
        .await
        .status,
        403
    );
    assert_eq!(
        admin
            .call(
                "PUT",
                "/v1/tenants/acme",
                Some(json!({"budget_usd_month": -1}))
            )
            .await
            .status,
        400
    );
    // Still alive for its owner.
    assert_eq!(
        acme.get(&format!("/v1/boxes/{a_box}")).await.json["state"],
        "running"
    );
    srv.stop().await;
}

#[tokio::test]
async fn ephemeral_box_dies_with_its_session_and_idle_boxes_stop() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let r = api.post("/v1/sessions", json!({
        "box": {"lifecycle": "ephemeral", "resources": {"memory_mib": 128, "disk_mib": 32}},
        "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "echo done-work > /workspace/out; echo finished"]}
    })).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    let bx = r.json["box_id"].as_str().expect("box").to_string();
    let s = api
        .wait_for(&format!("/v1/sessions/{sid}"), 20, |s| {
            s["state"] == "stopped"
        })
        .await;
    assert_eq!(s["state_reason"], "agent exited with code 0");
    api.wait_for(&format!("/v1/boxes/{bx}"), 20, |b| {
        b["state"] == "destroyed"
    })
    .await;
    let evs = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, usize::MAX)
        .await;
    assert!(evs.iter().any(|e| e["data"]["text"] == "finished"));

    // keep_workspace: the workspace outlives the ephemeral box as a downloadable tar.
    let r = api.post("/v1/sessions", json!({
        "box": {"lifecycle": "ephemeral", "keep_workspace": true, "resources": {"memory_mib": 128, "disk_mib": 32}},
        "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "mkdir -p out && echo report > out/r.txt"]}
    })).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let kept = r.json["box_id"].as_str().expect("box").to_string();
    let b = api
        .wait_for(&format!("/v1/boxes/{kept}"), 20, |b| {
            b["state"] == "destroyed"
        })
        .await;
    assert!(b["artifact"]["bytes"].as_u64().unwrap_or(0) > 0, "{b}");
    let tar = api.get(&format!("/v1/boxes/{kept}/artifact")).await;
    assert_eq!(tar.status, 200);
    let unpacked = tempfile::tempdir().expect("tmp");
    let file = unpacked.path().join("a.tar");
    std::fs::write(&file, &tar.bytes).expect("write");
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&file)
        .arg("-C")
        .arg(unpacked.path())
        .status()
        .expect("tar");
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(unpacked.path().join("workspace/out/r.txt")).expect("kept file"),
        "report\n"
    );
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}/artifact")).await.status,
        404,
        "no archive unless asked for"
    );

    let idle = small_box(&api, json!({"idle_timeout_s": 1})).await;
    // Activity keeps it alive past one timeout…
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_millis(1500) {
        assert_eq!(
            api.post(&format!("/v1/boxes/{idle}/exec"), json!({"argv": ["true"]}))
                .await
                .json["exit_code"],
            0
        );
    }
    // …and without it the box stops on its own.
    let b = api
        .wait_for(&format!("/v1/boxes/{idle}"), 20, |b| {
            b["state"] == "stopped"
        })
        .await;
    assert_eq!(b["state_reason"], "idle_timeout");

    // max_lifetime_s is a hard stop: activity does not extend it; it shows in the box's events.
    let short = small_box(
        &api,
        json!({"lifecycle": "persistent", "max_lifetime_s": 2}),
    )
    .await;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_millis(1000) {
        let r = api
            .post(
                &format!("/v1/boxes/{short}/exec"),
                json!({"argv": ["true"]}),
            )
            .await;
        assert_eq!(r.json["exit_code"], 0, "{}", r.json);
    }
    let b = api
        .wait_for(&format!("/v1/boxes/{short}"), 20, |b| {
            b["state"] == "stopped"
        })
        .await;
    assert_eq!(b["state_reason"], "max_lifetime");
    let evs = api.get(&format!("/v1/boxes/{short}/events")).await.json;
    assert!(
        evs["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|e| e["type"] == "state" && e["data"]["reason"] == "max_lifetime"),
        "{evs}"
    );
    let r = api
        .post(
            &format!("/v1/boxes/{short}/exec"),
            json!({"argv": ["true"]}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.json);
    srv.stop().await;
}

#[tokio::test]
async fn kill9_then_restart_keeps_every_committed_event() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let bx = small_box(&api, json!({})).await;
    let r = api.post("/v1/sessions", json!({"box": bx, "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "seq 1 500; exec cat"]}})).await;
    let sid = r.json["id"].as_str().expect("id").to_string();
    let evs = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, 502)
        .await;
    let lines: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    assert_eq!(lines.len(), 500);
    let committed = api.get(&format!("/v1/sessions/{sid}")).await.json["last_seq"]
        .as_i64()
        .expect("seq");
    let box_pid_dirs: Vec<String> = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    srv.kill9().await;
    // The box dies with its server (parent-death signals down the chain), before any restart.
    let procs = format!("/sys/fs/cgroup/pids/berth/{bx}/cgroup.procs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&procs)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the box outlived its killed server"
        );
        tokio::task::yield_now().await;
    }

    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let after = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, usize::MAX)
        .await;
    assert_eq!(
        after.len() as i64,
        committed,
        "every committed event survives"
    );
    assert_eq!(after[..evs.len()], evs[..]);
    let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(s["state"], "interrupted");
    let b = api.get(&format!("/v1/boxes/{bx}")).await.json;
    assert_eq!(b["state"], "stopped");
    assert_eq!(b["state_reason"], "server restarted");
    // The old box's processes went down with the old server.
    assert!(
        !std::path::Path::new(&format!("/sys/fs/cgroup/pids/berth/{bx}")).exists()
            || std::fs::read_to_string(format!("/sys/fs/cgroup/pids/berth/{bx}/cgroup.procs"))
                .unwrap_or_default()
                .is_empty()
    );
    let _ = box_pid_dirs;
    srv.stop().await;
}

#[tokio::test]
async fn the_berth_binary_alone_brings_boxes_up() {
    // Without berth-box-init beside it, berth runs box bring-up itself (`berth __box-init`).
    let dir = tempfile::tempdir().expect("tmp");
    let bin = dir.path().join("berth");
    std::fs::copy(env!("CARGO_BIN_EXE_berth"), &bin).expect("copy berth");
    let data = dir.path().join("data");
    let srv = Server::start_bin(&bin, &data, &[]).await;
    let api = srv.client();
    let id = small_box(&api, json!({})).await;
    let r = api
        .post(
            &format!("/v1/boxes/{id}/exec"),
            json!({"argv": ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"]}),
        )
        .await;
    assert_eq!(
        r.json["stdout"].as_str().map(str::trim),
        Some(format!("{} __box-init", bin.display()).as_str())
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_port_in_the_box_is_served_through_the_proxy() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let id = small_box(&api, json!({"lifecycle": "persistent"})).await;
    let put = api
        .raw(
            api.http
                .put(format!("{}/v1/boxes/{id}/files/site/index.html", api.url))
                .bearer_auth(&api.token)
                .body("<h1>built in a box</h1>"),
        )
        .await;
    assert_eq!(put.status, 204);
    // Nothing listens yet: a clean 502.
    let r = api
        .get(&format!("/v1/boxes/{id}/ports/8080/index.html"))
        .await;
    assert_eq!(r.status, 502, "{}", r.json);
    // The site-builder case: a long-running process in the box serves a port.
    let s = api
        .post(
            "/v1/sessions",
            json!({"box": id, "agent": {"kind": "command", "argv": ["/usr/bin/python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", "/workspace/site"]}}),
        )
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let page = api
        .wait_for(&format!("/v1/boxes/{id}/ports/8080/"), 30, |v| v.is_null())
        .await;
    let _ = page;
    let r = api
        .get(&format!("/v1/boxes/{id}/ports/8080/index.html?x=1"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes, b"<h1>built in a box</h1>");
    let r = api
        .get(&format!("/v1/boxes/{id}/ports/8080/missing.html"))
        .await;
    assert_eq!(r.status, 404, "the box's own status is passed through");
    // A second agent in the same box, beside the server: it builds a page the first serves.
    let builder = api
        .post(
            "/v1/sessions",
            json!({"box": id, "agent": shell_agent(),
                   "prompt": "echo '<p>second agent</p>' > /workspace/site/new.html && echo built"}),
        )
        .await;
    assert_eq!(builder.status, 201, "{}", builder.json);
    let b = builder.json["id"].as_str().expect("id").to_string();
    let evs = api.until(&b, "stdout", 1).await;
    assert!(
        evs.iter().any(|e| e["data"]["text"] == "built|rc=0"),
        "{evs:?}"
    );
    let r = api
        .get(&format!("/v1/boxes/{id}/ports/8080/new.html"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes, b"<p>second agent</p>\n");
    let live = api.get(&format!("/v1/sessions?box_id={id}")).await.json;
    let live: Vec<&Value> = live["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|s| s["state"] == "running" || s["state"] == "idle")
        .collect();
    assert_eq!(live.len(), 2, "two agents alive in one box: {live:?}");
    let other = {
        let k = api.post("/v1/keys", json!({"tenant": "other"})).await;
        Api::new(&api.url, k.json["key"].as_str().expect("key"))
    };
    assert_eq!(
        other
            .get(&format!("/v1/boxes/{id}/ports/8080/index.html"))
            .await
            .status,
        404
    );
    srv.stop().await;
}

/// A one-message WebSocket echo server in plain Python (no libraries), run inside the box.
const WS_ECHO: &str = r#"
import base64, hashlib, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8765))
s.listen()
while True:
    c, _ = s.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    h = c.recv(2)
    n = h[1] & 0x7F
    mask = c.recv(4)
    data = b""
    while len(data) < n:
        data += c.recv(n - len(data))
    text = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    c.sendall(bytes([0x81, len(text)]) + text)
"#;

#[tokio::test]
async fn websockets_pass_through_the_port_proxy() {
    use futures::{SinkExt, StreamExt};
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let id = small_box(&api, json!({})).await;
    let put = api
        .raw(
            api.http
                .put(format!("{}/v1/boxes/{id}/files/ws.py", api.url))
                .bearer_auth(&api.token)
                .body(WS_ECHO),
        )
        .await;
    assert_eq!(put.status, 204);
    let s = api
        .post("/v1/sessions", json!({"box": id, "agent": {"kind": "command", "argv": ["/usr/bin/python3", "/workspace/ws.py"]}}))
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let url = format!(
        "{}/v1/boxes/{id}/ports/8765/",
        api.url.replace("http://", "ws://")
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut ws = loop {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .expect("req");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", api.token).parse().expect("hdr"),
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => break ws,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no WebSocket through the proxy: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "hello through berth".into(),
    ))
    .await
    .expect("send");
    let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("msg");
    assert_eq!(msg.to_text().expect("text"), "hello through berth");
    srv.stop().await;
}

#[tokio::test]
async fn a_tenant_cannot_create_boxes_past_its_quota() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_MAX_BOXES_PER_TENANT", "2")]).await;
    let api = srv.client();
    let a = small_box(&api, json!({})).await;
    small_box(&api, json!({})).await;
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"]["code"].as_str()),
        (429, Some("quota_exceeded")),
        "{}",
        r.json
    );
    // Another tenant has its own quota; a destroyed box frees a place.
    let k = api.post("/v1/keys", json!({"tenant": "other"})).await;
    let other = Api::new(&api.url, k.json["key"].as_str().expect("key"));
    small_box(&other, json!({})).await;
    assert_eq!(
        api.delete(&format!("/v1/boxes/{a}")).await.json["state"],
        "destroyed"
    );
    small_box(&api, json!({})).await;
    srv.stop().await;
}

/// A box is not idle while an exec runs in it: with a 1 s idle timeout, a hybrid box and an
/// ephemeral one each run a 3 s exec to its end (before, the idle park or stop cut it at 1 s),
/// and only then, idle, the hybrid box parks.
#[tokio::test]
async fn a_running_exec_keeps_its_box_from_idling() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    for lifecycle in ["hybrid", "ephemeral"] {
        let bx = small_box(&api, json!({"lifecycle": lifecycle, "idle_timeout_s": 1})).await;
        let out = api
            .post(
                &format!("/v1/boxes/{bx}/exec"),
                json!({"argv": ["/bin/sh", "-c", "sleep 3; echo done"]}),
            )
            .await;
        assert_eq!(out.status, 200, "{lifecycle}: {}", out.json);
        assert_eq!(out.json["exit_code"], 0, "{lifecycle}: {}", out.json);
        assert_eq!(out.json["stdout"], "done\n", "{lifecycle}: {}", out.json);
        if lifecycle == "hybrid" {
            api.wait_for(&format!("/v1/boxes/{bx}"), 30, |b| b["state"] == "parked")
                .await;
        }
    }
    srv.stop().await;
}

/// A hybrid box whose snapshot cannot be stored keeps running with its files (the park is
/// abandoned, the reason recorded); once the store works again the next idle period parks it,
/// and an exec restores it with the files.
#[tokio::test]
async fn a_failed_park_leaves_the_box_running() {
    let dir = tempfile::tempdir().expect("tmp");
    let snaps = dir.path().join("snaps");
    let snaps_env = snaps.to_string_lossy().into_owned();
    let srv = Server::start_with(
        &dir.path().join("data"),
        &[("BERTH_SNAPSHOT_DIR", snaps_env.as_str())],
    )
    .await;
    let api = srv.client();
    // Break the store: its `boxes/` prefix is a file.
    std::fs::write(snaps.join("boxes"), b"in the way").expect("block the store");
    let bx = small_box(&api, json!({"lifecycle": "hybrid", "idle_timeout_s": 1})).await;
    let put = api
        .raw(
            api.http
                .put(format!("{}/v1/boxes/{bx}/files/notes.txt", api.url))
                .bearer_auth(&api.token)
                .body("keep me"),
        )
        .await;
    assert_eq!(put.status, 204);
    let b = api
        .wait_for(&format!("/v1/boxes/{bx}"), 30, |b| {
            b["state_reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("park failed"))
        })
        .await;
    assert_eq!(b["state"], "running", "{b}");
    assert!(b.get("snapshot").is_none(), "{b}");
    let out = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": ["cat", "/workspace/notes.txt"]}),
        )
        .await;
    assert_eq!(out.json["stdout"], "keep me", "{}", out.json);

    // Parking on request answers the failure too, and only hybrid boxes park.
    let r = api.post(&format!("/v1/boxes/{bx}/park"), json!({})).await;
    assert_eq!(r.status, 500, "{}", r.json);
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}")).await.json["state"],
        "running"
    );
    let plain = small_box(&api, json!({})).await;
    let r = api
        .post(&format!("/v1/boxes/{plain}/park"), json!({}))
        .await;
    assert_eq!(r.status, 409, "{}", r.json);

    std::fs::remove_file(snaps.join("boxes")).expect("unblock");
    api.wait_for(&format!("/v1/boxes/{bx}"), 30, |b| b["state"] == "parked")
        .await;
    // Looking at a parked box does not wake it.
    let r = api.get(&format!("/v1/boxes/{bx}/stats")).await;
    assert_eq!(r.status, 409, "{}", r.json);
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}")).await.json["state"],
        "parked"
    );
    let out = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": ["cat", "/workspace/notes.txt"]}),
        )
        .await;
    assert_eq!(out.status, 200, "{}", out.json);
    assert_eq!(out.json["stdout"], "keep me", "restored with its files");
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}")).await.json["state"],
        "running"
    );
    srv.stop().await;
}

/// A shell agent: runs each input line, answers with one line `output|rc=N`.
fn shell_agent() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c",
        "while read -r l; do out=$(sh -c \"$l\" 2>&1); rc=$?; echo \"$(printf %s \"$out\" | tr '\\n' ' ')|rc=$rc\"; done"]})
}

/// Run `cmd` through a shell agent's input; its answer line (the agent's `n`th).
async fn ask(api: &Api, sid: &str, cmd: &str, n: usize) -> String {
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({ "content": cmd }),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    let evs = api.until(sid, "stdout", n).await;
    evs.iter()
        .filter(|e| e["type"] == "stdout")
        .nth(n - 1)
        .and_then(|e| e["data"]["text"].as_str())
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

/// The shared-box pattern: two agents in one box, each its own uid and directory; neither
/// can write or read the other's files, signal the other, or write the shared area, which
/// the files API fills; they talk through the box-side berth API.
#[tokio::test]
async fn agents_in_a_shared_box_are_kept_apart_and_can_message_each_other() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let r = api
        .post("/v1/boxes", json!({"lifecycle": "hybrid", "shared": true}))
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    // A workdir is refused before any box is made for the session.
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"lifecycle": "persistent", "shared": true}, "agent": shell_agent(), "workdir": "/workspace"}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(api.get("/v1/boxes").await.json["items"], json!([]));
    let bx = small_box(&api, json!({"lifecycle": "persistent", "shared": true})).await;
    let start = |prompt: &'static str| {
        api.post(
            "/v1/sessions",
            json!({"box": bx, "agent": shell_agent(), "prompt": prompt}),
        )
    };
    let a = start("id -u; pwd").await;
    assert_eq!(a.status, 201, "{}", a.json);
    let b = start("id -u; pwd").await;
    assert_eq!(b.status, 201, "{}", b.json);
    let (a, b) = (
        a.json["id"].as_str().expect("id").to_string(),
        b.json["id"].as_str().expect("id").to_string(),
    );
    let api = &api;
    let first = |sid: String| async move {
        let evs = api.until(&sid, "stdout", 1).await;
        let e = evs.iter().find(|e| e["type"] == "stdout").expect("stdout");
        e["data"]["text"]
            .as_str()
            .unwrap_or_default()
            .trim_end()
            .to_string()
    };
    assert_eq!(
        first(a.clone()).await,
        format!("2000 /workspace/sessions/{a}|rc=0")
    );
    assert_eq!(
        first(b.clone()).await,
        format!("2001 /workspace/sessions/{b}|rc=0")
    );

    assert_eq!(
        ask(api, &a, "echo mine > a.txt && cat a.txt", 2).await,
        "mine|rc=0"
    );
    let theirs = format!("/workspace/sessions/{a}/a.txt");
    let out = ask(api, &b, &format!("echo evil > {theirs}"), 2).await;
    assert!(
        out.contains("Permission denied") && !out.ends_with("rc=0"),
        "{out}"
    );
    let out = ask(api, &b, &format!("cat {theirs}"), 3).await;
    assert!(
        out.contains("Permission denied") && !out.ends_with("rc=0"),
        "{out}"
    );
    let out = ask(api, &b, "kill -KILL $(pgrep -u 2000 | head -n 1)", 4).await;
    assert!(
        out.contains("not permitted") && !out.ends_with("rc=0"),
        "{out}"
    );

    // The shared area: filled through the files API, read-only to the agents.
    let put = api
        .raw(
            api.http
                .put(format!("{}/v1/boxes/{bx}/files/shared/brief.txt", api.url))
                .bearer_auth(&api.token)
                .body("the brief"),
        )
        .await;
    assert_eq!(put.status, 204);
    assert_eq!(
        ask(api, &b, "cat /workspace/shared/brief.txt", 5).await,
        "the brief|rc=0"
    );
    let out = ask(api, &b, "echo x >> /workspace/shared/brief.txt", 6).await;
    assert!(!out.ends_with("rc=0"), "{out}");

    // B messages A through the box-side API; a wrong token is refused.
    let post = |token: &str| {
        format!(
            "curl -s -o /dev/null -w %{{http_code}} -X POST -H \"x-api-key: {token}\" \
             -H 'content-type: application/json' -d '{{\"content\": \"echo got-it\"}}' \
             $BERTH_API_URL/v1/sessions/{a}/messages"
        )
    };
    assert_eq!(ask(api, &b, &post("not-a-token"), 7).await, "401|rc=0");
    assert_eq!(
        ask(api, &b, &post("$BERTH_SESSION_TOKEN"), 8).await,
        "202|rc=0"
    );
    let evs = api.until(&a, "stdout", 4).await;
    let texts: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    // Delivered to A's input, attributed to B (the shell agent runs both lines it got).
    let all = texts.join("\n");
    assert!(
        all.contains(&format!("[message from session {b}]")),
        "{all}"
    );
    assert!(all.contains("got-it"), "{all}");
    // A's file is untouched.
    let n = texts.len() + 1;
    assert_eq!(ask(api, &a, "cat a.txt", n).await, "mine|rc=0");
    srv.stop().await;
}

/// A trigger's webhook takes a bounded number of calls a minute (each starts a session), by
/// signature or by bearer secret; a body that is not JSON still fills the prompt.
#[tokio::test]
async fn webhooks_are_rate_limited_per_trigger() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_HOOK_RATE_PER_MINUTE", "2")]).await;
    let api = srv.client();
    let bx = small_box(&api, json!({"lifecycle": "persistent"})).await;
    let r = api
        .post(
            "/v1/triggers",
            json!({"box": bx, "agent": echo_agent(), "prompt": "got {{body}}"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let path = r.json["webhook_path"].as_str().expect("path").to_string();
    let secret = r.json["secret"].as_str().expect("secret").to_string();
    // Secret values have no place in a stored, listed trigger.
    let r = api
        .post(
            "/v1/triggers",
            json!({"box": {"network": {"allow": ["api.example.com"]},
                           "secrets": [{"host": "api.example.com", "header": "x-key", "value": "s3cr3t"}]},
                   "agent": echo_agent(), "prompt": "x"}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(
        r.json.to_string().contains("cannot hold secrets"),
        "{}",
        r.json
    );
    let listed = api.get("/v1/triggers").await;
    assert!(!String::from_utf8_lossy(&listed.bytes).contains("s3cr3t"));
    let call = || {
        api.raw(
            api.http
                .post(format!("{}{path}", api.url))
                .bearer_auth(&secret)
                .body("plain text"),
        )
    };
    let big = api
        .raw(
            api.http
                .post(format!("{}{path}", api.url))
                .bearer_auth(&secret)
                .body(vec![b'x'; 2 << 20]),
        )
        .await;
    assert_eq!(big.status, 413, "a webhook body over 1 MiB");
    assert!(big.json["error"]["message"].is_string(), "{}", big.json);
    let first = call().await;
    assert_eq!(first.status, 202, "{}", first.json);
    assert_eq!(call().await.status, 202);
    let third = call().await;
    assert_eq!(third.status, 429, "{}", third.json);
    let sid = first.json["session_id"].as_str().expect("session");
    let evs = api.until(sid, "stdout", 1).await;
    assert!(
        evs.iter()
            .any(|e| e["data"]["text"] == "echo: got plain text"),
        "{evs:?}"
    );
    srv.stop().await;
}
