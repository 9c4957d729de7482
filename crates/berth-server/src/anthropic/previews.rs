//! `event_deltas` on `events.stream`: the session's live previews (`engine::sessions::previews`,
//! the CLI's partial messages) as Managed Agents preview frames, only on the connections that
//! ask for them:
//!
//! ```text
//! {"type":"event_start","event":{"type":"agent.message","id":"sevt_X"}}
//! {"type":"event_delta","event_id":"sevt_X","delta":{"type":"content_delta","index":0,"content":{"type":"text","text":"…"}}}
//! ```
//!
//! `sevt_X` is the id the stored `agent.message` gets: the preview knows the seq of the stored
//! event after it (the CLI's `assistant` line for the block), and the stream's event mapping
//! knows where in that event's mapped events the block lands. `agent.thinking` gets a start
//! frame only. Previews are best-effort: a connection that falls behind misses some, and on a
//! shared store only the server running the session has them.

use super::events::{event_id, Mapper};
use crate::engine::sessions::previews::Preview;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;

/// Previews a connection holds for events it has not sent yet.
const HELD: usize = 4096;

pub struct Previews {
    message: bool,
    thinking: bool,
    /// The model answer being streamed (`message_start`'s id).
    message_id: String,
    /// The text block being previewed: (its index in the answer, the id it will have).
    text: Option<(u64, String)>,
    held: VecDeque<Arc<Preview>>,
}

impl Previews {
    /// For the `event_deltas[]` asked for (already checked); None when none.
    pub fn new(wanted: &[String]) -> Option<Previews> {
        (!wanted.is_empty()).then(|| Previews {
            message: wanted.iter().any(|w| w == "agent.message"),
            thinking: wanted.iter().any(|w| w == "agent.thinking"),
            message_id: String::new(),
            text: None,
            held: VecDeque::new(),
        })
    }

    /// A preview arrived; `last` is the seq of the last event the connection has mapped. Its
    /// frames now when its place is next, none when its place has gone by, else held.
    pub fn arrived(&mut self, p: Arc<Preview>, last: i64, m: &Mapper) -> Vec<Value> {
        if p.next_seq <= last {
            return Vec::new();
        }
        if p.next_seq == last + 1 && self.held.is_empty() {
            return self.frames(&p, m);
        }
        if self.held.len() == HELD {
            self.held.pop_front();
        }
        self.held.push_back(p);
        self.after(last, m)
    }

    /// Event `last` has been mapped (and its frames sent): the held previews that come next.
    pub fn after(&mut self, last: i64, m: &Mapper) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(p) = self.held.front() {
            if p.next_seq <= last {
                self.held.pop_front();
            } else if p.next_seq == last + 1 {
                if let Some(p) = self.held.pop_front() {
                    out.extend(self.frames(&p, m));
                }
            } else {
                break;
            }
        }
        out
    }

    fn frames(&mut self, p: &Preview, m: &Mapper) -> Vec<Value> {
        let e = &p.event;
        match e["type"].as_str() {
            Some("message_start") => {
                self.message_id = e["message"]["id"].as_str().unwrap_or("").to_string();
                self.text = None;
                Vec::new()
            }
            Some("content_block_start") => {
                let seq = m.id_base(p.next_seq, &self.message_id);
                let id = event_id(seq, m.block_position(&self.message_id));
                self.text = None;
                match e["content_block"]["type"].as_str() {
                    Some("text") => {
                        self.text = Some((e["index"].as_u64().unwrap_or(0), id.clone()));
                        self.start("agent.message", id, self.message)
                    }
                    Some("thinking" | "redacted_thinking") => {
                        self.start("agent.thinking", id, self.thinking)
                    }
                    _ => Vec::new(),
                }
            }
            Some("content_block_delta") if self.message => {
                let Some((index, id)) = &self.text else {
                    return Vec::new();
                };
                let text = e["delta"]["text"].as_str();
                if e["index"].as_u64() != Some(*index) || e["delta"]["type"] != "text_delta" {
                    return Vec::new();
                }
                vec![json!({
                    "type": "event_delta",
                    "event_id": id,
                    // The stored agent.message holds this one block.
                    "delta": {"type": "content_delta", "index": 0,
                              "content": {"type": "text", "text": text.unwrap_or("")}},
                })]
            }
            _ => Vec::new(),
        }
    }

    fn start(&self, kind: &str, id: String, wanted: bool) -> Vec<Value> {
        if !wanted {
            return Vec::new();
        }
        vec![json!({"type": "event_start", "event": {"type": kind, "id": id}})]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::{Event, EventKind};

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
        json!({"type": "assistant", "message": {"id": mid, "content": [block], "usage": {}}})
    }

    fn preview(next_seq: i64, event: Value) -> Arc<Preview> {
        Arc::new(Preview { next_seq, event })
    }

    /// Previews are placed by seq whatever order they arrive in, and carry the id the stored
    /// event then gets: after a thinking block of the same answer, and in a new answer.
    #[test]
    fn previews_are_placed_by_seq_under_the_id_their_event_gets() {
        let mut m = Mapper::new(super::super::tools::Policy::default());
        let mut p =
            Previews::new(&["agent.message".into(), "agent.thinking".into()]).expect("asked");
        let mut frames = Vec::new();
        let mut mapped = Vec::new();
        // A preview for seq 2 arrives while the connection has mapped only seq 0: held.
        frames.extend(p.arrived(
            preview(
                1,
                json!({"type": "message_start", "message": {"id": "msg_a"}}),
            ),
            0,
            &m,
        ));
        frames.extend(p.arrived(
            preview(1, json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}})),
            0,
            &m,
        ));
        frames.extend(p.arrived(
            preview(2, json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}})),
            0,
            &m,
        ));
        frames.extend(p.arrived(
            preview(2, json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "hel"}})),
            0,
            &m,
        ));
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0]["event"]["type"], "agent.thinking");
        let e1 = ev(
            1,
            "assistant",
            assistant("msg_a", json!({"type": "thinking"})),
        );
        mapped.extend(m.map(&e1));
        frames.extend(p.after(1, &m));
        let e2 = ev(
            2,
            "assistant",
            assistant("msg_a", json!({"type": "text", "text": "hel"})),
        );
        mapped.extend(m.map(&e2));
        let thinking = mapped
            .iter()
            .find(|v| v["type"] == "agent.thinking")
            .expect("thinking");
        let message = mapped
            .iter()
            .find(|v| v["type"] == "agent.message")
            .expect("message");
        assert_eq!(frames[0]["event"]["id"], thinking["id"]);
        assert_eq!(frames[1]["event"]["id"], message["id"], "{frames:?}");
        assert_eq!(frames[2]["event_id"], message["id"]);
        assert_eq!(frames[2]["delta"]["content"]["text"], "hel");
        // A preview whose place has gone by is dropped.
        assert!(p
            .arrived(preview(2, json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "x"}})), 2, &m)
            .is_empty());
        // The next answer starts a new span: its text lands after the old span's end and the
        // new one's start.
        let e3 = ev(
            3,
            "tool_result",
            json!({"tool_use_id": "t", "content": "ok"}),
        );
        m.map(&e3);
        let mut frames = p.arrived(
            preview(
                4,
                json!({"type": "message_start", "message": {"id": "msg_b"}}),
            ),
            3,
            &m,
        );
        frames.extend(p.arrived(
            preview(4, json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
            3,
            &m,
        ));
        let e4 = ev(
            4,
            "assistant",
            assistant("msg_b", json!({"type": "text", "text": "b"})),
        );
        let out = m.map(&e4);
        let message = out
            .iter()
            .find(|v| v["type"] == "agent.message")
            .expect("message");
        assert_eq!(frames[0]["event"]["id"], message["id"], "{out:?}");
        // The answer's metered usage logged between a block's preview and its event (the
        // gateway read the answer's end, with the block's end in it): the id still holds.
        m.map(&ev(5, "result", json!({"usage": {}})));
        let mut frames = p.arrived(
            preview(
                6,
                json!({"type": "message_start", "message": {"id": "msg_c"}}),
            ),
            5,
            &m,
        );
        frames.extend(p.arrived(
            preview(6, json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
            5,
            &m,
        ));
        let usage = json!({"message_id": "msg_c", "usage": {"output_tokens": 3}});
        assert!(m.map(&ev(6, "model_usage", usage.clone())).is_empty());
        let out = m.map(&ev(
            7,
            "assistant",
            assistant("msg_c", json!({"type": "text", "text": "c"})),
        ));
        let message = out
            .iter()
            .find(|v| v["type"] == "agent.message")
            .expect("message");
        assert_eq!(frames[0]["event"]["id"], message["id"], "{out:?}");
        // And logged before the block's preview.
        m.map(&ev(8, "result", json!({"usage": {}})));
        let usage = json!({"message_id": "msg_d", "usage": {"output_tokens": 3}});
        m.map(&ev(9, "model_usage", usage));
        let mut frames = p.arrived(
            preview(
                10,
                json!({"type": "message_start", "message": {"id": "msg_d"}}),
            ),
            9,
            &m,
        );
        frames.extend(p.arrived(
            preview(10, json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
            9,
            &m,
        ));
        let out = m.map(&ev(
            10,
            "assistant",
            assistant("msg_d", json!({"type": "text", "text": "d"})),
        ));
        let message = out
            .iter()
            .find(|v| v["type"] == "agent.message")
            .expect("message");
        assert_eq!(frames[0]["event"]["id"], message["id"], "{out:?}");
    }
}
