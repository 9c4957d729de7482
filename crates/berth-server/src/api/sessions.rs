//! `/v1/sessions`: lifecycle, messages, control, and the event stream over SSE and WebSocket.

use super::{Json, Path, Query};
use crate::auth::Caller;
use crate::engine::error::EngineError;
use crate::engine::sessions::LiveEvent;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use berth_api::*;
use futures::{SinkExt, Stream, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

/// Events read from the store per round while catching up.
const REPLAY_PAGE: i64 = 1000;

/// Start an agent session (in an existing box, or a new one).
#[utoipa::path(post, path = "/v1/sessions", security(("bearer" = [])), request_body = SessionSpec,
    responses((status = 201, body = SessionObject), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_session(
    State(st): State<AppState>,
    c: Caller,
    Json(spec): Json<SessionSpec>,
) -> Result<(StatusCode, Json<SessionObject>), ApiError> {
    let s = st.engine.create_session(&c.tenant, spec).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct ListParams {
    /// Only sessions in this box.
    #[serde(rename = "box")]
    box_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/sessions", security(("bearer" = [])), params(ListParams), responses((status = 200, body = List<SessionObject>)))]
pub async fn list_sessions(
    State(st): State<AppState>,
    c: Caller,
    Query(p): Query<ListParams>,
) -> Result<Json<List<SessionObject>>, ApiError> {
    Ok(Json(List {
        items: st
            .engine
            .list_sessions(&c.tenant, p.box_id.as_deref())
            .await?,
    }))
}

#[utoipa::path(get, path = "/v1/sessions/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = SessionObject), (status = 404, body = ErrorBody)))]
pub async fn get_session(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionObject>, ApiError> {
    Ok(Json(st.engine.get_session(&c.tenant, &id).await?))
}

/// Stop the session's agent. Its events stay readable.
#[utoipa::path(delete, path = "/v1/sessions/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = SessionObject), (status = 404, body = ErrorBody)))]
pub async fn delete_session(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionObject>, ApiError> {
    Ok(Json(st.engine.delete_session(&c.tenant, &id).await?))
}

/// Send a user message to the agent.
#[utoipa::path(post, path = "/v1/sessions/{id}/messages", security(("bearer" = [])), params(("id" = String, Path)), request_body = MessageRequest,
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn post_message(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Json(m): Json<MessageRequest>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    st.engine.send_message(&c.tenant, &id, m.content).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: true })))
}

/// Interrupt the agent's current work.
#[utoipa::path(post, path = "/v1/sessions/{id}/interrupt", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn interrupt(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    st.engine.interrupt(&c.tenant, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: true })))
}

/// Answer a pending tool-permission request.
#[utoipa::path(post, path = "/v1/sessions/{id}/permissions/{request_id}", security(("bearer" = [])),
    params(("id" = String, Path), ("request_id" = String, Path)), request_body = PermissionAnswer,
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn answer_permission(
    State(st): State<AppState>,
    c: Caller,
    Path((id, request_id)): Path<(String, String)>,
    Json(a): Json<PermissionAnswer>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    st.engine
        .answer_permission(&c.tenant, &id, &request_id, a)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: true })))
}

/// Start an ended session's agent again in its box (a Claude agent resumes its conversation).
#[utoipa::path(post, path = "/v1/sessions/{id}/restart", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = SessionObject), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn restart(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionObject>, ApiError> {
    Ok(Json(st.engine.restart_session(&c.tenant, &id).await?))
}

/// Switch the agent's permission mode.
#[utoipa::path(post, path = "/v1/sessions/{id}/permission-mode", security(("bearer" = [])), params(("id" = String, Path)),
    request_body = PermissionModeRequest,
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn permission_mode(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Json(m): Json<PermissionModeRequest>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    st.engine
        .set_permission_mode(&c.tenant, &id, m.mode)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: true })))
}

/// Tokens the session spent, as metered by the gateway.
#[utoipa::path(get, path = "/v1/sessions/{id}/usage", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = SessionUsage), (status = 404, body = ErrorBody)))]
pub async fn usage(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionUsage>, ApiError> {
    Ok(Json(st.engine.session_usage(&c.tenant, &id).await?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct EventParams {
    /// Replay events with `seq` greater than this (default 0: everything).
    after: Option<i64>,
}

fn start_seq(headers: &HeaderMap, after: Option<i64>) -> Result<i64, ApiError> {
    if let Some(a) = after {
        if a < 0 {
            return Err(ApiError::Invalid("after must be >= 0".into()));
        }
        return Ok(a);
    }
    match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::Invalid("Last-Event-ID must be an event seq".into())),
        None => Ok(0),
    }
}

/// Every event after `after`, in order and without gaps: first from the store, then live; a
/// subscriber that lags behind the live feed goes back to the store. Ends when the session has
/// ended and everything has been delivered.
fn event_stream(
    st: AppState,
    id: String,
    after: i64,
) -> impl Stream<Item = Result<Arc<LiveEvent>, ApiError>> {
    async_stream::try_stream! {
        let engine = st.engine.clone();
        let mut last = after;
        loop {
            // Subscribe before reading the store so nothing committed in between is missed.
            let mut live = engine.subscribe_any(&id).await;
            loop {
                let page = engine.events_after(&id, last, REPLAY_PAGE).await?;
                let n = page.len() as i64;
                for e in page {
                    last = e.seq;
                    yield Arc::new(LiveEvent::new(e));
                }
                if n < REPLAY_PAGE {
                    break;
                }
            }
            let Some(rx) = live.as_mut() else {
                // The session has ended: the store holds everything.
                break;
            };
            let mut caught_up = true;
            loop {
                match rx.recv().await {
                    Ok(e) if e.event.seq <= last => continue,
                    Ok(e) if e.event.seq == last + 1 => {
                        last = e.event.seq;
                        if let Some(t) = e.committed {
                            metrics::histogram!("berth_event_delivery_lag_seconds")
                                .record(t.elapsed().as_secs_f64());
                        }
                        yield e;
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        caught_up = false;
                        break;
                    }
                    Err(RecvError::Closed) => break,
                }
            }
            if caught_up {
                // Closed: read what was committed after our last live event, then end.
                let page = engine.events_after(&id, last, i64::MAX).await?;
                for e in page {
                    yield Arc::new(LiveEvent::new(e));
                }
                break;
            }
            metrics::counter!("berth_event_subscriber_catchups_total").increment(1);
        }
    }
}

/// The session's events as Server-Sent Events (`id:` is the seq; reconnect with `Last-Event-ID`
/// or `?after=` to resume).
#[utoipa::path(get, path = "/v1/sessions/{id}/events", security(("bearer" = [])), params(("id" = String, Path), EventParams),
    responses((status = 200, description = "text/event-stream; each frame's data is an Event", body = SseFrame, content_type = "text/event-stream"), (status = 404, body = ErrorBody)))]
pub async fn events(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Query(p): Query<EventParams>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    st.engine.get_session(&c.tenant, &id).await?;
    let after = start_seq(&headers, p.after)?;
    // The stream ends when the caller's key is revoked.
    let revoked = st.engine.key_revoked(&c.key_id);
    let stream = event_stream(st, id, after).take_until(revoked).map(|r| {
        Ok(match r {
            Ok(e) => SseEvent::default()
                .id(e.event.seq.to_string())
                .event(e.event.kind.as_str())
                .data(e.json.as_str()),
            Err(err) => SseEvent::default()
                .event("error")
                .data(serde_json::to_string(&err.body()).unwrap_or_default()),
        })
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The same stream over WebSocket; the client may send `WsClientMessage`s. Each client message
/// is answered with `{"type":"ack"}` or `{"type":"error","error":{...}}`; events carry `seq`.
#[utoipa::path(get, path = "/v1/sessions/{id}/ws", security(("bearer" = [])), params(("id" = String, Path), EventParams),
    responses((status = 101, description = "WebSocket upgrade"), (status = 404, body = ErrorBody)))]
pub async fn ws(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Query(p): Query<EventParams>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    st.engine.get_session(&c.tenant, &id).await?;
    let after = start_seq(&headers, p.after)?;
    Ok(upgrade
        .max_message_size(4 << 20)
        .on_upgrade(move |socket| ws_session(st, c, id, after, socket))
        .into_response())
}

/// Longest a revoked socket's close frame may take to send.
const WS_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn ws_session(st: AppState, c: Caller, id: String, after: i64, socket: WebSocket) {
    let (sink, mut incoming) = socket.split();
    let sink = Arc::new(tokio::sync::Mutex::new(sink));
    let out = sink.clone();
    let stream_st = st.clone();
    let sid = id.clone();
    let forward = tokio::spawn(async move {
        let mut events = std::pin::pin!(event_stream(stream_st, sid, after));
        while let Some(r) = events.next().await {
            let text = match r {
                Ok(e) => e.json.clone(),
                Err(err) => {
                    serde_json::json!({"type": "error", "error": err.body().error}).to_string()
                }
            };
            if out
                .lock()
                .await
                .send(Message::Text(text.into()))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = out.lock().await.send(Message::Close(None)).await;
    });
    let revoked = st.engine.key_revoked(&c.key_id);
    // Raced as a whole against revocation: a client that sends but stops reading blocks an
    // answer's send, which must not keep the socket past its key.
    let serve = async {
        while let Some(Ok(msg)) = incoming.next().await {
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Close(_) => break,
                _ => continue,
            };
            let reply = match serde_json::from_str::<WsClientMessage>(&text) {
                Err(e) => Err(EngineError::Invalid(format!("bad message: {e}"))),
                Ok(WsClientMessage::Message { content }) => {
                    st.engine.send_message(&c.tenant, &id, content).await
                }
                Ok(WsClientMessage::Interrupt) => st.engine.interrupt(&c.tenant, &id).await,
                Ok(WsClientMessage::SetPermissionMode { mode }) => {
                    st.engine.set_permission_mode(&c.tenant, &id, mode).await
                }
                Ok(WsClientMessage::Permission {
                    request_id,
                    allow,
                    message,
                }) => {
                    st.engine
                        .answer_permission(
                            &c.tenant,
                            &id,
                            &request_id,
                            PermissionAnswer { allow, message },
                        )
                        .await
                }
            };
            let ack = match reply {
                Ok(()) => serde_json::json!({"type": "ack"}),
                Err(e) => {
                    serde_json::json!({"type": "error", "error": ApiError::from(e).body().error})
                }
            };
            if sink
                .lock()
                .await
                .send(Message::Text(ack.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    tokio::select! {
        () = serve => {}
        () = revoked => {
            // The key that opened this socket is gone: so is the socket. The close frame gets
            // a bounded time (a client that stopped reading would hold the send forever).
            forward.abort();
            let close = axum::extract::ws::CloseFrame {
                code: axum::extract::ws::close_code::POLICY,
                reason: "API key revoked".into(),
            };
            let _ = tokio::time::timeout(WS_CLOSE_TIMEOUT, async {
                sink.lock().await.send(Message::Close(Some(close))).await
            })
            .await;
        }
    }
    forward.abort();
}
