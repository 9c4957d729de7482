//! An offline run (the real Claude Code CLI against the mock model) shows no cost gap: the
//! gateway's price table agrees with what the CLI reports, for its default model and for a
//! model named explicitly. (The gap itself is tested with a disagreeing table in `cost.rs`.)

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::Server;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn the_mock_run_has_no_cost_gap() {
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let bin = std::env::var("BERTH_CLAUDE_BIN")
        .unwrap_or_else(|_| "/opt/berth/claude-code-2.1.328/node_modules/.bin/claude".into());
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_UPSTREAM_URL", &mock_url),
            ("ANTHROPIC_API_KEY", "sk-mock"),
            ("BERTH_CLAUDE_BIN", &bin),
        ],
    )
    .await;
    let api = srv.client();
    for agent in [
        json!({"kind": "claude"}),
        json!({"kind": "claude", "model": "claude-sonnet-4-5"}),
    ] {
        let r = api
            .post(
                "/v1/sessions",
                json!({"box": {"resources": {"memory_mib": 1024, "disk_mib": 256}},
                       "agent": agent, "prompt": "hello"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.json);
        let sid = r.json["id"].as_str().expect("id").to_string();
        let evs = api.until(&sid, "result", 1).await;
        let reported = evs.last().expect("result")["data"]["total_cost_usd"]
            .as_f64()
            .expect("the CLI reports its cost");
        let u = api.get(&format!("/v1/sessions/{sid}/usage")).await;
        assert_eq!(u.status, 200, "{}", u.json);
        let metered = u.json["total"]["cost_usd"].as_f64().expect("cost");
        assert!(metered > 0.0, "{}", u.json);
        assert_eq!(u.json["agent_reported_usd"].as_f64(), Some(reported));
        assert_eq!(
            u.json["cost_gap"], false,
            "{agent}: the CLI says ${reported}, the gateway ${metered}: {}",
            u.json
        );
    }
    srv.stop().await;
}
