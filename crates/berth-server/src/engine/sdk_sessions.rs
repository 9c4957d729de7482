//! Client-driven Claude sessions (`client: "sdk"`): the engine's side of the relay.
//!
//! The session's owner task runs the CLI as for any session (same box, gateway token,
//! metering, budgets, limits, events); its driver copies the CLI's stdout into a
//! [`berth_agent::Relay`] and the client's bytes reach the CLI's stdin through
//! [`SessionCmd::ClientStdin`], in order, with back-pressure: a connection has one write in
//! flight, answered once the box's input queue has room for it (see `actor`'s
//! `SDK_STDIN_QUEUED`), so a CLI that stops reading makes the server stop reading the socket
//! instead of buffering. One client connection at a time owns the session (a
//! newer one replaces it). A session with no client connected for [`SDK_GRACE`] is stopped.

use super::registry::Registry;
use super::sessions::SessionCmd;
use super::Engine;
use crate::engine::error::EngineError;
use berth_agent::Relay;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long an sdk session waits for its client to (re)connect before it is stopped.
pub const SDK_GRACE: Duration = Duration::from_secs(60);

impl Engine {
    /// The stdout relay of a live sdk session of `tenant`.
    pub async fn sdk_relay(&self, tenant: &str, id: &str) -> Result<Arc<Relay>, EngineError> {
        let s = self.get_session(tenant, id).await?;
        let h = self
            .session_handle(id)
            .ok_or_else(|| EngineError::Conflict(format!("session {id} has ended")))?;
        let relay = h.sdk.clone().ok_or_else(|| {
            EngineError::Invalid(format!(
                "session {id} is not an sdk session (agent client \"sdk\")"
            ))
        })?;
        if s.state.is_terminal() && relay.exit().is_none() {
            return Err(EngineError::Conflict(format!("session {id} has ended")));
        }
        Ok(relay)
    }

    /// Write the bytes of client connection `generation` to an sdk session's CLI (None: end
    /// its input). Returns once they are queued to the box, which waits while the box's queue
    /// holds its share of client bytes: the caller reads no more from its client meanwhile.
    pub async fn sdk_stdin(
        &self,
        tenant: &str,
        id: &str,
        generation: u64,
        bytes: Option<bytes::Bytes>,
    ) -> Result<(), EngineError> {
        let h = self
            .session_handle(id)
            .filter(|h| h.state.borrow().tenant == tenant)
            .ok_or_else(|| EngineError::not_found("session", id))?;
        let (tx, rx) = oneshot::channel();
        let ended = || EngineError::Conflict(format!("session {id} has ended"));
        h.tx.send(SessionCmd::ClientStdin {
            generation,
            bytes,
            reply: tx,
        })
        .await
        .map_err(|_| ended())?;
        rx.await.map_err(|_| ended())?
    }
}

/// Stop the session when no client has been connected for [`SDK_GRACE`] (from its start, or
/// from its client's last disconnect); ends with the CLI.
pub(super) fn watch(registry: Arc<Registry>, id: String, relay: Arc<Relay>) {
    let mut changed = relay.subscribe();
    tokio::spawn(async move {
        loop {
            if relay.exit().is_some() {
                return;
            }
            let (attached, generation) = relay.attached();
            if attached {
                if changed.changed().await.is_err() {
                    return;
                }
                continue;
            }
            // Unattached: wait out the grace unless someone attaches or the CLI ends.
            let deadline = tokio::time::Instant::now() + SDK_GRACE;
            let expired = loop {
                tokio::select! {
                    r = changed.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let (now_attached, g) = relay.attached();
                        if now_attached || g != generation || relay.exit().is_some() {
                            break false;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break true,
                }
            };
            if expired {
                let Some(h) = registry.session_handle(&id) else {
                    return;
                };
                let (tx, _rx) = oneshot::channel();
                let _ =
                    h.tx.send(SessionCmd::Stop {
                        reason: format!("no sdk client connected for {} s", SDK_GRACE.as_secs()),
                        reply: tx,
                    })
                    .await;
                return;
            }
        }
    });
}
