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
    // Every decision is in the box's own event log (recorded by its owner task).
    let evs = api
        .wait_for(&format!("/v1/boxes/{a}/events"), 20, |v| {
            v["items"]
                .as_array()
                .map(|a| a.iter().filter(|e| e["type"] == "egress").count())
                .unwrap_or(0)
                >= 5
        })
        .await;
    let items = evs["items"].as_array().expect("items");
    assert_eq!(items[0]["type"], "state");
    assert_eq!(items[0]["data"]["state"], "running");
    let allowed: Vec<&Value> = items
        .iter()
        .filter(|e| e["type"] == "egress" && e["data"]["allowed"] == true)
        .collect();
    assert_eq!(allowed.len(), 2, "{items:?}");
    assert!(allowed.iter().all(|e| e["data"]["host"] == "allowed.test"
        && e["data"]["bytes_down"].as_u64().unwrap_or(0) > 0));
    let denied: Vec<&str> = items
        .iter()
        .filter(|e| e["type"] == "egress" && e["data"]["allowed"] == false)
        .filter_map(|e| e["data"]["host"].as_str())
        .collect();
    assert_eq!(denied, vec!["other.test", "127.0.0.1", "localhost"]);
    api.wait_for(&format!("/v1/boxes/{b}/events"), 20, |v| {
        v["items"]
            .as_array()
            .map(|a| a.iter().filter(|e| e["type"] == "egress").count())
            == Some(2)
    })
    .await;
    let metrics = String::from_utf8_lossy(&api.get("/metrics").await.bytes).into_owned();
    assert!(
        metrics.contains("berth_egress_requests_total{verdict=\"denied\"}"),
        "decisions are counted"
    );
    srv.stop().await;
}

/// An HTTPS server for `secret.test` (certificate from a test CA) that answers with the value
/// of the `x-api-token` header it received.
async fn tls_web(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    let (acceptor, ca_file) = common::tls_acceptor(dir, "secret.test");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let app = axum::Router::new().fallback(|h: axum::http::HeaderMap| async move {
        format!(
            "token={}",
            h.get("x-api-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
        )
    });
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ca_file)
}

#[tokio::test]
async fn secrets_are_added_by_the_proxy_and_never_enter_the_box() {
    let dir = tempfile::tempdir().expect("tmp");
    let (tls_port, ca_file) = tls_web(dir.path()).await;
    let overrides = format!("secret.test=127.0.0.1:{tls_port}");
    let data = dir.path().join("data");
    let ca = ca_file.to_string_lossy().into_owned();
    let srv = Server::start_with(
        &data,
        &[
            ("BERTH_EGRESS_OVERRIDES", &overrides),
            ("BERTH_EGRESS_CA_FILE", &ca),
        ],
    )
    .await;
    let api = srv.client();
    let value = "s3cret-token-value-0xdeadbeef";
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64}, "network": {"allow": ["secret.test"]},
                   "secrets": [{"host": "secret.test", "header": "x-api-token", "value": value}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert!(
        !r.json.to_string().contains(value),
        "the API never shows a secret's value"
    );
    assert_eq!(r.json["secrets"][0]["header"], "x-api-token");
    let bx = r.json["id"].as_str().expect("id").to_string();
    // The box asks over plain HTTP; the proxy adds the header and speaks TLS to the host.
    assert_eq!(
        sh(&api, &bx, "curl -s http://secret.test/").await,
        format!("token={value}")
    );
    // A header the box sends itself is replaced, not forwarded.
    assert_eq!(
        sh(
            &api,
            &bx,
            "curl -s -H 'x-api-token: forged' http://secret.test/"
        )
        .await,
        format!("token={value}")
    );
    let leak = sh(&api, &bx, &format!("env | grep -c '{value}'; grep -rl '{value}' /workspace /home /tmp /run /etc 2>/dev/null | wc -l")).await;
    assert_eq!(leak, "0\n0\n");
    assert!(!api
        .get(&format!("/v1/boxes/{bx}"))
        .await
        .json
        .to_string()
        .contains(value));
    // A secret for a host the box may not reach is refused.
    let r = api
        .post(
            "/v1/boxes",
            json!({"secrets": [{"host": "elsewhere.test", "header": "x", "value": "v"}]}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    let r = api
        .post("/v1/boxes", json!({"network": {"allow": ["secret.test"]}, "secrets": [{"host": "secret.test", "header": "x", "value": "a\r\nInjected: yes"}]}))
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    srv.stop().await;
}
