//! Review fixes of the Managed Agents API under `/anthropic`: forged event ids, streams served
//! by a server that does not run the session (shared PostgreSQL), concurrent updates of
//! environments and sessions, and bounded list work.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use berth_store::testing::PgCluster;
use common::{claude_bin, tenant_key, Api, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const REAL_KEY: &str = "sk-ant-real-secret-for-tests-0123456789";

/// A server answering to the mock model with the real CLI; `db`: on that PostgreSQL database,
/// `admin`: the admin key it shares with the database's first server.
async fn serve(data: &Path, mock_url: &str, db: Option<&str>, admin: Option<&str>) -> Server {
    if let Some(key) = admin {
        std::fs::write(data.join("admin.key"), key).expect("admin key");
    }
    let bin = claude_bin();
    let mut env = vec![
        ("BERTH_UPSTREAM_URL", mock_url),
        ("ANTHROPIC_API_KEY", REAL_KEY),
        ("BERTH_CLAUDE_BIN", bin.as_str()),
    ];
    // Two servers on one database are two nodes: each needs a name of its own (a second
    // process under a node's name supersedes the first, which fences itself).
    let node = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(db) = db {
        env.push(("BERTH_DATABASE_URL", db));
        env.push(("BERTH_NODE_NAME", node.as_str()));
    }
    Server::start_with(data, &env).await
}

async fn mock() -> (Mock, String) {
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    (mock, url)
}

/// The database a test uses: on the shared test server when there is one, else on a cluster
/// of its own (returned to keep it alive).
async fn database(name: &str) -> (String, Option<PgCluster>) {
    let (admin, cluster) = match std::env::var("BERTH_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => (u, None),
        _ => {
            let c = PgCluster::start().expect("test PostgreSQL");
            (c.url(), Some(c))
        }
    };
    let name = format!("{name}_{}", std::process::id());
    let url = berth_store::postgres::ensure_database(&admin, &name)
        .await
        .expect("database");
    (url, cluster)
}

/// A client speaking Anthropic's conventions (`x-api-key`, version and beta headers).
struct Anth(Api);

struct Answer {
    status: u16,
    json: Value,
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
        let r = tokio::time::timeout(Duration::from_secs(60), rb.send())
            .await
            .expect("answered in time")
            .expect("request");
        let status = r.status().as_u16();
        let bytes = r.bytes().await.expect("body");
        Answer {
            status,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }
    async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some(body)).await
    }

    /// An agent, an environment and a session of both; the session's id.
    async fn session(&self) -> String {
        let ag = self
            .post(
                "/v1/agents",
                json!({"name": "a", "model": "claude-sonnet-4-5"}),
            )
            .await;
        assert_eq!(ag.status, 200, "{}", ag.json);
        let env = self.post("/v1/environments", json!({"name": "e"})).await;
        assert_eq!(env.status, 200, "{}", env.json);
        let s = self
            .post(
                "/v1/sessions",
                json!({"agent": ag.json["id"], "environment_id": env.json["id"]}),
            )
            .await;
        assert_eq!(s.status, 200, "{}", s.json);
        s.json["id"].as_str().expect("id").to_string()
    }
}

/// The `event:` names of an SSE response up to the first `kind` (bounded by `secs`).
async fn events_until(mut resp: reqwest::Response, kind: &str, secs: u64) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let (mut buf, mut seen) = (String::new(), Vec::new());
    loop {
        while let Some(end) = buf.find("\n\n") {
            let raw: String = buf.drain(..end + 2).collect();
            for line in raw.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    let v = v.trim().to_string();
                    let done = v == kind;
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
            }
        }
        let chunk = match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(c) => c.expect("chunk").expect("the stream ended early"),
            Err(_) => panic!("no {kind} in time; saw {seen:?}"),
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// A tool confirmation naming a forged event id (a negative seq, whose predecessor overflows)
/// is a 400, and the server goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_negative_event_id_is_refused() {
    let (_mock, url) = mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = serve(dir.path(), &url, None, None).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let a = Anth(a);
    let sid = a.session().await;
    for id in [
        "sevt_-9223372036854775808_0",
        "sevt_-1_0",
        "sevt_000000000000_0",
    ] {
        let r = a
            .post(
                &format!("/v1/sessions/{sid}/events"),
                json!({"events": [{"type": "user.tool_confirmation", "tool_use_id": id, "result": "allow"}]}),
            )
            .await;
        assert_eq!(r.status, 400, "{id}: {}", r.json);
        assert_eq!(
            r.json["error"]["type"], "invalid_request_error",
            "{}",
            r.json
        );
    }
    let r = a.get(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(srv.client().get("/healthz").await.status, 200);
    srv.stop().await;
}

/// Two servers on one PostgreSQL database: a stream opened on the server that does not run the
/// session delivers the turn the other server runs, up to the session going idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_another_server_follows_the_session_live() {
    let (db, _cluster) = database("ma_two_servers").await;
    let (_mock, url) = mock().await;
    let (da, dbb) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let srv_a = serve(da.path(), &url, Some(&db), None).await;
    let srv_b = serve(dbb.path(), &url, Some(&db), Some(&srv_a.admin)).await;
    let (_, ka) = tenant_key(&srv_a.client(), "team-a").await;
    let kb = Api::new(&srv_b.url, &ka.token);
    let (a, b) = (Anth(ka), Anth(kb));
    let sid = a.session().await;
    let events = format!("/v1/sessions/{sid}/events");
    let resp =
        b.0.http
            .get(format!("{}/anthropic{events}/stream", srv_b.url))
            .header("x-api-key", &b.0.token)
            .send()
            .await
            .expect("stream");
    assert_eq!(resp.status(), 200);
    let r = a
        .post(
            &events,
            json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "please make a file"}]}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let seen = events_until(resp, "session.status_idle", 90).await;
    assert!(
        seen.iter().any(|e| e == "agent.message"),
        "the agent's answer reached B: {seen:?}"
    );
    // B's list holds the same turn.
    let listed = b.get(&events).await;
    assert_eq!(listed.status, 200, "{}", listed.json);
    assert!(
        listed.json["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|e| e["type"] == "agent.message")),
        "{}",
        listed.json
    );
    // Updates through both servers at once (the compare-and-swap in PostgreSQL): none lost.
    let path = format!("/v1/sessions/{sid}");
    let tries = (0..8).map(|i| {
        let via = if i % 2 == 0 { &a } else { &b };
        via.post(&path, json!({"metadata": {format!("k{i}"): "v"}}))
    });
    for r in futures::future::join_all(tries).await {
        assert_eq!(r.status, 200, "{}", r.json);
    }
    let got = b.get(&path).await.json;
    assert_eq!(
        got["metadata"].as_object().map(|m| m.len()),
        Some(8),
        "{got}"
    );
    let r = a.call("DELETE", &path, None).await;
    assert_eq!(r.status, 200, "{}", r.json);
    srv_b.stop().await;
    srv_a.stop().await;
}

/// Concurrent updates of one environment and of one session, each setting its own metadata
/// key: every update answers 200 and every key is there afterwards (none is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_of_environments_and_sessions_lose_nothing() {
    let (_mock, url) = mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = serve(dir.path(), &url, None, None).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let a = Anth(a);
    let sid = a.session().await;
    let env_id = a.get(&format!("/v1/sessions/{sid}")).await.json["environment_id"]
        .as_str()
        .expect("environment")
        .to_string();
    const N: usize = 12;
    for path in [
        format!("/v1/environments/{env_id}"),
        format!("/v1/sessions/{sid}"),
    ] {
        let tries = (0..N).map(|i| {
            a.post(
                &path,
                json!({"metadata": {format!("k{i}"): format!("v{i}")}}),
            )
        });
        let answers = futures::future::join_all(tries).await;
        for r in &answers {
            assert_eq!(r.status, 200, "{path}: {}", r.json);
        }
        let got = a.get(&path).await.json;
        let keys = got["metadata"].as_object().map(|m| m.len());
        assert_eq!(keys, Some(N), "{path}: every update kept: {got}");
        for i in 0..N {
            assert_eq!(got["metadata"][format!("k{i}")], format!("v{i}"), "{got}");
        }
    }
    // Archiving still works, once.
    let r = a
        .post(&format!("/v1/environments/{env_id}/archive"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let first = r.json["archived_at"].clone();
    assert!(first.is_string(), "{}", r.json);
    let again = a
        .post(&format!("/v1/environments/{env_id}/archive"), json!({}))
        .await;
    assert_eq!(again.json["archived_at"], first, "{}", again.json);
    srv.stop().await;
}

/// A cap's refusal: a 400 `invalid_request_error` whose message says `why`.
fn refused(r: &Answer, why: &str) {
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(
        r.json["error"]["type"], "invalid_request_error",
        "{}",
        r.json
    );
    assert!(
        r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(why)),
        "{}",
        r.json
    );
}

/// An agent's versions are capped (every list reads them all): the update past the cap is a
/// clear 400 that is not retried, and the agent stays readable at its last version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_versions_are_capped() {
    let (_mock, url) = mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = serve(dir.path(), &url, None, None).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let a = Anth(a);
    let r = a
        .post(
            "/v1/agents",
            json!({"name": "v", "model": "claude-sonnet-4-5"}),
        )
        .await;
    let path = format!("/v1/agents/{}", r.json["id"].as_str().expect("id"));
    const CAP: usize = 100;
    for v in 1..CAP {
        let r = a
            .post(&path, json!({"version": v, "description": format!("d{v}")}))
            .await;
        assert_eq!(r.status, 200, "update to version {}: {}", v + 1, r.json);
    }
    let r = a
        .post(
            &path,
            json!({"version": CAP, "description": "one too many"}),
        )
        .await;
    refused(&r, "versions");
    let got = a.get(&path).await.json;
    assert_eq!(got["version"], CAP, "{got}");
    let versions = a.get(&format!("{path}/versions?limit=100")).await.json;
    assert_eq!(versions["data"].as_array().map(Vec::len), Some(CAP));
    srv.stop().await;
}

/// A tenant's documents of one kind are capped (versions included; counted in the store): at
/// the cap a create is a 400 that is not retried, other kinds and tenants are not held up, and
/// one deleted makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_per_tenant_are_capped() {
    use futures::StreamExt;
    const CAP: usize = 10_000;
    let (_mock, url) = mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = serve(dir.path(), &url, None, None).await;
    let (_, a) = tenant_key(&srv.client(), "team-cap").await;
    let a = Anth(a);
    // The cap's worth of agents written straight into the server's store (through the API
    // it would take minutes).
    let db = common::test_database(dir.path()).await;
    let store = berth_store::open(
        db.as_deref(),
        &dir.path().join("berth.db"),
        berth_store::Durability::Crash,
    )
    .await
    .expect("store");
    futures::stream::iter(0..CAP)
        .map(|i| {
            let store = store.clone();
            async move {
                let doc = berth_store::Document {
                    kind: "agent".into(),
                    tenant: "team-cap".into(),
                    id: format!("agent_cap_{i:05}"),
                    version: 1,
                    body: json!({"id": format!("agent_cap_{i:05}"), "name": "filler"}),
                };
                store.put_document(&doc, false).await.expect("put");
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let agent = json!({"name": "over", "model": "claude-sonnet-4-5"});
    let r = a.post("/v1/agents", agent.clone()).await;
    refused(&r, &format!("at most {CAP} agent documents"));
    // Another kind of the same tenant is counted apart.
    let r = a
        .post(
            "/v1/environments",
            json!({"name": "e", "config": {"type": "cloud"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(store
        .delete_document("agent", "team-cap", "agent_cap_00000")
        .await
        .expect("delete"));
    let r = a.post("/v1/agents", agent).await;
    assert_eq!(r.status, 200, "{}", r.json);
    srv.stop().await;
}

/// Events pages read forward from a cursor: every event exactly once, in order, whatever the
/// page size, the same as one page of everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_pages_cover_the_log_once() {
    let (_mock, url) = mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = serve(dir.path(), &url, None, None).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let a = Anth(a);
    let sid = a.session().await;
    let events = format!("/v1/sessions/{sid}/events");
    let r = a
        .post(
            &events,
            json!({"events": [{"type": "user.message", "content": "please make a file"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|e| e["id"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let all = loop {
        let all = a.get(&events).await.json;
        if all["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|e| e["type"] == "session.status_idle"))
        {
            break all;
        }
        assert!(tokio::time::Instant::now() < deadline, "no idle: {all}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let all = ids(&all);
    assert!(all.len() > 3, "{all:?}");
    for limit in [1, 2, 5] {
        let (mut got, mut page) = (Vec::new(), None::<String>);
        for _ in 0..=all.len() {
            let q = match &page {
                Some(p) => format!("{events}?limit={limit}&page={p}"),
                None => format!("{events}?limit={limit}"),
            };
            let r = a.get(&q).await.json;
            let these = ids(&r);
            assert!(these.len() <= limit, "{r}");
            got.extend(these);
            match r["next_page"].as_str() {
                Some(p) => page = Some(p.to_string()),
                None => break,
            }
        }
        assert_eq!(got, all, "pages of {limit}");
    }
    // Only user messages, two at a time: the filter applies before the page is cut.
    let r = a
        .get(&format!("{events}?types[]=user.message&limit=2"))
        .await
        .json;
    assert_eq!(ids(&r).len(), 1, "{r}");
    assert_eq!(r["next_page"], Value::Null, "{r}");
    srv.stop().await;
}

/// The one key lookup behind every way of authenticating: `x-api-key` and the bearer header on
/// `/anthropic`, the bearer header only on berth's API; empty, oversized and unknown keys are
/// refused the same way everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_finds_keys_the_same_way() {
    let (_mock, url) = mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = serve(dir.path(), &url, None, None).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let http = reqwest::Client::new();
    let get = |path: &str, headers: Vec<(&'static str, String)>| {
        let mut rb = http.get(format!("{}{path}", srv.url));
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        async move { rb.send().await.expect("request").status().as_u16() }
    };
    let bearer = |k: &str| vec![("authorization", format!("Bearer {k}"))];
    let x_api_key = |k: &str| vec![("x-api-key", k.to_string())];
    assert_eq!(get("/anthropic/v1/agents", bearer(&a.token)).await, 200);
    assert_eq!(get("/anthropic/v1/agents", x_api_key(&a.token)).await, 200);
    assert_eq!(
        get(
            "/anthropic/v1/agents",
            vec![("authorization", format!("bearer  {} ", a.token))]
        )
        .await,
        200
    );
    assert_eq!(get("/v1/boxes", bearer(&a.token)).await, 200);
    // berth's own API takes no x-api-key from clients.
    assert_eq!(get("/v1/boxes", x_api_key(&a.token)).await, 401);
    let long = "k".repeat(257);
    for bad in ["", "berth_nope", long.as_str()] {
        assert_eq!(
            get("/anthropic/v1/agents", x_api_key(bad)).await,
            401,
            "{bad:?}"
        );
        assert_eq!(
            get("/anthropic/v1/agents", bearer(bad)).await,
            401,
            "{bad:?}"
        );
        assert_eq!(get("/v1/boxes", bearer(bad)).await, 401, "{bad:?}");
    }
    assert_eq!(get("/anthropic/v1/agents", vec![]).await, 401);
    srv.stop().await;
}
