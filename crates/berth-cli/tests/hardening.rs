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

/// A FIFO the box makes answers 400 at once on files GET and PUT (the server never waits on
/// it), and fifty such requests together leave another box's file GET fast.
#[tokio::test]
async fn a_fifo_in_the_workspace_answers_400_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let a = make_box(&api, json!({})).await;
    let other = make_box(&api, json!({})).await;
    let out = exec(
        &api,
        &a,
        "mkfifo /workspace/f && test -p /workspace/f && echo made",
    )
    .await;
    assert_eq!(out["stdout"], "made\n", "{out}");
    let put = api
        .http
        .put(format!("{}/v1/boxes/{other}/files/plain.txt", api.url))
        .bearer_auth(&api.token)
        .body("plain");
    assert_eq!(api.raw(put).await.status, 204);

    let quick = Duration::from_secs(5);
    let t = Instant::now();
    let r = tokio::time::timeout(quick, api.get(&format!("/v1/boxes/{a}/files/f")))
        .await
        .expect("GET of a FIFO answers at once");
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "invalid_request", "{}", r.json);
    let put = api
        .http
        .put(format!("{}/v1/boxes/{a}/files/f", api.url))
        .bearer_auth(&api.token)
        .body("x");
    let r = tokio::time::timeout(quick, api.raw(put))
        .await
        .expect("PUT over a FIFO answers at once");
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(t.elapsed() < quick, "{:?}", t.elapsed());

    let api = &api;
    let fifo = format!("/v1/boxes/{a}/files/f");
    let fifo = &fifo;
    let t = Instant::now();
    let storm =
        futures::future::join_all((0..50).map(|_| async move { api.get(fifo).await.status }));
    let probe = async {
        let t = Instant::now();
        let r = api.get(&format!("/v1/boxes/{other}/files/plain.txt")).await;
        (t.elapsed(), r)
    };
    let (statuses, (took, r)) = tokio::join!(storm, probe);
    assert!(statuses.iter().all(|s| *s == 400), "{statuses:?}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes, b"plain");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The FIFO is still there: the PUT did not replace it.
    let out = exec(api, &a, "test -p /workspace/f && echo fifo").await;
    assert_eq!(out["stdout"], "fifo\n", "{out}");
    srv.stop().await;
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Sample the server's RSS every 10 ms until `stop`; the highest seen.
fn sample_peak(pid: i32, stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        while !*stop.borrow() {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peak.max(rss_kib(pid))
    })
}

/// A 200 MiB file goes out (GET) and in (PUT) through the API while the server's resident
/// memory grows by far less than the file: it streams, it does not hold the file.
#[tokio::test]
async fn large_files_stream_through_bounded_server_memory() {
    use futures::StreamExt;
    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 200 * MIB;
    const BOUND_KIB: u64 = 48 * 1024;
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, "max_body_bytes = 536870912\n").expect("config");
    let data = dir.path().join("data");
    let srv = Server::start_with(&data, &[("BERTH_CONFIG", config.to_str().expect("utf-8"))]).await;
    let api = srv.client();
    let bx = make_box(
        &api,
        json!({"resources": {"memory_mib": 256, "disk_mib": 1024, "pids": 64}}),
    )
    .await;
    let out = exec(
        &api,
        &bx,
        "head -c 209715200 /dev/zero | tr '\\0' 'b' > /workspace/big && stat -c %s /workspace/big",
    )
    .await;
    assert_eq!(out["stdout"], format!("{SIZE}\n"), "{out}");

    let pid = srv.pid();
    let idle = rss_kib(pid);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let sampler = sample_peak(pid, stop);
    let resp = api
        .http
        .get(format!("{}/v1/boxes/{bx}/files/big", api.url))
        .bearer_auth(&api.token)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(SIZE));
    let mut got = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        assert!(chunk.iter().all(|b| *b == b'b'));
        got += chunk.len() as u64;
    }
    assert_eq!(got, SIZE);
    let _ = stop_tx.send(true);
    let peak_get = sampler.await.expect("sampler");

    let idle_put = rss_kib(pid);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let sampler = sample_peak(pid, stop);
    let chunks = futures::stream::iter(
        (0..SIZE / MIB).map(|_| Ok::<_, std::io::Error>(vec![b'p'; MIB as usize])),
    );
    let put = api
        .http
        .put(format!("{}/v1/boxes/{bx}/files/up", api.url))
        .bearer_auth(&api.token)
        .body(reqwest::Body::wrap_stream(chunks));
    let r = api.raw(put).await;
    assert_eq!(r.status, 204, "{}", r.json);
    let _ = stop_tx.send(true);
    let peak_put = sampler.await.expect("sampler");
    let out = exec(
        &api,
        &bx,
        "stat -c %s /workspace/up; tr -d p < /workspace/up | wc -c",
    )
    .await;
    assert_eq!(out["stdout"], format!("{SIZE}\n0\n"), "{out}");

    assert!(
        peak_get.saturating_sub(idle) < BOUND_KIB,
        "GET of {SIZE} bytes grew the server from {idle} KiB to {peak_get} KiB"
    );
    assert!(
        peak_put.saturating_sub(idle_put) < BOUND_KIB,
        "PUT of {SIZE} bytes grew the server from {idle_put} KiB to {peak_put} KiB"
    );
    srv.stop().await;
}

async fn exec(api: &Api, bx: &str, script: &str) -> Value {
    common::exec_sh(api, bx, script, 120).await
}
