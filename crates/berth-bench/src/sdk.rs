//! An Agent SDK app's first answer with the SDK's local transport against `BerthTransport`
//! (`clients/python/bench/first_answer.py`, the pinned claude-agent-sdk, the real CLI, the
//! mock model; alternating runs in one process).

use crate::{ms, summarize};
use berth_mock_model::{scenario::Scenario, Mock};
use serde_json::json;
use std::time::Duration;

pub async fn run(runs: usize, python: String) -> anyhow::Result<()> {
    let cli = std::env::var("BERTH_CLAUDE_BIN")
        .unwrap_or_else(|_| "/opt/berth/claude-code-2.1.328/node_modules/.bin/claude".into());
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await?;
    let dir = tempfile::tempdir()?;
    let cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        upstream_url: mock_url.clone(),
        anthropic_api_key: Some("sk-bench".into()),
        claude_cli: Some(cli.clone().into()),
        ..Default::default()
    };
    let (url, key, stop_tx, server) = crate::start_server(cfg).await?;
    let api = crate::BenchApi::new(&url, &key);
    let bx = api
        .post("/v1/boxes", json!({"resources": {"memory_mib": 2048}}))
        .await?;
    let bx = bx["id"].as_str().unwrap_or_default().to_string();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tokio::time::timeout(
        Duration::from_secs(60 + 120 * runs as u64),
        tokio::process::Command::new(&python)
            .arg(root.join("clients/python/bench/first_answer.py"))
            .arg(runs.to_string())
            .env("PYTHONPATH", root.join("clients/python"))
            .env("BERTH_URL", &url)
            .env("BERTH_TOKEN", &key)
            .env("BERTH_BENCH_BOX", &bx)
            .env("BERTH_CLAUDE_BIN", &cli)
            .env("BERTH_BENCH_MOCK_URL", &mock_url)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let _ = stop_tx.send(());
    let _ = server.await;
    if !out.status.success() {
        anyhow::bail!(
            "first_answer.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let durations = |k: &str| -> Vec<Duration> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(serde_json::Value::as_f64)
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                    .collect()
            })
            .unwrap_or_default()
    };
    let a = summarize(
        "ClaudeSDKClient, local transport (CLI child process → mock)",
        durations("local"),
    );
    let b = summarize(
        "ClaudeSDKClient, BerthTransport (existing box, relay, gateway → mock)",
        durations("berth"),
    );
    crate::print_table("connect → first assistant message", [&a, &b]);
    println!(
        "| added by berth (median) | | {} | |",
        ms(b.median.saturating_sub(a.median))
    );
    Ok(())
}
