//! A command agent reaches the model with no set-up (#18 item 4): berth gives it
//! `ANTHROPIC_BASE_URL` (the box's gateway) and `ANTHROPIC_API_KEY` (the session's token), so
//! any Anthropic client — an Agent SDK app run as the agent — works inside the box; what it
//! spends is metered to its session, and the real key never enters the box.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::Server;
use serde_json::json;
use std::time::Duration;

/// A plain Messages API client, as an SDK app would be: only the standard variables.
const CLIENT: &str = r#"
import json, os, urllib.request
base = os.environ["ANTHROPIC_BASE_URL"]
req = urllib.request.Request(
    base + "/v1/messages",
    data=json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64,
                     "messages": [{"role": "user", "content": "hello"}]}).encode(),
    headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01",
             "content-type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=20))
print("model-said:" + answer["content"][0]["text"], flush=True)
print("base:" + base, flush=True)
print("real-key-in-env:" + str(any("sk-real-key" in v for v in os.environ.values())), flush=True)
"#;

/// A server whose upstream is a mock answering `sc`, with the real key `sk-real-key`.
async fn server_on_mock(sc: Scenario) -> (Mock, tempfile::TempDir, Server) {
    let mock = Mock::new(sc, Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_UPSTREAM_URL", &mock_url),
            ("ANTHROPIC_API_KEY", "sk-real-key"),
        ],
    )
    .await;
    (mock, dir, srv)
}

#[tokio::test]
async fn a_command_agent_reaches_the_model_through_its_gateway_with_its_session_token() {
    let sc: Scenario = serde_json::from_value(json!({"rules": [
        {"steps": [{"text": "hi from the model", "usage": {"input_tokens": 321, "output_tokens": 54}}]}
    ]}))
    .expect("scenario");
    let (mock, _dir, srv) = server_on_mock(sc).await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"lifecycle": "persistent", "resources": {"memory_mib": 256, "disk_mib": 64}},
                   "agent": {"kind": "command", "argv": ["/usr/bin/python3", "-c", CLIENT]}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    let evs = api.until(&sid, "stdout", 3).await;
    let lines: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    assert!(lines.contains(&"model-said:hi from the model"), "{lines:?}");
    assert!(lines.contains(&"base:http://127.0.0.1:47100"), "{lines:?}");
    assert!(lines.contains(&"real-key-in-env:False"), "{lines:?}");
    // The upstream saw the real key, not the session token.
    let seen = mock.recorded();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].api_key.as_deref(),
        Some(berth_mock_model::fingerprint("sk-real-key").as_str())
    );
    // Metered to the session, as a Claude session's requests are.
    let u = api
        .wait_for(&format!("/v1/sessions/{sid}/usage"), 20, |u| {
            u["total"]["input_tokens"] == 321
        })
        .await;
    assert_eq!(u["total"]["output_tokens"], 54, "{u}");
    srv.stop().await;
}

/// The hosting guide's picture: the user's own Agent SDK app runs inside the box as the
/// session's agent, unchanged — `query()` starts its CLI, which finds the model through the
/// variables berth set. (The SDK comes from the test venv, run by the box's own Python.)
#[tokio::test]
async fn an_agent_sdk_app_runs_inside_a_box_unchanged() {
    let Ok(venv) = std::env::var("BERTH_TEST_VENV") else {
        panic!("BERTH_TEST_VENV (scripts/test sets it) names the venv with claude-agent-sdk");
    };
    let site = std::fs::read_dir(format!("{venv}/lib"))
        .expect("venv lib")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.join("claude_agent_sdk").is_dir())
        .expect("claude_agent_sdk in the venv");
    let app = r#"
import anyio
from claude_agent_sdk import query, ClaudeAgentOptions, ResultMessage
async def main():
    async for m in query(prompt="say hi", options=ClaudeAgentOptions(max_turns=1)):
        if isinstance(m, ResultMessage):
            print("sdk-result:" + str(m.result), flush=True)
anyio.run(main)
"#;
    let sc: Scenario = serde_json::from_value(json!({"rules": [
        {"steps": [{"text": "hello from inside", "usage": {"input_tokens": 77, "output_tokens": 11}}]}
    ]}))
    .expect("scenario");
    let (_mock, _dir, srv) = server_on_mock(sc).await;
    let api = srv.client();
    let pythonpath = format!("PYTHONPATH={}", site.display());
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"lifecycle": "persistent", "resources": {"memory_mib": 1024, "disk_mib": 256}},
                   "agent": {"kind": "command", "argv": ["/usr/bin/env", pythonpath, "/usr/bin/python3", "-c", app]}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    let s = api
        .wait_for(&format!("/v1/sessions/{sid}"), 60, |s| {
            s["state"] == "stopped" || s["state"] == "failed"
        })
        .await;
    let evs = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, usize::MAX)
        .await;
    let out: Vec<&str> = evs
        .iter()
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    assert!(
        out.contains(&"sdk-result:hello from inside"),
        "{s}\n{out:?}"
    );
    let u = api
        .wait_for(&format!("/v1/sessions/{sid}/usage"), 20, |u| {
            u["total"]["input_tokens"].as_u64().unwrap_or(0) >= 77
        })
        .await;
    assert!(
        u["total"]["output_tokens"].as_u64().unwrap_or(0) >= 11,
        "{u}"
    );
    srv.stop().await;
}

/// Execs get the model only when they ask (`"model": true`): a token of their own, metered to
/// the box, revoked when the exec ends.
#[tokio::test]
async fn an_exec_gets_the_model_on_request_with_a_token_that_ends_with_it() {
    let sc: Scenario = serde_json::from_value(json!({"rules": [
        {"steps": [{"text": "hi exec", "usage": {"input_tokens": 17, "output_tokens": 5}}]}
    ]}))
    .expect("scenario");
    let (mock, _dir, srv) = server_on_mock(sc).await;
    let api = srv.client();
    let b = api
        .post(
            "/v1/boxes",
            json!({"lifecycle": "persistent", "resources": {"memory_mib": 256, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(b.status, 201, "{}", b.json);
    let bx = b.json["id"].as_str().expect("id").to_string();
    let exec = |body: serde_json::Value| {
        let api = &api;
        let bx = bx.clone();
        async move { api.post(&format!("/v1/boxes/{bx}/exec"), body).await }
    };
    // Without asking: no variables.
    let plain = exec(json!({"argv": ["/usr/bin/python3", "-c",
        "import os; print(os.environ.get('ANTHROPIC_BASE_URL'), os.environ.get('ANTHROPIC_API_KEY'))"]}))
    .await;
    assert_eq!(plain.status, 200, "{}", plain.json);
    assert_eq!(plain.json["stdout"], "None None\n", "{}", plain.json);
    // Asking: the client works, and prints the token it was given.
    let with = exec(json!({"model": true, "argv": ["/usr/bin/python3", "-c",
        format!("{CLIENT}\nprint('token:' + os.environ['ANTHROPIC_API_KEY'], flush=True)")]}))
    .await;
    assert_eq!(with.status, 200, "{}", with.json);
    let out = with.json["stdout"].as_str().expect("stdout");
    assert!(out.contains("model-said:hi exec"), "{}", with.json);
    assert!(out.contains("real-key-in-env:False"), "{out}");
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .expect("token line")
        .to_string();
    assert_eq!(mock.recorded().len(), 1);
    // Metered to the box.
    let of_box = |rep: &serde_json::Value| {
        rep["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["key"] == bx.as_str()))
            .map(|g| g["usage"].clone())
            .unwrap_or_default()
    };
    let u = api
        .wait_for("/v1/usage?group_by=box", 20, |u| {
            of_box(u)["input_tokens"] == 17
        })
        .await;
    assert_eq!(of_box(&u)["output_tokens"], 5, "{u}");
    // The exec is over: its token no longer opens the gateway.
    let after = exec(json!({"argv": ["/usr/bin/python3", "-c", format!(
        "import urllib.request, urllib.error\n\
         req = urllib.request.Request('http://127.0.0.1:47100/v1/messages', data=b'{{}}',\n\
             headers={{'x-api-key': '{token}', 'content-type': 'application/json'}})\n\
         try:\n    urllib.request.urlopen(req, timeout=20); print('status:200')\n\
         except urllib.error.HTTPError as e:\n    print('status:' + str(e.code))\n")]}))
    .await;
    assert_eq!(after.status, 200, "{}", after.json);
    assert_eq!(after.json["stdout"], "status:401\n", "{}", after.json);
    assert_eq!(
        mock.recorded().len(),
        1,
        "a revoked token reached the model"
    );
    srv.stop().await;
}
