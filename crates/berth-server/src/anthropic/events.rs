//! berth's session events (the Claude Code CLI's stream-json, recorded) as Managed Agents
//! events. Each berth event becomes zero or more events with ids `sevt_<seq>_<n>`, so the ids
//! follow the log's order and the list and the stream agree. The mapping keeps a little state
//! (the open model request, tool-use ids), so it is always fed from the session's start.

use super::tools::Policy;
use crate::engine::custom_tools::TOOL_PREFIX;
use crate::engine::sessions::previews::{MODEL_REQUEST_START, MODEL_USAGE};
use berth_api::{Event, EventKind};
use serde_json::{json, Value};
use std::collections::HashMap;

/// The event types `events.list` may filter on and the mapping produces.
pub const TYPES: [&str; 16] = [
    "user.message",
    "user.custom_tool_result",
    "agent.custom_tool_use",
    "agent.mcp_tool_use",
    "agent.mcp_tool_result",
    "agent.message",
    "agent.thinking",
    "agent.tool_use",
    "agent.tool_result",
    "span.model_request_start",
    "span.model_request_end",
    "session.status_running",
    "session.status_idle",
    "session.status_terminated",
    "session.error",
    "session.usage",
];

pub fn event_id(seq: i64, n: usize) -> String {
    format!("sevt_{seq:012}_{n}")
}

/// (seq, n) of an id made by `event_id`.
pub fn parse_id(id: &str) -> Option<(i64, usize)> {
    let (seq, n) = id.strip_prefix("sevt_")?.split_once('_')?;
    // Seqs start at 1: a negative one is forged (and `seq - 1` on it would overflow).
    let seq = seq.parse::<i64>().ok().filter(|s| *s > 0)?;
    Some((seq, n.parse().ok()?))
}

/// The CLI's name of a built-in tool as the toolset names it.
fn tool_name(cli: &str) -> String {
    super::tools::TOOLS
        .iter()
        .find(|(_, c)| *c == cli)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| cli.to_string())
}

/// Text or blocks as a list of content blocks.
fn blocks(v: &Value) -> Value {
    match v {
        Value::String(s) => json!([{"type": "text", "text": s}]),
        Value::Array(_) => v.clone(),
        Value::Null => json!([]),
        other => json!([{"type": "text", "text": other.to_string()}]),
    }
}

pub struct Mapper {
    /// Which CLI tools run without asking, and the MCP servers. Anything else the CLI asks
    /// about waits for the client: `agent.tool_use` with `evaluated_permission: "ask"`, then
    /// `session.status_idle` `requires_action`.
    policy: Policy,
    /// Tool uses of tools that may ask, held until the CLI asks (or runs them without asking).
    held: Vec<Value>,
    /// The CLI's `toolu_…` ids → the `sevt_` id of their `agent.tool_use` (or MCP or custom
    /// tool use) and which of the three it was.
    tool_uses: HashMap<String, (String, Use)>,
    /// The model request whose messages are being mapped: (message id, start event id, usage
    /// as the CLI echoed it).
    open: Option<(String, String, Value)>,
    /// Usage as the gateway metered it (`model_usage` events), by message id, until the
    /// request's span ends: what `span.model_request_end` reports when it is there.
    metered: HashMap<String, Value>,
    /// A custom tool use ended the model's answer before its metered usage was logged: its
    /// span end and `requires_action` wait for that usage (or the next event).
    pending_idle: Option<String>,
    /// The last event mapped was the metered usage (seq, message id) of an answer and made no
    /// events: that answer's next `assistant` event takes its ids from that seq (see
    /// `id_base`).
    silent_usage: Option<(i64, String)>,
    /// A turn is under way: only its end is `session.status_idle` (an agent restarting after
    /// its box was parked also goes idle, which ends no turn).
    running: bool,
    /// The session's budget was spent during this turn: it ends `budget_reached`.
    budget_spent: bool,
    /// Tokens the CLI reported at the end of each turn, summed: input, output, cache read,
    /// cache writes (5 min, 1 h).
    usage: [u64; 5],
}

/// What kind of tool a tool use called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    BuiltIn,
    Mcp,
    Custom,
}

impl Mapper {
    pub fn new(policy: Policy) -> Mapper {
        Mapper {
            policy,
            held: Vec::new(),
            tool_uses: HashMap::new(),
            open: None,
            metered: HashMap::new(),
            pending_idle: None,
            silent_usage: None,
            running: false,
            budget_spent: false,
            usage: [0; 5],
        }
    }

    /// Where in the events of the next `assistant` event its first text or thinking block
    /// lands, if that event is of the model answer `message_id` (the CLI writes one `assistant`
    /// line per content block): after the open request's span end and this one's span start
    /// when it starts a new request.
    pub fn block_position(&self, message_id: &str) -> usize {
        match &self.open {
            Some((open, _, _)) if open == message_id => 0,
            Some(_) => 2,
            None => 1,
        }
    }

    fn asks(&self, cli_tool: &str) -> bool {
        self.policy.asks(cli_tool)
    }

    /// An `agent.tool_use` or `agent.mcp_tool_use` (its type and fields) for the CLI's block.
    fn tool_use(&mut self, id: String, block: &Value, permission: &str) -> (&'static str, Value) {
        let cli = block["name"].as_str().unwrap_or("");
        let mcp = self.policy.mcp_tool(cli);
        if let Some(t) = block["id"].as_str() {
            let kind = if mcp.is_some() {
                Use::Mcp
            } else {
                Use::BuiltIn
            };
            self.tool_uses.insert(t.to_string(), (id, kind));
        }
        match mcp {
            Some((server, tool)) => (
                "agent.mcp_tool_use",
                json!({"mcp_server_name": server, "name": tool, "input": block["input"], "evaluated_permission": permission}),
            ),
            None => (
                "agent.tool_use",
                json!({"name": tool_name(cli), "input": block["input"], "evaluated_permission": permission}),
            ),
        }
    }

    /// End the open model request's span: with its metered usage when logged, else the CLI's;
    /// then the `requires_action` a custom tool use left waiting for it.
    fn close(&mut self, out: &mut Vec<(&'static str, Value)>) {
        if let Some((mid, start, usage)) = self.open.take() {
            let usage = self.metered.remove(&mid).unwrap_or(usage);
            out.push((
                "span.model_request_end",
                json!({"model_request_start_id": start, "is_error": false, "model_usage": usage}),
            ));
        }
        if let Some(id) = self.pending_idle.take() {
            out.push((
                "session.status_idle",
                json!({"stop_reason": {"type": "requires_action", "event_ids": [id]}}),
            ));
        }
    }

    /// The seq the ids of an `assistant` event of answer `message_id` at `seq` are made from:
    /// its own, or, right after that answer's metered usage (which made no events), the
    /// usage's. The usage is logged when the gateway reads the answer's end, which may be
    /// after a live preview of the answer's last block was given the id of the event then
    /// next: either way the block's id is the same.
    pub fn id_base(&self, seq: i64, message_id: &str) -> i64 {
        match &self.silent_usage {
            Some((s, mid)) if *s == seq - 1 && mid == message_id => seq - 1,
            _ => seq,
        }
    }

    fn open_id(&self) -> Option<&str> {
        self.open.as_ref().map(|o| o.0.as_str())
    }

    pub fn map(&mut self, e: &Event) -> Vec<Value> {
        let mut out: Vec<(&str, Value)> = Vec::new();
        let base = match e.kind {
            EventKind::Assistant => self.id_base(
                e.seq,
                e.data
                    .pointer("/message/id")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            ),
            _ => e.seq,
        };
        self.silent_usage = None;
        let same_request = match &e.kind {
            EventKind::ToolUse => true,
            EventKind::Assistant => {
                let mid = e.data.pointer("/message/id").and_then(Value::as_str);
                self.open_id().is_some() && self.open_id() == mid
            }
            // Logged before the CLI read the answer's end, so often before the answer's last
            // blocks: it ends no span, except one a custom tool use left waiting for it.
            EventKind::Other(k) if k.as_str() == MODEL_USAGE => {
                let mid = e.data["message_id"].as_str().unwrap_or("");
                let u = &e.data["usage"];
                let usage = json!({
                    "input_tokens": u["input_tokens"].as_u64().unwrap_or(0),
                    "output_tokens": u["output_tokens"].as_u64().unwrap_or(0),
                    "cache_read_input_tokens": u["cache_read_input_tokens"].as_u64().unwrap_or(0),
                    "cache_creation_input_tokens": u["cache_creation_input_tokens"].as_u64().unwrap_or(0),
                });
                // Usage of answers no span took (an answer the CLI dropped) is let go.
                if self.metered.len() >= 64 {
                    self.metered.clear();
                }
                self.metered.insert(mid.to_string(), usage);
                !(self.pending_idle.is_some() && self.open_id() == Some(mid))
            }
            _ => false,
        };
        // A model request's span ends at the first event that is not part of its answer.
        if !same_request {
            self.close(&mut out);
        }
        let d = &e.data;
        match &e.kind {
            EventKind::User => {
                out.push(("user.message", json!({"content": blocks(&d["content"])})))
            }
            EventKind::Assistant => {
                let msg = &d["message"];
                let u = &msg["usage"];
                let usage = json!({
                    "input_tokens": u["input_tokens"].as_u64().unwrap_or(0),
                    "output_tokens": u["output_tokens"].as_u64().unwrap_or(0),
                    "cache_read_input_tokens": u["cache_read_input_tokens"].as_u64().unwrap_or(0),
                    "cache_creation_input_tokens": u["cache_creation_input_tokens"].as_u64().unwrap_or(0),
                });
                if self.open.is_none() {
                    // Its id is the one it gets below: the first of this batch.
                    let start = event_id(base, out.len());
                    out.push(("span.model_request_start", json!({})));
                    let mid = msg["id"].as_str().unwrap_or("").to_string();
                    self.open = Some((mid, start, usage));
                } else if let Some(o) = self.open.as_mut() {
                    o.2 = usage;
                }
                for b in msg["content"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    match b["type"].as_str() {
                        Some("text") => out.push((
                            "agent.message",
                            json!({"content": [{"type": "text", "text": b["text"]}]}),
                        )),
                        Some("thinking") | Some("redacted_thinking") => {
                            out.push(("agent.thinking", json!({})))
                        }
                        _ => {}
                    }
                }
            }
            // A custom tool: the client runs it, so the turn waits on the client.
            EventKind::ToolUse
                if d["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(TOOL_PREFIX)) =>
            {
                let id = event_id(base, out.len());
                let name = d["name"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches(TOOL_PREFIX);
                if let Some(t) = d["id"].as_str() {
                    self.tool_uses
                        .insert(t.to_string(), (id.clone(), Use::Custom));
                }
                out.push((
                    "agent.custom_tool_use",
                    json!({"name": name, "input": d["input"]}),
                ));
                // The model's answer ended with the call: its span ends, and the turn waits on
                // the client; once the answer's metered usage is there.
                self.pending_idle = Some(id);
                let metered = self
                    .open_id()
                    .is_some_and(|mid| self.metered.contains_key(mid));
                if metered || self.open.is_none() {
                    self.close(&mut out);
                }
            }
            EventKind::ToolUse if self.asks(d["name"].as_str().unwrap_or("")) => {
                self.held.push(d.clone())
            }
            EventKind::ToolUse => {
                let v = self.tool_use(event_id(base, out.len()), d, "allow");
                out.push(v);
            }
            EventKind::PermissionRequest if self.asks(d["tool_name"].as_str().unwrap_or("")) => {
                // The held tool use it is about: by id when the CLI names it, else by content.
                let by_id = d
                    .pointer("/request/request/tool_use_id")
                    .and_then(Value::as_str);
                let pos = self.held.iter().position(|h| match by_id {
                    Some(i) => h["id"] == i,
                    None => h["name"] == d["tool_name"] && h["input"] == d["input"],
                });
                let block = match pos {
                    Some(p) => self.held.remove(p),
                    None => json!({"name": d["tool_name"], "input": d["input"]}),
                };
                let id = event_id(base, out.len());
                let v = self.tool_use(id.clone(), &block, "ask");
                out.push(v);
                out.push((
                    "session.status_idle",
                    json!({"stop_reason": {"type": "requires_action", "event_ids": [id]}}),
                ));
            }
            // Answered by the client (or its timeout): the turn goes on.
            EventKind::PermissionAnswer if d["by"] != "rule" => {
                self.running = true;
                out.push(("session.status_running", json!({})))
            }
            EventKind::ToolResult => {
                let raw = d["tool_use_id"].as_str().unwrap_or("");
                // A held tool use the CLI ran without asking.
                if let Some(p) = self.held.iter().position(|h| h["id"] == raw) {
                    let block = self.held.remove(p);
                    let v = self.tool_use(event_id(base, out.len()), &block, "allow");
                    out.push(v);
                }
                let (id, kind) = self
                    .tool_uses
                    .get(raw)
                    .cloned()
                    .unwrap_or_else(|| (raw.to_string(), Use::BuiltIn));
                let content = blocks(&d["content"]);
                let is_error = d["is_error"].as_bool().unwrap_or(false);
                match kind {
                    Use::BuiltIn => out.push((
                        "agent.tool_result",
                        json!({"tool_use_id": id, "content": content, "is_error": is_error}),
                    )),
                    Use::Mcp => out.push((
                        "agent.mcp_tool_result",
                        json!({"mcp_tool_use_id": id, "content": content, "is_error": is_error}),
                    )),
                    // The client's result, as the CLI took it: the turn goes on.
                    Use::Custom => {
                        out.push((
                            "user.custom_tool_result",
                            json!({"custom_tool_use_id": id, "content": content, "is_error": is_error}),
                        ));
                        self.running = true;
                        out.push(("session.status_running", json!({})));
                    }
                }
            }
            EventKind::Status => match (d["state"].as_str(), d["reason"].as_str()) {
                (Some("running"), _) => {
                    self.running = true;
                    out.push(("session.status_running", json!({})))
                }
                (Some("idle"), _) if self.running => {
                    self.running = false;
                    let reason = if std::mem::take(&mut self.budget_spent) {
                        "budget_reached"
                    } else {
                        "end_turn"
                    };
                    out.push((
                        "session.status_idle",
                        json!({"stop_reason": {"type": reason}}),
                    ))
                }
                // A parked box's session comes back with the next message.
                (Some("stopped"), Some("box parked")) => {}
                (Some("failed"), reason) => {
                    out.push(("session.error", error(reason.unwrap_or("the agent failed"))));
                    out.push(("session.status_terminated", json!({})));
                }
                (Some("stopped") | Some("interrupted"), _) => {
                    out.push(("session.status_terminated", json!({})))
                }
                _ => {}
            },
            // The turn's usage as the CLI totals it from the API's answers (the same answers
            // the gateway metered).
            EventKind::Result => {
                let u = &d["usage"];
                let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
                let five_min = match u.pointer("/cache_creation/ephemeral_5m_input_tokens") {
                    Some(v) => v.as_u64().unwrap_or(0),
                    None => n("/cache_creation_input_tokens"),
                };
                let turn = [
                    n("/input_tokens"),
                    n("/output_tokens"),
                    n("/cache_read_input_tokens"),
                    five_min,
                    n("/cache_creation/ephemeral_1h_input_tokens"),
                ];
                for (total, t) in self.usage.iter_mut().zip(turn) {
                    *total += t;
                }
                let [input, output, read, c5, c1] = self.usage;
                out.push((
                    "session.usage",
                    json!({"usage": {
                        "input_tokens": input, "output_tokens": output, "cache_read_input_tokens": read,
                        "cache_creation": {"ephemeral_5m_input_tokens": c5, "ephemeral_1h_input_tokens": c1},
                    }}),
                ));
            }
            // Noticed by the ledger a moment after the request: only a turn still under way
            // ends for it.
            EventKind::BudgetExhausted if self.running => self.budget_spent = true,
            EventKind::Error => out.push((
                "session.error",
                error(d["message"].as_str().unwrap_or("error")),
            )),
            // The request's start as the CLI streamed it (a Managed Agents session): the span
            // opens here, before the answer's previews; its blocks then belong to it.
            EventKind::Other(k) if k.as_str() == MODEL_REQUEST_START => {
                let start = event_id(base, out.len());
                out.push(("span.model_request_start", json!({})));
                let mid = d["message_id"].as_str().unwrap_or("").to_string();
                let none = json!({"input_tokens": 0, "output_tokens": 0,
                    "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0});
                self.open = Some((mid, start, none));
            }
            EventKind::Other(k) if k.as_str() == MODEL_USAGE && out.is_empty() => {
                let mid = d["message_id"].as_str().unwrap_or("").to_string();
                self.silent_usage = Some((e.seq, mid));
            }
            _ => {}
        }
        out.into_iter()
            .enumerate()
            .map(|(n, (kind, mut v))| {
                v["type"] = json!(kind);
                v["id"] = json!(event_id(base, n));
                v["processed_at"] = json!(e.ts);
                v
            })
            .collect()
    }
}

fn error(message: &str) -> Value {
    json!({"error": {"type": "unknown_error", "message": message, "retry_status": {"type": "terminal"}}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, kind: &str, data: Value) -> Event {
        Event {
            seq,
            session_id: "s".into(),
            ts: "t".into(),
            kind: EventKind::from(kind),
            data,
        }
    }

    fn assistant(mid: &str, block: Value) -> Value {
        json!({"type": "assistant", "message": {"id": mid, "content": [block],
               "usage": {"input_tokens": 10, "output_tokens": 1}}})
    }

    fn metered(mid: &str, out: u64) -> Value {
        json!({"message_id": mid, "usage": {"input_tokens": 10, "output_tokens": out,
               "cache_read_input_tokens": 7, "cache_creation_input_tokens": 3}})
    }

    fn types(v: &[Value]) -> Vec<&str> {
        v.iter().filter_map(|e| e["type"].as_str()).collect()
    }

    /// A span ends where it did, with the metered usage when it is logged (before or after the
    /// answer's blocks), else with the CLI's.
    #[test]
    fn spans_end_with_the_metered_usage() {
        let mut m = Mapper::new(Policy::default());
        m.map(&ev(
            1,
            "assistant",
            assistant("msg_a", json!({"type": "text", "text": "a"})),
        ));
        assert!(m.map(&ev(2, MODEL_USAGE, metered("msg_a", 42))).is_empty());
        let out = m.map(&ev(3, "result", json!({"usage": {}})));
        assert_eq!(types(&out)[0], "span.model_request_end");
        assert_eq!(out[0]["model_usage"]["output_tokens"], 42);
        assert_eq!(out[0]["model_usage"]["cache_read_input_tokens"], 7);
        // Logged before the answer's blocks (they came in the chunk the gateway held).
        m.map(&ev(4, MODEL_USAGE, metered("msg_b", 9)));
        m.map(&ev(
            5,
            "assistant",
            assistant("msg_b", json!({"type": "text", "text": "b"})),
        ));
        let out = m.map(&ev(6, "result", json!({"usage": {}})));
        assert_eq!(out[0]["model_usage"]["output_tokens"], 9);
        // Never metered: the CLI's echo.
        m.map(&ev(
            7,
            "assistant",
            assistant("msg_c", json!({"type": "text", "text": "c"})),
        ));
        let out = m.map(&ev(8, "result", json!({"usage": {}})));
        assert_eq!(out[0]["model_usage"]["output_tokens"], 1);
    }

    /// A custom tool use's span end and `requires_action` wait for the metered usage.
    #[test]
    fn a_custom_tool_use_waits_for_its_answers_usage() {
        let mut m = Mapper::new(Policy::default());
        m.map(&ev(
            1,
            "assistant",
            assistant("msg_a", json!({"type": "text", "text": "a"})),
        ));
        let call = json!({"type": "tool_use", "id": "toolu_1", "name": format!("{TOOL_PREFIX}w"), "input": {}});
        let out = m.map(&ev(2, "tool_use", call.clone()));
        assert_eq!(types(&out), vec!["agent.custom_tool_use"]);
        let out = m.map(&ev(3, MODEL_USAGE, metered("msg_a", 5)));
        assert_eq!(
            types(&out),
            vec!["span.model_request_end", "session.status_idle"]
        );
        assert_eq!(out[0]["model_usage"]["output_tokens"], 5);
        assert_eq!(out[1]["stop_reason"]["event_ids"][0], event_id(2, 0));
        // Usage logged first: all at the tool use.
        m.map(&ev(4, MODEL_USAGE, metered("msg_b", 6)));
        m.map(&ev(
            5,
            "assistant",
            assistant("msg_b", json!({"type": "text", "text": "b"})),
        ));
        let out = m.map(&ev(6, "tool_use", call));
        assert_eq!(
            types(&out),
            vec![
                "agent.custom_tool_use",
                "span.model_request_end",
                "session.status_idle"
            ]
        );
        assert_eq!(out[1]["model_usage"]["output_tokens"], 6);
    }
}
