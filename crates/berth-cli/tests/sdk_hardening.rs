//! The sdk relay against a hostile or unlucky client (review 6: H1, M3, L5): stdin is bounded
//! by bytes end to end while the CLI does not read it, the session still stops, a reconnect
//! racing a write in flight never hands the CLI a byte twice, and berth writes nothing of its
//! own into the client's stdin. Real server, real box, the real CLI (stopped from inside its
//! box with `pkill -STOP`, as a tenant could).

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{claude_bin, exec_sh, sdk_connect, tenant_key, Api, Server};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const REAL_KEY: &str = "sk-ant-real-secret-for-sdk-hardening-0123456789";
/// The server's largest stdin frame (`api::sdk::MAX_STDIN_FRAME`).
const MAX_FRAME: usize = 1 << 20;

async fn setup() -> (tempfile::TempDir, Server, Api, Mock) {
    let mock = Mock::new(Scenario { rules: vec![] }, Duration::ZERO);
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
    let (_id, api) = tenant_key(&admin, "sdk-hostile").await;
    (dir, srv, api, mock)
}

/// A started sdk session: (session id, box id).
async fn sdk_session(api: &Api) -> (String, String) {
    let r = api
        .post(
            "/v1/sessions",
            json!({"agent": {"kind": "claude", "client": "sdk"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    let bx = r.json["box_id"].as_str().expect("box_id").to_string();
    let s = api
        .wait_for(&format!("/v1/sessions/{sid}"), 60, |s| s["state"] == "idle")
        .await;
    assert_eq!(s["state"], "idle", "{s}");
    (sid, bx)
}

/// Send SIGSTOP or SIGCONT to the CLI, from inside its box (`[c]` keeps the shell's own
/// command line from matching).
async fn signal_cli(api: &Api, bx: &str, sig: &str) {
    let r = exec_sh(api, bx, &format!("pkill -{sig} -f '[c]laude'"), 10).await;
    assert_eq!(r["exit_code"], 0, "pkill -{sig}: {r}");
}

/// The next text frame (skipping stdout), within `secs`; None if none came or the socket ended.
async fn next_text<S>(ws: &mut S, secs: u64) -> Option<Value>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).ok(),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// One stdin line the CLI accepts and ignores (a heartbeat), `len` bytes with its newline.
fn pad_line(len: usize, tag: usize) -> Vec<u8> {
    let head = format!("{{\"type\":\"keep_alive\",\"tag\":{tag},\"pad\":\"");
    let tail = "\"}\n";
    let mut v = head.into_bytes();
    v.resize(len - tail.len(), b'x');
    v.extend_from_slice(tail.as_bytes());
    v
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// H1: a tenant stops its CLI and floods the relay's stdin. The server takes about one
/// queue's worth and pushes back on the socket (its memory stays flat), frames over the
/// limit are refused, and the session still stops at once on DELETE.
#[tokio::test]
async fn a_flood_into_a_stopped_cli_holds_little_memory_and_the_session_still_stops() {
    let (_d, srv, api, _mock) = setup().await;
    let (sid, bx) = sdk_session(&api).await;
    signal_cli(&api, &bx, "STOP").await;
    let pid = srv.pid();
    let before = rss_kib(pid);

    let ws = sdk_connect(&api, &sid, 0).await;
    let (mut sink, mut incoming) = ws.split();
    let hello = next_text(&mut incoming, 10).await.expect("hello");
    assert_eq!(hello["type"], "hello", "{hello}");
    // 300 MiB offered, in frames at the limit.
    const FRAMES: usize = 300;
    let flood = tokio::spawn(async move {
        for i in 0..FRAMES {
            let f = pad_line(MAX_FRAME - 64, i);
            if sink.send(Message::Binary(f.into())).await.is_err() {
                return i;
            }
        }
        FRAMES
    });
    // Watch for 10 s (50 samples): the server's memory while the flood pushes.
    let mut peak = before;
    let mut taken = 0u64;
    let start = Instant::now();
    for _ in 0..50 {
        peak = peak.max(rss_kib(pid));
        if let Some(t) = next_text(&mut incoming, 0).await {
            if t["type"] == "stdin_taken" {
                taken = t["offset"].as_u64().expect("offset");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("server RSS: {before} KiB before, {peak} KiB peak; stdin taken: {taken} bytes");
    assert!(
        grown_mib < 24,
        "server RSS grew by {grown_mib} MiB under a stdin flood ({before} KiB before, {peak} KiB peak)"
    );
    assert!(
        !flood.is_finished(),
        "the client could push all {FRAMES} MiB: no back-pressure"
    );
    assert!(
        taken < 16 << 20,
        "the server took {taken} stdin bytes for a stopped CLI"
    );

    // The session answers Stop while its CLI reads nothing.
    let t = Instant::now();
    let del = tokio::time::timeout(
        Duration::from_secs(10),
        api.delete(&format!("/v1/sessions/{sid}")),
    )
    .await
    .expect("DELETE of the session answered within 10 s");
    assert_eq!(del.status, 200, "{}", del.json);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let s = api
        .wait_for(&format!("/v1/sessions/{sid}"), 10, |s| {
            s["state"] == "stopped"
        })
        .await;
    assert_eq!(s["state"], "stopped", "{s}");
    flood.abort();
    // Everyone else is still served, and the session's ephemeral box goes with it (its owner
    // task is not wedged either).
    assert_eq!(api.get("/v1/sessions").await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let gone = loop {
        let b = api.get(&format!("/v1/boxes/{bx}")).await;
        if b.status == 404 || b.json["state"] == "destroyed" {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(gone, "the box outlived its stopped session");

    // A frame over the limit is refused (1009) rather than held.
    let (sid2, _bx2) = sdk_session(&api).await;
    let mut ws = sdk_connect(&api, &sid2, 0).await;
    assert!(next_text(&mut ws, 10).await.is_some());
    let big = pad_line(2 * MAX_FRAME, 0);
    let _ = ws.send(Message::Binary(big.into())).await;
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the oversized frame ends the connection");
    assert_eq!(code, Some(1009));
}

/// L5: a REST interrupt would write berth's own line into the client's stdin, possibly inside
/// one of the client's lines: it is refused, and the session goes on.
#[tokio::test]
async fn a_rest_interrupt_of_an_sdk_session_is_refused() {
    let (_d, _srv, api, _mock) = setup().await;
    let (sid, _bx) = sdk_session(&api).await;
    let r = api
        .post(&format!("/v1/sessions/{sid}/interrupt"), json!({}))
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    let msg = r.json["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("/sdk"), "{msg}");
    let s = api.get(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(s.json["state"], "idle", "{}", s.json);
}

/// M3: a client reconnects while its old connection's write is still waiting for the stopped
/// CLI. It resends from the new hello's `stdin_offset`; the session must end up having taken
/// exactly the client's stream (no write counted or delivered twice).
#[tokio::test]
async fn a_reconnect_racing_a_write_in_flight_never_delivers_a_byte_twice() {
    let (_d, _srv, api, _mock) = setup().await;
    let (sid, bx) = sdk_session(&api).await;
    signal_cli(&api, &bx, "STOP").await;
    // The client's stream: 64 KiB lines, one per frame (10 MiB, far more than the stopped CLI
    // and the server's queue hold).
    const FRAME: usize = 64 << 10;
    const FRAMES: usize = 160;
    let log: Vec<u8> = (0..FRAMES).flat_map(|i| pad_line(FRAME, i)).collect();
    let total = log.len() as u64;

    let ws = sdk_connect(&api, &sid, 0).await;
    let (mut sink, mut incoming) = ws.split();
    let hello = next_text(&mut incoming, 10).await.expect("hello");
    assert_eq!(hello["stdin_offset"], 0, "{hello}");
    let frames = log.clone();
    let a = tokio::spawn(async move {
        for f in frames.chunks(FRAME) {
            if sink.send(Message::Binary(f.to_vec().into())).await.is_err() {
                return;
            }
        }
        // Keep the connection open (half-open, as after a network drop).
        std::future::pending::<()>().await;
    });
    // Let it fill: until the server takes no more (no ack for 2 s; at most 30 s).
    let fill = Instant::now();
    while fill.elapsed() < Duration::from_secs(30) {
        if next_text(&mut incoming, 2).await.is_none() {
            break;
        }
    }

    // The client gives up on it and reconnects: the newer connection resends the rest.
    let ws = sdk_connect(&api, &sid, 0).await;
    let (mut sink, mut incoming2) = ws.split();
    let hello = next_text(&mut incoming2, 10).await.expect("hello");
    let from = hello["stdin_offset"].as_u64().expect("stdin_offset");
    assert!(from > 0 && from < total, "{hello}");
    a.abort();
    drop(incoming);
    let rest = log[from as usize..].to_vec();
    let b = tokio::spawn(async move {
        for f in rest.chunks(FRAME) {
            if sink.send(Message::Binary(f.to_vec().into())).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    });
    signal_cli(&api, &bx, "CONT").await;
    // Every byte is taken (acknowledged), once.
    let mut taken = from;
    let deadline = Instant::now() + Duration::from_secs(60);
    while taken < total && Instant::now() < deadline {
        match next_text(&mut incoming2, 5).await {
            Some(t) if t["type"] == "stdin_taken" => {
                taken = t["offset"].as_u64().expect("offset");
            }
            Some(t) => assert_ne!(t["type"], "error", "{t}"),
            None => {}
        }
    }
    b.abort();
    drop(incoming2);
    // Whatever was acknowledged, a fresh connection is told the session's count: exactly the
    // client's stream.
    let mut ws = sdk_connect(&api, &sid, 0).await;
    let hello = next_text(&mut ws, 10).await.expect("hello");
    assert_eq!(
        hello["stdin_offset"].as_u64(),
        Some(total),
        "the session took {} bytes of a {total}-byte stream",
        hello["stdin_offset"]
    );
    assert_eq!(taken, total);
    // The CLI read it all and still runs (it got whole lines, none twice or spliced).
    let s = api.get(&format!("/v1/sessions/{sid}")).await;
    assert!(
        s.json["state"] == "idle" || s.json["state"] == "running",
        "{}",
        s.json
    );
}
