//! A native box's report socket: the one descriptor the server holds for the box's life (its
//! bridges' socket aside). The helper and the box's PID 1 write [`InitReport`] lines on it
//! (fd 1); the same socket is their and the supervisor's stderr (fd 2), the box's log. The
//! server writes only the cgroup go-ahead; its end closing ends the box.
//!
//! A line is a report when it is one JSON object naming a pid, an error or an exit; anything
//! else is a log line (what the box's own code prints never starts with `{`). Lines are read
//! with a bound on their length: everything here is written by processes in the box.

use super::init::InitReport;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// Longest line kept; the rest of a longer one is read and dropped.
const MAX_LINE: usize = 4096;

/// Log lines passed on per box (guest-controlled: bounded for the box's life).
const LOG_BUDGET: u32 = 100;

pub(super) struct Reports<R> {
    reader: BufReader<R>,
    box_id: String,
    log_budget: u32,
}

enum Line {
    Report(InitReport),
    Log(String),
}

fn classify(line: &[u8]) -> Line {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\n', '\r']);
    if text.starts_with('{') {
        if let Ok(r) = serde_json::from_str::<InitReport>(text) {
            if r.pid.is_some() || r.error.is_some() || r.exit.is_some() {
                return Line::Report(r);
            }
        }
    }
    Line::Log(text.to_string())
}

impl<R: tokio::io::AsyncRead + Unpin> Reports<R> {
    pub(super) fn new(socket: R, box_id: &str) -> Reports<R> {
        Reports {
            reader: BufReader::new(socket),
            box_id: box_id.to_string(),
            log_budget: LOG_BUDGET,
        }
    }

    /// The next line, at most [`MAX_LINE`] bytes of it; `None` at the end (or an error).
    async fn line(&mut self) -> Option<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let buf = self.reader.fill_buf().await.ok()?;
            if buf.is_empty() {
                return (!line.is_empty()).then_some(line);
            }
            let (take, end) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            let room = MAX_LINE.saturating_sub(line.len());
            line.extend_from_slice(&buf[..take.min(room)]);
            std::pin::Pin::new(&mut self.reader).consume(take);
            if end {
                return Some(line);
            }
        }
    }

    /// The next report, passing log lines before it to the server's log; `None` at the end.
    pub(super) async fn next(&mut self) -> Option<InitReport> {
        loop {
            match classify(&self.line().await?) {
                Line::Report(r) => return Some(r),
                Line::Log(l) => {
                    if self.log_budget > 0 {
                        self.log_budget -= 1;
                        tracing::debug!(box_id = %self.box_id, "box: {l}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_are_found_among_log_lines_and_long_lines_are_cut() {
        let long = "x".repeat(3 * MAX_LINE);
        let input = format!(
            "berth-supervisor: hello\n{{\"pid\":42}}\n{long}\n{{\"not\":\"a report\"}}\n{{\"exit\":3}}\ntrailing"
        );
        let mut r = Reports::new(input.as_bytes(), "b");
        assert_eq!(r.next().await.and_then(|r| r.pid), Some(42));
        assert_eq!(r.next().await.and_then(|r| r.exit), Some(3));
        assert!(r.next().await.is_none());
        // Logged: the hello, the long line, the object that is no report, the unended last line.
        assert_eq!(r.log_budget, LOG_BUDGET - 4);
        let mut cut = Reports::new(long.as_bytes(), "b");
        assert_eq!(cut.line().await.map(|l| l.len()), Some(MAX_LINE));
    }
}
