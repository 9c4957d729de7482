//! Sessions: the engine's session operations (the façade: create, read, list, message,
//! interrupt, permissions, restart, stop) next to the session's owner task (`actor`). A
//! handler calls these; only the owner task changes a session.

mod actor;
pub mod previews;

pub use actor::*;

use super::error::EngineError;
use super::registry::Stopped;
use super::{shared, tenant_filter, Engine, GATEWAY_PORT};
use crate::auth::{new_id, now};
use berth_api::*;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Whether the client drives the agent's CLI itself (`client: "sdk"`).
fn is_sdk(agent: &AgentSpec) -> bool {
    matches!(agent, AgentSpec::Claude(c) if c.client == Some(ClaudeClient::Sdk))
}

fn shared_workdir() -> EngineError {
    EngineError::Invalid(
        "sessions in a shared box work in their own directory; omit workdir".into(),
    )
}

impl Engine {
    pub async fn create_session(
        self: &Arc<Self>,
        tenant: &str,
        spec: SessionSpec,
    ) -> Result<SessionObject, EngineError> {
        let spec = match self.take_pooled(tenant, spec).await? {
            super::pools::Pooled::Taken(s) => return Ok(s),
            super::pools::Pooled::Cold(spec) => spec,
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
            node: self.node_name(),
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
        self.start_agent(SessionStart {
            deps: self.session_deps(),
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
    pub(super) fn claude_env(
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

    /// Stop every live session in a box (it is parking or being deleted); their ids.
    pub(crate) async fn stop_box_sessions(&self, box_id: &str, reason: &str) -> Vec<String> {
        self.registry.stop_box_sessions(box_id, reason).await
    }

    /// Restart sessions stopped by a park (their agents resume their conversations).
    pub(crate) async fn resume_sessions(self: &Arc<Self>, tenant: &str, ids: &[String]) {
        for id in ids {
            if let Ok(mut s) = self.get_session(tenant, id).await {
                if is_sdk(&s.agent) {
                    // Its client's hooks, callbacks and SDK MCP servers were registered with
                    // the CLI the park ended; a new CLI would not have them. The conversation
                    // itself is kept: a new sdk session continues it with `--resume`.
                    s.state_reason = Some(format!(
                        "box parked: an sdk session ends with its box's park; start a new one \
                         with --resume={}",
                        s.agent_session_id
                            .as_deref()
                            .unwrap_or("<agent_session_id>")
                    ));
                    s.node = self.node_name();
                    if let Err(e) = self.store.put_session(&s).await {
                        tracing::warn!(session_id = %id, error = %e, "recording an sdk session's end");
                    }
                    continue;
                }
            }
            if let Err(e) = self.restart_in_running_box(tenant, id).await {
                tracing::warn!(session_id = %id, error = %e, "resuming a session after a park");
            }
        }
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
        // This node holds the box now (a restore may have moved it): the session's record is
        // this node's to write.
        obj.node = self.node_name();
        self.start_agent(SessionStart {
            deps: self.session_deps(),
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
    pub(super) async fn start_agent(
        &self,
        start: SessionStart,
    ) -> Result<SessionObject, EngineError> {
        self.register_token(&start.token, &start.obj).await?;
        let obj = start.obj.clone();
        let handle = spawn(start);
        self.registry.insert_session(&obj.id, handle.clone());
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
        match super::registry::stop_session(&h, "stopped by client").await {
            Stopped::Yes(obj) => Ok(*obj),
            Stopped::Gone => self.get_session(tenant, id).await,
            Stopped::TimedOut => Err(EngineError::Unavailable(format!(
                "session {id} did not stop within {} s; try again",
                super::registry::STOP_WAIT.as_secs()
            ))),
        }
    }

    /// Live previews of a session's model output (see `previews`): only of a session this
    /// process runs, and only while it runs.
    pub fn subscribe_previews(
        &self,
        id: &str,
    ) -> Option<tokio::sync::broadcast::Receiver<Arc<previews::Preview>>> {
        self.session_handle(id).map(|h| h.previews.subscribe())
    }

    /// Live event feed of a session (None once it has ended: replay from the store suffices).
    pub fn subscribe(&self, id: &str) -> Option<tokio::sync::broadcast::Receiver<Arc<LiveEvent>>> {
        self.session_handle(id).map(|h| h.events.subscribe())
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
