//! What a Managed Agents session (`managed_agents` on its Claude agent) gets beyond a berth
//! session: live previews of its model output, and each model answer's metered usage in its log.
//!
//! Live previews of a session's model output: the Claude CLI's partial messages
//! (`--include-partial-messages`, set by the Managed Agents API) pass through the session on a
//! channel of their own, never stored and never in the event log; a Managed Agents stream that
//! asks for `event_deltas` turns them into `event_start` / `event_delta` frames.
//!
//! Each preview says where in the log it belongs: `next_seq`, the seq of the first stored event
//! after it. A reader places it after event `next_seq - 1` and drops it once event `next_seq`
//! has gone by, so previews and events keep the order the agent wrote them in although they
//! travel on two channels.

use berth_agent::{AgentEvent, STREAM_EVENT};
use serde_json::Value;

/// Previews kept for subscribers; a subscriber further behind misses some (they are
/// best-effort: the stored event that follows carries the whole content).
pub const CAPACITY: usize = 1024;

/// One of the CLI's partial messages (a Messages API stream event: `message_start`,
/// `content_block_start`, `content_block_delta`, …).
#[derive(Debug)]
pub struct Preview {
    /// The seq the first stored event after this preview has (or will have).
    pub next_seq: i64,
    pub event: Value,
}

/// The event kind that marks a model request's start (`{message_id, model}`), kept from the
/// partial message `message_start`: the Managed Agents API's `span.model_request_start` comes
/// before the answer's previews, not with its first block.
pub const MODEL_REQUEST_START: &str = "model_request_start";

/// Take the partial messages out of a batch of agent events: each with the number of the
/// remaining events that came before it. A `message_start` also stays, as a
/// `model_request_start` event right after its preview.
pub fn split(evs: &mut Vec<AgentEvent>) -> Vec<(usize, Value)> {
    if !evs.iter().any(|e| e.kind == STREAM_EVENT) {
        return Vec::new();
    }
    let mut previews = Vec::new();
    let mut kept = Vec::with_capacity(evs.len());
    for e in evs.drain(..) {
        if e.kind == STREAM_EVENT {
            let start = (e.data["type"] == "message_start").then(|| AgentEvent {
                kind: MODEL_REQUEST_START.into(),
                data: serde_json::json!({
                    "message_id": e.data["message"]["id"],
                    "model": e.data["message"]["model"],
                }),
            });
            previews.push((kept.len(), e.data));
            kept.extend(start);
        } else {
            kept.push(e);
        }
    }
    *evs = kept;
    previews
}

/// The event kind of a model answer's metered usage: `{message_id, model, usage}` with the
/// usage in the Messages API's names. Logged by the gateway's observer (`observe`) before the
/// CLI reads the answer's end, so it comes before anything the CLI does after the answer: the
/// Managed Agents API's `span.model_request_end` carries exactly these tokens.
pub const MODEL_USAGE: &str = "model_usage";

/// The gateway's observer of metered answers: an answer of a Managed Agents session this
/// process runs is logged in that session (and the answer's end waits for it).
pub fn observer(
    registry: std::sync::Arc<crate::engine::registry::Registry>,
) -> berth_gateway::Observer {
    std::sync::Arc::new(move |r: &berth_gateway::UsageRecord| {
        let id = r.message_id.clone()?;
        let h = registry.session_handle(&r.owner.session_id)?;
        let managed = matches!(&h.state.borrow().agent,
            berth_api::AgentSpec::Claude(c) if c.managed_agents);
        if !managed {
            return None;
        }
        let u = r.usage;
        let data = serde_json::json!({
            "message_id": id,
            "model": r.model,
            "usage": {
                "input_tokens": u.input_tokens,
                "output_tokens": u.output_tokens,
                "cache_read_input_tokens": u.cache_read_tokens,
                "cache_creation_input_tokens": u.cache_creation_5m_tokens + u.cache_creation_1h_tokens,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": u.cache_creation_5m_tokens,
                    "ephemeral_1h_input_tokens": u.cache_creation_1h_tokens,
                },
            },
        });
        Some(Box::pin(async move {
            let (reply, done) = tokio::sync::oneshot::channel();
            if h.tx
                .send(super::SessionCmd::Metered { data, reply })
                .await
                .is_ok()
            {
                let _ = done.await;
            }
        }) as futures::future::BoxFuture<'static, ()>)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn partial_messages_leave_the_batch_with_their_place() {
        let ev = |kind: &str, n: i64| AgentEvent {
            kind: kind.into(),
            data: json!({"n": n}),
        };
        let mut evs = vec![
            AgentEvent {
                kind: STREAM_EVENT.into(),
                data: json!({"type": "message_start", "message": {"id": "msg_a"}, "n": 0}),
            },
            ev(STREAM_EVENT, 1),
            ev("assistant", 2),
            ev(STREAM_EVENT, 3),
            ev(STREAM_EVENT, 4),
            ev("tool_use", 5),
            ev(STREAM_EVENT, 6),
        ];
        let p = split(&mut evs);
        let at: Vec<(usize, i64)> = p
            .iter()
            .map(|(i, v)| (*i, v["n"].as_i64().unwrap_or(0)))
            .collect();
        assert_eq!(at, vec![(0, 0), (1, 1), (2, 3), (2, 4), (3, 6)]);
        let kinds: Vec<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, vec![MODEL_REQUEST_START, "assistant", "tool_use"]);
        assert_eq!(evs[0].data["message_id"], "msg_a");
    }
}
