//! The Managed Agents tests' shared set-up: a real server with the real Claude Code CLI
//! answering to the mock model, calls under `/anthropic`, and waits on a session's events.
#![allow(dead_code)]

use crate::common::{claude_bin, Api, Server};
use berth_mock_model::{scenario::Scenario, Mock};
use serde_json::Value;
use std::time::Duration;

/// The upstream key the gateway injects (never seen by a box).
pub const REAL_KEY: &str = "sk-ant-real-secret-for-tests-0123456789";

/// A server on a fresh data dir answering to a mock model playing `scenario` (its chunks
/// `chunk_delay` apart), with `extra` environment on top.
pub async fn setup(
    scenario: Scenario,
    chunk_delay: Duration,
    extra: &[(&str, &str)],
) -> (tempfile::TempDir, Server, Mock) {
    let mock = Mock::new(scenario, chunk_delay);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let bin = claude_bin();
    let mut env = vec![
        ("BERTH_UPSTREAM_URL", mock_url.as_str()),
        ("ANTHROPIC_API_KEY", REAL_KEY),
        ("BERTH_CLAUDE_BIN", bin.as_str()),
    ];
    env.extend_from_slice(extra);
    let srv = Server::start_with(dir.path(), &env).await;
    (dir, srv, mock)
}

/// `POST`/`GET` under `/anthropic` with `x-api-key`.
pub async fn anth(api: &Api, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut rb = api
        .http
        .request(m, format!("{}/anthropic{path}", api.url))
        .header("x-api-key", &api.token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The session's events (listed) until one passes `done`, bounded.
pub async fn events_until(api: &Api, sid: &str, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (s, page) = anth(api, "GET", &format!("/v1/sessions/{sid}/events"), None).await;
        assert_eq!(s, 200, "{page}");
        let evs = page["data"].as_array().cloned().unwrap_or_default();
        if evs.iter().any(&done) {
            return evs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events never got there: {evs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An idle status whose stop reason is `reason`.
pub fn idle_with(reason: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["type"] == "session.status_idle" && e["stop_reason"]["type"] == reason
}
