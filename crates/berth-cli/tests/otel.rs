//! OpenTelemetry export (built with `--features otel`): the server's spans reach an OTLP/HTTP
//! collector, carrying the box id.
#![cfg(feature = "otel")]

mod common;

use common::Server;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn spans_reach_an_otlp_collector() {
    // A collector that hands every trace export body to the test.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body.to_vec());
                ""
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 128, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let id = r.json["id"].as_str().expect("id").to_string();
    api.delete(&format!("/v1/boxes/{id}")).await;
    // OTLP/HTTP bodies are protobuf: attribute values are their raw bytes.
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(body) = rx.recv().await {
            if body.windows(id.len()).any(|w| w == id.as_bytes()) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no exported span carried box {id}");
    srv.stop().await;
}
