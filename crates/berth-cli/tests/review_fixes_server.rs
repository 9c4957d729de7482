//! Findings of the hardening round's review, attacked end to end against a real `berth serve`:
//! a revoked key cuts its file downloads, and a WebSocket whose client stopped reading is
//! closed after its key's revocation all the same.

mod common;

use common::{tenant_key, Api, Server};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn small_box(api: &Api) -> String {
    let spec = json!({"resources": {"memory_mib": 256, "disk_mib": 64, "pids": 64}});
    let r = api.post("/v1/boxes", spec).await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

/// A 64 GiB (sparse) file is being downloaded with a tenant's key when the key is deleted:
/// the download is cut (an error, not a clean end) within a second, far short of the file.
#[tokio::test]
async fn revoking_a_key_cuts_its_file_download_within_a_second() {
    const SIZE: u64 = 64 << 30;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let admin = srv.client();
    let (key_id, mallory) = tenant_key(&admin, "mallory").await;
    let bx = small_box(&mallory).await;
    let out = exec(&mallory, &bx, "truncate -s 64G /workspace/big && echo ok").await;
    assert_eq!(out["stdout"], "ok\n", "{out}");
    let resp = mallory
        .http
        .get(format!("{}/v1/boxes/{bx}/files/big", mallory.url))
        .bearer_auth(&mallory.token)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(SIZE));
    let mut body = resp.bytes_stream();
    let mut got: u64 = 0;
    while got < 1 << 20 {
        match tokio::time::timeout(Duration::from_secs(20), body.next()).await {
            Ok(Some(Ok(c))) => got += c.len() as u64,
            other => panic!("the download did not start: {other:?}"),
        }
    }
    let t = Instant::now();
    assert_eq!(
        admin.delete(&format!("/v1/keys/{key_id}")).await.status,
        204
    );
    let cut = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match body.next().await {
                Some(Ok(c)) => got += c.len() as u64,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the download ended within a second of the revocation");
    assert!(
        cut,
        "the download is cut with an error, not ended as if whole"
    );
    assert!(got < SIZE, "{got} bytes of {SIZE}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // The key is refused from now on; the server serves others.
    assert_eq!(mallory.get("/v1/boxes").await.status, 401);
    assert_eq!(admin.get("/v1/boxes").await.status, 200);
}

/// Whether the server still holds its end of the TCP connection `server` ↔ `client` (a
/// socket with an owning process in `ss`); an orphaned or gone socket is not held.
fn server_holds(server: std::net::SocketAddr, client: std::net::SocketAddr) -> bool {
    let out = std::process::Command::new("ss")
        .args(["-Htnp", "state", "all", "src"])
        .arg(server.to_string())
        .arg("dst")
        .arg(client.to_string())
        .output()
        .expect("ss");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).contains("users:")
}

/// The server's end of `server` ↔ `client`: bytes received and not yet read by the server,
/// and bytes it sent that are not acknowledged (`ss` Recv-Q, Send-Q).
fn server_queues(server: std::net::SocketAddr, client: std::net::SocketAddr) -> (u64, u64) {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "all", "src"])
        .arg(server.to_string())
        .arg("dst")
        .arg(client.to_string())
        .output()
        .expect("ss");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // `State Recv-Q Send-Q Local Peer`.
    let col = |i| {
        text.split_whitespace()
            .nth(i)
            .and_then(|q| q.parse().ok())
            .unwrap_or(0)
    };
    (col(1), col(2))
}

/// A tenant's WebSocket client floods itself (its session's events are replayed) and stops
/// reading, so the server's sends block; the key is deleted: the server lets go of the socket
/// within a few seconds (the close frame's send is bounded), and serves others meanwhile.
#[tokio::test]
async fn a_websocket_that_stopped_reading_is_closed_after_revocation() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let admin = srv.client();
    let (key_id, mallory) = tenant_key(&admin, "mallory").await;
    let bx = small_box(&mallory).await;
    // 1,000 lines of 60 KB: about 60 MB of events, more than the sockets buffer.
    let agent = json!({"kind": "command", "argv": ["/bin/sh", "-c",
        "head -c 60000 /dev/zero | tr '\\0' x > /tmp/l && echo >> /tmp/l \
         && i=0; while [ $i -lt 1000 ]; do cat /tmp/l; i=$((i+1)); done; echo done; exec cat"]});
    let r = mallory
        .post("/v1/sessions", json!({"box": bx, "agent": agent}))
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("sid").to_string();
    // All lines are stored once `done` is (one SSE stream, scanned without keeping it).
    let sse = mallory
        .http
        .get(format!("{}/v1/sessions/{sid}/events", mallory.url))
        .bearer_auth(&mallory.token)
        .send()
        .await
        .expect("sse");
    assert_eq!(sse.status(), 200);
    let mut sse = sse.bytes_stream();
    let mut tail: Vec<u8> = Vec::new();
    let needle = br#""text":"done""#;
    let seen = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(Ok(c)) = sse.next().await {
            tail.extend_from_slice(&c);
            if tail.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let keep = tail.len().saturating_sub(needle.len());
            tail.drain(..keep);
        }
        false
    })
    .await;
    assert_eq!(seen.ok(), Some(true), "the agent's lines are stored");
    drop(sse);

    let server: std::net::SocketAddr = mallory
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let tcp = tokio::net::TcpStream::connect(server).await.expect("tcp");
    let client = tcp.local_addr().expect("local");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{server}/v1/sessions/{sid}/ws?after=0"),
    )
    .expect("req");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", mallory.token).parse().expect("hdr"),
    );
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.expect("ws");
    // Not read: the replay fills both sockets' buffers and the server's send waits.
    let t = Instant::now();
    while server_queues(server, client).1 < 256 << 10 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the server's sends never backed up"
        );
        tokio::task::yield_now().await;
    }
    // A message whose answer the server cannot send: its loop waits on the blocked socket.
    let mut ws = ws;
    futures::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::Text("not json".into()),
    )
    .await
    .expect("send");
    let t = Instant::now();
    while server_queues(server, client).0 > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the server read it");
        tokio::task::yield_now().await;
    }
    assert!(server_holds(server, client));

    assert_eq!(
        admin.delete(&format!("/v1/keys/{key_id}")).await.status,
        204
    );
    let t = Instant::now();
    while server_holds(server, client) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the server still holds the revoked socket of a client that stopped reading"
        );
        // Others are served meanwhile.
        assert_eq!(admin.get("/v1/boxes").await.status, 200);
    }
    // Reading now drains what was buffered, then the stream ends.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut n = 0u64;
        while let Some(Ok(_)) = ws.next().await {
            n += 1;
            assert!(n < 100_000, "bounded");
        }
    })
    .await;
    assert!(ended.is_ok(), "the socket ended");
    assert_eq!(mallory.get("/v1/boxes").await.status, 401);
}

/// A box leaves a 1 TiB sparse file in its `keep_workspace` workspace: its artifact fails at
/// once (the files pass the box's disk size) instead of streaming zeros until the archive's
/// timeout; the destroy completes, the failure is a box event, and the server serves others.
#[tokio::test]
async fn a_huge_sparse_file_fails_the_artifact_at_the_disk_size() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let spec = json!({"resources": {"memory_mib": 256, "disk_mib": 64, "pids": 64},
        "keep_workspace": true});
    let r = api.post("/v1/boxes", spec).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();
    let out = exec(
        &api,
        &bx,
        "echo mine > /workspace/f && truncate -s 1T /workspace/huge && echo ok",
    )
    .await;
    assert_eq!(out["stdout"], "ok\n", "{out}");
    let t = Instant::now();
    let del = tokio::time::timeout(
        Duration::from_secs(120),
        api.delete(&format!("/v1/boxes/{bx}")),
    )
    .await
    .expect("the destroy is not held up by the archive");
    assert_eq!(del.status, 200, "{}", del.json);
    assert!(t.elapsed() < Duration::from_secs(120));
    let evs = api.get(&format!("/v1/boxes/{bx}/events")).await.json;
    let failed = evs["items"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["type"] == "artifact_failed"))
        .cloned();

    let failed = failed.unwrap_or_else(|| panic!("an artifact_failed event: {evs}"));
    assert!(
        failed.to_string().contains("bytes"),
        "the reason names the size: {failed}"
    );
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}/artifact")).await.status,
        404
    );
    assert_eq!(api.get("/v1/boxes").await.status, 200);
}

async fn exec(api: &Api, bx: &str, script: &str) -> Value {
    common::exec_sh(api, bx, script, 600).await
}
