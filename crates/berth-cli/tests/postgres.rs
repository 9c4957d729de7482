//! Real servers on a real PostgreSQL: two processes sharing one database (one serves the
//! other's session stream live), and PostgreSQL crashing and restarting under a running
//! session (the servers reconnect, no committed event is lost, streams resume live).

mod common;

use berth_store::testing::PgCluster;
use common::{Api, Server};
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

fn echo_agent() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c", "while read -r l; do echo \"echo: $l\"; done"]})
}

/// A server on `db` whose admin key is `admin` (the first server of a database writes it; the
/// others find keys in the database and bootstrap none).
async fn serve(data: &Path, db: &str, admin: Option<&str>) -> Server {
    if let Some(key) = admin {
        std::fs::write(data.join("admin.key"), key).expect("admin key");
    }
    // An upstream that accepts connections (the kernel completes the handshakes of a bound
    // listener), so that readiness is down to the store.
    static UPSTREAM: std::sync::OnceLock<(std::net::TcpListener, String)> =
        std::sync::OnceLock::new();
    let (_, upstream) = UPSTREAM.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        (l, url)
    });
    // Two servers on one database are two nodes: each needs a name of its own.
    let node = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Server::start_with(
        data,
        &[
            ("BERTH_DATABASE_URL", db),
            ("BERTH_UPSTREAM_URL", upstream),
            ("BERTH_NODE_NAME", &node),
        ],
    )
    .await
}

/// One SSE connection read event by event.
struct Feed {
    frames:
        Pin<Box<dyn futures::Stream<Item = berth_client::Result<berth_client::sse::Frame>> + Send>>,
    pub seen: Vec<Value>,
}

impl Feed {
    async fn open(api: &Api, sid: &str) -> Feed {
        let frames = api
            .typed()
            .sse(&format!("/v1/sessions/{sid}/events"), None)
            .await
            .expect("sse");
        Feed {
            frames: Box::pin(frames),
            seen: Vec::new(),
        }
    }

    /// Read until an event satisfies `pred` (within `secs`); returns it.
    async fn until(&mut self, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.frames.next()).await {
                Ok(Some(f)) => f.expect("frame"),
                Ok(None) => panic!("stream ended; saw {:?}", self.seen),
                Err(_) => panic!("timed out; saw {:?}", self.seen),
            };
            if frame.data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&frame.data).expect("event json");
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    /// Read to the end of the stream (bounded).
    async fn rest(&mut self, secs: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            match tokio::time::timeout_at(deadline, self.frames.next()).await {
                Ok(Some(f)) => {
                    let f = f.expect("frame");
                    if !f.data.is_empty() {
                        self.seen
                            .push(serde_json::from_str(&f.data).expect("event json"));
                    }
                }
                Ok(None) => return,
                Err(_) => panic!("stream did not end; saw {:?}", self.seen),
            }
        }
    }

    fn seqs(&self) -> Vec<i64> {
        self.seen
            .iter()
            .map(|e| e["seq"].as_i64().expect("seq"))
            .collect()
    }
}

fn is_echo(text: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e: &Value| e["type"] == "stdout" && e["data"]["text"].as_str() == Some(text)
}

async fn box_and_session(api: &Api) -> String {
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64, "pids": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();
    let r = api
        .post("/v1/sessions", json!({"box": bx, "agent": echo_agent()}))
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

async fn say(api: &Api, sid: &str, text: &str) {
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": text}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
}

/// The database a test uses: on the shared test server when there is one, else on a cluster
/// of its own (returned to keep it alive).
async fn database(name: &str) -> (String, Option<PgCluster>) {
    let (admin, cluster) = match std::env::var("BERTH_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => (u, None),
        _ => {
            let c = PgCluster::start().expect("test PostgreSQL");
            (c.url(), Some(c))
        }
    };
    let name = format!("{name}_{}", std::process::id());
    let url = berth_store::postgres::ensure_database(&admin, &name)
        .await
        .expect("database");
    (url, cluster)
}

/// Server B serves a session that runs on server A: it streams A's events live as A commits
/// them (a wake-up through PostgreSQL, no polling), in order and gapless, and ends the stream
/// when the session ends on A.
#[tokio::test]
async fn a_second_server_streams_another_servers_session_live() {
    let (db, _cluster) = database("two_servers").await;
    let (da, dbb) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let a = serve(da.path(), &db, None).await;
    let b = serve(dbb.path(), &db, Some(&a.admin)).await;
    let (api_a, api_b) = (a.client(), b.client());
    let sid = box_and_session(&api_a).await;
    say(&api_a, &sid, "one").await;

    let mut feed = Feed::open(&api_b, &sid).await;
    feed.until(30, is_echo("echo: one")).await;
    // Each message goes to A; its echo must reach B's open stream, promptly.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let text = format!("live {i}");
        let t = Instant::now();
        say(&api_a, &sid, &text).await;
        feed.until(10, is_echo(&format!("echo: {text}"))).await;
        worst = worst.max(t.elapsed());
    }
    assert!(
        worst < Duration::from_secs(3),
        "slowest echo via B: {worst:?}"
    );
    // B answers reads about the session too (from the shared store).
    let s = api_b.get(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(s.status, 200, "{}", s.json);
    // Readiness covers PostgreSQL, and its latencies are in /metrics.
    for api in [&api_a, &api_b] {
        let ready = api.get("/readyz").await;
        assert_eq!(ready.status, 200, "{}", ready.json);
    }
    // A appends, B reads what A appended; both pinged the store.
    for (api, ops) in [
        (&api_a, ["ping", "append_events"]),
        (&api_b, ["ping", "read_events"]),
    ] {
        let metrics = String::from_utf8_lossy(&api.get("/metrics").await.bytes).into_owned();
        for op in ops {
            assert!(
                metrics.contains(&format!("berth_store_op_seconds_count{{op=\"{op}\"}}")),
                "{op} missing from /metrics"
            );
        }
    }

    let r = api_a.delete(&format!("/v1/sessions/{sid}")).await;
    assert!(r.status < 300, "{} {}", r.status, r.json);
    feed.rest(30).await;
    let last = feed.seen.last().expect("events").clone();
    assert_eq!(last["type"], "status", "{last}");
    assert!(
        matches!(last["data"]["state"].as_str(), Some("stopped" | "failed")),
        "{last}"
    );
    let n = feed.seqs().len() as i64;
    assert_eq!(
        feed.seqs(),
        (1..=n).collect::<Vec<_>>(),
        "gapless, in order"
    );
    let committed = api_a.get(&format!("/v1/sessions/{sid}")).await.json["last_seq"]
        .as_i64()
        .expect("seq");
    assert_eq!(n, committed, "B's stream held every committed event");
    b.stop().await;
    a.stop().await;
}

/// PostgreSQL crashes under a running session and comes back: both servers become ready
/// again on their own, the session goes on, every event committed before the crash is still
/// there, and streams opened before the crash (on the owner and on the other server) go on
/// delivering live, gapless.
#[tokio::test]
async fn postgres_restarted_mid_session() {
    let mut pg = PgCluster::start().expect("cluster");
    let db = berth_store::postgres::ensure_database(&pg.url(), "berth")
        .await
        .expect("database");
    let (da, dbb) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let a = serve(da.path(), &db, None).await;
    let b = serve(dbb.path(), &db, Some(&a.admin)).await;
    let (api_a, api_b) = (a.client(), b.client());
    let sid = box_and_session(&api_a).await;
    let mut on_a = Feed::open(&api_a, &sid).await;
    for i in 0..5 {
        say(&api_a, &sid, &format!("before {i}")).await;
    }
    on_a.until(30, is_echo("echo: before 4")).await;
    let mut on_b = Feed::open(&api_b, &sid).await;
    on_b.until(30, is_echo("echo: before 4")).await;
    let committed = api_a.get(&format!("/v1/sessions/{sid}")).await.json["last_seq"]
        .as_i64()
        .expect("seq");

    wait_status(&api_a, "/readyz", 200, 30).await;
    pg.crash().expect("crash");
    assert_eq!(api_a.get("/healthz").await.status, 200, "alive without it");
    let r = api_a.get("/readyz").await;
    assert_eq!(r.status, 503, "{}", r.json);
    let why = r.json["error"]["message"].as_str().unwrap_or("");
    assert!(why.contains("store"), "{why}");
    // ...and not PostgreSQL's own error text (user, host, port).
    assert!(
        !why.contains("127.0.0.1") && !why.contains("postgres") && !why.contains("connect"),
        "{why}"
    );
    pg.restart().expect("restart");
    for api in [&api_a, &api_b] {
        wait_status(api, "/readyz", 200, 30).await;
    }

    for i in 0..5 {
        say(&api_a, &sid, &format!("after {i}")).await;
    }
    on_a.until(30, is_echo("echo: after 4")).await;
    on_b.until(30, is_echo("echo: after 4")).await;
    for feed in [&on_a, &on_b] {
        let seqs = feed.seqs();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "gapless across the restart"
        );
    }
    let all = api_b
        .sse(&format!("/v1/sessions/{sid}/events"), None, on_a.seen.len())
        .await;
    assert_eq!(all, on_a.seen, "the store holds what was streamed");
    assert!(all.len() as i64 > committed);
    assert_eq!(all[..committed as usize], on_a.seen[..committed as usize]);
    // Streams of a live session stay open: close them before the servers drain.
    drop((on_a, on_b));
    b.stop().await;
    a.stop().await;
}

/// Poll `path` until it answers `status` (bounded).
async fn wait_status(api: &Api, path: &str, status: u16, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let r = api.get(path).await;
        if r.status == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} still {} {}",
            r.status,
            r.json
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
