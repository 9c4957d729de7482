//! The Claude Code CLI driven over stream-json, the way the Agent SDK drives it.
//!
//! Launch: `claude -p --output-format=stream-json --input-format=stream-json --verbose` plus
//! the session's options, every value in the `--flag=value` form so that no value can be taken
//! for a flag. One long-lived process per session: each user message is a JSON line on stdin.
//! Output lines become events named after their `type` (`system`, `assistant`, `user`,
//! `result`, …) with the message kept whole; tool calls and tool results additionally get their
//! own `tool_use` / `tool_result` events. Tool permission requests (`control_request` /
//! `can_use_tool`) become `permission_request` events and are answered with
//! `control_response` lines.

use crate::{AgentEvent, DriverError, Interrupt, Launch, Output};
use berth_api::{ClaudeAgent, EventKind, SessionState};
use serde_json::{json, Value};
use std::collections::HashMap;

/// Where the gateway is reachable inside the box and what the agent presents to it.
#[derive(Debug, Clone)]
pub struct ClaudeEnv {
    /// Absolute path of the CLI (visible inside the box).
    pub cli: String,
    pub base_url: String,
    pub token: String,
    /// Per-session config dir inside the box (transcripts live here).
    pub config_dir: String,
    pub resume: Option<String>,
    /// Egress proxy inside the box, if any.
    pub proxy: Option<String>,
}

#[derive(Debug)]
pub struct ClaudeDriver {
    spec: ClaudeAgent,
    env: ClaudeEnv,
    cwd: String,
    lines: crate::LineBuffer,
    err_tail: Vec<u8>,
    /// Unanswered permission requests: input and deadline.
    pending: HashMap<String, (Value, std::time::Instant)>,
    next_request: u64,
}

const DEFAULT_PERMISSION_TIMEOUT_S: u64 = 300;
/// Longest stdout line (one stream-json message) the driver holds; a longer one is dropped
/// with an `error` event, so an agent cannot make the server buffer without bound.
pub const MAX_LINE: usize = 16 << 20;
/// Lines longer than this are not parsed into a `Value` (whose tree costs several times the
/// line: `[0,0,…]` is 16–32 bytes per 2 bytes of input); only the few small fields the
/// driver acts on are read ([`Large`]) and the event says what was left out.
pub const LARGE_LINE: usize = 1 << 20;
/// Bytes of an unparsed large line kept in its event.
const PREVIEW: usize = 4096;

/// The fields of a large line the driver needs; serde skips the rest without building it.
#[derive(serde::Deserialize)]
struct Large {
    #[serde(rename = "type")]
    kind: Option<String>,
    subtype: Option<String>,
    session_id: Option<String>,
    claude_code_version: Option<String>,
    is_error: Option<bool>,
    total_cost_usd: Option<f64>,
    request_id: Option<String>,
    request: Option<LargeRequest>,
}

#[derive(serde::Deserialize)]
struct LargeRequest {
    subtype: Option<String>,
    tool_name: Option<String>,
}

/// At most `n` bytes of `b` as text, not splitting a UTF-8 sequence.
fn preview(b: &[u8], n: usize) -> String {
    let mut s = String::from_utf8_lossy(&b[..b.len().min(n)]).into_owned();
    if b.len() > n && s.ends_with('\u{fffd}') {
        s.pop();
    }
    s
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// The argument a rule's pattern is matched against.
fn rule_subject(tool: &str, input: &Value) -> String {
    let field = |k: &str| input.get(k).and_then(Value::as_str).map(str::to_string);
    match tool {
        "Bash" => field("command"),
        "Write" | "Edit" | "Read" | "NotebookEdit" | "MultiEdit" => {
            field("file_path").or_else(|| field("notebook_path"))
        }
        "Glob" | "Grep" => field("pattern"),
        "WebFetch" => field("url"),
        _ => None,
    }
    .unwrap_or_else(|| input.to_string())
}

const STDERR_TAIL: usize = 4096;
const SAFE_MODES: [&str; 5] = [
    "default",
    "acceptEdits",
    "bypassPermissions",
    "plan",
    "dontAsk",
];

fn check_tool(t: &str) -> Result<(), DriverError> {
    if t.is_empty() || t.contains(',') || t.contains('\n') || t.contains('\0') {
        return Err(DriverError::Invalid(format!("invalid tool name {t:?}")));
    }
    Ok(())
}

impl ClaudeDriver {
    pub fn new(
        spec: &ClaudeAgent,
        env: ClaudeEnv,
        workdir: &str,
    ) -> Result<ClaudeDriver, DriverError> {
        if let Some(m) = &spec.permission_mode {
            if !SAFE_MODES.contains(&m.as_str()) {
                return Err(DriverError::Invalid(format!(
                    "permission_mode must be one of {SAFE_MODES:?}"
                )));
            }
        }
        for t in spec
            .allowed_tools
            .iter()
            .chain(spec.disallowed_tools.iter())
        {
            check_tool(t)?;
        }
        if let Some(m) = &spec.model {
            if m.is_empty() || m.contains('\0') {
                return Err(DriverError::Invalid("invalid model".into()));
            }
        }
        if spec.max_turns == Some(0) {
            return Err(DriverError::Invalid("max_turns must be at least 1".into()));
        }
        if spec.permission_timeout_s == Some(0) {
            return Err(DriverError::Invalid(
                "permission_timeout_s must be at least 1".into(),
            ));
        }
        for r in &spec.permission_rules {
            if r.tool.is_empty() {
                return Err(DriverError::Invalid(
                    "permission rule needs a tool (or *)".into(),
                ));
            }
        }
        Ok(ClaudeDriver {
            spec: spec.clone(),
            env,
            cwd: workdir.to_string(),
            lines: crate::LineBuffer::new(MAX_LINE),
            err_tail: Vec::new(),
            pending: HashMap::new(),
            next_request: 0,
        })
    }

    pub fn launch(&self) -> Launch {
        let s = &self.spec;
        let mut argv = vec![
            self.env.cli.clone(),
            "-p".into(),
            "--output-format=stream-json".into(),
            "--input-format=stream-json".into(),
            "--verbose".into(),
            "--permission-prompt-tool=stdio".into(),
        ];
        if let Some(m) = &s.model {
            argv.push(format!("--model={m}"));
        }
        if let Some(n) = s.max_turns {
            argv.push(format!("--max-turns={n}"));
        }
        argv.push(format!(
            "--permission-mode={}",
            s.permission_mode.as_deref().unwrap_or("bypassPermissions")
        ));
        if !s.allowed_tools.is_empty() {
            argv.push(format!("--allowedTools={}", s.allowed_tools.join(",")));
        }
        if !s.disallowed_tools.is_empty() {
            argv.push(format!(
                "--disallowedTools={}",
                s.disallowed_tools.join(",")
            ));
        }
        if let Some(p) = &s.system_prompt {
            argv.push(format!("--system-prompt={p}"));
        }
        if let Some(m) = &s.mcp_servers {
            argv.push(format!("--mcp-config={}", json!({"mcpServers": m})));
        }
        if s.managed_agents {
            argv.push("--include-partial-messages".into());
        }
        if let Some(r) = &self.env.resume {
            argv.push(format!("--resume={r}"));
        }
        let mut env = vec![
            ("ANTHROPIC_BASE_URL".to_string(), self.env.base_url.clone()),
            ("ANTHROPIC_API_KEY".to_string(), self.env.token.clone()),
            ("CLAUDE_CONFIG_DIR".to_string(), self.env.config_dir.clone()),
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".to_string(),
                "1".to_string(),
            ),
            ("DISABLE_AUTOUPDATER".to_string(), "1".to_string()),
            ("DISABLE_TELEMETRY".to_string(), "1".to_string()),
            ("DISABLE_ERROR_REPORTING".to_string(), "1".to_string()),
        ];
        if let Some(p) = &self.env.proxy {
            for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                env.push((k.to_string(), p.clone()));
            }
            env.push(("NO_PROXY".to_string(), "127.0.0.1,localhost".to_string()));
            env.push(("NODE_USE_ENV_PROXY".to_string(), "1".to_string()));
        }
        Launch {
            argv,
            env,
            cwd: self.cwd.clone(),
        }
    }

    pub fn encode_message(&mut self, content: &Value) -> Result<Vec<u8>, DriverError> {
        if !(content.is_string() || content.is_array()) {
            return Err(DriverError::Invalid(
                "content must be text or an array of content blocks".into(),
            ));
        }
        let mut line = serde_json::to_vec(&json!({
            "type": "user",
            "message": {"role": "user", "content": content},
            "parent_tool_use_id": null,
        }))
        .map_err(|e| DriverError::Invalid(e.to_string()))?;
        line.push(b'\n');
        Ok(line)
    }

    pub fn on_stdout(&mut self, bytes: &[u8]) -> Output {
        let mut out = Output::default();
        for line in self.lines.push(bytes) {
            self.line(line, &mut out);
        }
        out
    }

    fn line(&mut self, line: crate::Line, out: &mut Output) {
        match line {
            crate::Line::Full(l) => self.message(&l, out),
            crate::Line::TooLong(n) => out.events.push(AgentEvent {
                kind: EventKind::Error,
                data: json!({
                    "message": format!("the agent wrote a line of {n} bytes, over the limit of {MAX_LINE} bytes; it was dropped"),
                    "bytes": n,
                }),
            }),
        }
    }

    fn message(&mut self, line: &[u8], out: &mut Output) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        if line.len() > LARGE_LINE {
            return self.large_message(line, out);
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            out.events.push(AgentEvent {
                kind: EventKind::Stdout,
                data: json!({"text": String::from_utf8_lossy(line)}),
            });
            return;
        };
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        match kind.as_str() {
            "system" => {
                if v.get("subtype").and_then(Value::as_str) == Some("init") {
                    out.update.agent_session_id = v
                        .get("session_id")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    out.update.cli_version = v
                        .get("claude_code_version")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                }
                out.events.push(AgentEvent {
                    kind: EventKind::System,
                    data: v,
                });
            }
            "assistant" => {
                let tools: Vec<Value> = v
                    .pointer("/message/content")
                    .and_then(Value::as_array)
                    .map(|c| {
                        c.iter()
                            .filter(|b| b["type"] == "tool_use")
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                out.events.push(AgentEvent {
                    kind: EventKind::Assistant,
                    data: v,
                });
                for t in tools {
                    out.events.push(AgentEvent {
                        kind: EventKind::ToolUse,
                        data: t,
                    });
                }
                out.update.state = Some(SessionState::Running);
            }
            "user" => {
                let results: Vec<Value> = v
                    .pointer("/message/content")
                    .and_then(Value::as_array)
                    .map(|c| {
                        c.iter()
                            .filter(|b| b["type"] == "tool_result")
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                if results.is_empty() {
                    out.events.push(AgentEvent {
                        kind: EventKind::UserEcho,
                        data: v,
                    });
                } else {
                    for r in results {
                        out.events.push(AgentEvent {
                            kind: EventKind::ToolResult,
                            data: r,
                        });
                    }
                }
            }
            "result" => {
                let is_error = v.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                let subtype = v
                    .get("subtype")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if let Some(id) = v.get("session_id").and_then(Value::as_str) {
                    out.update.agent_session_id = Some(id.to_string());
                }
                out.update.agent_cost_usd = v.get("total_cost_usd").and_then(Value::as_f64);
                out.events.push(AgentEvent {
                    kind: EventKind::Result,
                    data: v,
                });
                out.update.state = Some(SessionState::Idle);
                // Any subtype but success (error_max_turns, error_during_execution, …) is the
                // reason the turn ended; the agent stays ready for the next message.
                out.update.state_reason = (is_error || subtype != "success").then_some(subtype);
            }
            // The model's answer as it streams (`--include-partial-messages`): a preview,
            // which the session passes on live and never stores.
            "stream_event" => out.events.push(AgentEvent {
                kind: EventKind::from(crate::STREAM_EVENT),
                data: v.get("event").cloned().unwrap_or(Value::Null),
            }),
            "control_request" => {
                let req = v.get("request").cloned().unwrap_or(Value::Null);
                let id = v
                    .get("request_id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if req.get("subtype").and_then(Value::as_str) == Some("can_use_tool") {
                    self.permission_request(id, &req, v, out);
                } else {
                    out.events.push(AgentEvent {
                        kind: EventKind::from(kind),
                        data: v,
                    });
                }
            }
            _ => out.events.push(AgentEvent {
                kind: EventKind::from(kind),
                data: v,
            }),
        }
    }

    /// A line over [`LARGE_LINE`]: the same state changes as [`Self::message`] from its small
    /// fields, and an event of its type holding those fields, `truncated` and its size (a
    /// line that is not such an object is a `stdout` event with the line's start). A
    /// permission request this large is denied at once: the operator could not see it.
    fn large_message(&mut self, line: &[u8], out: &mut Output) {
        let bytes = line.len();
        let Ok(m) = serde_json::from_slice::<Large>(line) else {
            out.events.push(AgentEvent {
                kind: "stdout".into(),
                data: json!({"text": preview(line, PREVIEW), "truncated": true, "bytes": bytes}),
            });
            return;
        };
        let kind = m.kind.clone().unwrap_or_else(|| "unknown".into());
        let data = json!({
            "type": kind,
            "subtype": m.subtype,
            "session_id": m.session_id,
            "is_error": m.is_error,
            "total_cost_usd": m.total_cost_usd,
            "truncated": true,
            "bytes": bytes,
        });
        match kind.as_str() {
            "system" if m.subtype.as_deref() == Some("init") => {
                out.update.agent_session_id = m.session_id;
                out.update.cli_version = m.claude_code_version;
            }
            "assistant" => out.update.state = Some(SessionState::Running),
            "result" => {
                if let Some(id) = m.session_id {
                    out.update.agent_session_id = Some(id);
                }
                out.update.agent_cost_usd = m.total_cost_usd;
                out.update.state = Some(SessionState::Idle);
                let subtype = m.subtype.unwrap_or_default();
                out.update.state_reason =
                    (m.is_error.unwrap_or(false) || subtype != "success").then_some(subtype);
            }
            "control_request"
                if m.request.as_ref().and_then(|r| r.subtype.as_deref())
                    == Some("can_use_tool") =>
            {
                let id = m.request_id.unwrap_or_default();
                let tool = m.request.and_then(|r| r.tool_name).unwrap_or_default();
                let msg = format!("denied: the request was {bytes} bytes, over {LARGE_LINE}");
                out.events.push(AgentEvent {
                    kind: "permission_request".into(),
                    data: json!({"request_id": id, "tool_name": tool, "truncated": true, "bytes": bytes}),
                });
                self.pending
                    .insert(id.clone(), (Value::Null, std::time::Instant::now()));
                if let Some(b) = self.answer_permission(&id, false, Some(&msg)) {
                    out.stdin.push(b);
                    out.events.push(AgentEvent {
                        kind: "permission_answer".into(),
                        data: json!({"request_id": id, "allow": false, "message": msg, "by": "size"}),
                    });
                }
                return;
            }
            _ => {}
        }
        out.events.push(AgentEvent {
            kind: kind.into(),
            data,
        });
    }

    pub fn on_stderr(&mut self, bytes: &[u8]) -> Output {
        self.err_tail.extend_from_slice(bytes);
        if self.err_tail.len() > STDERR_TAIL {
            let cut = self.err_tail.len() - STDERR_TAIL;
            self.err_tail.drain(..cut);
        }
        Output {
            events: vec![AgentEvent {
                kind: EventKind::Stderr,
                data: json!({"text": String::from_utf8_lossy(bytes)}),
            }],
            ..Default::default()
        }
    }

    fn permission_request(&mut self, id: String, req: &Value, v: Value, out: &mut Output) {
        let input = req.get("input").cloned().unwrap_or(Value::Null);
        let tool = req
            .get("tool_name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let timeout = self
            .spec
            .permission_timeout_s
            .unwrap_or(DEFAULT_PERMISSION_TIMEOUT_S);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
        self.pending.insert(id.clone(), (input.clone(), deadline));
        out.events.push(AgentEvent {
            kind: EventKind::PermissionRequest,
            data: json!({"request_id": id, "tool_name": tool, "input": input, "request": v}),
        });
        let subject = rule_subject(&tool, &input);
        let rule = self.spec.permission_rules.iter().find(|r| {
            (r.tool == "*" || r.tool == tool)
                && r.pattern.as_deref().is_none_or(|p| glob(p, &subject))
        });
        if let Some(rule) = rule.cloned() {
            let msg = format!(
                "{} by rule {}{}",
                if rule.allow { "allowed" } else { "denied" },
                rule.tool,
                rule.pattern
                    .as_deref()
                    .map(|p| format!(" {p}"))
                    .unwrap_or_default()
            );
            if let Some(b) = self.answer_permission(&id, rule.allow, Some(&msg)) {
                out.stdin.push(b);
                out.events.push(AgentEvent {
                    kind: EventKind::PermissionAnswer,
                    data: json!({"request_id": id, "allow": rule.allow, "message": msg, "by": "rule"}),
                });
            }
        }
    }

    pub fn on_exit(&mut self, code: Option<i32>, signal: Option<i32>) -> Output {
        let mut out = Output::default();
        if let Some(line) = self.lines.finish() {
            self.line(line, &mut out);
        }
        let tail = String::from_utf8_lossy(&self.err_tail).trim().to_string();
        let ok = code == Some(0);
        let reason = match (code, signal) {
            (Some(0), _) => "the CLI exited".to_string(),
            (Some(c), _) => format!("the CLI exited with code {c}"),
            (None, Some(s)) => format!("the CLI was killed by signal {s}"),
            _ => "the CLI ended".to_string(),
        };
        let reason = if ok || tail.is_empty() {
            reason
        } else {
            format!("{reason}: {tail}")
        };
        out.events.push(AgentEvent {
            kind: EventKind::Status,
            data: json!({"exit_code": code, "signal": signal, "stderr_tail": tail}),
        });
        out.update.state = Some(if ok {
            SessionState::Stopped
        } else {
            SessionState::Failed
        });
        out.update.state_reason = Some(reason);
        out
    }

    pub fn interrupt(&mut self) -> Interrupt {
        self.next_request += 1;
        let line = json!({
            "type": "control_request",
            "request_id": format!("berth-int-{}", self.next_request),
            "request": {"subtype": "interrupt"},
        });
        let mut b = serde_json::to_vec(&line).unwrap_or_default();
        b.push(b'\n');
        Interrupt::Stdin(b)
    }

    /// Drop every pending permission request (their answers come from elsewhere).
    pub(crate) fn forget_pending(&mut self) {
        self.pending.clear();
    }

    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        self.pending.values().map(|(_, d)| *d).min()
    }

    /// Deny every request whose deadline has passed.
    pub fn expire(&mut self, now: std::time::Instant) -> Output {
        let mut out = Output::default();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in due {
            let msg = "permission request timed out";
            if let Some(b) = self.answer_permission(&id, false, Some(msg)) {
                out.stdin.push(b);
                out.events.push(AgentEvent {
                    kind: EventKind::PermissionAnswer,
                    data: json!({"request_id": id, "allow": false, "message": msg, "by": "timeout"}),
                });
            }
        }
        out
    }

    pub fn set_permission_mode(&mut self, mode: &str) -> Result<Vec<u8>, DriverError> {
        if !SAFE_MODES.contains(&mode) {
            return Err(DriverError::Invalid(format!(
                "mode must be one of {SAFE_MODES:?}"
            )));
        }
        self.next_request += 1;
        let mut b = serde_json::to_vec(&json!({
            "type": "control_request",
            "request_id": format!("berth-mode-{}", self.next_request),
            "request": {"subtype": "set_permission_mode", "mode": mode},
        }))
        .map_err(|e| DriverError::Invalid(e.to_string()))?;
        b.push(b'\n');
        Ok(b)
    }

    /// The stdin line answering a permission request, or None if it is not pending.
    pub fn answer_permission(
        &mut self,
        request_id: &str,
        allow: bool,
        message: Option<&str>,
    ) -> Option<Vec<u8>> {
        let (input, _) = self.pending.remove(request_id)?;
        let response = if allow {
            json!({"behavior": "allow", "updatedInput": input})
        } else {
            json!({"behavior": "deny", "message": message.unwrap_or("denied by the operator")})
        };
        let mut b = serde_json::to_vec(&json!({
            "type": "control_response",
            "response": {"subtype": "success", "request_id": request_id, "response": response},
        }))
        .ok()?;
        b.push(b'\n');
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> ClaudeEnv {
        ClaudeEnv {
            cli: "/opt/claude".into(),
            base_url: "http://127.0.0.1:4000".into(),
            token: "tok".into(),
            config_dir: "/home/agent/.claude-s1".into(),
            resume: Some("abc".into()),
            proxy: None,
        }
    }

    #[test]
    fn an_over_long_line_becomes_an_error_event_and_the_next_line_still_counts() {
        let mut d = ClaudeDriver::new(&ClaudeAgent::default(), env(), "/workspace").expect("d");
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(MAX_LINE >> 20) {
            assert!(d.on_stdout(&chunk).events.is_empty());
        }
        let out = d.on_stdout(b"yy\n{\"type\":\"assistant\",\"message\":{}}\n");
        assert_eq!(out.events.len(), 2, "{:?}", out.events);
        assert_eq!(out.events[0].kind, "error");
        assert_eq!(out.events[0].data["bytes"], MAX_LINE as u64 + 2);
        assert_eq!(out.events[1].kind, "assistant");
        // A partial over-long line at exit is reported too.
        d.on_stdout(&vec![b'z'; MAX_LINE + 1]);
        let out = d.on_exit(Some(0), None);
        assert_eq!(out.events[0].kind, "error", "{:?}", out.events);
    }

    /// Counts bytes allocated on this thread while `COUNTING` is set (tests run on their own
    /// threads, so others' allocations are not counted).
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;
        thread_local! {
            pub static COUNTING: Cell<bool> = const { Cell::new(false) };
            pub static ALLOCATED: Cell<usize> = const { Cell::new(0) };
        }
        pub struct Counting;
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, l: Layout) -> *mut u8 {
                let _ = COUNTING.try_with(|c| {
                    if c.get() {
                        let _ = ALLOCATED.try_with(|a| a.set(a.get() + l.size()));
                    }
                });
                // SAFETY: the caller's contract is passed through to the system allocator.
                unsafe { System.alloc(l) }
            }
            unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
                // SAFETY: as above.
                unsafe { System.dealloc(p, l) }
            }
        }
        #[global_allocator]
        static A: Counting = Counting;
    }

    /// What `f` allocates on this thread, in bytes (frees not subtracted).
    fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
        counting::ALLOCATED.with(|a| a.set(0));
        counting::COUNTING.with(|c| c.set(true));
        let r = f();
        counting::COUNTING.with(|c| c.set(false));
        (r, counting::ALLOCATED.with(|a| a.get()))
    }

    #[test]
    fn a_large_line_is_not_built_into_a_value() {
        let mut d = ClaudeDriver::new(&ClaudeAgent::default(), env(), "/workspace").expect("d");
        // 15 MiB of `[0,0,…]`: as a `Value`, hundreds of MiB.
        let mut line = Vec::with_capacity(15 << 20);
        line.push(b'[');
        while line.len() < (15 << 20) - 2 {
            line.extend_from_slice(b"0,");
        }
        line.extend_from_slice(b"0]\n");
        let (out, bytes) = allocated_by(|| d.on_stdout(&line));
        assert_eq!(out.events.len(), 1, "{:?}", out.events.len());
        assert_eq!(out.events[0].kind, "stdout");
        assert_eq!(out.events[0].data["truncated"], true);
        assert_eq!(out.events[0].data["bytes"], line.len() as u64 - 1);
        assert!(out.events[0].data["text"]
            .as_str()
            .is_some_and(|t| t.len() <= PREVIEW));
        // The line buffer holds the line once (and may grow through doublings); a `Value`
        // tree would be well over ten times the line.
        assert!(
            bytes < 64 << 20,
            "allocated {bytes} bytes for a 15 MiB line"
        );

        // A large object keeps its type and the fields the driver acts on.
        let pad = "x".repeat(2 << 20);
        let result = format!(
            "{{\"type\":\"result\",\"subtype\":\"success\",\"session_id\":\"s9\",\"total_cost_usd\":0.5,\"result\":\"{pad}\",\"pad\":[{}0]}}\n",
            "0,".repeat(1 << 20)
        );
        let (out, bytes) = allocated_by(|| d.on_stdout(result.as_bytes()));
        assert!(bytes < 32 << 20, "allocated {bytes} bytes for a 4 MiB line");
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0].kind, "result");
        assert_eq!(out.events[0].data["truncated"], true);
        assert_eq!(out.update.agent_session_id.as_deref(), Some("s9"));
        assert_eq!(out.update.agent_cost_usd, Some(0.5));
        assert_eq!(out.update.state, Some(SessionState::Idle));

        // A permission request too large to show is denied, not left pending.
        let req = format!(
            "{{\"type\":\"control_request\",\"request_id\":\"r1\",\"request\":{{\"subtype\":\"can_use_tool\",\"tool_name\":\"Write\",\"input\":{{\"content\":\"{pad}\"}}}}}}\n"
        );
        let out = d.on_stdout(req.as_bytes());
        assert_eq!(out.stdin.len(), 1);
        let ans: Value = serde_json::from_slice(&out.stdin[0]).expect("json");
        assert_eq!(ans["response"]["request_id"], "r1");
        assert_eq!(ans["response"]["response"]["behavior"], "deny");
        assert!(d.next_deadline().is_none(), "nothing left pending");
    }

    #[test]
    fn flags_cannot_be_injected_and_output_maps_to_events() {
        let spec = ClaudeAgent {
            model: Some("--dangerous".into()),
            max_turns: Some(3),
            ..Default::default()
        };
        let d = ClaudeDriver::new(&spec, env(), "/workspace").expect("driver");
        let l = d.launch();
        assert!(l.argv.contains(&"--model=--dangerous".to_string()));
        assert!(l.argv.contains(&"--resume=abc".to_string()));
        assert!(l
            .argv
            .iter()
            .skip(1)
            .all(|a| a.starts_with("--") || a == "-p"));
        let bad = ClaudeAgent {
            allowed_tools: vec!["Bash,Write".into()],
            ..Default::default()
        };
        assert!(ClaudeDriver::new(&bad, env(), "/w").is_err());
        let bad = ClaudeAgent {
            permission_mode: Some("yolo".into()),
            ..Default::default()
        };
        assert!(ClaudeDriver::new(&bad, env(), "/w").is_err());

        let mut d =
            ClaudeDriver::new(&ClaudeAgent::default(), env(), "/workspace").expect("driver");
        let out = d.on_stdout(b"{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s-1\",\"claude_code_version\":\"2.1.328\"}\n{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"Bash\",\"input\":{}}]}}\n{\"type\":\"res");
        assert_eq!(out.update.agent_session_id.as_deref(), Some("s-1"));
        assert_eq!(out.update.cli_version.as_deref(), Some("2.1.328"));
        let kinds: Vec<&str> = out.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, vec!["system", "assistant", "tool_use"]);
        let out = d.on_stdout(
            b"ult\",\"subtype\":\"error_max_turns\",\"is_error\":true,\"session_id\":\"s-1\"}\n",
        );
        assert_eq!(out.events[0].kind, "result");
        assert_eq!(out.update.state, Some(SessionState::Idle));
        assert_eq!(out.update.state_reason.as_deref(), Some("error_max_turns"));
        let out = d.on_stdout(b"{\"type\":\"control_request\",\"request_id\":\"r1\",\"request\":{\"subtype\":\"can_use_tool\",\"tool_name\":\"Bash\",\"input\":{\"command\":\"ls\"}}}\n");
        assert_eq!(out.events[0].kind, "permission_request");
        let ans = d.answer_permission("r1", true, None).expect("pending");
        let v: Value = serde_json::from_slice(&ans).expect("json");
        assert_eq!(v["response"]["response"]["updatedInput"]["command"], "ls");
        assert!(
            d.answer_permission("r1", true, None).is_none(),
            "answered once"
        );
    }

    #[test]
    fn rules_answer_and_timeouts_deny() {
        assert!(glob("ls*", "ls -la") && glob("*.txt", "/w/a.txt") && glob("a*c*e", "abcde"));
        assert!(!glob("ls*", "rm -rf /") && !glob("a*z", "abc"));
        let spec = ClaudeAgent {
            permission_rules: vec![
                berth_api::PermissionRule {
                    tool: "Bash".into(),
                    pattern: Some("rm *".into()),
                    allow: false,
                },
                berth_api::PermissionRule {
                    tool: "Write".into(),
                    pattern: Some("/workspace/*".into()),
                    allow: true,
                },
            ],
            permission_timeout_s: Some(1),
            ..Default::default()
        };
        let mut d = ClaudeDriver::new(&spec, env(), "/workspace").expect("driver");
        let req = |id: &str, tool: &str, input: Value| {
            format!(
                "{}\n",
                json!({"type": "control_request", "request_id": id, "request": {"subtype": "can_use_tool", "tool_name": tool, "input": input}})
            )
        };
        let behavior = |b: &[u8]| {
            serde_json::from_slice::<Value>(b).expect("json")["response"]["response"]["behavior"]
                .clone()
        };
        let out = d.on_stdout(req("a", "Bash", json!({"command": "rm -rf /"})).as_bytes());
        assert_eq!(behavior(&out.stdin[0]), "deny");
        let out = d.on_stdout(req("b", "Write", json!({"file_path": "/workspace/x"})).as_bytes());
        assert_eq!(behavior(&out.stdin[0]), "allow");
        let out = d.on_stdout(req("c", "Bash", json!({"command": "ls"})).as_bytes());
        assert!(out.stdin.is_empty(), "no rule: a client decides");
        let deadline = d.next_deadline().expect("pending");
        assert!(d
            .expire(deadline - std::time::Duration::from_millis(1))
            .stdin
            .is_empty());
        let out = d.expire(deadline);
        assert_eq!(behavior(&out.stdin[0]), "deny");
        assert!(d.next_deadline().is_none());
        assert!(d.set_permission_mode("yolo").is_err());
        assert!(d.set_permission_mode("plan").is_ok());
    }
}
