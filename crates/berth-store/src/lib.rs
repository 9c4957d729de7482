//! berth's durable state behind one interface, [`Store`].
//!
//! The embedded implementation is SQLite (WAL, one file in the data dir); PostgreSQL
//! implements the same trait with the same schema (JSON documents plus the columns queries
//! filter on) for servers that share their state. [`open`] picks one by URL. Contract:
//!
//! - Writes are durable when the future resolves: against a `kill -9` or crash of the server
//!   always; against power loss too with `Durability::PowerLoss` (fsync per commit).
//! - Events are append-only; `(session_id, seq)` is unique and an append that reuses a seq fails
//!   with [`StoreError::Conflict`] instead of overwriting; so does a batch that does not
//!   continue its log (seqs are gapless: the first is the log's last + 1, then consecutive).
//! - [`Store::watch_session`]: a store shared by several processes wakes watchers when a
//!   batch of a session's events commits (from any process); an embedded store has no other
//!   writer and returns None.
//! - Nodes (a cluster: servers sharing the store): a box's record is written only by the node
//!   that holds it — [`Store::put_box`] over a row whose `node` differs from the object's is a
//!   [`StoreError::Conflict`] and changes nothing — so a node the cluster declared lost cannot
//!   overwrite what replaced its boxes; [`Store::claim_box`] moves a box between holders with
//!   one compare-and-set. A session's record likewise ([`Store::put_session`]): written by the
//!   node its row names or by its box's holder now, else a `Conflict`. Node leases, loss and
//!   cron firings are conditional UPDATEs: exactly one caller wins each.
//! - Tenancy is enforced by callers through the `tenant` argument of lookups; a row of another
//!   tenant is reported as absent.

pub mod copy;
pub mod postgres;
pub mod snapshots;
mod sql;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

use async_trait::async_trait;
use berth_api::{BoxObject, Event, KeyObject, NodeObject, SessionObject, TriggerObject};

pub use postgres::PostgresStore;
pub use sqlite::{Durability, SqliteStore};

use std::path::Path;
use std::sync::Arc;

/// Open the store a `database_url` names: `sqlite://<path>` (or None: `default_sqlite`) or
/// `postgres://…` / `postgresql://…`.
pub async fn open(
    url: Option<&str>,
    default_sqlite: &Path,
    durability: Durability,
) -> Result<Arc<dyn Store>> {
    match url {
        None => Ok(Arc::new(
            SqliteStore::open_with(default_sqlite, durability).await?,
        )),
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            Ok(Arc::new(PostgresStore::open(u).await?))
        }
        Some(u) => match u.strip_prefix("sqlite://") {
            Some(path) if !path.is_empty() => Ok(Arc::new(
                SqliteStore::open_with(Path::new(path), durability).await?,
            )),
            _ => Err(StoreError::Url(format!(
                "{u:?}: expected sqlite://<path> or postgres://…"
            ))),
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database_url {0}")]
    Url(String),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One metered model request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageRow {
    pub ts: String,
    /// The same instant in Unix milliseconds (what range queries filter on).
    pub ts_ms: i64,
    pub tenant: String,
    pub box_id: String,
    pub session_id: String,
    pub model: String,
    pub status: u16,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_5m_tokens: u64,
    pub cache_creation_1h_tokens: u64,
    pub cache_read_tokens: u64,
    /// Priced when it was recorded, with the price table of that moment.
    pub cost_usd: f64,
}

/// What usage is summed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageKey {
    Session,
    Box,
    Tenant,
    Model,
}

/// Which usage rows count; every field narrows. Times are Unix ms, `from` inclusive, `to`
/// exclusive.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub tenant: Option<String>,
    pub session_id: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

/// Usage rows summed per (key, model).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageSum {
    pub key: String,
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_5m_tokens: u64,
    pub cache_creation_1h_tokens: u64,
    pub cache_read_tokens: u64,
    pub cost_usd: f64,
}

/// A span during which a box was running (and cost container time).
#[derive(Debug, Clone, PartialEq)]
pub struct BoxSpan {
    pub box_id: String,
    pub tenant: String,
    pub start_ms: i64,
    /// None while the box runs.
    pub end_ms: Option<i64>,
    pub cpus: f64,
    pub memory_mib: u64,
}

/// One version of a JSON document (`Store::put_document`): `kind` names the feature's table
/// of documents (`agent`, `environment`, …), ids are unique per kind and tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub kind: String,
    pub tenant: String,
    pub id: String,
    pub version: i64,
    pub body: serde_json::Value,
}

/// A key row as the authenticator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub admin: bool,
}

/// A node as stored: the object, and its lease's end in Unix ms (what lapses are judged by).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub node: NodeObject,
    pub lease_ms: i64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Readiness: the store takes a write (within its own busy timeout).
    async fn ping(&self) -> Result<()>;

    /// Wake-ups for commits of a session's events by any process sharing this store (the
    /// value is a counter; only its changes mean anything). None: no other process can write
    /// here, the owning process's own feed is all there is.
    fn watch_session(&self, _session_id: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    async fn ensure_tenant(&self, tenant: &str) -> Result<()>;
    async fn insert_key(&self, key: &KeyObject, hash: &str) -> Result<()>;
    async fn find_key(&self, hash: &str) -> Result<Option<KeyRecord>>;
    async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<KeyObject>>;
    /// The key `id` of `tenant` (without its secret); None: no such key in that tenant.
    async fn get_key(&self, tenant: &str, id: &str) -> Result<Option<KeyObject>>;
    async fn delete_key(&self, id: &str) -> Result<bool>;
    async fn count_keys(&self) -> Result<i64>;

    /// Insert or replace a box document.
    async fn put_box(&self, b: &BoxObject) -> Result<()>;
    async fn get_box(&self, tenant: Option<&str>, id: &str) -> Result<Option<BoxObject>>;
    async fn list_boxes(&self, tenant: Option<&str>) -> Result<Vec<BoxObject>>;

    /// Insert or replace a session document. Fenced: an existing row is replaced only when
    /// `s.node` is the row's node or the node holding the session's box (see the module
    /// docs), else [`StoreError::Conflict`] and nothing changes.
    async fn put_session(&self, s: &SessionObject) -> Result<()>;
    /// Append `events` of session `s` (as [`Store::append_events`]; may be empty) and write
    /// `s` in one transaction: a reader that sees an event sees the record as of that event or
    /// later, and a refused batch leaves the record as it was.
    async fn commit_session(&self, s: &SessionObject, events: &[Event]) -> Result<()>;
    async fn get_session(&self, tenant: Option<&str>, id: &str) -> Result<Option<SessionObject>>;
    async fn list_sessions(
        &self,
        tenant: Option<&str>,
        box_id: Option<&str>,
    ) -> Result<Vec<SessionObject>>;

    async fn append_events(&self, events: &[Event]) -> Result<()>;
    /// Events with `seq > after`, oldest first, at most `limit`.
    async fn events_after(&self, session_id: &str, after: i64, limit: i64) -> Result<Vec<Event>>;
    async fn last_seq(&self, session_id: &str) -> Result<i64>;

    /// Set (None: clear) a tenant's monthly budget; creates the tenant if new.
    async fn set_tenant_budget(&self, tenant: &str, budget_usd_month: Option<f64>) -> Result<()>;
    /// Tenants that have a monthly budget.
    async fn tenant_budgets(&self) -> Result<Vec<(String, f64)>>;
    async fn tenant_budget(&self, tenant: &str) -> Result<Option<f64>>;

    /// Box events use the same shape as session events (`session_id` holds the box id).
    async fn append_box_events(&self, events: &[Event]) -> Result<()>;
    async fn box_events_after(&self, box_id: &str, after: i64, limit: i64) -> Result<Vec<Event>>;
    /// The highest seq in a box's event log (0 when empty).
    async fn last_box_seq(&self, box_id: &str) -> Result<i64>;

    /// Insert or update a trigger; `secret` is stored beside it (the document never holds it).
    async fn put_trigger(&self, t: &TriggerObject, secret: &str) -> Result<()>;
    /// Update a trigger's document (firing counters), keeping its secret.
    async fn update_trigger(&self, t: &TriggerObject) -> Result<()>;
    /// A trigger and its secret.
    async fn get_trigger(
        &self,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<(TriggerObject, String)>>;
    async fn list_triggers(&self, tenant: Option<&str>) -> Result<Vec<TriggerObject>>;
    async fn delete_trigger(&self, tenant: Option<&str>, id: &str) -> Result<bool>;

    /// Write one version of a document. `replace`: overwrite that version if it exists;
    /// otherwise an existing (kind, tenant, id, version) is a [`StoreError::Conflict`] (what
    /// optimistic concurrency on versions rests on).
    async fn put_document(&self, doc: &Document, replace: bool) -> Result<()>;
    /// Compare-and-swap of a document kept at one version: moves version `from` of `doc`'s
    /// (kind, tenant, id) to `doc.version` with `doc.body`, in one statement; false (nothing
    /// written) when that version is not there, e.g. another writer moved it first.
    async fn advance_document(&self, doc: &Document, from: i64) -> Result<bool>;
    /// Every version of the documents of `kind` in `tenant` (of one `id` when given), in the
    /// order they were first written.
    async fn documents(&self, kind: &str, tenant: &str, id: Option<&str>) -> Result<Vec<Document>>;
    /// How many versions of documents of `kind` `tenant` holds (all ids, every version), as
    /// [`Store::documents`] would return, without reading them.
    async fn count_documents(&self, kind: &str, tenant: &str) -> Result<i64>;
    /// Delete every version of a document; false when there was none.
    async fn delete_document(&self, kind: &str, tenant: &str, id: &str) -> Result<bool>;
    /// One page of the latest version of each of a tenant's documents of `kind`, in id order
    /// (`desc`: highest first): those past `after` in that order (below it when `desc`), at
    /// most `limit`. A keyset read on (kind, tenant, id): a page costs its own rows, not the
    /// tenant's other documents (the Managed Agents API's ids start with their creation time,
    /// so id order is creation order).
    async fn latest_documents(
        &self,
        kind: &str,
        tenant: &str,
        after: Option<&str>,
        desc: bool,
        limit: i64,
    ) -> Result<Vec<Document>>;

    /// Append usage rows in one transaction.
    async fn record_usage(&self, rows: &[UsageRow]) -> Result<()>;
    /// Usage rows matching `filter`, summed per (`key`, model), ordered by key then model.
    /// Reads an hourly rollup for the window's whole hours and the rows only for its partial
    /// first and last hours, so its cost follows (sessions × hours), not requests.
    async fn usage_sums(&self, key: UsageKey, filter: &UsageFilter) -> Result<Vec<UsageSum>>;

    /// A box started running at `span.start_ms` (its `end_ms` is ignored).
    async fn open_box_span(&self, span: &BoxSpan) -> Result<()>;
    /// A box stopped running: close its open span. Idempotent.
    async fn close_box_span(&self, box_id: &str, end_ms: i64) -> Result<()>;
    /// Heartbeat: every open span was still running at `now_ms`.
    async fn mark_box_spans_seen(&self, now_ms: i64) -> Result<()>;
    /// After a crash: close every open span at the last time it was seen running; returns how
    /// many were closed.
    async fn close_abandoned_box_spans(&self) -> Result<u64>;
    /// Spans overlapping `[from_ms, to_ms)` of one tenant (or all) and one box (or all).
    async fn box_spans(
        &self,
        tenant: Option<&str>,
        box_id: Option<&str>,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> Result<Vec<BoxSpan>>;

    /// Join (or rejoin) the cluster as `node.name`: the row is written with a lease until
    /// `lease_ms` and an incarnation one past the row's previous one (1 when new), which is
    /// returned. A draining node stays draining; any other comes back `active`.
    async fn join_node(&self, node: &NodeObject, lease_ms: i64) -> Result<i64>;
    /// Renew a node's lease to `lease_ms` and store its object (load), only while it holds
    /// `incarnation` and is not lost; false: superseded or declared lost (nothing written).
    async fn renew_node(&self, node: &NodeObject, incarnation: i64, lease_ms: i64) -> Result<bool>;
    /// Every node, by name.
    async fn list_nodes(&self) -> Result<Vec<NodeRow>>;
    /// Declare node `name` lost, only if it still holds `incarnation`, is not lost already and
    /// its lease ended before `now_ms`: true for exactly one of any number of callers.
    async fn claim_lost_node(
        &self,
        name: &str,
        incarnation: i64,
        now_ms: i64,
        reason: &str,
    ) -> Result<bool>;
    /// Set a node that is not lost `active` or `draining`; false when there is no such node
    /// (or it is lost).
    async fn set_node_state(&self, name: &str, state: berth_api::NodeState) -> Result<bool>;
    /// Write `b` (its `node` included) only if the row's node is still `from` (None: held by
    /// no node): true for exactly one of concurrent claimers.
    async fn claim_box(&self, b: &BoxObject, from: Option<&str>) -> Result<bool>;
    /// Claim the cron firing of trigger `id` due at `due_ms`: true for exactly one caller per
    /// instant, and false for any instant at or before one already claimed.
    async fn claim_cron_fire(&self, id: &str, due_ms: i64) -> Result<bool>;
}
