//! The `type` of a session event: the kinds berth itself emits by name, and any other string
//! (an agent's own message types, box log entries) kept as it came.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A session event's `type`. On the wire it is always the plain string (`"status"`,
/// `"tool_use"`, …); a string berth does not name is kept in [`EventKind::Other`], so an
/// `Other` holding a known name (`Other("status")`) reads back as the named kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The session's state changed (`{"state","reason"}`).
    Status,
    /// The agent's own `system` message (Claude's `init`, …).
    System,
    /// A model turn, whole.
    Assistant,
    /// A message the client sent (as recorded by the server).
    User,
    /// The agent echoing a user message that held no tool results.
    UserEcho,
    /// One tool call out of an assistant turn.
    ToolUse,
    /// One tool result.
    ToolResult,
    /// The agent asks whether it may use a tool.
    PermissionRequest,
    /// How a permission request was answered.
    PermissionAnswer,
    /// The session's permission mode changed.
    PermissionMode,
    /// A turn (or a command) ended.
    Result,
    /// A line the agent wrote to stdout that was not one of its messages.
    Stdout,
    /// What the agent wrote to stderr.
    Stderr,
    /// Something went wrong (the message says what).
    Error,
    /// Events the server dropped over the session's caps, summarised.
    EventsDropped,
    /// A session or tenant budget is nearly spent.
    BudgetWarning,
    /// The session's budget is spent.
    BudgetExhausted,
    /// The tenant's monthly budget is spent.
    TenantBudgetExhausted,
    /// Any other type, verbatim.
    Other(String),
}

impl EventKind {
    const NAMED: [EventKind; 18] = [
        EventKind::Status,
        EventKind::System,
        EventKind::Assistant,
        EventKind::User,
        EventKind::UserEcho,
        EventKind::ToolUse,
        EventKind::ToolResult,
        EventKind::PermissionRequest,
        EventKind::PermissionAnswer,
        EventKind::PermissionMode,
        EventKind::Result,
        EventKind::Stdout,
        EventKind::Stderr,
        EventKind::Error,
        EventKind::EventsDropped,
        EventKind::BudgetWarning,
        EventKind::BudgetExhausted,
        EventKind::TenantBudgetExhausted,
    ];

    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::Status => "status",
            EventKind::System => "system",
            EventKind::Assistant => "assistant",
            EventKind::User => "user",
            EventKind::UserEcho => "user_echo",
            EventKind::ToolUse => "tool_use",
            EventKind::ToolResult => "tool_result",
            EventKind::PermissionRequest => "permission_request",
            EventKind::PermissionAnswer => "permission_answer",
            EventKind::PermissionMode => "permission_mode",
            EventKind::Result => "result",
            EventKind::Stdout => "stdout",
            EventKind::Stderr => "stderr",
            EventKind::Error => "error",
            EventKind::EventsDropped => "events_dropped",
            EventKind::BudgetWarning => "budget_warning",
            EventKind::BudgetExhausted => "budget_exhausted",
            EventKind::TenantBudgetExhausted => "tenant_budget_exhausted",
            EventKind::Other(s) => s,
        }
    }
}

impl From<&str> for EventKind {
    fn from(s: &str) -> EventKind {
        EventKind::NAMED
            .iter()
            .find(|k| k.as_str() == s)
            .cloned()
            .unwrap_or_else(|| EventKind::Other(s.to_string()))
    }
}

impl From<String> for EventKind {
    fn from(s: String) -> EventKind {
        match EventKind::from(s.as_str()) {
            EventKind::Other(_) => EventKind::Other(s),
            k => k,
        }
    }
}

impl From<EventKind> for String {
    fn from(k: EventKind) -> String {
        match k {
            EventKind::Other(s) => s,
            k => k.as_str().to_string(),
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for EventKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<EventKind, D::Error> {
        String::deserialize(d).map(EventKind::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_kinds_round_trip_through_their_strings() {
        for k in EventKind::NAMED {
            let json = serde_json::to_string(&k).expect("ser");
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            let back: EventKind = serde_json::from_str(&json).expect("de");
            assert_eq!(back, k);
            assert!(!matches!(back, EventKind::Other(_)), "{json}");
        }
    }

    #[test]
    fn the_wire_strings_are_the_ones_clients_know() {
        let s = |k: EventKind| serde_json::to_value(k).expect("ser");
        assert_eq!(s(EventKind::Status), "status");
        assert_eq!(s(EventKind::ToolUse), "tool_use");
        assert_eq!(s(EventKind::ToolResult), "tool_result");
        assert_eq!(s(EventKind::PermissionRequest), "permission_request");
        assert_eq!(s(EventKind::EventsDropped), "events_dropped");
        assert_eq!(s(EventKind::BudgetWarning), "budget_warning");
        assert_eq!(
            s(EventKind::TenantBudgetExhausted),
            "tenant_budget_exhausted"
        );
        assert_eq!(s(EventKind::UserEcho), "user_echo");
    }

    #[test]
    fn unknown_strings_are_kept_verbatim() {
        for raw in [
            "control_request",
            "unknown",
            "",
            "Status",
            "status ",
            "ünïcode",
            "a\"b",
        ] {
            let json = serde_json::to_string(raw).expect("ser");
            let k: EventKind = serde_json::from_str(&json).expect("de");
            assert_eq!(k, EventKind::Other(raw.to_string()));
            assert_eq!(serde_json::to_string(&k).expect("ser"), json);
            assert_eq!(k, raw);
        }
    }

    #[test]
    fn other_holding_a_named_string_reads_back_named() {
        let k = EventKind::Other("result".into());
        let back: EventKind =
            serde_json::from_str(&serde_json::to_string(&k).expect("ser")).expect("de");
        assert_eq!(back, EventKind::Result);
        assert_eq!(EventKind::from("result".to_string()), EventKind::Result);
    }

    #[test]
    fn non_strings_are_refused() {
        assert!(serde_json::from_str::<EventKind>("3").is_err());
        assert!(serde_json::from_str::<EventKind>("null").is_err());
    }

    #[test]
    fn compares_and_displays_as_its_string() {
        assert!(EventKind::Stdout == "stdout");
        assert_eq!(EventKind::Stderr.to_string(), "stderr");
        assert_eq!(String::from(EventKind::Other("x".into())), "x");
        assert_eq!(String::from(EventKind::Error), "error");
    }
}
