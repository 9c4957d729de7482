//! Reading usage from a Messages API response as it streams past.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_5m_tokens: u64,
    pub cache_creation_1h_tokens: u64,
    pub cache_read_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, o: &Usage) {
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cache_creation_5m_tokens += o.cache_creation_5m_tokens;
        self.cache_creation_1h_tokens += o.cache_creation_1h_tokens;
        self.cache_read_tokens += o.cache_read_tokens;
    }
}

/// Incremental parser: SSE (`message_start` sets the input side, `message_delta` carries the
/// cumulative output) or a JSON body (read whole, capped).
pub struct UsageParser {
    sse: bool,
    line: Vec<u8>,
    body: Vec<u8>,
    usage: Usage,
    model: Option<String>,
    finished: bool,
}

const MAX_JSON_BODY: usize = 8 << 20;

fn apply(u: &mut Usage, v: &Value) {
    let n = |k: &str| v.get(k).and_then(Value::as_u64);
    if let Some(x) = n("input_tokens") {
        u.input_tokens = x;
    }
    if let Some(x) = n("output_tokens") {
        u.output_tokens = x;
    }
    if let Some(x) = n("cache_read_input_tokens") {
        u.cache_read_tokens = x;
    }
    match v.get("cache_creation") {
        Some(cc) if cc.is_object() => {
            u.cache_creation_5m_tokens = cc
                .get("ephemeral_5m_input_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            u.cache_creation_1h_tokens = cc
                .get("ephemeral_1h_input_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0);
        }
        _ => {
            if let Some(x) = n("cache_creation_input_tokens") {
                u.cache_creation_5m_tokens = x;
            }
        }
    }
}

impl UsageParser {
    pub fn new(sse: bool) -> UsageParser {
        UsageParser {
            sse,
            line: Vec::new(),
            body: Vec::new(),
            usage: Usage::default(),
            model: None,
            finished: false,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.sse {
            if self.body.len() + bytes.len() <= MAX_JSON_BODY {
                self.body.extend_from_slice(bytes);
            }
            if let Ok(v) = serde_json::from_slice::<Value>(&self.body) {
                if let Some(u) = v.get("usage") {
                    apply(&mut self.usage, u);
                }
                self.model = v.get("model").and_then(Value::as_str).map(str::to_string);
                self.finished = true;
            }
            return;
        }
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.line_done(&line);
            } else {
                self.line.push(b);
            }
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(m) = v.get("message") {
                    if let Some(u) = m.get("usage") {
                        apply(&mut self.usage, u);
                    }
                    self.model = m.get("model").and_then(Value::as_str).map(str::to_string);
                }
            }
            Some("message_delta") => {
                if let Some(u) = v.get("usage") {
                    apply(&mut self.usage, u);
                }
            }
            Some("message_stop") | Some("error") => self.finished = true,
            _ => {}
        }
    }

    pub fn finished(&self) -> bool {
        self.finished
    }
    pub fn usage(&self) -> Usage {
        self.usage
    }
    pub fn model(&self) -> Option<String> {
        self.model.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_usage_is_assembled_across_chunk_boundaries() {
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m1\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":3,\"cache_creation\":{\"ephemeral_5m_input_tokens\":4,\"ephemeral_1h_input_tokens\":2},\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":42}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
        let mut p = UsageParser::new(true);
        for chunk in s.as_bytes().chunks(7) {
            assert!(!p.finished() || chunk.is_empty());
            p.feed(chunk);
        }
        assert!(p.finished());
        assert_eq!(
            p.usage(),
            Usage {
                input_tokens: 10,
                output_tokens: 42,
                cache_creation_5m_tokens: 4,
                cache_creation_1h_tokens: 2,
                cache_read_tokens: 3
            }
        );
        assert_eq!(p.model().as_deref(), Some("m1"));
        let mut j = UsageParser::new(false);
        j.feed(br#"{"model":"m2","usage":{"input_tokens":5,"#);
        assert!(!j.finished());
        j.feed(br#""output_tokens":6}}"#);
        assert!(j.finished());
        assert_eq!(j.usage().output_tokens, 6);
    }
}
