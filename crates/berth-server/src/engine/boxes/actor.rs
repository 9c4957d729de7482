//! The box owner task.
//!
//! States: `creating` → `running` → (`stopped` | `failed`) → `destroyed`. The task creates the
//! box in its backend, then waits for, one at a time: commands (destroy, shutdown, touch), the
//! backend reporting that the box died, the idle deadline (`idle_timeout_s` since the last
//! activity) and the lifetime deadline (`max_lifetime_s` since start). Each transition is written
//! to the store and published on the `watch` channel before the next is taken.

use super::spec::{box_env, limits};
use crate::auth::now;
use crate::engine::error::EngineError;
use crate::engine::{rules, sleep_until_opt, Engine};
use berth_api::{BoxObject, BoxSpec, BoxState};
use berth_sandbox::{Backend, BoxConfig, BoxExit, Bridge, Image, Sandbox};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

pub enum BoxCmd {
    /// Destroy the box (archiving its workspace first if it keeps one). With `stop_sessions`,
    /// the box first stops its live sessions with that reason (a client's delete); an ephemeral
    /// session that ended sends it without.
    Destroy {
        stop_sessions: Option<String>,
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
    /// Bring a parked box back (its sessions resumed); answers once it runs.
    Restore {
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// An egress decision to record in the box's event log.
    Egress(berth_gateway::egress::Decision),
    /// Change the idle timeout (`None`: never) and restart the idle clock: a warm pool's box,
    /// idle "never" while it waits, gets its spec's timeout when a session takes it.
    SetIdleTimeout {
        idle_timeout_s: Option<u64>,
        reply: oneshot::Sender<()>,
    },
}

/// Egress decisions recorded per box per minute; the rest are counted in one summary event.
const EGRESS_EVENTS_PER_MINUTE: u32 = 600;

#[derive(Clone)]
pub struct BoxHandle {
    pub tx: mpsc::Sender<BoxCmd>,
    pub state: watch::Receiver<BoxObject>,
    /// Uses in flight (an exec, a file transfer, a port connection), shared with the owner
    /// task: its idle deadline waits for them.
    in_use: Arc<AtomicUsize>,
}

impl BoxHandle {
    /// Record activity (resets the idle timer). Never blocks; a full queue already holds a touch
    /// or something more important.
    pub fn touch(&self) {
        let _ = self.tx.try_send(BoxCmd::Touch);
    }

    /// Count a use from now until the guard drops: a box is not idle while an exec runs or
    /// a file or port stream is open, however long it takes (a park would cut it). The use
    /// counts as activity at both ends.
    pub fn hold(&self) -> InUse {
        self.in_use.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InUse {
            count: self.in_use.clone(),
            tx: self.tx.clone(),
        }
    }
}

/// One use of a box in flight (`BoxHandle::hold`).
pub struct InUse {
    count: Arc<AtomicUsize>,
    tx: mpsc::Sender<BoxCmd>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        // The idle clock restarts at the end of the use, not its start.
        let _ = self.tx.try_send(BoxCmd::Touch);
    }
}

/// What a box's owner task uses of the engine: the store, the snapshot store, the box's three
/// host-side services, the registry, admission (a restore is admitted again) and container time.
pub struct BoxDeps {
    pub store: Arc<dyn berth_store::Store>,
    pub snapshots: berth_store::snapshots::SnapshotStore,
    pub gateway: Arc<berth_gateway::Gateway>,
    pub egress: Arc<berth_gateway::egress::Egress>,
    pub registry: Arc<crate::engine::registry::Registry>,
    pub admission: Arc<crate::engine::admission::Admission>,
    pub box_time: crate::engine::ledger::BoxTime,
    /// The engine, weakly (it owns the actors, not the other way round), for what spans both
    /// actors: resuming the sessions a failed park stopped, and the box-side API.
    pub engine: Weak<Engine>,
}

pub(super) struct BoxActor {
    pub(super) deps: BoxDeps,
    pub(super) backend: Arc<Backend>,
    pub(super) obj: BoxObject,
    /// Secret values live only here and in the egress proxy: never in the store or the API.
    pub(super) secrets: Vec<berth_gateway::egress::Secret>,
    pub(super) start: Start,
    /// Sequence number of the box's newest event.
    pub(super) last_seq: i64,
    /// Start of the current egress-event minute, events recorded in it, and events dropped.
    pub(super) egress_window: (Instant, u32, u64),
    /// Written only by [`BoxActor::publish`], which also updates the registry's count.
    state: watch::Sender<BoxObject>,
    pub(super) rx: mpsc::Receiver<BoxCmd>,
    /// `BoxHandle::hold`'s count of uses in flight.
    pub(super) in_use: Arc<AtomicUsize>,
}

/// The socket in a box's run directory (`/run/berth` in the box) that every bridged port of
/// the box connects to, each connection prefaced with its port ([`berth_gateway::conn::Door`]).
pub(crate) const BRIDGE_SOCKET: &str = "bridge.sock";

/// What a running box is served with; dropped when it parks.
pub(super) struct Served {
    // Held for their Drop: the box's host-side services end with it.
    pub(super) _door: Service,
    pub(super) _gateway: Service,
    pub(super) _egress: Service,
    pub(super) _api: Service,
    pub(super) exit: watch::Receiver<Option<BoxExit>>,
}

/// A task serving one box's socket, aborted when dropped (the box parked, stopped, or failed to
/// come up part-way).
pub(super) struct Service(tokio::task::JoinHandle<()>);

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
    let in_use = Arc::new(AtomicUsize::new(0));
    let actor = BoxActor {
        in_use: in_use.clone(),
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
        in_use,
    }
}

impl BoxActor {
    /// Append to the box's event log (seq is this task's to assign).
    pub(super) async fn event(&mut self, kind: &str, data: serde_json::Value) {
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

    pub(super) async fn set(&mut self, state: BoxState, reason: Option<String>) {
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
        self.publish();
    }

    /// Publish the box's state to its handles, then to the registry's per-tenant count (in
    /// that order: see [`Registry::insert_box`](crate::engine::registry::Registry::insert_box)).
    pub(super) fn publish(&self) {
        self.state.send_replace(self.obj.clone());
        self.deps.registry.publish_box(&self.obj);
    }

    pub(super) fn box_config(&self) -> BoxConfig {
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
            // All through the box's one door (see `serve`).
            bridges: [
                crate::engine::GATEWAY_PORT,
                crate::engine::EGRESS_PORT,
                crate::engine::BOX_API_PORT,
            ]
            .map(|port| Bridge {
                port,
                socket: BRIDGE_SOCKET.into(),
            })
            .to_vec(),
        }
    }

    /// Make (or adopt) the box in its backend, unpack `archive` into it when restoring, open its
    /// gateway and egress sockets and go `running` with `reason`. On failure the box is
    /// released and the error returned; the caller records the state.
    pub(super) async fn bring_up(
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
                Ok(stream) => {
                    crate::engine::park::unpack(&self.backend, &self.obj.id, stream).await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = unpacked {
                let _ = self.backend.destroy(&self.obj.id).await;
                // The store's errors name server paths: logged, not shown.
                tracing::error!(box_id = %self.obj.id, error = %e, "unpacking a snapshot");
                return Err(match e {
                    crate::engine::park::ParkError::Store(_) => {
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

    /// The box's only ways out and in: its own gateway, egress proxy and box-side API, behind
    /// the box's one door in `run_dir` (one descriptor per box: the server's open-file limit
    /// caps the boxes it holds), and its exit watch. A step that fails drops (aborts) the ones
    /// before it.
    fn serve(&self, run_dir: &std::path::Path) -> Result<Served, String> {
        let listener = berth_gateway::bind_box_socket(&run_dir.join(BRIDGE_SOCKET))
            .map_err(|e| format!("bridge socket: {e}"))?;
        let mut door = berth_gateway::conn::Door::new();
        let egress = Service(self.deps.egress.serve_box(
            &self.obj.id,
            self.obj.network.allow.clone(),
            self.secrets.clone(),
            door.route(crate::engine::EGRESS_PORT),
        ));
        let gateway = Service(
            self.deps
                .gateway
                .serve_box(&self.obj.id, door.route(crate::engine::GATEWAY_PORT)),
        );
        let api = Service(crate::engine::shared::serve_box_api(
            self.deps.engine.clone(),
            self.deps.gateway.clone(),
            &self.obj.id,
            door.route(crate::engine::BOX_API_PORT),
        ));
        // The box's bridge writes the preface as it connects: the header timeout is ample.
        let preface = self.deps.gateway.conn_limits().header_timeout;
        let door = Service(tokio::spawn(door.serve(listener, preface)));
        let exit = self
            .backend
            .exit_watch(&self.obj.id)
            .map_err(|e| e.to_string())?;
        Ok(Served {
            _door: door,
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
        let mut idle = self.obj.idle_timeout_s.map(Duration::from_secs);
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
                    Some(BoxCmd::SetIdleTimeout { idle_timeout_s, reply }) => {
                        self.obj.idle_timeout_s = idle_timeout_s;
                        self.obj.updated_at = now();
                        if let Err(e) = self.deps.store.put_box(&self.obj).await {
                            tracing::error!(box_id = %self.obj.id, error = %e, "persisting the idle timeout");
                        }
                        self.publish();
                        idle = idle_timeout_s.map(Duration::from_secs);
                        last_activity = Instant::now();
                        let _ = reply.send(());
                    }
                    Some(BoxCmd::Destroy { stop_sessions, reply }) => {
                        // Each session's owner answers a stop before it tells its box anything,
                        // so this wait cannot close a loop.
                        if let Some(reason) = stop_sessions {
                            self.deps.registry.stop_box_sessions(&self.obj.id, &reason).await;
                        }
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
                    let in_flight = self.in_use.load(Ordering::SeqCst) > 0;
                    match rules::at_idle(self.obj.lifecycle, busy, in_flight) {
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
