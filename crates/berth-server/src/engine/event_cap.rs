//! Caps on what one session's agent can put in the event log: a rate limit (`governor`'s
//! GCRA, which is a token bucket: `per_second` sustained, `burst` at once) on the number
//! of events and a ceiling on each event's size, so a flooding agent (`yes`, or a box forging
//! output lines) cannot grow the store without bound or starve other sessions' writers.
//!
//! Contract: [`EventCap::admit`] is given each batch of agent events before it is numbered
//! and stored (and with no events when [`EventCap::summary_due`] says so). It keeps the events the bucket has tokens for (truncating oversized ones, with
//! `"truncated": true` and the original `"bytes"`), drops the rest, and adds one
//! `events_dropped {count, since}` event summarising the drops at most once per second, and
//! always with the batch that ends the agent, whose last few events (the driver's `result` and
//! exit events, how clients learn the outcome) are never dropped; output queued before them in
//! that batch is capped like any other. A session also stops storing capped
//! events past `max_per_session` (the summary still comes at the end).

use berth_agent::AgentEvent;
use berth_api::EventKind;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{json, Value};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// The operator's caps (see `[events]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub per_second: u32,
    pub burst: u32,
    pub max_bytes: usize,
    pub max_per_session: u64,
}

/// Events at the end of the agent's final batch that always pass: what a driver's `on_exit`
/// adds (flushed partial lines, the `result`/`status` event, an `error`).
const FINAL_EVENTS: usize = 4;

/// Least time between two `events_dropped` summaries while a flood goes on.
const SUMMARY_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct EventCap {
    limits: Limits,
    rate: DefaultDirectRateLimiter,
    stored: u64,
    dropped: u64,
    dropped_since: Option<String>,
    summarised: Instant,
}

impl EventCap {
    pub fn new(limits: Limits) -> EventCap {
        let now = Instant::now();
        // A rate of 0 is taken as 1 a second (a quota needs a period).
        let per_second = NonZeroU32::new(limits.per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        EventCap {
            limits,
            rate: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            stored: 0,
            dropped: 0,
            dropped_since: None,
            summarised: now.checked_sub(SUMMARY_EVERY).unwrap_or(now),
        }
    }

    /// Events dropped and not yet summarised.
    pub fn pending_drops(&self) -> u64 {
        self.dropped
    }

    /// When pending drops are due to be summarised (None: nothing pending): the session's
    /// owner calls [`EventCap::admit`] with no events then, so a flood that stops while the
    /// agent lives on is still reported.
    pub fn summary_due(&self) -> Option<Instant> {
        (self.dropped > 0).then(|| self.summarised + SUMMARY_EVERY)
    }

    /// Filter one batch in place (see the module docs); `last` marks the agent's final batch.
    pub fn admit(&mut self, events: &mut Vec<AgentEvent>, last: bool) {
        let now = Instant::now();
        let mut kept = Vec::with_capacity(events.len().min(64));
        // The driver's end-of-run events close the final batch; the output queued before them
        // in the same batch is capped like any other.
        let exempt_from = if last {
            events.len().saturating_sub(FINAL_EVENTS)
        } else {
            usize::MAX
        };
        for (i, mut e) in events.drain(..).enumerate() {
            // The session total first: an event over it takes nothing from the rate.
            let room = self.stored < self.limits.max_per_session && self.rate.check().is_ok();
            if room || i >= exempt_from {
                self.stored += 1;
                truncate(&mut e.data, self.limits.max_bytes);
                kept.push(e);
            } else {
                if self.dropped == 0 {
                    self.dropped_since = Some(crate::auth::now());
                }
                self.dropped += 1;
            }
        }
        if self.dropped > 0 && (last || now.duration_since(self.summarised) >= SUMMARY_EVERY) {
            metrics::counter!("berth_session_events_dropped_total").increment(self.dropped);
            let summary = AgentEvent {
                kind: EventKind::EventsDropped,
                data: json!({
                    "count": self.dropped,
                    "since": self.dropped_since.take(),
                    "reason": format!(
                        "the agent's output was over {} events a second (burst {}) or {} events a session",
                        self.limits.per_second, self.limits.burst, self.limits.max_per_session
                    ),
                }),
            };
            // Before the final batch's events, so the log ends with the agent's own end.
            if last {
                kept.insert(0, summary);
            } else {
                kept.push(summary);
            }
            self.dropped = 0;
            self.summarised = now;
        }
        *events = kept;
    }
}

/// Cut an event whose data is over `max` bytes: a long `text` is shortened (at a character
/// boundary) when the rest of the data is within `max`; any other oversized data (including a
/// short-cut `text` beside other large fields) is replaced by a preview of its JSON. Either
/// way what is kept is a few times `max` at most (JSON escaping), whatever the agent wrote.
pub fn truncate(data: &mut Value, max: usize) {
    let long_text = matches!(data.get("text"), Some(Value::String(t)) if t.len() > max);
    if let (true, Value::Object(m)) = (long_text, &mut *data) {
        if let Some(Value::String(mut t)) = m.remove("text") {
            // The other fields, measured alone: a long `text` must not carry a large rest.
            let rest = serde_json::to_vec(&*m).map_or(usize::MAX, |v| v.len());
            let bytes = t.len();
            let mut cut = max;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            m.insert("text".into(), Value::String(t));
            m.insert("truncated".into(), Value::Bool(true));
            m.insert("bytes".into(), json!(bytes));
            if rest <= max {
                return;
            }
        }
    }
    let size = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
    if size > max {
        let mut preview = data.to_string();
        let mut cut = max.min(preview.len());
        while !preview.is_char_boundary(cut) {
            cut -= 1;
        }
        preview.truncate(cut);
        *data = json!({"truncated": true, "bytes": size, "preview": preview});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize) -> AgentEvent {
        AgentEvent {
            kind: EventKind::Stdout,
            data: json!({"text": format!("line {i}")}),
        }
    }

    #[test]
    fn a_flood_keeps_the_burst_and_summarises_the_rest() {
        let mut cap = EventCap::new(Limits {
            per_second: 1,
            burst: 10,
            max_bytes: 1024,
            max_per_session: 1000,
        });
        let mut batch: Vec<AgentEvent> = (0..100).map(line).collect();
        cap.admit(&mut batch, false);
        let stdout = batch.iter().filter(|e| e.kind == "stdout").count();
        assert_eq!(stdout, 10);
        let summary = batch.last().expect("summary");
        assert_eq!(summary.kind, "events_dropped");
        assert_eq!(summary.data["count"], 90);
        // Within the same second: dropped, counted, not yet summarised.
        let mut batch: Vec<AgentEvent> = (0..50).map(line).collect();
        cap.admit(&mut batch, false);
        assert!(batch.is_empty(), "{batch:?}");
        assert_eq!(cap.pending_drops(), 50);
        let due = cap.summary_due().expect("a summary is due");
        assert!(due > Instant::now() && due <= Instant::now() + SUMMARY_EVERY);
        // The final batch's end always passes, after a summary of what is still pending; a
        // backlog of output in the same batch does not.
        let mut batch: Vec<AgentEvent> = (0..1000).map(line).collect();
        batch.push(AgentEvent {
            kind: EventKind::Result,
            data: json!({}),
        });
        cap.admit(&mut batch, true);
        let kinds: Vec<&str> = batch.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["events_dropped", "stdout", "stdout", "stdout", "result"]
        );
        assert_eq!(batch[0].data["count"], 50 + 997);
    }

    #[test]
    fn the_rate_refills_one_event_per_period() {
        let mut cap = EventCap::new(Limits {
            per_second: 10,
            burst: 1,
            max_bytes: 1024,
            max_per_session: 1000,
        });
        let start = Instant::now();
        let admitted = |cap: &mut EventCap| {
            let mut batch = vec![line(0)];
            cap.admit(&mut batch, false);
            batch.iter().filter(|e| e.kind == "stdout").count()
        };
        assert_eq!(admitted(&mut cap), 1);
        assert_eq!(admitted(&mut cap), 0, "the burst of one is spent");
        // Poll (bounded) until the bucket has a token again: one period, 100 ms, later.
        let deadline = start + Duration::from_secs(5);
        while admitted(&mut cap) == 0 {
            assert!(Instant::now() < deadline, "the rate never refilled");
            std::thread::yield_now();
        }
        assert!(
            start.elapsed() >= Duration::from_millis(90),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn the_session_total_is_a_hard_stop() {
        let mut cap = EventCap::new(Limits {
            per_second: 1_000_000,
            burst: 1_000_000,
            max_bytes: 1024,
            max_per_session: 5,
        });
        let mut batch: Vec<AgentEvent> = (0..20).map(line).collect();
        cap.admit(&mut batch, false);
        assert_eq!(batch.iter().filter(|e| e.kind == "stdout").count(), 5);
    }

    #[test]
    fn oversized_events_are_cut_with_a_marker() {
        let mut d = json!({"text": "é".repeat(100)});
        truncate(&mut d, 11);
        assert_eq!(d["text"].as_str().map(str::len), Some(10));
        assert_eq!(d["truncated"], true);
        assert_eq!(d["bytes"], 200);
        let mut d = json!({"type": "assistant", "message": {"content": "x".repeat(500)}});
        truncate(&mut d, 100);
        assert_eq!(d["truncated"], true);
        assert!(d["preview"].as_str().is_some_and(|p| p.len() <= 100));
        let mut small = json!({"text": "ok"});
        truncate(&mut small, 100);
        assert_eq!(small, json!({"text": "ok"}));
    }

    #[test]
    fn a_long_text_cannot_carry_a_large_rest_past_the_cap() {
        let max = 1024;
        let mut d = json!({
            "type": "x",
            "text": "t".repeat(max + 1),
            "pad": "p".repeat(15 << 20),
        });
        truncate(&mut d, max);
        let stored = serde_json::to_vec(&d).expect("json").len();
        assert!(stored <= 2 * max, "{stored} bytes kept");
        assert_eq!(d["truncated"], true);
        assert!(d["preview"].as_str().is_some_and(|p| p.len() <= max));
        // A long text with a small rest still keeps its text.
        let mut d = json!({"type": "x", "text": "t".repeat(max + 1)});
        truncate(&mut d, max);
        assert_eq!(d["text"].as_str().map(str::len), Some(max));
        assert_eq!(d["type"], "x");
    }
}
