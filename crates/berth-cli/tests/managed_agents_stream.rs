//! What a Managed Agents stream carries beyond the stored events, and how exact its spans are,
//! end to end (real server, real box, the real Claude Code CLI, the mock model): `event_deltas`
//! live previews read with the official Python SDK, `span.model_request_end` usage as the
//! gateway metered it, and the `auto` permission policy.

mod common;
mod managed_harness;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{run_sdk_script, tenant_key, venv_python, Server};
use managed_harness::{anth, events_until, idle_with};
use serde_json::{json, Value};
use std::time::Duration;

/// A story long enough for many deltas (the mock sends 24 characters a delta).
const STORY: &str = "Once upon a time a small box sailed into a quiet berth, where an agent lived \
    who answered every question in pieces, one delta at a time, until the whole story was told.";

fn scenario() -> Scenario {
    serde_json::from_value(json!({"rules": [
        {"match": "long story", "steps": [{"text": STORY}]},
        {"match": "count my tokens", "steps": [{"text": "counted", "usage": {
            "input_tokens": 1234, "output_tokens": 321, "cache_creation_input_tokens": 55,
            "cache_read_input_tokens": 5, "final_cache_read_input_tokens": 77}}]},
        {"match": "look around then write", "steps": [
            {"tool_use": [{"name": "Glob", "input": {"pattern": "*"}}]},
            {"tool_use": [{"name": "Write", "input": {"file_path": "/workspace/auto.txt", "content": "auto\n"}}]},
            {"text": "written"}
        ]}
    ]}))
    .expect("scenario")
}

async fn setup(chunk_delay: Duration) -> (tempfile::TempDir, Server, Mock) {
    managed_harness::setup(scenario(), chunk_delay, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_deltas_previews_come_before_the_message_under_its_id_and_add_up_to_it() {
    // Chunks apart in time, so the CLI streams the answer in several pieces.
    let (_d, srv, _mock) = setup(Duration::from_millis(40)).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/managed_agents_previews.py"
    );
    let mut cmd = tokio::process::Command::new(venv_python());
    cmd.arg(script);
    let res = run_sdk_script(cmd, &srv, &a.token).await;
    assert_eq!(res["refused"], true, "{res}");
    let frames = res["frames"].as_array().expect("frames");
    let kinds: Vec<&str> = frames.iter().filter_map(|f| f["type"].as_str()).collect();
    let message = frames
        .iter()
        .position(|f| f["type"] == "agent.message")
        .unwrap_or_else(|| panic!("an agent.message: {kinds:?}"));
    let id = frames[message]["id"].as_str().expect("id");
    let start = frames
        .iter()
        .position(|f| f["type"] == "event_start")
        .unwrap_or_else(|| panic!("a preview started: {kinds:?}"));
    assert_eq!(frames[start]["event_type"], "agent.message");
    assert_eq!(frames[start]["id"], id, "the preview has the message's id");
    assert!(start < message, "{kinds:?}");
    let deltas: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "event_delta")
        .collect();
    assert!(deltas.len() >= 2, "the answer came in pieces: {kinds:?}");
    assert!(deltas.iter().all(|d| d["id"] == id), "{deltas:?}");
    let last_delta = frames
        .iter()
        .rposition(|f| f["type"] == "event_delta")
        .expect("delta");
    assert!(start < last_delta && last_delta < message, "{kinds:?}");
    let text: String = deltas
        .iter()
        .map(|d| d["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(text, STORY, "the pieces add up to the message");
    assert_eq!(frames[message]["text"], STORY);
    // The span opens before the preview and closes after the message.
    let span_start = frames
        .iter()
        .position(|f| f["type"] == "span.model_request_start")
        .expect("span start");
    assert!(span_start < start, "{kinds:?}");
    // The SDK's accumulator grew the message delta by delta.
    let snaps = res["snapshots"].as_array().expect("snapshots");
    assert_eq!(snaps.last().and_then(Value::as_str), Some(STORY));
    // Previews go only to connections that asked, and are never stored.
    let plain: Vec<&str> = res["plain"]
        .as_array()
        .expect("plain")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(plain.contains(&"agent.message"), "{plain:?}");
    assert!(!plain.iter().any(|t| t.starts_with("event_")), "{plain:?}");
    let listed = res["listed"].as_array().expect("listed");
    assert!(
        !listed
            .iter()
            .any(|t| t.as_str().is_some_and(|t| t.starts_with("event_"))),
        "{listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spans_model_usage_is_what_the_gateway_metered() {
    let (_d, srv, mock) = setup(Duration::ZERO).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let (_, env) = anth(&a, "POST", "/v1/environments", Some(json!({"name": "e"}))).await;
    let (_, agent) = anth(
        &a,
        "POST",
        "/v1/agents",
        Some(json!({"name": "counter", "model": "claude-sonnet-4-5"})),
    )
    .await;
    let (s, sess) = anth(
        &a,
        "POST",
        "/v1/sessions",
        Some(
            json!({"agent": agent["id"], "environment_id": env["id"], "initial_events": [
            {"type": "user.message", "content": [{"type": "text", "text": "count my tokens"}]}]}),
        ),
    )
    .await;
    assert_eq!(s, 200, "{sess}");
    let sid = sess["id"].as_str().expect("id");
    let events = events_until(&a, sid, idle_with("end_turn")).await;
    let spans: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "span.model_request_end")
        .map(|e| &e["model_usage"])
        .collect();
    let seen: Vec<Value> = mock
        .recorded()
        .into_iter()
        .filter(|r| r.path == "/v1/messages")
        .map(|r| r.usage)
        .collect();
    assert_eq!(
        spans.len(),
        seen.len(),
        "a span per model request: {events:?}"
    );
    // Each span has the metered tokens of its request: the answer's end figures (321 out, 77
    // cache reads), not the start's the CLI echoes (1 out, 5 cache reads).
    for (span, r) in spans.iter().zip(&seen) {
        for k in [
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ] {
            assert_eq!(span[k], r[k], "{k}: span {span} vs the mock's {r}");
        }
    }
    assert!(
        spans
            .iter()
            .any(|s| s["output_tokens"] == 321 && s["cache_read_input_tokens"] == 77),
        "{spans:?}"
    );
    // And they add up to the ledger's rows for the session.
    let sum = |k: &str| {
        spans
            .iter()
            .map(|s| s[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = anth(&a, "GET", &format!("/v1/sessions/{sid}"), None).await;
        let u = &s["usage"];
        let ledger = [
            u["input_tokens"].as_u64(),
            u["output_tokens"].as_u64(),
            u["cache_read_input_tokens"].as_u64(),
            u["cache_creation"]["ephemeral_5m_input_tokens"].as_u64(),
        ];
        let spans_sum = [
            Some(sum("input_tokens")),
            Some(sum("output_tokens")),
            Some(sum("cache_read_input_tokens")),
            Some(sum("cache_creation_input_tokens")),
        ];
        if ledger == spans_sum {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ledger {ledger:?} vs spans {spans_sum:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auto_policy_runs_read_only_tools_and_asks_for_the_rest() {
    let (_d, srv, mock) = setup(Duration::ZERO).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/managed_agents_auto.py"
    );
    let mut cmd = tokio::process::Command::new(venv_python());
    cmd.arg(script);
    let res = run_sdk_script(cmd, &srv, &a.token).await;
    let uses = res["uses"].as_array().expect("uses");
    let by_name = |n: &str| {
        uses.iter()
            .find(|u| u["name"] == n)
            .unwrap_or_else(|| panic!("a {n} use: {res}"))
    };
    assert_eq!(by_name("glob")["permission"], "allow", "{res}");
    assert_eq!(by_name("write")["permission"], "ask", "{res}");
    assert_eq!(
        res["confirmed"],
        json!([by_name("write")["id"]]),
        "only the write waited on the client: {res}"
    );
    // The write ran once allowed: the model's last request carried its result.
    let last = mock
        .recorded()
        .into_iter()
        .rfind(|r| r.path == "/v1/messages")
        .expect("requests");
    let text = last.body["messages"].to_string();
    assert!(
        text.contains("auto.txt") && !text.contains("requested permissions"),
        "{text}"
    );
}
