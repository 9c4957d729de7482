//! Server-Sent Events: frames out of a byte stream, and a session's events that survive a
//! dropped connection.
//!
//! [`frames`] parses with `eventsource-stream`, which keeps a UTF-8 character split across
//! chunks whole and a frame split anywhere pending until its blank line; comments
//! (the server's keep-alives) never become frames. [`Client::sse`] is one connection, as the
//! server sends it; [`Client::events`] is the stream a client wants: typed [`Event`]s, the
//! last `id:` remembered, and on a broken connection a new one with `Last-Event-ID` after a
//! backoff, at most [`Retry::max_attempts`] times in a row (a first connection that fails is
//! not retried: that error is the caller's). The server ends the body when the session has ended and every event has been sent (or the key was revoked): the stream then
//! ends too, without reconnecting.

use crate::{error_from, Client, Error, Result};
use berth_api::Event;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use std::time::Duration;

/// One SSE frame: `id` is the frame's own `id:` field, if it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: Option<String>,
    /// `message` when the frame named none.
    pub event: String,
    pub data: String,
}

/// How [`Client::events`] reconnects: up to `max_attempts` in a row without an event in
/// between, waiting `base`, 2×`base`, 4×`base`, … (at most `max_delay`) before each.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub max_attempts: u32,
    pub base: Duration,
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 6,
            base: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl Retry {
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.base.saturating_mul(factor).min(self.max_delay)
    }
}

/// The frames of an SSE byte stream. A transport error ends nothing by itself: it is passed
/// on (as [`Error::Transport`]) and the caller decides.
pub fn frames<S, B>(bytes: S) -> impl Stream<Item = Result<Frame>>
where
    S: Stream<Item = Result<B, reqwest::Error>>,
    B: AsRef<[u8]>,
{
    frames_of(bytes).map(|r| r.map_err(|e| e.into_error(Error::Transport)))
}

/// [`frames`] over any transport error type (the tests feed plain chunks).
pub fn frames_of<S, B, E>(bytes: S) -> impl Stream<Item = Result<Frame, FrameError<E>>>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
{
    bytes.eventsource().map(|r| match r {
        Ok(ev) => Ok(Frame {
            id: (!ev.id.is_empty()).then_some(ev.id),
            event: ev.event,
            data: ev.data,
        }),
        Err(EventStreamError::Transport(e)) => Err(FrameError::Transport(e)),
        Err(EventStreamError::Utf8(e)) => Err(FrameError::Parse(format!("not UTF-8: {e}"))),
        Err(EventStreamError::Parser(e)) => Err(FrameError::Parse(format!("not SSE: {e:?}"))),
    })
}

/// Why [`frames_of`] failed: the bytes did not arrive, or they were not SSE.
#[derive(Debug)]
pub enum FrameError<E> {
    Transport(E),
    Parse(String),
}

impl<E> FrameError<E> {
    fn into_error(self, transport: impl FnOnce(E) -> Error) -> Error {
        match self {
            FrameError::Transport(e) => transport(e),
            FrameError::Parse(m) => Error::Sse(m),
        }
    }
}

impl Client {
    /// One SSE connection to `path` (with its query), from `Last-Event-ID: last_event_id`
    /// when given. Not resumed: the stream ends (or fails) when the connection does.
    pub async fn sse(
        &self,
        path: &str,
        last_event_id: Option<i64>,
    ) -> Result<impl Stream<Item = Result<Frame>> + Send + 'static> {
        let mut rb = self
            .request(Method::GET, path)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            rb = rb.header("Last-Event-ID", id.to_string());
        }
        let resp = self.send(rb).await?;
        if resp.status() != StatusCode::OK {
            return Err(Error::Http {
                status: resp.status(),
                body: String::new(),
            });
        }
        Ok(frames(resp.bytes_stream()))
    }

    /// A session's events after `after` (from the first when `None`), in order, each once,
    /// reconnecting with `Last-Event-ID` when the connection breaks. Ends when the server ends
    /// the stream (the session is over). An `error` frame from the server, an event that does
    /// not decode, a first connection that fails, or more than [`Retry::max_attempts`] breaks
    /// in a row end it with an error.
    pub fn events(
        &self,
        session_id: &str,
        after: Option<i64>,
    ) -> impl Stream<Item = Result<Event>> + Send + 'static {
        let c = self.clone();
        let path = format!("/v1/sessions/{session_id}/events");
        async_stream::stream! {
            let mut last = after;
            let mut failures: u32 = 0;
            let mut connected = false;
            loop {
                let broke = match c.sse(&path, last).await {
                    Ok(frames) => {
                        connected = true;
                        let mut frames = std::pin::pin!(frames);
                        let mut broke = None;
                        while let Some(f) = frames.next().await {
                            let f = match f {
                                Ok(f) => f,
                                Err(e) => {
                                    broke = Some(e);
                                    break;
                                }
                            };
                            if f.event == "error" {
                                yield Err(error_from(StatusCode::INTERNAL_SERVER_ERROR, &f.data));
                                return;
                            }
                            if f.data.is_empty() {
                                continue;
                            }
                            let ev = match serde_json::from_str::<Event>(&f.data) {
                                Ok(ev) => ev,
                                Err(e) => {
                                    yield Err(Error::Decode(e));
                                    return;
                                }
                            };
                            // The server resumes strictly after `Last-Event-ID`; this guard only
                            // keeps a replay that overlaps from reaching the caller twice.
                            if last.is_some_and(|l| ev.seq <= l) {
                                continue;
                            }
                            last = Some(f.id.as_deref().and_then(|i| i.trim().parse().ok()).unwrap_or(ev.seq));
                            failures = 0;
                            yield Ok(ev);
                        }
                        match broke {
                            // The server ended the body: the session is over.
                            None => return,
                            Some(e) => e,
                        }
                    }
                    Err(e) => e,
                };
                // Only a stream that was once up is resumed: a first connection that fails is
                // the caller's to report (no server there, a wrong URL).
                if !connected || !broke.is_transient() {
                    yield Err(broke);
                    return;
                }
                failures += 1;
                if failures > c.retry.max_attempts {
                    yield Err(Error::Resume { attempts: failures - 1, last: Box::new(broke) });
                    return;
                }
                tokio::time::sleep(c.backoff(failures)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use std::convert::Infallible;

    fn parse(chunks: Vec<Vec<u8>>) -> Vec<Frame> {
        let s = futures::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>));
        block_on(frames_of(s).collect::<Vec<_>>())
            .into_iter()
            .map(|r| match r {
                Ok(f) => f,
                Err(e) => panic!("frame error: {e:?}"),
            })
            .collect()
    }

    fn frame(id: &str, event: &str, data: &str) -> Frame {
        Frame {
            id: Some(id.into()),
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn a_character_split_across_chunks_stays_whole() {
        let text = "id: 7\nevent: stdout\ndata: {\"t\":\"h\u{e9}llo \u{1f600}\"}\n\n";
        let bytes = text.as_bytes();
        // Inside the 4-byte emoji and inside the 2-byte é.
        let emoji = text.find('\u{1f600}').expect("emoji") + 2;
        let e_acute = text.find('\u{e9}').expect("é") + 1;
        for cut in [emoji, e_acute] {
            let got = parse(vec![bytes[..cut].to_vec(), bytes[cut..].to_vec()]);
            assert_eq!(
                got,
                vec![frame("7", "stdout", "{\"t\":\"h\u{e9}llo \u{1f600}\"}")],
                "cut at byte {cut}"
            );
        }
        // One byte at a time.
        let got = parse(bytes.iter().map(|b| vec![*b]).collect());
        assert_eq!(got[0].data, "{\"t\":\"h\u{e9}llo \u{1f600}\"}");
    }

    #[test]
    fn an_event_split_at_every_byte_is_parsed_the_same() {
        let text =
            ": keep-alive\n\nid: 1\nevent: status\ndata: {\"a\":1}\n\nid: 2\ndata: x\ndata: y\n\n";
        let want = vec![
            frame("1", "status", "{\"a\":1}"),
            frame("2", "message", "x\ny"),
        ];
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let got = parse(vec![bytes[..cut].to_vec(), bytes[cut..].to_vec()]);
            assert_eq!(got, want, "cut at byte {cut}");
        }
    }

    #[test]
    fn comments_and_keep_alives_are_not_frames() {
        let got = parse(vec![
            b":\n\n: ping\n\n".to_vec(),
            b"id: 3\ndata: z\n\n:\n\n".to_vec(),
        ]);
        assert_eq!(got, vec![frame("3", "message", "z")]);
    }

    #[test]
    fn a_frame_without_its_blank_line_is_not_delivered() {
        // The connection broke mid-frame: the half frame must not look like an event.
        let got = parse(vec![b"id: 1\ndata: a\n\nid: 2\ndata: b".to_vec()]);
        assert_eq!(got, vec![frame("1", "message", "a")]);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let r = Retry {
            max_attempts: 10,
            base: Duration::from_millis(100),
            max_delay: Duration::from_millis(700),
        };
        let d: Vec<u64> = (1..=5).map(|n| r.delay(n).as_millis() as u64).collect();
        assert_eq!(d, vec![100, 200, 400, 700, 700]);
    }
}
