//! Default-deny egress from inside real boxes, with curl, through the egress proxy.

mod common;

use common::{Api, Server};
use serde_json::{json, Value};

/// A plain HTTP server on the host's loopback, standing in for an allowed internet service.
async fn web() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let app = axum::Router::new().fallback(|| async { "hello from outside" });
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    port
}

async fn boxed(api: &Api, allow: Value) -> String {
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64}, "network": {"allow": allow}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

async fn sh(api: &Api, bx: &str, script: &str) -> String {
    let r = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": ["/bin/sh", "-c", script], "timeout_s": 30}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    format!(
        "{}{}",
        r.json["stdout"].as_str().unwrap_or(""),
        r.json["stderr"].as_str().unwrap_or("")
    )
}

#[tokio::test]
async fn only_allowed_names_leave_the_box() {
    let port = web().await;
    let dir = tempfile::tempdir().expect("tmp");
    let overrides = format!("allowed.test=127.0.0.1:{port},other.test=127.0.0.1:{port}");
    let srv = Server::start_with(dir.path(), &[("BERTH_EGRESS_OVERRIDES", &overrides)]).await;
    let api = srv.client();
    let a = boxed(&api, json!(["allowed.test", "localhost"])).await;
    let b = boxed(&api, json!(["other.test"])).await;
    let code = "-s -o /dev/null -w '%{http_code}'";

    // Allowed name (mapped by the override to the local server): reached, plain and tunnelled.
    assert_eq!(
        sh(&api, &a, &format!("curl -s http://allowed.test:{port}/")).await,
        "hello from outside"
    );
    assert_eq!(
        sh(
            &api,
            &a,
            &format!("curl -s --proxytunnel http://allowed.test:{port}/")
        )
        .await,
        "hello from outside"
    );
    // A name not on the list.
    assert_eq!(
        sh(&api, &a, &format!("curl {code} http://other.test:{port}/")).await,
        "403"
    );
    // An IP literal, even forced through the proxy.
    assert_eq!(
        sh(
            &api,
            &a,
            &format!("curl {code} --noproxy '' http://127.0.0.1:{port}/")
        )
        .await,
        "403"
    );
    // A listed name that resolves to loopback.
    assert_eq!(
        sh(
            &api,
            &a,
            &format!("curl {code} --noproxy '' http://localhost:{port}/")
        )
        .await,
        "403"
    );
    // Around the proxy: no route, no interface, nothing.
    let direct = sh(
        &api,
        &a,
        &format!("curl -s --max-time 5 --noproxy '*' http://127.0.0.1:{port}/ || echo FAILED"),
    )
    .await;
    assert!(direct.ends_with("FAILED\n"), "{direct}");
    // Box A's list is not box B's.
    assert_eq!(
        sh(
            &api,
            &b,
            &format!("curl {code} http://allowed.test:{port}/")
        )
        .await,
        "403"
    );
    assert_eq!(
        sh(&api, &b, &format!("curl -s http://other.test:{port}/")).await,
        "hello from outside"
    );
    let metrics = String::from_utf8_lossy(&api.get("/metrics").await.bytes).into_owned();
    assert!(
        metrics.contains("berth_egress_requests_total{verdict=\"denied\"}"),
        "decisions are counted"
    );
    srv.stop().await;
}
