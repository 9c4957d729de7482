//! The session engine: one owner task per box and per session.
//!
//! Handlers never change a box or a session themselves. They look up the owner's handle
//! (a command sender plus a `watch` of the current object), send a command, and await the
//! reply; the owner task applies changes one at a time, writes them to the store and publishes
//! the new object. Events go to the store first and are then broadcast, so a subscriber that
//! falls behind (or reconnects) catches up from the store without gaps.
//!
//! The registry maps ids to handles only; it holds no state of its own.

pub mod admission;
pub mod boxes;
pub mod error;
pub mod event_cap;
pub mod ledger;
pub mod park;
pub mod pools;
pub mod sessions;
pub mod shared;
pub mod triggers;

use crate::auth::{new_id, now};
use berth_api::*;
use berth_sandbox::{Backend, Sandbox};
use berth_store::Store;
use boxes::{BoxCmd, BoxHandle};
use error::EngineError;
use sessions::{SessionCmd, SessionHandle};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
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

pub struct Engine {
    pub gateway: Arc<berth_gateway::Gateway>,
    pub egress: Arc<berth_gateway::egress::Egress>,
    pub claude: Option<crate::claude_cli::ClaudeCli>,
    pub store: Arc<dyn Store>,
    pub backends: HashMap<String, Arc<Backend>>,
    pub config: EngineConfig,
    boxes: RwLock<HashMap<String, BoxHandle>>,
    sessions: RwLock<HashMap<String, SessionHandle>>,
    /// How many metered records the ledger writer has stored (see [`Engine::ledger_sync`]).
    pub ledger_written: tokio::sync::watch::Sender<u64>,
    /// Asks the ledger writer to write its pending batch now.
    pub ledger_flush: tokio::sync::Notify,
    /// Wakes the trigger scheduler when a trigger is created or deleted.
    pub triggers_changed: tokio::sync::Notify,
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
    /// Box creates admitted but not yet in the registry (see `admission`).
    reservations: Arc<admission::Reservations>,
    /// Warm pools (see `pools`).
    pools: pools::Pools,
}

/// An OCI image reference: `name[:tag][@digest]` with the characters references allow.
fn valid_image_ref(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && !r.starts_with(['-', '.', '/', ':'])
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

fn shared_workdir() -> EngineError {
    EngineError::Invalid(
        "sessions in a shared box work in their own directory; omit workdir".into(),
    )
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
        Arc::new(Engine {
            gateway,
            egress,
            claude,
            store,
            backends,
            ledger_written: tokio::sync::watch::channel(0).0,
            ledger_flush: tokio::sync::Notify::new(),
            triggers_changed: tokio::sync::Notify::new(),
            shared_alloc: tokio::sync::Mutex::new(()),
            hook_rate: std::num::NonZeroU32::new(config.hook_rate_per_minute)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_minute(n))),
            hook_seen: std::sync::Mutex::new(HashMap::new()),
            revoked_keys: tokio::sync::watch::channel(Default::default()).0,
            reservations: Arc::default(),
            pools: pools::Pools::default(),
            config,
            boxes: RwLock::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
        })
    }

    fn box_handle(&self, id: &str) -> Option<BoxHandle> {
        self.boxes.read().ok()?.get(id).cloned()
    }

    fn session_handle(&self, id: &str) -> Option<SessionHandle> {
        self.sessions.read().ok()?.get(id).cloned()
    }

    pub(crate) fn forget_box(&self, id: &str) {
        if let Ok(mut m) = self.boxes.write() {
            m.remove(id);
        }
    }

    pub(crate) fn forget_session(&self, id: &str) {
        if let Ok(mut m) = self.sessions.write() {
            m.remove(id);
        }
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
        self.boxes
            .read()
            .map(|m| {
                m.iter()
                    .map(|(id, h)| {
                        let b = h.state.borrow();
                        (id.clone(), b.backend.clone(), b.state)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// States of the sessions with an owner task.
    pub fn live_session_states(&self) -> Vec<SessionState> {
        self.sessions
            .read()
            .map(|m| m.values().map(|h| h.state.borrow().state).collect())
            .unwrap_or_default()
    }

    // ---- boxes ----

    pub async fn create_box(
        self: &Arc<Self>,
        tenant: &str,
        spec: BoxSpec,
    ) -> Result<BoxObject, EngineError> {
        let backend_name = spec
            .backend
            .clone()
            .unwrap_or_else(|| self.config.default_backend.clone());
        let backend = self.backends.get(&backend_name).cloned().ok_or_else(|| {
            EngineError::Invalid(format!(
                "backend {backend_name:?} is not enabled on this server"
            ))
        })?;
        let image = spec.image.clone().unwrap_or_else(|| "host".into());
        if image != "host" && !backend.capabilities().image_references {
            return Err(EngineError::Invalid(format!(
                "image {image:?} is not available on the {backend_name} backend (use \"host\")"
            )));
        }
        if image != "host" && !valid_image_ref(&image) {
            return Err(EngineError::Invalid(format!(
                "image {image:?} is not an image reference (e.g. debian:12)"
            )));
        }
        boxes::validate_spec(&spec)?;
        // Held until the box is in the registry, where the next admission counts it.
        let ticket = self.admit(tenant, &spec.resources)?;
        let spec_secrets = spec.secrets.clone();
        // An unsaid lifecycle here is a box of its own (`POST /v1/boxes`); a session's own box
        // has its lifecycle filled in before (ephemeral). An unsaid idle timeout is the
        // server's default for the lifecycle; `null` is "never".
        let lifecycle = spec.lifecycle.unwrap_or(Lifecycle::Persistent);
        let idle_timeout_s = spec
            .idle_timeout_s
            .unwrap_or_else(|| self.config.idle_timeout.for_lifecycle(lifecycle));
        let ts = now();
        let obj = BoxObject {
            id: new_id("box"),
            tenant: tenant.to_string(),
            state: BoxState::Creating,
            state_reason: None,
            backend: backend_name,
            lifecycle,
            image,
            resources: spec.resources,
            network: spec.network,
            env: spec.env,
            idle_timeout_s,
            max_lifetime_s: spec.max_lifetime_s,
            labels: spec.labels,
            secrets: spec
                .secrets
                .iter()
                .map(|s| SecretRef {
                    host: s.host.clone(),
                    header: s.header.clone(),
                    tls: s.tls,
                })
                .collect(),
            shared: spec.shared,
            keep_workspace: spec.keep_workspace,
            artifact: None,
            snapshot: None,
            created_at: ts.clone(),
            updated_at: ts,
        };
        self.store.put_box(&obj).await?;
        let secrets = spec_secrets
            .into_iter()
            .map(|s| berth_gateway::egress::Secret {
                host: s.host,
                header: s.header,
                value: s.value,
                tls: s.tls,
            })
            .collect();
        let handle = boxes::spawn(
            self.clone(),
            backend,
            obj.clone(),
            secrets,
            boxes::Start::Create,
        );
        if let Ok(mut m) = self.boxes.write() {
            m.insert(obj.id.clone(), handle.clone());
        }
        drop(ticket);
        metrics::counter!("berth_boxes_created_total").increment(1);
        let mut rx = handle.state.clone();
        let settled = rx
            .wait_for(|b| b.state != BoxState::Creating)
            .await
            .map_err(|_| EngineError::Internal("box owner task ended during create".into()))?
            .clone();
        if settled.state == BoxState::Failed {
            return Err(EngineError::Unavailable(format!(
                "box {} failed to start: {}",
                settled.id,
                settled.state_reason.unwrap_or_default()
            )));
        }
        Ok(settled)
    }

    pub async fn get_box(&self, tenant: &str, id: &str) -> Result<BoxObject, EngineError> {
        if let Some(h) = self.box_handle(id) {
            let b = h.state.borrow().clone();
            if b.tenant == tenant {
                return Ok(b);
            }
            return Err(EngineError::not_found("box", id));
        }
        self.store
            .get_box(tenant_filter(tenant), id)
            .await?
            .ok_or_else(|| EngineError::not_found("box", id))
    }

    pub async fn list_boxes(&self, tenant: &str) -> Result<Vec<BoxObject>, EngineError> {
        let mut items = self.store.list_boxes(tenant_filter(tenant)).await?;
        for b in items.iter_mut() {
            if let Some(h) = self.box_handle(&b.id) {
                *b = h.state.borrow().clone();
            }
        }
        Ok(items)
    }

    pub async fn delete_box(&self, tenant: &str, id: &str) -> Result<BoxObject, EngineError> {
        let b = self.get_box(tenant, id).await?;
        // Sessions in the box end with it.
        self.stop_box_sessions(id, "box deleted").await;
        match self.box_handle(id) {
            Some(h) => {
                let (tx, rx) = oneshot::channel();
                h.tx.send(BoxCmd::Destroy { reply: tx })
                    .await
                    .map_err(|_| EngineError::Conflict("box is shutting down".into()))?;
                rx.await
                    .map_err(|_| EngineError::Internal("box owner task ended".into()))?
            }
            None => {
                if b.state == BoxState::Destroyed {
                    return Ok(b);
                }
                let mut b = b;
                if let Some(backend) = self.backends.get(&b.backend) {
                    backend.destroy(&b.id).await?;
                }
                b.state = BoxState::Destroyed;
                b.updated_at = now();
                self.store.put_box(&b).await?;
                Ok(b)
            }
        }
    }

    /// The workspace archive a `keep_workspace` box left when it was destroyed: a tar, streamed
    /// (decompressed on a blocking thread as the client reads; the server holds a few chunks).
    /// The stored archive's digest is checked by a first, streamed pass, so a damaged archive
    /// is a clean error rather than a cut-off download.
    pub async fn box_artifact(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<
        impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
        EngineError,
    > {
        use futures::StreamExt;
        let b = self.get_box(tenant, id).await?;
        let Some(a) = b.artifact else {
            return Err(EngineError::NotFound(format!(
                "box {id} has no workspace archive (keep_workspace, once destroyed)"
            )));
        };
        let unreadable = |e: berth_store::snapshots::SnapshotError| {
            tracing::error!(box_id = %id, error = %e, "reading a workspace archive");
            EngineError::Internal("the workspace archive could not be read intact".into())
        };
        let snapshots = &self.config.snapshots;
        snapshots
            .verify(&a.key, &a.sha256)
            .await
            .map_err(unreadable)?;
        let mut compressed = snapshots
            .get_stream(&a.key, &a.sha256)
            .await
            .map_err(unreadable)?;
        let (zst_tx, zst_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
        tokio::spawn(async move {
            while let Some(chunk) = compressed.next().await {
                let Ok(chunk) = chunk else { return };
                if zst_tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let reader = park::ChunkReader::new(zst_rx);
            let mut dec = match zstd::stream::Decoder::new(reader) {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; 256 * 1024];
                match dec.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        });
        Ok(tokio_stream_from(rx))
    }

    /// Park a hybrid box now; it is restored on its next use.
    pub async fn park_box(&self, tenant: &str, id: &str) -> Result<BoxObject, EngineError> {
        let b = self.get_box(tenant, id).await?;
        let h = self
            .box_handle(id)
            .ok_or_else(|| EngineError::Conflict(format!("box {id} is {}", b.state.as_str())))?;
        let (tx, rx) = oneshot::channel();
        let gone = || EngineError::Conflict(format!("box {id} is gone"));
        h.tx.send(BoxCmd::Park { reply: tx })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Hand an egress decision to its box's owner task (dropped if the box is gone or its
    /// queue is full: decisions are guest-triggered and must not back up).
    pub fn box_egress_decision(&self, d: berth_gateway::egress::Decision) {
        if let Some(h) = self.box_handle(&d.box_id) {
            if h.tx.try_send(BoxCmd::Egress(d)).is_err() {
                metrics::counter!("berth_box_events_dropped_total").increment(1);
            }
        }
    }

    /// A box's event log after `after` (state changes, egress decisions).
    pub async fn box_events(
        &self,
        tenant: &str,
        id: &str,
        after: i64,
    ) -> Result<Vec<BoxEvent>, EngineError> {
        self.get_box(tenant, id).await?;
        // The store keeps box and session logs alike (its `session_id` is the box's id here);
        // the API names the box.
        Ok(self
            .store
            .box_events_after(id, after, 1000)
            .await?
            .into_iter()
            .map(|e| BoxEvent {
                seq: e.seq,
                box_id: e.session_id,
                ts: e.ts,
                kind: e.kind.into(),
                data: e.data,
            })
            .collect())
    }

    /// The backend of a running box, after checking the tenant; records activity.
    /// A running box for a call that uses it (exec, files, ports): restores a parked box and
    /// counts as activity.
    pub async fn running_box(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<(Arc<Backend>, BoxObject), EngineError> {
        self.ensure_unparked(tenant, id).await?;
        self.serving_box(tenant, id, true).await
    }

    /// A running box for a call that only looks at it (stats): a parked box stays parked
    /// (409) and the idle timer is not reset, so monitoring does not keep boxes alive.
    pub async fn observed_box(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<(Arc<Backend>, BoxObject), EngineError> {
        self.serving_box(tenant, id, false).await
    }

    async fn serving_box(
        &self,
        tenant: &str,
        id: &str,
        touch: bool,
    ) -> Result<(Arc<Backend>, BoxObject), EngineError> {
        let b = self.get_box(tenant, id).await?;
        let Some(h) = self.box_handle(id) else {
            return Err(EngineError::Conflict(format!(
                "box {id} is {}",
                b.state.as_str()
            )));
        };
        if b.state != BoxState::Running {
            return Err(EngineError::Conflict(format!(
                "box {id} is {}",
                b.state.as_str()
            )));
        }
        if touch {
            h.touch();
        }
        let backend = self
            .backends
            .get(&b.backend)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("backend {} vanished", b.backend)))?;
        Ok((backend, b))
    }

    // ---- sessions ----

    pub async fn create_session(
        self: &Arc<Self>,
        tenant: &str,
        spec: SessionSpec,
    ) -> Result<SessionObject, EngineError> {
        let spec = match self.take_pooled(tenant, spec).await? {
            pools::Pooled::Taken(s) => return Ok(s),
            pools::Pooled::Cold(spec) => spec,
        };
        let workdir = spec.workdir.clone().unwrap_or_else(|| "/workspace".into());
        if !workdir.starts_with('/') || workdir.contains('\0') {
            return Err(EngineError::Invalid(
                "workdir must be an absolute path inside the box".into(),
            ));
        }
        if let AgentSpec::Claude(c) = &spec.agent {
            if c.max_budget_usd
                .is_some_and(|b| !(b.is_finite() && b > 0.0))
            {
                return Err(EngineError::Invalid(
                    "max_budget_usd must be a positive number".into(),
                ));
            }
        }
        let unknown = spec.agent.unknown_fields();
        if !unknown.is_empty() {
            return Err(EngineError::Invalid(format!(
                "unknown field(s) in agent: {}",
                unknown.join(", ")
            )));
        }
        let session_id = new_id("ses");
        let token = berth_gateway::new_token();
        let claude_env = self.claude_env(&session_id, None, &token, None);
        let driver = berth_agent::Driver::new(&spec.agent, &workdir, claude_env)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        if let Some(p) = &spec.prompt {
            if p.is_empty() {
                return Err(EngineError::Invalid("prompt must not be empty".into()));
            }
        }
        // Refused before a box is made for it.
        if matches!(&spec.box_ref, BoxRef::Spec(b) if b.shared) && spec.workdir.is_some() {
            return Err(shared_workdir());
        }
        let box_obj = match &spec.box_ref {
            BoxRef::Id(id) => {
                self.ensure_unparked(tenant, id).await?;
                let b = self.get_box(tenant, id).await?;
                if b.state != BoxState::Running {
                    return Err(EngineError::Conflict(format!(
                        "box {id} is {}",
                        b.state.as_str()
                    )));
                }
                b
            }
            BoxRef::Spec(s) => {
                let mut s = (**s).clone();
                // `"box": {}` is the same as no `box`: a box of the session's own, ephemeral.
                s.lifecycle.get_or_insert(Lifecycle::Ephemeral);
                let b = self.create_box(tenant, s).await?;
                // A failure from here on must not leak the box made for this session.
                return match self
                    .start_session_in(
                        tenant,
                        spec,
                        NewSession {
                            box_obj: b.clone(),
                            session_id,
                            token,
                            driver,
                            workdir,
                        },
                    )
                    .await
                {
                    Ok(obj) => Ok(obj),
                    Err(e) => {
                        if let Err(d) = self.delete_box(tenant, &b.id).await {
                            tracing::warn!(box_id = %b.id, error = %d, "destroying the box of a session that failed to start");
                        }
                        Err(e)
                    }
                };
            }
        };
        self.start_session_in(
            tenant,
            spec,
            NewSession {
                box_obj,
                session_id,
                token,
                driver,
                workdir,
            },
        )
        .await
    }

    /// The part of a session create after its box exists: the session's record and its agent.
    async fn start_session_in(
        self: &Arc<Self>,
        tenant: &str,
        spec: SessionSpec,
        parts: NewSession,
    ) -> Result<SessionObject, EngineError> {
        let NewSession {
            box_obj,
            session_id,
            token,
            mut driver,
            workdir,
        } = parts;
        let box_handle = self
            .box_handle(&box_obj.id)
            .ok_or_else(|| EngineError::Conflict(format!("box {} is not running", box_obj.id)))?;
        let backend = self
            .backends
            .get(&box_obj.backend)
            .cloned()
            .ok_or_else(|| EngineError::Internal("backend vanished".into()))?;
        let ts = now();
        let cli_version = match spec.agent {
            AgentSpec::Claude(_) => self.claude.as_ref().map(|c| c.version.clone()),
            AgentSpec::Command(_) => None,
        };
        let mut obj = SessionObject {
            id: session_id,
            tenant: tenant.to_string(),
            box_id: box_obj.id.clone(),
            state: SessionState::Starting,
            state_reason: None,
            agent: spec.agent.clone(),
            workdir,
            agent_session_id: None,
            cli_version,
            agent_cost_usd: None,
            last_seq: 0,
            uid: None,
            created_at: ts.clone(),
            updated_at: ts,
        };
        // Held until the session is stored: the next allocation sees this uid.
        let _alloc = if box_obj.shared {
            if spec.workdir.is_some() {
                return Err(shared_workdir());
            }
            // One allocation at a time: each session of the box gets a uid of its own.
            let alloc = self.shared_alloc.lock().await;
            let taken = self
                .store
                .list_sessions(tenant_filter(tenant), Some(&box_obj.id))
                .await?
                .iter()
                .filter_map(|s| s.uid)
                .max();
            let uid = taken.map_or(shared::FIRST_UID, |u| u + 1);
            obj.workdir = shared::prepare(&backend, &box_obj.id, &obj.id, uid).await?;
            obj.uid = Some(uid);
            let claude_env = self.claude_env(&obj.id, Some(&obj.workdir), &token, None);
            driver = berth_agent::Driver::new(&spec.agent, &obj.workdir, claude_env)
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
            Some(alloc)
        } else {
            None
        };
        self.store.put_session(&obj).await?;
        metrics::counter!("berth_sessions_created_total").increment(1);
        self.start_agent(sessions::SessionStart {
            engine: self.clone(),
            backend,
            box_handle,
            lifecycle: box_obj.lifecycle,
            driver,
            obj,
            prompt: spec.prompt.clone(),
            keep_open: spec.keep_open,
            token,
            prestarted: None,
        })
        .await
    }

    pub async fn get_session(&self, tenant: &str, id: &str) -> Result<SessionObject, EngineError> {
        if let Some(h) = self.session_handle(id) {
            let s = h.state.borrow().clone();
            if s.tenant == tenant {
                return Ok(s);
            }
            return Err(EngineError::not_found("session", id));
        }
        self.store
            .get_session(tenant_filter(tenant), id)
            .await?
            .ok_or_else(|| EngineError::not_found("session", id))
    }

    pub async fn list_sessions(
        &self,
        tenant: &str,
        box_id: Option<&str>,
    ) -> Result<Vec<SessionObject>, EngineError> {
        let mut items = self
            .store
            .list_sessions(tenant_filter(tenant), box_id)
            .await?;
        for s in items.iter_mut() {
            if let Some(h) = self.session_handle(&s.id) {
                *s = h.state.borrow().clone();
            }
        }
        Ok(items)
    }

    async fn live_session(&self, tenant: &str, id: &str) -> Result<SessionHandle, EngineError> {
        let s = self.get_session(tenant, id).await?;
        self.session_handle(id).ok_or_else(|| {
            EngineError::Conflict(format!("session {id} has ended ({})", s.state.as_str()))
        })
    }

    /// Send a command to a live session's owner task and wait for its answer; a session whose
    /// task has ended is a conflict.
    async fn ask_session<T>(
        &self,
        tenant: &str,
        id: &str,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> SessionCmd,
    ) -> Result<T, EngineError> {
        let h = self.live_session(tenant, id).await?;
        let ended = || EngineError::Conflict(format!("session {id} has ended"));
        let (tx, rx) = oneshot::channel();
        h.tx.send(make(tx)).await.map_err(|_| ended())?;
        rx.await.map_err(|_| ended())?
    }

    pub async fn send_message(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        content: serde_json::Value,
    ) -> Result<(), EngineError> {
        // A session its parked box stopped comes back with the box.
        if self.session_handle(id).is_none() {
            let s = self.get_session(tenant, id).await?;
            self.ensure_unparked(tenant, &s.box_id).await?;
        }
        self.ask_session(tenant, id, |reply| SessionCmd::Message { content, reply })
            .await
    }

    pub async fn interrupt(&self, tenant: &str, id: &str) -> Result<(), EngineError> {
        self.ask_session(tenant, id, |reply| SessionCmd::Interrupt { reply })
            .await
    }

    pub async fn answer_permission(
        &self,
        tenant: &str,
        id: &str,
        request_id: &str,
        answer: PermissionAnswer,
    ) -> Result<(), EngineError> {
        self.ask_session(tenant, id, |reply| SessionCmd::Permission {
            request_id: request_id.to_string(),
            answer,
            reply,
        })
        .await
    }

    /// Let the gateway accept `token` for this session, with its budget (less what it has
    /// already spent, after a restart) and the server's request rate limit.
    async fn register_token(&self, token: &str, obj: &SessionObject) -> Result<(), EngineError> {
        let budget_usd = match &obj.agent {
            AgentSpec::Claude(c) => c.max_budget_usd,
            AgentSpec::Command(_) => None,
        };
        let spent = self
            .session_usage(&obj.tenant, &obj.id)
            .await
            .map(|u| u.total.cost_usd)
            .unwrap_or(0.0);
        self.gateway.register(
            token,
            berth_gateway::TokenOwner {
                session_id: obj.id.clone(),
                box_id: obj.box_id.clone(),
                tenant: obj.tenant.clone(),
            },
            berth_gateway::SessionLimits {
                budget_usd,
                requests_per_minute: self.config.session_rpm,
            },
            spent,
        );
        Ok(())
    }

    /// Record a server-side notice (budget exhausted, …) in a live session's event log.
    pub async fn notice(
        &self,
        session_id: &str,
        kind: impl Into<berth_api::EventKind>,
        data: serde_json::Value,
    ) {
        if let Some(h) = self.session_handle(session_id) {
            let _ =
                h.tx.send(SessionCmd::Notice {
                    kind: kind.into(),
                    data,
                })
                .await;
        }
    }

    /// Where and how the Claude CLI runs for a session (None when the server has no CLI).
    fn claude_env(
        &self,
        session_id: &str,
        shared_workdir: Option<&str>,
        token: &str,
        resume: Option<String>,
    ) -> Option<berth_agent::ClaudeEnv> {
        self.claude.as_ref().map(|c| berth_agent::ClaudeEnv {
            cli: c.path.to_string_lossy().into_owned(),
            base_url: format!("http://127.0.0.1:{GATEWAY_PORT}"),
            token: token.to_string(),
            // Per session and stable across restarts: the CLI's transcripts live here (in a
            // shared box, inside the session's own directory, where only its uid can write).
            config_dir: match shared_workdir {
                Some(w) => format!("{w}/.claude"),
                None => format!("/home/agent/.claude-sessions/{session_id}"),
            },
            resume,
            proxy: None,
        })
    }

    /// Give a box the previous server run left an owner task again (see `reconcile`): a
    /// running box is adopted from its backend (or recorded stopped when it is gone); a parked
    /// one waits for its next use.
    pub async fn resume_box(self: &Arc<Self>, mut obj: BoxObject) -> Result<(), EngineError> {
        let backend = self
            .backends
            .get(&obj.backend)
            .cloned()
            .ok_or_else(|| EngineError::Internal("backend vanished".into()))?;
        let last_seq = self.store.last_box_seq(&obj.id).await?;
        let start = if obj.state == BoxState::Parked {
            boxes::Start::Parked { last_seq }
        } else {
            obj.state = BoxState::Creating;
            boxes::Start::Adopt { last_seq }
        };
        let handle = boxes::spawn(self.clone(), backend, obj.clone(), vec![], start);
        if let Ok(mut m) = self.boxes.write() {
            m.insert(obj.id.clone(), handle.clone());
        }
        let mut rx = handle.state.clone();
        let _ = rx.wait_for(|b| b.state != BoxState::Creating).await;
        Ok(())
    }

    /// Whether an agent in the box is in the middle of a turn (a box is not idle then, even
    /// when the model is slow to answer).
    pub(crate) fn box_busy(&self, box_id: &str) -> bool {
        self.sessions
            .read()
            .map(|m| {
                m.values().any(|h| {
                    let s = h.state.borrow();
                    s.box_id == box_id
                        && matches!(s.state, SessionState::Running | SessionState::Starting)
                })
            })
            .unwrap_or(false)
    }

    /// Stop every live session in a box (it is parking or being deleted); their ids.
    pub(crate) async fn stop_box_sessions(&self, box_id: &str, reason: &str) -> Vec<String> {
        let handles: Vec<SessionHandle> = self
            .sessions
            .read()
            .map(|m| {
                m.values()
                    .filter(|h| h.state.borrow().box_id == box_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut stopped = Vec::new();
        for h in handles {
            let id = h.state.borrow().id.clone();
            let (tx, rx) = oneshot::channel();
            let cmd = SessionCmd::Stop {
                reason: reason.to_string(),
                reply: tx,
            };
            if h.tx.send(cmd).await.is_ok() && rx.await.is_ok() {
                stopped.push(id);
            }
        }
        stopped
    }

    /// Restart sessions stopped by a park (their agents resume their conversations).
    pub(crate) async fn resume_sessions(self: &Arc<Self>, tenant: &str, ids: &[String]) {
        for id in ids {
            if let Err(e) = self.restart_in_running_box(tenant, id).await {
                tracing::warn!(session_id = %id, error = %e, "resuming a session after a park");
            }
        }
    }

    /// If the box is parked, restore it and resume the sessions the park stopped (true);
    /// otherwise nothing (false). Concurrent callers are served in turn by the box's owner task.
    pub async fn ensure_unparked(
        self: &Arc<Self>,
        tenant: &str,
        box_id: &str,
    ) -> Result<bool, EngineError> {
        let b = self.get_box(tenant, box_id).await?;
        if !matches!(
            b.state,
            BoxState::Parked | BoxState::Parking | BoxState::Restoring
        ) {
            return Ok(false);
        }
        let h = self.box_handle(box_id).ok_or_else(|| {
            EngineError::Conflict(format!("box {box_id} is {}", b.state.as_str()))
        })?;
        // A park in progress finishes first (the owner task takes one command at a time).
        let (tx, rx) = oneshot::channel();
        let gone = || EngineError::Conflict(format!("box {box_id} is gone"));
        h.tx.send(BoxCmd::Restore { reply: tx })
            .await
            .map_err(|_| gone())?;
        let sessions = rx.await.map_err(|_| gone())??;
        self.resume_sessions(&b.tenant, &sessions).await;
        Ok(true)
    }

    /// Start an ended session's agent again in its box; a Claude agent resumes its own
    /// conversation (`--resume=<agent_session_id>`). Events continue the same log.
    pub async fn restart_session(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<SessionObject, EngineError> {
        let s = self.get_session(tenant, id).await?;
        if self.ensure_unparked(tenant, &s.box_id).await? && self.session_handle(id).is_some() {
            // Resumed with its box.
            return self.get_session(tenant, id).await;
        }
        self.restart_in_running_box(tenant, id).await
    }

    async fn restart_in_running_box(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<SessionObject, EngineError> {
        let s = self.get_session(tenant, id).await?;
        if self.session_handle(id).is_some() || !s.state.is_terminal() {
            return Err(EngineError::Conflict(format!(
                "session {id} is {}",
                s.state.as_str()
            )));
        }
        let box_obj = self.get_box(tenant, &s.box_id).await?;
        let box_handle = match (box_obj.state, self.box_handle(&s.box_id)) {
            (BoxState::Running, Some(h)) => h,
            _ => {
                return Err(EngineError::Conflict(format!(
                    "box {} is {}",
                    s.box_id,
                    box_obj.state.as_str()
                )))
            }
        };
        let backend = self
            .backends
            .get(&box_obj.backend)
            .cloned()
            .ok_or_else(|| EngineError::Internal("backend vanished".into()))?;
        let token = berth_gateway::new_token();
        let resume = match s.agent {
            AgentSpec::Claude(_) => s.agent_session_id.clone(),
            AgentSpec::Command(_) => None,
        };
        let driver = berth_agent::Driver::new(
            &s.agent,
            &s.workdir,
            self.claude_env(&s.id, s.uid.map(|_| s.workdir.as_str()), &token, resume),
        )
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let mut obj = s;
        obj.state = SessionState::Starting;
        obj.state_reason = None;
        self.start_agent(sessions::SessionStart {
            engine: self.clone(),
            backend,
            box_handle,
            lifecycle: box_obj.lifecycle,
            driver,
            obj,
            prompt: None,
            keep_open: true,
            token,
            prestarted: None,
        })
        .await
    }

    /// Register the session's token, start its owner task, and wait until the agent is up
    /// (or has failed to start).
    async fn start_agent(
        &self,
        start: sessions::SessionStart,
    ) -> Result<SessionObject, EngineError> {
        self.register_token(&start.token, &start.obj).await?;
        let obj = start.obj.clone();
        let handle = sessions::spawn(start);
        if let Ok(mut m) = self.sessions.write() {
            m.insert(obj.id.clone(), handle.clone());
        }
        let mut rx = handle.state.clone();
        let settled = rx
            .wait_for(|s| s.state != SessionState::Starting)
            .await
            .map(|s| s.clone())
            .unwrap_or(obj);
        Ok(settled)
    }

    pub async fn set_permission_mode(
        &self,
        tenant: &str,
        id: &str,
        mode: String,
    ) -> Result<(), EngineError> {
        self.ask_session(tenant, id, |reply| SessionCmd::SetPermissionMode {
            mode,
            reply,
        })
        .await
    }

    pub async fn delete_session(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<SessionObject, EngineError> {
        let s = self.get_session(tenant, id).await?;
        let Some(h) = self.session_handle(id) else {
            return Ok(s);
        };
        let (tx, rx) = oneshot::channel();
        if h.tx
            .send(SessionCmd::Stop {
                reason: "stopped by client".into(),
                reply: tx,
            })
            .await
            .is_err()
        {
            return self.get_session(tenant, id).await;
        }
        rx.await
            .map_err(|_| EngineError::Internal("session owner task ended".into()))
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

    /// Live event feed of a session (None once it has ended: replay from the store suffices).
    pub fn subscribe(
        &self,
        id: &str,
    ) -> Option<tokio::sync::broadcast::Receiver<Arc<sessions::LiveEvent>>> {
        self.session_handle(id).map(|h| h.events.subscribe())
    }

    /// Stop every session and destroy every box that should not outlive the server process,
    /// then write the usage metered so far.
    pub async fn shutdown(&self) {
        self.pools.stop();
        let sessions: Vec<SessionHandle> = self
            .sessions
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for h in sessions {
            let (tx, rx) = oneshot::channel();
            if h.tx
                .send(SessionCmd::Stop {
                    reason: "server shutting down".into(),
                    reply: tx,
                })
                .await
                .is_ok()
            {
                let _ = rx.await;
            }
        }
        let boxes: Vec<BoxHandle> = self
            .boxes
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for h in boxes {
            let (tx, rx) = oneshot::channel();
            if h.tx.send(BoxCmd::Shutdown { reply: tx }).await.is_ok() {
                let _ = rx.await;
            }
        }
        // Usage metered up to now is written before the process goes, not lost with the
        // ledger writer's pending batch.
        self.ledger_sync().await;
    }
}

/// What a session create has made before its box is known to be usable.
struct NewSession {
    box_obj: BoxObject,
    session_id: String,
    token: String,
    driver: berth_agent::Driver,
    workdir: String,
}
