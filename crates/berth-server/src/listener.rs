//! The public API listener: hyper connections with the limits a public socket needs. A
//! connection has `header_read_timeout` to send each request's headers, counted from when it
//! opens or its previous answer ends, so a silent or dribbling client (slowloris) and an idle
//! keep-alive are closed after a bounded time; at most `max_connections` are served at once
//! (more wait in the kernel's backlog, not in memory) and at most `max_connections_per_peer`
//! from one address (more are closed at accept). Streams already answering (SSE, WebSocket)
//! are not timed: they end with their session, their key, or the server.

use crate::config::ListenerSection;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a graceful stop waits for open connections before dropping them.
const DRAIN: Duration = Duration::from_secs(30);

/// Open connections per peer address; an entry goes with its last connection.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut m = self.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.peers.0.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting and let open
/// connections finish (at most [`DRAIN`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: &ListenerSection,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    // HTTP/1.1 only: a protocol-sniffing builder reads the first bytes before any timer
    // runs, so a client that sends nothing would be held forever.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_s.max(1)));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let peers = Arc::new(Peers::default());
    // Told to every connection when the server stops: finish the answer in flight, then close.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = peers.take(peer.ip(), limits.max_connections_per_peer.max(1)) else {
            metrics::counter!("berth_connections_refused_total", "reason" => "per_peer")
                .increment(1);
            drop(tcp);
            continue;
        };
        // Events and streamed answers are small writes: send them at once (no Nagle delay).
        let _ = tcp.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection(TokioIo::new(tcp), svc)
            .with_upgrades();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    // Every connection holds a slot until it ends: all slots back means all closed.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN:?}; stopping anyway");
    }
}
