//! `berth mock-model`: the Messages API stand-in.

use anyhow::{Context, Result};

/// Serve the stand-in until interrupted.
pub(crate) async fn run(
    listen: String,
    scenario: Option<String>,
    chunk_delay_ms: u64,
) -> Result<()> {
    let sc = match scenario {
        Some(p) => berth_mock_model::scenario::Scenario::load(&p)?,
        None => berth_mock_model::scenario::Scenario::demo(),
    };
    let mock = berth_mock_model::Mock::new(sc, std::time::Duration::from_millis(chunk_delay_ms));
    let addr = listen
        .parse()
        .with_context(|| format!("--listen {listen}"))?;
    let inspect = mock.inspect_token().to_string();
    berth_mock_model::serve(
        mock,
        addr,
        |a| {
            println!("mock model listening on http://{a}");
            println!(
                "inspect with: curl -H '{}: {inspect}' http://{a}/_mock/requests",
                berth_mock_model::INSPECT_HEADER
            );
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await?;
    Ok(())
}
