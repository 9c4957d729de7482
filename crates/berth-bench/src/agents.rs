//! Agent start-up and concurrency with the real Claude Code CLI against the mock model.

use crate::{ms, summarize, wait_requests};
use berth_mock_model::{scenario::Scenario, unix_ms, Mock};
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub async fn run(runs: usize, concurrent: usize) -> anyhow::Result<()> {
    let cli = std::env::var("BERTH_CLAUDE_BIN")
        .unwrap_or_else(|_| "/opt/berth/claude-code-2.1.328/node_modules/.bin/claude".into());
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await?;

    // The CLI started by hand, same flags, in a scratch directory (as root it refuses
    // bypassPermissions, so acceptEdits; the mode does not change start-up).
    let scratch = tempfile::tempdir()?;
    let mut by_hand = Vec::new();
    for i in 0..runs {
        let before = mock.recorded().len();
        let cfg = scratch.path().join(format!("cfg{i}"));
        let t0 = unix_ms();
        let mut child = tokio::process::Command::new(&cli)
            .args([
                "-p",
                "--output-format=stream-json",
                "--input-format=stream-json",
                "--verbose",
                "--permission-mode=acceptEdits",
            ])
            .current_dir(scratch.path())
            .env("ANTHROPIC_BASE_URL", &mock_url)
            .env("ANTHROPIC_API_KEY", "sk-bench")
            .env("CLAUDE_CONFIG_DIR", &cfg)
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
        stdin
            .write_all(
                format!(
                    "{}\n",
                    json!({"type": "user", "message": {"role": "user", "content": "be slow"}})
                )
                .as_bytes(),
            )
            .await?;
        let at = wait_requests(&mock, before + 1).await?;
        by_hand.push(crate::between_unix_ms(t0, at));
        let _ = child.kill().await;
    }

    // Through berth: a session in an existing box.
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
    let mut via_berth = Vec::new();
    for _ in 0..runs {
        let (took, s) = api
            .post_until_model_request(
                &mock,
                "/v1/sessions",
                json!({"box": bx, "agent": {"kind": "claude"}, "prompt": "be slow"}),
            )
            .await?;
        via_berth.push(took);
        let sid = s["id"].as_str().unwrap_or_default();
        let _ = api
            .http
            .delete(format!("{url}/v1/sessions/{sid}"))
            .bearer_auth(&key)
            .send()
            .await?;
    }
    let a = summarize(
        "CLI started by hand (same flags) → first request at the mock",
        by_hand,
    );
    let b = summarize(
        "POST /v1/sessions (existing box) → first request at the mock",
        via_berth,
    );
    crate::print_table("agent start", [&a, &b]);
    println!(
        "| added by berth (median) | | {} | |",
        ms(b.median.saturating_sub(a.median))
    );

    // Concurrency: N sessions, each in its own box, each a two-tool-call task.
    let t = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrent {
        let s = api.post("/v1/sessions", json!({"box": {"lifecycle": "persistent", "resources": {"memory_mib": 1024, "disk_mib": 256}}, "agent": {"kind": "claude"}, "prompt": "make a file"})).await?;
        let sid = s["id"].as_str().unwrap_or_default().to_string();
        let box_id = s["box_id"].as_str().unwrap_or_default().to_string();
        let http = api.http.clone();
        let (url, key) = (url.clone(), key.clone());
        set.spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            loop {
                let s: Value = http
                    .get(format!("{url}/v1/sessions/{sid}"))
                    .bearer_auth(&key)
                    .send()
                    .await?
                    .json()
                    .await?;
                if s["state"] == "idle" && s["last_seq"].as_i64().unwrap_or(0) > 3 {
                    let ok = s["state_reason"].is_null();
                    let st: Value = http
                        .get(format!("{url}/v1/boxes/{box_id}/stats"))
                        .bearer_auth(&key)
                        .send()
                        .await?
                        .json()
                        .await?;
                    let f = http
                        .get(format!("{url}/v1/boxes/{box_id}/files/hello.txt"))
                        .bearer_auth(&key)
                        .send()
                        .await?;
                    return Ok::<(bool, u64), anyhow::Error>((
                        ok && f.status().is_success(),
                        st["memory_bytes"].as_u64().unwrap_or(0),
                    ));
                }
                if s["state"] == "failed" || std::time::Instant::now() > deadline {
                    return Ok((false, 0));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let mut ok = 0;
    let mut mem = Vec::new();
    while let Some(r) = set.join_next().await {
        let (good, m) = r??;
        ok += usize::from(good);
        mem.push(m);
    }
    let wall = t.elapsed();
    mem.sort();
    println!();
    println!("| {concurrent} concurrent sessions, each Write + Bash + answer, own box | value |");
    println!("| --- | ---: |");
    println!("| completed without error | {ok} / {concurrent} |");
    println!("| wall time for all | {:.1} s |", wall.as_secs_f64());
    println!(
        "| box memory per session after its task (median, cgroup) | {:.0} MiB |",
        mem[mem.len() / 2] as f64 / 1048576.0
    );
    println!(
        "| box memory per session (max) | {:.0} MiB |",
        mem.last().copied().unwrap_or(0) as f64 / 1048576.0
    );
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(())
}
