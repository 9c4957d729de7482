//! The session engine: one owner task per box and per session.
//!
//! Handlers never change a box or a session themselves. They look up the owner's handle
//! (a command sender plus a `watch` of the current object), send a command, and await the
//! reply; the owner task applies changes one at a time, writes them to the store and publishes
//! the new object. Events go to the store first and are then broadcast, so a subscriber that
//! falls behind (or reconnects) catches up from the store without gaps.
//!
//! The registry maps ids to handles, and keeps what each tenant's live boxes hold for admission.

pub mod admission;
mod anthropic;
pub mod box_io;
pub mod boxes;
pub mod custom_tools;
pub mod error;
pub mod event_cap;
mod in_flight;
pub mod ledger;
pub mod nodes;
mod owners;
pub mod park;
pub mod placement;
pub mod pools;
pub mod pty;
pub mod registry;
pub mod route;
pub mod rules;
pub mod sdk_sessions;
pub mod sessions;
pub mod shared;
pub mod shared_events;
pub mod store_health;
pub mod system;
pub mod tar_sanitize;
pub mod triggers;

#[cfg(test)]
mod actor_tests;

use berth_api::*;
use berth_sandbox::Backend;
use berth_store::Store;
use boxes::{BoxCmd, BoxHandle};
use error::EngineError;
use sessions::SessionHandle;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub default_backend: String,
    /// Model requests per minute per session, enforced by the gateway.
    pub session_rpm: Option<u32>,
    /// Boxes a tenant may have alive at once.
    pub max_boxes_per_tenant: usize,
    /// Largest exec output returned by the REST exec call, per stream.
    pub max_exec_output: usize,
    /// Container time pricing and the cost-gap threshold.
    pub cost: ledger::CostConfig,
    /// What container time and usage timestamps are read from.
    pub clock: crate::clock::Clock,
    /// Where parked hybrid boxes' snapshots are kept.
    pub snapshots: berth_store::snapshots::SnapshotStore,
    /// Webhook calls a trigger accepts per minute.
    pub hook_rate_per_minute: u32,
    /// Idle timeouts of boxes whose spec does not set one.
    pub idle_timeout: crate::config::IdleTimeoutSection,
    /// The largest box the server makes.
    pub max_box: admission::MaxBox,
    /// What a tenant's live boxes may hold together.
    pub tenant_totals: admission::TenantTotals,
    /// Caps on each session's event log.
    pub events: event_cap::Limits,
    /// The CPU weight raise an agent's start gets (`None`: none).
    pub start_boost: Option<berth_sandbox::StartBoost>,
}

/// Why a program could not start in a box, naming the program (the backends report only the
/// OS error, e.g. "No such file or directory", which does not say what was missing).
pub(crate) fn start_failure(program: &str, message: &str) -> String {
    let missing = message.contains("(os error 2)")
        || message.contains("executable file not found")
        || message.contains("no such file or directory");
    if missing {
        format!("program not found: {program}")
    } else {
        format!("cannot start {program}: {message}")
    }
}

/// A receiver as a stream.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Sleep until `t`, or forever when there is no deadline (for `select!` arms).
pub(crate) async fn sleep_until_opt<T: Into<tokio::time::Instant>>(t: Option<T>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Loopback port inside every box where the model gateway answers.
pub const GATEWAY_PORT: u16 = 47100;

/// Loopback port inside every box where the egress proxy answers.
pub const EGRESS_PORT: u16 = 47101;

/// Loopback port inside every box where the box-side berth API answers (agents messaging
/// each other; see `shared::serve_box_api`).
pub const BOX_API_PORT: u16 = 47102;

/// The engine. Its state is its own: the API edge, the server's start-up and background jobs
/// reach it through methods only.
pub struct Engine {
    gateway: Arc<berth_gateway::Gateway>,
    egress: Arc<berth_gateway::egress::Egress>,
    claude: Option<crate::claude_cli::ClaudeCli>,
    store: Arc<dyn Store>,
    backends: HashMap<String, Arc<Backend>>,
    config: EngineConfig,
    /// Which boxes and sessions have an owner task (shared with the actors).
    registry: Arc<registry::Registry>,
    /// How many metered records the ledger writer has stored (see [`Engine::ledger_sync`]).
    ledger_written: Arc<tokio::sync::watch::Sender<u64>>,
    /// Asks the ledger writer to write its pending batch now.
    ledger_flush: Arc<tokio::sync::Notify>,
    /// Wakes the trigger scheduler when a trigger is created or deleted.
    triggers_changed: Arc<tokio::sync::Notify>,
    /// Serialises uid allocation for sessions in shared boxes.
    shared_alloc: tokio::sync::Mutex<()>,
    /// Per trigger: the webhook calls it takes, `hook_rate_per_minute` at once and one more
    /// every minute/`hook_rate_per_minute` (None: the rate is 0, every call is refused).
    hook_rate: Option<governor::DefaultKeyedRateLimiter<String>>,
    /// Signed webhook calls already accepted (signature → when it may be forgotten): a replay
    /// inside the timestamp window is refused.
    pub(crate) hook_seen: std::sync::Mutex<HashMap<String, i64>>,
    /// Ids of API keys deleted during this run: streams opened with one of them end (see
    /// [`Engine::key_revoked`]). Grows by one id per deletion.
    revoked_keys: tokio::sync::watch::Sender<std::collections::HashSet<String>>,
    /// Box admission: ceilings, tenant limits and the creates in flight (shared with the box
    /// actors, which admit a restore).
    admission: Arc<admission::Admission>,
    /// Warm pools (see `pools`).
    pools: pools::Pools,
    /// Terminals open per box (see `pty`).
    terminals: pty::TerminalSlots,
    /// This node's cluster membership, once joined (see `nodes`).
    cluster: std::sync::OnceLock<Arc<nodes::Cluster>>,
}

fn tenant_filter(tenant: &str) -> Option<&str> {
    Some(tenant)
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        backends: HashMap<String, Arc<Backend>>,
        config: EngineConfig,
        gateway: Arc<berth_gateway::Gateway>,
        egress: Arc<berth_gateway::egress::Egress>,
        claude: Option<crate::claude_cli::ClaudeCli>,
    ) -> Arc<Engine> {
        let registry = Arc::new(registry::Registry::default());
        gateway.set_observer(sessions::previews::observer(registry.clone()));
        let admission = Arc::new(admission::Admission::new(
            config.max_box,
            config.max_boxes_per_tenant,
            config.tenant_totals,
            registry.clone(),
        ));
        Arc::new(Engine {
            gateway,
            egress,
            claude,
            store,
            backends,
            ledger_written: Arc::new(tokio::sync::watch::channel(0).0),
            ledger_flush: Arc::new(tokio::sync::Notify::new()),
            triggers_changed: Arc::new(tokio::sync::Notify::new()),
            shared_alloc: tokio::sync::Mutex::new(()),
            hook_rate: std::num::NonZeroU32::new(config.hook_rate_per_minute)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_minute(n))),
            hook_seen: std::sync::Mutex::new(HashMap::new()),
            revoked_keys: tokio::sync::watch::channel(Default::default()).0,
            admission,
            registry,
            pools: pools::Pools::default(),
            terminals: pty::TerminalSlots::default(),
            cluster: Default::default(),
            config,
        })
    }

    /// The engine's configuration (read-only).
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn box_handle(&self, id: &str) -> Option<BoxHandle> {
        self.registry.box_handle(id)
    }

    fn session_handle(&self, id: &str) -> Option<SessionHandle> {
        self.registry.session_handle(id)
    }

    /// What a box's owner task uses of the engine (see [`boxes::BoxDeps`]).
    fn box_deps(self: &Arc<Self>) -> boxes::BoxDeps {
        boxes::BoxDeps {
            store: self.store.clone(),
            snapshots: self.config.snapshots.clone(),
            gateway: self.gateway.clone(),
            egress: self.egress.clone(),
            registry: self.registry.clone(),
            admission: self.admission.clone(),
            box_time: ledger::BoxTime {
                store: self.store.clone(),
                clock: self.config.clock.clone(),
            },
            engine: Arc::downgrade(self),
        }
    }

    /// What a session's owner task uses of the engine (see [`sessions::SessionDeps`]).
    fn session_deps(&self) -> sessions::SessionDeps {
        sessions::SessionDeps {
            store: self.store.clone(),
            gateway: self.gateway.clone(),
            registry: self.registry.clone(),
            events: self.config.events,
            start_boost: self.config.start_boost,
        }
    }

    /// Check a new box against the ceilings and its tenant's limits (see `admission`).
    pub(crate) fn admit(
        &self,
        tenant: &str,
        r: &Resources,
    ) -> Result<admission::Ticket, EngineError> {
        self.admission.admit(tenant, r)
    }

    /// Record that the key `id` was deleted: every stream opened with it ends.
    pub fn revoke_key(&self, id: &str) {
        self.revoked_keys.send_modify(|s| {
            s.insert(id.to_string());
        });
    }

    /// Resolves once the key `id` has been deleted (at once if it already was). Long-lived
    /// responses (SSE, WebSocket, proxied ports) select on it so a credential ends everything it
    /// opened when it is revoked, not only its next request.
    pub fn key_revoked(&self, id: &str) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.revoked_keys.subscribe();
        let id = id.to_string();
        async move {
            if rx.wait_for(|s| s.contains(&id)).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The boxes with an owner task: id, backend and state.
    pub fn live_boxes(&self) -> Vec<(String, String, BoxState)> {
        self.registry
            .boxes()
            .iter()
            .map(|h| {
                let b = h.state.borrow();
                (b.id.clone(), b.backend.clone(), b.state)
            })
            .collect()
    }

    /// States of the sessions with an owner task.
    pub fn live_session_states(&self) -> Vec<SessionState> {
        self.registry
            .sessions()
            .iter()
            .map(|h| h.state.borrow().state)
            .collect()
    }

    /// Stop every session and destroy every box that should not outlive the server process,
    /// then write the usage metered so far.
    pub async fn shutdown(&self) {
        self.pools.stop();
        for h in self.registry.sessions() {
            registry::stop_session(&h, "server shutting down").await;
        }
        for h in self.registry.boxes() {
            let (tx, rx) = oneshot::channel();
            let asked = async {
                if h.tx.send(BoxCmd::Shutdown { reply: tx }).await.is_ok() {
                    let _ = rx.await;
                }
            };
            // A box stuck in its backend (a wedged dockerd) must not hold the server's exit.
            if tokio::time::timeout(registry::STOP_WAIT, asked)
                .await
                .is_err()
            {
                tracing::warn!("a box's owner task did not answer shutdown in time");
            }
        }
        // Usage metered up to now is written before the process goes, not lost with the
        // ledger writer's pending batch.
        self.ledger_sync().await;
    }
}
