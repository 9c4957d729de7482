//! Hardening end to end (issue #14, sandbox side): file operations on FIFOs answer at once
//! through the API, files stream without the server holding them, and shared boxes work on
//! every backend.

mod common;

use common::{Api, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn make_box(api: &Api, extra: Value) -> String {
    let mut spec = json!({"resources": {"memory_mib": 256, "disk_mib": 512, "pids": 64}});
    if let (Some(o), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    let r = api.post("/v1/boxes", spec).await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

async fn exec(api: &Api, id: &str, script: &str) -> Value {
    let r = api
        .post(
            &format!("/v1/boxes/{id}/exec"),
            json!({"argv": ["/bin/sh", "-c", script], "timeout_s": 120}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json
}

fn shell_agent() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c",
        "while read -r l; do out=$(sh -c \"$l\" 2>&1); rc=$?; echo \"$(printf %s \"$out\" | tr '\\n' ' ')|rc=$rc\"; done"]})
}

/// Two command sessions in one shared box of `backend`: both start, each runs as its own
/// user in its own directory, and neither can write the other's.
async fn shared_box_on(backend: &str) {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_DOCKER", "1"), ("BERTH_GVISOR", "1")]).await;
    let api = srv.client();
    let bx = make_box(
        &api,
        json!({"lifecycle": "persistent", "shared": true, "backend": backend}),
    )
    .await;
    let start = || {
        api.post(
            "/v1/sessions",
            json!({"box": bx, "agent": shell_agent(), "prompt": "id -u; pwd; touch mine"}),
        )
    };
    let a = start().await;
    assert_eq!(a.status, 201, "{}", a.json);
    let b = start().await;
    assert_eq!(b.status, 201, "{}", b.json);
    let (a, b) = (
        a.json["id"].as_str().expect("id").to_string(),
        b.json["id"].as_str().expect("id").to_string(),
    );
    let first = |sid: String| {
        let api = &api;
        async move {
            let evs = api.until(&sid, "stdout", 1).await;
            let e = evs
                .iter()
                .find(|e| e["type"] == "stdout")
                .unwrap_or_else(|| panic!("no stdout from {sid}: {evs:?}"));
            e["data"]["text"]
                .as_str()
                .unwrap_or_default()
                .trim_end()
                .to_string()
        }
    };
    let (out_a, out_b) = (first(a.clone()).await, first(b.clone()).await);
    let user = |out: &str| {
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        out_a.ends_with(&format!("/workspace/sessions/{a}|rc=0")),
        "{out_a}"
    );
    assert!(
        out_b.ends_with(&format!("/workspace/sessions/{b}|rc=0")),
        "{out_b}"
    );
    assert_ne!(user(&out_a), user(&out_b), "{out_a} / {out_b}");
    // Neither reaches into the other's directory.
    let r = api
        .post(
            &format!("/v1/sessions/{b}/messages"),
            json!({"content": format!("echo evil > /workspace/sessions/{a}/mine")}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    let evs = api.until(&b, "stdout", 2).await;
    let out = evs
        .iter()
        .filter(|e| e["type"] == "stdout")
        .nth(1)
        .and_then(|e| e["data"]["text"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        out.contains("Permission denied") && !out.trim_end().ends_with("rc=0"),
        "{out}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn shared_box_on_docker() {
    shared_box_on("docker").await;
}

#[tokio::test]
async fn shared_box_on_gvisor() {
    shared_box_on("gvisor").await;
}
