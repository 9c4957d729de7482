//! Connection limits for the sockets a box can reach (model gateway, egress proxy, box-side
//! API): a cap on concurrent connections per box, a deadline for a request head, and an idle
//! timeout that counts only time with no bytes moving in either direction (a model response
//! may stream for many minutes; a connection that says nothing for minutes is dropped).
//!
//! Contract: [`serve_http`] never holds more than `max_connections` connections of one
//! listener open; connections beyond the cap get the listener's refusal response and are
//! closed at once, without reading anything. An accept error (e.g. out of descriptors) pauses
//! the loop briefly instead of ending it.
//!
//! A box's services share one socket, its [`Door`]: every connection the box's bridge makes
//! begins with the box port it was made to (two bytes, big-endian), and the door hands the
//! rest of the connection to that port's service. One listening descriptor per box instead of
//! one per bridged port: a server's open-file limit is what caps the boxes it holds.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections one box may hold open on one socket.
    pub max_connections: usize,
    /// Time allowed for a request head to arrive (from the connection opening, or from the
    /// end of the previous response on a kept-alive connection).
    pub header_timeout: Duration,
    /// A connection with no bytes moving in either direction for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// When a connection last moved a byte (shared between its I/O wrapper and its watchdog).
/// While a [`Busy`] guard is held the connection is not idle (its server is working on a
/// request it has whole, e.g. a long exec); idle time counts again from the guard's drop.
#[derive(Clone)]
pub struct Activity {
    base: Instant,
    last_ms: Arc<AtomicU64>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

/// See [`Activity::busy`].
pub struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
            busy: Arc::default(),
        }
    }

    /// Mark the connection busy until the guard drops.
    pub fn busy(&self) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// An I/O object that records activity on every byte read or written.
pub struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Activity) -> Tracked<T> {
        Tracked { inner, activity }
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Run `fut` until it ends or `activity` shows nothing moved for `idle`; `None` when it was
/// cut off (dropping the future closes whatever it holds).
pub async fn until_idle<F: Future>(
    activity: &Activity,
    idle: Duration,
    fut: F,
) -> Option<F::Output> {
    let watchdog = async {
        loop {
            let quiet = activity.idle_for();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        out = fut => Some(out),
        () = watchdog => None,
    }
}

/// A complete HTTP/1.1 refusal (status line, JSON body, `Connection: close`).
pub fn refusal_response(status: &str, json_body: &str) -> bytes::Bytes {
    bytes::Bytes::from(format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json_body}",
        json_body.len()
    ))
}

/// Answer a connection over the cap and close it; bounded in time (and in what it reads) so
/// that a client that never reads, or never stops writing, cannot hold the task. `permit` is
/// held until then.
pub fn refuse_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut s: S,
    response: bytes::Bytes,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    use tokio::io::AsyncReadExt;
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = s.write_all(&response).await;
            let _ = s.shutdown().await;
            // Closing with the request unread would reset the connection and lose the answer
            // on the client's side: read what it sends (up to a head's worth) until it pauses.
            let mut buf = [0u8; 4096];
            let mut total = 0usize;
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
            {
                total += n;
                if n == 0 || total > 64 * 1024 {
                    break;
                }
            }
        })
        .await;
    });
}

/// Where one service of one box gets its connections: a socket of its own, or the box's
/// [`Door`] (which ends the service when it closes).
pub enum Incoming {
    Listener(tokio::net::UnixListener),
    Door(tokio::sync::mpsc::Receiver<tokio::net::UnixStream>),
}

impl From<tokio::net::UnixListener> for Incoming {
    fn from(l: tokio::net::UnixListener) -> Incoming {
        Incoming::Listener(l)
    }
}

impl Incoming {
    /// A socket of its own at `path` ([`crate::bind_box_socket`]).
    pub fn bind(path: &std::path::Path) -> std::io::Result<Incoming> {
        crate::bind_box_socket(path).map(Incoming::Listener)
    }

    /// The next connection; `None` once the door is gone.
    async fn next(&mut self) -> Option<std::io::Result<tokio::net::UnixStream>> {
        match self {
            Incoming::Listener(l) => Some(l.accept().await.map(|(s, _)| s)),
            Incoming::Door(rx) => rx.recv().await.map(Ok),
        }
    }
}

/// Prefaces a box's door waits for at once; past that it accepts no more until one arrives or
/// times out (the box's bridge writes its preface with the connect: only a box misbehaving
/// keeps many waiting, and the door is that box's alone).
const DOOR_PENDING: usize = 64;

/// A box's one socket for all its bridged ports: see the module's docs. Made with the
/// [`Incoming`] of each port ([`Door::route`]), then run with [`Door::serve`].
#[derive(Default)]
pub struct Door {
    routes: std::collections::HashMap<u16, tokio::sync::mpsc::Sender<tokio::net::UnixStream>>,
}

impl Door {
    pub fn new() -> Door {
        Door::default()
    }

    /// The connections the box makes to `port`, for that port's service.
    pub fn route(&mut self, port: u16) -> Incoming {
        // A few waiting hand-overs: the service's own accept loop takes them at once.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        self.routes.insert(port, tx);
        Incoming::Door(rx)
    }

    /// Accept on `listener`, read each connection's port preface (within `preface_timeout`)
    /// and hand the connection to its port's service; a connection to a port with no service,
    /// or whose preface is short or late, is closed. Runs until aborted or every service ends.
    pub async fn serve(self, listener: tokio::net::UnixListener, preface_timeout: Duration) {
        use tokio::io::AsyncReadExt;
        let routes = Arc::new(self.routes);
        let pending = Arc::new(tokio::sync::Semaphore::new(DOOR_PENDING));
        loop {
            if routes.values().all(|r| r.is_closed()) {
                return;
            }
            // Waited for, not refused: a connection over a service's cap must reach the
            // service to get its refusal (a burst of connections would be closed unanswered).
            let Ok(permit) = pending.clone().acquire_owned().await else {
                return;
            };
            let mut stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors or a transient error: the listener stays.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let routes = routes.clone();
            tokio::spawn(async move {
                let mut port = [0u8; 2];
                let read = tokio::time::timeout(preface_timeout, stream.read_exact(&mut port));
                if !matches!(read.await, Ok(Ok(_))) {
                    return;
                }
                drop(permit);
                if let Some(route) = routes.get(&u16::from_be_bytes(port)) {
                    // Fails only when the service is gone: the connection closes with it.
                    let _ = route.send(stream).await;
                }
            });
        }
    }
}

/// Accept connections on a box's Unix socket (or from its door), each handed to `handle` with
/// its permit held for the connection's life; connections over the cap get `over_cap` and are
/// closed. Ends when the door does.
pub async fn accept_loop<F, Fut>(
    incoming: impl Into<Incoming>,
    limits: ConnLimits,
    over_cap: bytes::Bytes,
    handle: F,
) where
    F: Fn(tokio::net::UnixStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut incoming = incoming.into();
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    // Refusals being written are bounded too; past that, a connection is just closed.
    let refusals = Arc::new(tokio::sync::Semaphore::new(
        limits.max_connections.max(1).saturating_mul(4),
    ));
    loop {
        let stream = match incoming.next().await {
            Some(Ok(s)) => s,
            Some(Err(_)) => {
                // Out of descriptors or a transient error: the listener stays.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            None => return,
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let fut = handle(stream);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            Err(_) => match refusals.clone().try_acquire_owned() {
                Ok(p) => refuse_connection(stream, over_cap.clone(), Some(p)),
                Err(_) => drop(stream),
            },
        }
    }
}

/// Serve an axum router on a box's Unix socket with `limits` (HTTP/1.1: the box side of every
/// bridge speaks it).
pub async fn serve_http(
    incoming: impl Into<Incoming>,
    app: axum::Router,
    limits: ConnLimits,
    over_cap: bytes::Bytes,
) {
    accept_loop(incoming, limits, over_cap, move |stream| {
        let app = app.clone();
        async move {
            let activity = Activity::new();
            let io = hyper_util::rt::TokioIo::new(Tracked::new(stream, activity.clone()));
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, svc);
            let _ = until_idle(&activity, limits.idle_timeout, conn).await;
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn limits(max: usize) -> ConnLimits {
        ConnLimits {
            max_connections: max,
            header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
        }
    }

    async fn start(max: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("s.sock");
        let listener = crate::bind_box_socket(&sock).expect("bind");
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    // Bytes keep moving every 200 ms for 1.5 s: longer than the idle timeout.
                    let s = async_stream_ticks();
                    axum::body::Body::from_stream(s)
                }),
            );
        tokio::spawn(serve_http(
            listener,
            app,
            limits(max),
            refusal_response("503 Service Unavailable", "{\"over\":true}"),
        ));
        (dir, sock)
    }

    fn async_stream_ticks(
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> {
        futures::stream::unfold(0u32, |i| async move {
            if i >= 8 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            Some((Ok(bytes::Bytes::from_static(b"tick\n")), i + 1))
        })
    }

    async fn get(sock: &std::path::Path, path: &str) -> String {
        let mut s = tokio::net::UnixStream::connect(sock)
            .await
            .expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn over_the_cap_is_refused_and_a_freed_slot_is_reused() {
        let (_d, sock) = start(2).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(
                tokio::net::UnixStream::connect(&sock)
                    .await
                    .expect("connect"),
            );
        }
        // The two held connections have not sent a head yet; the third is over the cap.
        let refused = get(&sock, "/").await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.ends_with("{\"over\":true}"), "{refused}");
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = get(&sock, "/").await;
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "slot never freed: {r}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_door_hands_each_connection_to_its_ports_service() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("door.sock");
        let listener = crate::bind_box_socket(&sock).expect("bind");
        let mut door = Door::new();
        for (port, name) in [(7u16, "seven"), (300, "three hundred")] {
            let app =
                axum::Router::new().route("/", axum::routing::get(move || async move { name }));
            tokio::spawn(serve_http(
                door.route(port),
                app,
                limits(4),
                refusal_response("503 Service Unavailable", "{}"),
            ));
        }
        tokio::spawn(door.serve(listener, Duration::from_millis(300)));
        let ask = |preface: Vec<u8>| {
            let sock = sock.clone();
            async move {
                let mut s = tokio::net::UnixStream::connect(&sock)
                    .await
                    .expect("connect");
                // One write: a connection the door closes at once must not fail the test's write.
                let mut head = preface;
                head.extend_from_slice(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
                s.write_all(&head).await.expect("write");
                let mut out = String::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
                    .await
                    .expect("answered or closed in time");
                out
            }
        };
        let seven = ask(7u16.to_be_bytes().to_vec()).await;
        assert!(seven.ends_with("seven"), "{seven}");
        let three = ask(300u16.to_be_bytes().to_vec()).await;
        assert!(three.ends_with("three hundred"), "{three}");
        // A port with no service: closed unanswered.
        assert_eq!(ask(8u16.to_be_bytes().to_vec()).await, "");
        // No preface in time: closed unanswered.
        let mut s = tokio::net::UnixStream::connect(&sock)
            .await
            .expect("connect");
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0))), "{r:?}");
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_header_timeout() {
        let (_d, sock) = start(4).await;
        let mut s = tokio::net::UnixStream::connect(&sock)
            .await
            .expect("connect");
        let t0 = Instant::now();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "still open after 5 s");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_response_that_keeps_moving_outlives_the_idle_timeout() {
        let (_d, sock) = start(4).await;
        let r = get(&sock, "/slow").await;
        assert_eq!(r.matches("tick").count(), 8, "{r}");
    }

    #[tokio::test]
    async fn a_quiet_connection_is_cut_after_the_idle_timeout() {
        let a = Activity::new();
        let t0 = Instant::now();
        let out = until_idle(&a, Duration::from_millis(200), std::future::pending::<()>()).await;
        assert!(out.is_none());
        assert!(t0.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_busy_connection_is_not_idle_until_the_guard_drops() {
        let a = Activity::new();
        let busy = a.busy();
        let t0 = Instant::now();
        let release = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(busy);
            std::future::pending::<()>().await
        };
        let out = until_idle(&a, Duration::from_millis(200), release).await;
        assert!(out.is_none());
        assert!(
            t0.elapsed() >= Duration::from_millis(700),
            "{:?}",
            t0.elapsed()
        );
    }
}
