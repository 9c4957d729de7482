//! The `command` agent: any program. Client messages are written to its stdin as lines (text
//! as is, content blocks as compact JSON); its stdout and stderr become `stdout`/`stderr`
//! events, one per line (a final partial line is flushed at exit).

use crate::{AgentEvent, DriverError, Launch, Output, Update};
use berth_api::{CommandAgent, EventKind, SessionState};
use serde_json::{json, Value};

/// Longest line kept whole; longer output is split into several events.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug)]
pub struct CommandDriver {
    argv: Vec<String>,
    cwd: String,
    out: Vec<u8>,
    err: Vec<u8>,
}

impl CommandDriver {
    pub fn new(spec: &CommandAgent, workdir: &str) -> Result<CommandDriver, DriverError> {
        if spec.argv.is_empty() || spec.argv[0].is_empty() {
            return Err(DriverError::Invalid(
                "agent.argv must name a program".into(),
            ));
        }
        if spec.argv.iter().any(|a| a.contains('\0')) {
            return Err(DriverError::Invalid(
                "agent.argv must not contain NUL".into(),
            ));
        }
        Ok(CommandDriver {
            argv: spec.argv.clone(),
            cwd: workdir.to_string(),
            out: Vec::new(),
            err: Vec::new(),
        })
    }

    pub fn launch(&self) -> Launch {
        Launch {
            argv: self.argv.clone(),
            env: vec![],
            cwd: self.cwd.clone(),
        }
    }

    pub fn encode_message(&mut self, content: &Value) -> Result<Vec<u8>, DriverError> {
        let mut line = match content {
            Value::String(s) => s.clone().into_bytes(),
            Value::Array(_) | Value::Object(_) => {
                serde_json::to_vec(content).map_err(|e| DriverError::Invalid(e.to_string()))?
            }
            _ => {
                return Err(DriverError::Invalid(
                    "content must be text or content blocks".into(),
                ))
            }
        };
        if line.contains(&b'\n') && content.is_string() {
            // One message is one line: keep embedded newlines from splitting it.
            line = serde_json::to_vec(content).map_err(|e| DriverError::Invalid(e.to_string()))?;
        }
        line.push(b'\n');
        Ok(line)
    }

    pub fn on_stdout(&mut self, bytes: &[u8]) -> Output {
        Output {
            events: split_lines(&mut self.out, bytes, &EventKind::Stdout, false),
            update: Update {
                state: Some(SessionState::Running),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    pub fn on_stderr(&mut self, bytes: &[u8]) -> Output {
        Output {
            events: split_lines(&mut self.err, bytes, &EventKind::Stderr, false),
            ..Default::default()
        }
    }

    pub fn on_exit(&mut self, code: Option<i32>, signal: Option<i32>) -> Output {
        let mut events = split_lines(&mut self.out, &[], &EventKind::Stdout, true);
        events.extend(split_lines(&mut self.err, &[], &EventKind::Stderr, true));
        let ok = code == Some(0);
        let state = if ok {
            SessionState::Stopped
        } else {
            SessionState::Failed
        };
        let reason = match (code, signal) {
            (Some(c), _) => format!("agent exited with code {c}"),
            (None, Some(s)) => format!("agent killed by signal {s}"),
            (None, None) => "agent ended".to_string(),
        };
        events.push(AgentEvent {
            kind: EventKind::Result,
            data: json!({"exit_code": code, "signal": signal, "is_error": !ok}),
        });
        Output {
            events,
            update: Update {
                state: Some(state),
                state_reason: Some(reason),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

fn split_lines(buf: &mut Vec<u8>, bytes: &[u8], kind: &EventKind, flush: bool) -> Vec<AgentEvent> {
    buf.extend_from_slice(bytes);
    let mut events = Vec::new();
    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        events.push(line_event(kind, &line[..line.len() - 1]));
    }
    while buf.len() > MAX_LINE {
        let chunk: Vec<u8> = buf.drain(..MAX_LINE).collect();
        events.push(line_event(kind, &chunk));
    }
    if flush && !buf.is_empty() {
        let rest = std::mem::take(buf);
        events.push(line_event(kind, &rest));
    }
    events
}

fn line_event(kind: &EventKind, line: &[u8]) -> AgentEvent {
    AgentEvent {
        kind: kind.clone(),
        data: json!({"text": String::from_utf8_lossy(line)}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_flushed() {
        let mut d = CommandDriver::new(
            &CommandAgent {
                argv: vec!["cat".into()],
                unknown: Default::default(),
            },
            "/workspace",
        )
        .expect("driver");
        assert!(d.on_stdout(b"hel").events.is_empty());
        let out = d.on_stdout(b"lo\nwor");
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0].data["text"], "hello");
        let out = d.on_exit(Some(0), None);
        assert_eq!(out.events[0].data["text"], "wor");
        assert_eq!(out.events.last().map(|e| e.kind.as_str()), Some("result"));
        assert_eq!(out.update.state, Some(SessionState::Stopped));
        assert_eq!(d.encode_message(&json!("hi")).expect("enc"), b"hi\n");
        assert_eq!(
            d.encode_message(&json!("a\nb")).expect("enc"),
            b"\"a\\nb\"\n"
        );
        assert!(d.encode_message(&json!(3)).is_err());
        assert!(CommandDriver::new(
            &CommandAgent {
                argv: vec![],
                unknown: Default::default()
            },
            "/w"
        )
        .is_err());
    }
}
