//! The actor tests' world: an engine over the fake backend and a SQLite store kept on real
//! time, and bounded waits.

use crate::engine::*;
use berth_sandbox::fake::FakeBackend;

pub(super) struct World {
    pub(super) engine: Arc<Engine>,
    pub(super) fake: FakeBackend,
    pub(super) store: Arc<dyn Store>,
    /// Holds every store call while closed: a database that stopped answering.
    pub(super) gate: Arc<Gate>,
    pub(super) dir: Arc<tempfile::TempDir>,
}

/// A switch in front of the store: closed, every call waits (asynchronously, so paused time
/// still advances) until it opens again.
pub(super) struct Gate {
    open: tokio::sync::watch::Sender<bool>,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            open: tokio::sync::watch::channel(true).0,
            waiting: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub(super) fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }

    /// Calls held at the gate now.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn pass(&self) {
        let mut rx = self.open.subscribe();
        if *rx.borrow() {
            return;
        }
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = rx.wait_for(|open| *open).await;
        self.waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn engine_config(dir: &std::path::Path, max_boxes_per_tenant: usize) -> EngineConfig {
    EngineConfig {
        default_backend: "fake".into(),
        session_rpm: None,
        max_boxes_per_tenant,
        max_exec_output: 1 << 20,
        cost: ledger::CostConfig {
            box_hour_usd: 0.0,
            scale_by_resources: false,
            gap_fraction: 0.1,
        },
        clock: crate::clock::Clock::following_tokio(1_700_000_000_000),
        snapshots: berth_store::snapshots::SnapshotStore::local(&dir.join("snapshots"))
            .expect("snapshot store"),
        hook_rate_per_minute: 60,
        idle_timeout: crate::config::IdleTimeoutSection::default(),
        max_box: admission::MaxBox {
            cpus: 64.0,
            memory_mib: 1 << 20,
            disk_mib: 1 << 20,
            pids: 100_000,
        },
        tenant_totals: admission::TenantTotals::default(),
        start_boost: None,
        events: event_cap::Limits {
            per_second: 1000,
            burst: 1000,
            max_bytes: 64 * 1024,
            max_per_session: 100_000,
        },
    }
}

/// The Claude CLI's path as the engine launches it (the fake backend answers its execs).
pub(super) const FAKE_CLAUDE: &str = "/opt/fake/claude";

/// An engine (a "server") over `store` and `fake`; a second call over the same two is the
/// same server restarted.
pub(super) fn engine_over(
    dir: &std::path::Path,
    store: Arc<dyn Store>,
    fake: &FakeBackend,
    max_boxes_per_tenant: usize,
) -> Arc<Engine> {
    let (gateway, _metered) =
        berth_gateway::Gateway::new(berth_gateway::GatewayConfig::default()).expect("gateway");
    let (egress, _decisions) =
        berth_gateway::egress::Egress::new(berth_gateway::egress::EgressConfig::default())
            .expect("egress");
    let mut backends = HashMap::new();
    backends.insert("fake".to_string(), Arc::new(Backend::Fake(fake.clone())));
    Engine::new(
        store,
        backends,
        engine_config(dir, max_boxes_per_tenant),
        gateway,
        egress,
        Some(crate::claude_cli::ClaudeCli {
            path: FAKE_CLAUDE.into(),
            version: "2.1.328".into(),
        }),
    )
}

/// The SQLite store on a runtime of its own that keeps real time: every call runs there, so
/// the pool's timers (acquire timeouts, connection reaping) are not on the paused clock. The
/// test's runtime blocks until the call is done: were it to wait idle, paused time would
/// auto-advance to its next timer (a box's idle deadline) in the middle of a store write.
struct RealTimeStore {
    inner: Arc<berth_store::SqliteStore>,
    rt: tokio::runtime::Handle,
    gate: Arc<Gate>,
}

fn open_store(path: std::path::PathBuf, gate: Arc<Gate>) -> Arc<dyn Store> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("store runtime");
        let inner = rt
            .block_on(berth_store::SqliteStore::open(&path))
            .expect("store");
        let store: Arc<dyn Store> = Arc::new(RealTimeStore {
            inner: Arc::new(inner),
            rt: rt.handle().clone(),
            gate,
        });
        let _ = tx.send(store);
        // Keeps the runtime for the test's life.
        rt.block_on(std::future::pending::<()>())
    });
    rx.recv().expect("store opened")
}

/// The `Store` impl forwarding each method to the real-time runtime: each argument is owned
/// for the trip (`= own`) and lent again there (`=> lend`).
macro_rules! forward_store {
    ($($name:ident ( $($arg:ident : $ty:ty = $own:expr => $lend:expr),* ) -> $ret:ty;)*) => {
        #[async_trait::async_trait]
        impl Store for RealTimeStore {
            $(
                // Copied arguments are "owned" as themselves.
                #[allow(clippy::redundant_locals)]
                async fn $name(&self, $($arg: $ty),*) -> berth_store::Result<$ret> {
                    $(let $arg = $own;)*
                    self.gate.pass().await;
                    let inner = self.inner.clone();
                    futures::executor::block_on(
                        self.rt.spawn(async move { inner.$name($($lend),*).await }),
                    )
                    .expect("store call")
                }
            )*
        }
    };
}

forward_store! {
    ping() -> ();
    ensure_tenant(t: &str = t.to_string() => &t) -> ();
    insert_key(k: &KeyObject = k.clone() => &k, h: &str = h.to_string() => &h) -> ();
    find_key(h: &str = h.to_string() => &h) -> Option<berth_store::KeyRecord>;
    list_keys(t: Option<&str> = t.map(str::to_string) => t.as_deref()) -> Vec<KeyObject>;
    get_key(t: &str = t.to_string() => &t, id: &str = id.to_string() => &id) -> Option<KeyObject>;
    delete_key(id: &str = id.to_string() => &id) -> bool;
    count_keys() -> i64;
    put_box(b: &BoxObject = b.clone() => &b) -> ();
    get_box(t: Option<&str> = t.map(str::to_string) => t.as_deref(), id: &str = id.to_string() => &id) -> Option<BoxObject>;
    list_boxes(t: Option<&str> = t.map(str::to_string) => t.as_deref()) -> Vec<BoxObject>;
    put_session(s: &SessionObject = s.clone() => &s) -> ();
    commit_session(s: &SessionObject = s.clone() => &s, e: &[Event] = e.to_vec() => &e) -> ();
    get_session(t: Option<&str> = t.map(str::to_string) => t.as_deref(), id: &str = id.to_string() => &id) -> Option<SessionObject>;
    list_sessions(t: Option<&str> = t.map(str::to_string) => t.as_deref(), b: Option<&str> = b.map(str::to_string) => b.as_deref()) -> Vec<SessionObject>;
    append_events(e: &[Event] = e.to_vec() => &e) -> ();
    events_after(id: &str = id.to_string() => &id, after: i64 = after => after, limit: i64 = limit => limit) -> Vec<Event>;
    last_seq(id: &str = id.to_string() => &id) -> i64;
    set_tenant_budget(t: &str = t.to_string() => &t, b: Option<f64> = b => b) -> ();
    tenant_budgets() -> Vec<(String, f64)>;
    tenant_budget(t: &str = t.to_string() => &t) -> Option<f64>;
    append_box_events(e: &[Event] = e.to_vec() => &e) -> ();
    box_events_after(id: &str = id.to_string() => &id, after: i64 = after => after, limit: i64 = limit => limit) -> Vec<Event>;
    last_box_seq(id: &str = id.to_string() => &id) -> i64;
    put_trigger(tr: &TriggerObject = tr.clone() => &tr, sec: &str = sec.to_string() => &sec) -> ();
    update_trigger(tr: &TriggerObject = tr.clone() => &tr) -> ();
    get_trigger(t: Option<&str> = t.map(str::to_string) => t.as_deref(), id: &str = id.to_string() => &id) -> Option<(TriggerObject, String)>;
    list_triggers(t: Option<&str> = t.map(str::to_string) => t.as_deref()) -> Vec<TriggerObject>;
    delete_trigger(t: Option<&str> = t.map(str::to_string) => t.as_deref(), id: &str = id.to_string() => &id) -> bool;
    record_usage(rows: &[berth_store::UsageRow] = rows.to_vec() => &rows) -> ();
    usage_sums(key: berth_store::UsageKey = key => key, f: &berth_store::UsageFilter = f.clone() => &f) -> Vec<berth_store::UsageSum>;
    open_box_span(span: &berth_store::BoxSpan = span.clone() => &span) -> ();
    close_box_span(id: &str = id.to_string() => &id, end: i64 = end => end) -> ();
    mark_box_spans_seen(now: i64 = now => now) -> ();
    close_abandoned_box_spans() -> u64;
    put_document(d: &berth_store::Document = d.clone() => &d, replace: bool = replace => replace) -> ();
    advance_document(d: &berth_store::Document = d.clone() => &d, from: i64 = from => from) -> bool;
    documents(k: &str = k.to_string() => &k, t: &str = t.to_string() => &t, id: Option<&str> = id.map(str::to_string) => id.as_deref()) -> Vec<berth_store::Document>;
    count_documents(k: &str = k.to_string() => &k, t: &str = t.to_string() => &t) -> i64;
    delete_document(k: &str = k.to_string() => &k, t: &str = t.to_string() => &t, id: &str = id.to_string() => &id) -> bool;
    latest_documents(k: &str = k.to_string() => &k, t: &str = t.to_string() => &t, after: Option<&str> = after.map(str::to_string) => after.as_deref(), desc: bool = desc => desc, limit: i64 = limit => limit) -> Vec<berth_store::Document>;
    join_node(n: &berth_api::NodeObject = n.clone() => &n, lease: i64 = lease => lease) -> i64;
    renew_node(n: &berth_api::NodeObject = n.clone() => &n, inc: i64 = inc => inc, lease: i64 = lease => lease) -> bool;
    list_nodes() -> Vec<berth_store::NodeRow>;
    claim_lost_node(name: &str = name.to_string() => &name, inc: i64 = inc => inc, now: i64 = now => now, reason: &str = reason.to_string() => &reason) -> bool;
    set_node_state(name: &str = name.to_string() => &name, st: berth_api::NodeState = st => st) -> bool;
    claim_box(b: &BoxObject = b.clone() => &b, from: Option<&str> = from.map(str::to_string) => from.as_deref()) -> bool;
    claim_cron_fire(id: &str = id.to_string() => &id, due: i64 = due => due) -> bool;
    box_spans(t: Option<&str> = t.map(str::to_string) => t.as_deref(), b: Option<&str> = b.map(str::to_string) => b.as_deref(), from: Option<i64> = from => from, to: Option<i64> = to => to) -> Vec<berth_store::BoxSpan>;
}

pub(super) async fn world(adoption: bool, max_boxes_per_tenant: usize) -> World {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let gate = Gate::new();
    let store = open_store(dir.path().join("berth.db"), gate.clone());
    let fake = FakeBackend::new(dir.path().join("boxes"), adoption);
    let engine = engine_over(dir.path(), store.clone(), &fake, max_boxes_per_tenant);
    World {
        engine,
        fake,
        store,
        gate,
        dir,
    }
}

/// `f` within 20 s of real time, or the test fails (never a hang).
pub(super) async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(20));
        let _ = tx.send(());
    });
    tokio::select! {
        v = f => v,
        _ = rx => panic!("{what}: not within 20 s"),
    }
}

/// Wait (bounded) until the box's published state satisfies `pred`.
pub(super) async fn box_until(
    w: &World,
    id: &str,
    what: &str,
    pred: impl Fn(&BoxObject) -> bool,
) -> BoxObject {
    let mut rx = w
        .engine
        .box_handle(id)
        .unwrap_or_else(|| panic!("{what}: box {id} has no owner task"))
        .state;
    bounded(what, async move {
        rx.wait_for(|b| pred(b))
            .await
            .map(|b| b.clone())
            .expect("box owner task ended")
    })
    .await
}
