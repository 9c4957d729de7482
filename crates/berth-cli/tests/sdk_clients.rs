//! Agent SDK apps driving berth's CLI in a box (`client: "sdk"`): the Python client's pytest
//! suite (`clients/python/tests`: the real `claude-agent-sdk`) and the relay's own protocol,
//! against a real server, real boxes, the real CLI and the mock model.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{claude_bin, sdk_connect, tenant_key, Api, Server};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const REAL_KEY: &str = "sk-ant-real-secret-for-sdk-tests-0123456789";

/// What the mock model does for each test's prompt.
fn scenario() -> Scenario {
    let rules = json!([
        {"match": "sdk: write a file", "steps": [
            {"tool_use": [{"name": "Bash", "input": {"command": "echo from-sdk > /workspace/sdk.txt && printenv > /workspace/env.txt", "description": "write"}}]},
            {"text": "wrote"}]},
        {"match": "sdk: denied", "steps": [
            {"tool_use": [{"name": "Bash", "input": {"command": "touch /workspace/denied.txt", "description": "touch"}}]},
            {"text": "ok"}]},
        {"match": "sdk: mcp", "steps": [
            {"tool_use": [{"name": "mcp__calc__add", "input": {"a": 2, "b": 3}}]},
            {"text": "added"}]},
        // Before "slow": the CLI may send the interrupted turn's text along with the next.
        {"match": "sdk: hello", "steps": [{"text": "hello from the mock"}]},
        {"match": "sdk: slow", "steps": [{"delay_ms": 30000, "text": "late"}]},
        {"match": "sdk: reconnect", "steps": [{"delay_ms": 1500, "text": "after the drop"}]},
        {"match": "sdk: relay", "steps": [{"text": "relayed"}]}
    ]);
    Scenario {
        rules: serde_json::from_value(rules).expect("rules"),
    }
}

async fn setup() -> (tempfile::TempDir, Server, Api, Mock) {
    let mock = Mock::new(scenario(), Duration::ZERO);
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
    let admin = srv.client();
    let (_id, api) = tenant_key(&admin, "sdk-apps").await;
    (dir, srv, api, mock)
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
async fn the_python_client_and_the_real_agent_sdk_pass_their_suite() {
    let (_d, _srv, api, mock) = setup().await;
    let venv = std::env::var("BERTH_TEST_VENV").unwrap_or_else(|_| "/opt/berth/test-venv".into());
    let python = format!("{venv}/bin/python");
    let root = repo_root();
    let mut cmd = tokio::process::Command::new(&python);
    cmd.args([
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "clients/python/tests",
    ])
    .current_dir(&root)
    // The source under test, not an installed copy.
    .env("PYTHONPATH", root.join("clients/python"))
    .env("BERTH_URL", &api.url)
    .env("BERTH_TOKEN", &api.token)
    .env("BERTH_TEST_REAL_KEY", REAL_KEY)
    .env_remove("ANTHROPIC_API_KEY")
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(900), cmd.output())
        .await
        .expect("pytest took over 15 minutes")
        .unwrap_or_else(|e| panic!("running {python} (scripts/test sets the venv up): {e}"));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{text}");
    // The suite's tests all ran (none skipped or deselected).
    assert!(
        text.contains(" passed") && !text.contains("skipped"),
        "{text}"
    );
    // The model saw only berth's session tokens, never the client's key.
    assert!(!mock.recorded().is_empty());
}

#[tokio::test]
async fn the_typescript_client_and_the_real_agent_sdk_pass_their_suite() {
    let (_d, _srv, api, _mock) = setup().await;
    let dir = repo_root().join("clients/typescript");
    assert!(
        dir.join("node_modules/@anthropic-ai/claude-agent-sdk")
            .is_dir(),
        "run `npm ci` in clients/typescript first (scripts/test does)"
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.args(["--test", "--test-concurrency=1", "test/"])
        .current_dir(&dir)
        .env("BERTH_URL", &api.url)
        .env("BERTH_TOKEN", &api.token)
        .env("BERTH_TEST_REAL_KEY", REAL_KEY)
        .env_remove("ANTHROPIC_API_KEY")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .expect("node --test took over 10 minutes")
        .expect("running node");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "node --test failed:\n{text}");
    assert!(
        text.contains("# pass 4") && text.contains("# skipped 0"),
        "{text}"
    );
}

/// The relay's own protocol without an SDK: hello, stdout in order, stdin through, a dropped
/// connection resumed from an offset, a newer connection replacing the older, an offset no
/// longer kept refused.
#[tokio::test]
async fn the_relay_resumes_from_an_offset_and_one_connection_owns_the_session() {
    let (_d, _srv, api, _mock) = setup().await;
    let r = api
        .post(
            "/v1/sessions",
            json!({"agent": {"kind": "claude", "client": "sdk", "args": ["--max-turns", "3"]}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    assert_eq!(r.json["agent"]["client"], "sdk");

    // A REST message into the relayed stdin is refused (it would interleave with the client).
    let m = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "hi"}),
        )
        .await;
    assert_eq!(m.status, 400, "{}", m.json);

    let mut ws = sdk_connect(&api, &sid, 0).await;
    let hello = next_text(&mut ws).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["stdin_offset"], 0);
    let user = json!({"type": "user", "message": {"role": "user", "content": "sdk: relay"}, "parent_tool_use_id": null});
    // Sent in two pieces: the relay passes bytes, not messages.
    let line = format!("{user}\n");
    let (a, b) = line.as_bytes().split_at(10);
    ws.send(Message::Binary(a.to_vec().into()))
        .await
        .expect("send");
    ws.send(Message::Binary(b.to_vec().into()))
        .await
        .expect("send");
    let mut got = Vec::new();
    let lines = read_until(&mut ws, &mut got, |l| l["type"] == "assistant").await;
    assert!(lines.iter().any(|l| l["type"] == "system"), "{lines:?}");
    // Drop it mid-stream (no close frame), then resume from the offset reached.
    drop(ws);
    let offset = got.len() as u64;
    let mut ws2 = sdk_connect(&api, &sid, offset).await;
    let hello = next_text(&mut ws2).await;
    assert_eq!(hello["stdin_offset"], line.len(), "{hello}");
    let rest = read_until(&mut ws2, &mut got, |l| l["type"] == "result").await;
    assert!(
        rest.iter().any(|l| l["type"] == "result"),
        "the result after the reconnect: {rest:?}"
    );
    // The bytes are exactly the CLI's: every line parses and none is repeated.
    let all: Vec<Value> = String::from_utf8_lossy(&got)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
        .collect();
    assert_eq!(
        all.iter().filter(|l| l["type"] == "result").count(),
        1,
        "{}",
        String::from_utf8_lossy(&got)
    );
    let texts: Vec<&Value> = all.iter().filter(|l| l["type"] == "assistant").collect();
    assert!(
        texts.iter().any(|l| l.to_string().contains("relayed")),
        "{all:?}"
    );

    // A newer connection replaces this one.
    let mut ws3 = sdk_connect(&api, &sid, got.len() as u64).await;
    let _ = next_text(&mut ws3).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws2.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the older connection is closed");
    assert_eq!(closed, Some(4001));
    // An offset past what was written is refused with 4002.
    drop(ws3);
    let mut ws4 = sdk_connect(&api, &sid, got.len() as u64 + 1000).await;
    let _ = next_text(&mut ws4).await;
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws4.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed");
    assert_eq!(code, Some(4002));

    // End of input ends the CLI, and the session with it.
    let mut ws5 = sdk_connect(&api, &sid, got.len() as u64).await;
    let _ = next_text(&mut ws5).await;
    ws5.send(Message::Text(
        json!({"type": "end_input"}).to_string().into(),
    ))
    .await
    .expect("send");
    let exit = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws5.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("json");
                    if v["type"] == "exit" {
                        return v;
                    }
                }
                Some(Ok(_)) => continue,
                other => panic!("socket ended before the exit: {other:?}"),
            }
        }
    })
    .await
    .expect("the CLI exits at the end of its input");
    assert_eq!(exit["code"], 0, "{exit}");
    let s = api
        .wait_for(&format!("/v1/sessions/{sid}"), 30, |s| {
            s["state"] == "stopped"
        })
        .await;
    assert_eq!(s["state"], "stopped");
    // The turn was metered and recorded like any session's.
    let ev = api.until(&sid, "result", 1).await;
    assert!(
        ev.iter()
            .any(|e| e["type"] == "user" && e["data"]["by"] == "sdk"),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| e["type"] == "assistant"), "{ev:?}");
}

#[tokio::test]
async fn arguments_off_the_allowlist_and_berths_own_fields_are_refused() {
    let (_d, _srv, api, _mock) = setup().await;
    for (agent, named) in [
        (
            json!({"kind": "claude", "client": "sdk", "args": ["--dangerously-skip-permissions"]}),
            "\"--dangerously-skip-permissions\"",
        ),
        (
            json!({"kind": "claude", "client": "sdk", "args": ["/usr/bin/env", "sh"]}),
            "\"/usr/bin/env\"",
        ),
        (
            json!({"kind": "claude", "client": "sdk", "args": ["--permission-mode", "whatever"]}),
            "\"--permission-mode\"",
        ),
        (
            json!({"kind": "claude", "client": "sdk", "model": "x"}),
            "model",
        ),
        (json!({"kind": "claude", "args": ["--verbose"]}), "args"),
        (json!({"kind": "claude", "client": "other"}), "other"),
    ] {
        let r = api.post("/v1/sessions", json!({"agent": agent})).await;
        // 422: the body does not deserialize (an unknown client).
        assert!(r.status == 400 || r.status == 422, "{agent}: {}", r.json);
        let msg = r.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(msg.contains(named), "{agent}: {msg}");
    }
    // No box was left behind by the refusals.
    let boxes = api.get("/v1/boxes").await;
    assert_eq!(
        boxes.json["items"].as_array().map(Vec::len),
        Some(0),
        "{}",
        boxes.json
    );
    // The relay route is for sdk sessions only.
    let r = api
        .post(
            "/v1/sessions",
            json!({"agent": {"kind": "command", "argv": ["sleep", "30"]}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let sid = r.json["id"].as_str().expect("id");
    let res = api.get(&format!("/v1/sessions/{sid}/sdk")).await;
    assert_eq!(res.status, 400, "{}", res.json);
    // The server still answers.
    assert_eq!(api.get("/v1/sessions").await.status, 200);
}

type Ws = common::SdkWs;

async fn next_text(ws: &mut Ws) -> Value {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("json"),
                Some(Ok(_)) => continue,
                other => panic!("no text frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a text frame within 10 s")
}

/// Read stdout frames into `all` until one of all the whole lines read so far satisfies
/// `stop`; all those lines.
async fn read_until(ws: &mut Ws, all: &mut Vec<u8>, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
    let whole = |all: &[u8]| -> Vec<Value> {
        let end = all.iter().rposition(|c| *c == b'\n').map_or(0, |i| i + 1);
        all[..end]
            .split(|c| *c == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("a whole JSON line"))
            .collect()
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let lines = whole(all);
            if lines.iter().any(&stop) {
                return lines;
            }
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => all.extend_from_slice(&b),
                Some(Ok(_)) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    })
    .await
    .expect("the line within 60 s")
}
