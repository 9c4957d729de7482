//! The public listener against slow bodies and upgraded connections, attacked end to end on a
//! real `berth serve`: a trickled webhook body is cut at its deadline, a silent body at the idle
//! timeout, a long exec is not; WebSockets keep counting against the per-peer cap.

mod common;

use common::{Api, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn small_box(api: &Api) -> String {
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64, "pids": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

fn echo_agent() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c", "while read -r l; do echo \"echo: $l\"; done"]})
}

fn addr(srv: &Server) -> String {
    srv.url.trim_start_matches("http://").to_string()
}

/// A TCP connection to the server from the loopback address `from` (another peer than the
/// test's own API client on 127.0.0.1).
async fn connect_from(from: &str, to: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{from}:0").parse().expect("from"))
        .expect("bind");
    sock.connect(to.parse().expect("to"))
        .await
        .expect("connect")
}

/// Read until the server closes the connection (EOF or reset); what it said and when.
async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), t.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server kept the connection open past {limit:?}: {}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// A webhook body trickled a byte a second is answered 408 at the body deadline (10 s) while
/// other clients are served; a hook to an unknown trigger is answered at once, its body
/// unread; a body that stops arriving is cut at the idle timeout; an exec that takes longer
/// than the idle timeout (no byte moving while the server works) is not cut.
#[tokio::test]
async fn slow_bodies_are_cut_and_long_work_is_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_CONN_IDLE_TIMEOUT_S", "3")]).await;
    let api = srv.client();
    let a = addr(&srv);
    let bx = small_box(&api).await;
    let r = api
        .post(
            "/v1/triggers",
            json!({"box": bx, "agent": echo_agent(), "prompt": "got {{n}}"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let path = r.json["webhook_path"].as_str().expect("path").to_string();

    // Unknown trigger: 404 without waiting for the megabyte it announces.
    let mut unknown = tokio::net::TcpStream::connect(&a).await.expect("connect");
    unknown
        .write_all(
            b"POST /v1/hooks/trg_nosuch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n{",
        )
        .await
        .expect("write");
    let mut head = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), unknown.read(&mut head))
        .await
        .expect("answered at once")
        .expect("read");
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // Trickled: a byte a second keeps the connection from being idle; the deadline cuts it.
    let mut trickle = tokio::net::TcpStream::connect(&a).await.expect("connect");
    trickle
        .write_all(
            format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    let t0 = Instant::now();
    let drip = tokio::spawn(async move {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while t0.elapsed() < Duration::from_secs(20) {
            if trickle.write_all(b" ").await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(1), trickle.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        (String::from_utf8_lossy(&answer).to_string(), t0.elapsed())
    });

    // Silent after its headers: cut at the idle timeout (3 s), well before the deadline.
    let mut silent = tokio::net::TcpStream::connect(&a).await.expect("connect");
    silent
        .write_all(
            format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let (_, waited) = read_until_closed(&mut silent, Duration::from_secs(9)).await;
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(8),
        "silent body: {waited:?}"
    );

    // Meanwhile: others are served, and an exec quieter than the idle timeout completes.
    for _ in 0..10 {
        assert_eq!(api.get("/healthz").await.status, 200);
    }
    let t = Instant::now();
    let r = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": ["sh", "-c", "sleep 5; echo done"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(
        r.json["stdout"].as_str().unwrap_or("").contains("done"),
        "{}",
        r.json
    );
    assert!(t.elapsed() >= Duration::from_secs(5));

    let (answer, took) = drip.await.expect("drip");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(15),
        "trickled body answered after {took:?}"
    );
    assert_eq!(api.get("/healthz").await.status, 200);
    srv.stop().await;
}

async fn ws_from(
    from: &str,
    srv: &Server,
    api: &Api,
    sid: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "{}/v1/sessions/{sid}/ws",
            api.url.replace("http://", "ws://")
        ))
        .expect("req");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.token).parse().expect("hdr"),
    );
    let tcp = connect_from(from, &addr(srv)).await;
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("ws handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// WebSockets keep their connection's per-peer slot after the upgrade: a peer holding its
/// cap in WebSockets gets no further connection (others do), and closing one frees a slot.
#[tokio::test]
async fn websockets_count_against_the_per_peer_cap() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_MAX_CONNECTIONS_PER_PEER", "3")]).await;
    let api = srv.client();
    let bx = small_box(&api).await;
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": echo_agent(), "prompt": "hello"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("sid").to_string();
    // The attacking peer is 127.0.0.2; the test's own client (127.0.0.1) is another peer.
    let peer = "127.0.0.2";
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(ws_from(peer, &srv, &api, &sid).await);
    }
    let mut fourth = connect_from(peer, &addr(&srv)).await;
    let _ = fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let (said, waited) = read_until_closed(&mut fourth, Duration::from_secs(5)).await;
    assert!(said.is_empty(), "over the cap is closed unanswered: {said}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(
        api.get("/healthz").await.status,
        200,
        "another peer is served"
    );

    let mut one = held.pop().expect("ws");
    let _ = one.close(None).await;
    drop(one);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect_from(peer, &addr(&srv)).await;
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let (said, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        if said.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed WebSocket gave its slot back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    srv.stop().await;
}

/// Upgraded connections have a cap of their own (over all peers): past it a WebSocket is
/// answered 503 and not upgraded, ordinary requests are still served, and closing one
/// WebSocket makes room for the next.
#[tokio::test]
async fn upgrades_have_a_cap_of_their_own() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_MAX_UPGRADES", "2")]).await;
    let api = srv.client();
    let bx = small_box(&api).await;
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": echo_agent(), "prompt": "hello"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("sid").to_string();
    let mut held = vec![
        ws_from("127.0.0.2", &srv, &api, &sid).await,
        ws_from("127.0.0.3", &srv, &api, &sid).await,
    ];
    let try_ws = || async {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!(
                    "{}/v1/sessions/{sid}/ws",
                    api.url.replace("http://", "ws://")
                ),
            )
            .expect("req");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", api.token).parse().expect("hdr"),
        );
        let tcp = connect_from("127.0.0.4", &addr(&srv)).await;
        tokio_tungstenite::client_async(req, tcp).await
    };
    match try_ws().await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503)
        }
        Err(e) => panic!("refused, but not with a 503: {e}"),
        Ok(_) => panic!("a third upgrade was let through"),
    }
    assert_eq!(api.get("/healthz").await.status, 200);
    let mut one = held.pop().expect("ws");
    let _ = one.close(None).await;
    drop(one);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if try_ws().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "a closed WebSocket made room");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    srv.stop().await;
}
