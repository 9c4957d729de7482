//! `GET /v1/boxes/{id}/pty`: an interactive shell in a box on a real terminal, over WebSocket.
//!
//! Binary frames carry terminal bytes both ways (keystrokes in, the terminal's output out);
//! text frames carry small JSON control messages: `{"type":"resize","cols","rows"}` from the
//! client, `{"type":"exit","code","signal"}` (then a close) or `{"type":"error","message"}` from
//! the server. The key is the usual bearer header, or, for browsers (whose WebSocket cannot
//! set headers), a `berth.key.<key>` entry in `Sec-WebSocket-Protocol` beside `berth.pty`,
//! which the server selects: the key is never in the URL. Bounds: frames over
//! [`MAX_FRAME`] end the socket, a frame the client has not taken within [`SEND_TIMEOUT`]
//! ends it too (a client that stops reading holds only its own shell back), and the key's
//! revocation closes it (1008).

use super::{Path, Query};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use berth_api::ErrorBody;
use berth_sandbox::{ExecEvent, ExecInput, TtySize};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use std::time::{Duration, Instant};

/// The subprotocol the server selects.
pub const PROTOCOL: &str = "berth.pty";
/// Prefix of the subprotocol entry that carries the key (browsers).
pub const KEY_PROTOCOL_PREFIX: &str = "berth.key.";
/// Largest frame (either way) a terminal socket takes.
pub const MAX_FRAME: usize = 64 << 10;
/// Longest a frame may wait for the client to take it.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the close frame of a revoked socket may take to send.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Activity is reported to the box at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PtyParams {
    /// Terminal width in cells (default 80, 1–1000).
    pub cols: Option<u16>,
    /// Terminal height in cells (default 24, 1–1000).
    pub rows: Option<u16>,
}

/// A client's control message (a text frame).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Control {
    Resize { cols: u16, rows: u16 },
}

/// The caller, from the `Authorization` header or the key subprotocol.
pub struct PtyCaller(pub Caller);

impl FromRequestParts<AppState> for PtyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let from = crate::auth::KeySources {
            subprotocol: true,
            ..Default::default()
        };
        crate::auth::key_from_headers(&st.engine, &parts.headers, from)
            .await?
            .map(|rec| PtyCaller(Caller::from(rec)))
            .ok_or(ApiError::Unauthorized)
    }
}

/// An interactive shell in the box on a pseudo-terminal, over WebSocket.
///
/// The shell (`bash -l` where the box has bash, else `sh -l`, `TERM=xterm-256color`) runs as
/// the box's agent user with the same confinement as `exec` (namespaces, cgroup, seccomp,
/// Landlock); the terminal is allocated inside the box. Protocol: binary frames are terminal
/// bytes both ways; text frames are JSON control messages — from the client
/// `{"type":"resize","cols":N,"rows":N}`, from the server `{"type":"exit","code":N|null,
/// "signal":N|null}` when the shell ends (then a close) or `{"type":"error","message":"…"}`.
/// Authenticate with the bearer header or, from a browser, by offering the subprotocols
/// `berth.pty` and `berth.key.<API key>` (the server selects `berth.pty`). Frames are at most
/// 64 KiB; a box has at most 4 terminals open (429 past that); closing the socket ends the
/// shell; deleting the key closes the socket (1008).
#[utoipa::path(get, path = "/v1/boxes/{id}/pty", security(("bearer" = [])), params(("id" = String, Path), PtyParams),
    responses((status = 101, description = "WebSocket upgrade: the terminal"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 426, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn pty(
    State(st): State<AppState>,
    PtyCaller(c): PtyCaller,
    Path(id): Path<String>,
    Query(p): Query<PtyParams>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|r| ApiError::Rejected(r.status(), r.body_text()))?;
    let size = TtySize {
        cols: p.cols.unwrap_or(80),
        rows: p.rows.unwrap_or(24),
    };
    let term = st.engine.open_terminal(&c.tenant, &id, size).await?;
    Ok(upgrade
        .protocols([PROTOCOL])
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| serve(st, c, id, term, socket))
        .into_response())
}

async fn serve(
    st: AppState,
    c: Caller,
    id: String,
    mut term: crate::engine::pty::Terminal,
    socket: WebSocket,
) {
    let (mut sink, mut incoming) = socket.split();
    let exec = &mut term.handle;
    let mut touched = Instant::now();
    let mut touch = || {
        if touched.elapsed() >= TOUCH_EVERY {
            touched = Instant::now();
            st.engine.terminal_activity(&id);
        }
    };
    let relay = async {
        loop {
            tokio::select! {
                ev = exec.events.recv() => {
                    let msg = match ev {
                        Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => Message::Binary(b),
                        Some(ExecEvent::Started { .. }) => continue,
                        Some(ExecEvent::Exit(s)) => {
                            return Some(text(serde_json::json!({"type": "exit", "code": s.code, "signal": s.signal})));
                        }
                        Some(ExecEvent::Failed(m)) => {
                            return Some(text(serde_json::json!({"type": "error", "message": m})));
                        }
                        None => {
                            return Some(text(serde_json::json!({"type": "error", "message": "the terminal ended"})));
                        }
                    };
                    touch();
                    match tokio::time::timeout(SEND_TIMEOUT, sink.send(msg)).await {
                        Ok(Ok(())) => {}
                        // The client is gone or does not read: the shell ends with the socket.
                        _ => return None,
                    }
                }
                msg = incoming.next() => {
                    let input = match msg {
                        Some(Ok(Message::Binary(b))) => ExecInput::Stdin(b),
                        Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(t.as_str()) {
                            Ok(Control::Resize { cols, rows }) => {
                                let side = 1..=crate::engine::pty::MAX_PTY_SIDE;
                                if !side.contains(&cols) || !side.contains(&rows) {
                                    continue;
                                }
                                ExecInput::Resize(TtySize { cols, rows })
                            }
                            // Unknown control messages are ignored (newer clients).
                            Err(_) => continue,
                        },
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        // Closed, broken, or a frame over the limit: the shell ends.
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                    };
                    touch();
                    // Waits while the shell does not read its terminal: the client is held
                    // back (its socket's buffers fill), nobody else.
                    if exec.input.send(input).await.is_err() {
                        return None;
                    }
                }
            }
        }
    };
    // Raced as a whole against revocation: a relay blocked on a client or a shell that does
    // not read must not keep the socket past its key.
    let revoked = st.engine.key_revoked(&c.key_id);
    let ending = tokio::select! {
        last = relay => last,
        () = revoked => Some(Message::Close(Some(CloseFrame {
            code: close_code::POLICY,
            reason: "API key revoked".into(),
        }))),
    };
    if let Some(last) = ending {
        let is_close = matches!(last, Message::Close(_));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            sink.send(last).await?;
            if !is_close {
                sink.send(Message::Close(None)).await?;
            }
            Ok::<(), axum::Error>(())
        })
        .await;
    }
    // Dropping the terminal kills the shell's process group and frees the box's slot.
    drop(term);
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}
