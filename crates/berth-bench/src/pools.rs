//! Warm pool take against a CLI started by hand ahead of time and against a cold session, in
//! the same run, interleaved so that all three see the same host load.
//!
//! Each figure is `POST /v1/sessions` (or, by hand, writing the first message to the CLI's
//! stdin) → the mock model's first request, read off the mock's own receive timestamp.

use crate::{ms, summarize, wait_requests, BenchApi, Summary};
use berth_mock_model::{scenario::Scenario, unix_ms, Mock};
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Time a CLI (by hand or in a ready box) is given to reach its wait for the first message
/// before it is sent one: both pre-started variants get the same.
const SETTLE: Duration = Duration::from_millis(2500);
const POOL: &str = "bench";

/// The three series of one run of `runs` rounds.
pub struct Series {
    pub by_hand: Vec<Duration>,
    pub pool: Vec<Duration>,
    pub cold: Vec<Duration>,
    /// `/proc/loadavg`'s 1-minute figure before and after.
    pub load: (f64, f64),
}

pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

pub async fn measure(runs: usize) -> anyhow::Result<Series> {
    let load0 = loadavg();
    let cli = std::env::var("BERTH_CLAUDE_BIN")
        .unwrap_or_else(|_| "/opt/berth/claude-code-2.1.328/node_modules/.bin/claude".into());
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await?;
    let dir = tempfile::tempdir()?;
    let box_spec = json!({"resources": {"memory_mib": 1024, "disk_mib": 256}});
    let pool: berth_server::engine::pools::PoolConfig = serde_json::from_value(json!({
        "name": POOL, "size": 1, "box": box_spec, "agent": {"kind": "claude"}
    }))?;
    let cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        upstream_url: mock_url.clone(),
        anthropic_api_key: Some("sk-bench".into()),
        claude_cli: Some(cli.clone().into()),
        pools: vec![pool],
        ..Default::default()
    };
    let (url, key, stop_tx, server) = crate::start_server(cfg).await?;
    let api = BenchApi::new(&url, &key);
    let scratch = tempfile::tempdir()?;
    let mut s = Series {
        by_hand: Vec::new(),
        pool: Vec::new(),
        cold: Vec::new(),
        load: (load0, 0.0),
    };
    for i in 0..runs {
        // By hand: the CLI started ahead (same flags as in a box), then sent its first message.
        let before = mock.recorded().len();
        let mut child = tokio::process::Command::new(&cli)
            .args([
                "-p",
                "--output-format=stream-json",
                "--input-format=stream-json",
                "--verbose",
                "--permission-prompt-tool=stdio",
                "--permission-mode=acceptEdits",
            ])
            .current_dir(scratch.path())
            .env("ANTHROPIC_BASE_URL", &mock_url)
            .env("ANTHROPIC_API_KEY", "sk-bench")
            .env("CLAUDE_CONFIG_DIR", scratch.path().join(format!("cfg{i}")))
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
        tokio::time::sleep(SETTLE).await;
        let line = format!(
            "{}\n",
            json!({"type": "user", "message": {"role": "user", "content": "be slow"}, "parent_tool_use_id": null})
        );
        let t0 = unix_ms();
        stdin.write_all(line.as_bytes()).await?;
        let at = wait_requests(&mock, before + 1).await?;
        s.by_hand.push(crate::between_unix_ms(t0, at));
        let _ = child.kill().await;

        // Pool take: wait until a box is ready and its CLI has had the same settle time.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let p = api
                .call(reqwest::Method::GET, "/v1/pools", json!(null))
                .await?;
            if p["items"][0]["ready"] == 1 {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the pool never refilled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(SETTLE).await;
        let (took, r) = api
            .post_until_model_request(
                &mock,
                "/v1/sessions",
                json!({"pool": POOL, "prompt": "be slow"}),
            )
            .await?;
        s.pool.push(took);
        end_session(&api, &r).await?;

        // Cold: a new box and a CLI started for the session.
        let (took, r) = api
            .post_until_model_request(
                &mock,
                "/v1/sessions",
                json!({"box": {"resources": {"memory_mib": 1024, "disk_mib": 256}, "labels": {"cold": "1"}},
                       "agent": {"kind": "claude"}, "prompt": "be slow"}),
            )
            .await?;
        s.cold.push(took);
        end_session(&api, &r).await?;
    }
    let p = api
        .call(reqwest::Method::GET, "/v1/pools", json!(null))
        .await?;
    anyhow::ensure!(
        p["items"][0]["taken"] == runs,
        "every pooled run took a ready box: {p}"
    );
    let _ = stop_tx.send(());
    let _ = server.await;
    s.load.1 = loadavg();
    Ok(s)
}

async fn end_session(api: &BenchApi, r: &serde_json::Value) -> anyhow::Result<()> {
    let sid = r["id"].as_str().unwrap_or_default();
    api.call(
        reqwest::Method::DELETE,
        &format!("/v1/sessions/{sid}"),
        json!(null),
    )
    .await?;
    Ok(())
}

fn row(s: &Summary, v: &[Duration]) {
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
}

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let s = measure(runs).await?;
    println!(
        "host load (1-min loadavg, 2 cores) before {:.2}, after {:.2}",
        s.load.0, s.load.1
    );
    println!();
    println!("| first message → first model request | n | median ms | p99 ms | min–max ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let by_hand = summarize(
        "CLI started by hand ahead, then sent its first message",
        s.by_hand.clone(),
    );
    let pool = summarize("POST /v1/sessions from a warm pool", s.pool.clone());
    let cold = summarize(
        "POST /v1/sessions, cold (new box, CLI start)",
        s.cold.clone(),
    );
    row(&by_hand, &s.by_hand);
    row(&pool, &s.pool);
    row(&cold, &s.cold);
    println!(
        "| pool take minus the pre-started CLI (medians) | | {:+.2} | | |",
        (pool.median.as_secs_f64() - by_hand.median.as_secs_f64()) * 1000.0
    );
    Ok(())
}
