//! Scenarios: what the mock answers.
//!
//! ```json
//! {"rules": [
//!   {"match": "make a file",
//!    "steps": [
//!      {"tool_use": [{"name": "Write", "input": {"file_path": "/workspace/a.txt", "content": "hi\n"}}]},
//!      {"tool_use": [{"name": "Bash", "input": {"command": "cat /workspace/a.txt"}}]},
//!      {"text": "Done."}]},
//!   {"match": "overload", "steps": [{"error": {"status": 529, "type": "overloaded_error", "message": "busy"}}]}
//! ]}
//! ```
//!
//! The task is the last user message that carries text (tool results don't count); the first
//! rule whose `match` occurs in it applies (a rule without `match` matches everything). Step
//! *k* answers the *k*-th assistant turn after the task; past the last step the last one repeats
//! unless it calls tools, in which case the mock ends with a short text.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Rule {
    #[serde(rename = "match")]
    pub pattern: Option<String>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Step {
    pub text: Option<String>,
    pub tool_use: Vec<ToolUse>,
    pub error: Option<ErrorStep>,
    /// Wait this long before answering.
    pub delay_ms: u64,
    /// Cut the stream after the first delta.
    pub break_stream: bool,
    pub usage: UsageOverride,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UsageOverride {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cache_creation_input_tokens: Option<u64>,
    pub cache_read_input_tokens: Option<u64>,
    /// Cache reads as the answer's end reports them (`message_delta`'s cumulative usage, as
    /// the API may send), where `message_start` said `cache_read_input_tokens`: what a
    /// client echoing the start gets wrong.
    pub final_cache_read_input_tokens: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolUse {
    pub name: String,
    pub input: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ErrorStep {
    pub status: u16,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading scenario {0}: {1}")]
    Read(String, std::io::Error),
    #[error("parsing scenario {0}: {1}")]
    Parse(String, serde_json::Error),
}

fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => {
            let texts: Vec<&str> = blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect();
            let has_result = blocks.iter().any(|b| b["type"] == "tool_result");
            (!texts.is_empty() && !has_result).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

impl Scenario {
    pub fn load(path: &str) -> Result<Scenario, ScenarioError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ScenarioError::Read(path.into(), e))?;
        serde_json::from_str(&text).map_err(|e| ScenarioError::Parse(path.into(), e))
    }

    /// The built-in demo: write a file, look at it with Bash, then report.
    pub fn demo() -> Scenario {
        let step = |v: Value| serde_json::from_value::<Step>(v).unwrap_or_default();
        Scenario {
            rules: vec![
                Rule {
                    pattern: Some("slow".into()),
                    steps: vec![step(
                        serde_json::json!({"text": "Thinking slowly...", "delay_ms": 30000}),
                    )],
                },
                Rule {
                    pattern: None,
                    steps: vec![
                        step(
                            serde_json::json!({"text": "I'll create a file in the workspace.",
                            "tool_use": [{"name": "Write", "input": {"file_path": "/workspace/hello.txt", "content": "Hello from an agent in a berth box!\n"}}]}),
                        ),
                        step(
                            serde_json::json!({"tool_use": [{"name": "Bash", "input": {"command": "ls -l /workspace && cat /workspace/hello.txt", "description": "Show the workspace"}}]}),
                        ),
                        step(
                            serde_json::json!({"text": "Done: I wrote /workspace/hello.txt and listed the workspace."}),
                        ),
                    ],
                },
            ],
        }
    }

    /// The step answering this request.
    pub fn step_for(&self, body: &Value) -> Step {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let task_idx = messages
            .iter()
            .rposition(|m| m["role"] == "user" && text_of(&m["content"]).is_some());
        let task = task_idx
            .and_then(|i| text_of(&messages[i]["content"]))
            .unwrap_or_default();
        let turns = task_idx
            .map(|i| {
                messages[i..]
                    .iter()
                    .filter(|m| m["role"] == "assistant")
                    .count()
            })
            .unwrap_or(0);
        let rule = self
            .rules
            .iter()
            .find(|r| r.pattern.as_deref().is_none_or(|p| task.contains(p)));
        let Some(rule) = rule else {
            return Step {
                text: Some("OK.".into()),
                ..Default::default()
            };
        };
        match rule.steps.get(turns) {
            Some(s) => s.clone(),
            None => match rule.steps.last() {
                Some(s) if s.tool_use.is_empty() => s.clone(),
                _ => Step {
                    text: Some("Done.".into()),
                    ..Default::default()
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn steps_follow_assistant_turns_after_the_task() {
        let s = Scenario::demo();
        let first = s.step_for(&json!({"messages": [{"role": "user", "content": "do it"}]}));
        assert_eq!(first.tool_use[0].name, "Write");
        let second = s.step_for(&json!({"messages": [
            {"role": "user", "content": "do it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Write", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]}));
        assert_eq!(second.tool_use[0].name, "Bash");
        let next_task = s.step_for(&json!({"messages": [
            {"role": "user", "content": "do it"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "again"}]}]}));
        assert_eq!(
            next_task.tool_use[0].name, "Write",
            "a new task starts over"
        );
        assert!(
            s.step_for(&json!({"messages": [{"role": "user", "content": "be slow"}]}))
                .delay_ms
                > 0
        );
    }
}
