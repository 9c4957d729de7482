//! The real Claude Code CLI in real boxes, through the gateway, against the mock model.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{claude_bin, Api, Server};
use serde_json::{json, Value};
use std::time::Duration;

const REAL_KEY: &str = "sk-ant-real-secret-for-tests-0123456789";

async fn start_mock() -> (String, Mock) {
    // The demo, plus a task that makes the agent dump its environment where the test can read it.
    let mut sc = Scenario::demo();
    let leak: berth_mock_model::scenario::Rule = serde_json::from_value(json!({
        "match": "dump your environment",
        "steps": [
            {"tool_use": [{"name": "Bash", "input": {"command": "printenv > /workspace/env.txt", "description": "dump env"}}]},
            {"text": "dumped"}
        ]
    }))
    .expect("rule");
    sc.rules.insert(0, leak);
    let note: berth_mock_model::scenario::Rule = serde_json::from_value(json!({
        "match": "make a note here",
        "steps": [
            {"tool_use": [{"name": "Bash", "input": {"command": "echo note > note.txt && id -u", "description": "note"}}]},
            {"text": "noted"}
        ]
    }))
    .expect("rule");
    sc.rules.insert(0, note);
    let mock = Mock::new(sc, Duration::ZERO);
    let url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    (url, mock)
}

async fn setup() -> (tempfile::TempDir, Server, Api, Mock) {
    setup_with(&[]).await
}

async fn setup_with(extra: &[(&str, &str)]) -> (tempfile::TempDir, Server, Api, Mock) {
    let (mock_url, mock) = start_mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start_server(dir.path(), &mock_url, extra).await;
    let api = srv.client();
    (dir, srv, api, mock)
}

/// A server on `data` whose upstream is the mock at `mock_url`.
async fn start_server(data: &std::path::Path, mock_url: &str, extra: &[(&str, &str)]) -> Server {
    let bin = claude_bin();
    Server::start_with(
        data,
        &[
            ("BERTH_UPSTREAM_URL", mock_url),
            ("ANTHROPIC_API_KEY", REAL_KEY),
            ("BERTH_CLAUDE_BIN", bin.as_str()),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    )
    .await
}

async fn session(api: &Api, agent: Value, prompt: Option<&str>) -> (String, String) {
    let mut body = json!({"box": {"lifecycle": "persistent", "resources": {"memory_mib": 1024, "disk_mib": 256}}, "agent": agent});
    if let Some(p) = prompt {
        body["prompt"] = json!(p);
    }
    let r = api.post("/v1/sessions", body).await;
    assert_eq!(r.status, 201, "{}", r.json);
    (
        r.json["id"].as_str().expect("id").into(),
        r.json["box_id"].as_str().expect("box").into(),
    )
}

/// Wait (bounded) until the model has been asked about `text`: the agent is mid-turn.
/// The ids of a session `POST /v1/sessions` just created (201) and of its box.
fn started(r: &common::Resp) -> (String, String) {
    assert_eq!(r.status, 201, "{}", r.json);
    (
        r.json["id"].as_str().expect("id").to_string(),
        r.json["box_id"].as_str().expect("box").to_string(),
    )
}

async fn wait_for_model_request(mock: &Mock, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !mock
        .recorded()
        .iter()
        .any(|r| r.body["messages"].to_string().contains(text))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the model never saw {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_agent_runs_in_a_docker_box_the_same_way() {
    agent_runs_in_an_engine_box("docker", "BERTH_DOCKER").await;
}

#[tokio::test]
async fn the_agent_runs_in_a_gvisor_box_the_same_way() {
    agent_runs_in_an_engine_box("gvisor", "BERTH_GVISOR").await;
}

/// The real CLI in a box of a Docker-engine backend (`docker` = runc, `gvisor` = runsc).
async fn agent_runs_in_an_engine_box(backend: &str, enable: &str) {
    let (_d, srv, api, mock) = setup_with(&[(enable, "1")]).await;
    let backends = api.get("/v1/backends").await.json;
    let offered = backends["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap_or_else(|| panic!("{backend} backend enabled: {backends}"));
    assert_eq!(offered["capabilities"]["disk_quota"], true, "{offered}");
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"lifecycle": "persistent", "backend": backend, "resources": {"memory_mib": 1024}},
                   "agent": {"kind": "claude"}, "prompt": "please make a file"}),
        )
        .await;
    let (sid, bx) = started(&r);
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}")).await.json["backend"],
        backend
    );
    let evs = api.until(&sid, "result", 1).await;
    let result = evs.iter().find(|e| e["type"] == "result").expect("result");
    assert_eq!(result["data"]["is_error"], false, "{result}");
    let f = api.get(&format!("/v1/boxes/{bx}/files/hello.txt")).await;
    assert_eq!(f.bytes, b"Hello from an agent in a berth box!\n");
    // Through the gateway with the real key, metered.
    let seen = mock.recorded();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.api_key_is(REAL_KEY)));
    let u = api.get(&format!("/v1/sessions/{sid}/usage")).await.json;
    let input: u64 = seen
        .iter()
        .filter_map(|r| r.usage["input_tokens"].as_u64())
        .sum();
    assert_eq!(u["total"]["input_tokens"], input);
    // The shell tools work on files (gVisor needs berth's statx shim for `ls`), and the box
    // has only loopback.
    let out = exec(&api, &bx, "ls -l /workspace/hello.txt | cut -c1-10").await;
    assert_eq!(out["stdout"], "-rw-r--r--\n", "{out}");
    let out = exec(
        &api,
        &bx,
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
    )
    .await;
    assert_eq!(out["stdout"], "lo\n", "{out}");
    assert_eq!(
        api.delete(&format!("/v1/boxes/{bx}")).await.json["state"],
        "destroyed"
    );
    srv.stop().await;
}

#[tokio::test]
async fn agent_runs_tools_in_the_box_through_the_gateway_with_exact_metering() {
    let (_d, srv, api, mock) = setup().await;
    let (sid, bx) = session(&api, json!({"kind": "claude"}), Some("please make a file")).await;
    let evs = api.until(&sid, "result", 1).await;
    let result = evs.iter().find(|e| e["type"] == "result").expect("result");
    assert_eq!(result["data"]["is_error"], false, "{result}");
    let tools: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "tool_use")
        .filter_map(|e| e["data"]["name"].as_str())
        .collect();
    assert_eq!(tools, vec!["Write", "Bash"]);
    let bash_out = evs
        .iter()
        .rfind(|e| e["type"] == "tool_result")
        .expect("tool result");
    assert!(
        bash_out["data"]["content"]
            .to_string()
            .contains("Hello from an agent"),
        "{bash_out}"
    );
    // The effect, through the files API.
    let f = api.get(&format!("/v1/boxes/{bx}/files/hello.txt")).await;
    assert_eq!(f.bytes, b"Hello from an agent in a berth box!\n");
    let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(s["state"], "idle");
    assert_eq!(s["cli_version"], "2.1.328");
    assert_eq!(s["agent_session_id"], result["data"]["session_id"]);

    // The mock saw the real key on every request, never the session token.
    let seen = mock.recorded();
    assert_eq!(seen.len(), 3, "three model turns");
    assert!(
        seen.iter().all(|r| r.api_key_is(REAL_KEY)),
        "{:?}",
        seen.iter().map(|r| &r.api_key).collect::<Vec<_>>()
    );
    assert!(
        seen.iter().all(|r| r.anthropic_version.is_some()),
        "anthropic-version forwarded"
    );
    // Nothing the box can read holds the real key.
    let out = exec(
        &api,
        &bx,
        &format!("grep -rl '{REAL_KEY}' /workspace /home /tmp /run /etc 2>/dev/null | wc -l"),
    )
    .await;
    assert_eq!(out["stdout"], "0\n", "{out}");
    // Metering matches the mock's usage exactly.
    let usage = api.get(&format!("/v1/sessions/{sid}/usage")).await.json;
    let sum = |k: &str| {
        seen.iter()
            .map(|r| r.usage[k].as_u64().expect("n"))
            .sum::<u64>()
    };
    assert_eq!(usage["total"]["input_tokens"], sum("input_tokens"));
    assert_eq!(usage["total"]["output_tokens"], sum("output_tokens"));
    assert_eq!(usage["by_model"].as_array().map(Vec::len), Some(1));

    // A second message goes to the same process; the model sees the earlier turns.
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "now dump your environment"}),
        )
        .await;
    assert_eq!(r.status, 202);
    let evs = api.until(&sid, "result", 2).await;
    let results: Vec<&Value> = evs.iter().filter(|e| e["type"] == "result").collect();
    assert_eq!(
        results[0]["data"]["session_id"], results[1]["data"]["session_id"],
        "one conversation"
    );
    assert_eq!(
        exec(&api, &bx, "pgrep -c -f 'output-forma[t]=stream-json'").await["stdout"],
        "1\n",
        "one CLI process"
    );
    let last = mock.recorded().last().cloned().expect("request");
    let msgs = last.body["messages"].to_string();
    assert!(
        msgs.contains("please make a file") && msgs.contains("now dump your environment"),
        "earlier turns replayed to the model"
    );

    // What the agent itself sees: a session token, never the real key.
    let env = String::from_utf8(
        api.get(&format!("/v1/boxes/{bx}/files/env.txt"))
            .await
            .bytes,
    )
    .expect("utf8");
    assert!(!env.contains(REAL_KEY), "the real key reached the box");
    let tok = env
        .lines()
        .find_map(|l| l.strip_prefix("ANTHROPIC_API_KEY="))
        .expect("the agent has a key")
        .to_string();
    assert!(tok.starts_with("berth-session-"), "{tok}");
    assert!(
        env.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:47100"),
        "{env}"
    );

    // The session's token dies with the session.
    let probe = format!("curl -s -o /dev/null -w '%{{http_code}}' -X POST http://127.0.0.1:47100/v1/messages -H 'x-api-key: {tok}' -H 'content-type: application/json' -d '{{\"model\":\"m\",\"max_tokens\":1,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'");
    assert_eq!(exec(&api, &bx, &probe).await["stdout"], "200");
    let before = mock.recorded().len();
    assert_eq!(
        api.delete(&format!("/v1/sessions/{sid}")).await.json["state"],
        "stopped"
    );
    assert_eq!(exec(&api, &bx, &probe).await["stdout"], "401");
    assert_eq!(
        mock.recorded().len(),
        before,
        "a refused token never reaches the upstream"
    );
    // `berth usage` reports the same metered totals.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["usage", "--by", "session", "--json"])
        .env("BERTH_URL", &api.url)
        .env("BERTH_TOKEN", &api.token)
        .output()
        .await
        .expect("berth usage");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    let mine = listed["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["key"] == sid.as_str())
        .expect("session listed");
    let all_seen = mock.recorded();
    let input: u64 = all_seen
        .iter()
        .filter_map(|r| r.usage["input_tokens"].as_u64())
        .sum();
    assert_eq!(mine["usage"]["input_tokens"], input);
    assert!(mine["usage"]["model_usd"].as_f64().expect("cost") > 0.0);
    // The table form names the session and the same input total.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["usage", "--by", "session"])
        .env("BERTH_URL", &api.url)
        .env("BERTH_TOKEN", &api.token)
        .output()
        .await
        .expect("berth usage");
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(sid.as_str()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.split_whitespace().nth(2) == Some(input.to_string().as_str()),
        "{table}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn max_turns_permissions_and_interrupt() {
    let (_d, srv, api, mock) = setup().await;
    // max_turns: the demo needs three turns; one is allowed.
    let (sid, _) = session(
        &api,
        json!({"kind": "claude", "max_turns": 1}),
        Some("make a file"),
    )
    .await;
    let evs = api.until(&sid, "result", 1).await;
    let result = evs.iter().find(|e| e["type"] == "result").expect("result");
    assert_eq!(result["data"]["subtype"], "error_max_turns", "{result}");
    assert_eq!(
        api.get(&format!("/v1/sessions/{sid}")).await.json["state_reason"],
        "error_max_turns"
    );

    // Permission requests: the Write is denied (nothing written), then approved on the next task.
    let (sid, bx) = session(
        &api,
        json!({"kind": "claude", "permission_mode": "default"}),
        Some("make a file"),
    )
    .await;
    let evs = api.until(&sid, "permission_request", 1).await;
    let req = evs
        .iter()
        .find(|e| e["type"] == "permission_request")
        .expect("request");
    assert_eq!(req["data"]["tool_name"], "Write");
    let rid = req["data"]["request_id"].as_str().expect("id").to_string();
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/permissions/{rid}"),
            json!({"allow": false, "message": "not now"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    assert_eq!(
        api.post(
            &format!("/v1/sessions/{sid}/permissions/{rid}"),
            json!({"allow": true})
        )
        .await
        .status,
        404,
        "answered once"
    );
    let evs = api.until(&sid, "result", 1).await;
    let denied = evs
        .iter()
        .find(|e| e["type"] == "tool_result")
        .expect("tool result");
    assert_eq!(denied["data"]["is_error"], true);
    assert_eq!(denied["data"]["content"], "not now");
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}/files/hello.txt"))
            .await
            .status,
        404,
        "denied Write did not run"
    );
    assert_eq!(
        api.post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "make a file again"})
        )
        .await
        .status,
        202
    );
    let evs = api.until(&sid, "permission_request", 2).await;
    let req = evs
        .iter()
        .filter(|e| e["type"] == "permission_request")
        .nth(1)
        .expect("second request");
    let rid = req["data"]["request_id"].as_str().expect("id");
    assert_eq!(
        api.post(
            &format!("/v1/sessions/{sid}/permissions/{rid}"),
            json!({"allow": true})
        )
        .await
        .status,
        202
    );
    api.until(&sid, "result", 2).await;
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}/files/hello.txt"))
            .await
            .bytes,
        b"Hello from an agent in a berth box!\n"
    );

    // Interrupt during a slow model response: the turn ends at once, the session lives on.
    let (sid, _) = session(&api, json!({"kind": "claude"}), Some("be slow please")).await;
    wait_for_model_request(&mock, "be slow please").await;
    let t = std::time::Instant::now();
    assert_eq!(
        api.post(&format!("/v1/sessions/{sid}/interrupt"), json!({}))
            .await
            .status,
        202
    );
    api.until(&sid, "result", 1).await;
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "interrupt took {:?}",
        t.elapsed()
    );
    let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(s["state"], "idle", "{s}");
    srv.stop().await;
}

#[tokio::test]
async fn a_killed_cli_fails_the_session_then_resumes() {
    let (_d, srv, api, mock) = setup().await;
    // One finished turn (the CLI has written it to its transcript), then a slow one that the
    // kill interrupts.
    let (sid, bx) = session(
        &api,
        json!({"kind": "claude"}),
        Some("first task: make a file"),
    )
    .await;
    api.until(&sid, "result", 1).await;
    assert_eq!(
        api.post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "be slow"})
        )
        .await
        .status,
        202
    );
    wait_for_model_request(&mock, "be slow").await;
    let out = exec(
        &api,
        &bx,
        "pkill -KILL -f 'output-forma[t]=stream-json' && echo killed",
    )
    .await;
    assert_eq!(out["stdout"], "killed\n", "{out}");
    let s = api
        .wait_for(&format!("/v1/sessions/{sid}"), 20, |s| {
            s["state"] == "failed"
        })
        .await;
    assert!(
        s["state_reason"]
            .as_str()
            .expect("reason")
            .contains("signal 9"),
        "{s}"
    );
    let agent_session = s["agent_session_id"]
        .as_str()
        .expect("the CLI's session id was recorded")
        .to_string();

    // Restart from where it stopped: the CLI resumes its own conversation.
    let r = api
        .post(&format!("/v1/sessions/{sid}/restart"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["state"], "idle");
    assert_eq!(
        api.post(&format!("/v1/sessions/{sid}/restart"), json!({}))
            .await
            .status,
        409,
        "already running"
    );
    assert_eq!(
        api.post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "second task: make a file"})
        )
        .await
        .status,
        202
    );
    let evs = api.until(&sid, "result", 2).await;
    let seqs: Vec<i64> = evs
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "one event log across the restart"
    );
    let resumed = mock.recorded().iter().any(|r| {
        let m = r.body["messages"].to_string();
        m.contains("first task") && m.contains("second task")
    });
    assert!(
        resumed,
        "the resumed CLI sends the earlier turn with the new one"
    );
    let result = evs.iter().rfind(|e| e["type"] == "result").expect("result");
    assert_eq!(
        result["data"]["session_id"],
        agent_session.as_str(),
        "same conversation"
    );
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}/files/hello.txt"))
            .await
            .status,
        200
    );
    srv.stop().await;
}

#[tokio::test]
async fn permission_rules_and_timeouts_answer_without_a_client() {
    let (_d, srv, api, _mock) = setup().await;
    // A rule allows writes under /workspace: the agent is never held up.
    let agent = json!({"kind": "claude", "permission_mode": "default",
        "permission_rules": [{"tool": "Write", "pattern": "/workspace/*", "allow": true}]});
    let (sid, bx) = session(&api, agent, Some("make a file")).await;
    let evs = api.until(&sid, "result", 1).await;
    let ans = evs
        .iter()
        .find(|e| e["type"] == "permission_answer")
        .expect("answer");
    assert_eq!(ans["data"]["by"], "rule");
    assert_eq!(ans["data"]["allow"], true);
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}/files/hello.txt"))
            .await
            .bytes,
        b"Hello from an agent in a berth box!\n"
    );
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/permission-mode"),
            json!({"mode": "acceptEdits"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    assert_eq!(
        api.post(
            &format!("/v1/sessions/{sid}/permission-mode"),
            json!({"mode": "yolo"})
        )
        .await
        .status,
        400
    );

    // No rule and nobody answers: the request is denied when its time is up.
    let agent = json!({"kind": "claude", "permission_mode": "default", "permission_timeout_s": 1});
    let (sid, bx) = session(&api, agent, Some("make a file")).await;
    let evs = api.until(&sid, "result", 1).await;
    let ans = evs
        .iter()
        .find(|e| e["type"] == "permission_answer")
        .expect("answer");
    assert_eq!(ans["data"]["by"], "timeout");
    let denied = evs
        .iter()
        .find(|e| e["type"] == "tool_result")
        .expect("tool result");
    assert_eq!(denied["data"]["is_error"], true);
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}/files/hello.txt"))
            .await
            .status,
        404
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_spent_budget_stops_the_agent_cleanly() {
    let (_d, srv, api, mock) = setup().await;
    // The first demo request (~4,500 input tokens at Opus prices) costs more than this.
    let (sid, _bx) = session(
        &api,
        json!({"kind": "claude", "max_budget_usd": 0.001}),
        Some("make a file"),
    )
    .await;
    let evs = api.until(&sid, "result", 1).await;
    assert!(
        evs.iter().any(|e| e["type"] == "budget_exhausted"),
        "the session is told"
    );
    assert_eq!(
        mock.recorded().len(),
        1,
        "only the request that crossed the budget reached the model"
    );
    let usage = api.get(&format!("/v1/sessions/{sid}/usage")).await.json;
    assert!(usage["total"]["cost_usd"].as_f64().expect("cost") > 0.001);
    let r = api
        .post(
            "/v1/sessions",
            json!({"agent": {"kind": "claude", "max_budget_usd": -1}}),
        )
        .await;
    assert_eq!(r.status, 400);

    // A tenant's monthly budget stops every session of the tenant, new ones included.
    let t = api
        .call(
            "PUT",
            "/v1/tenants/default",
            Some(json!({"budget_usd_month": 0.001})),
        )
        .await;
    assert_eq!(t.status, 200, "{}", t.json);
    assert!(
        t.json["spent_usd_month"].as_f64().expect("spent") > 0.001,
        "{}",
        t.json
    );
    let before = mock.recorded().len();
    let (sid, _) = session(&api, json!({"kind": "claude"}), Some("make a file")).await;
    let evs = api.until(&sid, "result", 1).await;
    let result = evs.iter().find(|e| e["type"] == "result").expect("result");
    assert_eq!(result["data"]["is_error"], true, "{result}");
    assert_eq!(
        mock.recorded().len(),
        before,
        "refused before reaching the model"
    );
    srv.stop().await;
}

/// `kill -9` of the server with an agent in a Docker box: the restarted server takes the box
/// back (same files, still counted), marks the session interrupted, and the agent resumes its
/// conversation on restart; deleting the box then leaves no container behind.
#[tokio::test]
async fn a_docker_box_is_adopted_after_kill9_and_its_agent_resumes() {
    let (mock_url, mock) = start_mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let enable = [("BERTH_DOCKER", "1")];
    let srv = start_server(dir.path(), &mock_url, &enable).await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"backend": "docker", "lifecycle": "persistent",
                           "resources": {"memory_mib": 1024}},
                   "agent": {"kind": "claude"}, "prompt": "first task: make a file"}),
        )
        .await;
    let (sid, bx) = started(&r);
    api.until(&sid, "result", 1).await;
    let committed = api.get(&format!("/v1/sessions/{sid}")).await.json["last_seq"]
        .as_i64()
        .expect("seq");
    let container = format!("berth-docker-{bx}");
    srv.kill9().await;

    let srv = start_server(dir.path(), &mock_url, &enable).await;
    let api = srv.client();
    let b = api.get(&format!("/v1/boxes/{bx}")).await.json;
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(b["state_reason"], "adopted after a server restart", "{b}");
    let f = api.get(&format!("/v1/boxes/{bx}/files/hello.txt")).await;
    assert_eq!(f.bytes, b"Hello from an agent in a berth box!\n");
    let out = exec(&api, &bx, "echo $((6 * 7))").await;
    assert_eq!(out["stdout"], "42\n", "{out}");
    let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(s["state"], "interrupted", "{s}");
    assert_eq!(
        s["last_seq"].as_i64(),
        Some(committed),
        "no committed event lost"
    );

    let r = api
        .post(&format!("/v1/sessions/{sid}/restart"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "second task: make a file"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    api.until(&sid, "result", 2).await;
    let resumed = mock.recorded().iter().any(|r| {
        let m = r.body["messages"].to_string();
        m.contains("first task") && m.contains("second task")
    });
    assert!(
        resumed,
        "the agent resumed its conversation in the adopted box"
    );

    assert_eq!(
        api.delete(&format!("/v1/boxes/{bx}")).await.json["state"],
        "destroyed"
    );
    let left = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("name=^{container}$")])
        .output()
        .expect("docker ps");
    assert!(left.stdout.is_empty(), "container left behind");
    srv.stop().await;
}

/// The hybrid pattern: idle, the box parks (agents stopped, workspace and each session's
/// CLAUDE_CONFIG_DIR snapshotted, the box destroyed); the next message restores it into a
/// fresh box and the agent resumes with its memory (the model sees the earlier turn) and
/// files. A server restart in between loses nothing.
#[tokio::test]
async fn a_hybrid_box_parks_when_idle_and_resumes_with_its_memory_and_files() {
    let (mock_url, mock) = start_mock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start_server(dir.path(), &mock_url, &[]).await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"lifecycle": "hybrid", "idle_timeout_s": 1,
                           "resources": {"memory_mib": 1024, "disk_mib": 256}},
                   "agent": {"kind": "claude"}, "prompt": "first task: make a file"}),
        )
        .await;
    let (sid, bx) = started(&r);
    api.until(&sid, "result", 1).await;
    let parked = api
        .wait_for(&format!("/v1/boxes/{bx}"), 30, |b| b["state"] == "parked")
        .await;
    let snap = &parked["snapshot"];
    assert_eq!(snap["sessions"], json!([sid]), "{parked}");
    let key = snap["key"].as_str().expect("key").to_string();
    let archive = dir.path().join("snapshots").join(&key);
    let size = std::fs::metadata(&archive).expect("snapshot on disk").len();
    assert_eq!(snap["bytes"].as_u64(), Some(size));
    let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(s["state"], "stopped", "{s}");
    assert_eq!(s["state_reason"], "box parked", "{s}");
    // The box itself is gone: no cgroup, no process of it (native backend). Its cgroup is taken
    // down by the reaper after the box has ended, so within a bound rather than at once.
    let cgroup = format!("/sys/fs/cgroup/pids/berth/{bx}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&cgroup).exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !std::path::Path::new(&cgroup).exists(),
        "{cgroup} outlived its parked box"
    );

    // A restart of the server in between: the parked box waits for its next use.
    srv.stop().await;
    let srv = start_server(dir.path(), &mock_url, &[]).await;
    let api = srv.client();
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}")).await.json["state"],
        "parked"
    );

    let r = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "second task: make a file"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    api.until(&sid, "result", 2).await;
    let resumed = mock.recorded().iter().any(|r| {
        let m = r.body["messages"].to_string();
        m.contains("first task") && m.contains("second task")
    });
    assert!(resumed, "the restored agent resumed its conversation");
    // The file from before the park is back (a file call restores the box if it parked again).
    let f = api.get(&format!("/v1/boxes/{bx}/files/hello.txt")).await;
    assert_eq!(f.bytes, b"Hello from an agent in a berth box!\n");
    assert!(!archive.exists(), "a restored box's snapshot is deleted");
    let evs = api.get(&format!("/v1/boxes/{bx}/events")).await.json;
    let states: Vec<&str> = evs["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["type"] == "state")
        .filter_map(|e| e["data"]["state"].as_str())
        .collect();
    let want = ["running", "parking", "parked", "restoring", "running"];
    assert!(
        states.windows(want.len()).any(|w| w == want),
        "box states {states:?}"
    );
    assert_eq!(
        api.delete(&format!("/v1/boxes/{bx}")).await.json["state"],
        "destroyed"
    );
    srv.stop().await;
}

/// The proactive pattern: a webhook trigger on a persistent box starts a real agent session
/// whose prompt is filled from the signed payload; a bad signature starts nothing. A cron
/// trigger fires on its own schedule.
#[tokio::test]
async fn triggers_start_sessions_from_a_signed_webhook_and_a_schedule() {
    use hmac::Mac;
    let (_d, srv, api, mock) = setup().await;
    let r = api
        .post(
            "/v1/boxes",
            json!({"lifecycle": "persistent", "resources": {"memory_mib": 1024, "disk_mib": 256}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();
    let r = api
        .post(
            "/v1/triggers",
            json!({"box": bx, "agent": {"kind": "claude"},
                   "prompt": "New mail from {{from}} about {{subject}}: please make a file"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let trigger = r.json["id"].as_str().expect("id").to_string();
    let secret = r.json["secret"]
        .as_str()
        .expect("secret shown once")
        .to_string();
    let path = r.json["webhook_path"]
        .as_str()
        .expect("webhook")
        .to_string();
    let listed = api.get("/v1/triggers").await.json;
    assert!(listed["items"][0].get("secret").is_none(), "{listed}");

    let body = json!({"from": "ann@example.com", "subject": "invoice 42"}).to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string();
    let signed = format!("{ts}.{body}");
    let post_hook = |signature: String| {
        api.raw(
            api.http
                .post(format!("{}{path}", api.url))
                .header("x-berth-timestamp", &ts)
                .header("x-berth-signature-256", signature)
                .header("content-type", "application/json")
                .body(body.clone()),
        )
    };
    // Wrong key: refused, nothing started.
    let mut bad = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"not the secret").expect("key");
    bad.update(signed.as_bytes());
    let r = post_hook(format!(
        "sha256={}",
        hex::encode(bad.finalize().into_bytes())
    ))
    .await;
    assert_eq!(r.status, 401, "{}", r.json);
    assert_eq!(
        api.get(&format!("/v1/sessions?box_id={bx}")).await.json["items"],
        json!([])
    );

    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(signed.as_bytes());
    let r = post_hook(format!(
        "sha256={}",
        hex::encode(mac.finalize().into_bytes())
    ))
    .await;
    assert_eq!(r.status, 202, "{}", r.json);
    let sid = r.json["session_id"].as_str().expect("session").to_string();
    let evs = api.until(&sid, "result", 1).await;
    let result = evs.iter().find(|e| e["type"] == "result").expect("result");
    assert_eq!(result["data"]["is_error"], false, "{result}");
    assert!(
        mock.recorded().iter().any(|r| r.body["messages"]
            .to_string()
            .contains("New mail from ann@example.com about invoice 42")),
        "the model saw the filled prompt"
    );
    let t = api.get(&format!("/v1/triggers/{trigger}")).await.json;
    assert_eq!(t["fired"], 1, "{t}");
    assert_eq!(t["last_session_id"], sid.as_str(), "{t}");
    let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(s["box_id"], bx.as_str(), "ran in the trigger's box");

    // A schedule every second (6 fields, seconds first) with a command agent.
    let r = api
        .post(
            "/v1/triggers",
            json!({"box": bx, "webhook": false, "schedule": "* * * * * *",
                   "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "cat"]},
                   "prompt": "tick at {{scheduled_at}}"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert!(r.json["webhook_path"].is_null());
    let cron = r.json["id"].as_str().expect("id").to_string();
    let t = api
        .wait_for(&format!("/v1/triggers/{cron}"), 20, |t| {
            t["fired"].as_u64().unwrap_or(0) >= 1 && t["last_session_id"].is_string()
        })
        .await;
    let tick = t["last_session_id"].as_str().expect("session").to_string();
    let evs = api.until(&tick, "stdout", 1).await;
    let out = evs.iter().find(|e| e["type"] == "stdout").expect("stdout");
    assert!(
        out["data"]["text"]
            .as_str()
            .unwrap_or("")
            .starts_with("tick at 20"),
        "{out}"
    );
    let r = api.delete(&format!("/v1/triggers/{cron}")).await;
    assert_eq!(r.status, 204);
    assert_eq!(api.get(&format!("/v1/triggers/{cron}")).await.status, 404);
    // Bad schedules are refused up front.
    let r = api
        .post(
            "/v1/triggers",
            json!({"box": bx, "schedule": "whenever", "agent": {"kind": "claude"}, "prompt": "x"}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    srv.stop().await;
}

/// The real CLI as a shared box's session: its own uid, its files in its own directory, and
/// no writing outside it (the demo task's `/workspace/hello.txt` is refused).
#[tokio::test]
async fn the_agent_works_as_its_own_user_in_a_shared_box() {
    let (_d, srv, api, _mock) = setup().await;
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"lifecycle": "persistent", "shared": true,
                           "resources": {"memory_mib": 1024, "disk_mib": 256}},
                   "agent": {"kind": "claude"}, "prompt": "make a note here"}),
        )
        .await;
    let (sid, bx) = started(&r);
    assert_eq!(r.json["uid"], 2000, "{}", r.json);
    let evs = api.until(&sid, "result", 1).await;
    let bash = evs
        .iter()
        .find(|e| e["type"] == "tool_result")
        .expect("tool result");
    assert!(bash.to_string().contains("2000"), "{bash}");
    let f = api
        .get(&format!("/v1/boxes/{bx}/files/sessions/{sid}/note.txt"))
        .await;
    assert_eq!(f.bytes, b"note\n");
    // The box's operator uid cannot look inside the session's directory.
    let out = exec(
        &api,
        &bx,
        &format!("stat -c '%u %a' /workspace/sessions/{sid}; ls /workspace/sessions/{sid}"),
    )
    .await;
    assert_eq!(out["stdout"], "2000 700\n", "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .unwrap_or("")
            .contains("Permission denied"),
        "{out}"
    );

    // Writing outside its directory is refused to the agent's tools.
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "please make a file"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    api.until(&sid, "result", 2).await;
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}/files/hello.txt"))
            .await
            .status,
        404
    );
    srv.stop().await;
}

async fn exec(api: &Api, bx: &str, script: &str) -> Value {
    common::exec_sh(api, bx, script, 600).await
}
