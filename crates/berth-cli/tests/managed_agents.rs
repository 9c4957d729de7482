//! The Managed Agents API under `/anthropic`: the official Python SDK driving a real server with
//! the real Claude Code CLI against the mock model, and the edge cases over raw HTTP.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{claude_bin, run_sdk_script, tenant_key, venv_python, Api, Server};
use serde_json::{json, Value};
use std::time::Duration;

const REAL_KEY: &str = "sk-ant-real-secret-for-tests-0123456789";

async fn setup() -> (tempfile::TempDir, Server, Mock) {
    setup_with(Scenario::demo()).await
}

/// The demo, and a task whose second command writes (the CLI asks before it) while its first
/// only reads (the CLI runs it without asking).
fn with_note_rule() -> Scenario {
    let mut sc = Scenario::demo();
    let note: berth_mock_model::scenario::Rule = serde_json::from_value(json!({
        "match": "make a note",
        "steps": [
            {"tool_use": [{"name": "Bash", "input": {"command": "ls /workspace", "description": "look"}}]},
            {"tool_use": [{"name": "Bash", "input": {"command": "echo noted > /workspace/note.txt && cat /workspace/note.txt", "description": "note"}}]},
            {"text": "noted"}
        ]
    }))
    .expect("rule");
    sc.rules.insert(0, note);
    sc
}

async fn setup_with(scenario: Scenario) -> (tempfile::TempDir, Server, Mock) {
    let mock = Mock::new(scenario, Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let bin = claude_bin();
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_UPSTREAM_URL", mock_url.as_str()),
            ("ANTHROPIC_API_KEY", REAL_KEY),
            ("BERTH_CLAUDE_BIN", bin.as_str()),
        ],
    )
    .await;
    (dir, srv, mock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_drives_agents_environments_and_sessions() {
    let (_d, srv, mock) = setup().await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let (_, b) = tenant_key(&srv.client(), "team-b").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/managed_agents.py");
    let mut cmd = tokio::process::Command::new(venv_python());
    cmd.arg(script).env("BERTH_OTHER_KEY", &b.token);
    let res = run_sdk_script(cmd, &srv, &a.token).await;
    assert_eq!(res["sdk"], "2.10.0", "the pinned SDK ran");
    // The session's usage is what the gateway metered: the mock's own figures, exactly.
    let seen = mock.recorded();
    assert_eq!(seen.len(), 3, "three model turns for the one message");
    let sum = |k: &str| {
        seen.iter()
            .map(|r| r.usage[k].as_u64().expect("n"))
            .sum::<u64>()
    };
    assert_eq!(res["usage"]["input_tokens"], sum("input_tokens"), "{res}");
    assert_eq!(res["usage"]["output_tokens"], sum("output_tokens"), "{res}");
    // The spans carry the CLI's per-request usage: its input tokens are the metered ones.
    assert_eq!(res["span_input_tokens"], sum("input_tokens"), "{res}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_typescript_sdk_streams_a_turn_and_pages() {
    let (_d, srv, mock) = setup().await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/managed_agents.cjs");
    // Where `scripts/test` installs the pinned SDK (`npm install --prefix`).
    let prefix =
        std::env::var("BERTH_TEST_NODE_SDK").unwrap_or_else(|_| "/opt/berth/test-node-sdk".into());
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(script)
        .env("NODE_PATH", format!("{prefix}/node_modules"));
    let res = run_sdk_script(cmd, &srv, &a.token).await;
    let seen = mock.recorded();
    let sum = |k: &str| {
        seen.iter()
            .map(|r| r.usage[k].as_u64().expect("n"))
            .sum::<u64>()
    };
    assert_eq!(res["usage"]["input_tokens"], sum("input_tokens"), "{res}");
    assert_eq!(res["usage"]["output_tokens"], sum("output_tokens"), "{res}");
}

/// A client speaking Anthropic's conventions: `x-api-key`, the version and beta headers.
fn anth(api: &Api) -> Anth {
    Anth(api.clone())
}

struct Anth(Api);

struct Answer {
    status: u16,
    json: Value,
    headers: reqwest::header::HeaderMap,
}

impl Anth {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .0
            .http
            .request(m, format!("{}/anthropic{path}", self.0.url))
            .header("x-api-key", &self.0.token)
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "managed-agents-2026-04-01");
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.expect("body");
        Answer {
            status,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers,
        }
    }
    async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some(body)).await
    }
}

/// An Anthropic error envelope of `kind`, its `request_id` the same as the header's.
fn is_error(a: &Answer, status: u16, kind: &str) {
    assert_eq!(a.status, status, "{}", a.json);
    assert_eq!(a.json["type"], "error", "{}", a.json);
    assert_eq!(a.json["error"]["type"], kind, "{}", a.json);
    let rid = a.headers.get("request-id").and_then(|v| v.to_str().ok());
    assert!(
        rid.is_some_and(|r| r.starts_with("req_")),
        "{:?}",
        a.headers
    );
    assert_eq!(a.json["request_id"].as_str(), rid, "{}", a.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_http_auth_errors_pagination_versions_and_tenants() {
    let (_d, srv, _mock) = setup().await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let (_, b) = tenant_key(&srv.client(), "team-b").await;
    let (a, b) = (anth(&a), anth(&b));

    // Auth: no key, a wrong key; both header styles and `?beta=true` work.
    let none =
        a.0.http
            .get(format!("{}/anthropic/v1/agents", srv.url))
            .send()
            .await
            .expect("req");
    assert_eq!(none.status(), 401);
    let wrong = Anth(Api::new(&srv.url, "berth_not_a_key"));
    is_error(&wrong.get("/v1/agents").await, 401, "authentication_error");
    let bearer =
        a.0.http
            .get(format!("{}/anthropic/v1/agents?beta=true", srv.url))
            .bearer_auth(&a.0.token)
            .send()
            .await
            .expect("req");
    assert_eq!(bearer.status(), 200);
    let r = a.get("/v1/agents?beta=true").await;
    assert_eq!(
        r.json,
        json!({"data": [], "next_page": null, "prev_page": null})
    );
    assert!(r.headers.contains_key("request-id"));

    // Agents: create, 404s, version conflicts (no retry), history.
    let r = a
        .post(
            "/v1/agents",
            json!({"name": "one", "model": {"id": "claude-x", "speed": "fast"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let id = r.json["id"].as_str().expect("id").to_string();
    assert_eq!(r.json["version"], 1);
    assert_eq!(r.json["tools"], json!([]));
    is_error(
        &a.get("/v1/agents/agent_missing").await,
        404,
        "not_found_error",
    );
    is_error(
        &a.get(&format!("/v1/agents/{id}?version=7")).await,
        404,
        "not_found_error",
    );
    is_error(
        &a.post("/v1/agents", json!({"model": "m"})).await,
        400,
        "invalid_request_error",
    );
    is_error(
        &a.post("/v1/agents", json!({"name": "n", "model": "m", "tools": [{"type": "custom", "name": "x", "input_schema": {"type": "array"}}]}))
            .await,
        400,
        "invalid_request_error",
    );
    let up = a
        .post(
            &format!("/v1/agents/{id}"),
            json!({"version": 1, "metadata": {"k": "v"}}),
        )
        .await;
    assert_eq!(up.json["version"], 2, "{}", up.json);
    let stale = a
        .post(
            &format!("/v1/agents/{id}"),
            json!({"version": 1, "name": "late"}),
        )
        .await;
    is_error(&stale, 409, "invalid_request_error");
    assert_eq!(
        stale
            .headers
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );
    // Metadata is a patch: null deletes.
    let up = a
        .post(
            &format!("/v1/agents/{id}"),
            json!({"metadata": {"k": null, "j": "w"}}),
        )
        .await;
    assert_eq!(up.json["metadata"], json!({"j": "w"}), "{}", up.json);
    assert_eq!(
        a.get(&format!("/v1/agents/{id}?version=2")).await.json["metadata"],
        json!({"k": "v"})
    );

    // Pagination: cursors walk forward and back, end with null, refuse garbage.
    for i in 0..4 {
        a.post("/v1/agents", json!({"name": format!("f{i}"), "model": "m"}))
            .await;
    }
    let mut ids = Vec::new();
    let mut page: Option<String> = None;
    loop {
        let q = page
            .as_ref()
            .map(|p| format!("&page={p}"))
            .unwrap_or_default();
        let r = a.get(&format!("/v1/agents?limit=2{q}")).await;
        assert_eq!(r.status, 200, "{}", r.json);
        ids.extend(
            r.json["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|x| x["id"].clone()),
        );
        match r.json["next_page"].as_str() {
            Some(n) => page = Some(n.to_string()),
            None => break,
        }
        assert!(ids.len() <= 5, "pagination does not end");
    }
    assert_eq!(ids.len(), 5);
    assert_eq!(ids.last(), Some(&json!(id)), "newest first");
    let last = a
        .get(&format!("/v1/agents?limit=2&page={}", page.expect("page")))
        .await;
    let prev = last.json["prev_page"].as_str().expect("prev").to_string();
    let back = a.get(&format!("/v1/agents?limit=2&page={prev}")).await;
    assert_eq!(back.json["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(back.json["data"][0]["id"], ids[2]);
    is_error(
        &a.get("/v1/agents?page=garbage").await,
        400,
        "invalid_request_error",
    );
    is_error(
        &a.get("/v1/agents?limit=0").await,
        400,
        "invalid_request_error",
    );

    // Archive hides from the list unless asked; an archived agent starts no session.
    a.post(
        &format!("/v1/agents/{}/archive", ids[0].as_str().expect("id")),
        json!({}),
    )
    .await;
    let listed = a.get("/v1/agents").await.json["data"]
        .as_array()
        .map(Vec::len);
    assert_eq!(listed, Some(4));
    let all = a.get("/v1/agents?include_archived=true").await.json["data"]
        .as_array()
        .map(Vec::len);
    assert_eq!(all, Some(5));

    // Environments: what berth cannot serve is a clear 400; names are unique.
    for config in [
        json!({"type": "self_hosted"}),
        json!({"type": "cloud", "networking": {"type": "unrestricted"}}),
        json!({"type": "cloud", "packages": {"type": "packages", "apt": ["curl"]}}),
        json!({"type": "cloud", "networking": {"type": "limited", "allowed_hosts": ["bad host"]}}),
    ] {
        let r = a
            .post("/v1/environments", json!({"name": "x", "config": config}))
            .await;
        is_error(&r, 400, "invalid_request_error");
        assert!(r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let env = a
        .post("/v1/environments", json!({"name": "e", "config": {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": ["example.com"], "allow_package_managers": true}}}))
        .await;
    assert_eq!(env.status, 200, "{}", env.json);
    let env_id = env.json["id"].as_str().expect("id").to_string();
    is_error(
        &a.post("/v1/environments", json!({"name": "e"})).await,
        409,
        "invalid_request_error",
    );

    // Unsupported families say so, in the envelope.
    for path in [
        "/v1/vaults",
        "/v1/memory_stores",
        "/v1/sessions/sesn_x/threads",
    ] {
        let r = a.get(path).await;
        is_error(&r, 404, "not_found_error");
        assert!(r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not implement")));
    }

    // A session: its box's egress allowlist is the environment's, plus the registries.
    let s = a
        .post(
            "/v1/sessions",
            json!({"agent": id, "environment_id": env_id}),
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.json);
    assert_eq!(s.json["status"], "idle");
    assert!(s.json.get("berth").is_none(), "internal fields stay inside");
    let sid = s.json["id"].as_str().expect("id").to_string();
    let boxes = a.0.get("/v1/boxes").await.json;
    let bx = boxes["items"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["tenant"] == "team-a"))
        .expect("the session's box")
        .clone();
    let allow = &bx["network"]["allow"];
    assert!(
        allow
            .as_array()
            .is_some_and(|a| a.contains(&json!("example.com")) && a.contains(&json!("pypi.org"))),
        "{bx}"
    );
    assert_eq!(bx["lifecycle"], "hybrid");

    // Bracketed arrays filter.
    let r = a
        .get("/v1/sessions?statuses[]=idle&statuses[]=running")
        .await;
    assert_eq!(
        r.json["data"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.json
    );
    let r = a.get("/v1/sessions?statuses%5B%5D=terminated").await;
    assert_eq!(r.json["data"], json!([]), "{}", r.json);
    is_error(
        &a.get("/v1/sessions?statuses[]=sleepy").await,
        400,
        "invalid_request_error",
    );
    is_error(
        &a.get(&format!("/v1/sessions/{sid}/events?types[]=nope"))
            .await,
        400,
        "invalid_request_error",
    );

    // Sending what berth cannot act on fails whole, without a retry.
    let r = a
        .post(&format!("/v1/sessions/{sid}/events"), json!({"events": [{"type": "user.tool_confirmation", "tool_use_id": "sevt_x", "result": "allow"}]}))
        .await;
    is_error(&r, 400, "invalid_request_error");
    assert_eq!(
        r.headers
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );

    // Tenants: the other one sees nothing and can do nothing.
    is_error(
        &b.get(&format!("/v1/agents/{id}")).await,
        404,
        "not_found_error",
    );
    is_error(
        &b.get(&format!("/v1/environments/{env_id}")).await,
        404,
        "not_found_error",
    );
    is_error(
        &b.get(&format!("/v1/sessions/{sid}")).await,
        404,
        "not_found_error",
    );
    is_error(
        &b.get(&format!("/v1/sessions/{sid}/events")).await,
        404,
        "not_found_error",
    );
    let r = b
        .post(
            &format!("/v1/sessions/{sid}/events"),
            json!({"events": [{"type": "user.message", "content": "hi"}]}),
        )
        .await;
    is_error(&r, 404, "not_found_error");
    assert_eq!(b.get("/v1/sessions").await.json["data"], json!([]));
    is_error(
        &b.post(
            "/v1/sessions",
            json!({"agent": id, "environment_id": env_id}),
        )
        .await,
        404,
        "not_found_error",
    );

    // The stream's framing, raw: every frame names its event, ids resume with Last-Event-ID.
    let stream_url = format!("{}/anthropic/v1/sessions/{sid}/events/stream", srv.url);
    let open = |last: Option<String>| {
        let mut rb =
            a.0.http
                .get(&stream_url)
                .header("x-api-key", &a.0.token)
                .header("accept", "application/json");
        if let Some(l) = last {
            rb = rb.header("last-event-id", l);
        }
        rb.send()
    };
    let resp = open(None).await.expect("stream");
    assert_eq!(resp.status(), 200);
    let r = a
        .post(&format!("/v1/sessions/{sid}/events"), json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "please make a file"}]}]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["data"][0]["processed_at"], Value::Null);
    let frames = read_frames_until(resp, "session.status_idle").await;
    assert!(
        frames.iter().all(|f| f.event.is_some()),
        "every frame has event:"
    );
    let ids: Vec<String> = frames
        .iter()
        .filter(|f| f.event.as_deref() != Some("ping"))
        .map(|f| f.id.clone().expect("id"))
        .collect();
    let listed = a.get(&format!("/v1/sessions/{sid}/events")).await.json;
    let listed_ids: Vec<String> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids, listed_ids, "the stream and the list agree");
    // Resume after the third event: the rest, nothing twice.
    let resumed = read_frames_until(
        open(Some(ids[2].clone())).await.expect("stream"),
        "session.status_idle",
    )
    .await;
    let again: Vec<String> = resumed.iter().filter_map(|f| f.id.clone()).collect();
    assert_eq!(again, ids[3..].to_vec());
    // Events pages: forward only, null at the end.
    let p1 = a
        .get(&format!("/v1/sessions/{sid}/events?limit=2"))
        .await
        .json;
    assert_eq!(p1["data"].as_array().map(Vec::len), Some(2));
    let p2 = a
        .get(&format!(
            "/v1/sessions/{sid}/events?limit=1000&page={}",
            p1["next_page"].as_str().expect("next")
        ))
        .await
        .json;
    assert_eq!(p2["data"].as_array().map(Vec::len), Some(ids.len() - 2));
    assert_eq!(p2["next_page"], Value::Null);

    // Delete: the agent and its box are gone.
    let r = a.call("DELETE", &format!("/v1/sessions/{sid}"), None).await;
    assert_eq!(r.json, json!({"id": sid, "type": "session_deleted"}));
    let bx_id = bx["id"].as_str().expect("box id");
    a.0.wait_for(&format!("/v1/boxes/{bx_id}"), 30, |b| {
        b["state"] == "destroyed"
    })
    .await;
    is_error(
        &a.get(&format!("/v1/sessions/{sid}")).await,
        404,
        "not_found_error",
    );
    // The server still answers berth's own API.
    assert_eq!(srv.client().get("/healthz").await.status, 200);
}

struct Frame {
    event: Option<String>,
    id: Option<String>,
    data: Value,
}

/// SSE frames (parsed by hand, to check the wire format itself) up to the first `kind` event.
async fn read_frames_until(mut resp: reqwest::Response, kind: &str) -> Vec<Frame> {
    let mut buf = String::new();
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        while let Some(end) = buf.find("\n\n") {
            let raw: String = buf.drain(..end + 2).collect();
            let mut f = Frame {
                event: None,
                id: None,
                data: Value::Null,
            };
            let mut data = false;
            for line in raw.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    f.event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("id:") {
                    f.id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = true;
                    f.data = serde_json::from_str(v.trim()).unwrap_or(Value::Null);
                }
            }
            if !data && f.event.is_none() {
                continue; // a comment line
            }
            let done = f.event.as_deref() == Some(kind);
            frames.push(f);
            if done {
                return frames;
            }
        }
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("the stream reached the event in time")
            .expect("chunk")
            .expect("the stream ended early");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_queued_messages_concurrent_updates_and_revoked_streams() {
    let (_d, srv, mock) = setup().await;
    let (key_id, a) = tenant_key(&srv.client(), "team-a").await;
    let a = anth(&a);

    // Concurrent updates from one version: exactly one wins, the rest are 409s (the store's
    // unique version is the check), none is retried.
    let r = a
        .post("/v1/agents", json!({"name": "c", "model": "m"}))
        .await;
    let id = r.json["id"].as_str().expect("id").to_string();
    let path = format!("/v1/agents/{id}");
    let tries =
        (0..6).map(|i| a.post(&path, json!({"version": 1, "description": format!("d{i}")})));
    let answers = futures::future::join_all(tries).await;
    let won = answers.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        won,
        1,
        "{:?}",
        answers.iter().map(|r| &r.json).collect::<Vec<_>>()
    );
    for r in answers.iter().filter(|r| r.status != 200) {
        is_error(r, 409, "invalid_request_error");
        assert_eq!(
            r.headers
                .get("x-should-retry")
                .and_then(|v| v.to_str().ok()),
            Some("false")
        );
    }
    let versions = a.get(&format!("{path}/versions")).await.json;
    assert_eq!(
        versions["data"].as_array().map(Vec::len),
        Some(2),
        "{versions}"
    );

    let env = a.post("/v1/environments", json!({"name": "e"})).await;
    let env_id = env.json["id"].as_str().expect("id");
    let s = a
        .post(
            "/v1/sessions",
            json!({"agent": id, "environment_id": env_id}),
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.json);
    let sid = s.json["id"].as_str().expect("id").to_string();
    let events = format!("/v1/sessions/{sid}/events");
    let stream_url = format!("{}/anthropic{events}/stream", srv.url);
    is_error(
        &a.get(&format!("{events}/stream?event_deltas[]=agent.tool_use"))
            .await,
        400,
        "invalid_request_error",
    );

    // An interrupt during a slow turn: idle (end_turn) within 5 s.
    let resp =
        a.0.http
            .get(&stream_url)
            .header("x-api-key", &a.0.token)
            .send()
            .await
            .expect("stream");
    let r = a.post(&events, json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "be slow"}]}]})).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !mock
        .recorded()
        .iter()
        .any(|r| r.body["messages"].to_string().contains("be slow"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the model never saw the slow task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = std::time::Instant::now();
    let r = a
        .post(&events, json!({"events": [{"type": "user.interrupt"}]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let frames = read_frames_until(resp, "session.status_idle").await;
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "idle {:?} after the interrupt",
        sent.elapsed()
    );
    assert!(frames
        .iter()
        .any(|f| f.event.as_deref() == Some("session.status_running")));
    let listed = a.get(&events).await.json;
    let idle = listed["data"]
        .as_array()
        .and_then(|d| d.iter().rfind(|e| e["type"] == "session.status_idle"))
        .expect("idle")
        .clone();
    assert_eq!(idle["stop_reason"]["type"], "end_turn", "{idle}");

    // Two messages sent at once run in order, one after the other.
    let r = a
        .post(
            &events,
            json!({"events": [
                {"type": "user.message", "content": [{"type": "text", "text": "first question"}]},
                {"type": "user.message", "content": [{"type": "text", "text": "second question"}]},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["data"].as_array().map(Vec::len), Some(2));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let l = a.get(&format!("{events}?types[]=agent.message")).await.json;
        if l["data"].as_array().map(Vec::len) >= Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "two answers never came: {l}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen: Vec<String> = mock
        .recorded()
        .iter()
        .map(|r| r.body["messages"].to_string())
        .collect();
    let first = seen
        .iter()
        .position(|m| m.contains("first question"))
        .expect("first asked");
    let second = seen
        .iter()
        .position(|m| m.contains("second question"))
        .expect("second asked");
    assert!(first < second, "in order");
    let users: Vec<Value> = a.get(&format!("{events}?types[]=user.message")).await.json["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["content"][0]["text"].clone())
        .collect();
    assert_eq!(
        users,
        vec![
            json!("be slow"),
            json!("first question"),
            json!("second question")
        ]
    );

    // Deleting the key ends its open stream.
    let resp =
        a.0.http
            .get(&stream_url)
            .header("x-api-key", &a.0.token)
            .send()
            .await
            .expect("stream");
    assert_eq!(resp.status(), 200);
    let r = srv.client().delete(&format!("/v1/keys/{key_id}")).await;
    assert!(r.status < 300, "{}", r.json);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        let mut resp = resp;
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its key");
    is_error(&a.get(&events).await, 401, "authentication_error");
    assert_eq!(srv.client().get("/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_is_idle_and_resumes_its_conversation() {
    let (_d, srv, mock) = setup().await;
    let (_, key) = tenant_key(&srv.client(), "team-a").await;
    let a = anth(&key);
    let agent = a
        .post("/v1/agents", json!({"name": "p", "model": "m"}))
        .await;
    let env = a.post("/v1/environments", json!({"name": "e"})).await;
    let s = a
        .post(
            "/v1/sessions",
            // The first message as an initial event of the create.
            json!({"agent": agent.json["id"], "environment_id": env.json["id"],
                "initial_events": [{"type": "user.message", "content": [{"type": "text", "text": "remember the word pelican"}]}]}),
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.json);
    let sid = s.json["id"].as_str().expect("id").to_string();
    let events = format!("/v1/sessions/{sid}/events");
    let idle_count = |a: &Anth| {
        let events = events.clone();
        let a = Anth(a.0.clone());
        async move {
            a.get(&format!("{events}?types[]=session.status_idle"))
                .await
                .json["data"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(0)
        }
    };
    let say = |text: &str| json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": text}]}]});
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while idle_count(&a).await < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "first turn never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A stream open across the park, and one opened while parked, both follow the next turn.
    let stream_url = format!("{}/anthropic{events}/stream", srv.url);
    let open = || {
        a.0.http
            .get(&stream_url)
            .header("x-api-key", &a.0.token)
            .send()
    };
    let before = open().await.expect("stream");
    // Park the session's box (what its idle timeout does): the session stays idle.
    let bx = key.get("/v1/boxes").await.json["items"][0]["id"]
        .as_str()
        .expect("box")
        .to_string();
    let r = key.post(&format!("/v1/boxes/{bx}/park"), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["state"], "parked", "{}", r.json);
    let got = a.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(got["status"], "idle", "{got}");
    let listed = a.get(&events).await.json;
    assert!(
        listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .all(|e| e["type"] != "session.status_terminated"),
        "parking is not the end: {listed}"
    );
    let during = open().await.expect("stream");
    // The next message restores the box and the CLI resumes the same conversation.
    assert_eq!(
        a.post(&events, say("which word?")).await.status,
        200,
        "send to a parked session"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while idle_count(&a).await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "second turn never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = mock.recorded().last().cloned().expect("request");
    let msgs = last.body["messages"].to_string();
    assert!(
        msgs.contains("pelican") && msgs.contains("which word?"),
        "resumed: {msgs}"
    );
    assert_eq!(
        a.get(&format!("/v1/sessions/{sid}")).await.json["status"],
        "idle"
    );
    for resp in [before, during] {
        let frames = read_frames_until(resp, "session.status_idle").await;
        let kinds: Vec<&str> = frames.iter().filter_map(|f| f.event.as_deref()).collect();
        assert!(
            kinds.contains(&"user.message") && kinds.contains(&"agent.message"),
            "{kinds:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_ask_waits_for_the_clients_confirmation_allowed_and_denied() {
    let (_d, srv, _mock) = setup_with(with_note_rule()).await;
    let (_, key) = tenant_key(&srv.client(), "team-a").await;
    let a = anth(&key);
    let agent = a
        .post(
            "/v1/agents",
            json!({"name": "careful", "model": "m", "tools": [{
                "type": "agent_toolset_20260401",
                "configs": [{"name": "bash", "permission_policy": {"type": "always_ask"}}],
            }]}),
        )
        .await;
    assert_eq!(agent.status, 200, "{}", agent.json);
    assert_eq!(
        agent.json["tools"][0]["configs"][0]["permission_policy"]["type"],
        "always_ask"
    );
    let env = a.post("/v1/environments", json!({"name": "e"})).await;
    let s = a
        .post(
            "/v1/sessions",
            json!({"agent": agent.json["id"], "environment_id": env.json["id"]}),
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.json);
    let sid = s.json["id"].as_str().expect("id").to_string();
    let events = format!("/v1/sessions/{sid}/events");
    let stream_url = format!("{}/anthropic{events}/stream", srv.url);
    let say = json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "make a note"}]}]});

    for (answer, deny_message) in [("allow", None), ("deny", Some("not in this box"))] {
        let resp =
            a.0.http
                .get(&stream_url)
                .header("x-api-key", &a.0.token)
                .send()
                .await
                .expect("stream");
        assert_eq!(a.post(&events, say.clone()).await.status, 200);
        // `ls` runs without asking; the writing command asks, and the turn waits on the client.
        let frames = read_frames_until(resp, "session.status_idle").await;
        let idle = &frames.last().expect("idle").data;
        assert_eq!(idle["stop_reason"]["type"], "requires_action", "{idle}");
        let asked = idle["stop_reason"]["event_ids"][0]
            .as_str()
            .expect("event id")
            .to_string();
        let tool_use = frames
            .iter()
            .find(|f| f.id.as_deref() == Some(asked.as_str()))
            .expect("the asking tool use");
        assert_eq!(tool_use.data["name"], "bash", "{}", tool_use.data);
        assert_eq!(tool_use.data["evaluated_permission"], "ask");
        let waiting = a.get(&format!("/v1/sessions/{sid}")).await.json;
        assert_eq!(
            waiting["status"], "idle",
            "waiting on the client: {waiting}"
        );
        let uses: Vec<&Frame> = frames
            .iter()
            .filter(|f| f.event.as_deref() == Some("agent.tool_use"))
            .collect();
        assert_eq!(uses.len(), 2, "each tool use once");
        assert_eq!(uses[0].data["input"]["command"], "ls /workspace");
        assert_eq!(uses[0].data["evaluated_permission"], "allow");
        assert_eq!(uses[1].data["evaluated_permission"], "ask");
        let ls_result = frames
            .iter()
            .find(|f| f.event.as_deref() == Some("agent.tool_result"))
            .expect("the ls result");
        assert_eq!(
            ls_result.data["tool_use_id"].as_str(),
            uses[0].id.as_deref()
        );

        let resp =
            a.0.http
                .get(&stream_url)
                .header("x-api-key", &a.0.token)
                .send()
                .await
                .expect("stream");
        let mut confirmation =
            json!({"type": "user.tool_confirmation", "tool_use_id": asked, "result": answer});
        if let Some(m) = deny_message {
            confirmation["deny_message"] = json!(m);
        }
        let r = a.post(&events, json!({"events": [confirmation]})).await;
        assert_eq!(r.status, 200, "{}", r.json);
        let frames = read_frames_until(resp, "session.status_idle").await;
        assert_eq!(
            frames.first().and_then(|f| f.event.as_deref()),
            Some("session.status_running")
        );
        assert_eq!(
            frames.last().expect("idle").data["stop_reason"]["type"],
            "end_turn"
        );
        let result = frames
            .iter()
            .find(|f| {
                f.event.as_deref() == Some("agent.tool_result")
                    && f.data["tool_use_id"] == asked.as_str()
            })
            .expect("the bash result");
        let text = result.data["content"].to_string();
        match deny_message {
            None => assert!(text.contains("noted"), "{text}"),
            Some(m) => {
                assert!(text.contains(m), "{text}");
                assert_eq!(result.data["is_error"], true);
            }
        }
        // A tool use is confirmed once.
        let again = a.post(&events, json!({"events": [{"type": "user.tool_confirmation", "tool_use_id": asked, "result": "allow"}]})).await;
        assert!(again.status >= 400, "{}", again.json);
        assert_eq!(
            again
                .headers
                .get("x-should-retry")
                .and_then(|v| v.to_str().ok()),
            Some("false")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_budget_ends_the_turn_budget_reached_and_refuses_more() {
    let (_d, srv, mock) = setup().await;
    let (_, key) = tenant_key(&srv.client(), "team-a").await;
    let a = anth(&key);
    let agent = a
        .post("/v1/agents", json!({"name": "b", "model": "m"}))
        .await;
    let env = a.post("/v1/environments", json!({"name": "e"})).await;
    let bad = a
        .post(
            "/v1/sessions",
            json!({"agent": agent.json["id"], "environment_id": env.json["id"],
            "budget": {"type": "limit", "max_list_cost": {"amount": "-1", "currency": "USD"}}}),
        )
        .await;
    is_error(&bad, 400, "invalid_request_error");
    // A tenth of a cent: less than the first demo request costs.
    let budget = json!({"type": "limit", "max_list_cost": {"amount": "0.1", "currency": "USD"}});
    let s = a
        .post(
            "/v1/sessions",
            json!({"agent": agent.json["id"], "environment_id": env.json["id"], "budget": budget}),
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.json);
    assert_eq!(s.json["budget"]["max_list_cost"]["amount"], "0.1000");
    let sid = s.json["id"].as_str().expect("id").to_string();
    let events = format!("/v1/sessions/{sid}/events");
    let stream_url = format!("{}/anthropic{events}/stream", srv.url);
    let resp =
        a.0.http
            .get(&stream_url)
            .header("x-api-key", &a.0.token)
            .send()
            .await
            .expect("stream");
    let say = json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "please make a file"}]}]});
    assert_eq!(a.post(&events, say.clone()).await.status, 200);
    let frames = read_frames_until(resp, "session.status_idle").await;
    assert_eq!(
        frames.last().expect("idle").data["stop_reason"]["type"],
        "budget_reached"
    );
    assert_eq!(
        mock.recorded().len(),
        1,
        "only the request that crossed the budget reached the model"
    );
    // Spent: the next message is refused, and not to be retried.
    let r = a.post(&events, say).await;
    is_error(&r, 400, "invalid_request_error");
    assert_eq!(
        r.headers
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );
    let got = a.get(&format!("/v1/sessions/{sid}")).await.json;
    let spent: f64 = got["usage"]["list_cost"]["amount"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .expect("cents");
    assert!(spent >= 0.1, "{got}");
    assert_eq!(mock.recorded().len(), 1);
}
