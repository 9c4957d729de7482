//! `GET /v1/sessions/{id}/sdk`: the WebSocket an Agent SDK app drives its CLI over.
//!
//! Frames: binary from the server are the CLI's stdout, in order, starting at the client's
//! `stdout_offset`; binary from the client go to the CLI's stdin unchanged. Text frames are
//! berth's own: the server opens with `{"type":"hello","session_id","box_id","stdin_offset",
//! "stdout_offset","kept_from"}` (`stdin_offset`: stdin bytes the session has taken, so a
//! reconnecting client resends only the rest) and ends, once the CLI has ended and all its
//! output was sent, with `{"type":"exit","code","signal"}` and a normal close. The client
//! sends `{"type":"end_input"}` to close the CLI's stdin. A connection replaces any earlier
//! one of the same session (closed with 4001); an offset older than the kept output (the
//! last [`berth_agent::sdk::RELAY_BYTES`]) is closed with 4002.

use super::{Path, Query};
use crate::auth::Caller;
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
        .max_message_size(16 << 20)
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
    let generation = relay.attach();
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
        "stdin_offset": relay.stdin_taken(),
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
                msg = incoming.next() => {
                    let Some(Ok(msg)) = msg else { break };
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
                    let n = bytes.as_ref().map_or(0, |b| b.len());
                    if !relay.current(generation) {
                        // A newer connection owns the session: its input must not interleave.
                        last = Some(close(4001, "replaced by a newer connection".into()));
                        break;
                    }
                    match st.engine.sdk_stdin(&c.tenant, &id, bytes).await {
                        Ok(()) => relay.add_stdin(n),
                        Err(e) => {
                            let body = ApiError::from(e).body();
                            let text = json!({"type": "error", "error": body.error});
                            let _ = sink.send(Message::Text(text.to_string().into())).await;
                        }
                    }
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
