//! The ledger: model usage (one row per request the gateway metered, priced when recorded) and
//! container time (one span per stretch a box ran), summed and priced for the usage API.
//!
//! Container time counts only while a box is `running`: spans open when a box reaches
//! `running` and close when it leaves it (stopped, failed, destroyed, parked). A heartbeat
//! marks open spans as still running, so after a crash the open spans are closed where the
//! server last saw them, not charged until the restart.

use super::Engine;
use crate::engine::error::EngineError;
use berth_api::{
    BoxObject, Lifecycle, ModelUsage, SessionUsage, UsageGroup, UsageGroupBy, UsageReport,
    UsageTotals,
};
use berth_store::{BoxSpan, UsageFilter, UsageKey, UsageSum};
use std::collections::BTreeMap;

/// How container time is priced, and when the agent's cost and the gateway's disagree.
#[derive(Debug, Clone, PartialEq)]
pub struct CostConfig {
    /// USD per box-hour for the reference box (1 CPU, 1 GiB).
    pub box_hour_usd: f64,
    /// Scale a box's price by the larger of cpus / 1 and memory_mib / 1024.
    pub scale_by_resources: bool,
    /// Fraction of difference between agent-reported and metered cost that is flagged.
    pub gap_fraction: f64,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            box_hour_usd: 0.05,
            scale_by_resources: false,
            gap_fraction: 0.05,
        }
    }
}

const MS_PER_HOUR: f64 = 3_600_000.0;

/// Group commit: after the first record of a batch, wait this long for more (cut short when a
/// reader asks for the ledger to be current, see [`Engine::ledger_sync`]).
pub const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);
/// Most records written in one transaction.
pub const BATCH_MAX: usize = 1024;

/// The next batch of metered records into `buf`: waits for one, then until [`BATCH_WINDOW`]
/// has passed or `flush` is notified, and takes what queued meanwhile (at most
/// [`BATCH_MAX`]). False once the gateway is gone.
pub async fn next_batch(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<berth_gateway::UsageRecord>,
    buf: &mut Vec<berth_gateway::UsageRecord>,
    flush: &tokio::sync::Notify,
) -> bool {
    if !first_records(rx, buf).await {
        return false;
    }
    fill_window(rx, buf, flush).await;
    true
}

/// Wait for the records that open a batch (false: the sender is gone).
pub async fn first_records(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<berth_gateway::UsageRecord>,
    buf: &mut Vec<berth_gateway::UsageRecord>,
) -> bool {
    rx.recv_many(buf, BATCH_MAX).await != 0
}

/// Not woken per record: sleep out the window (or until a flush is asked), then take what has
/// queued.
pub async fn fill_window(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<berth_gateway::UsageRecord>,
    buf: &mut Vec<berth_gateway::UsageRecord>,
    flush: &tokio::sync::Notify,
) {
    tokio::select! {
        _ = tokio::time::sleep(BATCH_WINDOW) => {}
        _ = flush.notified() => {}
    }
    while buf.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(r) => buf.push(r),
            Err(_) => break,
        }
    }
}

/// Store a batch of metered records as usage rows in one transaction, stamped now.
pub async fn write_batch(
    store: &dyn berth_store::Store,
    clock: &crate::clock::Clock,
    batch: &[berth_gateway::UsageRecord],
) -> Result<(), berth_store::StoreError> {
    let now = clock.now_ms();
    let rows: Vec<_> = batch.iter().map(|r| usage_row(r, now)).collect();
    store.record_usage(&rows).await
}

impl CostConfig {
    fn hour_usd(&self, span: &BoxSpan) -> f64 {
        if self.scale_by_resources {
            let scale = (span.cpus / 1.0).max(span.memory_mib as f64 / 1024.0);
            self.box_hour_usd * scale
        } else {
            self.box_hour_usd
        }
    }

    /// Hours and USD of `span` inside `[from, to)`; an open span runs until `now`.
    pub fn span_cost(
        &self,
        span: &BoxSpan,
        from: Option<i64>,
        to: Option<i64>,
        now: i64,
    ) -> (f64, f64) {
        let start = span.start_ms.max(from.unwrap_or(i64::MIN));
        let end = span.end_ms.unwrap_or(now).min(to.unwrap_or(i64::MAX));
        let hours = (end - start).max(0) as f64 / MS_PER_HOUR;
        (hours, hours * self.hour_usd(span))
    }

    /// Whether the agent's own figure and the metered one differ enough to flag.
    pub fn gap(&self, agent_usd: f64, metered_usd: f64) -> bool {
        let diff = (agent_usd - metered_usd).abs();
        diff > 0.0001_f64.max(self.gap_fraction * agent_usd.max(metered_usd))
    }
}

/// The report's group for `key`, made empty on first use.
fn group<'a>(groups: &'a mut BTreeMap<String, UsageGroup>, key: &str) -> &'a mut UsageGroup {
    groups.entry(key.to_string()).or_insert_with(|| UsageGroup {
        key: key.to_string(),
        usage: UsageTotals::default(),
        by_model: vec![],
    })
}

fn model_usage(s: &UsageSum) -> ModelUsage {
    ModelUsage {
        model: s.model.clone(),
        cost_usd: s.cost_usd,
        input_tokens: s.input_tokens,
        output_tokens: s.output_tokens,
        cache_creation_5m_tokens: s.cache_creation_5m_tokens,
        cache_creation_1h_tokens: s.cache_creation_1h_tokens,
        cache_read_tokens: s.cache_read_tokens,
    }
}

fn add_model(t: &mut UsageTotals, s: &UsageSum) {
    t.requests += s.requests;
    t.input_tokens += s.input_tokens;
    t.output_tokens += s.output_tokens;
    t.cache_creation_5m_tokens += s.cache_creation_5m_tokens;
    t.cache_creation_1h_tokens += s.cache_creation_1h_tokens;
    t.cache_read_tokens += s.cache_read_tokens;
    t.model_usd += s.cost_usd;
    t.total_usd += s.cost_usd;
}

fn add_container(t: &mut UsageTotals, hours: f64, usd: f64) {
    t.container_hours += hours;
    t.container_usd += usd;
    t.total_usd += usd;
}

/// The ledger row of one metered request, stamped `ts_ms`.
pub fn usage_row(r: &berth_gateway::UsageRecord, ts_ms: i64) -> berth_store::UsageRow {
    berth_store::UsageRow {
        ts: crate::clock::rfc3339_ms(ts_ms),
        ts_ms,
        tenant: r.owner.tenant.clone(),
        box_id: r.owner.box_id.clone(),
        session_id: r.owner.session_id.clone(),
        model: r.model.clone(),
        status: r.status,
        input_tokens: r.usage.input_tokens,
        output_tokens: r.usage.output_tokens,
        cache_creation_5m_tokens: r.usage.cache_creation_5m_tokens,
        cache_creation_1h_tokens: r.usage.cache_creation_1h_tokens,
        cache_read_tokens: r.usage.cache_read_tokens,
        cost_usd: r.cost_usd,
    }
}

impl Engine {
    /// Wait (at most 5 s) until every usage record metered before this call is in the store:
    /// usage read after a response has ended includes that response.
    pub async fn ledger_sync(&self) {
        let target = self.gateway.metered_count();
        let mut rx = self.ledger_written.subscribe();
        if *rx.borrow() < target {
            self.ledger_flush.notify_one();
        }
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rx.wait_for(|n| *n >= target),
        )
        .await;
    }

    /// Model cost a tenant has been metered since the start of this calendar month (UTC).
    /// (Monthly budgets are about tokens, which the gateway can refuse; container time is not
    /// counted against them.)
    pub async fn tenant_month_spent(&self, tenant: &str) -> Result<f64, EngineError> {
        let sums = self
            .store
            .usage_sums(
                UsageKey::Tenant,
                &UsageFilter {
                    tenant: Some(tenant.to_string()),
                    from_ms: Some(berth_api::calendar::month_start_ms(
                        self.config.clock.now_ms(),
                    )),
                    ..Default::default()
                },
            )
            .await?;
        Ok(sums.iter().map(|s| s.cost_usd).sum())
    }

    pub async fn session_usage(&self, tenant: &str, id: &str) -> Result<SessionUsage, EngineError> {
        let session = self.get_session(tenant, id).await?;
        self.ledger_sync().await;
        let sums = self
            .store
            .usage_sums(
                UsageKey::Model,
                &UsageFilter {
                    session_id: Some(id.to_string()),
                    ..Default::default()
                },
            )
            .await?;
        let mut t = UsageTotals::default();
        let by_model: Vec<ModelUsage> = sums
            .iter()
            .map(|s| {
                add_model(&mut t, s);
                model_usage(s)
            })
            .collect();
        // An ephemeral box is its session's alone: its running time is the session's.
        let ephemeral = self
            .store
            .get_box(Some(tenant), &session.box_id)
            .await?
            .is_some_and(|b| b.lifecycle == Lifecycle::Ephemeral);
        if ephemeral {
            let now = self.config.clock.now_ms();
            for span in self
                .store
                .box_spans(Some(tenant), Some(&session.box_id), None, None)
                .await?
            {
                let (h, usd) = self.config.cost.span_cost(&span, None, None, now);
                add_container(&mut t, h, usd);
            }
        }
        let agent = session.agent_cost_usd;
        Ok(SessionUsage {
            session_id: id.to_string(),
            by_model,
            total: ModelUsage {
                model: "*".into(),
                cost_usd: t.model_usd,
                input_tokens: t.input_tokens,
                output_tokens: t.output_tokens,
                cache_creation_5m_tokens: t.cache_creation_5m_tokens,
                cache_creation_1h_tokens: t.cache_creation_1h_tokens,
                cache_read_tokens: t.cache_read_tokens,
            },
            container_hours: t.container_hours,
            container_usd: t.container_usd,
            total_usd: t.total_usd,
            agent_reported_usd: agent,
            cost_gap: agent.is_some_and(|a| self.config.cost.gap(a, t.model_usd)),
        })
    }

    /// Usage within `[from, to)` (Unix ms) of one tenant (`scope`) or of all, grouped.
    pub async fn usage_report(
        &self,
        scope: Option<&str>,
        group_by: UsageGroupBy,
        from: Option<i64>,
        to: Option<i64>,
    ) -> Result<UsageReport, EngineError> {
        self.ledger_sync().await;
        let key = match group_by {
            UsageGroupBy::Session => UsageKey::Session,
            UsageGroupBy::Box => UsageKey::Box,
            UsageGroupBy::Tenant => UsageKey::Tenant,
            UsageGroupBy::Model => UsageKey::Model,
        };
        let filter = UsageFilter {
            tenant: scope.map(str::to_string),
            session_id: None,
            from_ms: from,
            to_ms: to,
        };
        let mut groups: BTreeMap<String, UsageGroup> = BTreeMap::new();
        let mut total = UsageTotals::default();
        for s in self.store.usage_sums(key, &filter).await? {
            let g = group(&mut groups, &s.key);
            add_model(&mut g.usage, &s);
            g.by_model.push(model_usage(&s));
            add_model(&mut total, &s);
        }
        let now = self.config.clock.now_ms();
        for span in self.store.box_spans(scope, None, from, to).await? {
            let (h, usd) = self.config.cost.span_cost(&span, from, to, now);
            add_container(&mut total, h, usd);
            let k = match group_by {
                UsageGroupBy::Box => &span.box_id,
                UsageGroupBy::Tenant => &span.tenant,
                UsageGroupBy::Session | UsageGroupBy::Model => continue,
            };
            add_container(&mut group(&mut groups, k).usage, h, usd);
        }
        Ok(UsageReport {
            group_by,
            from: from.map(crate::clock::rfc3339_ms),
            to: to.map(crate::clock::rfc3339_ms),
            groups: groups.into_values().collect(),
            total,
        })
    }
}

/// What the ledger writer uses: the store and clock it writes with, the flush requests and
/// written count it shares with readers (`Engine::ledger_sync`), the registry (budget notices
/// go to live sessions' owners) and the gateway (price families, for metrics).
pub struct LedgerDeps {
    pub store: std::sync::Arc<dyn berth_store::Store>,
    pub clock: crate::clock::Clock,
    pub flush: std::sync::Arc<tokio::sync::Notify>,
    pub written: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    pub registry: std::sync::Arc<super::registry::Registry>,
    pub gateway: std::sync::Arc<berth_gateway::Gateway>,
}

/// The ledger writer: every metered request becomes a usage row (rows that arrive together are
/// written in one transaction); budget thresholds a request crossed become events.
pub async fn writer(
    deps: LedgerDeps,
    mut metered: tokio::sync::mpsc::UnboundedReceiver<berth_gateway::UsageRecord>,
) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    let mut written = 0u64;
    while first_records(&mut metered, &mut batch).await {
        // Budget notices go out as the records arrive, not after the group-commit window: the
        // turn that spent a budget may end within it, and its end must not overtake the notice
        // in the session's log (the Managed Agents API reads `budget_reached` from that order).
        for r in &batch {
            deps.notify_budget(r).await;
        }
        let notified = batch.len();
        fill_window(&mut metered, &mut batch, &deps.flush).await;
        for r in &batch[notified..] {
            deps.notify_budget(r).await;
        }
        for r in &batch {
            crate::observe::gateway_request(deps.gateway.prices().family(&r.model), r);
        }
        if let Err(e) = write_batch(&*deps.store, &deps.clock, &batch).await {
            tracing::error!(error = %e, rows = batch.len(), "recording usage");
        }
        written += batch.len() as u64;
        deps.written.send_replace(written);
        batch.clear();
    }
}

impl LedgerDeps {
    async fn notify_budget(&self, r: &berth_gateway::UsageRecord) {
        let c = r.crossed;
        use berth_api::EventKind;
        let notices = [
            (c.session_warning, EventKind::BudgetWarning, "session"),
            (c.session_exhausted, EventKind::BudgetExhausted, "session"),
            (c.tenant_warning, EventKind::BudgetWarning, "tenant"),
            (
                c.tenant_exhausted,
                EventKind::TenantBudgetExhausted,
                "tenant",
            ),
        ];
        for (crossed, kind, scope) in notices {
            if !crossed {
                continue;
            }
            let message = match kind {
                EventKind::BudgetWarning => format!("the {scope}'s budget is nearly spent"),
                _ => format!("the {scope}'s budget is spent; further model requests are refused"),
            };
            // A notice for a session that has ended is dropped: its log is closed.
            if let Some(h) = self.registry.session_handle(&r.owner.session_id) {
                let notice = super::sessions::SessionCmd::Notice {
                    kind,
                    data: serde_json::json!({"scope": scope, "tenant": r.owner.tenant, "message": message}),
                };
                let _ = h.tx.send(notice).await;
            }
        }
    }
}

/// Container time: what a box's owner task records as it enters and leaves `running`.
#[derive(Clone)]
pub struct BoxTime {
    pub store: std::sync::Arc<dyn berth_store::Store>,
    pub clock: crate::clock::Clock,
}

impl BoxTime {
    /// A box reached `running`: its container time starts counting.
    pub async fn open(&self, b: &BoxObject) {
        let span = BoxSpan {
            box_id: b.id.clone(),
            tenant: b.tenant.clone(),
            start_ms: self.clock.now_ms(),
            end_ms: None,
            cpus: b.resources.cpus,
            memory_mib: b.resources.memory_mib,
        };
        if let Err(e) = self.store.open_box_span(&span).await {
            tracing::error!(box_id = %b.id, error = %e, "recording container time");
        }
    }

    /// A box left `running`: its container time stops counting. Idempotent.
    pub async fn close(&self, box_id: &str) {
        if let Err(e) = self.store.close_box_span(box_id, self.clock.now_ms()).await {
            tracing::error!(%box_id, error = %e, "recording container time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: i64, end: Option<i64>, cpus: f64, mem: u64) -> BoxSpan {
        BoxSpan {
            box_id: "b".into(),
            tenant: "t".into(),
            start_ms: start,
            end_ms: end,
            cpus,
            memory_mib: mem,
        }
    }

    #[test]
    fn spans_are_clipped_to_the_window_and_priced() {
        let c = CostConfig::default();
        let h = 3_600_000;
        let (hours, usd) = c.span_cost(&span(0, Some(2 * h), 1.0, 1024), None, None, 0);
        assert_eq!(hours, 2.0);
        assert!((usd - 0.10).abs() < 1e-12);
        let (hours, _) = c.span_cost(&span(0, None, 1.0, 1024), Some(h / 2), None, 3 * h);
        assert_eq!(hours, 2.5);
        let (hours, _) = c.span_cost(&span(0, Some(h), 1.0, 1024), Some(2 * h), None, 0);
        assert_eq!(hours, 0.0);
        let scaled = CostConfig {
            scale_by_resources: true,
            ..Default::default()
        };
        let (_, usd) = scaled.span_cost(&span(0, Some(h), 0.5, 4096), None, None, 0);
        assert!((usd - 0.20).abs() < 1e-12);
    }

    #[test]
    fn gaps_are_relative_with_a_floor_of_a_hundredth_of_a_cent() {
        let c = CostConfig::default();
        assert!(!c.gap(0.00005, 0.0));
        assert!(c.gap(0.0126, 0.0084));
        assert!(c.gap(1.0, 0.5));
        assert!(!c.gap(1.0, 0.97));
    }
}
