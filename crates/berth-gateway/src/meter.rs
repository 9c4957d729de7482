//! Reading usage from a Messages API response as it streams past.

use serde::{Deserialize, Serialize};

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
    /// The current SSE event's `event:` name: data of events that carry no usage (deltas,
    /// pings) is not parsed.
    skip_data: bool,
    body: Vec<u8>,
    json: JsonEnd,
    usage: Usage,
    model: Option<String>,
    /// The answer's id (`msg_…`), from `message_start` or the JSON body.
    id: Option<String>,
    finished: bool,
}

const MAX_JSON_BODY: usize = 8 << 20;

/// Where the first top-level JSON value of a body ends.
#[derive(Default)]
struct JsonEnd {
    depth: u64,
    started: bool,
    in_string: bool,
    escaped: bool,
    /// The value ended (or the body is too large): nothing more is read.
    done: bool,
}

impl JsonEnd {
    /// The index in `bytes` of the byte that closes the first value, if it is there.
    fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    self.started = true;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.started && self.depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// The usage object of a response or stream event (typed: unknown fields are skipped without
/// building a JSON tree).
#[derive(Deserialize, Default)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_creation: Option<WireCacheCreation>,
}

#[derive(Deserialize)]
struct WireCacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

/// A whole JSON response, or `message_start`'s `message`.
#[derive(Deserialize)]
struct WireMessage {
    id: Option<String>,
    model: Option<String>,
    usage: Option<WireUsage>,
}

/// One SSE data payload.
#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<WireMessage>,
    usage: Option<WireUsage>,
}

fn apply(u: &mut Usage, w: &WireUsage) {
    if let Some(x) = w.input_tokens {
        u.input_tokens = x;
    }
    if let Some(x) = w.output_tokens {
        u.output_tokens = x;
    }
    if let Some(x) = w.cache_read_input_tokens {
        u.cache_read_tokens = x;
    }
    match &w.cache_creation {
        Some(cc) => {
            u.cache_creation_5m_tokens = cc.ephemeral_5m_input_tokens.unwrap_or(0);
            u.cache_creation_1h_tokens = cc.ephemeral_1h_input_tokens.unwrap_or(0);
        }
        None => {
            if let Some(x) = w.cache_creation_input_tokens {
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
            skip_data: false,
            body: Vec::new(),
            json: JsonEnd::default(),
            usage: Usage::default(),
            model: None,
            id: None,
            finished: false,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.sse {
            self.feed_json(bytes);
            return;
        }
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.line_done(&rest[..i]);
            } else {
                self.line.extend_from_slice(&rest[..i]);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line);
            }
            rest = &rest[i + 1..];
        }
        self.line.extend_from_slice(rest);
    }

    /// A JSON body is parsed once, when its first top-level value closes (found by scanning
    /// brackets outside strings): the same bytes give the same result however they are split,
    /// and a growing body is never re-parsed.
    fn feed_json(&mut self, bytes: &[u8]) {
        if self.json.done {
            return;
        }
        let room = MAX_JSON_BODY.saturating_sub(self.body.len());
        let bytes = &bytes[..bytes.len().min(room)];
        let base = self.body.len();
        self.body.extend_from_slice(bytes);
        let Some(end) = self.json.scan(bytes) else {
            if self.body.len() >= MAX_JSON_BODY {
                self.json.done = true; // too large to read: no usage
            }
            return;
        };
        self.json.done = true;
        let value = &self.body[..base + end + 1];
        if let Ok(m) = serde_json::from_slice::<WireMessage>(value) {
            if let Some(u) = &m.usage {
                apply(&mut self.usage, u);
            }
            self.model = m.model;
            self.id = m.id;
            self.finished = true;
        }
        self.body = Vec::new();
    }

    fn line_done(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(name) = line.strip_prefix(b"event:") {
            self.skip_data = !matches!(
                name.trim_ascii(),
                b"message_start" | b"message_delta" | b"message_stop" | b"error"
            );
            return;
        }
        if line.is_empty() {
            self.skip_data = false;
            return;
        }
        if self.skip_data {
            return;
        }
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let Ok(ev) = serde_json::from_slice::<WireEvent>(data) else {
            return;
        };
        match ev.kind.as_deref() {
            Some("message_start") => {
                if let Some(m) = ev.message {
                    if let Some(u) = &m.usage {
                        apply(&mut self.usage, u);
                    }
                    self.model = m.model;
                    self.id = m.id;
                }
            }
            Some("message_delta") => {
                if let Some(u) = &ev.usage {
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
    /// The id of the answer (`msg_…`), once seen.
    pub fn message_id(&self) -> Option<String> {
        self.id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_usage_is_assembled_across_chunk_boundaries() {
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"m1\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":3,\"cache_creation\":{\"ephemeral_5m_input_tokens\":4,\"ephemeral_1h_input_tokens\":2},\"output_tokens\":1}}}\n\n",
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
        assert_eq!(p.message_id().as_deref(), Some("msg_1"));
        let mut j = UsageParser::new(false);
        j.feed(br#"{"model":"m2","usage":{"input_tokens":5,"#);
        assert!(!j.finished());
        j.feed(br#""output_tokens":6}}"#);
        assert!(j.finished());
        assert_eq!(j.usage().output_tokens, 6);
        // A value followed by more bytes: read up to its end, whatever the split.
        let body = br#"{"model":"m3","x":"}\"{","usage":{"output_tokens":4}} trailing}"#;
        for step in 1..body.len() {
            let mut j = UsageParser::new(false);
            for c in body.chunks(step) {
                j.feed(c);
            }
            assert!(j.finished(), "{step}");
            assert_eq!((j.usage().output_tokens, j.model()), (4, Some("m3".into())));
        }
    }

    #[test]
    fn crlf_lines_work_and_events_without_usage_are_not_parsed() {
        let s = concat!(
            "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\r\n\r\n",
            "event: content_block_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":999}}\r\n\r\n",
            "event: ping\r\ndata: {not json\r\n\r\n",
            "event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":5}}\r\n\r\n",
            "event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n"
        );
        let mut p = UsageParser::new(true);
        p.feed(s.as_bytes());
        assert!(p.finished());
        assert_eq!((p.usage().input_tokens, p.usage().output_tokens), (7, 5));
    }
}
