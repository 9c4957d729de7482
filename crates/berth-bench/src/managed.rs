//! The Managed Agents API (`/anthropic`) against berth's own API, same server, same run:
//!
//! - **First model request**: `sessions.create` + the first `user.message` (the official SDKs'
//!   two calls) → the mock model's first request, against `POST /v1/sessions` with the same
//!   box (hybrid, an empty allowlist) and agent (the Claude CLI, every tool allowed) and the
//!   message as its `prompt`. Interleaved, so both see the same host load.
//! - **Stream delivery**: `subscribers` clients on `/anthropic/v1/sessions/{id}/events/stream`,
//!   then as many on `/v1/sessions/{id}/events` of the berth session behind it, while the same
//!   messages run turns; each delivered `agent.message` (resp. `assistant`) event's latency is
//!   the client's receive time − the event's commit stamp (`processed_at` = the berth event's
//!   `ts`). The clients run in a process of their own.

use crate::pools::loadavg;
use crate::{ms, percentile, summarize, wait_requests, BenchApi};
use berth_mock_model::{scenario::Scenario, unix_ms, Mock};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

fn scenario() -> anyhow::Result<Scenario> {
    Ok(serde_json::from_value(json!({"rules": [
        {"match": "be slow", "steps": [{"text": "...", "delay_ms": 30000}]},
        {"match": "ping", "steps": [{"text": "pong"}]}
    ]}))?)
}

async fn anth(
    api: &BenchApi,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    api.call(method, &format!("/anthropic{path}"), body).await
}

/// Until a berth session (or the Managed Agents session's box) is gone: DELETE, ignoring 404.
async fn delete(api: &BenchApi, path: &str) {
    let _ = api.call(reqwest::Method::DELETE, path, json!(null)).await;
}

pub async fn run(runs: usize, subscribers: usize, messages: usize) -> anyhow::Result<()> {
    let load0 = loadavg();
    let cli = std::env::var("BERTH_CLAUDE_BIN")
        .unwrap_or_else(|_| "/opt/berth/claude-code-2.1.328/node_modules/.bin/claude".into());
    let mock = Mock::new(scenario()?, Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await?;
    let dir = tempfile::tempdir()?;
    let mut cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        upstream_url: mock_url.clone(),
        anthropic_api_key: Some("sk-bench".into()),
        claude_cli: Some(cli.into()),
        ..Default::default()
    };
    // Every subscriber comes from loopback: one peer.
    cfg.listener.max_connections_per_peer = subscribers + 64;
    let (url, key, stop_tx, server) = crate::start_server(cfg).await?;
    let api = BenchApi::new(&url, &key);
    let env = anth(
        &api,
        reqwest::Method::POST,
        "/v1/environments",
        json!({"name": "bench"}),
    )
    .await?;
    let agent = anth(
        &api,
        reqwest::Method::POST,
        "/v1/agents",
        json!({"name": "bench", "model": "claude-sonnet-4-5", "tools": [{"type": "agent_toolset_20260401"}]}),
    )
    .await?;

    // First model request, interleaved; each split where the CLI's process appears.
    let (mut managed, mut own, mut created) = (Vec::new(), Vec::new(), Vec::new());
    let (mut managed_spawn, mut own_spawn) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let before = mock.recorded().len();
        let watch = tokio::task::spawn_blocking(first_cli_process);
        let t0 = unix_ms();
        let s = anth(
            &api,
            reqwest::Method::POST,
            "/v1/sessions",
            json!({"agent": agent["id"], "environment_id": env["id"]}),
        )
        .await?;
        created.push(crate::between_unix_ms(t0, unix_ms()));
        let sid = s["id"].as_str().unwrap_or_default().to_string();
        anth(
            &api,
            reqwest::Method::POST,
            &format!("/v1/sessions/{sid}/events"),
            json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "be slow"}]}]}),
        )
        .await?;
        let at = wait_requests(&mock, before + 1).await?;
        managed.push(crate::between_unix_ms(t0, at));
        managed_spawn.push(crate::between_unix_ms(t0, watch.await?.unwrap_or(at)));
        delete(&api, &format!("/anthropic/v1/sessions/{sid}")).await;

        let watch = tokio::task::spawn_blocking(first_cli_process);
        let t0 = unix_ms();
        let (took, r) = api
            .post_until_model_request(
                &mock,
                "/v1/sessions",
                json!({"box": {"lifecycle": "hybrid", "network": {"allow": []}},
                       "agent": {"kind": "claude", "model": "claude-sonnet-4-5",
                                 "disallowed_tools": [],
                                 "permission_rules": [{"tool": "*", "allow": true}]},
                       "prompt": "be slow", "keep_open": true}),
            )
            .await?;
        own.push(took);
        let at = t0 + took.as_secs_f64() * 1000.0;
        own_spawn.push(crate::between_unix_ms(t0, watch.await?.unwrap_or(at)));
        let bx = r["box_id"].as_str().unwrap_or_default().to_string();
        delete(
            &api,
            &format!("/v1/sessions/{}", r["id"].as_str().unwrap_or_default()),
        )
        .await;
        delete(&api, &format!("/v1/boxes/{bx}")).await;
    }
    let load1 = loadavg();
    println!("host load (1-min loadavg, 2 cores) before {load0:.2}, after {load1:.2}");
    println!();
    println!("| first message → first model request | n | median ms | p99 ms | min–max ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let row = |name: &str, v: &[Duration]| {
        let s = summarize(name, v.to_vec());
        let min = v.iter().min().copied().unwrap_or_default();
        let max = v.iter().max().copied().unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {}–{} |",
            s.name,
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(min),
            ms(max)
        );
        s
    };
    let m = row(
        "Managed Agents: sessions.create + events.send(user.message)",
        &managed,
    );
    let o = row(
        "berth: POST /v1/sessions (same box and agent, message as prompt)",
        &own,
    );
    row(
        "(of the Managed Agents figure: sessions.create answered)",
        &created,
    );
    let ms_ = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| Managed Agents minus berth (medians) | | {:+.2} | | |",
        ms_(m.median) - ms_(o.median)
    );
    let ms2 = row(
        "Managed Agents: sessions.create + events.send → the CLI's process",
        &managed_spawn,
    );
    let os2 = row("berth: POST /v1/sessions → the CLI's process", &own_spawn);
    println!(
        "| … Managed Agents minus berth, to the CLI's process (medians): the API's own path | | {:+.2} | | |",
        ms_(ms2.median) - ms_(os2.median)
    );

    // Stream delivery: one session whose turns are short, watched both ways in turn.
    let s = anth(
        &api,
        reqwest::Method::POST,
        "/v1/sessions",
        json!({"agent": agent["id"], "environment_id": env["id"]}),
    )
    .await?;
    let sid = s["id"].as_str().unwrap_or_default().to_string();
    let berth_sessions = api
        .call(reqwest::Method::GET, "/v1/sessions", json!(null))
        .await?;
    let berth_sid = berth_sessions["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|s| s["state"] != "stopped" && s["state"] != "failed")
        })
        .and_then(|s| s["id"].as_str())
        .ok_or_else(|| anyhow::anyhow!("the berth session behind {sid}"))?
        .to_string();
    println!();
    println!("| stream delivery (commit → client) | subscribers | events delivered | median ms | p99 ms | max ms | load before–after |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for round in 0..runs {
        for managed in [true, false] {
            let (name, path, kind) = if managed {
                (
                    "Managed Agents `/anthropic/v1/sessions/{id}/events/stream`, `agent.message`",
                    format!("/anthropic/v1/sessions/{sid}/events/stream"),
                    "agent.message",
                )
            } else {
                // berth's stream replays from `after`: only what follows is measured, like the
                // Managed Agents stream, which sends only what follows the connection.
                let last = api
                    .call(
                        reqwest::Method::GET,
                        &format!("/v1/sessions/{berth_sid}"),
                        json!(null),
                    )
                    .await?["last_seq"]
                    .as_i64()
                    .unwrap_or(0);
                (
                    "berth `/v1/sessions/{id}/events`, `assistant`",
                    format!("/v1/sessions/{berth_sid}/events?after={last}"),
                    "assistant",
                )
            };
            let l0 = loadavg();
            let lats =
                deliver(&api, &mock, &sid, &path, kind, subscribers, messages, round).await?;
            let l1 = loadavg();
            println!(
                "| {name} (round {}) | {subscribers} | {} | {} | {} | {} | {l0:.2}–{l1:.2} |",
                round + 1,
                lats.len(),
                ms(percentile(&lats, 0.5)),
                ms(percentile(&lats, 0.99)),
                ms(lats.last().copied().unwrap_or_default())
            );
        }
    }
    delete(&api, &format!("/anthropic/v1/sessions/{sid}")).await;
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(())
}

/// Unix ms at which a Claude CLI process not running when called first shows in `/proc`
/// (scanned every millisecond, for at most 30 s): where a session's start splits into the
/// API's path (before) and the CLI's own start-up (after). The bench runs one session at a time.
/// A new process is read again for 100 ms: between its fork and its exec it still shows its
/// parent's command line.
fn first_cli_process() -> Option<f64> {
    fn pids() -> Vec<u32> {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                    .collect()
            })
            .unwrap_or_default()
    }
    let start = std::time::Instant::now();
    let old: std::collections::HashSet<u32> = pids().into_iter().collect();
    let mut first_seen = std::collections::HashMap::new();
    while start.elapsed() < Duration::from_secs(30) {
        let now = std::time::Instant::now();
        for p in pids() {
            if old.contains(&p) {
                continue;
            }
            let seen = *first_seen.entry(p).or_insert(now);
            if now.duration_since(seen) > Duration::from_millis(100) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains("claude") {
                return Some(unix_ms());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Wait (bounded) until the session's turn is over (called once the turn reached the model).
async fn idle(api: &BenchApi, sid: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = anth(
            api,
            reqwest::Method::GET,
            &format!("/v1/sessions/{sid}"),
            json!(null),
        )
        .await?;
        if s["status"] == "idle" {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the turn did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start the clients on `path`, run `messages` short turns, and collect the latencies.
#[allow(clippy::too_many_arguments)]
async fn deliver(
    api: &BenchApi,
    mock: &Mock,
    sid: &str,
    path: &str,
    kind: &str,
    subscribers: usize,
    messages: usize,
    round: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["managed-clients", "--url", &api.url, "--token", &api.key])
        .args(["--path", path, "--kind", kind])
        .args([
            "--subscribers",
            &subscribers.to_string(),
            "--messages",
            &messages.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(out));
    let ready = lines.next_line().await?.unwrap_or_default();
    anyhow::ensure!(
        ready == format!("ready {subscribers}"),
        "not every client connected: {ready}"
    );
    for m in 0..messages {
        let before = mock.recorded().len();
        anth(
            api,
            reqwest::Method::POST,
            &format!("/v1/sessions/{sid}/events"),
            json!({"events": [{"type": "user.message", "content": format!("ping {round}.{m}")}]}),
        )
        .await?;
        // One turn per message: the next is sent once this one is over (the CLI would fold
        // messages that arrive during a turn into it).
        wait_requests(mock, before + 1).await?;
        idle(api, sid).await?;
    }
    let mut lats = Vec::new();
    let collect = async {
        while let Some(l) = lines.next_line().await? {
            if let Ok(us) = l.trim().parse::<u64>() {
                lats.push(Duration::from_micros(us));
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(300), collect)
        .await
        .map_err(|_| anyhow::anyhow!("the clients did not get every event in time"))??;
    lats.sort();
    Ok(lats)
}

/// The subscriber side (run as `berth-bench managed-clients`): `subscribers` streams of `path`,
/// prints `ready <connected>`, then one line per delivered `kind` event: its latency in microseconds (the
/// client's receive time − the event's `processed_at`, or `ts` on berth's own stream).
pub async fn clients(
    url: String,
    token: String,
    path: String,
    kind: String,
    subscribers: usize,
    messages: usize,
) -> anyhow::Result<()> {
    let client = berth_client::Client::new(&url, &token);
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut ready = Vec::new();
    for _ in 0..subscribers {
        let (client, lat_tx, path, kind) =
            (client.clone(), lat_tx.clone(), path.clone(), kind.clone());
        let (rtx, rrx) = tokio::sync::oneshot::channel::<()>();
        ready.push(rrx);
        tokio::spawn(async move {
            let Ok(frames) = client.sse(&path, None).await else {
                return;
            };
            let _ = rtx.send(());
            let mut frames = std::pin::pin!(frames);
            let mut got = 0;
            while let Some(Ok(frame)) = frames.next().await {
                let now = time::OffsetDateTime::now_utc();
                if frame.event != kind {
                    continue;
                }
                let Ok(ev) = serde_json::from_str::<Value>(&frame.data) else {
                    continue;
                };
                let stamp = ev["processed_at"].as_str().or(ev["ts"].as_str());
                let Some(Ok(ts)) = stamp.map(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                }) else {
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
    println!("ready {connected}");
    let mut out = String::new();
    while let Some(d) = lat_rx.recv().await {
        out.push_str(&format!("{}\n", d.as_micros()));
    }
    print!("{out}");
    Ok(())
}
