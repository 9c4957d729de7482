//! The engine's server-wide operations: API keys, readiness checks, the enabled backends, the
//! replay of a session's stored events, and the start-up and background jobs (`reconcile`, the
//! container-time heartbeat, the ledger writer) the server runs against it.

use super::error::EngineError;
use super::Engine;
use berth_api::{BackendInfo, Event, KeyObject, SessionState, TenantObject};
use berth_sandbox::Sandbox;
use std::sync::Arc;
use std::time::Duration;

impl Engine {
    /// Store a new API key (by its digest).
    pub async fn insert_key(&self, obj: &KeyObject, digest: &str) -> Result<(), EngineError> {
        Ok(self.store.insert_key(obj, digest).await?)
    }

    /// The API key with this digest (None: no such key).
    pub async fn find_key(
        &self,
        digest: &str,
    ) -> Result<Option<berth_store::KeyRecord>, EngineError> {
        Ok(self.store.find_key(digest).await?)
    }

    /// Whether the key `id` of `tenant` still exists in the store (deleted on any node: no).
    pub async fn key_exists(&self, tenant: &str, id: &str) -> Result<bool, EngineError> {
        // One indexed row, not the tenant's every key: asked on each port-link request.
        Ok(self.store.get_key(tenant, id).await?.is_some())
    }

    /// Every API key (without its secret).
    pub async fn list_keys(&self) -> Result<Vec<KeyObject>, EngineError> {
        Ok(self.store.list_keys(None).await?)
    }

    /// Delete an API key; false when there was none. The caller revokes what it opened
    /// ([`Engine::revoke_key`]).
    pub async fn delete_key(&self, id: &str) -> Result<bool, EngineError> {
        Ok(self.store.delete_key(id).await?)
    }

    /// Up to `limit` stored events of a session after `after`, in order.
    pub async fn events_after(
        &self,
        session_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>, EngineError> {
        Ok(self.store.events_after(session_id, after, limit).await?)
    }

    /// Whether the store takes a write.
    pub async fn check_store(&self) -> Result<(), String> {
        self.store.ping().await.map_err(|e| e.to_string())
    }

    /// The enabled backends that are not healthy within `limit` each, as "name: why".
    pub async fn check_backends(&self, limit: Duration) -> Vec<String> {
        let mut failed = vec![];
        for (name, b) in &self.backends {
            match tokio::time::timeout(limit, b.health()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("{name} backend: {e}")),
                Err(_) => failed.push(format!("{name} backend: no answer within {limit:?}")),
            }
        }
        failed
    }

    /// Whether the model upstream accepts a connection within `limit`.
    pub async fn check_upstream(&self, limit: Duration) -> Result<(), String> {
        self.gateway
            .probe_upstream(limit)
            .await
            .map_err(|e| e.to_string())
    }

    /// The enabled backends and what each guarantees, by name.
    pub fn backend_infos(&self) -> Vec<BackendInfo> {
        let mut items: Vec<BackendInfo> = self
            .backends
            .iter()
            .map(|(name, b)| BackendInfo {
                name: name.clone(),
                default: *name == self.config.default_backend,
                capabilities: serde_json::to_value(b.capabilities()).unwrap_or_default(),
            })
            .collect();
        items.sort_by(|a, b| a.name.cmp(&b.name));
        items
    }

    /// The price family a model's usage is reported under (a metrics label).
    pub fn price_family(&self, model: &str) -> String {
        self.gateway.prices().family(model).to_string()
    }

    /// Cgroup figures of a live box, for sampling (None when it cannot be read).
    pub(crate) async fn sample_box(&self, id: &str, backend: &str) -> Option<berth_sandbox::Stats> {
        self.backends.get(backend)?.sample(id).await.ok()
    }

    /// Give the gateway every tenant's monthly budget and what it has spent (at start-up).
    pub async fn load_tenant_budgets(&self) -> Result<(), EngineError> {
        for (tenant, budget) in self.store.tenant_budgets().await? {
            let spent = self.tenant_month_spent(&tenant).await.unwrap_or(0.0);
            self.gateway.set_tenant_budget(&tenant, Some(budget), spent);
        }
        Ok(())
    }

    /// Container time heartbeat: open spans were running as of now (a crash is then charged up
    /// to the last beat, not up to the restart). Runs until the process ends.
    pub async fn box_time_heartbeat(self: Arc<Self>) {
        let mut t = tokio::time::interval(Duration::from_secs(30));
        loop {
            t.tick().await;
            if let Err(e) = self
                .store
                .mark_box_spans_seen(self.config.clock.now_ms())
                .await
            {
                tracing::warn!(error = %e, "container time heartbeat");
            }
        }
    }

    /// A previous run may have died with boxes and sessions running: their processes are gone
    /// or orphaned. Clean up what the backends still hold and record what happened.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), EngineError> {
        let closed = self.store.close_abandoned_box_spans().await?;
        if closed > 0 {
            tracing::info!(
                spans = closed,
                "closed container time left open by the previous run"
            );
        }
        let mut owned = std::collections::HashSet::new();
        for mut b in self.store.list_boxes(None).await? {
            if b.state.is_terminal() || !self.reconcile_owns(&mut b).await {
                continue;
            }
            owned.insert(b.id.clone());
            // A box that was parking may still run (a park only destroys it after its snapshot
            // is stored); one that was restoring is parked again, its half-made box released.
            if b.state == berth_api::BoxState::Parking {
                b.state = berth_api::BoxState::Running;
                b.snapshot = None;
            }
            if b.state == berth_api::BoxState::Restoring {
                if let Some(backend) = self.backends.get(&b.backend) {
                    let _ = backend.destroy(&b.id).await;
                }
                b.state = berth_api::BoxState::Parked;
            }
            // Boxes of backends whose boxes outlive the server are taken back, unless they hold
            // secrets: their values lived only in the dead process's memory. Parked boxes wait
            // for their next use.
            let adoptable = b.state == berth_api::BoxState::Running
                && b.secrets.is_empty()
                && self
                    .backends
                    .get(&b.backend)
                    .is_some_and(|be| be.capabilities().adoption);
            let parked = b.state == berth_api::BoxState::Parked && b.snapshot.is_some();
            if adoptable || parked {
                let id = b.id.clone();
                if let Err(e) = self.resume_box(b).await {
                    tracing::warn!(box_id = %id, error = %e, "taking back a box left by the previous run");
                }
                continue;
            }
            if let Some(backend) = self.backends.get(&b.backend) {
                if let Err(e) = backend.destroy(&b.id).await {
                    tracing::warn!(box_id = %b.id, error = %e, "cleaning up a box left by the previous run");
                }
            }
            b.state = berth_api::BoxState::Stopped;
            b.state_reason = Some("server restarted".into());
            b.updated_at = crate::auth::now();
            self.store.put_box(&b).await?;
        }
        for mut s in self.store.list_sessions(None, None).await? {
            // On a shared store, only the sessions of this node's boxes.
            if s.state.is_terminal() || (self.node_name().is_some() && !owned.contains(&s.box_id)) {
                continue;
            }
            s.state = SessionState::Interrupted;
            s.state_reason = Some("server restarted while the session ran".into());
            s.updated_at = crate::auth::now();
            self.store.put_session(&s).await?;
        }
        Ok(())
    }

    /// Every metered request becomes a usage row (rows that arrive together are written in one
    /// transaction); budget thresholds a request crossed become events. Runs on what the
    /// ledger writer needs ([`super::ledger::LedgerDeps`]), not on the engine.
    pub async fn ledger_writer(
        self: Arc<Self>,
        metered: tokio::sync::mpsc::UnboundedReceiver<berth_gateway::UsageRecord>,
    ) {
        let deps = super::ledger::LedgerDeps {
            store: self.store.clone(),
            clock: self.config.clock.clone(),
            flush: self.ledger_flush.clone(),
            written: self.ledger_written.clone(),
            registry: self.registry.clone(),
            gateway: self.gateway.clone(),
        };
        drop(self);
        super::ledger::writer(deps, metered).await;
    }

    pub async fn tenant(&self, tenant: &str) -> Result<TenantObject, EngineError> {
        Ok(TenantObject {
            name: tenant.to_string(),
            budget_usd_month: self.store.tenant_budget(tenant).await?,
            spent_usd_month: self.tenant_month_spent(tenant).await?,
        })
    }

    pub async fn set_tenant_budget(
        &self,
        tenant: &str,
        budget: Option<f64>,
    ) -> Result<TenantObject, EngineError> {
        if budget.is_some_and(|b| !(b.is_finite() && b >= 0.0)) {
            return Err(EngineError::Invalid(
                "budget_usd_month must be a non-negative number".into(),
            ));
        }
        self.store.set_tenant_budget(tenant, budget).await?;
        let spent = self.tenant_month_spent(tenant).await?;
        self.gateway.set_tenant_budget(tenant, budget, spent);
        self.tenant(tenant).await
    }
}
