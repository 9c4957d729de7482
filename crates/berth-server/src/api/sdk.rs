//! `GET /v1/sessions/{id}/sdk`: the WebSocket an Agent SDK app drives its CLI over.
//!
//! Frames: binary from the server are the CLI's stdout, in order, starting at the client's
//! `stdout_offset`; binary from the client go to the CLI's stdin unchanged. Text frames are
//! berth's own: the server opens with `{"type":"hello","session_id","box_id","stdin_offset",
//! "stdout_offset"}` (`stdin_offset`: stdin bytes the session has taken, so a reconnecting
//! client resends only the rest), acknowledges stdin every 64 KiB and 100 ms after a write
//! with `{"type":"stdin_taken","offset"}` (the client may forget its bytes before `offset`), and
//! ends, once the CLI has ended and all its output was sent, with
//! `{"type":"exit","code","signal"}` and a normal close. The client sends
//! `{"type":"end_input"}` to close the CLI's stdin. A connection replaces any earlier one of
//! the same session (closed with 4001); an offset older than the kept output (the last
//! [`berth_agent::sdk::RELAY_BYTES`]) is closed with 4002 (after the hello).
//!
//! Stdin is bounded end to end: a client frame is at most [`MAX_STDIN_FRAME`], a connection
//! has one write in flight, and it is answered only once the box's queue has room (the
//! engine's `sdk_stdin`); meanwhile no more frames are read, so TCP pushes back on the client.

use super::{Path, Query};
use crate::auth::Caller;
use crate::engine::error::EngineError;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use berth_agent::sdk::Read;
use futures::{SinkExt, StreamExt};
use serde_json::json;

/// Stdout bytes per frame.
const FRAME: usize = 64 << 10;
/// Largest client message (and frame): SDK lines are small, and every byte of one is held
/// until the CLI takes it.
pub const MAX_STDIN_FRAME: usize = 1 << 20;
/// Acknowledge stdin (`stdin_taken`) each time this many more bytes were taken, and else
/// [`ACK_DELAY`] after a write (so the client learns the final count too).
const ACK_EVERY: u64 = 64 << 10;
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
/// A connection's stdin write in flight (answered once the box's queue took it).
type StdinWrite = futures::future::BoxFuture<'static, Result<(), EngineError>>;
/// Longest a close frame may take to send.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct SdkParams {
    /// Resume the CLI's stdout from this byte offset (default 0: from its start).
    stdout_offset: Option<u64>,
}

/// Drive an sdk session's CLI (stdin/stdout relayed as binary frames; see the module docs).
#[utoipa::path(get, path = "/v1/sessions/{id}/sdk", security(("bearer" = [])), params(("id" = String, Path), SdkParams),
    responses((status = 101, description = "WebSocket upgrade"), (status = 400, body = berth_api::ErrorBody), (status = 404, body = berth_api::ErrorBody), (status = 409, body = berth_api::ErrorBody)))]
pub async fn sdk_ws(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Query(p): Query<SdkParams>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let relay = st.engine.sdk_relay(&c.tenant, &id).await?;
    let s = st.engine.get_session(&c.tenant, &id).await?;
    let offset = p.stdout_offset.unwrap_or(0);
    Ok(upgrade
        .max_message_size(MAX_STDIN_FRAME)
        .max_frame_size(MAX_STDIN_FRAME)
        .on_upgrade(move |socket| serve(st, c, s.id, s.box_id, relay, offset, socket))
        .into_response())
}

#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientText {
    EndInput,
}

async fn serve(
    st: AppState,
    c: Caller,
    id: String,
    box_id: String,
    relay: std::sync::Arc<berth_agent::Relay>,
    mut offset: u64,
    socket: WebSocket,
) {
    let (generation, stdin_offset) = relay.attach();
    let mut acked = stdin_offset;
    let mut changed = relay.subscribe();
    let (mut sink, mut incoming) = socket.split();
    let revoked = st.engine.key_revoked(&c.key_id);
    let close = |code: u16, reason: String| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    let hello = json!({
        "type": "hello",
        "session_id": id,
        "box_id": box_id,
        "stdin_offset": stdin_offset,
        "stdout_offset": offset,
    });
    if sink
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        relay.detach(generation);
        return;
    }
    // Raced as a whole against revocation: a client that stopped reading blocks a send, which
    // must not keep the socket past its key.
    let body = async {
        let mut last: Option<Message> = None;
        // The connection's one stdin write in flight: no frame is read until it is answered,
        // while stdout keeps flowing.
        let mut inflight: Option<StdinWrite> = None;
        let mut ack_at: Option<tokio::time::Instant> = None;
        'conn: loop {
            // Send everything available before waiting.
            loop {
                if !relay.current(generation) {
                    last = Some(close(4001, "replaced by a newer connection".into()));
                    break 'conn;
                }
                match relay.read(offset, FRAME) {
                    Read::Bytes(b) => {
                        offset += b.len() as u64;
                        if sink.send(Message::Binary(b.into())).await.is_err() {
                            break 'conn;
                        }
                    }
                    Read::Pending => break,
                    Read::Ended(e) => {
                        let text = json!({"type": "exit", "code": e.code, "signal": e.signal});
                        if sink
                            .send(Message::Text(text.to_string().into()))
                            .await
                            .is_ok()
                        {
                            last = Some(close(1000, "the CLI ended".into()));
                        }
                        break 'conn;
                    }
                    Read::Lost { kept_from, end } => {
                        last = Some(close(
                            4002,
                            format!(
                                "stdout offset {offset} is not kept (kept: {kept_from}..{end})"
                            ),
                        ));
                        break 'conn;
                    }
                }
            }
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                r = async {
                    match inflight.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    inflight = None;
                    let text = match r {
                        Ok(()) => {
                            let taken = relay.stdin_taken();
                            if taken < acked + ACK_EVERY {
                                ack_at.get_or_insert_with(|| tokio::time::Instant::now() + ACK_DELAY);
                                continue;
                            }
                            acked = taken;
                            ack_at = None;
                            json!({"type": "stdin_taken", "offset": taken})
                        }
                        Err(e) => {
                            let body = ApiError::from(e).body();
                            json!({"type": "error", "error": body.error})
                        }
                    };
                    if sink.send(Message::Text(text.to_string().into())).await.is_err() {
                        break;
                    }
                }
                () = crate::engine::sleep_until_opt(ack_at) => {
                    ack_at = None;
                    let taken = relay.stdin_taken();
                    if taken > acked {
                        acked = taken;
                        let text = json!({"type": "stdin_taken", "offset": taken});
                        if sink.send(Message::Text(text.to_string().into())).await.is_err() {
                            break;
                        }
                    }
                }
                msg = incoming.next(), if inflight.is_none() => {
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            // The one read error a client can be told about: a message over
                            // the limit (tungstenite's capacity error; no type to match).
                            if e.to_string().contains("too long") {
                                last = Some(close(
                                    axum::extract::ws::close_code::SIZE,
                                    format!("a stdin message is at most {MAX_STDIN_FRAME} bytes"),
                                ));
                            }
                            break;
                        }
                        None => break,
                    };
                    let bytes = match msg {
                        Message::Binary(b) => Some(b),
                        Message::Text(t) => match serde_json::from_str::<ClientText>(t.as_str()) {
                            Ok(ClientText::EndInput) => None,
                            Err(e) => {
                                last = Some(close(1003, format!("bad message: {e}")));
                                break;
                            }
                        },
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if !relay.current(generation) {
                        // A newer connection owns the session: its input must not interleave
                        // (the session checks again, with the count, when it queues them).
                        last = Some(close(4001, "replaced by a newer connection".into()));
                        break;
                    }
                    let (engine, tenant, id) = (st.engine.clone(), c.tenant.clone(), id.clone());
                    inflight = Some(Box::pin(async move {
                        engine.sdk_stdin(&tenant, &id, generation, bytes).await
                    }));
                }
            }
        }
        last
    };
    let last = tokio::select! {
        last = body => last,
        () = revoked => Some(close(axum::extract::ws::close_code::POLICY, "API key revoked".into())),
    };
    relay.detach(generation);
    if let Some(m) = last {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(m)).await;
    }
}
