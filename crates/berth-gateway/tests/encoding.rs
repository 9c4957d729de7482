//! A box cannot hide usage from the meter by asking for a compressed answer: the gateway asks
//! the upstream for `identity`, and refuses an answer that comes back encoded anyway.

use berth_gateway::{Gateway, GatewayConfig, SessionLimits, TokenOwner, UsageRecord};
use berth_mock_model::{scenario::Scenario, Mock};
use serde_json::{json, Value};
use std::time::Duration;

async fn serve(router: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    url
}

async fn gateway(upstream: String) -> (String, tokio::sync::mpsc::UnboundedReceiver<UsageRecord>) {
    let (gw, meter) = Gateway::new(GatewayConfig {
        upstream,
        api_key: Some("sk-real".into()),
        ..Default::default()
    })
    .expect("gw");
    gw.register(
        "tok",
        TokenOwner {
            session_id: "s1".into(),
            box_id: "b1".into(),
            tenant: "t".into(),
        },
        SessionLimits::default(),
        0.0,
    );
    (serve(gw.router_for_box("b1")).await, meter)
}

/// A request as a box would send it, asking for gzip; returns status, content-encoding, body.
async fn call_gzip(url: &str, stream: bool) -> (u16, Option<String>, bytes::Bytes) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", "tok")
        .header("accept-encoding", "gzip, br, zstd")
        .json(
            &json!({"model": "claude-opus-4-5", "max_tokens": 5, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let enc = r
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, enc, r.bytes().await.expect("body"))
}

async fn next_record(meter: &mut tokio::sync::mpsc::UnboundedReceiver<UsageRecord>) -> UsageRecord {
    tokio::time::timeout(Duration::from_secs(10), meter.recv())
        .await
        .expect("a usage record within 10 s")
        .expect("meter open")
}

#[tokio::test]
async fn asking_for_gzip_still_gets_metered_plain_bytes() {
    // Every answer costs exactly $5 (1M input tokens of an Opus-priced model).
    let sc: Scenario = serde_json::from_value(json!({"rules": [{"steps": [{"text": "ok",
        "usage": {"input_tokens": 1000000, "output_tokens": 0}}]}]}))
    .expect("scenario");
    let mock = Mock::new(sc, Duration::ZERO);
    let upstream = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    // The mock does honour gzip when asked directly (so the gateway's request is what matters).
    let (_, direct_enc, _) = {
        let r = reqwest::Client::new()
            .post(format!("{upstream}/v1/messages"))
            .header("x-api-key", "k")
            .header("accept-encoding", "gzip")
            .json(&json!({"model": "claude-opus-4-5", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("send");
        let enc = r
            .headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (r.status().as_u16(), enc, ())
    };
    assert_eq!(direct_enc.as_deref(), Some("gzip"));
    let (url, mut meter) = gateway(upstream).await;
    for stream in [false, true] {
        let (status, enc, body) = call_gzip(&url, stream).await;
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(enc, None, "the box gets plain bytes");
        assert!(
            String::from_utf8_lossy(&body).contains("input_tokens"),
            "{body:?}"
        );
        let rec = next_record(&mut meter).await;
        assert_eq!(rec.usage.input_tokens, 1_000_000, "stream={stream}");
        assert!(
            (rec.cost_usd - 5.0).abs() < 1e-9,
            "stream={stream}: {rec:?}"
        );
    }
}

#[tokio::test]
async fn an_upstream_that_compresses_anyway_is_refused_and_reported() {
    // An upstream that ignores `accept-encoding: identity` and always answers gzip.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    let upstream = serve(axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(move |h: axum::http::HeaderMap| {
            let seen = seen2.clone();
            async move {
                if let Ok(mut s) = seen.lock() {
                    s.extend(
                        h.get_all("accept-encoding")
                            .iter()
                            .filter_map(|v| v.to_str().ok().map(str::to_string)),
                    );
                }
                (
                    [
                        ("content-type", "application/json"),
                        ("content-encoding", "gzip"),
                    ],
                    // Not plain JSON: whatever it is, the meter cannot read it.
                    vec![0x1fu8, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3],
                )
            }
        }),
    ))
    .await;
    let (url, mut meter) = gateway(upstream).await;
    let (status, enc, body) = call_gzip(&url, false).await;
    assert_eq!(status, 502, "{body:?}");
    assert_eq!(enc, None);
    let v: Value = serde_json::from_slice(&body).expect("json error");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "api_error");
    let rec = next_record(&mut meter).await;
    assert_eq!(rec.status, 502, "the refusal shows in the ledger");
    assert_eq!(
        seen.lock().map(|s| s.clone()).unwrap_or_default(),
        vec!["identity".to_string()],
        "the box's accept-encoding never reached the upstream"
    );
}
