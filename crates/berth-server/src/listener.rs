//! The public API listener: hyper connections with the limits a public socket needs. A
//! connection has `header_read_timeout` to send each request's headers, counted from when it
//! opens or its previous answer ends, so a silent or dribbling client (slowloris) and an idle
//! keep-alive are closed after a bounded time. Until it is upgraded, a connection on which no
//! byte moves either way for `idle_timeout` is closed too (a body trickled slowly, an answer
//! the client stops reading); time the server spends working on a request (a long exec, a
//! park) does not count unless it is waiting for more of the body, and SSE streams send a
//! keep-alive comment every 15 s.
//!
//! At most `max_connections` are served at once (more wait in the kernel's backlog, not in
//! memory) and at most `max_connections_per_peer` from one peer (an IPv4 address, or an IPv6
//! /64: one host's block; more are closed at accept). Both slots belong to the connection's
//! I/O object, so an upgraded connection (WebSocket, proxied port) keeps them until its
//! handler drops it; upgraded connections also have a cap of their own (`max_upgrades`).
//! Upgraded streams are not timed: they end with their session, their key, or the server.

use crate::config::ListenerSection;
use berth_gateway::conn::{until_idle, Activity, Busy, Tracked};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// How long a graceful stop waits for open connections before dropping them.
const DRAIN: Duration = Duration::from_secs(30);

/// Open connections per peer (see [`peer_key`]); an entry goes with its last connection.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// Whom a connection is counted against: an IPv4 address (also when mapped into IPv6), or
/// an IPv6 address's /64 (a single host commonly holds a whole /64).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
    }
}

/// A connection's I/O with the slots it holds: hyper hands this object to an upgrade's
/// handler, so the slots are freed only when the last owner of the connection drops it.
struct Held<T> {
    io: T,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _slot: PeerSlot,
    /// An upgrade slot, once the connection is upgraded.
    _upgrade: UpgradeSlot,
}

/// Where a connection's upgrade permit is kept (shared by its I/O and its request handler).
type UpgradeSlot = Arc<Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>;

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Held<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Held<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// One request's part in its connection's idle watch: from its head's arrival until its
/// answer's head is ready, the server is working and the connection is not idle, except while
/// the handler waits for more of the body (a trickled or stalled body counts as idle).
struct RequestWatch {
    activity: Activity,
    state: Mutex<(bool, Option<Busy>)>,
}

impl RequestWatch {
    fn new(activity: Activity) -> RequestWatch {
        let busy = activity.busy();
        RequestWatch {
            activity,
            state: Mutex::new((false, Some(busy))),
        }
    }

    /// The handler is (`true`) or is no longer (`false`) waiting for body bytes.
    fn waiting_for_body(&self, waiting: bool) {
        let released = self.state.lock().ok().and_then(|mut st| {
            let (answered, busy) = &mut *st;
            if waiting {
                busy.take()
            } else {
                if !*answered && busy.is_none() {
                    *busy = Some(self.activity.busy());
                }
                None
            }
        });
        drop(released);
    }

    fn answered(&self) {
        let busy = self.state.lock().ok().and_then(|mut st| {
            st.0 = true;
            st.1.take()
        });
        drop(busy);
    }
}

/// The request body as the router sees it: tells its [`RequestWatch`] when a read waits.
struct WatchedBody {
    inner: hyper::body::Incoming,
    watch: Arc<RequestWatch>,
}

impl axum::body::HttpBody for WatchedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        self.watch.waiting_for_body(r.is_pending());
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

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

/// Let a `101 Switching Protocols` answer through if an upgrade slot is free (kept with the
/// connection's I/O until it closes); otherwise answer 503 instead, so the connection is not
/// upgraded (the handler's upgrade future then fails and it ends).
fn take_upgrade_slot(
    resp: axum::response::Response,
    upgrades: &Arc<tokio::sync::Semaphore>,
    slot: &UpgradeSlot,
) -> axum::response::Response {
    if let (Ok(permit), Ok(mut held)) = (upgrades.clone().try_acquire_owned(), slot.lock()) {
        *held = Some(permit);
        return resp;
    }
    metrics::counter!("berth_connections_refused_total", "reason" => "upgrades").increment(1);
    axum::response::IntoResponse::into_response((
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        [("connection", "close")],
        axum::Json(serde_json::json!({"error": {"code": "too_many_upgrades",
            "message": "too many upgraded connections (WebSocket, port) are open; try again later"}})),
    ))
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
    // Upgraded connections (WebSocket, proxied ports) may hold only part of the slots, so
    // ordinary requests always find room.
    let upgrades = Arc::new(tokio::sync::Semaphore::new(limits.max_upgrades.max(1)));
    // Told to every connection when the server stops: finish the answer in flight, then close.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    let idle = Duration::from_secs(limits.idle_timeout_s.max(1));
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
        let Some(slot) = peers.take(peer_key(peer.ip()), limits.max_connections_per_peer.max(1))
        else {
            metrics::counter!("berth_connections_refused_total", "reason" => "per_peer")
                .increment(1);
            drop(tcp);
            continue;
        };
        // Events and streamed answers are small writes: send them at once (no Nagle delay).
        let _ = tcp.set_nodelay(true);
        let activity = Activity::new();
        let upgrade_slot = UpgradeSlot::default();
        let io = Tracked::new(
            Held {
                io: tcp,
                _permit: permit,
                _slot: slot,
                _upgrade: upgrade_slot.clone(),
            },
            activity.clone(),
        );
        let app = app.clone();
        let upgrades = upgrades.clone();
        let watch_activity = activity.clone();
        let svc =
            hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
                let watch = Arc::new(RequestWatch::new(watch_activity.clone()));
                let (parts, body) = req.into_parts();
                let req = axum::http::Request::from_parts(
                    parts,
                    axum::body::Body::new(WatchedBody {
                        inner: body,
                        watch: watch.clone(),
                    }),
                );
                let answer = hyper::service::Service::call(
                    &hyper_util::service::TowerToHyperService::new(app.clone()),
                    req,
                );
                let (upgrades, upgrade_slot) = (upgrades.clone(), upgrade_slot.clone());
                async move {
                    let r = answer.await;
                    watch.answered();
                    Ok::<_, std::convert::Infallible>(match r {
                        Ok(resp)
                            if resp.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS =>
                        {
                            take_upgrade_slot(resp, &upgrades, &upgrade_slot)
                        }
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    })
                }
            });
        let conn = builder
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        let mut stop = stop_rx.clone();
        let alive = alive_tx.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let mut conn = std::pin::pin!(conn);
            let served = async {
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop.changed() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.as_mut().await;
                    }
                }
            };
            // Until it is upgraded: once it is, `conn` has resolved and this watch ends.
            if until_idle(&activity, idle, served).await.is_none() {
                metrics::counter!("berth_connections_closed_total", "reason" => "idle")
                    .increment(1);
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    // Every connection's task holds a sender until it ends (upgraded streams end with the
    // server by their own means): the channel closing means all HTTP connections are done.
    drop(alive_tx);
    if tokio::time::timeout(DRAIN, alive_rx.recv()).await.is_err() {
        tracing::warn!("connections still open after {DRAIN:?}; stopping anyway");
    }
}

#[cfg(test)]
mod tests {
    use super::peer_key;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64_and_ipv4_by_address() {
        assert_eq!(
            peer_key(ip("2001:db8:1:2:aaaa::1")),
            peer_key(ip("2001:db8:1:2:ffff:1:2:3"))
        );
        assert_eq!(peer_key(ip("2001:db8:1:2::7")), ip("2001:db8:1:2::"));
        assert_ne!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(peer_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_ne!(peer_key(ip("192.0.2.7")), peer_key(ip("192.0.2.8")));
    }
}
