//! A box cannot switch metering off by asking for a compressed answer: from inside a real box,
//! with the session's own token, requests that ask for gzip (and br, zstd) still show in the
//! session's usage, and the box gets plain bytes.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{claude_bin, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const REAL_KEY: &str = "sk-ant-real-secret-for-review-0123456789";
/// What the mock reports for each probe request (easy to tell from the agent's own turns).
const PROBE_TOKENS: u64 = 777_777;

#[tokio::test]
async fn asking_for_gzip_from_a_box_does_not_hide_usage() {
    let mut sc = Scenario::demo();
    for rule in [
        json!({"match": "keep your token", "steps": [
            {"tool_use": [{"name": "Bash", "input": {"command": "printenv ANTHROPIC_API_KEY > /workspace/tok.txt", "description": "save"}}]},
            {"text": "kept"}]}),
        json!({"match": "gzip probe", "steps": [
            {"text": "probe answered", "usage": {"input_tokens": PROBE_TOKENS, "output_tokens": 0}}]}),
    ] {
        sc.rules
            .insert(0, serde_json::from_value(rule).expect("rule"));
    }
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

    let usage = || async {
        let u = api.get(&format!("/v1/sessions/{sid}/usage")).await;
        assert_eq!(u.status, 200, "{}", u.json);
        u.json["total"]["input_tokens"].as_u64().unwrap_or(0)
    };
    let before = usage().await;
    for stream in [false, true] {
        let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": stream,
            "messages": [{"role": "user", "content": "gzip probe"}]})
        .to_string();
        // The box asks for compression and does not decode (curl without --compressed).
        let script = format!(
            "curl -s -D /tmp/h -o /tmp/body -w '%{{http_code}}' --noproxy '*' -X POST \
             -H \"x-api-key: $(cat /workspace/tok.txt)\" -H 'anthropic-version: 2023-06-01' \
             -H 'content-type: application/json' -H 'accept-encoding: gzip, br, zstd' \
             -d '{body}' http://127.0.0.1:47100/v1/messages; echo; \
             grep -ci '^content-encoding:' /tmp/h; cat /tmp/body"
        );
        let r = api
            .post(
                &format!("/v1/boxes/{bx}/exec"),
                json!({"argv": ["/bin/sh", "-c", script], "timeout_s": 30}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
        let out = r.json["stdout"].as_str().unwrap_or("").to_string();
        let mut lines = out.splitn(3, '\n');
        assert_eq!(lines.next(), Some("200"), "stream={stream}: {out}");
        assert_eq!(
            lines.next(),
            Some("0"),
            "stream={stream}: no content-encoding reaches the box: {out}"
        );
        assert!(
            lines.next().unwrap_or("").contains("probe answered"),
            "stream={stream}: plain text: {out}"
        );
    }
    // Both probes are in the session's metered usage (the ledger is written in batches).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = usage().await;
        if now >= before + 2 * PROBE_TOKENS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage did not grow by both probes: {before} -> {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v: Value = api.get(&format!("/v1/sessions/{sid}/usage")).await.json;
    assert!(v["total"]["cost_usd"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    srv.stop().await;
}
