//! Agent drivers.
//!
//! A driver is pure protocol: it says how to launch the agent (argv, env, working directory),
//! how a client message becomes bytes on the agent's stdin, and how the agent's output becomes
//! session events. It never touches processes or the store; the session's owner task in the
//! server feeds it bytes and acts on what it returns, so drivers are testable without a box.
//!
//! Ordering: `on_stdout`/`on_stderr` are called in the order the bytes arrived per stream;
//! `on_exit` is called once, last, and flushes any partial line.

pub mod claude;
pub mod command;

use berth_api::{AgentSpec, SessionState};
use serde_json::Value;

pub use claude::{ClaudeDriver, ClaudeEnv};
pub use command::CommandDriver;

/// How to start the agent process inside the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

/// Something the session should record and publish.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEvent {
    pub kind: String,
    pub data: Value,
}

/// What the driver learnt that changes the session object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Update {
    pub state: Option<SessionState>,
    pub state_reason: Option<String>,
    pub agent_session_id: Option<String>,
    pub cli_version: Option<String>,
    /// What the agent says this run of it has cost so far (Claude's `total_cost_usd`, which
    /// counts from the process start).
    pub agent_cost_usd: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Output {
    pub events: Vec<AgentEvent>,
    pub update: Update,
    /// Bytes the driver itself answers on the agent's stdin (automatic permission answers).
    pub stdin: Vec<Vec<u8>>,
}

/// How to interrupt the agent's current work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interrupt {
    Signal(i32),
    Stdin(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Invalid(String),
}

/// The closed set of drivers.
#[derive(Debug)]
pub enum Driver {
    Command(CommandDriver),
    Claude(Box<ClaudeDriver>),
}

impl Driver {
    /// `claude` is where and how the Claude CLI runs in this session (required for claude agents).
    pub fn new(
        spec: &AgentSpec,
        workdir: &str,
        claude: Option<ClaudeEnv>,
    ) -> Result<Driver, DriverError> {
        match spec {
            AgentSpec::Command(c) => Ok(Driver::Command(CommandDriver::new(c, workdir)?)),
            AgentSpec::Claude(c) => {
                let env = claude.ok_or_else(|| {
                    DriverError::Invalid(
                        "the Claude Code CLI is not available on this server".into(),
                    )
                })?;
                Ok(Driver::Claude(Box::new(ClaudeDriver::new(
                    c, env, workdir,
                )?)))
            }
        }
    }
    pub fn launch(&self) -> Launch {
        match self {
            Driver::Command(d) => d.launch(),
            Driver::Claude(d) => d.launch(),
        }
    }
    pub fn encode_message(&mut self, content: &Value) -> Result<Vec<u8>, DriverError> {
        match self {
            Driver::Command(d) => d.encode_message(content),
            Driver::Claude(d) => d.encode_message(content),
        }
    }
    pub fn on_stdout(&mut self, bytes: &[u8]) -> Output {
        match self {
            Driver::Command(d) => d.on_stdout(bytes),
            Driver::Claude(d) => d.on_stdout(bytes),
        }
    }
    pub fn on_stderr(&mut self, bytes: &[u8]) -> Output {
        match self {
            Driver::Command(d) => d.on_stderr(bytes),
            Driver::Claude(d) => d.on_stderr(bytes),
        }
    }
    pub fn on_exit(&mut self, code: Option<i32>, signal: Option<i32>) -> Output {
        match self {
            Driver::Command(d) => d.on_exit(code, signal),
            Driver::Claude(d) => d.on_exit(code, signal),
        }
    }
    pub fn interrupt(&mut self) -> Interrupt {
        match self {
            Driver::Command(_) => Interrupt::Signal(2),
            Driver::Claude(d) => d.interrupt(),
        }
    }
    /// When the oldest unanswered permission request times out.
    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        match self {
            Driver::Command(_) => None,
            Driver::Claude(d) => d.next_deadline(),
        }
    }
    /// Deny the requests whose time is up.
    pub fn expire(&mut self, now: std::time::Instant) -> Output {
        match self {
            Driver::Command(_) => Output::default(),
            Driver::Claude(d) => d.expire(now),
        }
    }
    /// The stdin line switching the agent's permission mode (None: not supported).
    pub fn set_permission_mode(&mut self, mode: &str) -> Result<Option<Vec<u8>>, DriverError> {
        match self {
            Driver::Command(_) => Ok(None),
            Driver::Claude(d) => d.set_permission_mode(mode).map(Some),
        }
    }
    /// Bytes answering a pending permission request (None: no such request).
    pub fn answer_permission(
        &mut self,
        request_id: &str,
        allow: bool,
        message: Option<&str>,
    ) -> Option<Vec<u8>> {
        match self {
            Driver::Command(_) => None,
            Driver::Claude(d) => d.answer_permission(request_id, allow, message),
        }
    }
}
