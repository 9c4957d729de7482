//! Name lookups for the egress proxy: the resolver seam and the bounds on lookups in flight.

use super::*;

/// Bounds on name lookups. A lookup holds a blocking-pool thread until the resolver answers,
/// even after its requester gave up, so its permits are held until then too: one box never
/// holds more than `per_box` threads, and all boxes together no more than `global`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsLimits {
    pub per_box: usize,
    pub global: usize,
    /// Time a lookup has, waiting for a permit included; past it the request gets a 502.
    pub timeout: std::time::Duration,
}

impl Default for DnsLimits {
    fn default() -> Self {
        DnsLimits {
            per_box: 4,
            global: 64,
            timeout: std::time::Duration::from_secs(5),
        }
    }
}

type ResolveFn = dyn Fn(
        String,
        u16,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>,
    > + Send
    + Sync;

/// A name resolver: `(host, port)` to addresses.
#[derive(Clone)]
pub struct Resolver(Arc<ResolveFn>);

impl Resolver {
    pub fn new<F, Fut>(f: F) -> Resolver
    where
        F: Fn(String, u16) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        Resolver(Arc::new(move |h, p| Box::pin(f(h, p))))
    }

    /// The system resolver (`getaddrinfo` on tokio's blocking pool).
    pub fn system() -> Resolver {
        Resolver::new(|host: String, port: u16| async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// Why a lookup gave no addresses.
pub(super) enum LookupError {
    Failed,
    TimedOut,
}

impl Egress {
    /// Resolve `host` within the lookup bounds. The lookup runs in its own task holding both
    /// permits, so a resolver that never answers keeps its slots (and only its slots) busy
    /// after this call has given up.
    pub(super) async fn lookup(
        &self,
        dns_box: &Arc<tokio::sync::Semaphore>,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, LookupError> {
        let (global, resolver) = (self.dns_global.clone(), self.cfg.resolver.clone());
        let (dns_box, host) = (dns_box.clone(), host.to_string());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = async move {
            let Ok(_mine) = dns_box.acquire_owned().await else {
                return;
            };
            let Ok(_all) = global.acquire_owned().await else {
                return;
            };
            if tx.is_closed() {
                return;
            }
            let _ = tx.send((resolver.0)(host, port).await);
        };
        // Not awaited past the timeout: a lookup still queued for a permit then finds its
        // requester gone and never starts; one already running finishes, holding its permits.
        drop(tokio::spawn(work));
        match tokio::time::timeout(self.cfg.dns.timeout, rx).await {
            Ok(Ok(Ok(addrs))) => Ok(addrs),
            Ok(_) => Err(LookupError::Failed),
            Err(_) => Err(LookupError::TimedOut),
        }
    }
}
