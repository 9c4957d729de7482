//! The control plane under load: GET latency with 1,000 boxes stored, SSE delivery with many
//! subscribers on busy sessions, and server memory per idle session.

use crate::{ms, percentile, summarize, Summary};
use berth_store::Store;
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This process's resident memory in KiB.
fn rss_kib() -> u64 {
    crate::files::rss_kib(std::process::id())
}

pub struct Api {
    pub url: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str, token: &str) -> Api {
        Api {
            url: url.to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        anyhow::ensure!(status.is_success(), "{path}: {status}: {}", r.text().await?);
        Ok(r.json().await?)
    }

    /// The time a GET takes to its last body byte (a non-2xx answer is an error).
    pub async fn timed_get(&self, path: &str) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "GET {path}: {}", r.status());
        let _ = r.bytes().await?;
        Ok(t.elapsed())
    }
}

/// 1,000 stopped boxes (`box-stored0000` …) in `st`, for the GET benchmark (a store read each).
pub async fn store_boxes(st: &dyn Store) -> anyhow::Result<()> {
    for i in 0..1000 {
        let b: berth_api::BoxObject = serde_json::from_value(json!({
            "id": format!("box-stored{i:04}"), "tenant": "default", "state": "stopped", "state_reason": null,
            "backend": "native", "lifecycle": "persistent", "image": "host",
            "resources": {"cpus": 1.0, "memory_mib": 1024, "disk_mib": 5120, "pids": 512},
            "network": {"allow": []}, "env": {}, "idle_timeout_s": null, "max_lifetime_s": null, "labels": {},
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
        }))?;
        st.put_box(&b).await?;
    }
    Ok(())
}

/// A small running box for the GET and SSE benchmarks.
pub async fn live_box(api: &Api) -> anyhow::Result<String> {
    let live = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64}}),
        )
        .await?;
    Ok(live["id"].as_str().unwrap_or_default().to_string())
}

/// GET /v1/boxes/{id} 2,000 times on a stored box (after [`store_boxes`]) and on `live_id`.
pub async fn get_rows(api: &Api, live_id: &str) -> anyhow::Result<Vec<Summary>> {
    let mut rows = Vec::new();
    for (name, ids) in [
        (
            "GET /v1/boxes/{id}, stopped box (store read), 1,000 boxes stored",
            (0..2000)
                .map(|i| format!("box-stored{:04}", i % 1000))
                .collect::<Vec<_>>(),
        ),
        (
            "GET /v1/boxes/{id}, running box (owner task's watch)",
            vec![live_id.to_string(); 2000],
        ),
    ] {
        let mut v = Vec::with_capacity(ids.len());
        for id in ids {
            v.push(api.timed_get(&format!("/v1/boxes/{id}")).await?);
        }
        eprintln!("done: {name}");
        rows.push(summarize(name, v));
    }
    Ok(rows)
}

/// SSE delivery: `SSE_SESSIONS` busy command sessions in `live_id`, `subscribers` clients (in a
/// process of their own) spread over them, `SSE_MESSAGES` messages to each; every delivered
/// event's latency from its `ts` (set before the store commit) to its arrival, sorted.
pub async fn sse_latencies(
    api: &Api,
    live_id: &str,
    subscribers: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut sids = Vec::new();
    for _ in 0..SSE_SESSIONS {
        let s = api
            .post("/v1/sessions", json!({"box": live_id, "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "while read -r l; do echo \"$l\"; done"]}}))
            .await?;
        sids.push(s["id"].as_str().unwrap_or_default().to_string());
    }
    // The subscribers run in a process of their own (as real clients would), so the server's
    // runtime is not shared with 500 parsing clients.
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "sse-clients",
            "--url",
            &api.url,
            "--token",
            &api.token,
            "--sessions",
            &sids.join(","),
        ])
        .args([
            "--subscribers",
            &subscribers.to_string(),
            "--messages",
            &SSE_MESSAGES.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(out));
    anyhow::ensure!(
        lines.next_line().await?.as_deref() == Some("ready"),
        "clients did not connect"
    );
    for m in 0..SSE_MESSAGES {
        for sid in &sids {
            api.post(
                &format!("/v1/sessions/{sid}/messages"),
                json!({"content": format!("msg {m}")}),
            )
            .await?;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut lats = Vec::new();
    while let Some(l) = lines.next_line().await? {
        if let Ok(us) = l.trim().parse::<u64>() {
            lats.push(Duration::from_micros(us));
        }
    }
    lats.sort();
    Ok(lats)
}

/// Sessions and messages per session of [`sse_latencies`].
pub const SSE_SESSIONS: usize = 10;
pub const SSE_MESSAGES: usize = 40;

pub async fn run(subscribers: usize, durability: String) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // 1,000 boxes in the store before the server starts (stopped ones: a store read each).
    {
        let st = berth_store::SqliteStore::open(&dir.path().join("berth.db")).await?;
        store_boxes(&st).await?;
        st.close().await;
    }
    let cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        durability: durability.parse().map_err(anyhow::Error::msg)?,
        ..Default::default()
    };
    // Every subscriber comes from this one loopback peer: above the default per-peer cap (256).
    let mut cfg = cfg;
    cfg.listener.max_connections_per_peer = subscribers + 64;
    let (url, token, stop_tx, server) = crate::start_server(cfg).await?;
    let api = Arc::new(Api::new(&url, &token));

    // GET /v1/boxes/{id}: a stored box and a live one.
    let live_id = live_box(&api).await?;
    eprintln!("live box {live_id}; measuring GETs");
    crate::print_table("request", &get_rows(&api, &live_id).await?);

    // SSE delivery: 10 busy sessions, `subscribers` clients spread over them.
    let lats = sse_latencies(&api, &live_id, subscribers).await?;
    println!();
    println!("| SSE delivery | subscribers | sessions | events delivered | median ms | p99 ms | max ms |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| event `ts` (set just before the store commit) → received by the client, durability {durability} | {subscribers} | {SSE_SESSIONS} | {} | {} | {} | {} |",
        lats.len(),
        ms(percentile(&lats, 0.5)),
        ms(percentile(&lats, 0.99)),
        ms(lats.last().copied().unwrap_or_default())
    );

    // Memory per idle session: server and client share this process; only sessions are added.
    let before = rss_kib();
    let n = 200;
    for _ in 0..n {
        api.post(
            "/v1/sessions",
            json!({"box": live_id, "agent": {"kind": "command", "argv": ["/bin/cat"]}}),
        )
        .await?;
    }
    let after = rss_kib();
    println!();
    println!(
        "| server memory per idle session (command agent `cat`, {n} sessions) | {:.1} KiB |",
        (after.saturating_sub(before)) as f64 / n as f64
    );
    println!("|---|---|");
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(())
}

/// The subscriber side of the SSE benchmark (run as `berth-bench sse-clients`): connects
/// `subscribers` streams spread over `sessions`, prints `ready`, then one line per delivered
/// `stdout` event with its latency in microseconds (client receive time − event `ts`).
pub async fn sse_clients(
    url: String,
    token: String,
    sessions: Vec<String>,
    subscribers: usize,
    messages: usize,
) -> anyhow::Result<()> {
    // One client (one connection pool) for every subscriber, as the old raw `reqwest` loop had.
    let client = berth_client::Client::new(&url, &token);
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut ready = Vec::new();
    for i in 0..subscribers {
        let sid = sessions[i % sessions.len()].clone();
        let (client, lat_tx) = (client.clone(), lat_tx.clone());
        let (rtx, rrx) = tokio::sync::oneshot::channel::<()>();
        ready.push(rrx);
        tokio::spawn(async move {
            // One connection, not the resuming stream: a broken one should show as missing
            // deliveries, not be papered over.
            let Ok(frames) = client
                .sse(&format!("/v1/sessions/{sid}/events?after=0"), None)
                .await
            else {
                return;
            };
            let _ = rtx.send(());
            let mut frames = std::pin::pin!(frames);
            let mut got = 0;
            while let Some(Ok(frame)) = frames.next().await {
                let now = time::OffsetDateTime::now_utc();
                if frame.event != "stdout" {
                    continue;
                }
                let Ok(ev) = serde_json::from_str::<berth_api::Event>(&frame.data) else {
                    continue;
                };
                let Ok(ts) = time::OffsetDateTime::parse(
                    &ev.ts,
                    &time::format_description::well_known::Rfc3339,
                ) else {
                    continue;
                };
                let d = (now - ts).max(time::Duration::ZERO);
                let _ = lat_tx.send(Duration::from_nanos(d.whole_nanoseconds() as u64));
                got += 1;
                if got == messages {
                    return;
                }
            }
        });
    }
    drop(lat_tx);
    let mut connected = 0;
    for r in ready {
        connected += usize::from(r.await.is_ok());
    }
    // A subscriber that could not connect would silently shrink the figure's population.
    anyhow::ensure!(
        connected == subscribers,
        "only {connected} of {subscribers} subscribers connected"
    );
    println!("ready");
    let mut out = String::new();
    while let Some(d) = lat_rx.recv().await {
        out.push_str(&format!("{}\n", d.as_micros()));
    }
    print!("{out}");
    Ok(())
}
