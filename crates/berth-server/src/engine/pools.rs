//! Warm pools: boxes made ahead, each with its agent already started and waiting for its first
//! message, so that a session's first model request does not wait for a box and a CLI start.
//!
//! Contract:
//! - A pool (`[[pools]]` in the config) keeps `size` boxes ready for one tenant, made from its
//!   box spec (as an ephemeral box whose idle timeout is "never") with its agent started in
//!   them. The agent is started with the gateway token and session id of the session it will
//!   become, but the token is registered with the gateway only when the box is taken: until
//!   then the gateway and the box-side API refuse it, and nothing in the box (environment,
//!   files, processes) grants model access or names a tenant.
//! - Taking is atomic: one ready box goes to exactly one `POST /v1/sessions` (a pop under a
//!   lock). A session takes from a pool when it names it (`"pool"`; the pool's box and agent
//!   specs then govern, and a request giving another box or agent spec is refused) or when
//!   its box spec, as asked (a missing lifecycle is ephemeral, a session's default), and its
//!   agent spec equal a pool's: a persistent, hybrid or shared request never matches. With
//!   none ready the session starts cold (counted as a miss) from the same specs.
//! - A taken box gets the idle timeout a box of the pool's spec has (the spec's, or the
//!   server's `[idle_timeout]` default for ephemeral boxes) before its session starts.
//! - Pool boxes carry the `berth.pool` label, which only the server sets (`berth.*` labels
//!   are refused in clients' specs). At start, and only when pools are configured, the ready
//!   boxes a previous run of this server left (those `reconcile` took back on this server's
//!   backends, with no session) are destroyed; boxes this process does not hold, such as
//!   another server's on a shared store, are never touched.
//! - One refill task per pool makes one box at a time (low priority: never more than one
//!   start per pool in flight) and recycles boxes older than `max_age_s` or whose agent ended.

use super::boxes::BoxCmd;
use super::sessions::SessionStart;
use super::Engine;
use crate::auth::{new_id, now};
use crate::engine::error::EngineError;
use berth_api::{
    AgentSpec, BoxObject, BoxRef, BoxSpec, ClaudeAgent, Lifecycle, SessionObject, SessionSpec,
    SessionState,
};
use berth_sandbox::{ExecEvent, ExecHandle, ExecSpec, Sandbox};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// The label a pool's boxes carry (the pool's name).
const POOL_LABEL: &str = "berth.pool";
/// Where a pooled agent works (pooled boxes are never shared).
const WORKDIR: &str = "/workspace";
/// How long a refill waits after a take: the taken agent's first request (a burst of CPU)
/// goes before the next agent's start-up burst.
const REFILL_AFTER_TAKE: Duration = Duration::from_secs(2);
/// Longest wait between refill attempts after a failed one.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One `[[pools]]` entry of the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// The tenant whose sessions take from this pool (its boxes count against its quota).
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Boxes kept ready.
    pub size: usize,
    /// A box spec as `POST /v1/boxes` takes it (the lifecycle is always ephemeral, the box never
    /// shared; its idle timeout applies once a box is taken).
    #[serde(rename = "box", default)]
    pub box_spec: BoxSpec,
    /// An agent spec as `POST /v1/sessions` takes it.
    #[serde(default = "default_agent")]
    pub agent: AgentSpec,
    /// A ready box older than this is destroyed and replaced.
    #[serde(default = "default_max_age")]
    pub max_age_s: u64,
}

fn default_tenant() -> String {
    "default".into()
}

fn default_agent() -> AgentSpec {
    AgentSpec::Claude(ClaudeAgent::default())
}

fn default_max_age() -> u64 {
    3600
}

/// A pool as `GET /v1/pools` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolStatus {
    pub name: String,
    pub tenant: String,
    pub size: usize,
    /// Boxes ready to take now.
    pub ready: usize,
    /// Sessions that took a ready box, since the server started.
    pub taken: u64,
    /// Sessions that asked for the pool and found it empty (they started cold).
    pub misses: u64,
    /// Ready boxes destroyed past `max_age_s` or because their agent ended.
    pub recycled: u64,
}

/// A box with its agent started, waiting for its session.
struct Warm {
    box_obj: BoxObject,
    session_id: String,
    token: String,
    driver: berth_agent::Driver,
    exec: ExecHandle,
    /// The agent's process ended (or its stream did): the box is useless.
    dead: Arc<AtomicBool>,
    made: Instant,
}

struct Pool {
    cfg: PoolConfig,
    ready: Mutex<VecDeque<Warm>>,
    wake: Notify,
    taken: AtomicU64,
    misses: AtomicU64,
    recycled: AtomicU64,
}

impl Pool {
    fn ready_len(&self) -> usize {
        self.ready.lock().map(|q| q.len()).unwrap_or(0)
    }

    fn gauge(&self) {
        metrics::gauge!("berth_pool_ready", "pool" => self.cfg.name.clone())
            .set(self.ready_len() as f64);
    }
}

/// The engine's pools (empty until [`Engine::start_pools`]).
#[derive(Default)]
pub struct Pools {
    pools: RwLock<Vec<Arc<Pool>>>,
    stopped: AtomicBool,
}

impl Pools {
    /// Refill no more (server shutdown: the ready boxes go with the others).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for p in self.list() {
            p.wake.notify_one();
        }
    }

    fn list(&self) -> Vec<Arc<Pool>> {
        self.pools.read().map(|v| v.clone()).unwrap_or_default()
    }
}

/// What the pool lookup decided for a session create.
pub(crate) enum Pooled {
    Taken(SessionObject),
    /// Start cold from this spec (a named pool's specs filled in).
    Cold(SessionSpec),
}

/// A box spec as a pool keeps it, to compare a session's against: always ephemeral and never
/// shared, whatever the config says.
fn pooled_box(spec: &BoxSpec) -> BoxSpec {
    let mut s = spec.clone();
    s.lifecycle = Some(Lifecycle::Ephemeral);
    s.shared = false;
    s
}

/// A session's box spec as the caller asked it: only a missing lifecycle is filled in (a
/// session's own box is ephemeral unless said otherwise).
fn asked_box(spec: &BoxSpec) -> BoxSpec {
    let mut s = spec.clone();
    s.lifecycle.get_or_insert(Lifecycle::Ephemeral);
    s
}

impl Engine {
    /// Start the configured pools' refill tasks, after destroying the ready boxes a previous
    /// run left (on backends whose boxes outlive the server, `reconcile` took them back; never
    /// taken, they would otherwise live on unused).
    pub async fn start_pools(self: &Arc<Self>, configs: Vec<PoolConfig>) {
        if configs.is_empty() {
            return;
        }
        match self.store.list_boxes(None).await {
            Ok(boxes) => {
                for b in boxes {
                    // Only boxes this process holds (taken back by `reconcile` from this
                    // server's backends): a record alone may be another server's live box.
                    let Some(h) = self.box_handle(&b.id) else {
                        continue;
                    };
                    let b = h.state.borrow().clone();
                    if !b.labels.contains_key(POOL_LABEL)
                        || b.lifecycle != Lifecycle::Ephemeral
                        || b.state.is_terminal()
                    {
                        continue;
                    }
                    let taken = self
                        .store
                        .list_sessions(Some(&b.tenant), Some(&b.id))
                        .await
                        .map(|s| !s.is_empty())
                        .unwrap_or(true);
                    if !taken {
                        if let Err(e) = self.delete_box(&b.tenant, &b.id).await {
                            tracing::warn!(box_id = %b.id, error = %e, "destroying a ready box left by the previous run");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing boxes left by the previous run"),
        }
        for cfg in configs {
            let pool = Arc::new(Pool {
                cfg,
                ready: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                taken: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                recycled: AtomicU64::new(0),
            });
            if let Ok(mut v) = self.pools.pools.write() {
                v.push(pool.clone());
            }
            tokio::spawn(refill(self.clone(), pool));
        }
    }

    /// The pools and their counts.
    pub fn pool_status(&self) -> Vec<PoolStatus> {
        self.pools
            .list()
            .iter()
            .map(|p| PoolStatus {
                name: p.cfg.name.clone(),
                tenant: p.cfg.tenant.clone(),
                size: p.cfg.size,
                ready: p.ready_len(),
                taken: p.taken.load(Ordering::Relaxed),
                misses: p.misses.load(Ordering::Relaxed),
                recycled: p.recycled.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Take a ready box for this session if a pool serves it.
    pub(crate) async fn take_pooled(
        self: &Arc<Self>,
        tenant: &str,
        mut spec: SessionSpec,
    ) -> Result<Pooled, EngineError> {
        let pools = self.pools.list();
        if pools.is_empty() && spec.pool.is_none() {
            return Ok(Pooled::Cold(spec));
        }
        if spec.prompt.as_deref() == Some("") {
            return Err(EngineError::Invalid("prompt must not be empty".into()));
        }
        let pool = match spec.pool.take() {
            Some(name) => {
                let p = pools
                    .iter()
                    .find(|p| p.cfg.name == name && p.cfg.tenant == tenant)
                    .ok_or_else(|| EngineError::not_found("pool", &name))?;
                // The request gets exactly the pool's box and agent: anything else it asked
                // for (another lifecycle, resources, agent) is refused, not dropped.
                let box_ok = match &spec.box_ref {
                    BoxRef::Id(_) => false,
                    BoxRef::Spec(b) => {
                        let b = asked_box(b);
                        b == asked_box(&BoxSpec::default()) || b == pooled_box(&p.cfg.box_spec)
                    }
                };
                if !box_ok {
                    return Err(EngineError::Invalid(format!(
                        "a session of pool {name:?} runs in an ephemeral box of the pool's spec; omit box"
                    )));
                }
                if spec.agent != default_agent() && spec.agent != p.cfg.agent {
                    return Err(EngineError::Invalid(format!(
                        "a session of pool {name:?} runs the pool's agent; omit agent"
                    )));
                }
                // The pool's specs govern: its boxes were made and its agents started by them.
                spec.box_ref = BoxRef::Spec(Box::new(pooled_box(&p.cfg.box_spec)));
                spec.agent = p.cfg.agent.clone();
                p.clone()
            }
            None => {
                let BoxRef::Spec(b) = &spec.box_ref else {
                    return Ok(Pooled::Cold(spec));
                };
                let b = asked_box(b);
                match pools.iter().find(|p| {
                    p.cfg.tenant == tenant
                        && p.cfg.agent == spec.agent
                        && pooled_box(&p.cfg.box_spec) == b
                }) {
                    Some(p) => p.clone(),
                    None => return Ok(Pooled::Cold(spec)),
                }
            }
        };
        if spec.workdir.as_deref().is_some_and(|w| w != WORKDIR) {
            // The agent already runs in the pool's working directory.
            return Ok(Pooled::Cold(spec));
        }
        let warm = loop {
            // The pop is the take: under the lock, each ready box goes to one session only.
            let next = pool.ready.lock().ok().and_then(|mut q| q.pop_front());
            match next {
                Some(w) if w.dead.load(Ordering::SeqCst) => {
                    pool.recycled.fetch_add(1, Ordering::Relaxed);
                    self.discard(w);
                }
                Some(w) => break Some(w),
                None => break None,
            }
        };
        pool.gauge();
        pool.wake.notify_one();
        let Some(warm) = warm else {
            pool.misses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("berth_pool_misses_total", "pool" => pool.cfg.name.clone())
                .increment(1);
            return Ok(Pooled::Cold(spec));
        };
        pool.taken.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("berth_pool_taken_total", "pool" => pool.cfg.name.clone()).increment(1);
        let box_id = warm.box_obj.id.clone();
        match self.start_warm(tenant, &pool.cfg, spec, warm).await {
            Ok(obj) => Ok(Pooled::Taken(obj)),
            Err(e) => {
                if let Err(d) = self.delete_box(tenant, &box_id).await {
                    tracing::warn!(box_id = %box_id, error = %d, "destroying a pooled box whose session failed to start");
                }
                Err(e)
            }
        }
    }

    /// Make the taken box's session: the box's idle timeout as its spec says, the session's
    /// record, then its owner task over the running agent (whose token the gateway accepts
    /// from here on).
    async fn start_warm(
        self: &Arc<Self>,
        tenant: &str,
        cfg: &PoolConfig,
        spec: SessionSpec,
        warm: Warm,
    ) -> Result<SessionObject, EngineError> {
        let box_handle = self
            .box_handle(&warm.box_obj.id)
            .ok_or_else(|| EngineError::Conflict("the pooled box is gone".into()))?;
        // Idle "never" was for waiting; taken, it idles out as a cold box of its spec would.
        let idle_timeout_s = cfg
            .box_spec
            .idle_timeout_s
            .unwrap_or_else(|| self.config.idle_timeout.for_lifecycle(Lifecycle::Ephemeral));
        let (tx, rx) = tokio::sync::oneshot::channel();
        box_handle
            .tx
            .send(BoxCmd::SetIdleTimeout {
                idle_timeout_s,
                reply: tx,
            })
            .await
            .map_err(|_| EngineError::Conflict("the pooled box is gone".into()))?;
        rx.await
            .map_err(|_| EngineError::Conflict("the pooled box is gone".into()))?;
        let backend = self
            .backends
            .get(&warm.box_obj.backend)
            .cloned()
            .ok_or_else(|| EngineError::Internal("backend vanished".into()))?;
        let ts = now();
        let obj = SessionObject {
            id: warm.session_id,
            tenant: tenant.to_string(),
            box_id: warm.box_obj.id.clone(),
            state: SessionState::Starting,
            state_reason: None,
            cli_version: match spec.agent {
                AgentSpec::Claude(_) => self.claude.as_ref().map(|c| c.version.clone()),
                AgentSpec::Command(_) => None,
            },
            agent: spec.agent,
            workdir: WORKDIR.into(),
            agent_session_id: None,
            agent_cost_usd: None,
            last_seq: 0,
            uid: None,
            node: self.node_name(),
            created_at: ts.clone(),
            updated_at: ts,
        };
        self.store.put_session(&obj).await?;
        metrics::counter!("berth_sessions_created_total").increment(1);
        self.start_agent(SessionStart {
            deps: self.session_deps(),
            backend,
            box_handle,
            lifecycle: Lifecycle::Ephemeral,
            driver: warm.driver,
            obj,
            prompt: spec.prompt,
            keep_open: spec.keep_open,
            token: warm.token,
            prestarted: Some(warm.exec),
        })
        .await
    }

    /// Make one ready box: the box, then its agent, started as the session's will be.
    async fn make_warm(self: &Arc<Self>, cfg: &PoolConfig) -> Result<Warm, EngineError> {
        let mut spec = pooled_box(&cfg.box_spec);
        // Recycled by age, not by idleness: a ready box is idle by design (set at take).
        spec.idle_timeout_s = Some(None);
        let label = [(POOL_LABEL.to_string(), cfg.name.clone())].into();
        let box_obj = self.create_box_labelled(&cfg.tenant, spec, label).await?;
        let session_id = new_id("ses");
        let token = berth_gateway::new_token();
        let started = async {
            let env = self.claude_env(&session_id, None, &token, None);
            let driver = berth_agent::Driver::new(&cfg.agent, WORKDIR, env)
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
            let launch = driver.launch();
            let mut exec = ExecSpec {
                argv: launch.argv,
                cwd: Some(launch.cwd),
                env: launch.env,
                ..Default::default()
            };
            exec.env.extend([
                ("BERTH_SESSION_ID".to_string(), session_id.clone()),
                ("BERTH_SESSION_TOKEN".to_string(), token.clone()),
                (
                    "BERTH_API_URL".to_string(),
                    format!("http://127.0.0.1:{}", super::BOX_API_PORT),
                ),
            ]);
            let backend = self
                .backends
                .get(&box_obj.backend)
                .cloned()
                .ok_or_else(|| EngineError::Internal("backend vanished".into()))?;
            let h = backend
                .exec(&box_obj.id, exec)
                .await
                .map_err(|e| EngineError::Unavailable(e.to_string()))?;
            Ok::<_, EngineError>((driver, h))
        }
        .await;
        let (driver, h) = match started {
            Ok(x) => x,
            Err(e) => {
                let _ = self.delete_box(&cfg.tenant, &box_obj.id).await;
                return Err(e);
            }
        };
        // Relay the agent's output so that an agent ending while it waits is noticed without
        // taking its events from the session that will read them.
        let dead = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(256);
        let mut events = h.events;
        let d = dead.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if matches!(ev, ExecEvent::Exit(_) | ExecEvent::Failed(_)) {
                    d.store(true, Ordering::SeqCst);
                }
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
            d.store(true, Ordering::SeqCst);
        });
        Ok(Warm {
            box_obj,
            session_id,
            token,
            driver,
            exec: ExecHandle {
                events: rx,
                input: h.input,
            },
            dead,
            made: Instant::now(),
        })
    }

    /// Destroy a ready box that will not be taken.
    fn discard(self: &Arc<Self>, w: Warm) {
        let engine = self.clone();
        tokio::spawn(async move {
            drop(w.exec);
            if let Err(e) = engine.delete_box(&w.box_obj.tenant, &w.box_obj.id).await {
                tracing::warn!(box_id = %w.box_obj.id, error = %e, "recycling a pooled box");
            }
        });
    }
}

/// Keep one pool full: recycle what is too old or dead, make one box at a time.
async fn refill(engine: Arc<Engine>, pool: Arc<Pool>) {
    let max_age = Duration::from_secs(pool.cfg.max_age_s.max(1));
    let mut backoff = Duration::from_millis(250);
    while !engine.pools.stopped.load(Ordering::SeqCst) {
        let stale: Vec<Warm> = match pool.ready.lock() {
            Ok(mut q) => {
                let (keep, stale) = q
                    .drain(..)
                    .partition(|w| !w.dead.load(Ordering::SeqCst) && w.made.elapsed() < max_age);
                *q = keep;
                stale.into()
            }
            Err(_) => return,
        };
        for w in stale {
            pool.recycled.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("berth_pool_recycled_total", "pool" => pool.cfg.name.clone())
                .increment(1);
            engine.discard(w);
        }
        pool.gauge();
        if pool.ready_len() < pool.cfg.size {
            let t0 = Instant::now();
            match engine.make_warm(&pool.cfg).await {
                Ok(w) => {
                    metrics::histogram!("berth_pool_refill_seconds", "pool" => pool.cfg.name.clone())
                        .record(t0.elapsed().as_secs_f64());
                    backoff = Duration::from_millis(250);
                    if engine.pools.stopped.load(Ordering::SeqCst) {
                        engine.discard(w);
                        return;
                    }
                    if let Ok(mut q) = pool.ready.lock() {
                        q.push_back(w);
                    }
                    pool.gauge();
                    // Let running boxes' work go first between two starts.
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::warn!(pool = %pool.cfg.name, error = %e, "refilling a pool");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        }
        // Full: wake on a take, or when the oldest box reaches its age.
        let next_expiry = pool
            .ready
            .lock()
            .ok()
            .and_then(|q| q.front().map(|w| max_age.saturating_sub(w.made.elapsed())))
            .unwrap_or(max_age);
        tokio::select! {
            _ = pool.wake.notified() => {
                if !engine.pools.stopped.load(Ordering::SeqCst) {
                    tokio::time::sleep(REFILL_AFTER_TAKE).await;
                }
            }
            _ = tokio::time::sleep(next_expiry.min(Duration::from_secs(5))) => {}
        }
    }
}
