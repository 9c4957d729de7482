//! Observability: the Prometheus recorder, the metrics the ledger writer and the box sampler
//! feed, and the gauges computed when `/metrics` is scraped.
//!
//! Label cardinality is bounded on purpose: model ids come from inside boxes, so they are
//! reduced to the price table's families (`opus`, `sonnet`, `haiku`, configured overrides or
//! `other`); per-box figures are histograms over boxes, never a label per box id; tenants are
//! created by admins only.

use crate::engine::Engine;
use berth_api::{BoxState, SessionState};
use metrics_exporter_prometheus::{Matcher, PrometheusHandle};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Latency buckets in seconds, 0.5 ms to 60 s.
const SECONDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Box memory in bytes, 16 MiB to 16 GiB.
const BYTES: [f64; 11] = [
    16e6, 32e6, 64e6, 128e6, 256e6, 512e6, 1e9, 2e9, 4e9, 8e9, 16e9,
];
/// CPU in cores used over a sampling interval.
const CORES: [f64; 10] = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 4.0, 8.0];

/// How often live boxes' cgroup figures are sampled into the per-box histograms.
pub const BOX_SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// The process-wide Prometheus recorder (a second server in one process shares it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            let builder = builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &BYTES))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_cores".into()), &CORES))
                .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Gateway figures of one metered request.
pub fn gateway_request(model_family: &str, r: &berth_gateway::UsageRecord) {
    let model = model_family.to_string();
    let status = match r.status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("berth_gateway_requests_total", "model" => model.clone(), "status" => status)
        .increment(1);
    if r.status >= 400 {
        metrics::counter!("berth_gateway_errors_total", "model" => model.clone()).increment(1);
    }
    metrics::histogram!("berth_gateway_request_duration_seconds", "model" => model.clone())
        .record(r.duration.as_secs_f64());
    let u = &r.usage;
    for (kind, n) in [
        ("input", u.input_tokens),
        ("output", u.output_tokens),
        (
            "cache_write",
            u.cache_creation_5m_tokens + u.cache_creation_1h_tokens,
        ),
        ("cache_read", u.cache_read_tokens),
    ] {
        metrics::counter!("berth_gateway_tokens_total", "model" => model.clone(), "kind" => kind)
            .increment(n);
    }
    // Counters are integers: USD is counted in micro-dollars.
    metrics::counter!("berth_cost_microusd_total", "tenant" => r.owner.tenant.clone(), "model" => model)
        .increment((r.cost_usd * 1e6).round() as u64);
}

/// Gauges of live boxes and sessions by state, set when `/metrics` is scraped.
pub fn state_gauges(engine: &Engine) {
    let mut boxes: HashMap<&'static str, u64> = [
        BoxState::Creating,
        BoxState::Running,
        BoxState::Parking,
        BoxState::Parked,
        BoxState::Restoring,
        BoxState::Stopped,
        BoxState::Failed,
    ]
    .iter()
    .map(|s| (s.as_str(), 0))
    .collect();
    for (_, _, s) in engine.live_boxes() {
        *boxes.entry(s.as_str()).or_default() += 1;
    }
    for (state, n) in boxes {
        metrics::gauge!("berth_boxes", "state" => state).set(n as f64);
    }
    let mut sessions: HashMap<&'static str, u64> = [
        SessionState::Starting,
        SessionState::Running,
        SessionState::Idle,
    ]
    .iter()
    .map(|s| (s.as_str(), 0))
    .collect();
    for s in engine.live_session_states() {
        *sessions.entry(s.as_str()).or_default() += 1;
    }
    for (state, n) in sessions {
        metrics::gauge!("berth_sessions", "state" => state).set(n as f64);
    }
}

/// Sample every running box's cgroup figures into histograms over boxes (memory in bytes,
/// CPU in cores used since the previous sample), plus totals.
pub async fn sample_boxes(engine: Arc<Engine>) {
    let mut last_cpu: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(BOX_SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let mut seen = HashMap::new();
        let (mut mem_total, mut cores_total) = (0u64, 0f64);
        for (id, backend, state) in engine.live_boxes() {
            if state != BoxState::Running {
                continue;
            }
            let Some(st) = engine.sample_box(&id, &backend).await else {
                continue;
            };
            metrics::histogram!("berth_box_memory_bytes").record(st.memory_bytes as f64);
            mem_total += st.memory_bytes;
            if let Some(prev) = last_cpu.get(&id) {
                let cores = st.cpu_usage_ns.saturating_sub(*prev) as f64
                    / BOX_SAMPLE_INTERVAL.as_nanos() as f64;
                metrics::histogram!("berth_box_cpu_cores").record(cores);
                cores_total += cores;
            }
            seen.insert(id, st.cpu_usage_ns);
        }
        last_cpu = seen;
        metrics::gauge!("berth_boxes_memory_bytes").set(mem_total as f64);
        metrics::gauge!("berth_boxes_cpu_cores").set(cores_total);
    }
}
