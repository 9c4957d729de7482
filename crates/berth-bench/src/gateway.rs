//! The model gateway against talking to the upstream directly, in the same run.

use crate::{ms, summarize};
use berth_gateway::{Gateway, GatewayConfig, TokenOwner};
use berth_mock_model::{scenario::Scenario, Mock};
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

async fn serve(router: axum::Router) -> anyhow::Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", l.local_addr()?);
    tokio::spawn(async move {
        let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let _ = axum::serve(l, router).await;
    });
    Ok(url)
}

fn register(gw: &Gateway) {
    gw.register(
        "tok",
        TokenOwner {
            session_id: "s".into(),
            box_id: "b".into(),
            tenant: "t".into(),
        },
        Default::default(),
        0.0,
    );
}

/// The server's ledger path: records in batches, one transaction per batch.
async fn write_ledger(
    store: berth_store::SqliteStore,
    mut meter: tokio::sync::mpsc::UnboundedReceiver<berth_gateway::UsageRecord>,
) {
    use berth_server::engine::ledger;
    let clock = berth_server::clock::Clock::System;
    let mut batch = Vec::new();
    let flush = tokio::sync::Notify::new();
    while ledger::next_batch(&mut meter, &mut batch, &flush).await {
        let _ = ledger::write_batch(&store, &clock, &batch).await;
        batch.clear();
    }
}

/// Requests per second of `total` small streamed requests, `concurrency` at a time.
async fn throughput(
    http: &reqwest::Client,
    url: &str,
    total: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": true,
        "messages": [{"role": "user", "content": "ping"}]});
    let t = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..total)
        .map(|_| {
            let body = body.clone();
            async move {
                let r = http
                    .post(format!("{url}/v1/messages"))
                    .header("x-api-key", "tok")
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "status {}", r.status());
                let mut s = r.bytes_stream();
                while let Some(c) = s.next().await {
                    c?;
                }
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

pub async fn run(requests: usize) -> anyhow::Result<()> {
    let big = "x".repeat(4 << 20);
    let scenario: Scenario = serde_json::from_value(json!({"rules": [
        {"match": "big", "steps": [{"text": big}]},
        {"steps": [{"text": "pong"}]}
    ]}))?;
    let mock = Mock::new(scenario, Duration::ZERO);
    let direct = berth_mock_model::spawn_loopback(&mock).await?;
    // The gateway as the server runs it: metering on, every record written to a SQLite
    // ledger by a writer task.
    let dir = tempfile::tempdir()?;
    let store = berth_store::SqliteStore::open(&dir.path().join("ledger.db")).await?;
    let (gw, meter) = Gateway::new(GatewayConfig {
        upstream: direct.clone(),
        api_key: Some("sk-real".into()),
        ..Default::default()
    })?;
    tokio::spawn(write_ledger(store, meter));
    register(&gw);
    let via = serve(gw.router_for_box("b")).await?;
    // The same gateway with metering (and so the ledger) off.
    let (gw_off, _unused) = Gateway::new(GatewayConfig {
        upstream: direct.clone(),
        api_key: Some("sk-real".into()),
        meter: false,
        ..Default::default()
    })?;
    register(&gw_off);
    let via_off = serve(gw_off.router_for_box("b")).await?;
    let http = reqwest::Client::new();
    let body = |text: &str| json!({"model": "claude-x", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": text}]});

    let mut rows = Vec::new();
    let mut cpu = Vec::new();
    for round in 0..2 {
        for (name, url, key) in [
            ("direct to the mock", &direct, "sk-real"),
            ("through the gateway", &via, "tok"),
        ] {
            let c0 = cpu_time();
            let mut ttfb = Vec::with_capacity(requests);
            for _ in 0..requests {
                let t = Instant::now();
                let r = http
                    .post(format!("{url}/v1/messages"))
                    .header("x-api-key", key)
                    .json(&body("ping"))
                    .send()
                    .await?;
                let mut s = r.bytes_stream();
                let first = s.next().await;
                ttfb.push(t.elapsed());
                anyhow::ensure!(matches!(first, Some(Ok(_))), "no first byte");
                while s.next().await.is_some() {}
            }
            let spent = cpu_time() - c0;
            if round == 1 {
                rows.push(summarize(&format!("time to first byte, {name}"), ttfb));
                cpu.push((name, spent));
            }
        }
    }
    crate::print_table("request", &rows);
    println!(
        "| added by the gateway (median) | | {} | |",
        ms(rows[1].median.saturating_sub(rows[0].median))
    );
    println!();
    // Throughput: a 4 MiB streamed answer, 20 times each way.
    println!("| streaming 4 MiB answers | MB/s | ratio to direct |");
    println!("| --- | ---: | ---: |");
    let mut rates = Vec::new();
    for (name, url, key) in [
        ("direct", &direct, "sk-real"),
        ("through the gateway", &via, "tok"),
    ] {
        let t = Instant::now();
        let mut bytes = 0usize;
        for _ in 0..20 {
            let r = http
                .post(format!("{url}/v1/messages"))
                .header("x-api-key", key)
                .json(&body("big please"))
                .send()
                .await?;
            let mut s = r.bytes_stream();
            while let Some(c) = s.next().await {
                bytes += c?.len();
            }
        }
        let rate = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
        rates.push(rate);
        println!("| {name} | {rate:.0} | {:.2} |", rate / rates[0]);
    }
    println!();
    // What metering costs: the same gateway with the ledger on and off, alternating rounds.
    let (mut on, mut off) = (Vec::new(), Vec::new());
    // Paired rounds, alternating which goes first (so neither always runs while the other's
    // leftovers, such as the ledger writer finishing a batch, still use the CPU); the ratio is
    // the median of the per-pair ratios, which cancels slow drifts of the machine.
    let n = requests;
    let mut ratios = Vec::new();
    for round in 0..21 {
        let (a, b) = if round % 2 == 0 {
            let a = throughput(&http, &via, n, 16).await?;
            (a, throughput(&http, &via_off, n, 16).await?)
        } else {
            let b = throughput(&http, &via_off, n, 16).await?;
            (throughput(&http, &via, n, 16).await?, b)
        };
        on.push(a);
        off.push(b);
        ratios.push(a / b);
    }
    on.sort_by(f64::total_cmp);
    off.sort_by(f64::total_cmp);
    ratios.sort_by(f64::total_cmp);
    let (on, off, ratio) = (on[10], off[10], ratios[10]);
    println!("| {n} small streamed requests, 16 at a time (medians of 21 paired rounds) | requests/s | ratio to ledger off |");
    println!("| --- | ---: | ---: |");
    println!("| gateway, ledger off (no metering) | {off:.0} | 1.00 |");
    println!("| gateway, ledger on (metered, rows in SQLite) | {on:.0} | {ratio:.3} |");
    println!();
    println!("| CPU for {requests} small streamed requests (whole process: client, mock, gateway) | CPU ms |");
    println!("| --- | ---: |");
    for (name, c) in &cpu {
        println!("| {name} | {:.0} |", c.as_secs_f64() * 1000.0);
    }
    println!(
        "| gateway's share per 1,000 requests | {:.0} |",
        (cpu[1].1.saturating_sub(cpu[0].1)).as_secs_f64() * 1000.0 * 1000.0 / requests as f64
    );
    Ok(())
}
