//! Human output for events: a spinner while the agent works and one line per event worth
//! reading (output lines, tool calls, results); `--json` prints each event as a JSON line.

use berth_api::Event;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

pub struct Renderer {
    json: bool,
    spinner: Option<ProgressBar>,
}

impl Renderer {
    pub fn new(json: bool, spinner: bool) -> Renderer {
        let spinner = (spinner && !json && std::io::stderr().is_terminal()).then(|| {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.enable_steady_tick(Duration::from_millis(100));
            pb.set_message("working");
            pb
        });
        Renderer { json, spinner }
    }

    fn line(&self, s: &str) {
        match &self.spinner {
            Some(pb) => pb.println(s),
            None => println!("{s}"),
        }
    }

    pub fn event(&mut self, e: &Event) {
        if self.json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
            return;
        }
        let text = |k: &str| {
            e.data
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        match e.kind.as_str() {
            "stdout" => self.line(&text("text")),
            "stderr" => self.line(&format!("! {}", text("text"))),
            "user" => {
                let c = e
                    .data
                    .get("content")
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .unwrap_or_default();
                self.line(&format!("> {c}"));
            }
            "tool_use" => self.line(&format!(
                "→ {} {}",
                text("name"),
                e.data
                    .get("input")
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            )),
            "assistant" => {
                if let Some(t) = e
                    .data
                    .pointer("/message/content/0/text")
                    .and_then(|v| v.as_str())
                {
                    self.line(t);
                }
            }
            "status" => {
                if let Some(pb) = &self.spinner {
                    pb.set_message(text("state"));
                }
                if let Some(r) = e.data.get("reason").and_then(|v| v.as_str()) {
                    self.line(&format!("[{}: {r}]", text("state")));
                }
            }
            // A command agent's result is its exit; Claude's is the end of a turn.
            "result" if e.data.get("subtype").is_none() => {
                match (e.data["exit_code"].as_i64(), e.data["signal"].as_i64()) {
                    (Some(c), _) => self.line(&format!("[exited with code {c}]")),
                    (None, Some(sig)) => self.line(&format!("[killed by signal {sig}]")),
                    (None, None) => self.line("[ended]"),
                }
            }
            "result" => self.line(&format!(
                "[result: {}, {} turns, ${:.4} reported]",
                text("subtype"),
                e.data["num_turns"],
                e.data["total_cost_usd"].as_f64().unwrap_or(0.0)
            )),
            "system" if text("subtype") == "init" => self.line(&format!(
                "[agent ready: Claude Code {}, model {}, {} tools]",
                text("claude_code_version"),
                text("model"),
                e.data["tools"].as_array().map(Vec::len).unwrap_or(0)
            )),
            "system" => {}
            "tool_result" => {
                let content = match &e.data["content"] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let first = content.lines().next().unwrap_or("");
                let short: String = first.chars().take(100).collect();
                let mark = if e.data["is_error"] == true {
                    "✗"
                } else {
                    "✓"
                };
                self.line(&format!("  {mark} {short}"));
            }
            "permission_request" => self.line(&format!(
                "[permission needed for {}: answer with POST /v1/sessions/{}/permissions/{}]",
                text("tool_name"),
                e.session_id,
                text("request_id")
            )),
            "user_echo" | "permission_answer" => {}
            "error" => self.line(&format!("[error] {}", text("message"))),
            _ => self.line(&format!("[{}] {}", e.kind, e.data)),
        }
    }

    pub fn finish(&mut self) {
        if let Some(pb) = self.spinner.take() {
            pb.finish_and_clear();
        }
    }
}
