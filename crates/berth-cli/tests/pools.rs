//! Warm pools with the real Claude Code CLI against the mock model: a pooled session works end
//! to end, takes are atomic, an unclaimed box holds no credential, pools refill and recycle.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{claude_bin, exec_sh, Api, Server};
use serde_json::{json, Value};
use std::time::Duration;

const REAL_KEY: &str = "sk-ant-real-secret-for-pools-0123456789";

/// A server whose upstream is a fresh mock, with the pools given in figment's inline syntax.
async fn setup(pools: &str) -> (tempfile::TempDir, Server, Api, Mock) {
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(dir.path(), &url, pools).await;
    let api = srv.client();
    (dir, srv, api, mock)
}

async fn start(data: &std::path::Path, mock_url: &str, pools: &str) -> Server {
    let bin = claude_bin();
    Server::start_with(
        data,
        &[
            ("BERTH_UPSTREAM_URL", mock_url),
            ("ANTHROPIC_API_KEY", REAL_KEY),
            ("BERTH_CLAUDE_BIN", bin.as_str()),
            ("BERTH_DOCKER", "1"),
            ("BERTH_POOLS", pools),
        ],
    )
    .await
}

fn pool(name: &str, size: usize, max_age_s: u64) -> String {
    format!(
        "[{{name = \"{name}\", size = {size}, max_age_s = {max_age_s}, box = {{resources = {{memory_mib = 1024, disk_mib = 256}}}}, agent = {{kind = \"claude\"}}}}]"
    )
}

/// The pool's entry in `GET /v1/pools` once `pred` holds (bounded).
async fn pool_when(api: &Api, name: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
    let v = api
        .wait_for("/v1/pools", secs, |j| {
            j["items"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["name"] == name))
                .is_some_and(&pred)
        })
        .await;
    v["items"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .cloned()
        .expect("pool listed")
}

/// Ids of the running boxes the pool made (labelled with its name).
async fn pool_boxes(api: &Api, name: &str) -> Vec<String> {
    let r = api.get("/v1/boxes").await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|b| b["labels"]["berth.pool"] == name && b["state"] == "running")
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect()
}

/// Wait (bounded) until the CLI in `bx` runs: its process is in the box.
async fn cli_running(api: &Api, bx: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = exec_sh(
            api,
            bx,
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done",
            10,
        )
        .await;
        if out["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("--input-format=stream-json")
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no CLI in the pooled box {bx}: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_pooled_session_answers_end_to_end_and_the_pool_refills() {
    let (_d, srv, api, mock) = setup(&pool("p", 1, 3600)).await;
    pool_when(&api, "p", 60, |p| p["ready"] == 1).await;
    let ready = pool_boxes(&api, "p").await;
    assert_eq!(ready.len(), 1, "{ready:?}");
    cli_running(&api, &ready[0]).await;
    assert!(mock.recorded().is_empty(), "no model request before a take");

    let r = api
        .post("/v1/sessions", json!({"pool": "p", "prompt": "hello"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    assert_eq!(r.json["box_id"], ready[0].as_str(), "took the ready box");
    let evs = api.until(&sid, "result", 1).await;
    let result = evs.iter().find(|e| e["type"] == "result").expect("result");
    assert_eq!(result["data"]["is_error"], false, "{result}");
    assert!(
        mock.recorded().iter().all(|r| r.api_key_is(REAL_KEY)),
        "the gateway sent the real key upstream for the pooled session"
    );
    // Metered to the session the box became.
    api.wait_for(&format!("/v1/sessions/{sid}/usage"), 30, |u| {
        u["total"]["input_tokens"].as_u64().unwrap_or(0) >= 1
    })
    .await;

    // Refill: a new ready box, not the taken one.
    let p = pool_when(&api, "p", 60, |p| p["ready"] == 1 && p["taken"] == 1).await;
    assert_eq!(p["misses"], 0, "{p}");
    let again = pool_boxes(&api, "p").await;
    assert!(
        again.iter().any(|b| b != &ready[0]),
        "refilled with a new box: {again:?}"
    );
    let metrics = api.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.bytes).into_owned();
    assert!(
        text.contains("berth_pool_taken_total{pool=\"p\"} 1"),
        "{text}"
    );
    assert!(text.contains("berth_pool_ready{pool=\"p\"} 1"), "{text}");
    assert!(text.contains("berth_pool_refill_seconds"), "{text}");
    srv.stop().await;
}

/// A command agent that writes its environment where an exec can read it (a Claude CLI's own
/// environment is not readable from another exec: the CLI makes itself non-dumpable), then
/// waits on stdin as the CLI does. It is started with the same gateway token as a pooled CLI.
const DUMPER: &str = "{name = \"c\", size = 1, box = {resources = {memory_mib = 256, disk_mib = 64}}, agent = {kind = \"command\", argv = [\"/bin/sh\", \"-c\", \"env > /tmp/env.txt; exec cat\"]}}";

#[tokio::test]
async fn an_unclaimed_pooled_box_holds_no_credential_until_taken() {
    let pools = format!("{}, {DUMPER}]", pool("p", 1, 3600).trim_end_matches(']'));
    let (_d, srv, api, mock) = setup(&pools).await;
    pool_when(&api, "p", 60, |p| p["ready"] == 1).await;
    pool_when(&api, "c", 60, |p| p["ready"] == 1).await;
    let bx = pool_boxes(&api, "p").await.pop().expect("a ready box");
    cli_running(&api, &bx).await;

    // Everything the box can read: every process's environment and command line, its files.
    let dump = exec_sh(
        &api,
        &bx,
        "for p in /proc/[0-9]*; do cat $p/environ $p/cmdline 2>/dev/null; done; \
         grep -rIs . /workspace /home /tmp 2>/dev/null | head -c 2000000",
        30,
    )
    .await;
    let text = dump["stdout"].as_str().expect("stdout");
    assert!(
        text.contains("--input-format=stream-json") && text.contains("HOME=/home/agent"),
        "the dump reached the box's processes: {}",
        &text[..text.len().min(500)]
    );
    assert!(!text.contains(REAL_KEY), "the real key is in the box");
    assert!(
        !text.contains(srv.admin.as_str()),
        "no berth API key in the box"
    );

    // The agent's credential (the same token a pooled CLI gets as ANTHROPIC_API_KEY) is
    // refused by the gateway, from inside the box, while the box is unclaimed.
    let cbx = pool_boxes(&api, "c")
        .await
        .pop()
        .expect("a ready command box");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while exec_sh(&api, &cbx, "test -s /tmp/env.txt", 5).await["exit_code"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never wrote its env"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let probe = "tok=$(sed -n 's/^BERTH_SESSION_TOKEN=//p' /tmp/env.txt); test -n \"$tok\" || exit 3; \
        curl -s -o /dev/null -w '%{http_code}' -H \"x-api-key: $tok\" \
        -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \
        -d '{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":8,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}' \
        http://127.0.0.1:47100/v1/messages";
    let before = exec_sh(&api, &cbx, probe, 20).await;
    assert_eq!(before["stdout"], "401", "{before}");
    assert!(mock.recorded().is_empty(), "nothing reached the model");
    // The server still answers others.
    assert_eq!(api.get("/v1/pools").await.status, 200);

    // Taken: the same credential now works, for this session.
    let r = api.post("/v1/sessions", json!({"pool": "c"})).await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["box_id"], cbx.as_str());
    let after = exec_sh(&api, &cbx, probe, 20).await;
    assert_eq!(after["stdout"], "200", "{after}");
    assert_eq!(mock.recorded().len(), 1);

    // Pools are for admins.
    let (_id, tenant) = common::tenant_key(&api, "someone").await;
    assert_eq!(tenant.get("/v1/pools").await.status, 403);
    // Another tenant cannot take from this tenant's pool.
    let r = tenant.post("/v1/sessions", json!({"pool": "p"})).await;
    assert_eq!(r.status, 404, "{}", r.json);
    srv.stop().await;
}

#[tokio::test]
async fn concurrent_takes_get_each_ready_box_once() {
    const SIZE: usize = 2;
    const TAKERS: usize = 5;
    let (_d, srv, api, _mock) = setup(&pool("p", SIZE, 3600)).await;
    pool_when(&api, "p", 90, |p| p["ready"] == SIZE).await;
    let ready = pool_boxes(&api, "p").await;
    assert_eq!(ready.len(), SIZE);

    let takes = (0..TAKERS).map(|_| {
        let api = api.clone();
        async move { api.post("/v1/sessions", json!({"pool": "p"})).await }
    });
    let results = futures::future::join_all(takes).await;
    let mut pooled = Vec::new();
    let mut cold = 0;
    for r in &results {
        assert_eq!(r.status, 201, "{}", r.json);
        let b = r.json["box_id"].as_str().expect("box").to_string();
        if ready.contains(&b) {
            pooled.push(b);
        } else {
            cold += 1;
        }
    }
    pooled.sort();
    pooled.dedup();
    let boxes: Vec<&Value> = results.iter().map(|r| &r.json["box_id"]).collect();
    assert_eq!(pooled.len(), SIZE, "each ready box taken once: {boxes:?}");
    assert_eq!(cold, TAKERS - SIZE);
    let p = pool_when(&api, "p", 5, |p| p["taken"] == SIZE).await;
    assert_eq!(p["misses"], TAKERS - SIZE, "{p}");
    srv.stop().await;
}

#[tokio::test]
async fn a_ready_box_past_its_max_age_is_recycled() {
    let (_d, srv, api, _mock) = setup(&pool("p", 1, 3)).await;
    pool_when(&api, "p", 60, |p| p["ready"] == 1).await;
    let first = pool_boxes(&api, "p").await.pop().expect("ready box");
    let p = pool_when(&api, "p", 60, |p| {
        p["recycled"].as_u64().unwrap_or(0) >= 1 && p["ready"] == 1
    })
    .await;
    assert_eq!(p["taken"], 0, "{p}");
    api.wait_for(&format!("/v1/boxes/{first}"), 30, |b| {
        b["state"] != "running" && b["state"] != "creating"
    })
    .await;
    let now = pool_boxes(&api, "p").await;
    assert!(!now.contains(&first), "{now:?}");
    assert_eq!(now.len(), 1, "{now:?}");
    srv.stop().await;
}

/// A crash leaves ready boxes of a backend whose boxes outlive the server (Docker): the next
/// run takes them back and destroys them instead of keeping them unclaimed forever.
#[tokio::test]
async fn ready_boxes_a_crashed_run_left_are_destroyed_at_the_next_start() {
    let pools = "[{name = \"d\", size = 1, box = {backend = \"docker\", resources = {memory_mib = 1024, disk_mib = 256}}}]";
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(dir.path(), &url, pools).await;
    let api = srv.client();
    pool_when(&api, "d", 120, |p| p["ready"] == 1).await;
    let old = pool_boxes(&api, "d").await.pop().expect("a ready box");
    srv.kill9().await;

    let srv = start(dir.path(), &url, pools).await;
    let api = srv.client();
    let gone = api
        .wait_for(&format!("/v1/boxes/{old}"), 60, |b| {
            b["state"] != "running" && b["state"] != "creating"
        })
        .await;
    assert_ne!(gone["state"], "running", "{gone}");
    pool_when(&api, "d", 120, |p| p["ready"] == 1).await;
    let now = pool_boxes(&api, "d").await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(!now.contains(&old), "{now:?}");
    srv.stop().await;
}

/// A session that does not name a pool takes from one whose box and agent specs equal its own,
/// and only then.
#[tokio::test]
async fn a_session_whose_specs_match_a_pool_takes_from_it() {
    let (_d, srv, api, _mock) = setup(&pool("p", 1, 3600)).await;
    pool_when(&api, "p", 60, |p| p["ready"] == 1).await;
    let ready = pool_boxes(&api, "p").await.pop().expect("ready box");

    // Another box spec: cold, the ready box stays.
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"resources": {"memory_mib": 512, "disk_mib": 256}}, "agent": {"kind": "claude"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_ne!(r.json["box_id"], ready.as_str());
    let p = pool_when(&api, "p", 5, |p| p["ready"] == 1).await;
    assert_eq!(p["taken"], 0, "{p}");
    assert_eq!(p["misses"], 0, "{p}");

    // The pool's specs: the ready box.
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"resources": {"memory_mib": 1024, "disk_mib": 256}}, "agent": {"kind": "claude"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["box_id"], ready.as_str());
    pool_when(&api, "p", 5, |p| p["taken"] == 1).await;
    srv.stop().await;
}
