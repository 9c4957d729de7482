//! A Claude Code CLI driven by an Agent SDK app in the client's process (`client: "sdk"`).
//!
//! berth starts the pinned CLI in the box with the client's arguments, checked against an
//! allowlist ([`check_args`]: berth owns the executable, the environment, the gateway and the
//! box), and relays its stdin and stdout unchanged: the SDK's control protocol (initialize,
//! `can_use_tool`, hooks, SDK MCP servers, interrupt, `set_model`, `set_permission_mode`) runs
//! between the client and the CLI. berth never answers on the CLI's stdin itself: no permission
//! rules, no timeouts. It still reads the output (a [`ClaudeDriver`] does), so the session's
//! events, state, agent cost and metering are those of any Claude session.
//!
//! [`Relay`] holds the CLI's stdout as a byte stream numbered by offset: the last
//! [`RELAY_BYTES`] of it stay buffered, so a client whose WebSocket dropped reconnects and asks
//! for the output from the offset it had reached; older output is gone (the client is told).

use crate::claude::ClaudeDriver;
use crate::{AgentEvent, ClaudeEnv, DriverError, Interrupt, Launch, LineBuffer, Output};
use berth_api::{ClaudeAgent, EventKind, SessionState};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Stdout bytes kept for a client to (re)read: its reconnect may start at most this far back.
pub const RELAY_BYTES: usize = 8 << 20;

/// Flags taking a value (`--flag value` or `--flag=value`).
const VALUE_FLAGS: &[&str] = &[
    "system-prompt",
    "system-prompt-file",
    "append-system-prompt",
    "append-system-prompt-file",
    "tools",
    "allowedTools",
    "allowed-tools",
    "disallowedTools",
    "disallowed-tools",
    "max-turns",
    "max-budget-usd",
    "task-budget",
    "model",
    "fallback-model",
    "betas",
    "permission-prompt-tool",
    "permission-mode",
    "resume",
    "session-id",
    "settings",
    "add-dir",
    "mcp-config",
    "resume-session-at",
    "resume-drops-turn",
    "setting-sources",
    "plugin-dir",
    "max-thinking-tokens",
    "thinking",
    "thinking-display",
    "effort",
    "json-schema",
    "agents",
    "input-format",
    "output-format",
    // The TypeScript SDK's.
    "agent",
    "initialize-fields",
    "permission-prompts",
    "plugin-dir-no-mcp",
    "project-config-root",
    "managed-settings",
    "debug-file",
];

/// Flags without a value.
const BOOL_FLAGS: &[&str] = &[
    "verbose",
    "continue",
    "include-partial-messages",
    "include-hook-events",
    "strict-mcp-config",
    "fork-session",
    "session-mirror",
    "replay-user-messages",
    "debug-to-stderr",
    "print",
    "debug",
    "await-initialize",
    "managed-settings-in-initialize",
    "no-session-persistence",
];

/// Settings keys that reach the environment or credentials: berth owns those.
const SETTINGS_REFUSED: &[&str] = &[
    "env",
    "apiKeyHelper",
    "awsAuthRefresh",
    "awsCredentialExport",
    "gcpAuthRefresh",
    "otelHeadersHelper",
    "forceLoginMethod",
];

const MODES: [&str; 5] = [
    "default",
    "acceptEdits",
    "bypassPermissions",
    "plan",
    "dontAsk",
];

/// Check the client's CLI arguments against the allowlist and return them in `--flag=value`
/// form (so that no value can be taken for a flag). The error names the argument refused.
pub fn check_args(args: &[String]) -> Result<Vec<String>, DriverError> {
    let refuse = |a: &str, why: &str| {
        Err(DriverError::Invalid(format!(
            "argument {a:?} refused: {why} (berth runs its own Claude Code CLI with its own environment, gateway and box; see the allowlist in the README)"
        )))
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a.contains('\0') {
            return refuse(a, "contains a NUL byte");
        }
        let Some(flag) = a.strip_prefix("--") else {
            if a == "-p" {
                out.push("--print".into());
                continue;
            }
            return refuse(
                a,
                "not an allowed flag (no executable or positional arguments)",
            );
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if BOOL_FLAGS.contains(&name) {
            if inline.is_some() {
                return refuse(a, "this flag takes no value");
            }
            out.push(format!("--{name}"));
            continue;
        }
        if !VALUE_FLAGS.contains(&name) {
            return refuse(a, "not on the allowlist");
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let Some(v) = args.get(i) else {
                    return refuse(a, "missing its value");
                };
                i += 1;
                v.clone()
            }
        };
        if value.contains('\0') {
            return refuse(a, "its value contains a NUL byte");
        }
        match name {
            "input-format" | "output-format" if value != "stream-json" => {
                return refuse(a, "only stream-json is relayed");
            }
            "permission-mode" if !MODES.contains(&value.as_str()) => {
                return refuse(a, "unknown permission mode");
            }
            "settings" | "managed-settings" => check_settings(a, &value)?,
            _ => {}
        }
        out.push(format!("--{name}={value}"));
    }
    Ok(out)
}

fn check_settings(arg: &str, value: &str) -> Result<(), DriverError> {
    let v = value.trim();
    if !v.starts_with('{') {
        // A file in the box: what the box could write anyway.
        return Ok(());
    }
    let parsed: Value = serde_json::from_str(v).map_err(|e| {
        DriverError::Invalid(format!(
            "argument {arg:?} refused: settings are not JSON: {e}"
        ))
    })?;
    let Some(obj) = parsed.as_object() else {
        return Err(DriverError::Invalid(format!(
            "argument {arg:?} refused: settings must be a JSON object"
        )));
    };
    if let Some(k) = SETTINGS_REFUSED.iter().find(|k| obj.contains_key(**k)) {
        return Err(DriverError::Invalid(format!(
            "argument {arg:?} refused: settings key {k:?} is berth's (environment and credentials)"
        )));
    }
    Ok(())
}

/// How the CLI ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Debug, Default)]
struct RelayState {
    /// Stdout bytes from offset `base` to `base + buf.len()`.
    buf: VecDeque<u8>,
    base: u64,
    exit: Option<RelayExit>,
    /// Stdin bytes the session has taken from clients (a reconnecting client resends the rest).
    stdin: u64,
    /// Incremented by every attach: the newest connection owns the session.
    generation: u64,
    attached: bool,
}

/// What a client reads from the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Bytes starting at the offset asked for.
    Bytes(Vec<u8>),
    /// Nothing new yet.
    Pending,
    /// Everything was read and the CLI has ended.
    Ended(RelayExit),
    /// The offset asked for is older than what is kept (or past the end).
    Lost { kept_from: u64, end: u64 },
}

/// The CLI's stdout and the state of the client connection, shared by the session's owner
/// task (writer) and the WebSocket serving the client (reader).
///
/// Contract: bytes are appended in the order the CLI wrote them, offsets count every byte
/// ever written, and `changed` ticks after every append, exit and attach.
#[derive(Debug)]
pub struct Relay {
    state: Mutex<RelayState>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            state: Mutex::new(RelayState::default()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Relay {
    fn lock(&self) -> std::sync::MutexGuard<'_, RelayState> {
        // A panic while holding it cannot leave the state half-written (plain field updates).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tick(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Append CLI output, dropping the oldest bytes past [`RELAY_BYTES`].
    pub fn push(&self, bytes: &[u8]) {
        {
            let mut s = self.lock();
            s.buf.extend(bytes);
            let over = s.buf.len().saturating_sub(RELAY_BYTES);
            if over > 0 {
                s.buf.drain(..over);
                s.base += over as u64;
            }
        }
        self.tick();
    }

    pub fn finish(&self, exit: RelayExit) {
        self.lock().exit.get_or_insert(exit);
        self.tick();
    }

    pub fn exit(&self) -> Option<RelayExit> {
        self.lock().exit
    }

    /// Up to `max` bytes from `offset`.
    pub fn read(&self, offset: u64, max: usize) -> Read {
        let s = self.lock();
        let end = s.base + s.buf.len() as u64;
        if offset < s.base || offset > end {
            return Read::Lost {
                kept_from: s.base,
                end,
            };
        }
        if offset == end {
            return match s.exit {
                Some(e) => Read::Ended(e),
                None => Read::Pending,
            };
        }
        let start = (offset - s.base) as usize;
        let n = (s.buf.len() - start).min(max);
        Read::Bytes(s.buf.range(start..start + n).copied().collect())
    }

    /// A new client connection: it supersedes any earlier one. Returns its generation and
    /// the stdin bytes taken so far, read together: no write of an older connection can be
    /// counted after this (see [`Relay::take_stdin`]), so the client resends exactly the rest.
    pub fn attach(&self) -> (u64, u64) {
        let attached = {
            let mut s = self.lock();
            s.generation += 1;
            s.attached = true;
            (s.generation, s.stdin)
        };
        self.tick();
        attached
    }

    /// The connection of generation `g` ended (a no-op if a newer one replaced it).
    pub fn detach(&self, g: u64) {
        {
            let mut s = self.lock();
            if s.generation == g {
                s.attached = false;
            }
        }
        self.tick();
    }

    /// Whether connection `g` is still the session's current one.
    pub fn current(&self, g: u64) -> bool {
        self.lock().generation == g
    }

    /// Whether some client is connected, and the generation of the latest one.
    pub fn attached(&self) -> (bool, u64) {
        let s = self.lock();
        (s.attached, s.generation)
    }

    pub fn stdin_taken(&self) -> u64 {
        self.lock().stdin
    }

    /// Count `n` stdin bytes of connection `g` as taken, if `g` is still the current
    /// connection (false: a newer one replaced it, and the bytes must not reach the CLI).
    /// The caller passes the bytes on only after this returns true, and before any other
    /// write of the session.
    pub fn take_stdin(&self, g: u64, n: usize) -> bool {
        let mut s = self.lock();
        if s.generation != g {
            return false;
        }
        s.stdin += n as u64;
        true
    }

    /// Ticks on every change (append, exit, attach, detach).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The driver of a client-driven Claude session.
#[derive(Debug)]
pub struct SdkDriver {
    inner: ClaudeDriver,
    cli: String,
    args: Vec<String>,
    /// Set when berth restarts the session (`--resume` of the CLI's own session id).
    resume: Option<String>,
    relay: Arc<Relay>,
    stdin_lines: LineBuffer,
}

impl SdkDriver {
    pub fn new(
        spec: &ClaudeAgent,
        env: ClaudeEnv,
        workdir: &str,
    ) -> Result<SdkDriver, DriverError> {
        // Everything the CLI is told comes from the client's arguments; berth's own agent
        // fields would be silently overridden, so they are refused.
        let set: Vec<&str> = [
            ("model", spec.model.is_some()),
            ("max_turns", spec.max_turns.is_some()),
            ("system_prompt", spec.system_prompt.is_some()),
            ("allowed_tools", !spec.allowed_tools.is_empty()),
            ("disallowed_tools", !spec.disallowed_tools.is_empty()),
            ("permission_mode", spec.permission_mode.is_some()),
            ("mcp_servers", spec.mcp_servers.is_some()),
            ("permission_rules", !spec.permission_rules.is_empty()),
            ("permission_timeout_s", spec.permission_timeout_s.is_some()),
            ("managed_agents", spec.managed_agents),
        ]
        .into_iter()
        .filter_map(|(k, on)| on.then_some(k))
        .collect();
        if !set.is_empty() {
            return Err(DriverError::Invalid(format!(
                "an sdk session takes its options as CLI arguments from the client, not {}",
                set.join(", ")
            )));
        }
        let args = check_args(&spec.args)?;
        let cli = env.cli.clone();
        let resume = env.resume.clone();
        let inner = ClaudeDriver::new(&ClaudeAgent::default(), env, workdir)?;
        Ok(SdkDriver {
            inner,
            cli,
            args,
            resume,
            relay: Arc::new(Relay::default()),
            stdin_lines: LineBuffer::new(crate::claude::MAX_LINE),
        })
    }

    pub fn relay(&self) -> Arc<Relay> {
        self.relay.clone()
    }

    pub fn launch(&self) -> Launch {
        let base = self.inner.launch();
        let mut argv = vec![
            self.cli.clone(),
            "--output-format=stream-json".to_string(),
            "--input-format=stream-json".to_string(),
            "--verbose".to_string(),
        ];
        argv.extend(
            self.args
                .iter()
                .filter(|a| {
                    !a.starts_with("--output-format=")
                        && !a.starts_with("--input-format=")
                        && a.as_str() != "--verbose"
                })
                .cloned(),
        );
        if let Some(r) = &self.resume {
            argv.retain(|a| !a.starts_with("--resume=") && a.as_str() != "--continue");
            argv.push(format!("--resume={r}"));
        }
        Launch {
            argv,
            env: base.env,
            cwd: base.cwd,
        }
    }

    pub fn encode_message(&mut self, _content: &Value) -> Result<Vec<u8>, DriverError> {
        Err(DriverError::Invalid(
            "an sdk session's input comes from its client over /v1/sessions/{id}/sdk".into(),
        ))
    }

    /// CLI output: relayed to the client as is, and read for events (berth answers nothing).
    pub fn on_stdout(&mut self, bytes: &[u8]) -> Output {
        self.relay.push(bytes);
        let mut out = self.inner.on_stdout(bytes);
        out.stdin.clear();
        // Permission requests are the client's to answer; the driver keeps none pending.
        self.inner.forget_pending();
        out
    }

    pub fn on_stderr(&mut self, bytes: &[u8]) -> Output {
        self.inner.on_stderr(bytes)
    }

    pub fn on_exit(&mut self, code: Option<i32>, signal: Option<i32>) -> Output {
        let mut out = self.inner.on_exit(code, signal);
        out.stdin.clear();
        self.relay.finish(RelayExit { code, signal });
        out
    }

    /// What the client writes to the CLI: its user messages become `user` events (and start
    /// a turn), its interrupts `status` events; the bytes go on unchanged.
    pub fn on_client_stdin(&mut self, bytes: &[u8]) -> Output {
        let mut out = Output::default();
        for line in self.stdin_lines.push(bytes) {
            let crate::Line::Full(l) = line else { continue };
            let Ok(v) = serde_json::from_slice::<Value>(&l) else {
                continue;
            };
            match v.get("type").and_then(Value::as_str) {
                Some("user") => {
                    let content = v
                        .pointer("/message/content")
                        .cloned()
                        .unwrap_or(Value::Null);
                    out.events.push(AgentEvent {
                        kind: EventKind::User,
                        data: json!({"content": content, "by": "sdk"}),
                    });
                    out.update.state = Some(SessionState::Running);
                }
                Some("control_request")
                    if v.pointer("/request/subtype").and_then(Value::as_str)
                        == Some("interrupt") =>
                {
                    out.events.push(AgentEvent {
                        kind: EventKind::Status,
                        data: json!({"interrupt": true, "by": "sdk"}),
                    });
                }
                _ => {}
            }
        }
        out
    }

    pub fn interrupt(&mut self) -> Interrupt {
        self.inner.interrupt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_sdks_own_arguments_pass_in_flag_equals_value_form() {
        let got = check_args(&s(&[
            "--output-format",
            "stream-json",
            "--verbose",
            "--system-prompt",
            "",
            "--permission-prompt-tool",
            "stdio",
            "--mcp-config",
            r#"{"mcpServers":{"t":{"type":"sdk","name":"t"}}}"#,
            "--setting-sources=",
            "--max-turns",
            "--3",
            "--input-format",
            "stream-json",
        ]))
        .expect("allowed");
        assert_eq!(
            got,
            s(&[
                "--output-format=stream-json",
                "--verbose",
                "--system-prompt=",
                "--permission-prompt-tool=stdio",
                r#"--mcp-config={"mcpServers":{"t":{"type":"sdk","name":"t"}}}"#,
                "--setting-sources=",
                "--max-turns=--3",
                "--input-format=stream-json",
            ])
        );
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        for (args, named) in [
            (
                vec!["--dangerously-skip-permissions"],
                "--dangerously-skip-permissions",
            ),
            (vec!["/bin/sh"], "/bin/sh"),
            (vec!["-c", "x"], "-c"),
            (vec!["--verbose=1"], "--verbose=1"),
            (vec!["--output-format", "text"], "--output-format"),
            (vec!["--permission-mode", "yolo"], "--permission-mode"),
            (
                vec!["--settings", r#"{"env":{"ANTHROPIC_BASE_URL":"x"}}"#],
                "--settings",
            ),
            (
                vec!["--settings", r#"{"apiKeyHelper":"cat /k"}"#],
                "--settings",
            ),
            (vec!["--model"], "--model"),
        ] {
            let err = check_args(&s(&args)).expect_err("refused").to_string();
            assert!(err.contains(&format!("{named:?}")), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_relay_keeps_a_bounded_tail_and_reports_lost_offsets() {
        let r = Relay::default();
        assert_eq!(r.read(0, 10), Read::Pending);
        r.push(b"hello ");
        r.push(b"world");
        assert_eq!(r.read(0, 100), Read::Bytes(b"hello world".to_vec()));
        assert_eq!(r.read(6, 3), Read::Bytes(b"wor".to_vec()));
        assert_eq!(r.read(11, 3), Read::Pending);
        assert!(matches!(r.read(12, 3), Read::Lost { .. }));
        r.push(&vec![b'x'; RELAY_BYTES]);
        assert_eq!(
            r.read(0, 1),
            Read::Lost {
                kept_from: 11,
                end: 11 + RELAY_BYTES as u64
            }
        );
        r.finish(RelayExit {
            code: Some(0),
            signal: None,
        });
        assert!(matches!(r.read(11, 4), Read::Bytes(b) if b == b"xxxx"));
        assert!(matches!(
            r.read(11 + RELAY_BYTES as u64, 4),
            Read::Ended(RelayExit { code: Some(0), .. })
        ));
        let (g1, _) = r.attach();
        let (g2, _) = r.attach();
        r.detach(g1);
        assert_eq!(
            r.attached(),
            (true, g2),
            "an old connection's end is ignored"
        );
        r.detach(g2);
        assert_eq!(r.attached(), (false, g2));
    }

    #[test]
    fn stdin_is_counted_only_for_the_current_connection_and_read_with_the_attach() {
        let r = Relay::default();
        let (g1, taken) = r.attach();
        assert_eq!(taken, 0);
        assert!(r.take_stdin(g1, 5));
        // A reconnect: the older connection's write still in flight is refused, so the
        // offset the newer one was told stays exact.
        let (g2, taken) = r.attach();
        assert_eq!(taken, 5);
        assert!(
            !r.take_stdin(g1, 7),
            "a replaced connection's bytes are not taken"
        );
        assert_eq!(r.stdin_taken(), 5);
        assert!(r.take_stdin(g2, 3));
        assert_eq!(r.attach().1, 8);
    }
}
