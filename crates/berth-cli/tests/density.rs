//! A server's open files and the boxes it holds: each idle native box costs the server two
//! descriptors (its report socket, which is its log too, and its door, the one socket of all
//! its bridged ports), and a server whose open-file limit is reached refuses the next box with
//! a 503 naming `LimitNOFILE`, records nothing of it, and goes on serving the boxes it has
//! (their bridges included). Its own test binary: it counts the server's descriptors.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// The server's open descriptors.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn small_box() -> serde_json::Value {
    json!({"resources": {"cpus": 0.1, "memory_mib": 64, "disk_mib": 32, "pids": 32}})
}

/// What a box gets from `127.0.0.1:port` in it for a plain request (its first line).
async fn ask_port(api: &Api, bx: &str, port: u16, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && \
         printf 'GET {path} HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n' >&3 && \
         head -n1 <&3"
    );
    let r = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": ["bash", "-c", script], "timeout_s": 20}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_descriptors_per_box_and_a_clear_refusal_at_the_open_file_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No disks kept ready (each holds a descriptor while it waits): the count is the boxes'.
    let server = Server::start_nofile(
        dir.path(),
        &[
            ("BERTH_MAX_BOXES_PER_TENANT", "1000"),
            ("BERTH_NATIVE_DISK_POOL", "0"),
        ],
        300,
    )
    .await;
    let api = server.client();
    let pid = server.pid();
    let mut boxes = Vec::new();
    let create = || {
        let api = api.clone();
        async move { api.post("/v1/boxes", small_box()).await }
    };
    // A first few, so that what the server opens once (store connections, the zygote) is open.
    for _ in 0..3 {
        let r = create().await;
        assert_eq!(r.status, 201, "{}", r.json);
        boxes.push(r.json["id"].as_str().expect("id").to_string());
    }
    let before = fds(pid);
    const N: usize = 20;
    for _ in 0..N {
        let r = create().await;
        assert_eq!(r.status, 201, "{}", r.json);
        boxes.push(r.json["id"].as_str().expect("id").to_string());
    }
    let after = fds(pid);
    let per_box = (after as f64 - before as f64) / N as f64;
    eprintln!(
        "server descriptors: {before} before {N} boxes, {after} after ({per_box:.2} per box)"
    );
    assert!(
        (2 * N - 3..=2 * N + 3).contains(&after.saturating_sub(before)),
        "{before} → {after} descriptors for {N} boxes ({per_box:.2} per box, not 2)"
    );

    // Up to the limit: then a 503 that names the limit to raise, and no box recorded.
    let refused = loop {
        let r = create().await;
        if r.status != 201 {
            break r;
        }
        boxes.push(r.json["id"].as_str().expect("id").to_string());
        assert!(boxes.len() < 300, "never refused at 300 open files");
    };
    eprintln!(
        "refused at box {} with {} open: {}",
        boxes.len() + 1,
        fds(pid),
        refused.json
    );
    assert_eq!(refused.status, 503, "{}", refused.json);
    let msg = refused.json.to_string();
    assert!(msg.contains("LimitNOFILE"), "{msg}");
    // Room for ~(300 - what the server holds besides - the reserve) / 2 boxes.
    assert!(boxes.len() >= 80, "only {} boxes fit", boxes.len());
    let listed = api.get("/v1/boxes").await;
    assert_eq!(listed.status, 200, "{}", listed.json);
    let items = listed.json["items"].as_array().expect("box list").len();
    assert_eq!(items, boxes.len(), "the refused box was recorded");

    // Still serving the boxes it holds: an exec, and each bridged port reaching its own
    // service through the box's door.
    let last = boxes.last().expect("a box").clone();
    let out = exec_sh(&api, &last, "echo alive", 20).await;
    assert_eq!(out["stdout"], "alive\n", "{out}");
    let gateway = ask_port(&api, &last, 47100, "/v1/models").await;
    let box_api = ask_port(&api, &last, 47102, "/v1/sessions").await;
    eprintln!("gateway: {gateway}; box api: {box_api}");
    assert!(gateway.starts_with("HTTP/1.1 "), "{gateway}");
    assert!(box_api.starts_with("HTTP/1.1 401"), "{box_api}");

    // A box deleted gives its descriptors back: the next create fits again.
    for id in boxes.drain(..4) {
        let r = api.delete(&format!("/v1/boxes/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = create().await;
        if r.status == 201 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.json);
        assert!(
            Instant::now() < deadline,
            "no room after deletes: {}",
            r.json
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
    // A stopped server leaves no cgroup of its boxes (an empty memory cgroup costs the host
    // its per-shrinker state for as long as it stays).
    let left: Vec<_> = boxes
        .iter()
        .filter(|id| std::path::Path::new(&format!("/sys/fs/cgroup/memory/berth/{id}")).exists())
        .collect();
    assert!(left.is_empty(), "{} box cgroups left: {left:?}", left.len());
}
