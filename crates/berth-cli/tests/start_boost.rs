//! The start boost (issue #22): a session's agent starts with its box's CPU weight raised (and
//! the boxes' parent group's), until the agent's first output on stdout; each box has a budget
//! of boost time, and a start that finds it spent runs at the normal weight. Needs root and
//! the native backend (it reads the box's cgroup).

mod common;

use berth_sandbox::native::cgroup::{self, BoxCgroup};
use common::{Api, Server};
use serde_json::{json, Value};
use std::time::Duration;

/// The box's CPU weight (v1 shares) and its parent's.
fn weights(bx: &str) -> (u64, u64) {
    let cg = BoxCgroup::load(bx);
    let parent = cg
        .parent_cpu_dir()
        .and_then(|d| cgroup::dir_shares(&d))
        .expect("parent weight");
    (cg.cpu_shares().expect("box weight"), parent)
}

/// Wait (at most 15 s) until box `bx`'s weights are `want`.
async fn until_weights(bx: &str, want: (u64, u64), what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let w = weights(bx);
        if w == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: weights {w:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Start a command-agent session in `bx`; returns once its agent's process has started (the
/// session is idle), which is after the boost, if any, was applied.
async fn start(api: &Api, bx: &str, script: &str) -> String {
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": {"kind": "command", "argv": ["/bin/sh", "-c", script]}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    api.wait_for(&format!("/v1/sessions/{sid}"), 30, |s: &Value| {
        s["state"] == "idle"
    })
    .await;
    sid
}

#[tokio::test]
async fn start_boost_until_first_output_within_a_budget() {
    let dir = tempfile::tempdir().expect("tmp");
    // A budget of 3 s that does not refill, and no time cap of its own: only the agent's
    // first output (or the budget running out) ends a boost.
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_START_BOOST_SHARES", "4096"),
            ("BERTH_START_BOOST_MAX_MS", "60000"),
            ("BERTH_START_BOOST_BUDGET_MS", "3000"),
            ("BERTH_START_BOOST_REFILL", "0"),
        ],
    )
    .await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();
    let normal = weights(&bx);
    assert_eq!(normal.0, 1024, "a box starts at the default weight");
    // An exec through the API is not an agent's start: no boost.
    let r = api
        .post(&format!("/v1/boxes/{bx}/exec"), json!({"argv": ["true"]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(weights(&bx), normal);

    // A: prints only once it is sent a message. Boosted until then, normal right after.
    let a = start(&api, &bx, "read -r l; echo \"got $l\"; exec sleep 60").await;
    let (boxw, parent) = weights(&bx);
    assert_eq!(boxw, 4096, "the starting agent's box is boosted");
    assert!(parent >= 4096, "and so is the boxes' parent: {parent}");
    let r = api
        .post(
            &format!("/v1/sessions/{a}/messages"),
            json!({"content": "hi"}),
        )
        .await;
    assert!((200..300).contains(&r.status), "{}", r.json);
    until_weights(&bx, normal, "after the agent's first output").await;

    // B: never prints. A used a fraction of the budget (its boost ended at its output), so B
    // is boosted too, until the rest of the budget is spent. (Had A's boost not ended at its
    // output, A would have spent the whole budget and B would get none.)
    let _b = start(&api, &bx, "exec sleep 60").await;
    assert_eq!(weights(&bx).0, 4096, "budget left after A: B is boosted");
    until_weights(&bx, normal, "once the budget is spent").await;

    // C: the budget is spent and does not refill: no boost.
    let _c = start(&api, &bx, "exec sleep 60").await;
    assert_eq!(weights(&bx), normal, "no budget left: no boost");
}
