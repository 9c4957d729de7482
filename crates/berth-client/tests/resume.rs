//! `Client::events` against a tiny SSE server on loopback that breaks its connections on
//! purpose: no event is lost or delivered twice, a clean end is not retried, a server that
//! always breaks is given up on after the configured attempts, and a first connection that
//! fails is reported at once.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use berth_client::{Client, Error, Retry};
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the fake server does on each connection.
#[derive(Clone, Copy)]
enum Plan {
    /// Send events up to `break_after` (then half a frame) and break the connection; the next
    /// connection sends the rest up to `total` and ends cleanly.
    BreakOnce { break_after: i64, total: i64 },
    /// The first connection: a few events, then a break; every later one: half a frame, then
    /// a break (no progress ever again).
    AlwaysBreak,
    /// A clean end after `total` events.
    Clean { total: i64 },
}

#[derive(Clone)]
struct Fake {
    plan: Plan,
    /// The `Last-Event-ID` each connection came with.
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

fn frame(sid: &str, seq: i64) -> String {
    let ev = serde_json::json!({
        "seq": seq, "session_id": sid, "ts": "2026-01-01T00:00:00Z", "type": "stdout",
        // A multi-byte character in every event, for the chunking below to split.
        "data": {"text": format!("caf\u{e9} {seq}")},
    });
    format!("id: {seq}\nevent: stdout\ndata: {ev}\n\n")
}

async fn events(State(f): State<Fake>, Path(sid): Path<String>, headers: HeaderMap) -> Response {
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let conn = {
        let mut seen = f.seen.lock().expect("lock");
        seen.push(last_id.clone());
        seen.len()
    };
    let from = last_id.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0) + 1;
    let (upto, then_break) = match f.plan {
        Plan::BreakOnce { break_after, total } if conn == 1 => (break_after.min(total), true),
        Plan::BreakOnce { total, .. } => (total, false),
        Plan::AlwaysBreak if conn == 1 => (5, true),
        Plan::AlwaysBreak => (from - 1, true),
        Plan::Clean { total } => (total, false),
    };
    let mut body = String::from(": keep-alive\n\n");
    for seq in from..=upto {
        body.push_str(&frame(&sid, seq));
    }
    let mut chunks: Vec<Result<Vec<u8>, std::io::Error>> = Vec::new();
    // 7-byte chunks: frames and characters cut everywhere.
    for c in body.as_bytes().chunks(7) {
        chunks.push(Ok(c.to_vec()));
    }
    if then_break {
        // Half of the next frame, then an error: hyper aborts the connection mid-body.
        let next = frame(&sid, upto + 1);
        chunks.push(Ok(next.as_bytes()[..next.len() / 2].to_vec()));
        chunks.push(Err(std::io::Error::other("dropped on purpose")));
    }
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .expect("response")
}

async fn serve(plan: Plan) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route("/v1/sessions/{id}/events", get(events))
        .with_state(Fake {
            plan,
            seen: seen.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

fn fast() -> Retry {
    Retry {
        max_attempts: 3,
        base: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    }
}

async fn collect(c: &Client, after: Option<i64>) -> Vec<Result<berth_api::Event, Error>> {
    tokio::time::timeout(
        Duration::from_secs(20),
        c.events("ses-1", after).collect::<Vec<_>>(),
    )
    .await
    .expect("the stream ends in time")
}

#[tokio::test]
async fn a_dropped_connection_resumes_without_loss_or_duplicates() {
    let (url, seen) = serve(Plan::BreakOnce {
        break_after: 4,
        total: 10,
    })
    .await;
    let c = Client::new(&url, "t").with_retry(fast());
    let got = collect(&c, None).await;
    let seqs: Vec<i64> = got
        .iter()
        .map(|r| match r {
            Ok(e) => e.seq,
            Err(e) => panic!("unexpected error: {e}"),
        })
        .collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    assert!(got
        .iter()
        .flatten()
        .all(|e| e.data["text"] == format!("caf\u{e9} {}", e.seq)));
    // Two connections; the second resumed from an id the first delivered (hyper may not flush
    // the last chunks before it aborts, so which one is up to the transport: the seqs above
    // show that whichever it was, nothing was lost or repeated).
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], None);
    let resumed: i64 = seen[1]
        .as_deref()
        .expect("Last-Event-ID")
        .parse()
        .expect("a seq");
    assert!((1..=4).contains(&resumed), "{seen:?}");
}

#[tokio::test]
async fn a_start_point_is_sent_as_last_event_id() {
    let (url, seen) = serve(Plan::Clean { total: 5 }).await;
    let c = Client::new(&url, "t").with_retry(fast());
    let seqs: Vec<i64> = collect(&c, Some(2))
        .await
        .into_iter()
        .map(|r| r.expect("event").seq)
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    // A clean end is the session's end: no second connection.
    assert_eq!(*seen.lock().expect("lock"), vec![Some("2".to_string())]);
}

#[tokio::test]
async fn a_server_that_keeps_breaking_is_given_up_on() {
    let (url, seen) = serve(Plan::AlwaysBreak).await;
    let c = Client::new(&url, "t").with_retry(Retry {
        max_attempts: 3,
        ..fast()
    });
    let got = collect(&c, None).await;
    let (last, events) = got.split_last().expect("something");
    let seqs: Vec<i64> = events
        .iter()
        .map(|r| r.as_ref().expect("events before the error").seq)
        .collect();
    let x = *seqs.last().expect("the first connection delivered events");
    assert_eq!(seqs, (1..=x).collect::<Vec<_>>());
    match last {
        Err(Error::Resume { attempts, last }) => {
            assert_eq!(*attempts, 3);
            assert!(matches!(**last, Error::Transport(_)), "{last}");
        }
        other => panic!("expected a resume failure, got {other:?}"),
    }
    // The first connection and three retries, each resuming from the last event delivered.
    let mut want = vec![None];
    want.extend(vec![Some(x.to_string()); 3]);
    assert_eq!(*seen.lock().expect("lock"), want);
}

#[tokio::test]
async fn an_unreachable_server_fails_at_once() {
    // A port nothing listens on: bind, note the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    // A long backoff: were the first connection retried, the deadline below would pass.
    let c = Client::new(&format!("http://127.0.0.1:{port}"), "t").with_retry(Retry {
        max_attempts: 5,
        base: Duration::from_secs(10),
        max_delay: Duration::from_secs(10),
    });
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        c.events("ses-1", None).collect::<Vec<_>>(),
    )
    .await
    .expect("no retries of a first connection");
    assert_eq!(got.len(), 1);
    match &got[0] {
        Err(e @ Error::Connect { .. }) => {
            assert!(e.to_string().contains("is `berth serve` running?"), "{e}")
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_error_is_not_retried() {
    let app = Router::new().route(
        "/v1/sessions/{id}/events",
        get(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                axum::Json(
                    serde_json::json!({"error":{"code":"not_found","message":"no such session"}}),
                ),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let c = Client::new(&format!("http://{addr}"), "t").with_retry(fast());
    let got = collect(&c, None).await;
    assert_eq!(got.len(), 1);
    let e = got.into_iter().next().expect("one").expect_err("an error");
    assert_eq!(e.status(), Some(404));
    assert_eq!(e.code(), Some("not_found"));
    assert_eq!(e.to_string(), "404 (not_found): no such session");
}
