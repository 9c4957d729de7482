//! The session owner task.
//!
//! States: `starting` → `running` ⇄ `idle` → `stopped` | `failed`. The task starts the agent
//! process in the box, then serialises everything that touches the session: client commands
//! (message, interrupt, permission answer, stop) and the agent's output. Output is turned into
//! events by the session's driver, numbered (`seq` is per session, gapless), written to the
//! store in one transaction per batch, and only then broadcast. When the agent ends, an
//! ephemeral box is destroyed with it. A session started with a prompt in an ephemeral box
//! ends at its first `result` (the task is done) unless the client keeps it open (`keep_open`,
//! or a message sent before that result).

use super::previews::Preview;
use crate::auth::now;
use crate::engine::boxes::{BoxCmd, BoxHandle};
use crate::engine::error::EngineError;
use crate::engine::sleep_until_opt;
use berth_agent::{AgentEvent, Driver, Interrupt, Output, Update};
use berth_api::{Event, EventKind, Lifecycle, PermissionAnswer, SessionObject, SessionState};
use berth_sandbox::{Backend, ExecEvent, ExecHandle, ExecInput, ExecSpec, Sandbox};
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Live events kept for subscribers; one that falls further behind reads from the store.
const BROADCAST_CAPACITY: usize = 1024;
/// Most agent output chunks folded into one store transaction.
const MAX_BATCH: usize = 256;
/// Client stdin bytes an sdk session lets wait in the box's input queue: past this the
/// client's next write waits (and its socket is not read meanwhile), so a CLI that stops
/// reading holds little server memory.
pub const SDK_STDIN_QUEUED: usize = 1 << 20;
/// Input queue slots kept free of client stdin, for the session's own writes (the kill).
const SDK_SLOTS_KEPT: usize = 8;
/// How often a waiting client write looks for room again (the queue has no drain signal).
const SDK_STDIN_RETRY: std::time::Duration = std::time::Duration::from_millis(10);
/// Longest the actor waits for room in the box's input queue for its own writes: past it the
/// write fails, so a box that stops reading its stdin cannot keep the actor from `Stop`.
const INPUT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub enum SessionCmd {
    Message {
        content: Value,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Interrupt {
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Permission {
        request_id: String,
        answer: PermissionAnswer,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Stop {
        reason: String,
        reply: oneshot::Sender<SessionObject>,
    },
    SetPermissionMode {
        mode: String,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// A server-side notice to record in the event log.
    Notice { kind: EventKind, data: Value },
    /// A model answer's usage as the gateway metered it (`previews::MODEL_USAGE`), logged
    /// before the agent reads the answer's end; answered once committed.
    Metered {
        data: Value,
        reply: oneshot::Sender<()>,
    },
    /// Bytes an sdk session's client connection `generation` writes to the CLI's stdin
    /// (None: end of input). Answered once they are queued to the box (or refused).
    ClientStdin {
        generation: u64,
        bytes: Option<bytes::Bytes>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
}

#[derive(Clone)]
pub struct SessionHandle {
    pub tx: mpsc::Sender<SessionCmd>,
    pub state: watch::Receiver<SessionObject>,
    pub events: broadcast::Sender<Arc<LiveEvent>>,
    /// Live previews of the model's output (see `previews`).
    pub previews: broadcast::Sender<Arc<Preview>>,
    /// The CLI's stdout relay of an sdk session (see `sdk_sessions`).
    pub sdk: Option<Arc<berth_agent::Relay>>,
}

/// What a session's owner task uses of the engine: the store (events, the session), the
/// gateway (its token is revoked when it ends), the registry (it leaves it) and the event caps.
#[derive(Clone)]
pub struct SessionDeps {
    pub store: Arc<dyn berth_store::Store>,
    pub gateway: Arc<berth_gateway::Gateway>,
    pub registry: Arc<crate::engine::registry::Registry>,
    pub events: crate::engine::event_cap::Limits,
    /// The CPU weight raise the agent's start gets (see `berth_sandbox::StartBoost`).
    pub start_boost: Option<berth_sandbox::StartBoost>,
}

struct SessionActor {
    deps: SessionDeps,
    backend: Arc<Backend>,
    box_handle: BoxHandle,
    lifecycle: Lifecycle,
    driver: Driver,
    obj: SessionObject,
    state: watch::Sender<SessionObject>,
    events: broadcast::Sender<Arc<LiveEvent>>,
    previews: broadcast::Sender<Arc<Preview>>,
    /// A Managed Agents session: the agent streams partial messages, which become previews,
    /// not events.
    managed_agents: bool,
    /// Previews of the batch being committed, each with its place among its events.
    pending_previews: Vec<(usize, Value)>,
    rx: mpsc::Receiver<SessionCmd>,
    prompt: Option<String>,
    /// End the session (and so its ephemeral box) at the agent's next `result`.
    end_at_result: bool,
    /// The session ended at a result while the agent process still runs.
    done_at_result: bool,
    /// The agent's program (for errors), and whether its process has started.
    program: String,
    started: bool,
    /// The session's gateway token, revoked when the session ends.
    token: String,
    /// Agent-reported cost of the earlier runs of this session (before a resume): the agent
    /// counts from its own start.
    cost_base: f64,
    /// Rate and size caps on the agent's events (see `event_cap`).
    cap: crate::engine::event_cap::EventCap,
    /// The agent, already started in the box (a warm pool's): used instead of starting one.
    prestarted: Option<ExecHandle>,
    /// A client stdin write waiting for room in the box's input queue (one at a time).
    stdin_wait: Option<ClientWrite>,
    /// Sizes of the latest client stdin writes queued to the box, oldest first: the queue's
    /// last `len - capacity` of them are still in it.
    stdin_sizes: std::collections::VecDeque<usize>,
}

struct ClientWrite {
    generation: u64,
    bytes: Option<bytes::Bytes>,
    reply: oneshot::Sender<Result<(), EngineError>>,
}

/// Queue `input` to the box, waiting at most [`INPUT_WAIT`] for room.
async fn send_input(h: &ExecHandle, input: ExecInput) -> Result<(), EngineError> {
    match tokio::time::timeout(INPUT_WAIT, h.input.send(input)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(EngineError::Conflict("the agent is not running".into())),
        Err(_) => Err(EngineError::Conflict(
            "the agent is not reading its input".into(),
        )),
    }
}

/// An event as subscribers receive it: encoded to JSON once, shared by all of them.
#[derive(Debug)]
pub struct LiveEvent {
    pub event: Event,
    pub json: String,
    /// When it was committed, for events broadcast live (None when replayed from the store).
    pub committed: Option<std::time::Instant>,
}

impl LiveEvent {
    /// An event read back from the store.
    pub fn new(event: Event) -> LiveEvent {
        let json = serde_json::to_string(&event).unwrap_or_default();
        LiveEvent {
            event,
            json,
            committed: None,
        }
    }

    /// An event just committed, about to be broadcast.
    pub fn live(event: Event) -> LiveEvent {
        LiveEvent {
            committed: Some(std::time::Instant::now()),
            ..LiveEvent::new(event)
        }
    }
}

/// Everything a session owner task starts with.
pub struct SessionStart {
    pub deps: SessionDeps,
    pub backend: Arc<Backend>,
    pub box_handle: BoxHandle,
    pub lifecycle: Lifecycle,
    pub driver: Driver,
    pub obj: SessionObject,
    pub prompt: Option<String>,
    /// See `SessionSpec::keep_open`.
    pub keep_open: bool,
    /// The session's gateway token.
    pub token: String,
    /// The agent, already started in the box (a warm pool's): used instead of starting one.
    pub prestarted: Option<ExecHandle>,
}

pub fn spawn(start: SessionStart) -> SessionHandle {
    let (tx, rx) = mpsc::channel(64);
    let (state_tx, state_rx) = watch::channel(start.obj.clone());
    let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
    let (previews, _) = broadcast::channel(super::previews::CAPACITY);
    let managed_agents =
        matches!(&start.obj.agent, berth_api::AgentSpec::Claude(c) if c.managed_agents);
    let sdk = start.driver.sdk_relay();
    if let Some(r) = &sdk {
        crate::engine::sdk_sessions::watch(
            start.deps.registry.clone(),
            start.obj.id.clone(),
            r.clone(),
        );
    }
    let actor = SessionActor {
        cap: crate::engine::event_cap::EventCap::new(start.deps.events),
        deps: start.deps,
        backend: start.backend,
        box_handle: start.box_handle,
        lifecycle: start.lifecycle,
        driver: start.driver,
        cost_base: start.obj.agent_cost_usd.unwrap_or(0.0),
        obj: start.obj,
        state: state_tx,
        events: events.clone(),
        previews: previews.clone(),
        managed_agents,
        pending_previews: Vec::new(),
        rx,
        program: String::new(),
        started: false,
        done_at_result: false,
        end_at_result: crate::engine::rules::ends_at_result(
            start.lifecycle,
            start.prompt.is_some(),
            start.keep_open,
        ),
        prompt: start.prompt,
        token: start.token,
        prestarted: start.prestarted,
        stdin_wait: None,
        stdin_sizes: std::collections::VecDeque::new(),
    };
    let span = tracing::info_span!("session", session_id = %actor.obj.id, box_id = %actor.obj.box_id, tenant = %actor.obj.tenant);
    tokio::spawn(tracing::Instrument::instrument(actor.run(), span));
    SessionHandle {
        tx,
        state: state_rx,
        events,
        previews,
        sdk,
    }
}

fn replaced() -> EngineError {
    EngineError::Conflict("replaced by a newer connection".into())
}

impl SessionActor {
    /// Number and persist `evs`, apply `update` to the session (a state change adds a `status`
    /// event to the same batch), persist and publish the session, and only then broadcast the
    /// events: a client that sees an event and then reads the session sees the session as of
    /// that event or later.
    async fn commit(&mut self, mut evs: Vec<AgentEvent>, update: Update) {
        let previews = std::mem::take(&mut self.pending_previews);
        // Events put before the batch's own (a `running` status): previews move with them.
        let mut shift = 0;
        let mut dirty = false;
        if let Some(id) = update.agent_session_id {
            dirty |= self.obj.agent_session_id.as_deref() != Some(id.as_str());
            self.obj.agent_session_id = Some(id);
        }
        if let Some(v) = update.cli_version {
            dirty |= self.obj.cli_version.as_deref() != Some(v.as_str());
            self.obj.cli_version = Some(v);
        }
        if let Some(c) = update.agent_cost_usd {
            self.obj.agent_cost_usd = Some(self.cost_base + c);
            dirty = true;
        }
        if let Some(state) = update.state {
            // A terminal state is final.
            if !self.obj.state.is_terminal()
                && (state != self.obj.state || update.state_reason != self.obj.state_reason)
            {
                self.obj.state = state;
                self.obj.state_reason = update.state_reason.clone();
                let status = AgentEvent {
                    kind: EventKind::Status,
                    data: json!({"state": state.as_str(), "reason": update.state_reason}),
                };
                // `running` is caused by the output in this batch, so it comes first; `idle`,
                // `stopped` and `failed` follow the output that ended the work (a result, an
                // exit).
                if state == SessionState::Running {
                    evs.insert(0, status);
                    shift = 1;
                } else {
                    evs.push(status);
                }
                dirty = true;
            }
        }
        if evs.is_empty() && !dirty {
            self.send_previews(previews, self.obj.last_seq + 1);
            return;
        }
        let ts = now();
        let first = self.obj.last_seq;
        let batch: Vec<Event> = evs
            .into_iter()
            .enumerate()
            .map(|(i, e)| Event {
                seq: first + 1 + i as i64,
                session_id: self.obj.id.clone(),
                ts: ts.clone(),
                kind: e.kind,
                data: e.data,
            })
            .collect();
        let updated_at = std::mem::replace(&mut self.obj.updated_at, ts);
        self.obj.last_seq = first + batch.len() as i64;
        // The events and the record in one transaction: a reader of the store (another
        // server's relay, a replay) never sees an event before the record reflects it.
        if let Err(e) = self.deps.store.commit_session(&self.obj, &batch).await {
            // Without the store the log would have a hole: drop the batch, say so.
            tracing::error!(session_id = %self.obj.id, error = %e, "committing events");
            self.obj.last_seq = first;
            self.obj.updated_at = updated_at;
            return;
        }
        metrics::counter!("berth_events_total").increment(batch.len() as u64);
        self.state.send_replace(self.obj.clone());
        // Before the events: a reader holds a preview until the event before it has gone by.
        self.send_previews(previews, first + 1 + shift);
        if self.events.receiver_count() > 0 {
            for e in batch {
                let _ = self.events.send(Arc::new(LiveEvent::live(e)));
            }
        }
        self.box_handle.touch();
    }

    /// Broadcast previews; `base` is the seq of the first stored event of their batch.
    fn send_previews(&self, previews: Vec<(usize, Value)>, base: i64) {
        if previews.is_empty() || self.previews.receiver_count() == 0 {
            return;
        }
        for (at, event) in previews {
            let next_seq = base + at as i64;
            let _ = self.previews.send(Arc::new(Preview { next_seq, event }));
        }
    }

    async fn record(&mut self, evs: Vec<AgentEvent>) {
        self.commit(evs, Update::default()).await;
    }

    async fn set_state(&mut self, state: SessionState, reason: Option<String>) {
        self.commit(
            vec![],
            Update {
                state: Some(state),
                state_reason: reason,
                ..Default::default()
            },
        )
        .await;
    }

    async fn apply(&mut self, out: Output) {
        self.commit(out.events, out.update).await;
    }

    async fn run(mut self) {
        let launch = self.driver.launch();
        self.program = launch.argv.first().cloned().unwrap_or_default();
        let mut spec = ExecSpec {
            argv: launch.argv,
            cwd: Some(launch.cwd),
            env: launch.env,
            // Only the agent's own start: a warm pool's CLI starts without it (at low
            // priority), and execs through the API never get it.
            start_boost: self.deps.start_boost,
            ..Default::default()
        };
        // The box-side berth API (messages to the box's other sessions) knows the agent by
        // its session token.
        spec.env.extend([
            ("BERTH_SESSION_ID".to_string(), self.obj.id.clone()),
            ("BERTH_SESSION_TOKEN".to_string(), self.token.clone()),
            (
                "BERTH_API_URL".to_string(),
                format!("http://127.0.0.1:{}", crate::engine::BOX_API_PORT),
            ),
        ]);
        // A command agent reaches the model as any Anthropic client does: its base URL is the
        // box's gateway and its key the session's token (the same token as above, metered and
        // budgeted as the session's; the real key stays in the gateway). An Agent SDK app run as
        // a command agent needs no set-up. The Claude driver sets its own.
        if matches!(self.driver, Driver::Command(_)) {
            spec.env.extend([
                (
                    "ANTHROPIC_BASE_URL".to_string(),
                    format!("http://127.0.0.1:{}", crate::engine::GATEWAY_PORT),
                ),
                ("ANTHROPIC_API_KEY".to_string(), self.token.clone()),
            ]);
        }
        if let Some(uid) = self.obj.uid {
            crate::engine::shared::confine(&mut spec, uid, &self.obj.workdir);
        }
        let started = match self.prestarted.take() {
            Some(h) => Ok(h),
            None => self.backend.exec(&self.obj.box_id, spec).await,
        };
        let mut exec: Option<ExecHandle> = match started {
            Ok(h) => Some(h),
            Err(e) => {
                let why = match &e {
                    berth_sandbox::SandboxError::Start(m) => {
                        crate::engine::start_failure(&self.program, m)
                    }
                    other => other.to_string(),
                };
                self.record(vec![AgentEvent {
                    kind: EventKind::Error,
                    data: json!({"message": why}),
                }])
                .await;
                self.set_state(
                    SessionState::Failed,
                    Some(format!("agent failed to start: {why}")),
                )
                .await;
                None
            }
        };
        if exec.is_some() {
            self.set_state(SessionState::Idle, None).await;
            if let Some(p) = self.prompt.take() {
                if let Err(e) = self.deliver(exec.as_ref(), Value::String(p)).await {
                    tracing::warn!(session_id = %self.obj.id, error = %e, "first prompt");
                }
            }
        }
        while let Some(h) = exec.as_mut() {
            tokio::select! {
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    if self.command(cmd, &mut exec).await {
                        break;
                    }
                }
                ev = h.events.recv() => {
                    let mut evs: Vec<ExecEvent> = Vec::new();
                    if let Some(ev) = ev {
                        evs.push(ev);
                        while evs.len() < MAX_BATCH {
                            match h.events.try_recv() {
                                Ok(e) => evs.push(e),
                                Err(_) => break,
                            }
                        }
                    }
                    let (ended, answers) = self.agent_output(evs).await;
                    for b in answers {
                        let _ = send_input(h, ExecInput::Stdin(b.into())).await;
                    }
                    if ended {
                        if self.done_at_result {
                            // The task is done but the agent still runs (Claude waits for
                            // more input): end it with the session (dropping the handle
                            // ends it too, should the queue be full).
                            let _ = h.input.try_send(ExecInput::Signal(9));
                        }
                        exec = None;
                    }
                }
                _ = sleep_until_opt(self.driver.next_deadline()) => {
                    // Unanswered permission requests past their time are denied.
                    let out = self.driver.expire(std::time::Instant::now());
                    for b in &out.stdin {
                        let _ = send_input(h, ExecInput::Stdin(b.clone().into())).await;
                    }
                    self.apply(out).await;
                }
                _ = tokio::time::sleep(SDK_STDIN_RETRY), if self.stdin_wait.is_some() => {
                    self.flush_client_stdin(Some(&*h)).await;
                }
                _ = sleep_until_opt(self.cap.summary_due()) => {
                    // A flood that stopped while the agent lives on is still summarised.
                    let mut evs = Vec::new();
                    self.cap.admit(&mut evs, false);
                    self.record(evs).await;
                }
            }
        }
        // The agent is gone: its token dies with it; answer what is still queued, then retire.
        self.deps.gateway.revoke(&self.token);
        if let Some(r) = self.driver.sdk_relay() {
            r.finish(berth_agent::sdk::RelayExit {
                code: None,
                signal: None,
            });
        }
        if let Some(w) = self.stdin_wait.take() {
            let _ = w.reply.send(Err(EngineError::Conflict(format!(
                "session {} has ended",
                self.obj.id
            ))));
        }
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            self.refuse(cmd);
        }
        if crate::engine::rules::after_session(self.lifecycle)
            == crate::engine::rules::AfterSession::DestroyBox
        {
            let (tx, rx) = oneshot::channel();
            if self
                .box_handle
                .tx
                .send(BoxCmd::Destroy {
                    stop_sessions: None,
                    reply: tx,
                })
                .await
                .is_ok()
            {
                let _ = rx.await;
            }
        }
        self.deps.registry.forget_session(&self.obj.id);
    }

    fn refuse(&self, cmd: SessionCmd) {
        let ended = || EngineError::Conflict(format!("session {} has ended", self.obj.id));
        match cmd {
            SessionCmd::Message { reply, .. } => {
                let _ = reply.send(Err(ended()));
            }
            SessionCmd::Interrupt { reply }
            | SessionCmd::ClientStdin { reply, .. }
            | SessionCmd::Permission { reply, .. }
            | SessionCmd::SetPermissionMode { reply, .. } => {
                let _ = reply.send(Err(ended()));
            }
            SessionCmd::Stop { reply, .. } => {
                let _ = reply.send(self.obj.clone());
            }
            SessionCmd::Notice { .. } | SessionCmd::Metered { .. } => {}
        }
    }

    /// Returns whether the agent has ended, and the bytes the driver answers on its own
    /// (permission rules).
    async fn agent_output(&mut self, evs: Vec<ExecEvent>) -> (bool, Vec<Vec<u8>>) {
        if evs.is_empty() {
            self.set_state(
                SessionState::Failed,
                Some("agent stream ended unexpectedly".into()),
            )
            .await;
            return (true, vec![]);
        }
        let mut out = Output::default();
        let mut ended = false;
        for ev in evs {
            let o = match ev {
                ExecEvent::Started { .. } => {
                    self.started = true;
                    continue;
                }
                ExecEvent::Stdout(b) => self.driver.on_stdout(&b),
                ExecEvent::Stderr(b) => self.driver.on_stderr(&b),
                ExecEvent::Exit(st) => {
                    ended = true;
                    let mut o = self.driver.on_exit(st.code, st.signal);
                    if st.oom_killed {
                        o.update.state = Some(SessionState::Failed);
                        o.update.state_reason =
                            Some("agent was OOM-killed (box memory limit)".into());
                    }
                    o
                }
                ExecEvent::Failed(m) => {
                    ended = true;
                    let m = if self.started {
                        m
                    } else {
                        format!(
                            "agent failed to start: {}",
                            crate::engine::start_failure(&self.program, &m)
                        )
                    };
                    let mut o = self.driver.on_exit(None, None);
                    o.events.push(AgentEvent {
                        kind: EventKind::Error,
                        data: json!({"message": m}),
                    });
                    o.update.state = Some(SessionState::Failed);
                    o.update.state_reason = Some(m);
                    o
                }
            };
            out.events.extend(o.events);
            // Later updates win; a terminal state is never overwritten by a running one.
            if o.update.state.is_some() {
                out.update.state = o.update.state;
                out.update.state_reason = o.update.state_reason;
            }
            if o.update.agent_session_id.is_some() {
                out.update.agent_session_id = o.update.agent_session_id;
            }
            if o.update.cli_version.is_some() {
                out.update.cli_version = o.update.cli_version;
            }
            if o.update.agent_cost_usd.is_some() {
                out.update.agent_cost_usd = o.update.agent_cost_usd;
            }
            out.stdin.extend(o.stdin);
        }
        if self.end_at_result && !ended && out.events.iter().any(|e| e.kind == "result") {
            // The prompt's task is done and nobody asked to keep the session: it ends here.
            ended = true;
            self.done_at_result = true;
            out.update.state = Some(SessionState::Stopped);
            out.update.state_reason = Some(match out.update.state_reason.take() {
                Some(r) => format!("done ({r})"),
                None => "done".into(),
            });
        }
        let answers = std::mem::take(&mut out.stdin);
        if self.managed_agents {
            // Never stored, so never counted against the session's event caps.
            self.pending_previews = super::previews::split(&mut out.events);
        }
        self.cap.admit(&mut out.events, ended);
        self.apply(out).await;
        (ended, answers)
    }

    async fn deliver(
        &mut self,
        exec: Option<&ExecHandle>,
        content: Value,
    ) -> Result<(), EngineError> {
        let Some(h) = exec else {
            return Err(EngineError::Conflict("the agent is not running".into()));
        };
        let bytes = self
            .driver
            .encode_message(&content)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        send_input(h, ExecInput::Stdin(bytes.into())).await?;
        self.record(vec![AgentEvent {
            kind: EventKind::User,
            data: json!({"content": content}),
        }])
        .await;
        if self.obj.state == SessionState::Idle {
            self.set_state(SessionState::Running, None).await;
        }
        Ok(())
    }

    /// An sdk client's write: refused at once if its connection was replaced, else queued to
    /// the box as soon as there is room (see [`Self::flush_client_stdin`]). Only a replaced
    /// connection's write can still be waiting (each connection waits for its answer).
    async fn client_stdin(&mut self, exec: Option<&ExecHandle>, w: ClientWrite) {
        let current = |g| self.driver.sdk_relay().is_some_and(|r| r.current(g));
        if !current(w.generation) {
            let _ = w.reply.send(Err(replaced()));
            return;
        }
        if let Some(old) = self.stdin_wait.replace(w) {
            let _ = old.reply.send(Err(replaced()));
        }
        self.flush_client_stdin(exec).await;
    }

    /// Queue the waiting client write to the box if its connection is still current and the
    /// box's queue has room: at most [`SDK_STDIN_QUEUED`] client bytes (or one write) in it,
    /// and [`SDK_SLOTS_KEPT`] slots free. Never waits: the actor stays free for `Stop`.
    async fn flush_client_stdin(&mut self, exec: Option<&ExecHandle>) {
        let Some(w) = self.stdin_wait.take() else {
            return;
        };
        let Some(h) = exec else {
            let _ = w.reply.send(Err(EngineError::Conflict(
                "the agent is not running".into(),
            )));
            return;
        };
        let Some(relay) = self.driver.sdk_relay() else {
            let _ = w
                .reply
                .send(Err(EngineError::Invalid("not an sdk session".into())));
            return;
        };
        if !relay.current(w.generation) {
            let _ = w.reply.send(Err(replaced()));
            return;
        }
        let n = w.bytes.as_ref().map_or(0, |b| b.len());
        let in_queue = h.input.max_capacity() - h.input.capacity();
        while self.stdin_sizes.len() > in_queue {
            self.stdin_sizes.pop_front();
        }
        let queued: usize = self.stdin_sizes.iter().sum();
        let permit = match h.input.try_reserve() {
            Ok(p)
                if h.input.capacity() >= SDK_SLOTS_KEPT
                    && (queued == 0 || queued + n <= SDK_STDIN_QUEUED) =>
            {
                p
            }
            Ok(_) | Err(mpsc::error::TrySendError::Full(())) => {
                self.stdin_wait = Some(w);
                return;
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                let _ = w.reply.send(Err(EngineError::Conflict(
                    "the agent is not running".into(),
                )));
                return;
            }
        };
        // Counted and queued with no await between: an attach sees both or neither.
        if !relay.take_stdin(w.generation, n) {
            let _ = w.reply.send(Err(replaced()));
            return;
        }
        let out = match &w.bytes {
            Some(b) => self.driver.on_client_stdin(b).unwrap_or_default(),
            None => Output::default(),
        };
        permit.send(match w.bytes {
            Some(b) => ExecInput::Stdin(b),
            None => ExecInput::CloseStdin,
        });
        self.stdin_sizes.push_back(n);
        let _ = w.reply.send(Ok(()));
        self.apply(out).await;
    }

    /// Returns true when the session must end now.
    async fn command(&mut self, cmd: SessionCmd, exec: &mut Option<ExecHandle>) -> bool {
        match cmd {
            SessionCmd::Message { content, reply } => {
                // A client that talks to the agent before its first result keeps the session.
                self.end_at_result = false;
                let r = self.deliver(exec.as_ref(), content).await;
                let _ = reply.send(r);
                false
            }
            SessionCmd::Interrupt { reply } => {
                if self.driver.sdk_relay().is_some() {
                    // The client owns the CLI's stdin: a line of berth's could land inside
                    // one of the client's, and the CLI's answer would carry an id the SDK
                    // never issued.
                    let _ = reply.send(Err(EngineError::Invalid(
                        "an sdk session is interrupted by its client (the SDK's interrupt over /v1/sessions/{id}/sdk)".into(),
                    )));
                    return false;
                }
                let r = match (exec.as_ref(), self.driver.interrupt()) {
                    (Some(h), Interrupt::Signal(s)) => send_input(h, ExecInput::Signal(s)).await,
                    (Some(h), Interrupt::Stdin(b)) => {
                        send_input(h, ExecInput::Stdin(b.into())).await
                    }
                    (None, _) => Err(EngineError::Conflict("the agent is not running".into())),
                };
                if r.is_ok() {
                    self.record(vec![AgentEvent {
                        kind: EventKind::Status,
                        data: json!({"interrupt": true}),
                    }])
                    .await;
                }
                let _ = reply.send(r);
                false
            }
            SessionCmd::Permission {
                request_id,
                answer,
                reply,
            } => {
                let r = match (
                    exec.as_ref(),
                    self.driver.answer_permission(
                        &request_id,
                        answer.allow,
                        answer.message.as_deref(),
                    ),
                ) {
                    (Some(h), Some(bytes)) => {
                        let sent = send_input(h, ExecInput::Stdin(bytes.into())).await;
                        self.record(vec![AgentEvent {
                            kind: EventKind::PermissionAnswer,
                            data: json!({"request_id": request_id, "allow": answer.allow, "message": answer.message}),
                        }])
                        .await;
                        sent
                    }
                    _ => Err(EngineError::NotFound(format!(
                        "no pending permission request {request_id} in this session"
                    ))),
                };
                let _ = reply.send(r);
                false
            }
            SessionCmd::Notice { kind, data } => {
                self.record(vec![AgentEvent { kind, data }]).await;
                false
            }
            SessionCmd::Metered { data, reply } => {
                let kind = EventKind::from(super::previews::MODEL_USAGE);
                self.record(vec![AgentEvent { kind, data }]).await;
                let _ = reply.send(());
                false
            }
            SessionCmd::ClientStdin {
                generation,
                bytes,
                reply,
            } => {
                let w = ClientWrite {
                    generation,
                    bytes,
                    reply,
                };
                self.client_stdin(exec.as_ref(), w).await;
                false
            }
            SessionCmd::SetPermissionMode { mode, reply } => {
                let r = match (exec.as_ref(), self.driver.set_permission_mode(&mode)) {
                    (_, Err(e)) => Err(EngineError::Invalid(e.to_string())),
                    (_, Ok(None)) => Err(EngineError::Invalid(
                        "this agent has no permission modes".into(),
                    )),
                    (None, _) => Err(EngineError::Conflict("the agent is not running".into())),
                    (Some(h), Ok(Some(bytes))) => {
                        let sent = send_input(h, ExecInput::Stdin(bytes.into())).await;
                        self.record(vec![AgentEvent {
                            kind: EventKind::PermissionMode,
                            data: json!({"mode": mode}),
                        }])
                        .await;
                        sent
                    }
                };
                let _ = reply.send(r);
                false
            }
            SessionCmd::Stop { reason, reply } => {
                if let Some(h) = exec.take() {
                    // Never waits: a full queue (a box not reading its stdin) must not hold
                    // up the stop; dropping the handle ends the process anyway.
                    let _ = h.input.try_send(ExecInput::Signal(9));
                    drop(h);
                }
                self.set_state(SessionState::Stopped, Some(reason)).await;
                let _ = reply.send(self.obj.clone());
                true
            }
        }
    }
}
