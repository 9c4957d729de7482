//! Hybrid boxes: park and restore of a box holding a large workspace, and a parked session's
//! agent coming back against a fresh session's start, in the same run.

use crate::{summarize, wait_requests};
use berth_mock_model::{scenario::Scenario, Mock};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub async fn run(runs: usize, mib: usize) -> anyhow::Result<()> {
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
        claude_cli: Some(cli.into()),
        ..Default::default()
    };
    let (url, key, stop_tx, server) = crate::start_server(cfg).await?;
    let api = crate::BenchApi::new(&url, &key);

    let (mut park, mut restore, mut resumed, mut fresh) = (vec![], vec![], vec![], vec![]);
    let mut archive_bytes = 0;
    for _ in 0..runs {
        let disk = (mib as u64 * 3 + 512).max(1024);
        let bx = api
            .post(
                "/v1/boxes",
                json!({"lifecycle": "hybrid", "idle_timeout_s": 3600,
                       "resources": {"memory_mib": 2048, "disk_mib": disk}}),
            )
            .await?;
        let bx = bx["id"].as_str().unwrap_or_default().to_string();
        // The workspace: `mib` MiB of random bytes (incompressible: the worst case).
        api.post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": ["sh", "-c",
                format!("head -c {} /dev/urandom > /workspace/blob", mib << 20)]}),
        )
        .await?;
        // A fresh session's start in the running box: POST → first model request.
        let before = mock.recorded().len();
        let (took, s) = api
            .post_until_model_request(
                &mock,
                "/v1/sessions",
                json!({"box": bx, "agent": {"kind": "claude"}, "prompt": "make a file"}),
            )
            .await?;
        fresh.push(took);
        let sid = s["id"].as_str().unwrap_or_default().to_string();
        // Let the turn finish (the demo's file task makes three requests).
        wait_requests(&mock, before + 3).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = api
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/sessions/{sid}"),
                    Value::Null,
                )
                .await?;
            if s["state"] == "idle" {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "session never went idle");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let t = Instant::now();
        let parked = api.post(&format!("/v1/boxes/{bx}/park"), json!({})).await?;
        park.push(t.elapsed());
        archive_bytes = parked["snapshot"]["bytes"].as_u64().unwrap_or(0);

        // Restore alone: an exec on the parked box.
        let t = Instant::now();
        api.post(&format!("/v1/boxes/{bx}/exec"), json!({"argv": ["true"]}))
            .await?;
        restore.push(t.elapsed());

        // Park again, then a message: restore → the agent resumed → its first model request.
        api.post(&format!("/v1/boxes/{bx}/park"), json!({})).await?;
        let (took, _) = api
            .post_until_model_request(
                &mock,
                &format!("/v1/sessions/{sid}/messages"),
                json!({"content": "be quick"}),
            )
            .await?;
        resumed.push(took);
        api.call(
            reqwest::Method::DELETE,
            &format!("/v1/boxes/{bx}"),
            Value::Null,
        )
        .await?;
    }
    let rows = [
        summarize(&format!("park ({mib} MiB workspace + agent state)"), park),
        summarize("restore (exec on a parked box: restore + `true`)", restore),
        summarize(
            "message to a parked session → resumed agent's first model request",
            resumed,
        ),
        summarize(
            "fresh session in a running box → first model request",
            fresh,
        ),
    ];
    crate::print_table("hybrid box", &rows);
    println!(
        "| resumed ÷ fresh (median) | | {:.2} | |",
        rows[2].median.as_secs_f64() / rows[3].median.as_secs_f64().max(1e-9)
    );
    println!(
        "\nsnapshot size: {:.1} MiB (zstd level 1)",
        archive_bytes as f64 / 1048576.0
    );
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(())
}
