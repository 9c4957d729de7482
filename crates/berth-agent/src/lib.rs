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
pub mod sdk;

use berth_api::{AgentSpec, EventKind, SessionState};
use serde_json::Value;

pub use claude::{ClaudeDriver, ClaudeEnv};
pub use command::CommandDriver;
pub use sdk::{Relay, SdkDriver};

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
    pub kind: EventKind,
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

/// The kind of the events a Claude driver makes of the CLI's partial messages (`stream_event`
/// lines, only with `managed_agents`): the session broadcasts them as previews and drops them
/// from the log.
pub const STREAM_EVENT: &str = "stream_event";

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
    /// A Claude CLI whose client is an Agent SDK app (`client: "sdk"`).
    Sdk(Box<SdkDriver>),
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
                if c.client == Some(berth_api::ClaudeClient::Sdk) {
                    return Ok(Driver::Sdk(Box::new(SdkDriver::new(c, env, workdir)?)));
                }
                if !c.args.is_empty() {
                    return Err(DriverError::Invalid(
                        "args are for sdk sessions (client: \"sdk\")".into(),
                    ));
                }
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
            Driver::Sdk(d) => d.launch(),
        }
    }
    pub fn encode_message(&mut self, content: &Value) -> Result<Vec<u8>, DriverError> {
        match self {
            Driver::Command(d) => d.encode_message(content),
            Driver::Claude(d) => d.encode_message(content),
            Driver::Sdk(d) => d.encode_message(content),
        }
    }
    pub fn on_stdout(&mut self, bytes: &[u8]) -> Output {
        match self {
            Driver::Command(d) => d.on_stdout(bytes),
            Driver::Claude(d) => d.on_stdout(bytes),
            Driver::Sdk(d) => d.on_stdout(bytes),
        }
    }
    pub fn on_stderr(&mut self, bytes: &[u8]) -> Output {
        match self {
            Driver::Command(d) => d.on_stderr(bytes),
            Driver::Claude(d) => d.on_stderr(bytes),
            Driver::Sdk(d) => d.on_stderr(bytes),
        }
    }
    pub fn on_exit(&mut self, code: Option<i32>, signal: Option<i32>) -> Output {
        match self {
            Driver::Command(d) => d.on_exit(code, signal),
            Driver::Claude(d) => d.on_exit(code, signal),
            Driver::Sdk(d) => d.on_exit(code, signal),
        }
    }
    pub fn interrupt(&mut self) -> Interrupt {
        match self {
            Driver::Command(_) => Interrupt::Signal(2),
            Driver::Claude(d) => d.interrupt(),
            Driver::Sdk(d) => d.interrupt(),
        }
    }
    /// When the oldest unanswered permission request times out.
    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        match self {
            Driver::Command(_) | Driver::Sdk(_) => None,
            Driver::Claude(d) => d.next_deadline(),
        }
    }
    /// Deny the requests whose time is up.
    pub fn expire(&mut self, now: std::time::Instant) -> Output {
        match self {
            Driver::Command(_) | Driver::Sdk(_) => Output::default(),
            Driver::Claude(d) => d.expire(now),
        }
    }
    /// The stdin line switching the agent's permission mode (None: not supported).
    pub fn set_permission_mode(&mut self, mode: &str) -> Result<Option<Vec<u8>>, DriverError> {
        match self {
            // An sdk session's mode is its client's (`set_permission_mode` over the relay).
            Driver::Command(_) | Driver::Sdk(_) => Ok(None),
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
            Driver::Command(_) | Driver::Sdk(_) => None,
            Driver::Claude(d) => d.answer_permission(request_id, allow, message),
        }
    }
}

impl Driver {
    /// The stdout relay of a client-driven session.
    pub fn sdk_relay(&self) -> Option<std::sync::Arc<Relay>> {
        match self {
            Driver::Sdk(d) => Some(d.relay()),
            _ => None,
        }
    }

    /// Bytes a client writes to the agent's stdin (sdk sessions only).
    pub fn on_client_stdin(&mut self, bytes: &[u8]) -> Result<Output, DriverError> {
        match self {
            Driver::Sdk(d) => Ok(d.on_client_stdin(bytes)),
            _ => Err(DriverError::Invalid("not an sdk session".into())),
        }
    }
}

/// A piece of an agent's output stream, cut at newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A whole line, without its newline.
    Full(Vec<u8>),
    /// A line longer than the limit: its bytes were dropped as they came; this many.
    TooLong(u64),
}

/// Splits a byte stream into lines, looking at each byte once (a long line arriving in many
/// chunks is not rescanned from its start), and holding at most `max` bytes: a longer line is
/// dropped as it arrives and reported as [`Line::TooLong`] at its newline.
#[derive(Debug)]
pub struct LineBuffer {
    partial: Vec<u8>,
    /// Bytes of the over-long line being dropped (None: not dropping).
    dropping: Option<u64>,
    max: usize,
}

impl LineBuffer {
    pub fn new(max: usize) -> LineBuffer {
        LineBuffer {
            partial: Vec::new(),
            dropping: None,
            max,
        }
    }

    /// The lines `bytes` completes, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        let mut rest = bytes;
        loop {
            let (head, tail) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            if let Some(n) = self.dropping.as_mut() {
                *n += head.len() as u64;
            } else if self.partial.len() + head.len() > self.max {
                self.dropping = Some((self.partial.len() + head.len()) as u64);
                self.partial = Vec::new();
            } else {
                self.partial.extend_from_slice(head);
            }
            let Some(tail) = tail else {
                return out;
            };
            out.push(match self.dropping.take() {
                Some(n) => Line::TooLong(n),
                None => Line::Full(std::mem::take(&mut self.partial)),
            });
            rest = tail;
        }
    }

    /// The unfinished last line, if any (at the end of the stream).
    pub fn finish(&mut self) -> Option<Line> {
        match self.dropping.take() {
            Some(n) => Some(Line::TooLong(n)),
            None if self.partial.is_empty() => None,
            None => Some(Line::Full(std::mem::take(&mut self.partial))),
        }
    }
}

#[cfg(test)]
mod line_tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_and_over_long_ones_are_dropped() {
        let mut b = LineBuffer::new(8);
        assert_eq!(b.push(b"ab"), vec![]);
        assert_eq!(
            b.push(b"c\nde\n\nfg"),
            vec![
                Line::Full(b"abc".to_vec()),
                Line::Full(b"de".to_vec()),
                Line::Full(vec![])
            ]
        );
        // Over the limit across chunks: nothing of it is kept, its length is reported.
        assert_eq!(b.push(b"123456"), vec![]);
        assert_eq!(b.push(b"7890"), vec![]);
        assert!(b.partial.is_empty(), "the long line is not held");
        assert_eq!(
            b.push(b"xyz\nok\n"),
            vec![Line::TooLong(15), Line::Full(b"ok".to_vec())]
        );
        // Exactly the limit is kept.
        assert_eq!(
            b.push(b"12345678\n"),
            vec![Line::Full(b"12345678".to_vec())]
        );
        assert_eq!(b.push(b"tail"), vec![]);
        assert_eq!(b.finish(), Some(Line::Full(b"tail".to_vec())));
        assert_eq!(b.finish(), None);
        b.push(b"0123456789");
        assert_eq!(b.finish(), Some(Line::TooLong(10)));
    }

    #[test]
    fn a_long_line_in_small_chunks_is_scanned_once() {
        // 4 MiB in 1-byte chunks: quadratic rescanning would take minutes; linear is instant.
        let mut b = LineBuffer::new(8 << 20);
        let t = std::time::Instant::now();
        for _ in 0..(4 << 20) {
            assert!(b.push(b"x").is_empty());
        }
        assert_eq!(b.push(b"\n").len(), 1);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t.elapsed()
        );
    }
}
