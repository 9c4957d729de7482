//! Cost tracking and observability: the ledger against what the mock model really reported,
//! container time on a controllable clock, budgets, `/metrics`, readiness.

mod common;

use berth_mock_model::{scenario::Scenario, Mock};
use common::{claude_bin, Api, Server};
use serde_json::{json, Value};
use std::time::Duration;

async fn serve_mock(sc: Scenario) -> (String, Mock) {
    let mock = Mock::new(sc, Duration::ZERO);
    let url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    (url, mock)
}

/// Prices this test's server runs with: the override from its config file, else the built-in
/// table (USD per million tokens).
fn price(model: &str) -> (f64, f64) {
    if model.contains("claude-sonnet-4-5") {
        (2.0, 10.0)
    } else if model.contains("haiku") {
        (1.0, 5.0)
    } else if model.contains("sonnet") {
        (3.0, 15.0)
    } else {
        (5.0, 25.0)
    }
}

/// Tokens and cost of requests as the mock reported them: (requests, input, output,
/// cache write, cache read, usd).
#[derive(Debug, Default, PartialEq, Clone, Copy)]
struct Sum {
    requests: u64,
    input: u64,
    output: u64,
    cache_write: u64,
    cache_read: u64,
    usd: f64,
}

fn sum(reqs: &[berth_mock_model::Recorded]) -> Sum {
    let mut s = Sum::default();
    for r in reqs.iter().filter(|r| r.path.starts_with("/v1/messages")) {
        let n = |k: &str| r.usage[k].as_u64().unwrap_or(0);
        let (pi, po) = price(r.body["model"].as_str().unwrap_or(""));
        s.requests += 1;
        s.input += n("input_tokens");
        s.output += n("output_tokens");
        s.cache_write += n("cache_creation_input_tokens");
        s.cache_read += n("cache_read_input_tokens");
        s.usd += (n("input_tokens") as f64 * pi
            + n("output_tokens") as f64 * po
            + n("cache_creation_input_tokens") as f64 * pi * 1.25
            + n("cache_read_input_tokens") as f64 * pi * 0.1)
            / 1e6;
    }
    s
}

fn assert_totals(u: &Value, want: Sum, what: &str) {
    let n = |k: &str| u[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        (
            n("requests"),
            n("input_tokens"),
            n("output_tokens"),
            n("cache_creation_5m_tokens") + u["cache_creation_1h_tokens"].as_u64().unwrap_or(0),
            n("cache_read_tokens")
        ),
        (
            want.requests,
            want.input,
            want.output,
            want.cache_write,
            want.cache_read
        ),
        "{what}: {u}"
    );
    let usd = u["model_usd"].as_f64().expect("model_usd");
    assert!(
        (usd - want.usd).abs() < 1e-9,
        "{what}: {usd} != {}",
        want.usd
    );
}

/// The sum of a metric's samples whose labels include all of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// The real CLI against a mock with known usage, in two tenants: the ledger's totals by every
/// grouping equal what the mock reported; the agent's own figure is kept and, with a price
/// override the CLI does not know, flagged; a session budget warns, then stops the agent;
/// `/metrics` carries the same numbers.
#[tokio::test]
async fn the_ledger_matches_what_the_model_reported() {
    let sc: Scenario = serde_json::from_value(json!({"rules": [
        {"match": "spend", "steps": [
            {"tool_use": [{"name": "Bash", "input": {"command": "true", "description": "noop"}}],
             "usage": {"input_tokens": 100000, "output_tokens": 0}},
            {"text": "spent", "usage": {"input_tokens": 100000, "output_tokens": 0}}
        ]},
        {"steps": [{"text": "hello", "usage": {"input_tokens": 1200, "output_tokens": 300,
            "cache_creation_input_tokens": 800, "cache_read_input_tokens": 5000}}]}
    ]}))
    .expect("scenario");
    let (mock_url, mock) = serve_mock(sc).await;
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        "[cost]\nbudget_warn_fraction = 0.5\n[[cost.prices]]\nmodel = \"claude-sonnet-4-5\"\ninput = 2.0\noutput = 10.0\n",
    )
    .expect("config");
    let data = dir.path().join("data");
    let bin = claude_bin();
    let srv = Server::start_with(
        &data,
        &[
            ("BERTH_CONFIG", cfg.to_str().expect("utf-8")),
            ("BERTH_UPSTREAM_URL", &mock_url),
            ("ANTHROPIC_API_KEY", "sk-real"),
            ("BERTH_CLAUDE_BIN", &bin),
        ],
    )
    .await;
    let admin = srv.client();
    let key = |tenant: &'static str| {
        let admin = admin.clone();
        async move {
            let r = admin.post("/v1/keys", json!({"tenant": tenant})).await;
            assert_eq!(r.status, 201, "{}", r.json);
            Api::new(&admin.url, r.json["key"].as_str().expect("key"))
        }
    };
    let (alpha, beta) = (key("alpha").await, key("beta").await);
    let agent = json!({"kind": "claude", "model": "claude-sonnet-4-5"});
    let start = |api: Api, agent: Value, prompt: &'static str| async move {
        let r = api
            .post(
                "/v1/sessions",
                json!({"box": {"lifecycle": "persistent", "resources": {"memory_mib": 1024, "disk_mib": 256}},
                       "agent": agent, "prompt": prompt}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.json);
        (
            r.json["id"].as_str().expect("id").to_string(),
            r.json["box_id"].as_str().expect("box").to_string(),
        )
    };

    // Tenant alpha: one turn.
    let (s1, b1) = start(alpha.clone(), agent.clone(), "hello there").await;
    let evs = alpha.until(&s1, "result", 1).await;
    let reported = evs.last().expect("result")["data"]["total_cost_usd"]
        .as_f64()
        .expect("the CLI reports its cost");
    let n1 = mock.recorded().len();
    let want1 = sum(&mock.recorded()[..n1]);
    assert!(want1.requests >= 1);

    let u = alpha.get(&format!("/v1/sessions/{s1}/usage")).await;
    assert_eq!(u.status, 200, "{}", u.json);
    let t = &u.json["total"];
    assert_eq!(t["input_tokens"].as_u64(), Some(want1.input));
    assert!((t["cost_usd"].as_f64().expect("cost") - want1.usd).abs() < 1e-9);
    assert_eq!(u.json["agent_reported_usd"].as_f64(), Some(reported));
    assert_eq!(
        u.json["cost_gap"], true,
        "the CLI prices sonnet at 3/15, this server at 2/10: {}",
        u.json
    );
    assert_eq!(
        u.json["container_hours"].as_f64(),
        Some(0.0),
        "a persistent box's time is not the session's"
    );

    // Tenant beta: a $0.30 budget, warned at half; each request costs $0.20.
    let (s2, b2) = start(
        beta.clone(),
        json!({"kind": "claude", "model": "claude-sonnet-4-5", "max_budget_usd": 0.3}),
        "spend it",
    )
    .await;
    let evs = beta.until(&s2, "budget_exhausted", 1).await;
    let kinds: Vec<&str> = evs.iter().filter_map(|e| e["type"].as_str()).collect();
    let warn = kinds.iter().position(|k| *k == "budget_warning");
    let stop = kinds.iter().position(|k| *k == "budget_exhausted");
    assert!(
        warn.is_some_and(|w| Some(w) < stop),
        "a warning before the stop: {kinds:?}"
    );
    beta.until(&s2, "result", 1).await;
    let n2 = mock.recorded().len();
    assert_eq!(n2 - n1, 2, "two requests of $0.20 each");
    // The budget is spent: the next turn never reaches the model.
    let r = beta
        .post(
            &format!("/v1/sessions/{s2}/messages"),
            json!({"content": "hello again"}),
        )
        .await;
    assert_eq!(r.status, 202);
    beta.until(&s2, "result", 2).await;
    assert_eq!(
        mock.recorded().len(),
        n2,
        "refused by the gateway, not forwarded"
    );
    let want2 = sum(&mock.recorded()[n1..n2]);
    let all = sum(&mock.recorded());

    // Every grouping, as admin.
    let report = |q: &'static str| {
        let admin = admin.clone();
        async move {
            let r = admin.get(&format!("/v1/usage?{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.json);
            r.json
        }
    };
    let group = |rep: &Value, key: &str| -> Value {
        rep["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .find(|g| g["key"] == key)
            .map(|g| g["usage"].clone())
            .unwrap_or(Value::Null)
    };
    let by_tenant = report("group_by=tenant").await;
    assert_totals(&group(&by_tenant, "alpha"), want1, "tenant alpha");
    assert_totals(&group(&by_tenant, "beta"), want2, "tenant beta");
    assert_totals(&by_tenant["total"], all, "total");
    let by_session = report("group_by=session").await;
    assert_totals(&group(&by_session, &s1), want1, "session 1");
    assert_totals(&group(&by_session, &s2), want2, "session 2");
    let by_box = report("group_by=box").await;
    assert_totals(&group(&by_box, &b1), want1, "box 1");
    assert_totals(&group(&by_box, &b2), want2, "box 2");
    for b in [&b1, &b2] {
        let g = group(&by_box, b);
        let (h, usd) = (
            g["container_hours"].as_f64().expect("hours"),
            g["container_usd"].as_f64().expect("usd"),
        );
        assert!(h > 0.0, "box {b} is running: {g}");
        assert!((usd - h * 0.05).abs() < 1e-12, "$0.05 per box-hour: {g}");
    }
    let by_model = report("group_by=model").await;
    let models: std::collections::BTreeSet<String> = mock
        .recorded()
        .iter()
        .filter_map(|r| r.body["model"].as_str().map(str::to_string))
        .collect();
    for m in &models {
        let want = sum(&mock
            .recorded()
            .into_iter()
            .filter(|r| r.body["model"].as_str() == Some(m.as_str()))
            .collect::<Vec<_>>());
        assert_totals(&group(&by_model, m), want, m);
    }
    // A window before anything happened holds nothing; bad times are refused.
    let empty = report("group_by=tenant&to=2020-01-01T00:00:00Z").await;
    assert_eq!(empty["groups"].as_array().map(Vec::len), Some(0), "{empty}");
    assert_eq!(admin.get("/v1/usage?from=yesterday").await.status, 400);
    assert_eq!(admin.get("/v1/usage?group_by=planet").await.status, 400);
    // A tenant sees only itself.
    let own = alpha.get("/v1/usage?group_by=tenant").await;
    assert_eq!(own.json["groups"].as_array().map(Vec::len), Some(1));
    assert_totals(&own.json["total"], want1, "alpha's own view");
    assert_eq!(alpha.get("/v1/usage?tenant=beta").await.status, 403);

    // The same figures in /metrics.
    let text = String::from_utf8_lossy(&admin.get("/metrics").await.bytes).into_owned();
    let family = "claude-sonnet-4-5";
    let sonnet = sum(&mock
        .recorded()
        .into_iter()
        .filter(|r| r.body["model"].as_str().is_some_and(|m| m.contains(family)))
        .collect::<Vec<_>>());
    assert_eq!(
        metric(
            &text,
            "berth_gateway_tokens_total",
            &[("model", family), ("kind", "input")]
        ),
        sonnet.input as f64,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "berth_gateway_requests_total",
            &[("model", family), ("status", "2xx")]
        ),
        sonnet.requests as f64
    );
    let micro = metric(&text, "berth_cost_microusd_total", &[("tenant", "beta")]);
    assert!(
        (micro - want2.usd * 1e6).abs() <= want2.requests as f64,
        "{micro}"
    );
    assert_eq!(metric(&text, "berth_boxes", &[("state", "running")]), 2.0);
    assert!(metric(&text, "berth_box_start_seconds_count", &[]) >= 2.0);
    assert!(metric(&text, "berth_event_delivery_lag_seconds_count", &[]) >= 1.0);
    assert!(
        metric(
            &text,
            "berth_store_op_seconds_count",
            &[("op", "append_events")]
        ) >= 1.0
    );
    assert_eq!(
        metric(&text, "berth_gateway_request_duration_seconds_count", &[]),
        all.requests as f64
    );
    srv.stop().await;
}

/// Readiness follows the store and the upstream: a store another process holds locked, or an
/// upstream that refuses connections, makes the server not ready, and it recovers.
#[tokio::test]
async fn readiness_fails_when_the_store_or_upstream_is_unavailable() {
    let (mock_url, _mock) = serve_mock(Scenario::default()).await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_UPSTREAM_URL", &mock_url)]).await;
    let api = srv.client();
    assert_eq!(api.get("/readyz").await.status, 200);

    // Another process takes the database's write lock and holds it until its stdin closes.
    let db = dir.path().join("berth.db");
    let mut locker = tokio::process::Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys\nc=sqlite3.connect(sys.argv[1],isolation_level=None,timeout=30)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked',flush=True)\nsys.stdin.read()")
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut out = tokio::io::BufReader::new(locker.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .expect("read");
    assert_eq!(line.trim(), "locked");
    let r = api.get("/readyz").await;
    assert_eq!(r.status, 503, "{}", r.json);
    let why = r.json["error"]["message"].as_str().unwrap_or("");
    assert!(why.contains("store") && !why.contains("upstream"), "{why}");
    assert_eq!(api.get("/healthz").await.status, 200, "alive all the same");
    drop(locker.stdin.take());
    locker.wait().await.expect("wait");
    assert_eq!(api.get("/readyz").await.status, 200);
    srv.stop().await;

    // An upstream nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("http://127.0.0.1:{port}");
    let srv = Server::start_with(dir.path(), &[("BERTH_UPSTREAM_URL", &url)]).await;
    let r = srv.client().get("/readyz").await;
    assert_eq!(r.status, 503);
    let why = r.json["error"]["message"].as_str().unwrap_or("");
    assert!(
        why.contains("upstream") && why.contains(&port.to_string()),
        "{why}"
    );
    srv.stop().await;
}

/// Container time on a clock the test moves: exactly the span a box ran, priced per box-hour,
/// nothing while stopped, clipped to the report's window.
#[tokio::test]
async fn container_time_counts_exactly_while_a_box_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let t0: i64 = 1_795_953_600_000; // 2026-11-29T12:00:00Z
    let clock = berth_server::clock::Clock::manual(t0);
    let mut cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    cfg.cost.box_hour_usd = 0.05;
    cfg.cost.box_hour_scale = berth_server::config::BoxHourScale::Resources;
    let helper =
        berth_sandbox::native::helper_beside(std::path::Path::new(env!("CARGO_BIN_EXE_berth")));
    let rt = berth_server::Runtime {
        helper,
        clock: clock.clone(),
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(berth_server::run(
        cfg,
        rt,
        move |s| {
            let key = std::fs::read_to_string(&s.admin_key_file).unwrap_or_default();
            let _ = ready_tx.send((s.addr, key.trim().to_string()));
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let (addr, key) = ready_rx.await.expect("server up");
    let api = Api::new(&format!("http://{addr}"), &key);
    // 2 CPUs, 1 GiB: twice the reference box, so $0.10 per hour.
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"cpus": 2, "memory_mib": 1024, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let id = r.json["id"].as_str().expect("id").to_string();
    let mut state = r.json["state"].clone();
    while state != "running" {
        assert_eq!(state, "creating");
        tokio::time::sleep(Duration::from_millis(10)).await;
        state = api.get(&format!("/v1/boxes/{id}")).await.json["state"].clone();
    }
    let hours = |api: Api, q: String| async move {
        let r = api.get(&format!("/v1/usage?group_by=box{q}")).await;
        assert_eq!(r.status, 200, "{}", r.json);
        let g = r.json["groups"]
            .as_array()
            .and_then(|g| g.first().cloned())
            .unwrap_or(Value::Null);
        (
            g["usage"]["container_hours"].as_f64().unwrap_or(-1.0),
            g["usage"]["container_usd"].as_f64().unwrap_or(-1.0),
        )
    };
    clock.advance(Duration::from_secs(90 * 60));
    let (h, usd) = hours(api.clone(), String::new()).await;
    assert!((h - 1.5).abs() < 1e-12 && (usd - 0.15).abs() < 1e-12);
    let d = api.delete(&format!("/v1/boxes/{id}")).await;
    assert_eq!(d.json["state"], "destroyed");
    clock.advance(Duration::from_secs(3600));
    let (h, usd) = hours(api.clone(), String::new()).await;
    assert!(
        (h - 1.5).abs() < 1e-12 && (usd - 0.15).abs() < 1e-12,
        "a destroyed box costs nothing more: {h} {usd}"
    );
    // A window from 30 minutes after the start sees one hour of it.
    let from = berth_server::clock::rfc3339_ms(t0 + 30 * 60 * 1000);
    let (h, _) = hours(api.clone(), format!("&from={from}")).await;
    assert!((h - 1.0).abs() < 1e-12, "{h}");
    let _ = stop_tx.send(());
    server.await.expect("join").expect("server ran");
}
