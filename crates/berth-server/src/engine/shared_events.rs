//! Live events of a session run by another server process sharing the store.
//!
//! A session's owner task broadcasts its events inside its own process only. When the store is
//! shared (PostgreSQL), any process can serve the session's stream: a relay task waits for the
//! store's commit wake-ups (`LISTEN/NOTIFY`, no polling), reads what was committed after the
//! last event it relayed, and feeds a broadcast channel shaped like the owner's, so the API's
//! replay-then-live logic is the same for both. The relay ends (closing the channel) after a
//! terminal `status` event, or when its last subscriber is gone.

use super::sessions::LiveEvent;
use super::Engine;
use berth_api::{EventKind, SessionState};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Live events a relay keeps for a slow subscriber (past it, the subscriber reads the store).
const RELAY_CAPACITY: usize = 1024;
/// Events read from the store per query while relaying.
const RELAY_PAGE: i64 = 1000;

impl Engine {
    /// Live event feed of a session: the owner's when it runs in this process, else (with a
    /// shared store) a relay of the commits made by the process that runs it. None once the
    /// session has ended (replay from the store suffices).
    pub async fn subscribe_any(&self, id: &str) -> Option<broadcast::Receiver<Arc<LiveEvent>>> {
        if let Some(rx) = self.subscribe(id) {
            return Some(rx);
        }
        // Watch before reading where the log ends: a commit in between then wakes the relay,
        // which reads from the end it found, so nothing falls between replay and relay.
        let mut wake = self.store.watch_session(id)?;
        let session = self.store.get_session(None, id).await.ok()??;
        if session.state.is_terminal() {
            return None;
        }
        let mut last = self.store.last_seq(id).await.ok()?;
        let (tx, rx) = broadcast::channel(RELAY_CAPACITY);
        let store = self.store.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = wake.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
                // Read until the log's end; a failing store (restarting) is retried, since its
                // wake-up for these commits may already have been spent.
                let mut backoff = Duration::from_millis(50);
                loop {
                    let page = match store.events_after(&id, last, RELAY_PAGE).await {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::debug!(session_id = %id, error = %e, "relaying events");
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {},
                                _ = tx.closed() => return,
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            continue;
                        }
                    };
                    let full = page.len() as i64 == RELAY_PAGE;
                    for e in page {
                        last = e.seq;
                        let ended = e.kind == EventKind::Status
                            && e.data["state"]
                                .as_str()
                                .and_then(|s| serde_json::from_value::<SessionState>(s.into()).ok())
                                .is_some_and(|s| s.is_terminal());
                        if tx.send(Arc::new(LiveEvent::new(e))).is_err() {
                            return;
                        }
                        if ended {
                            return;
                        }
                    }
                    if !full {
                        break;
                    }
                }
            }
        });
        Some(rx)
    }
}
