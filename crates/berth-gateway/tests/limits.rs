//! Budgets and rate limits, over real sockets against the mock model.

use berth_gateway::{Gateway, GatewayConfig, SessionLimits, TokenOwner};
use berth_mock_model::{scenario::Scenario, Mock};
use serde_json::{json, Value};

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

fn owner() -> TokenOwner {
    TokenOwner {
        session_id: "s1".into(),
        box_id: "b1".into(),
        tenant: "t".into(),
    }
}

async fn setup(
    limits: SessionLimits,
) -> (
    String,
    Mock,
    tokio::sync::mpsc::UnboundedReceiver<berth_gateway::UsageRecord>,
) {
    // Every answer costs exactly $5 (1M input tokens of an Opus-priced model).
    let sc: Scenario = serde_json::from_value(json!({"rules": [{"steps": [{"text": "ok", "usage": {"input_tokens": 1000000, "output_tokens": 0}}]}]})).expect("scenario");
    let mock = Mock::new(sc, std::time::Duration::ZERO);
    let upstream = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let (gw, meter) = Gateway::new(GatewayConfig {
        upstream,
        api_key: Some("sk-real".into()),
        warn_fraction: 0.5,
        ..Default::default()
    })
    .expect("gw");
    gw.register("tok", owner(), limits, 0.0);
    (serve(gw.router_for_box("b1")).await, mock, meter)
}

async fn call(url: &str, token: &str) -> (u16, Value, Option<String>) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", token)
        .json(&json!({"model": "claude-opus-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, r.json().await.unwrap_or(Value::Null), retry)
}

#[tokio::test]
async fn budget_stops_after_the_request_that_crossed_it() {
    let (url, mock, mut meter) = setup(SessionLimits {
        budget_usd: Some(7.0),
        requests_per_minute: None,
    })
    .await;
    assert_eq!(call(&url, "tok").await.0, 200);
    let first = meter.recv().await.expect("metered");
    assert!((first.cost_usd - 5.0).abs() < 1e-9);
    assert!(
        first.crossed.session_warning && !first.crossed.session_exhausted,
        "5 of 7 crossed the warning at half"
    );
    assert_eq!(
        call(&url, "tok").await.0,
        200,
        "still under budget when it started"
    );
    let second = meter.recv().await.expect("metered");
    assert!(
        second.crossed.session_exhausted && !second.crossed.session_warning,
        "this request crossed the budget; the warning was reported once"
    );
    let (status, body, _) = call(&url, "tok").await;
    assert_eq!(status, 400);
    assert_eq!(body["type"], "error");
    assert!(body["error"]["message"]
        .as_str()
        .expect("msg")
        .contains("budget"));
    assert_eq!(
        mock.recorded().len(),
        2,
        "overspend is at most the one crossing request"
    );
    assert!(mock.recorded().iter().all(|r| r.api_key_is("sk-real")));
    assert_eq!(call(&url, "wrong").await.0, 401);
}

#[tokio::test]
async fn requests_per_minute_answer_429() {
    let (url, mock, _meter) = setup(SessionLimits {
        budget_usd: None,
        requests_per_minute: Some(2),
    })
    .await;
    assert_eq!(call(&url, "tok").await.0, 200);
    assert_eq!(call(&url, "tok").await.0, 200);
    let (status, body, retry) = call(&url, "tok").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(retry
        .and_then(|r| r.parse::<u64>().ok())
        .is_some_and(|s| (1..=60).contains(&s)));
    assert_eq!(mock.recorded().len(), 2);
}

#[tokio::test]
async fn tenant_budget_spans_sessions() {
    let sc: Scenario = serde_json::from_value(json!({"rules": [{"steps": [{"text": "ok", "usage": {"input_tokens": 1000000, "output_tokens": 0}}]}]})).expect("scenario");
    let mock = Mock::new(sc, std::time::Duration::ZERO);
    let upstream = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let (gw, mut meter2) = Gateway::new(GatewayConfig {
        upstream,
        api_key: Some("sk-real".into()),
        warn_fraction: 0.5,
        ..Default::default()
    })
    .expect("gw");
    gw.set_tenant_budget("t", Some(8.0), 4.0);
    gw.register("tok", owner(), SessionLimits::default(), 0.0);
    gw.register(
        "tok2",
        TokenOwner {
            session_id: "s2".into(),
            ..owner()
        },
        SessionLimits::default(),
        0.0,
    );
    let url = serve(gw.router_for_box("b1")).await;
    assert_eq!(call(&url, "tok").await.0, 200, "4 of 8 spent before");
    let r = meter2.recv().await.expect("metered");
    assert!(
        r.crossed.tenant_exhausted && !r.crossed.session_exhausted,
        "9 of 8: the tenant crossed"
    );
    let (status, body, _) = call(&url, "tok2").await;
    assert_eq!(
        status, 400,
        "another session of the same tenant is refused too"
    );
    assert!(body["error"]["message"]
        .as_str()
        .expect("msg")
        .contains("monthly budget"));
    assert_eq!(mock.recorded().len(), 1);
    gw.set_tenant_budget("t", None, 0.0);
    assert_eq!(call(&url, "tok2").await.0, 200, "budget lifted");
    assert_eq!(berth_gateway::month_of(1_795_910_400), (2026, 11));
    assert_eq!(berth_gateway::month_of(1_709_164_800), (2024, 2));
    assert_eq!(berth_gateway::month_of(951_868_800), (2000, 3));
}

#[tokio::test]
async fn the_real_key_can_go_as_a_bearer_token() {
    let mock = Mock::new(Scenario::default(), std::time::Duration::ZERO);
    let upstream = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let (gw, _meter) = Gateway::new(GatewayConfig {
        upstream,
        api_key: Some("sk-real".into()),
        bearer: true,
        ..Default::default()
    })
    .expect("gw");
    gw.register("tok", owner(), SessionLimits::default(), 0.0);
    let url = serve(gw.router_for_box("b1")).await;
    assert_eq!(call(&url, "tok").await.0, 200);
    let seen = mock.recorded();
    assert!(seen[0].authorization_is("Bearer sk-real"));
    assert_eq!(seen[0].api_key, None, "the box's token is not passed on");
    assert_eq!(call(&url, "tok-from-another-box").await.0, 401);
}

#[tokio::test]
async fn with_metering_off_the_gateway_only_forwards() {
    let mock = Mock::new(Scenario::default(), std::time::Duration::ZERO);
    let upstream = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let (gw, mut meter) = Gateway::new(GatewayConfig {
        upstream,
        api_key: Some("sk-real".into()),
        meter: false,
        ..Default::default()
    })
    .expect("gw");
    gw.register("tok", owner(), SessionLimits::default(), 0.0);
    let url = serve(gw.router_for_box("b1")).await;
    assert_eq!(call(&url, "tok").await.0, 200);
    assert_eq!(mock.recorded().len(), 1);
    drop(gw);
    assert!(
        meter.try_recv().is_err(),
        "nothing is metered when metering is off"
    );
}
