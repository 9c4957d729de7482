//! The box owner task.
//!
//! States: `creating` → `running` → (`stopped` | `failed`) → `destroyed`. The task creates the
//! box in its backend, then waits for, one at a time: commands (destroy, shutdown, touch), the
//! backend reporting that the box died, the idle deadline (`idle_timeout_s` since the last
//! activity) and the lifetime deadline (`max_lifetime_s` since start). Each transition is written
//! to the store and published on the `watch` channel before the next is taken.

use super::{rules, sleep_until_opt, Engine};
use crate::auth::now;
use crate::engine::error::EngineError;
use berth_api::{BoxObject, BoxSpec, BoxState, Lifecycle};
use berth_sandbox::{Backend, BoxConfig, BoxExit, Bridge, Image, Limits, Sandbox};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

pub enum BoxCmd {
    Destroy {
        reply: oneshot::Sender<Result<BoxObject, EngineError>>,
    },
    /// Server shutdown: tear the box down, record it as stopped.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    Touch,
    /// Park a hybrid box now (as its idle deadline would); answers with the box.
    Park {
        reply: oneshot::Sender<Result<BoxObject, EngineError>>,
    },
    /// Bring a parked box back; answers with the sessions to resume.
    Restore {
        reply: oneshot::Sender<Result<Vec<String>, EngineError>>,
    },
    /// An egress decision to record in the box's event log.
    Egress(berth_gateway::egress::Decision),
}

/// Egress decisions recorded per box per minute; the rest are counted in one summary event.
const EGRESS_EVENTS_PER_MINUTE: u32 = 600;

#[derive(Clone)]
pub struct BoxHandle {
    pub tx: mpsc::Sender<BoxCmd>,
    pub state: watch::Receiver<BoxObject>,
}

impl BoxHandle {
    /// Record activity (resets the idle timer). Never blocks; a full queue already holds a touch
    /// or something more important.
    pub fn touch(&self) {
        let _ = self.tx.try_send(BoxCmd::Touch);
    }
}

pub fn validate_spec(spec: &BoxSpec) -> Result<(), EngineError> {
    limits(spec)
        .validate()
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(EngineError::Invalid(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    for p in &spec.network.allow {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.trim_start_matches("*.")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(EngineError::Invalid(format!(
                "invalid network.allow pattern {p:?}"
            )));
        }
    }
    if spec.shared && (spec.lifecycle == Some(Lifecycle::Hybrid) || spec.keep_workspace) {
        // Parking archives the box as its operator uid, which cannot read the sessions'
        // private directories.
        return Err(EngineError::Invalid(
            "a shared box can be neither hybrid nor keep_workspace (its archive could not read the sessions' directories)".into(),
        ));
    }
    if spec.idle_timeout_s == Some(Some(0)) || spec.max_lifetime_s == Some(0) {
        return Err(EngineError::Invalid(
            "timeouts must be at least 1 second".into(),
        ));
    }
    for sec in &spec.secrets {
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        if !token(&sec.header) {
            return Err(EngineError::Invalid(format!(
                "secret header {:?} is not a valid header name",
                sec.header
            )));
        }
        if sec
            .value
            .bytes()
            .any(|b| b == b'\r' || b == b'\n' || b == 0)
        {
            return Err(EngineError::Invalid(
                "secret values must not contain CR, LF or NUL".into(),
            ));
        }
        if !berth_gateway::egress::allowed(&spec.network.allow, &sec.host) {
            return Err(EngineError::Invalid(format!(
                "secret host {:?} is not on network.allow",
                sec.host
            )));
        }
    }
    if spec.labels.len() > 64 || spec.env.len() > 256 || spec.secrets.len() > 64 {
        return Err(EngineError::Invalid(
            "too many labels or environment variables".into(),
        ));
    }
    Ok(())
}

/// Every process in a box finds the egress proxy through the usual variables; the box's own
/// `env` comes after and may change them (the proxy stays the only way out regardless).
fn box_env(obj: &BoxObject) -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{}", super::EGRESS_PORT);
    let mut env: Vec<(String, String)> = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
        .iter()
        .map(|k| (k.to_string(), proxy.clone()))
        .collect();
    env.push(("NO_PROXY".into(), "127.0.0.1,localhost".into()));
    env.push(("no_proxy".into(), "127.0.0.1,localhost".into()));
    env.push(("NODE_USE_ENV_PROXY".into(), "1".into()));
    env.extend(obj.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

fn limits(spec: &BoxSpec) -> Limits {
    Limits {
        cpus: spec.resources.cpus,
        memory_mib: spec.resources.memory_mib,
        disk_mib: spec.resources.disk_mib,
        pids: spec.resources.pids,
    }
}

/// What a box's owner task uses of the engine: the store, the snapshot store, the box's three
/// host-side services, the registry, admission (a restore is admitted again) and container time.
pub struct BoxDeps {
    pub store: Arc<dyn berth_store::Store>,
    pub snapshots: berth_store::snapshots::SnapshotStore,
    pub gateway: Arc<berth_gateway::Gateway>,
    pub egress: Arc<berth_gateway::egress::Egress>,
    pub registry: Arc<super::registry::Registry>,
    pub admission: Arc<super::admission::Admission>,
    pub box_time: super::ledger::BoxTime,
    /// The engine, weakly (it owns the actors, not the other way round), for what spans both
    /// actors: resuming the sessions a failed park stopped, and the box-side API.
    pub engine: Weak<Engine>,
}

struct BoxActor {
    deps: BoxDeps,
    backend: Arc<Backend>,
    obj: BoxObject,
    /// Secret values live only here and in the egress proxy: never in the store or the API.
    secrets: Vec<berth_gateway::egress::Secret>,
    start: Start,
    /// Sequence number of the box's newest event.
    last_seq: i64,
    /// Start of the current egress-event minute, events recorded in it, and events dropped.
    egress_window: (Instant, u32, u64),
    state: watch::Sender<BoxObject>,
    rx: mpsc::Receiver<BoxCmd>,
}

/// What a running box is served with; dropped when it parks.
struct Served {
    // Held for their Drop: the box's host-side services end with it.
    _gateway: Service,
    _egress: Service,
    _api: Service,
    exit: watch::Receiver<Option<BoxExit>>,
}

/// A task serving one box's socket, aborted when dropped (the box parked, stopped, or failed to
/// come up part-way).
struct Service(tokio::task::JoinHandle<()>);

impl Drop for Service {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How the owner task gets its box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Make a new one in the backend.
    Create,
    /// Take back the box a previous server run left running (its event log ends at `last_seq`).
    Adopt { last_seq: i64 },
    /// A parked hybrid box: nothing runs until its next use restores it.
    Parked { last_seq: i64 },
}

pub fn spawn(
    deps: BoxDeps,
    backend: Arc<Backend>,
    obj: BoxObject,
    secrets: Vec<berth_gateway::egress::Secret>,
    start: Start,
) -> BoxHandle {
    let (tx, rx) = mpsc::channel(64);
    let (state_tx, state_rx) = watch::channel(obj.clone());
    let actor = BoxActor {
        deps,
        backend,
        obj,
        secrets,
        start,
        last_seq: match start {
            Start::Create => 0,
            Start::Adopt { last_seq } | Start::Parked { last_seq } => last_seq,
        },
        egress_window: (Instant::now(), 0, 0),
        state: state_tx,
        rx,
    };
    let span = tracing::info_span!("box", box_id = %actor.obj.id, tenant = %actor.obj.tenant);
    tokio::spawn(tracing::Instrument::instrument(actor.run(), span));
    BoxHandle {
        tx,
        state: state_rx,
    }
}

impl BoxActor {
    /// Append to the box's event log (seq is this task's to assign).
    async fn event(&mut self, kind: &str, data: serde_json::Value) {
        let e = berth_api::Event {
            seq: self.last_seq + 1,
            session_id: self.obj.id.clone(),
            ts: now(),
            kind: kind.into(),
            data,
        };
        match self
            .deps
            .store
            .append_box_events(std::slice::from_ref(&e))
            .await
        {
            Ok(()) => self.last_seq = e.seq,
            Err(err) => {
                tracing::error!(box_id = %self.obj.id, error = %err, "appending a box event")
            }
        }
    }

    /// Log an egress decision, at most [`EGRESS_EVENTS_PER_MINUTE`] a minute. Hand-written
    /// rather than a rate limiter: the drops are counted and the minute's end is when the count
    /// is logged (`egress_suppressed`), which a limiter's yes/no does not give.
    async fn egress(&mut self, d: berth_gateway::egress::Decision) {
        let (start, _, dropped) = self.egress_window;
        if start.elapsed() >= Duration::from_secs(60) {
            if dropped > 0 {
                self.event("egress_suppressed", serde_json::json!({"dropped": dropped}))
                    .await;
            }
            self.egress_window = (Instant::now(), 0, 0);
        }
        if self.egress_window.1 >= EGRESS_EVENTS_PER_MINUTE {
            self.egress_window.2 += 1;
            return;
        }
        self.egress_window.1 += 1;
        self.event(
            "egress",
            serde_json::json!({"host": d.host, "port": d.port, "allowed": d.allowed, "reason": d.reason,
                "bytes_up": d.bytes_up, "bytes_down": d.bytes_down}),
        )
        .await;
    }

    async fn set(&mut self, state: BoxState, reason: Option<String>) {
        metrics::counter!("berth_box_transitions_total", "to" => state.as_str()).increment(1);
        // Container time counts exactly while the box is running.
        match (
            self.obj.state == BoxState::Running,
            state == BoxState::Running,
        ) {
            (false, true) => self.deps.box_time.open(&self.obj).await,
            (true, false) => self.deps.box_time.close(&self.obj.id).await,
            _ => {}
        }
        self.event(
            "state",
            serde_json::json!({"state": state.as_str(), "reason": reason}),
        )
        .await;
        self.obj.state = state;
        self.obj.state_reason = reason;
        self.obj.updated_at = now();
        if let Err(e) = self.deps.store.put_box(&self.obj).await {
            tracing::error!(box_id = %self.obj.id, error = %e, "persisting box state");
        }
        self.state.send_replace(self.obj.clone());
    }

    fn box_config(&self) -> BoxConfig {
        BoxConfig {
            id: self.obj.id.clone(),
            image: match self.obj.image.as_str() {
                "host" => Image::Host,
                reference => Image::Oci(reference.to_string()),
            },
            limits: limits(&BoxSpec {
                resources: self.obj.resources,
                ..Default::default()
            }),
            env: box_env(&self.obj),
            bridges: vec![
                Bridge {
                    port: super::GATEWAY_PORT,
                    socket: "model.sock".into(),
                },
                Bridge {
                    port: super::EGRESS_PORT,
                    socket: "egress.sock".into(),
                },
                Bridge {
                    port: super::BOX_API_PORT,
                    socket: "api.sock".into(),
                },
            ],
        }
    }

    /// Make (or adopt) the box in its backend, unpack `archive` into it when restoring, open its
    /// gateway and egress sockets and go `running` with `reason`. On failure the box is
    /// released and the error returned; the caller records the state.
    async fn bring_up(
        &mut self,
        adopt: bool,
        archive: Option<&berth_api::SnapshotInfo>,
        reason: Option<String>,
    ) -> Result<Served, String> {
        let cfg = self.box_config();
        let started = Instant::now();
        let made = if adopt {
            self.backend.adopt(cfg).await
        } else {
            self.backend.create(cfg).await
        };
        let info = match made {
            Ok(info) => info,
            Err(e) => {
                let _ = self.backend.destroy(&self.obj.id).await;
                return Err(e.to_string());
            }
        };
        if !adopt {
            metrics::histogram!("berth_box_start_seconds", "backend" => self.backend.name().to_owned())
                .record(started.elapsed().as_secs_f64());
        }
        if let Some(snap) = archive {
            let unpacked = match self
                .deps
                .snapshots
                .get_stream(&snap.key, &snap.sha256)
                .await
            {
                Ok(stream) => super::park::unpack(&self.backend, &self.obj.id, stream).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = unpacked {
                let _ = self.backend.destroy(&self.obj.id).await;
                // The store's errors name server paths: logged, not shown.
                tracing::error!(box_id = %self.obj.id, error = %e, "unpacking a snapshot");
                return Err(match e {
                    super::park::ParkError::Store(_) => {
                        "the snapshot could not be read intact".to_string()
                    }
                    e => format!("unpacking the snapshot: {e}"),
                });
            }
        }
        match self.serve(&info.run_dir) {
            Ok(served) => {
                self.set(BoxState::Running, reason).await;
                Ok(served)
            }
            Err(e) => {
                let _ = self.backend.destroy(&self.obj.id).await;
                Err(e)
            }
        }
    }

    /// The box's only ways out and in: its own gateway, egress proxy and box-side API sockets
    /// in `run_dir`, and its exit watch. A step that fails drops (aborts) the ones before it.
    fn serve(&self, run_dir: &std::path::Path) -> Result<Served, String> {
        let egress = Service(
            self.deps
                .egress
                .serve_box(
                    &self.obj.id,
                    self.obj.network.allow.clone(),
                    self.secrets.clone(),
                    &run_dir.join("egress.sock"),
                )
                .map_err(|e| format!("egress proxy: {e}"))?,
        );
        let gateway = Service(
            self.deps
                .gateway
                .serve_box(&self.obj.id, &run_dir.join("model.sock"))
                .map_err(|e| format!("gateway: {e}"))?,
        );
        let api = Service(
            super::shared::serve_box_api(
                self.deps.engine.clone(),
                self.deps.gateway.clone(),
                &self.obj.id,
                &run_dir.join("api.sock"),
            )
            .map_err(|e| format!("box api: {e}"))?,
        );
        let exit = self
            .backend
            .exit_watch(&self.obj.id)
            .map_err(|e| e.to_string())?;
        Ok(Served {
            _gateway: gateway,
            _egress: egress,
            _api: api,
            exit,
        })
    }

    async fn run(mut self) {
        let mut served = match self.start {
            Start::Parked { .. } => None,
            Start::Create => match self.bring_up(false, None, None).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(box_id = %self.obj.id, error = %e, "box failed to start");
                    self.set(BoxState::Failed, Some(e)).await;
                    self.deps.registry.forget_box(&self.obj.id);
                    return;
                }
            },
            Start::Adopt { .. } => {
                let reason = Some("adopted after a server restart".to_string());
                match self.bring_up(true, None, reason).await {
                    Ok(s) => {
                        tracing::info!(box_id = %self.obj.id, "adopted a box the previous run left running");
                        Some(s)
                    }
                    Err(e) => {
                        self.set(
                            BoxState::Stopped,
                            Some(format!(
                                "server restarted; the box could not be taken back: {e}"
                            )),
                        )
                        .await;
                        self.deps.registry.forget_box(&self.obj.id);
                        return;
                    }
                }
            }
        };
        let idle = self.obj.idle_timeout_s.map(Duration::from_secs);
        let lifetime = self
            .obj
            .max_lifetime_s
            .map(|s| Instant::now() + Duration::from_secs(s));
        let mut last_activity = Instant::now();
        loop {
            let running = self.obj.state == BoxState::Running && served.is_some();
            let idle_deadline = if running {
                idle.map(|d| last_activity + d)
            } else {
                None
            };
            let life_deadline = if running { lifetime } else { None };
            let exit_changed = async {
                match served.as_mut() {
                    Some(s) => s.exit.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(BoxCmd::Touch) => last_activity = Instant::now(),
                    Some(BoxCmd::Egress(d)) => self.egress(d).await,
                    Some(BoxCmd::Destroy { reply }) => {
                        if self.obj.keep_workspace && running {
                            self.keep_workspace().await;
                        }
                        let r = self.teardown(BoxState::Destroyed, None).await;
                        self.drop_snapshot().await;
                        let _ = reply.send(r.map(|_| self.obj.clone()));
                        break;
                    }
                    Some(BoxCmd::Shutdown { reply }) => {
                        if self.obj.state == BoxState::Running {
                            let _ = self.teardown(BoxState::Stopped, Some("server shut down".into())).await;
                        }
                        let _ = reply.send(());
                        break;
                    }
                    Some(BoxCmd::Park { reply }) => {
                        let busy = self.deps.registry.box_busy(&self.obj.id);
                        let r = match rules::park_request(self.obj.lifecycle, self.obj.state, running, busy) {
                            rules::ParkRequest::Refuse(e) => Err(e),
                            rules::ParkRequest::AlreadyParked => Ok(self.obj.clone()),
                            rules::ParkRequest::Park => {
                                self.park(&mut served, "requested").await;
                                match self.obj.state {
                                    BoxState::Parked => Ok(self.obj.clone()),
                                    _ => Err(EngineError::Internal(
                                        self.obj.state_reason.clone().unwrap_or_default(),
                                    )),
                                }
                            }
                        };
                        last_activity = Instant::now();
                        let _ = reply.send(r);
                    }
                    Some(BoxCmd::Restore { reply }) => {
                        let r = self.restore(&mut served).await;
                        last_activity = Instant::now();
                        let _ = reply.send(r);
                    }
                    None => break,
                },
                changed = exit_changed, if running => {
                    if !changed {
                        continue;
                    }
                    let why = served.as_ref().and_then(|s| s.exit.borrow().clone());
                    let Some(reason) = rules::death_reason(why.as_ref()) else {
                        continue;
                    };
                    tracing::warn!(box_id = %self.obj.id, %reason, "box died");
                    let _ = self.backend.destroy(&self.obj.id).await;
                    self.set(BoxState::Failed, Some(reason)).await;
                }
                _ = sleep_until_opt(idle_deadline) => {
                    let busy = self.deps.registry.box_busy(&self.obj.id);
                    match rules::at_idle(self.obj.lifecycle, busy) {
                        rules::AtIdle::Park => {
                            self.park(&mut served, "idle_timeout").await;
                            last_activity = Instant::now();
                        }
                        rules::AtIdle::Postpone => last_activity = Instant::now(),
                        rules::AtIdle::Stop => {
                            let _ = self.teardown(BoxState::Stopped, Some("idle_timeout".into())).await;
                        }
                    }
                }
                _ = sleep_until_opt(life_deadline) => {
                    let _ = self.teardown(BoxState::Stopped, Some("max_lifetime".into())).await;
                }
            }
        }
        drop(served);
        self.deps.registry.forget_box(&self.obj.id);
    }

    /// Idle hybrid box: stop its agents, snapshot it, verify the snapshot, destroy the box. A
    /// failure at any step before the destroy leaves the box running (its agents restarted).
    async fn park(&mut self, served: &mut Option<Served>, why: &str) {
        let t = Instant::now();
        self.set(BoxState::Parking, Some(why.into())).await;
        let sessions = self
            .deps
            .registry
            .stop_box_sessions(&self.obj.id, "box parked")
            .await;
        let key = format!("boxes/{}/{}.tar.zst", self.obj.id, self.last_seq + 1);
        let mut snapshot = match self
            .archive(&super::park::PATHS, super::park::Audience::Box, key)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(box_id = %self.obj.id, error = %e, "parking failed; the box keeps running");
                self.set(BoxState::Running, Some(format!("park failed: {e}")))
                    .await;
                if let Some(engine) = self.deps.engine.upgrade() {
                    engine.resume_sessions(&self.obj.tenant, &sessions).await;
                }
                return;
            }
        };
        snapshot.sessions = sessions;
        self.obj.snapshot = Some(snapshot);
        *served = None;
        if let Err(e) = self.backend.destroy(&self.obj.id).await {
            tracing::error!(box_id = %self.obj.id, error = %e, "destroying a parked box");
        }
        self.set(BoxState::Parked, Some(why.into())).await;
        metrics::histogram!("berth_box_park_seconds").record(t.elapsed().as_secs_f64());
    }

    /// A parked box's next use: a fresh box at the same paths with the snapshot unpacked.
    /// Answers with the sessions to resume; a box that is not parked answers at once.
    async fn restore(&mut self, served: &mut Option<Served>) -> Result<Vec<String>, EngineError> {
        if self.obj.state != BoxState::Parked {
            return Ok(vec![]);
        }
        let Some(snap) = self.obj.snapshot.clone() else {
            return Err(EngineError::Internal(
                "parked box without a snapshot".into(),
            ));
        };
        // A parked box holds nothing: coming back counts against the tenant's limits again.
        let admitted = self
            .deps
            .admission
            .admit(&self.obj.tenant, &self.obj.resources)?;
        let t = Instant::now();
        self.set(BoxState::Restoring, None).await;
        // `restoring` is published: the box now counts as held by its state, not twice.
        drop(admitted);
        let reason = Some("restored from its snapshot".to_string());
        let restored = self.bring_up(false, Some(&snap), reason).await;
        match restored {
            Ok(s) => *served = Some(s),
            Err(e) => {
                // The snapshot stays; the box stays parked and may be tried again.
                self.set(BoxState::Parked, Some(format!("restore failed: {e}")))
                    .await;
                return Err(EngineError::Internal(format!(
                    "restoring box {}: {e}",
                    self.obj.id
                )));
            }
        }
        metrics::histogram!("berth_box_restore_seconds").record(t.elapsed().as_secs_f64());
        self.drop_snapshot().await;
        Ok(snap.sessions)
    }

    /// Archive `/workspace` for download after the box is gone. A failure is recorded in the
    /// box's events and does not hold up the destroy.
    async fn keep_workspace(&mut self) {
        let key = format!("artifacts/{}.tar.zst", self.obj.id);
        match self
            .archive(&["workspace"], super::park::Audience::Client, key)
            .await
        {
            Ok(a) => self.obj.artifact = Some(a),
            Err(e) => {
                self.event("artifact_failed", serde_json::json!({ "reason": e }))
                    .await
            }
        }
    }

    /// `paths` of the box archived by `tar` inside it and stored at `key`; the error is fit
    /// for clients (the store's own, which names server paths, is only logged).
    async fn archive(
        &mut self,
        paths: &[&str],
        audience: super::park::Audience,
        key: String,
    ) -> Result<berth_api::SnapshotInfo, String> {
        let store_error = |e: &dyn std::fmt::Display| {
            tracing::error!(box_id = %self.obj.id, error = %e, "storing an archive");
            "the archive could not be stored".to_string()
        };
        let mut out = self
            .deps
            .snapshots
            .writer(&key)
            .await
            .map_err(|e| store_error(&e))?;
        let dropped = match super::park::capture_paths(
            &self.backend,
            &self.obj.id,
            paths,
            audience,
            self.obj.resources.disk_mib,
            &mut out,
        )
        .await
        {
            Ok(d) => d,
            Err(e) => {
                let _ = out.abort().await;
                return Err(match e {
                    super::park::ParkError::Store(e) => store_error(&e),
                    e => e.to_string(),
                });
            }
        };
        let s = out.finish().await.map_err(|e| store_error(&e))?;
        if dropped.count > 0 {
            self.event(
                "artifact_entries_dropped",
                serde_json::json!({"count": dropped.count, "names": dropped.names,
                    "reason": "links leading out of the archive, unsafe names, devices"}),
            )
            .await;
        }
        Ok(berth_api::SnapshotInfo {
            key: s.key,
            bytes: s.bytes,
            sha256: s.sha256,
            taken_at: now(),
            sessions: vec![],
        })
    }

    /// Forget the box's snapshot (restored or destroyed): the object store's copy goes too.
    async fn drop_snapshot(&mut self) {
        if let Some(snap) = self.obj.snapshot.take() {
            if let Err(e) = self.deps.snapshots.delete(&snap.key).await {
                tracing::warn!(box_id = %self.obj.id, error = %e, "deleting a snapshot");
            }
            self.obj.updated_at = now();
            if let Err(e) = self.deps.store.put_box(&self.obj).await {
                tracing::error!(box_id = %self.obj.id, error = %e, "persisting box state");
            }
            self.state.send_replace(self.obj.clone());
        }
    }

    async fn teardown(&mut self, to: BoxState, reason: Option<String>) -> Result<(), EngineError> {
        let r = self.backend.destroy(&self.obj.id).await;
        match r {
            Ok(()) => {
                self.set(to, reason).await;
                Ok(())
            }
            Err(e) => {
                tracing::error!(box_id = %self.obj.id, error = %e, "destroying box");
                self.set(BoxState::Failed, Some(format!("destroy failed: {e}")))
                    .await;
                Err(e.into())
            }
        }
    }
}
